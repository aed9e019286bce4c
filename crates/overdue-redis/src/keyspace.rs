//! [`KeyspaceTrigger`]: Redis key-expiry notifications as an [`ExternalTrigger`] — the
//! "set a key with a TTL, act on `__keyevent@<db>__:expired`" way of closing an order on time.
//!
//! ## How it works
//!
//! The store (a SQL store with its outbox on, e.g. `sqlite:…?outbox=true`) stays the source of
//! truth; this trigger only carries *notices* `(queue, key, generation, due_at)` (see
//! `overdue_core::trigger`).
//!
//! - **publish** writes one expiring key per notice, `SET <name> "" PX <due_at - now>`, all
//!   notices of a relay round in one pipeline, and returns `Ok` once Redis has answered every
//!   command. The value is empty: the key's *name* is the notice. A failed pipeline (some
//!   commands may have run) is retried whole by the relay, which is harmless: setting the same
//!   name again gives it the same deadline, and a notice heard twice is fenced by the claim.
//! - **consume** subscribes to `__keyevent@<db>__:expired`, turns every expired key of this
//!   prefix back into its notice and hands them, in batches, to [`DueSink::deliver`]. The answer
//!   decides what happens next: `Ack` — nothing (the key is already gone); `Early` — the key is
//!   set again for the delay that is left; `Redeliver` — the key is set again with
//!   [`REDELIVER_DELAY_MS`].
//! - **start** checks `notify-keyspace-events` and turns the expired events on (adding `Ex` to
//!   whatever flags are set) if they are off and `CONFIG SET` is allowed; if it is not (managed
//!   Redis), it fails with an [`Error::Config`] that says what to configure. Every reconnect of
//!   the subscriber checks again: a restarted Redis forgets a `CONFIG SET`.
//!
//! ## Past-due notices
//!
//! A notice that is already due (a past due time, a retry of zero, `fire_now`) is not given a
//! 1 ms TTL: a key with `PX 1` waits for Redis's active expire cycle, which runs `hz` (default
//! 10) times a second and falls behind when many keys carry TTLs, so "at once" would mean 50 ms
//! to seconds. Instead it is sent with `PUBLISH` on this prefix's own channel
//! [`KeyspaceTrigger::due_channel`] (same name encoding), to which every consumer of the prefix
//! is subscribed next to the expired channel. `PUBLISH` answers how many subscribers heard it;
//! if none did (no consumer connected anywhere), the notice falls back to a `PX 1` key so that a
//! consumer that connects within the expire cycle still hears it. Either way it is as reliable
//! as an expiry event: heard by whoever is subscribed, or left to the backstop.
//!
//! ## Key encoding
//!
//! With the prefix `P` (URL parameter `prefix`, default `overdue`, the store's alphabet
//! `[A-Za-z0-9._:-]`):
//!
//! ```text
//! {P:q:<queue>}:x:<generation>:<due_at>:<key>
//! ```
//!
//! `generation` and `due_at` are decimal. The name alone rebuilds the notice, and unambiguously:
//! neither the prefix nor the queue may contain `}` (their alphabets exclude it), so the first
//! `}` ends the queue; the two numbers end at the next `:`; the key is everything after that,
//! byte for byte, so a key may contain `:`, `{`, `}` or anything else overdue's key validation
//! allows (UTF-8 without control characters). The `{…}` is the same Redis Cluster hash tag as
//! the Redis store's keys of that queue (`crate` docs), so a queue's expiry keys live in its
//! slot. The generation and due time are in the name so that two notices of one timer (an
//! upsert, a retry with a new due time) are two keys that cannot overwrite each other's TTL.
//! Each key costs about 60 bytes plus the length of its name in Redis, for as long as it waits.
//!
//! ## What it cannot do, and what covers it
//!
//! - Expired events are fire-and-forget pub/sub: a subscriber that is disconnected when a key
//!   expires never hears of it, and Redis generates the event when it *deletes* the key, which
//!   is late when many keys carry TTLs (`docs/redis.md` has the measurements). The engine's
//!   backstop sweep fires every timer overdue by more than its slack that no notice fired, and
//!   counts each one in `overdue_backstop_rescued_total`: with this trigger, that counter is
//!   the number of lost or too-late events.
//! - A key cannot be withdrawn by the engine: a cancelled or replaced timer's key still expires
//!   and its notice is dropped by the generation fence (`overdue_engine`'s `stale_dropped`).
//! - Every consumer subscribed to a database hears every expired event of it; with several
//!   nodes on one prefix each node delivers each notice and the store's claim lets one run it.
//! - A Redis restart without persistence loses every waiting key; the store still has the
//!   timers and the backstop fires them (late by up to the backstop interval plus slack).
//!
//! ## URL
//!
//! `redis://[user[:password]@]host[:port][/db][?prefix=NAME&events=auto|assume]`
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `prefix` | first part of every expiry key (as the Redis store's `prefix`) | `overdue` |
//! | `events` | `auto`: check `notify-keyspace-events` and turn the expired events on if needed; `assume`: do not use `CONFIG` at all (managed Redis that refuses it, with the events configured) | `auto` |
//!
//! The database number in the path selects the keys and the channel `__keyevent@<db>__:expired`.
//! TLS (`rediss://`) is not built in.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use overdue_core::shared::redact;
use overdue_core::{Delivery, DueSink, Error, ExternalTrigger, Result, TimerRef};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub, PubSubSink, PubSubStream};
use redis::{ConnectionAddr, Msg};
use tokio::task::JoinSet;

