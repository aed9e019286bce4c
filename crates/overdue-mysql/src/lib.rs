//! # overdue-mysql
//!
//! [`MysqlStore`]: timers in a MariaDB database (10.6 or later; tested on 10.11), shared by
//! any number of overdue nodes. Same design as the PostgreSQL store (`overdue-postgres`): the
//! same tables and columns, the same partition hash and lease protocol, the same URL
//! parameters (less `schema`), the same public API.
//!
//! ## What it guarantees
//!
//! - **Durable on return.** Every write is one statement or one transaction that has committed
//!   when the call returns (at the server's `innodb_flush_log_at_trx_commit`).
//! - **The claim contract** of `overdue_core::store`: `claim` and `claim_due` are one
//!   transaction each — a `SELECT … FOR UPDATE SKIP LOCKED` that checks generation,
//!   `due_at <= now` and a free or expired lease on the *current* row versions (a locking read),
//!   then one `UPDATE` of exactly the rows locked. Two nodes claiming the same row: one holds
//!   the lock, the other skips the row, so exactly one wins.
//! - **The scheduled scan done right.** `claim_due` (the `scan` trigger and the backstop) takes
//!   due rows in `(due_at, queue, key)` order with `FOR UPDATE SKIP LOCKED`: scanners running at
//!   once on several nodes take disjoint rows and never wait for each other. Sessions run at
//!   `READ COMMITTED`, so InnoDB takes no gap locks and a scan never blocks a `schedule`.
//! - **Generations** come from one row in `overdue_meta`, bumped by
//!   `UPDATE … SET value = LAST_INSERT_ID(value + n)` in its own autocommit statement and read
//!   back with `SELECT LAST_INSERT_ID()` on the same connection: a batch reserves a block of
//!   `n`, and no value is ever handed out twice, on any node.
//! - **Many nodes.** Nodes split the *wake-ups* by partition leases (see [`partitions`]); the
//!   claim decides who *runs*. A node that dies stops renewing: its partitions move to the
//!   others within the partition lease, and its claimed rows are fired by another node once
//!   their claim lease (the engine's `lease`) expires.
//! - **Batched.** `schedule` is one multi-row `INSERT … ON DUPLICATE KEY UPDATE` (split into
//!   several statements inside one transaction only past 65,535 placeholders or half the
//!   server's `max_allowed_packet`); `claim` and `settle` send a few statements per batch.
//! - **Connection loss** surfaces as transient store errors (the engine retries with backoff);
//!   the pool reconnects by itself when the server is back. [`MysqlStore::healthy`] tells
//!   whether the last round trip worked.
//!
//! ## Differences from PostgreSQL
//!
//! | concern | PostgreSQL | MySQL / MariaDB |
//! |---|---|---|
//! | claim | one `UPDATE … RETURNING` | no `UPDATE … RETURNING`: `SELECT … FOR UPDATE SKIP LOCKED`, then `UPDATE`, in one transaction |
//! | batches | arrays bound with `UNNEST` | multi-row `VALUES`, row-value `IN ((?,?,?), …)`, and `UNION ALL` derived tables for per-row values (retry, dead letter) |
//! | generations | a `SEQUENCE` | a counter row, blocks reserved with `LAST_INSERT_ID(value + n)` |
//! | bytewise text | `COLLATE "C"` | `ascii_bin` queues, `utf8mb4_nopad_bin` keys (MariaDB's `utf8mb4_bin` pads: `"a"` would equal `"a "`) |
//! | migrations | transactional, under an advisory lock | DDL auto-commits: every statement re-runnable, under `GET_LOCK('overdue_migrate', 30)` |
//! | schema | `?schema=` names a schema | a schema *is* a database: the URL's path names it |
//! | isolation | read committed (default) | `READ COMMITTED` set on every connection (InnoDB defaults to repeatable read, whose gap locks would make scans block inserts) |
//! | payload size | 1 GB `BYTEA` | `LONGBLOB`, but one statement must fit the server's `max_allowed_packet` (MariaDB default 16 MiB): a payload that cannot is refused with a clear, non-transient error |
//!
//! ## MySQL 8
//!
//! The store speaks the MySQL protocol but relies on two MariaDB features: `DELETE … RETURNING`
//! (cancel, replay) and the `utf8mb4_nopad_bin` collation. On MySQL 8 those would be a locking
//! `SELECT` before the `DELETE` and `utf8mb4_0900_bin` (already no-pad); not done yet.
//!
//! ## URL
//!
//! `mysql://[user[:password]@]host[:port]/database[?pool=N&node=NAME&partition_lease_ms=MS&outbox=BOOL]`
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `pool` | most connections this node opens | 16 |
//! | `node` | name of this node in partition leases; a node restarted under the same name takes its partitions back at once | `<host>-<pid>-<random>` |
//! | `partition_lease_ms` | how long a partition lease lasts without renewal (renewed every third of it) | 10000 |
//! | `outbox` | `true` (or `1`, `on`) to record an outbox notice with every upsert, for an external trigger (RabbitMQ, Kafka, Redis key expiry, …); `false` (`0`, `off`) not to | `false` |
//!
//! Every other parameter goes to the driver (`ssl-mode`, `charset`, …).
//!
//! ## Outbox
//!
//! With `outbox=true` ([`MysqlOptions::outbox`]) the store can serve an external trigger (see
//! `overdue_core::trigger`): every write that gives a timer a new generation or a new due time
//! — `schedule` (and [`MysqlStore::schedule_in`] on the caller's connection), `reschedule`,
//! `replay` and a retry's settlement — also inserts a notice `(seq, queue, key, generation,
//! due_at)` into `overdue_outbox` in the same transaction (MySQL has no data-modifying CTEs, so
//! an upsert that was one autocommit statement becomes a two-statement transaction). `seq` is
//! an `AUTO_INCREMENT`, which InnoDB never hands out twice (MariaDB persists the counter across
//! restarts since 10.2.4). `outbox_fetch` is a plain (non-locking) read in `seq` order: relays
//! on several nodes may read the same rows at once without waiting for each other and publish
//! them twice, which the generation fence makes harmless; `outbox_ack` deletes the given rows
//! (unknown ones are ignored). A notice of an upsert that lost to a newer generation (see the
//! generations above) is stale and dropped on delivery. With the outbox off (the default) no
//! notice is written and the upserts are the plain statements.

pub mod partitions;
mod schema;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use overdue_core::{
    Capabilities, Claimed, DeadLetter, DeadLetterQuery, DueBuckets, DueHistogram, Error, ListQuery, NodeLease, QueueCount, Result,
    Settlement, Store, Timer, TimerRef, TimerSpec, TimerState,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPoolOptions, MySqlRow};
use sqlx::{MySqlPool, Row};

use overdue_core::shared::redact;

use self::partitions::{Ownership, placeholders};
pub use self::partitions::{PARTITIONS, partition_of};
pub use self::schema::LATEST_VERSION;

/// The backend name in errors and capabilities.
pub(crate) const BACKEND: &str = "mysql";
pub use overdue_core::shared::{DEFAULT_PARTITION_LEASE, DEFAULT_POOL, MIN_PARTITION_LEASE, NodeOptions};
/// How long opening waits for a connection before failing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits for a free pooled connection before failing (transiently).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most placeholders in one prepared statement (the protocol counts them in 16 bits).
const MAX_PLACEHOLDERS: usize = 65_535;
/// Bytes of a statement besides its bound values, allowed for when checking payload sizes.
const STATEMENT_OVERHEAD: usize = 64 * 1024;

