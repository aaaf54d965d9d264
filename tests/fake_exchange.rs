//! The fake exchange itself: trades channel (snapshot, `te` then `tu`, trailing seq and
//! timestamp), the ledger, and the trade and candle history endpoints, checked from a plain
//! websocket / HTTP client.

mod support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use support::fake_bitfinex::{FakeBitfinex, Trade, Trader};

/// TIMESTAMP + SEQ_ALL.
const FLAGS: u64 = 98_304;

/// `rest-trades-hist.json` of the Bitfinex fixtures: `GET /v2/trades/tBTCUSD/hist?start=1763787600000&end=1763787719999&limit=10000&sort=1`.
const FIXTURE_TRADES: &str = "[[1781554001,1763787601200,0.0125,97321],[1781554002,1763787601200,0.3,97322],\
[1781554003,1763787601200,0.0481,97323],[1781554010,1763787615077,-0.2,97310],[1781554024,1763787641002,-0.00062,97305],\
[1781554031,1763787659999,1.5,97330],[1781554039,1763787660000,-0.01,97329],[1781554040,1763787672411,-2.05031,97290],\
[1781554051,1763787698000,0.104,97301],[1781554058,1763787719500,1e-05,97299]]";
/// `rest-candles-hist.json`: `GET /v2/candles/trade:1m:tBTCUSD/hist?start=1763787600000&end=1763787719999&sort=1`.
const FIXTURE_CANDLES: &str = "[[1763787600000,97321,97330,97330,97305,2.06122],[1763787660000,97329,97299,97329,97290,2.16432]]";
const FIXTURE_START: i64 = 1_763_787_600_000;
const FIXTURE_END: i64 = 1_763_787_719_999;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn fixture_trades() -> Vec<Trade> {
    let rows: Vec<(i64, i64, f64, f64)> = serde_json::from_str(FIXTURE_TRADES).unwrap();
    rows.into_iter()
        .map(|(id, mts, amount, price)| Trade {
            symbol: "tBTCUSD".into(),
            id,
            mts,
            amount,
            price,
        })
        .collect()
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no frame within 5 s");
        match msg.expect("socket closed").expect("socket error") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(_) => panic!("closed by the exchange"),
            _ => {}
        }
    }
}

/// The next frame that is not a heartbeat.
async fn next_data(ws: &mut Ws) -> Value {
    loop {
        let v = next(ws).await;
        if v.get(1) != Some(&json!("hb")) {
            return v;
        }
    }
}

/// Every frame arriving within `window`.
async fn drain(ws: &mut Ws, window: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + window;
    let mut out = Vec::new();
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Text(t) = msg {
            out.push(serde_json::from_str(t.as_str()).unwrap());
        }
    }
    out
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// Connects and sends conf with `flags`.
async fn connect(ex: &FakeBitfinex, flags: u64) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(ex.ws_url()).await.unwrap();
    assert_eq!(next(&mut ws).await["event"], "info");
    send(&mut ws, json!({"event":"conf","flags":flags})).await;
    let conf = next(&mut ws).await;
    assert_eq!(conf["status"], "OK", "{conf}");
    ws
}

/// Subscribes and returns the channel id.
async fn subscribe(ws: &mut Ws, channel: &str, symbol: &str) -> u64 {
    send(
        ws,
        json!({"event":"subscribe","channel":channel,"symbol":symbol}),
    )
    .await;
    let ack = next_data(ws).await;
    assert_eq!(ack["event"], "subscribed", "{ack}");
    assert_eq!(ack["channel"], channel);
    assert_eq!(ack["symbol"], symbol);
    assert_eq!(ack["pair"], symbol.trim_start_matches('t'));
    ack["chanId"].as_u64().unwrap()
}

fn parse_trade(symbol: &str, v: &Value) -> Trade {
    let a = v
        .as_array()
        .unwrap_or_else(|| panic!("not a trade array: {v}"));
    Trade {
        symbol: symbol.into(),
        id: a[0].as_i64().unwrap(),
        mts: a[1].as_i64().unwrap(),
        amount: a[2].as_f64().unwrap(),
        price: a[3].as_f64().unwrap(),
    }
}

