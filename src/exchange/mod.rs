//! Market-data sources.

pub mod bitfinex;
