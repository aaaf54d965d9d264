//! Which trades this process has already sent, per symbol, in a small fixed amount of memory
//! whatever the size of the backfill.
//!
//! Trades are ordered by their position: exchange time, then id. The book keeps two things per
//! symbol:
//!
//! - the **window**: the [`WINDOW`] highest positions admitted, exactly. Every admitted trade at
//!   or above the window's lowest position is in it, so there the answer is exact without any
//!   assumption about the exchange.
//! - the **gaps**: ranges that hold trades never admitted, still to be fetched from REST
//!   history. A gap is opened when a snapshot's oldest trade is newer than the newest trade seen
//!   before it (or, at start, than the backfill horizon): exactly the range the gap repair then
//!   fetches. It shrinks by every REST page, by the whole range that page fetched completely, and
//!   by any single trade that arrives inside it some other way.
//!
//! A trade offered below the window is new exactly when it lies in a gap. That rests on the
//! premise the gap repair rests on already: the trades channel sends every trade after its
//! snapshot, in execution order (or off it by far fewer than [`WINDOW`] trades of the symbol), so
//! the only trades below the window that were never admitted are those a disconnect kept from the
//! socket, and those lie between the newest trade seen before the disconnect and the oldest trade
//! of the next snapshot: in a gap.
//!
//! Why that is exact for each way a trade comes twice:
//!
//! - **`te` then `tu`**: the `tu` comes 1–2 s after its `te`. Unless more than [`WINDOW`] trades
//!   of the symbol were admitted in between, the `te` is in the window. Otherwise the `tu` is
//!   below the window and outside every gap (gaps lie below a snapshot's oldest trade, and a `te`
//!   comes after its snapshot): a repeat either way. A `tu` whose `te` was lost is new, as long as
//!   it is in the window.
//! - **Snapshots** hold the most recent trades, a few dozen, far fewer than [`WINDOW`].
//!   Fewer admitted trades than that can be newer than any of them, so each is at or above the
//!   window's lowest position: exact.
//! - **REST pages** ask for `start <= MTS <= end`, oldest first, and the next page starts at the
//!   last page's last millisecond, whose trades the page may have cut off. The caller therefore
//!   admits a full page only up to the millisecond before its last (see [`TradeBook::admit_page`]),
//!   so consecutive pages do not overlap in what they admit, and each page removes from the gaps
//!   exactly the range it fetched completely. What a page still shares with other paths: the
//!   trades at or below the newest trade where a repair or poll starts (admitted before: in the
//!   window, or below it and outside the gap), the snapshot's trades in the repair's last
//!   millisecond (at or above the gap's end), a repair run again after an error, or a poll and a
//!   repair fetching the same range (whichever comes second finds the range gone from the gap).
//!   Within one millisecond, the order of the rows does not matter.
//!
//! After a restart, a symbol also has the newest trade the trades topic held at start: every trade
//! at or below it is a repeat (Kafka holds it, and no gap lies there), so the first snapshot sends
//! nothing Kafka has, and the backfill starts there.
//!
//! The bound per symbol: the window holds at most [`WINDOW`] positions of 16 bytes, and there are
//! at most [`MAX_GAPS`] gaps of 32 bytes (more only when a connection flaps faster than repairs
//! finish; the oldest two are then merged into one, which can let through a repeat but never
//! drops a trade). With the vectors' capacities and headers that is at most
//! 16 384 + 1 024 + 88 = 17 496 bytes, plus the symbol's name and map entry: about 5 MB for 300
//! busy symbols, and far less for quiet ones, whose window holds only the trades they had.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::message::TradeValues;

/// Execution order of trades: exchange time, then id.
pub type Position = (i64, i64);

/// Positions admitted that are kept exactly per symbol: many times a snapshot, and more trades of
/// one symbol than Bitfinex executes in the 1–2 s between a `te` and its `tu`.
pub const WINDOW: usize = 1_024;

// The window's capacity doubles on its way to the bound: it lands on it exactly.
const _: () = assert!(WINDOW.is_power_of_two());

/// Gaps kept per symbol: one per repair still running.
pub const MAX_GAPS: usize = 31;

