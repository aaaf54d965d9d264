//! Which symbols to stream: `bitfinex.symbols` (exact symbols and glob patterns) minus
//! `bitfinex.symbols_exclude`, resolved against Bitfinex's list of trading pairs and followed at
//! runtime.
//!
//! - A **pattern** (`t*USD`, `t*:USD`, `*`) needs the listing, `GET /v2/conf/pub:list:pair:exchange`;
//!   it is read at start and every `symbols_refresh`. New listings are subscribed and delisted
//!   pairs unsubscribed without a restart, each logged and counted.
//! - An **exact symbol** is used as given: a configuration of exact symbols only makes no listing
//!   request at all. Bitfinex has the last word: a symbol whose subscribe it refuses with error
//!   10300 is reported once, by name, and dropped until restart; the others go on.
//! - **Excludes** apply to both.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use globset::{Glob, GlobSet, GlobSetBuilder};
use tokio::sync::watch;

use tokio_util::sync::CancellationToken;

use super::{Ctx, ExchangeError, RestClient, sleep_or_cancel};
use crate::config::BitfinexConfig;
use crate::retry::{Verdict, retry};
use crate::telemetry::metric;

/// True when `s` holds glob syntax, so it is matched against the listing rather than used as is.
pub fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?', '[', ']', '{', '}'])
}

/// `bitfinex.symbols` and `bitfinex.symbols_exclude`, parsed.
#[derive(Debug, Clone)]
pub struct Selection {
    exact: BTreeSet<String>,
    patterns: Option<GlobSet>,
    exclude: GlobSet,
}

impl Selection {
    /// Errors name the entry at fault.
    pub fn new(symbols: &[String], exclude: &[String]) -> Result<Self, String> {
        if symbols.is_empty() {
            return Err("bitfinex.symbols is empty".into());
        }
        let glob = |key: &str, s: &str| {
            Glob::new(s).map_err(|e| format!("bitfinex.{key}: {s:?} is not a glob pattern: {e}"))
        };
        let mut exact = BTreeSet::new();
        let mut patterns = GlobSetBuilder::new();
        let mut any_pattern = false;
        for s in symbols {
            if is_pattern(s) {
                patterns.add(glob("symbols", s)?);
                any_pattern = true;
            } else if s.starts_with('t') && s.len() >= 4 {
                exact.insert(s.clone());
            } else {
                return Err(format!(
                    "bitfinex.symbols: {s:?} is neither a trading symbol like tBTCUSD nor a pattern like t*USD"
                ));
            }
        }
        let mut excluded = GlobSetBuilder::new();
        for s in exclude {
            excluded.add(glob("symbols_exclude", s)?);
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| format!("bitfinex.symbols: {e}"));
        Ok(Self {
            exact,
            patterns: if any_pattern {
                Some(build(patterns)?)
            } else {
                None
            },
            exclude: build(excluded)?,
        })
    }

    /// True when a pattern is configured: the symbols depend on Bitfinex's listing.
    pub fn needs_listing(&self) -> bool {
        self.patterns.is_some()
    }

    /// The symbols to stream given the trading symbols Bitfinex lists (`tBTCUSD`, …): the exact
    /// ones, and the listed ones a pattern matches, minus the excluded ones.
    pub fn resolve(&self, listing: &[String]) -> BTreeSet<String> {
        let matched = listing.iter().filter(|s| {
            self.patterns
                .as_ref()
                .is_some_and(|p| p.is_match(s.as_str()))
        });
        self.exact
            .iter()
            .chain(matched)
            .filter(|s| !self.exclude.is_match(s.as_str()))
            .cloned()
            .collect()
    }
}

/// The symbols streamed right now, shared by the listing follower (which sets them), the
/// websocket shards and the REST poller (which follow them), and the sessions (which report
/// symbols Bitfinex refuses).
pub struct Symbols {
    wanted: watch::Sender<Arc<BTreeSet<String>>>,
    /// Refused by Bitfinex (error 10300): left out until restart.
    rejected: Mutex<BTreeSet<String>>,
}

impl Symbols {
    pub(super) fn new() -> Self {
        Self {
            wanted: watch::Sender::new(Arc::default()),
            rejected: Mutex::default(),
        }
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.wanted.subscribe()
    }

    pub(super) fn current(&self) -> Arc<BTreeSet<String>> {
        self.wanted.borrow().clone()
    }

