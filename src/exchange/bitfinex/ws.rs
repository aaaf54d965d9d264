//! One websocket connection ("shard") for up to 25 channels (ticker and trades), its reconnect
//! loop, and the connection limit every open of every shard goes through.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

use super::message::{
    ChannelMessage, ERROR_CHANNEL_LIMIT, ERROR_SUBSCRIPTION_FAILED, Event, FLAG_SEQ_ALL,
    FLAG_TIMESTAMP, Frame, INFO_MAINTENANCE_END, INFO_MAINTENANCE_START, INFO_RECONNECT, Payload,
    TickerError, TickerValues, TimeOutOfRange, parse_frame,
};
use super::{Channel, Ctx, ExchangeError, Sub, now_ms, trades};
use crate::model::{Record, Source};
use crate::retry::{Verdict, retry_letting_attempts_finish};
use crate::telemetry::{metric, truncate};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long shutdown waits for the server to confirm unsubscribes.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Frames handled in a row while the socket has more ready (see `Session::run`).
const READY_BATCH: usize = 64;

/// Ticker and trade frames are a few hundred bytes, a trades snapshot a few kilobytes; anything
/// near this is not a frame we want to buffer.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// How a session ended when it was not an error.
enum End {
    Cancelled,
    /// The shard has no channel left (its symbols were delisted): it closed and ends.
    Retired,
    /// Info 20051: the server restarts; reconnect (through the connection limiter).
    ServerRestart,
    /// A connection that had worked (a channel was subscribed) failed: reconnect at once, and
    /// back off only if that fails too.
    Lost(ExchangeError),
}

/// The channels a shard should hold; the sender is dropped when the shard is retired.
pub(super) type Wanted = watch::Receiver<BTreeSet<Sub>>;

/// Keeps one shard connected until cancelled or retired.
pub(super) async fn supervise(ctx: Arc<Ctx>, shard: usize, wanted: Wanted) {
    loop {
        // A session drains on cancellation (unsubscribe, read what was sent): not cut short.
        let ended = retry_letting_attempts_finish(
            ctx.cfg.reconnect_backoff(),
            &ctx.cancel,
            || connect(&ctx, shard, wanted.clone()),
            |e, wait| {
                if !e.is_retryable() {
                    return Verdict::Fail;
                }
                metrics::counter!(metric::RECONNECTS, "reason" => reconnect_reason(e)).increment(1);
                tracing::warn!(shard, error = %e, ?wait, "websocket lost; reconnecting after backoff");
                Verdict::Retry
            },
        )
        .await;
        match ended {
            Ok(End::Cancelled | End::Retired) | Err(_) => return,
            Ok(End::ServerRestart) => {
                metrics::counter!(metric::RECONNECTS, "reason" => "server_restart").increment(1);
                tracing::info!(shard, "server restarting (20051); reconnecting");
            }
            Ok(End::Lost(e)) => {
                metrics::counter!(metric::RECONNECTS, "reason" => reconnect_reason(&e))
                    .increment(1);
                tracing::warn!(shard, error = %e, "websocket lost; reconnecting");
            }
        }
    }
}

/// Resolves once the shard is retired (its sender dropped).
async fn retired(mut wanted: Wanted) {
    while wanted.changed().await.is_ok() {}
}