/// The most the window and the gaps of one symbol take: the window grows by doubling up to
/// [`WINDOW`] (a power of two) positions, and the gaps get room for `MAX_GAPS + 1` (one more
/// while a split is merged back) once, when the first opens.
#[cfg(test)]
const BYTES_PER_SYMBOL: usize =
    WINDOW * size_of::<Position>() + (MAX_GAPS + 1) * size_of::<Gap>() + size_of::<Seen>();

/// The positions strictly between `.0` and `.1`.
type Gap = (Position, Position);

/// A range of exchange time `[from_ms, until_ms]` to fetch from REST history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    pub from_ms: i64,
    pub until_ms: i64,
    /// The symbol's backfill: the range starts where this process started (the backfill horizon,
    /// or the newest trade Kafka held), not at a trade it saw.
    pub backfill: bool,
}

/// Where a fetch of a symbol's trades starts, and whether that is its backfill (see [`Fetch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: Position,
    pub backfill: bool,
}

/// What was new among a batch of trades offered at once.
#[derive(Debug, Default)]
pub struct Admitted {
    pub new: Vec<TradeValues>,
    pub repeats: usize,
}

#[derive(Default)]
struct Seen {
    /// The highest admitted positions, ascending, at most [`WINDOW`].
    window: VecDeque<Position>,
    /// Disjoint, ascending.
    gaps: Vec<Gap>,
    /// Times two gaps were merged to keep within [`MAX_GAPS`].
    merged: u64,
    /// The newest trade the trades topic held at start: every trade up to it is in Kafka already,
    /// so none at or below it is new (no gap lies there: gaps start at or above it).
    resumed: Option<Position>,
}

fn in_gap(p: Position, (after, before): Gap) -> bool {
    after < p && p < before
}

/// True when no position lies strictly between `after` and `before`.
fn is_empty((after, before): Gap) -> bool {
    let next = match after.1.checked_add(1) {
        Some(id) => (after.0, id),
        None => (after.0 + 1, i64::MIN),
    };
    before <= next
}

impl Seen {
    fn newest(&self) -> Option<Position> {
        self.window.back().copied()
    }

    fn is_new(&self, p: Position) -> bool {
        if self.resumed.is_some_and(|r| p <= r) {
            return false;
        }
        match self.window.binary_search(&p) {
            Ok(_) => false,
            // Below the window: only a gap holds trades not admitted there.
            Err(0) if self.window.len() == WINDOW => self.gaps.iter().any(|&g| in_gap(p, g)),
            Err(_) => true,
        }
    }

    /// Records `p` as admitted; it must be new.
    fn insert(&mut self, p: Position) {
        self.remember(p);
        self.cover(p, p);
    }

    /// Keeps `p` in the window if it is among the highest admitted.
    fn remember(&mut self, p: Position) {
        if let Err(i) = self.window.binary_search(&p) {
            if self.window.len() < WINDOW {
                self.window.insert(i, p);
            } else if i > 0 {
                self.window.pop_front();
                self.window.insert(i - 1, p);
            }
        }
    }

    /// Removes the positions from `from` to `to` (both included) from the gaps. Only a gap
    /// holding the whole range splits in two, and gaps are disjoint: one more gap at most.
    fn cover(&mut self, from: Position, to: Position) {
        let mut i = 0;
        while i < self.gaps.len() {
            let (after, before) = self.gaps[i];
            if to <= after || before <= from {
                i += 1;
                continue;
            }
            // The parts of the gap below `from` and above `to`.
            let rest: Vec<Gap> = [(after, from), (to, before)]
                .into_iter()
                .filter(|&g| !is_empty(g))
                .collect();
            let kept = rest.len();
            self.gaps.splice(i..=i, rest);
            i += kept;
        }
        self.bound_gaps();
    }

    fn open_gap(&mut self, after: Position, before: Position) {
        let gap = (after, before);
        if is_empty(gap) {
            return;
        }
        // Room for one more than the bound, so that the vector never grows past it.
        if self.gaps.capacity() == 0 {
            self.gaps.reserve_exact(MAX_GAPS + 1);
        }
        // Overlapping gaps merge: a position is either still to fetch or not.
        let (mut lo, mut hi) = gap;
        self.gaps.retain(|&(a, b)| {
            let overlaps = a < hi && lo < b;
            if overlaps {
                lo = lo.min(a);
                hi = hi.max(b);
            }
            !overlaps
        });
        let at = self.gaps.partition_point(|&(a, _)| a < lo);
        self.gaps.insert(at, (lo, hi));
        self.bound_gaps();
    }