use crate::{DEFAULT_PREFIX, redis_err};

/// Most notices handed to [`DueSink::deliver`] in one call.
pub const DELIVER_BATCH: usize = 1024;
/// `deliver` calls running at once. Each waits for its handlers and settlements; a few in
/// parallel keep the store busy while one batch settles (a burst of events is not held up by the
/// slowest handler of the batch before it).
pub const DELIVERIES_IN_FLIGHT: usize = 4;
/// TTL of a key set again after a `Redeliver` answer (engine stopping, store failure, a claim
/// held elsewhere): long enough not to spin, short against the backstop's 2 s slack.
pub const REDELIVER_DELAY_MS: i64 = 250;
/// Smallest TTL Redis accepts with `PX`, and the one given to a past-due notice nobody heard.
const MIN_TTL_MS: i64 = 1;
/// How long connecting (and each `CONFIG`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command may wait for its reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause before the subscriber reconnects; it doubles per failure up to
/// [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest pause between reconnection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often an idle subscription is checked with a `PING` (a half-open TCP connection sends
/// no error, only silence).
const PING_EVERY: Duration = Duration::from_secs(5);
/// A `PING` not answered within this drops the subscription and reconnects.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// The flags this trigger adds to `notify-keyspace-events`: `E` (key-event channels) and `x`
/// (expired events).
pub const REQUIRED_EVENTS: &str = "Ex";

/// What [`KeyspaceTrigger::start`] does about `notify-keyspace-events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventsMode {
    /// Read it with `CONFIG GET`; if the expired events are off, add [`REQUIRED_EVENTS`] with
    /// `CONFIG SET`; fail with [`Error::Config`] if either is refused.
    #[default]
    Auto,
    /// Do not use `CONFIG` (managed Redis that refuses it): the operator has configured
    /// `notify-keyspace-events` to include `Ex`. If not, every timer is fired by the backstop.
    Assume,
}

/// How to open a [`KeyspaceTrigger`]; [`KeyspaceOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug)]
pub struct KeyspaceOptions {
    /// First part of every expiry key.
    pub prefix: String,
    /// What to do about `notify-keyspace-events`.
    pub events: EventsMode,
    /// First pause before the subscriber reconnects (doubling up to [`RECONNECT_MAX`]).
    pub reconnect_min: Duration,
}

impl Default for KeyspaceOptions {
    fn default() -> Self {
        KeyspaceOptions { prefix: DEFAULT_PREFIX.to_owned(), events: EventsMode::Auto, reconnect_min: RECONNECT_MIN }
    }
}

