//! Grafana provisioning and the candles dashboard, checked against what the consumer writes, and
//! the dashboard's own InfluxQL run against a real InfluxDB 1.6.7.
//!
//! The live test has two parts that share nothing but the database and the trade ledger:
//!   (a) `fill`: puts a ledger of trades (and some ticker updates) into InfluxDB, in the consumer's
//!       InfluxDB contract. For now it writes the line protocol itself; it is meant to be replaced
//!       by the real pipeline fed by the fake exchange, whose ledger has the same fields.
//!   (b) `check_dashboard`: expands every target of grafana/dashboards/*.json the way Grafana
//!       does, runs it, and compares the candles with an independent computation from the ledger.
//!       It does not care how the data got in.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use candlestream::config::Settings;
use candlestream::model::{Record, Source, Tick, Trade};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use support::fake_trades::Trader;
use support::now_ms;
use support::pipeline::{Emitter, WAIT};
use support::rig::MockPipeline;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&repo(path)).unwrap().remove(0)
}

/// The trades measurement's tags and fields, as the consumer's InfluxDB contract defines them.
const TRADE_TAGS: [&str; 2] = ["symbol", "side"];
const TRADE_FIELDS: [&str; 3] = ["id", "price", "amount"];

/// Every dashboard file, with its name.
fn dashboards() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((
                name,
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            ));
        }
    }
    assert!(!out.is_empty(), "no dashboards");
    out
}

/// Panels, rows' nested panels included; rows themselves have no queries and are left out.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

fn candle_panel(dashboard: &Value) -> &Value {
    panels(dashboard)
        .into_iter()
        .find(|p| p["type"] == "candlestick")
        .expect("a candlestick panel")
}

fn query_of(target: &Value) -> &str {
    target["query"].as_str().unwrap()
}

/// Double-quoted identifiers of an InfluxQL text, and the names given with AS.
fn identifiers(q: &str) -> (Vec<String>, BTreeSet<String>) {
    let parts: Vec<&str> = q.split('"').collect();
    let idents: Vec<String> = parts
        .iter()
        .skip(1)
        .step_by(2)
        .map(|s| s.to_string())
        .collect();
    let mut aliases = BTreeSet::new();
    for (i, ident) in parts.iter().enumerate().skip(1).step_by(2) {
        if parts[i - 1]
            .trim_end()
            .to_ascii_uppercase()
            .ends_with(" AS")
        {
            aliases.insert(ident.to_string());
        }
    }
    (idents, aliases)
}

