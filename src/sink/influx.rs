//! InfluxDB: one line-protocol encoder, two write APIs.
//!
//! Point identity is measurement + `symbol` tag + exchange time in milliseconds, so writing the
//! same tick again (a Kafka replay) overwrites its point instead of adding one.

use std::fmt::Write as _;
use std::io::Write as _;

use flate2::write::GzEncoder;
use flate2::Compression;
use influxdb2::api::write::TimestampPrecision;
use influxdb2::models::WriteDataPoint;

use crate::candles::Tick;
use crate::config::{InfluxApi, InfluxConfig};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("InfluxDB unavailable: {0}")]
    Unavailable(String),
    #[error("InfluxDB rejected the batch with HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("invalid InfluxDB configuration: {0}")]
    Config(String),
}

impl SinkError {
    /// Outages, timeouts, 5xx and 429 pass; other 4xx answers will not change on a retry.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// Appends one point in line protocol, terminated by a newline.
pub fn write_line(out: &mut String, measurement: &str, tick: &Tick) {
    escape(out, measurement, &[',', ' ']);
    out.push_str(",symbol=");
    escape(out, &tick.symbol, &[',', '=', ' ']);
    let fields = [
        ("bid", tick.bid),
        ("bid_size", tick.bid_size),
        ("ask", tick.ask),
        ("ask_size", tick.ask_size),
        ("daily_change", tick.daily_change),
        ("daily_change_relative", tick.daily_change_relative),
        ("last_price", tick.last_price),
        ("volume", tick.volume),
        ("high", tick.high),
        ("low", tick.low),
    ];
    for (i, (name, value)) in fields.iter().enumerate() {
        out.push(if i == 0 { ' ' } else { ',' });
        // Display prints the shortest text that parses back to the same f64, never in
        // exponent form, and without an `i` suffix InfluxDB stores it as a float.
        let _ = write!(out, "{name}={value}");
    }
    let _ = writeln!(out, " {}", tick.exchange_time);
}

fn escape(out: &mut String, text: &str, special: &[char]) {
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\\' => out.push_str("\\\\"),
            c if special.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

/// A batch of line protocol handed to the influxdb2 crate as one data point.
struct Lines(String);

impl WriteDataPoint for Lines {
    fn write_data_point_to<W: std::io::Write>(&self, mut w: W) -> std::io::Result<()> {
        w.write_all(self.0.as_bytes())
    }
}

pub enum InfluxSink {
    V1 { http: reqwest::Client, write_url: String, database: String, auth: Option<(String, Option<String>)> },
    V2 { client: influxdb2::Client, bucket: String, timeout: std::time::Duration },
}

impl InfluxSink {
    pub fn new(cfg: &InfluxConfig) -> Result<Self, SinkError> {
        let base = cfg.url.trim_end_matches('/');
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(SinkError::Config(format!("influx.url {:?} is not an http(s) URL", cfg.url)));
        }
        Ok(match cfg.api {
            InfluxApi::V1 => InfluxSink::V1 {
                http: reqwest::Client::builder()
                    .timeout(cfg.timeout)
                    .build()
                    .map_err(|e| SinkError::Config(e.to_string()))?,
                write_url: format!("{base}/write"),
                database: cfg.database.clone(),
                auth: cfg.username.clone().map(|u| (u, cfg.password.clone())),
            },
            InfluxApi::V2 => {
                let token = cfg.token.clone().filter(|t| !t.is_empty()).ok_or_else(|| {
                    SinkError::Config("influx.api = \"v2\" needs a token: set CANDLESTREAM__INFLUX__TOKEN".into())
                })?;
                let client = influxdb2::ClientBuilder::new(base, cfg.org.clone(), token)
                    .gzip(true)
                    .build()
                    .map_err(|e| SinkError::Config(e.to_string()))?;
                InfluxSink::V2 { client, bucket: cfg.bucket.clone(), timeout: cfg.timeout }
            }
        })
    }

    /// Writes newline-terminated line protocol with millisecond timestamps, gzip-compressed.
    pub async fn write(&self, lines: &str) -> Result<(), SinkError> {
        match self {
            InfluxSink::V1 { http, write_url, database, auth } => {
                let mut gz = GzEncoder::new(Vec::with_capacity(lines.len() / 4), Compression::fast());
                gz.write_all(lines.as_bytes()).map_err(|e| SinkError::Config(e.to_string()))?;
                let body = gz.finish().map_err(|e| SinkError::Config(e.to_string()))?;
                let mut req = http
                    .post(write_url)
                    .query(&[("db", database.as_str()), ("precision", "ms")])
                    .header(reqwest::header::CONTENT_ENCODING, "gzip")
                    .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(body);
                if let Some((user, password)) = auth {
                    req = req.basic_auth(user, password.as_ref());
                }
                let resp = req.send().await.map_err(|e| SinkError::Unavailable(e.to_string()))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let body = resp.text().await.unwrap_or_default();
                Err(classify(status.as_u16(), body))
            }
            InfluxSink::V2 { client, bucket, timeout } => {
                let points = futures::stream::iter([Lines(lines.to_string())]);
                let write = client.write_with_precision(bucket, points, TimestampPrecision::Milliseconds);
                match tokio::time::timeout(*timeout, write).await {
                    Err(_) => Err(SinkError::Unavailable(format!("write timed out after {timeout:?}"))),
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(influxdb2::RequestError::Http { status, text })) => Err(classify(status.as_u16(), text)),
                    Ok(Err(e)) => Err(SinkError::Unavailable(e.to_string())),
                }
            }
        }
    }
}

