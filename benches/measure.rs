//! Measurements shared by the benches that run the `candlestream` binaries as child processes:
//! CPU and RSS of processes from /proc, the machine's busy share, percentiles, a Prometheus
//! metric read off a process's /metrics, and end-to-end latency: records sent by the fake
//! exchange and not yet seen, stamped at the first InfluxDB query that returns their points.
//! Included with `#[path]` (a bench target is one crate; there is no shared bench library).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// CPU seconds (user + system) of a process, from /proc/PID/stat.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the file, 12th and 13th after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

pub fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (VmHWM, VmRSS) in MB: the peak resident set so far and the current one.
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmHWM:") / 1024.0, kb("VmRSS:") / 1024.0)
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
pub fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3).copied().unwrap_or(0.0) + cpu.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// CPU seconds so far of this process and of each of its children, labelled by what they run.
fn components() -> HashMap<String, (&'static str, f64)> {
    let me = std::process::id().to_string();
    let mut out = HashMap::new();
    out.insert(
        me.clone(),
        ("bench (fake exchange, driver, poller)", cpu_seconds(&me)),
    );
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .unwrap_or("");
        if ppid != me {
            continue;
        }
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ");
        let label = if cmd.contains("kafka.Kafka") {
            "Kafka brokers"
        } else if cmd.contains("QuorumPeerMain") {
            "ZooKeeper"
        } else if cmd.contains("influxd") {
            "InfluxDB"
        } else if cmd.contains(" producer ") {
            "producer"
        } else if cmd.contains(" consumer ") {
            "consumer"
        } else {
            "other"
        };
        out.insert(pid.clone(), (label, cpu_seconds(&pid)));
    }
    out
}

/// CPU use of some processes, of every part, and of the machine over a window.
pub struct Usage {
    started: Instant,
    cpu: Vec<(String, f64)>,
    components: HashMap<String, (&'static str, f64)>,
    machine: (f64, f64),
}

impl Usage {
    pub fn start(pids: &[String]) -> Self {
        Self {
            started: Instant::now(),
            cpu: pids.iter().map(|p| (p.clone(), cpu_seconds(p))).collect(),
            components: components(),
            machine: machine_jiffies(),
        }
    }

    /// CPU seconds of each process since start, the window's length, and the machine's busy share.
    pub fn stop(&self) -> (Vec<f64>, f64, f64) {
        let wall = self.started.elapsed().as_secs_f64();
        let cpu = self
            .cpu
            .iter()
            .map(|(pid, before)| cpu_seconds(pid) - before)
            .collect();
        let (busy, total) = machine_jiffies();
        let share = (busy - self.machine.0) / (total - self.machine.1).max(1.0);
        (cpu, wall, share)
    }

