//! Key names: Redisson's, exactly as `RedissonDelayedQueue` derives them, and overdue's side keys
//! under the same hash tag.

/// Redisson's `RedissonObject.prefixName`: `prefix:{name}`, or `prefix:name` when the name
/// already carries a `{` (then the name's own hash tag decides the slot).
pub fn prefix_name(prefix: &str, name: &str) -> String {
    if name.contains('{') { format!("{prefix}:{name}") } else { format!("{prefix}:{{{name}}}") }
}

/// The store-wide side keys of one prefix (overdue's bookkeeping; Redisson never reads them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalKeys {
    /// STRING: the generation counter.
    pub generation: String,
    /// SET: every overdue queue the store knows (those in the URL and those scheduled into).
    pub queues: String,
    /// STRING: the dead-letter id counter.
    pub dead_id: String,
    /// HASH: dead-letter id → overdue queue.
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

    /// The four keys in the order every script expects them.
    pub fn all(&self) -> [&str; 4] {
        [&self.generation, &self.queues, &self.dead_id, &self.dead_index]
    }
}

/// The keys of one queue whose Redisson name is `name`: the four Redisson uses, then overdue's
/// seven side keys. All share Redisson's hash tag `{name}`, so they live in one cluster slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueKeys {
    /// ZSET `redisson_delay_queue_timeout:{name}`: member = packed value, score = due ms. The
    /// pending items (Redisson's and overdue's alike).
    pub timeout: String,
    /// LIST `redisson_delay_queue:{name}`: the same packed members in offer order (Redisson's
    /// `size()`, `poll()`, `readAll()` and its transfer's `LREM` use it).
    pub ordered: String,
    /// LIST `name`: the destination, where `RBlockingQueue.take()` finds due values.
    pub destination: String,
    /// Pub/sub channel `redisson_delay_queue_channel:{name}`: the due time of a new head.
    pub channel: String,
    /// HASH `P:t:{name}`: timer key → record `<gen>,<attempts>,<created>,<updated - created>,<member>`.
    pub timers: String,
    /// HASH `P:m:{name}`: packed member → timer key (the members overdue knows).
    pub members: String,
    /// ZSET `P:fly:{name}`: timer key → due ms, the claimed timers (their members are out of
    /// `timeout` and `ordered` while claimed).
    pub fly: String,
    /// ZSET `P:lease:{name}`: timer key → lease_until ms.
    pub lease: String,
    /// HASH `P:owner:{name}`: timer key → node holding the lease.
    pub owner: String,
    /// HASH `P:err:{name}`: timer key → last handler error.
    pub error: String,
    /// ZSET `P:dead:{name}`: dead letters, score = id.
    pub dead: String,
}

impl QueueKeys {
    /// Number of keys per queue in a script's `KEYS`.
    pub const WIDTH: usize = 11;

    /// The keys of the queue whose Redisson name is `name`, side keys under `prefix`.
    pub fn new(prefix: &str, name: &str) -> QueueKeys {
        QueueKeys {
            timeout: prefix_name("redisson_delay_queue_timeout", name),
            ordered: prefix_name("redisson_delay_queue", name),
            destination: name.to_owned(),
            channel: prefix_name("redisson_delay_queue_channel", name),
            timers: prefix_name(&format!("{prefix}:t"), name),
            members: prefix_name(&format!("{prefix}:m"), name),
            fly: prefix_name(&format!("{prefix}:fly"), name),
            lease: prefix_name(&format!("{prefix}:lease"), name),
            owner: prefix_name(&format!("{prefix}:owner"), name),
            error: prefix_name(&format!("{prefix}:err"), name),
            dead: prefix_name(&format!("{prefix}:dead"), name),
        }
    }

    /// The eleven keys in the order the scripts expect them.
    pub fn all(&self) -> [&str; QueueKeys::WIDTH] {
        [
            &self.timeout,
            &self.ordered,
            &self.destination,
            &self.channel,
            &self.timers,
            &self.members,
            &self.fly,
            &self.lease,
            &self.owner,
            &self.error,
            &self.dead,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_redissons_prefix_name() {
        assert_eq!(prefix_name("redisson_delay_queue_timeout", "order.close"), "redisson_delay_queue_timeout:{order.close}");
        assert_eq!(prefix_name("redisson_delay_queue", "a{b}"), "redisson_delay_queue:a{b}");
        let k = QueueKeys::new("overdue", "order.close");
        assert_eq!(k.destination, "order.close");
        assert_eq!(k.channel, "redisson_delay_queue_channel:{order.close}");
        assert_eq!(k.timers, "overdue:t:{order.close}");
        assert_eq!(k.dead, "overdue:dead:{order.close}");
    }
}
