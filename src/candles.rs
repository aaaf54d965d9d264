//! The domain record that flows through the pipeline, and the 2-minute OHLC candles that
//! Grafana draws from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::exchange::bitfinex::message::TickerValues;

/// Where a tick came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TickSource {
    Websocket,
    Rest,
}

/// One ticker update, as stored in Kafka (`schemas/ticker.avsc`; field names must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    pub symbol: String,
    pub bid: f64,
    pub bid_size: f64,
    pub ask: f64,
    pub ask_size: f64,
    pub daily_change: f64,
    pub daily_change_relative: f64,
    pub last_price: f64,
    pub volume: f64,
    pub high: f64,
    pub low: f64,
    pub exchange_time: i64,
    pub sequence: Option<i64>,
    pub source: TickSource,
    pub received_at: i64,
}

impl Tick {
    pub fn new(
        symbol: String,
        v: TickerValues,
        exchange_time: i64,
        sequence: Option<i64>,
        source: TickSource,
        received_at: i64,
    ) -> Self {
        Self {
            symbol,
            bid: v.bid,
            bid_size: v.bid_size,
            ask: v.ask,
            ask_size: v.ask_size,
            daily_change: v.daily_change,
            daily_change_relative: v.daily_change_relative,
            last_price: v.last_price,
            volume: v.volume,
            high: v.high,
            low: v.low,
            exchange_time,
            sequence,
            source,
            received_at,
        }
    }
}

/// Keeps `exchange_time` strictly increasing per symbol, so two distinct updates never share an
/// InfluxDB point. Applied once, before the tick enters Kafka, so replays stay identical.
#[derive(Debug, Default)]
pub struct MonotonicClock {
    last: std::collections::HashMap<String, i64>,
}

impl MonotonicClock {
    /// Returns how many milliseconds the tick was moved forward (0 almost always).
    pub fn stamp(&mut self, tick: &mut Tick) -> i64 {
        let last = self.last.entry(tick.symbol.clone()).or_insert(i64::MIN);
        let shift = if tick.exchange_time <= *last { *last + 1 - tick.exchange_time } else { 0 };
        tick.exchange_time += shift;
        *last = tick.exchange_time;
        shift
    }
}

/// An OHLC candle of `last_price`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candle {
    pub start_ms: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
}

pub const CANDLE_WIDTH_MS: i64 = 120_000;

/// Folds ticks of one symbol into candles of `width_ms`, aligned to the epoch like InfluxQL's
/// `GROUP BY time(…)`, ordered by exchange time.
pub fn candles<'a>(ticks: impl IntoIterator<Item = &'a Tick>, width_ms: i64) -> Vec<Candle> {
    let mut ordered: Vec<&Tick> = ticks.into_iter().collect();
    ordered.sort_by_key(|t| t.exchange_time);
    let mut out: BTreeMap<i64, Candle> = BTreeMap::new();
    for t in ordered {
        let start_ms = t.exchange_time.div_euclid(width_ms) * width_ms;
        let p = t.last_price;
        out.entry(start_ms)
            .and_modify(|c| {
                c.high = c.high.max(p);
                c.low = c.low.min(p);
                c.close = p;
            })
            .or_insert(Candle { start_ms, open: p, high: p, low: p, close: p });
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(symbol: &str, t: i64, price: f64) -> Tick {
        let v = TickerValues {
            bid: price,
            bid_size: 1.0,
            ask: price,
            ask_size: 1.0,
            daily_change: 0.0,
            daily_change_relative: 0.0,
            last_price: price,
            volume: 1.0,
            high: price,
            low: price,
        };
        Tick::new(symbol.into(), v, t, None, TickSource::Websocket, t)
    }

    #[test]
    fn candles_follow_exchange_time_not_arrival_order() {
        let ticks = [tick("t", 121_000, 5.0), tick("t", 1_000, 2.0), tick("t", 119_999, 1.0), tick("t", 60_000, 9.0)];
        let c = candles(&ticks, CANDLE_WIDTH_MS);
        assert_eq!(
            c,
            vec![
                Candle { start_ms: 0, open: 2.0, high: 9.0, low: 1.0, close: 1.0 },
                Candle { start_ms: 120_000, open: 5.0, high: 5.0, low: 5.0, close: 5.0 },
            ]
        );
    }

    #[test]
    fn clock_separates_updates_in_one_millisecond_per_symbol() {
        let mut clock = MonotonicClock::default();
        let mut a = tick("tBTCUSD", 1000, 1.0);
        let mut b = tick("tBTCUSD", 1000, 2.0);
        let mut c = tick("tETHUSD", 1000, 3.0);
        let mut d = tick("tBTCUSD", 999, 4.0);
        assert_eq!(clock.stamp(&mut a), 0);
        assert_eq!(clock.stamp(&mut b), 1);
        assert_eq!(clock.stamp(&mut c), 0);
        assert_eq!(clock.stamp(&mut d), 3);
        assert_eq!((a.exchange_time, b.exchange_time, c.exchange_time, d.exchange_time), (1000, 1001, 1000, 1002));
    }
}