    /// CPU seconds since start by part, largest first, e.g. "Kafka brokers 12.1".
    pub fn breakdown(&self) -> String {
        let mut by: BTreeMap<&str, f64> = BTreeMap::new();
        for (pid, (label, now)) in components() {
            let before = self.components.get(&pid).map_or(0.0, |c| c.1);
            *by.entry(label).or_default() += now - before;
        }
        let ours: f64 = by.values().sum();
        let machine = (machine_jiffies().0 - self.machine.0) / clock_ticks();
        by.insert("processes outside this bench", (machine - ours).max(0.0));
        let mut by: Vec<(&str, f64)> = by.into_iter().filter(|(_, s)| *s >= 0.05).collect();
        by.sort_by(|a, b| b.1.total_cmp(&a.1));
        by.iter()
            .map(|(l, s)| format!("{l} {s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The `p`-th percentile (nearest rank) of sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sum of a metric's samples on a process's /metrics; 0 when unreachable.
pub async fn metric_sum(http: &reqwest::Client, port: u16, name: &str) -> f64 {
    let Ok(r) = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Records sent and not yet seen in InfluxDB, with their send times, and the latencies of those
/// seen. Trades are known by id (unique across symbols in the fake), tickers by symbol and
/// volume (unique per symbol in the fake).
#[derive(Default)]
pub struct Pending {
    /// (exchange ms, id) of pending trades, oldest first.
    trade_times: BTreeSet<(i64, i64)>,
    /// id → (exchange ms, sent).
    trades: HashMap<i64, (i64, Instant)>,
    /// (exchange ms, symbol, volume bits) of pending tickers, oldest first.
    ticker_times: BTreeSet<(i64, String, u64)>,
    /// (symbol, volume bits) → (exchange ms, sent).
    tickers: HashMap<(String, u64), (i64, Instant)>,
    pub trade_latencies: Vec<f64>,
    pub ticker_latencies: Vec<f64>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.trades.is_empty() && self.tickers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.trades.len() + self.tickers.len()
    }

    pub fn add_trade(&mut self, id: i64, ms: i64, sent: Instant) {
        self.trade_times.insert((ms, id));
        self.trades.insert(id, (ms, sent));
    }

    pub fn add_ticker(&mut self, symbol: &str, volume: f64, ms: i64, sent: Instant) {
        let bits = volume.to_bits();
        self.ticker_times.insert((ms, symbol.to_string(), bits));
        self.tickers.insert((symbol.to_string(), bits), (ms, sent));
    }

    fn see_trade(&mut self, id: i64, seen: Instant) {
        if let Some((ms, sent)) = self.trades.remove(&id) {
            self.trade_times.remove(&(ms, id));
            self.trade_latencies.push((seen - sent).as_secs_f64() * 1e3);
        }
    }

    fn see_ticker(&mut self, symbol: &str, volume: f64, seen: Instant) {
        let key = (symbol.to_string(), volume.to_bits());
        if let Some((ms, sent)) = self.tickers.remove(&key) {
            self.ticker_times.remove(&(ms, key.0, key.1));
            self.ticker_latencies
                .push((seen - sent).as_secs_f64() * 1e3);
        }
    }

    /// One InfluxQL statement per measurement with records pending, over all symbols, from the
    /// oldest pending exchange time on. With hundreds of symbols one statement per symbol would
    /// cost InfluxDB more than the pipeline does; what the answer holds beyond the pending
    /// records is what was stored since the oldest of them, which is little while the pipeline
    /// keeps up.
    fn statements(&self) -> Vec<(bool, String)> {
        let mut out = Vec::new();
        if let Some((ms, _)) = self.trade_times.first() {
            out.push((true, format!("SELECT id FROM trades WHERE time >= {ms}ms")));
        }
        if let Some((ms, _, _)) = self.ticker_times.first() {
            out.push((
                false,
                format!("SELECT symbol, volume FROM ticker WHERE time >= {ms}ms"),
            ));
        }
        out
    }
}

/// What [`poll`] measured of itself: how often it queried and how long a query took.
pub struct Polls {
    pub count: usize,
    pub mean_period_ms: f64,
    pub round_trip_p50_ms: f64,
}

/// Queries InfluxDB every `period` for the points of pending records until `driving` turns
/// false, and stamps each at the response that first holds it.
pub async fn poll(
    http: reqwest::Client,
    url: String,
    db: String,
    period: Duration,
    pending: Arc<Mutex<Pending>>,
    driving: Arc<AtomicBool>,
) -> Polls {
    let started = Instant::now();
    let mut round_trips = Vec::new();
    while driving.load(Ordering::Relaxed) {
        let next = tokio::time::Instant::now() + period;
        let statements = pending.lock().unwrap().statements();
        if !statements.is_empty() {
            let q = statements
                .iter()
                .map(|(_, q)| q.as_str())
                .collect::<Vec<_>>()
                .join(";");
            let asked = Instant::now();
            let body = match http
                .get(format!("{url}/query"))
                .query(&[("db", db.as_str()), ("q", q.as_str()), ("epoch", "ms")])
                .send()
                .await
            {
                Ok(r) => r.json::<Value>().await.ok(),
                Err(_) => None,
            };
            let seen = Instant::now();
            round_trips.push((seen - asked).as_secs_f64() * 1e3);
            let results = body
                .as_ref()
                .and_then(|b| b["results"].as_array())
                .cloned()
                .unwrap_or_default();
            let mut p = pending.lock().unwrap();
            for ((is_trade, _), result) in statements.iter().zip(&results) {
                for row in rows(result) {
                    if *is_trade {
                        if let Some(id) = row.first().and_then(Value::as_i64) {
                            p.see_trade(id, seen);
                        }
                    } else if let (Some(symbol), Some(volume)) = (
                        row.first().and_then(Value::as_str),
                        row.get(1).and_then(Value::as_f64),
                    ) {
                        p.see_ticker(symbol, volume, seen);
                    }
                }
            }
        }
        tokio::time::sleep_until(next).await;
    }
    let count = round_trips.len();
    round_trips.sort_by(f64::total_cmp);
    Polls {
        count,
        mean_period_ms: started.elapsed().as_secs_f64() * 1e3 / count.max(1) as f64,
        round_trip_p50_ms: percentile(&round_trips, 50.0),
    }
}

/// The value rows of a statement's result, columns after `time`.
pub fn rows(result: &Value) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    for series in result["series"].as_array().into_iter().flatten() {
        for row in series["values"].as_array().into_iter().flatten() {
            out.push(row.as_array().map(|r| r[1..].to_vec()).unwrap_or_default());
        }
    }
    out
}
