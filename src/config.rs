//! Typed configuration: built-in defaults < config file < `CANDLESTREAM__SECTION__KEY` env vars.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::model::RecordKind;
use crate::retry::Backoff;

pub const ENV_PREFIX: &str = "CANDLESTREAM";

/// A credential. `Debug` and `Display` print `<redacted>`, so a secret never reaches a log line
/// or an error message; [`Secret::expose`] hands the value to the one call that sends it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// librdkafka properties that carry credentials (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, …).
fn is_secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.starts_with("sasl.")
}

/// A pass-through table as `Debug` shows it: credentials redacted.
struct RedactedProperties<'a>(&'a BTreeMap<String, String>);

impl std::fmt::Debug for RedactedProperties<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub bitfinex: BitfinexConfig,
    pub kafka: KafkaConfig,
    pub schema_registry: SchemaRegistryConfig,
    pub producer: ProducerConfig,
    pub consumer: ConsumerConfig,
    pub influx: InfluxConfig,
    pub http: HttpConfig,
    pub health: HealthConfig,
    pub pipeline: PipelineConfig,
    pub log: LogConfig,
    pub verify: VerifyConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeMode {
    /// Websocket, with REST polling while a connection is down.
    Websocket,
    /// REST polling only.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BitfinexConfig {
    pub ws_url: String,
    pub rest_url: String,
    /// Exact trading symbols (`tBTCUSD`) and glob patterns (`t*USD`, `*`) resolved against
    /// Bitfinex's list of trading pairs; see [`crate::exchange::bitfinex::pairs`].
    pub symbols: Vec<String>,
    /// Glob patterns (or exact symbols) taken out of whatever `symbols` selects.
    pub symbols_exclude: Vec<String>,
    /// How often the list of trading pairs is read again when `symbols` holds a pattern.
    #[serde(with = "humantime_serde")]
    pub symbols_refresh: Duration,
    pub mode: ExchangeMode,
    #[serde(with = "humantime_serde")]
    pub rest_poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Websocket reconnects.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// REST requests Bitfinex rate-limited, and REST polls that failed.
    #[serde(with = "humantime_serde")]
    pub rest_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub rest_backoff_max: Duration,
    /// Repairs of trade gaps from REST history.
    #[serde(with = "humantime_serde")]
    pub repair_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub repair_backoff_max: Duration,
    pub channels_per_connection: usize,
    pub connections_per_minute: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Also stream every trade (the source of the candles), not only the ticker.
    pub trades: bool,
    /// History of trades fetched over REST at start; zero turns the backfill off.
    #[serde(with = "humantime_serde")]
    pub backfill: Duration,
    /// How long the start may spend reading the trades topic's tail for the newest trade per
    /// symbol, so the backfill starts there; zero turns that off (full backfill).
    #[serde(with = "humantime_serde")]
    pub resume_timeout: Duration,
    /// This process's per-minute REST limits, one limiter per endpoint, shared by the REST callers
    /// of the producer (polling, backfill, repairs) and used by `candlestream audit`; the verifier
    /// builds its own from `verify.rest_*_per_minute`.
    pub rest_tickers_per_minute: u32,
    pub rest_trades_per_minute: u32,
    pub rest_candles_per_minute: u32,
}

impl BitfinexConfig {
    pub fn reconnect_backoff(&self) -> Backoff {
        Backoff::new(self.reconnect_backoff_min, self.reconnect_backoff_max)
    }

    pub fn rest_backoff(&self) -> Backoff {
        Backoff::new(self.rest_backoff_min, self.rest_backoff_max)
    }

    pub fn repair_backoff(&self) -> Backoff {
        Backoff::new(self.repair_backoff_min, self.repair_backoff_max)
    }
}

