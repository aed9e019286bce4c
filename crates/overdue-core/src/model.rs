//! The timer model shared by every backend.
//!
//! A timer is identified by `(queue, key)`. Scheduling an existing identity replaces it (an
//! upsert) and gives it a new, larger *generation*; generations are drawn from one store-wide
//! counter, so a timer that is cancelled and scheduled again never reuses an old generation.
//! Every firing carries the generation it was claimed at, and a backend only hands a firing to a
//! handler if that generation is still the stored one: this is how cancel and reschedule win
//! against a wake-up that is already on its way.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a caller asks for: run `queue`'s handler for `key` at `due_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerSpec {
    /// Handler queue, e.g. `order.close`.
    pub queue: String,
    /// Identity inside the queue, e.g. an order id.
    pub key: String,
    /// Milliseconds since the Unix epoch (UTC). A past value fires at once.
    pub due_at: i64,
    /// Opaque bytes handed to the handler.
    #[serde(default)]
    pub payload: Vec<u8>,
}

impl TimerSpec {
    /// A timer with an empty payload.
    pub fn new(queue: impl Into<String>, key: impl Into<String>, due_at: i64) -> Self {
        TimerSpec { queue: queue.into(), key: key.into(), due_at, payload: Vec::new() }
    }

    /// Sets the payload.
    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }
}

/// A pointer to one generation of one timer, without its payload: what in-memory triggers keep.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimerRef {
    pub queue: String,
    pub key: String,
    pub generation: u64,
    pub due_at: i64,
}

/// Where a stored timer is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TimerState {
    /// Waiting for its due time (or for a retry).
    Pending,
    /// Claimed by `owner` until `lease_until` (ms); after that another node may fire it.
    InFlight { owner: String, lease_until: i64 },
}

/// A stored timer, as `get` and `list` return it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub queue: String,
    pub key: String,
    pub due_at: i64,
    pub payload: Vec<u8>,
    pub generation: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    pub last_error: Option<String>,
    pub state: TimerState,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A timer that a node has claimed and may now run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub timer: TimerRef,
    pub payload: Vec<u8>,
    /// Failed attempts before this one.
    pub attempts: u32,
}

/// What a handler receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firing {
    pub queue: String,
    pub key: String,
    pub generation: u64,
    pub due_at: i64,
    pub payload: Vec<u8>,
    /// 1 for the first delivery, 2 for the first retry, ...
    pub attempt: u32,
    /// Clock time (ms) when the engine handed the timer to the handler.
    pub fired_at: i64,
}

impl Firing {
    /// How late this firing is, in milliseconds (never negative).
    pub fn lateness_ms(&self) -> i64 {
        (self.fired_at - self.due_at).max(0)
    }
}

/// A handler's verdict on one firing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The effect is done; the timer is removed.
    Done,
    /// Try again after exactly `after` (counts as an attempt).
    Retry { after: Duration, error: String },
    /// The attempt failed: retry with the queue's exponential backoff and jitter, or
    /// dead-letter once the queue's `max_attempts` is reached.
    Fail(String),
}

impl Outcome {
    /// `Outcome::Fail` from anything printable.
    pub fn fail(error: impl std::fmt::Display) -> Self {
        Outcome::Fail(error.to_string())
    }
}

/// What the engine writes back after a handler ran. Each variant applies only if the stored
/// generation still equals `timer.generation`; otherwise it is a no-op (the timer was
/// cancelled or replaced meanwhile, and the new generation stands).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Remove the timer.
    Done(TimerRef),
    /// Release the claim and make the timer due again at `due_at`, recording the attempt.
    Retry { timer: TimerRef, due_at: i64, attempts: u32, error: String },
    /// Move the timer to the dead-letter table.
    DeadLetter { timer: TimerRef, attempts: u32, error: String, failed_at: i64 },
    /// Release the claim without counting an attempt (shutdown): the timer fires again.
    Release(TimerRef),
}

impl Settlement {
    /// The timer this settlement is about.
    pub fn timer(&self) -> &TimerRef {
        match self {
            Settlement::Done(t) | Settlement::Release(t) => t,
            Settlement::Retry { timer, .. } | Settlement::DeadLetter { timer, .. } => timer,
        }
    }
}