    /// Merges the two oldest gaps while there are too many: what lies between them counts as not
    /// admitted, so a repeat of it could pass, but nothing is dropped.
    fn bound_gaps(&mut self) {
        while self.gaps.len() > MAX_GAPS {
            let (after, _) = self.gaps[0];
            let (_, before) = self.gaps.remove(1);
            self.gaps[0] = (after, before);
            self.merged += 1;
            tracing::warn!(
                gaps = MAX_GAPS,
                merged = self.merged,
                "too many trade gaps waiting for repair; merging the oldest two"
            );
        }
    }
}

/// Per symbol, which trades were already sent: see the module documentation.
pub struct TradeBook {
    symbols: Mutex<HashMap<String, Seen>>,
    /// Before any trade of a symbol was seen, gaps start here (or at the newest trade Kafka held,
    /// when that is later): the backfill horizon.
    horizon: Option<Position>,
}

impl TradeBook {
    /// `resumed`: per symbol, the newest trade the trades topic held at start. Without a backfill
    /// (`backfill_from_ms` is `None`) nothing is fetched from before the first snapshot, and
    /// `resumed` only keeps what Kafka holds from being sent again.
    pub fn new(backfill_from_ms: Option<i64>, resumed: HashMap<String, Position>) -> Self {
        let symbols = resumed
            .into_iter()
            .map(|(symbol, newest)| {
                let seen = Seen {
                    resumed: Some(newest),
                    ..Seen::default()
                };
                (symbol, seen)
            })
            .collect();
        Self {
            symbols: Mutex::new(symbols),
            horizon: backfill_from_ms.map(|ms| (ms, i64::MIN)),
        }
    }

    /// Where `symbol`'s backfill starts: the horizon, or the newest trade Kafka held if later.
    fn start(&self, seen: &Seen) -> Option<Position> {
        let horizon = self.horizon?;
        Some(seen.resumed.map_or(horizon, |r| r.max(horizon)))
    }

    /// Where a fetch of `seen`'s trades starts: its newest trade, or its backfill start before any.
    fn cursor_of(&self, seen: &Seen) -> Option<Cursor> {
        match seen.newest() {
            Some(at) => Some(Cursor {
                at,
                backfill: false,
            }),
            None => self.start(seen).map(|at| Cursor { at, backfill: true }),
        }
    }

    fn with<R>(&self, symbol: &str, f: impl FnOnce(&mut Seen) -> R) -> R {
        let mut symbols = self.symbols.lock().expect("trade book lock");
        match symbols.get_mut(symbol) {
            Some(seen) => f(seen),
            None => f(symbols.entry(symbol.to_string()).or_default()),
        }
    }

