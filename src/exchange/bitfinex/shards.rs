//! The websocket shards: the channels of every streamed symbol spread over connections of at most
//! `channels_per_connection` channels, kept in step with the symbol set as it changes.
//!
//! A change moves as little as it can: a channel stays on the connection it is on, a removed one
//! is unsubscribed there, a new one goes where a connection has room (a subscribe on an open
//! connection costs no connection open), and only what does not fit opens new connections. A
//! connection left with no channel is closed. Every open, at start, on listing changes and on
//! reconnects, waits for the shared connection limiter (see [`super::ws`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Ctx, Sub, subscriptions, ws};
use crate::telemetry::metric;

pub(super) type Layout = BTreeMap<usize, BTreeSet<Sub>>;

/// Fits `wanted` into `layout` (shard id → its channels) with at most `per_connection` channels
/// per shard: keeps what stays, drops what goes, fills free room in shard order, then opens new
/// shards (ids from `next_id`). Shards left empty are removed.
pub(super) fn place(
    layout: &mut Layout,
    wanted: &BTreeSet<Sub>,
    per_connection: usize,
    next_id: &mut usize,
) {
    for subs in layout.values_mut() {
        subs.retain(|s| wanted.contains(s));
    }
    layout.retain(|_, subs| !subs.is_empty());
    let placed: BTreeSet<&Sub> = layout.values().flatten().collect();
    let mut new = wanted
        .iter()
        .filter(|s| !placed.contains(s))
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
        .peekable();
    for subs in layout.values_mut() {
        while subs.len() < per_connection {
            match new.next() {
                Some(sub) => subs.insert(sub),
                None => return,
            };
        }
    }
    while new.peek().is_some() {
        layout.insert(*next_id, new.by_ref().take(per_connection).collect());
        *next_id += 1;
    }
}

/// Keeps one websocket shard per entry of the layout until cancelled, following the symbols.
pub(super) async fn run(ctx: Arc<Ctx>) {
    let mut symbols = ctx.symbols.subscribe();
    let mut layout = Layout::new();
    let mut next_id = 0;
    // Dropping a shard's sender retires it: it unsubscribes, closes and ends.
    let mut shards: HashMap<usize, watch::Sender<BTreeSet<Sub>>> = HashMap::new();
    let mut tasks = JoinSet::new();
    loop {
        let wanted: BTreeSet<Sub> = subscriptions(&ctx.cfg, symbols.borrow_and_update().iter())
            .into_iter()
            .collect();
        place(
            &mut layout,
            &wanted,
            ctx.cfg.channels_per_connection,
            &mut next_id,
        );
        shards.retain(|id, _| layout.contains_key(id));
        for (&id, subs) in &layout {
            match shards.get(&id) {
                Some(tx) => {
                    tx.send_if_modified(|current| {
                        let changed = current != subs;
                        current.clone_from(subs);
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(subs.clone());
                    tasks.spawn(ws::supervise(ctx.clone(), id, rx));
                    shards.insert(id, tx);
                }
            }
        }
        metrics::gauge!(metric::SHARDS).set(shards.len() as f64);
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => break,
            changed = symbols.changed() => if changed.is_err() { break },
            Some(ended) = tasks.join_next() => {
                if let Err(e) = ended {
                    tracing::error!(error = %e, "websocket shard panicked");
                }
            }
        }
    }
    // The shards drain on cancellation themselves; their senders stay until they have.
    while let Some(ended) = tasks.join_next().await {
        if let Err(e) = ended {
            tracing::error!(error = %e, "websocket shard panicked");
        }
    }
    drop(shards);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::bitfinex::Channel;

    fn subs(symbols: std::ops::Range<usize>) -> BTreeSet<Sub> {
        symbols
            .flat_map(|i| {
                [Channel::Ticker, Channel::Trades].map(|channel| Sub {
                    channel,
                    symbol: format!("tS{i:03}USD"),
                })
            })
            .collect()
    }

    fn all(layout: &Layout) -> BTreeSet<Sub> {
        layout.values().flatten().cloned().collect()
    }

    #[test]
    fn three_hundred_pairs_take_twenty_four_connections_of_at_most_twenty_five() {
        let (mut layout, mut next) = (Layout::new(), 0);
        place(&mut layout, &subs(0..300), 25, &mut next);
        assert_eq!(layout.len(), 24);
        assert!(layout.values().all(|s| s.len() <= 25));
        assert_eq!(all(&layout), subs(0..300));
    }

    #[test]
    fn changes_move_nothing_that_stays_and_fill_room_before_opening() {
        let (mut layout, mut next) = (Layout::new(), 0);
        place(&mut layout, &subs(0..30), 25, &mut next);
        assert_eq!(layout.len(), 3, "60 channels: 25 + 25 + 10");
        let before = layout.clone();

        // Delist 5 pairs of the first shard, list 4 new: the new ones fill the freed room.
        let mut wanted = subs(0..30);
        for s in subs(0..5) {
            wanted.remove(&s);
        }
        wanted.extend(subs(100..104));
        place(&mut layout, &wanted, 25, &mut next);
        assert_eq!(all(&layout), wanted);
        assert_eq!(layout.len(), 3, "no new connection for what fits");
        for (id, subs) in &before {
            let kept: BTreeSet<_> = subs.intersection(&wanted).collect();
            assert!(
                kept.iter().all(|s| layout[id].contains(s)),
                "shard {id} kept its channels"
            );
        }
        assert!(layout.values().all(|s| s.len() <= 25));

        // 20 more pairs, 40 channels: the room left on open shards first, then one new shard.
        wanted.extend(subs(200..220));
        place(&mut layout, &wanted, 25, &mut next);
        assert_eq!(all(&layout), wanted);
        assert!(layout.values().all(|s| s.len() <= 25));
        assert_eq!(layout.len(), wanted.len().div_ceil(25));

        // Everything delisted: every shard retired.
        place(&mut layout, &BTreeSet::new(), 25, &mut next);
        assert!(layout.is_empty());
    }
}