/// One connection, under the connection limit, until it ends.
///
/// Every open of every shard passes here: at start, when new listings need a shard, and on
/// every reconnect (20051, a drop, a stale socket), so a storm on all connections at once is
/// spread out like a start. The limiter spaces opens 60/n seconds apart with no burst. After a
/// 429 on an upgrade, opens are held for `reconnect_backoff_max` on every shard: Bitfinex counts
/// per IP, and any open meanwhile would count against the same minute.
async fn connect(ctx: &Arc<Ctx>, shard: usize, wanted: Wanted) -> Result<End, ExchangeError> {
    if wanted.has_changed().is_err() {
        return Ok(End::Retired);
    }
    let held = || {
        let until = *ctx.opens_held_until.lock().expect("opens hold lock");
        until.filter(|until| *until > tokio::time::Instant::now())
    };
    let ready = async {
        loop {
            if let Some(until) = held() {
                tokio::time::sleep_until(until).await;
            }
            ctx.connects.until_ready().await;
            // A 429 may have come while this shard waited for its slot.
            if held().is_none() {
                break;
            }
        }
    };
    tokio::select! {
        biased;
        _ = ctx.cancel.cancelled() => return Ok(End::Cancelled),
        _ = retired(wanted.clone()) => return Ok(End::Retired),
        _ = ready => {}
    }
    let mut session = Session::new(ctx, shard, wanted);
    let outcome = session.run().await;
    ctx.coverage
        .uncover(session.current.iter().chain(session.channels.values()));
    match outcome {
        Err(ExchangeError::UpgradeRateLimited) => {
            let until = tokio::time::Instant::now() + ctx.cfg.reconnect_backoff_max;
            *ctx.opens_held_until.lock().expect("opens hold lock") = Some(until);
            tracing::warn!(
                shard,
                hold = ?ctx.cfg.reconnect_backoff_max,
                "Bitfinex answered the websocket upgrade with 429; every shard holds its opens"
            );
            Err(ExchangeError::UpgradeRateLimited)
        }
        Err(e) if session.subscribed && e.is_retryable() => Ok(End::Lost(e)),
        other => other,
    }
}

fn reconnect_reason(e: &ExchangeError) -> &'static str {
    match e {
        ExchangeError::Stale(_) => "stale",
        ExchangeError::Closed(_) => "closed",
        ExchangeError::Connect(_) | ExchangeError::ConnectTimeout(_) => "connect",
        ExchangeError::UpgradeRateLimited => "rate_limited",
        _ => "error",
    }
}

struct Session<'a> {
    ctx: &'a Arc<Ctx>,
    shard: usize,
    wanted: Wanted,
    /// The channels this session holds or has asked for: the shard's wanted set when last read.
    current: BTreeSet<Sub>,
    channels: HashMap<u64, Sub>,
    /// Subscriptions asked for and not yet answered with `subscribed` or an error.
    pending: HashSet<Sub>,
    /// Wanted, but not asked for yet: the connection had no room (see [`Session::subscribe`]).
    deferred: VecDeque<Sub>,
    /// Channels no longer wanted whose unsubscribe was sent: not asked to leave twice.
    leaving: HashSet<u64>,
    /// Channels Bitfinex subscribed that this session did not ask for (or no longer knew it
    /// asked for), unsubscribed at once: they count on Bitfinex's side until it confirms.
    strays: HashSet<u64>,
    /// Shutting down: whatever gets subscribed now is unsubscribed at once.
    draining: bool,
    last_seq: Option<u64>,
    /// True once any channel was subscribed: the connection worked, so backoff starts over.
    subscribed: bool,
    frames: FrameCounters,
}

impl<'a> Session<'a> {
    fn new(ctx: &'a Arc<Ctx>, shard: usize, mut wanted: Wanted) -> Self {
        let current = wanted.borrow_and_update().clone();
        Self {
            ctx,
            shard,
            wanted,
            current,
            channels: HashMap::new(),
            pending: HashSet::new(),
            deferred: VecDeque::new(),
            leaving: HashSet::new(),
            strays: HashSet::new(),
            draining: false,
            last_seq: None,
            subscribed: false,
            frames: FrameCounters::register(),
        }
    }

