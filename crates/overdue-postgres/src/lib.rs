//! # overdue-postgres
//!
//! [`PgStore`]: timers in a PostgreSQL table, shared by any number of overdue nodes.
//!
//! ## What it guarantees
//!
//! - **Durable on return.** Every write is one statement or one transaction that has committed
//!   when the call returns (at the server's `synchronous_commit`).
//! - **The claim contract** of `overdue_core::store`, in one conditional `UPDATE … RETURNING`
//!   per batch: a row is claimed only if its generation matches, `due_at <= now` and its lease
//!   is empty or expired. The rows are picked `FOR UPDATE SKIP LOCKED`: of two nodes claiming
//!   the same row at once, one locks it and the other skips it without waiting, and a locked
//!   row is re-checked on its newest committed version, so exactly one claim wins.
//! - **The scheduled scan done right.** `claim_due` (the `scan` trigger and the backstop) takes
//!   due rows in `(due_at, queue, key)` order with `FOR UPDATE SKIP LOCKED`: scanners running at
//!   once on several nodes take disjoint rows and never wait for each other.
//! - **Generations** come from one `SEQUENCE`, shared by every node: never handed out twice.
//! - **Many nodes.** Nodes split the *wake-ups* by partition leases (see [`partitions`]); the
//!   claim decides who *runs*. A node that dies stops renewing: its partitions move to the
//!   others within the partition lease, and its claimed rows are fired by another node once
//!   their claim lease (the engine's `lease`) expires.
//! - **Batched.** `schedule`, `claim` and `settle` send one statement per batch (arrays bound
//!   with `UNNEST`), so a round trip carries up to a thousand timers.
//! - **Connection loss** surfaces as transient store errors (the engine retries with backoff);
//!   the pool reconnects by itself when the server is back. [`PgStore::healthy`] tells whether
//!   the last round trip worked.
//!
//! ## URL
//!
//! `postgres://[user[:password]@]host[:port]/database[?schema=NAME&pool=N&node=NAME&partition_lease_ms=MS&outbox=BOOL]`
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `schema` | schema (created if missing) that holds overdue's tables; `[a-z0-9_]`, at most 63 | the connection's `search_path` (normally `public`) |
//! | `pool` | most connections this node opens | 16 |
//! | `node` | name of this node in partition leases; a node restarted under the same name takes its partitions back at once | `<host>-<pid>-<random>` |
//! | `partition_lease_ms` | how long a partition lease lasts without renewal (renewed every third of it) | 10000 |
//! | `outbox` | `true` (or `1`, `on`) to record an outbox notice with every upsert, for an external trigger (RabbitMQ, Kafka, Redis key expiry, …); `false` (`0`, `off`) not to | `false` |
//!
//! Every other parameter goes to the driver (`sslmode`, `application_name`, …).
//!
//! ## Outbox
//!
//! With `outbox=true` ([`PgOptions::outbox`]) the store can serve an external trigger (see
//! `overdue_core::trigger`): every write that gives a timer a new generation or a new due time
//! — `schedule` (and [`PgStore::schedule_in`] on the caller's connection), `reschedule`,
//! `replay` and a retry's settlement — also inserts a notice `(seq, queue, key, generation,
//! due_at)` into `overdue_outbox`, in the same statement (a data-modifying CTE), so the notice
//! commits or rolls back with the timer. `seq` is a `BIGSERIAL`: never handed out twice.
//! `outbox_fetch` is a plain read in `seq` order: relays on several nodes may read the same rows
//! at once without waiting for each other and publish them twice, which the generation fence
//! makes harmless; `outbox_ack` deletes the given rows (unknown ones are ignored). With the
//! outbox off (the default) no notice is written and the upserts are the plain statements.

pub mod partitions;
mod schema;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use overdue_core::{
    Capabilities, Claimed, DeadLetter, DeadLetterQuery, DueBuckets, DueHistogram, Error, ListQuery, NodeLease, QueueCount, Result, Settlement, Store,
    Timer, TimerRef, TimerSpec, TimerState,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

pub use self::partitions::{PARTITIONS, partition_of};
use overdue_core::shared::redact;

use self::partitions::Ownership;
pub use self::schema::LATEST_VERSION;

/// The backend name in errors and capabilities.
pub(crate) const BACKEND: &str = "postgres";
pub use overdue_core::shared::{DEFAULT_PARTITION_LEASE, DEFAULT_POOL, MIN_PARTITION_LEASE, NodeOptions};
/// How long opening waits for a connection before failing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits for a pooled connection before failing (transiently). While the server
/// is down, this is how soon callers hear of it; the engine then retries with backoff.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// How to open a [`PgStore`]; [`PgOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// Schema holding the tables; `None` uses the connection's `search_path`.
    pub schema: Option<String>,
    /// Pool size, node name and partition lease.
    pub node: NodeOptions,
    /// Record a notice in `overdue_outbox` with every upsert, for an external trigger's relay
    /// (see `overdue_core::trigger`). Default off: the in-process triggers need no outbox. URL:
    /// `?outbox=true`.
    pub outbox: bool,
}