/// How to open a [`MysqlStore`]; [`MysqlOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug, Default)]
pub struct MysqlOptions {
    /// Pool size, node name and partition lease.
    pub node: NodeOptions,
    /// Record a notice in `overdue_outbox` with every upsert, for an external trigger's relay
    /// (see `overdue_core::trigger`). Default off: the in-process triggers need no outbox. URL:
    /// `?outbox=true`.
    pub outbox: bool,
}

impl MysqlOptions {
    /// Splits overdue's own parameters off a `mysql://` URL; returns them and the URL for the
    /// driver.
    pub fn from_url(url: &str) -> Result<(MysqlOptions, String)> {
        let bad = |m: String| Error::Config(format!("invalid mysql url: {m}"));
        let Some(after_scheme) = url.strip_prefix("mysql://") else {
            return Err(bad(format!(
                "{:?} does not start with mysql://",
                redact(url)
            )));
        };
        let mut opts = MysqlOptions::default();
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let path = after_scheme.split('?').next().unwrap_or("");
        let database = path.split_once('/').map(|(_, db)| db).unwrap_or("");
        if database.is_empty() {
            return Err(bad(format!(
                "{:?} names no database: put it in the path, e.g. mysql://host:3306/overdue",
                redact(url)
            )));
        }
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "schema" => {
                    return Err(bad(
                        "there is no schema parameter: in MySQL a schema is a database, name it in the URL's path"
                            .to_owned(),
                    ));
                }
                "outbox" => {
                    opts.outbox = overdue_core::shared::url_flag("mysql", k, v)?;
                }
                _ if opts.node.take("mysql", k, v)? => {}
                _ => rest.push(pair),
            }
        }
        let driver = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        Ok((opts, driver))
    }
}

/// Server error numbers that may succeed on retry: lock wait timeout, deadlock, too many
/// connections, shutdown in progress, network read/write errors and timeouts, interrupted or
/// killed queries and connections, read-only (a failover in progress), resource limits.
const TRANSIENT_ERRORS: &[u16] = &[
    1040, 1053, 1152, 1158, 1159, 1160, 1161, 1180, 1203, 1205, 1213, 1226, 1290, 1317, 1637, 1836,
    1927, 2002, 2003, 2006, 2013, 3572, 4031,
];

/// Whether a server error (number, SQLSTATE) may succeed on retry.
fn transient_db(number: Option<u16>, state: &str) -> bool {
    number.is_some_and(|n| TRANSIENT_ERRORS.contains(&n))
        || state.starts_with("08")
        || state.starts_with("40")
}

/// Turns a driver error into a store error; connection trouble, pool exhaustion, deadlocks and
/// lock wait timeouts are transient.
pub(crate) fn my_err(e: sqlx::Error) -> Error {
    let (transient, message) = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_) => (true, e.to_string()),
        sqlx::Error::WorkerCrashed => (true, e.to_string()),
        sqlx::Error::Database(db) => {
            let number = db
                .try_downcast_ref::<MySqlDatabaseError>()
                .map(MySqlDatabaseError::number);
            let state = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let transient = transient_db(number, &state);
            let message = match number {
                Some(n) => format!("{} (error {n}, SQLSTATE {state})", db.message()),
                None => format!("{} (SQLSTATE {state})", db.message()),
            };
            (transient, message)
        }
        other => (false, other.to_string()),
    };
    Error::store(BACKEND, message, transient, e)
}

struct Inner {
    pool: MySqlPool,
    /// Write a notice into `overdue_outbox` with every upsert.
    outbox: bool,
    ownership: Ownership,
    healthy: AtomicBool,
    /// Bytes of bound values one statement may carry: half the server's `max_allowed_packet`.
    statement_budget: usize,
    /// The largest payload the server accepts in one statement.
    max_payload: usize,
    heartbeat: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeat.get_mut().take() {
            task.abort();
        }
    }
}

/// Timers in MySQL / MariaDB. Cheap to clone; clones share one pool. See the crate docs.
#[derive(Clone)]
pub struct MysqlStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlStore")
            .field("node", &self.inner.ownership.node)
            .field("partitions", &self.inner.ownership.owned().len())
            .finish_non_exhaustive()
    }
}