    /// Forgets every symbol `keep` refuses (a delisted pair): its memory is released.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut symbols = self.symbols.lock().expect("trade book lock");
        symbols.retain(|symbol, _| keep(symbol));
    }

    /// Where a gap in `symbol`'s trades would start: its newest trade seen, or its backfill
    /// start before any. `None`: nothing to catch up on.
    pub fn cursor(&self, symbol: &str) -> Option<Cursor> {
        self.with(symbol, |seen| self.cursor_of(seen))
    }

    /// A `te` or `tu`: records the trade; false when it was seen before.
    pub fn admit(&self, symbol: &str, t: &TradeValues) -> bool {
        let p = (t.mts, t.id);
        self.with(symbol, |seen| {
            let new = seen.is_new(p);
            if new {
                seen.insert(p);
            }
            new
        })
    }

    /// A snapshot received at `now_ms`: the trades not seen before, oldest first, and the range
    /// between the newest trade seen before it (or the backfill horizon) and its oldest trade,
    /// which REST history must fill. The book holds that range as a gap from now on.
    pub fn admit_snapshot(
        &self,
        symbol: &str,
        mut trades: Vec<TradeValues>,
        now_ms: i64,
    ) -> (Admitted, Option<Fetch>) {
        trades.sort_by_key(|t| (t.mts, t.id));
        self.with(symbol, |seen| {
            let from = self.cursor_of(seen);
            let oldest = trades.first().map(|t| (t.mts, t.id));
            let fetch = match (from, oldest) {
                // A snapshot that reaches back to what we saw leaves no gap.
                (Some(from), Some(oldest)) if oldest <= from.at => None,
                (Some(from), Some(oldest)) => {
                    seen.open_gap(from.at, oldest);
                    Some(Fetch {
                        from_ms: from.at.0,
                        until_ms: oldest.0,
                        backfill: from.backfill,
                    })
                }
                // An empty snapshot: Bitfinex holds no recent trade of the symbol. The fetch up to
                // now is a safeguard, without a gap: what it can find came as `te` since, above the
                // newest trade, where the window judges it.
                (Some(from), None) => Some(Fetch {
                    from_ms: from.at.0,
                    until_ms: now_ms,
                    backfill: from.backfill,
                }),
                (None, _) => None,
            };
            let mut admitted = Admitted::default();
            for t in trades {
                let p = (t.mts, t.id);
                if seen.is_new(p) {
                    seen.insert(p);
                    admitted.new.push(t);
                } else {
                    admitted.repeats += 1;
                }
            }
            (admitted, fetch)
        })
    }

    /// One page of REST history for `[from_ms, until_ms]` of exchange time, which it holds
    /// completely: the trades not seen before. Trades after `until_ms` are left out (neither new
    /// nor repeats), for the next page to bring.
    pub fn admit_page(
        &self,
        symbol: &str,
        from_ms: i64,
        until_ms: i64,
        mut trades: Vec<TradeValues>,
    ) -> Admitted {
        trades.retain(|t| t.mts <= until_ms);
        trades.sort_by_key(|t| (t.mts, t.id));
        self.with(symbol, |seen| {
            let mut admitted = Admitted::default();
            for t in trades {
                let p = (t.mts, t.id);
                if !seen.is_new(p) {
                    admitted.repeats += 1;
                    continue;
                }
                // The page's whole range leaves the gaps below, at once: one trade at a time
                // would split a gap at each.
                if t.mts < from_ms {
                    seen.insert(p);
                } else {
                    seen.remember(p);
                }
                admitted.new.push(t);
            }
            seen.cover((from_ms, i64::MIN), (until_ms, i64::MAX));
            admitted
        })
    }

    #[cfg(test)]
    fn footprint(&self, symbol: &str) -> (usize, usize, usize, u64) {
        let symbols = self.symbols.lock().unwrap();
        let seen = &symbols[symbol];
        let bytes = seen.window.capacity() * size_of::<Position>()
            + seen.gaps.capacity() * size_of::<Gap>()
            + size_of::<Seen>();
        (seen.window.len(), seen.gaps.len(), bytes, seen.merged)
    }
}

