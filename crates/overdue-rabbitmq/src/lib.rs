//! # overdue-rabbitmq
//!
//! RabbitMQ as an [`ExternalTrigger`]: the broker does the waiting, a SQL store with its outbox
//! on stays the source of truth (see `overdue_core::trigger`). Two modes, chosen by the URL:
//!
//! - **`mode=dlx`** (default) — TTL queues dead-lettering towards a due queue, built so that a
//!   short timer never waits behind a long one (no head-of-line blocking). Works on a stock
//!   RabbitMQ.
//! - **`mode=delayed`** — the `rabbitmq_delayed_message_exchange` plugin's `x-delayed-message`
//!   exchange and the `x-delay` header. [`AmqpTrigger::start`] fails with an [`Error::Config`]
//!   naming the plugin (and suggesting `mode=dlx`) when it is not enabled.
//!
//! ## The dlx cascade
//!
//! Per-message TTL in one queue blocks at the head: RabbitMQ only expires the message at the head,
//! so a 1 s message behind a 10 s one comes out at 10 s. Here every queue has *one fixed TTL*
//! (`x-message-ttl`), so its messages expire in the order they entered — FIFO is exact and
//! nothing blocks. There is one such *level* per power of two, 2^s ms for `s` in
//! [`MIN_SHIFT`]`..=`[`MAX_SHIFT`] (128 ms … 2^31 ms ≈ 24.9 days: [`LEVELS`] levels).
//!
//! A delay `d` is rounded **up** to a multiple of [`RESOLUTION_MS`] (128 ms) and written in
//! binary; the route is precomputed at publish time and carried in the routing key, one word
//! per level from the largest to the smallest: `"0.1.0.…"` (word `i` is bit `MAX_SHIFT - i` of
//! the rounded delay). A message waits in the queue `P.dlx.wait.s` (`x-message-ttl = 2^s`) of
//! each of its `1` bits, largest first, and nowhere else:
//!
//! - it is published to the topic exchange `P.dlx`, whose bindings (see [`router_bindings`])
//!   send it to the queue of its largest `1` bit (or, for no `1` at all, to `P.due`);
//! - the queue of level `s` dead-letters (`x-dead-letter-exchange`) to the topic exchange
//!   `P.dlx.after.s`, whose bindings look only at the words of the levels below `s` and send
//!   the message to the queue of the next `1` bit, or to `P.due` when none is left (the
//!   smallest level's queue dead-letters to `P.due` directly).
//!
//! Dead-lettering keeps the routing key, so the route needs no client: the broker does every
//! hop, and nobody sees the notice until it reaches the fanout exchange `P.due` and its queue
//! `P.due`, which every node consumes (competing consumers). A message is routed
//! `popcount(d / 128 ms) + 1` times. (A first version walked one exchange per level, with
//! exchange-to-exchange bindings for the `0` bits: 25 topic routings per publish held confirms
//! to about 1,000 messages/s on this machine; this layout confirms at the broker's
//! single-routing rate.)
//!
//! - **Resolution** [`RESOLUTION_MS`]: a notice arrives 0–128 ms after its due time plus the
//!   broker's own latency; never early (except past the maximum, below).
//! - **Maximum delay** [`MAX_ROUTED_DELAY_MS`] = 2^32 − 128 ms ≈ 49.7 days (RabbitMQ refuses a TTL
//!   above 2^32 − 1 ms). A longer delay travels the maximum and arrives early; the engine answers
//!   [`Delivery::Early`] and the consumer publishes it again for the delay left, so any delay up
//!   to overdue's limit works (a year takes eight trips).
//! - A notice already due is published to `P.due` directly.
//!
//! ## Delivery
//!
//! Messages are persistent (`delivery_mode = 2`) in durable classic queues, published
//! `mandatory` on a channel with publisher confirms: [`ExternalTrigger::publish`] returns `Ok`
//! only after the broker confirmed every message of the batch (and none came back unroutable).
//! The body is a JSON array of notices, `[{"queue","key","generation","due_at"}, …]`, never the
//! payload: the notices of one publish that take the same route travel together, up to
//! [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) per message (the broker's cost is per message: a confirm, a disk write
//! and a dead-letter hop each), and a message is acked once every notice in it is done
//! ([`MessageOutcome`]).
//! The consumer uses manual acknowledgements with a prefetch of [`DEFAULT_PREFETCH`]; it acks a
//! message after [`DueSink::deliver`] answered [`Delivery::Ack`] (the effect committed, or the
//! notice was stale), nacks it with requeue on [`Delivery::Redeliver`] (after
//! [`REDELIVER_PAUSE`] unless the engine is stopping, so a claim held by another node does not
//! spin), and on [`Delivery::Early`] publishes it again for the remaining delay (confirmed)
//! before acking it.
//!
//! ## What it cannot do, and what covers it
//!
//! - A published message cannot be withdrawn: cancel and reschedule work by the generation
//!   fence (a stale notice is dropped when it arrives and counted in the engine's
//!   `stale_dropped`).
//! - Classic-queue dead-lettering is at-most-once: a broker crash in the middle of a hop can lose
//!   a message. The store still has the timer; the engine's backstop sweep fires it and counts it
//!   in `overdue_backstop_rescued_total`.
//! - Broker restart or connection loss: the consumer reconnects with backoff
//!   ([`RECONNECT_MIN`] doubling to [`RECONNECT_MAX`]), declares the topology again and reports
//!   its state through [`DueSink::set_healthy`]; the publisher reconnects on the next relay round,
//!   and outbox rows whose publish was not confirmed are published again by the relay.
//!
//! ## URL
//!
//! `amqp://user:password@host:port/vhost?mode=dlx|delayed&prefix=NAME&prefetch=N&delivery=persistent|transient` — other query
//! parameters (`heartbeat`, `connection_timeout`, …) go to the client (lapin).
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `mode` | `dlx` (TTL cascade) or `delayed` (plugin) | `dlx` |
//! | `prefix` | first part of every exchange and queue name, `[A-Za-z0-9._:-]{1,64}` | `overdue` |
//! | `prefetch` | unacknowledged deliveries per consumer | [`DEFAULT_PREFETCH`] |
//! | `delivery` | `persistent` (confirmed once on disk, survives a broker restart) or `transient` (confirmed once routed, lost on a broker restart: the backstop fires those timers) | `persistent` |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use overdue_core::shared::redact;
use overdue_core::{
    Delivery, DueSink, Error, ExternalTrigger, MessageOutcome, Result, TimerRef, decode_notices,
    encode_notices, pack_by,
};
use tokio::task::JoinSet;

