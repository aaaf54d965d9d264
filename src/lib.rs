//! candlestream: Bitfinex ticker updates and trades → Avro in Kafka → InfluxDB → Grafana candles.

pub mod audit;
pub mod codec;
pub mod config;
pub mod consumer;
pub mod exchange;
pub mod kafka;
pub mod model;
pub mod producer;
pub mod retry;
pub mod sink;
pub mod telemetry;
pub mod verify;
