//! The engine: one store, one trigger, handlers per queue.
//!
//! ## How a timer fires
//!
//! ```text
//!  schedule ──► store (durable) ──► index (if due within the horizon)
//!                                     │ wheel/heap pop at due time      scan: claim_due every interval
//!                                     ▼                                   │
//!                            store.claim (generation, due, lease) ◄──────┘
//!                                     │ claimed only
//!                                     ▼
//!                        queue worker ─► handler ─► outcome ─► settler ─► store.settle (batched)
//! ```
//!
//! - **Nothing fires unclaimed.** The claim is the single place where stale wake-ups (cancelled
//!   or replaced timers), early wake-ups and wake-ups of timers another node holds are dropped.
//! - **Nothing is lost.** A timer leaves the store only when its `Done` or dead-letter
//!   settlement commits. A crash between claim and settle leaves a lease that expires; the
//!   backstop sweep (every `backstop_interval`) claims anything overdue by more than
//!   `backstop_slack` that no trigger fired, and counts it in `backstop_rescued`.
//! - **Back-pressure.** At most `max_in_flight` timers are claimed and unsettled; the driver waits
//!   for permits before claiming more, so a slow handler cannot make memory grow.
//! - **Shutdown** stops claiming, lets handlers finish within the grace period, then cancels the
//!   rest and releases their claims so they fire again on the next start (or on another node).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use overdue_core::{
    Claimed, Clock, ExternalTrigger, DeadLetter, DeadLetterQuery, Error, Firing, Limits, ListQuery, Outcome,
    QueueCount, Result, Settlement, Store, SystemClock, Timer, TimerRef, TimerSpec, limits,
};
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::{EngineConfig, QueueConfig, TriggerKind};
use crate::handler::Handler;
use crate::external::{self, Health, Waiters};
use crate::index::MemIndex;
use crate::stats::{EngineStats, Stats, queue_label};

/// Rows fetched per page when the loader moves the horizon forward.
const LOAD_PAGE: u32 = 10_000;
/// Most settlements written in one store call.
const SETTLE_BATCH: usize = 4096;
/// A queue may have at most `max(concurrency × CLAIM_AHEAD, claim_batch)` timers claimed and
/// unsettled, and never more than half of `max_in_flight`; past that its due timers wait
/// unclaimed (in the driver's deferred lists), so one slow queue cannot take every in-flight
/// permit and delay the timers of the others, while a fast queue still claims in full batches.
const CLAIM_AHEAD: usize = 4;
/// How long shutdown waits for the last settlements to be written.
const SETTLER_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for the external trigger's relay and consumer to end by themselves.
const EXTERNAL_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest that [`Engine::settle`] waits for an external trigger to deliver what is due before
/// the backstop takes it.
pub const EXTERNAL_SETTLE_WAIT: Duration = Duration::from_secs(3);
/// Longest pause between retries of a failing store call in the background tasks.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);
/// Claim calls of one pass in flight at once. Two keep a shared database's second connection
/// (and core) busy while the first claim commits (PostgreSQL 200k burst: 13–16k/s with one,
/// 29k/s with two, `overdue bench` in docs/benchmarks.md); larger values are not measured.
const CLAIM_PIPELINE: usize = 2;

/// Builds and starts an [`Engine`].
pub struct EngineBuilder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    limits: Limits,
    default_queue: QueueConfig,
    handlers: HashMap<String, (Arc<dyn Handler>, QueueConfig)>,
    fallback: Option<(Arc<dyn Handler>, QueueConfig)>,
    external: Option<Arc<dyn ExternalTrigger>>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("store", &self.store)
            .field("config", &self.config)
            .field("queues", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl EngineBuilder {
    /// Uses this clock instead of the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Engine-wide settings.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Input limits (payload size).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Settings for queues that have no handler of their own registered.
    pub fn default_queue_config(mut self, config: QueueConfig) -> Self {
        self.default_queue = config;
        self
    }

    /// Registers the handler of `queue`.
    pub fn handler(mut self, queue: impl Into<String>, config: QueueConfig, handler: impl Handler) -> Self {
        self.handlers.insert(queue.into(), (Arc::new(handler), config));
        self
    }

    /// Registers the handler for every queue that has none of its own (for example generic
    /// timers whose queue names come from users). Without it, such timers fail with
    /// "no handler registered" and end in the dead-letter table.
    pub fn fallback_handler(mut self, config: QueueConfig, handler: impl Handler) -> Self {
        self.fallback = Some((Arc::new(handler), config));
        self
    }

    /// Registers a shared handler for `queue`.
    pub fn handler_arc(mut self, queue: impl Into<String>, config: QueueConfig, handler: Arc<dyn Handler>) -> Self {
        self.handlers.insert(queue.into(), (handler, config));
        self
    }

    /// Validates the configuration and starts the engine's tasks on the current tokio runtime.
    /// Waits with an external trigger (a broker, Redis key expiry) instead of the in-process
    /// wheel/heap/scan: the store must have its outbox on. See `overdue_core::trigger` for the
    /// design; the engine runs the outbox relay, the trigger's consumer and the backstop sweep.
    pub fn external_trigger(mut self, trigger: Arc<dyn ExternalTrigger>) -> Self {
        self.external = Some(trigger);
        self
    }

    pub async fn start(self) -> Result<Engine> {
        self.config.validate()?;
        for (queue, (_, qc)) in &self.handlers {
            limits::check_queue(queue)?;
            qc.validate(self.config.lease)?;
        }
        self.default_queue.validate(self.config.lease)?;
        let node_id = self.config.node_id.clone().unwrap_or_else(default_node_id);
        let index = match (self.config.trigger, &self.external) {
            (_, Some(_)) | (TriggerKind::Scan, None) => None,
            (kind, None) => Some(Mutex::new(MemIndex::new(kind))),
        };
        if let Some(t) = &self.external {
            // Fails early with the trigger's own explanation (plugin missing, events off) and
            // checks that the store can feed it.
            self.store.outbox_fetch(1).await?;
            t.start().await?;
        }
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let (idle_tx, _) = watch::channel(0u64);
        let mut queues = HashMap::new();
        let mut worker_rxs = Vec::new();
        for (queue, (handler, cfg)) in self.handlers {
            let (tx, rx) = mpsc::unbounded_channel();
            let rt = Arc::new(QueueRt::new(queue.clone(), cfg, handler, tx));
            worker_rxs.push((rt.clone(), rx));
            queues.insert(queue, rt);
        }
        let fallback = match self.fallback {
            Some((handler, cfg)) => {
                cfg.validate(self.config.lease)?;
                let (tx, rx) = mpsc::unbounded_channel();
                let rt = Arc::new(QueueRt::new("*".to_owned(), cfg, handler, tx));
                worker_rxs.push((rt.clone(), rx));
                Some(rt)
            }
            None => None,
        };
        let claim_batch = (self.config.claim_batch as usize).min(self.config.max_in_flight);
        let shared = Arc::new(Shared {
            store: self.store,
            clock: self.clock,
            permits: Arc::new(Semaphore::new(self.config.max_in_flight)),
            claim_batch,
            cfg: self.config,
            limits: self.limits,
            default_queue: self.default_queue,
            node_id,
            queues,
            fallback,
            deferred: Mutex::new(HashMap::new()),
            index,
            wake: Notify::new(),
            planned_wake: AtomicI64::new(i64::MIN),
            idle: idle_tx,
            stats: Stats::new(),
            settle_tx,
            stop_claiming: CancellationToken::new(),
            abort_handlers: CancellationToken::new(),
            accepting: AtomicBool::new(true),
            external: self.external.clone(),
            waiters: Waiters::default(),
            relay_wake: Notify::new(),
            trigger_health: Mutex::new(Health { healthy: true, error: None }),
            ownership_epoch: std::sync::atomic::AtomicU64::new(0),
        });
        let mut tasks = Vec::new();
        for (rt, rx) in worker_rxs {
            tasks.push(tokio::spawn(queue_worker(shared.clone(), rt, rx)));
        }
        let settler = tokio::spawn(settler(shared.clone(), settle_rx));
        let (pass_tx, pass_rx) = mpsc::channel(64);
        let driver = tokio::spawn(driver(shared.clone(), pass_rx));
        let mut external_tasks = Vec::new();
        if let Some(t) = &self.external {
            external_tasks.push(tokio::spawn(external::relay(shared.clone(), t.clone())));
            external_tasks.push(tokio::spawn(external::consume(shared.clone(), t.clone())));
        }
        tracing::info!(node = %shared.node_id, store = shared.store.capabilities().name,
            trigger = %shared.trigger_name(), "engine started");
        Ok(Engine {
            shared,
            pass_tx,
            driver: Mutex::new(Some(driver)),
            settler: Mutex::new(Some(settler)),
            workers: Mutex::new(tasks),
            external: Mutex::new(external_tasks),
        })
    }
}

/// What `shutdown` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// True if every in-flight handler finished within the grace period.
    pub drained: bool,
    /// Firings cancelled at the end of the grace period and released for re-delivery.
    pub released: u64,
}

