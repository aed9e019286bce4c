//! Key names. See the crate docs for what each key holds.

/// The key layout this version reads and writes, stamped in [`GlobalKeys::layout`]. Layout 1
/// (overdue before this stamp existed) kept one lease entry per claimed timer, no due time in
/// the record and bare keys in `due`; its records cannot be read by layout 2.
pub const LAYOUT: &str = "2";

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
    /// STRING: the key layout the prefix holds ([`LAYOUT`]), written by the first `open`.
    pub layout: String,
}

impl GlobalKeys {
    /// The global keys under `prefix`.
    pub fn new(prefix: &str) -> GlobalKeys {
        GlobalKeys {
            generation: format!("{prefix}:gen"),
            queues: format!("{prefix}:queues"),
            dead_id: format!("{prefix}:dlid"),
            dead_index: format!("{prefix}:dlq"),
            layout: format!("{prefix}:layout"),
        }
    }

    /// The five keys.
    pub fn all(&self) -> [&str; 5] {
        [&self.generation, &self.queues, &self.dead_id, &self.dead_index, &self.layout]
    }
}

/// The keys of one queue. They share the hash tag `{<prefix>:q:<queue>}`, so in a Redis Cluster
/// they all live in the slot `CRC16("<prefix>:q:<queue>") mod 16384`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueKeys {
    /// ZSET: member = `<timer key>\0<generation>`, score = due_at (ms). The pending timers (not
    /// claimed); the generation in the member lets the window load skip the records.
    pub due: String,
    /// HASH: field = timer key, value = the timer's record (generation, attempts, created,
    /// updated, due, payload).
    pub timers: String,
    /// ZSET: member = timer key, score = the id of the lease (claim) holding it. The claimed
    /// timers (moved here from `due` by a claim, back by a retry or release).
    pub fly: String,
    /// ZSET: member = lease id, score = lease_until (ms). One entry per claim, however many
    /// timers it took; a score `<= now` is an expired lease, its timers claimable again.
    pub lease: String,
    /// HASH: field = lease id, value = the node holding the lease; field `0` = the last lease
    /// id issued.
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
