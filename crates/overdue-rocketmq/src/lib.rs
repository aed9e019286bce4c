//! # overdue-rocketmq
//!
//! RocketMQ as an [`ExternalTrigger`]: the broker does the waiting, a SQL store with its outbox
//! on stays the source of truth (see `overdue_core::trigger`). Two modes, chosen by the URL:
//!
//! - **`mode=timer`** (default) — RocketMQ 5 *timer messages*: each notice is published with
//!   a delay in milliseconds (the `TIMER_DELAY_MS` property, the relative form of
//!   `deliver_time_ms`) and the broker's timer wheel appends it to the due topic when the
//!   delay has passed. Arbitrary delays, no head-of-line blocking.
//! - **`mode=levels`** — the classic 18 *delay levels* (`1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m
//!   9m 10m 20m 30m 1h 2h`, [`DELAY_LEVELS_MS`]), for brokers without the timer wheel. A notice
//!   is published with the largest level not longer than its remaining delay and goes round
//!   again for the rest (below).
//!
//! ## Topics and groups
//!
//! One topic `P-due` (`P` = the URL's `prefix`, [`Names`]) with [`DEFAULT_QUEUES`] queues,
//! created at [`ExternalTrigger::start`]. Both the timer wheel and the delay levels hold a
//! message in the broker's own system topics and append it to `P-due` when it is due, so the
//! due topic only ever holds due notices, in the order they came due. Every overdue node
//! consumes `P-due` with a push consumer in one consumer group (`group`, default `P-nodes`,
//! clustering model): the broker spreads the topic's queues over the nodes, and a node that
//! dies (its connection closes, or its heartbeats stop) has its queues given to the others, which
//! continue from the group's committed offsets.
//!
//! ## Resolution and maximum delay
//!
//! - **`mode=timer`**: the broker's `timerPrecisionMs` (100 ms in `scripts/brokers.sh`, 1 s by
//!   default in RocketMQ). rocketmq-rust 1.0.0 delivers a timer message on the first check of
//!   its wheel after the deliver time (it checks every 100 ms at best) and skips a check while
//!   newer timer messages wait to be indexed, so under a steady stream a message comes one to
//!   three checks late (up to ~250 ms at 20,000 timers/s here). So each message is published
//!   `lead_ms` ahead ([`DEFAULT_TIMER_LEAD_MS`], 300 ms) with its delay rounded down to
//!   [`TIMER_SLOT_MS`], and the engine holds notices that arrive up to 2 s early until they are
//!   due (each group of them at its own due time): nothing fires early, and the broker's
//!   lateness is absorbed by the lead (p99 4-71 ms at 20,000 timers/s, `docs/rocketmq.md`).
//!   The broker refuses a delay longer than `timerMaxDelaySec` (RocketMQ's default is 3 days, 259 200 s; [`DEFAULT_MAX_TIMER_DELAY_MS`]):
//!   a longer delay is published for the maximum (the URL's `max_delay_ms`, which must not exceed
//!   the broker's), comes back early, the engine answers [`Delivery::Early`] and the consumer
//!   publishes it again for the delay left — a *hop*. A 30-day timer takes 10 hops.
//! - **`mode=levels`**: a delay `d` is published at the largest level `≤ d` (a notice due in
//!   less than 1 s is published without a delay); when it arrives more than 2 s early it is
//!   published again for the rest, with the largest level that fits. So small delays take a
//!   few hops (an 8 s timer: 5 s, then 1 s, then it is held 2 s), larger ones arrive within
//!   2 s of their due time in at most a handful of hops below 2 h, and every 2 h beyond that is
//!   one more hop. Lateness is the broker's delivery latency; the steps are 1 s at the small
//!   end.
//! - A notice already due is published without a delay.
//!
//! The engine's clock decides the delay (`due_at - now`), so a manual clock in tests stays in
//! virtual time; the broker only sees relative delays.
//!
//! ## Delivery
//!
//! [`ExternalTrigger::publish`] sends every notice synchronously (up to
//! [`PUBLISH_CONCURRENCY`] at a time; RocketMQ does not batch delayed messages) with
//! `waitStoreMsgOK` and returns `Ok` only after the broker answered `SEND_OK` for each of them
//! (`FLUSH_DISK_TIMEOUT`, `SLAVE_NOT_AVAILABLE` and errors fail the batch; the relay publishes
//! it again, duplicates are harmless). A message carries the notices of one publish that take
//! the same hop (the same delay level, or in `mode=timer` the same delay rounded down to
//! [`TIMER_SLOT_MS`]), up to [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE): the broker's cost is per message (a
//! `SEND_OK`, a timer-wheel slot, a dequeue). The body is overdue's notice list
//! ([`overdue_core::encode_notices`]), `[{"queue","key","generation","due_at"}, …]`, never the
//! payload; the message key is the first notice's `queue/key/generation`, for the broker's
//! message index.
//!
//! The push consumer hands batches of up to [`CONSUME_BATCH`] messages to
//! [`DueSink::deliver`] ([`CONSUME_THREADS`] batches at once; a batch that arrived early holds
//! its thread until it is due) and answers the broker only when every notice of the batch is
//! settled: [`Delivery::Ack`] needs nothing more; for
//! [`Delivery::Early`] the notice is published again for the rest of its delay, and for
//! [`Delivery::Redeliver`] (the engine is stopping, or another node holds the claim) it is
//! published again with a delay of [`REDELIVER_DELAY_MS`]. Once those re-publications are
//! confirmed the batch is `CONSUME_SUCCESS` (its offsets advance); if one fails, the whole batch
//! is `RECONSUME_LATER`, and the broker delivers it again through the group's retry topic (the
//! notices already handled come back stale or done and are dropped by the generation fence).
//!
//! ## What it cannot do, and what covers it
//!
//! - A published message cannot be withdrawn: cancel and reschedule work by the generation
//!   fence (a stale notice is dropped when it arrives and counted in the engine's
//!   `stale_dropped`).
//! - Throughput of due timers is the broker's, counted in messages: rocketmq-rust 1.0.0's timer
//!   wheel released a burst of 10,000 messages due at one instant at ~460-630 /s here (delay
//!   levels ~700 /s; undelayed ones ~1,450 /s). Packing (above) puts up to 128 notices in one
//!   message, so a steady 20,000-40,000 timers/s comes through the broker; notices coming due
//!   faster than the broker releases their messages fall behind, and the backstop fires what is
//!   overdue by its slack (see `docs/rocketmq.md`, `examples/rocketmq_drain_rate.rs`,
//!   `examples/rocketmq_fire_rate.rs`).
//! - Offsets are committed to the broker every [`OFFSET_PERSIST_MS`]: a node killed before
//!   that has its last consumed notices delivered again to the node that takes over its queues;
//!   they arrive done or stale and are dropped.
//! - The broker flushes its commit log asynchronously by default: a broker crash (not a clean
//!   stop) can lose notices it had confirmed, and a message that exhausts the group's retries
//!   goes to the dead-letter topic `%DLQ%group`. The store still has those timers; the
//!   engine's backstop sweep fires them and counts them in `overdue_backstop_rescued_total`.
//! - Broker restart or connection loss: the consumer probes the broker every
//!   [`HEALTH_PROBE_INTERVAL`] (the due topic's max offset) and reports the result through
//!   [`DueSink::set_healthy`]. The client reconnects on its own, but after a broker restart its
//!   connections stayed broken for ~25 s here, so after [`PROBE_FAILURES_BEFORE_RESTART`] failed
//!   probes in a row the consumer is replaced by a new one (a new client instance with new
//!   connections; offsets are the group's, on the broker), with backoff ([`RECONNECT_MIN`]
//!   doubling to [`RECONNECT_MAX`]) while the broker stays away. In the restart test the
//!   consumer was back 0.4 s after the broker, and every timer came through it. Outbox rows
//!   whose publish was not confirmed are published again by the relay.
//! - Timer messages survive a broker stopped and started on the same store (they are in its
//!   commit log and timer log; measured in `tests/broker_restart.rs`, `mode=timer` only).
//! - [`RocketTrigger::purge`] deletes the topic (for tests and benchmarks); timer messages still
//!   waiting inside the broker's timer wheel cannot be deleted, so tests use a fresh prefix each.
//!
//! ## URL
//!
//! `rocketmq://host:port[,host:port…]?mode=timer|levels&prefix=NAME&group=NAME&max_delay_ms=N&queues=N&lead_ms=N`
//! — the host list is the name server(s); nothing else is read from the URL.
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `mode` | `timer` (timer messages, any delay) or `levels` (the 18 delay levels) | `timer` |
//! | `prefix` | first part of the topic and group names, `[A-Za-z0-9_-]{1,64}` | `overdue` |
//! | `group` | the consumer group every node joins, `[A-Za-z0-9_-]{1,128}` | `P-nodes` |
//! | `max_delay_ms` | longest delay of one timer message; at most the broker's `timerMaxDelaySec` | [`DEFAULT_MAX_TIMER_DELAY_MS`] (3 days) |
//! | `queues` | queues of the due topic when it is created, 1-64 (the most nodes that share the work) | [`DEFAULT_QUEUES`] |
//! | `lead_ms` | `mode=timer` only: publish this far ahead of the due time, 0-1500 (see below) | [`DEFAULT_TIMER_LEAD_MS`] |