/// Name of this backend in store errors.
pub const BACKEND: &str = "rabbitmq";
/// Default first part of every exchange and queue name.
pub const DEFAULT_PREFIX: &str = "overdue";
/// The smallest level is 2^MIN_SHIFT ms.
pub const MIN_SHIFT: u32 = 7;
/// The largest level is 2^MAX_SHIFT ms (≈ 24.9 days); RabbitMQ refuses a TTL over 2^32 − 1 ms.
pub const MAX_SHIFT: u32 = 31;
/// Number of levels in the cascade.
pub const LEVELS: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// The cascade's resolution: delays are rounded up to a multiple of this.
pub const RESOLUTION_MS: i64 = 1 << MIN_SHIFT;
/// Longest delay one trip through the cascade can wait (every level): 2^32 − 128 ms.
pub const MAX_ROUTED_DELAY_MS: i64 = (1i64 << (MAX_SHIFT + 1)) - RESOLUTION_MS;
/// Largest `x-delay` the delayed-message plugin accepts (2^32 − 1 ms ≈ 49.7 days).
pub const MAX_PLUGIN_DELAY_MS: i64 = u32::MAX as i64;
/// The plugin that `mode=delayed` needs.
pub const DELAYED_PLUGIN: &str = "rabbitmq_delayed_message_exchange";
/// Unacknowledged messages per consumer: enough to keep [`DELIVERIES_IN_FLIGHT`] batches of
/// [`DELIVER_BATCH`] notices busy when the messages carry a few notices each, small enough that
/// one node does not hoard the due queue (full messages carry [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) each).
pub const DEFAULT_PREFETCH: u16 = 512;
/// A `deliver` call takes messages until it holds this many notices.
pub const DELIVER_BATCH: usize = 1024;
/// `deliver` calls running at once.
pub const DELIVERIES_IN_FLIGHT: usize = 4;
/// Pause before a notice answered `Redeliver` is nacked back to the queue (not when stopping).
pub const REDELIVER_PAUSE: Duration = Duration::from_millis(250);
/// First pause before the consumer reconnects; doubles per failure up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest pause between reconnection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long connecting and declaring the topology may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a batch's publisher confirms may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Confirm channels a publisher spreads each batch over. RabbitMQ routes and confirms a
/// channel's messages in one Erlang process, so one channel uses one core of the broker.
pub const PUBLISH_CHANNELS: usize = 4;
/// Below this many messages a batch goes out on one channel.
const SPLIT_AT: usize = 64;
/// Classic queue storage version 2 (RabbitMQ 3.10+; older brokers ignore the argument): it
/// writes persistent messages with far less work than version 1, which matters here because
/// every hop of the cascade writes the message again.
const QUEUE_VERSION: i32 = 2;
/// AMQP `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;
/// AMQP `delivery_mode` of a transient message.
const TRANSIENT: u8 = 1;

/// How the broker waits; see the crate docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The cascade of power-of-two TTL queues.
    #[default]
    Dlx,
    /// The delayed-message-exchange plugin.
    Delayed,
}

/// How to open an [`AmqpTrigger`]; [`AmqpOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug)]
pub struct AmqpOptions {
    pub mode: Mode,
    /// First part of every exchange and queue name.
    pub prefix: String,
    /// Unacknowledged deliveries per consumer.
    pub prefetch: u16,
    /// First pause before the consumer reconnects (doubling up to [`RECONNECT_MAX`]).
    pub reconnect_min: Duration,
    /// Persistent messages (`delivery=persistent`, the default): the broker confirms a notice
    /// once it is on disk, and it survives a broker restart. `delivery=transient`: confirmed once
    /// routed (no disk wait, several times the throughput), lost if the broker restarts; the
    /// store still has every timer and the backstop fires them (late, counted).
    pub persistent: bool,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            mode: Mode::Dlx,
            prefix: DEFAULT_PREFIX.to_owned(),
            prefetch: DEFAULT_PREFETCH,
            reconnect_min: RECONNECT_MIN,
            persistent: true,
        }
    }
}

