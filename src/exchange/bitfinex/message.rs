//! Typed Bitfinex v2 websocket frames.
//!
//! Bitfinex appends fields to events and arrays without notice, so every parser here reads the
//! fields it knows and ignores the rest instead of rejecting the frame.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

/// Info code: the server is restarting; reconnect now.
pub const INFO_RECONNECT: u32 = 20051;
/// Info code: maintenance started; pause activity until [`INFO_MAINTENANCE_END`].
pub const INFO_MAINTENANCE_START: u32 = 20060;
/// Info code: maintenance ended; unsubscribe and subscribe again.
pub const INFO_MAINTENANCE_END: u32 = 20061;

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
    Error {
        code: Option<u32>,
        msg: Option<String>,
        symbol: Option<String>,
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
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Heartbeat,
    /// Raw ticker values; validated by [`TickerValues::from_raw`] so that one bad update is
    /// rejected on its own instead of failing the whole frame.
    Ticker(Vec<Option<f64>>),
    /// A string payload we do not handle (for example trade-channel "te"/"tu").
    Other(String),
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
        // Other channels put more arrays here, so read loosely and keep only numbers.
        let seq_no = seq.next_element::<serde_json::Value>()?.and_then(|v| v.as_u64());
        let timestamp_ms = seq.next_element::<serde_json::Value>()?.and_then(|v| v.as_i64());
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        let payload = match payload {
            RawPayload::Text(s) if s == "hb" => Payload::Heartbeat,
            RawPayload::Text(s) => Payload::Other(s),
            RawPayload::Values(v) => Payload::Ticker(v.into_iter().map(|l| l.0).collect()),
        };
        Ok(ChannelMessage { chan_id, payload, seq: seq_no, timestamp_ms })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPayload {
    Text(String),
    Values(Vec<Loose>),
}

/// One array element read as a number if it is one. Anything else (null, text, nested arrays a
/// future API version might append) becomes `None` instead of failing the whole frame.
struct Loose(Option<f64>);

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Loose, E> {
                Ok(Loose(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose(Some(v as f64)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose(Some(v as f64)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Loose, E> {
                Ok(Loose(None))
            }
            fn visit_unit<E>(self) -> Result<Loose, E> {
                Ok(Loose(None))
            }
            fn visit_none<E>(self) -> Result<Loose, E> {
                Ok(Loose(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
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
}

impl TickerValues {
    /// Validates the leading ten values; extra trailing values are ignored.
    pub fn from_raw(raw: &[Option<f64>]) -> Result<Self, TickerError> {
        if raw.len() < TICKER_FIELDS {
            return Err(TickerError::TooShort(raw.len()));
        }
        let mut v = [0.0; TICKER_FIELDS];
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = raw[i].filter(|x| x.is_finite()).ok_or(TickerError::Missing(i))?;
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
                let symbol: String =
                    seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
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

/// Parses one text frame. Never panics; any error is returned for the caller to log and count.
pub fn parse_frame(text: &str) -> Result<Frame, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = include_str!("../../../tests/fixtures/bitfinex/ws-ticker-session.jsonl");
    const ODD: &str = include_str!("../../../tests/fixtures/bitfinex/ws-odd-frames.jsonl");
    const REST: &str = include_str!("../../../tests/fixtures/bitfinex/rest-tickers.json");

    /// What a client should make of a frame.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Hello { status: i64 },
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
        Heartbeat(u64, Option<u64>),
        Unparseable,
    }
    use Outcome::*;

    fn outcome(text: &str) -> Outcome {
        let Ok(frame) = parse_frame(text) else { return Unparseable };
        match frame {
            Frame::Event(Event::Info { code: Some(c), .. }) => Info(c),
            Frame::Event(Event::Info { platform, .. }) => Hello { status: platform.map_or(-1, |p| p.status) },
            Frame::Event(Event::Conf { status, .. }) if status.as_deref() == Some("OK") => ConfOk,
            Frame::Event(Event::Subscribed { chan_id, symbol, .. }) => {
                Subscribed(chan_id, symbol.map_or("", |s| Box::leak(s.into_boxed_str())))
            }
            Frame::Event(Event::Error { code, .. }) => ErrorEvent(code.unwrap_or(0)),
            Frame::Event(Event::Pong { .. }) => Pong,
            Frame::Event(_) => UnknownEvent,
            Frame::Channel(m) => match m.payload {
                Payload::Heartbeat => Heartbeat(m.chan_id, m.seq),
                Payload::Ticker(raw) => match TickerValues::from_raw(&raw) {
                    Ok(v) => Ticker(m.chan_id, v.last_price, m.seq, m.timestamp_ms),
                    Err(_) => RejectedTicker(m.chan_id),
                },
                Payload::Other(_) => UnknownEvent,
            },
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
            ("[1, [1,2,3,4,5,6,7,8,9,10,\"new\",[1],{\"k\":true}]]", Ticker(1, 7.0, None, None)),
            ("[1, [1,2,3,4,5,6,7,8,9,1e400]]", Unparseable),
            // Fields appended anywhere are ignored.
            ("[1, [1,2,3,4,5,6,7,8,9,10,11,12], 7, 1700000000000, \"new\", {\"x\":1}]", Ticker(1, 7.0, Some(7), Some(1700000000000))),
            ("[1, \"hb\", 8, 1700000000000, 99]", Heartbeat(1, Some(8))),
            ("{\"event\":\"info\",\"code\":20051,\"msg\":\"x\",\"newField\":[1]}", Info(INFO_RECONNECT)),
            ("{\"event\":\"subscribed\",\"channel\":\"ticker\",\"chanId\":5,\"symbol\":\"tBTCUSD\",\"pair\":\"BTCUSD\",\"extra\":true}", Subscribed(5, "tBTCUSD")),
            ("{\"event\":\"error\",\"msg\":\"no code\"}", ErrorEvent(0)),
            // Trade-channel payloads carry arrays where seq would be: not a crash.
            ("[2, \"te\", [1, 1700000000000, 0.1, 97000], 9, 1700000000001]", UnknownEvent),
        ];
        for (frame, want) in cases {
            assert_eq!(&outcome(frame), want, "frame {frame}");
        }
    }

    #[test]
    fn rest_tickers_fixture() {
        let tickers: Vec<RestTicker> = serde_json::from_str(REST).unwrap();
        let parsed: Vec<(String, f64)> = tickers
            .iter()
            .map(|t| (t.symbol.clone(), TickerValues::from_raw(&t.values).unwrap().last_price))
            .collect();
        assert_eq!(parsed, [("tBTCUSD".to_string(), 97321.0), ("tETHUSD".to_string(), 3512.5)]);
    }
}