impl Default for BitfinexConfig {
    fn default() -> Self {
        Self {
            ws_url: "wss://api-pub.bitfinex.com/ws/2".into(),
            rest_url: "https://api-pub.bitfinex.com".into(),
            symbols: [
                "tBTCUSD", "tETHUSD", "tSOLUSD", "tXRPUSD", "tLTCUSD", "tADAUSD",
            ]
            .map(String::from)
            .into(),
            symbols_exclude: Vec::new(),
            symbols_refresh: Duration::from_secs(3600),
            mode: ExchangeMode::Websocket,
            rest_poll_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(20),
            reconnect_backoff_min: Duration::from_millis(500),
            reconnect_backoff_max: Duration::from_secs(30),
            rest_backoff_min: Duration::from_millis(500),
            rest_backoff_max: Duration::from_secs(30),
            repair_backoff_min: Duration::from_millis(500),
            repair_backoff_max: Duration::from_secs(30),
            channels_per_connection: 25,
            connections_per_minute: 20,
            request_timeout: Duration::from_secs(10),
            trades: true,
            backfill: Duration::from_secs(6 * 3600),
            resume_timeout: Duration::from_secs(30),
            rest_tickers_per_minute: 90,
            rest_trades_per_minute: 12,
            rest_candles_per_minute: 10,
        }
    }
}

#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    /// Topic of the trades; its Avro value schema lives under "<trades_topic>-value".
    pub trades_topic: String,
    pub dlq_topic: String,
    pub group_id: String,
    pub assignment_strategy: AssignmentStrategy,
    pub auto_offset_reset: OffsetReset,
    /// librdkafka producer properties, verbatim; they override the built-in defaults.
    pub producer: BTreeMap<String, String>,
    /// librdkafka consumer properties, verbatim; they override the built-in defaults.
    pub consumer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:19091,localhost:19092,localhost:19093".into(),
            topic: "crypto-ticker".into(),
            trades_topic: "crypto-trades".into(),
            dlq_topic: "crypto-ticker-dlq".into(),
            group_id: "candlestream-influx".into(),
            assignment_strategy: AssignmentStrategy::CooperativeSticky,
            auto_offset_reset: OffsetReset::Earliest,
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        }
    }
}

/// Hand-written so that SASL and TLS passwords in the pass-through tables never reach a log line.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("trades_topic", &self.trades_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("group_id", &self.group_id)
            .field("assignment_strategy", &self.assignment_strategy)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("producer", &RedactedProperties(&self.producer))
            .field("consumer", &RedactedProperties(&self.consumer))
            .finish()
    }
}