type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl MysqlStore {
    /// Opens the store a `mysql://` URL names (see the crate docs for its parameters).
    pub async fn open_url(url: &str) -> Result<MysqlStore> {
        let (opts, driver) = MysqlOptions::from_url(url)?;
        MysqlStore::open(&driver, opts).await
    }

    /// Connects, migrates, and takes this node's first share of the partitions before
    /// returning, so a single node owns every partition from its first call.
    pub async fn open(driver_url: &str, opts: MysqlOptions) -> Result<MysqlStore> {
        if opts.node.partition_lease < MIN_PARTITION_LEASE {
            return Err(Error::Config(format!(
                "partition lease {:?} is below the minimum of {MIN_PARTITION_LEASE:?}",
                opts.node.partition_lease
            )));
        }
        let connect: MySqlConnectOptions = driver_url.parse().map_err(|e: sqlx::Error| {
            Error::Config(format!("invalid mysql url {}: {e}", redact(driver_url)))
        })?;
        let connect = connect.timezone(Some("+00:00".to_owned()));
        let pool = MySqlPoolOptions::new()
            .max_connections(opts.node.pool)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    sqlx::Executor::execute(
                        &mut *conn,
                        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                    )
                    .await?;
                    sqlx::Executor::execute(
                        &mut *conn,
                        "SET SESSION innodb_lock_wait_timeout = 10",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(connect);
        let pool = match tokio::time::timeout(CONNECT_TIMEOUT, pool).await {
            Ok(Ok(pool)) => pool,
            Ok(Err(e)) => {
                let e = my_err(e);
                return Err(Error::Config(format!(
                    "cannot connect to mysql at {}: {e}",
                    redact(driver_url)
                )));
            }
            Err(_) => {
                return Err(Error::Config(format!(
                    "connecting to mysql at {} timed out",
                    redact(driver_url)
                )));
            }
        };
        schema::migrate(&pool).await?;
        let max_packet: i64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS SIGNED)")
            .fetch_one(&pool)
            .await
            .map_err(my_err)?;
        let max_packet = usize::try_from(max_packet)
            .unwrap_or(usize::MAX)
            .max(1024 * 1024);
        let node = opts.node.node_name();
        let inner = Arc::new(Inner {
            pool,
            outbox: opts.outbox,
            ownership: Ownership::new(node, opts.node.partition_lease),
            healthy: AtomicBool::new(true),
            statement_budget: max_packet / 2,
            max_payload: max_packet.saturating_sub(STATEMENT_OVERHEAD),
            heartbeat: parking_lot::Mutex::new(None),
        });
        inner.ownership.rebalance(&inner.pool).await?;
        let task = overdue_core::shared::spawn_heartbeat(inner.ownership.heartbeat(), Arc::downgrade(&inner), |inner| {
            Box::pin(async move {
                let round = inner.ownership.rebalance(&inner.pool).await;
                inner.healthy.store(round.is_ok(), Ordering::Relaxed);
                if let Err(e) = round {
                    tracing::warn!(error = %e, "mysql partition heartbeat failed; retrying");
                }
            })
        });
        *inner.heartbeat.lock() = Some(task);
        Ok(MysqlStore { inner })
    }

    /// The pool, for callers that write their own rows in the same database (the order service).
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// This node's name in partition leases.
    pub fn node(&self) -> &str {
        &self.inner.ownership.node
    }

    /// The partitions whose timers this node loads, sorted.
    pub fn owned_partitions(&self) -> Vec<i32> {
        self.inner.ownership.owned().to_vec()
    }

    /// Live nodes counted at the last heartbeat.
    pub fn live_nodes(&self) -> u64 {
        self.inner.ownership.live_nodes()
    }

    /// Whether the last heartbeat reached the database.
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Runs one partition round now (tests and operators; it also runs on its own timer).
    pub async fn rebalance(&self) -> Result<Vec<i32>> {
        Ok(self
            .inner
            .ownership
            .rebalance(&self.inner.pool)
            .await?
            .to_vec())
    }

    /// Gives this node's partitions back and stops its heartbeat, so the other nodes take them
    /// over at their next round instead of after the lease. Call on graceful shutdown.
    pub async fn close(&self) -> Result<()> {
        let task = self.inner.heartbeat.lock().take();
        if let Some(task) = task {
            task.abort();
        }
        self.inner.ownership.release_all(&self.inner.pool).await
    }

    /// Schedules `timers` inside the caller's transaction (`conn` has one open): the rows commit
    /// or roll back with the caller's own. This is how the order service writes an order and its
    /// close timer atomically. The generations are reserved first in their own short autocommit
    /// statement on another pooled connection (as [`Store::schedule`] does), so a rolled-back
    /// caller leaves a gap in the generations, never a reuse. Hand the returned refs to
    /// `Engine::track` after the commit.
    pub async fn schedule_in(&self, conn: &mut sqlx::MySqlConnection, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        for t in &timers {
            self.check_payload(t.payload.len())?;
        }
        let r = self.reserve(timers.len()).await.map_err(my_err);
        let first = self.track(r)?;
        let r = self.schedule_tx(&timers, first, now, Some(conn)).await.map_err(my_err);
        self.track(r)?;
        Ok((0..timers.len()).map(|i| (first + i as i64) as u64).collect())
    }

    /// Deletes a timer inside the caller's transaction (see [`MysqlStore::schedule_in`]); the
    /// generation it had, if it existed.
    pub async fn cancel_in(&self, conn: &mut sqlx::MySqlConnection, queue: &str, key: &str) -> Result<Option<u64>> {
        let r = delete(conn, queue, key).await;
        self.track(r)
    }

    /// Whether this store was opened with its outbox on.
    pub fn outbox(&self) -> bool {
        self.inner.outbox
    }

    fn require_outbox(&self) -> Result<()> {
        if self.inner.outbox {
            return Ok(());
        }
        Err(Error::Config(
            "the mysql store was opened without its outbox; an external trigger needs \
             MysqlOptions { outbox: true, .. } (URL parameter outbox=true)"
                .to_owned(),
        ))
    }

    fn track<T>(&self, r: Result<T>) -> Result<T> {
        match &r {
            Err(e) if e.is_transient() => self.inner.healthy.store(false, Ordering::Relaxed),
            Ok(_) => self.inner.healthy.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
        r
    }

    /// Reserves `n` fresh generations and returns the first: one short autocommit
    /// `UPDATE … LAST_INSERT_ID(value + n)` and `SELECT LAST_INSERT_ID()` on one connection.
    fn reserve(&self, n: usize) -> BoxFut<'_, std::result::Result<i64, sqlx::Error>> {
        Box::pin(async move {
            let n = n as i64;
            let mut conn = self.inner.pool.acquire().await?;
            let done = sqlx::query("UPDATE overdue_meta SET value = LAST_INSERT_ID(value + ?) WHERE name = 'generation'")
                .bind(n)
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() != 1 {
                // Without the row LAST_INSERT_ID() would repeat an old value: never hand it out.
                return Err(sqlx::Error::Protocol(
                    "the generation row in overdue_meta is missing".into(),
                ));
            }
            let last: i64 = sqlx::query_scalar("SELECT CAST(LAST_INSERT_ID() AS SIGNED)")
                .fetch_one(&mut *conn)
                .await?;
            Ok(last - n + 1)
        })
    }

    fn chunks<'a, T>(
        &self,
        items: &'a [T],
        per_row: usize,
        fixed: usize,
        bytes: impl Fn(&T) -> usize,
    ) -> Vec<&'a [T]> {
        chunks(items, per_row, fixed, self.inner.statement_budget, bytes)
    }

    fn check_payload(&self, len: usize) -> Result<()> {
        if len > self.inner.max_payload {
            return Err(Error::Store {
                backend: BACKEND,
                message: format!(
                    "a payload of {len} bytes does not fit the server's max_allowed_packet (payloads up to {} bytes \
                     fit); raise max_allowed_packet on the server",
                    self.inner.max_payload
                ),
                transient: false,
                source: None,
            });
        }
        Ok(())
    }
}

/// Splits `items` into runs that fit one statement: at most [`MAX_PLACEHOLDERS`] (with `fixed`
/// placeholders besides `per_row` for each item) and about `budget` bytes of bound values each.
/// An item bigger than the budget goes alone.
fn chunks<T>(
    items: &[T],
    per_row: usize,
    fixed: usize,
    budget: usize,
    bytes: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let max_rows = ((MAX_PLACEHOLDERS - fixed) / per_row).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, item) in items.iter().enumerate() {
        let b = bytes(item) + 16 * per_row;
        if i > start && (i - start >= max_rows || size + b > budget) {
            out.push(&items[start..i]);
            start = i;
            size = 0;
        }
        size += b;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}


/// The delete behind [`Store::cancel`] and [`MysqlStore::cancel_in`], on any executor
/// (MariaDB has `DELETE … RETURNING`).
async fn delete<'e>(exec: impl sqlx::MySqlExecutor<'e>, queue: &str, key: &str) -> Result<Option<u64>> {
    let row = sqlx::query("DELETE FROM timers WHERE queue = ? AND `key` = ? RETURNING generation")
        .bind(queue)
        .bind(key)
        .fetch_optional(exec)
        .await
        .map_err(my_err)?;
    row.map(|r| r.try_get::<i64, _>(0).map(|g| g as u64)).transpose().map_err(my_err)
}

/// The update half of every upsert. Generations are reserved before the write (in their own
/// short statement), so two upserts of one key can commit in the opposite order to their
/// generations; the one with the larger generation wins whichever commits last, exactly as if
/// it had been written last, and a stored generation never goes down. `generation` is assigned
/// last: MySQL evaluates the assignments left to right and later ones see earlier results.
const NEWER_WINS: &str = "part = IF(VALUES(generation) > generation, VALUES(part), part), \
     due_at = IF(VALUES(generation) > generation, VALUES(due_at), due_at), \
     payload = IF(VALUES(generation) > generation, VALUES(payload), payload), \
     attempts = IF(VALUES(generation) > generation, 0, attempts), \
     last_error = IF(VALUES(generation) > generation, NULL, last_error), \
     lease_owner = IF(VALUES(generation) > generation, NULL, lease_owner), \
     lease_until = IF(VALUES(generation) > generation, NULL, lease_until), \
     updated_at = IF(VALUES(generation) > generation, VALUES(updated_at), updated_at), \
     generation = GREATEST(generation, VALUES(generation))";

const TIMER_COLUMNS: &str = "queue, `key`, due_at, payload, generation, attempts, last_error, lease_owner, \
                             lease_until, created_at, updated_at";

