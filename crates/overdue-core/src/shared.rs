//! What the stores that several nodes share (PostgreSQL, MySQL, Redis) have in common, without a
//! driver: the partition of a timer identity, the node URL parameters, node names, and password
//! redaction. Each store keeps its own SQL (or Lua) for the partition leases; see
//! `docs/sql-backends.md` for the protocol.

use std::time::Duration;

use crate::error::{Error, Result};

/// Number of partitions the shared stores split timers into. Fixed at database creation
/// (recorded by each store); 64 lets up to 64 nodes share the work.
pub const PARTITIONS: i32 = 64;

/// The partition of a timer identity: FNV-1a (64-bit) over the queue, a 0xff separator (a byte
/// no UTF-8 text contains) and the key, modulo [`PARTITIONS`]. Stable across versions and
/// platforms: the stores write it into each row, so it must never change.
pub fn partition_of(queue: &str, key: &str) -> i32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in queue.as_bytes().iter().chain(std::iter::once(&0xff)).chain(key.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    (h % PARTITIONS as u64) as i32
}

/// Default most connections per node.
pub const DEFAULT_POOL: u32 = 16;
/// Default partition lease.
pub const DEFAULT_PARTITION_LEASE: Duration = Duration::from_secs(10);
/// Shortest partition lease accepted (heartbeats every third of it).
pub const MIN_PARTITION_LEASE: Duration = Duration::from_millis(300);
/// Longest partition lease accepted.
pub const MAX_PARTITION_LEASE: Duration = Duration::from_secs(3600);

/// A boolean URL parameter (`true|1|on`, `false|0|off`), e.g. the SQL stores' `outbox=`; a
/// bad value is an [`Error::Config`] naming `scheme`.
pub fn url_flag(scheme: &str, key: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "on" => Ok(true),
        "false" | "0" | "off" => Ok(false),
        _ => Err(Error::Config(format!("invalid {scheme} url: {key}={value:?} must be true or false"))),
    }
}

/// The URL parameters every shared store takes: `pool`, `node`, `partition_lease_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeOptions {
    /// Most connections this node opens.
    pub pool: u32,
    /// Name in partition leases; `None` picks a unique one ([`random_node_name`]). A node
    /// restarted under the same name takes its partitions back at once.
    pub node: Option<String>,
    /// How long a partition lease lasts without renewal.
    pub partition_lease: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions { pool: DEFAULT_POOL, node: None, partition_lease: DEFAULT_PARTITION_LEASE }
    }
}

impl NodeOptions {
    /// Takes one `key=value` URL parameter if it is one of these. Returns `Ok(false)` for a
    /// parameter that is not, and an [`Error::Config`] naming `scheme` for a bad value.
    pub fn take(&mut self, scheme: &str, key: &str, value: &str) -> Result<bool> {
        let bad = |m: String| Error::Config(format!("invalid {scheme} url: {m}"));
        match key {
            "pool" => {
                self.pool = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| bad(format!("pool={value:?} must be a whole number from 1 to 1000")))?;
            }
            "node" => {
                if value.is_empty() || value.len() > 200 || value.chars().any(char::is_control) {
                    return Err(bad(format!("node={value:?} must be 1-200 printable characters")));
                }
                self.node = Some(value.to_owned());
            }
            "partition_lease_ms" => {
                let (min, max) = (MIN_PARTITION_LEASE.as_millis() as u64, MAX_PARTITION_LEASE.as_millis() as u64);
                let ms: u64 = value.parse().ok().filter(|ms| (min..=max).contains(ms)).ok_or_else(|| {
                    bad(format!("partition_lease_ms={value:?} must be a whole number from {min} to {max}"))
                })?;
                self.partition_lease = Duration::from_millis(ms);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// This node's name: the configured one, or a fresh [`random_node_name`].
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(random_node_name)
    }
}

/// A name unlikely to collide: `<hostname>-<pid>-<24 random bits>`.
pub fn random_node_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("{host}-{}-{:06x}", std::process::id(), h.finish() & 0xff_ffff)
}