impl PgOptions {
    /// Splits overdue's own parameters off a `postgres://` URL; returns them and the URL for the
    /// driver.
    pub fn from_url(url: &str) -> Result<(PgOptions, String)> {
        let bad = |m: String| Error::Config(format!("invalid postgres url: {m}"));
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad(format!("{:?} does not start with postgres://", redact(url))));
        }
        let mut opts = PgOptions::default();
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == "schema" {
                let ok = !v.is_empty()
                    && v.len() <= 63
                    && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    && !v.as_bytes()[0].is_ascii_digit();
                if !ok {
                    return Err(bad(format!(
                        "schema {v:?} must be 1-63 characters of a-z, 0-9 and _, not starting with a digit"
                    )));
                }
                opts.schema = Some(v.to_owned());
            } else if k == "outbox" {
                opts.outbox = overdue_core::shared::url_flag("postgres", k, v)?;
            } else if !opts.node.take("postgres", k, v)? {
                rest.push(pair);
            }
        }
        let driver = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
        Ok((opts, driver))
    }
}

/// Turns a driver error into a store error; connection trouble, pool exhaustion, deadlocks and
/// serialisation failures are transient.
pub(crate) fn pg_err(e: sqlx::Error) -> Error {
    let transient = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || c.starts_with("40") || c.starts_with("53") || c.starts_with("57P")
        }),
        _ => false,
    };
    let message = match &e {
        sqlx::Error::Database(db) => format!("{} ({})", db.message(), db.code().unwrap_or_default()),
        other => other.to_string(),
    };
    Error::store(BACKEND, message, transient, e)
}

struct Inner {
    pool: PgPool,
    /// Write a notice into `overdue_outbox` with every upsert.
    outbox: bool,
    ownership: Ownership,
    healthy: AtomicBool,
    heartbeat: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeat.get_mut().take() {
            task.abort();
        }
    }
}

