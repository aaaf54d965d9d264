//! Per-tick cost of the producer's hot path: Bitfinex frame → typed tick → Confluent wire-format
//! Avro, next to plain `apache_avro::to_avro_datum` on the same record.

#[path = "../tests/support/fake_registry.rs"]
#[allow(dead_code)]
mod fake_registry;

use std::hint::black_box;

#[allow(deprecated)] // The issue asks for exactly this baseline.
use apache_avro::{Schema, to_avro_datum, to_value};
use candlestream::codec::{Encoder, TICKER_SCHEMA};
use candlestream::config::SchemaRegistryConfig;
use candlestream::exchange::bitfinex::message::{Frame, Payload, TickerValues, parse_frame};
use candlestream::model::{Record, RecordKind, Source};
use criterion::{Criterion, criterion_group, criterion_main};

const FRAME: &str = "[224555,[97321,5.22112483,97322,4.31554012,-1200,-0.0122,97321,1210.55304011,99000,96100],1,1763787600123]";

fn parse(text: &str) -> Record {
    let Ok(Frame::Channel(msg)) = parse_frame(text) else {
        panic!("bench frame parses")
    };
    let Payload::Ticker(raw) = msg.payload else {
        panic!("ticker")
    };
    let values = TickerValues::from_raw(&raw).unwrap();
    Record::Tick(values.into_tick(
        "tBTCUSD".into(),
        msg.timestamp_ms.unwrap().unwrap(),
        msg.seq.map(|s| s as i64),
        Source::Websocket,
        1_763_787_600_200,
    ))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_registry, encoder) = rt.block_on(async {
        let registry = fake_registry::FakeRegistry::start().await;
        let cfg = SchemaRegistryConfig {
            url: registry.url(),
            ..Default::default()
        };
        let kafka = candlestream::config::KafkaConfig {
            topic: "bench".into(),
            ..Default::default()
        };
        let encoder = Encoder::new(&cfg, &kafka).unwrap();
        encoder.register(RecordKind::Tick).await.unwrap();
        (registry, encoder)
    });
    let schema = Schema::parse_str(TICKER_SCHEMA).unwrap();
    let tick = parse(FRAME);
    let Record::Tick(ticker) = tick.clone() else {
        unreachable!()
    };

    let mut g = c.benchmark_group("per_tick");
    g.bench_function("parse_frame", |b| b.iter(|| parse(black_box(FRAME))));
    g.bench_function("parse_and_encode/candlestream", |b| {
        b.to_async(&rt)
            .iter(|| async { encoder.encode(&parse(black_box(FRAME))).await.unwrap() })
    });
    g.bench_function("encode/candlestream", |b| {
        b.to_async(&rt)
            .iter(|| async { encoder.encode(black_box(&tick)).await.unwrap() })
    });
    g.bench_function("encode/apache_avro_to_avro_datum", |b| {
        #[allow(deprecated)]
        b.iter(|| to_avro_datum(&schema, to_value(black_box(&ticker)).unwrap()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