// The client's futures are deep: proving them `Send` needs more than the default 128 levels.
#![recursion_limit = "512"]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use overdue_core::{
    Delivery, DueSink, Error, ExternalTrigger, Result, TimerRef, decode_notices, encode_notices, pack_by,
};
use rocketmq_client_rust::{
    ClientConfig, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultMQAdminExt,
    DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently, TelemetryHandle, TopicAdmin,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_model::result::SendStatus;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner, TaskKind};
use tokio::task::JoinSet;

/// Name of this backend in store errors.
pub const BACKEND: &str = "rocketmq";
/// Default first part of the topic and group names.
pub const DEFAULT_PREFIX: &str = "overdue";
/// RocketMQ's default `timerMaxDelaySec` (3 days), in ms: the longest delay one timer message
/// may have unless the URL's `max_delay_ms` says otherwise.
pub const DEFAULT_MAX_TIMER_DELAY_MS: i64 = 3 * 86_400_000;
/// The smallest `max_delay_ms` the URL accepts.
pub const MIN_MAX_TIMER_DELAY_MS: i64 = 1_000;
/// The standard delay levels (`messageDelayLevel`), level `i + 1` waits `DELAY_LEVELS_MS[i]`.
pub const DELAY_LEVELS_MS: [i64; 18] = [
    1_000, 5_000, 10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000, 600_000,
    1_200_000, 1_800_000, 3_600_000, 7_200_000,
];
/// Queues of the due topic when the trigger creates it.
pub const DEFAULT_QUEUES: i32 = 8;
/// Most queues the URL accepts.
pub const MAX_QUEUES: i32 = 64;
/// Most messages handed to [`DueSink::deliver`] in one call (the push consumer's
/// `consumeMessageBatchMaxSize`, and its pull batch).
pub const CONSUME_BATCH: u32 = 32;
/// Batches delivered at once per node (the push consumer's consume threads). A batch that
/// arrived `lead_ms` early holds its thread until it is due, so 16 rather than 4, for room. The
/// bench does not separate the two (p99 57 ms with 4 threads in one run, 4-71 ms with 16 in
/// five; docs/rocketmq.md): a choice made for headroom, not a measured gain.
pub const CONSUME_THREADS: u32 = 16;
/// Sends in flight at once while publishing a batch.
pub const PUBLISH_CONCURRENCY: usize = 64;
/// Delay of a notice published again after a `Redeliver` answer.
pub const REDELIVER_DELAY_MS: i64 = 1_000;
/// How often the consumer commits its offsets to the broker.
pub const OFFSET_PERSIST_MS: u32 = 1_000;
/// How often the client refreshes topic routes from the name server (RocketMQ's default: 30 s; the client accepts no less than 10 s).
pub const ROUTE_POLL_MS: u32 = 10_000;
/// How often the client sends heartbeats to the broker (RocketMQ's default: 30 s; the client accepts no less than 10 s).
pub const HEARTBEAT_MS: u32 = 10_000;
/// How often the consumer checks that the broker answers (and reports it).
pub const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Failed probes in a row after which the consumer is replaced by a new one.
pub const PROBE_FAILURES_BEFORE_RESTART: u32 = 3;
/// First pause before the consumer is started again; doubles per failure up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
/// Longest pause between attempts to start the consumer.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long one send may take (the client's own retries included).
const SEND_TIMEOUT_MS: u64 = 5_000;
/// How long a whole publish batch may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long starting the client or the consumer may take.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long stopping a consumer may take in all.
const CONSUMER_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the consumer's shutdown waits for batches in flight.
const SHUTDOWN_WAIT_MS: u64 = 5_000;
/// The topic whose route tells the client where to create topics (`TBW102`, registered by a
/// broker with `autoCreateTopicEnable`).
const CREATE_TOPIC_KEY: &str = "TBW102";
/// Worker threads of the client's own runtime.
const CLIENT_THREADS: usize = 2;

/// How the broker waits; see the crate docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Timer messages (a delay in ms per message, up to the broker's maximum).
    #[default]
    Timer,
    /// The 18 standard delay levels.
    Levels,
}

/// Delays of timer messages are rounded down to this before notices are packed (see
/// [`RocketTrigger::pack`]): the broker's timer precision in `scripts/brokers.sh`.
pub const TIMER_SLOT_MS: i64 = 100;

/// How far ahead of its notices' due time `mode=timer` publishes a timer message (the URL's
/// `lead_ms`); the engine holds what arrives early until it is due (up to 2 s). rocketmq-rust
/// 1.0.0 checks its timer wheel every 100 ms but skips a check while timer messages wait to be
/// indexed, so a due message comes one to three checks late (up to ~250 ms here at 20,000
/// timers/s). `overdue bench … --rate 20000` (docs/rocketmq.md): lateness p99 211-284 ms with
/// no lead, 4-71 ms with 300 ms, 32-193 ms with 500 ms (a longer lead holds the consume
/// threads longer).
pub const DEFAULT_TIMER_LEAD_MS: i64 = 300;
/// The largest `lead_ms`: below the engine's 2 s early hold by more than one timer slot, so a
/// notice published ahead of time is always held, never sent round again.
pub const MAX_TIMER_LEAD_MS: i64 = 1_500;

/// Settings the RocketMQ client reads from the process environment (only there: its builders
/// take no such option) when its first client instance starts; the `overdue` binary sets each
/// one that is not set already, first thing in `main`, before any thread exists.
///
/// `rocketmq.client.rebalance.minInterval` (the client's default: 1,000 ms): the client's
/// rebalance service runs no rebalance sooner than this after the last one, and counts from its
/// own start, so a new consumer takes its queues, and pulls, only a second after it starts. At
/// 20,000 timers/s the timers due in its first 250 ms came a median 480 ms late (up to 660 ms),
/// which was the p99
/// of `overdue bench` (docs/rocketmq.md, "Starting a consumer"). At 100 ms the bench's first
/// due message was taken 4 ms after the broker stored it. (By the client's source, a rebalance
/// asked for when a node joins or leaves then also waits at most 100 ms; not measured. Its
/// periodic rebalance stays every 20 s.) A program embedding this crate sets it itself, or
/// gets the client's default.
pub const CLIENT_ENVIRONMENT: [(&str, &str); 1] = [(REBALANCE_MIN_INTERVAL, "100")];
const REBALANCE_MIN_INTERVAL: &str = "rocketmq.client.rebalance.minInterval";

/// How one notice is published: how long the broker holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hop {
    /// No delay: it is due (or, in `levels` mode, due in less than the smallest level).
    Now,
    /// A timer message with this delay (ms).
    Timer(i64),
    /// Delay level `level` (1-18), which waits `ms`.
    Level { level: i32, ms: i64 },
}

