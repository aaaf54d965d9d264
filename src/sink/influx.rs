//! InfluxDB: one line-protocol encoder, two write APIs.
//!
//! A point's identity comes from the exchange, so writing a record again (a Kafka replay, a trade
//! fetched twice) overwrites its point instead of adding one:
//! - ticker: measurement + `symbol` + exchange time;
//! - trade: measurement + `symbol` + `side` + exchange time plus (trade id mod 10^6) ns. Trades
//!   that share a millisecond stay distinct points, ordered by id (execution order) inside it,
//!   and the time stays within 1 ms of the exchange's. The id is in the record itself, so the
//!   identity survives restarts without any state.

use std::fmt::Write as _;
use std::io::Write as _;

use flate2::Compression;
use flate2::write::GzEncoder;
use influxdb2::api::write::TimestampPrecision;
use influxdb2::models::WriteDataPoint;

use crate::config::{InfluxApi, InfluxConfig, InfluxTarget, Secret};
use crate::model::{Record, Tick, Trade};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("InfluxDB unavailable: {0}")]
    Unavailable(String),
    /// Credentials, database, bucket or org are wrong: no record is at fault, and a retry
    /// succeeds once someone fixes the setup.
    #[error("{what} (HTTP {status}): {body}; {fix}")]
    Misconfigured {
        what: &'static str,
        status: u16,
        body: String,
        fix: String,
    },
    /// InfluxDB refused some of the points for their content (type conflict, unparsable line,
    /// outside the retention policy); InfluxDB 1.x stored the others.
    #[error("InfluxDB rejected points with HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("invalid InfluxDB configuration: {0}")]
    Config(String),
    #[error("cannot compress the points: {0}")]
    Compress(#[source] std::io::Error),
}

impl SinkError {
    /// Outages and setup faults are held and retried; only rejected content is not: the same
    /// points would be refused again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SinkError::Unavailable(_) | SinkError::Misconfigured { .. }
        )
    }
}

const NS_PER_MS: i64 = 1_000_000;

/// Appends one point in line protocol with a nanosecond timestamp, terminated by a newline.
pub fn write_line(out: &mut String, measurement: &str, record: &Record) {
    escape(out, measurement, &[',', ' ']);
    out.push_str(",symbol=");
    escape(out, record.symbol(), &[',', '=', ' ']);
    let time = match record {
        Record::Tick(t) => tick_fields(out, t),
        Record::Trade(t) => trade_fields(out, t),
    };
    let _ = writeln!(out, " {time}");
}

fn tick_fields(out: &mut String, tick: &Tick) -> i64 {
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
    float_fields(out, ' ', &fields);
    time_ns(tick.exchange_time, 0)
}

fn trade_fields(out: &mut String, trade: &Trade) -> i64 {
    let _ = write!(out, ",side={} id={}i", trade.side().as_str(), trade.id);
    float_fields(
        out,
        ',',
        &[("price", trade.price), ("amount", trade.amount.abs())],
    );
    time_ns(trade.exchange_time, trade.id.rem_euclid(NS_PER_MS))
}

/// A point's time: `ms` x 10^6 plus `ns` (0 ..= 999 999). Times from the exchange are
/// range-checked where they are parsed ([`crate::model::MAX_EXCHANGE_TIME_MS`]), but a record in
/// Kafka may have been written by anything: a time beyond what i64 nanoseconds hold saturates to
/// i64::MAX (or MIN), which InfluxDB refuses (its times run from MIN + 2 to MAX - 1), so the point
/// takes the path of rejected points to the dead-letter topic instead of wrapping around to a
/// wrong time (or panicking in a debug build).
pub fn time_ns(ms: i64, ns: i64) -> i64 {
    ms.saturating_mul(NS_PER_MS).saturating_add(ns)
}

/// `first` separates the first of these fields from what precedes it: ' ' after the tags, ','
/// after another field.
fn float_fields(out: &mut String, first: char, fields: &[(&str, f64)]) {
    for (i, (name, value)) in fields.iter().enumerate() {
        out.push(if i == 0 { first } else { ',' });
        // Display prints the shortest text that parses back to the same f64, never in
        // exponent form, and without an `i` suffix InfluxDB stores it as a float.
        let _ = write!(out, "{name}={value}");
    }
}

