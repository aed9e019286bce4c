//! The consumer: reads every level topic in the group, holds each partition until its head is
//! released, keeps the last second in memory, hands due notices to the engine and commits the
//! offsets below the first unfinished message. See the crate docs.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures::StreamExt;
use overdue_core::{Delivery, DueSink, Result, TimerRef};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::task::JoinSet;

use crate::{
    BUFFER_MAX, COMMIT_EVERY, DELIVER_BATCH, DELIVERIES_IN_FLIGHT, HOLD_MS, KafkaTrigger, MAX_IN_FLIGHT, Packet,
    REDELIVER_PAUSE,
};

/// Longest the loop sleeps before it looks at the clock again (a manual clock can jump).
const TICK: Duration = Duration::from_millis(20);
/// A paused partition is resumed once its buffer is down to this.
const RESUME_AT: usize = BUFFER_MAX / 2;
/// After a client error, the consumer counts as unhealthy until messages or commits flow again,
/// or this long without another error.
const ERROR_SHOWS_FOR: Duration = Duration::from_secs(10);
/// How long a stopping consumer waits for its running deliveries and hops.
const DRAIN: Duration = Duration::from_secs(5);

/// librdkafka's callbacks: rebalances and client errors, read by the loop.
#[derive(Default)]
pub(crate) struct Ctx {
    rebalances: AtomicU64,
    error: Mutex<Option<(Instant, String)>>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka error");
        *self.error.lock() = Some((Instant::now(), format!("{error}: {reason}")));
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Relaxed);
    }
    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Relaxed);
    }
}

/// `(topic index, partition)`.
type PartKey = (usize, i32);

/// One fetched message still waiting for its level to release it.
struct Waiting {
    offset: i64,
    packet: Packet,
}

/// What the node holds of one partition.
#[derive(Default)]
struct Part {
    /// Fetched, in offset order, not yet released.
    buffer: VecDeque<Waiting>,
    /// Notices in `buffer`.
    buffered: usize,
    /// The offset after the last message fetched.
    next_offset: Option<i64>,
    /// Released messages not finished, by offset: how many of their notices are not finished
    /// yet (in memory until due, being delivered, being written on).
    unfinished: BTreeMap<i64, usize>,
    paused: bool,
    /// The offset last committed.
    committed: Option<i64>,
}

impl Part {
    /// The offset to commit: the first message not finished.
    fn safe_point(&self) -> Option<i64> {
        let mut p = self.next_offset?;
        if let Some(w) = self.buffer.front() {
            p = p.min(w.offset);
        }
        if let Some((&o, _)) = self.unfinished.first_key_value() {
            p = p.min(o);
        }
        Some(p)
    }
}

/// A list of one partition, for pause and resume.
fn one(topics: &crate::Topics, (topic, partition): PartKey) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topics.name(topic), partition);
    tpl
}

/// A released notice kept in memory until its due time (or a redelivery pause).
struct Held {
    at: i64,
    part: PartKey,
    offset: i64,
    timer: TimerRef,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    /// Reversed: the earliest on top of the max-heap.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.part, other.offset).cmp(&(self.at, self.part, self.offset))
    }
}

/// A finished piece of background work.
enum Done {
    Delivered { epoch: u64, items: Vec<(PartKey, i64, TimerRef)>, answers: Vec<Delivery> },
    Written { epoch: u64, items: Vec<(PartKey, i64, TimerRef)>, result: Result<()> },
}

struct State {
    trigger: KafkaTrigger,
    sink: Arc<dyn DueSink>,
    /// Bumped on every rebalance: work started before it no longer counts for commits.
    epoch: u64,
    seen_rebalances: u64,
    parts: HashMap<PartKey, Part>,
    held: BinaryHeap<Held>,
    /// Released notices that go on to a lower level (or again after `Early`), not yet sent.
    to_write: Vec<(PartKey, i64, TimerRef)>,
    write_not_before: Instant,
    write_backoff: Duration,
    writing: bool,
    deliveries: usize,
    unfinished: usize,
    tasks: JoinSet<Done>,
    last_commit: Instant,
    healthy_since_error: bool,
}