impl KeyspaceOptions {
    /// Splits the trigger's own parameters off a `redis://` URL; returns them and the URL for
    /// the driver.
    pub fn from_url(url: &str) -> Result<(KeyspaceOptions, String)> {
        let bad = |m: String| Error::Config(format!("invalid keyspace trigger url {}: {m}", redact(url)));
        if !url.starts_with("redis://") {
            return Err(bad("it does not start with redis://".into()));
        }
        let mut opts = KeyspaceOptions::default();
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "prefix" => {
                    if !valid_prefix(v) {
                        return Err(bad(format!(
                            "prefix={v:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
                        )));
                    }
                    opts.prefix = v.to_owned();
                }
                "events" => {
                    opts.events = match v {
                        "auto" => EventsMode::Auto,
                        "assume" => EventsMode::Assume,
                        _ => return Err(bad(format!("events={v:?}: expected auto or assume"))),
                    }
                }
                _ => rest.push(pair),
            }
        }
        let driver = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
        Ok((opts, driver))
    }
}

fn valid_prefix(p: &str) -> bool {
    !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The `notify-keyspace-events` value with the expired key-event channel turned on, or `None`
/// if `current` has it already. Existing flags are kept: `E` is added if missing, and `x` if
/// neither `x` nor `A` (all events) is there.
pub fn with_expired_events(current: &str) -> Option<String> {
    let has_e = current.contains('E');
    let has_x = current.contains('x') || current.contains('A');
    if has_e && has_x {
        return None;
    }
    let mut v = current.to_owned();
    if !has_e {
        v.push('E');
    }
    if !has_x {
        v.push('x');
    }
    Some(v)
}

/// The name of the expiry key that carries `t` (see the module docs).
pub fn expiry_key(prefix: &str, t: &TimerRef) -> String {
    format!("{{{prefix}:q:{}}}:x:{}:{}:{}", t.queue, t.generation, t.due_at, t.key)
}

/// The notice an expiry key name carries, or `None` if the name is not one of `prefix`'s.
pub fn parse_expiry_key(prefix: &str, name: &[u8]) -> Option<TimerRef> {
    let rest = name.strip_prefix(b"{")?.strip_prefix(prefix.as_bytes())?.strip_prefix(b":q:")?;
    let close = rest.iter().position(|&b| b == b'}')?;
    let queue = std::str::from_utf8(&rest[..close]).ok()?;
    overdue_core::limits::check_queue(queue).ok()?;
    let rest = rest[close + 1..].strip_prefix(b":x:")?;
    let (generation, rest) = split_number(rest)?;
    let (due_at, key) = split_number(rest)?;
    let key = std::str::from_utf8(key).ok()?;
    if key.is_empty() {
        return None;
    }
    Some(TimerRef {
        queue: queue.to_owned(),
        key: key.to_owned(),
        generation: generation.parse().ok()?,
        due_at: due_at.parse().ok()?,
    })
}

/// Splits `<digits>:<rest>` (an optional leading `-` allowed) into the number's text and rest.
fn split_number(s: &[u8]) -> Option<(&str, &[u8])> {
    let colon = s.iter().position(|&b| b == b':')?;
    let digits = &s[..colon];
    let body = digits.strip_prefix(b"-").unwrap_or(digits);
    if body.is_empty() || body.len() > 20 || !body.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?, &s[colon + 1..]))
}

/// Counters of one trigger, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyspaceStats {
    /// Expiry keys written by `publish`.
    pub keys_set: u64,
    /// Past-due notices sent on the due channel (and heard by at least one consumer).
    pub published_due: u64,
    /// Notices of this prefix received (expired events and due-channel messages).
    pub received: u64,
    /// Keys set again after an `Early` answer.
    pub early: u64,
    /// Keys set again after a `Redeliver` answer.
    pub redelivered: u64,
    /// Times the subscriber (re)connected.
    pub subscriptions: u64,
}

#[derive(Debug, Default)]
struct Counters {
    keys_set: AtomicU64,
    published_due: AtomicU64,
    received: AtomicU64,
    early: AtomicU64,
    redelivered: AtomicU64,
    subscriptions: AtomicU64,
}