impl Hop {
    /// How long the broker holds the notice (ms).
    pub fn waits_ms(self) -> i64 {
        match self {
            Hop::Now => 0,
            Hop::Timer(ms) | Hop::Level { ms, .. } => ms,
        }
    }
}

/// The hop for a notice with `delay_ms` left: in `timer` mode the delay capped at
/// `max_timer_delay_ms`, in `levels` mode the largest level not longer than the delay.
pub fn hop_for(mode: Mode, delay_ms: i64, max_timer_delay_ms: i64) -> Hop {
    if delay_ms <= 0 {
        return Hop::Now;
    }
    match mode {
        Mode::Timer => Hop::Timer(delay_ms.min(max_timer_delay_ms.max(1))),
        Mode::Levels => match DELAY_LEVELS_MS.iter().rposition(|&ms| ms <= delay_ms) {
            Some(i) => Hop::Level { level: i as i32 + 1, ms: DELAY_LEVELS_MS[i] },
            None => Hop::Now,
        },
    }
}

/// How to open a [`RocketTrigger`]; [`RocketOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug)]
pub struct RocketOptions {
    /// Name server address(es), `host:port`, separated by `;` (RocketMQ's own separator).
    pub name_server: String,
    pub mode: Mode,
    /// First part of the topic and group names.
    pub prefix: String,
    /// The consumer group every node joins; `None` = `{prefix}-nodes`.
    pub group: Option<String>,
    /// Longest delay of one timer message (ms); at most the broker's `timerMaxDelaySec`.
    pub max_delay_ms: i64,
    /// Queues of the due topic when the trigger creates it.
    pub queues: i32,
    /// `mode=timer`: how far ahead of its due time a timer message is published (ms).
    pub lead_ms: i64,
    /// First pause before the consumer is started again (doubling up to [`RECONNECT_MAX`]).
    pub reconnect_min: Duration,
}

impl Default for RocketOptions {
    fn default() -> Self {
        RocketOptions {
            name_server: "127.0.0.1:9876".to_owned(),
            mode: Mode::Timer,
            prefix: DEFAULT_PREFIX.to_owned(),
            group: None,
            max_delay_ms: DEFAULT_MAX_TIMER_DELAY_MS,
            queues: DEFAULT_QUEUES,
            lead_ms: DEFAULT_TIMER_LEAD_MS,
            reconnect_min: RECONNECT_MIN,
        }
    }
}

impl RocketOptions {
    /// Reads a `rocketmq://host:port[,host:port…]?…` URL (see the crate docs).
    pub fn from_url(url: &str) -> Result<RocketOptions> {
        let bad = |m: String| Error::Config(format!("invalid rocketmq trigger url {url}: {m}"));
        let Some(rest) = url.strip_prefix("rocketmq://") else {
            return Err(bad("it does not start with rocketmq://".into()));
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('@') || hosts.contains('/') {
            return Err(bad("expected only name server addresses, host:port[,host:port…], before the '?'".into()));
        }
        let mut servers = Vec::new();
        for h in hosts.split([',', ';']) {
            let Some((host, port)) = h.rsplit_once(':') else {
                return Err(bad(format!("name server {h:?} is not host:port (e.g. 127.0.0.1:9876)")));
            };
            if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
                return Err(bad(format!("name server {h:?} has no valid host name")));
            }
            if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
                return Err(bad(format!("name server {h:?} has no valid port")));
            }
            servers.push(h);
        }
        let mut opts = RocketOptions { name_server: servers.join(";"), ..RocketOptions::default() };
        let mut lead_given = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "mode" => {
                    opts.mode = match v {
                        "timer" => Mode::Timer,
                        "levels" => Mode::Levels,
                        _ => return Err(bad(format!("mode={v:?}: expected timer or levels"))),
                    }
                }
                "prefix" => {
                    if !valid_name(v, 64) {
                        return Err(bad(format!("prefix={v:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")));
                    }
                    opts.prefix = v.to_owned();
                }
                "group" => {
                    if !valid_name(v, 128) {
                        return Err(bad(format!("group={v:?} must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-'")));
                    }
                    opts.group = Some(v.to_owned());
                }
                "max_delay_ms" => {
                    opts.max_delay_ms = match v.parse::<i64>() {
                        Ok(n) if n >= MIN_MAX_TIMER_DELAY_MS => n,
                        _ => {
                            return Err(bad(format!(
                                "max_delay_ms={v:?}: expected a number of ms ≥ {MIN_MAX_TIMER_DELAY_MS}, at most the broker's timerMaxDelaySec × 1000"
                            )));
                        }
                    }
                }
                "queues" => {
                    opts.queues = match v.parse::<i32>() {
                        Ok(n) if (1..=MAX_QUEUES).contains(&n) => n,
                        _ => return Err(bad(format!("queues={v:?}: expected 1-{MAX_QUEUES}"))),
                    }
                }
                "lead_ms" => {
                    opts.lead_ms = match v.parse::<i64>() {
                        Ok(n) if (0..=MAX_TIMER_LEAD_MS).contains(&n) => n,
                        _ => return Err(bad(format!("lead_ms={v:?}: expected 0-{MAX_TIMER_LEAD_MS} (ms)"))),
                    };
                    lead_given = true;
                }
                _ => {
                    return Err(bad(format!(
                        "unknown parameter {k:?} (known: mode, prefix, group, max_delay_ms, queues, lead_ms)"
                    )));
                }
            }
        }
        // (`pack` applies the lead in timer mode only.)
        if opts.mode == Mode::Levels && lead_given {
            return Err(bad("lead_ms applies to mode=timer only (delay levels arrive up to 2 s early by design)".into()));
        }
        if opts.mode == Mode::Levels {
            opts.lead_ms = 0;
        }
        Ok(opts)
    }
}

/// RocketMQ's topic and group character set, `[A-Za-z0-9_-]`, and a length limit.
fn valid_name(p: &str, max: usize) -> bool {
    !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// Names of what a prefix uses.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
    group: Option<String>,
}

impl Names {
    /// The names for `prefix` and an optional consumer group.
    pub fn new(prefix: &str, group: Option<&str>) -> Names {
        Names { prefix: prefix.to_owned(), group: group.map(str::to_owned) }
    }
    /// The due topic every node consumes.
    pub fn topic(&self) -> String {
        format!("{}-due", self.prefix)
    }
    /// The consumer group every node joins.
    pub fn group(&self) -> String {
        self.group.clone().unwrap_or_else(|| format!("{}-nodes", self.prefix))
    }
    /// The producer group (RocketMQ needs one; it only matters for transactions).
    pub fn producer_group(&self) -> String {
        format!("{}-publishers", self.prefix)
    }
    /// The broker's retry topic of the consumer group.
    pub fn retry_topic(&self) -> String {
        format!("%RETRY%{}", self.group())
    }
}

/// Counters of one trigger, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RocketStats {
    /// Notices published with `SEND_OK` (first publications and re-publications).
    pub published: u64,
    /// Messages they travelled in (up to [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) each).
    pub published_messages: u64,
    /// Of the notices, those published with a delay (timer or level).
    pub delayed: u64,
    /// Notices received from the due topic.
    pub received: u64,
    /// Messages they came in.
    pub received_messages: u64,
    /// Re-published after an `Early` answer (hops).
    pub early: u64,
    /// Re-published after a `Redeliver` answer.
    pub redelivered: u64,
    /// Batches answered `RECONSUME_LATER` (a re-publication failed).
    pub reconsume_later: u64,
    /// Of the messages received, those the broker delivered before (`reconsumeTimes > 0`).
    pub broker_redelivered: u64,
    /// Messages whose body was not a notice (acknowledged and dropped).
    pub malformed: u64,
    /// Times a consumer was started.
    pub consumer_connections: u64,
    /// Times the publishing client was started.
    pub publisher_connections: u64,
    /// Health probes that failed.
    pub probe_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    published_messages: AtomicU64,
    delayed: AtomicU64,
    received: AtomicU64,
    received_messages: AtomicU64,
    early: AtomicU64,
    redelivered: AtomicU64,
    reconsume_later: AtomicU64,
    broker_redelivered: AtomicU64,
    malformed: AtomicU64,
    consumer_connections: AtomicU64,
    publisher_connections: AtomicU64,
    probe_failures: AtomicU64,
}

