//! Typed Bitfinex v2 websocket frames, and the ticker and trade arrays that the websocket and REST
//! share.
//!
//! Bitfinex appends fields to events and arrays without notice, so every parser here reads the
//! fields it knows and ignores the rest instead of rejecting the frame.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};

use crate::model::{MAX_EXCHANGE_TIME_MS, Source, Tick};

/// Info code: the server is restarting; reconnect now.
pub const INFO_RECONNECT: u32 = 20051;
/// Info code: maintenance started; pause activity until [`INFO_MAINTENANCE_END`].
pub const INFO_MAINTENANCE_START: u32 = 20060;
/// Info code: maintenance ended; unsubscribe and subscribe again.
pub const INFO_MAINTENANCE_END: u32 = 20061;

/// Error code of a subscribe Bitfinex refused, e.g. an unknown symbol:
/// `{"event":"error","msg":"symbol: invalid","code":10300,"channel":"trades","symbol":"tNOPEUSD"}`.
pub const ERROR_SUBSCRIPTION_FAILED: u32 = 10300;
/// Error code of a subscribe beyond the 25 channels of a connection:
/// `{"event":"error","msg":"subscribe: limit","code":10305,"channel":"ticker","symbol":"tBTCUSD"}`.
pub const ERROR_CHANNEL_LIMIT: u32 = 10305;

/// conf flag: add the exchange timestamp (ms) to every channel message.
pub const FLAG_TIMESTAMP: u64 = 32_768;
/// conf flag: add the connection-wide sequence number to every channel message.
pub const FLAG_SEQ_ALL: u64 = 65_536;

/// Number of documented ticker fields; Bitfinex may append more.
pub const TICKER_FIELDS: usize = 10;

/// One text frame from the server: a JSON object is an event, a JSON array a channel message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Event(Event),
    Channel(ChannelMessage),
}