pub(crate) async fn run(trigger: KafkaTrigger, sink: Arc<dyn DueSink>) -> Result<()> {
    let inner = &trigger.inner;
    let o = &inner.opts;
    let mut cfg = ClientConfig::new();
    cfg.set("group.id", o.group())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", o.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (o.session_timeout_ms / 4).max(250).to_string())
        .set("fetch.wait.max.ms", "50")
        .set("queued.max.messages.kbytes", "2048")
        .set("max.partition.fetch.bytes", "262144");
    // The URL's librdkafka properties last: they override these defaults. Producer-only ones
    // are ignored here (librdkafka says so in its log).
    KafkaTrigger::apply_base(&mut cfg, &inner.brokers, o);
    let consumer: StreamConsumer<Ctx> = cfg
        .create_with_context(Ctx::default())
        .map_err(|e| overdue_core::Error::Config(format!("kafka consumer for {}: {e}", inner.brokers)))?;
    let names: Vec<&str> = inner.topics.all().iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(|e| overdue_core::Error::Config(format!("subscribing to the level topics: {e}")))?;
    let mut st = State {
        trigger: trigger.clone(),
        sink: sink.clone(),
        epoch: 0,
        seen_rebalances: 0,
        parts: HashMap::new(),
        held: BinaryHeap::new(),
        to_write: Vec::new(),
        write_not_before: Instant::now(),
        write_backoff: Duration::from_millis(100),
        writing: false,
        deliveries: 0,
        unfinished: 0,
        tasks: JoinSet::new(),
        last_commit: Instant::now(),
        healthy_since_error: true,
    };
    sink.set_healthy(true, None);
    let mut stream = consumer.stream();
    loop {
        if sink.stopped() {
            break;
        }
        st.notice_rebalance(&consumer);
        st.health(&consumer);
        let now = sink.now_ms();
        st.release(&consumer, now);
        st.dispatch(now);
        st.write();
        if st.last_commit.elapsed() >= COMMIT_EVERY {
            st.commit(&consumer, CommitMode::Async);
        }
        st.counters().held.store(st.held.len() as u64, Relaxed);
        let wait = st.wait(now);
        tokio::select! {
            biased;
            _ = sink.until_stopped() => break,
            Some(done) = st.tasks.join_next(), if !st.tasks.is_empty() => {
                if let Ok(done) = done {
                    st.finish(done);
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(m)) => {
                    st.notice_rebalance(&consumer);
                    let topic = inner.topics.index(m.topic());
                    st.fetched(&consumer, topic, m.partition(), m.offset(), m.payload());
                    // Take whatever else is already here before looking at the clock again.
                    while let Some(Some(Ok(m))) = futures::FutureExt::now_or_never(stream.next()) {
                        let topic = inner.topics.index(m.topic());
                        st.fetched(&consumer, topic, m.partition(), m.offset(), m.payload());
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "kafka consumer error");
                    *consumer.context().error.lock() = Some((Instant::now(), e.to_string()));
                }
                None => break,
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Stopping: let running work finish (deliveries answer quickly once the engine stops), then
    // commit what is finished.
    let deadline = tokio::time::Instant::now() + DRAIN;
    while !st.tasks.is_empty() {
        match tokio::time::timeout_at(deadline, st.tasks.join_next()).await {
            Ok(Some(Ok(done))) => st.finish(done),
            Ok(Some(Err(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // The last commit waits for the broker, and dropping the consumer leaves the group (librdkafka
    // blocks until the broker answers or its timeouts pass, seconds when the broker is gone):
    // both on a blocking thread, so no tokio worker stalls meanwhile. If the engine's stop gives up
    // waiting and aborts this task, the thread still commits and closes, and clears `consuming`.
    let last = st.uncommitted();
    drop(stream);
    let owner = trigger.clone();
    let closed = tokio::task::spawn_blocking(move || {
        if let Some((tpl, _)) = last {
            match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => {
                    owner.inner.counters.commits.fetch_add(1, Relaxed);
                }
                Err(e) => tracing::debug!(error = %e, "the last offset commit failed; the group's next member re-reads from the one before"),
            }
        }
        drop(consumer);
        owner.inner.consuming.store(false, Relaxed);
    })
    .await;
    if let Err(e) = closed
        && e.is_panic()
    {
        tracing::warn!(error = %e, "closing the kafka consumer panicked");
    }
    inner.consuming.store(false, Relaxed);
    Ok(())
}

impl State {
    fn counters(&self) -> &crate::Counters {
        &self.trigger.inner.counters
    }

    /// After a rebalance the partitions are read again from their last commit: forget what was
    /// held for them (work already started finishes, but no longer moves offsets).
    fn notice_rebalance(&mut self, consumer: &StreamConsumer<Ctx>) {
        let n = consumer.context().rebalances.load(Relaxed);
        if n == self.seen_rebalances {
            return;
        }
        self.seen_rebalances = n;
        self.epoch += 1;
        self.counters().rebalances.fetch_add(1, Relaxed);
        self.parts.clear();
        self.held.clear();
        self.to_write.clear();
        self.unfinished = 0;
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.trigger.inner.consuming.store(assigned > 0, Relaxed);
        tracing::debug!(assigned, "kafka rebalance");
    }

    fn health(&mut self, consumer: &StreamConsumer<Ctx>) {
        let mut err = consumer.context().error.lock();
        if let Some((at, msg)) = err.as_ref() {
            if self.healthy_since_error && at.elapsed() < ERROR_SHOWS_FOR {
                self.sink.set_healthy(false, Some(format!("kafka: {msg}")));
                self.healthy_since_error = false;
            } else if at.elapsed() >= ERROR_SHOWS_FOR {
                *err = None;
                self.recovered();
            }
        }
    }

    /// Messages or commits flow again.
    fn recovered(&mut self) {
        if !self.healthy_since_error {
            self.healthy_since_error = true;
            self.sink.set_healthy(true, None);
        }
    }

    fn fetched(&mut self, consumer: &StreamConsumer<Ctx>, topic: Option<usize>, partition: i32, offset: i64, payload: Option<&[u8]>) {
        self.counters().received_messages.fetch_add(1, Relaxed);
        if !self.healthy_since_error {
            *consumer.context().error.lock() = None;
            self.recovered();
        }
        let Some(topic) = topic else { return };
        if !self.trigger.inner.consuming.load(Relaxed) {
            self.trigger.inner.consuming.store(true, Relaxed);
        }
        let key = (topic, partition);
        let part = self.parts.entry(key).or_default();
        if part.next_offset.is_some_and(|n| offset < n) {
            return; // Already have it (a fetch restarted behind us).
        }
        part.next_offset = Some(offset + 1);
        match payload.map(Packet::decode) {
            Some(Ok(packet)) => {
                self.trigger.inner.counters.received.fetch_add(packet.notices.len() as u64, Relaxed);
                part.buffered += packet.notices.len();
                part.buffer.push_back(Waiting { offset, packet });
            }
            _ => {
                // Not a notice: skipped; its offset is finished.
                self.trigger.inner.counters.malformed.fetch_add(1, Relaxed);
                tracing::warn!(topic = self.trigger.inner.topics.name(topic), partition, offset, "skipping a message that is not a notice");
            }
        }
        if !part.paused && part.buffered >= BUFFER_MAX {
            part.paused = true;
            let _ = consumer.pause(&one(&self.trigger.inner.topics, key));
        }
    }

    /// Moves every head whose level wait is over: into memory (under a second left) or on to a
    /// lower level.
    fn release(&mut self, consumer: &StreamConsumer<Ctx>, now: i64) {
        let mut resume = Vec::new();
        for (&key, part) in self.parts.iter_mut() {
            while self.unfinished < MAX_IN_FLIGHT {
                let Some(head) = part.buffer.front() else { break };
                if head.packet.release_at > now {
                    break;
                }
                let Some(w) = part.buffer.pop_front() else { break };
                let n = w.packet.notices.len();
                part.buffered -= n;
                part.unfinished.insert(w.offset, n);
                self.unfinished += n;
                for timer in w.packet.notices {
                    if timer.due_at.saturating_sub(now) < HOLD_MS {
                        self.held.push(Held { at: timer.due_at, part: key, offset: w.offset, timer });
                    } else {
                        self.to_write.push((key, w.offset, timer));
                    }
                }
            }
            if part.paused && part.buffered <= RESUME_AT {
                part.paused = false;
                resume.push(key);
            }
        }
        for key in resume {
            let _ = consumer.resume(&one(&self.trigger.inner.topics, key));
        }
    }

    /// Hands what is due to the engine, in batches.
    fn dispatch(&mut self, now: i64) {
        while self.deliveries < DELIVERIES_IN_FLIGHT && self.held.peek().is_some_and(|h| h.at <= now) {
            let mut items = Vec::new();
            while items.len() < DELIVER_BATCH {
                match self.held.peek() {
                    Some(h) if h.at <= now => {}
                    _ => break,
                }
                let Some(h) = self.held.pop() else { break };
                items.push((h.part, h.offset, h.timer));
            }
            self.deliveries += 1;
            self.counters().delivered.fetch_add(items.len() as u64, Relaxed);
            let (sink, epoch) = (self.sink.clone(), self.epoch);
            self.tasks.spawn(async move {
                let notices = items.iter().map(|(_, _, t)| t.clone()).collect();
                let answers = sink.deliver(notices).await;
                Done::Delivered { epoch, items, answers }
            });
        }
    }

    /// Sends the released notices that go on (one batch at a time).
    fn write(&mut self) {
        if self.writing || self.to_write.is_empty() || Instant::now() < self.write_not_before {
            return;
        }
        self.writing = true;
        let items = std::mem::take(&mut self.to_write);
        let (trigger, sink, epoch) = (self.trigger.clone(), self.sink.clone(), self.epoch);
        self.tasks.spawn(async move {
            let now = sink.now_ms();
            let timers: Vec<&TimerRef> = items.iter().map(|(_, _, t)| t).collect();
            let result = trigger.send(&timers, now).await;
            Done::Written { epoch, items, result }
        });
    }

    fn finish(&mut self, done: Done) {
        match done {
            Done::Delivered { epoch, items, answers } => {
                self.deliveries -= 1;
                let pause_until = self.sink.now_ms().saturating_add(REDELIVER_PAUSE.as_millis() as i64);
                for ((key, offset, timer), answer) in items.into_iter().zip(answers) {
                    match answer {
                        Delivery::Ack => self.finished(epoch, key, offset),
                        Delivery::Early if epoch == self.epoch => {
                            self.counters().early.fetch_add(1, Relaxed);
                            self.to_write.push((key, offset, timer));
                        }
                        Delivery::Redeliver if epoch == self.epoch && !self.sink.stopped() => {
                            self.counters().redelivered.fetch_add(1, Relaxed);
                            self.held.push(Held { at: pause_until, part: key, offset, timer });
                        }
                        // Stopping, or from before a rebalance: left unfinished, read again.
                        _ => {}
                    }
                }
            }
            Done::Written { epoch, items, result } => {
                self.writing = false;
                match result {
                    Ok(()) => {
                        self.write_backoff = Duration::from_millis(100);
                        self.counters().hops.fetch_add(items.len() as u64, Relaxed);
                        for (key, offset, _) in items {
                            self.finished(epoch, key, offset);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, n = items.len(), "writing notices to their next level failed; retrying");
                        self.sink.set_healthy(false, Some(format!("kafka: {e}")));
                        self.healthy_since_error = false;
                        self.write_not_before = Instant::now() + self.write_backoff;
                        self.write_backoff = (self.write_backoff * 2).min(Duration::from_secs(5));
                        if epoch == self.epoch {
                            self.to_write.extend(items);
                        }
                    }
                }
            }
        }
    }

    fn finished(&mut self, epoch: u64, key: PartKey, offset: i64) {
        if epoch != self.epoch {
            return;
        }
        if let Some(part) = self.parts.get_mut(&key)
            && let Some(left) = part.unfinished.get_mut(&offset)
        {
            *left -= 1;
            self.unfinished -= 1;
            if *left == 0 {
                part.unfinished.remove(&offset);
            }
        }
    }

    /// The offsets that moved since the last commit: the list to commit, and which they are.
    fn uncommitted(&self) -> Option<(TopicPartitionList, Vec<(PartKey, i64)>)> {
        let mut tpl = TopicPartitionList::new();
        let mut changed = Vec::new();
        for (&(topic, partition), part) in &self.parts {
            if let Some(p) = part.safe_point()
                && part.committed != Some(p)
            {
                let _ = tpl.add_partition_offset(self.trigger.inner.topics.name(topic), partition, Offset::Offset(p));
                changed.push(((topic, partition), p));
            }
        }
        (!changed.is_empty()).then_some((tpl, changed))
    }

    /// Commits the offsets that moved (asynchronously: this runs on the consumer's task; the
    /// last, synchronous commit at shutdown runs on a blocking thread, see [`run`]).
    fn commit(&mut self, consumer: &StreamConsumer<Ctx>, mode: CommitMode) {
        self.last_commit = Instant::now();
        let Some((tpl, changed)) = self.uncommitted() else { return };
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                self.counters().commits.fetch_add(1, Relaxed);
                for (key, p) in changed {
                    if let Some(part) = self.parts.get_mut(&key) {
                        part.committed = Some(p);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "committing offsets failed; the next round tries again"),
        }
    }

    /// How long to sleep: until the next head or held notice is due, at most [`TICK`].
    fn wait(&self, now: i64) -> Duration {
        let mut next = i64::MAX;
        if self.unfinished < MAX_IN_FLIGHT {
            for part in self.parts.values() {
                if let Some(h) = part.buffer.front() {
                    next = next.min(h.packet.release_at);
                }
            }
        }
        if self.deliveries < DELIVERIES_IN_FLIGHT
            && let Some(h) = self.held.peek()
        {
            next = next.min(h.at);
        }
        if !self.to_write.is_empty() && !self.writing {
            let left = self.write_not_before.saturating_duration_since(Instant::now());
            next = next.min(now.saturating_add(left.as_millis() as i64));
        }
        let ms = next.saturating_sub(now).clamp(0, TICK.as_millis() as i64);
        Duration::from_millis(ms as u64)
    }
}