impl AmqpOptions {
    /// Splits the trigger's own parameters off an `amqp://` URL; returns them and the URL for
    /// the client.
    pub fn from_url(url: &str) -> Result<(AmqpOptions, String)> {
        let bad = |m: String| Error::Config(format!("invalid amqp trigger url {}: {m}", redact(url)));
        if !url.starts_with("amqp://") {
            return Err(bad("it does not start with amqp:// (amqps:// is not built in)".into()));
        }
        let mut opts = AmqpOptions::default();
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "mode" => {
                    opts.mode = match v {
                        "dlx" => Mode::Dlx,
                        "delayed" => Mode::Delayed,
                        _ => return Err(bad(format!("mode={v:?}: expected dlx or delayed"))),
                    }
                }
                "prefix" => {
                    if !valid_prefix(v) {
                        return Err(bad(format!(
                            "prefix={v:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
                        )));
                    }
                    opts.prefix = v.to_owned();
                }
                "delivery" => {
                    opts.persistent = match v {
                        "persistent" => true,
                        "transient" => false,
                        _ => return Err(bad(format!("delivery={v:?}: expected persistent or transient"))),
                    }
                }
                "prefetch" => {
                    opts.prefetch = match v.parse::<u16>() {
                        Ok(n) if n > 0 => n,
                        _ => return Err(bad(format!("prefetch={v:?}: expected 1-65535"))),
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

/// The shifts of the levels, largest first (the order of the routing key's words).
fn shifts() -> impl Iterator<Item = u32> {
    (MIN_SHIFT..=MAX_SHIFT).rev()
}

/// The cascade's routing key for a delay of `delay_ms` (> 0): the delay rounded up to
/// [`RESOLUTION_MS`], capped at [`MAX_ROUTED_DELAY_MS`], one `0`/`1` word per level, largest
/// first. Returns the key and the delay it routes.
pub fn route_for(delay_ms: i64) -> (String, i64) {
    let units = (delay_ms.clamp(1, MAX_ROUTED_DELAY_MS) + RESOLUTION_MS - 1) >> MIN_SHIFT;
    let mut key = String::with_capacity(2 * LEVELS);
    for s in shifts() {
        if !key.is_empty() {
            key.push('.');
        }
        key.push(if (units >> (s - MIN_SHIFT)) & 1 == 1 { '1' } else { '0' });
    }
    (key, units << MIN_SHIFT)
}

/// The bindings of a router exchange that has waited out every level above `top` (so the
/// levels still to wait are among `MIN_SHIFT..=top`): one per level `t` there — "the words of
/// levels `top..t` are `0`, level `t`'s is `1`" → `Some(t)` (the queue of level `t`) — and
/// "all of them are `0`" → `None` (the due exchange). Words of levels above `top` are `*`.
/// Exactly one binding matches any routing key [`route_for`] makes.
pub fn router_bindings(top: u32) -> Vec<(String, Option<u32>)> {
    let word = |u: u32, t: Option<u32>| -> &'static str {
        if u > top {
            "*"
        } else {
            match t {
                Some(t) if u == t => "1",
                Some(t) if u < t => "",
                _ => "0",
            }
        }
    };
    let mut out = Vec::new();
    for t in (MIN_SHIFT..=top).rev() {
        let words: Vec<&str> = shifts().map(|u| word(u, Some(t))).take_while(|w| !w.is_empty()).collect();
        out.push((format!("{}.#", words.join(".")), Some(t)));
    }
    let zeros: Vec<&str> = shifts().map(|u| word(u, None)).collect();
    out.push((zeros.join("."), None));
    out
}

/// Names of everything a prefix declares.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// The names for `prefix`.
    pub fn new(prefix: &str) -> Names {
        Names { prefix: prefix.to_owned() }
    }
    /// The due queue every node consumes, and the fanout exchange in front of it.
    pub fn due(&self) -> String {
        format!("{}.due", self.prefix)
    }
    /// The router after level `s`'s queue (for `s` above the smallest level).
    pub fn router_after(&self, s: u32) -> String {
        format!("{}.dlx.after.{s}", self.prefix)
    }
    /// Level `s`'s queue (TTL 2^s ms).
    pub fn level_queue(&self, s: u32) -> String {
        format!("{}.dlx.wait.{s}", self.prefix)
    }
    /// Where level `s`'s queue dead-letters: its router, or `P.due` for the smallest level.
    fn after_level(&self, s: u32) -> String {
        if s == MIN_SHIFT { self.due() } else { self.router_after(s) }
    }
    /// The cascade's entry router.
    pub fn entry(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    /// The plugin's `x-delayed-message` exchange.
    pub fn delayed(&self) -> String {
        format!("{}.delayed", self.prefix)
    }
}

/// Counters of one trigger, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AmqpStats {
    /// Notices published and confirmed (first publications and re-publications).
    pub published: u64,
    /// Messages those notices travelled in (up to [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) each).
    pub published_messages: u64,
    /// Notices received from the due queue.
    pub received: u64,
    /// Messages they came in.
    pub received_messages: u64,
    /// Notices re-published after an `Early` answer.
    pub early: u64,
    /// Messages nacked with requeue after a `Redeliver` answer to one of their notices.
    pub redelivered: u64,
    /// Of the messages received, those the broker marked `redelivered`: handed out before to a
    /// consumer that did not settle them (a node killed or disconnected with them unacked, or
    /// a nack with requeue above). The generation fence and the claim make them harmless.
    pub broker_redelivered: u64,
    /// Messages whose body was not a notice (acked and dropped).
    pub malformed: u64,
    /// Times the consumer (re)connected.
    pub consumer_connections: u64,
    /// Times the publisher (re)connected.
    pub publisher_connections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    published_messages: AtomicU64,
    received: AtomicU64,
    received_messages: AtomicU64,
    early: AtomicU64,
    redelivered: AtomicU64,
    broker_redelivered: AtomicU64,
    malformed: AtomicU64,
    consumer_connections: AtomicU64,
    publisher_connections: AtomicU64,
}

/// RabbitMQ as an external trigger; see the crate docs.
#[derive(Clone)]
pub struct AmqpTrigger {
    inner: Arc<Inner>,
}

struct Inner {
    /// The client URL (with its password; never printed).
    driver_url: String,
    /// The client URL without its password, for messages.
    url: String,
    opts: AmqpOptions,
    names: Names,
    /// The publishing connection and its confirm channel, while they work.
    publisher: tokio::sync::Mutex<Option<(Connection, Vec<Channel>)>>,
    consuming: AtomicBool,
    counters: Counters,
}

impl std::fmt::Debug for AmqpTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTrigger")
            .field("url", &self.inner.url)
            .field("mode", &self.inner.opts.mode)
            .field("prefix", &self.inner.opts.prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

enum Ended {
    Stopped,
    Lost(String),
}

/// One message to publish: where it goes and the notices it carries.
struct Outgoing<'a> {
    exchange: String,
    routing_key: String,
    /// The plugin's `x-delay` header (`mode=delayed`), in ms.
    x_delay: Option<i64>,
    notices: Vec<&'a TimerRef>,
}

fn amqp_err(context: &str, e: lapin::Error) -> Error {
    let transient = !matches!(e.kind(), lapin::ErrorKind::ProtocolError(_));
    Error::Store { backend: BACKEND, message: format!("{context}: {e}"), transient, source: Some(Box::new(e)) }
}

fn transient(message: String) -> Error {
    Error::Store { backend: BACKEND, message, transient: true, source: None }
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl AmqpTrigger {
    /// A trigger on the broker an `amqp://` URL names (see the crate docs for its parameters).
    /// Does not connect yet: [`ExternalTrigger::start`] does.
    pub fn from_url(url: &str) -> Result<AmqpTrigger> {
        let (opts, driver) = AmqpOptions::from_url(url)?;
        Ok(AmqpTrigger::new(&driver, opts))
    }

    /// A trigger on the broker `driver_url` names (a plain lapin URL) with `opts`.
    pub fn new(driver_url: &str, opts: AmqpOptions) -> AmqpTrigger {
        AmqpTrigger {
            inner: Arc::new(Inner {
                driver_url: driver_url.to_owned(),
                url: redact(driver_url),
                names: Names::new(&opts.prefix),
                opts,
                publisher: tokio::sync::Mutex::new(None),
                consuming: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        }
    }

    /// The mode of this trigger.
    pub fn mode(&self) -> Mode {
        self.inner.opts.mode
    }

    /// The names of its exchanges and queues.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// True while the consumer is connected and consuming.
    pub fn consuming(&self) -> bool {
        self.inner.consuming.load(Relaxed)
    }

    /// Counters since this trigger was made.
    pub fn stats(&self) -> AmqpStats {
        let c = &self.inner.counters;
        AmqpStats {
            published: c.published.load(Relaxed),
            published_messages: c.published_messages.load(Relaxed),
            received: c.received.load(Relaxed),
            received_messages: c.received_messages.load(Relaxed),
            early: c.early.load(Relaxed),
            redelivered: c.redelivered.load(Relaxed),
            broker_redelivered: c.broker_redelivered.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
            consumer_connections: c.consumer_connections.load(Relaxed),
            publisher_connections: c.publisher_connections.load(Relaxed),
        }
    }

    async fn connect(&self) -> Result<Connection> {
        let props = ConnectionProperties::default().with_connection_name(LongString::from(format!("overdue {}", self.inner.opts.prefix)));
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.inner.driver_url, props)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(amqp_err(&format!("cannot connect to rabbitmq at {}", self.inner.url), e)),
            Err(_) => Err(transient(format!("connecting to rabbitmq at {} timed out after {CONNECT_TIMEOUT:?}", self.inner.url))),
        }
    }

    /// Declares the due queue and the mode's exchanges and queues (idempotent).
    async fn declare(&self, ch: &Channel) -> Result<()> {
        let n = &self.inner.names;
        let durable_ex = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        let durable_q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let e = |what: &str| {
            let what = what.to_owned();
            move |err| amqp_err(&format!("declaring {what}"), err)
        };
        ch.exchange_declare(n.due().as_str().into(), ExchangeKind::Fanout, durable_ex, FieldTable::default())
            .await
            .map_err(e("the due exchange"))?;
        let due_args = table(&[("x-queue-version", AMQPValue::LongInt(QUEUE_VERSION))]);
        ch.queue_declare(n.due().as_str().into(), durable_q, due_args).await.map_err(e("the due queue"))?;
        ch.queue_bind(n.due().as_str().into(), n.due().as_str().into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(e("the due binding"))?;
        match self.inner.opts.mode {
            Mode::Dlx => {
                // Routers first (a queue's dead-letter exchange should exist), then the queues,
                // then the bindings.
                let mut routers = vec![(n.entry(), MAX_SHIFT)];
                routers.extend(shifts().filter(|&s| s > MIN_SHIFT).map(|s| (n.router_after(s), s - 1)));
                for (ex, _) in &routers {
                    ch.exchange_declare(ex.as_str().into(), ExchangeKind::Topic, durable_ex, FieldTable::default())
                        .await
                        .map_err(e(ex))?;
                }
                for s in shifts() {
                    let q = n.level_queue(s);
                    let args = table(&[
                        ("x-message-ttl", AMQPValue::LongLongInt(1i64 << s)),
                        ("x-dead-letter-exchange", long_string(&n.after_level(s))),
                        ("x-queue-version", AMQPValue::LongInt(QUEUE_VERSION)),
                    ]);
                    ch.queue_declare(q.as_str().into(), durable_q, args).await.map_err(e(&q))?;
                }
                for (ex, top) in &routers {
                    for (pattern, target) in router_bindings(*top) {
                        match target {
                            Some(t) => ch
                                .queue_bind(n.level_queue(t).as_str().into(), ex.as_str().into(), pattern.as_str().into(), QueueBindOptions::default(), FieldTable::default())
                                .await
                                .map_err(e(ex))?,
                            None => ch
                                .exchange_bind(n.due().as_str().into(), ex.as_str().into(), pattern.as_str().into(), ExchangeBindOptions::default(), FieldTable::default())
                                .await
                                .map_err(e(ex))?,
                        }
                    }
                }
            }
            Mode::Delayed => {
                let args = table(&[("x-delayed-type", long_string("fanout"))]);
                let ex = n.delayed();
                if let Err(err) = ch.exchange_declare(ex.as_str().into(), ExchangeKind::Custom("x-delayed-message".into()), durable_ex, args).await {
                    if matches!(err.kind(), lapin::ErrorKind::ProtocolError(_)) {
                        return Err(Error::Config(format!(
                            "mode=delayed needs the RabbitMQ plugin {DELAYED_PLUGIN} (exchange type x-delayed-message), and the broker at {} refused to declare such an exchange ({err}); enable it with `rabbitmq-plugins enable {DELAYED_PLUGIN}`, or use mode=dlx, which needs no plugin",
                            self.inner.url
                        )));
                    }
                    return Err(amqp_err("declaring the x-delayed-message exchange", err));
                }
                ch.queue_bind(n.due().as_str().into(), ex.as_str().into(), "".into(), QueueBindOptions::default(), FieldTable::default())
                    .await
                    .map_err(e("the delayed binding"))?;
            }
        }
        Ok(())
    }

    /// The publisher's confirm channel, connecting (and declaring) if there is none that works.
    async fn publisher(&self) -> Result<Vec<Channel>> {
        let mut guard = self.inner.publisher.lock().await;
        if let Some((con, chs)) = guard.as_ref()
            && con.status().connected()
            && chs.iter().all(|ch| ch.status().connected())
        {
            return Ok(chs.clone());
        }
        if let Some((con, _)) = guard.take() {
            let _ = con.close(200, "reconnecting".into()).await;
        }
        let con = self.connect().await?;
        let mut chs = Vec::with_capacity(PUBLISH_CHANNELS);
        for i in 0..PUBLISH_CHANNELS {
            let ch = con.create_channel().await.map_err(|e| amqp_err("opening a channel", e))?;
            if i == 0 {
                self.declare(&ch).await?;
            }
            ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| amqp_err("turning publisher confirms on", e))?;
            chs.push(ch);
        }
        self.inner.counters.publisher_connections.fetch_add(1, Relaxed);
        *guard = Some((con, chs.clone()));
        Ok(chs)
    }

    /// Forgets the publisher (the next publish reconnects and declares again).
    async fn drop_publisher(&self) {
        if let Some((con, _)) = self.inner.publisher.lock().await.take() {
            let _ = con.close(200, "reconnecting".into()).await;
        }
    }

    /// Where a notice goes for a delay of `delay_ms`: (exchange, routing key, `x-delay`).
    fn destination(&self, delay_ms: i64) -> (String, String, Option<i64>) {
        let n = &self.inner.names;
        if delay_ms <= 0 {
            return (n.due(), String::new(), None);
        }
        match self.inner.opts.mode {
            Mode::Dlx => (n.entry(), route_for(delay_ms).0, None),
            Mode::Delayed => (n.delayed(), String::new(), Some(delay_ms.min(MAX_PLUGIN_DELAY_MS))),
        }
    }

    /// Publishes `(notice, delay)` pairs and waits for every confirm. Notices that take the
    /// same path (the same route in `mode=dlx`, the same `x-delay` in `mode=delayed`, or the due
    /// queue) travel together, up to [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) per message.
    async fn send(&self, items: &[(&TimerRef, i64)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let messages = self.pack(items);
        let chs = self.publisher().await?;
        let per = if messages.len() < SPLIT_AT { messages.len() } else { messages.len().div_ceil(chs.len()) };
        let sends = messages.chunks(per.max(1)).zip(&chs).map(|(part, ch)| self.send_on(ch, part));
        let result = futures::future::join_all(sends).await.into_iter().collect::<Result<Vec<()>>>().map(|_| ());
        if result.is_err() {
            self.drop_publisher().await;
        } else {
            self.inner.counters.published.fetch_add(items.len() as u64, Relaxed);
            self.inner.counters.published_messages.fetch_add(messages.len() as u64, Relaxed);
        }
        result
    }

    /// Groups notices by destination ([`pack_by`]).
    fn pack<'a>(&self, items: &[(&'a TimerRef, i64)]) -> Vec<Outgoing<'a>> {
        pack_by(items.iter().map(|(t, delay)| (self.destination(*delay), *t)))
            .into_iter()
            .map(|((exchange, routing_key, x_delay), notices)| Outgoing { exchange, routing_key, x_delay, notices })
            .collect()
    }