    /// Streams `resolved` (minus what Bitfinex refused) from now on. The first call starts the
    /// symbols; later calls log and count each symbol added or removed.
    fn set(&self, resolved: BTreeSet<String>, first: bool) {
        let rejected = self.rejected.lock().expect("rejected symbols lock").clone();
        let next: BTreeSet<String> = resolved.difference(&rejected).cloned().collect();
        let current = self.current();
        if first {
            tracing::info!(symbols = next.len(), "streaming symbols");
        } else {
            for symbol in next.difference(&current) {
                metrics::counter!(metric::SYMBOLS_ADDED).increment(1);
                tracing::info!(%symbol, "new listing; subscribing");
            }
            for symbol in current.difference(&next) {
                metrics::counter!(metric::SYMBOLS_REMOVED, "reason" => "delisted").increment(1);
                tracing::info!(%symbol, "delisted; unsubscribing");
            }
        }
        metrics::gauge!(metric::SYMBOLS).set(next.len() as f64);
        self.wanted.send_if_modified(|wanted| {
            let changed = **wanted != next;
            *wanted = Arc::new(next);
            changed
        });
    }

    /// Bitfinex refused `symbol` (error 10300): reported once, then left out; the other symbols
    /// go on.
    pub(super) fn reject(&self, symbol: &str, msg: Option<&str>) {
        let first = self
            .rejected
            .lock()
            .expect("rejected symbols lock")
            .insert(symbol.to_string());
        if !first {
            return;
        }
        metrics::counter!(metric::SYMBOLS_REMOVED, "reason" => "rejected").increment(1);
        tracing::error!(%symbol, ?msg, "Bitfinex refused the symbol (error 10300); it is left out until restart, the others go on");
        self.wanted.send_if_modified(|wanted| {
            if !wanted.contains(symbol) {
                return false;
            }
            let mut next = (**wanted).clone();
            next.remove(symbol);
            metrics::gauge!(metric::SYMBOLS).set(next.len() as f64);
            *wanted = Arc::new(next);
            true
        });
    }
}

/// The symbols `selection` stands for now, reading the listing once when it holds a pattern: for
/// the roles that take their symbols once at start (audit, verify).
pub async fn resolve_once(
    selection: &Selection,
    rest: &RestClient,
) -> Result<Vec<String>, ExchangeError> {
    let listing = if selection.needs_listing() {
        rest.pairs().await?
    } else {
        Vec::new()
    };
    Ok(selection.resolve(&listing).into_iter().collect())
}

/// Sets the symbols from the configuration and, when it holds a pattern, follows Bitfinex's
/// listing every `symbols_refresh` until cancelled, starting from `first_listing` when given
/// (read by the caller just before).
pub(super) async fn follow_listing(
    ctx: Arc<Ctx>,
    selection: Selection,
    mut first_listing: Option<Vec<String>>,
) {
    if !selection.needs_listing() {
        ctx.symbols.set(selection.resolve(&[]), true);
        ctx.fetches.follow(&ctx.symbols.current());
        return;
    }
    let mut first = true;
    loop {
        // Retried until read; meanwhile the symbols stay as they are (a failed refresh is no
        // reason to unsubscribe anything). None: stopping.
        let listing = match first_listing.take() {
            Some(read) => read,
            None => match read_listing(&ctx.rest, &ctx.cfg, &ctx.cancel).await {
                Some(read) => read,
                None => return,
            },
        };
        ctx.symbols.set(selection.resolve(&listing), first);
        first = false;
        // What is kept per symbol goes with the symbol: memory stays bounded however many pairs
        // are listed and delisted over time.
        let streamed = ctx.symbols.current();
        ctx.book.retain(|symbol| streamed.contains(symbol));
        ctx.fetches.follow(&streamed);
        if !sleep_or_cancel(ctx.cfg.symbols_refresh, &ctx.cancel).await {
            return;
        }
    }
}

