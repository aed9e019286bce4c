//! # overdue-sql
//!
//! overdue's SQL stores. Today: [`SqliteStore`], the embedded default — one SQLite file in WAL
//! mode, a group-committing writer thread, a pool of readers, and a process lock so that one
//! overdue process owns the file. Tomorrow: PostgreSQL and MySQL stores that reuse the
//! statement text of [`dialect`] and add `FOR UPDATE SKIP LOCKED` claiming across nodes.
//!
//! | capability | SQLite |
//! |---|---|
//! | durable (survives `kill -9` once `schedule` returned) | yes, at every [`Durability`] |
//! | survives power loss | with [`Durability::Full`] (the default) |
//! | shared by several processes | no: one process, enforced by `<path>.lock` |
//! | transactional hook for application SQL | [`SqliteStore::write`] |
//!
//! ```no_run
//! # async fn demo() -> overdue_core::Result<()> {
//! use overdue_core::{Store, TimerSpec};
//! use overdue_sql::{SqliteOptions, SqliteStore};
//!
//! let store = SqliteStore::open("overdue-data/overdue.db", SqliteOptions::default()).await?;
//! let now = 1_700_000_000_000;
//! let generations = store
//!     .schedule(vec![TimerSpec::new("order.close", "o-123", now + 30 * 60_000)], now)
//!     .await?;
//! # let _ = generations; Ok(()) }
//! ```
//!
//! ## The other SQL stores
//!
//! PostgreSQL and MySQL/MariaDB are their own crates (`overdue-postgres`, `overdue-mysql`), with
//! their own batched SQL and partition leases for many nodes; see `docs/sql-backends.md`.

pub mod dialect;
pub mod sqlite;

pub use dialect::Dialect;
pub use sqlite::{
    Durability, SqlResultExt, SqliteOptions, SqliteStats, SqliteStore, Stmt, WriteCtx,
    parse_url as parse_sqlite_url,
};