    async fn run(&mut self) -> Result<End, ExchangeError> {
        let cfg = &self.ctx.cfg;
        let limits = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let connect = connect_async_with_config(cfg.ws_url.as_str(), Some(limits), true);
        let (mut ws, _) = tokio::time::timeout(cfg.request_timeout, connect)
            .await
            .map_err(|_| ExchangeError::ConnectTimeout(cfg.request_timeout))?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r)
                    if r.status() == StatusCode::TOO_MANY_REQUESTS =>
                {
                    ExchangeError::UpgradeRateLimited
                }
                e => ExchangeError::Connect(Box::new(e)),
            })?;
        tracing::info!(shard = self.shard, url = %cfg.ws_url, channels = self.current.len(), "websocket connected");
        metrics::gauge!(metric::LAST_CONNECT).set(now_ms() as f64 / 1000.0);
        send(
            &mut ws,
            json!({"event": "conf", "flags": FLAG_TIMESTAMP | FLAG_SEQ_ALL}),
        )
        .await?;
        self.subscribe_all(&mut ws).await?;
        // One for the whole session: a new one per frame locks and registers a waiter each time.
        let cancelled = self.ctx.cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            let next = tokio::select! {
                _ = &mut cancelled => return Ok(self.drain(&mut ws).await),
                changed = self.wanted.changed() => {
                    if changed.is_err() {
                        self.drain(&mut ws).await;
                        tracing::info!(shard = self.shard, "no channel left on this connection; closed");
                        return Ok(End::Retired);
                    }
                    self.follow(&mut ws).await?;
                    continue;
                }
                next = tokio::time::timeout(cfg.heartbeat_timeout, ws.next()) => next,
            };
            let Ok(mut next) = next else {
                return Err(ExchangeError::Stale(cfg.heartbeat_timeout));
            };
            // Frames already read off the socket are handled without going back through the
            // select above: its futures and the heartbeat timer, set up again for every frame,
            // cost more than a `te` frame's handling (see the README's benchmark notes). At most
            // READY_BATCH of them, so that shutdown and channel changes wait for little.
            for handled in 1..=READY_BATCH {
                if let Some(end) = self.on_message(next, &mut ws).await? {
                    return Ok(end);
                }
                if handled == READY_BATCH {
                    break;
                }
                match ws.next().now_or_never() {
                    Some(ready) => next = ready,
                    None => break,
                }
            }
        }
    }

    async fn on_message(
        &mut self,
        next: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        ws: &mut Socket,
    ) -> Result<Option<End>, ExchangeError> {
        let msg = match next {
            None => {
                return Err(ExchangeError::Closed(
                    "stream ended without a close frame".into(),
                ));
            }
            Some(Err(e)) => return Err(ExchangeError::Socket(Box::new(e))),
            Some(Ok(msg)) => msg,
        };
        match msg {
            Message::Text(text) => return self.on_text(text.as_str(), ws).await,
            Message::Close(frame) => {
                let why = frame.map_or("no close frame".into(), |f| {
                    format!("{} {}", f.code, f.reason)
                });
                return Err(ExchangeError::Closed(why));
            }
            Message::Binary(_) => self.frames.count("unknown"),
            _ => {}
        }
        Ok(None)
    }

    /// Unsubscribes every channel and keeps reading until the server confirms, so that every
    /// update it sent before it stopped still reaches Kafka. Bounded by [`DRAIN_TIMEOUT`].
    async fn drain(&mut self, ws: &mut Socket) -> End {
        self.draining = true;
        let channels: Vec<u64> = self.channels.keys().copied().collect();
        for chan_id in channels {
            if send(ws, json!({"event": "unsubscribe", "chanId": chan_id}))
                .await
                .is_err()
            {
                break;
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while !self.channels.is_empty() || !self.pending.is_empty() {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    if self.on_text(text.as_str(), ws).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        if !self.channels.is_empty() || !self.pending.is_empty() {
            tracing::warn!(
                shard = self.shard,
                channels = self.channels.len(),
                pending = self.pending.len(),
                "closing before the exchange confirmed every unsubscribe"
            );
        }
        let _ = ws.close(None).await;
        End::Cancelled
    }

    async fn subscribe_all(&mut self, ws: &mut Socket) -> Result<(), ExchangeError> {
        let subs: Vec<Sub> = self.current.iter().cloned().collect();
        for sub in subs {
            self.subscribe(ws, sub).await?;
        }
        Ok(())
    }

    /// Asks for `sub`, or defers it while the connection has no room: a channel whose
    /// unsubscribe is not confirmed yet, or whose subscribe is still pending (a delisted symbol
    /// is unsubscribed only once subscribed), may still count on Bitfinex's side, and the 26th
    /// channel of a connection is refused (10305).
    async fn subscribe(&mut self, ws: &mut Socket, sub: Sub) -> Result<(), ExchangeError> {
        if !self.has_room() {
            self.deferred.push_back(sub);
            return Ok(());
        }
        send(
            ws,
            json!({"event": "subscribe", "channel": sub.channel.name(), "symbol": sub.symbol}),
        )
        .await?;
        self.pending.insert(sub);
        Ok(())
    }

    /// Whether one more channel fits: every channel Bitfinex may count for this connection
    /// (held, asked for, or stray and being left) is counted.
    fn has_room(&self) -> bool {
        self.channels.len() + self.pending.len() + self.strays.len()
            < self.ctx.cfg.channels_per_connection
    }

    /// Asks for deferred channels still wanted, as far as the connection has room.
    async fn subscribe_deferred(&mut self, ws: &mut Socket) -> Result<(), ExchangeError> {
        while self.has_room() && !self.draining {
            let Some(sub) = self.deferred.pop_front() else {
                break;
            };
            let asked = self.pending.contains(&sub) || self.channels.values().any(|c| *c == sub);
            if self.current.contains(&sub) && !asked {
                self.subscribe(ws, sub).await?;
            }
        }
        Ok(())
    }

    /// The shard's channels changed (listing changes, a refused symbol): unsubscribes what went,
    /// subscribes what came, on this connection.
    async fn follow(&mut self, ws: &mut Socket) -> Result<(), ExchangeError> {
        let next = self.wanted.borrow_and_update().clone();
        let gone: Vec<u64> = self
            .channels
            .iter()
            .filter(|(chan_id, sub)| !next.contains(sub) && !self.leaving.contains(chan_id))
            .map(|(&chan_id, _)| chan_id)
            .collect();
        for chan_id in gone {
            send(ws, json!({"event": "unsubscribe", "chanId": chan_id})).await?;
            self.leaving.insert(chan_id);
        }
        // Pending ones that went are unsubscribed when their `subscribed` comes.
        let gone: Vec<&Sub> = self.current.difference(&next).collect();
        self.ctx.coverage.uncover(gone);
        let came: Vec<Sub> = next.difference(&self.current).cloned().collect();
        self.deferred.retain(|s| next.contains(s));
        self.current = next;
        for sub in came {
            self.subscribe(ws, sub).await?;
        }
        Ok(())
    }

    async fn on_text(&mut self, text: &str, ws: &mut Socket) -> Result<Option<End>, ExchangeError> {
        let frame = match parse_frame(text) {
            Ok(f) => f,
            Err(e) => {
                self.frames.count("invalid");
                metrics::counter!(metric::FRAME_ERRORS).increment(1);
                tracing::warn!(shard = self.shard, error = %e, frame = %truncate(text), "unparseable frame ignored");
                return Ok(None);
            }
        };
        match frame {
            Frame::Event(event) => {
                self.frames.count("event");
                self.on_event(event, ws).await
            }
            Frame::Channel(msg) => {
                self.on_channel(msg).await?;
                Ok(None)
            }
        }
    }

    async fn on_event(
        &mut self,
        event: Event,
        ws: &mut Socket,
    ) -> Result<Option<End>, ExchangeError> {
        let shard = self.shard;
        match event {
            Event::Info {
                code: Some(INFO_RECONNECT),
                ..
            } => return Ok(Some(End::ServerRestart)),
            Event::Info {
                code: Some(INFO_MAINTENANCE_START),
                msg,
                ..
            } => {
                // Symbols stay covered: REST would only poll a platform that is paused too.
                tracing::warn!(
                    shard,
                    ?msg,
                    "exchange maintenance started (20060); pausing until 20061"
                );
            }
            Event::Info {
                code: Some(INFO_MAINTENANCE_END),
                ..
            } => {
                tracing::info!(
                    shard,
                    "exchange maintenance ended (20061); subscribing again"
                );
                // Channels stay mapped until their `unsubscribed` arrives: updates already on
                // the wire for them are still good.
                let old: Vec<u64> = self.channels.keys().copied().collect();
                for chan_id in old {
                    send(ws, json!({"event": "unsubscribe", "chanId": chan_id})).await?;
                }
                self.subscribe_all(ws).await?;
            }
            Event::Info {
                code: Some(code),
                msg,
                ..
            } => tracing::info!(shard, code, ?msg, "exchange info"),
            Event::Info {
                version, platform, ..
            } => {
                let status = platform.map(|p| p.status);
                if status == Some(0) {
                    tracing::warn!(shard, ?version, "exchange reports platform maintenance");
                } else {
                    tracing::info!(shard, ?version, ?status, "exchange hello");
                }
            }
            Event::Conf { status, flags } => {
                if status.as_deref() == Some("OK") {
                    tracing::debug!(shard, ?flags, "conf acknowledged");
                } else {
                    tracing::warn!(
                        shard,
                        ?status,
                        "conf refused; ticks fall back to receive time"
                    );
                }
            }
            Event::Subscribed {
                channel,
                chan_id,
                symbol,
            } => {
                let asked = symbol.and_then(|symbol| {
                    self.pending
                        .iter()
                        .find(|s| s.channel.name() == channel && s.symbol == symbol)
                });
                let Some(sub) = asked.cloned() else {
                    // Left subscribed, it would take room on Bitfinex's side that this session
                    // does not count, and the 26th channel would be refused.
                    tracing::warn!(shard, %channel, chan_id, "subscribed to a channel we did not ask for; unsubscribing it");
                    send(ws, json!({"event": "unsubscribe", "chanId": chan_id})).await?;
                    self.strays.insert(chan_id);
                    return Ok(None);
                };
                tracing::info!(shard, channel = sub.channel.name(), symbol = %sub.symbol, chan_id, "subscribed");
                self.pending.remove(&sub);
                self.subscribed = true;
                let wanted = self.current.contains(&sub);
                if wanted && !self.draining {
                    self.ctx.coverage.cover(&sub);
                }
                self.channels.insert(chan_id, sub);
                if self.draining || !wanted {
                    send(ws, json!({"event": "unsubscribe", "chanId": chan_id})).await?;
                }
            }
            Event::Unsubscribed { chan_id, .. } => {
                self.channels.remove(&chan_id);
                self.leaving.remove(&chan_id);
                self.strays.remove(&chan_id);
                self.subscribe_deferred(ws).await?;
            }
            Event::Error {
                code,
                msg,
                channel,
                symbol,
                pair,
            } => {
                // Errors name the symbol (older servers the pair) and mostly the channel: the
                // subscription refused is answered, and the symbol's other one still waits
                // for its own answer. Without a channel, both are taken as answered.
                let symbol = symbol.or_else(|| pair.map(|p| format!("t{p}")));
                let refused: Vec<Sub> = self
                    .pending
                    .iter()
                    .filter(|p| {
                        symbol.as_ref() == Some(&p.symbol)
                            && channel.as_deref().is_none_or(|c| c == p.channel.name())
                    })
                    .cloned()
                    .collect();
                for sub in &refused {
                    self.pending.remove(sub);
                }
                let code_label = code.map_or("none".to_string(), |c| c.to_string());
                metrics::counter!(metric::EXCHANGE_ERRORS, "code" => code_label).increment(1);
                tracing::warn!(
                    shard,
                    ?code,
                    ?msg,
                    ?channel,
                    ?symbol,
                    "exchange error event"
                );
                if code == Some(ERROR_CHANNEL_LIMIT) {
                    // Bitfinex counts a channel this session does not: asking again now would
                    // be refused again. The refused channels wait for a channel to leave (or the
                    // next connection); REST polling covers their symbols meanwhile.
                    self.deferred.extend(refused);
                    return Ok(None);
                }
                if let (Some(ERROR_SUBSCRIPTION_FAILED), Some(s)) = (code, &symbol) {
                    // Reported once; the shards then drop the symbol, so it is not asked
                    // for again on this or any connection.
                    self.ctx.symbols.reject(s, msg.as_deref());
                    self.ctx.fetches.follow(&self.ctx.symbols.current());
                }
                self.subscribe_deferred(ws).await?;
            }
            Event::Pong { cid } => tracing::debug!(shard, ?cid, "pong"),
            Event::Unknown => {
                self.frames.count("unknown");
                tracing::warn!(shard, "unknown event ignored");
            }
        }
        Ok(None)
    }

    async fn on_channel(&mut self, msg: ChannelMessage) -> Result<(), ExchangeError> {
        if let Some(seq) = msg.seq {
            self.check_sequence(seq);
        }
        let Some(sub) = self.channels.get(&msg.chan_id) else {
            self.frames.count("unknown_channel");
            metrics::counter!(metric::UNKNOWN_CHANNEL).increment(1);
            tracing::debug!(
                shard = self.shard,
                chan_id = msg.chan_id,
                "update for an unknown channel ignored"
            );
            return Ok(());
        };
        let symbol = sub.symbol.as_str();
        match (sub.channel, msg.payload) {
            (_, Payload::Heartbeat) => self.frames.count("heartbeat"),
            (_, Payload::Other(kind)) => {
                self.frames.count("unknown");
                tracing::debug!(shard = self.shard, %kind, "unhandled channel payload");
            }
            (Channel::Ticker, Payload::Ticker(raw)) => {
                self.frames.count("ticker");
                self.on_ticker(symbol, &raw, msg.seq, msg.timestamp_ms)
                    .await?;
            }
            (Channel::Trades, Payload::Trades(entries)) => {
                self.frames.count("trades_snapshot");
                trades::on_snapshot(self.ctx, symbol, entries, msg.seq).await?;
            }
            (Channel::Trades, Payload::TradeExecuted(entry)) => {
                self.frames.count("te");
                trades::on_update(self.ctx, symbol, entry, msg.seq).await?;
            }
            // Normally a repeat of the `te` already sent, which the trade book drops; should
            // the `te` have been lost, this is the trade's only copy.
            (Channel::Trades, Payload::TradeUpdated(entry)) => {
                self.frames.count("tu");
                trades::on_update(self.ctx, symbol, entry, msg.seq).await?;
            }
            (channel, _) => {
                self.frames.count("invalid");
                let rejected = if channel == Channel::Ticker {
                    metric::TICKS_REJECTED
                } else {
                    metric::TRADES_REJECTED
                };
                metrics::counter!(rejected).increment(1);
                tracing::warn!(shard = self.shard, channel = channel.name(), %symbol, "payload does not fit its channel; rejected");
            }
        }
        Ok(())
    }

    async fn on_ticker(
        &self,
        symbol: &str,
        raw: &[Option<f64>],
        seq: Option<u64>,
        timestamp_ms: Option<Result<i64, TimeOutOfRange>>,
    ) -> Result<(), ExchangeError> {
        let received_at = now_ms();
        let checked = timestamp_ms
            .transpose()
            .map_err(TickerError::from)
            .and_then(|ts| Ok((TickerValues::from_raw(raw)?, ts)));
        let (values, timestamp_ms) = match checked {
            Ok(v) => v,
            Err(e) => {
                metrics::counter!(metric::TICKS_REJECTED).increment(1);
                tracing::warn!(shard = self.shard, %symbol, error = %e, "ticker update rejected");
                return Ok(());
            }
        };
        let tick = values.into_tick(
            symbol.to_string(),
            timestamp_ms.unwrap_or(received_at),
            seq.map(|s| s as i64),
            Source::Websocket,
            received_at,
        );
        metrics::counter!(metric::TICKS_RECEIVED, "source" => "websocket").increment(1);
        self.ctx.send(Record::Tick(tick)).await
    }

    fn check_sequence(&mut self, seq: u64) {
        if let Some(last) = self.last_seq
            && seq != last + 1
        {
            let missed = seq.saturating_sub(last + 1);
            metrics::counter!(metric::SEQUENCE_GAPS).increment(1);
            metrics::counter!(metric::MISSED_MESSAGES).increment(missed);
            tracing::warn!(shard = self.shard, last, seq, missed, "sequence gap");
        }
        self.last_seq = Some(seq);
    }
}

async fn send(ws: &mut Socket, value: serde_json::Value) -> Result<(), ExchangeError> {
    ws.send(Message::text(value.to_string()))
        .await
        .map_err(|e| ExchangeError::Socket(Box::new(e)))
}

/// Every kind of `candlestream_exchange_frames_total`.
const FRAME_KINDS: [&str; 9] = [
    "event",
    "heartbeat",
    "ticker",
    "trades_snapshot",
    "te",
    "tu",
    "unknown",
    "unknown_channel",
    "invalid",
];

/// `candlestream_exchange_frames_total` by kind, registered once per connection: a registry
/// lookup per frame (building and hashing the key) costs several times the increment.
struct FrameCounters([metrics::Counter; FRAME_KINDS.len()]);

impl FrameCounters {
    fn register() -> Self {
        Self(FRAME_KINDS.map(|kind| metrics::counter!(metric::FRAMES, "kind" => kind)))
    }

    fn count(&self, kind: &'static str) {
        let i = FRAME_KINDS.iter().position(|k| *k == kind);
        debug_assert!(i.is_some(), "frame kind {kind} missing from FRAME_KINDS");
        if let Some(i) = i {
            self.0[i].increment(1);
        }
    }
}