/// The `n` newest trades of `symbol` in `ledger`, newest first.
fn newest(ledger: &[Trade], symbol: &str, n: usize) -> Vec<Trade> {
    let mut v: Vec<Trade> = ledger
        .iter()
        .filter(|t| t.symbol == symbol)
        .cloned()
        .collect();
    v.sort_by_key(|t| std::cmp::Reverse((t.mts, t.id)));
    v.truncate(n);
    v
}

async fn get(ex: &FakeBitfinex, path: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("{}{path}", ex.rest_url()))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn trades_hist(ex: &FakeBitfinex, symbol: &str, query: &str) -> Vec<Trade> {
    let (status, body) = get(ex, &format!("/v2/trades/{symbol}/hist?{query}")).await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .map(|v| parse_trade(symbol, v))
        .collect()
}

async fn candles_hist(ex: &FakeBitfinex, symbol: &str, query: &str) -> Vec<Vec<f64>> {
    let (status, body) = get(ex, &format!("/v2/candles/trade:1m:{symbol}/hist?{query}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

#[tokio::test]
async fn snapshot_then_te_then_tu_with_sequence_and_timestamp() {
    let ex = FakeBitfinex::start_with(None, Duration::from_millis(300)).await;
    ex.set_snapshot_len(7);
    ex.set_tu_delay(Duration::from_millis(150));
    // Executed while nobody listens: only in the ledger.
    let before = ex.execute("tBTCUSD", 20).await;
    ex.execute("tETHUSD", 5).await;
    assert_eq!(before.len(), 20);
    assert_eq!(ex.trade_frames_sent(), (0, 0));
    assert!(
        before
            .windows(2)
            .any(|w| w[0].mts == w[1].mts && w[1].id == w[0].id + 1),
        "no taker order filled several makers in one ms: {before:?}"
    );
    assert!(before.iter().any(|t| t.amount < 0.0) && before.iter().any(|t| t.amount > 0.0));

    let mut ws = connect(&ex, FLAGS).await;
    let chan = subscribe(&mut ws, "trades", "tBTCUSD").await;
    let snap = next_data(&mut ws).await;
    let a = snap.as_array().unwrap();
    assert_eq!(a.len(), 4, "snapshot with seq and ts: {snap}");
    assert_eq!(a[0], json!(chan));
    let mut seq = a[2].as_u64().expect("seq");
    let mut ts = a[3].as_i64().expect("ts");
    let got: Vec<Trade> = a[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| parse_trade("tBTCUSD", v))
        .collect();
    assert_eq!(
        got,
        newest(&ex.ledger(), "tBTCUSD", 7),
        "snapshot: the 7 newest trades, newest first"
    );

    let ticker = subscribe(&mut ws, "ticker", "tBTCUSD").await;
    assert_ne!(ticker, chan);
    assert_eq!(ex.subscribed(), ["tBTCUSD"]);
    assert_eq!(ex.trades_subscribed(), ["tBTCUSD"]);
    send(
        &mut ws,
        json!({"event":"subscribe","channel":"trades","symbol":"tBTCUSD"}),
    )
    .await;
    let dup = next_data(&mut ws).await;
    assert_eq!(
        (
            dup["event"].as_str(),
            dup["code"].as_u64(),
            dup["channel"].as_str()
        ),
        (Some("error"), Some(10301), Some("trades"))
    );

    let live = ex.execute("tBTCUSD", 6).await;
    let tick = ex.emit("tBTCUSD").await.expect("ticker still subscribed");
    let mut te = Vec::new();
    let mut tu = Vec::new();
    let mut te_at = Vec::new();
    let mut hb = 0;
    let mut tickers = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tu.len() < live.len() || hb == 0 {
        assert!(
            Instant::now() < deadline,
            "te {te:?}, tu {tu:?}, {hb} heartbeats"
        );
        let f = next(&mut ws).await;
        let a = f
            .as_array()
            .unwrap_or_else(|| panic!("unexpected event {f}"));
        let (s, t) = (
            a[a.len() - 2].as_u64().unwrap(),
            a[a.len() - 1].as_i64().unwrap(),
        );
        assert_eq!(s, seq + 1, "connection-wide sequence without gaps: {f}");
        assert!(t > ts, "timestamps increase: {f}");
        (seq, ts) = (s, t);
        match (a[0].as_u64().unwrap(), a[1].as_str()) {
            (c, Some("te")) if c == chan => {
                te.push(parse_trade("tBTCUSD", &a[2]));
                te_at.push(Instant::now());
            }
            (c, Some("tu")) if c == chan => {
                let trade = parse_trade("tBTCUSD", &a[2]);
                let i = tu.len();
                assert_eq!(
                    Some(&trade),
                    te.get(i),
                    "tu repeats the te of the same trade"
                );
                assert!(
                    te_at[i].elapsed() >= Duration::from_millis(100),
                    "tu came too early"
                );
                tu.push(trade);
            }
            (c, Some("hb")) if c == chan => hb += 1,
            (c, Some("hb")) if c == ticker => {}
            (c, None) if c == ticker => {
                assert_eq!(a[1][6].as_f64(), Some(tick.last_price()));
                tickers += 1;
            }
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert_eq!(te, live);
    assert_eq!(tu, live);
    assert_eq!(tickers, 1);
    assert_eq!(ex.trade_frames_sent(), (6, 6));
    assert_eq!(ex.trades_sent(), live);
    assert_eq!(ex.ledger().len(), 31);
    assert!(live[0].mts >= before.last().unwrap().mts && live[0].id > before.last().unwrap().id);

    // Unsubscribing the trades channel leaves the ticker alone.
    send(&mut ws, json!({"event":"unsubscribe","chanId":chan})).await;
    assert_eq!(next_data(&mut ws).await["event"], "unsubscribed");
    assert!(ex.trades_subscribed().is_empty());
    assert_eq!(ex.subscribed(), ["tBTCUSD"]);
    ex.execute("tBTCUSD", 2).await;
    let later = drain(&mut ws, Duration::from_millis(400)).await;
    assert!(
        later
            .iter()
            .all(|f| f[0] != json!(chan) && f[1] != json!("te")),
        "{later:?}"
    );
    assert_eq!(ex.trade_frames_sent(), (6, 6));
}

#[tokio::test]
async fn trades_while_disconnected_are_in_rest_and_snapshot_only() {
    let ex = FakeBitfinex::start().await;
    ex.set_tu_delay(Duration::from_millis(400));
    let mut ws = connect(&ex, FLAGS).await;
    let chan = subscribe(&mut ws, "trades", "tBTCUSD").await;
    let snap = next_data(&mut ws).await;
    assert_eq!(snap[1], json!([]), "empty ledger, empty snapshot: {snap}");
    let first = ex.execute("tBTCUSD", 3).await;
    for t in &first {
        let f = next_data(&mut ws).await;
        assert_eq!((f[0].as_u64(), f[1].as_str()), (Some(chan), Some("te")));
        assert_eq!(&parse_trade("tBTCUSD", &f[2]), t);
    }
    // Gone before the tu is due: it is never sent.
    ex.drop_connections().await;
    assert!(ex.trades_subscribed().is_empty());
    let offline = ex.execute("tBTCUSD", 4).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ex.trade_frames_sent(), (3, 0));
    assert_eq!(ex.trades_sent(), first);

    let all: Vec<Trade> = first.iter().chain(&offline).cloned().collect();
    assert_eq!(trades_hist(&ex, "tBTCUSD", "sort=1").await, all);

    let mut ws = connect(&ex, FLAGS).await;
    let chan = subscribe(&mut ws, "trades", "tBTCUSD").await;
    let snap = next_data(&mut ws).await;
    let got: Vec<Trade> = snap[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| parse_trade("tBTCUSD", v))
        .collect();
    assert_eq!(got, newest(&all, "tBTCUSD", 30));
    assert_eq!(got.len(), 7);
    let quiet = drain(&mut ws, Duration::from_millis(300)).await;
    assert!(
        quiet.iter().all(|f| f[1] == json!("hb")),
        "no te for trades executed offline: {quiet:?}"
    );
    let one = ex.execute("tBTCUSD", 1).await;
    let f = next_data(&mut ws).await;
    assert_eq!((f[0].as_u64(), f[1].as_str()), (Some(chan), Some("te")));
    assert_eq!(parse_trade("tBTCUSD", &f[2]), one[0]);
    let f = next_data(&mut ws).await;
    assert_eq!(f[1], "tu");
    assert_eq!(ex.trade_frames_sent(), (4, 1));

    // A restart ends trades subscriptions too.
    ex.restart().await;
    assert_eq!(next_data(&mut ws).await["code"], 20051);
    assert!(ex.trades_subscribed().is_empty());
}

#[tokio::test]
async fn extra_fields_on_trade_frames_and_no_trailer_without_conf() {
    let ex = FakeBitfinex::start().await;
    ex.execute("tETHUSD", 2).await;
    let mut ws = connect(&ex, 0).await;
    let chan = subscribe(&mut ws, "trades", "tETHUSD").await;
    let snap = next_data(&mut ws).await;
    assert_eq!(
        snap.as_array().unwrap().len(),
        2,
        "no seq/ts without the flags: {snap}"
    );
    ex.set_extra_fields(true);
    let t = ex.execute("tETHUSD", 1).await;
    let f = next_data(&mut ws).await;
    let a = f.as_array().unwrap();
    assert_eq!((a[0].as_u64(), a[1].as_str()), (Some(chan), Some("te")));
    assert!(a.len() > 3, "undocumented fields after the trade: {f}");
    assert!(
        a[2].as_array().unwrap().len() > 4,
        "undocumented fields in the trade: {f}"
    );
    assert_eq!(parse_trade("tETHUSD", &a[2]), t[0]);
}

#[tokio::test]
async fn trades_hist_start_end_limit_sort_and_cap() {
    let ex = FakeBitfinex::start().await;
    let t0 = FIXTURE_START;
    let t1 = t0 + 30 * 60_000;
    let btc = ex.preload_history("tBTCUSD", t0, t1, 12_000);
    let eth = ex.preload_history("tETHUSD", t0, t1, 50);
    assert_eq!((btc.len(), eth.len()), (12_000, 50));
    assert_eq!(
        ex.ledger(),
        btc.iter().chain(&eth).cloned().collect::<Vec<_>>()
    );
    assert_eq!(ex.trade_frames_sent(), (0, 0));
    assert!(btc.iter().all(|t| (t0..=t1).contains(&t.mts)));
    assert_eq!((btc[0].mts, btc.last().unwrap().mts), (t0, t1));
    assert!(
        btc.windows(2)
            .all(|w| w[1].id > w[0].id && w[1].mts >= w[0].mts)
    );
    assert!(
        btc.windows(3).any(|w| w[0].mts == w[2].mts),
        "some order fills 3 or more makers"
    );

    let by_time = |v: &[Trade]| {
        let mut v = v.to_vec();
        v.sort_by_key(|t| (t.mts, t.id));
        v
    };
    let asc = by_time(&btc);
    let desc: Vec<Trade> = asc.iter().rev().cloned().collect();

    let default = trades_hist(&ex, "tBTCUSD", "").await;
    assert_eq!(default, desc[..125], "default: 125 newest first");
    assert_eq!(
        trades_hist(&ex, "tBTCUSD", "sort=-1&limit=3").await,
        desc[..3]
    );
    assert_eq!(
        trades_hist(&ex, "tBTCUSD", "sort=1&limit=10").await,
        asc[..10]
    );

    // start and end are inclusive.
    let (start, end) = (asc[100].mts, asc[200].mts);
    let window: Vec<Trade> = asc
        .iter()
        .filter(|t| start <= t.mts && t.mts <= end)
        .cloned()
        .collect();
    let got = trades_hist(
        &ex,
        "tBTCUSD",
        &format!("start={start}&end={end}&limit=10000&sort=1"),
    )
    .await;
    assert_eq!(got, window);
    assert_eq!((got[0].mts, got.last().unwrap().mts), (start, end));
    let got = trades_hist(&ex, "tBTCUSD", &format!("start={start}&end={end}&limit=5")).await;
    assert_eq!(
        got,
        window.iter().rev().take(5).cloned().collect::<Vec<_>>(),
        "newest of the window"
    );
    let got = trades_hist(
        &ex,
        "tBTCUSD",
        &format!("end={}&limit=10000&sort=1", start - 1),
    )
    .await;
    assert_eq!(
        got,
        asc.iter()
            .filter(|t| t.mts < start)
            .cloned()
            .collect::<Vec<_>>()
    );

    // limit is capped at 10000.
    let got = trades_hist(&ex, "tBTCUSD", "limit=50000&sort=1").await;
    assert_eq!(got, asc[..10_000]);
    assert_eq!(
        trades_hist(&ex, "tBTCUSD", "limit=50000").await.len(),
        10_000
    );
    assert_eq!(
        trades_hist(&ex, "tETHUSD", "limit=10000&sort=1").await,
        by_time(&eth)
    );
    assert!(trades_hist(&ex, "tXRPUSD", "").await.is_empty());
    assert_eq!(ex.rest_requests_by("trades"), 10);
    assert_eq!(ex.rest_requests_by("candles"), 0);
    assert_eq!(ex.rate_limited(), 0);

    // Live trading after the history gets higher ids and no earlier time.
    let live = ex.execute("tBTCUSD", 3).await;
    assert!(live[0].id > eth.last().unwrap().id && live[0].mts >= t1);
}

#[tokio::test]
async fn candles_of_the_fixture_trades() {
    let ex = FakeBitfinex::start().await;
    ex.load_ledger(fixture_trades());
    let q = format!("start={FIXTURE_START}&end={FIXTURE_END}");
    let (status, trades) = get(
        &ex,
        &format!("/v2/trades/tBTCUSD/hist?{q}&limit=10000&sort=1"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        trades,
        serde_json::from_str::<Value>(FIXTURE_TRADES).unwrap()
    );

    let expected: Vec<Vec<f64>> = serde_json::from_str(FIXTURE_CANDLES).unwrap();
    assert_eq!(
        candles_hist(&ex, "tBTCUSD", &format!("{q}&sort=1")).await,
        expected
    );
    let (_, raw) = get(
        &ex,
        &format!("/v2/candles/trade:1m:tBTCUSD/hist?{q}&sort=1"),
    )
    .await;
    assert_eq!(
        raw[1][0],
        json!(1_763_787_660_000_i64),
        "MTS is an integer: {raw}"
    );
    let newest_first: Vec<Vec<f64>> = expected.iter().rev().cloned().collect();
    assert_eq!(candles_hist(&ex, "tBTCUSD", &q).await, newest_first);
    assert_eq!(
        candles_hist(&ex, "tBTCUSD", "sort=1&limit=1").await,
        expected[..1]
    );
    assert_eq!(
        candles_hist(&ex, "tBTCUSD", "start=1763787600001").await,
        expected[1..]
    );
    assert_eq!(
        candles_hist(&ex, "tBTCUSD", "end=1763787659999").await,
        expected[..1]
    );
    assert!(candles_hist(&ex, "tETHUSD", "").await.is_empty());
    let (status, body) = get(&ex, "/v2/candles/trade:7m:tBTCUSD/hist").await;
    assert_eq!((status, &body[0]), (500, &json!("error")), "{body}");
    assert_eq!(ex.rest_requests_by("candles"), 8);
    // Wider timeframes fold the same trades, aligned to UTC: both minutes are in one hour.
    let (_, hour) = get(&ex, "/v2/candles/trade:1h:tBTCUSD/hist").await;
    let hour: Vec<Vec<f64>> = serde_json::from_value(hour).unwrap();
    let (first, last) = (&expected[0], &expected[1]);
    assert_eq!(
        hour,
        [[
            1_763_787_600_000.0,
            first[1],
            last[2],
            first[3].max(last[3]),
            first[4].min(last[4]),
            ((first[5] + last[5]) * 1e8).round() / 1e8
        ]]
    );

    // A later trade in a new minute makes a new candle; minutes without trades have none.
    ex.load_ledger(
        fixture_trades()
            .into_iter()
            .chain([Trade {
                symbol: "tBTCUSD".into(),
                id: 1_781_554_100,
                mts: 1_763_787_900_123,
                amount: -0.5,
                price: 97_250.5,
            }])
            .collect(),
    );
    let rows = candles_hist(&ex, "tBTCUSD", "sort=1").await;
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[2],
        [
            1_763_787_900_000.0,
            97_250.5,
            97_250.5,
            97_250.5,
            97_250.5,
            0.5
        ]
    );
}

#[tokio::test]
async fn every_nth_hist_request_is_refused_with_11010() {
    let ex = FakeBitfinex::start().await;
    ex.load_ledger(fixture_trades());
    ex.set_rate_limit_every(Some(3));
    let mut statuses = Vec::new();
    for i in 1..=12 {
        let path = if i % 2 == 1 {
            "/v2/trades/tBTCUSD/hist?limit=3"
        } else {
            "/v2/candles/trade:1m:tBTCUSD/hist"
        };
        let (status, body) = get(&ex, path).await;
        if i % 3 == 0 {
            assert_eq!(
                body,
                json!(["error", 11010, "ratelimit: error"]),
                "request {i}"
            );
        } else {
            assert_eq!(status, 200, "request {i}: {body}");
            assert_eq!(
                body.as_array().unwrap().len(),
                if i % 2 == 1 { 3 } else { 2 },
                "request {i}"
            );
        }
        statuses.push(status);
    }
    let refused: Vec<u16> = statuses.iter().skip(2).step_by(3).copied().collect();
    assert_eq!(refused, [429, 500, 429, 500]);
    assert_eq!(ex.rate_limited(), 4);
    assert_eq!(
        (
            ex.rest_requests_by("trades"),
            ex.rest_requests_by("candles"),
            ex.rest_requests_by("tickers")
        ),
        (6, 6, 0)
    );

    ex.set_rate_limit_every(None);
    for _ in 0..4 {
        assert_eq!(trades_hist(&ex, "tBTCUSD", "").await.len(), 10);
    }
    assert_eq!(ex.rate_limited(), 4);
    // Tickers are never refused, and counted apart.
    ex.set_rate_limit_every(Some(1));
    let (status, _) = get(&ex, "/v2/tickers?symbols=tBTCUSD").await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            ex.rest_requests_by("tickers"),
            ex.rest_requests(),
            ex.rate_limited()
        ),
        (1, 1, 4)
    );
}

#[tokio::test]
async fn override_candle_replaces_or_hides_a_minute() {
    let ex = FakeBitfinex::start().await;
    ex.load_ledger(fixture_trades());
    let expected: Vec<Vec<f64>> = serde_json::from_str(FIXTURE_CANDLES).unwrap();
    let forged = [97_400.0, 97_100.25, 97_450.5, 97_000.0, 9.125];
    ex.override_candle("tBTCUSD", 1_763_787_660_000, Some(forged));
    ex.override_candle("tETHUSD", 1_763_787_600_000, None);
    let rows = candles_hist(&ex, "tBTCUSD", "sort=1").await;
    assert_eq!(rows[0], expected[0]);
    assert_eq!(
        rows[1],
        [
            1_763_787_660_000.0,
            97_400.0,
            97_100.25,
            97_450.5,
            97_000.0,
            9.125
        ]
    );
    ex.override_candle("tBTCUSD", 1_763_787_600_000, None);
    let rows = candles_hist(&ex, "tBTCUSD", "sort=1").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], 1_763_787_660_000.0);
    // Overrides do not touch the ledger or the trades endpoint.
    assert_eq!(
        trades_hist(&ex, "tBTCUSD", "limit=10000&sort=1").await,
        fixture_trades()
    );
    assert_eq!(ex.candles("tBTCUSD").len(), 1);
}

