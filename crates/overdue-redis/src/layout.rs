//! Key names. See the crate docs for what each key holds.

/// The store-wide keys of one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalKeys {
    /// STRING: the generation counter (`INCRBY` per batch).
    pub generation: String,
    /// SET: every queue that has ever had a timer.
    pub queues: String,
    /// STRING: the dead-letter id counter.
    pub dead_id: String,
    /// HASH: dead-letter id → queue, so `replay(id)` finds its queue.
    pub dead_index: String,
}

impl GlobalKeys {
    /// The global keys under `prefix`.
    pub fn new(prefix: &str) -> GlobalKeys {
        GlobalKeys {
            generation: format!("{prefix}:gen"),
            queues: format!("{prefix}:queues"),
            dead_id: format!("{prefix}:dlid"),
            dead_index: format!("{prefix}:dlq"),
        }
    }
}

/// The keys of one queue. They share the hash tag `{<prefix>:q:<queue>}`, so in a Redis Cluster
/// they all live in the slot `CRC16("<prefix>:q:<queue>") mod 16384`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueKeys {
    /// ZSET: member = timer key, score = due_at (ms). The pending timers (not claimed).
    pub due: String,
    /// HASH: field = timer key, value = the timer's record (generation, attempts, created,
    /// updated, payload).
    pub timers: String,
    /// ZSET: member = timer key, score = due_at (ms). The claimed timers (moved here from
    /// `due` by a claim, back by a retry or release).
    pub fly: String,
    /// ZSET: member = timer key, score = lease_until (ms). The same members as `fly`; a score
    /// `<= now` is an expired lease, claimable again.
    pub lease: String,
    /// HASH: field = timer key, value = the node holding the lease.
    pub owner: String,
    /// HASH: field = timer key, value = the last handler error (only after a failed attempt).
    pub error: String,
    /// ZSET: member = a dead letter's record, score = its id.
    pub dead: String,
}

impl QueueKeys {
    /// The keys of `queue` under `prefix`.
    pub fn new(prefix: &str, queue: &str) -> QueueKeys {
        let tag = format!("{{{prefix}:q:{queue}}}");
        QueueKeys {
            due: format!("{tag}:due"),
            timers: format!("{tag}:t"),
            fly: format!("{tag}:fly"),
            lease: format!("{tag}:lease"),
            owner: format!("{tag}:owner"),
            error: format!("{tag}:err"),
            dead: format!("{tag}:dead"),
        }
    }

    /// The seven keys in the order the scripts expect them.
    pub fn all(&self) -> [&str; 7] {
        [&self.due, &self.timers, &self.fly, &self.lease, &self.owner, &self.error, &self.dead]
    }
}