/// Appends `text` with line protocol's escapes: backslash, newline and the `special` characters
/// of its position (measurement, tag, string field).
pub fn escape(out: &mut String, text: &str, special: &[char]) {
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

/// How to reach InfluxDB: its base URL, the credentials of the API in use, and one HTTP client
/// with `influx.timeout`. Shared by the sink's v1 writes and every InfluxQL query (audit,
/// verify).
#[derive(Clone)]
pub struct InfluxConnection {
    http: reqwest::Client,
    base: String,
    target: InfluxTarget,
}

impl InfluxConnection {
    pub fn new(cfg: &InfluxConfig) -> Result<Self, SinkError> {
        let target = cfg.target().map_err(|e| SinkError::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| SinkError::Config(e.to_string()))?;
        Ok(Self {
            http,
            base: cfg.url.trim_end_matches('/').to_string(),
            target,
        })
    }

    /// The database InfluxQL reads: v1's database, or on 2.x the bucket, which its
    /// v1-compatible endpoints take as database.
    fn database(&self) -> &str {
        match &self.target {
            InfluxTarget::V1 { database, .. } => database,
            InfluxTarget::V2 { bucket, .. } => bucket,
        }
    }

    /// A request to `path` with the credentials of the API in use.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.target {
            InfluxTarget::V1 {
                auth: Some((user, password)),
                ..
            } => req.basic_auth(user, password.as_ref().map(Secret::expose)),
            InfluxTarget::V1 { auth: None, .. } => req,
            InfluxTarget::V2 { token, .. } => req.header(
                reqwest::header::AUTHORIZATION,
                format!("Token {}", token.expose()),
            ),
        }
    }

    /// Runs one InfluxQL statement through `/query` and returns its first result, or
    /// InfluxDB's error.
    pub async fn query(&self, q: &str) -> Result<serde_json::Value, String> {
        let resp = self
            .request(reqwest::Method::GET, "/query")
            .query(&[("db", self.database()), ("q", q), ("epoch", "ms")])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let mut body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("HTTP {status}: {e}"))?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {body}"));
        }
        let result = body["results"][0].take();
        match result["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(result),
        }
    }
}

pub enum InfluxSink {
    V1 {
        connection: InfluxConnection,
        fixes: Fixes,
    },
    V2 {
        client: influxdb2::Client,
        bucket: String,
        timeout: std::time::Duration,
        fixes: Fixes,
    },
}

/// What an operator should check, per setup fault, in this API's terms.
pub struct Fixes {
    credentials: String,
    missing: String,
}

impl Fixes {
    fn new(cfg: &InfluxConfig) -> Self {
        match cfg.api {
            InfluxApi::V1 => Self {
                credentials: format!(
                    "check influx.username ({:?}) and CANDLESTREAM__INFLUX__PASSWORD, and that the user may write to database {:?}",
                    cfg.username.as_deref().unwrap_or(""),
                    cfg.database
                ),
                missing: format!(
                    "create database {:?} (CREATE DATABASE) or fix influx.database",
                    cfg.database
                ),
            },
            InfluxApi::V2 => Self {
                credentials: format!(
                    "check CANDLESTREAM__INFLUX__TOKEN: it must be valid and allowed to write to bucket {:?} of org {:?}",
                    cfg.bucket, cfg.org
                ),
                missing: format!(
                    "create org {:?} and bucket {:?}, or fix influx.org and influx.bucket",
                    cfg.org, cfg.bucket
                ),
            },
        }
    }

    /// 5xx, 429 and 408 pass by themselves; 400, 413 and 422 are about the points sent; every
    /// other answer is about the setup.
    fn classify(&self, status: u16, body: String) -> SinkError {
        let misconfigured = |what, fix: &String| SinkError::Misconfigured {
            what,
            status,
            body: body.clone(),
            fix: fix.clone(),
        };
        match status {
            500.. | 429 | 408 => SinkError::Unavailable(format!("HTTP {status}: {body}")),
            400 | 413 | 422 => SinkError::Rejected { status, body },
            401 | 403 => misconfigured("InfluxDB rejected the credentials", &self.credentials),
            404 => misconfigured(
                "InfluxDB has no such database, bucket or org",
                &self.missing,
            ),
            _ => misconfigured(
                "InfluxDB refused the write",
                &"check influx.url and influx.api".to_string(),
            ),
        }
    }
}