/// A running engine. Dropping it without [`Engine::shutdown`] aborts its tasks like a crash
/// would (claims are left to expire); call `shutdown` for a clean stop.
pub struct Engine {
    shared: Arc<Shared>,
    pass_tx: mpsc::Sender<oneshot::Sender<()>>,
    driver: Mutex<Option<JoinHandle<()>>>,
    settler: Mutex<Option<JoinHandle<()>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// The external trigger's relay and consumer: given [`EXTERNAL_STOP_TIMEOUT`] to end by
    /// themselves at shutdown (a consumer commits what is finished and leaves its group).
    external: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node_id", &self.shared.node_id)
            .field("trigger", &self.shared.trigger_name())
            .field("store", &self.shared.store)
            .finish()
    }
}

impl Engine {
    /// Starts building an engine over `store`.
    pub fn builder(store: Arc<dyn Store>) -> EngineBuilder {
        EngineBuilder {
            store,
            clock: Arc::new(SystemClock),
            config: EngineConfig::default(),
            limits: Limits::default(),
            default_queue: QueueConfig::default(),
            handlers: HashMap::new(),
            fallback: None,
            external: None,
        }
    }

    /// Schedules (upserts) one timer and returns its generation once it is durable.
    pub async fn schedule(&self, spec: TimerSpec) -> Result<u64> {
        let mut gens = self.schedule_batch(vec![spec]).await?;
        gens.pop().ok_or_else(|| Error::Config("store returned no generation".into()))
    }

    /// Schedules (upserts) a batch atomically and returns the generations in input order.
    /// The whole batch is refused, and nothing changes, if any timer is invalid.
    pub async fn schedule_batch(&self, specs: Vec<TimerSpec>) -> Result<Vec<u64>> {
        self.shared.accepting()?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        if specs.len() > limits::MAX_BATCH {
            return Err(Error::BatchTooLarge { size: specs.len(), max: limits::MAX_BATCH });
        }
        let now = self.shared.clock.now_ms();
        let mut seen = std::collections::HashSet::with_capacity(specs.len());
        for spec in &specs {
            self.shared.limits.check(spec, now)?;
            if !seen.insert((spec.queue.as_str(), spec.key.as_str())) {
                return Err(Error::DuplicateInBatch { queue: spec.queue.clone(), key: spec.key.clone() });
            }
        }
        drop(seen);
        let idents: Vec<(String, String, i64)> =
            specs.iter().map(|s| (s.queue.clone(), s.key.clone(), s.due_at)).collect();
        let gens = self.shared.store.schedule(specs, now).await?;
        self.shared.wake_relay();
        self.shared.stats.scheduled.fetch_add(gens.len() as u64, Relaxed);
        // One counter update per queue and batch (a batch is usually one queue), not per timer.
        let mut per_queue: Vec<(&str, u64)> = Vec::new();
        for (q, _, _) in &idents {
            match per_queue.iter_mut().find(|(name, _)| name == q) {
                Some((_, n)) => *n += 1,
                None => per_queue.push((q, 1)),
            }
        }
        for (q, n) in per_queue {
            metrics::counter!("overdue_timers_scheduled_total", "queue" => queue_label(q)).increment(n);
        }
        if let Some(ix) = &self.shared.index {
            let mut earliest = i64::MAX;
            let mut ix = ix.lock();
            for ((queue, key, due_at), generation) in idents.into_iter().zip(gens.iter().copied()) {
                if due_at <= ix.covered_until {
                    earliest = earliest.min(due_at);
                    ix.upsert(TimerRef { queue, key, generation, due_at });
                } else {
                    ix.remove_upto(&queue, &key, generation.saturating_sub(1));
                }
            }
            self.shared.stats.resident.store(ix.len() as u64, Relaxed);
            // Checked under the index lock, where the driver publishes its planned wake-up.
            self.shared.wake_if_before(earliest);
        }
        Ok(gens)
    }

