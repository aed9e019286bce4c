//! # overdue-kafka
//!
//! Kafka as an [`ExternalTrigger`]: the broker does the waiting, a SQL store with its outbox on
//! stays the source of truth (see `overdue_core::trigger`). Kafka has no delayed delivery, so the
//! design is ours.
//!
//! ## Level topics
//!
//! There is one topic per power of two, `P.level.s` for `s` in [`MIN_SHIFT`]`..=`[`MAX_SHIFT`]
//! (2^10 ms ≈ 1 s … 2^35 ms ≈ 398 days), and one topic `P.due`. Every message carries its notice
//! and a *release time*: the time it was written plus the level's fixed wait, 2^s ms (for
//! `P.due`, the time it was written). Because every message of one level waits the same time,
//! the messages of a partition are released in offset order: a consumer only ever has to look at
//! the *head* of each partition, and it holds that partition (reads nothing more of it, commits
//! nothing past it) until the head's release time. Nothing is sorted, nothing far in the future
//! is kept in memory.
//!
//! A notice with `r` ms still to wait goes to:
//!
//! - `r` < [`HOLD_MS`] (1.024 s): `P.due`. The node that consumes it keeps it in memory and hands
//!   it to the engine at its due time.
//! - otherwise: level `s = min(⌊log2 r⌋, MAX_SHIFT)`. When it is released, `r − 2^s` is left
//!   (less than 2^s, so the next level is lower), and the consumer either keeps it in memory
//!   (under [`HOLD_MS`] left) or writes it to the next level, and commits its offset only after
//!   that write was acknowledged.
//!
//! A notice makes one trip per `1` bit of `r >> MIN_SHIFT` (a 30 min timer: 8 trips; a 7 day one:
//! 6; never more than [`LEVELS`]), counted from the first write. Delays past 2^35 ms go round the
//! top level again: any delay works.
//!
//! - **Resolution:** none to speak of. The last ≤ 1.024 s are waited in memory on the engine's
//!   clock, so a notice is handed over at its due time plus the consumer's own latency, never
//!   early. What delays it is load: a partition whose head is late holds the messages behind it.
//! - **Memory:** per partition, at most [`BUFFER_MAX`] fetched notices (the partition is paused
//!   above that) plus what is due within [`HOLD_MS`]; the number of far-future timers does not
//!   matter. At most [`MAX_IN_FLIGHT`] released notices per node are unsettled at once.
//!
//! ## Delivery and offsets
//!
//! [`ExternalTrigger::publish`] sends with `acks=all` and returns `Ok` only once the broker
//! acknowledged every message. A message is a [`Packet`]: the notices of one publish (or one
//! round of hops) that go to the same level, up to [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE), as JSON
//! `{"release_at", "notices": [{"queue","key","generation","due_at"}, …]}`, never the payload;
//! the broker's cost is per message (a produce, a fetch, an offset), so packing divides it. The
//! message key is the first notice's `queue/key` (it only spreads messages over the partitions). All nodes consume in one consumer group ([`KafkaOptions::group`]), so they share
//! the partitions, and a node that dies or leaves gives its partitions to the others at the next
//! rebalance.
//!
//! Offsets are committed by hand (`enable.auto.commit=false`), every [`COMMIT_EVERY`] and when
//! the consumer stops: for each partition, the lowest offset that is not finished yet. A message
//! is finished when each of its notices is: [`DueSink::deliver`] answered [`Delivery::Ack`] for
//! it (the effect committed, or the notice was stale), or its next hop was acknowledged by the
//! broker. So a
//! node killed at any moment loses nothing: whoever gets its partitions reads again from the
//! last commit, and the generation fence and the claim make the repeated notices harmless.
//! [`Delivery::Redeliver`] (the store failed, the claim is another node's) keeps the notice in
//! memory and offers it again after [`REDELIVER_PAUSE`]; [`Delivery::Early`] writes it again for
//! the rest of its delay.
//!
//! ## What it cannot do, and what covers it
//!
//! - A written message cannot be withdrawn: cancel and reschedule work by the generation fence
//!   (a stale notice is dropped when it arrives and counted in the engine's `stale_dropped`).
//!   Nothing relies on compaction: old hops are deleted by retention like any other message.
//! - A broker that loses acknowledged messages (no replication, a disk lost) loses notices; the
//!   store still has the timers and the engine's backstop sweep fires them, counted in
//!   `overdue_backstop_rescued_total`.
//! - Broker restart: librdkafka reconnects by itself. The consumer reports the client's errors
//!   through [`DueSink::set_healthy`] and healthy again once messages or commits flow; the relay
//!   publishes again whatever was not acknowledged.
//! - A rebalance drops what the node was holding for the partitions (it reads them again from
//!   the last commit), so a notice can be handed over twice around a rebalance: harmless.
//!
//! ## URL
//!
//! `kafka://host:port[,host:port…]?prefix=NAME&group=NAME&partitions=N&replication=N&session_timeout_ms=N`
//! — parameters with a `.` in their name (`socket.timeout.ms`, …) go to librdkafka.
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `prefix` | first part of every topic name, `[A-Za-z0-9._-]{1,64}` | `overdue` |
//! | `group` | the consumer group all nodes share | the prefix |
//! | `partitions` | partitions per topic, when the topics are created (1–1024) | [`DEFAULT_PARTITIONS`] |
//! | `replication` | replication factor of the topics, when created (1–16) | 1 |
//! | `session_timeout_ms` | how long a silent node keeps its partitions (1000–300000) | [`DEFAULT_SESSION_TIMEOUT_MS`] |