impl KafkaConfig {
    /// The topic that holds records of `kind`.
    pub fn topic_of(&self, kind: RecordKind) -> &str {
        match kind {
            RecordKind::Tick => &self.topic,
            RecordKind::Trade => &self.trades_topic,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AssignmentStrategy {
    Range,
    Roundrobin,
    CooperativeSticky,
}

impl AssignmentStrategy {
    /// librdkafka's name for `partition.assignment.strategy`.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            AssignmentStrategy::Range => "range",
            AssignmentStrategy::Roundrobin => "roundrobin",
            AssignmentStrategy::CooperativeSticky => "cooperative-sticky",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        Self {
            url: "http://localhost:8081".into(),
            username: None,
            password: None,
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerConfig {
    /// Ticks buffered between the exchange and Kafka; when full, reading the exchange waits.
    pub buffer: usize,
    /// How long shutdown may spend delivering what is in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            buffer: 10_000,
            shutdown_timeout: Duration::from_secs(15),
            retry_backoff_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Group members inside this process; `--workers` overrides it.
    pub workers: usize,
    /// On SIGINT/SIGTERM: how long to spend writing the last batch and committing.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Upper bound of retry backoffs (InfluxDB, registry, dead-letter topic).
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            shutdown_timeout: Duration::from_secs(15),
            retry_backoff_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InfluxApi {
    /// InfluxDB 2.x `/api/v2/write` through the influxdb2 crate (org, bucket, token).
    V2,
    /// `/write?db=…` of InfluxDB 1.x, also served by 2.x and 3.x for compatibility.
    V1,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfluxConfig {
    pub api: InfluxApi,
    pub url: String,
    /// v2: organization and bucket.
    pub org: String,
    pub bucket: String,
    /// v2: API token. Set it through CANDLESTREAM__INFLUX__TOKEN, never in a committed file.
    pub token: Option<Secret>,
    /// v1: database, with optional credentials.
    pub database: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub measurement: String,
    /// Measurement of the trades (tags symbol and side; fields id, price, amount).
    pub trades_measurement: String,
    /// Most points in one write. The writer writes as soon as it has taken what is waiting, so
    /// batches grow only while a write is in flight (group commit).
    pub batch_size: usize,
    /// How long a write that is not full may wait for more points; zero writes at once.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        Self {
            api: InfluxApi::V2,
            url: "http://localhost:8086".into(),
            org: "candlestream".into(),
            bucket: "crypto".into(),
            token: None,
            database: "crypto".into(),
            username: None,
            password: None,
            measurement: "ticker".into(),
            trades_measurement: "trades".into(),
            batch_size: 500,
            flush_interval: Duration::ZERO,
            timeout: Duration::from_secs(10),
        }
    }
}

impl InfluxConfig {
    /// The measurement that holds records of `kind`.
    pub fn measurement_of(&self, kind: RecordKind) -> &str {
        match kind {
            RecordKind::Tick => &self.measurement,
            RecordKind::Trade => &self.trades_measurement,
        }
    }
}

/// Where points go and with which credentials, checked for the API in use.
#[derive(Debug, Clone, PartialEq)]
pub enum InfluxTarget {
    V1 {
        database: String,
        /// Basic auth: user and optional password.
        auth: Option<(String, Option<Secret>)>,
    },
    V2 {
        org: String,
        bucket: String,
        token: Secret,
    },
}

impl InfluxConfig {
    /// The settings of the API in use, or which key is missing. The roles that talk to
    /// InfluxDB call it at start; the producer does not need an InfluxDB section.
    pub fn target(&self) -> Result<InfluxTarget, ConfigError> {
        let base = self.url.trim_end_matches('/');
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(ConfigError::Invalid(format!(
                "influx.url {:?} is not an http(s) URL",
                self.url
            )));
        }
        let missing = |what: &str| Err(ConfigError::Invalid(what.into()));
        match self.api {
            InfluxApi::V1 if self.database.is_empty() => {
                missing("influx.database must be set with influx.api = \"v1\"")
            }
            InfluxApi::V1 => Ok(InfluxTarget::V1 {
                database: self.database.clone(),
                auth: self
                    .username
                    .clone()
                    .filter(|u| !u.is_empty())
                    .map(|u| (u, self.password.clone())),
            }),
            InfluxApi::V2 => {
                let Some(token) = self.token.clone().filter(|t| !t.expose().is_empty()) else {
                    return missing(
                        "influx.token must be set with influx.api = \"v2\": set CANDLESTREAM__INFLUX__TOKEN",
                    );
                };
                if self.org.is_empty() || self.bucket.is_empty() {
                    return missing(
                        "influx.org and influx.bucket must be set with influx.api = \"v2\"",
                    );
                }
                Ok(InfluxTarget::V2 {
                    org: self.org.clone(),
                    bucket: self.bucket.clone(),
                    token,
                })
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of /healthz and /metrics. Port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 9100).into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// /healthz fails when no exchange data arrived for this long.
    #[serde(with = "humantime_serde")]
    pub max_exchange_silence: Duration,
    /// /healthz fails when messages are waiting and Kafka acknowledged none for this long.
    #[serde(with = "humantime_serde")]
    pub max_ack_silence: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            max_exchange_silence: Duration::from_secs(60),
            max_ack_silence: Duration::from_secs(60),
        }
    }
}

/// The pipeline as a whole: how long a record may take from the producer's receipt to InfluxDB.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// A record older than this (since the producer received it) and not yet stored in InfluxDB
    /// is a stall: logged once per partition, with where it waits.
    #[serde(with = "humantime_serde")]
    pub stall_warning: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stall_warning: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// A candle width Bitfinex offers and InfluxQL can group by, aligned to UTC midnight on both
/// sides (widths that divide a day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeframe {
    label: &'static str,
    width_ms: i64,
}

impl Timeframe {
    const ALL: [(&'static str, i64); 9] = [
        ("1m", 60_000),
        ("5m", 5 * 60_000),
        ("15m", 15 * 60_000),
        ("30m", 30 * 60_000),
        ("1h", 3_600_000),
        ("3h", 3 * 3_600_000),
        ("6h", 6 * 3_600_000),
        ("12h", 12 * 3_600_000),
        ("1D", 86_400_000),
    ];
    pub const ONE_MINUTE: Timeframe = Timeframe {
        label: "1m",
        width_ms: 60_000,
    };

    /// Bitfinex's name, as in `trade:1h:tBTCUSD`; also the `timeframe` tag of checks.
    pub fn label(self) -> &'static str {
        self.label
    }

    pub fn width_ms(self) -> i64 {
        self.width_ms
    }

    /// The duration literal of InfluxQL's `GROUP BY time(…)`.
    pub fn influxql(self) -> String {
        format!("{}ms", self.width_ms)
    }
}

impl<'de> Deserialize<'de> for Timeframe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<String> for Timeframe {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(label, _)| *label == s)
            .map(|&(label, width_ms)| Timeframe { label, width_ms })
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|(l, _)| *l).collect();
                format!("timeframe {s:?} is not one of {known:?}")
            })
    }
}