    /// Cancels a timer. Returns false if there was none. A firing already on its way is dropped
    /// at its claim; a handler already running finishes, and its settlement is ignored.
    pub async fn cancel(&self, queue: &str, key: &str) -> Result<bool> {
        self.shared.accepting()?;
        limits::check_queue(queue)?;
        limits::check_key(key)?;
        let removed = self.shared.store.cancel(queue, key).await?;
        if let (Some(ix), Some(generation)) = (&self.shared.index, removed) {
            ix.lock().remove_upto(queue, key, generation);
        }
        if removed.is_some() {
            self.shared.stats.cancelled.fetch_add(1, Relaxed);
            metrics::counter!("overdue_timers_cancelled_total", "queue" => queue_label(queue)).increment(1);
        }
        Ok(removed.is_some())
    }

    /// Moves a timer's due time, keeping its payload. Returns the new generation.
    pub async fn reschedule(&self, queue: &str, key: &str, due_at: i64) -> Result<u64> {
        self.shared.accepting()?;
        limits::check_queue(queue)?;
        limits::check_key(key)?;
        let now = self.shared.clock.now_ms();
        limits::check_due(due_at, now)?;
        let generation = self
            .shared
            .store
            .reschedule(queue, key, due_at, now)
            .await?
            .ok_or_else(|| Error::NotFound { queue: queue.to_owned(), key: key.to_owned() })?;
        self.shared.note_upsert(queue, key, generation, due_at);
        Ok(generation)
    }

    /// Tells the engine about timers written to the store outside [`Engine::schedule`], for
    /// example in the caller's own transaction (an order and its close timer committed together).
    /// Without this a wheel/heap trigger would only learn of a timer due within the horizon from
    /// the backstop sweep, seconds late. Cancels need no such call: a stale wake-up is dropped at
    /// its claim.
    pub fn track(&self, timers: impl IntoIterator<Item = TimerRef>) {
        for t in timers {
            self.shared.stats.scheduled.fetch_add(1, Relaxed);
            self.shared.note_upsert(&t.queue, &t.key, t.generation, t.due_at);
        }
    }

    /// Makes a timer due now.
    pub async fn fire_now(&self, queue: &str, key: &str) -> Result<u64> {
        let now = self.shared.clock.now_ms();
        self.reschedule(queue, key, now).await
    }

    /// One stored timer.
    pub async fn get(&self, queue: &str, key: &str) -> Result<Option<Timer>> {
        limits::check_queue(queue)?;
        limits::check_key(key)?;
        self.shared.store.get(queue, key, self.shared.clock.now_ms()).await
    }

    /// Stored timers in due order; see [`ListQuery`].
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<Timer>> {
        if let Some(q) = &query.queue {
            limits::check_queue(q)?;
        }
        self.shared.store.list(query, self.shared.clock.now_ms()).await
    }

    /// Pending / in-flight / dead counts per queue.
    pub async fn counts(&self) -> Result<Vec<QueueCount>> {
        self.shared.store.counts(self.shared.clock.now_ms()).await
    }

    /// Unclaimed timers per queue by how soon they come due (see [`Store::due_histogram`]).
    pub async fn due_histogram(&self) -> Result<overdue_core::DueHistogram> {
        self.shared.store.due_histogram(self.shared.clock.now_ms()).await
    }

    /// The nodes sharing the store, as far as it knows them (see [`Store::nodes`]).
    pub async fn nodes(&self) -> Result<Vec<overdue_core::NodeLease>> {
        self.shared.store.nodes(self.shared.clock.now_ms()).await
    }

    /// Dead letters in id order.
    pub async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        if let Some(q) = &query.queue {
            limits::check_queue(q)?;
        }
        self.shared.store.dead_letters(query).await
    }

    /// Puts a dead letter back as a timer due now, with its attempts reset. Returns the new
    /// generation.
    pub async fn replay(&self, id: i64) -> Result<u64> {
        self.shared.accepting()?;
        let now = self.shared.clock.now_ms();
        let dl = self
            .shared
            .store
            .dead_letters(&DeadLetterQuery { after_id: Some(id.saturating_sub(1)), limit: 1, ..Default::default() })
            .await?
            .into_iter()
            .find(|d| d.id == id)
            .ok_or(Error::DeadLetterNotFound(id))?;
        let generation = self.shared.store.replay(id, now, now).await?.ok_or(Error::DeadLetterNotFound(id))?;
        self.shared.note_upsert(&dl.queue, &dl.key, generation, now);
        Ok(generation)
    }

    /// Counters and lateness so far.
    pub fn stats(&self) -> EngineStats {
        let mut stats = self.shared.stats.snapshot();
        stats.trigger = self.shared.trigger_name();
        let health = self.shared.trigger_health.lock();
        stats.trigger_healthy = health.healthy;
        stats.trigger_error = health.error.clone();
        stats
    }

    /// Forgets the lateness histogram (to measure one phase of a benchmark).
    pub fn reset_lateness(&self) {
        self.shared.stats.reset_lateness();
    }

    /// The identity this engine writes into claims.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The engine's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// Runs a trigger pass at the clock's current time and waits until every timer it claimed has
    /// been handled and settled, repeating while passes still fire something or a queue's
    /// deferred wake-ups still wait for its claim cap. Tests use this after moving a manual clock;
    /// it never sleeps.
    ///
    /// With an external trigger the broker waits in real time, so this first publishes the whole
    /// outbox, then waits up to [`EXTERNAL_SETTLE_WAIT`] (polling the store) for the broker to
    /// deliver everything due at the clock's current time, and finally lets the backstop claim
    /// whatever is still due (a virtual jump past what a broker could wait for in real time),
    /// counted in `backstop_rescued` like any rescue.
    pub async fn settle(&self) {
        if let Some(trigger) = self.shared.external.clone() {
            self.settle_external(trigger.as_ref()).await;
        }
        loop {
            let fired_before = self.shared.stats.fired.load(Relaxed);
            let (tx, rx) = oneshot::channel();
            if self.pass_tx.send(tx).await.is_err() || rx.await.is_err() {
                return;
            }
            self.wait_idle().await;
            // A pass can run while a capped queue's last claims are still in flight (the driver
            // also wakes by itself when they settle, and that pass may have fired the batch this
            // loop counted in `fired_before`); it then fires nothing and leaves that queue's line
            // deferred. Once idle, the next pass has room for it, so go round again.
            if self.shared.stats.fired.load(Relaxed) == fired_before && self.shared.deferred.lock().is_empty() {
                return;
            }
        }
    }

    async fn settle_external(&self, trigger: &dyn ExternalTrigger) {
        loop {
            match external::relay_round(&self.shared, trigger).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "settle: relaying the outbox failed");
                    break;
                }
            }
        }
        // Give the broker its chance to deliver what is due (in real time)…
        let deadline = tokio::time::Instant::now() + EXTERNAL_SETTLE_WAIT;
        let now = self.shared.clock.now_ms();
        loop {
            match self.shared.store.due_refs(None, now, 1).await {
                Ok(refs) if refs.is_empty() => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "settle: reading due timers failed");
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // …then the backstop takes the rest, as it would a lost message (after a jump of the
        // virtual clock past what the broker could have waited in real time).
        if let Err(e) = self.shared.backstop(now).await {
            tracing::warn!(error = %e, "settle: backstop sweep failed");
        }
    }

    async fn wait_idle(&self) {
        let mut rx = self.shared.idle.subscribe();
        // The sender lives in `shared`, which outlives this call.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Stops claiming, waits up to `grace` for running handlers, then cancels the rest and
    /// releases their claims for re-delivery. New calls fail with [`Error::ShuttingDown`].
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        self.shared.accepting.store(false, Relaxed);
        self.shared.stop_claiming.cancel();
        let driver = self.driver.lock().take();
        if let Some(d) = driver {
            let _ = d.await;
        }
        let mut report = ShutdownReport { drained: true, released: 0 };
        if tokio::time::timeout(grace, self.wait_idle()).await.is_err() {
            report.drained = false;
            report.released = self.shared.stats.in_flight.load(Relaxed);
            self.shared.abort_handlers.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(30), self.wait_idle()).await;
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.settle_tx.send(SettlerMsg::Stop(tx)).is_ok() {
            // Bounded: a settler stuck on a failing store must not keep the process alive.
            let _ = tokio::time::timeout(SETTLER_STOP_TIMEOUT, rx).await;
        }
        // The trigger's tasks end by themselves once claiming stopped; wait for them (bounded) so
        // a broker consumer can commit its offsets and leave its group instead of vanishing.
        let external: Vec<JoinHandle<()>> = self.external.lock().drain(..).collect();
        for t in external {
            let abort = t.abort_handle();
            if tokio::time::timeout(EXTERNAL_STOP_TIMEOUT, t).await.is_err() {
                abort.abort();
            }
        }
        self.abort_tasks();
        tracing::info!(node = %self.shared.node_id, ?report, "engine stopped");
        report
    }

    fn abort_tasks(&self) {
        if let Some(d) = self.driver.lock().take() {
            d.abort();
        }
        if let Some(s) = self.settler.lock().take() {
            s.abort();
        }
        for w in self.workers.lock().drain(..).chain(self.external.lock().drain(..)) {
            w.abort();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop_claiming.cancel();
        self.abort_tasks();
    }
}