impl<'de> Deserialize<'de> for Frame {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Frame;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event object or a channel array")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Frame, A::Error> {
                Event::deserialize(de::value::MapAccessDeserializer::new(map)).map(Frame::Event)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Frame, A::Error> {
                ChannelMessageVisitor.visit_seq(seq).map(Frame::Channel)
            }
        }
        // Dispatching on the JSON shape keeps serde's tagged-enum logic from reading an array
        // as an event whose tag is the channel id.
        deserializer.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// Either the welcome message (version, platform status) or a coded notice (20051, …).
    Info {
        version: Option<u32>,
        platform: Option<Platform>,
        code: Option<u32>,
        msg: Option<String>,
    },
    Conf {
        status: Option<String>,
        flags: Option<u64>,
    },
    Subscribed {
        channel: String,
        #[serde(rename = "chanId")]
        chan_id: u64,
        symbol: Option<String>,
    },
    Unsubscribed {
        #[serde(rename = "chanId")]
        chan_id: u64,
        status: Option<String>,
    },
    /// A refused request; a refused subscribe names its symbol (older servers: its pair,
    /// without the `t`). See [`ERROR_SUBSCRIPTION_FAILED`] and [`ERROR_CHANNEL_LIMIT`].
    Error {
        code: Option<u32>,
        msg: Option<String>,
        /// The refused subscribe's channel (`ticker`, `trades`); absent on older servers.
        channel: Option<String>,
        symbol: Option<String>,
        pair: Option<String>,
    },
    Pong {
        cid: Option<u64>,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Platform {
    /// 1 = operative, 0 = maintenance.
    pub status: i64,
}

/// `[CHAN_ID, PAYLOAD, SEQ?, TS_MS?, …]`
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMessage {
    pub chan_id: u64,
    pub payload: Payload,
    pub seq: Option<u64>,
    /// The frame's exchange time (`FLAG_TIMESTAMP`); an error when it is a number but no time
    /// that can be stored, and the update that carries it is rejected.
    pub timestamp_ms: Option<Result<i64, TimeOutOfRange>>,
}

/// An exchange time that is not in 1 ..= [`MAX_EXCHANGE_TIME_MS`] ms since the epoch, as sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("exchange time {0} is not a time from 1970 to 2262 in ms (what InfluxDB can store)")]
pub struct TimeOutOfRange(pub String);

/// `ms` as an exchange time, or why it cannot be one.
fn exchange_time(ms: Option<i64>, sent: impl fmt::Display) -> Result<i64, TimeOutOfRange> {
    ms.filter(|ms| (1..=MAX_EXCHANGE_TIME_MS).contains(ms))
        .ok_or_else(|| TimeOutOfRange(sent.to_string()))
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Heartbeat,
    /// Raw ticker values; validated by [`TickerValues::from_raw`] so that one bad update is
    /// rejected on its own instead of failing the whole frame.
    Ticker(Vec<Option<f64>>),
    /// Trades snapshot sent on subscribe: the most recent trades, newest first. Each entry is
    /// validated on its own.
    Trades(Vec<TradeEntry>),
    /// `te`: a trade, sent the moment it executed.
    TradeExecuted(TradeEntry),
    /// `tu`: the same trade again, 1–2 s later.
    TradeUpdated(TradeEntry),
    /// A string payload we do not handle.
    Other(String),
}

/// One `[ID, MTS, AMOUNT, PRICE, …]` array, or why it is not a usable trade.
pub type TradeEntry = Result<TradeValues, TradeError>;

/// The four documented trade values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TradeValues {
    pub id: i64,
    pub mts: i64,
    /// Positive for a buy, negative for a sell.
    pub amount: f64,
    pub price: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TradeError {
    #[error("trade is not an array")]
    NotAnArray,
    #[error("trade has {0} values, expected at least 4 (ID, MTS, AMOUNT, PRICE)")]
    TooShort(usize),
    #[error("trade value #{0} is null, not a number, or not an integer where one is due")]
    Invalid(usize),
    #[error("trade MTS: {0}")]
    Time(#[from] TimeOutOfRange),
}

/// Largest integer an f64 holds exactly; ids and times beyond it would be silently rounded.
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;

impl TradeValues {
    /// Validates the leading four values of a websocket trade or a `/v2/trades/…/hist` row;
    /// extra trailing values are ignored.
    pub fn from_raw(raw: &[Option<f64>]) -> TradeEntry {
        if raw.len() < 4 {
            return Err(TradeError::TooShort(raw.len()));
        }
        let number = |i: usize| {
            raw[i]
                .filter(|x| x.is_finite())
                .ok_or(TradeError::Invalid(i))
        };
        let integer = |i: usize| {
            number(i).and_then(|x| {
                if x.fract() == 0.0 && x > 0.0 && x < MAX_EXACT_INT {
                    Ok(x as i64)
                } else {
                    Err(TradeError::Invalid(i))
                }
            })
        };
        let price = number(3)?;
        if price <= 0.0 {
            return Err(TradeError::Invalid(3));
        }
        let mts = integer(1)?;
        Ok(Self {
            id: integer(0)?,
            mts: exchange_time(Some(mts), mts)?,
            amount: number(2)?,
            price,
        })
    }
}

impl<'de> Deserialize<'de> for ChannelMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(ChannelMessageVisitor)
    }
}

struct ChannelMessageVisitor;

impl<'de> Visitor<'de> for ChannelMessageVisitor {
    type Value = ChannelMessage;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Bitfinex channel message [CHAN_ID, PAYLOAD, SEQ?, TS?]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let chan_id: u64 = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let payload: RawPayload = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        let payload = match payload {
            RawPayload::Heartbeat => Payload::Heartbeat,
            // `[CHAN, "te", [ID, MTS, AMOUNT, PRICE], SEQ?, TS?]`: the trade comes before the trailer.
            RawPayload::TradeExecuted => Payload::TradeExecuted(next_trade(&mut seq, &self)?),
            RawPayload::TradeUpdated => Payload::TradeUpdated(next_trade(&mut seq, &self)?),
            RawPayload::Other(s) => Payload::Other(s),
            // A snapshot is an array of arrays, a ticker an array of numbers that may grow
            // nested fields at its end.
            RawPayload::Values(v) if v.is_empty() || matches!(v[0], Elem::Array(_)) => {
                Payload::Trades(
                    v.into_iter()
                        .map(|e| match e {
                            Elem::Array(a) => TradeValues::from_raw(a.values()),
                            Elem::Number(_) => Err(TradeError::NotAnArray),
                        })
                        .collect(),
                )
            }
            RawPayload::Values(v) => Payload::Ticker(
                v.into_iter()
                    .map(|e| match e {
                        Elem::Number(n) => n,
                        Elem::Array(_) => None,
                    })
                    .collect(),
            ),
        };
        // Other channels put more arrays here, so read loosely and keep only numbers.
        let seq_no = seq
            .next_element::<serde_json::Value>()?
            .and_then(|v| v.as_u64());
        let timestamp_ms = match seq.next_element::<serde_json::Value>()? {
            Some(serde_json::Value::Number(n)) => Some(exchange_time(n.as_i64(), n)),
            _ => None,
        };
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(ChannelMessage {
            chan_id,
            payload,
            seq: seq_no,
            timestamp_ms,
        })
    }
}

