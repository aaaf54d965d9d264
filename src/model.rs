//! The pipeline's record model: ticker updates and trades as they travel through Kafka into
//! InfluxDB, and the OHLCV candles that trades make. It depends on no stage: each exchange
//! converts its own frames into these types.

use serde::{Deserialize, Serialize};

/// The wall clock in milliseconds since the epoch, the unit of every record's times.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Websocket,
    Rest,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Websocket => "websocket",
            Source::Rest => "rest",
        }
    }
}

/// The latest exchange time (ms since the epoch) taken from Bitfinex: an MTS or frame timestamp
/// past it is rejected as malformed. Why this bound: InfluxDB keeps times as i64 nanoseconds, and
/// a trade's point is its MTS x 10^6 plus up to 999 999 ns (see `sink::influx`), so this is the
/// last millisecond all of whose nanoseconds fit in an i64 (April 2262). A later time cannot be
/// stored, and multiplying it out would overflow.
pub const MAX_EXCHANGE_TIME_MS: i64 = i64::MAX / 1_000_000 - 1;

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
    pub source: Source,
    pub received_at: i64,
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
        let shift = if tick.exchange_time <= *last {
            *last + 1 - tick.exchange_time
        } else {
            0
        };
        tick.exchange_time += shift;
        *last = tick.exchange_time;
        shift
    }
}

/// One executed trade, as stored in Kafka (`schemas/trade.avsc`; field names must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trade {
    pub symbol: String,
    /// Bitfinex's trade id: unique, increasing in execution order.
    pub id: i64,
    /// MTS, when the exchange executed the trade.
    pub exchange_time: i64,
    /// Signed as the exchange sends it: positive buys, negative sells.
    pub amount: f64,
    pub price: f64,
    pub source: Source,
    pub sequence: Option<i64>,
    pub received_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
}

impl Trade {
    /// The taker's side: Bitfinex signs the amount, negative for a sell.
    pub fn side(&self) -> Side {
        if self.amount.is_sign_negative() {
            Side::Sell
        } else {
            Side::Buy
        }
    }
}

/// The record types of the pipeline. Each has its own topic, schema and measurement and shares
/// everything else: codec, producer, consumer and sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    Tick,
    Trade,
}

impl RecordKind {
    pub const ALL: [RecordKind; 2] = [RecordKind::Tick, RecordKind::Trade];

    /// Label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            RecordKind::Tick => "ticker",
            RecordKind::Trade => "trade",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Tick(Tick),
    Trade(Trade),
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Tick(_) => RecordKind::Tick,
            Record::Trade(_) => RecordKind::Trade,
        }
    }

    /// The Kafka key: a coin stays on one partition.
    pub fn symbol(&self) -> &str {
        match self {
            Record::Tick(t) => &t.symbol,
            Record::Trade(t) => &t.symbol,
        }
    }

    pub fn exchange_time(&self) -> i64 {
        match self {
            Record::Tick(t) => t.exchange_time,
            Record::Trade(t) => t.exchange_time,
        }
    }

    pub fn received_at(&self) -> i64 {
        match self {
            Record::Tick(t) => t.received_at,
            Record::Trade(t) => t.received_at,
        }
    }
}

/// An OHLCV candle of trades, as Bitfinex's `trade:1m` candles define it: open and close are the
/// first and last trade in execution order, volume the sum of absolute amounts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candle {
    pub start_ms: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(symbol: &str, t: i64, price: f64) -> Tick {
        Tick {
            symbol: symbol.into(),
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
            exchange_time: t,
            sequence: None,
            source: Source::Websocket,
            received_at: t,
        }
    }

    fn trade(id: i64, t: i64, amount: f64, price: f64) -> Trade {
        Trade {
            symbol: "t".into(),
            id,
            exchange_time: t,
            amount,
            price,
            source: Source::Rest,
            sequence: None,
            received_at: t,
        }
    }

    #[test]
    fn side_follows_the_sign_of_the_amount() {
        assert_eq!(trade(1, 0, 0.1, 1.0).side(), Side::Buy);
        assert_eq!(trade(1, 0, -0.1, 1.0).side(), Side::Sell);
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
        assert_eq!(
            (
                a.exchange_time,
                b.exchange_time,
                c.exchange_time,
                d.exchange_time
            ),
            (1000, 1001, 1000, 1002)
        );
    }
}