/// The client side of one trigger: its own Tokio runtime (every client call runs there, so the
/// client's connections and tasks do not depend on the caller's runtime) and the producer.
struct Client {
    /// Keeps the client's runtime alive; dropped last.
    _owner: RuntimeOwner,
    handle: tokio::runtime::Handle,
    runtime: Arc<ClientRuntime>,
    producer: Arc<DefaultMQProducer>,
}

impl Drop for Client {
    fn drop(&mut self) {
        let runtime = self.runtime.clone();
        // Best effort: the owner's drop cancels whatever is left.
        self.handle.spawn(async move {
            let _ = runtime.shutdown().await;
        });
    }
}

/// RocketMQ as an external trigger; see the crate docs.
#[derive(Clone)]
pub struct RocketTrigger {
    inner: Arc<Inner>,
}

struct Inner {
    opts: RocketOptions,
    names: Names,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    consuming: AtomicBool,
    counters: Counters,
    refusals: Arc<SendRefusals>,
}

impl std::fmt::Debug for RocketTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocketTrigger")
            .field("name_server", &self.inner.opts.name_server)
            .field("mode", &self.inner.opts.mode)
            .field("prefix", &self.inner.opts.prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn transient(message: String) -> Error {
    Error::Store { backend: BACKEND, message, transient: true, source: None }
}

fn rocket_err(context: &str, e: rocketmq_client_rust::ClientError) -> Error {
    Error::Store { backend: BACKEND, message: format!("{context}: {}", describe(&e, None)), transient: true, source: Some(Box::new(e)) }
}

/// The client's error with what the broker answered, when it answered. The client's own
/// `Display` of a broker failure is only "Broker operation failed": it keeps the response code
/// but drops the broker's remark, which says why (`SYSTEM_BUSY` "store_backpressure
/// reason=store_not_writeable", `SYSTEM_ERROR` "request queueId[…] is illegal", …). `refusals`
/// has the remark of the last send the broker refused, added when its code matches.
fn describe(e: &rocketmq_client_rust::ClientError, refusals: Option<&SendRefusals>) -> String {
    let Some(code) = e.broker_response_code() else {
        return e.to_string();
    };
    let at = e.broker_addr().map(|a| format!(" at {a}")).unwrap_or_default();
    let remark = match refusals.and_then(SendRefusals::last) {
        Some((c, remark)) if c == code && !remark.is_empty() => format!(": {remark}"),
        _ => String::new(),
    };
    format!("{e} (broker{at} answered code {code}{remark})")
}

/// Request codes of the sends ([`SendRefusals`] looks at their answers only).
const SEND_REQUEST_CODES: [i32; 3] = [10, 310, 320]; // SEND_MESSAGE, SEND_MESSAGE_V2, SEND_BATCH_MESSAGE

/// The producer's RPC hook: keeps the code and remark of the last send the broker refused, so
/// an error can say why ([`describe`]). It never fails a request.
#[derive(Default)]
struct SendRefusals(std::sync::Mutex<Option<(i32, String)>>);

impl SendRefusals {
    fn last(&self) -> Option<(i32, String)> {
        self.0.lock().map(|g| g.clone()).unwrap_or(None)
    }
}

impl rocketmq_transport::api::RPCHook for SendRefusals {
    fn do_before_request(
        &self,
        _: std::net::SocketAddr,
        _: &mut rocketmq_protocol::RemotingCommand,
    ) -> std::result::Result<(), rocketmq_error::SharedError> {
        Ok(())
    }

    fn do_after_response(
        &self,
        _: std::net::SocketAddr,
        request: &rocketmq_protocol::RemotingCommand,
        response: &mut rocketmq_protocol::RemotingCommand,
    ) -> std::result::Result<(), rocketmq_error::SharedError> {
        if SEND_REQUEST_CODES.contains(&request.code()) && response.code() != 0 {
            let remark = response.remark().map(|r| r.to_string()).unwrap_or_default();
            if let Ok(mut last) = self.0.lock() {
                *last = Some((response.code(), remark));
            }
        }
        Ok(())
    }
}

/// A process-wide counter that makes every client's instance name unique: RocketMQ tells
/// consumers apart by `ip@instance`, and two triggers in one process (two nodes in a test)
/// must not look like one.
fn instance_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("overdue-{}-{}", std::process::id(), NEXT.fetch_add(1, Relaxed))
}

/// The Tokio handle of the client's runtime (the owner does not hand it out: a task on it
/// sends it back).
async fn runtime_handle(owner: &RuntimeOwner) -> Result<tokio::runtime::Handle> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    owner
        .root_context()
        .component("overdue-rocketmq-handle")
        .spawn("handle", TaskKind::Worker, async move {
            let _ = tx.send(tokio::runtime::Handle::current());
        })
        .map_err(|e| transient(format!("starting the rocketmq client's runtime: {e}")))?;
    rx.await.map_err(|_| transient("the rocketmq client's runtime did not start".to_owned()))
}

impl RocketTrigger {
    /// A trigger on the broker a `rocketmq://` URL names (see the crate docs for its parameters).
    /// Does not connect yet: [`ExternalTrigger::start`] does.
    pub fn from_url(url: &str) -> Result<RocketTrigger> {
        Ok(RocketTrigger::new(RocketOptions::from_url(url)?))
    }

    /// A trigger with `opts`.
    pub fn new(opts: RocketOptions) -> RocketTrigger {
        RocketTrigger {
            inner: Arc::new(Inner {
                names: Names::new(&opts.prefix, opts.group.as_deref()),
                opts,
                client: tokio::sync::Mutex::new(None),
                consuming: AtomicBool::new(false),
                counters: Counters::default(),
                refusals: Arc::new(SendRefusals::default()),
            }),
        }
    }

    /// The mode of this trigger.
    pub fn mode(&self) -> Mode {
        self.inner.opts.mode
    }

    /// Its options.
    pub fn options(&self) -> &RocketOptions {
        &self.inner.opts
    }

    /// The names of its topic and groups.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// True while the consumer is started and the broker answers its probes.
    pub fn consuming(&self) -> bool {
        self.inner.consuming.load(Relaxed)
    }

    /// Counters since this trigger was made.
    pub fn stats(&self) -> RocketStats {
        let c = &self.inner.counters;
        RocketStats {
            published: c.published.load(Relaxed),
            published_messages: c.published_messages.load(Relaxed),
            delayed: c.delayed.load(Relaxed),
            received: c.received.load(Relaxed),
            received_messages: c.received_messages.load(Relaxed),
            early: c.early.load(Relaxed),
            redelivered: c.redelivered.load(Relaxed),
            reconsume_later: c.reconsume_later.load(Relaxed),
            broker_redelivered: c.broker_redelivered.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
            consumer_connections: c.consumer_connections.load(Relaxed),
            publisher_connections: c.publisher_connections.load(Relaxed),
            probe_failures: c.probe_failures.load(Relaxed),
        }
    }

    /// The hop for a notice with `delay_ms` left, in this trigger's mode.
    pub fn hop(&self, delay_ms: i64) -> Hop {
        hop_for(self.inner.opts.mode, delay_ms, self.inner.opts.max_delay_ms)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::default();
        c.set_namesrv_addr(self.inner.opts.name_server.as_str().into());
        c.set_instance_name(instance_name().into());
        c.set_persist_consumer_offset_interval(OFFSET_PERSIST_MS);
        // The defaults (30 s each) leave a restarted broker without routes or consumers for up
        // to half a minute: everything due meanwhile would be the backstop's.
        c.set_poll_name_server_interval(ROUTE_POLL_MS);
        c.set_heartbeat_broker_interval(HEARTBEAT_MS);
        c
    }