/// `candlestream verify`: every closed candle compared with Bitfinex's, 1-minute ones healed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyConfig {
    /// Minimum time between two checks of one series (and the wait after a failed one).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A candle is compared once it closed this long ago: its trades may still be on their way.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// History the first pass covers; `None`: `bitfinex.backfill`.
    #[serde(with = "humantime_serde")]
    pub lookback: Option<Duration>,
    pub timeframes: Vec<Timeframe>,
    /// Trade fetches for one 1-minute candle before it stays as it is.
    pub max_repairs: u32,
    /// Measurement of the verdicts (tags symbol, timeframe; string field status).
    pub measurement: String,
    /// The verifier's own share of Bitfinex's per-IP REST limits (the producer has
    /// `bitfinex.rest_*_per_minute`).
    pub rest_trades_per_minute: u32,
    pub rest_candles_per_minute: u32,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            grace: Duration::from_secs(120),
            lookback: None,
            timeframes: ["1m", "1h", "1D"]
                .map(|t| Timeframe::try_from(t.to_string()).expect("known timeframe"))
                .into(),
            max_repairs: 3,
            measurement: "candle_checks".into(),
            rest_trades_per_minute: 3,
            rest_candles_per_minute: 20,
        }
    }
}

impl VerifyConfig {
    /// The first pass's history.
    pub fn lookback_or(&self, backfill: Duration) -> Duration {
        self.lookback.unwrap_or(backfill)
    }

    fn validate(&self, influx: &InfluxConfig) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.interval.is_zero() {
            return invalid("verify.interval must be positive");
        }
        if self.timeframes.is_empty() {
            return invalid("verify.timeframes is empty");
        }
        if self.rest_trades_per_minute == 0 || self.rest_candles_per_minute == 0 {
            return invalid("verify.rest_*_per_minute limits must be positive");
        }
        if self.measurement.is_empty()
            || self.measurement == influx.measurement
            || self.measurement == influx.trades_measurement
        {
            return invalid(
                "verify.measurement must be set and differ from influx.measurement and influx.trades_measurement",
            );
        }
        Ok(())
    }
}

/// Keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: [&str; 3] = [
    "bitfinex.symbols",
    "bitfinex.symbols_exclude",
    "verify.timeframes",
];

/// The `CANDLESTREAM__SECTION__KEY` variables as configuration values.
///
/// Not `config::Environment`: its list support needs `try_parsing`, which turns every value that
/// looks like a boolean or a number into one, so a token `0123` arrived as "123", a password
/// `TRUE` as "true" and `1e3` as "1000". Here every value stays the string it is; the config
/// crate converts it where the field is a number, a boolean or a duration. The keys of the
/// librdkafka tables are mapped too: `CANDLESTREAM__KAFKA__PRODUCER__SASL_PASSWORD` sets
/// `sasl.password` in `[kafka.producer]` (lowercase, `_` becomes `.`), so a secret can come from
/// the environment as Docker passes it.
#[derive(Clone)]
struct EnvOverrides(Vec<(String, String)>);

/// Names only: the values may be credentials.
impl std::fmt::Debug for EnvOverrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl config::Source for EnvOverrides {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        let origin = Some("the environment".to_string());
        let prefix = format!("{}__", ENV_PREFIX.to_lowercase());
        let mut values = config::Map::new();
        for (name, value) in &self.0 {
            let name = name.to_lowercase();
            let Some(path) = name.strip_prefix(&prefix) else {
                continue;
            };
            let segments: Vec<&str> = path.split("__").collect();
            if let ["kafka", table @ ("producer" | "consumer"), property] = segments[..] {
                // librdkafka's names are dotted; the config crate would read the dots as levels,
                // so the property goes in as one key of its table.
                let entry = values.entry(format!("kafka.{table}")).or_insert_with(|| {
                    config::Value::new(origin.as_ref(), config::Map::<String, config::Value>::new())
                });
                if let config::ValueKind::Table(properties) = &mut entry.kind {
                    properties.insert(
                        property.replace('_', "."),
                        config::Value::new(origin.as_ref(), value.as_str()),
                    );
                }
                continue;
            }
            let key = segments.join(".");
            let kind = if ENV_LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<config::Value> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| config::Value::new(origin.as_ref(), item))
                    .collect();
                config::ValueKind::from(items)
            } else {
                config::ValueKind::from(value.as_str())
            };
            values.insert(key, config::Value::new(origin.as_ref(), kind));
        }
        Ok(values)
    }
}