    async fn send_on(&self, ch: &Channel, messages: &[Outgoing<'_>]) -> Result<()> {
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let bodies: Vec<Vec<u8>> = messages.iter().map(|m| encode_notices(&m.notices)).collect();
        // All publishes at once: each `basic_publish` waits until its frames are written, so
        // awaiting them one by one would cost a round through the client's I/O loop per
        // message. They are polled (and numbered for confirms) in order.
        let mode = if self.inner.opts.persistent { PERSISTENT } else { TRANSIENT };
        let publishes = messages.iter().zip(&bodies).map(|(m, body)| {
            let headers = match m.x_delay {
                Some(d) => table(&[("x-delay", AMQPValue::LongLongInt(d))]),
                None => FieldTable::default(),
            };
            let props =
                BasicProperties::default().with_delivery_mode(mode).with_content_type("application/json".into()).with_headers(headers);
            ch.basic_publish(m.exchange.as_str().into(), m.routing_key.as_str().into(), options, body, props)
        });
        let mut confirms = Vec::with_capacity(messages.len());
        for c in futures::future::join_all(publishes).await {
            confirms.push(c.map_err(|e| amqp_err("publishing a notice", e))?);
        }
        let all = futures::future::join_all(confirms);
        let answers = tokio::time::timeout(CONFIRM_TIMEOUT, all)
            .await
            .map_err(|_| transient(format!("the broker did not confirm {} messages within {CONFIRM_TIMEOUT:?}", messages.len())))?;
        for a in answers {
            match a.map_err(|e| amqp_err("waiting for a publisher confirm", e))? {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                    return Err(transient("the broker returned a notice as unroutable (was the topology deleted?)".into()));
                }
                Confirmation::Nack(None) => return Err(transient("the broker refused (nacked) a notice".into())),
                Confirmation::NotRequested => return Err(transient("publisher confirms are off on the channel".into())),
            }
        }
        Ok(())
    }