/// The trade after `"te"` or `"tu"`.
fn next_trade<'de, A: SeqAccess<'de>>(
    seq: &mut A,
    expected: &ChannelMessageVisitor,
) -> Result<TradeEntry, A::Error> {
    match seq.next_element::<Elem>()? {
        Some(Elem::Array(a)) => Ok(TradeValues::from_raw(a.values())),
        Some(Elem::Number(_)) => Ok(Err(TradeError::NotAnArray)),
        None => Err(de::Error::invalid_length(2, expected)),
    }
}

/// The second element of a channel message: a string (`"hb"`, `"te"`, `"tu"`, or one not
/// handled here) or an array (ticker values or a trades snapshot).
/// Why a visitor and not `#[serde(untagged)]`: serde buffers an untagged enum's input into an
/// intermediate tree before trying each variant, and the string variant allocated; both showed
/// in the producer's profile, on every `te` and `tu` (see the README's benchmark notes).
enum RawPayload {
    Heartbeat,
    TradeExecuted,
    TradeUpdated,
    Other(String),
    Values(Vec<Elem>),
}

impl<'de> Deserialize<'de> for RawPayload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawPayload;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a channel payload: a string or an array")
            }
            fn visit_str<E>(self, s: &str) -> Result<RawPayload, E> {
                Ok(match s {
                    "hb" => RawPayload::Heartbeat,
                    "te" => RawPayload::TradeExecuted,
                    "tu" => RawPayload::TradeUpdated,
                    other => RawPayload::Other(other.to_string()),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawPayload, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(TICKER_FIELDS));
                while let Some(e) = seq.next_element::<Elem>()? {
                    values.push(e);
                }
                Ok(RawPayload::Values(values))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A trade array `[ID, MTS, AMOUNT, PRICE, …]`, read without a heap allocation: its four leading
/// values and how many values it has.
struct TradeArray {
    leading: [Option<f64>; 4],
    len: usize,
}

impl TradeArray {
    /// The leading values, as many as the array has (up to four): what
    /// [`TradeValues::from_raw`] reads.
    fn values(&self) -> &[Option<f64>] {
        &self.leading[..self.len.min(4)]
    }
}

/// One element of a payload array: a number (ticker value) or an array of numbers (a trade).
/// Anything else (null, text, objects, arrays nested deeper, which a future API version might
/// append) reads as `None` instead of failing the whole frame.
enum Elem {
    Number(Option<f64>),
    Array(TradeArray),
}

impl<'de> Deserialize<'de> for Elem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Elem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Elem, A::Error> {
                let mut a = TradeArray {
                    leading: [None; 4],
                    len: 0,
                };
                // Values beyond the fourth (Bitfinex may append some) are read and dropped; a
                // nested array reads as None.
                while let Some(e) = seq.next_element::<Elem>()? {
                    if let (Some(slot), Elem::Number(n)) = (a.leading.get_mut(a.len), e) {
                        *slot = n;
                    }
                    a.len += 1;
                }
                Ok(Elem::Array(a))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Elem, E> {
                Ok(Elem::Number(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Elem, E> {
                Ok(Elem::Number(Some(v as f64)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Elem, E> {
                Ok(Elem::Number(Some(v as f64)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Elem, E> {
                Ok(Elem::Number(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Elem, E> {
                Ok(Elem::Number(None))
            }
            fn visit_unit<E>(self) -> Result<Elem, E> {
                Ok(Elem::Number(None))
            }
            fn visit_none<E>(self) -> Result<Elem, E> {
                Ok(Elem::Number(None))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Elem, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Elem::Number(None))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The ten documented ticker values, all present.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TickerValues {
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
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TickerError {
    #[error("ticker has {0} values, expected at least {TICKER_FIELDS}")]
    TooShort(usize),
    #[error("ticker value #{0} is null or not a number")]
    Missing(usize),
    #[error("ticker timestamp: {0}")]
    Time(#[from] TimeOutOfRange),
}

impl TickerValues {
    /// Validates the leading ten values; extra trailing values are ignored.
    pub fn from_raw(raw: &[Option<f64>]) -> Result<Self, TickerError> {
        if raw.len() < TICKER_FIELDS {
            return Err(TickerError::TooShort(raw.len()));
        }
        let mut v = [0.0; TICKER_FIELDS];
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = raw[i]
                .filter(|x| x.is_finite())
                .ok_or(TickerError::Missing(i))?;
        }
        Ok(Self {
            bid: v[0],
            bid_size: v[1],
            ask: v[2],
            ask_size: v[3],
            daily_change: v[4],
            daily_change_relative: v[5],
            last_price: v[6],
            volume: v[7],
            high: v[8],
            low: v[9],
        })
    }
}

impl TickerValues {
    /// The pipeline's record of these values.
    pub fn into_tick(
        self,
        symbol: String,
        exchange_time: i64,
        sequence: Option<i64>,
        source: Source,
        received_at: i64,
    ) -> Tick {
        Tick {
            symbol,
            bid: self.bid,
            bid_size: self.bid_size,
            ask: self.ask,
            ask_size: self.ask_size,
            daily_change: self.daily_change,
            daily_change_relative: self.daily_change_relative,
            last_price: self.last_price,
            volume: self.volume,
            high: self.high,
            low: self.low,
            exchange_time,
            sequence,
            source,
            received_at,
        }
    }
}

/// Parses one text frame. Never panics; any error is returned for the caller to log and count.
pub fn parse_frame(text: &str) -> Result<Frame, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = include_str!("../../../tests/fixtures/bitfinex/ws-ticker-session.jsonl");
    const ODD: &str = include_str!("../../../tests/fixtures/bitfinex/ws-odd-frames.jsonl");

    /// What a client should make of a frame.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Hello {
            status: i64,
        },
        Info(u32),
        ConfOk,
        Subscribed(u64, &'static str),
        ErrorEvent(u32),
        Pong,
        UnknownEvent,
        /// A valid ticker: chan, last price, seq, ts.
        Ticker(u64, f64, Option<u64>, Option<i64>),
        /// An update whose values must be rejected while the connection lives on.
        RejectedTicker(u64),
        /// A trades snapshot: chan, ids of the valid trades in frame order, rejected entries.
        Snapshot(u64, Vec<i64>, usize),
        /// `te`/`tu`: chan, trade, seq, ts.
        Te(u64, TradeValues, Option<u64>, Option<i64>),
        Tu(u64, TradeValues, Option<u64>, Option<i64>),
        RejectedTrade(u64),
        Heartbeat(u64, Option<u64>),
        Unparseable,
    }
    use Outcome::*;

    fn outcome(text: &str) -> Outcome {
        let Ok(frame) = parse_frame(text) else {
            return Unparseable;
        };
        match frame {
            Frame::Event(Event::Info { code: Some(c), .. }) => Info(c),
            Frame::Event(Event::Info { platform, .. }) => Hello {
                status: platform.map_or(-1, |p| p.status),
            },
            Frame::Event(Event::Conf { status, .. }) if status.as_deref() == Some("OK") => ConfOk,
            Frame::Event(Event::Subscribed {
                chan_id, symbol, ..
            }) => Subscribed(
                chan_id,
                symbol.map_or("", |s| Box::leak(s.into_boxed_str())),
            ),
            Frame::Event(Event::Error { code, .. }) => ErrorEvent(code.unwrap_or(0)),
            Frame::Event(Event::Pong { .. }) => Pong,
            Frame::Event(_) => UnknownEvent,
            Frame::Channel(m) => match m.payload {
                Payload::Heartbeat => Heartbeat(m.chan_id, m.seq),
                Payload::Ticker(raw) => match (TickerValues::from_raw(&raw), m.timestamp_ms) {
                    (Ok(v), ts @ (None | Some(Ok(_)))) => {
                        Ticker(m.chan_id, v.last_price, m.seq, ts.map(Result::unwrap))
                    }
                    _ => RejectedTicker(m.chan_id),
                },
                Payload::Other(_) => UnknownEvent,
                Payload::Trades(entries) => Snapshot(
                    m.chan_id,
                    entries
                        .iter()
                        .filter_map(|e| e.as_ref().ok().map(|t| t.id))
                        .collect(),
                    entries.iter().filter(|e| e.is_err()).count(),
                ),
                Payload::TradeExecuted(Ok(t)) => {
                    Te(m.chan_id, t, m.seq, m.timestamp_ms.and_then(Result::ok))
                }
                Payload::TradeUpdated(Ok(t)) => {
                    Tu(m.chan_id, t, m.seq, m.timestamp_ms.and_then(Result::ok))
                }
                Payload::TradeExecuted(Err(_)) | Payload::TradeUpdated(Err(_)) => {
                    RejectedTrade(m.chan_id)
                }
            },
        }
    }

    fn trade(id: i64, mts: i64, amount: f64, price: f64) -> TradeValues {
        TradeValues {
            id,
            mts,
            amount,
            price,
        }
    }

    /// The `frame` (or `raw`) text of every line whose `dir` is not "out".
    fn server_frames(jsonl: &str) -> Vec<String> {
        jsonl
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["dir"] != "out")
            .map(|v| match v.get("raw") {
                Some(raw) => raw.as_str().unwrap().to_string(),
                None => v["frame"].to_string(),
            })
            .collect()
    }

    #[test]
    fn fixture_session_frames() {
        let expected = [
            Hello { status: 1 },
            ConfOk,
            Subscribed(224555, "tBTCUSD"),
            Subscribed(224556, "tETHUSD"),
            Ticker(224555, 97321.0, Some(1), Some(1763787600123)),
            Ticker(224556, 3512.5, Some(2), Some(1763787600140)),
            Ticker(224555, 97331.0, Some(3), Some(1763787601377)),
            Heartbeat(224556, Some(4)),
            // A trailing null the docs do not list yet: ignored, update kept.
            Ticker(224555, 97302.0, Some(5), Some(1763787616002)),
            Info(INFO_MAINTENANCE_START),
            Info(INFO_MAINTENANCE_END),
            Info(INFO_RECONNECT),
        ];
        let got: Vec<Outcome> = server_frames(SESSION).iter().map(|f| outcome(f)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn fixture_odd_frames() {
        let expected = [
            ErrorEvent(10301),
            ErrorEvent(10305),
            ErrorEvent(10300),
            UnknownEvent,
            Pong,
            Ticker(999999, 1.0, Some(9), Some(1763787600999)),
            RejectedTicker(224555),
            RejectedTicker(224555),
            Heartbeat(224555, None),
            Ticker(224555, 97321.0, None, None),
            Unparseable,
            Unparseable,
        ];
        let got: Vec<Outcome> = server_frames(ODD).iter().map(|f| outcome(f)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn own_malformed_and_extended_frames() {
        let cases: &[(&str, Outcome)] = &[
            ("[]", Unparseable),
            ("[224555]", Unparseable),
            ("[\"hb\", 224555]", Unparseable),
            ("[-1, \"hb\"]", Unparseable),
            ("{}", Unparseable),
            ("{\"event\": 5}", Unparseable),
            ("null", Unparseable),
            ("[1, [1,2,3,4,5,6,7,8,9]]", RejectedTicker(1)),
            ("[1, [1,2,3,4,5,6,7,\"x\",9,10]]", RejectedTicker(1)),
            (
                "[1, [1,2,3,4,5,6,7,8,9,10,\"new\",[1],{\"k\":true}]]",
                Ticker(1, 7.0, None, None),
            ),
            ("[1, [1,2,3,4,5,6,7,8,9,1e400]]", Unparseable),
            // Fields appended anywhere are ignored.
            (
                "[1, [1,2,3,4,5,6,7,8,9,10,11,12], 7, 1700000000000, \"new\", {\"x\":1}]",
                Ticker(1, 7.0, Some(7), Some(1700000000000)),
            ),
            ("[1, \"hb\", 8, 1700000000000, 99]", Heartbeat(1, Some(8))),
            (
                "{\"event\":\"info\",\"code\":20051,\"msg\":\"x\",\"newField\":[1]}",
                Info(INFO_RECONNECT),
            ),
            (
                "{\"event\":\"subscribed\",\"channel\":\"ticker\",\"chanId\":5,\"symbol\":\"tBTCUSD\",\"pair\":\"BTCUSD\",\"extra\":true}",
                Subscribed(5, "tBTCUSD"),
            ),
            ("{\"event\":\"error\",\"msg\":\"no code\"}", ErrorEvent(0)),
            // A frame timestamp that is no storable time rejects its ticker update (past 2262,
            // beyond i64, negative); a trade's MTS likewise rejects its trade.
            (
                "[1, [1,2,3,4,5,6,7,8,9,10], 7, 9223372036854]",
                RejectedTicker(1),
            ),
            (
                "[1, [1,2,3,4,5,6,7,8,9,10], 7, 9223372036853]",
                Ticker(1, 7.0, Some(7), Some(MAX_EXCHANGE_TIME_MS)),
            ),
            (
                "[1, [1,2,3,4,5,6,7,8,9,10], 7, 18446744073709551615]",
                RejectedTicker(1),
            ),
            ("[1, [1,2,3,4,5,6,7,8,9,10], 7, -1]", RejectedTicker(1)),
            (
                "[1, \"te\", [5, 9007199254740991, 1, 2], 7, 1700000000000]",
                RejectedTrade(1),
            ),
            (
                "[1, \"te\", [5, 9223372036854, 1, 2], 7, 1700000000000]",
                RejectedTrade(1),
            ),
            (
                "[1, \"te\", [5, 9223372036853, 1, 2], 7, 1700000000000]",
                Te(
                    1,
                    trade(5, MAX_EXCHANGE_TIME_MS, 1.0, 2.0),
                    Some(7),
                    Some(1700000000000),
                ),
            ),
            (
                "[1, [[5, 1700000000000, 1, 2], [6, 9223372036854, 1, 2]]]",
                Snapshot(1, vec![5], 1),
            ),
            // A ticker that grew a nested field is still a ticker, not a snapshot.
            (
                "[1, [1,2,3,4,5,6,7,8,9,10,[11,12]]]",
                Ticker(1, 7.0, None, None),
            ),
        ];
        for (frame, want) in cases {
            assert_eq!(&outcome(frame), want, "frame {frame}");
        }
    }

    #[test]
    fn refused_subscribes_name_their_symbol() {
        let cases = [
            (
                r#"{"event":"error","msg":"symbol: invalid","code":10300,"channel":"trades","symbol":"tNOPEUSD"}"#,
                ERROR_SUBSCRIPTION_FAILED,
                Some("trades"),
                Some("tNOPEUSD"),
                None,
            ),
            (
                r#"{"event":"error","msg":"symbol: invalid","code":10300,"pair":"NOPEUSD"}"#,
                ERROR_SUBSCRIPTION_FAILED,
                None,
                None,
                Some("NOPEUSD"),
            ),
            (
                r#"{"event":"error","msg":"subscribe: limit","code":10305,"channel":"ticker","symbol":"tBTCUSD"}"#,
                ERROR_CHANNEL_LIMIT,
                Some("ticker"),
                Some("tBTCUSD"),
                None,
            ),
        ];
        for (text, want_code, want_channel, want_symbol, want_pair) in cases {
            let Ok(Frame::Event(Event::Error {
                code,
                channel,
                symbol,
                pair,
                ..
            })) = parse_frame(text)
            else {
                panic!("{text}: an error event");
            };
            assert_eq!(code, Some(want_code), "{text}");
            assert_eq!(channel.as_deref(), want_channel, "{text}");
            assert_eq!(symbol.as_deref(), want_symbol, "{text}");
            assert_eq!(pair.as_deref(), want_pair, "{text}");
        }
    }

    const TRADES: &str = include_str!("../../../tests/fixtures/bitfinex/ws-trades-session.jsonl");
    #[test]
    fn fixture_trades_session_frames() {
        let c = 553311;
        let expected = [
            Hello { status: 1 },
            ConfOk,
            Subscribed(c, "tBTCUSD"),
            // Newest first, as Bitfinex sends it; three trades share 1763787601200.
            Snapshot(c, vec![1781554010, 1781554003, 1781554002, 1781554001], 0),
            Te(
                c,
                trade(1781554024, 1763787641002, -0.00062, 97305.0),
                Some(2),
                Some(1763787641003),
            ),
            Tu(
                c,
                trade(1781554024, 1763787641002, -0.00062, 97305.0),
                Some(3),
                Some(1763787642302),
            ),
            Te(
                c,
                trade(1781554031, 1763787659999, 1.5, 97330.0),
                Some(4),
                Some(1763787660000),
            ),
            Heartbeat(c, Some(5)),
            Tu(
                c,
                trade(1781554031, 1763787659999, 1.5, 97330.0),
                Some(6),
                Some(1763787661299),
            ),
            Te(
                c,
                trade(1781554039, 1763787660000, -0.01, 97329.0),
                Some(7),
                Some(1763787660001),
            ),
            Tu(
                c,
                trade(1781554039, 1763787660000, -0.01, 97329.0),
                Some(8),
                Some(1763787661300),
            ),
            Te(
                c,
                trade(1781554040, 1763787672411, -2.05031, 97290.0),
                Some(9),
                Some(1763787672412),
            ),
            Tu(
                c,
                trade(1781554040, 1763787672411, -2.05031, 97290.0),
                Some(10),
                Some(1763787673711),
            ),
            Te(
                c,
                trade(1781554051, 1763787698000, 0.104, 97301.0),
                Some(11),
                Some(1763787698001),
            ),
            Tu(
                c,
                trade(1781554051, 1763787698000, 0.104, 97301.0),
                Some(12),
                Some(1763787699300),
            ),
            Te(
                c,
                trade(1781554058, 1763787719500, 1e-05, 97299.0),
                Some(13),
                Some(1763787719501),
            ),
            Tu(
                c,
                trade(1781554058, 1763787719500, 1e-05, 97299.0),
                Some(14),
                Some(1763787720800),
            ),
        ];
        let got: Vec<Outcome> = server_frames(TRADES).iter().map(|f| outcome(f)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn own_trade_frames() {
        let t = trade(5, 1700000000000, -0.5, 97000.5);
        let cases: &[(&str, Outcome)] = &[
            // Without conf flags: no seq, no timestamp.
            (
                "[2, \"te\", [5, 1700000000000, -0.5, 97000.5]]",
                Te(2, t, None, None),
            ),
            (
                "[2, \"tu\", [5, 1700000000000, -0.5, 97000.5]]",
                Tu(2, t, None, None),
            ),
            // Trailing fields anywhere: in the trade, after the trailer.
            (
                "[2, \"te\", [5, 1700000000000, -0.5, 97000.5, null, \"x\", [1]], 9, 1700000000001, {\"n\":1}]",
                Te(2, t, Some(9), Some(1700000000001)),
            ),
            (
                "[2, [[5, 1700000000000, -0.5, 97000.5, 7], [4, 1700000000000, 1, 2, [3]]], 3, 1700000000002, \"new\"]",
                Snapshot(2, vec![5, 4], 0),
            ),
            // An empty snapshot: no recent trades.
            ("[2, []]", Snapshot(2, vec![], 0)),
            // Bad entries are rejected one by one; the rest of the snapshot stands.
            (
                "[2, [[5, 1700000000000, -0.5, 97000.5], [6, null, 1, 2], [7, 1700000000000, 1], [1.5, 1700000000000, 1, 2], [8, 1700000000000, 1, -2]]]",
                Snapshot(2, vec![5], 4),
            ),
            (
                "[2, [[5, 1700000000000, -0.5, 97000.5], 17]]",
                Snapshot(2, vec![5], 1),
            ),
            (
                "[2, \"te\", [5, 1700000000000, \"0.5\", 97000.5]]",
                RejectedTrade(2),
            ),
            ("[2, \"te\", [5, 1700000000000]]", RejectedTrade(2)),
            ("[2, \"te\", 5]", RejectedTrade(2)),
            ("[2, \"te\", {\"id\": 5}]", RejectedTrade(2)),
            ("[2, \"tu\", [5, [1700000000000], 1, 2]]", RejectedTrade(2)),
            ("[2, \"te\", [1e20, 1700000000000, 1, 2]]", RejectedTrade(2)),
            ("[2, \"te\"]", Unparseable),
            ("[2, \"te\", [5, 1700000000000, 1, 2]", Unparseable),
        ];
        for (frame, want) in cases {
            assert_eq!(&outcome(frame), want, "frame {frame}");
        }
    }
}
