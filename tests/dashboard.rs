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
use support::influx1::Influx1;
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

/// The verifier's `candle_checks` measurement (issue 15): one point per (symbol, timeframe, candle
/// start), `status` a string field so that a re-check overwrites the point.
const CHECK_TAGS: [&str; 2] = ["symbol", "timeframe"];
const CHECK_FIELDS: [&str; 12] = [
    "status",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "ex_open",
    "ex_high",
    "ex_low",
    "ex_close",
    "ex_volume",
    "detail",
];

/// The InfluxDB datasource's uid; panels of any other datasource (a Prometheus dashboard) are not
/// InfluxQL and are left to their own tests.
const INFLUX_UID: &str = "candlestream-influxdb";

fn is_influx(panel: &Value) -> bool {
    panel["datasource"]["uid"] == INFLUX_UID
}

/// How every dashboard query filters by coin: a regex match with Grafana's regex escaping of the
/// value (`${var:regex}`), so that no value can close the regex and add to the statement.
const SYMBOL_FILTER: &str = "\"symbol\" =~ /^${symbol:regex}$/";
const SYMBOLS_FILTER: &str = "\"symbol\" =~ /^${symbols:regex}$/";
/// `$symbols`' All: every symbol as one regex.
const ALL_VALUE: &str = ".*";

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

    schema.insert(
        "candle_checks".to_string(),
        CHECK_TAGS
            .iter()
            .chain(&CHECK_FIELDS)
            .map(|s| s.to_string())
            .collect(),
    );
    for (file, dashboard) in dashboards() {
        let mut queries = 0;
        let influx_panels: Vec<&Value> = panels(&dashboard)
            .into_iter()
            .filter(|p| is_influx(p))
            .collect();
        if influx_panels.is_empty() {
            continue;
        }
        // Every target of an InfluxDB panel, and every InfluxDB annotation query.
        let mut texts: Vec<(String, &str)> = Vec::new();
        for p in influx_panels {
            for t in p["targets"].as_array().unwrap() {
                let at = format!("{file}: panel {}", p["title"]);
                assert_eq!(t["datasource"]["uid"], uid, "{at}");
                // Raw InfluxQL text, so what Grafana runs is exactly what the live test runs.
                assert_eq!(t["rawQuery"], true, "{at}");
                texts.push((at, query_of(t)));
            }
        }
        for a in dashboard["annotations"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if a["datasource"]["uid"] == uid {
                texts.push((format!("{file}: annotation {}", a["name"]), query_of(a)));
            }
        }
        for (at, q) in texts {
            queries += 1;
            let at = format!("{at}: {q}");
            assert!(
                !q.contains("|>") && !q.contains("from(bucket"),
                "Flux left in {at}"
            );
            assert!(q.contains("$timeFilter"), "{at}: no $timeFilter");
            // Filtered by coin, and only through Grafana's regex escaping: `$symbol` anywhere
            // else (a quoted string, a bare value) would go into the statement verbatim.
            assert!(
                q.contains(SYMBOL_FILTER) || q.contains(SYMBOLS_FILTER),
                "{at}: not filtered by $symbol"
            );
            let bare = q.replace(SYMBOL_FILTER, "").replace(SYMBOLS_FILTER, "");
            assert!(
                !bare.contains("symbol}") && !bare.contains("$symbol"),
                "{at}: $symbol outside the escaped regex"
            );
            // Every quoted name is the measurement, one of its tags or fields, or an alias.
            let measurements: BTreeSet<&str> = q
                .split("FROM \"")
                .skip(1)
                .map(|s| s.split('"').next().unwrap())
                .collect();
            assert_eq!(measurements.len(), 1, "{at}: one measurement");
            let measurement = *measurements.first().unwrap();
            let names = schema
                .get(measurement)
                .unwrap_or_else(|| panic!("{at}: unknown measurement"));
            let (idents, aliases) = identifiers(q);
            for ident in idents {
                assert!(
                    ident == measurement || names.contains(&ident) || aliases.contains(&ident),
                    "{at}: \"{ident}\" is not written to {measurement}"
                );
            }
        }
        assert!(queries > 0, "{file} has no queries");
    }

    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "candles.json")
        .unwrap();
    // The default range starts on a whole hour, in UTC: every timeframe divides an hour, so the
    // first candle is whole and does not change from one refresh to the next.
    assert_eq!(dashboard["time"]["from"], "now-3h/h");
    assert_eq!(dashboard["time"]["to"], "now");
    assert_eq!(dashboard["timezone"], "utc");

    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name}"))
    };
    let list_query = format!("SHOW TAG VALUES FROM \"{trades}\" WITH KEY = \"symbol\"");
    // $symbol: the charted coin, one of every stored symbol; Grafana's picker searches as you
    // type. Both coin lists are read once on dashboard load (refresh 1), not on every
    // auto-refresh (2 = on time range change, which the 10 s refresh triggers).
    let symbol = var("symbol");
    assert_eq!(symbol["datasource"]["uid"], uid);
    assert_eq!(symbol["query"].as_str(), Some(list_query.as_str()));
    assert_eq!(symbol["refresh"], 1, "$symbol refreshed on dashboard load");
    assert_eq!(symbol["multi"], false, "the chart shows one coin");
    // $symbols: the data-quality row's coins. By default the first six configured symbols, not
    // every stored one; All is there for when it is asked for.
    let symbols = var("symbols");
    assert_eq!(symbols["query"].as_str(), Some(list_query.as_str()));
    assert_eq!(
        symbols["refresh"], 1,
        "$symbols refreshed on dashboard load"
    );
    assert_eq!(symbols["multi"], true);
    let configured = Settings::default().bitfinex.symbols;
    let first_six: Vec<&str> = configured.iter().take(6).map(String::as_str).collect();
    let default: Vec<&str> = symbols["current"]["value"]
        .as_array()
        .expect("a list of coins by default")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(default, first_six, "the first six configured symbols");
    assert!(!default.contains(&"$__all"));
    // All, when asked for, is one regex however many symbols are stored (300 pairs would
    // otherwise make a regex of 300 alternatives in every query).
    assert_eq!(symbols["allValue"], ALL_VALUE);
    assert_eq!(
        symbol["current"]["value"].as_str(),
        Some(first_six[0]),
        "the first configured coin is charted by default"
    );

    // $timeframe: the narrowest candle (the panels' min interval). Each choice gives at least
    // three whole candles on the default range of three hours, so 4h and 1d are not offered:
    // wide ranges get such candles from $__interval.
    let timeframe = var("timeframe");
    assert_eq!(timeframe["type"], "custom");
    let options: Vec<&str> = timeframe["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["value"].as_str().unwrap())
        .collect();
    assert_eq!(options, ["1m", "2m", "5m", "15m", "1h"]);
    assert_eq!(
        timeframe["query"].as_str(),
        Some(options.join(",").as_str())
    );
    assert_eq!(
        timeframe["current"]["value"], "2m",
        "2-minute candles are the default"
    );
    for o in &options {
        assert_eq!(60 * MINUTE % interval_ms(o), 0, "{o} divides an hour");
        assert!(3 * 60 * MINUTE / interval_ms(o) >= 3, "{o} on three hours");
    }

    let all = panels(&dashboard);
    let candles = candle_panel(&dashboard);
    assert_eq!(candles["options"]["mode"], "candles+volume");
    for f in ["open", "high", "low", "close", "volume"] {
        assert_eq!(
            candles["options"]["fields"][f], f,
            "candlestick field mapping of {f}"
        );
    }
    // Grafana 11.6's CandlestickPanel hides every field it draws as a candle or a volume bar
    // from the legend, and `includeAllFields` is off: a shown legend would be an empty strip.
    assert_eq!(candles["options"]["includeAllFields"], false);
    assert_eq!(candles["options"]["legend"]["showLegend"], false);
    // It draws flat candles in the up colour (drawMarkers' flatAsUp): `flat` would be unused.
    let colors = candles["options"]["colors"].as_object().unwrap();
    assert_eq!(
        colors.keys().map(String::as_str).collect::<Vec<_>>(),
        ["down", "up"]
    );
    // Candles and the volume split: $__interval, never narrower than $timeframe, a few hundred
    // candles at most.
    let split = all
        .iter()
        .find(|p| query_of(&p["targets"][0]).contains("\"side\" fill"))
        .expect("volume split");
    for p in [candles, *split] {
        assert_eq!(p["interval"], "$timeframe", "{}", p["title"]);
        let max = p["maxDataPoints"].as_i64().unwrap();
        assert!((200..=500).contains(&max), "{}: {max}", p["title"]);
        assert!(query_of(&p["targets"][0]).contains("GROUP BY time($__interval)"));
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
        "GROUP BY time($__interval) fill(none)",
    ] {
        assert!(q.contains(needle), "candlestick query lacks {needle}:\n{q}");
    }

    // The ticker row: bid, ask, spread, last price, the 24-hour change and volume. Each reads
    // the last hour only, whatever the dashboard's range. Prices in a fixed text colour (no
    // thresholds, whose default turns values above 80 red), with up to 8 decimals and no
    // padding (Grafana's `locale` unit), so that Bitfinex's 5 significant digits show whole.
    for (title, field, price) in [
        ("Bid", "bid", true),
        ("Ask", "ask", true),
        ("Spread", "ask", true),
        ("Last price", "last_price", true),
        ("24 h change", "daily_change_relative", false),
        ("24 h volume", "volume", false),
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
        assert_eq!(p["timeFrom"], "1h", "{title}");
        let defaults = &p["fieldConfig"]["defaults"];
        if price {
            assert_eq!(defaults["unit"], "locale", "{title}");
            assert_eq!(defaults["decimals"], PRICE_DECIMALS, "{title}");
        }
        if title != "24 h change" {
            assert_eq!(defaults["color"]["mode"], "fixed", "{title}");
            assert_eq!(defaults["color"]["fixedColor"], "text", "{title}");
            assert!(defaults.get("thresholds").is_none(), "{title}");
        }
    }

    // The data-quality row and the candlestick panel's annotations read candle_checks.
    for title in [
        "Verified",
        "Candles that differ from Bitfinex's, or were repaired",
    ] {
        let p = all.iter().find(|p| p["title"] == title).unwrap();
        assert!(query_of(&p["targets"][0]).contains(SYMBOLS_FILTER));
    }
    let annotations = dashboard["annotations"]["list"].as_array().unwrap();
    let colours: Vec<&str> = annotations
        .iter()
        .map(|a| a["iconColor"].as_str().unwrap())
        .collect();
    assert_eq!(colours, ["red", AMBER]);
    for a in annotations {
        assert_eq!(a["datasource"]["uid"], uid);
        assert_eq!(a["enable"], true);
        assert!(query_of(a).contains(SYMBOL_FILTER), "the charted coin only");
        assert_eq!(a["textColumn"], "detail");
        assert_eq!(a["tagsColumn"], "status");
        assert_eq!(a["filter"]["exclude"], false);
        assert_eq!(a["filter"]["ids"], serde_json::json!([candles["id"]]));
    }
}