mod consume;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_trait::async_trait;
use overdue_core::shared::redact;
use overdue_core::{DueSink, Error, ExternalTrigger, Result, TimerRef, pack_by};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};

/// Name of this backend in store errors.
pub const BACKEND: &str = "kafka";
/// Default first part of every topic name.
pub const DEFAULT_PREFIX: &str = "overdue";
/// The smallest level waits 2^MIN_SHIFT ms; less than that is waited in memory.
pub const MIN_SHIFT: u32 = 10;
/// The largest level waits 2^MAX_SHIFT ms (≈ 397.7 days); longer delays go round it again.
pub const MAX_SHIFT: u32 = 35;
/// Number of level topics (besides `P.due`).
pub const LEVELS: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// A notice with less than this left is kept in memory by the consuming node until due.
pub const HOLD_MS: i64 = 1 << MIN_SHIFT;
/// Partitions per topic when the trigger creates the topics.
pub const DEFAULT_PARTITIONS: i32 = 4;
/// Default consumer-group session timeout: how long a killed node's partitions wait.
pub const DEFAULT_SESSION_TIMEOUT_MS: u32 = 10_000;
/// Fetched notices kept per partition before the partition is paused.
pub const BUFFER_MAX: usize = 2_000;
/// Released notices a node holds unsettled at once (in memory until due, being delivered or
/// being written to their next level); past it, heads wait.
pub const MAX_IN_FLIGHT: usize = 100_000;
/// Most notices handed to [`DueSink::deliver`] in one call.
pub const DELIVER_BATCH: usize = 1024;
/// `deliver` calls running at once.
pub const DELIVERIES_IN_FLIGHT: usize = 4;
/// How often finished offsets are committed.
pub const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// Pause before a notice answered `Redeliver` is offered again (not when stopping).
pub const REDELIVER_PAUSE: Duration = Duration::from_millis(250);
/// The producer's `linger.ms` unless the URL sets it: how long librdkafka gathers a batch.
/// Bigger batches cost the broker less per notice; the wait adds to every hop's latency.
pub const DEFAULT_LINGER_MS: u32 = 5;
/// Longest [`KafkaTrigger::purge`] waits for the group's members to leave.
pub const PURGE_WAIT: Duration = Duration::from_secs(15);
/// How long `start` may take to create the topics, and a batch's acknowledgements.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// How to open a [`KafkaTrigger`]; [`KafkaOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// First part of every topic name.
    pub prefix: String,
    /// The consumer group every node joins; `None` = the prefix.
    pub group: Option<String>,
    /// Partitions per topic, used when the topics are created.
    pub partitions: i32,
    /// Replication factor, used when the topics are created.
    pub replication: i32,
    /// Consumer-group session timeout (ms).
    pub session_timeout_ms: u32,
    /// Extra librdkafka properties for both clients.
    pub client: Vec<(String, String)>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            prefix: DEFAULT_PREFIX.to_owned(),
            group: None,
            partitions: DEFAULT_PARTITIONS,
            replication: 1,
            session_timeout_ms: DEFAULT_SESSION_TIMEOUT_MS,
            client: Vec::new(),
        }
    }
}

