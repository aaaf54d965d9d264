//! Where decoded records (ticker updates and trades) go.

pub mod influx;