/// Timers in PostgreSQL. Cheap to clone; clones share one pool. See the crate docs.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("node", &self.inner.ownership.node)
            .field("partitions", &self.inner.ownership.owned().len())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Opens the store a `postgres://` URL names (see the crate docs for its parameters).
    pub async fn open_url(url: &str) -> Result<PgStore> {
        let (opts, driver) = PgOptions::from_url(url)?;
        PgStore::open(&driver, opts).await
    }

    /// Connects, migrates, and takes this node's first share of the partitions before
    /// returning, so a single node owns every partition from its first call.
    pub async fn open(driver_url: &str, opts: PgOptions) -> Result<PgStore> {
        if opts.node.partition_lease < MIN_PARTITION_LEASE {
            return Err(Error::Config(format!(
                "partition lease {:?} is below the minimum of {MIN_PARTITION_LEASE:?}",
                opts.node.partition_lease
            )));
        }
        let mut connect: PgConnectOptions = driver_url
            .parse()
            .map_err(|e: sqlx::Error| Error::Config(format!("invalid postgres url: {e}")))?;
        if let Some(schema) = &opts.schema {
            connect = connect.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(opts.node.pool)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(connect.clone());
        let pool = match tokio::time::timeout(CONNECT_TIMEOUT, pool).await {
            Ok(Ok(pool)) => pool,
            Ok(Err(e)) => {
                let e = pg_err(e);
                return Err(Error::Config(format!("cannot connect to postgres at {}: {e}", redact(driver_url))));
            }
            Err(_) => return Err(Error::Config(format!("connecting to postgres at {} timed out", redact(driver_url)))),
        };
        schema::migrate(&pool, opts.schema.as_deref()).await?;
        let node = opts.node.node_name();
        let inner = Arc::new(Inner {
            pool,
            outbox: opts.outbox,
            ownership: Ownership::new(node, opts.node.partition_lease),
            healthy: AtomicBool::new(true),
            heartbeat: parking_lot::Mutex::new(None),
        });
        inner.ownership.rebalance(&inner.pool).await?;
        let task = overdue_core::shared::spawn_heartbeat(inner.ownership.heartbeat(), Arc::downgrade(&inner), |inner| {
            Box::pin(async move {
                let round = inner.ownership.rebalance(&inner.pool).await;
                inner.healthy.store(round.is_ok(), Ordering::Relaxed);
                if let Err(e) = round {
                    tracing::warn!(error = %e, "postgres partition heartbeat failed; retrying");
                }
            })
        });
        *inner.heartbeat.lock() = Some(task);
        Ok(PgStore { inner })
    }

    /// The pool, for callers that write their own rows in the same database (the order service).
    pub fn pool(&self) -> &PgPool {
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
        Ok(self.inner.ownership.rebalance(&self.inner.pool).await?.to_vec())
    }

    /// Gives this node's partitions back and stops its heartbeat, so the other nodes take them
    /// over at their next round instead of after the lease. Call on graceful shutdown.
    pub async fn close(&self) -> Result<()> {
        if let Some(task) = self.inner.heartbeat.lock().take() {
            task.abort();
        }
        self.inner.ownership.release_all(&self.inner.pool).await
    }

    /// Schedules `timers` inside the caller's transaction (`conn` is a `Transaction` or a
    /// connection with one open): they commit or roll back with the caller's own rows. This is
    /// how the order service writes an order and its close timer atomically. Same semantics as
    /// [`Store::schedule`]; the caller should hand the returned refs to `Engine::track` after
    /// its commit so the wheel hears of them at once.
    pub async fn schedule_in(&self, conn: &mut sqlx::PgConnection, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        let r = upsert(conn, timers, now, self.inner.outbox).await;
        self.track(r)
    }

    /// Deletes a timer inside the caller's transaction (see [`PgStore::schedule_in`]); the
    /// generation it had, if it existed.
    pub async fn cancel_in(&self, conn: &mut sqlx::PgConnection, queue: &str, key: &str) -> Result<Option<u64>> {
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
            "the postgres store was opened without its outbox; an external trigger needs \
             PgOptions { outbox: true, .. } (URL parameter outbox=true)"
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
}

const TIMER_COLUMNS: &str = "queue, key, due_at, payload, generation, attempts, last_error, lease_owner, \
                             lease_until, created_at, updated_at";

fn timer_from_row(r: &PgRow, now: i64) -> std::result::Result<Timer, sqlx::Error> {
    let lease_owner: Option<String> = r.try_get(7)?;
    let lease_until: Option<i64> = r.try_get(8)?;
    let state = match (lease_owner, lease_until) {
        (Some(owner), Some(until)) if until > now => TimerState::InFlight { owner, lease_until: until },
        _ => TimerState::Pending,
    };
    Ok(Timer {
        queue: r.try_get(0)?,
        key: r.try_get(1)?,
        due_at: r.try_get(2)?,
        payload: r.try_get(3)?,
        generation: r.try_get::<i64, _>(4)? as u64,
        attempts: r.try_get::<i32, _>(5)?.max(0) as u32,
        last_error: r.try_get(6)?,
        state,
        created_at: r.try_get(9)?,
        updated_at: r.try_get(10)?,
    })
}

/// `(queue, key, generation, due_at, payload, attempts)` → a claim.
fn claimed_from_row(r: &PgRow) -> std::result::Result<Claimed, sqlx::Error> {
    Ok(Claimed {
        timer: TimerRef {
            queue: r.try_get(0)?,
            key: r.try_get(1)?,
            generation: r.try_get::<i64, _>(2)? as u64,
            due_at: r.try_get(3)?,
        },
        payload: r.try_get(4)?,
        attempts: r.try_get::<i32, _>(5)?.max(0) as u32,
    })
}

fn ref_from_row(r: &PgRow) -> std::result::Result<TimerRef, sqlx::Error> {
    Ok(TimerRef {
        queue: r.try_get(0)?,
        key: r.try_get(1)?,
        generation: r.try_get::<i64, _>(2)? as u64,
        due_at: r.try_get(3)?,
    })
}

fn rows<T>(rows: Vec<PgRow>, f: impl Fn(&PgRow) -> std::result::Result<T, sqlx::Error>) -> Result<Vec<T>> {
    rows.iter().map(f).collect::<std::result::Result<_, _>>().map_err(pg_err)
}

/// Columns of a batch of timer references, for `UNNEST`.
struct RefArrays {
    queues: Vec<String>,
    keys: Vec<String>,
    generations: Vec<i64>,
}

impl RefArrays {
    fn of<'a>(refs: impl Iterator<Item = &'a TimerRef>) -> RefArrays {
        let mut a = RefArrays { queues: Vec::new(), keys: Vec::new(), generations: Vec::new() };
        for r in refs {
            a.queues.push(r.queue.clone());
            a.keys.push(r.key.clone());
            a.generations.push(r.generation as i64);
        }
        a
    }
}

/// The join of an `UNNEST`ed batch `c(queue, key, generation, …)` with `timers t`, generation
/// fenced. The `COLLATE "C"` matches the columns' collation.
const JOIN_GENERATION: &str =
    "t.queue = c.queue COLLATE \"C\" AND t.key = c.key COLLATE \"C\" AND t.generation = c.generation";

/// The batch upsert: one row per input, written in identity order.
const UPSERT: &str = "INSERT INTO timers (queue, key, part, due_at, payload, generation, attempts, last_error, \
     lease_owner, lease_until, created_at, updated_at) \
     SELECT q, k, p, d, pl, nextval('overdue_generation'), 0, NULL, NULL, NULL, $6, $6 \
     FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::bytea[]) AS u(q, k, p, d, pl) \
     ORDER BY q COLLATE \"C\", k COLLATE \"C\" \
     ON CONFLICT (queue, key) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload, \
     generation = nextval('overdue_generation'), attempts = 0, last_error = NULL, lease_owner = NULL, \
     lease_until = NULL, updated_at = EXCLUDED.updated_at \
     RETURNING queue, key, generation";