// ---------------------------------------------------------------------------------------------
// (a) fill: the trade ledger, and writing it into InfluxDB in the consumer's contract.
// ---------------------------------------------------------------------------------------------

/// A trade as the fake exchange executed it.
type LedgerTrade = support::fake_trades::Trade;

const SYMBOLS: [&str; 3] = ["tBTCUSD", "tETHUSD", "tSOLUSD"];
const MINUTE: i64 = 60_000;
/// Decimals of the price panels: Bitfinex quotes 5 significant digits, down to 8 decimals.
const PRICE_DECIMALS: i64 = 8;
/// The repaired-candle annotations' colour.
const AMBER: &str = "#FFBF00";

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

/// Grafana's `roundInterval` (packages/grafana-data/src/datetime/rangeutil.ts): the "nice"
/// interval at or below a raw one, in ms. Grafana compares a float (range / maxDataPoints) with
/// integer bounds; for a whole number of ms `floor(x) < n` exactly when `x < n`, so the integer
/// division below picks the same rung.
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

/// Grafana's `intervalToMs` / `describeInterval` (rangeutil.ts): a number and a unit (`ms`, `s`,
/// `m`, `h`, `d`, `w`, `M` = 30 d, `y` = 365 d); a bare number is seconds.
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
        "M" => 30 * 1_440 * MINUTE,
        "y" => 365 * 1_440 * MINUTE,
        u => panic!("interval unit {u:?}"),
    }
}

/// Grafana's `secondsToHms` (rangeutil.ts), the text of `$__interval`: the largest unit with a
/// non-zero count, the rest dropped.
fn format_interval(ms: i64) -> String {
    let s = ms / 1_000;
    for (count, unit) in [
        (s / 31_536_000, "y"),
        (s % 31_536_000 / 86_400, "d"),
        (s % 86_400 / 3_600, "h"),
        (s % 3_600 / 60, "m"),
        (s % 60, "s"),
    ] {
        if count > 0 {
            return format!("{count}{unit}");
        }
    }
    format!("{ms}ms")
}

