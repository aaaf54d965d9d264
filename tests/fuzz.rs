//! Property tests standing in for fuzzing (cargo-fuzz needs a nightly toolchain CI lacks): the
//! Bitfinex frame parser and the Avro decode path must turn any input into a value or an error,
//! never a panic. The number of cases is bounded so CI time stays fixed.

mod support;

use candlestream::codec::{Decoder, Encoder};
use candlestream::config::SchemaRegistryConfig;
use candlestream::exchange::bitfinex::message::{Frame, Payload, TickerValues, parse_frame};
use candlestream::model::{Record, Source};
use proptest::prelude::*;
use serde_json::{Value, json};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z]{0,8}".prop_map(Value::from),
        Just(json!("hb")),
        Just(json!("info")),
        Just(json!("subscribed")),
    ];
    leaf.prop_recursive(4, 64, 12, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..12).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("event".to_string()),
                        Just("code".to_string()),
                        Just("chanId".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn ticker_values() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-1e9f64..1e9, 10)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_parses_or_errors(text in any::<String>()) {
        let _ = parse_frame(&text);
    }

    #[test]
    fn any_json_parses_or_errors(v in json_value()) {
        if let Ok(Frame::Channel(m)) = parse_frame(&v.to_string())
            && let Payload::Ticker(raw) = m.payload
        {
            let _ = TickerValues::from_raw(&raw);
        }
    }

    #[test]
    fn trailing_fields_never_change_a_ticker(values in ticker_values(), extra in prop::collection::vec(json_value(), 0..4), seq in any::<u32>(), ts in 1i64..4_000_000_000_000) {
        let mut payload: Vec<Value> = values.iter().map(|v| json!(v)).collect();
        payload.extend(extra.iter().take(2).cloned());
        let mut frame = vec![json!(7), Value::Array(payload), json!(seq), json!(ts)];
        frame.extend(extra);
        let Ok(Frame::Channel(m)) = parse_frame(&Value::Array(frame).to_string()) else {
            return Err(TestCaseError::fail("valid ticker frame rejected"));
        };
        prop_assert_eq!(m.seq, Some(seq as u64));
        prop_assert_eq!(m.timestamp_ms, Some(Ok(ts)));
        let Payload::Ticker(raw) = m.payload else { return Err(TestCaseError::fail("not a ticker")) };
        let parsed = TickerValues::from_raw(&raw).unwrap();
        prop_assert_eq!(parsed.bid, values[0]);
        prop_assert_eq!(parsed.low, values[9]);
    }
}

fn decode_fixture() -> &'static (
    tokio::runtime::Runtime,
    support::fake_registry::FakeRegistry,
    Decoder,
    Vec<u8>,
) {
    static FIXTURE: std::sync::OnceLock<(
        tokio::runtime::Runtime,
        support::fake_registry::FakeRegistry,
        Decoder,
        Vec<u8>,
    )> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (registry, decoder, valid) = rt.block_on(async {
            let registry = support::fake_registry::FakeRegistry::start().await;
            let cfg = SchemaRegistryConfig {
                url: registry.url(),
                ..Default::default()
            };
            let v = TickerValues {
                bid: 1.0,
                bid_size: 2.0,
                ask: 3.0,
                ask_size: 4.0,
                daily_change: 5.0,
                daily_change_relative: 6.0,
                last_price: 7.0,
                volume: 8.0,
                high: 9.0,
                low: 10.0,
            };
            let tick = v.into_tick("tBTCUSD".into(), 1, Some(2), Source::Websocket, 3);
            let kafka = candlestream::config::KafkaConfig {
                topic: "fuzz".into(),
                ..Default::default()
            };
            let valid = Encoder::new(&cfg, &kafka)
                .unwrap()
                .encode(&Record::Tick(tick))
                .await
                .unwrap();
            (registry, Decoder::new(&cfg).unwrap(), valid)
        });
        (rt, registry, decoder, valid)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_after_a_valid_header_decode_or_error(body in prop::collection::vec(any::<u8>(), 0..200)) {
        let (rt, _registry, decoder, valid) = decode_fixture();
        let mut payload = valid[..5].to_vec();
        payload.extend(body);
        let _ = rt.block_on(decoder.decode(&payload));
    }

    #[test]
    fn mutated_records_decode_or_error(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>()) {
        let (rt, _registry, decoder, valid) = decode_fixture();
        let mut payload = valid.clone();
        for (i, b) in flips {
            let i = 5 + i.index(payload.len() - 5);
            payload[i] = b;
        }
        payload.truncate(5 + cut.index(payload.len() - 4));
        let _ = rt.block_on(decoder.decode(&payload));
    }
}