    /// The client, starting it (its runtime, the producer, the due topic) if there is none.
    async fn client(&self) -> Result<Arc<Client>> {
        let mut guard = self.inner.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let owner = RuntimeOwner::plan(RuntimeConfig::for_parallelism("overdue-rocketmq", CLIENT_THREADS))
            .map_err(|e| transient(format!("configuring the rocketmq client's runtime: {e}")))?
            .build()
            .map_err(|e| transient(format!("starting the rocketmq client's runtime: {e}")))?;
        let runtime = ClientRuntime::try_new(owner.root_context().component("overdue-rocketmq"), ClientRuntimeConfig::default(), TelemetryHandle::default())
            .map_err(|e| rocket_err("starting the rocketmq client", e))?;
        let handle = runtime_handle(&owner).await?;
        let mut producer = DefaultMQProducer::builder(runtime.clone())
            .client_config(self.client_config())
            .producer_group(self.inner.names.producer_group())
            .send_msg_timeout(SEND_TIMEOUT_MS as u32)
            .rpc_hook(self.inner.refusals.clone())
            .build();
        let topic = self.inner.names.topic();
        let queues = self.inner.opts.queues;
        let ns = self.inner.opts.name_server.clone();
        let started = handle.spawn(async move {
            producer.start().await.map_err(|e| rocket_err(&format!("starting a rocketmq producer on name server {ns}"), e))?;
            // Explicitly, so the topic has its queues before the first notice (a broker with
            // autoCreateTopicEnable would create it on the first send, with its default count).
            if let Err(e) = producer.create_topic(CREATE_TOPIC_KEY, &topic, queues, Default::default()).await {
                tracing::warn!(error = %e, topic, "rocketmq trigger could not create its topic (fine if it exists)");
            }
            // The route proves that the name server answers and knows a broker for the topic.
            match producer.fetch_publish_message_queues(&topic).await {
                Ok(q) if !q.is_empty() => Ok(producer),
                Ok(_) => {
                    producer.shutdown().await;
                    Err(transient(format!("the rocketmq name server {ns} knows no broker with the topic {topic}")))
                }
                Err(e) => {
                    producer.shutdown().await;
                    Err(rocket_err(&format!("cannot reach rocketmq (name server {ns}) or find the topic {topic}"), e))
                }
            }
        });
        let producer = match tokio::time::timeout(START_TIMEOUT, started).await {
            Ok(Ok(Ok(p))) => p,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(e)) => return Err(transient(format!("starting the rocketmq producer failed: {e}"))),
            Err(_) => {
                return Err(transient(format!(
                    "starting the rocketmq producer on name server {} timed out after {START_TIMEOUT:?}",
                    self.inner.opts.name_server
                )));
            }
        };
        self.inner.counters.publisher_connections.fetch_add(1, Relaxed);
        let client = Arc::new(Client { _owner: owner, handle, runtime, producer: Arc::new(producer) });
        *guard = Some(client.clone());
        Ok(client)
    }

    /// One message carrying `notices`, all published with `hop`.
    fn message(&self, notices: &[&TimerRef], hop: Hop) -> Result<Message> {
        let first = notices.first().ok_or_else(|| transient("a message without notices".into()))?;
        let mut b = Message::builder()
            .topic(self.inner.names.topic())
            .body(encode_notices(notices))
            .key(format!("{}/{}/{}", first.queue, first.key, first.generation))
            .wait_store_msg_ok(true);
        b = match hop {
            Hop::Now => b,
            Hop::Timer(ms) => b.delay_millis(ms as u64),
            Hop::Level { level, .. } => b.delay_level(level),
        };
        b.build().map_err(|e| transient(format!("building a rocketmq message: {e}")))
    }

    /// Groups `(notice, delay)` pairs into messages of one hop each, up to
    /// [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE), in the order each hop is first
    /// seen. In `mode=timer` a delay is first shortened by the lead (`lead_ms`,
    /// [`DEFAULT_TIMER_LEAD_MS`]) and rounded *down* to [`TIMER_SLOT_MS`] (the engine holds an
    /// early arrival until it is due), so the notices of one publish that come due within the
    /// same 100 ms travel together; one due within the lead goes without a delay.
    pub fn pack<'a>(&self, items: &[(&'a TimerRef, i64)]) -> Vec<(Hop, Vec<&'a TimerRef>)> {
        let (mode, lead) = (self.inner.opts.mode, self.inner.opts.lead_ms);
        pack_by(items.iter().map(|(t, d)| {
            let d = match mode {
                Mode::Timer => {
                    let d = d.saturating_sub(lead);
                    if d > 0 { d - d % TIMER_SLOT_MS } else { 0 }
                }
                Mode::Levels => *d,
            };
            (self.hop(d), *t)
        }))
    }

    /// Publishes `(notice, delay)` pairs, packed by [`RocketTrigger::pack`], and waits for
    /// every `SEND_OK`.
    async fn send(&self, items: &[(&TimerRef, i64)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let packed = self.pack(items);
        let mut messages = Vec::with_capacity(packed.len());
        let mut delayed = 0u64;
        for (hop, notices) in &packed {
            if *hop != Hop::Now {
                delayed += notices.len() as u64;
            }
            messages.push(self.message(notices, *hop)?);
        }
        let notices = items.len() as u64;
        let n = messages.len() as u64;
        let producer = client.producer.clone();
        let refusals = self.inner.refusals.clone();
        let task = client.handle.spawn(async move {
            let results: Vec<std::result::Result<(), String>> = futures::stream::iter(messages)
                .map(|m| {
                    let (p, refusals) = (producer.clone(), refusals.clone());
                    async move {
                        match p.send_with_timeout(m, SEND_TIMEOUT_MS).await {
                            Ok(Some(r)) if r.send_status == SendStatus::SendOk => Ok(()),
                            Ok(Some(r)) => Err(format!("the broker answered {:?}, not SEND_OK", r.send_status)),
                            Ok(None) => Err("the client returned no send result".to_owned()),
                            Err(e) => Err(describe(&e, Some(&refusals))),
                        }
                    }
                })
                .buffer_unordered(PUBLISH_CONCURRENCY)
                .collect()
                .await;
            let failed: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
            match failed.first() {
                None => Ok(()),
                Some(first) => Err(format!("{} of {n} messages were not stored by rocketmq; the first: {first}", failed.len())),
            }
        });
        match tokio::time::timeout(PUBLISH_TIMEOUT, task).await {
            Ok(Ok(Ok(()))) => {
                self.inner.counters.published.fetch_add(notices, Relaxed);
                self.inner.counters.published_messages.fetch_add(n, Relaxed);
                self.inner.counters.delayed.fetch_add(delayed, Relaxed);
                Ok(())
            }
            Ok(Ok(Err(why))) => Err(transient(why)),
            Ok(Err(e)) => Err(transient(format!("publishing to rocketmq failed: {e}"))),
            Err(_) => Err(transient(format!("publishing {n} notices to rocketmq took longer than {PUBLISH_TIMEOUT:?}"))),
        }
    }

    /// Starts a push consumer whose listener hands batches to `jobs`.
    async fn start_consumer(&self, client: &Client, jobs: tokio::sync::mpsc::UnboundedSender<Job>) -> Result<Consumer> {
        static WARNED: std::sync::Once = std::sync::Once::new();
        if std::env::var_os(REBALANCE_MIN_INTERVAL).is_none() {
            WARNED.call_once(|| {
                tracing::info!(
                    "rocketmq trigger: {REBALANCE_MIN_INTERVAL} is not set, so a new consumer takes its queues only a second after it starts (see overdue_rocketmq::CLIENT_ENVIRONMENT)"
                )
            });
        }
        let mut consumer = DefaultMQPushConsumer::builder(client.runtime.clone())
            .client_config(self.client_config())
            .consumer_group(self.inner.names.group())
            .message_model(MessageModel::Clustering)
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .consume_message_batch_max_size(CONSUME_BATCH)
            .pull_batch_size(CONSUME_BATCH)
            .consume_thread_min(CONSUME_THREADS)
            .consume_thread_max(CONSUME_THREADS)
            .await_termination_millis_when_shutdown(SHUTDOWN_WAIT_MS)
            .build();
        let topic = self.inner.names.topic();
        let listener = Listener { jobs, inner: self.inner.clone() };
        let ns = self.inner.opts.name_server.clone();
        let started = client.handle.spawn(async move {
            let r: std::result::Result<Vec<MessageQueue>, rocketmq_client_rust::ClientError> = async {
                consumer.subscribe(topic.as_str(), "*").await?;
                consumer.register_message_listener_concurrently(listener);
                consumer.start().await?;
                // For the health probe; empty until the topic's route is known.
                Ok(consumer.fetch_subscribe_message_queues(&topic).await.unwrap_or_default())
            }
            .await;
            match r {
                Ok(queues) => Ok((consumer, queues)),
                Err(e) => {
                    consumer.shutdown().await;
                    Err(rocket_err(&format!("starting a rocketmq consumer on name server {ns}"), e))
                }
            }
        });
        match tokio::time::timeout(START_TIMEOUT, started).await {
            Ok(Ok(Ok((consumer, queues)))) => Ok(Consumer { consumer: Arc::new(tokio::sync::Mutex::new(consumer)), queues }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(e)) => Err(transient(format!("starting the rocketmq consumer failed: {e}"))),
            Err(_) => Err(transient(format!("starting the rocketmq consumer timed out after {START_TIMEOUT:?}"))),
        }
    }

    /// Asks the broker for the due topic's first queue's max offset: `Err` when it does not answer.
    async fn probe(&self, client: &Client, consumer: &mut Consumer) -> std::result::Result<(), String> {
        let c = consumer.consumer.clone();
        let topic = self.inner.names.topic();
        let need_queues = consumer.queues.is_empty();
        let first = consumer.queues.first().cloned();
        let task = client.handle.spawn(async move {
            let mut c = c.lock().await;
            let queues = if need_queues { c.fetch_subscribe_message_queues(&topic).await.unwrap_or_default() } else { Vec::new() };
            let Some(mq) = first.or_else(|| queues.first().cloned()) else {
                return Err(format!("no route to the topic {topic} yet"));
            };
            c.max_offset(&mq).await.map(|_| queues).map_err(|e| describe(&e, None))
        });
        match tokio::time::timeout(PROBE_TIMEOUT, task).await {
            Ok(Ok(Ok(queues))) => {
                if need_queues {
                    consumer.queues = queues;
                }
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(format!("the rocketmq broker does not answer: {e}")),
            Ok(Err(e)) => Err(format!("probing the rocketmq broker failed: {e}")),
            Err(_) => Err(format!("the rocketmq broker did not answer within {PROBE_TIMEOUT:?}")),
        }
    }

    /// Delivers one batch; `true` when every notice is settled (acknowledge the batch).
    async fn handle(&self, sink: Arc<dyn DueSink>, notices: Vec<TimerRef>) -> bool {
        let answers = sink.deliver(notices.clone()).await;
        let now = sink.now_ms();
        let mut again: Vec<(&TimerRef, i64)> = Vec::new();
        let (mut early, mut redeliver) = (0u64, 0u64);
        for (t, answer) in notices.iter().zip(answers) {
            match answer {
                Delivery::Ack => {}
                Delivery::Early => {
                    early += 1;
                    again.push((t, t.due_at.saturating_sub(now)));
                }
                Delivery::Redeliver => {
                    redeliver += 1;
                    again.push((t, REDELIVER_DELAY_MS));
                }
            }
        }
        if again.is_empty() {
            return true;
        }
        match self.send(&again).await {
            Ok(()) => {
                self.inner.counters.early.fetch_add(early, Relaxed);
                self.inner.counters.redelivered.fetch_add(redeliver, Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, n = again.len(), "rocketmq trigger: publishing notices again failed; the broker delivers the batch again");
                false
            }
        }
    }

    /// Stops a consumer (committing its offsets) while still serving its listener's last jobs.
    async fn stop_consumer(
        &self,
        client: &Client,
        consumer: Consumer,
        sink: &Arc<dyn DueSink>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Job>,
        jobs: &mut JoinSet<()>,
    ) {
        self.inner.consuming.store(false, Relaxed);
        let c = consumer.consumer;
        let mut done = client.handle.spawn(async move {
            // Commits the offsets; bounded, in case the broker is gone.
            let _ = tokio::time::timeout(CONSUMER_STOP_TIMEOUT, async move { c.lock().await.shutdown().await }).await;
        });
        loop {
            tokio::select! {
                _ = &mut done => break,
                Some(job) = rx.recv() => self.spawn_job(jobs, sink, job),
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            }
        }
        while jobs.join_next().await.is_some() {}
    }

    fn spawn_job(&self, jobs: &mut JoinSet<()>, sink: &Arc<dyn DueSink>, job: Job) {
        let (this, sink) = (self.clone(), sink.clone());
        jobs.spawn(async move {
            let ok = this.handle(sink, job.notices).await;
            if !ok {
                this.inner.counters.reconsume_later.fetch_add(1, Relaxed);
            }
            let _ = job.reply.send(ok);
        });
    }

    /// Deletes this prefix's due topic and the group's retry topic (with the messages in them);
    /// for tests and benchmarks. Timer and level messages still waiting inside the broker are
    /// not in these topics and cannot be deleted.
    pub async fn purge(&self) -> Result<()> {
        let client = self.client().await?;
        let mut admin = DefaultMQAdminExt::new(client.runtime.clone());
        admin.set_namesrv_addr(self.inner.opts.name_server.as_str());
        admin.client_config_mut().set_instance_name(instance_name().into());
        let topics = [self.inner.names.topic(), self.inner.names.retry_topic()];
        let task = client.handle.spawn(async move {
            admin.start().await.map_err(|e| e.to_string())?;
            let mut out = Ok(());
            for topic in topics {
                let route = admin.examine_topic_route_info(topic.as_str().into()).await;
                let Ok(Some(route)) = route else { continue };
                let clusters: std::collections::BTreeSet<String> =
                    route.broker_datas.iter().map(|b| b.cluster().to_string()).collect();
                for cluster in clusters {
                    if let Err(e) = admin.delete_topic(topic.as_str().into(), cluster.as_str().into()).await {
                        out = Err(format!("deleting the topic {topic}: {e}"));
                    }
                }
            }
            admin.shutdown().await;
            out
        });
        match tokio::time::timeout(START_TIMEOUT, task).await {
            Ok(Ok(r)) => r.map_err(transient),
            Ok(Err(e)) => Err(transient(format!("purging failed: {e}"))),
            Err(_) => Err(transient(format!("purging timed out after {START_TIMEOUT:?}"))),
        }
    }

    /// Drops the producer and the client's runtime (the next publish starts them again); a
    /// running `consume` keeps its own reference and stops with the engine. Does not wait:
    /// the client's own graceful shutdown waited out its 15 s timeout here, so the runtime is
    /// shut down in the background instead (connections close, nothing is in flight once
    /// `publish` returned).
    pub async fn close(&self) {
        drop(self.inner.client.lock().await.take());
    }
}

/// A started push consumer and the due topic's queues (for the health probe).
struct Consumer {
    consumer: Arc<tokio::sync::Mutex<DefaultMQPushConsumer>>,
    queues: Vec<MessageQueue>,
}

/// One batch from the listener, and where to answer.
struct Job {
    notices: Vec<TimerRef>,
    reply: std::sync::mpsc::SyncSender<bool>,
}

/// The push consumer's listener. The client calls it on a blocking thread of its own runtime;
/// it hands the batch to the consume task (on the engine's runtime) and waits for the answer.
struct Listener {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    inner: Arc<Inner>,
}

impl MessageListenerConcurrently for Listener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> rocketmq_client_rust::ClientResult<ConsumeConcurrentlyStatus> {
        let c = &self.inner.counters;
        c.received_messages.fetch_add(msgs.len() as u64, Relaxed);
        let mut notices = Vec::with_capacity(msgs.len());
        for m in msgs {
            if m.reconsume_times() > 0 {
                c.broker_redelivered.fetch_add(1, Relaxed);
            }
            match m.body().map(|b| decode_notices(&b)) {
                Some(Ok(ts)) => {
                    c.received.fetch_add(ts.len() as u64, Relaxed);
                    notices.extend(ts);
                }
                _ => {
                    c.malformed.fetch_add(1, Relaxed);
                    tracing::warn!(msg_id = %m.msg_id(), "rocketmq trigger: a message on the due topic is not a notice; dropping it");
                }
            }
        }
        if notices.is_empty() {
            return Ok(ConsumeConcurrentlyStatus::ConsumeSuccess);
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        if self.jobs.send(Job { notices, reply }).is_err() {
            return Ok(ConsumeConcurrentlyStatus::ReconsumeLater);
        }
        match answer.recv() {
            Ok(true) => Ok(ConsumeConcurrentlyStatus::ConsumeSuccess),
            _ => Ok(ConsumeConcurrentlyStatus::ReconsumeLater),
        }
    }
}

#[async_trait]
impl ExternalTrigger for RocketTrigger {
    fn name(&self) -> &'static str {
        match self.inner.opts.mode {
            Mode::Timer => "rocketmq-timer",
            Mode::Levels => "rocketmq-levels",
        }
    }

    async fn start(&self) -> Result<()> {
        self.client().await.map(|_| ())
    }

    async fn publish(&self, notices: &[TimerRef], now: i64) -> Result<()> {
        let items: Vec<(&TimerRef, i64)> = notices.iter().map(|t| (t, t.due_at.saturating_sub(now))).collect();
        self.send(&items).await
    }

    async fn consume(&self, sink: Arc<dyn DueSink>) -> Result<()> {
        let mut backoff = self.inner.opts.reconnect_min;
        let max = RECONNECT_MAX.max(backoff);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let mut jobs = JoinSet::new();
        let mut healthy: Option<bool> = None;
        'consumers: loop {
            // Start the client and a consumer, retrying with backoff.
            let (client, mut consumer) = loop {
                if sink.stopped() {
                    break 'consumers;
                }
                let started = match self.client().await {
                    Ok(client) => self.start_consumer(&client, tx.clone()).await.map(|c| (client, c)),
                    Err(e) => Err(e),
                };
                match started {
                    Ok(pair) => break pair,
                    Err(e @ Error::Config(_)) => {
                        sink.set_healthy(false, Some(e.to_string()));
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rocketmq trigger cannot start its consumer; retrying");
                        sink.set_healthy(false, Some(e.to_string()));
                    }
                }
                if !overdue_core::reconnect_pause(&*sink, &mut backoff, max).await {
                    break 'consumers;
                }
            };
            self.inner.counters.consumer_connections.fetch_add(1, Relaxed);
            let mut failures = 0u32;
            let mut probe = tokio::time::interval(HEALTH_PROBE_INTERVAL);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let restart = loop {
                tokio::select! {
                    biased;
                    _ = sink.until_stopped() => break false,
                    Some(job) = rx.recv() => self.spawn_job(&mut jobs, &sink, job),
                    Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                    _ = probe.tick() => match self.probe(&client, &mut consumer).await {
                        Ok(()) => {
                            if healthy != Some(true) {
                                sink.set_healthy(true, None);
                                if healthy == Some(false) {
                                    tracing::info!(name_server = %self.inner.opts.name_server, "rocketmq trigger: the broker answers again");
                                }
                            }
                            self.inner.consuming.store(true, Relaxed);
                            healthy = Some(true);
                            failures = 0;
                            backoff = self.inner.opts.reconnect_min;
                        }
                        Err(why) => {
                            self.inner.counters.probe_failures.fetch_add(1, Relaxed);
                            if healthy != Some(false) {
                                tracing::warn!(error = %why, name_server = %self.inner.opts.name_server, "rocketmq trigger: the broker does not answer");
                            }
                            self.inner.consuming.store(false, Relaxed);
                            sink.set_healthy(false, Some(why));
                            healthy = Some(false);
                            failures += 1;
                            // The client reconnects on its own, but after a broker restart its
                            // connections can stay broken for tens of seconds: a new consumer
                            // (a new client instance, new connections) comes back at once.
                            if failures >= PROBE_FAILURES_BEFORE_RESTART {
                                break true;
                            }
                        }
                    },
                }
            };
            self.stop_consumer(&client, consumer, &sink, &mut rx, &mut jobs).await;
            if !restart {
                break;
            }
            tracing::info!(name_server = %self.inner.opts.name_server, "rocketmq trigger: starting a new consumer");
            if !overdue_core::reconnect_pause(&*sink, &mut backoff, max).await {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overdue_core::NOTICES_PER_MESSAGE;

    #[test]
    fn a_refused_send_is_described_with_the_brokers_code_and_remark() {
        use rocketmq_protocol::RemotingCommand;
        use rocketmq_transport::api::RPCHook;
        let addr: std::net::SocketAddr = "127.0.0.1:10911".parse().expect("addr");
        let hook = SendRefusals::default();
        let refused = || rocketmq_client_rust::ClientError::broker_operation_failed("BROKER_OPERATION", 2, "hidden");
        // Before any refusal: the code only.
        let plain = describe(&refused(), Some(&hook));
        assert!(plain.ends_with("(broker answered code 2)"), "{plain}");

        // A refused send (SEND_MESSAGE_V2) is kept; other requests' answers are not.
        let send = RemotingCommand::create_remoting_command(310);
        let mut busy = RemotingCommand::create_response_command_with_code_remark(2, "store_backpressure reason=store_not_writeable");
        hook.do_after_response(addr, &send, &mut busy).expect("the hook never fails a request");
        let mut other = RemotingCommand::create_response_command_with_code_remark(2, "not a send");
        hook.do_after_response(addr, &RemotingCommand::create_remoting_command(105), &mut other).expect("hook");
        let why = describe(&refused(), Some(&hook));
        assert!(why.contains("answered code 2: store_backpressure reason=store_not_writeable"), "{why}");

        // A remark of another code is not pinned on this error; no code means no broker answer.
        let other_code = rocketmq_client_rust::ClientError::broker_operation_failed("BROKER_OPERATION", 1, "x");
        assert!(describe(&other_code, Some(&hook)).ends_with("(broker answered code 1)"));
        let mut ok = RemotingCommand::create_response_command_with_code(0);
        hook.do_after_response(addr, &send, &mut ok).expect("hook");
        assert_eq!(hook.last().map(|(c, _)| c), Some(2), "a success does not clear the last refusal");
    }

    #[test]
    fn levels_pick_the_largest_level_that_fits() {
        let m = Mode::Levels;
        assert_eq!(hop_for(m, 0, 0), Hop::Now);
        assert_eq!(hop_for(m, -5, 0), Hop::Now);
        assert_eq!(hop_for(m, 999, 0), Hop::Now, "less than the smallest level: at once, the engine holds it");
        assert_eq!(hop_for(m, 1_000, 0), Hop::Level { level: 1, ms: 1_000 });
        assert_eq!(hop_for(m, 4_999, 0), Hop::Level { level: 1, ms: 1_000 });
        assert_eq!(hop_for(m, 5_000, 0), Hop::Level { level: 2, ms: 5_000 });
        assert_eq!(hop_for(m, 59_999, 0), Hop::Level { level: 4, ms: 30_000 });
        assert_eq!(hop_for(m, 1_800_000, 0), Hop::Level { level: 16, ms: 1_800_000 });
        assert_eq!(hop_for(m, 7_200_000, 0), Hop::Level { level: 18, ms: 7_200_000 });
        assert_eq!(hop_for(m, 86_400_000 * 30, 0), Hop::Level { level: 18, ms: 7_200_000 });
        assert!(DELAY_LEVELS_MS.windows(2).all(|w| w[0] < w[1]));
    }

    /// Follows a notice through hops the way the engine answers (held when at most 2 s early,
    /// `Early` otherwise); returns the hops and how early it finally arrived.
    fn travel(mode: Mode, delay: i64, max: i64) -> (Vec<Hop>, i64) {
        let mut left = delay;
        let mut hops = Vec::new();
        loop {
            let h = hop_for(mode, left, max);
            hops.push(h);
            left -= h.waits_ms();
            if left <= 2_000 {
                return (hops, left.max(0));
            }
            assert!(hops.len() < 10_000, "no progress for {delay}: {hops:?}");
        }
    }

    #[test]
    fn hops_never_overshoot_and_end_within_the_hold() {
        for mode in [Mode::Timer, Mode::Levels] {
            for d in [1, 500, 1_000, 2_500, 3_000, 4_000, 8_000, 61_000, 3_600_000, 7_300_000, 86_400_000 * 3 + 1, 86_400_000 * 365] {
                let (hops, early) = travel(mode, d, DEFAULT_MAX_TIMER_DELAY_MS);
                let waited: i64 = hops.iter().map(|h| h.waits_ms()).sum();
                assert!(waited <= d, "{mode:?} {d}: waited {waited} in {hops:?}");
                assert!((0..=2_000).contains(&early), "{mode:?} {d}: {early} ms early after {hops:?}");
            }
        }
        // Timer mode: one message below the maximum, hops of the maximum above it.
        assert_eq!(travel(Mode::Timer, 3_000, DEFAULT_MAX_TIMER_DELAY_MS).0, vec![Hop::Timer(3_000)]);
        let (hops, _) = travel(Mode::Timer, 86_400_000 * 30, DEFAULT_MAX_TIMER_DELAY_MS);
        assert_eq!(hops.len(), 10, "{hops:?}");
        // 10.5 s with a 3 s maximum: three hops of 3 s, then held the last 1.5 s.
        let (hops, early) = travel(Mode::Timer, 10_500, 3_000);
        assert_eq!((hops, early), (vec![Hop::Timer(3_000), Hop::Timer(3_000), Hop::Timer(3_000)], 1_500));
        let (hops, early) = travel(Mode::Timer, 14_500, 3_000);
        assert_eq!((hops.len(), early), (5, 0), "the last hop is the 2.5 s left");
        // Levels: 8 s = 5 s + 1 s, then held 2 s.
        let (hops, early) = travel(Mode::Levels, 8_000, 0);
        assert_eq!((hops, early), (vec![Hop::Level { level: 2, ms: 5_000 }, Hop::Level { level: 1, ms: 1_000 }], 2_000));
        // A 2 h 1 min timer: 2 h, then 1 min.
        let (hops, _) = travel(Mode::Levels, 7_260_000, 0);
        assert_eq!(hops.len(), 2, "{hops:?}");
    }

    #[test]
    fn urls_are_parsed_and_bad_ones_refused() {
        let o = RocketOptions::from_url("rocketmq://127.0.0.1:9876?mode=levels&prefix=a_b-1&group=g1&max_delay_ms=5000&queues=4").expect("url");
        assert_eq!(o.name_server, "127.0.0.1:9876");
        assert_eq!((o.mode, o.prefix.as_str(), o.group.as_deref(), o.max_delay_ms, o.queues), (Mode::Levels, "a_b-1", Some("g1"), 5_000, 4));
        let o = RocketOptions::from_url("rocketmq://ns1:9876,ns2.example.com:9877/").expect("url");
        assert_eq!((o.name_server.as_str(), o.mode, o.prefix.as_str()), ("ns1:9876;ns2.example.com:9877", Mode::Timer, DEFAULT_PREFIX));
        assert_eq!((o.group, o.max_delay_ms, o.queues), (None, DEFAULT_MAX_TIMER_DELAY_MS, DEFAULT_QUEUES));
        assert_eq!(o.lead_ms, DEFAULT_TIMER_LEAD_MS);
        assert_eq!(RocketOptions::from_url("rocketmq://h:1?lead_ms=0").expect("url").lead_ms, 0);
        assert_eq!(RocketOptions::from_url("rocketmq://h:1?mode=levels").expect("url").lead_ms, 0, "levels: no lead");
        for bad in [
            "rocketmq://h:1?lead_ms=-1",
            "rocketmq://h:1?lead_ms=1501",
            "rocketmq://h:1?lead_ms=soon",
            "rocketmq://h:1?mode=levels&lead_ms=100",
            "http://x:1",
            "rocketmq://",
            "rocketmq://host",
            "rocketmq://host:0",
            "rocketmq://host:99999",
            "rocketmq://:9876",
            "rocketmq://u:p@host:9876",
            "rocketmq://h:1?mode=fast",
            "rocketmq://h:1?prefix=",
            "rocketmq://h:1?prefix=a.b",
            "rocketmq://h:1?prefix=a/b",
            "rocketmq://h:1?group=%RETRY%x",
            "rocketmq://h:1?max_delay_ms=10",
            "rocketmq://h:1?max_delay_ms=x",
            "rocketmq://h:1?queues=0",
            "rocketmq://h:1?queues=65",
            "rocketmq://h:1?prefetch=10",
        ] {
            let e = RocketOptions::from_url(bad).expect_err(bad);
            assert!(matches!(e, Error::Config(_)), "{bad}: {e:?}");
        }
        let e = RocketOptions::from_url("rocketmq://h:1?mode=fast").expect_err("bad");
        assert!(e.to_string().contains("timer or levels"), "{e}");
    }

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("p", None);
        assert_eq!((n.topic(), n.group(), n.producer_group(), n.retry_topic()), ("p-due".into(), "p-nodes".into(), "p-publishers".into(), "%RETRY%p-nodes".into()));
        assert_eq!(Names::new("p", Some("g")).group(), "g");
    }

    #[test]
    fn notices_are_packed_by_hop_and_travel_as_a_json_list() {
        let t = |k: &str, due_at| TimerRef { queue: "order.close".into(), key: k.into(), generation: 7, due_at };
        let (a, b, c, d) = (t("a", 0), t("b", 0), t("c", 0), t("d", 0));
        let shape = |packed: Vec<(Hop, Vec<&TimerRef>)>| -> Vec<(Hop, Vec<String>)> {
            packed.into_iter().map(|(h, ts)| (h, ts.iter().map(|t| t.key.clone()).collect())).collect()
        };
        let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let exact = RocketTrigger::new(RocketOptions { lead_ms: 0, ..RocketOptions::default() });
        // 3,000 and 3,099 share a 100 ms slot (rounded down); 3,100 does not; 0 goes now.
        assert_eq!(
            shape(exact.pack(&[(&a, 3_000), (&b, 3_100), (&c, 3_099), (&d, 0)])),
            vec![(Hop::Timer(3_000), keys(&["a", "c"])), (Hop::Timer(3_100), keys(&["b"])), (Hop::Now, keys(&["d"]))]
        );
        // With a lead of 500 ms each goes 500 ms sooner; one due within the lead goes now.
        let trigger = RocketTrigger::new(RocketOptions { lead_ms: 500, ..RocketOptions::default() });
        assert_eq!(
            shape(trigger.pack(&[(&a, 3_000), (&b, 3_100), (&c, 3_099), (&d, 450)])),
            vec![(Hop::Timer(2_500), keys(&["a", "c"])), (Hop::Timer(2_600), keys(&["b"])), (Hop::Now, keys(&["d"]))]
        );
        // Delay levels take no lead.
        let levels = RocketTrigger::new(RocketOptions { mode: Mode::Levels, lead_ms: 0, ..RocketOptions::default() });
        assert_eq!(shape(levels.pack(&[(&a, 5_400)])), vec![(Hop::Level { level: 2, ms: 5_000 }, keys(&["a"]))]);
        let many: Vec<TimerRef> = (0..NOTICES_PER_MESSAGE + 1).map(|i| t(&format!("k{i}"), 0)).collect();
        let items: Vec<(&TimerRef, i64)> = many.iter().map(|x| (x, 5_000)).collect();
        let sizes: Vec<usize> = trigger.pack(&items).iter().map(|(_, ts)| ts.len()).collect();
        assert_eq!(sizes, vec![NOTICES_PER_MESSAGE, 1]);

        let one = t("o-1", 1_700_000_000_000);
        let m = trigger.message(&[&one], Hop::Timer(3_000)).expect("message");
        let body = m.body().expect("a body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v, serde_json::json!([{"queue": "order.close", "key": "o-1", "generation": 7, "due_at": 1_700_000_000_000i64}]));
        assert_eq!(decode_notices(&body), Ok(vec![one]));
        assert_eq!(m.topic().as_str(), "overdue-due");
    }
}