/// [`UPSERT`] plus one outbox notice per written row, in the same statement.
const UPSERT_WITH_OUTBOX: &str = "WITH up AS (INSERT INTO timers (queue, key, part, due_at, payload, generation, attempts, \
     last_error, lease_owner, lease_until, created_at, updated_at) \
     SELECT q, k, p, d, pl, nextval('overdue_generation'), 0, NULL, NULL, NULL, $6, $6 \
     FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::bytea[]) AS u(q, k, p, d, pl) \
     ORDER BY q COLLATE \"C\", k COLLATE \"C\" \
     ON CONFLICT (queue, key) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload, \
     generation = nextval('overdue_generation'), attempts = 0, last_error = NULL, lease_owner = NULL, \
     lease_until = NULL, updated_at = EXCLUDED.updated_at \
     RETURNING queue, key, generation, due_at), \
     notice AS (INSERT INTO overdue_outbox (queue, key, generation, due_at) \
     SELECT queue, key, generation, due_at FROM up ORDER BY queue COLLATE \"C\", key COLLATE \"C\") \
     SELECT queue, key, generation FROM up";

/// The upsert behind [`Store::schedule`] and [`PgStore::schedule_in`], on any executor.
async fn upsert<'e>(exec: impl sqlx::PgExecutor<'e>, timers: Vec<TimerSpec>, now: i64, outbox: bool) -> Result<Vec<u64>> {
    if timers.is_empty() {
        return Ok(Vec::new());
    }
    let n = timers.len();
    let mut queues = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut parts = Vec::with_capacity(n);
    let mut dues = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for t in timers {
        parts.push(partition_of(&t.queue, &t.key));
        dues.push(t.due_at);
        queues.push(t.queue);
        keys.push(t.key);
        payloads.push(t.payload);
    }
    // Rows are written in identity order (two overlapping batches lock in the same order, so
    // they cannot deadlock), and a replaced row takes its generation from the sequence
    // *after* its row lock is held, so concurrent upserts of one key store generations in
    // commit order: a stored generation never goes down.
    let r = sqlx::query(if outbox { UPSERT_WITH_OUTBOX } else { UPSERT })
    .bind(&queues)
    .bind(&keys)
    .bind(&parts)
    .bind(&dues)
    .bind(&payloads)
    .bind(now)
    .fetch_all(exec)
    .await
    .map_err(pg_err);
    let returned = r?;
    let mut by_id: HashMap<(String, String), u64> = HashMap::with_capacity(n);
    for r in &returned {
        let q: String = r.try_get(0).map_err(pg_err)?;
        let k: String = r.try_get(1).map_err(pg_err)?;
        let g: i64 = r.try_get(2).map_err(pg_err)?;
        by_id.insert((q, k), g as u64);
    }
    queues
        .into_iter()
        .zip(keys)
        .map(|(q, k)| {
            by_id.get(&(q, k)).copied().ok_or_else(|| {
                Error::Store {
                    backend: BACKEND,
                    message: "an upserted timer was not returned (duplicate identity in the batch?)".into(),
                    transient: false,
                    source: None,
                }
            })
        })
        .collect()
}

/// The delete behind [`Store::cancel`] and [`PgStore::cancel_in`], on any executor.
async fn delete<'e>(exec: impl sqlx::PgExecutor<'e>, queue: &str, key: &str) -> Result<Option<u64>> {
    let row = sqlx::query("DELETE FROM timers WHERE queue = $1 AND key = $2 RETURNING generation")
        .bind(queue)
        .bind(key)
        .fetch_optional(exec)
        .await
        .map_err(pg_err)?;
    row.map(|r| r.try_get::<i64, _>(0).map(|g| g as u64)).transpose().map_err(pg_err)
}

