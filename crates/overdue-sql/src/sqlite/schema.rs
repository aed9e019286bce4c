//! Opening connections: pragmas, schema migrations and the state loaded at open.

use std::path::Path;

use overdue_core::{Error, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{BACKEND, Durability, SqlResultExt, SqliteOptions};
use crate::dialect::{Dialect, Queries};

const Q: &Queries = Dialect::Sqlite.queries();

/// Page size for new databases. 4 KiB matches the OS page and the usual SSD write unit; larger
/// pages did not speed up the small-row upserts of the throughput example.
const PAGE_SIZE: u32 = 4096;

/// Prepared statements kept per connection; the store uses about 30, `list` builds up to 16.
const STATEMENT_CACHE: usize = 64;

impl Durability {
    pub(crate) fn synchronous(self) -> &'static str {
        match self {
            Durability::Buffer => "OFF",
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        }
    }
}

/// Pragmas both kinds of connection share.
fn tune(conn: &Connection, opts: &SqliteOptions) -> Result<()> {
    conn.busy_timeout(opts.busy_timeout).store_err("set busy timeout")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Query-planner stability: a cached statement keeps its plan whatever values are bound.
    // Without it SQLite (built with STAT4) marks statements whose plan looked at a bound value
    // (a `LIMIT ?`, `?7 = 0 OR …`) and re-prepares them on every new binding: that was 8 % of
    // the writer thread's instructions under `overdue bench orders`.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .store_err("enable query planner stability")?;
    conn.pragma_update(None, "cache_size", -i64::from(opts.cache_kib)).store_err("set cache_size")?;
    conn.pragma_update(None, "temp_store", "MEMORY").store_err("set temp_store")?;
    conn.pragma_update(None, "mmap_size", i64::try_from(opts.mmap_bytes).unwrap_or(i64::MAX))
        .store_err("set mmap_size")?;
    Ok(())
}

/// Opens and configures the write connection of a locked database.
pub(crate) fn open_writer(path: &Path, opts: &SqliteOptions) -> Result<Connection> {
    let flags =
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| super::sql_error(&format!("cannot open database {}", path.display()), e))?;
    // Only takes effect on a new, empty database (and must precede WAL).
    conn.pragma_update(None, "page_size", PAGE_SIZE).store_err("set page_size")?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .store_err("enable WAL")?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Store {
            backend: BACKEND,
            message: format!("database {} refused WAL mode (journal_mode is {mode})", path.display()),
            transient: false,
            source: None,
        });
    }
    conn.pragma_update(None, "synchronous", opts.durability.synchronous()).store_err("set synchronous")?;
    conn.pragma_update(None, "wal_autocheckpoint", opts.wal_autocheckpoint_pages)
        .store_err("set wal_autocheckpoint")?;
    // After a checkpoint, cut the WAL file back instead of leaving it at its high-water size.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT).store_err("set journal_size_limit")?;
    tune(&conn, opts)?;
    Ok(conn)
}

/// Bytes a checkpointed WAL file is truncated back to.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Opens a read-only connection for the read pool.
pub(crate) fn open_reader(path: &Path, opts: &SqliteOptions) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| super::sql_error(&format!("cannot open database {} for reading", path.display()), e))?;
    tune(&conn, opts)?;
    Ok(conn)
}

/// Brings the schema to [`Dialect::latest_version`], refusing a database from a newer build.
/// Returns the version found before migrating.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<u32> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .store_err("begin migration")?;
    tx.execute(Q.create_schema_table, []).store_err("create schema table")?;
    let found: i64 = tx.query_row(Q.schema_version, [], |r| r.get(0)).store_err("read schema version")?;
    let latest = Dialect::Sqlite.latest_version();
    let found = u32::try_from(found).unwrap_or(u32::MAX);
    if found > latest {
        return Err(Error::Store {
            backend: BACKEND,
            message: format!(
                "database {} has schema version {found}, newer than the version {latest} this build \
                 of overdue understands; upgrade overdue or open another database",
                path.display()
            ),
            transient: false,
            source: None,
        });
    }
    for step in Dialect::Sqlite.migrations().iter().filter(|m| m.version > found) {
        tx.execute_batch(step.sql).map_err(|e| {
            super::sql_error(&format!("schema migration {} ({})", step.version, step.name), e)
        })?;
        tx.execute(Q.record_migration, rusqlite::params![step.version, step.name])
            .store_err("record schema migration")?;
        tracing::info!(version = step.version, name = step.name, db = %path.display(), "applied sqlite schema migration");
    }
    tx.commit().store_err("commit migration")?;
    Ok(found)
}

/// Clears every lease (the process lock proves nobody holds claims) and loads the generation
/// high-water mark. Returns `(generation, leases_cleared)`.
pub(crate) fn recover(conn: &mut Connection) -> Result<(i64, usize)> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .store_err("begin recovery")?;
    let cleared = tx.execute(Q.clear_leases, []).store_err("clear leases")?;
    let generation: Option<i64> =
        tx.query_row(Q.load_generation, [], |r| r.get(0)).optional().store_err("load generation")?;
    let generation = generation.unwrap_or(0).max(0);
    tx.execute(Q.store_generation, [generation]).store_err("store generation")?;
    tx.commit().store_err("commit recovery")?;
    Ok((generation, cleared))
}
