//! Throughput of candlestream's InfluxDB sink: writes `--points` synthetic ticks in batches of
//! `--batch` through `InfluxSink` (v1 API, gzip) and prints points per second. It also leaves
//! each batch, gzipped, in `--out` so that benches/influx_vs_curl.sh can post the very same
//! bytes with curl.

use std::io::Write;
use std::time::Instant;

use candlestream::config::{InfluxApi, InfluxConfig};
use candlestream::exchange::bitfinex::message::TickerValues;
use candlestream::model::{Record, Source, Tick};
use candlestream::sink::influx::{InfluxSink, write_line};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    db: String,
    #[arg(long, default_value_t = 200_000)]
    points: usize,
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long)]
    out: std::path::PathBuf,
}

fn tick(i: usize) -> Tick {
    let symbols = ["tBTCUSD", "tETHUSD", "tSOLUSD", "tXRPUSD"];
    let price = 100.0 + (i % 997) as f64 * 0.01;
    let v = TickerValues {
        bid: price - 0.5,
        bid_size: 1.0 + (i % 13) as f64,
        ask: price + 0.5,
        ask_size: 2.0,
        daily_change: -1.5,
        daily_change_relative: -0.015,
        last_price: price,
        volume: 1000.0 + i as f64,
        high: price + 5.0,
        low: price - 5.0,
    };
    let t = 1_763_787_600_000 + (i / symbols.len()) as i64;
    v.into_tick(
        symbols[i % symbols.len()].into(),
        t,
        None,
        Source::Websocket,
        t,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let batches: Vec<String> = (0..args.points)
        .collect::<Vec<_>>()
        .chunks(args.batch)
        .map(|c| {
            let mut lines = String::new();
            for i in c {
                write_line(&mut lines, "ticker", &Record::Tick(tick(*i)));
            }
            lines
        })
        .collect();
    for (n, lines) in batches.iter().enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(lines.as_bytes())?;
        std::fs::write(args.out.join(format!("batch-{n:06}.lp.gz")), gz.finish()?)?;
    }
    let cfg = InfluxConfig {
        api: InfluxApi::V1,
        url: args.url,
        database: args.db,
        ..Default::default()
    };
    let sink = InfluxSink::new(&cfg)?;
    let started = Instant::now();
    for lines in &batches {
        sink.write(lines).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{:.0}", args.points as f64 / secs);
    Ok(())
}