/// A text column. Read as bytes: sqlx refuses `String` for columns with a binary collation
/// (`ascii_bin`, `utf8mb4_nopad_bin`), which is what every identity column here has.
fn text(r: &MySqlRow, i: usize) -> std::result::Result<String, sqlx::Error> {
    let b: Vec<u8> = r.try_get(i)?;
    String::from_utf8(b).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn opt_text(r: &MySqlRow, i: usize) -> std::result::Result<Option<String>, sqlx::Error> {
    let b: Option<Vec<u8>> = r.try_get(i)?;
    b.map(|b| String::from_utf8(b).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

fn timer_from_row(r: &MySqlRow, now: i64) -> std::result::Result<Timer, sqlx::Error> {
    let lease_owner = opt_text(r, 7)?;
    let lease_until: Option<i64> = r.try_get(8)?;
    let state = match (lease_owner, lease_until) {
        (Some(owner), Some(until)) if until > now => TimerState::InFlight {
            owner,
            lease_until: until,
        },
        _ => TimerState::Pending,
    };
    Ok(Timer {
        queue: text(r, 0)?,
        key: text(r, 1)?,
        due_at: r.try_get(2)?,
        payload: r.try_get(3)?,
        generation: r.try_get::<i64, _>(4)? as u64,
        attempts: r.try_get::<i32, _>(5)?.max(0) as u32,
        last_error: opt_text(r, 6)?,
        state,
        created_at: r.try_get(9)?,
        updated_at: r.try_get(10)?,
    })
}

/// `(queue, key, generation, due_at, payload, attempts)` → a claim.
fn claimed_from_row(r: &MySqlRow) -> std::result::Result<Claimed, sqlx::Error> {
    Ok(Claimed {
        timer: TimerRef {
            queue: text(r, 0)?,
            key: text(r, 1)?,
            generation: r.try_get::<i64, _>(2)? as u64,
            due_at: r.try_get(3)?,
        },
        payload: r.try_get(4)?,
        attempts: r.try_get::<i32, _>(5)?.max(0) as u32,
    })
}

fn ref_from_row(r: &MySqlRow) -> std::result::Result<TimerRef, sqlx::Error> {
    Ok(TimerRef {
        queue: text(r, 0)?,
        key: text(r, 1)?,
        generation: r.try_get::<i64, _>(2)? as u64,
        due_at: r.try_get(3)?,
    })
}

fn rows<T>(
    rows: Vec<MySqlRow>,
    f: impl Fn(&MySqlRow) -> std::result::Result<T, sqlx::Error>,
) -> Result<Vec<T>> {
    rows.iter()
        .map(f)
        .collect::<std::result::Result<_, _>>()
        .map_err(my_err)
}

/// `(?, ?, ?), (?, ?, ?), …`: `rows` row values of `width` placeholders.
fn row_values(rows: usize, width: usize) -> String {
    let one = format!("({})", placeholders(width));
    let mut s = String::with_capacity(rows * (one.len() + 2));
    for i in 0..rows {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&one);
    }
    s
}

/// A derived table `c(q, k, g, <ints…>, e)` of bound rows, for per-row values in a join. The
/// identity columns carry the table's own collations, so the join uses the primary key.
fn derived_rows(rows: usize, ints: &[&str]) -> String {
    let mut s = String::from("(");
    for i in 0..rows {
        let alias = |name: &str| {
            if i == 0 {
                format!(" AS {name}")
            } else {
                String::new()
            }
        };
        if i > 0 {
            s.push_str(" UNION ALL ");
        }
        s.push_str(&format!(
            "SELECT CONVERT(? USING ascii) COLLATE ascii_bin{}, CONVERT(? USING utf8mb4) COLLATE utf8mb4_nopad_bin{}, \
             CAST(? AS SIGNED){}",
            alias("q"),
            alias("k"),
            alias("g")
        ));
        for name in ints {
            s.push_str(&format!(", CAST(? AS SIGNED){}", alias(name)));
        }
        s.push_str(&format!(", CONVERT(? USING utf8mb4){}", alias("e")));
    }
    s.push_str(") c");
    s
}

/// The join of a [`derived_rows`] table `c` with `timers t`, generation fenced.
const JOIN_GENERATION: &str = "t.queue = c.q AND t.`key` = c.k AND t.generation = c.g";

/// Sorted by identity, so every node locks rows in one order (fewer deadlocks).
fn by_identity<'a>(refs: impl Iterator<Item = &'a TimerRef>) -> Vec<&'a TimerRef> {
    let mut v: Vec<&TimerRef> = refs.collect();
    v.sort_unstable_by(|a, b| (&a.queue, &a.key).cmp(&(&b.queue, &b.key)));
    v
}

fn ref_bytes(t: &&TimerRef) -> usize {
    t.queue.len() + t.key.len()
}