impl KafkaOptions {
    /// Reads a `kafka://` URL: returns the options and the bootstrap servers.
    pub fn from_url(url: &str) -> Result<(KafkaOptions, String)> {
        let bad = |m: String| Error::Config(format!("invalid kafka trigger url {}: {m}", redact(url)));
        let Some(rest) = url.strip_prefix("kafka://") else {
            return Err(bad("it does not start with kafka://".into()));
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() {
            return Err(bad("no broker address (kafka://host:port)".into()));
        }
        for h in hosts.split(',') {
            let ok = h.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok || h.contains('@') || h.contains('/') {
                return Err(bad(format!("broker address {h:?} is not host:port")));
            }
        }
        let mut opts = KafkaOptions::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "prefix" => {
                    if !valid_name(v) {
                        return Err(bad(format!("prefix={v:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'")));
                    }
                    opts.prefix = v.to_owned();
                }
                "group" => {
                    if !valid_name(v) {
                        return Err(bad(format!("group={v:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'")));
                    }
                    opts.group = Some(v.to_owned());
                }
                "partitions" => {
                    opts.partitions = match v.parse::<i32>() {
                        Ok(n) if (1..=1024).contains(&n) => n,
                        _ => return Err(bad(format!("partitions={v:?}: expected 1-1024"))),
                    }
                }
                "replication" => {
                    opts.replication = match v.parse::<i32>() {
                        Ok(n) if (1..=16).contains(&n) => n,
                        _ => return Err(bad(format!("replication={v:?}: expected 1-16"))),
                    }
                }
                "session_timeout_ms" => {
                    opts.session_timeout_ms = match v.parse::<u32>() {
                        Ok(n) if (1_000..=300_000).contains(&n) => n,
                        _ => return Err(bad(format!("session_timeout_ms={v:?}: expected 1000-300000"))),
                    }
                }
                _ if k.contains('.') && !v.is_empty() => opts.client.push((k.to_owned(), v.to_owned())),
                _ => {
                    return Err(bad(format!(
                        "unknown parameter {k:?} (known: prefix, group, partitions, replication, session_timeout_ms; \
                         librdkafka properties contain a '.')"
                    )));
                }
            }
        }
        Ok((opts, hosts.to_owned()))
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.prefix)
    }
}

fn valid_name(p: &str) -> bool {
    !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where a notice with `remaining` ms to wait goes: `None` = `P.due` (kept in memory by the
/// consumer until due), `Some(s)` = level `s`, which waits exactly 2^s ms.
pub fn level_for(remaining: i64) -> Option<u32> {
    if remaining < HOLD_MS { None } else { Some((63 - remaining.leading_zeros()).min(MAX_SHIFT)) }
}

/// The level topics of a prefix, and the due topic. Index 0 is `P.due`, index `1 + s −
/// MIN_SHIFT` is level `s`.
#[derive(Clone, Debug)]
pub struct Topics {
    names: Vec<String>,
    /// Name → index, for every fetched message.
    index: std::collections::HashMap<String, usize>,
}

impl Topics {
    /// The topics of `prefix`.
    pub fn new(prefix: &str) -> Topics {
        let mut names = vec![format!("{prefix}.due")];
        names.extend((MIN_SHIFT..=MAX_SHIFT).map(|s| format!("{prefix}.level.{s}")));
        let index = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        Topics { names, index }
    }
    /// All topic names, `P.due` first.
    pub fn all(&self) -> &[String] {
        &self.names
    }
    /// The topic a notice with `remaining` ms to wait goes to, and how long it waits there.
    pub fn route(&self, remaining: i64) -> (usize, i64) {
        match level_for(remaining) {
            None => (0, 0),
            Some(s) => (1 + (s - MIN_SHIFT) as usize, 1i64 << s),
        }
    }
    /// The index of a topic name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
    /// The name at `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }
}

/// One message: the notices that entered one level together (one publish or one round of
/// hops), and when the level releases them (on the engine's clock). Up to
/// [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) per message: the broker's cost is per message (a produce, a fetch, an
/// offset), so they travel packed. The body is this as JSON, never a payload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Packet {
    pub release_at: i64,
    pub notices: Vec<TimerRef>,
}

/// The one-notice body of earlier versions, `{"queue","key","generation","due_at","release_at"}`:
/// still read (see [`Packet::decode`]), no longer written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Note {
    #[serde(flatten)]
    pub timer: TimerRef,
    pub release_at: i64,
}