    /// Connects a consumer: its own connection, QoS, `basic.consume` on the due queue.
    async fn subscribe(&self) -> Result<(Connection, Channel, lapin::Consumer)> {
        let con = self.connect().await?;
        let ch = con.create_channel().await.map_err(|e| amqp_err("opening a channel", e))?;
        self.declare(&ch).await?;
        ch.basic_qos(self.inner.opts.prefetch, BasicQosOptions::default()).await.map_err(|e| amqp_err("setting the prefetch", e))?;
        // Re-publications after `Early` go through the publisher's confirm channel.
        let consumer = ch
            .basic_consume(self.inner.names.due().as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(|e| amqp_err("consuming the due queue", e))?;
        Ok((con, ch, consumer))
    }

    async fn pump(&self, sink: &Arc<dyn DueSink>, consumer: &mut lapin::Consumer, deliveries: &mut JoinSet<()>) -> Ended {
        loop {
            tokio::select! {
                biased;
                _ = sink.until_stopped() => return Ended::Stopped,
                Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
                msg = consumer.next(), if deliveries.len() < DELIVERIES_IN_FLIGHT => {
                    let mut batch = Vec::new();
                    let mut notices = 0;
                    let mut lost = None;
                    match msg {
                        Some(Ok(d)) => notices += self.take(d, &mut batch),
                        Some(Err(e)) => return Ended::Lost(e.to_string()),
                        None => return Ended::Lost("the consumer was cancelled or its connection closed".into()),
                    }
                    while notices < DELIVER_BATCH {
                        match consumer.next().now_or_never() {
                            Some(Some(Ok(d))) => notices += self.take(d, &mut batch),
                            Some(Some(Err(e))) => { lost = Some(e.to_string()); break; }
                            Some(None) => { lost = Some("the consumer was cancelled or its connection closed".into()); break; }
                            None => break,
                        }
                    }
                    if !batch.is_empty() {
                        let (this, sink) = (self.clone(), sink.clone());
                        deliveries.spawn(async move { this.deliver(sink, batch).await });
                    }
                    if let Some(why) = lost {
                        return Ended::Lost(why);
                    }
                }
            }
        }
    }

    /// Decodes one message into `batch`; returns how many notices it carries. A body that is
    /// not notices is acked and dropped (counted in `malformed`).
    fn take(&self, d: lapin::message::Delivery, batch: &mut Vec<(lapin::message::Delivery, Vec<TimerRef>)>) -> usize {
        let c = &self.inner.counters;
        c.received_messages.fetch_add(1, Relaxed);
        if d.redelivered {
            c.broker_redelivered.fetch_add(1, Relaxed);
        }
        match decode_notices(&d.data) {
            Ok(notices) => {
                let n = notices.len();
                c.received.fetch_add(n as u64, Relaxed);
                batch.push((d, notices));
                n
            }
            Err(e) => {
                c.malformed.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "amqp trigger: a message on the due queue is not notices; dropping it");
                tokio::spawn(async move {
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                });
                0
            }
        }
    }