impl InfluxSink {
    pub fn new(cfg: &InfluxConfig) -> Result<Self, SinkError> {
        let connection = InfluxConnection::new(cfg)?;
        Ok(match &connection.target {
            InfluxTarget::V1 { .. } => InfluxSink::V1 {
                connection,
                fixes: Fixes::new(cfg),
            },
            InfluxTarget::V2 { org, bucket, token } => {
                let client = influxdb2::ClientBuilder::new(&connection.base, org, token.expose())
                    .gzip(true)
                    .build()
                    .map_err(|e| SinkError::Config(e.to_string()))?;
                InfluxSink::V2 {
                    client,
                    bucket: bucket.clone(),
                    timeout: cfg.timeout,
                    fixes: Fixes::new(cfg),
                }
            }
        })
    }

    /// Writes newline-terminated line protocol with nanosecond timestamps, gzip-compressed.
    pub async fn write(&self, lines: &str) -> Result<(), SinkError> {
        match self {
            InfluxSink::V1 { connection, fixes } => {
                let mut gz =
                    GzEncoder::new(Vec::with_capacity(lines.len() / 4), Compression::fast());
                gz.write_all(lines.as_bytes())
                    .map_err(SinkError::Compress)?;
                let body = gz.finish().map_err(SinkError::Compress)?;
                let resp = connection
                    .request(reqwest::Method::POST, "/write")
                    .query(&[("db", connection.database()), ("precision", "ns")])
                    .header(reqwest::header::CONTENT_ENCODING, "gzip")
                    .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| SinkError::Unavailable(e.to_string()))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let body = resp.text().await.unwrap_or_default();
                Err(fixes.classify(status.as_u16(), body))
            }
            InfluxSink::V2 {
                client,
                bucket,
                timeout,
                fixes,
            } => {
                let points = futures::stream::iter([Lines(lines.to_string())]);
                let write =
                    client.write_with_precision(bucket, points, TimestampPrecision::Nanoseconds);
                match tokio::time::timeout(*timeout, write).await {
                    Err(_) => Err(SinkError::Unavailable(format!(
                        "write timed out after {timeout:?}"
                    ))),
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(influxdb2::RequestError::Http { status, text })) => {
                        Err(fixes.classify(status.as_u16(), text))
                    }
                    Ok(Err(e)) => Err(SinkError::Unavailable(e.to_string())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;

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
            source: Source::Websocket,
            received_at: 1_763_787_600_200,
        }
    }

    fn trade(id: i64, amount: f64) -> Trade {
        Trade {
            symbol: "tBTCUSD".into(),
            id,
            exchange_time: 1_763_787_601_200,
            amount,
            price: 97321.5,
            source: Source::Websocket,
            sequence: Some(4),
            received_at: 1_763_787_601_250,
        }
    }

    #[test]
    fn trades_sharing_a_millisecond_are_distinct_points_in_id_order() {
        let mut out = String::new();
        for (id, amount) in [
            (1_781_554_001, 0.0125),
            (1_781_554_002, -0.3),
            (1_781_554_003, 1e-8),
        ] {
            write_line(&mut out, "trades", &Record::Trade(trade(id, amount)));
        }
        assert_eq!(
            out,
            "trades,symbol=tBTCUSD,side=buy id=1781554001i,price=97321.5,amount=0.0125 1763787601200554001\n\
             trades,symbol=tBTCUSD,side=sell id=1781554002i,price=97321.5,amount=0.3 1763787601200554002\n\
             trades,symbol=tBTCUSD,side=buy id=1781554003i,price=97321.5,amount=0.00000001 1763787601200554003\n"
        );
    }

    #[test]
    fn times_beyond_i64_nanoseconds_saturate_instead_of_wrapping() {
        let time_of = |record: Record| {
            let mut out = String::new();
            write_line(&mut out, "m", &record);
            out.trim_end().rsplit(' ').next().unwrap().to_string()
        };
        let last = crate::model::MAX_EXCHANGE_TIME_MS;
        let cases = [
            // The last time the exchange may send, with the largest id offset: still exact.
            (last, 1_999_999, "9223372036853999999"),
            (last + 1, 1_999_999, "9223372036854775807"),
            (i64::MAX, 1, "9223372036854775807"),
            (i64::MIN / 2, 1_000_000, "-9223372036854775808"),
        ];
        for (ms, id, want) in cases {
            let mut t = trade(id, 1.0);
            t.exchange_time = ms;
            assert_eq!(time_of(Record::Trade(t)), want, "trade at {ms} ms");
        }
        let mut t = tick("x");
        t.exchange_time = i64::MAX / 1000;
        assert_eq!(time_of(Record::Tick(t)), "9223372036854775807");
    }

    #[test]
    fn line_protocol_is_exact() {
        let cases = [
            (
                "ticker",
                "tBTCUSD",
                "ticker,symbol=tBTCUSD bid=97321,bid_size=5.22112483,ask=97322.5,ask_size=0.1,daily_change=-1200,daily_change_relative=-0.0122,last_price=97321,volume=1210.55304011,high=99000,low=0.0000001 1763787600123000000\n",
            ),
            (
                "my ticks,v2",
                "t A,B=C\\D",
                "my\\ ticks\\,v2,symbol=t\\ A\\,B\\=C\\\\D bid=97321,bid_size=5.22112483,ask=97322.5,ask_size=0.1,daily_change=-1200,daily_change_relative=-0.0122,last_price=97321,volume=1210.55304011,high=99000,low=0.0000001 1763787600123000000\n",
            ),
        ];
        for (measurement, symbol, want) in cases {
            let mut out = String::new();
            write_line(&mut out, measurement, &Record::Tick(tick(symbol)));
            assert_eq!(out, want);
        }
    }

    #[test]
    fn floats_round_trip_through_their_text() {
        for v in [
            0.1 + 0.2,
            1e-300,
            123_456_789.123_456_79,
            -0.0,
            5e15,
            1.7976931348623157e308,
        ] {
            let mut t = tick("x");
            t.bid = v;
            let mut out = String::new();
            write_line(&mut out, "m", &Record::Tick(t));
            let text = out
                .split(' ')
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim_start_matches("bid=");
            assert!(!text.contains('e'), "{text}");
            assert_eq!(
                text.parse::<f64>().unwrap().to_bits(),
                v.to_bits(),
                "{text}"
            );
        }
    }

    #[test]
    fn setup_faults_are_held_and_only_content_is_rejected() {
        let v1 = Fixes::new(&InfluxConfig {
            api: InfluxApi::V1,
            database: "crypto".into(),
            ..Default::default()
        });
        assert!(v1.classify(503, String::new()).is_retryable());
        assert!(v1.classify(429, String::new()).is_retryable());
        let conflict = v1.classify(400, "partial write: field type conflict: dropped=1".into());
        assert!(
            matches!(conflict, SinkError::Rejected { status: 400, .. }) && !conflict.is_retryable()
        );
        let auth = v1.classify(401, r#"{"error":"authorization failed"}"#.into());
        assert!(auth.is_retryable());
        assert!(
            auth.to_string()
                .contains("InfluxDB rejected the credentials (HTTP 401)"),
            "{auth}"
        );
        assert!(
            auth.to_string().contains("CANDLESTREAM__INFLUX__PASSWORD"),
            "{auth}"
        );
        let missing = v1.classify(404, r#"{"error":"database not found: \"crypto\""}"#.into());
        assert!(
            missing.is_retryable() && missing.to_string().contains("CREATE DATABASE"),
            "{missing}"
        );
        let v2 = Fixes::new(&InfluxConfig::default());
        let auth = v2.classify(401, "unauthorized access".into());
        assert!(
            auth.is_retryable() && auth.to_string().contains("CANDLESTREAM__INFLUX__TOKEN"),
            "{auth}"
        );
        assert!(
            v2.classify(404, "bucket not found".into())
                .to_string()
                .contains("influx.bucket")
        );
    }
}
