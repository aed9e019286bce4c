//! The MySQL / MariaDB schema: versioned migrations, applied under a named lock
//! (`GET_LOCK('overdue_migrate', 30)`) so that several nodes starting at once on an empty
//! database do not race each other.
//!
//! ## Ground rules
//!
//! - Steps are numbered from 1 without gaps and recorded in `overdue_schema`. A released step is
//!   never edited: add a new one. A node refuses a database whose recorded version is newer than
//!   it knows ([`LATEST_VERSION`]), so an old binary cannot write a newer layout.
//! - **MySQL DDL is not transactional**: every DDL statement commits on its own. So every
//!   statement of every step is safe to re-run (`CREATE TABLE IF NOT EXISTS`, `INSERT IGNORE`),
//!   and a step is recorded only after all its statements succeeded: a node that died half-way
//!   through a step simply runs the whole step again.
//! - Text compares bytewise: queues are `ascii_bin` (the queue alphabet is ASCII without spaces),
//!   keys and node names `utf8mb4_nopad_bin`. The *no-pad* collation matters: MariaDB's
//!   `utf8mb4_bin` is `PAD SPACE`, under which `"a"` and `"a "` are the same primary key. UTF-8
//!   code-point order is byte order, so `(due_at, queue, key)` keyset paging visits rows in the
//!   same order as Rust's `String` ordering (the engine's in-memory index).
//! - Payloads are `LONGBLOB`: the core's hard payload cap (16 MiB) is one byte more than a
//!   `MEDIUMBLOB` holds. (The server's `max_allowed_packet` bounds what one statement can carry;
//!   the store checks payloads against it, see the crate docs.)
//! - Times are `BIGINT` milliseconds since the Unix epoch. Timer times (`due_at`, `lease_until`)
//!   come from the engine's clock; partition and node leases from the database's clock.

use sqlx::{MySqlPool, Row};

use crate::{PARTITIONS, my_err};

/// The named lock held while migrating. Named locks are server-wide, so migrations of different
/// databases on one server also take turns (each takes well under a second).
const MIGRATION_LOCK: &str = "overdue_migrate";
/// Seconds to wait for the migration lock.
const MIGRATION_LOCK_WAIT_S: i64 = 30;

/// One versioned step: statements run one by one, each safe to re-run.
struct Migration {
    version: i32,
    name: &'static str,
    statements: &'static [&'static str],
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "timers, dead letters, generations, nodes and partition leases",
    statements: &[
        "CREATE TABLE IF NOT EXISTS timers (
            queue       VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            `key`       VARCHAR(256) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
            part        INT          NOT NULL,
            due_at      BIGINT       NOT NULL,
            payload     LONGBLOB     NOT NULL,
            generation  BIGINT       NOT NULL,
            attempts    INT          NOT NULL DEFAULT 0,
            last_error  MEDIUMTEXT   CHARACTER SET utf8mb4,
            lease_owner TEXT         CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin,
            lease_until BIGINT,
            created_at  BIGINT       NOT NULL,
            updated_at  BIGINT       NOT NULL,
            PRIMARY KEY (queue, `key`),
            KEY timers_due (due_at, queue, `key`),
            KEY timers_leased (lease_until)
        ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC",
        "CREATE TABLE IF NOT EXISTS dead_letters (
            id          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
            queue       VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            `key`       VARCHAR(256) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
            generation  BIGINT       NOT NULL,
            due_at      BIGINT       NOT NULL,
            payload     LONGBLOB     NOT NULL,
            attempts    INT          NOT NULL,
            error       MEDIUMTEXT   CHARACTER SET utf8mb4 NOT NULL,
            failed_at   BIGINT       NOT NULL,
            KEY dead_letters_queue (queue, id)
        ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC",
        // Nodes announce themselves here; a node whose heartbeat is older than the partition
        // lease is not counted when the partitions are shared out.
        "CREATE TABLE IF NOT EXISTS overdue_nodes (
            node         VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL PRIMARY KEY,
            heartbeat_at BIGINT NOT NULL,
            started_at   BIGINT NOT NULL
        ) ENGINE = InnoDB",
        // Which node loads which partition's timers into its in-memory trigger.
        "CREATE TABLE IF NOT EXISTS overdue_partitions (
            part        INT    NOT NULL PRIMARY KEY,
            owner       VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin,
            lease_until BIGINT NOT NULL DEFAULT 0
        ) ENGINE = InnoDB",
        // `generation` is the high-water mark of generations handed out (blocks are reserved
        // with LAST_INSERT_ID(value + n)); `partitions` the partition count the rows carry.
        "CREATE TABLE IF NOT EXISTS overdue_meta (
            name  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            value BIGINT NOT NULL
        ) ENGINE = InnoDB",
        "INSERT IGNORE INTO overdue_meta (name, value) VALUES ('generation', 0)",
    ],
}, Migration {
    version: 2,
    name: "outbox of notices for external triggers",
    statements: &[
        // Written only when the store is opened with its outbox on (an external trigger relays
        // it); see `overdue_core::trigger`. InnoDB never hands out an AUTO_INCREMENT value twice
        // (MariaDB keeps the counter across restarts), so a relay that acknowledges late cannot
        // delete a newer row.
        "CREATE TABLE IF NOT EXISTS overdue_outbox (
            seq         BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
            queue       VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            `key`       VARCHAR(256) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
            generation  BIGINT       NOT NULL,
            due_at      BIGINT       NOT NULL
        ) ENGINE = InnoDB",
    ],
}];