#[test]
fn grafana_dashboard_queries_what_the_consumer_writes() {
    // The datasource: InfluxQL against the bucket's DBRP mapping, Grafana's read-only credential,
    // every value from an environment variable that docker-compose.yml passes to Grafana.
    let datasources = yaml("grafana/provisioning/datasources/influxdb.yaml");
    let ds = &datasources["datasources"][0];
    let uid = ds["uid"].as_str().unwrap();
    assert_eq!(
        uid, "candlestream-influxdb",
        "the uid the dashboards and saved links refer to"
    );
    assert_eq!(ds["type"].as_str(), Some("influxdb"));
    assert_eq!(ds["url"].as_str(), Some("http://influxdb:8086"));
    assert_eq!(ds["jsonData"]["version"].as_str(), Some("InfluxQL"));
    assert_eq!(
        ds["jsonData"]["dbName"].as_str(),
        Some("${INFLUXDB_BUCKET}")
    );
    // Grafana's own read-only credential (launch.sh creates it), never the operator token.
    assert_eq!(ds["user"].as_str(), Some("${GRAFANA_INFLUXDB_USER}"));
    assert_eq!(
        ds["secureJsonData"]["password"].as_str(),
        Some("${GRAFANA_INFLUXDB_PASSWORD}")
    );
    assert!(
        !repo("grafana/provisioning/datasources/influxdb.yaml").contains("INFLUXDB_TOKEN"),
        "Grafana must not get the operator token"
    );
    let compose = yaml("docker-compose.yml");
    let grafana_env = compose["services"]["grafana"]["environment"]
        .as_hash()
        .expect("grafana environment");
    let ds_text = repo("grafana/provisioning/datasources/influxdb.yaml");
    for var in ds_text
        .split("${")
        .skip(1)
        .map(|s| s.split('}').next().unwrap())
    {
        assert!(
            grafana_env.contains_key(&Yaml::String(var.to_string())),
            "the datasource uses ${{{var}}}, which docker-compose.yml does not pass to grafana"
        );
    }
    let providers = yaml("grafana/provisioning/dashboards/candlestream.yaml");
    assert_eq!(
        providers["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );

    // What the consumer writes, read off its own line protocol.
    let tick = support::pipeline::make_ticks(&["tBTCUSD"], 1, 0, 0).remove(0);
    let trade = Trade {
        symbol: "tBTCUSD".into(),
        id: 1,
        exchange_time: 0,
        amount: -0.5,
        price: 1.0,
        source: Source::Websocket,
        sequence: None,
        received_at: 0,
    };
    let settings = Settings::default();
    let ticker = settings.influx.measurement.clone();
    let trades = settings.influx.trades_measurement.clone();
    let mut schema: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (measurement, record) in [
        (&ticker, Record::Tick(tick)),
        (&trades, Record::Trade(trade)),
    ] {
        let mut line = String::new();
        candlestream::sink::influx::write_line(&mut line, measurement, &record);
        let (series, fields) = line.trim_end().split_once(' ').unwrap();
        let fields = fields.rsplit_once(' ').unwrap().0;
        let names = schema.entry(measurement.clone()).or_default();
        names.extend(
            series
                .split(',')
                .skip(1)
                .map(|kv| kv.split('=').next().unwrap().to_string()),
        );
        names.extend(
            fields
                .split(',')
                .map(|kv| kv.split('=').next().unwrap().to_string()),
        );
    }
    assert!(
        schema[&ticker].contains("symbol")
            && schema[&ticker].contains("bid")
            && schema[&ticker].contains("last_price")
    );
    let trade_names: BTreeSet<String> = TRADE_TAGS
        .iter()
        .chain(&TRADE_FIELDS)
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        schema[&trades], trade_names,
        "the consumer writes the trade contract"
    );

    for (file, dashboard) in dashboards() {
        let mut queries = 0;
        for p in panels(&dashboard) {
            assert_eq!(p["datasource"]["uid"], uid, "{file}: panel {}", p["title"]);
            for t in p["targets"].as_array().unwrap() {
                queries += 1;
                let q = query_of(t);
                let at = format!("{file}: panel {}: {q}", p["title"]);
                assert_eq!(t["datasource"]["uid"], uid, "{at}");
                // Raw InfluxQL text, so what Grafana runs is exactly what the live test runs.
                assert_eq!(t["rawQuery"], true, "{at}");
                assert!(
                    !q.contains("|>") && !q.contains("from(bucket"),
                    "Flux left in {at}"
                );
                assert!(q.contains("$timeFilter"), "{at}: no $timeFilter");
                assert!(
                    q.contains("\"symbol\" = '$symbol'"),
                    "{at}: not filtered by $symbol"
                );
                // Every quoted name is the measurement, one of its tags or fields, or an alias.
                let measurement = q
                    .split("FROM \"")
                    .nth(1)
                    .and_then(|s| s.split('"').next())
                    .unwrap();
                let names = schema
                    .get(measurement)
                    .unwrap_or_else(|| panic!("{at}: unknown measurement"));
                let (idents, aliases) = identifiers(q);
                for ident in idents {
                    assert!(
                        ident == measurement || names.contains(&ident) || aliases.contains(&ident),
                        "{at}: \"{ident}\" is not written by the consumer"
                    );
                }
            }
        }
        assert!(queries > 0, "{file} has no queries");
    }

    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "candles.json")
        .unwrap();
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let symbol = vars
        .iter()
        .find(|v| v["name"] == "symbol")
        .expect("$symbol");
    assert_eq!(symbol["datasource"]["uid"], uid);
    assert_eq!(
        symbol["query"].as_str(),
        Some(format!("SHOW TAG VALUES FROM \"{trades}\" WITH KEY = \"symbol\"").as_str())
    );
    let timeframe = vars
        .iter()
        .find(|v| v["name"] == "timeframe")
        .expect("$timeframe");
    assert_eq!(timeframe["type"], "custom");
    let options: Vec<&str> = timeframe["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["value"].as_str().unwrap())
        .collect();
    assert_eq!(options, ["1m", "2m", "5m", "15m", "1h", "4h", "1d"]);
    assert_eq!(
        timeframe["query"].as_str(),
        Some(options.join(",").as_str())
    );
    assert_eq!(
        timeframe["current"]["value"], "2m",
        "2-minute candles are the default"
    );

    let candles = candle_panel(&dashboard);
    assert_eq!(candles["options"]["mode"], "candles+volume");
    for f in ["open", "high", "low", "close", "volume"] {
        assert_eq!(
            candles["options"]["fields"][f], f,
            "candlestick field mapping of {f}"
        );
    }
    let targets = candles["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "one query feeds the candles");
    let q = query_of(&targets[0]);
    for needle in [
        "first(\"price\") AS \"open\"",
        "max(\"price\") AS \"high\"",
        "min(\"price\") AS \"low\"",
        "last(\"price\") AS \"close\"",
        "sum(\"amount\") AS \"volume\"",
        &format!("FROM \"{trades}\""),
        "GROUP BY time($timeframe) fill(none)",
    ] {
        assert!(q.contains(needle), "candlestick query lacks {needle}:\n{q}");
    }
    // The ticker row: bid, ask, spread, last price and the 24-hour change.
    let all = panels(&dashboard);
    for (title, field) in [
        ("Bid", "bid"),
        ("Ask", "ask"),
        ("Spread", "ask"),
        ("Last price", "last_price"),
        ("24 h change", "daily_change_relative"),
    ] {
        let p = all
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no {title} panel"));
        let q = query_of(&p["targets"][0]);
        assert!(
            q.contains(&format!("FROM \"{ticker}\"")) && q.contains(&format!("\"{field}\"")),
            "{title}: {q}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (a) fill: the trade ledger, and writing it into InfluxDB in the consumer's contract.
// ---------------------------------------------------------------------------------------------

/// A trade as the fake exchange executed it.
type LedgerTrade = support::fake_trades::Trade;

const SYMBOLS: [&str; 3] = ["tBTCUSD", "tETHUSD", "tSOLUSD"];
const MINUTE: i64 = 60_000;

/// Small deterministic generator (xorshift64*), so the ledger is the same shape on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// About 36 minutes of trading over three symbols, ending two seconds before `now_ms`: a few
/// minutes without trades per symbol (a whole 5-minute window for tSOLUSD), bursts of trades in
/// one millisecond with consecutive ids, trades exactly on window boundaries, buys and sells.
fn make_ledger(now_ms: i64) -> Vec<LedgerTrade> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let start = now_ms - 36 * MINUTE;
    let end = now_ms - 2_000;
    // (symbol, seq, mts, amount, price), ids come later in execution order.
    let mut events: Vec<(usize, usize, i64, f64, f64)> = Vec::new();
    for (s, _) in SYMBOLS.iter().enumerate() {
        let (mut price, decimals, size) =
            [(97_000.0, 1, 0.5), (3_400.0, 2, 5.0), (180.0, 3, 60.0)][s];
        let quiet = |mts: i64| {
            // Empty minutes that differ per symbol, and for tSOLUSD the first whole 5-minute
            // window after ten minutes of trading (so whole 2-minute windows are empty too).
            let gap = ((start + 10 * MINUTE).div_euclid(5 * MINUTE) + 1) * 5 * MINUTE;
            mts.div_euclid(MINUTE) % 7 == (s as i64 * 2 + 3) % 7
                || (s == 2 && mts >= gap && mts < gap + 5 * MINUTE)
        };
        let mut t = start + rng.below(3_000) as i64;
        let mut seq = 0;
        while t < end {
            if !quiet(t) {
                let burst = if rng.below(9) == 0 {
                    2 + rng.below(3)
                } else {
                    1
                };
                for _ in 0..burst {
                    price = round_to(price * (1.0 + (rng.unit() - 0.5) * 0.002), decimals);
                    let amount = round_to(size * (0.0001 + rng.unit()), 8);
                    let amount = if rng.below(2) == 0 { amount } else { -amount };
                    events.push((s, seq, t, amount, price));
                    seq += 1;
                }
            }
            // Now and then land exactly on a minute boundary, or one millisecond before it.
            let next_minute = (t.div_euclid(MINUTE) + 1) * MINUTE;
            t = match rng.below(12) {
                0 => next_minute,
                1 => next_minute - 1,
                _ => t + 500 + rng.below(6_000) as i64,
            };
        }
    }
    events.sort_by_key(|&(s, seq, mts, _, _)| (mts, s, seq));
    // Bitfinex trade ids are global and grow in execution order. Starting at an id whose
    // `id mod 1_000_000` is small keeps (MTS, id) order and timestamp order the same for the whole
    // ledger (the contract's nanosecond offset wraps at every millionth id).
    let first_id = 1_799_000_001;
    events
        .into_iter()
        .enumerate()
        .map(|(i, (s, _, mts, amount, price))| LedgerTrade {
            symbol: SYMBOLS[s].to_string(),
            id: first_id + i as i64,
            mts,
            amount,
            price,
        })
        .collect()
}

/// The fake exchange's websocket ticker updates as the consumer stores them. REST answers (while
/// the socket was down) carry no exchange time; the checks use the latest update per symbol,
/// which is a websocket one.
fn sent_ticks(sent: &[support::fake_bitfinex::Sent]) -> Vec<Tick> {
    sent.iter()
        .filter(|x| !x.rest)
        .map(|x| {
            let [
                bid,
                bid_size,
                ask,
                ask_size,
                daily_change,
                daily_change_relative,
                last_price,
                volume,
                high,
                low,
            ] = x.values;
            let v = candlestream::exchange::bitfinex::message::TickerValues {
                bid,
                bid_size,
                ask,
                ask_size,
                daily_change,
                daily_change_relative,
                last_price,
                volume,
                high,
                low,
            };
            let t = x
                .exchange_time
                .expect("websocket ticks carry the exchange's time");
            v.into_tick(
                x.symbol.clone(),
                t,
                x.seq.map(|s| s as i64),
                Source::Websocket,
                t,
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// (b) the dashboard's queries, expanded as Grafana does, against the ledger.
// ---------------------------------------------------------------------------------------------

/// Grafana's `roundInterval` (@grafana/data rangeutil): the "nice" interval for a raw one.
fn round_interval(ms: i64) -> i64 {
    const LADDER: [(i64, i64); 29] = [
        (10, 1),
        (15, 10),
        (35, 20),
        (75, 50),
        (150, 100),
        (350, 200),
        (750, 500),
        (1_500, 1_000),
        (3_500, 2_000),
        (7_500, 5_000),
        (12_500, 10_000),
        (17_500, 15_000),
        (25_000, 20_000),
        (45_000, 30_000),
        (90_000, 60_000),
        (210_000, 120_000),
        (450_000, 300_000),
        (750_000, 600_000),
        (1_050_000, 900_000),
        (1_500_000, 1_200_000),
        (2_700_000, 1_800_000),
        (5_400_000, 3_600_000),
        (9_000_000, 7_200_000),
        (16_200_000, 10_800_000),
        (32_400_000, 21_600_000),
        (86_400_000, 43_200_000),
        (604_800_000, 86_400_000),
        (1_814_400_000, 604_800_000),
        (3_628_800_000, 2_592_000_000),
    ];
    LADDER
        .iter()
        .find(|(below, _)| ms < *below)
        .map_or(31_536_000_000, |(_, r)| *r)
}

fn interval_ms(text: &str) -> i64 {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: i64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("interval {text:?}"));
    n * match &text[digits.len()..] {
        "ms" => 1,
        "s" | "" => 1_000,
        "m" => MINUTE,
        "h" => 60 * MINUTE,
        "d" => 1_440 * MINUTE,
        "w" => 7 * 1_440 * MINUTE,
        u => panic!("interval unit {u:?}"),
    }
}

/// Grafana's text for an interval (gtime.FormatInterval): the largest whole unit.
fn format_interval(ms: i64) -> String {
    for (unit, size) in [
        ("d", 1_440 * MINUTE),
        ("h", 60 * MINUTE),
        ("m", MINUTE),
        ("s", 1_000),
    ] {
        if ms >= size {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{}ms", ms.max(1))
}

/// One dashboard target expanded the way Grafana 11 does it for a raw InfluxQL query.
///
/// 1. The browser (templateSrv.replace) substitutes dashboard variables written `$name`,
///    `${name}` or `[[name]]`, plus the built-in `$__interval` / `$__interval_ms`; single values
///    that are not inside a regex go in verbatim; unknown names stay.
/// 2. The backend (pkg/tsdb/influxdb/models/query.go, Build) replaces `$timeFilter` with
///    `time >= <from>ms and time <= <to>ms`, then `$interval`, `$__interval_ms`, `$__interval`.
///
/// `$__interval` is the range divided by the panel's maxDataPoints, rounded by Grafana's ladder,
/// and never below the panel's `interval` (the min interval).
fn expand(
    query: &str,
    panel: &Value,
    vars: &BTreeMap<&str, String>,
    from_ms: i64,
    to_ms: i64,
) -> String {
    let resolution = panel["maxDataPoints"].as_i64().unwrap_or(1_000);
    let floor = panel["interval"].as_str().map_or(1, interval_ms);
    let interval = round_interval((to_ms - from_ms) / resolution).max(floor);
    let mut all: BTreeMap<&str, String> = vars.clone();
    all.insert("__interval", format_interval(interval));
    all.insert("__interval_ms", interval.to_string());

    let mut out = String::new();
    let mut rest = query;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let (name, len) = if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').unwrap_or(r.len());
            (&r[..end], end + 3)
        } else if let Some(r) = rest.strip_prefix("[[") {
            let end = r.find("]]").unwrap_or(r.len());
            (&r[..end], end + 4)
        } else if let Some(r) = rest.strip_prefix('$') {
            let end = r
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(r.len());
            (&r[..end], end + 1)
        } else {
            ("", 1)
        };
        match all.get(name) {
            Some(value) if len <= rest.len() => out.push_str(value),
            _ => out.push_str(&rest[..len.min(rest.len())]),
        }
        rest = &rest[len.min(rest.len())..];
    }
    out.push_str(rest);

    out.replace(
        "$timeFilter",
        &format!("time >= {from_ms}ms and time <= {to_ms}ms"),
    )
    .replace("$interval", &format_interval(interval))
    .replace("$__interval_ms", &interval.to_string())
    .replace("$__interval", &format_interval(interval))
}

#[derive(Debug)]
struct Series {
    tags: BTreeMap<String, String>,
    rows: Vec<BTreeMap<String, Value>>,
}

/// Runs InfluxQL as Grafana's backend does (GET /query, db, epoch=ms); statement errors, which
/// InfluxDB reports inside a 200 answer, are errors too.
async fn influxql(url: &str, db: &str, q: &str) -> Result<Vec<Series>, String> {
    let resp = reqwest::Client::new()
        .get(format!("{url}/query"))
        .query(&[("db", db), ("q", q), ("epoch", "ms")])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success()
        || body.get("error").is_some()
        || body["results"][0].get("error").is_some()
    {
        return Err(format!("HTTP {status}: {body}"));
    }
    let mut out = Vec::new();
    for s in body["results"][0]["series"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let columns: Vec<String> = s["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        let tags = s["tags"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let rows = s["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                columns
                    .iter()
                    .cloned()
                    .zip(r.as_array().unwrap().iter().cloned())
                    .collect()
            })
            .collect();
        out.push(Series { tags, rows });
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
struct Candle {
    start: i64,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: f64,
}

impl Candle {
    /// Prices exactly (InfluxDB returns the stored float), volume within 1e-9 relative: InfluxDB
    /// adds the amounts in its own order.
    fn matches(&self, other: &Candle) -> bool {
        self.start == other.start
            && self.open == other.open
            && self.high == other.high
            && self.low == other.low
            && self.close == other.close
            && (self.volume - other.volume).abs()
                <= 1e-9 * self.volume.abs().max(other.volume.abs())
    }
}

/// Candles straight from the ledger: epoch-aligned windows of `tf_ms`, trades in [from, to];
/// open/close are the first/last trade by (MTS, id), volume the sum of |amount|.
fn ledger_candles(
    ledger: &[LedgerTrade],
    symbol: &str,
    tf_ms: i64,
    from_ms: i64,
    to_ms: i64,
) -> Vec<Candle> {
    let mut windows: BTreeMap<i64, Vec<&LedgerTrade>> = BTreeMap::new();
    for t in ledger
        .iter()
        .filter(|t| t.symbol == symbol && t.mts >= from_ms && t.mts <= to_ms)
    {
        windows
            .entry(t.mts.div_euclid(tf_ms) * tf_ms)
            .or_default()
            .push(t);
    }
    windows
        .into_iter()
        .map(|(start, mut trades)| {
            trades.sort_by_key(|t| (t.mts, t.id));
            Candle {
                start,
                open: trades[0].price,
                high: trades.iter().map(|t| t.price).fold(f64::MIN, f64::max),
                low: trades.iter().map(|t| t.price).fold(f64::MAX, f64::min),
                close: trades[trades.len() - 1].price,
                volume: trades.iter().map(|t| t.amount.abs()).sum(),
            }
        })
        .collect()
}

fn f(row: &BTreeMap<String, Value>, column: &str) -> f64 {
    row[column]
        .as_f64()
        .unwrap_or_else(|| panic!("{column} is {:?} in {row:?}", row[column]))
}

fn candles_of(series: &[Series]) -> Vec<Candle> {
    assert!(
        series.len() <= 1,
        "the candle query returned {} series",
        series.len()
    );
    series
        .iter()
        .flat_map(|s| &s.rows)
        .map(|r| Candle {
            start: r["time"].as_i64().unwrap(),
            open: f(r, "open"),
            high: f(r, "high"),
            low: f(r, "low"),
            close: f(r, "close"),
            volume: f(r, "volume"),
        })
        .collect()
}

/// Compares every symbol's candles of one timeframe; returns (compared, equal, empty windows
/// between each symbol's first and last candle).
async fn compare_candles(
    url: &str,
    db: &str,
    panel: &Value,
    query: &str,
    ledger: &[LedgerTrade],
    tf: &str,
    (from_ms, to_ms): (i64, i64),
) -> (usize, usize, usize) {
    let (mut compared, mut equal, mut empty) = (0, 0, 0);
    for symbol in SYMBOLS {
        let vars = BTreeMap::from([
            ("symbol", symbol.to_string()),
            ("timeframe", tf.to_string()),
        ]);
        let q = expand(query, panel, &vars, from_ms, to_ms);
        let got = candles_of(
            &influxql(url, db, &q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}")),
        );
        let want = ledger_candles(ledger, symbol, interval_ms(tf), from_ms, to_ms);
        assert_eq!(
            got.iter().map(|c| c.start).collect::<Vec<_>>(),
            want.iter().map(|c| c.start).collect::<Vec<_>>(),
            "{symbol} {tf}: candle windows differ\n{q}"
        );
        if let (Some(a), Some(b)) = (got.first(), got.last()) {
            empty += ((b.start - a.start) / interval_ms(tf)) as usize + 1 - got.len();
        }
        for (g, w) in got.iter().zip(&want) {
            compared += 1;
            if g.matches(w) {
                equal += 1;
            } else {
                crate::report!("DASHBOARD | {tf} | {symbol} | differs: influx {g:?} ledger {w:?}");
            }
        }
    }
    (compared, equal, empty)
}

async fn check_dashboard(url: &str, db: &str, ledger: &[LedgerTrade], ticks: &[Tick]) {
    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "candles.json")
        .unwrap();
    let candles = candle_panel(&dashboard);
    let candle_query = query_of(&candles["targets"][0]);
    let to_ms = now_ms();
    // InfluxQL's GROUP BY time() windows are aligned to the Unix epoch, not to the query's start:
    // with `$timeFilter` starting inside a window, InfluxDB still labels that window with its
    // epoch-aligned start but fills it only with the points after the filter's start, a partial
    // first candle. The check therefore starts at a multiple of every tested timeframe (10
    // minutes, the least common multiple of 1m, 2m and 5m) at or before the first trade, so
    // that every window is whole; the partial case is checked on its own below.
    let first = ledger.iter().map(|t| t.mts).min().unwrap();
    let from_ms = first.div_euclid(10 * MINUTE) * 10 * MINUTE;
    assert!(
        to_ms - first >= 30 * MINUTE,
        "at least 30 minutes of trades"
    );

    let symbols = SYMBOLS.join(",");
    for tf in ["1m", "2m", "5m"] {
        let (compared, equal, empty) =
            compare_candles(url, db, candles, candle_query, ledger, tf, (from_ms, to_ms)).await;
        crate::report!(
            "DASHBOARD | {tf} | {symbols} | {compared} candles compared, {equal} equal ({empty} empty windows left out)"
        );
        // The ledger has windows without trades: fill(none) must leave them out, not draw empty
        // candles (the window lists were compared above).
        let minutes = ((to_ms - first) / MINUTE) as usize;
        assert!(
            compared >= minutes * MINUTE as usize * SYMBOLS.len() / interval_ms(tf) as usize / 2,
            "{tf}: only {compared} candles"
        );
        assert!(empty > 0, "{tf}: the ledger should have empty windows");
        assert_eq!(equal, compared, "{tf}: candles differ from the ledger");
    }

    // Wide ranges run: the same candles over the last 7 days at 2m and 30 days at 1m.
    for (tf, days) in [("2m", 7), ("1m", 30)] {
        let wide_from = to_ms - days * 1_440 * MINUTE;
        let (compared, equal, _) = compare_candles(
            url,
            db,
            candles,
            candle_query,
            ledger,
            tf,
            (wide_from, to_ms),
        )
        .await;
        crate::report!(
            "DASHBOARD | {tf} over {days} days | {symbols} | {compared} candles compared, {equal} equal"
        );
        assert!(compared > 0 && equal == compared);
    }

    // A start inside a window gives that window from the start on only (see above): take the
    // first 2-minute window of tBTCUSD with trades both before and after its 30th second.
    let symbol = SYMBOLS[0];
    let whole = ledger_candles(ledger, symbol, 2 * MINUTE, from_ms, to_ms);
    let trades_in = |a: i64, b: i64| {
        ledger
            .iter()
            .any(|t| t.symbol == symbol && t.mts >= a && t.mts < b)
    };
    let window = whole
        .iter()
        .find(|c| {
            trades_in(c.start, c.start + 30_000)
                && trades_in(c.start + 30_000, c.start + 2 * MINUTE)
        })
        .unwrap();
    let mid = window.start + 30_000;
    let vars = BTreeMap::from([
        ("symbol", symbol.to_string()),
        ("timeframe", "2m".to_string()),
    ]);
    let q = expand(candle_query, candles, &vars, mid, to_ms);
    let got = candles_of(&influxql(url, db, &q).await.unwrap());
    let partial = ledger_candles(ledger, symbol, 2 * MINUTE, mid, to_ms);
    assert_eq!(
        got[0].start, window.start,
        "the partial window keeps its epoch-aligned start"
    );
    assert!(
        got[0].matches(&partial[0]),
        "partial first window: influx {:?} ledger {:?}",
        got[0],
        partial[0]
    );
    assert!(got[0].volume < window.volume && !got[0].matches(window));
    crate::report!(
        "DASHBOARD | 2m from 30 s into a window | {symbol} | first candle holds volume {} of the whole window's {}",
        got[0].volume,
        window.volume
    );

    // Every other target runs and returns rows, for every symbol, at the default timeframe.
    let mut others = 0;
    for p in panels(&dashboard) {
        for t in p["targets"].as_array().unwrap() {
            if std::ptr::eq(p, candles) {
                continue;
            }
            others += 1;
            for symbol in SYMBOLS {
                let vars = BTreeMap::from([
                    ("symbol", symbol.to_string()),
                    ("timeframe", "2m".to_string()),
                ]);
                let q = expand(query_of(t), p, &vars, from_ms, to_ms);
                let series = influxql(url, db, &q)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {q}: {e}", p["title"]));
                let rows: usize = series.iter().map(|s| s.rows.len()).sum();
                assert!(rows > 0, "{}: no rows for {symbol}: {q}", p["title"]);
                crate::report!(
                    "DASHBOARD | panel {} | {symbol} | {rows} rows | {q}",
                    p["title"]
                );
            }
        }
    }
    assert!(others >= 6, "the ticker row and the volume split");

    // The spread is the last ticker update's ask minus bid.
    let spread = panels(&dashboard)
        .into_iter()
        .find(|p| p["title"] == "Spread")
        .unwrap();
    for symbol in SYMBOLS {
        let vars = BTreeMap::from([("symbol", symbol.to_string())]);
        let q = expand(
            query_of(&spread["targets"][0]),
            spread,
            &vars,
            from_ms,
            to_ms,
        );
        let got = f(&influxql(url, db, &q).await.unwrap()[0].rows[0], "spread");
        let last = ticks
            .iter()
            .filter(|t| t.symbol == symbol)
            .max_by_key(|t| t.exchange_time)
            .unwrap();
        assert!(
            (got - (last.ask - last.bid)).abs() < 1e-9,
            "{symbol} spread {got}"
        );
    }

    // The buy/sell split adds up per side and window to the ledger's signed amounts.
    let split = panels(&dashboard)
        .into_iter()
        .find(|p| query_of(&p["targets"][0]).contains("\"side\" fill"))
        .expect("volume split");
    for symbol in SYMBOLS {
        let vars = BTreeMap::from([
            ("symbol", symbol.to_string()),
            ("timeframe", "2m".to_string()),
        ]);
        let q = expand(query_of(&split["targets"][0]), split, &vars, from_ms, to_ms);
        let mut got: BTreeMap<(String, i64), f64> = BTreeMap::new();
        for s in influxql(url, db, &q).await.unwrap() {
            for r in &s.rows {
                got.insert(
                    (s.tags["side"].clone(), r["time"].as_i64().unwrap()),
                    f(r, "volume"),
                );
            }
        }
        let mut want: BTreeMap<(String, i64), f64> = BTreeMap::new();
        for t in ledger.iter().filter(|t| t.symbol == symbol) {
            let side = if t.amount >= 0.0 { "buy" } else { "sell" };
            *want
                .entry((side.to_string(), t.mts.div_euclid(2 * MINUTE) * 2 * MINUTE))
                .or_default() += t.amount.abs();
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{symbol}: split windows"
        );
        for (k, w) in &want {
            assert!(
                (got[k] - w).abs() <= 1e-9 * w,
                "{symbol} {k:?}: {} vs {w}",
                got[k]
            );
        }
    }

    // The $symbol variable lists the stored symbols.
    let var = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "symbol")
        .unwrap();
    let series = influxql(url, db, var["query"].as_str().unwrap())
        .await
        .unwrap();
    let listed: BTreeSet<String> = series
        .iter()
        .flat_map(|s| &s.rows)
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, SYMBOLS.iter().map(|s| s.to_string()).collect());
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_queries_give_the_ledger_candles_on_influxdb_1_6() {
    // (a) The pipeline fills InfluxDB from the fake exchange: the ledger's 36 minutes are history
    // the producer backfills over REST, then live trades and ticker updates arrive over the
    // websocket, across a dropped connection whose gap is repaired.
    let now = now_ms();
    let history = make_ledger(now);
    let pipeline = MockPipeline::start(|ex| ex.load_ledger(history.clone())).await;
    let ex = &pipeline.exchange;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    let trader = Trader::start(ex, &SYMBOLS, 2, Duration::from_millis(20));
    let emitter = Emitter::start(ex, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_secs(2)).await;
    ex.drop_connections().await;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = trader.stop().await;
    emitter.stop().await;
    pipeline.wait_stored().await;
    let ledger = ex.ledger();
    let ticks = sent_ticks(&ex.sent());
    // The contract keeps trades of one symbol in (MTS, id) order in time, unless two trades of
    // one millisecond straddle a multiple of 1e6 ids: make sure this ledger has no such pair.
    for sym in SYMBOLS {
        let ns: Vec<i64> = ledger
            .iter()
            .filter(|t| t.symbol == sym)
            .map(|t| t.mts * 1_000_000 + t.id % 1_000_000)
            .collect();
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{sym}: trade timestamps out of (MTS, id) order"
        );
    }
    let same_ms = ledger
        .windows(2)
        .filter(|w| w[0].symbol == w[1].symbol && w[0].mts == w[1].mts)
        .count();
    let buys = ledger.iter().filter(|t| t.amount > 0.0).count();
    crate::report!(
        "DASHBOARD | fill | {} trades through the pipeline ({} backfilled, {live} live; {buys} buys, {} sells, {same_ms} sharing a millisecond with the previous one), {} ticker updates",
        ledger.len(),
        history.len(),
        ledger.len() - buys,
        ticks.len()
    );
    assert!(same_ms >= 5 && buys > 100 && ledger.len() - buys > 100);

    // (b) the dashboard against what is stored.
    check_dashboard(&pipeline.influx.url(), &pipeline.db, &ledger, &ticks).await;
    pipeline.stop().await;
}