/// A panel's `$__interval` in ms, as Grafana 11.6 computes it before it runs the panel's
/// queries: scenes' SceneQueryRunner (and the older PanelQueryRunner) interpolates the panel's
/// min interval (`interval`, here `$timeframe`) and calls rangeutil's `calculateInterval(range,
/// maxDataPoints, minInterval)`: `roundInterval((to - from) / maxDataPoints)`, raised to the min
/// interval. The dashboard sets maxDataPoints on every panel that uses `$__interval` (without
/// it Grafana uses the panel's width in pixels, which a test cannot know).
fn grafana_interval(panel: &Value, vars: &Vars, from_ms: i64, to_ms: i64) -> i64 {
    let max_data_points = panel["maxDataPoints"]
        .as_i64()
        .unwrap_or_else(|| panic!("{}: no maxDataPoints", panel["title"]));
    let min = panel["interval"]
        .as_str()
        .map_or(1, |i| interval_ms(&interpolate(i, vars)));
    round_interval((to_ms - from_ms) / max_data_points).max(min)
}

/// Variable values: one for a single-value variable, a list for a multi-value one.
type Vars = BTreeMap<&'static str, Vec<String>>;

fn vars(pairs: &[(&'static str, &str)]) -> Vars {
    pairs
        .iter()
        .map(|(k, v)| (*k, vec![v.to_string()]))
        .collect()
}

/// Grafana's `escapeRegex` (packages/grafana-data/src/text/string.ts), the `regex` variable
/// format: a backslash before each of `\ ^ $ * + ? . ( ) | [ ] { } /`.
fn escape_regex(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if "\\^$*+?.()|[]{}/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The browser's part of the expansion (scenes' sceneInterpolator, Grafana's TemplateSrv):
/// `$name`, `${name}`, `${name:format}` and `[[name]]` are replaced; an explicit format wins over
/// the datasource's own interpolation function. Only the formats this dashboard uses exist here:
/// `regex` (escaped; several values as `(a|b)`), and no format for single values that are not
/// in a regex (verbatim, as the InfluxDB datasource's `interpolateQueryExpr` leaves them).
/// Unknown names stay.
fn interpolate(text: &str, vars: &Vars) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let (name, format, len) = if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').unwrap_or(r.len());
            let (name, format) = r[..end]
                .split_once(':')
                .map_or((&r[..end], None), |(n, f)| (n, Some(f)));
            (name, format, end + 3)
        } else if let Some(r) = rest.strip_prefix("[[") {
            let end = r.find("]]").unwrap_or(r.len());
            (&r[..end], None, end + 4)
        } else if let Some(r) = rest.strip_prefix('$') {
            let end = r
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(r.len());
            (&r[..end], None, end + 1)
        } else {
            ("", None, 1)
        };
        if len > rest.len() {
            // An unterminated `${` or `[[`: Grafana leaves it.
            break;
        }
        match (vars.get(name), format) {
            // All with a custom all value: the value verbatim, in any format (scenes'
            // CustomAllValue).
            (Some(values), _) if values == &["$__all"] => out.push_str(ALL_VALUE),
            (Some(values), Some("regex")) => {
                let escaped: Vec<String> = values.iter().map(|v| escape_regex(v)).collect();
                if escaped.len() == 1 {
                    out.push_str(&escaped[0]);
                } else {
                    out.push_str(&format!("({})", escaped.join("|")));
                }
            }
            (Some(values), None) => {
                assert_eq!(values.len(), 1, "${name} without a format holds one value");
                out.push_str(&values[0]);
            }
            (Some(_), Some(f)) => panic!("format {f} of ${name} is not emulated"),
            (None, _) => out.push_str(&rest[..len]),
        }
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

/// One dashboard query expanded the way Grafana 11.6 does it for raw InfluxQL, over the range
/// [from, to] (a panel's `timeFrom` is the caller's business).
///
/// 1. The browser substitutes the dashboard's variables (see `interpolate`) and the built-in
///    `$__interval` / `$__interval_ms` of the panel (see `grafana_interval`).
/// 2. The backend (pkg/tsdb/influxdb/influxql, Query.Build) replaces `$timeFilter` with
///    `time >= <from>ms and time <= <to>ms`, then `$interval`, `$__interval_ms`, `$__interval`.
fn expand(query: &str, panel: &Value, vars: &Vars, from_ms: i64, to_ms: i64) -> String {
    let mut all = vars.clone();
    if query.contains("$__interval") {
        let interval = grafana_interval(panel, vars, from_ms, to_ms);
        all.insert("__interval", vec![format_interval(interval)]);
        all.insert("__interval_ms", vec![interval.to_string()]);
    }
    interpolate(query, &all).replace(
        "$timeFilter",
        &format!("time >= {from_ms}ms and time <= {to_ms}ms"),
    )
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

/// Compares every symbol's candles of one timeframe over [from, to]; returns (compared, equal,
/// empty windows between each symbol's first and last candle, the candle width Grafana chose).
async fn compare_candles(
    url: &str,
    db: &str,
    panel: &Value,
    ledger: &[LedgerTrade],
    tf: &str,
    (from_ms, to_ms): (i64, i64),
) -> (usize, usize, usize, i64) {
    let query = query_of(&panel["targets"][0]);
    let (mut compared, mut equal, mut empty) = (0, 0, 0);
    let mut width = 0;
    for symbol in SYMBOLS {
        let v = vars(&[("symbol", symbol), ("timeframe", tf)]);
        width = grafana_interval(panel, &v, from_ms, to_ms);
        let q = expand(query, panel, &v, from_ms, to_ms);
        assert!(
            q.contains(&format!("GROUP BY time({})", format_interval(width))),
            "{q}"
        );
        let got = candles_of(
            &influxql(url, db, &q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}")),
        );
        // The ledger's candles at the width Grafana chose, computed without InfluxDB.
        let want = ledger_candles(ledger, symbol, width, from_ms, to_ms);
        assert_eq!(
            got.iter().map(|c| c.start).collect::<Vec<_>>(),
            want.iter().map(|c| c.start).collect::<Vec<_>>(),
            "{symbol} {tf}: candle windows differ\n{q}"
        );
        if let (Some(a), Some(b)) = (got.first(), got.last()) {
            empty += ((b.start - a.start) / width) as usize + 1 - got.len();
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
    (compared, equal, empty, width)
}

/// The range a panel queries: the dashboard's, or the last `timeFrom` of it.
fn panel_range(panel: &Value, (from_ms, to_ms): (i64, i64)) -> (i64, i64) {
    match panel["timeFrom"].as_str() {
        Some(last) => (to_ms - interval_ms(last), to_ms),
        None => (from_ms, to_ms),
    }
}

async fn check_dashboard(url: &str, db: &str, ledger: &[LedgerTrade], ticks: &[Tick]) {
    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "candles.json")
        .unwrap();
    let candles = candle_panel(&dashboard);
    let candle_query = query_of(&candles["targets"][0]);
    let max_candles = candles["maxDataPoints"].as_i64().unwrap();
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
        let (compared, equal, empty, width) =
            compare_candles(url, db, candles, ledger, tf, (from_ms, to_ms)).await;
        crate::report!(
            "DASHBOARD | {tf} | {symbols} | {compared} candles compared, {equal} equal ({empty} empty windows left out)"
        );
        // On a range of minutes the timeframe is the width: $__interval stays below it.
        assert_eq!(width, interval_ms(tf), "{tf}");
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

    // Wide ranges get coarser candles: at 7 days the 2-minute minimum gives way to 30-minute
    // candles, at 30 days the 1-minute minimum to 2-hour ones (Grafana's rounding of
    // range / maxDataPoints). No range holds more windows than maxDataPoints, and the candles
    // are still exactly the ledger's at that width.
    for (tf, days, want_width) in [("2m", 7, "30m"), ("1m", 30, "2h")] {
        let wide_from = to_ms - days * 1_440 * MINUTE;
        let (compared, equal, _, width) =
            compare_candles(url, db, candles, ledger, tf, (wide_from, to_ms)).await;
        let windows = to_ms.div_euclid(width) - wide_from.div_euclid(width) + 1;
        crate::report!(
            "DASHBOARD | {tf} over {days} days | {symbols} | candles {} wide, at most {windows} in the range; {compared} compared, {equal} equal",
            format_interval(width)
        );
        assert_eq!(format_interval(width), want_width);
        assert!(windows <= max_candles, "{windows} windows");
        assert!(compared as i64 <= max_candles * SYMBOLS.len() as i64);
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
    let v = vars(&[("symbol", symbol), ("timeframe", "2m")]);
    let q = expand(candle_query, candles, &v, mid, to_ms);
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

    // Every other target on trades and ticker runs and returns rows, for every symbol, at the
    // default timeframe (candle_checks, the verifier's, has its own test).
    let mut others = 0;
    for p in panels(&dashboard) {
        for t in p["targets"].as_array().unwrap() {
            if std::ptr::eq(p, candles) || query_of(t).contains("\"candle_checks\"") {
                continue;
            }
            others += 1;
            for symbol in SYMBOLS {
                let v = vars(&[("symbol", symbol), ("timeframe", "2m")]);
                let (a, b) = panel_range(p, (from_ms, to_ms));
                let q = expand(query_of(t), p, &v, a, b);
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
    assert!(others >= 8, "the ticker row, bid/ask and the volume split");

    // The spread is the last ticker update's ask minus bid.
    let spread = panels(&dashboard)
        .into_iter()
        .find(|p| p["title"] == "Spread")
        .unwrap();
    for symbol in SYMBOLS {
        let v = vars(&[("symbol", symbol)]);
        let (a, b) = panel_range(spread, (from_ms, to_ms));
        let q = expand(query_of(&spread["targets"][0]), spread, &v, a, b);
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
        let v = vars(&[("symbol", symbol), ("timeframe", "2m")]);
        let q = expand(query_of(&split["targets"][0]), split, &v, from_ms, to_ms);
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

    // The coin variables list the stored symbols.
    for name in ["symbol", "symbols"] {
        let var = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
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

// ---------------------------------------------------------------------------------------------
// The data-quality row, the price display and crafted $symbol values, on points written directly.
// ---------------------------------------------------------------------------------------------

/// POSTs line protocol (nanosecond timestamps) to InfluxDB 1.x.
async fn write_points(url: &str, db: &str, lines: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/write"))
        .query(&[("db", db)])
        .body(lines.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
}

/// How many statements InfluxDB executed for a query text, and the rows of all of them, or the
/// error if one failed.
async fn statements(url: &str, db: &str, q: &str) -> (usize, Result<usize, String>) {
    let body: Value = reqwest::Client::new()
        .get(format!("{url}/query"))
        .query(&[("db", db), ("q", q), ("epoch", "ms")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if let Some(e) = body.get("error") {
        return (0, Err(e.to_string()));
    }
    let results = body["results"].as_array().unwrap();
    let mut rows = 0;
    for r in results {
        if let Some(e) = r.get("error") {
            return (results.len(), Err(e.to_string()));
        }
        for s in r["series"].as_array().into_iter().flatten() {
            rows += s["values"].as_array().unwrap().len();
        }
    }
    (results.len(), Ok(rows))
}

/// Grafana's `locale` unit (valueFormats.ts `locale`): `toLocaleString(undefined,
/// { maximumFractionDigits: decimals })`, here in the en-US locale: at most `decimals` digits
/// after the point, trailing zeros dropped, thousands grouped.
fn locale_text(value: f64, decimals: usize) -> String {
    let fixed = format!("{:.*}", decimals, value.abs());
    let (int, frac) = fixed.split_once('.').unwrap_or((&fixed, ""));
    let frac = frac.trim_end_matches('0');
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if value < 0.0 && (int != "0" || !frac.is_empty()) {
        "-"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

/// One `candle_checks` point as the verifier writes it (issue 15): `ours`/`theirs` are
/// open, high, low, close, volume where that side has the candle.
fn check_line(
    symbol: &str,
    timeframe: &str,
    start_ms: i64,
    status: &str,
    ours: Option<[f64; 5]>,
    theirs: Option<[f64; 5]>,
    detail: &str,
) -> String {
    let mut fields = vec![format!("status=\"{status}\"")];
    for (prefix, side) in [("", ours), ("ex_", theirs)] {
        if let Some(v) = side {
            for (name, x) in ["open", "high", "low", "close", "volume"].iter().zip(v) {
                fields.push(format!("{prefix}{name}={x}"));
            }
        }
    }
    fields.push(format!("detail=\"{detail}\""));
    format!(
        "candle_checks,symbol={symbol},timeframe={timeframe} {} {}\n",
        fields.join(","),
        start_ms * 1_000_000
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn data_quality_row_prices_and_crafted_symbols_on_influxdb_1_6() {
    let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
    let (url, db) = (influx.url(), "dashboard_checks");
    influx.create_database(db).await;
    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "candles.json")
        .unwrap();
    let all = panels(&dashboard);
    let panel = |title: &str| {
        *all.iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no {title} panel"))
    };
    let to_ms = now_ms();
    let from_ms = to_ms - 60 * MINUTE;
    let m0 = (to_ms - 50 * MINUTE).div_euclid(MINUTE) * MINUTE;
    let minute = |i: i64| m0 + i * MINUTE;

    // (a) The verifier's verdicts, in its schema. Inside the range: tBTCUSD 5 equal, 1 repaired,
    // 1 differs, 1 missing_here, 1 missing_there; tETHUSD 4 equal minutes, one equal and one
    // differing hour; tSOLUSD 2 differing minutes. Outside the selection or the range: tXRPUSD,
    // and a differing tBTCUSD minute two hours ago.
    let c = |o: f64| Some([o, o + 10.0, o - 10.0, o + 5.0, 1.25]);
    let mut lines = String::new();
    for i in 0..5 {
        lines += &check_line(
            "tBTCUSD",
            "1m",
            minute(i),
            "equal",
            c(97_000.0),
            c(97_000.0),
            "",
        );
    }
    lines += &check_line(
        "tBTCUSD",
        "1m",
        minute(5),
        "repaired",
        c(97_100.0),
        c(97_100.0),
        "",
    );
    let (ours, theirs) = (
        [97_140.0, 97_150.0, 97_130.0, 97_145.0, 0.5],
        [97_140.0, 97_160.0, 97_130.0, 97_145.0, 0.5],
    );
    lines += &check_line(
        "tBTCUSD",
        "1m",
        minute(6),
        "differs",
        Some(ours),
        Some(theirs),
        "high: ours 97150, Bitfinex 97160",
    );
    lines += &check_line(
        "tBTCUSD",
        "1m",
        minute(7),
        "missing_here",
        None,
        c(97_200.0),
        "no trades here",
    );
    lines += &check_line(
        "tBTCUSD",
        "1m",
        minute(8),
        "missing_there",
        c(97_300.0),
        None,
        "no candle at Bitfinex",
    );
    lines += &check_line(
        "tBTCUSD",
        "1m",
        to_ms - 120 * MINUTE,
        "differs",
        c(1.0),
        c(2.0),
        "outside the range",
    );
    for i in 0..4 {
        lines += &check_line(
            "tETHUSD",
            "1m",
            minute(i),
            "equal",
            c(3_400.0),
            c(3_400.0),
            "",
        );
    }
    let hour = (to_ms - 30 * MINUTE).div_euclid(60 * MINUTE) * 60 * MINUTE;
    lines += &check_line(
        "tETHUSD",
        "1h",
        hour.max(from_ms.div_euclid(MINUTE) * MINUTE + MINUTE),
        "differs",
        c(3_400.0),
        c(3_401.0),
        "open: ours 3400, Bitfinex 3401",
    );
    lines += &check_line(
        "tETHUSD",
        "1h",
        hour - 60 * MINUTE,
        "equal",
        c(3_300.0),
        c(3_300.0),
        "",
    );
    for i in 0..2 {
        lines += &check_line(
            "tSOLUSD",
            "1m",
            minute(10 + i),
            "differs",
            c(180.0),
            c(181.0),
            "open: ours 180, Bitfinex 181",
        );
    }
    lines += &check_line(
        "tXRPUSD",
        "1m",
        minute(3),
        "differs",
        c(2.0),
        c(2.1),
        "not selected",
    );
    write_points(&url, db, &lines).await;

    let selected = ["tBTCUSD", "tETHUSD", "tSOLUSD"];
    let mut v: Vars = vars(&[("symbol", "tBTCUSD"), ("timeframe", "2m")]);
    v.insert("symbols", selected.iter().map(|s| s.to_string()).collect());

    // "Verified": equal or repaired over all checked 1-minute candles, per selected coin; a coin
    // with none verified shows 0, not nothing.
    let stat = panel("Verified");
    let q = expand(query_of(&stat["targets"][0]), stat, &v, from_ms, to_ms);
    let got: BTreeMap<String, f64> = influxql(&url, db, &q)
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
        .into_iter()
        .map(|s| {
            assert_eq!(s.rows.len(), 1, "{q}");
            (s.tags["symbol"].clone(), f(&s.rows[0], "verified"))
        })
        .collect();
    crate::report!("DASHBOARD | verified | {got:?} | {q}");
    assert_eq!(
        got,
        BTreeMap::from([
            ("tBTCUSD".to_string(), 6.0 / 9.0),
            ("tETHUSD".to_string(), 1.0),
            ("tSOLUSD".to_string(), 0.0),
        ])
    );

    // The table: every selected candle whose status is not equal, ours next to Bitfinex's.
    let table = panel("Candles that differ from Bitfinex's, or were repaired");
    let q = expand(query_of(&table["targets"][0]), table, &v, from_ms, to_ms);
    let mut rows: BTreeMap<(String, String, i64), BTreeMap<String, Value>> = BTreeMap::new();
    for s in influxql(&url, db, &q)
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
    {
        for r in s.rows {
            let key = (
                s.tags["symbol"].clone(),
                s.tags["timeframe"].clone(),
                r["time"].as_i64().unwrap(),
            );
            rows.insert(key, r);
        }
    }
    let status_of: BTreeMap<(String, String, i64), &str> = rows
        .iter()
        .map(|(k, r)| (k.clone(), r["status"].as_str().unwrap()))
        .collect();
    let key = |s: &str, tf: &str, t: i64| (s.to_string(), tf.to_string(), t);
    assert_eq!(
        status_of,
        BTreeMap::from([
            (key("tBTCUSD", "1m", minute(5)), "repaired"),
            (key("tBTCUSD", "1m", minute(6)), "differs"),
            (key("tBTCUSD", "1m", minute(7)), "missing_here"),
            (key("tBTCUSD", "1m", minute(8)), "missing_there"),
            (
                key(
                    "tETHUSD",
                    "1h",
                    hour.max(from_ms.div_euclid(MINUTE) * MINUTE + MINUTE)
                ),
                "differs"
            ),
            (key("tSOLUSD", "1m", minute(10)), "differs"),
            (key("tSOLUSD", "1m", minute(11)), "differs"),
        ]),
        "{q}"
    );
    let differs = &rows[&key("tBTCUSD", "1m", minute(6))];
    for (i, name) in ["open", "high", "low", "close", "volume"]
        .iter()
        .enumerate()
    {
        assert_eq!(f(differs, name), ours[i], "{name}");
        assert_eq!(f(differs, &format!("ex_{name}")), theirs[i], "ex_{name}");
    }
    assert_eq!(differs["detail"], "high: ours 97150, Bitfinex 97160");
    let here = &rows[&key("tBTCUSD", "1m", minute(7))];
    assert!(here["open"].is_null() && f(here, "ex_open") == 97_200.0);
    let there = &rows[&key("tBTCUSD", "1m", minute(8))];
    assert!(there["ex_open"].is_null() && f(there, "open") == 97_300.0);

    // The annotations on the candlestick panel, for the charted coin: red for differs and
    // missing_here, amber for repaired, with the verifier's detail as their text.
    let annotations = dashboard["annotations"]["list"].as_array().unwrap();
    let marks = |symbol: &'static str, i: usize| {
        let mut v = v.clone();
        v.insert("symbol", vec![symbol.to_string()]);
        let q = expand(query_of(&annotations[i]), &Value::Null, &v, from_ms, to_ms);
        let url = url.clone();
        async move {
            let series = influxql(&url, db, &q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"));
            series
                .iter()
                .flat_map(|s| &s.rows)
                .map(|r| {
                    (
                        r["time"].as_i64().unwrap(),
                        r["detail"].as_str().unwrap().to_string(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        marks("tBTCUSD", 0).await,
        [
            (minute(6), "high: ours 97150, Bitfinex 97160".to_string()),
            (minute(7), "no trades here".to_string())
        ]
    );
    assert_eq!(marks("tBTCUSD", 1).await, [(minute(5), String::new())]);
    assert_eq!(marks("tSOLUSD", 0).await.len(), 2);
    assert_eq!(
        marks("tETHUSD", 0).await,
        [],
        "the 1h verdict is not a minute"
    );
    assert_eq!(marks("tSOLUSD", 1).await, []);
    crate::report!("DASHBOARD | data quality | 7 table rows, 2 red and 1 amber marks on tBTCUSD");

    // (b) Prices at Bitfinex's 5 significant digits: tADAUSD's bid and ask differ in the fifth,
    // and so the spread is not zero. With `decimals: 2` both would read 0.71.
    let tick = |symbol: &str, bid: f64, ask: f64, at: i64| {
        let v = candlestream::exchange::bitfinex::message::TickerValues {
            bid,
            bid_size: 1.0,
            ask,
            ask_size: 1.0,
            daily_change: 0.0,
            daily_change_relative: 0.0,
            last_price: bid,
            volume: 10.0,
            high: ask,
            low: bid,
        };
        Record::Tick(v.into_tick(symbol.to_string(), at, None, Source::Websocket, at))
    };
    let ticker = Settings::default().influx.measurement;
    let mut lines = String::new();
    for record in [
        tick("tADAUSD", 0.71234, 0.71245, to_ms - 2 * MINUTE),
        tick("tBTCUSD", 97_123.0, 97_124.0, to_ms - 2 * MINUTE),
        // Two hours old: outside the stats' last hour, so it must not be the one shown.
        tick("tADAUSD", 0.5, 0.6, to_ms - 120 * MINUTE + 1),
    ] {
        candlestream::sink::influx::write_line(&mut lines, &ticker, &record);
    }
    write_points(&url, db, &lines).await;
    let shown = |symbol: &'static str, title: &'static str, column: &'static str| {
        let p = panel(title);
        let v = vars(&[("symbol", symbol)]);
        let (a, b) = panel_range(p, (to_ms - 3 * 60 * MINUTE, to_ms));
        let q = expand(query_of(&p["targets"][0]), p, &v, a, b);
        let decimals = p["fieldConfig"]["defaults"]["decimals"].as_u64().unwrap() as usize;
        let url = url.clone();
        async move {
            let value = f(&influxql(&url, db, &q).await.unwrap()[0].rows[0], column);
            (value, locale_text(value, decimals))
        }
    };
    let (bid, bid_text) = shown("tADAUSD", "Bid", "bid").await;
    let (ask, ask_text) = shown("tADAUSD", "Ask", "ask").await;
    let (_, spread_text) = shown("tADAUSD", "Spread", "spread").await;
    let (_, btc_text) = shown("tBTCUSD", "Bid", "bid").await;
    let (_, btc_spread) = shown("tBTCUSD", "Spread", "spread").await;
    crate::report!(
        "DASHBOARD | prices | tADAUSD bid {bid_text} ask {ask_text} spread {spread_text}; tBTCUSD bid {btc_text} spread {btc_spread}"
    );
    assert_eq!(
        (bid_text.as_str(), ask_text.as_str()),
        ("0.71234", "0.71245")
    );
    assert_eq!(spread_text, "0.00011");
    assert_eq!((btc_text.as_str(), btc_spread.as_str()), ("97,123", "1"));
    assert_eq!(
        format!("{bid:.2}"),
        format!("{ask:.2}"),
        "what decimals: 2 showed"
    );

    // (c) Crafted $symbol values from a URL (`?var-symbol=…`): with Grafana's regex escaping
    // none can end the regex, so each query stays one statement that returns nothing or fails.
    let trade = |id: i64| {
        Record::Trade(Trade {
            symbol: "tBTCUSD".into(),
            id,
            exchange_time: to_ms - MINUTE,
            amount: 0.5,
            price: 97_000.0,
            source: Source::Websocket,
            sequence: None,
            received_at: to_ms,
        })
    };
    let trades = Settings::default().influx.trades_measurement;
    let mut lines = String::new();
    for id in 1..=3 {
        candlestream::sink::influx::write_line(&mut lines, &trades, &trade(id));
    }
    lines += "canary value=1\n";
    write_points(&url, db, &lines).await;
    let count = |m: &'static str| {
        let url = url.clone();
        async move {
            statements(&url, db, &format!("SELECT count(*) FROM \"{m}\""))
                .await
                .1
                .unwrap()
        }
    };
    assert_eq!((count("trades").await, count("canary").await), (1, 1));
    let crafted = [
        "x'; DROP MEASUREMENT \"canary\"; SELECT * FROM \"trades\" WHERE symbol = 'x",
        "x/ ; DROP MEASUREMENT \"canary\" ; SELECT * FROM \"trades\" WHERE \"symbol\" =~ /x",
        // Numeric-looking: the InfluxDB datasource's own interpolation passes these verbatim,
        // which is why the queries ask for the regex format explicitly.
        "1/ ; DROP MEASUREMENT \"canary\" ; SELECT * FROM \"trades\" WHERE \"symbol\" =~ /x",
        "tBTCUSD\\",
        "\\/ ; DROP MEASUREMENT \"canary\" ; SELECT /x",
        ".*",
        "tBTCUSD|tETHUSD",
    ];
    let mut checked = 0;
    for value in crafted {
        let mut v = vars(&[("symbol", value), ("timeframe", "2m")]);
        v.insert("symbols", vec![value.to_string()]);
        // Every panel target, and the annotations (which need no panel: no $__interval).
        let queries = all
            .iter()
            .filter(|p| is_influx(p))
            .flat_map(|p| {
                p["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |t| (*p, query_of(t)))
            })
            .chain(annotations.iter().map(|a| (&Value::Null, query_of(a))));
        for (p, query) in queries {
            let q = expand(query, p, &v, from_ms, to_ms);
            let (n, result) = statements(&url, db, &q).await;
            assert!(n <= 1, "{value:?} made {n} statements: {q}");
            assert!(
                matches!(result, Ok(0) | Err(_)),
                "{value:?} matched rows: {result:?}: {q}"
            );
            checked += 1;
        }
    }
    assert_eq!((count("trades").await, count("canary").await), (1, 1));
    crate::report!(
        "DASHBOARD | crafted $symbol | {} values × every query: {checked} runs, one statement each, no rows",
        crafted.len()
    );

    // The guard is real: the same value in the old `"symbol" = '$symbol'` form, inserted
    // verbatim as Grafana does for a single value outside a regex, runs a second statement.
    let old = "SELECT last(\"bid\") FROM \"ticker\" WHERE \"symbol\" = '$symbol' AND $timeFilter";
    let q = expand(
        old,
        &Value::Null,
        &vars(&[("symbol", crafted[0])]),
        from_ms,
        to_ms,
    );
    let (n, _) = statements(&url, db, &q).await;
    assert_eq!(n, 3, "{q}");
    let left: Vec<String> = influxql(&url, db, "SHOW MEASUREMENTS")
        .await
        .unwrap()
        .iter()
        .flat_map(|s| &s.rows)
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        left,
        ["candle_checks", "ticker", "trades"],
        "canary dropped"
    );
}

// ---------------------------------------------------------------------------------------------
// Hundreds of symbols: the coin lists hold them all, and no panel asks for more than its coins.
// ---------------------------------------------------------------------------------------------

/// 300 stored symbols (the six configured ones first), each with its own price, 1000 + its
/// index. Every InfluxDB query of the candles dashboard, expanded with the dashboard's default
/// variables, returns only the default coins' data: `$symbol` for the chart and the ticker row,
/// the short list of `$symbols` for the data-quality row. All, when asked for, returns every
/// symbol with one regex.
#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_symbols_query_only_the_chosen_coins_on_influxdb_1_6() {
    let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
    let (url, db) = (influx.url(), "dashboard_hundreds");
    influx.create_database(db).await;
    let (_, dashboard) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "candles.json")
        .unwrap();
    let configured = Settings::default().bitfinex.symbols;
    let symbols: Vec<String> = configured
        .iter()
        .cloned()
        .chain((configured.len()..300).map(|i| format!("tP{i:03}USD")))
        .collect();
    let price = |k: usize| 1000.0 + k as f64;
    let to_ms = now_ms();
    let from_ms = to_ms - 60 * MINUTE;
    let at = |i: i64| (to_ms - 30 * MINUTE + i * 1000) * 1_000_000;
    let mut lines = String::new();
    for (k, s) in symbols.iter().enumerate() {
        let p = price(k);
        for (i, side) in [(0, "buy"), (1, "sell")] {
            lines += &format!(
                "trades,symbol={s},side={side} id={}i,price={p},amount=0.5 {}\n",
                k * 2 + i as usize + 1,
                at(i)
            );
        }
        lines += &format!(
            "ticker,symbol={s} bid={p},ask={p},last_price={p},daily_change_relative=0.01,volume=2 {}\n",
            at(2)
        );
        lines += &check_line(
            "s",
            "1m",
            to_ms - 20 * MINUTE,
            "differs",
            Some([p, p, p, p, 0.5]),
            Some([p, p, p, p, 0.25]),
            "d",
        )
        .replacen("symbol=s,", &format!("symbol={s},"), 1);
    }
    write_points(&url, db, &lines).await;

    // The coin lists hold every stored symbol: Grafana's picker searches them as you type.
    let vars_list = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars_list.iter().find(|v| v["name"] == name).unwrap();
    for name in ["symbol", "symbols"] {
        let listed = influxql(&url, db, var(name)["query"].as_str().unwrap())
            .await
            .unwrap()
            .iter()
            .flat_map(|s| &s.rows)
            .count();
        assert_eq!(listed, 300, "${name} lists every stored symbol");
    }

    // Defaults, as the dashboard opens.
    let default_symbol = var("symbol")["current"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let default_symbols: Vec<String> = var("symbols")["current"]["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let timeframe = var("timeframe")["current"]["value"].as_str().unwrap();
    let index = |s: &str| symbols.iter().position(|x| x == s).unwrap();
    let mut v = vars(&[("timeframe", timeframe)]);
    v.insert("symbol", vec![default_symbol.clone()]);
    v.insert("symbols", default_symbols.clone());
    let mut queried = 0;
    for panel in panels(&dashboard).into_iter().filter(|p| is_influx(p)) {
        let q = query_of(&panel["targets"][0]);
        let coins: BTreeSet<usize> = if q.contains(SYMBOLS_FILTER) {
            default_symbols.iter().map(|s| index(s)).collect()
        } else {
            BTreeSet::from([index(&default_symbol)])
        };
        let q = expand(q, panel, &v, from_ms, to_ms);
        let series = influxql(&url, db, &q)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        assert!(!series.is_empty(), "{}: no data: {q}", panel["title"]);
        for s in &series {
            if let Some(tag) = s.tags.get("symbol") {
                assert!(
                    coins.contains(&index(tag)),
                    "{}: {tag} asked for: {q}",
                    panel["title"]
                );
            }
            // Prices are 1000 + the symbol's index: any other coin's price would show.
            let values = s
                .rows
                .iter()
                .flat_map(|r| r.iter().filter(|(k, _)| *k != "time").map(|(_, v)| v));
            for x in values.filter_map(Value::as_f64) {
                if x >= 1000.0 {
                    assert!(
                        coins.iter().any(|&k| x == price(k)),
                        "{}: {x} is not the price of a chosen coin: {q}",
                        panel["title"]
                    );
                }
            }
        }
        queried += 1;
    }
    assert!(queried >= 9, "{queried} InfluxDB panels");

    // All, asked for: every symbol, with one regex.
    v.insert("symbols", vec!["$__all".to_string()]);
    let verified = panels(&dashboard)
        .into_iter()
        .find(|p| p["title"] == "Verified")
        .unwrap();
    let q = expand(
        query_of(&verified["targets"][0]),
        verified,
        &v,
        from_ms,
        to_ms,
    );
    assert!(q.contains("/^.*$/"), "{q}");
    let series = influxql(&url, db, &q).await.unwrap();
    assert_eq!(series.len(), 300, "All: every symbol");
    crate::report!(
        "DASHBOARD | 300 symbols | {queried} panels on the defaults ($symbol {default_symbol}, $symbols {} coins) | All: {} series",
        default_symbols.len(),
        series.len()
    );
}

/// The health dashboard at 300 pairs (issue 18 item 6): `$symbol` defaults to a short list, the
/// first six configured symbols as in the candles dashboard, with All (one regex) still offered,
/// and every per-symbol query takes the list as a regex; the producer's oldest-unacknowledged
/// panel sits beside the oldest-unstored one; a verifier-lag panel shows the lag per timeframe
/// with the overdue work and the round the alert compares. The queries run on a real scrape in
/// tests/operations.rs.
#[test]
fn health_dashboard_defaults_to_a_few_symbols_and_shows_stalls_and_verifier_lag() {
    use candlestream::telemetry::metric;
    let dashboard: Value = serde_json::from_str(&repo("grafana/dashboards/health.json")).unwrap();
    let symbol = &dashboard["templating"]["list"][0];
    assert_eq!(symbol["name"], "symbol");
    assert_eq!(symbol["multi"], true);
    assert_eq!(symbol["includeAll"], true, "All stays available");
    assert_eq!(symbol["allValue"], ALL_VALUE);
    let configured = Settings::default().bitfinex.symbols;
    let first_six: Vec<&str> = configured.iter().take(6).map(String::as_str).collect();
    let default: Vec<&str> = symbol["current"]["value"]
        .as_array()
        .expect("a list of symbols by default, not All")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(default, first_six);
    let panels = panels(&dashboard);
    let exprs = |p: &Value| -> Vec<String> {
        p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["expr"].as_str().unwrap().to_string())
            .collect()
    };
    for p in &panels {
        for e in exprs(p) {
            if e.contains("$symbol") {
                assert!(e.contains("symbol=~\"$symbol\""), "{e}: a list is a regex");
            }
        }
    }
    let find = |metric: &str| {
        *panels
            .iter()
            .find(|p| exprs(p).iter().any(|e| e.contains(metric)))
            .unwrap_or_else(|| panic!("no panel on {metric}"))
    };
    let unstored = find(metric::OLDEST_UNSTORED);
    let unacked = find(metric::OLDEST_UNACKED);
    assert_eq!(
        unstored["gridPos"]["y"], unacked["gridPos"]["y"],
        "side by side"
    );
    assert_eq!(
        unstored["gridPos"]["x"].as_i64().unwrap() + unstored["gridPos"]["w"].as_i64().unwrap(),
        unacked["gridPos"]["x"].as_i64().unwrap()
    );
    assert_eq!(unacked["fieldConfig"]["defaults"]["unit"], "s");
    let lag = find(metric::VERIFY_LAG);
    let lag_exprs = exprs(lag);
    assert!(
        lag_exprs
            .iter()
            .any(|e| e.contains(metric::VERIFY_LAG) && e.contains("by (timeframe)")),
        "{lag_exprs:?}"
    );
    for m in [metric::VERIFY_OVERDUE, metric::VERIFY_ROUND] {
        assert!(
            lag_exprs.iter().any(|e| e.contains(m)),
            "{m}: {lag_exprs:?}"
        );
    }
    let mut ids: Vec<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
}

/// The verifier's overdue alert, run by `promtool test rules`: at 300 pairs x 3 timeframes (a
/// round of 45 min at 20 candles requests a minute) it stays quiet through the first round after
/// a start (work overdue up to a round) and the steady state (15 min), and fires 15 min after
/// failing checks pushed the overdue work past two rounds; at 6 pairs (a round of 54 s) a 3-minute
/// InfluxDB outage lifts it to 4 rounds without firing.
#[test]
fn verify_behind_alert_fires_for_failing_checks_not_for_scale_or_a_start() {
    let doc = yaml("grafana/provisioning/alerting/candlestream.yaml");
    let rule = doc["groups"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_vec().unwrap())
        .find(|r| r["uid"].as_str() == Some("candlestream-verify-behind"))
        .expect("the verify-behind rule")
        .clone();
    let data = rule["data"].as_vec().unwrap();
    let expr = data[0]["model"]["expr"].as_str().unwrap();
    let evaluator = &data[1]["model"]["conditions"][0]["evaluator"];
    assert_eq!(evaluator["type"].as_str(), Some("gt"));
    let threshold = evaluator["params"][0].as_i64().unwrap();
    let pending = rule["for"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yml"),
        format!(
            "groups:\n  - name: verify\n    rules:\n      - alert: Behind\n        expr: '({expr}) > {threshold}'\n        for: {pending}\n"
        ),
    )
    .unwrap();
    let series = |name: &str, instance: &str, values: &str| {
        format!("      - series: '{name}{{instance=\"{instance}\"}}'\n        values: '{values}'\n")
    };
    // One sample a minute. "big": 45 min of the first round, 45 min steady, then every check
    // fails from minute 90. "small": steady at 30 s, InfluxDB down at minutes 91-93.
    let alert_at = |minute: u32, firing: bool| {
        let expected = if firing {
            "\n          - exp_labels: {instance: big}"
        } else {
            " []"
        };
        format!(
            "      - eval_time: {minute}m\n        alertname: Behind\n        exp_alerts:{expected}\n"
        )
    };
    let test = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}{}{}{}    alert_rule_test:\n{}{}{}{}{}",
        series(
            "candlestream_verify_overdue_seconds",
            "big",
            "0+60x45 900x45 900+60x120"
        ),
        series("candlestream_verify_round_seconds", "big", "2700x210"),
        series(
            "candlestream_verify_overdue_seconds",
            "small",
            "30x90 90 150 210 30x120"
        ),
        series("candlestream_verify_round_seconds", "small", "54x215"),
        // The end of the first round; the outage at small; past two rounds but pending; firing.
        alert_at(45, false),
        alert_at(93, false),
        alert_at(110, false),
        alert_at(170, false),
        alert_at(185, true),
    );
    std::fs::write(dir.path().join("test.yml"), test).unwrap();
    support::promtool(&["test", "rules", "test.yml"], dir.path());
}