#[tokio::test]
async fn trader_executes_rounds_from_a_background_task() {
    let ex = FakeBitfinex::start().await;
    let mut ws = connect(&ex, FLAGS).await;
    subscribe(&mut ws, "trades", "tSOLUSD").await;
    ex.wait_trades_subscribed(&["tSOLUSD"], Duration::from_secs(2))
        .await;
    let trader = Trader::start(&ex, &["tSOLUSD", "tETHUSD"], 3, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = trader.stop().await;
    let ledger = ex.ledger();
    assert_eq!(n, ledger.len());
    assert!(
        n >= 12 && n % 6 == 0,
        "{n} trades: whole rounds of 3 per symbol"
    );
    assert!(
        ledger
            .windows(2)
            .all(|w| w[1].id == w[0].id + 1 && w[1].mts >= w[0].mts)
    );
    let sol: Vec<Trade> = ledger
        .iter()
        .filter(|t| t.symbol == "tSOLUSD")
        .cloned()
        .collect();
    assert_eq!(
        ex.trades_sent(),
        sol,
        "only the subscribed symbol's trades went out"
    );
    assert!(
        sol.iter()
            .all(|t| t.price > 0.0 && t.amount != 0.0 && t.amount.is_finite())
    );
    // Every value prints and parses back exactly.
    for t in &ledger {
        let back: Vec<f64> = serde_json::from_str(&json!([t.amount, t.price]).to_string()).unwrap();
        assert_eq!(back, [t.amount, t.price]);
        assert!(
            format!("{}", t.price).len() <= 9 && format!("{}", t.amount.abs()).len() <= 12,
            "{t:?}"
        );
    }
}
