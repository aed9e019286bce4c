//! The [`Store`] trait: what a backend that *holds* timers must do.
//!
//! ## The claim contract
//!
//! A store is the source of truth. The engine never runs a handler for a timer it has not first
//! **claimed** through [`Store::claim`] or [`Store::claim_due`]. A claim succeeds for a timer only
//! if, atomically,
//!
//! 1. the stored generation equals the generation being claimed (a cancelled or replaced timer
//!    cannot be claimed: stale firings are dropped here),
//! 2. `due_at <= now` (nothing fires early, whatever an in-memory trigger believed), and
//! 3. no other claim holds it: the lease is empty or has expired (`lease_until <= now`).
//!
//! A claim records `(owner, lease_until)`. Afterwards the engine reports the handler's outcome with
//! [`Store::settle`], which again applies only while the generation is unchanged. A node that dies
//! holding claims simply stops settling; once `lease_until` passes, any node may claim the timer
//! again. That is the at-least-once half of the contract; idempotent handlers give the
//! exactly-once effect.
//!
//! ## Generations
//!
//! Every upsert (`schedule`, `reschedule`, `replay`) assigns a generation larger than every
//! generation the store has ever handed out, including those of cancelled timers.
//!
//! ## Adding a backend
//!
//! Implement this trait in its own crate, make `open(url)` return it, and call the conformance
//! suite in `overdue-testkit` from that crate's tests with a constructor: one line.

use std::fmt;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{
    Claimed, DeadLetter, DeadLetterQuery, DueBuckets, DueHistogram, ListQuery, NodeLease, QueueCount,
    Settlement, Timer, TimerRef, TimerSpec, TimerState,
};

/// What a store can promise; the conformance suite reads this to know what to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Short name for logs and metrics, e.g. `sqlite`.
    pub name: &'static str,
    /// Timers survive a crash of the process once `schedule` has returned.
    pub durable: bool,
    /// Several processes may use the store at once.
    pub shared: bool,
}

