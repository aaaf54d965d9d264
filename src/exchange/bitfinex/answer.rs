//! Typed answers of Bitfinex's REST API v2: tickers, and rows of the history endpoints.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::message::TICKER_FIELDS;

/// One entry of `GET /v2/tickers`: `[SYMBOL, BID, …, LOW, …]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RestTicker {
    pub symbol: String,
    pub values: Vec<Option<f64>>,
}

impl<'de> Deserialize<'de> for RestTicker {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RestTicker;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a REST ticker [SYMBOL, BID, …]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RestTicker, A::Error> {
                let symbol: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let mut values = Vec::with_capacity(TICKER_FIELDS);
                // Funding tickers carry non-numeric fields further on; keep only the numbers.
                while let Some(v) = seq.next_element::<serde_json::Value>()? {
                    values.push(v.as_f64());
                }
                Ok(RestTicker { symbol, values })
            }
        }
        deserializer.deserialize_seq(V)
    }
}

/// The answer of a REST history endpoint: rows of numbers, or Bitfinex's
/// `["error", CODE, MESSAGE]`.
#[derive(Debug, Clone, PartialEq)]
pub enum RestAnswer {
    Rows(Vec<Vec<Option<f64>>>),
    Error { code: Option<i64>, msg: String },
}

/// Bitfinex's error code for "rate limit reached".
pub const ERROR_RATE_LIMIT: i64 = 11010;

/// Parses the body of a REST history endpoint. Rows that are not arrays come back empty, so
/// that they are rejected one by one like any other malformed row.
pub fn parse_rest(body: &str) -> Result<RestAnswer, serde_json::Error> {
    use serde_json::Value;
    let items: Vec<Value> = serde_json::from_str(body)?;
    if items.first().is_some_and(|v| v == "error") {
        let code = items.get(1).and_then(Value::as_i64);
        let msg = items.get(2).map_or(String::new(), |v| {
            v.as_str().map_or(v.to_string(), str::to_string)
        });
        return Ok(RestAnswer::Error { code, msg });
    }
    let row = |v: Value| {
        v.as_array()
            .map_or(Vec::new(), |a| a.iter().map(Value::as_f64).collect())
    };
    Ok(RestAnswer::Rows(items.into_iter().map(row).collect()))
}

/// The answer of `GET /v2/conf/pub:list:pair:exchange`: every trading pair, without the `t`,
/// in one array: `[["BTCUSD","ETHUSD","TESTBTC:TESTUSD",…]]`. Returned as trading symbols
/// (`tBTCUSD`).
pub fn parse_pair_list(body: &str) -> Result<Vec<String>, serde_json::Error> {
    let lists: Vec<Vec<String>> = serde_json::from_str(body)?;
    Ok(lists
        .into_iter()
        .next()
        .unwrap_or_default()
        .into_iter()
        .map(|pair| format!("t{pair}"))
        .collect())
}

/// One row of `/v2/candles/trade:1m:{symbol}/hist`: `[MTS, OPEN, CLOSE, HIGH, LOW, VOLUME]`
/// (Bitfinex puts close before high and low).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandleValues {
    pub mts: i64,
    pub open: f64,
    pub close: f64,
    pub high: f64,
    pub low: f64,
    pub volume: f64,
}