impl Packet {
    /// Reads a message body: a [`Packet`] with at least one notice, or a one-notice [`Note`].
    pub fn decode(body: &[u8]) -> std::result::Result<Packet, String> {
        match serde_json::from_slice::<Packet>(body) {
            Ok(p) if p.notices.is_empty() => Err("a message with no notices".into()),
            Ok(p) => Ok(p),
            Err(e) => match serde_json::from_slice::<Note>(body) {
                Ok(n) => Ok(Packet { release_at: n.release_at, notices: vec![n.timer] }),
                Err(_) => Err(e.to_string()),
            },
        }
    }
}

/// Counters of one trigger, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KafkaStats {
    /// Notices written and acknowledged (first publications and every later hop).
    pub published: u64,
    /// Messages they were written in (up to [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) each).
    pub published_messages: u64,
    /// Notices read from the topics.
    pub received: u64,
    /// Messages they came in.
    pub received_messages: u64,
    /// Notices whose level wait ended and that went on to a lower level.
    pub hops: u64,
    /// Notices handed to the engine.
    pub delivered: u64,
    /// Written again after an `Early` answer.
    pub early: u64,
    /// Offered again after a `Redeliver` answer.
    pub redelivered: u64,
    /// Messages that were not notices (skipped, their offsets committed).
    pub malformed: u64,
    /// Rebalances this node's consumer took part in.
    pub rebalances: u64,
    /// Offset commits sent.
    pub commits: u64,
    /// Notices the consumer holds in memory right now (due within [`HOLD_MS`], or waiting out a
    /// redelivery pause).
    pub held: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    published_messages: AtomicU64,
    received: AtomicU64,
    received_messages: AtomicU64,
    hops: AtomicU64,
    delivered: AtomicU64,
    early: AtomicU64,
    redelivered: AtomicU64,
    malformed: AtomicU64,
    rebalances: AtomicU64,
    commits: AtomicU64,
    held: AtomicU64,
}

/// Kafka as an external trigger; see the crate docs.
#[derive(Clone)]
pub struct KafkaTrigger {
    inner: Arc<Inner>,
}

struct Inner {
    brokers: String,
    opts: KafkaOptions,
    topics: Topics,
    producer: FutureProducer,
    consuming: AtomicBool,
    counters: Counters,
}

impl std::fmt::Debug for KafkaTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTrigger")
            .field("brokers", &self.inner.brokers)
            .field("prefix", &self.inner.opts.prefix)
            .field("group", &self.inner.opts.group())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn kafka_err(context: &str, e: KafkaError) -> Error {
    Error::Store { backend: BACKEND, message: format!("{context}: {e}"), transient: true, source: Some(Box::new(e)) }
}

fn transient(message: String) -> Error {
    Error::Store { backend: BACKEND, message, transient: true, source: None }
}

impl KafkaTrigger {
    /// A trigger for a `kafka://` URL.
    pub fn from_url(url: &str) -> Result<KafkaTrigger> {
        let (opts, brokers) = KafkaOptions::from_url(url)?;
        KafkaTrigger::new(&brokers, opts)
    }