/// A place that holds timers. See the module docs for the claim contract.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// What this store promises.
    fn capabilities(&self) -> Capabilities;

    /// Upserts a batch atomically: all timers are stored, or none. Each gets a fresh generation,
    /// attempts reset to 0 and any claim on the old generation is dropped. Returns the
    /// generations in input order. The caller has validated the specs and removed duplicates.
    async fn schedule(&self, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>>;

    /// Removes a timer. Returns the generation removed, or `None` if there was none.
    async fn cancel(&self, queue: &str, key: &str) -> Result<Option<u64>>;

    /// Moves a timer's due time, keeping its payload; gives it a new generation and drops any
    /// claim. Returns the new generation, or `None` if there is no such timer.
    async fn reschedule(&self, queue: &str, key: &str, due_at: i64, now: i64) -> Result<Option<u64>>;

    /// One timer, if stored. `now` decides whether a lease still counts as in flight.
    async fn get(&self, queue: &str, key: &str, now: i64) -> Result<Option<Timer>>;

    /// Timers in `(due_at, queue, key)` order, filtered and paged by `query`.
    async fn list(&self, query: &ListQuery, now: i64) -> Result<Vec<Timer>>;

    /// Per-queue counts of pending, in-flight and dead timers.
    async fn counts(&self, now: i64) -> Result<Vec<QueueCount>>;

    /// Unclaimed timers per queue by how soon they come due (for dashboards). The default reads
    /// [`Store::counts`] and pages [`Store::list`] through the next day, up to
    /// [`DueHistogram::SCAN_CAP`] timers; the SQL stores override it with one grouped query.
    async fn due_histogram(&self, now: i64) -> Result<DueHistogram> {
        let mut by_queue: std::collections::BTreeMap<String, DueBuckets> = std::collections::BTreeMap::new();
        let until = now.saturating_add(DueBuckets::EDGES_MS[2]);
        let mut query = ListQuery { due_to: Some(until), limit: ListQuery::MAX_LIMIT, ..ListQuery::default() };
        let mut read = 0usize;
        let mut exact = true;
        loop {
            let page = self.list(&query, now).await?;
            let full = page.len() as u32 >= query.effective_limit();
            read += page.len();
            for t in &page {
                if t.state == TimerState::Pending {
                    by_queue.entry(t.queue.clone()).or_default().add(t.due_at, now);
                }
            }
            match page.last() {
                Some(last) if full => {
                    if read >= DueHistogram::SCAN_CAP {
                        exact = false;
                        break;
                    }
                    query.after = Some((last.due_at, last.queue.clone(), last.key.clone()));
                }
                _ => break,
            }
        }
        for c in self.counts(now).await? {
            let b = by_queue.entry(c.queue.clone()).or_default();
            // What the day's pages did not count is later (or, past the cap, not yet counted).
            b.later = c.pending.saturating_sub(b.total());
        }
        let queues = by_queue
            .into_iter()
            .filter(|(_, b)| b.total() > 0)
            .map(|(queue, b)| DueBuckets { queue, ..b })
            .collect();
        Ok(DueHistogram { queues, exact })
    }

    /// The nodes sharing this store, for stores that split the work by leases (the SQL stores'
    /// partition leases), sorted by id; empty for a store that does not know its nodes.
    async fn nodes(&self, now: i64) -> Result<Vec<NodeLease>> {
        let _ = now;
        Ok(Vec::new())
    }

    /// References (no payloads) to timers with `due_at <= until`, in `(due_at, queue, key)`
    /// order, strictly after the `after` cursor, at most `limit`. Used to page the near future
    /// into an in-memory trigger. Claimed timers may be included (the claim filters them) or
    /// left out: a claimed timer comes back through the claim_due sweep once its lease expires.
    async fn due_refs(
        &self,
        after: Option<&(i64, String, String)>,
        until: i64,
        limit: u32,
    ) -> Result<Vec<TimerRef>>;

    /// Claims the given timers (see the contract above). Returns those claimed, in input order.
    async fn claim(
        &self,
        timers: &[TimerRef],
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<Claimed>>;

    /// Finds and claims up to `limit` unclaimed timers with `due_at <= due_before` (which is at
    /// most `now`), earliest first. This is the scheduled-scan trigger and the backstop sweep.
    async fn claim_due(
        &self,
        now: i64,
        due_before: i64,
        limit: u32,
        owner: &str,
        lease_until: i64,
    ) -> Result<Vec<Claimed>>;

    /// Applies handler outcomes atomically. Each entry applies only if the stored generation is
    /// unchanged; entries about replaced or cancelled timers are skipped.
    async fn settle(&self, batch: Vec<Settlement>, now: i64) -> Result<()>;

    /// Dead letters in ascending id order.
    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>>;

    /// Moves a dead letter back into the timers (an upsert of its identity, with its payload,
    /// due at `due_at`, attempts reset). Returns the new generation, or `None` if no dead letter
    /// has that id.
    async fn replay(&self, id: i64, due_at: i64, now: i64) -> Result<Option<u64>>;

    /// Changes whenever the set of timers this node is responsible for changes (a store that
    /// splits timers between nodes by partition leases bumps it when it gains or loses a
    /// partition). The engine's in-memory index reloads its window from the store when it sees
    /// a new value, so a node that takes over a dead node's partitions loads their timers at
    /// once. Stores that do not partition return 0 forever (the default).
    fn ownership_epoch(&self) -> u64 {
        0
    }

    /// The outbox of an external trigger (see [`crate::trigger`]): notices of timers upserted
    /// since the relay last acknowledged them, oldest first, at most `limit`, each with its
    /// outbox sequence number. A store records them only when opened with its outbox on; every
    /// upsert (schedule, reschedule, replay, and a [`Settlement::Retry`]'s new due time) then
    /// adds a row in the same transaction as the timer itself.
    ///
    /// Rows whose timer has since been replaced or cancelled may be returned (they are cheap to
    /// publish: the generation fence drops them on delivery).
    async fn outbox_fetch(&self, limit: u32) -> Result<Vec<(i64, TimerRef)>> {
        let _ = limit;
        Err(crate::Error::Config(format!(
            "the {} store has no outbox: it cannot be used with an external trigger",
            self.capabilities().name
        )))
    }

    /// Removes outbox rows once their notices are published. Unknown sequence numbers are
    /// ignored (another node's relay got there first).
    async fn outbox_ack(&self, seqs: &[i64]) -> Result<()> {
        let _ = seqs;
        Err(crate::Error::Config(format!(
            "the {} store has no outbox: it cannot be used with an external trigger",
            self.capabilities().name
        )))
    }
}