/// The schema version this build creates and understands.
pub const LATEST_VERSION: i32 = 2;

/// Brings the connection's database to [`LATEST_VERSION`].
///
/// Boxed with an explicit `Send` so callers can hold it in `Send` futures (sqlx's executor
/// otherwise trips the compiler's higher-ranked lifetime inference).
pub(crate) fn migrate(
    pool: &MySqlPool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = overdue_core::Result<()>> + Send + '_>> {
    Box::pin(async move {
        let mut conn = pool.acquire().await.map_err(my_err)?;
        let got: Option<i64> = sqlx::query("SELECT CAST(GET_LOCK(?, ?) AS SIGNED)")
            .bind(MIGRATION_LOCK)
            .bind(MIGRATION_LOCK_WAIT_S)
            .fetch_one(&mut *conn)
            .await
            .map_err(my_err)?
            .try_get(0)
            .map_err(my_err)?;
        if got != Some(1) {
            return Err(overdue_core::Error::Store {
                backend: crate::BACKEND,
                message: format!(
                    "another node held the migration lock {MIGRATION_LOCK:?} for {MIGRATION_LOCK_WAIT_S} s"
                ),
                transient: true,
                source: None,
            });
        }
        let r = migrate_locked(&mut conn).await;
        // Released even when a step failed; a lost connection releases it by itself.
        let released = sqlx::query("DO RELEASE_LOCK(?)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await;
        r?;
        released.map_err(my_err)?;
        Ok(())
    })
}

async fn migrate_locked(conn: &mut sqlx::MySqlConnection) -> overdue_core::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS overdue_schema (version INT NOT NULL PRIMARY KEY, \
         name VARCHAR(255) NOT NULL, applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP) ENGINE = InnoDB",
    )
    .execute(&mut *conn)
    .await
    .map_err(my_err)?;
    let current: i64 =
        sqlx::query("SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM overdue_schema")
            .fetch_one(&mut *conn)
            .await
            .map_err(my_err)?
            .try_get(0)
            .map_err(my_err)?;
    if current > i64::from(LATEST_VERSION) {
        return Err(overdue_core::Error::Config(format!(
            "the database schema is at version {current}, newer than this build of overdue understands \
             ({LATEST_VERSION}); upgrade overdue"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| i64::from(m.version) > current) {
        for sql in m.statements {
            sqlx::Executor::execute(&mut *conn, *sql)
                .await
                .map_err(my_err)?;
        }
        sqlx::query("INSERT IGNORE INTO overdue_schema (version, name) VALUES (?, ?)")
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *conn)
            .await
            .map_err(my_err)?;
    }
    // The partition table is filled once; a database made with another partition count is
    // refused (timers carry their partition number).
    sqlx::query("INSERT IGNORE INTO overdue_meta (name, value) VALUES ('partitions', ?)")
        .bind(i64::from(PARTITIONS))
        .execute(&mut *conn)
        .await
        .map_err(my_err)?;
    let parts: i64 = sqlx::query("SELECT value FROM overdue_meta WHERE name = 'partitions'")
        .fetch_one(&mut *conn)
        .await
        .map_err(my_err)?
        .try_get(0)
        .map_err(my_err)?;
    if parts != i64::from(PARTITIONS) {
        return Err(overdue_core::Error::Config(format!(
            "the database was created with {parts} partitions; this build uses {PARTITIONS}"
        )));
    }
    let rows = (0..PARTITIONS)
        .map(|p| format!("({p})"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::Executor::execute(
        &mut *conn,
        format!("INSERT IGNORE INTO overdue_partitions (part) VALUES {rows}").as_str(),
    )
    .await
    .map_err(my_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_start_at_one_without_gaps() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let expected: Vec<i32> = (1..=MIGRATIONS.len() as i32).collect();
        assert_eq!(versions, expected);
        assert_eq!(LATEST_VERSION, MIGRATIONS.len() as i32);
    }

    #[test]
    fn every_step_is_safe_to_rerun() {
        for m in MIGRATIONS {
            for sql in m.statements {
                let s = sql.trim_start();
                assert!(
                    s.starts_with("CREATE TABLE IF NOT EXISTS") || s.starts_with("INSERT IGNORE"),
                    "step {} is not re-runnable: {s}",
                    m.version
                );
            }
        }
    }
}