    /// A trigger on the bootstrap servers `brokers` (`host:port,…`). Connects lazily.
    pub fn new(brokers: &str, opts: KafkaOptions) -> Result<KafkaTrigger> {
        let mut cfg = ClientConfig::new();
        cfg.set("acks", "all")
            .set("linger.ms", DEFAULT_LINGER_MS.to_string())
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "30000");
        // The URL's librdkafka properties last: they override these defaults.
        Self::apply_base(&mut cfg, brokers, &opts);
        let producer: FutureProducer =
            cfg.create().map_err(|e| Error::Config(format!("kafka producer for {brokers}: {e}")))?;
        Ok(KafkaTrigger {
            inner: Arc::new(Inner {
                brokers: brokers.to_owned(),
                topics: Topics::new(&opts.prefix),
                opts,
                producer,
                consuming: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }

    fn base_config(brokers: &str, opts: &KafkaOptions) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        Self::apply_base(&mut cfg, brokers, opts);
        cfg
    }

    /// The brokers, the client id and the URL's librdkafka properties.
    fn apply_base(cfg: &mut ClientConfig, brokers: &str, opts: &KafkaOptions) {
        cfg.set("bootstrap.servers", brokers).set("client.id", format!("overdue-{}", opts.prefix));
        for (k, v) in &opts.client {
            cfg.set(k, v);
        }
    }

    /// The options in use.
    pub fn options(&self) -> &KafkaOptions {
        &self.inner.opts
    }

    /// The topics in use.
    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    /// True while the consumer has partitions assigned.
    pub fn consuming(&self) -> bool {
        self.inner.consuming.load(Relaxed)
    }

    /// This trigger's counters.
    pub fn stats(&self) -> KafkaStats {
        let c = &self.inner.counters;
        KafkaStats {
            published: c.published.load(Relaxed),
            published_messages: c.published_messages.load(Relaxed),
            received: c.received.load(Relaxed),
            received_messages: c.received_messages.load(Relaxed),
            hops: c.hops.load(Relaxed),
            delivered: c.delivered.load(Relaxed),
            early: c.early.load(Relaxed),
            redelivered: c.redelivered.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
            rebalances: c.rebalances.load(Relaxed),
            commits: c.commits.load(Relaxed),
            held: c.held.load(Relaxed),
        }
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        Self::base_config(&self.inner.brokers, &self.inner.opts)
            .create()
            .map_err(|e| Error::Config(format!("kafka admin client for {}: {e}", self.inner.brokers)))
    }

    /// Deletes this prefix's topics and its consumer group (for tests and clean-up), once the
    /// group has no members left (for at most [`PURGE_WAIT`]: a broker may not like a topic
    /// deleted under a live consumer). Returns how many topics were deleted.
    pub async fn purge(&self) -> Result<usize> {
        let (producer, group) = (self.inner.producer.clone(), self.inner.opts.group().to_owned());
        let _ = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + PURGE_WAIT;
            while std::time::Instant::now() < deadline {
                match producer.client().fetch_group_list(Some(&group), Duration::from_secs(5)) {
                    Ok(list) if list.groups().iter().all(|g| g.members().is_empty()) => return,
                    Ok(_) => std::thread::sleep(Duration::from_millis(200)),
                    Err(_) => return,
                }
            }
        })
        .await;
        let admin = self.admin()?;
        let names: Vec<&str> = self.inner.topics.all().iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(BROKER_TIMEOUT));
        let results = admin.delete_topics(&names, &opts).await.map_err(|e| kafka_err("deleting the topics", e))?;
        let deleted = results.iter().filter(|r| r.is_ok()).count();
        let _ = admin.delete_groups(&[self.inner.opts.group()], &opts).await;
        Ok(deleted)
    }

    /// Writes the notices, each to its level for the delay it has left at `now`, packed by
    /// level (up to [`NOTICES_PER_MESSAGE`](overdue_core::NOTICES_PER_MESSAGE) per message), and waits until the broker
    /// acknowledged every message.
    pub(crate) async fn send(&self, timers: &[&TimerRef], now: i64) -> Result<()> {
        if timers.is_empty() {
            return Ok(());
        }
        let packets: Vec<(usize, Packet)> = pack_by(timers.iter().map(|t| (self.inner.topics.route(t.due_at.saturating_sub(now)), (*t).clone())))
            .into_iter()
            .map(|((topic, wait), notices)| (topic, Packet { release_at: now.saturating_add(wait), notices }))
            .collect();
        let mut pending = Vec::with_capacity(packets.len());
        for (topic, packet) in &packets {
            let body = serde_json::to_vec(packet).map_err(|e| transient(format!("encoding notices: {e}")))?;
            // The key spreads messages over the partitions; which partition does not matter.
            let first = &packet.notices[0];
            let key = format!("{}/{}", first.queue, first.key);
            let mut record = FutureRecord::to(self.inner.topics.name(*topic)).key(&key).payload(&body);
            // The client's queue is bounded: on QueueFull, wait for earlier acknowledgements.
            loop {
                match self.inner.producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(kafka_err("queueing a notice", e)),
                }
            }
        }
        let acks = tokio::time::timeout(BROKER_TIMEOUT, futures::future::join_all(pending)).await.map_err(|_| {
            transient(format!("the broker did not acknowledge {} messages within {BROKER_TIMEOUT:?}", packets.len()))
        })?;
        for a in acks {
            match a {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(kafka_err("writing a notice", e)),
                Err(_) => return Err(transient("the producer was dropped before it acknowledged a notice".into())),
            }
        }
        self.inner.counters.published.fetch_add(timers.len() as u64, Relaxed);
        self.inner.counters.published_messages.fetch_add(packets.len() as u64, Relaxed);
        Ok(())
    }
}