/// The URL without its password, for messages: `scheme://user:***@host/…`.
pub fn redact(url: &str) -> String {
    let end = url.find('?').unwrap_or(url.len());
    match (url.find("://"), url[..end].rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// A node's share of the partitions, as the store last agreed it with the database: the
/// driver-free half of the partition protocol (each store runs its own SQL for the other half
/// and [`PartitionState::publish`]es the result).
#[derive(Debug)]
pub struct PartitionState {
    /// This node's name in partition leases.
    pub node: String,
    /// How long a partition lease (and a node's heartbeat) lasts.
    pub lease: Duration,
    /// Sorted partition numbers this node owns.
    owned: std::sync::RwLock<std::sync::Arc<Vec<i32>>>,
    epoch: std::sync::atomic::AtomicU64,
    live_nodes: std::sync::atomic::AtomicU64,
}

impl PartitionState {
    /// No partitions yet, epoch 0.
    pub fn new(node: String, lease: Duration) -> Self {
        PartitionState {
            node,
            lease,
            owned: std::sync::RwLock::new(std::sync::Arc::new(Vec::new())),
            epoch: std::sync::atomic::AtomicU64::new(0),
            live_nodes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Period between heartbeats: a third of the lease, so two can fail before it lapses.
    pub fn heartbeat(&self) -> Duration {
        self.lease / 3
    }

    /// The partitions owned, sorted.
    pub fn owned(&self) -> std::sync::Arc<Vec<i32>> {
        self.owned.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Changes whenever the owned set changes (`Store::ownership_epoch`).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Live nodes counted at the last heartbeat.
    pub fn live_nodes(&self) -> u64 {
        self.live_nodes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the live nodes just counted (at least 1: this one) and returns this node's share,
    /// `ceil(PARTITIONS / live)`.
    pub fn share_of(&self, live: i64) -> i64 {
        let live = live.max(1);
        self.live_nodes.store(live as u64, std::sync::atomic::Ordering::Relaxed);
        (i64::from(PARTITIONS) + live - 1) / live
    }

    /// Sets the owned set (sorted here), bumping the epoch if it changed. Returns the set and
    /// whether it changed.
    pub fn publish(&self, mut owned: Vec<i32>) -> (std::sync::Arc<Vec<i32>>, bool) {
        owned.sort_unstable();
        let mut cur = self.owned.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = **cur != owned;
        if changed {
            *cur = std::sync::Arc::new(owned);
            self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        (cur.clone(), changed)
    }
}

/// Runs `round` every `period` (after a first wait) for as long as `owner` lives: the
/// partition heartbeat of a shared store. The task holds only a `Weak`, so dropping the store
/// ends it; the store keeps the handle to abort it on close. Needs a tokio runtime.
pub fn spawn_heartbeat<T: Send + Sync + 'static>(
    period: Duration,
    owner: std::sync::Weak<T>,
    round: fn(std::sync::Arc<T>) -> futures::future::BoxFuture<'static, ()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(owner) = owner.upgrade() else { return };
            round(owner).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_pinned_in_range_and_even() {
        // Pinned: stores write the partition into rows, so the hash must never change.
        assert_eq!(partition_of("order.close", "o-1"), 53);
        assert_eq!(partition_of("order.remind", "o-1"), 14);
        assert_eq!(partition_of("q", "a"), 40);
        assert_eq!(partition_of("q", ""), 25);
        let mut seen = [0u32; PARTITIONS as usize];
        for i in 0..64_000 {
            let p = partition_of("order.close", &format!("o-{i}"));
            assert!((0..PARTITIONS).contains(&p), "partition {p} out of range");
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..=1200).contains(&n)), "uneven partitions: {seen:?}");
        // The separator keeps ("qx", "k") and ("q", "xk") apart most of the time.
        let apart = (0..200).filter(|i| partition_of(&format!("q{i}"), "xk") != partition_of(&format!("q{i}x"), "k"));
        assert!(apart.count() > 150);
    }

    #[test]
    fn node_options_take_their_parameters_and_refuse_bad_values() {
        let mut o = NodeOptions::default();
        assert!(o.take("postgres", "pool", "4").expect("pool"));
        assert!(o.take("postgres", "node", "n1").expect("node"));
        assert!(o.take("postgres", "partition_lease_ms", "2000").expect("lease"));
        assert!(!o.take("postgres", "sslmode", "disable").expect("not ours"));
        assert_eq!(o, NodeOptions { pool: 4, node: Some("n1".into()), partition_lease: Duration::from_secs(2) });
        for (k, v) in [("pool", "0"), ("pool", "x"), ("node", ""), ("node", "a\nb"), ("partition_lease_ms", "10")] {
            let e = o.take("mysql", k, v).expect_err(k).to_string();
            assert!(e.contains("invalid mysql url") && e.contains(k), "{k}={v}: {e}");
        }
        assert_ne!(random_node_name(), random_node_name());
    }

    #[test]
    fn partition_state_bumps_its_epoch_only_on_change() {
        let st = PartitionState::new("n".into(), Duration::from_secs(3));
        assert_eq!((st.epoch(), st.heartbeat(), st.share_of(0), st.live_nodes()), (0, Duration::from_secs(1), 64, 1));
        assert_eq!(st.share_of(3), 22);
        let (set, changed) = st.publish(vec![5, 1, 3]);
        assert_eq!((set.as_slice(), changed, st.epoch()), (&[1, 3, 5][..], true, 1));
        assert!(!st.publish(vec![3, 5, 1]).1, "the same set in another order is no change");
        assert_eq!(st.epoch(), 1);
        assert!(st.publish(Vec::new()).1);
        assert_eq!((st.epoch(), st.owned().len()), (2, 0));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(redact("postgres://h/db?x=a@b"), "postgres://h/db?x=a@b");
    }
}
