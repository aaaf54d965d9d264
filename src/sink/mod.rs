//! Where decoded ticks go.

pub mod influx;
