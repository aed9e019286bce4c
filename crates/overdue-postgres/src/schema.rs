//! The PostgreSQL schema: versioned migrations, applied under an advisory lock so that several
//! nodes starting at once on an empty database do not race each other.
//!
//! ## Ground rules
//!
//! - Steps are numbered from 1 without gaps and recorded in `overdue_schema`. A released step is
//!   never edited: add a new one. A node refuses a database whose recorded version is newer than
//!   it knows ([`LATEST_VERSION`]), so an old binary cannot write a newer layout.
//! - PostgreSQL DDL is transactional: each step commits whole or not at all.
//! - Text compares bytewise (`COLLATE "C"`), so `(due_at, queue, key)` keyset paging visits rows
//!   in the same order as Rust's `String` ordering (the engine's in-memory index).
//! - Times are `BIGINT` milliseconds since the Unix epoch. Timer times (`due_at`, `lease_until`)
//!   come from the engine's clock; partition and node leases come from the database's clock
//!   (`clock_timestamp()`), so nodes with skewed clocks still agree on who owns what.

use sqlx::{PgPool, Row};

use crate::{PARTITIONS, pg_err};

/// Advisory-lock key held while migrating ("overdue" in ASCII).
const MIGRATION_LOCK: i64 = 0x006f_7665_7264_7565;

/// One versioned step.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "timers, dead letters, generations, nodes and partition leases",
    sql: r#"
CREATE TABLE timers (
    queue       TEXT    COLLATE "C" NOT NULL,
    key         TEXT    COLLATE "C" NOT NULL,
    part        INTEGER NOT NULL,
    due_at      BIGINT  NOT NULL,
    payload     BYTEA   NOT NULL,
    generation  BIGINT  NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    lease_owner TEXT,
    lease_until BIGINT,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (queue, key)
) WITH (fillfactor = 80);
-- The only secondary index. The lease columns are deliberately not indexed, and pages keep
-- 20 % free: a claim or release then changes no indexed column and fits its page, so it is a
-- HOT update (no index writes at all) — claims are the hottest write after the upsert.
CREATE INDEX timers_due ON timers (due_at, queue, key);

CREATE TABLE dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    queue       TEXT    COLLATE "C" NOT NULL,
    key         TEXT    COLLATE "C" NOT NULL,
    generation  BIGINT  NOT NULL,
    due_at      BIGINT  NOT NULL,
    payload     BYTEA   NOT NULL,
    attempts    INTEGER NOT NULL,
    error       TEXT    NOT NULL,
    failed_at   BIGINT  NOT NULL
);
CREATE INDEX dead_letters_queue ON dead_letters (queue, id);

-- Shared by every node; nextval never hands out a value twice, even after a rollback.
CREATE SEQUENCE overdue_generation AS BIGINT;

-- Nodes announce themselves here; a node whose heartbeat is older than the partition lease is
-- not counted when the partitions are shared out.
CREATE TABLE overdue_nodes (
    node         TEXT   COLLATE "C" PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL,
    started_at   BIGINT NOT NULL
);

-- Which node loads which partition's timers into its in-memory trigger.
CREATE TABLE overdue_partitions (
    part        INTEGER PRIMARY KEY,
    owner       TEXT    COLLATE "C",
    lease_until BIGINT  NOT NULL DEFAULT 0
);

CREATE TABLE overdue_meta (
    name  TEXT   PRIMARY KEY,
    value BIGINT NOT NULL
);
"#,
}, Migration {
    version: 2,
    name: "outbox of notices for external triggers",
    // Written only when the store is opened with its outbox on (an external trigger relays it);
    // see `overdue_core::trigger`. A BIGSERIAL's sequence never hands out a value twice (not even
    // after a rollback), so a relay that acknowledges late cannot delete a newer row.
    sql: r#"
CREATE TABLE overdue_outbox (
    seq         BIGSERIAL PRIMARY KEY,
    queue       TEXT    COLLATE "C" NOT NULL,
    key         TEXT    COLLATE "C" NOT NULL,
    generation  BIGINT  NOT NULL,
    due_at      BIGINT  NOT NULL
);
"#,
}];

/// The schema version this build creates and understands.
pub const LATEST_VERSION: i32 = 2;

/// Brings the schema in the connection's `search_path` to [`LATEST_VERSION`], creating the
/// schema itself if it is named and missing.
///
/// Boxed with an explicit `Send` so callers can hold it in `Send` futures (sqlx's transaction
/// executor otherwise trips the compiler's higher-ranked lifetime inference).
pub(crate) fn migrate<'a>(
    pool: &'a PgPool,
    schema: Option<&'a str>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = overdue_core::Result<()>> + Send + 'a>> {
    Box::pin(migrate_inner(pool, schema))
}

async fn migrate_inner(pool: &PgPool, schema: Option<&str>) -> overdue_core::Result<()> {
    let mut tx = pool.begin().await.map_err(pg_err)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await.map_err(pg_err)?;
    if let Some(schema) = schema {
        // The name was checked to be [a-z0-9_]+ when the URL was parsed.
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).execute(&mut *tx).await.map_err(pg_err)?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS overdue_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
         applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await
    .map_err(pg_err)?;
    let current: i32 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM overdue_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
    if current > LATEST_VERSION {
        return Err(overdue_core::Error::Config(format!(
            "the database schema is at version {current}, newer than this build of overdue understands \
             ({LATEST_VERSION}); upgrade overdue"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        sqlx::Executor::execute(&mut *tx, m.sql).await.map_err(pg_err)?;
        sqlx::query("INSERT INTO overdue_schema (version, name) VALUES ($1, $2)")
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *tx)
            .await
            .map_err(pg_err)?;
    }
    // The partition table is filled once; a database made with another partition count is
    // refused (timers carry their partition number).
    sqlx::query("INSERT INTO overdue_meta (name, value) VALUES ('partitions', $1) ON CONFLICT (name) DO NOTHING")
        .bind(i64::from(PARTITIONS))
        .execute(&mut *tx)
        .await
        .map_err(pg_err)?;
    let parts: i64 = sqlx::query("SELECT value FROM overdue_meta WHERE name = 'partitions'")
        .fetch_one(&mut *tx)
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
    if parts != i64::from(PARTITIONS) {
        return Err(overdue_core::Error::Config(format!(
            "the database was created with {parts} partitions; this build uses {PARTITIONS}"
        )));
    }
    sqlx::query("INSERT INTO overdue_partitions (part) SELECT generate_series(0, $1 - 1) ON CONFLICT (part) DO NOTHING")
        .bind(PARTITIONS)
        .execute(&mut *tx)
        .await
        .map_err(pg_err)?;
    tx.commit().await.map_err(pg_err)?;
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
}
