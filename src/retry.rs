//! Capped exponential backoff with jitter, shared by every stage that retries.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays start near `min` and double up to `cap`. backon adds up to 100% jitter on top of each
/// delay, so the exponential part is held at half of each bound: every wait stays within
/// `[min / 2, cap]`.
pub fn backoff(min: Duration, cap: Duration) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(min / 2)
        .with_max_delay(cap / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_but_never_pass_the_cap() {
        let cap = Duration::from_secs(4);
        let waits: Vec<_> = backoff(Duration::from_millis(100), cap).take(50).collect();
        assert!(
            waits
                .iter()
                .all(|w| *w <= cap && *w >= Duration::from_millis(50))
        );
        assert!(waits[0] <= Duration::from_millis(100));
        assert!(waits[49] >= cap / 2);
    }
}