impl Settings {
    /// Loads defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment, so tests need not touch the
    /// process environment.
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            // Always TOML, whatever the file is called.
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(EnvOverrides(env.into_iter().collect()));
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.bitfinex;
        let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
        if b.symbols.is_empty() {
            return invalid("bitfinex.symbols is empty");
        }
        crate::exchange::bitfinex::pairs::Selection::new(&b.symbols, &b.symbols_exclude)
            .map_err(ConfigError::Invalid)?;
        if b.symbols_refresh.is_zero() {
            return invalid("bitfinex.symbols_refresh must be positive");
        }
        if !(1..=25).contains(&b.channels_per_connection) {
            return invalid("bitfinex.channels_per_connection must be 1..=25 (Bitfinex's limit)");
        }
        if b.connections_per_minute == 0 || b.rest_poll_interval.is_zero() {
            return invalid(
                "bitfinex.connections_per_minute and rest_poll_interval must be positive",
            );
        }
        if [
            b.rest_tickers_per_minute,
            b.rest_trades_per_minute,
            b.rest_candles_per_minute,
        ]
        .contains(&0)
        {
            return invalid("bitfinex.rest_*_per_minute limits must be positive");
        }
        if self.kafka.topic.is_empty()
            || self.kafka.trades_topic.is_empty()
            || self.kafka.brokers.is_empty()
        {
            return invalid("kafka.brokers, kafka.topic and kafka.trades_topic must be set");
        }
        if self.kafka.topic == self.kafka.trades_topic {
            return invalid(
                "kafka.topic and kafka.trades_topic must differ: each holds one record type",
            );
        }
        if self.producer.buffer == 0 {
            return invalid("producer.buffer must be positive");
        }
        if self.consumer.workers == 0 || self.influx.batch_size == 0 {
            return invalid("consumer.workers and influx.batch_size must be positive");
        }
        if self.influx.measurement.is_empty() || self.influx.trades_measurement.is_empty() {
            return invalid("influx.measurement and influx.trades_measurement must be set");
        }
        self.verify.validate(&self.influx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_file() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_file_documents_exactly_the_builtin_defaults() {
        let from_file = Settings::load_with_env(Some(default_file()), env(&[])).unwrap();
        assert_eq!(from_file, Settings::default());
        assert_eq!(
            Settings::load_with_env(None, env(&[])).unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn environment_overrides_file() {
        let s = Settings::load_with_env(
            Some(default_file()),
            env(&[
                ("CANDLESTREAM__BITFINEX__SYMBOLS", "t*USD,tBTCEUR"),
                ("CANDLESTREAM__BITFINEX__SYMBOLS_EXCLUDE", "t*:USD"),
                ("CANDLESTREAM__BITFINEX__SYMBOLS_REFRESH", "10m"),
                ("CANDLESTREAM__BITFINEX__MODE", "rest"),
                ("CANDLESTREAM__BITFINEX__REST_POLL_INTERVAL", "250ms"),
                ("CANDLESTREAM__KAFKA__BROKERS", "a:1,b:2"),
                ("CANDLESTREAM__KAFKA__PRODUCER__LINGER_MS", "5"),
                ("CANDLESTREAM__SCHEMA_REGISTRY__PASSWORD", "true"),
                ("CANDLESTREAM__HTTP__LISTEN", "127.0.0.1:0"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.bitfinex.symbols, ["t*USD", "tBTCEUR"]);
        assert_eq!(s.bitfinex.symbols_exclude, ["t*:USD"]);
        assert_eq!(s.bitfinex.symbols_refresh, Duration::from_secs(600));
        assert_eq!(s.bitfinex.mode, ExchangeMode::Rest);
        assert_eq!(s.bitfinex.rest_poll_interval, Duration::from_millis(250));
        assert_eq!(s.kafka.brokers, "a:1,b:2");
        assert_eq!(
            s.kafka.producer.get("linger.ms").map(String::as_str),
            Some("5")
        );
        assert_eq!(
            s.schema_registry.password.as_ref().map(Secret::expose),
            Some("true")
        );
        assert_eq!(s.http.listen.port(), 0);
    }

    #[test]
    fn environment_strings_arrive_byte_for_byte() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("CANDLESTREAM__INFLUX__TOKEN", "0123"),
                ("CANDLESTREAM__INFLUX__PASSWORD", "TRUE"),
                ("CANDLESTREAM__INFLUX__USERNAME", "1e3"),
                ("CANDLESTREAM__SCHEMA_REGISTRY__PASSWORD", "007"),
                // Numbers, booleans and durations are still read from their strings.
                ("CANDLESTREAM__BITFINEX__CHANNELS_PER_CONNECTION", "10"),
                ("CANDLESTREAM__BITFINEX__TRADES", "FALSE"),
                ("CANDLESTREAM__VERIFY__LOOKBACK", "1h"),
            ]),
        )
        .unwrap();
        assert_eq!(s.influx.token.as_ref().map(Secret::expose), Some("0123"));
        assert_eq!(s.influx.password.as_ref().map(Secret::expose), Some("TRUE"));
        assert_eq!(s.influx.username.as_deref(), Some("1e3"));
        assert_eq!(
            s.schema_registry.password.as_ref().map(Secret::expose),
            Some("007")
        );
        assert_eq!(s.bitfinex.channels_per_connection, 10);
        assert!(!s.bitfinex.trades);
        assert_eq!(s.verify.lookback, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn environment_lists_split_on_commas() {
        let s = Settings::load_with_env(
            Some(default_file()),
            env(&[
                ("CANDLESTREAM__BITFINEX__SYMBOLS", "tBTCUSD, t*:USD"),
                ("CANDLESTREAM__BITFINEX__SYMBOLS_EXCLUDE", ""),
                ("CANDLESTREAM__VERIFY__TIMEFRAMES", "1m"),
            ]),
        )
        .unwrap();
        assert_eq!(s.bitfinex.symbols, ["tBTCUSD", "t*:USD"]);
        assert!(s.bitfinex.symbols_exclude.is_empty());
        assert_eq!(s.verify.timeframes, [Timeframe::ONE_MINUTE]);
    }

    #[test]
    fn environment_sets_librdkafka_properties_by_their_dotted_names() {
        let dir = std::env::temp_dir().join(format!("cs-config-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[kafka.producer]\n\"sasl.username\" = \"user\"\n\"linger.ms\" = \"50\"\n",
        )
        .unwrap();
        let s = Settings::load_with_env(
            Some(&file),
            env(&[
                ("CANDLESTREAM__KAFKA__PRODUCER__LINGER_MS", "5"),
                ("CANDLESTREAM__KAFKA__PRODUCER__SASL_PASSWORD", "0123"),
                ("CANDLESTREAM__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "30000"),
                ("CANDLESTREAM__KAFKA__CONSUMER__SASL_PASSWORD", "TRUE"),
            ]),
        )
        .unwrap();
        let producer: Vec<(&str, &str)> = s
            .kafka
            .producer
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // The file's keys stay; the environment overrides or adds, by librdkafka's names.
        assert_eq!(
            producer,
            [
                ("linger.ms", "5"),
                ("sasl.password", "0123"),
                ("sasl.username", "user")
            ]
        );
        let consumer: Vec<(&str, &str)> = s
            .kafka
            .consumer
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            consumer,
            [("sasl.password", "TRUE"), ("session.timeout.ms", "30000")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pass_through_tables_keep_dotted_librdkafka_keys() {
        let dir = std::env::temp_dir().join(format!("cs-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[kafka.producer]\n\"enable.idempotence\" = \"false\"\n\"linger.ms\" = 5\n[kafka.consumer]\n\"api.version.request\" = false\n",
        )
        .unwrap();
        let s = Settings::load_with_env(Some(&file), env(&[])).unwrap();
        assert_eq!(s.kafka.producer.get("enable.idempotence").unwrap(), "false");
        assert_eq!(s.kafka.producer.get("linger.ms").unwrap(), "5");
        assert_eq!(
            s.kafka.consumer.get("api.version.request").unwrap(),
            "false"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        for (k, v) in [
            ("CANDLESTREAM__KAFKA__BROKRES", "x:1"),
            ("CANDLESTREAM__BITFINEX__MODE", "carrier-pigeon"),
            ("CANDLESTREAM__BITFINEX__SYMBOLS", "BTCUSD"),
            ("CANDLESTREAM__BITFINEX__SYMBOLS", "t[USD"),
            ("CANDLESTREAM__BITFINEX__SYMBOLS_EXCLUDE", "t{BTC"),
            ("CANDLESTREAM__BITFINEX__SYMBOLS_REFRESH", "0s"),
            ("CANDLESTREAM__BITFINEX__CHANNELS_PER_CONNECTION", "26"),
            ("CANDLESTREAM__BITFINEX__HEARTBEAT_TIMEOUT", "soon"),
        ] {
            let r = Settings::load_with_env(None, env(&[(k, v)]));
            assert!(r.is_err(), "{k}={v} should be rejected");
        }
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let mut s = Settings::load_with_env(
            None,
            env(&[
                ("CANDLESTREAM__INFLUX__TOKEN", "tok-123"),
                ("CANDLESTREAM__INFLUX__PASSWORD", "pw-influx"),
                ("CANDLESTREAM__SCHEMA_REGISTRY__PASSWORD", "pw-registry"),
            ]),
        )
        .unwrap();
        for (k, v) in [
            ("sasl.password", "pw-sasl"),
            ("sasl.username", "user-sasl"),
            ("ssl.key.password", "pw-key"),
            ("linger.ms", "7"),
        ] {
            s.kafka.producer.insert(k.into(), v.into());
            s.kafka.consumer.insert(k.into(), v.into());
        }
        let shown = format!("{s:?} {}", s.influx.token.as_ref().unwrap());
        for secret in [
            "tok-123",
            "pw-influx",
            "pw-registry",
            "pw-sasl",
            "pw-key",
            "user-sasl",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("\"linger.ms\": \"7\""), "{shown}");
        assert_eq!(s.influx.token.as_ref().map(Secret::expose), Some("tok-123"));
    }

    #[test]
    fn influx_target_names_the_missing_key() {
        let v2 = InfluxConfig::default();
        let e = v2.target().unwrap_err().to_string();
        assert!(
            e.contains("influx.token") && e.contains("CANDLESTREAM__INFLUX__TOKEN"),
            "{e}"
        );
        let v2 = InfluxConfig {
            token: Some("t".into()),
            ..Default::default()
        };
        assert!(matches!(v2.target(), Ok(InfluxTarget::V2 { .. })));
        let v1 = InfluxConfig {
            api: InfluxApi::V1,
            database: String::new(),
            ..Default::default()
        };
        assert!(
            v1.target()
                .unwrap_err()
                .to_string()
                .contains("influx.database")
        );
        let v1 = InfluxConfig {
            api: InfluxApi::V1,
            url: "localhost:8086".into(),
            ..Default::default()
        };
        assert!(v1.target().unwrap_err().to_string().contains("influx.url"));
    }

    #[test]
    fn verify_section_reads_timeframes_and_rejects_what_cannot_be_checked() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("CANDLESTREAM__VERIFY__TIMEFRAMES", "1m,1D"),
                ("CANDLESTREAM__VERIFY__GRACE", "5s"),
            ]),
        )
        .unwrap();
        let labels: Vec<&str> = s.verify.timeframes.iter().map(|t| t.label()).collect();
        assert_eq!(labels, ["1m", "1D"]);
        assert_eq!(s.verify.timeframes[1].width_ms(), 86_400_000);
        assert_eq!(s.verify.grace, Duration::from_secs(5));
        assert_eq!(
            s.verify.lookback_or(s.bitfinex.backfill),
            s.bitfinex.backfill
        );
        for (k, v) in [
            ("CANDLESTREAM__VERIFY__TIMEFRAMES", "1W"),
            ("CANDLESTREAM__VERIFY__INTERVAL", "0s"),
            ("CANDLESTREAM__VERIFY__MEASUREMENT", "trades"),
            ("CANDLESTREAM__VERIFY__MAX_REPAIR", "3"),
        ] {
            let r = Settings::load_with_env(None, env(&[(k, v)]));
            assert!(r.is_err(), "{k}={v} should be rejected");
        }
    }
}