    /// Delivers the notices of a batch of messages and settles each message with the broker by
    /// [`MessageOutcome::of`] the engine's answers to its notices.
    async fn deliver(&self, sink: Arc<dyn DueSink>, batch: Vec<(lapin::message::Delivery, Vec<TimerRef>)>) {
        let all: Vec<TimerRef> = batch.iter().flat_map(|(_, n)| n.iter().cloned()).collect();
        let mut answers = sink.deliver(all).await.into_iter();
        let now = sink.now_ms();
        let (mut acks, mut early, mut redeliver) = (Vec::new(), Vec::new(), Vec::new());
        for (d, notices) in &batch {
            let mine: Vec<Delivery> = answers.by_ref().take(notices.len()).collect();
            match MessageOutcome::of(&mine) {
                MessageOutcome::Ack => acks.push(d),
                MessageOutcome::Republish(idx) => early.push((d, idx.into_iter().map(|i| &notices[i]).collect::<Vec<_>>())),
                MessageOutcome::Redeliver => redeliver.push(d),
            }
        }
        // All at once: each ack waits until it is written, one by one they would cost a round
        // through the client's I/O loop each.
        let acked = futures::future::join_all(acks.iter().map(|d| d.acker.ack(BasicAckOptions::default()))).await;
        if let Some(Err(e)) = acked.into_iter().find(|r| r.is_err()) {
            tracing::debug!(error = %e, "amqp trigger: an ack failed; the broker delivers again");
        }
        if !early.is_empty() {
            let items: Vec<(&TimerRef, i64)> =
                early.iter().flat_map(|(_, ts)| ts.iter().map(|t| (*t, t.due_at.saturating_sub(now)))).collect();
            let ok = match self.send(&items).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, n = items.len(), "amqp trigger: re-publishing early notices failed; nacking their messages");
                    false
                }
            };
            self.inner.counters.early.fetch_add(items.len() as u64, Relaxed);
            let settled = futures::future::join_all(early.iter().map(|(d, _)| async move {
                if ok {
                    d.acker.ack(BasicAckOptions::default()).await
                } else {
                    d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await
                }
            }))
            .await;
            if let Some(Err(e)) = settled.into_iter().find(|r| r.is_err()) {
                tracing::debug!(error = %e, "amqp trigger: settling an early notice failed");
            }
        }
        if !redeliver.is_empty() {
            self.inner.counters.redelivered.fetch_add(redeliver.len() as u64, Relaxed);
            if !sink.stopped() {
                tokio::select! {
                    _ = sink.until_stopped() => {}
                    _ = tokio::time::sleep(REDELIVER_PAUSE) => {}
                }
            }
            let nacks = redeliver.iter().map(|d| d.acker.nack(BasicNackOptions { requeue: true, multiple: false }));
            let _ = futures::future::join_all(nacks).await;
        }
    }

    /// Deletes this prefix's exchanges and queues (with the messages in them); for tests and
    /// benchmarks. Returns how many messages were deleted.
    pub async fn purge(&self) -> Result<u64> {
        self.drop_publisher().await;
        let con = self.connect().await?;
        let mut deleted = 0u64;
        let n = &self.inner.names;
        let mut queues = vec![n.due()];
        let mut exchanges = vec![n.due(), n.delayed()];
        exchanges.push(n.entry());
        for s in shifts() {
            queues.push(n.level_queue(s));
            exchanges.push(n.router_after(s));
        }
        for q in queues {
            // A failed delete (not found is fine) closes the channel: one channel each.
            let ch = con.create_channel().await.map_err(|e| amqp_err("opening a channel", e))?;
            if let Ok(count) = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await {
                deleted += u64::from(count);
                let _ = ch.close(200, "done".into()).await;
            }
        }
        let ch = con.create_channel().await.map_err(|e| amqp_err("opening a channel", e))?;
        for x in exchanges {
            // Deleting an exchange that does not exist is not an error in RabbitMQ 3.x.
            if ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await.is_err() {
                break;
            }
        }
        let _ = con.close(200, "purged".into()).await;
        Ok(deleted)
    }
}