#[async_trait]
impl Store for PgStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { name: BACKEND, durable: true, shared: true }
    }

    async fn schedule(&self, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        let r = upsert(&self.inner.pool, timers, now, self.inner.outbox).await;
        self.track(r)
    }

    async fn cancel(&self, queue: &str, key: &str) -> Result<Option<u64>> {
        let r = delete(&self.inner.pool, queue, key).await;
        self.track(r)
    }

    async fn reschedule(&self, queue: &str, key: &str, due_at: i64, now: i64) -> Result<Option<u64>> {
        const MOVE: &str = "UPDATE timers SET due_at = $3, generation = nextval('overdue_generation'), attempts = 0, \
             last_error = NULL, lease_owner = NULL, lease_until = NULL, updated_at = $4 \
             WHERE queue = $1 AND key = $2";
        let sql = if self.inner.outbox {
            format!(
                "WITH up AS ({MOVE} RETURNING queue, key, generation, due_at), \
                 notice AS (INSERT INTO overdue_outbox (queue, key, generation, due_at) \
                 SELECT queue, key, generation, due_at FROM up) \
                 SELECT generation FROM up"
            )
        } else {
            format!("{MOVE} RETURNING generation")
        };
        let r = sqlx::query(&sql)
        .bind(queue)
        .bind(key)
        .bind(due_at)
        .bind(now)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(pg_err);
        let row = self.track(r)?;
        row.map(|r| r.try_get::<i64, _>(0).map(|g| g as u64)).transpose().map_err(pg_err)
    }

    async fn get(&self, queue: &str, key: &str, now: i64) -> Result<Option<Timer>> {
        let r = sqlx::query(&format!("SELECT {TIMER_COLUMNS} FROM timers WHERE queue = $1 AND key = $2"))
            .bind(queue)
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg_err);
        let row = self.track(r)?;
        row.map(|r| timer_from_row(&r, now)).transpose().map_err(pg_err)
    }

    async fn list(&self, query: &ListQuery, now: i64) -> Result<Vec<Timer>> {
        let mut conds = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if query.queue.is_some() {
            conds.push(format!("queue = {}", next()));
        }
        if query.due_from.is_some() {
            conds.push(format!("due_at >= {}", next()));
        }
        if query.due_to.is_some() {
            conds.push(format!("due_at <= {}", next()));
        }
        if query.after.is_some() {
            let (d, q, k) = (next(), next(), next());
            conds.push(format!("(due_at, queue, key) > ({d}, {q}, {k})"));
        }
        let limit = next();
        let filter = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
        let sql = format!("SELECT {TIMER_COLUMNS} FROM timers{filter} ORDER BY due_at, queue, key LIMIT {limit}");
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
            q = q.bind(*d).bind(qu).bind(k);
        }
        let r = q.bind(i64::from(query.effective_limit())).fetch_all(&self.inner.pool).await.map_err(pg_err);
        let found = self.track(r)?;
        rows(found, |r| timer_from_row(r, now))
    }

    async fn due_histogram(&self, now: i64) -> Result<DueHistogram> {
        let [minute, hour, day] = DueBuckets::EDGES_MS.map(|e| now.saturating_add(e));
        let r = sqlx::query(
            "SELECT queue, COUNT(*) FILTER (WHERE due_at <= $1), \
             COUNT(*) FILTER (WHERE due_at > $1 AND due_at <= $2), COUNT(*) FILTER (WHERE due_at > $2 AND due_at <= $3), \
             COUNT(*) FILTER (WHERE due_at > $3 AND due_at <= $4), COUNT(*) FILTER (WHERE due_at > $4) \
             FROM timers WHERE lease_until IS NULL OR lease_until <= $1 GROUP BY queue ORDER BY queue",
        )
        .bind(now)
        .bind(minute)
        .bind(hour)
        .bind(day)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(pg_err);
        let rows = self.track(r)?;
        let queues = rows
            .iter()
            .map(|r| {
                let n = |i: usize| r.try_get::<i64, _>(i).map(|v| v as u64).map_err(pg_err);
                Ok(DueBuckets { queue: r.try_get(0).map_err(pg_err)?, overdue: n(1)?, next_minute: n(2)?, next_hour: n(3)?, next_day: n(4)?, later: n(5)? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DueHistogram { queues, exact: true })
    }

    async fn nodes(&self, _now: i64) -> Result<Vec<NodeLease>> {
        // The database's clock, as the leases and heartbeats are written with it.
        let lease_ms = self.inner.ownership.lease.as_millis() as i64;
        let now = partitions::DB_NOW_MS;
        let r = sqlx::query(&format!(
            "SELECT n.node, COUNT(p.part), COALESCE(MAX(p.lease_until), 0), n.heartbeat_at, \
             (CASE WHEN n.heartbeat_at > {now} - $1 THEN 1 ELSE 0 END)::bigint \
             FROM overdue_nodes n LEFT JOIN overdue_partitions p ON p.owner = n.node AND p.lease_until > {now} \
             GROUP BY n.node, n.heartbeat_at ORDER BY n.node"
        ))
            .bind(lease_ms)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg_err);
        let rows = self.track(r)?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get::<String, _>(0).map_err(pg_err)?;
                Ok(NodeLease {
                    this: id == self.inner.ownership.node,
                    id,
                    partitions: r.try_get::<i64, _>(1).map_err(pg_err)? as u64,
                    lease_until: r.try_get(2).map_err(pg_err)?,
                    heartbeat_at: r.try_get(3).map_err(pg_err)?,
                    alive: r.try_get::<i64, _>(4).map_err(pg_err)? == 1,
                })
            })
            .collect()
    }

    async fn counts(&self, now: i64) -> Result<Vec<QueueCount>> {
        let r = sqlx::query(
            "SELECT queue, \
             COUNT(*) FILTER (WHERE lease_until IS NULL OR lease_until <= $1), \
             COUNT(*) FILTER (WHERE lease_until > $1) \
             FROM timers GROUP BY queue",
        )
        .bind(now)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(pg_err);
        let timers = self.track(r)?;
        let dead = sqlx::query("SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg_err)?;
        let mut out: std::collections::BTreeMap<String, QueueCount> = std::collections::BTreeMap::new();
        for r in &timers {
            let queue: String = r.try_get(0).map_err(pg_err)?;
            let c = out.entry(queue.clone()).or_insert_with(|| QueueCount { queue, ..QueueCount::default() });
            c.pending = r.try_get::<i64, _>(1).map_err(pg_err)? as u64;
            c.in_flight = r.try_get::<i64, _>(2).map_err(pg_err)? as u64;
        }
        for r in &dead {
            let queue: String = r.try_get(0).map_err(pg_err)?;
            let c = out.entry(queue.clone()).or_insert_with(|| QueueCount { queue, ..QueueCount::default() });
            c.dead = r.try_get::<i64, _>(1).map_err(pg_err)? as u64;
        }
        Ok(out.into_values().collect())
    }

    async fn due_refs(&self, after: Option<&(i64, String, String)>, until: i64, limit: u32) -> Result<Vec<TimerRef>> {
        let owned = self.inner.ownership.owned();
        if owned.is_empty() {
            return Ok(Vec::new());
        }
        let all = owned.len() == PARTITIONS as usize;
        let part_filter = if all { "" } else { " AND part = ANY($1)" };
        let r = match after {
            Some((d, q, k)) => {
                sqlx::query(&format!(
                    "SELECT queue, key, generation, due_at FROM timers \
                     WHERE (due_at, queue, key) > ($2, $3, $4) AND due_at <= $5{part_filter} \
                     ORDER BY due_at, queue, key LIMIT $6"
                ))
                .bind(&owned[..])
                .bind(*d)
                .bind(q)
                .bind(k)
                .bind(until)
                .bind(i64::from(limit))
                .fetch_all(&self.inner.pool)
                .await
            }
            None => {
                sqlx::query(&format!(
                    "SELECT queue, key, generation, due_at FROM timers WHERE due_at <= $2{part_filter} \
                     ORDER BY due_at, queue, key LIMIT $3"
                ))
                .bind(&owned[..])
                .bind(until)
                .bind(i64::from(limit))
                .fetch_all(&self.inner.pool)
                .await
            }
        }
        .map_err(pg_err);
        let found = self.track(r)?;
        rows(found, ref_from_row)
    }

    async fn claim(&self, timers: &[TimerRef], owner: &str, now: i64, lease_until: i64) -> Result<Vec<Claimed>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        // Lock rows in one order on every node, so two overlapping batches cannot deadlock.
        let mut sorted: Vec<&TimerRef> = timers.iter().collect();
        sorted.sort_unstable_by(|a, b| (&a.queue, &a.key).cmp(&(&b.queue, &b.key)));
        let a = RefArrays::of(sorted.into_iter());
        // SKIP LOCKED: a row another node is claiming (or settling) right now is not waited
        // for; that node has it. The locked rows are re-checked on their newest version. The
        // update joins them by primary key, not by `ctid`: a row updated by a transaction that
        // committed while this statement ran is locked at its new version, whose `ctid` the
        // outer update's snapshot cannot see, so a `ctid` join silently skipped it (found in
        // review, reproduced with a pause inside the statement).
        let r = sqlx::query(&format!(
            "WITH d AS ( \
               SELECT t.queue, t.key FROM timers t \
               JOIN UNNEST($3::text[], $4::text[], $5::int8[]) AS c(queue, key, generation) ON {JOIN_GENERATION} \
               WHERE t.due_at <= $6 AND (t.lease_until IS NULL OR t.lease_until <= $6) \
               FOR UPDATE OF t SKIP LOCKED) \
             UPDATE timers t SET lease_owner = $1, lease_until = $2 FROM d WHERE t.queue = d.queue AND t.key = d.key \
             RETURNING t.queue, t.key, t.generation, t.due_at, t.payload, t.attempts"
        ))
        .bind(owner)
        .bind(lease_until)
        .bind(&a.queues)
        .bind(&a.keys)
        .bind(&a.generations)
        .bind(now)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(pg_err);
        let found = rows(self.track(r)?, claimed_from_row)?;
        // Hand the claims back in input order.
        let index: HashMap<(&str, &str), usize> =
            timers.iter().enumerate().map(|(i, t)| ((t.queue.as_str(), t.key.as_str()), i)).collect();
        let mut out: Vec<(usize, Claimed)> = found
            .into_iter()
            .filter_map(|c| index.get(&(c.timer.queue.as_str(), c.timer.key.as_str())).copied().map(|i| (i, c)))
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
        let r = sqlx::query(
            "WITH d AS ( \
               SELECT queue, key FROM timers \
               WHERE due_at <= $1 AND (lease_until IS NULL OR lease_until <= $2) \
               ORDER BY due_at, queue, key LIMIT $3 FOR UPDATE SKIP LOCKED) \
             UPDATE timers t SET lease_owner = $4, lease_until = $5 FROM d WHERE t.queue = d.queue AND t.key = d.key \
             RETURNING t.queue, t.key, t.generation, t.due_at, t.payload, t.attempts",
        )
        .bind(due_before.min(now))
        .bind(now)
        .bind(i64::from(limit))
        .bind(owner)
        .bind(lease_until)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(pg_err);
        let mut found = rows(self.track(r)?, claimed_from_row)?;
        found.sort_unstable_by(|a, b| {
            (a.timer.due_at, &a.timer.queue, &a.timer.key).cmp(&(b.timer.due_at, &b.timer.queue, &b.timer.key))
        });
        Ok(found)
    }

    async fn settle(&self, batch: Vec<Settlement>, now: i64) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut done = Vec::new();
        let mut release = Vec::new();
        let mut retry = Vec::new();
        let mut dead = Vec::new();
        for s in &batch {
            match s {
                Settlement::Done(t) => done.push(t),
                Settlement::Release(t) => release.push(t),
                Settlement::Retry { .. } => retry.push(s),
                Settlement::DeadLetter { .. } => dead.push(s),
            }
        }
        let r = async {
            let mut tx = self.inner.pool.begin().await?;
            if !dead.is_empty() {
                let mut a = RefArrays::of(dead.iter().map(|s| s.timer()));
                let mut attempts = Vec::new();
                let mut errors = Vec::new();
                let mut failed = Vec::new();
                for s in &dead {
                    if let Settlement::DeadLetter { attempts: n, error, failed_at, .. } = s {
                        attempts.push(*n as i32);
                        errors.push(error.clone());
                        failed.push(*failed_at);
                    }
                }
                sqlx::query(&format!(
                    "WITH moved AS ( \
                       DELETE FROM timers t \
                       USING UNNEST($1::text[], $2::text[], $3::int8[], $4::int4[], $5::text[], $6::int8[]) \
                             AS c(queue, key, generation, attempts, error, failed_at) \
                       WHERE {JOIN_GENERATION} \
                       RETURNING t.queue, t.key, t.generation, t.due_at, t.payload, c.attempts, c.error, c.failed_at) \
                     INSERT INTO dead_letters (queue, key, generation, due_at, payload, attempts, error, failed_at) \
                     SELECT * FROM moved"
                ))
                .bind(std::mem::take(&mut a.queues))
                .bind(std::mem::take(&mut a.keys))
                .bind(std::mem::take(&mut a.generations))
                .bind(attempts)
                .bind(errors)
                .bind(failed)
                .execute(&mut *tx)
                .await?;
            }
            if !done.is_empty() {
                let a = RefArrays::of(done.iter().copied());
                sqlx::query(&format!(
                    "DELETE FROM timers t USING UNNEST($1::text[], $2::text[], $3::int8[]) AS c(queue, key, generation) \
                     WHERE {JOIN_GENERATION}"
                ))
                .bind(a.queues)
                .bind(a.keys)
                .bind(a.generations)
                .execute(&mut *tx)
                .await?;
            }
            if !release.is_empty() {
                let a = RefArrays::of(release.iter().copied());
                sqlx::query(&format!(
                    "UPDATE timers t SET lease_owner = NULL, lease_until = NULL \
                     FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS c(queue, key, generation) \
                     WHERE {JOIN_GENERATION}"
                ))
                .bind(a.queues)
                .bind(a.keys)
                .bind(a.generations)
                .execute(&mut *tx)
                .await?;
            }
            if !retry.is_empty() {
                let a = RefArrays::of(retry.iter().map(|s| s.timer()));
                let mut dues = Vec::new();
                let mut attempts = Vec::new();
                let mut errors = Vec::new();
                for s in &retry {
                    if let Settlement::Retry { due_at, attempts: n, error, .. } = s {
                        dues.push(*due_at);
                        attempts.push(*n as i32);
                        errors.push(error.clone());
                    }
                }
                let retry_sql = format!(
                    "UPDATE timers t SET due_at = c.due_at, attempts = c.attempts, last_error = c.error, \
                     lease_owner = NULL, lease_until = NULL, updated_at = $7 \
                     FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int4[], $6::text[]) \
                          AS c(queue, key, generation, due_at, attempts, error) \
                     WHERE {JOIN_GENERATION}"
                );
                // With the outbox on, the retried rows' new due times are noticed in the same
                // statement: exactly the rows the fenced update changed.
                let retry_sql = if self.inner.outbox {
                    format!(
                        "WITH up AS ({retry_sql} RETURNING t.queue, t.key, t.generation, t.due_at) \
                         INSERT INTO overdue_outbox (queue, key, generation, due_at) \
                         SELECT queue, key, generation, due_at FROM up ORDER BY queue COLLATE \"C\", key COLLATE \"C\""
                    )
                } else {
                    retry_sql
                };
                sqlx::query(&retry_sql)
                .bind(a.queues)
                .bind(a.keys)
                .bind(a.generations)
                .bind(dues)
                .bind(attempts)
                .bind(errors)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }
        .await
        .map_err(pg_err);
        self.track(r)
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let limit = match query.limit {
            0 => 100,
            n => n.min(10_000),
        };
        let after = query.after_id.unwrap_or(i64::MIN);
        let base = "SELECT id, queue, key, generation, due_at, payload, attempts, error, failed_at FROM dead_letters \
                    WHERE id > $1";
        let r = match &query.queue {
            Some(q) => {
                sqlx::query(&format!("{base} AND queue = $3 ORDER BY id LIMIT $2"))
                    .bind(after)
                    .bind(i64::from(limit))
                    .bind(q)
                    .fetch_all(&self.inner.pool)
                    .await
            }
            None => {
                sqlx::query(&format!("{base} ORDER BY id LIMIT $2"))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.inner.pool)
                    .await
            }
        }
        .map_err(pg_err);
        rows(self.track(r)?, |r| {
            Ok(DeadLetter {
                id: r.try_get(0)?,
                queue: r.try_get(1)?,
                key: r.try_get(2)?,
                generation: r.try_get::<i64, _>(3)? as u64,
                due_at: r.try_get(4)?,
                payload: r.try_get(5)?,
                attempts: r.try_get::<i32, _>(6)?.max(0) as u32,
                error: r.try_get(7)?,
                failed_at: r.try_get(8)?,
            })
        })
    }

    async fn replay(&self, id: i64, due_at: i64, now: i64) -> Result<Option<u64>> {
        let r = async {
            let mut tx = self.inner.pool.begin().await?;
            let Some(row) = sqlx::query("DELETE FROM dead_letters WHERE id = $1 RETURNING queue, key, payload")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Ok(None);
            };
            let queue: String = row.try_get(0)?;
            let key: String = row.try_get(1)?;
            let payload: Vec<u8> = row.try_get(2)?;
            const PUT: &str = "INSERT INTO timers (queue, key, part, due_at, payload, generation, attempts, last_error, \
                 lease_owner, lease_until, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, nextval('overdue_generation'), 0, NULL, NULL, NULL, $6, $6) \
                 ON CONFLICT (queue, key) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload, \
                 generation = nextval('overdue_generation'), attempts = 0, last_error = NULL, lease_owner = NULL, \
                 lease_until = NULL, updated_at = EXCLUDED.updated_at";
            let sql = if self.inner.outbox {
                format!(
                    "WITH up AS ({PUT} RETURNING queue, key, generation, due_at), \
                     notice AS (INSERT INTO overdue_outbox (queue, key, generation, due_at) \
                     SELECT queue, key, generation, due_at FROM up) \
                     SELECT generation FROM up"
                )
            } else {
                format!("{PUT} RETURNING generation")
            };
            let g: i64 = sqlx::query(&sql)
            .bind(&queue)
            .bind(&key)
            .bind(partition_of(&queue, &key))
            .bind(due_at)
            .bind(payload)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            tx.commit().await?;
            Ok(Some(g as u64))
        }
        .await
        .map_err(pg_err);
        self.track(r)
    }

    fn ownership_epoch(&self) -> u64 {
        self.inner.ownership.epoch()
    }

    async fn outbox_fetch(&self, limit: u32) -> Result<Vec<(i64, TimerRef)>> {
        self.require_outbox()?;
        // A plain read: relays on several nodes may read the same rows at once (and publish
        // them twice, which the generation fence makes harmless) without waiting for each other.
        let r = sqlx::query("SELECT seq, queue, key, generation, due_at FROM overdue_outbox ORDER BY seq LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg_err);
        rows(self.track(r)?, |r| {
            Ok((
                r.try_get::<i64, _>(0)?,
                TimerRef {
                    queue: r.try_get(1)?,
                    key: r.try_get(2)?,
                    generation: r.try_get::<i64, _>(3)? as u64,
                    due_at: r.try_get(4)?,
                },
            ))
        })
    }

    async fn outbox_ack(&self, seqs: &[i64]) -> Result<()> {
        self.require_outbox()?;
        if seqs.is_empty() {
            return Ok(());
        }
        let r = sqlx::query("DELETE FROM overdue_outbox WHERE seq = ANY($1)")
            .bind(seqs)
            .execute(&self.inner.pool)
            .await
            .map_err(pg_err);
        self.track(r).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_split_from_the_driver_url() {
        let (o, d) = PgOptions::from_url("postgres://u:p@127.0.0.1/test?schema=abc_1&sslmode=disable&pool=4&node=n1")
            .expect("valid");
        assert_eq!(o.schema.as_deref(), Some("abc_1"));
        assert_eq!((o.node.pool, o.node.node.as_deref()), (4, Some("n1")));
        assert_eq!(d, "postgres://u:p@127.0.0.1/test?sslmode=disable");
        let (o, d) = PgOptions::from_url("postgresql://127.0.0.1/test").expect("valid");
        assert_eq!((o.schema, o.node.pool, d.as_str()), (None, DEFAULT_POOL, "postgresql://127.0.0.1/test"));
        assert!(!o.outbox, "the outbox is off by default");
    }

    #[test]
    fn the_outbox_parameter_is_ours_not_the_drivers() {
        for (v, on) in [("true", true), ("1", true), ("on", true), ("false", false), ("0", false), ("off", false)] {
            let (o, d) = PgOptions::from_url(&format!("postgres://h/db?outbox={v}&sslmode=disable")).expect(v);
            assert_eq!(o.outbox, on, "outbox={v}");
            assert_eq!(d, "postgres://h/db?sslmode=disable");
        }
    }

    #[test]
    fn bad_url_parameters_are_clear_errors() {
        for (url, needle) in [
            ("mysql://x", "does not start with postgres://"),
            ("postgres://h/db?schema=Bad-Name", "schema"),
            ("postgres://h/db?schema=1abc", "schema"),
            ("postgres://h/db?schema=", "schema"),
            ("postgres://h/db?pool=0", "pool"),
            ("postgres://h/db?pool=x", "pool"),
            ("postgres://h/db?partition_lease_ms=10", "partition_lease_ms"),
            ("postgres://h/db?node=", "node"),
            ("postgres://h/db?outbox=yes", "outbox=\"yes\" must be true or false"),
            ("postgres://h/db?outbox=", "outbox"),
        ] {
            let e = PgOptions::from_url(url).expect_err(url).to_string();
            assert!(e.contains(needle) && e.starts_with("invalid configuration: invalid postgres url"), "{url}: {e}");
        }
    }
}