impl CandleValues {
    pub fn from_row(row: &[Option<f64>]) -> Option<Self> {
        let v: Vec<f64> = row
            .iter()
            .take(6)
            .map(|x| x.filter(|x| x.is_finite()))
            .collect::<Option<_>>()?;
        (v.len() == 6 && v[0].fract() == 0.0).then(|| Self {
            mts: v[0] as i64,
            open: v[1],
            close: v[2],
            high: v[3],
            low: v[4],
            volume: v[5],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::bitfinex::message::{TickerValues, TradeValues};

    const REST: &str = include_str!("../../../tests/fixtures/bitfinex/rest-tickers.json");
    const TRADES_HIST: &str =
        include_str!("../../../tests/fixtures/bitfinex/rest-trades-hist.json");
    const CANDLES_HIST: &str =
        include_str!("../../../tests/fixtures/bitfinex/rest-candles-hist.json");
    const PAIRS: &str = include_str!("../../../tests/fixtures/bitfinex/rest-conf-pairs.json");

    #[test]
    fn pair_list_fixture() {
        let symbols = parse_pair_list(PAIRS).unwrap();
        assert_eq!(symbols.len(), 12);
        assert_eq!(symbols[0], "t1INCH:USD");
        assert!(symbols.contains(&"tBTCUSD".to_string()));
        assert!(symbols.contains(&"tTESTBTC:TESTUSD".to_string()));
        assert_eq!(parse_pair_list("[]").unwrap(), Vec::<String>::new());
        assert!(parse_pair_list("[\"error\", 10020, \"x\"]").is_err());
    }

    fn trade(id: i64, mts: i64, amount: f64, price: f64) -> TradeValues {
        TradeValues {
            id,
            mts,
            amount,
            price,
        }
    }

    #[test]
    fn rest_history_fixtures() {
        let RestAnswer::Rows(rows) = parse_rest(TRADES_HIST).unwrap() else {
            panic!("rows")
        };
        let trades: Vec<TradeValues> = rows
            .iter()
            .map(|r| TradeValues::from_raw(r).unwrap())
            .collect();
        assert_eq!(trades.len(), 10);
        assert_eq!(trades[0], trade(1781554001, 1763787601200, 0.0125, 97321.0));
        assert_eq!(trades[9], trade(1781554058, 1763787719500, 1e-05, 97299.0));
        assert!(
            trades
                .windows(2)
                .all(|w| (w[0].mts, w[0].id) < (w[1].mts, w[1].id)),
            "sort=1: oldest first"
        );

        let RestAnswer::Rows(rows) = parse_rest(CANDLES_HIST).unwrap() else {
            panic!("rows")
        };
        let candles: Vec<CandleValues> = rows
            .iter()
            .map(|r| CandleValues::from_row(r).unwrap())
            .collect();
        assert_eq!(
            candles[0],
            CandleValues {
                mts: 1763787600000,
                open: 97321.0,
                close: 97330.0,
                high: 97330.0,
                low: 97305.0,
                volume: 2.06122
            }
        );
        assert_eq!(candles.len(), 2);

        let cases: &[(&str, RestAnswer)] = &[
            (
                "[\"error\", 11010, \"ratelimit: error\"]",
                RestAnswer::Error {
                    code: Some(11010),
                    msg: "ratelimit: error".into(),
                },
            ),
            (
                "[\"error\", 10020, \"limit: invalid\", \"more\"]",
                RestAnswer::Error {
                    code: Some(10020),
                    msg: "limit: invalid".into(),
                },
            ),
            ("[]", RestAnswer::Rows(vec![])),
            (
                "[[1, 2], {}]",
                RestAnswer::Rows(vec![vec![Some(1.0), Some(2.0)], vec![]]),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(&parse_rest(body).unwrap(), want, "{body}");
        }
        assert!(parse_rest("<html>").is_err());
        assert!(CandleValues::from_row(&[Some(1.0), Some(2.0)]).is_none());
    }

    #[test]
    fn rest_tickers_fixture() {
        let tickers: Vec<RestTicker> = serde_json::from_str(REST).unwrap();
        let parsed: Vec<(String, f64)> = tickers
            .iter()
            .map(|t| {
                (
                    t.symbol.clone(),
                    TickerValues::from_raw(&t.values).unwrap().last_price,
                )
            })
            .collect();
        assert_eq!(
            parsed,
            [
                ("tBTCUSD".to_string(), 97321.0),
                ("tETHUSD".to_string(), 3512.5)
            ]
        );
    }
}
