//! Reads: a small pool of read-only connections, used from `spawn_blocking`.
//!
//! WAL lets readers run beside the writer: each read sees the last committed state at its start
//! and never waits for the writer thread. A read starts after the `schedule` that it should see
//! has returned, so it sees it (the reply is sent after the commit).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use overdue_core::{
    DeadLetter, DeadLetterQuery, DueBuckets, DueHistogram, Error, ListQuery, QueueCount, Result, Timer, TimerRef, TimerState,
};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Row, ToSql, params};
use tokio::sync::Semaphore;

use super::schema::open_reader;
use super::{BACKEND, SqlResultExt, SqliteOptions, gen_out};
use crate::dialect::{Bind, Dialect, ListShape, Queries};

const Q: &Queries = Dialect::Sqlite.queries();

/// Read-only connections and a permit per connection.
#[derive(Debug)]
pub(crate) struct ReadPool {
    conns: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    path: PathBuf,
    opts: SqliteOptions,
}

impl ReadPool {
    /// Opens `opts.readers` connections (at least one).
    pub(crate) fn open(path: PathBuf, opts: SqliteOptions) -> Result<Self> {
        let n = opts.readers.max(1);
        let conns = (0..n).map(|_| open_reader(&path, &opts)).collect::<Result<Vec<_>>>()?;
        Ok(ReadPool { conns: Mutex::new(conns), permits: Arc::new(Semaphore::new(n)), path, opts })
    }

    /// Closes the idle connections (in-flight reads close theirs when they finish).
    pub(crate) fn close(&self) {
        self.permits.close();
        self.conns.lock().clear();
    }

    /// Runs `f` on a pooled connection on a blocking thread.
    pub(crate) async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits).acquire_owned().await.map_err(|_| closed())?;
        let pool = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // A connection lost to a panic is replaced here.
            let pooled = pool.conns.lock().pop();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => open_reader(&pool.path, &pool.opts)?,
            };
            let out = f(&mut conn);
            if !pool.permits.is_closed() {
                pool.conns.lock().push(conn);
            }
            out
        });
        task.await.map_err(|e| Error::Store {
            backend: BACKEND,
            message: format!("sqlite read task failed: {e}"),
            transient: false,
            source: Some(Box::new(e)),
        })?
    }
}

fn closed() -> Error {
    Error::Store {
        backend: BACKEND,
        message: "the sqlite store is closed".to_owned(),
        transient: false,
        source: None,
    }
}

/// Maps a row of [`crate::dialect::TIMER_COLUMNS`].
fn timer_from_row(row: &Row<'_>, now: i64) -> rusqlite::Result<Timer> {
    let lease_owner: Option<String> = row.get(7)?;
    let lease_until: Option<i64> = row.get(8)?;
    let state = match (lease_owner, lease_until) {
        (Some(owner), Some(until)) if until > now => TimerState::InFlight { owner, lease_until: until },
        _ => TimerState::Pending,
    };
    Ok(Timer {
        queue: row.get(0)?,
        key: row.get(1)?,
        due_at: row.get(2)?,
        payload: row.get(3)?,
        generation: gen_out(row.get(4)?),
        attempts: u32::try_from(row.get::<_, i64>(5)?.max(0)).unwrap_or(u32::MAX),
        last_error: row.get(6)?,
        state,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
    })
}

fn ref_from_row(row: &Row<'_>) -> rusqlite::Result<TimerRef> {
    Ok(TimerRef {
        queue: row.get(0)?,
        key: row.get(1)?,
        generation: gen_out(row.get(2)?),
        due_at: row.get(3)?,
    })
}

pub(crate) fn get(conn: &Connection, queue: &str, key: &str, now: i64) -> Result<Option<Timer>> {
    let mut stmt = conn.prepare_cached(Q.get_timer).store_err("get")?;
    stmt.query_row(params![queue, key], |row| timer_from_row(row, now)).optional().store_err("get")
}

pub(crate) fn list(conn: &Connection, query: &ListQuery, now: i64) -> Result<Vec<Timer>> {
    let shape = ListShape {
        queue: query.queue.is_some(),
        due_from: query.due_from.is_some(),
        due_to: query.due_to.is_some(),
        after: query.after.is_some(),
    };
    let (sql, binds) = Dialect::Sqlite.list_timers_sql(shape);
    let limit = i64::from(query.effective_limit());
    let after = query.after.as_ref();
    let values: Vec<&dyn ToSql> = binds
        .iter()
        .map(|b| -> &dyn ToSql {
            match (b, after) {
                (Bind::Queue, _) => &query.queue,
                (Bind::DueFrom, _) => &query.due_from,
                (Bind::DueTo, _) => &query.due_to,
                (Bind::AfterDue, Some((due, _, _))) => due,
                (Bind::AfterQueue, Some((_, queue, _))) => queue,
                (Bind::AfterKey, Some((_, _, key))) => key,
                (Bind::Limit, _) => &limit,
                // The shape only asks for cursor values when there is a cursor.
                (Bind::AfterDue | Bind::AfterQueue | Bind::AfterKey | Bind::AfterId, _) => {
                    &rusqlite::types::Null
                }
            }
        })
        .collect();
    let mut stmt = conn.prepare_cached(&sql).store_err("list")?;
    let rows = stmt.query_map(values.as_slice(), |row| timer_from_row(row, now)).store_err("list")?;
    rows.collect::<rusqlite::Result<Vec<_>>>().store_err("list")
}

