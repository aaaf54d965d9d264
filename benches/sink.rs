//! Per-point cost of the consumer's hot path: wire-format Avro → tick → InfluxDB line protocol.

#[path = "../tests/support/fake_registry.rs"]
#[allow(dead_code)]
mod fake_registry;

use std::hint::black_box;

use candlestream::codec::{Decoder, Encoder};
use candlestream::config::SchemaRegistryConfig;
use candlestream::exchange::bitfinex::message::TickerValues;
use candlestream::model::{Record, Source};
use candlestream::sink::influx::write_line;
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = TickerValues {
        bid: 97321.0,
        bid_size: 5.22112483,
        ask: 97322.0,
        ask_size: 4.31554012,
        daily_change: -1200.0,
        daily_change_relative: -0.0122,
        last_price: 97321.0,
        volume: 1210.55304011,
        high: 99000.0,
        low: 96100.0,
    };
    let tick = Record::Tick(v.into_tick(
        "tBTCUSD".into(),
        1_763_787_600_123,
        Some(1),
        Source::Websocket,
        1_763_787_600_200,
    ));
    let (_registry, decoder, payload) = rt.block_on(async {
        let registry = fake_registry::FakeRegistry::start().await;
        let cfg = SchemaRegistryConfig {
            url: registry.url(),
            ..Default::default()
        };
        let kafka = candlestream::config::KafkaConfig {
            topic: "bench".into(),
            ..Default::default()
        };
        let payload = Encoder::new(&cfg, &kafka)
            .unwrap()
            .encode(&tick)
            .await
            .unwrap();
        let decoder = Decoder::new(&cfg).unwrap();
        decoder.decode(&payload).await.unwrap();
        (registry, decoder, payload)
    });

    let mut g = c.benchmark_group("per_point");
    g.bench_function("decode", |b| {
        b.to_async(&rt)
            .iter(|| async { decoder.decode(black_box(&payload)).await.unwrap() })
    });
    g.bench_function("line_protocol", |b| {
        let mut out = String::with_capacity(256);
        b.iter(|| {
            out.clear();
            write_line(&mut out, "ticker", black_box(&tick));
        })
    });
    g.bench_function("decode_and_line_protocol", |b| {
        b.to_async(&rt).iter(|| async {
            let t = decoder.decode(black_box(&payload)).await.unwrap();
            let mut out = String::with_capacity(256);
            write_line(&mut out, "ticker", &t);
            out
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