/// Redis key-expiry events as an external trigger; see the module docs.
#[derive(Clone)]
pub struct KeyspaceTrigger {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// The driver URL without its password, for messages.
    url: String,
    opts: KeyspaceOptions,
    /// `__keyevent@<db>__:expired`.
    expired_channel: String,
    /// `<prefix>:keyspace:due`: past-due notices.
    due_channel: String,
    con: tokio::sync::OnceCell<ConnectionManager>,
    /// `ip:port` of the subscriber's socket while subscribed (as `CLIENT LIST` shows it).
    subscriber: Mutex<Option<String>>,
    subscribed: AtomicBool,
    counters: Counters,
}

impl std::fmt::Debug for KeyspaceTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyspaceTrigger")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.opts.prefix)
            .field("channel", &self.inner.expired_channel)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

enum Ended {
    Stopped,
    Lost(String),
}

impl KeyspaceTrigger {
    /// A trigger on the Redis a `redis://` URL names (see the module docs for its parameters).
    /// Does not connect yet: [`ExternalTrigger::start`] does.
    pub fn from_url(url: &str) -> Result<KeyspaceTrigger> {
        let (opts, driver) = KeyspaceOptions::from_url(url)?;
        KeyspaceTrigger::new(&driver, opts)
    }

    /// A trigger on the Redis `driver_url` names (a plain redis-rs URL) with `opts`.
    pub fn new(driver_url: &str, opts: KeyspaceOptions) -> Result<KeyspaceTrigger> {
        if !valid_prefix(&opts.prefix) {
            return Err(Error::Config(format!(
                "keyspace trigger prefix {:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'",
                opts.prefix
            )));
        }
        let client = redis::Client::open(driver_url)
            .map_err(|e| Error::Config(format!("invalid redis url {}: {e}", redact(driver_url))))?;
        let db = client.get_connection_info().redis_settings().db();
        Ok(KeyspaceTrigger {
            inner: Arc::new(Inner {
                client,
                url: redact(driver_url),
                expired_channel: format!("__keyevent@{db}__:expired"),
                due_channel: format!("{}:keyspace:due", opts.prefix),
                opts,
                con: tokio::sync::OnceCell::new(),
                subscriber: Mutex::new(None),
                subscribed: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.opts.prefix
    }

    /// The channel the expired events arrive on, `__keyevent@<db>__:expired`.
    pub fn expired_channel(&self) -> &str {
        &self.inner.expired_channel
    }

    /// The channel past-due notices are published on, `<prefix>:keyspace:due`.
    pub fn due_channel(&self) -> &str {
        &self.inner.due_channel
    }

    /// The expiry key that carries `t`.
    pub fn key_for(&self, t: &TimerRef) -> String {
        expiry_key(&self.inner.opts.prefix, t)
    }

    /// True while the subscriber is connected and subscribed.
    pub fn subscribed(&self) -> bool {
        self.inner.subscribed.load(Relaxed)
    }

    /// The subscriber connection's local `ip:port` while subscribed: the `addr` that `CLIENT
    /// LIST` shows for it, so an operator (or a test) can `CLIENT KILL ADDR` exactly this
    /// subscriber.
    pub fn subscriber_addr(&self) -> Option<String> {
        self.inner.subscriber.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counters since this trigger was made.
    pub fn stats(&self) -> KeyspaceStats {
        let c = &self.inner.counters;
        KeyspaceStats {
            keys_set: c.keys_set.load(Relaxed),
            published_due: c.published_due.load(Relaxed),
            received: c.received.load(Relaxed),
            early: c.early.load(Relaxed),
            redelivered: c.redelivered.load(Relaxed),
            subscriptions: c.subscriptions.load(Relaxed),
        }
    }

    /// Deletes every expiry key of this prefix that is still waiting (`SCAN` + `UNLINK`);
    /// returns how many. Their notices are not delivered: the store's backstop still fires the
    /// timers. For tools (the benchmark clears the keys of timers the backstop already fired)
    /// and for removing a prefix that is no longer used.
    pub async fn purge(&self) -> Result<u64> {
        let mut con = self.connection().await?;
        let pattern = format!("{{{}:q:*}}:x:*", glob_escape(&self.inner.opts.prefix));
        let mut cursor: u64 = 0;
        let mut n = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(redis_err)?;
            if !keys.is_empty() {
                let removed: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut con).await.map_err(redis_err)?;
                n += removed;
            }
            if next == 0 {
                return Ok(n);
            }
            cursor = next;
        }
    }

    async fn connection(&self) -> Result<ConnectionManager> {
        let inner = &self.inner;
        let con = inner
            .con
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(2);
                match tokio::time::timeout(CONNECT_TIMEOUT, inner.client.get_connection_manager_with_config(config)).await {
                    Ok(Ok(con)) => Ok(con),
                    Ok(Err(e)) => Err(self.unreachable(e.to_string())),
                    Err(_) => Err(self.unreachable("timed out".into())),
                }
            })
            .await?;
        Ok(con.clone())
    }

    fn unreachable(&self, e: String) -> Error {
        Error::Store {
            backend: crate::BACKEND,
            message: format!("keyspace trigger cannot connect to redis at {}: {e}", self.inner.url),
            transient: true,
            source: None,
        }
    }

    /// Makes sure the expired key-event channel is on (see [`EventsMode`]).
    async fn ensure_events(&self) -> Result<()> {
        if self.inner.opts.events == EventsMode::Assume {
            return Ok(());
        }
        let mut con = self.connection().await?;
        let how = "configure `notify-keyspace-events Ex` on the server (redis.conf, or the parameter group of a \
                   managed Redis; any flags that include E and x, or E and A, will do), or run \
                   `CONFIG SET notify-keyspace-events Ex`; if it is configured and CONFIG is disabled, add \
                   `events=assume` to the trigger URL";
        let refused = |what: &str, e: redis::RedisError| {
            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
                redis_err(e)
            } else {
                Error::Config(format!(
                    "the keyspace trigger needs redis key-expiry events, and {what} at {} was refused ({e}): {how}",
                    self.inner.url
                ))
            }
        };
        let reply = tokio::time::timeout(
            CONNECT_TIMEOUT,
            redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async::<redis::Value>(&mut con),
        )
        .await
        .map_err(|_| self.unreachable("CONFIG GET timed out".into()))?
        .map_err(|e| refused("reading notify-keyspace-events (CONFIG GET)", e))?;
        let current = config_value(&reply).ok_or_else(|| {
            Error::Config(format!(
                "the keyspace trigger needs redis key-expiry events, and CONFIG GET notify-keyspace-events at {} \
                 answered {reply:?}: {how}",
                self.inner.url
            ))
        })?;
        let Some(wanted) = with_expired_events(&current) else {
            return Ok(());
        };
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&wanted).query_async::<()>(&mut con),
        )
        .await
        .map_err(|_| self.unreachable("CONFIG SET timed out".into()))?
        .map_err(|e| {
            refused(&format!("key-expiry events are off (notify-keyspace-events is {current:?}) and turning them on (CONFIG SET notify-keyspace-events {wanted})"), e)
        })?;
        tracing::info!(from = %current, to = %wanted, url = %self.inner.url, "turned on redis key-expiry events (notify-keyspace-events)");
        Ok(())
    }

    /// Sets one expiry key per `(notice, ttl ms)` in one pipeline.
    async fn set_keys(&self, keys: &[(TimerRef, i64)]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut con = self.connection().await?;
        let mut pipe = redis::pipe();
        for (t, ttl) in keys {
            pipe.cmd("SET").arg(self.key_for(t)).arg("").arg("PX").arg((*ttl).max(MIN_TTL_MS)).ignore();
        }
        pipe.query_async::<()>(&mut con).await.map_err(redis_err)?;
        self.inner.counters.keys_set.fetch_add(keys.len() as u64, Relaxed);
        Ok(())
    }

    /// Connects a subscriber on its own socket (so its address is known) and subscribes.
    async fn subscribe(&self) -> Result<(PubSubSink, PubSubStream, String)> {
        let info = self.inner.client.get_connection_info();
        let connect = async {
            let (pubsub, addr) = match info.addr() {
                ConnectionAddr::Tcp(host, port) => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    let _ = s.set_nodelay(true);
                    let addr = s.local_addr()?.to_string();
                    (PubSub::new(info.redis_settings(), s).await?, addr)
                }
                #[cfg(unix)]
                ConnectionAddr::Unix(path) => {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    (PubSub::new(info.redis_settings(), s).await?, format!("unix:{}", path.display()))
                }
                other => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "the keyspace trigger supports tcp and unix-socket connections",
                        format!("{other:?}"),
                    )));
                }
            };
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&[self.inner.expired_channel.as_str(), self.inner.due_channel.as_str()]).await?;
            Ok::<_, redis::RedisError>((sink, stream, addr))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unreachable(e.to_string())),
            Err(_) => Err(self.unreachable("subscribing timed out".into())),
        }
    }

    /// The notice a message carries, if it is one of this prefix's.
    fn notice_of(&self, msg: &Msg) -> Option<TimerRef> {
        parse_expiry_key(&self.inner.opts.prefix, msg.get_payload_bytes())
    }

    /// Reads messages and delivers them until the subscription is lost or the engine stops.
    async fn pump(
        &self,
        sink: &Arc<dyn DueSink>,
        pubsub: &mut PubSubSink,
        stream: &mut PubSubStream,
        deliveries: &mut JoinSet<()>,
    ) -> Ended {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            tokio::select! {
                biased;
                _ = sink.until_stopped() => return Ended::Stopped,
                Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
                msg = stream.next(), if deliveries.len() < DELIVERIES_IN_FLIGHT => {
                    let Some(first) = msg else { return Ended::Lost("the subscriber's connection closed".into()) };
                    let mut batch = Vec::new();
                    batch.extend(self.notice_of(&first));
                    let mut closed = false;
                    while batch.len() < DELIVER_BATCH {
                        match stream.next().now_or_never() {
                            Some(Some(m)) => batch.extend(self.notice_of(&m)),
                            Some(None) => {
                                closed = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    if !batch.is_empty() {
                        self.inner.counters.received.fetch_add(batch.len() as u64, Relaxed);
                        let (this, sink) = (self.clone(), sink.clone());
                        deliveries.spawn(async move { this.deliver(sink, batch).await });
                    }
                    if closed {
                        return Ended::Lost("the subscriber's connection closed".into());
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, pubsub.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Ended::Lost(format!("ping on the subscriber failed: {e}")),
                        Err(_) => return Ended::Lost(format!("the subscriber did not answer a ping within {PING_TIMEOUT:?}")),
                    }
                }
            }
        }
    }

    /// Delivers one batch and sets the keys of `Early` and `Redeliver` answers again.
    async fn deliver(&self, sink: Arc<dyn DueSink>, batch: Vec<TimerRef>) {
        let answers = sink.deliver(batch.clone()).await;
        let now = sink.now_ms();
        let mut again = Vec::new();
        let (mut early, mut redeliver) = (0u64, 0u64);
        for (t, answer) in batch.into_iter().zip(answers) {
            match answer {
                Delivery::Ack => {}
                Delivery::Early => {
                    early += 1;
                    let ttl = t.due_at.saturating_sub(now);
                    again.push((t, ttl));
                }
                Delivery::Redeliver => {
                    redeliver += 1;
                    again.push((t, REDELIVER_DELAY_MS));
                }
            }
        }
        let c = &self.inner.counters;
        c.early.fetch_add(early, Relaxed);
        c.redelivered.fetch_add(redeliver, Relaxed);
        if let Err(e) = self.set_keys(&again).await {
            tracing::warn!(error = %e, n = again.len(), "keyspace trigger: setting keys again failed; the backstop will fire these timers");
        }
    }
}

/// `*`, `?`, `[`, `]` and `\` escaped for a `SCAN MATCH` pattern (the prefix alphabet has none
/// of them today; this keeps `purge` exact if it ever does).
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The value of a one-parameter `CONFIG GET` reply: `[name, value]` (RESP2) or `{name: value}`
/// (RESP3).
fn config_value(v: &redis::Value) -> Option<String> {
    use redis::Value as V;
    let text = |v: &V| match v {
        V::BulkString(b) => String::from_utf8(b.clone()).ok(),
        V::SimpleString(s) | V::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    };
    match v {
        V::Array(items) if items.len() == 2 => text(&items[1]),
        V::Map(pairs) if pairs.len() == 1 => text(&pairs[0].1),
        _ => None,
    }
}

#[async_trait]
impl ExternalTrigger for KeyspaceTrigger {
    fn name(&self) -> &'static str {
        "keyspace"
    }

    async fn start(&self) -> Result<()> {
        self.connection().await?;
        self.ensure_events().await
    }

    async fn publish(&self, notices: &[TimerRef], now: i64) -> Result<()> {
        if notices.is_empty() {
            return Ok(());
        }
        let mut con = self.connection().await?;
        let mut pipe = redis::pipe();
        let mut due = Vec::new();
        for t in notices {
            let ttl = t.due_at.saturating_sub(now);
            if ttl <= 0 {
                pipe.cmd("PUBLISH").arg(&self.inner.due_channel).arg(self.key_for(t));
                due.push(t);
            } else {
                pipe.cmd("SET").arg(self.key_for(t)).arg("").arg("PX").arg(ttl).ignore();
            }
        }
        // One reply per PUBLISH (the SETs' replies are ignored): how many subscribers heard it.
        let heard: Vec<i64> = pipe.query_async(&mut con).await.map_err(redis_err)?;
        let c = &self.inner.counters;
        c.keys_set.fetch_add((notices.len() - due.len()) as u64, Relaxed);
        let unheard: Vec<(TimerRef, i64)> = due
            .iter()
            .zip(heard.iter().copied().chain(std::iter::repeat(0)))
            .filter(|(_, n)| *n == 0)
            .map(|(t, _)| ((*t).clone(), MIN_TTL_MS))
            .collect();
        c.published_due.fetch_add((due.len() - unheard.len()) as u64, Relaxed);
        // Nobody subscribed: a 1 ms key, heard by a consumer that subscribes in time.
        self.set_keys(&unheard).await
    }

    async fn consume(&self, sink: Arc<dyn DueSink>) -> Result<()> {
        let mut backoff = self.inner.opts.reconnect_min;
        let mut deliveries = JoinSet::new();
        while !sink.stopped() {
            let subscribed = match self.ensure_events().await {
                Ok(()) => self.subscribe().await,
                Err(e) => Err(e),
            };
            match subscribed {
                Ok((mut pubsub, mut stream, addr)) => {
                    *self.inner.subscriber.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
                    self.inner.subscribed.store(true, Relaxed);
                    self.inner.counters.subscriptions.fetch_add(1, Relaxed);
                    sink.set_healthy(true, None);
                    backoff = self.inner.opts.reconnect_min;
                    let ended = self.pump(&sink, &mut pubsub, &mut stream, &mut deliveries).await;
                    self.inner.subscribed.store(false, Relaxed);
                    *self.inner.subscriber.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    match ended {
                        Ended::Stopped => break,
                        Ended::Lost(why) => {
                            tracing::warn!(error = %why, url = %self.inner.url, "keyspace trigger lost its subscription; expiry events are missed until it reconnects (the backstop fires those timers)");
                            sink.set_healthy(false, Some(format!("keyspace subscriber disconnected: {why}")));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keyspace trigger cannot subscribe; retrying");
                    sink.set_healthy(false, Some(e.to_string()));
                }
            }
            if !overdue_core::reconnect_pause(&*sink, &mut backoff, RECONNECT_MAX.max(self.inner.opts.reconnect_min)).await {
                break;
            }
        }
        // Deliveries still running answer `Redeliver` now (the engine stopped); let them set
        // their keys again before returning.
        while deliveries.join_next().await.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(queue: &str, key: &str, generation: u64, due_at: i64) -> TimerRef {
        TimerRef { queue: queue.into(), key: key.into(), generation, due_at }
    }

    #[test]
    fn key_names_round_trip_for_awkward_keys() {
        for key in ["o-1", "a:b:c", "}{", "{P:q:x}:x:1:2:y", "ключ 🔑", " ", "1:2:3:"] {
            for queue in ["q", "order.close", "a:b", "x-_.:9"] {
                let n = t(queue, key, 42, 1_700_000_000_123);
                let name = expiry_key("pre:fix", &n);
                assert_eq!(parse_expiry_key("pre:fix", name.as_bytes()), Some(n.clone()), "{name}");
            }
        }
        let n = t("q", "k", u64::MAX, 0);
        assert_eq!(parse_expiry_key("p", expiry_key("p", &n).as_bytes()), Some(n));
    }

    #[test]
    fn the_hash_tag_is_the_stores() {
        let name = expiry_key("overdue", &t("order.close", "o-1", 7, 99));
        assert_eq!(name, "{overdue:q:order.close}:x:7:99:o-1");
        let store = crate::QueueKeys::new("overdue", "order.close");
        assert!(store.due.starts_with("{overdue:q:order.close}"), "{}", store.due);
    }

    #[test]
    fn foreign_and_malformed_names_are_ignored() {
        for name in [
            &b"other"[..],
            b"{p:q:q}:x:1:2:",
            b"{p:q:q}:x:1:2",
            b"{p:q:q}:y:1:2:k",
            b"{p:q:q}:x:a:2:k",
            b"{p:q:q}:x:1::k",
            b"{p:q:}:x:1:2:k",
            b"{p:q:q q}:x:1:2:k",
            b"{px:q:q}:x:1:2:k",
            b"{p:q:q}:x:99999999999999999999999:2:k",
            b"{p:q:q}:x:1:2:\xff",
            b"{p:q:q:x:1:2:k",
            b"{p:q:q}:due",
        ] {
            assert_eq!(parse_expiry_key("p", name), None, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn expired_events_are_added_to_existing_flags() {
        assert_eq!(with_expired_events("").as_deref(), Some("Ex"));
        assert_eq!(with_expired_events("K").as_deref(), Some("KEx"));
        assert_eq!(with_expired_events("Kl").as_deref(), Some("KlEx"));
        assert_eq!(with_expired_events("E").as_deref(), Some("Ex"));
        assert_eq!(with_expired_events("x").as_deref(), Some("xE"));
        assert_eq!(with_expired_events("Ex"), None);
        assert_eq!(with_expired_events("xE"), None);
        assert_eq!(with_expired_events("AE"), None);
        assert_eq!(with_expired_events("KEA"), None);
        assert_eq!(with_expired_events("gxKE"), None);
    }

    #[test]
    fn urls_are_parsed_and_bad_ones_refused() {
        let (o, d) = KeyspaceOptions::from_url("redis://127.0.0.1:6379/2?prefix=a.b&events=assume&protocol=resp3").expect("url");
        assert_eq!((o.prefix.as_str(), o.events), ("a.b", EventsMode::Assume));
        assert_eq!(d, "redis://127.0.0.1:6379/2?protocol=resp3");
        let tr = KeyspaceTrigger::from_url("redis://127.0.0.1:6379/2").expect("trigger");
        assert_eq!(tr.expired_channel(), "__keyevent@2__:expired");
        assert_eq!(tr.due_channel(), "overdue:keyspace:due");
        for bad in ["http://x", "redis://h?prefix=", "redis://h?prefix=a{b}", "redis://h?events=maybe"] {
            let e = KeyspaceTrigger::from_url(bad).expect_err(bad);
            assert!(matches!(e, Error::Config(_)), "{bad}: {e:?}");
        }
        let e = KeyspaceOptions::from_url("redis://u:secret@h?events=no").expect_err("bad");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn config_replies_of_both_protocols_are_read() {
        use redis::Value as V;
        let resp2 = V::Array(vec![V::BulkString(b"notify-keyspace-events".to_vec()), V::BulkString(b"xE".to_vec())]);
        assert_eq!(config_value(&resp2).as_deref(), Some("xE"));
        let resp3 = V::Map(vec![(V::BulkString(b"notify-keyspace-events".to_vec()), V::BulkString(Vec::new()))]);
        assert_eq!(config_value(&resp3).as_deref(), Some(""));
        assert_eq!(config_value(&V::Array(vec![])), None);
    }
}