/// A timer that exhausted its attempts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: i64,
    pub queue: String,
    pub key: String,
    pub generation: u64,
    pub due_at: i64,
    pub payload: Vec<u8>,
    pub attempts: u32,
    pub error: String,
    pub failed_at: i64,
}

/// Filter and page for listing timers. Results come in `(due_at, queue, key)` order; pass the
/// last row's triple as `after` to get the next page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub queue: Option<String>,
    /// Inclusive lower bound on `due_at`.
    pub due_from: Option<i64>,
    /// Inclusive upper bound on `due_at`.
    pub due_to: Option<i64>,
    /// Keyset cursor: rows strictly after this `(due_at, queue, key)`.
    pub after: Option<(i64, String, String)>,
    /// Page size; 0 means the default of 100. Capped at 10,000.
    pub limit: u32,
}

impl ListQuery {
    /// Default page size.
    pub const DEFAULT_LIMIT: u32 = 100;
    /// Largest page size.
    pub const MAX_LIMIT: u32 = 10_000;

    /// The page size after applying the default and the cap.
    pub fn effective_limit(&self) -> u32 {
        match self.limit {
            0 => Self::DEFAULT_LIMIT,
            n => n.min(Self::MAX_LIMIT),
        }
    }
}

/// Filter and page for listing dead letters, in ascending id order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetterQuery {
    pub queue: Option<String>,
    /// Rows with an id strictly greater than this (ascending order).
    pub after_id: Option<i64>,
    /// Page size; 0 means 100, capped at 10,000.
    pub limit: u32,
}

/// Unclaimed timers of one queue by how soon they come due ([`crate::Store::due_histogram`]).
/// The buckets do not overlap: `overdue` is `due_at <= now`, `next_minute` is
/// `now < due_at <= now + 1 min`, `next_hour` up to `now + 1 h`, `next_day` up to `now + 24 h`,
/// `later` the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueBuckets {
    pub queue: String,
    pub overdue: u64,
    pub next_minute: u64,
    pub next_hour: u64,
    pub next_day: u64,
    pub later: u64,
}

impl DueBuckets {
    /// Upper bounds of the buckets after `overdue`, as offsets from now in ms.
    pub const EDGES_MS: [i64; 3] = [60_000, 3_600_000, 86_400_000];

    /// Counts one timer due at `due_at`.
    pub fn add(&mut self, due_at: i64, now: i64) {
        let ahead = due_at.saturating_sub(now);
        match ahead {
            a if a <= 0 => self.overdue += 1,
            a if a <= Self::EDGES_MS[0] => self.next_minute += 1,
            a if a <= Self::EDGES_MS[1] => self.next_hour += 1,
            a if a <= Self::EDGES_MS[2] => self.next_day += 1,
            _ => self.later += 1,
        }
    }

    /// Every timer counted.
    pub fn total(&self) -> u64 {
        self.overdue + self.next_minute + self.next_hour + self.next_day + self.later
    }
}

/// [`DueBuckets`] of every queue with unclaimed timers, sorted by queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueHistogram {
    pub queues: Vec<DueBuckets>,
    /// False when the store stopped counting the next day's timers one by one at
    /// [`DueHistogram::SCAN_CAP`] (the generic implementation): the buckets then hold what was
    /// counted and `later` the remainder of each queue's pending total.
    pub exact: bool,
}

impl DueHistogram {
    /// Most timers the generic [`crate::Store::due_histogram`] reads to fill the buckets.
    pub const SCAN_CAP: usize = 100_000;
}

/// A node as a store that splits work between nodes sees it ([`crate::Store::nodes`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLease {
    /// The node's id (`Engine::node_id`), as written into its leases and claims.
    pub id: String,
    /// Partitions it holds (leases not expired).
    pub partitions: u64,
    /// When its latest partition lease ends (ms since the epoch, the database's clock); 0 when
    /// it holds none.
    pub lease_until: i64,
    /// Its last heartbeat (ms since the epoch, the database's clock).
    pub heartbeat_at: i64,
    /// It heartbeated within one partition lease: it is running and renewing.
    pub alive: bool,
    /// It is the node asking.
    pub this: bool,
}

/// Per-queue counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCount {
    pub queue: String,
    /// Stored timers not currently claimed.
    pub pending: u64,
    /// Timers claimed by a node whose lease has not expired.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
}