/// Claims the locked rows found: one `UPDATE` per chunk of identities.
async fn lease_rows(
    tx: &mut sqlx::MySqlConnection,
    store: &MysqlStore,
    found: &[Claimed],
    owner: &str,
    lease_until: i64,
) -> std::result::Result<(), sqlx::Error> {
    let refs: Vec<&TimerRef> = found.iter().map(|c| &c.timer).collect();
    for chunk in store.chunks(&refs, 2, 2, ref_bytes) {
        let sql = format!(
            "UPDATE timers SET lease_owner = ?, lease_until = ? WHERE (queue, `key`) IN ({})",
            row_values(chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql).bind(owner).bind(lease_until);
        for t in chunk {
            q = q.bind(&t.queue).bind(&t.key);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

impl MysqlStore {
    fn claim_tx<'a>(
        &'a self,
        sorted: Vec<&'a TimerRef>,
        owner: &'a str,
        now: i64,
        lease_until: i64,
    ) -> BoxFut<'a, std::result::Result<Vec<MySqlRow>, sqlx::Error>> {
        Box::pin(async move {
            let mut tx = self.inner.pool.begin().await?;
            let mut found = Vec::new();
            for chunk in self.chunks(&sorted, 3, 2, ref_bytes) {
                let sql = format!(
                    "SELECT queue, `key`, generation, due_at, payload, attempts FROM timers \
                     WHERE (queue, `key`, generation) IN ({}) AND due_at <= ? \
                     AND (lease_until IS NULL OR lease_until <= ?) FOR UPDATE SKIP LOCKED",
                    row_values(chunk.len(), 3)
                );
                let mut q = sqlx::query(&sql);
                for t in chunk {
                    q = q.bind(&t.queue).bind(&t.key).bind(t.generation as i64);
                }
                found.extend(q.bind(now).bind(now).fetch_all(&mut *tx).await?);
            }
            if found.is_empty() {
                tx.rollback().await?;
                return Ok(found);
            }
            let claims = found
                .iter()
                .map(claimed_from_row)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            lease_rows(&mut tx, self, &claims, owner, lease_until).await?;
            tx.commit().await?;
            Ok(found)
        })
    }

    fn claim_due_tx<'a>(
        &'a self,
        now: i64,
        due_before: i64,
        limit: u32,
        owner: &'a str,
        lease_until: i64,
    ) -> BoxFut<'a, std::result::Result<Vec<Claimed>, sqlx::Error>> {
        Box::pin(async move {
            let mut tx = self.inner.pool.begin().await?;
            let found = sqlx::query(
                "SELECT queue, `key`, generation, due_at, payload, attempts FROM timers \
                 WHERE due_at <= ? AND (lease_until IS NULL OR lease_until <= ?) \
                 ORDER BY due_at, queue, `key` LIMIT ? FOR UPDATE SKIP LOCKED",
            )
            .bind(due_before.min(now))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            if found.is_empty() {
                tx.rollback().await?;
                return Ok(Vec::new());
            }
            let claims = found
                .iter()
                .map(claimed_from_row)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            lease_rows(&mut tx, self, &claims, owner, lease_until).await?;
            tx.commit().await?;
            Ok(claims)
        })
    }

    fn schedule_tx<'a>(
        &'a self,
        timers: &'a [TimerSpec],
        first: i64,
        now: i64,
        mut outer: Option<&'a mut sqlx::MySqlConnection>,
    ) -> BoxFut<'a, std::result::Result<(), sqlx::Error>> {
        Box::pin(async move {
            // Rows go in identity order (each keeps the generation of its input position), so
            // two overlapping batches lock rows in one order and cannot deadlock each other.
            let mut indexed: Vec<(usize, &TimerSpec)> = timers.iter().enumerate().collect();
            indexed.sort_unstable_by(|(_, a), (_, b)| (&a.queue, &a.key).cmp(&(&b.queue, &b.key)));
            let chunks = self.chunks(&indexed, 8, 0, |(_, t)| {
                t.queue.len() + t.key.len() + t.payload.len()
            });
            // Inside the caller's transaction (`outer`) every chunk runs on its connection;
            // otherwise several chunks, or a chunk and its outbox notices, get a transaction of
            // their own.
            let outbox = self.inner.outbox;
            let mut tx = if outer.is_none() && (chunks.len() > 1 || outbox) {
                Some(self.inner.pool.begin().await?)
            } else {
                None
            };
            for chunk in chunks {
                let sql = format!(
                    "INSERT INTO timers (queue, `key`, part, due_at, payload, generation, attempts, last_error, \
                     lease_owner, lease_until, created_at, updated_at) VALUES {} \
                     ON DUPLICATE KEY UPDATE {NEWER_WINS}",
                    (0..chunk.len())
                        .map(|_| "(?, ?, ?, ?, ?, ?, 0, NULL, NULL, NULL, ?, ?)")
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let mut q = sqlx::query(&sql);
                for (i, t) in chunk {
                    q = q
                        .bind(&t.queue)
                        .bind(&t.key)
                        .bind(partition_of(&t.queue, &t.key))
                        .bind(t.due_at)
                        .bind(&t.payload)
                        .bind(first + *i as i64)
                        .bind(now)
                        .bind(now);
                }
                match (outer.as_deref_mut(), tx.as_mut()) {
                    (Some(conn), _) => q.execute(conn).await?,
                    (None, Some(tx)) => q.execute(&mut **tx).await?,
                    (None, None) => q.execute(&self.inner.pool).await?,
                };
                if outbox {
                    // Fewer placeholders and bytes per row than the timers themselves: fits.
                    let sql = format!(
                        "INSERT INTO overdue_outbox (queue, `key`, generation, due_at) VALUES {}",
                        row_values(chunk.len(), 4)
                    );
                    let mut q = sqlx::query(&sql);
                    for (i, t) in chunk {
                        q = q.bind(&t.queue).bind(&t.key).bind(first + *i as i64).bind(t.due_at);
                    }
                    match (outer.as_deref_mut(), tx.as_mut()) {
                        (Some(conn), _) => q.execute(conn).await?,
                        (None, Some(tx)) => q.execute(&mut **tx).await?,
                        (None, None) => unreachable!("the outbox always writes in a transaction"),
                    };
                }
            }
            if let Some(tx) = tx {
                tx.commit().await?;
            }
            Ok(())
        })
    }

    fn settle_tx<'a>(
        &'a self,
        batch: &'a [Settlement],
        now: i64,
    ) -> BoxFut<'a, std::result::Result<(), sqlx::Error>> {
        Box::pin(async move {
            let mut done = Vec::new();
            let mut release = Vec::new();
            let mut retry = Vec::new();
            let mut dead = Vec::new();
            for s in batch {
                match s {
                    Settlement::Done(t) => done.push(t),
                    Settlement::Release(t) => release.push(t),
                    Settlement::Retry { .. } => retry.push(s),
                    Settlement::DeadLetter { .. } => dead.push(s),
                }
            }
            let by_timer = |a: &&Settlement, b: &&Settlement| {
                (&a.timer().queue, &a.timer().key).cmp(&(&b.timer().queue, &b.timer().key))
            };
            retry.sort_unstable_by(by_timer);
            dead.sort_unstable_by(by_timer);
            let done = by_identity(done.into_iter());
            let release = by_identity(release.into_iter());
            let settlement_bytes = |s: &&Settlement| {
                let t = s.timer();
                let e = match s {
                    Settlement::Retry { error, .. } | Settlement::DeadLetter { error, .. } => {
                        error.len()
                    }
                    _ => 0,
                };
                t.queue.len() + t.key.len() + e
            };
            let mut tx = self.inner.pool.begin().await?;
            for chunk in self.chunks(&dead, 6, 0, settlement_bytes) {
                // Lock the rows first: the INSERT … SELECT below reads without locks at READ
                // COMMITTED, and the copy must be of exactly the rows the DELETE removes.
                let refs = row_values(chunk.len(), 3);
                let mut lock = String::from(
                    "SELECT generation FROM timers WHERE (queue, `key`, generation) IN (",
                );
                lock.push_str(&refs);
                lock.push_str(") FOR UPDATE");
                let mut q = sqlx::query(&lock);
                for s in chunk {
                    let t = s.timer();
                    q = q.bind(&t.queue).bind(&t.key).bind(t.generation as i64);
                }
                let locked = q.fetch_all(&mut *tx).await?;
                if locked.is_empty() {
                    continue;
                }
                let sql = format!(
                    "INSERT INTO dead_letters (queue, `key`, generation, due_at, payload, attempts, error, failed_at) \
                     SELECT t.queue, t.`key`, t.generation, t.due_at, t.payload, c.a, c.e, c.f \
                     FROM timers t JOIN {} ON {JOIN_GENERATION}",
                    derived_rows(chunk.len(), &["a", "f"])
                );
                let mut q = sqlx::query(&sql);
                for s in chunk {
                    if let Settlement::DeadLetter {
                        timer,
                        attempts,
                        error,
                        failed_at,
                    } = s
                    {
                        q = q
                            .bind(&timer.queue)
                            .bind(&timer.key)
                            .bind(timer.generation as i64)
                            .bind(i64::from(*attempts))
                            .bind(*failed_at)
                            .bind(error);
                    }
                }
                q.execute(&mut *tx).await?;
                let delete =
                    format!("DELETE FROM timers WHERE (queue, `key`, generation) IN ({refs})");
                let mut q = sqlx::query(&delete);
                for s in chunk {
                    let t = s.timer();
                    q = q.bind(&t.queue).bind(&t.key).bind(t.generation as i64);
                }
                q.execute(&mut *tx).await?;
            }
            for chunk in self.chunks(&done, 3, 0, ref_bytes) {
                let sql = format!(
                    "DELETE FROM timers WHERE (queue, `key`, generation) IN ({})",
                    row_values(chunk.len(), 3)
                );
                let mut q = sqlx::query(&sql);
                for t in chunk {
                    q = q.bind(&t.queue).bind(&t.key).bind(t.generation as i64);
                }
                q.execute(&mut *tx).await?;
            }
            for chunk in self.chunks(&release, 3, 0, ref_bytes) {
                let sql = format!(
                    "UPDATE timers SET lease_owner = NULL, lease_until = NULL \
                     WHERE (queue, `key`, generation) IN ({})",
                    row_values(chunk.len(), 3)
                );
                let mut q = sqlx::query(&sql);
                for t in chunk {
                    q = q.bind(&t.queue).bind(&t.key).bind(t.generation as i64);
                }
                q.execute(&mut *tx).await?;
            }
            for chunk in self.chunks(&retry, 6, 1, settlement_bytes) {
                let sql = format!(
                    "UPDATE timers t JOIN {} ON {JOIN_GENERATION} \
                     SET t.due_at = c.d, t.attempts = c.a, t.last_error = c.e, t.lease_owner = NULL, \
                     t.lease_until = NULL, t.updated_at = ?",
                    derived_rows(chunk.len(), &["d", "a"])
                );
                let mut q = sqlx::query(&sql);
                for s in chunk {
                    if let Settlement::Retry {
                        timer,
                        due_at,
                        attempts,
                        error,
                    } = s
                    {
                        q = q
                            .bind(&timer.queue)
                            .bind(&timer.key)
                            .bind(timer.generation as i64)
                            .bind(*due_at)
                            .bind(i64::from(*attempts))
                            .bind(error);
                    }
                }
                q.bind(now).execute(&mut *tx).await?;
                if self.inner.outbox {
                    // The rows this transaction just updated (and holds locked): their new due
                    // times. A stale settlement matches no row and notices nothing.
                    let sql = format!(
                        "INSERT INTO overdue_outbox (queue, `key`, generation, due_at) \
                         SELECT queue, `key`, generation, due_at FROM timers \
                         WHERE (queue, `key`, generation) IN ({}) ORDER BY queue, `key`",
                        row_values(chunk.len(), 3)
                    );
                    let mut q = sqlx::query(&sql);
                    for s in chunk {
                        let t = s.timer();
                        q = q.bind(&t.queue).bind(&t.key).bind(t.generation as i64);
                    }
                    q.execute(&mut *tx).await?;
                }
            }
            tx.commit().await
        })
    }

    /// The `UPDATE` of a reschedule to generation `g`, with its outbox notice in the same
    /// transaction when the outbox is on. Returns the rows changed.
    fn reschedule_tx<'a>(
        &'a self,
        queue: &'a str,
        key: &'a str,
        due_at: i64,
        g: i64,
        now: i64,
    ) -> BoxFut<'a, std::result::Result<u64, sqlx::Error>> {
        Box::pin(async move {
            let update = sqlx::query(
                "UPDATE timers SET due_at = ?, generation = ?, attempts = 0, last_error = NULL, lease_owner = NULL, \
                 lease_until = NULL, updated_at = ? WHERE queue = ? AND `key` = ? AND generation < ?",
            )
            .bind(due_at)
            .bind(g)
            .bind(now)
            .bind(queue)
            .bind(key)
            .bind(g);
            if !self.inner.outbox {
                return Ok(update.execute(&self.inner.pool).await?.rows_affected());
            }
            let mut tx = self.inner.pool.begin().await?;
            let changed = update.execute(&mut *tx).await?.rows_affected();
            if changed > 0 {
                sqlx::query("INSERT INTO overdue_outbox (queue, `key`, generation, due_at) VALUES (?, ?, ?, ?)")
                    .bind(queue)
                    .bind(key)
                    .bind(g)
                    .bind(due_at)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(changed)
        })
    }

    fn replay_tx<'a>(
        &'a self,
        id: i64,
        generation: i64,
        due_at: i64,
        now: i64,
    ) -> BoxFut<'a, std::result::Result<bool, sqlx::Error>> {
        Box::pin(async move {
            let mut tx = self.inner.pool.begin().await?;
            let Some(row) = sqlx::query(
                "DELETE FROM dead_letters WHERE id = ? RETURNING queue, `key`, payload",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            else {
                tx.rollback().await?;
                return Ok(false);
            };
            let queue = text(&row, 0)?;
            let key = text(&row, 1)?;
            let payload: Vec<u8> = row.try_get(2)?;
            sqlx::query(&format!(
                "INSERT INTO timers (queue, `key`, part, due_at, payload, generation, attempts, last_error, \
                 lease_owner, lease_until, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, 0, NULL, NULL, NULL, ?, ?) \
                 ON DUPLICATE KEY UPDATE {NEWER_WINS}"
            ))
            .bind(&queue)
            .bind(&key)
            .bind(partition_of(&queue, &key))
            .bind(due_at)
            .bind(payload)
            .bind(generation)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if self.inner.outbox {
                sqlx::query("INSERT INTO overdue_outbox (queue, `key`, generation, due_at) VALUES (?, ?, ?, ?)")
                    .bind(&queue)
                    .bind(&key)
                    .bind(generation)
                    .bind(due_at)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }
}

#[async_trait]
impl Store for MysqlStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: BACKEND,
            durable: true,
            shared: true,
        }
    }

    async fn schedule(&self, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        for t in &timers {
            self.check_payload(t.payload.len())?;
        }
        let r = self.reserve(timers.len()).await.map_err(my_err);
        let first = self.track(r)?;
        let r = self.schedule_tx(&timers, first, now, None).await.map_err(my_err);
        self.track(r)?;
        Ok((0..timers.len())
            .map(|i| (first + i as i64) as u64)
            .collect())
    }

    async fn cancel(&self, queue: &str, key: &str) -> Result<Option<u64>> {
        let r = delete(&self.inner.pool, queue, key).await;
        self.track(r)
    }

    async fn reschedule(
        &self,
        queue: &str,
        key: &str,
        due_at: i64,
        now: i64,
    ) -> Result<Option<u64>> {
        let r = self.reserve(1).await.map_err(my_err);
        let g = self.track(r)?;
        let r = self.reschedule_tx(queue, key, due_at, g, now).await.map_err(my_err);
        if self.track(r)? > 0 {
            return Ok(Some(g as u64));
        }
        // Nothing moved: either there is no such timer, or an upsert with a newer generation
        // (reserved after ours) committed first — then ours counts as applied and at once
        // superseded, as if it had come first (see NEWER_WINS).
        let exists = sqlx::query("SELECT 1 FROM timers WHERE queue = ? AND `key` = ?")
            .bind(queue)
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(my_err)?;
        Ok(exists.map(|_| g as u64))
    }

    async fn get(&self, queue: &str, key: &str, now: i64) -> Result<Option<Timer>> {
        let r = sqlx::query(&format!(
            "SELECT {TIMER_COLUMNS} FROM timers WHERE queue = ? AND `key` = ?"
        ))
        .bind(queue)
        .bind(key)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(my_err);
        let row = self.track(r)?;
        row.map(|r| timer_from_row(&r, now))
            .transpose()
            .map_err(my_err)
    }

    async fn list(&self, query: &ListQuery, now: i64) -> Result<Vec<Timer>> {
        let mut conds = Vec::new();
        if query.queue.is_some() {
            conds.push("queue = ?");
        }
        if query.due_from.is_some() {
            conds.push("due_at >= ?");
        }
        if query.due_to.is_some() {
            conds.push("due_at <= ?");
        }
        if query.after.is_some() {
            // Expanded: MySQL does not range-scan row-value comparisons.
            conds.push("(due_at > ? OR (due_at = ? AND (queue > ? OR (queue = ? AND `key` > ?))))");
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "SELECT {TIMER_COLUMNS} FROM timers{filter} ORDER BY due_at, queue, `key` LIMIT ?"
        );
        let mut q = sqlx::query(&sql);
        if let Some(queue) = &query.queue {
            q = q.bind(queue);
        }
        if let Some(from) = query.due_from {
            q = q.bind(from);
        }
        if let Some(to) = query.due_to {
            q = q.bind(to);
        }
        if let Some((d, qu, k)) = &query.after {
            q = q.bind(*d).bind(*d).bind(qu).bind(qu).bind(k);
        }
        let r = q
            .bind(i64::from(query.effective_limit()))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(my_err);
        let found = self.track(r)?;
        rows(found, |r| timer_from_row(r, now))
    }

    async fn due_histogram(&self, now: i64) -> Result<DueHistogram> {
        let [minute, hour, day] = DueBuckets::EDGES_MS.map(|e| now.saturating_add(e));
        let r = sqlx::query(
            "SELECT queue, CAST(SUM(due_at <= ?) AS SIGNED), \
             CAST(SUM(due_at > ? AND due_at <= ?) AS SIGNED), CAST(SUM(due_at > ? AND due_at <= ?) AS SIGNED), \
             CAST(SUM(due_at > ? AND due_at <= ?) AS SIGNED), CAST(SUM(due_at > ?) AS SIGNED) \
             FROM timers WHERE lease_until IS NULL OR lease_until <= ? GROUP BY queue ORDER BY queue",
        )
        .bind(now)
        .bind(now)
        .bind(minute)
        .bind(minute)
        .bind(hour)
        .bind(hour)
        .bind(day)
        .bind(day)
        .bind(now)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(my_err);
        let rows = self.track(r)?;
        let queues = rows
            .iter()
            .map(|r| {
                let n = |i: usize| r.try_get::<i64, _>(i).map(|v| v as u64).map_err(my_err);
                Ok(DueBuckets { queue: text(r, 0).map_err(my_err)?, overdue: n(1)?, next_minute: n(2)?, next_hour: n(3)?, next_day: n(4)?, later: n(5)? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DueHistogram { queues, exact: true })
    }

    async fn nodes(&self, _now: i64) -> Result<Vec<NodeLease>> {
        // The database's clock, as the leases and heartbeats are written with it.
        let lease_ms = self.inner.ownership.lease.as_millis() as i64;
        let now = partitions::DB_NOW_MS;
        let r = sqlx::query(&format!(
            "SELECT n.node, CAST(COUNT(p.part) AS SIGNED), CAST(COALESCE(MAX(p.lease_until), 0) AS SIGNED), n.heartbeat_at, \
             CAST(CASE WHEN n.heartbeat_at > {now} - ? THEN 1 ELSE 0 END AS SIGNED) \
             FROM overdue_nodes n LEFT JOIN overdue_partitions p ON p.owner = n.node AND p.lease_until > {now} \
             GROUP BY n.node, n.heartbeat_at ORDER BY n.node"
        ))
            .bind(lease_ms)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(my_err);
        let rows = self.track(r)?;
        rows.iter()
            .map(|r| {
                let id: String = text(r, 0).map_err(my_err)?;
                Ok(NodeLease {
                    this: id == self.inner.ownership.node,
                    id,
                    partitions: r.try_get::<i64, _>(1).map_err(my_err)? as u64,
                    lease_until: r.try_get(2).map_err(my_err)?,
                    heartbeat_at: r.try_get(3).map_err(my_err)?,
                    alive: r.try_get::<i64, _>(4).map_err(my_err)? == 1,
                })
            })
            .collect()
    }

    async fn counts(&self, now: i64) -> Result<Vec<QueueCount>> {
        let r = sqlx::query(
            "SELECT queue, \
             CAST(SUM(CASE WHEN lease_until > ? THEN 0 ELSE 1 END) AS SIGNED), \
             CAST(SUM(CASE WHEN lease_until > ? THEN 1 ELSE 0 END) AS SIGNED) \
             FROM timers GROUP BY queue",
        )
        .bind(now)
        .bind(now)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(my_err);
        let timers = self.track(r)?;
        let dead = sqlx::query("SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(my_err)?;
        let mut out: std::collections::BTreeMap<String, QueueCount> =
            std::collections::BTreeMap::new();
        for r in &timers {
            let queue = text(r, 0).map_err(my_err)?;
            let c = out.entry(queue.clone()).or_insert_with(|| QueueCount {
                queue,
                ..QueueCount::default()
            });
            c.pending = r.try_get::<i64, _>(1).map_err(my_err)? as u64;
            c.in_flight = r.try_get::<i64, _>(2).map_err(my_err)? as u64;
        }
        for r in &dead {
            let queue = text(r, 0).map_err(my_err)?;
            let c = out.entry(queue.clone()).or_insert_with(|| QueueCount {
                queue,
                ..QueueCount::default()
            });
            c.dead = r.try_get::<i64, _>(1).map_err(my_err)? as u64;
        }
        Ok(out.into_values().collect())
    }

    async fn due_refs(
        &self,
        after: Option<&(i64, String, String)>,
        until: i64,
        limit: u32,
    ) -> Result<Vec<TimerRef>> {
        let owned = self.inner.ownership.owned();
        if owned.is_empty() {
            return Ok(Vec::new());
        }
        let all = owned.len() == PARTITIONS as usize;
        let part_filter = if all {
            String::new()
        } else {
            format!(" AND part IN ({})", placeholders(owned.len()))
        };
        let cursor = if after.is_some() {
            "(due_at > ? OR (due_at = ? AND (queue > ? OR (queue = ? AND `key` > ?)))) AND "
        } else {
            ""
        };
        let sql = format!(
            "SELECT queue, `key`, generation, due_at FROM timers WHERE {cursor}due_at <= ?{part_filter} \
             ORDER BY due_at, queue, `key` LIMIT ?"
        );
        let mut q = sqlx::query(&sql);
        if let Some((d, qu, k)) = after {
            q = q.bind(*d).bind(*d).bind(qu).bind(qu).bind(k);
        }
        q = q.bind(until);
        if !all {
            for p in owned.iter() {
                q = q.bind(*p);
            }
        }
        let r = q
            .bind(i64::from(limit))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(my_err);
        let found = self.track(r)?;
        rows(found, ref_from_row)
    }

    async fn claim(
        &self,
        timers: &[TimerRef],
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<Claimed>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let sorted = by_identity(timers.iter());
        let r = self
            .claim_tx(sorted, owner, now, lease_until)
            .await
            .map_err(my_err);
        let found = rows(self.track(r)?, claimed_from_row)?;
        // Hand the claims back in input order.
        let index: HashMap<(&str, &str), usize> = timers
            .iter()
            .enumerate()
            .map(|(i, t)| ((t.queue.as_str(), t.key.as_str()), i))
            .collect();
        let mut out: Vec<(usize, Claimed)> = found
            .into_iter()
            .filter_map(|c| {
                index
                    .get(&(c.timer.queue.as_str(), c.timer.key.as_str()))
                    .copied()
                    .map(|i| (i, c))
            })
            .collect();
        out.sort_unstable_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    async fn claim_due(
        &self,
        now: i64,
        due_before: i64,
        limit: u32,
        owner: &str,
        lease_until: i64,
    ) -> Result<Vec<Claimed>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let r = self
            .claim_due_tx(now, due_before, limit, owner, lease_until)
            .await
            .map_err(my_err);
        let mut found = self.track(r)?;
        found.sort_unstable_by(|a, b| {
            (a.timer.due_at, &a.timer.queue, &a.timer.key).cmp(&(
                b.timer.due_at,
                &b.timer.queue,
                &b.timer.key,
            ))
        });
        Ok(found)
    }

    async fn settle(&self, batch: Vec<Settlement>, now: i64) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let r = self.settle_tx(&batch, now).await.map_err(my_err);
        self.track(r)
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let limit = match query.limit {
            0 => 100,
            n => n.min(10_000),
        };
        let after = query.after_id.unwrap_or(i64::MIN);
        let base = "SELECT id, queue, `key`, generation, due_at, payload, attempts, error, failed_at \
                    FROM dead_letters WHERE id > ?";
        let r = match &query.queue {
            Some(q) => {
                sqlx::query(&format!("{base} AND queue = ? ORDER BY id LIMIT ?"))
                    .bind(after)
                    .bind(q)
                    .bind(i64::from(limit))
                    .fetch_all(&self.inner.pool)
                    .await
            }
            None => {
                sqlx::query(&format!("{base} ORDER BY id LIMIT ?"))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.inner.pool)
                    .await
            }
        }
        .map_err(my_err);
        rows(self.track(r)?, |r| {
            Ok(DeadLetter {
                id: r.try_get(0)?,
                queue: text(r, 1)?,
                key: text(r, 2)?,
                generation: r.try_get::<i64, _>(3)? as u64,
                due_at: r.try_get(4)?,
                payload: r.try_get(5)?,
                attempts: r.try_get::<i32, _>(6)?.max(0) as u32,
                error: opt_text(r, 7)?.unwrap_or_default(),
                failed_at: r.try_get(8)?,
            })
        })
    }

    async fn replay(&self, id: i64, due_at: i64, now: i64) -> Result<Option<u64>> {
        // The generation is reserved before the transaction (its own autocommit statement); if
        // there is no such dead letter it is simply never used.
        let r = self.reserve(1).await.map_err(my_err);
        let g = self.track(r)?;
        let r = self.replay_tx(id, g, due_at, now).await.map_err(my_err);
        Ok(self.track(r)?.then_some(g as u64))
    }

    fn ownership_epoch(&self) -> u64 {
        self.inner.ownership.epoch()
    }

    async fn outbox_fetch(&self, limit: u32) -> Result<Vec<(i64, TimerRef)>> {
        self.require_outbox()?;
        // A plain consistent read (no locks): relays on several nodes may read the same rows at
        // once (and publish them twice, which the generation fence makes harmless) without
        // waiting for each other or for an acknowledgement in progress.
        let r = sqlx::query(
            "SELECT seq, queue, `key`, generation, due_at FROM overdue_outbox ORDER BY seq LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(my_err);
        rows(self.track(r)?, |r| {
            Ok((
                r.try_get::<i64, _>(0)?,
                TimerRef {
                    queue: text(r, 1)?,
                    key: text(r, 2)?,
                    generation: r.try_get::<i64, _>(3)? as u64,
                    due_at: r.try_get(4)?,
                },
            ))
        })
    }

    async fn outbox_ack(&self, seqs: &[i64]) -> Result<()> {
        self.require_outbox()?;
        // Ascending, so two nodes acknowledging overlapping rows lock them in one order.
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        seqs.dedup();
        for chunk in self.chunks(&seqs, 1, 0, |_| 8) {
            let sql = format!(
                "DELETE FROM overdue_outbox WHERE seq IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for seq in chunk {
                q = q.bind(*seq);
            }
            let r = q.execute(&self.inner.pool).await.map_err(my_err);
            self.track(r)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_split_from_the_driver_url() {
        let (o, d) =
            MysqlOptions::from_url("mysql://u:p@127.0.0.1:3306/test?ssl-mode=disabled&pool=4&node=n1&partition_lease_ms=900")
                .expect("valid");
        assert_eq!((o.node.pool, o.node.node.as_deref()), (4, Some("n1")));
        assert_eq!(o.node.partition_lease, Duration::from_millis(900));
        assert_eq!(d, "mysql://u:p@127.0.0.1:3306/test?ssl-mode=disabled");
        let (o, d) = MysqlOptions::from_url("mysql://127.0.0.1/test").expect("valid");
        assert_eq!(
            (o.node.pool, o.node.node, d.as_str()),
            (DEFAULT_POOL, None, "mysql://127.0.0.1/test")
        );
        assert_eq!(o.node.partition_lease, DEFAULT_PARTITION_LEASE);
        assert!(!o.outbox, "the outbox is off by default");
    }

    #[test]
    fn the_outbox_parameter_is_ours_not_the_drivers() {
        for (v, on) in [("true", true), ("1", true), ("on", true), ("false", false), ("0", false), ("off", false)] {
            let (o, d) = MysqlOptions::from_url(&format!("mysql://h/db?outbox={v}&ssl-mode=disabled")).expect(v);
            assert_eq!(o.outbox, on, "outbox={v}");
            assert_eq!(d, "mysql://h/db?ssl-mode=disabled");
        }
    }

    #[test]
    fn bad_url_parameters_are_clear_errors() {
        for (url, needle) in [
            ("postgres://x/db", "does not start with mysql://"),
            ("mysql://u:secret@h:3306", "names no database"),
            ("mysql://h/?pool=2", "names no database"),
            ("mysql://h/db?schema=abc", "a schema is a database"),
            ("mysql://h/db?pool=0", "pool"),
            ("mysql://h/db?pool=x", "pool"),
            ("mysql://h/db?pool=1001", "pool"),
            ("mysql://h/db?partition_lease_ms=10", "partition_lease_ms"),
            ("mysql://h/db?partition_lease_ms=abc", "partition_lease_ms"),
            ("mysql://h/db?node=", "node"),
            ("mysql://h/db?outbox=yes", "outbox=\"yes\" must be true or false"),
            ("mysql://u:secret@h/db?outbox=", "outbox"),
        ] {
            let e = MysqlOptions::from_url(url).expect_err(url).to_string();
            assert!(
                e.contains(needle) && e.starts_with("invalid configuration: invalid mysql url"),
                "{url}: {e}"
            );
            assert!(!e.contains("secret"), "{url}: password leaked: {e}");
        }
    }

    #[test]
    fn passwords_are_redacted_in_messages() {
        assert_eq!(
            redact("mysql://u:secret@h:3306/db"),
            "mysql://u:***@h:3306/db"
        );
        assert_eq!(
            redact("mysql://u:secret@h:3306/db?node=a@b"),
            "mysql://u:***@h:3306/db?node=a@b"
        );
        assert_eq!(redact("mysql://u@h/db"), "mysql://u@h/db");
        assert_eq!(redact("mysql://h/db"), "mysql://h/db");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_config_error_without_the_password() {
        // Port 9 (discard) on loopback: nothing listens there.
        let e = MysqlStore::open_url("mysql://u:secret@127.0.0.1:9/db")
            .await
            .expect_err("nothing listens");
        let s = e.to_string();
        assert!(matches!(e, Error::Config(_)), "{s}");
        assert!(
            s.contains("mysql at mysql://u:***@127.0.0.1:9/db") && !s.contains("secret"),
            "{s}"
        );
    }

    #[test]
    fn errors_map_to_transient_or_not() {
        assert!(my_err(sqlx::Error::PoolTimedOut).is_transient());
        assert!(
            my_err(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset
            )))
            .is_transient()
        );
        assert!(!my_err(sqlx::Error::RowNotFound).is_transient());
        for n in [1205, 1213, 1040, 1927, 2013] {
            assert!(transient_db(Some(n), "HY000"), "{n}");
        }
        assert!(transient_db(None, "08S01") && transient_db(Some(9999), "40001"));
        for n in [1062, 1146, 1153, 1406] {
            assert!(!transient_db(Some(n), "23000"), "{n}");
        }
    }

    #[test]
    fn chunks_by_rows_placeholders_and_bytes() {
        let items: Vec<usize> = (0..30_000).collect();
        let by_placeholders = chunks(&items, 3, 2, usize::MAX, |_| 0);
        assert_eq!(
            by_placeholders.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![21_844, 8_156]
        );
        let by_bytes = chunks(&items[..10], 1, 0, 100, |_| 34);
        assert_eq!(
            by_bytes.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![2, 2, 2, 2, 2]
        );
        let huge = chunks(&items[..3], 1, 0, 10, |_| 1000);
        assert_eq!(huge.len(), 3, "an item over the budget goes alone");
        assert!(chunks(&items[..0], 1, 0, 10, |_| 1).is_empty());
        let rows = row_values(2, 3);
        assert_eq!(rows, "(?, ?, ?), (?, ?, ?)");
        let d = derived_rows(2, &["a"]);
        assert_eq!(d.matches('?').count(), 2 * 5);
        assert!(
            d.contains(" AS q")
                && d.contains(" AS a")
                && d.contains(" AS e")
                && d.contains("UNION ALL")
        );
    }
}
