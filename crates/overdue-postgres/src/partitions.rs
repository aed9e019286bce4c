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
use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::pg_err;

pub use overdue_core::shared::{PARTITIONS, partition_of};
use overdue_core::shared::PartitionState;

/// The database clock in milliseconds since the Unix epoch, as SQL.
pub(crate) const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// This node's share of the partitions: the driver-free state from `overdue-core`, and the
/// PostgreSQL half of the protocol below.
#[derive(Debug)]
pub(crate) struct Ownership(PartitionState);

impl std::ops::Deref for Ownership {
    type Target = PartitionState;
    fn deref(&self) -> &PartitionState {
        &self.0
    }
}

impl Ownership {
    pub(crate) fn new(node: String, lease: Duration) -> Self {
        Ownership(PartitionState::new(node, lease))
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
        let share = self.share_of(live);

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
        Ok(self.publish_logged(owned))
    }

    /// Publishes the owned set, logging a change.
    fn publish_logged(&self, owned: Vec<i32>) -> Arc<Vec<i32>> {
        let (cur, changed) = self.publish(owned);
        if changed {
            tracing::info!(node = %self.node, partitions = cur.len(), "partition ownership changed");
        }
        cur
    }

    /// Gives every partition back (graceful close), so other nodes take them at their next round.
    pub(crate) async fn release_all(&self, pool: &PgPool) -> overdue_core::Result<()> {
        sqlx::query("UPDATE overdue_partitions SET owner = NULL, lease_until = 0 WHERE owner = $1")
            .bind(&self.node)
            .execute(pool)
            .await
            .map_err(pg_err)?;
        sqlx::query("DELETE FROM overdue_nodes WHERE node = $1").bind(&self.node).execute(pool).await.map_err(pg_err)?;
        self.publish_logged(Vec::new());
        Ok(())
    }
}