/// How far a page of REST history for `[start_ms, until_ms]` holds every trade: all of it unless
/// the page is full, which may end inside its last millisecond; then up to the millisecond before
/// it, where the next page starts. (A full page within one millisecond is all there is to have.)
pub fn complete_until(start_ms: i64, until_ms: i64, full: bool, last_mts: Option<i64>) -> i64 {
    match last_mts {
        Some(mts) if full && mts > start_ms => mts - 1,
        Some(mts) if full => mts,
        _ => until_ms,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const S: &str = "tBTCUSD";

    fn t(id: i64, mts: i64) -> TradeValues {
        TradeValues {
            id,
            mts,
            amount: 1.0,
            price: 1.0,
        }
    }

    fn ids(a: &Admitted) -> Vec<i64> {
        a.new.iter().map(|t| t.id).collect()
    }

    #[test]
    fn book_drops_repeats_and_tracks_the_newest_trade() {
        let book = TradeBook::new(Some(1_000), HashMap::new());
        assert_eq!(
            book.cursor(S).map(|c| c.at.0),
            Some(1_000),
            "the backfill horizon before any trade"
        );
        assert!(book.admit(S, &t(5, 2_000)));
        assert!(book.admit(S, &t(6, 2_000)));
        assert!(!book.admit(S, &t(5, 2_000)), "te then tu");
        assert!(
            book.admit(S, &t(3, 1_500)),
            "an older trade, in the window, is still new"
        );
        assert!(!book.admit(S, &t(5, 2_000)));
        assert!(book.admit("tETHUSD", &t(5, 2_000)), "books are per symbol");
        assert_eq!(
            book.cursor(S).map(|c| (c.at, c.backfill)),
            Some(((2_000, 6), false))
        );
        assert_eq!(TradeBook::new(None, HashMap::new()).cursor(S), None);
    }

    #[test]
    fn a_snapshot_opens_a_gap_back_to_the_newest_trade_seen() {
        let book = TradeBook::new(Some(1_000), HashMap::new());
        let (first, fetch) = book.admit_snapshot(S, vec![t(9, 3_000), t(8, 2_900)], 10_000);
        assert_eq!(ids(&first), [8, 9], "oldest first");
        assert_eq!(
            fetch,
            Some(Fetch {
                from_ms: 1_000,
                until_ms: 2_900,
                backfill: true,
            }),
            "at start: from the backfill horizon"
        );
        let (again, fetch) = book.admit_snapshot(S, vec![t(10, 3_000), t(9, 3_000)], 10_000);
        assert_eq!((ids(&again), again.repeats), (vec![10], 1));
        assert_eq!(fetch, None, "it reaches back to what was seen");
        let (_, fetch) = book.admit_snapshot(S, vec![t(30, 5_000)], 10_000);
        assert_eq!(
            fetch,
            Some(Fetch {
                from_ms: 3_000,
                until_ms: 5_000,
                backfill: false,
            })
        );
        let (_, fetch) = book.admit_snapshot(S, vec![], 10_000);
        assert_eq!(
            fetch,
            Some(Fetch {
                from_ms: 5_000,
                until_ms: 10_000,
                backfill: false,
            }),
            "an empty snapshot: up to now"
        );
        let (_, fetch) =
            TradeBook::new(None, HashMap::new()).admit_snapshot(S, vec![t(1, 1)], 10_000);
        assert_eq!(
            fetch, None,
            "no backfill and nothing seen: nothing to fetch"
        );
    }

    /// A restart: Kafka held trades up to (2 000, 6). The backfill starts there, not at the
    /// horizon; the snapshot's trades Kafka held are not sent again; the window judges the rest.
    #[test]
    fn a_resumed_symbol_backfills_from_the_newest_trade_kafka_held() {
        let resumed = HashMap::from([(S.to_string(), (2_000, 6)), ("tOLD".to_string(), (10, 1))]);
        let book = TradeBook::new(Some(1_000), resumed);
        assert_eq!(
            book.cursor(S),
            Some(Cursor {
                at: (2_000, 6),
                backfill: true
            })
        );
        assert_eq!(
            book.cursor("tOLD").map(|c| c.at),
            Some((1_000, i64::MIN)),
            "never further back than the horizon"
        );
        let (first, fetch) = book.admit_snapshot(
            S,
            vec![t(5, 2_000), t(6, 2_000), t(7, 2_000), t(9, 2_500)],
            9_000,
        );
        assert_eq!(
            (ids(&first), first.repeats),
            (vec![7, 9], 2),
            "the two Kafka held are repeats"
        );
        assert_eq!(fetch, None, "the snapshot reaches back to what Kafka held");
        let (_, fetch) = book.admit_snapshot("tNEW", vec![t(1, 3_000)], 9_000);
        assert_eq!(
            fetch.map(|f| (f.from_ms, f.backfill)),
            Some((1_000, true)),
            "a symbol Kafka did not hold: from the horizon"
        );
        let page = book.admit_page(S, 1_000, 2_500, vec![t(4, 1_500), t(6, 2_000), t(8, 2_100)]);
        assert_eq!(
            (ids(&page), page.repeats),
            (vec![8], 2),
            "a page reaching below it"
        );
    }

    /// Fills the window with live trades above `mts`, so that what lies below is judged by the
    /// gaps alone.
    fn fill_window(book: &TradeBook, mts: i64) {
        for i in 0..WINDOW as i64 {
            assert!(book.admit(S, &t(1_000_000 + i, mts + i)));
        }
    }

    #[test]
    fn below_the_window_only_a_gap_holds_new_trades() {
        let book = TradeBook::new(Some(100), HashMap::new());
        // A snapshot at 500 opens the gap (horizon, 500).
        book.admit_snapshot(S, vec![t(50, 500)], 0);
        fill_window(&book, 1_000);
        assert!(
            !book.admit(S, &t(50, 500)),
            "the snapshot's trade, below the window"
        );
        assert!(!book.admit(S, &t(1_000_000, 1_000)), "a tu past the window");
        assert!(
            !book.admit(S, &t(7, 99)),
            "below the horizon: never fetched"
        );
        // Pages of the gap, each complete up to its range's end; within a millisecond, rows come
        // in any order, and the millisecond a full page ends in is left to the next page.
        let page = book.admit_page(S, 100, 199, vec![t(2, 150), t(1, 150), t(3, 200)]);
        assert_eq!((ids(&page), page.repeats), (vec![1, 2], 0));
        let page = book.admit_page(S, 200, 500, vec![t(4, 200), t(3, 200), t(50, 500)]);
        assert_eq!(
            (ids(&page), page.repeats),
            (vec![3, 4], 1),
            "the snapshot's trade"
        );
        let again = book.admit_page(S, 100, 500, vec![t(1, 150), t(3, 200), t(4, 200)]);
        assert_eq!(
            (again.new.len(), again.repeats),
            (0, 3),
            "a repair run again brings nothing twice"
        );
        assert!(
            !book.admit(S, &t(5, 300)),
            "the gap is closed: nothing below the window is new"
        );
        assert_eq!(book.footprint(S).1, 0, "no gap left");
    }

    #[test]
    fn a_te_out_of_order_or_a_tu_without_its_te_is_new_in_the_window() {
        let book = TradeBook::new(None, HashMap::new());
        assert!(book.admit(S, &t(10, 1_000)));
        assert!(
            book.admit(S, &t(9, 1_000)),
            "same millisecond, lower id, later"
        );
        assert!(book.admit(S, &t(8, 999)), "earlier millisecond, later");
        assert!(!book.admit(S, &t(9, 1_000)));
        // The `te` of 11 was lost; its `tu` is the only copy.
        assert!(book.admit(S, &t(12, 1_002)));
        assert!(book.admit(S, &t(11, 1_001)));
    }

    #[test]
    fn a_trade_admitted_inside_a_gap_is_taken_out_of_it() {
        let book = TradeBook::new(Some(100), HashMap::new());
        book.admit_snapshot(S, vec![t(50, 500)], 0);
        // The `tu` of a trade a disconnect had kept from the socket.
        assert!(book.admit(S, &t(20, 300)));
        fill_window(&book, 1_000);
        let page = book.admit_page(S, 100, 500, vec![t(19, 299), t(20, 300), t(21, 301)]);
        assert_eq!((ids(&page), page.repeats), (vec![19, 21], 1));
    }

    #[test]
    fn too_many_gaps_merge_the_oldest_and_drop_nothing() {
        let book = TradeBook::new(None, HashMap::new());
        assert!(book.admit(S, &t(0, 0)));
        // Each snapshot skips ahead: one gap per disconnect, none of them repaired yet.
        for k in 1..=(MAX_GAPS as i64 + 5) {
            book.admit_snapshot(S, vec![t(k * 10, k * 10)], 0);
        }
        let (_, gaps, bytes, merged) = book.footprint(S);
        assert_eq!((gaps, merged), (MAX_GAPS, 5));
        assert!(bytes <= BYTES_PER_SYMBOL);
        fill_window(&book, 1_000);
        for k in 0..(MAX_GAPS as i64 + 5) {
            let missed = t(k * 10 + 5, k * 10 + 5);
            assert!(book.admit(S, &missed), "a missed trade of gap {k} is new");
        }
    }

    /// Issue 18: a 100 000-trade backfill, ten full pages plus the snapshot's millisecond, while
    /// `te` frames flow and their `tu` comes, some within the window and some long after it moved
    /// on, with a snapshot sent again and a page fetched twice in between. The book stays within
    /// its bound throughout and admits every trade exactly once.
    #[test]
    fn a_100_000_trade_backfill_under_te_and_tu_stays_bounded_and_admits_each_trade_once() {
        const HISTORY: i64 = 100_000;
        use crate::exchange::bitfinex::rest::PAGE;
        // History: 1-4 trades per millisecond, so that pages end inside one; ids follow no order
        // within a millisecond.
        let mut history = Vec::new();
        let (mut mts, mut id) = (1_000, 0);
        while history.len() < HISTORY as usize + 30 {
            let group = 1 + (mts * 7_919 % 101) % 4;
            for j in 0..group {
                history.push(t(id + (j + 1) % group, mts));
            }
            id += group;
            mts += 1;
        }
        history.truncate(HISTORY as usize + 30);
        history.sort_by_key(|t| (t.mts, t.id));
        let snapshot: Vec<TradeValues> =
            history[HISTORY as usize..].iter().rev().copied().collect();
        let oldest_ms = snapshot.last().unwrap().mts;
        // A page as REST answers it: by time, ties in any order (here: ids descending).
        let rest = |start: i64, until: i64| -> Vec<TradeValues> {
            let mut rows: Vec<TradeValues> = history
                .iter()
                .filter(|t| start <= t.mts && t.mts <= until)
                .copied()
                .collect();
            rows.sort_by_key(|t| (t.mts, std::cmp::Reverse(t.id)));
            rows.truncate(PAGE);
            rows
        };

        let book = TradeBook::new(Some(0), HashMap::new());
        let mut sent: HashMap<i64, usize> = HashMap::new();
        let mut record = |new: &[TradeValues]| {
            for t in new {
                *sent.entry(t.id).or_default() += 1;
            }
        };
        let check = |book: &TradeBook| {
            let (window, gaps, bytes, merged) = book.footprint(S);
            assert!(window <= WINDOW && bytes <= BYTES_PER_SYMBOL);
            assert!(gaps <= 1 && merged == 0, "the backfill's gap alone");
        };
        let (first, fetch) = book.admit_snapshot(S, snapshot.clone(), 0);
        record(&first.new);
        let fetch = fetch.expect("a backfill");
        assert_eq!((fetch.from_ms, fetch.until_ms), (0, oldest_ms));

        // Live trading above the history: 700 `te` per page, each `tu` 0 or 3 pages later.
        let live_ms = mts + 1_000;
        let mut live: Vec<TradeValues> = Vec::new();
        let mut pending_tu: Vec<(usize, TradeValues)> = Vec::new();
        let (mut start, mut pages, mut last_page) = (fetch.from_ms, 0, (0, 0));
        let mut cut_inside = 0;
        loop {
            let rows = rest(start, fetch.until_ms);
            let full = rows.len() >= PAGE;
            let last = rows.iter().map(|t| t.mts).max();
            let complete = complete_until(start, fetch.until_ms, full, last);
            cut_inside += usize::from(
                full && rows.iter().filter(|t| Some(t.mts) == last).count()
                    < history.iter().filter(|t| Some(t.mts) == last).count(),
            );
            record(&book.admit_page(S, start, complete, rows).new);
            check(&book);
            pages += 1;
            for k in 0..700 {
                let n = live.len() as i64;
                // Two trades per millisecond, the higher id first.
                let te = t(
                    HISTORY * 10 + n + if k % 2 == 0 { 1 } else { -1 },
                    live_ms + n / 2,
                );
                live.push(te);
                if book.admit(S, &te) {
                    record(&[te]);
                }
                pending_tu.push((pages + if k % 2 == 0 { 0 } else { 3 }, te));
            }
            for (_, tu) in pending_tu.extract_if(.., |(due, _)| *due <= pages) {
                assert!(!book.admit(S, &tu), "tu {} taken as new", tu.id);
            }
            check(&book);
            if pages == 4 {
                let (again, fetch) = book.admit_snapshot(S, snapshot.clone(), 0);
                assert_eq!((again.new.len(), fetch), (0, None), "a snapshot sent again");
                let (from, until) = last_page;
                let again = book.admit_page(S, from, until, rest(from, until));
                assert!(again.new.is_empty(), "a page fetched twice");
            }
            last_page = (start, complete);
            match crate::exchange::bitfinex::rest::next_trades_page(start, full, last) {
                Some(next) => start = next,
                None => break,
            }
        }
        for (_, tu) in pending_tu {
            assert!(!book.admit(S, &tu), "tu {} taken as new", tu.id);
        }
        check(&book);
        assert_eq!(pages, 11, "ten full pages and the rest");
        assert!(
            cut_inside > 5,
            "pages that end inside a millisecond: {cut_inside}"
        );
        let all: Vec<i64> = history.iter().chain(&live).map(|t| t.id).collect();
        assert_eq!(sent.len(), all.len(), "every trade admitted");
        assert!(all.iter().all(|id| sent.get(id) == Some(&1)), "each once");
        assert_eq!(
            BYTES_PER_SYMBOL, 17_496,
            "the figure in the module documentation"
        );
    }
}