struct QueueRt {
    name: String,
    cfg: QueueConfig,
    handler: Option<Arc<dyn Handler>>,
    /// Claimed timers with the end of their lease.
    tx: mpsc::UnboundedSender<(Claimed, i64)>,
    /// Claimed and not yet settled, for this queue.
    in_flight: std::sync::atomic::AtomicUsize,
}

impl QueueRt {
    fn new(name: String, cfg: QueueConfig, handler: Arc<dyn Handler>, tx: mpsc::UnboundedSender<(Claimed, i64)>) -> Self {
        QueueRt { name, cfg, handler: Some(handler), tx, in_flight: std::sync::atomic::AtomicUsize::new(0) }
    }

    /// Most timers of this queue claimed at once (see [`CLAIM_AHEAD`]).
    fn claim_cap(&self, claim_batch: usize, max_in_flight: usize) -> usize {
        self.cfg.concurrency.saturating_mul(CLAIM_AHEAD).max(claim_batch).min((max_in_flight / 2).max(1))
    }
}

enum SettlerMsg {
    Settle(Settlement),
    Stop(oneshot::Sender<()>),
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) cfg: EngineConfig,
    limits: Limits,
    default_queue: QueueConfig,
    pub(crate) node_id: String,
    queues: HashMap<String, Arc<QueueRt>>,
    /// Runs the queues that have no handler of their own, if set.
    fallback: Option<Arc<QueueRt>>,
    /// Due wake-ups of queues at their claim cap, per queue in due order, retried when one of
    /// their claims settles.
    deferred: Mutex<HashMap<String, std::collections::VecDeque<TimerRef>>>,
    index: Option<Mutex<MemIndex>>,
    /// Wakes the driver early (a schedule due before its planned wake-up).
    wake: Notify,
    planned_wake: AtomicI64,
    pub(crate) permits: Arc<Semaphore>,
    claim_batch: usize,
    /// Claimed and not yet settled; 0 means idle.
    idle: watch::Sender<u64>,
    pub(crate) stats: Stats,
    settle_tx: mpsc::UnboundedSender<SettlerMsg>,
    pub(crate) stop_claiming: CancellationToken,
    abort_handlers: CancellationToken,
    accepting: AtomicBool,
    /// The external trigger, if the engine runs one instead of wheel/heap/scan.
    external: Option<Arc<dyn ExternalTrigger>>,
    /// Deliveries of the external trigger waiting for their settlement.
    pub(crate) waiters: Waiters,
    /// Wakes the outbox relay after a write.
    pub(crate) relay_wake: Notify,
    pub(crate) trigger_health: Mutex<Health>,
    /// Last `Store::ownership_epoch` the index was loaded under.
    ownership_epoch: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn accepting(&self) -> Result<()> {
        if self.accepting.load(Relaxed) { Ok(()) } else { Err(Error::ShuttingDown) }
    }

    fn wake_if_before(&self, due: i64) {
        if due < self.planned_wake.load(Relaxed) {
            self.wake.notify_one();
        }
    }

    /// `wheel`, `heap`, `scan`, or the external trigger's name.
    pub(crate) fn trigger_name(&self) -> String {
        match &self.external {
            Some(t) => t.name().to_owned(),
            None => self.cfg.trigger.to_string(),
        }
    }

    /// Tells the relay that the outbox has new rows (no-op without an external trigger).
    fn wake_relay(&self) {
        if self.external.is_some() {
            self.relay_wake.notify_one();
        }
    }

    pub(crate) fn lease_until(&self, now: i64) -> i64 {
        now.saturating_add(self.cfg.lease.as_millis() as i64)
    }

    /// Mirrors an upsert done through the store into the index.
    fn note_upsert(&self, queue: &str, key: &str, generation: u64, due_at: i64) {
        self.wake_relay();
        let Some(ix) = &self.index else { return };
        let mut ix = ix.lock();
        if due_at <= ix.covered_until {
            ix.upsert(TimerRef { queue: queue.to_owned(), key: key.to_owned(), generation, due_at });
            // Under the index lock, where the driver publishes its planned wake-up.
            self.wake_if_before(due_at);
        } else {
            ix.remove_upto(queue, key, generation.saturating_sub(1));
        }
    }

    fn add_in_flight(&self, n: u64) {
        self.stats.in_flight.fetch_add(n, Relaxed);
        self.idle.send_modify(|c| *c += n);
    }

    fn sub_in_flight(&self, n: u64) {
        self.stats.in_flight.fetch_sub(n, Relaxed);
        self.idle.send_modify(|c| *c = c.saturating_sub(n));
    }

    /// Moves the covered range of the index forward to `now + horizon`, page by page, notifying
    /// `page_loaded` after each page.
    async fn load_horizon(&self, now: i64, page_loaded: &Notify) -> Result<()> {
        let Some(index) = &self.index else { return Ok(()) };
        let epoch = self.store.ownership_epoch();
        if self.ownership_epoch.swap(epoch, Relaxed) != epoch {
            // This node now answers for a different set of timers (a partitioned store gained or
            // lost partitions): load the window afresh from the start. What the index holds
            // stays: an entry of a partition given away costs one failed claim at worst, while
            // dropping it would lose the wake-ups of timers this node scheduled itself (those are
            // never paged in by their partition's owner, whose window already covers them) and
            // leave them to the backstop.
            let mut ix = index.lock();
            ix.covered_until = i64::MIN;
            ix.cursor = None;
            tracing::info!(epoch, "timer ownership changed; reloading the in-memory window");
        }
        let horizon = self.cfg.horizon.as_millis() as i64;
        let target = now.saturating_add(horizon);
        let mut cursor = {
            let ix = index.lock();
            // Covered far enough ahead, or at the memory cap: wait for the index to drain.
            if ix.covered_until >= now.saturating_add(horizon / 2) || ix.len() >= self.cfg.max_resident {
                return Ok(());
            }
            ix.cursor.clone()
        };
        loop {
            {
                // Publish the range before reading it, so concurrent schedules insert too.
                let mut ix = index.lock();
                ix.covered_until = ix.covered_until.max(target);
            }
            let refs = self.store.due_refs(cursor.as_ref(), target, LOAD_PAGE).await;
            self.stats.store_result(&refs);
            let refs = match refs {
                Ok(r) => r,
                Err(e) => {
                    // Un-publish: nothing past the cursor's millisecond is known to be loaded;
                    // the next load restarts at the start of that millisecond.
                    let mut ix = index.lock();
                    ix.covered_until = cursor.as_ref().map_or(i64::MIN, |c| c.0 - 1);
                    ix.cursor = cursor.map(|c| (c.0, String::new(), String::new()));
                    return Err(e);
                }
            };
            let full = refs.len() as u32 == LOAD_PAGE;
            let mut ix = index.lock();
            if let Some(last) = refs.last() {
                cursor = Some((last.due_at, last.queue.clone(), last.key.clone()));
            }
            for r in refs {
                ix.upsert(r);
            }
            self.stats.resident.store(ix.len() as u64, Relaxed);
            page_loaded.notify_one();
            if full && ix.len() >= self.cfg.max_resident {
                // Memory cap: cover only the milliseconds fully loaded; the rest is loaded as the
                // index drains, restarting at the start of the cursor's millisecond (a timer
                // written meanwhile into that millisecond is not skipped).
                ix.covered_until = cursor.as_ref().map_or(i64::MIN, |c| c.0 - 1);
                ix.cursor = cursor.map(|c| (c.0, String::new(), String::new()));
                return Ok(());
            }
            if !full {
                ix.cursor = cursor;
                return Ok(());
            }
        }
    }

    /// One wheel/heap pass: loads the window and fires what is due, the two overlapped: the due
    /// refs of each loaded page are claimed while the next page is read. (A start behind the
    /// clock, or a pause, makes the window a backlog of due timers; loading all of it before the
    /// first claim left the store idle for the claims' share of the time.) Again while the
    /// loader finds more: at the memory cap, popping is what makes room for the next pages.
    /// Returns the index's covered bound and whether the store answered.
    async fn load_and_fire(&self, now: i64) -> (i64, bool) {
        let page_loaded = Notify::new();
        let loading = AtomicBool::new(true);
        let store_ok = AtomicBool::new(true);
        loop {
            loading.store(true, Relaxed);
            let load = async {
                if let Err(e) = self.load_horizon(now, &page_loaded).await {
                    tracing::warn!(error = %e, "loading the horizon failed");
                    store_ok.store(false, Relaxed);
                }
                loading.store(false, Relaxed);
                page_loaded.notify_one();
            };
            let fire = async {
                let mut due = Vec::new();
                let (mut popped_any, mut retried) = (false, false);
                loop {
                    // Read before popping: whatever the loader adds after this read is popped
                    // in a later round (the loader notifies after every page and at its end).
                    let more_coming = loading.load(Relaxed);
                    if let Some(ix) = &self.index {
                        let mut ix = ix.lock();
                        ix.pop_due(now, &mut due);
                        self.stats.resident.store(ix.len() as u64, Relaxed);
                    }
                    let popped = !due.is_empty();
                    let waiting = !self.deferred.lock().is_empty();
                    if self.stop_claiming.is_cancelled() {
                        break;
                    }
                    if popped || (waiting && !retried) {
                        // (Deferred wake-ups alone are retried once per round.)
                        retried |= !popped;
                        popped_any |= popped;
                        self.fire_refs(std::mem::take(&mut due)).await;
                        continue;
                    }
                    if !more_coming {
                        break;
                    }
                    page_loaded.notified().await;
                }
                popped_any
            };
            let ((), popped_any) = tokio::join!(load, fire);
            if !popped_any || !store_ok.load(Relaxed) || self.stop_claiming.is_cancelled() {
                break;
            }
        }
        let covered = self.index.as_ref().map_or(i64::MIN, |ix| ix.lock().covered_until);
        (covered, store_ok.load(Relaxed))
    }

    /// Takes `n` in-flight permits, or returns false once shutdown has begun (what is not
    /// claimed stays in the store and fires on the next start or on another node).
    pub(crate) async fn take_permits(&self, n: usize) -> bool {
        tokio::select! {
            biased;
            _ = self.stop_claiming.cancelled() => false,
            p = self.permits.clone().acquire_many_owned(n as u32) => match p {
                Ok(p) => {
                    p.forget();
                    true
                }
                Err(_) => false,
            },
        }
    }

    fn rt_for(&self, queue: &str) -> Option<&Arc<QueueRt>> {
        self.queues.get(queue).or(self.fallback.as_ref())
    }

    /// Claims and dispatches due references (and those deferred earlier), in due order, as
    /// permits and each queue's claim cap allow; the rest wait in `deferred`.
    async fn fire_refs(&self, new: Vec<TimerRef>) {
        // A queue's earlier deferred wake-ups go first, then its new ones, as long as it has
        // room; the overflow joins the back of its line. A queue with room and no line costs
        // nothing extra; work per pass is proportional to what moves.
        let mut refs = Vec::with_capacity(new.len());
        {
            let mut deferred = self.deferred.lock();
            let max_in_flight = self.cfg.max_in_flight;
            // Room left per queue in this pass, keyed by the queue's runtime (no allocation).
            let mut room: Vec<(*const QueueRt, usize)> = Vec::new();
            for (queue, line) in deferred.iter_mut() {
                let Some(rt) = self.rt_for(queue) else { continue };
                let i = room_slot(&mut room, rt, self.claim_batch, max_in_flight);
                let n = room[i].1.min(line.len());
                room[i].1 -= n;
                refs.extend(line.drain(..n));
            }
            for t in new {
                let Some(rt) = self.rt_for(&t.queue) else {
                    refs.push(t); // no handler at all: fails at dispatch, visibly
                    continue;
                };
                let i = room_slot(&mut room, rt, self.claim_batch, max_in_flight);
                let waiting = deferred.get(&t.queue).is_some_and(|line| !line.is_empty());
                if waiting || room[i].1 == 0 {
                    deferred.entry(t.queue.clone()).or_default().push_back(t);
                } else {
                    room[i].1 -= 1;
                    refs.push(t);
                }
            }
            deferred.retain(|_, line| !line.is_empty());
            self.stats.deferred.store(deferred.values().map(|l| l.len() as u64).sum(), Relaxed);
        }
        refs.sort_by_key(|t| t.due_at);
        // Up to CLAIM_PIPELINE chunks are claimed at once (a shared database serves them on
        // several connections; a burst of due timers is claim-bound), dispatched in due order.
        // (The futures are made before they are streamed: a closure inside the stream type trips
        // the compiler's higher-ranked lifetime inference in the spawned driver.)
        let mut calls = Vec::with_capacity(refs.len() / self.claim_batch.max(1) + 1);
        for chunk in refs.chunks(self.claim_batch.max(1)) {
            calls.push(self.claim_chunk(chunk));
        }
        let claims = futures::stream::iter(calls).buffered(CLAIM_PIPELINE);
        futures::pin_mut!(claims);
        while let Some(done) = claims.next().await {
            let Some((n, claimed, lease_until)) = done else { continue };
            let dropped = n - claimed.len();
            self.stats.stale_dropped.fetch_add(dropped as u64, Relaxed);
            self.permits.add_permits(dropped);
            self.dispatch(claimed, lease_until);
        }
    }

    /// Takes permits for one chunk of due references and claims it, retrying transient store
    /// failures with backoff. `None` when the engine stops claiming or the failure is permanent
    /// (permits given back). Returns the
    /// chunk size, the claims and their lease end.
    async fn claim_chunk(&self, chunk: &[TimerRef]) -> Option<(usize, Vec<Claimed>, i64)> {
        let n = chunk.len();
        if !self.take_permits(n).await {
            return None;
        }
        let mut now = self.clock.now_ms();
        let mut backoff = Duration::from_millis(100);
        loop {
            let res = self.store.claim(chunk, &self.node_id, now, self.lease_until(now)).await;
            self.stats.store_result(&res);
            match res {
                Ok(c) => return Some((n, c, self.lease_until(now))),
                Err(e) => {
                    if !e.is_transient() {
                        // Retrying cannot help and would stall the driver: give these wake-ups
                        // up (the backstop fires the timers once they are overdue).
                        tracing::error!(error = %e, n, "claim failed permanently; leaving these timers to the backstop");
                        self.permits.add_permits(n);
                        return None;
                    }
                    tracing::warn!(error = %e, "claim failed; retrying");
                    if self.stop_claiming.is_cancelled() {
                        self.permits.add_permits(n);
                        return None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_STORE_BACKOFF);
                    // A fresh lease for the next attempt, measured from when it is made.
                    now = self.clock.now_ms();
                }
            }
        }
    }

    /// The backstop sweep: claims and fires every unclaimed timer due at or before `bound`
    /// (which no trigger fired), counting each one as a rescue.
    async fn backstop(&self, bound: i64) -> Result<()> {
        loop {
            let (n, more) = self.claim_due(bound).await?;
            if n > 0 {
                self.stats.backstop_rescued.fetch_add(n as u64, Relaxed);
                metrics::counter!("overdue_backstop_rescued_total").increment(n as u64);
                tracing::warn!(n, "backstop sweep fired timers no trigger fired");
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Claims due timers straight from the store (scan trigger and backstop sweep). Returns how
    /// many were claimed; `full` tells whether another round may find more.
    async fn claim_due(&self, due_before: i64) -> Result<(usize, bool)> {
        // As many as there are permits for (waiting only when there are none): waiting for a
        // whole batch of permits while handlers hold them could stall the driver indefinitely.
        let n = self.claim_batch.min(self.permits.available_permits()).max(1);
        if !self.take_permits(n).await {
            return Ok((0, false));
        }
        let now = self.clock.now_ms();
        let res = self.store.claim_due(now, due_before.min(now), n as u32, &self.node_id, self.lease_until(now)).await;
        self.stats.store_result(&res);
        let claimed = match res {
            Ok(c) => c,
            Err(e) => {
                self.permits.add_permits(n);
                return Err(e);
            }
        };
        let got = claimed.len();
        self.permits.add_permits(n - got);
        self.dispatch(claimed, self.lease_until(now));
        Ok((got, got == n))
    }

    pub(crate) fn dispatch(&self, claimed: Vec<Claimed>, lease_until: i64) {
        if claimed.is_empty() {
            return;
        }
        self.add_in_flight(claimed.len() as u64);
        for c in claimed {
            match self.rt_for(&c.timer.queue) {
                Some(rt) => {
                    rt.in_flight.fetch_add(1, Relaxed);
                    if let Err(mpsc::error::SendError((c, _))) = rt.tx.send((c, lease_until)) {
                        // The worker is gone (shutdown): release so the timer fires again.
                        let _ = self.settle_tx.send(SettlerMsg::Settle(Settlement::Release(c.timer)));
                    }
                }
                None => {
                    // No handler here: a failed attempt, visible and eventually dead-lettered.
                    let now = self.clock.now_ms();
                    self.stats.record_fire(&c.timer.queue, now - c.timer.due_at);
                    let error = format!("no handler registered for queue {:?}", c.timer.queue);
                    let s = self.settlement_for(c.timer, c.attempts, Outcome::Fail(error), &self.default_queue, now);
                    let _ = self.settle_tx.send(SettlerMsg::Settle(s));
                }
            }
        }
    }

    fn settlement_for(&self, timer: TimerRef, attempts: u32, outcome: Outcome, cfg: &QueueConfig, now: i64) -> Settlement {
        let (error, delay) = match outcome {
            Outcome::Done => return Settlement::Done(timer),
            Outcome::Retry { after, error } => (error, Some(after)),
            Outcome::Fail(error) => (error, None),
        };
        let failures = attempts.saturating_add(1);
        if failures >= cfg.max_attempts {
            return Settlement::DeadLetter { timer, attempts: failures, error, failed_at: now };
        }
        let delay = delay.unwrap_or_else(|| cfg.backoff(failures, rand::random::<f64>()));
        let due_at = now.saturating_add(delay.as_millis().min(i64::MAX as u128) as i64);
        Settlement::Retry { timer, due_at, attempts: failures, error }
    }
}

/// Index of `rt`'s entry in `room` (claims it may still take in this pass), adding it on first use.
fn room_slot(room: &mut Vec<(*const QueueRt, usize)>, rt: &Arc<QueueRt>, claim_batch: usize, max_in_flight: usize) -> usize {
    let key = Arc::as_ptr(rt);
    if let Some(i) = room.iter().position(|(k, _)| *k == key) {
        return i;
    }
    let left = rt.claim_cap(claim_batch, max_in_flight).saturating_sub(rt.in_flight.load(Relaxed));
    room.push((key, left));
    room.len() - 1
}

/// Runs the handlers of one queue, in claim order, at most `concurrency` at a time.
async fn queue_worker(shared: Arc<Shared>, rt: Arc<QueueRt>, mut rx: mpsc::UnboundedReceiver<(Claimed, i64)>) {
    let sem = Arc::new(Semaphore::new(rt.cfg.concurrency));
    let mut tasks = JoinSet::new();
    loop {
        let (claimed, lease_until) = tokio::select! {
            biased;
            _ = shared.abort_handlers.cancelled() => break,
            c = rx.recv() => match c { Some(c) => c, None => break },
        };
        let permit = tokio::select! {
            biased;
            _ = shared.abort_handlers.cancelled() => {
                let _ = shared.settle_tx.send(SettlerMsg::Settle(Settlement::Release(claimed.timer)));
                break;
            }
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        tasks.spawn(run_one(shared.clone(), rt.clone(), claimed, lease_until, permit));
        while tasks.try_join_next().is_some() {}
    }
    // Shutting down: whatever is still queued is released for re-delivery.
    rx.close();
    while let Some((c, _)) = rx.recv().await {
        let _ = shared.settle_tx.send(SettlerMsg::Settle(Settlement::Release(c.timer)));
    }
    while tasks.join_next().await.is_some() {}
}

async fn run_one(shared: Arc<Shared>, rt: Arc<QueueRt>, c: Claimed, lease_until: i64, permit: tokio::sync::OwnedSemaphorePermit) {
    let Some(handler) = rt.handler.clone() else { return };
    let now = shared.clock.now_ms();
    // A claim that waited in this queue so long that the handler could outlive its lease is
    // given back instead of run: after the lease another node (or the backstop) may claim the
    // timer, and two runs must not overlap. It is claimed afresh and runs with a full lease.
    if now.saturating_add(rt.cfg.timeout.as_millis() as i64) > lease_until {
        drop(permit);
        shared.stats.lease_releases.fetch_add(1, Relaxed);
        tracing::warn!(queue = %rt.name, key = %c.timer.key, "claim waited too long in its queue; released for a fresh claim");
        let _ = shared.settle_tx.send(SettlerMsg::Settle(Settlement::Release(c.timer)));
        return;
    }
    shared.stats.record_fire(&c.timer.queue, now - c.timer.due_at);
    let firing = Firing {
        queue: c.timer.queue.clone(),
        key: c.timer.key.clone(),
        generation: c.timer.generation,
        due_at: c.timer.due_at,
        payload: c.payload,
        attempt: c.attempts + 1,
        fired_at: now,
    };
    // The call itself runs inside catch_unwind too: a handler may panic before its first await.
    let call = async move { handler.call(firing).await };
    let run = tokio::time::timeout(rt.cfg.timeout, AssertUnwindSafe(call).catch_unwind());
    let outcome = tokio::select! {
        biased;
        _ = shared.abort_handlers.cancelled() => None,
        r = run => Some(match r {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(panic)) => Outcome::Fail(format!("handler panicked: {}", panic_message(&panic))),
            Err(_) => Outcome::Fail(format!("handler timed out after {:?}", rt.cfg.timeout)),
        }),
    };
    drop(permit);
    let settlement = match outcome {
        None => Settlement::Release(c.timer),
        Some(o) => {
            if !matches!(o, Outcome::Done) {
                tracing::debug!(queue = %rt.name, key = %c.timer.key, outcome = ?o, "handler did not finish");
            }
            shared.settlement_for(c.timer, c.attempts, o, &rt.cfg, shared.clock.now_ms())
        }
    };
    let _ = shared.settle_tx.send(SettlerMsg::Settle(settlement));
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Writes outcomes back in batches, then frees their permits.
async fn settler(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<SettlerMsg>) {
    let mut batch: Vec<Settlement> = Vec::new();
    let mut stop: Option<oneshot::Sender<()>> = None;
    while stop.is_none() {
        match rx.recv().await {
            Some(SettlerMsg::Settle(s)) => batch.push(s),
            Some(SettlerMsg::Stop(tx)) => stop = Some(tx),
            None => break,
        }
        while batch.len() < SETTLE_BATCH {
            match rx.try_recv() {
                Ok(SettlerMsg::Settle(s)) => batch.push(s),
                Ok(SettlerMsg::Stop(tx)) => {
                    stop = Some(tx);
                    break;
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut backoff = Duration::from_millis(50);
        let mut written = false;
        loop {
            let res = shared.store.settle(batch.clone(), shared.clock.now_ms()).await;
            shared.stats.store_result(&res);
            match res {
                Ok(()) => {
                    written = true;
                    break;
                }
                Err(e) => {
                    // Leases keep the timers safe meanwhile; retry until the store is back, unless
                    // we are stopping, in which case the leases expire and another run fires them.
                    tracing::warn!(error = %e, n = batch.len(), "settle failed; retrying");
                    // Stopping: give up after a few seconds of failures; the claims expire and
                    // the timers fire again on the next start.
                    if stop.is_some() || (shared.stop_claiming.is_cancelled() && backoff >= MAX_STORE_BACKOFF) {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_STORE_BACKOFF);
                }
            }
        }
        let n = batch.len();
        for s in &batch {
            // Everything but a release is final for this delivery (a retry is published anew
            // from the outbox): the external trigger may acknowledge it.
            shared.waiters.settled(s.timer(), written && !matches!(s, Settlement::Release(_)));
        }
        for s in batch.drain(..) {
            if let Some(rt) = shared.rt_for(&s.timer().queue) {
                let _ = rt.in_flight.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(1)));
            }
            account(&shared, s);
        }
        shared.permits.add_permits(n);
        shared.sub_in_flight(n as u64);
        if !shared.deferred.lock().is_empty() {
            // A queue at its cap has room again: let the driver claim what waits.
            shared.wake.notify_one();
        }
    }
    if let Some(tx) = stop {
        let _ = tx.send(());
    }
}

fn account(shared: &Shared, s: Settlement) {
    let st = &shared.stats;
    match s {
        Settlement::Done(t) => {
            st.completed.fetch_add(1, Relaxed);
            metrics::counter!("overdue_timers_completed_total", "queue" => queue_label(&t.queue)).increment(1);
        }
        Settlement::Retry { timer, due_at, .. } => {
            st.retried.fetch_add(1, Relaxed);
            st.handler_failures.fetch_add(1, Relaxed);
            metrics::counter!("overdue_handler_failures_total", "queue" => queue_label(&timer.queue)).increment(1);
            shared.note_upsert(&timer.queue, &timer.key, timer.generation, due_at);
        }
        Settlement::DeadLetter { timer, .. } => {
            st.dead_lettered.fetch_add(1, Relaxed);
            st.handler_failures.fetch_add(1, Relaxed);
            metrics::counter!("overdue_handler_failures_total", "queue" => queue_label(&timer.queue)).increment(1);
            metrics::counter!("overdue_dead_letters_total", "queue" => queue_label(&timer.queue)).increment(1);
        }
        Settlement::Release(t) => {
            shared.note_upsert(&t.queue, &t.key, t.generation, t.due_at);
        }
    }
}

/// The trigger loop.
async fn driver(shared: Arc<Shared>, mut pass_rx: mpsc::Receiver<oneshot::Sender<()>>) {
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut next_backstop = shared.clock.now_ms();
    let mut next_scan = i64::MIN;
    let mut store_backoff = Duration::from_millis(50);
    loop {
        if shared.stop_claiming.is_cancelled() {
            break;
        }
        let now = shared.clock.now_ms();
        let forced = !waiters.is_empty();
        let mut store_ok = true;
        let trigger = if shared.external.is_some() { None } else { Some(shared.cfg.trigger) };
        match trigger {
            None => {
                // External trigger: the broker wakes us; this loop is only the backstop sweep,
                // for what the broker lost or delivered too late.
                if forced || now >= next_backstop {
                    let bound = now.saturating_sub(shared.cfg.backstop_slack.as_millis() as i64);
                    if let Err(e) = shared.backstop(bound).await {
                        tracing::warn!(error = %e, "backstop sweep failed");
                        store_ok = false;
                    }
                    next_backstop = now.saturating_add(shared.cfg.backstop_interval.as_millis() as i64);
                }
            }
            Some(TriggerKind::Scan) => {
                if forced || now >= next_scan {
                    loop {
                        match shared.claim_due(now).await {
                            Ok((_, true)) => continue,
                            Ok((_, false)) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "scan failed");
                                store_ok = false;
                                break;
                            }
                        }
                    }
                    next_scan = now.saturating_add(shared.cfg.scan_interval.as_millis() as i64);
                }
            }
            Some(TriggerKind::Wheel | TriggerKind::Heap) => {
                let (covered, ok) = shared.load_and_fire(now).await;
                store_ok &= ok;
                if now >= next_backstop {
                    // Only what the index should have held counts as missed: due within the
                    // covered range, overdue by more than the slack, and earlier than anything
                    // deferred (those wait for their queue's claim cap, not for a rescue).
                    let slack = shared.cfg.backstop_slack.as_millis() as i64;
                    let before_deferred = shared
                        .deferred
                        .lock()
                        .values()
                        .filter_map(|line| line.front().map(|t| t.due_at))
                        .min()
                        .map_or(i64::MAX, |d| d.saturating_sub(1));
                    let bound = now.saturating_sub(slack).min(covered).min(before_deferred);
                    if let Err(e) = shared.backstop(bound).await {
                        tracing::warn!(error = %e, "backstop sweep failed");
                        store_ok = false;
                    }
                    next_backstop = now.saturating_add(shared.cfg.backstop_interval.as_millis() as i64);
                }
            }
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        let retry_at = if store_ok {
            store_backoff = Duration::from_millis(50);
            i64::MAX
        } else {
            // The store is failing: do not spin; try again after a growing pause.
            let at = shared.clock.now_ms().saturating_add(store_backoff.as_millis() as i64);
            store_backoff = (store_backoff * 2).min(MAX_STORE_BACKOFF);
            at
        };
        let next = match (&shared.index, trigger) {
            (None, None) => next_backstop.min(retry_at),
            (Some(ix), Some(TriggerKind::Wheel | TriggerKind::Heap)) => {
                let ix = ix.lock();
                let half = shared.cfg.horizon.as_millis() as i64 / 2;
                let refill = if ix.len() >= shared.cfg.max_resident {
                    i64::MAX // at the cap: popping due timers is what makes room
                } else {
                    ix.covered_until.saturating_sub(half)
                };
                let next = ix.next_due().unwrap_or(i64::MAX).min(refill).min(next_backstop).min(retry_at);
                // Published under the index lock: a schedule inserting an earlier wake-up checks
                // `planned_wake` under the same lock, so it either sees this value and notifies,
                // or was already in the index when `next_due` was read.
                shared.planned_wake.store(next, Relaxed);
                next
            }
            _ => next_scan.min(retry_at),
        };
        tokio::select! {
            _ = shared.stop_claiming.cancelled() => break,
            _ = shared.clock.sleep_until(next) => {}
            _ = shared.wake.notified() => {}
            w = pass_rx.recv() => match w {
                Some(w) => waiters.push(w),
                // The engine handle is gone.
                None => break,
            },
        }
    }
    for w in waiters {
        let _ = w.send(());
    }
}

fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    format!("{host}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}
