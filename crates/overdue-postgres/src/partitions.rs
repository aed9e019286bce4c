//! Partition leases: how several nodes on one database split the work of *waking up* timers.
//!
//! ## The design
//!
//! Every timer belongs to one of [`PARTITIONS`] partitions, by a stable hash of its identity
//! ([`partition_of`]), stored in its row. Each node keeps a row in `overdue_nodes` fresh (its
//! heartbeat) and holds leases on partitions in `overdue_partitions`. Every
//! [`Ownership::heartbeat`] interval a node:
//!
//! 1. renews its heartbeat and counts the live nodes (heartbeat within the lease),
//! 2. renews the leases of the partitions it owns,
//! 3. takes free or expired partitions (`FOR UPDATE SKIP LOCKED`, so two nodes never take the
//!    same one in one round) until it holds its share, `ceil(PARTITIONS / live nodes)`,
//! 4. gives back partitions above its share, so a node that joins gets work within a round.
//!
//! A node's in-memory trigger (wheel or heap) loads only the timers of the partitions it owns
//! ([`crate::PgStore`]'s `due_refs`), so memory is split too. When the set changes, the store's
//! `ownership_epoch` changes and the engine reloads its window: a node that takes over a dead
//! node's partitions loads their timers at once.
//!
//! ## Why this is safe
//!
//! Partitions only decide who *looks*. Who *runs* a timer is still decided by the row claim
//! (generation, `due_at <= now`, lease free) in one conditional `UPDATE`, so two nodes that
//! briefly both believe they own a partition (a lease that expired mid-round, a clock step)
//! cost a failed claim, never a double run. The scan trigger and the backstop sweep claim due
//! rows from *every* partition (`FOR UPDATE SKIP LOCKED`), so a partition that nobody owns for a
//! while — a node died and its lease has not yet expired — is still fired, by the backstop,
//! within its slack.
//!
//! Lease times come from the database clock, so nodes need not agree on the time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use sqlx::{PgPool, Row};

use crate::pg_err;

pub use overdue_core::shared::{PARTITIONS, partition_of};

/// The database clock in milliseconds since the Unix epoch, as SQL.
pub(crate) const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// This node's share of the partitions.
#[derive(Debug)]
pub(crate) struct Ownership {
    pub(crate) node: String,
    /// How long a partition lease (and a node's heartbeat) lasts.
    pub(crate) lease: Duration,
    /// Sorted partition numbers this node owns.
    owned: RwLock<Arc<Vec<i32>>>,
    epoch: AtomicU64,
    /// Live nodes counted at the last heartbeat.
    live_nodes: AtomicU64,
}

impl Ownership {
    pub(crate) fn new(node: String, lease: Duration) -> Self {
        Ownership {
            node,
            lease,
            owned: RwLock::new(Arc::new(Vec::new())),
            epoch: AtomicU64::new(0),
            live_nodes: AtomicU64::new(0),
        }
    }

    /// Period between heartbeats: a third of the lease, so two can fail before it lapses.
    pub(crate) fn heartbeat(&self) -> Duration {
        self.lease / 3
    }

    pub(crate) fn owned(&self) -> Arc<Vec<i32>> {
        self.owned.read().clone()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn live_nodes(&self) -> u64 {
        self.live_nodes.load(Ordering::Relaxed)
    }

    /// One round of the protocol in the module docs. Returns the partitions owned afterwards.
    pub(crate) async fn rebalance(&self, pool: &PgPool) -> overdue_core::Result<Arc<Vec<i32>>> {
        let lease_ms = self.lease.as_millis() as i64;
        sqlx::query(&format!(
            "INSERT INTO overdue_nodes (node, heartbeat_at, started_at) VALUES ($1, {DB_NOW_MS}, {DB_NOW_MS}) \
             ON CONFLICT (node) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at"
        ))
        .bind(&self.node)
        .execute(pool)
        .await
        .map_err(pg_err)?;
        let live: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) FROM overdue_nodes WHERE heartbeat_at > {DB_NOW_MS} - $1"
        ))
        .bind(lease_ms)
        .fetch_one(pool)
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
        let live = live.max(1);
        self.live_nodes.store(live as u64, Ordering::Relaxed);
        let share = (i64::from(PARTITIONS) + live - 1) / live;

        let mut owned: Vec<i32> = sqlx::query(&format!(
            "UPDATE overdue_partitions SET lease_until = {DB_NOW_MS} + $2 WHERE owner = $1 RETURNING part"
        ))
        .bind(&self.node)
        .bind(lease_ms)
        .fetch_all(pool)
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| r.try_get::<i32, _>(0))
        .collect::<Result<_, _>>()
        .map_err(pg_err)?;

        let held = owned.len() as i64;
        if held < share {
            let taken: Vec<i32> = sqlx::query(&format!(
                "UPDATE overdue_partitions p SET owner = $1, lease_until = {DB_NOW_MS} + $2 \
                 FROM (SELECT part FROM overdue_partitions \
                       WHERE owner IS NULL OR lease_until <= {DB_NOW_MS} \
                       ORDER BY part LIMIT $3 FOR UPDATE SKIP LOCKED) free \
                 WHERE p.part = free.part RETURNING p.part"
            ))
            .bind(&self.node)
            .bind(lease_ms)
            .bind(share - held)
            .fetch_all(pool)
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.try_get::<i32, _>(0))
            .collect::<Result<_, _>>()
            .map_err(pg_err)?;
            owned.extend(taken);
        } else if held > share {
            owned.sort_unstable();
            let give: Vec<i32> = owned.split_off(share as usize);
            sqlx::query("UPDATE overdue_partitions SET owner = NULL, lease_until = 0 WHERE owner = $1 AND part = ANY($2)")
                .bind(&self.node)
                .bind(&give)
                .execute(pool)
                .await
                .map_err(pg_err)?;
        }
        // Forget nodes that have been silent for a long time (their partitions expired long ago).
        sqlx::query(&format!("DELETE FROM overdue_nodes WHERE heartbeat_at < {DB_NOW_MS} - $1"))
            .bind(lease_ms.saturating_mul(100))
            .execute(pool)
            .await
            .map_err(pg_err)?;
        owned.sort_unstable();
        Ok(self.publish(owned))
    }

    /// Sets the owned set, bumping the epoch if it changed.
    fn publish(&self, owned: Vec<i32>) -> Arc<Vec<i32>> {
        let mut cur = self.owned.write();
        if **cur != owned {
            *cur = Arc::new(owned);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            tracing::info!(node = %self.node, partitions = cur.len(), "partition ownership changed");
        }
        cur.clone()
    }

    /// Gives every partition back (graceful close), so other nodes take them at their next round.
    pub(crate) async fn release_all(&self, pool: &PgPool) -> overdue_core::Result<()> {
        sqlx::query("UPDATE overdue_partitions SET owner = NULL, lease_until = 0 WHERE owner = $1")
            .bind(&self.node)
            .execute(pool)
            .await
            .map_err(pg_err)?;
        sqlx::query("DELETE FROM overdue_nodes WHERE node = $1").bind(&self.node).execute(pool).await.map_err(pg_err)?;
        self.publish(Vec::new());
        Ok(())
    }
}