#[async_trait]
impl ExternalTrigger for KafkaTrigger {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn start(&self) -> Result<()> {
        let admin = self.admin()?;
        let o = &self.inner.opts;
        let topics: Vec<NewTopic<'_>> = self
            .inner
            .topics
            .all()
            .iter()
            .map(|n| NewTopic::new(n, o.partitions, TopicReplication::Fixed(o.replication)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(BROKER_TIMEOUT)).request_timeout(Some(BROKER_TIMEOUT));
        let results = tokio::time::timeout(BROKER_TIMEOUT, admin.create_topics(&topics, &opts))
            .await
            .map_err(|_| transient(format!("kafka at {} did not answer within {BROKER_TIMEOUT:?}", self.inner.brokers)))?
            .map_err(|e| kafka_err(&format!("creating the topics on {}", self.inner.brokers), e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(transient(format!("creating topic {name} on {}: {code}", self.inner.brokers))),
            }
        }
        Ok(())
    }

    async fn publish(&self, notices: &[TimerRef], now: i64) -> Result<()> {
        let timers: Vec<&TimerRef> = notices.iter().collect();
        self.send(&timers, now).await
    }

    async fn consume(&self, sink: Arc<dyn DueSink>) -> Result<()> {
        consume::run(self.clone(), sink).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_waits_in_the_largest_level_that_fits() {
        assert_eq!(level_for(-5), None);
        assert_eq!(level_for(0), None);
        assert_eq!(level_for(HOLD_MS - 1), None);
        assert_eq!(level_for(HOLD_MS), Some(MIN_SHIFT));
        assert_eq!(level_for(2047), Some(10));
        assert_eq!(level_for(2048), Some(11));
        assert_eq!(level_for(30 * 60 * 1000), Some(20));
        assert_eq!(level_for(i64::MAX), Some(MAX_SHIFT));
    }

    #[test]
    fn each_hop_goes_to_a_lower_level_and_the_trips_are_the_one_bits() {
        for d in [1_024i64, 1_500, 5_000, 1_800_000, 7 * 86_400_000, (1 << 35) - 1] {
            let (mut left, mut trips, mut last) = (d, 0, u32::MAX);
            while let Some(s) = level_for(left) {
                assert!(s < last, "delay {d}: level {s} after {last}");
                last = s;
                left -= 1 << s;
                trips += 1;
            }
            assert!((0..HOLD_MS).contains(&left), "delay {d}: {left} left for memory");
            assert_eq!(trips, (d >> MIN_SHIFT).count_ones(), "delay {d}");
        }
        // Past the top level: round it again.
        let year_and_half = 3 * (1i64 << 34) + 5;
        assert_eq!(level_for(year_and_half), Some(MAX_SHIFT));
        assert_eq!(level_for(year_and_half - (1 << MAX_SHIFT)), Some(MAX_SHIFT - 1));
    }

    #[test]
    fn topics_route_by_level_with_due_first() {
        let t = Topics::new("shop");
        assert_eq!(t.all().len(), 1 + LEVELS);
        assert_eq!(t.name(0), "shop.due");
        assert_eq!(t.route(10), (0, 0));
        assert_eq!(t.route(5_000), (1 + 2, 4_096));
        assert_eq!(t.name(3), "shop.level.12");
        assert_eq!(t.index("shop.level.35"), Some(LEVELS));
        assert_eq!(t.index("other.due"), None);
    }

    #[test]
    fn the_url_gives_options_and_brokers_or_a_clear_error() {
        let (o, b) = KafkaOptions::from_url(
            "kafka://127.0.0.1:9092,10.0.0.2:9093?prefix=shop&group=g1&partitions=8&session_timeout_ms=6000&socket.timeout.ms=5000",
        )
        .expect("valid");
        assert_eq!(b, "127.0.0.1:9092,10.0.0.2:9093");
        assert_eq!((o.prefix.as_str(), o.group(), o.partitions, o.session_timeout_ms), ("shop", "g1", 8, 6000));
        assert_eq!(o.client, vec![("socket.timeout.ms".to_owned(), "5000".to_owned())]);
        let (o, b) = KafkaOptions::from_url("kafka://localhost:9092/").expect("valid");
        assert_eq!((b.as_str(), o.group(), o.partitions), ("localhost:9092", DEFAULT_PREFIX, DEFAULT_PARTITIONS));
        for (url, says) in [
            ("amqp://x:1", "kafka://"),
            ("kafka://", "no broker"),
            ("kafka://host", "host:port"),
            ("kafka://host:0", "host:port"),
            ("kafka://u:p@host:9092", "host:port"),
            ("kafka://h:1?prefix=a/b", "prefix"),
            ("kafka://h:1?prefix=", "prefix"),
            ("kafka://h:1?partitions=0", "1-1024"),
            ("kafka://h:1?replication=x", "1-16"),
            ("kafka://h:1?session_timeout_ms=5", "1000-300000"),
            ("kafka://h:1?mode=x", "unknown parameter"),
        ] {
            let e = KafkaOptions::from_url(url).expect_err(url).to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn a_packet_round_trips_as_json_and_a_one_notice_note_is_still_read() {
        let t = |k: &str, g| TimerRef { queue: "q".into(), key: k.into(), generation: g, due_at: 99 };
        let p = Packet { release_at: 42, notices: vec![t("k/1", 7), t("k/2", 8)] };
        let j = serde_json::to_string(&p).expect("encode");
        assert_eq!(
            j,
            r#"{"release_at":42,"notices":[{"queue":"q","key":"k/1","generation":7,"due_at":99},{"queue":"q","key":"k/2","generation":8,"due_at":99}]}"#
        );
        assert_eq!(Packet::decode(j.as_bytes()), Ok(p));
        let old = br#"{"queue":"q","key":"k/1","generation":7,"due_at":99,"release_at":42}"#;
        assert_eq!(Packet::decode(old), Ok(Packet { release_at: 42, notices: vec![t("k/1", 7)] }));
        for bad in [&b""[..], b"{}", br#"{"release_at":1,"notices":[]}"#, b"[1]", b"nope"] {
            assert!(Packet::decode(bad).is_err(), "{bad:?}");
        }
    }
}
