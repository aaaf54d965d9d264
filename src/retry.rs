//! Retrying and shutting down: the one backoff loop every stage uses, and the shutdown budget
//! that every wait honours.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Capped exponential backoff with jitter: waits start near `min` and double up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
        }
    }

    /// backon adds up to 100% jitter on top of each delay, so the exponential part is held at
    /// half of each bound: every wait stays within `[min / 2, max]`.
    pub fn delays(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.min / 2)
            .with_max_delay(self.max / 2)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// What the caller's classifier makes of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The error can pass: wait, then try again.
    Retry,
    /// Another try would fail the same way.
    Fail,
}

/// Why [`retry`] stopped without a result.
#[derive(Debug, PartialEq)]
pub enum GaveUp<E> {
    /// The classifier said the error will not pass.
    Failed(E),
    /// `stop` was cancelled: during an attempt, which is dropped, or during a wait.
    Stopped,
}

/// Runs `attempt` until it succeeds, the classifier gives up on its error, or `stop` is
/// cancelled. The classifier sees each error with the wait that would follow it (for its log
/// line and metrics). Both the attempt and the wait end as soon as `stop` is cancelled, so a
/// caller that passes its shutdown deadline's token never outlives the deadline.
pub async fn retry<T, E, Fut>(
    policy: Backoff,
    stop: &CancellationToken,
    attempt: impl FnMut() -> Fut,
    classify: impl FnMut(&E, Duration) -> Verdict,
) -> Result<T, GaveUp<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    run(policy, stop, true, attempt, classify).await
}

/// Like [`retry`], but an attempt in progress is not interrupted by `stop`: it watches `stop`
/// itself and ends in a bounded time with what it owes (a websocket session unsubscribes and
/// reads what the exchange sent until then). Only the waits end at once.
pub async fn retry_letting_attempts_finish<T, E, Fut>(
    policy: Backoff,
    stop: &CancellationToken,
    attempt: impl FnMut() -> Fut,
    classify: impl FnMut(&E, Duration) -> Verdict,
) -> Result<T, GaveUp<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    run(policy, stop, false, attempt, classify).await
}

async fn run<T, E, Fut>(
    policy: Backoff,
    stop: &CancellationToken,
    interrupt: bool,
    mut attempt: impl FnMut() -> Fut,
    mut classify: impl FnMut(&E, Duration) -> Verdict,
) -> Result<T, GaveUp<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = policy.delays();
    loop {
        let result = if interrupt {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Err(GaveUp::Stopped),
                r = attempt() => r,
            }
        } else {
            attempt().await
        };
        let error = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let wait = delays.next().unwrap_or(policy.max);
        if classify(&error, wait) == Verdict::Fail {
            return Err(GaveUp::Failed(error));
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(GaveUp::Stopped),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The shutdown of one process. `stop` is the token SIGINT/SIGTERM cancel: stages stop taking
/// new work and finish what they hold. `expired` is cancelled once `budget` has passed since
/// `stop` was: every retry and wait of the finishing work gives up then. The deadline is
/// started by the cancellation itself, so work that is in the middle of a retry when the
/// signal arrives is bounded like everything else.
#[derive(Clone)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub expired: CancellationToken,
    budget: Duration,
    deadline: Arc<OnceLock<Instant>>,
}

impl Shutdown {
    /// Must be called inside a tokio runtime: a task starts the deadline when `stop` is
    /// cancelled.
    pub fn new(stop: CancellationToken, budget: Duration) -> Self {
        let expired = CancellationToken::new();
        let deadline = Arc::new(OnceLock::new());
        let shutdown = Self {
            stop,
            expired,
            budget,
            deadline,
        };
        let timer = shutdown.clone();
        tokio::spawn(async move {
            timer.stop.cancelled().await;
            let at = timer.deadline().expect("stop is cancelled");
            tokio::time::sleep_until(at).await;
            timer.expired.cancel();
        });
        shutdown
    }

    /// When the budget runs out; `None` before the shutdown started. Whoever first sees `stop`
    /// cancelled (the timer, or a stage that got there sooner) starts the clock.
    pub fn deadline(&self) -> Option<Instant> {
        self.stop
            .is_cancelled()
            .then(|| *self.deadline.get_or_init(|| Instant::now() + self.budget))
    }

    /// Time left of the budget: all of `otherwise` before the shutdown started.
    pub fn remaining(&self, otherwise: Duration) -> Duration {
        self.deadline()
            .map_or(otherwise, |d| d.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_but_never_pass_the_cap() {
        let cap = Duration::from_secs(4);
        let waits: Vec<_> = Backoff::new(Duration::from_millis(100), cap)
            .delays()
            .take(50)
            .collect();
        assert!(
            waits
                .iter()
                .all(|w| *w <= cap && *w >= Duration::from_millis(50))
        );
        assert!(waits[0] <= Duration::from_millis(100));
        assert!(waits[49] >= cap / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_and_stops_on_a_permanent_error() {
        let stop = CancellationToken::new();
        let policy = Backoff::new(Duration::from_millis(10), Duration::from_millis(20));
        let mut calls = 0;
        let r: Result<u32, GaveUp<&str>> = retry(
            policy,
            &stop,
            || {
                calls += 1;
                let n = calls;
                async move { if n < 3 { Err("down") } else { Ok(n) } }
            },
            |_, _| Verdict::Retry,
        )
        .await;
        assert_eq!(r, Ok(3));
        let r: Result<(), _> = retry(
            policy,
            &stop,
            || async { Err("bad") },
            |e, _| {
                if *e == "bad" {
                    Verdict::Fail
                } else {
                    Verdict::Retry
                }
            },
        )
        .await;
        assert_eq!(r, Err(GaveUp::Failed("bad")));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_in_flight_ends_with_the_deadline_started_by_the_signal() {
        let stop = CancellationToken::new();
        let shutdown = Shutdown::new(stop.clone(), Duration::from_secs(5));
        assert_eq!(shutdown.deadline(), None);
        let expired = shutdown.expired.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            // Every attempt hangs, like a write to a server that does not answer.
            let r: Result<(), GaveUp<()>> = retry(
                Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
                &expired,
                std::future::pending,
                |_, _| Verdict::Retry,
            )
            .await;
            (r, started.elapsed())
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!task.is_finished(), "no deadline before the signal");
        stop.cancel();
        let (r, took) = task.await.unwrap();
        assert_eq!(r, Err(GaveUp::Stopped));
        assert_eq!(
            took,
            Duration::from_secs(65),
            "the budget counts from the signal"
        );
        assert_eq!(shutdown.remaining(Duration::from_secs(5)), Duration::ZERO);
    }
}