pub(crate) fn due_refs(
    conn: &Connection,
    after: Option<&(i64, String, String)>,
    until: i64,
    limit: u32,
) -> Result<Vec<TimerRef>> {
    let rows = match after {
        Some((due, queue, key)) => {
            let mut stmt = conn.prepare_cached(Q.due_refs_after).store_err("due refs")?;
            let rows =
                stmt.query_map(params![due, queue, key, until, limit], ref_from_row).store_err("due refs")?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        }
        None => {
            let mut stmt = conn.prepare_cached(Q.due_refs_first).store_err("due refs")?;
            let rows = stmt.query_map(params![until, limit], ref_from_row).store_err("due refs")?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        }
    };
    rows.store_err("due refs")
}

pub(crate) fn counts(conn: &mut Connection, now: i64) -> Result<Vec<QueueCount>> {
    // One read transaction, so the timer and dead-letter counts are one snapshot.
    let tx = conn.transaction().store_err("counts")?;
    let mut by_queue: BTreeMap<String, QueueCount> = BTreeMap::new();
    {
        let mut stmt = tx.prepare_cached(Q.count_timers).store_err("counts")?;
        let mut rows = stmt.query([now]).store_err("counts")?;
        while let Some(row) = rows.next().store_err("counts")? {
            let queue: String = row.get(0).store_err("counts")?;
            let pending: i64 = row.get(1).store_err("counts")?;
            let in_flight: i64 = row.get(2).store_err("counts")?;
            let c = by_queue
                .entry(queue.clone())
                .or_insert_with(|| QueueCount { queue, ..QueueCount::default() });
            c.pending = u64::try_from(pending).unwrap_or(0);
            c.in_flight = u64::try_from(in_flight).unwrap_or(0);
        }
        let mut stmt = tx.prepare_cached(Q.count_dead_letters).store_err("counts")?;
        let mut rows = stmt.query([]).store_err("counts")?;
        while let Some(row) = rows.next().store_err("counts")? {
            let queue: String = row.get(0).store_err("counts")?;
            let dead: i64 = row.get(1).store_err("counts")?;
            let c = by_queue
                .entry(queue.clone())
                .or_insert_with(|| QueueCount { queue, ..QueueCount::default() });
            c.dead = u64::try_from(dead).unwrap_or(0);
        }
    }
    tx.finish().store_err("counts")?;
    Ok(by_queue.into_values().collect())
}

/// One pass over `timers` (the same scan as [`counts`]) putting each unclaimed timer in its
/// [`DueBuckets`] bucket.
pub(crate) fn due_histogram(conn: &Connection, now: i64) -> Result<DueHistogram> {
    let [minute, hour, day] = DueBuckets::EDGES_MS.map(|e| now.saturating_add(e));
    let mut stmt = conn
        .prepare_cached(
            "SELECT queue, \
             SUM(due_at <= ?1), SUM(due_at > ?1 AND due_at <= ?2), SUM(due_at > ?2 AND due_at <= ?3), \
             SUM(due_at > ?3 AND due_at <= ?4), SUM(due_at > ?4) \
             FROM timers WHERE lease_until IS NULL OR lease_until <= ?1 GROUP BY queue ORDER BY queue",
        )
        .store_err("due histogram")?;
    let rows = stmt
        .query_map(params![now, minute, hour, day], |r| {
            let n = |i: usize| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
            Ok(DueBuckets { queue: r.get(0)?, overdue: n(1)?, next_minute: n(2)?, next_hour: n(3)?, next_day: n(4)?, later: n(5)? })
        })
        .store_err("due histogram")?;
    let queues = rows.collect::<rusqlite::Result<Vec<_>>>().store_err("due histogram")?;
    Ok(DueHistogram { queues, exact: true })
}

pub(crate) fn dead_letters(conn: &Connection, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
    let (sql, binds) = Dialect::Sqlite.dead_letters_sql(query.queue.is_some());
    let after_id = query.after_id.unwrap_or(0);
    let limit = i64::from(match query.limit {
        0 => ListQuery::DEFAULT_LIMIT,
        n => n.min(ListQuery::MAX_LIMIT),
    });
    let values: Vec<&dyn ToSql> = binds
        .iter()
        .map(|b| -> &dyn ToSql {
            match b {
                Bind::AfterId => &after_id,
                Bind::Queue => &query.queue,
                Bind::Limit => &limit,
                // `dead_letters_sql` binds nothing else.
                Bind::DueFrom | Bind::DueTo | Bind::AfterDue | Bind::AfterQueue | Bind::AfterKey => {
                    &rusqlite::types::Null
                }
            }
        })
        .collect();
    let mut stmt = conn.prepare_cached(&sql).store_err("dead letters")?;
    let rows = stmt
        .query_map(values.as_slice(), |row| {
            Ok(DeadLetter {
                id: row.get(0)?,
                queue: row.get(1)?,
                key: row.get(2)?,
                generation: gen_out(row.get(3)?),
                due_at: row.get(4)?,
                payload: row.get(5)?,
                attempts: u32::try_from(row.get::<_, i64>(6)?.max(0)).unwrap_or(u32::MAX),
                error: row.get(7)?,
                failed_at: row.get(8)?,
            })
        })
        .store_err("dead letters")?;
    rows.collect::<rusqlite::Result<Vec<_>>>().store_err("dead letters")
}