#[async_trait]
impl ExternalTrigger for AmqpTrigger {
    fn name(&self) -> &'static str {
        match self.inner.opts.mode {
            Mode::Dlx => "amqp-dlx",
            Mode::Delayed => "amqp-delayed",
        }
    }

    async fn start(&self) -> Result<()> {
        match self.publisher().await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.drop_publisher().await;
                Err(e)
            }
        }
    }

    async fn publish(&self, notices: &[TimerRef], now: i64) -> Result<()> {
        let items: Vec<(&TimerRef, i64)> = notices.iter().map(|t| (t, t.due_at.saturating_sub(now))).collect();
        self.send(&items).await
    }

    async fn consume(&self, sink: Arc<dyn DueSink>) -> Result<()> {
        let mut backoff = self.inner.opts.reconnect_min;
        let mut deliveries = JoinSet::new();
        while !sink.stopped() {
            match self.subscribe().await {
                Ok((con, _ch, mut consumer)) => {
                    self.inner.consuming.store(true, Relaxed);
                    self.inner.counters.consumer_connections.fetch_add(1, Relaxed);
                    sink.set_healthy(true, None);
                    backoff = self.inner.opts.reconnect_min;
                    let ended = self.pump(&sink, &mut consumer, &mut deliveries).await;
                    self.inner.consuming.store(false, Relaxed);
                    match ended {
                        Ended::Stopped => {
                            // Let running deliveries settle their messages before closing.
                            while deliveries.join_next().await.is_some() {}
                            let _ = con.close(200, "engine stopped".into()).await;
                            break;
                        }
                        Ended::Lost(why) => {
                            tracing::warn!(error = %why, url = %self.inner.url, "amqp trigger lost its consumer; reconnecting (unacknowledged notices are delivered again)");
                            sink.set_healthy(false, Some(format!("amqp consumer disconnected: {why}")));
                            let _ = con.close(200, "reconnecting".into()).await;
                        }
                    }
                }
                Err(e @ Error::Config(_)) => {
                    sink.set_healthy(false, Some(e.to_string()));
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "amqp trigger cannot consume; retrying");
                    sink.set_healthy(false, Some(e.to_string()));
                }
            }
            if !overdue_core::reconnect_pause(&*sink, &mut backoff, RECONNECT_MAX.max(self.inner.opts.reconnect_min)).await {
                break;
            }
        }
        while deliveries.join_next().await.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units_of(key: &str) -> i64 {
        key.split('.').fold(0i64, |acc, w| (acc << 1) | i64::from(w == "1"))
    }

    #[test]
    fn routes_round_up_to_the_resolution_and_sum_to_the_delay() {
        for d in [1, 127, 128, 129, 1_000, 1_024, 10_000, 3_600_000, 86_400_000 * 30, MAX_ROUTED_DELAY_MS] {
            let (key, routed) = route_for(d);
            assert_eq!(key.split('.').count(), LEVELS, "{key}");
            assert!(routed >= d && routed - d < RESOLUTION_MS, "delay {d} routed as {routed}");
            assert_eq!(units_of(&key) << MIN_SHIFT, routed, "{key}");
        }
        let (_, routed) = route_for(MAX_ROUTED_DELAY_MS * 3);
        assert_eq!(routed, MAX_ROUTED_DELAY_MS, "longer delays travel the maximum and come back early");
        assert!(MAX_ROUTED_DELAY_MS < MAX_PLUGIN_DELAY_MS + 1 && (1i64 << MAX_SHIFT) <= u32::MAX as i64);
    }

    /// RabbitMQ's topic match, for patterns whose only `#` is the last word.
    fn topic_match(pattern: &str, key: &str) -> bool {
        let p: Vec<&str> = pattern.split('.').collect();
        let k: Vec<&str> = key.split('.').collect();
        let (fixed, open) = match p.split_last() {
            Some((&"#", rest)) => (rest, true),
            _ => (&p[..], false),
        };
        (if open { k.len() >= fixed.len() } else { k.len() == fixed.len() }) && fixed.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
    }

    /// Follows a routing key through the routers as the broker would; returns the levels waited.
    fn walk(key: &str) -> Vec<u32> {
        let mut waited = Vec::new();
        let mut top = MAX_SHIFT;
        loop {
            let hits: Vec<Option<u32>> = router_bindings(top).into_iter().filter(|(p, _)| topic_match(p, key)).map(|(_, t)| t).collect();
            assert_eq!(hits.len(), 1, "key {key} under level {top} matched {hits:?}");
            match hits[0] {
                None => return waited,
                Some(t) => {
                    waited.push(t);
                    if t == MIN_SHIFT {
                        return waited;
                    }
                    top = t - 1;
                }
            }
        }
    }

    #[test]
    fn every_route_waits_exactly_its_delay_in_its_one_bits_largest_first() {
        let mut d: i64 = 1;
        let mut delays = vec![1, 127, 128, 129, 1_000, 1_024, 1_152, 10_000, 3_600_000, MAX_ROUTED_DELAY_MS];
        for _ in 0..200 {
            d = (d.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407)).rem_euclid(MAX_ROUTED_DELAY_MS) + 1;
            delays.push(d);
        }
        for d in delays {
            let (key, routed) = route_for(d);
            let waited = walk(&key);
            assert!(waited.windows(2).all(|w| w[0] > w[1]), "{d}: {waited:?}");
            assert_eq!(waited.iter().map(|s| 1i64 << s).sum::<i64>(), routed, "delay {d} key {key} waited {waited:?}");
        }
        assert_eq!(walk(&format!("{}0", "0.".repeat(LEVELS - 1))), Vec::<u32>::new(), "no delay: straight to the due queue");
    }

    #[test]
    fn urls_are_parsed_and_bad_ones_refused() {
        let (o, d) = AmqpOptions::from_url("amqp://guest:guest@127.0.0.1:5672/%2f?mode=delayed&prefix=a.b&heartbeat=10&prefetch=10&delivery=transient")
            .expect("url");
        assert_eq!((o.mode, o.prefix.as_str(), o.prefetch, o.persistent), (Mode::Delayed, "a.b", 10, false));
        assert_eq!(d, "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10");
        let (o, d) = AmqpOptions::from_url("amqp://127.0.0.1").expect("url");
        assert_eq!((o.mode, o.prefix.as_str(), d.as_str()), (Mode::Dlx, DEFAULT_PREFIX, "amqp://127.0.0.1"));
        for bad in ["http://x", "amqps://h", "amqp://h?mode=fast", "amqp://h?prefix=", "amqp://h?prefix=a/b", "amqp://h?prefetch=0", "amqp://h?delivery=maybe"] {
            let e = AmqpOptions::from_url(bad).expect_err(bad);
            assert!(matches!(e, Error::Config(_)), "{bad}: {e:?}");
        }
        let e = AmqpOptions::from_url("amqp://u:secret@h?mode=no").expect_err("bad");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn names_chain_the_levels_to_the_due_queue() {
        let n = Names::new("p");
        assert_eq!(n.entry(), "p.dlx");
        assert_eq!(n.after_level(31), "p.dlx.after.31");
        assert_eq!(n.after_level(MIN_SHIFT), "p.due");
        assert_eq!(n.level_queue(10), "p.dlx.wait.10");
    }
}
