//! Partition leases: how several nodes on one database split the work of *waking up* timers.
//!
//! The protocol is the PostgreSQL store's, statement for statement where MySQL allows it.
//!
//! ## The design
//!
//! Every timer belongs to one of [`PARTITIONS`] partitions, by a stable hash of its identity
//! ([`partition_of`], the same function as the PostgreSQL store's), stored in its row. Each node
//! keeps a row in `overdue_nodes` fresh (its heartbeat) and holds leases on partitions in
//! `overdue_partitions`. Every heartbeat interval (a third of the lease) a node:
//!
//! 1. renews its heartbeat and counts the live nodes (heartbeat within the lease),
//! 2. renews the leases of the partitions it owns, then reads which those are (MariaDB has no
//!    `UPDATE … RETURNING`),
//! 3. takes free or expired partitions until it holds its share, `ceil(PARTITIONS / live
//!    nodes)`: in one transaction, `SELECT … FOR UPDATE SKIP LOCKED` then `UPDATE` of exactly
//!    the rows selected, so two nodes never take the same one in one round,
//! 4. gives back partitions above its share, so a node that joins gets work within a round.
//!
//! A node's in-memory trigger (wheel or heap) loads only the timers of the partitions it owns
//! ([`crate::MysqlStore`]'s `due_refs`), so memory is split too. When the set changes, the
//! store's `ownership_epoch` changes and the engine reloads its window: a node that takes over
//! a dead node's partitions loads their timers at once.
//!
//! ## Why this is safe
//!
//! Partitions only decide who *looks*. Who *runs* a timer is still decided by the row claim
//! (generation, `due_at <= now`, lease free, under the row lock), so two nodes that briefly
//! both believe they own a partition cost a failed claim, never a double run. The scan trigger
//! and the backstop sweep claim due rows from *every* partition (`FOR UPDATE SKIP LOCKED`), so
//! a partition that nobody owns for a while is still fired, by the backstop, within its slack.
//!
//! Lease times come from the database clock (`NOW(3)` in a UTC session), so nodes need not
//! agree on the time.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{MySqlPool, Row};

use crate::my_err;

pub use overdue_core::shared::{PARTITIONS, partition_of};
use overdue_core::shared::PartitionState;

/// The database clock in milliseconds since the Unix epoch, as SQL (sessions run in UTC, so
/// `UNIX_TIMESTAMP` of a local time is unambiguous).
pub(crate) const DB_NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

/// `?, ?, …` with `n` placeholders.
pub(crate) fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 3);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s
}

/// This node's share of the partitions: the driver-free state from `overdue-core`, and the
/// MariaDB half of the protocol below.
#[derive(Debug)]
pub(crate) struct Ownership(PartitionState);

impl std::ops::Deref for Ownership {
    type Target = PartitionState;
    fn deref(&self) -> &PartitionState {
        &self.0
    }
}

type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl Ownership {
    pub(crate) fn new(node: String, lease: Duration) -> Self {
        Ownership(PartitionState::new(node, lease))
    }

    /// One round of the protocol in the module docs. Returns the partitions owned afterwards.
    pub(crate) fn rebalance<'a>(
        &'a self,
        pool: &'a MySqlPool,
    ) -> BoxFut<'a, overdue_core::Result<Arc<Vec<i32>>>> {
        Box::pin(async move {
            let owned = self.round(pool).await.map_err(my_err)?;
            Ok(self.publish_logged(owned))
        })
    }

    async fn round(&self, pool: &MySqlPool) -> Result<Vec<i32>, sqlx::Error> {
        let lease_ms = self.lease.as_millis() as i64;
        sqlx::query(&format!(
            "INSERT INTO overdue_nodes (node, heartbeat_at, started_at) VALUES (?, {DB_NOW_MS}, {DB_NOW_MS}) \
             ON DUPLICATE KEY UPDATE heartbeat_at = VALUES(heartbeat_at)"
        ))
        .bind(&self.node)
        .execute(pool)
        .await?;
        let live: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) FROM overdue_nodes WHERE heartbeat_at > {DB_NOW_MS} - ?"
        ))
        .bind(lease_ms)
        .fetch_one(pool)
        .await?
        .try_get(0)?;
        let share = self.share_of(live);

        // Renew, then read back what is still ours (no UPDATE … RETURNING on MariaDB).
        sqlx::query(&format!(
            "UPDATE overdue_partitions SET lease_until = {DB_NOW_MS} + ? WHERE owner = ?"
        ))
        .bind(lease_ms)
        .bind(&self.node)
        .execute(pool)
        .await?;
        let mut owned: Vec<i32> =
            sqlx::query_scalar("SELECT part FROM overdue_partitions WHERE owner = ?")
                .bind(&self.node)
                .fetch_all(pool)
                .await?;

        let held = owned.len() as i64;
        if held < share {
            let mut tx = pool.begin().await?;
            let free: Vec<i32> = sqlx::query_scalar(&format!(
                "SELECT part FROM overdue_partitions WHERE owner IS NULL OR lease_until <= {DB_NOW_MS} \
                 ORDER BY part LIMIT ? FOR UPDATE SKIP LOCKED"
            ))
            .bind(share - held)
            .fetch_all(&mut *tx)
            .await?;
            if !free.is_empty() {
                let sql = format!(
                    "UPDATE overdue_partitions SET owner = ?, lease_until = {DB_NOW_MS} + ? WHERE part IN ({})",
                    placeholders(free.len())
                );
                let mut q = sqlx::query(&sql).bind(&self.node).bind(lease_ms);
                for p in &free {
                    q = q.bind(*p);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            owned.extend(free);
        } else if held > share {
            owned.sort_unstable();
            let give: Vec<i32> = owned.split_off(share as usize);
            let sql = format!(
                "UPDATE overdue_partitions SET owner = NULL, lease_until = 0 WHERE owner = ? AND part IN ({})",
                placeholders(give.len())
            );
            let mut q = sqlx::query(&sql).bind(&self.node);
            for p in &give {
                q = q.bind(*p);
            }
            q.execute(pool).await?;
        }
        // Forget nodes that have been silent for a long time (their partitions expired long ago).
        sqlx::query(&format!(
            "DELETE FROM overdue_nodes WHERE heartbeat_at < {DB_NOW_MS} - ?"
        ))
        .bind(lease_ms.saturating_mul(100))
        .execute(pool)
        .await?;
        owned.sort_unstable();
        Ok(owned)
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
    pub(crate) fn release_all<'a>(
        &'a self,
        pool: &'a MySqlPool,
    ) -> BoxFut<'a, overdue_core::Result<()>> {
        Box::pin(async move {
            sqlx::query(
                "UPDATE overdue_partitions SET owner = NULL, lease_until = 0 WHERE owner = ?",
            )
            .bind(&self.node)
            .execute(pool)
            .await
            .map_err(my_err)?;
            sqlx::query("DELETE FROM overdue_nodes WHERE node = ?")
                .bind(&self.node)
                .execute(pool)
                .await
                .map_err(my_err)?;
            self.publish_logged(Vec::new());
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_comma_separated() {
        assert_eq!(placeholders(0), "");
        assert_eq!(placeholders(1), "?");
        assert_eq!(placeholders(3), "?, ?, ?");
    }
}