fn classify(status: u16, body: String) -> SinkError {
    if status >= 500 || status == 429 || status == 408 {
        SinkError::Unavailable(format!("HTTP {status}: {body}"))
    } else {
        SinkError::Rejected { status, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candles::TickSource;

    fn tick(symbol: &str) -> Tick {
        Tick {
            symbol: symbol.into(),
            bid: 97321.0,
            bid_size: 5.22112483,
            ask: 97322.5,
            ask_size: 0.1,
            daily_change: -1200.0,
            daily_change_relative: -0.0122,
            last_price: 97321.0,
            volume: 1210.55304011,
            high: 99000.0,
            low: 1e-7,
            exchange_time: 1_763_787_600_123,
            sequence: Some(1),
            source: TickSource::Websocket,
            received_at: 1_763_787_600_200,
        }
    }

    #[test]
    fn line_protocol_is_exact() {
        let cases = [
            (
                "ticker",
                "tBTCUSD",
                "ticker,symbol=tBTCUSD bid=97321,bid_size=5.22112483,ask=97322.5,ask_size=0.1,daily_change=-1200,daily_change_relative=-0.0122,last_price=97321,volume=1210.55304011,high=99000,low=0.0000001 1763787600123\n",
            ),
            (
                "my ticks,v2",
                "t A,B=C\\D",
                "my\\ ticks\\,v2,symbol=t\\ A\\,B\\=C\\\\D bid=97321,bid_size=5.22112483,ask=97322.5,ask_size=0.1,daily_change=-1200,daily_change_relative=-0.0122,last_price=97321,volume=1210.55304011,high=99000,low=0.0000001 1763787600123\n",
            ),
        ];
        for (measurement, symbol, want) in cases {
            let mut out = String::new();
            write_line(&mut out, measurement, &tick(symbol));
            assert_eq!(out, want);
        }
    }

    #[test]
    fn floats_round_trip_through_their_text() {
        for v in [0.1 + 0.2, 1e-300, 123456789.123456789, -0.0, 5e15, 1.7976931348623157e308] {
            let mut t = tick("x");
            t.bid = v;
            let mut out = String::new();
            write_line(&mut out, "m", &t);
            let text = out.split(' ').nth(1).unwrap().split(',').next().unwrap().trim_start_matches("bid=");
            assert!(!text.contains('e'), "{text}");
            assert_eq!(text.parse::<f64>().unwrap().to_bits(), v.to_bits(), "{text}");
        }
    }

    #[test]
    fn only_outages_are_retried() {
        assert!(classify(503, String::new()).is_retryable());
        assert!(classify(429, String::new()).is_retryable());
        assert!(!classify(400, "partial write: field type conflict".into()).is_retryable());
        assert!(!classify(401, String::new()).is_retryable());
        assert!(!classify(404, "database not found".into()).is_retryable());
    }
}