/// The listing, retried with the REST backoff until it is read; `None` only when stopping. The
/// producer's listing follower and the verifier's read it this way.
pub(crate) async fn read_listing(
    rest: &RestClient,
    cfg: &BitfinexConfig,
    cancel: &CancellationToken,
) -> Option<Vec<String>> {
    let read = retry(
        cfg.rest_backoff(),
        cancel,
        || rest.pairs(),
        |e: &ExchangeError, wait| {
            if !e.is_retryable() {
                return Verdict::Fail;
            }
            tracing::warn!(error = %e, ?wait, "reading Bitfinex's list of trading pairs failed; retrying");
            Verdict::Retry
        },
    )
    .await;
    read.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn resolve(symbols: &[&str], exclude: &[&str], listing: &[&str]) -> Vec<String> {
        Selection::new(&strings(symbols), &strings(exclude))
            .unwrap()
            .resolve(&strings(listing))
            .into_iter()
            .collect()
    }

    const LISTING: &[&str] = &[
        "tBTCUSD",
        "tETHUSD",
        "tBTCEUR",
        "tETHBTC",
        "tTESTBTC:TESTUSD",
        "t1INCH:USD",
        "tBTCUST",
    ];

    #[test]
    fn patterns_select_from_the_listing() {
        assert_eq!(
            resolve(&["t*USD"], &[], LISTING),
            ["t1INCH:USD", "tBTCUSD", "tETHUSD", "tTESTBTC:TESTUSD"]
        );
        assert_eq!(resolve(&["t*:USD"], &[], LISTING), ["t1INCH:USD"]);
        assert_eq!(
            resolve(&["t*:*"], &[], LISTING),
            ["t1INCH:USD", "tTESTBTC:TESTUSD"]
        );
        assert_eq!(resolve(&["*"], &[], LISTING).len(), LISTING.len());
        assert_eq!(
            resolve(&["tBTC???"], &[], LISTING),
            ["tBTCEUR", "tBTCUSD", "tBTCUST"]
        );
        assert_eq!(
            resolve(&["t{ETH,BTC}USD"], &[], LISTING),
            ["tBTCUSD", "tETHUSD"]
        );
        // Case matters, as in Bitfinex's symbols.
        assert!(resolve(&["t*usd"], &[], LISTING).is_empty());
    }

    #[test]
    fn exact_symbols_need_no_listing_and_stay_without_it() {
        let s = Selection::new(&strings(&["tBTCUSD", "tNOPEUSD"]), &[]).unwrap();
        assert!(!s.needs_listing());
        assert_eq!(
            s.resolve(&[]).into_iter().collect::<Vec<_>>(),
            ["tBTCUSD", "tNOPEUSD"]
        );
        // Mixed: the exact one is kept even when the listing lacks it; Bitfinex judges it.
        assert_eq!(
            resolve(&["tNOPEUSD", "t*EUR"], &[], LISTING),
            ["tBTCEUR", "tNOPEUSD"]
        );
        assert!(
            Selection::new(&strings(&["tNOPEUSD", "t*EUR"]), &[])
                .unwrap()
                .needs_listing()
        );
    }

    #[test]
    fn excludes_apply_to_patterns_and_exact_symbols() {
        assert_eq!(
            resolve(
                &["t*USD", "tBTCEUR"],
                &["tTEST*", "t*:*", "tBTCEUR"],
                LISTING
            ),
            ["tBTCUSD", "tETHUSD"]
        );
        assert!(resolve(&["*"], &["*"], LISTING).is_empty());
    }

    #[test]
    fn bad_entries_are_named() {
        let err = |symbols: &[&str], exclude: &[&str]| {
            Selection::new(&strings(symbols), &strings(exclude)).unwrap_err()
        };
        assert!(err(&[], &[]).contains("empty"));
        assert!(err(&["BTCUSD"], &[]).contains("\"BTCUSD\""));
        assert!(err(&["t[USD"], &[]).contains("\"t[USD\""));
        assert!(err(&["tBTCUSD"], &["t{BTC"]).contains("symbols_exclude"));
    }

    #[test]
    fn rejected_symbols_are_left_out_once_and_for_good() {
        let symbols = Symbols::new();
        let mut rx = symbols.subscribe();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        symbols.set(set(&["tBTCUSD", "tNOPEUSD"]), true);
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            *rx.borrow_and_update().clone(),
            set(&["tBTCUSD", "tNOPEUSD"])
        );
        symbols.reject("tNOPEUSD", Some("symbol: invalid"));
        symbols.reject("tNOPEUSD", Some("symbol: invalid"));
        assert_eq!(*rx.borrow_and_update().clone(), set(&["tBTCUSD"]));
        // A refresh does not bring it back.
        symbols.set(set(&["tBTCUSD", "tNOPEUSD", "tETHUSD"]), false);
        assert_eq!(
            *rx.borrow_and_update().clone(),
            set(&["tBTCUSD", "tETHUSD"])
        );
        // An unchanged refresh wakes nobody.
        symbols.set(set(&["tBTCUSD", "tETHUSD"]), false);
        assert!(!rx.has_changed().unwrap());
    }
}
