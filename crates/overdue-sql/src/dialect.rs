//! The SQLite store's SQL text, in one place: every statement lives in the [`Queries`] table and
//! every schema step in the [`Migration`] list, so the store's code is the sequence of steps and
//! this file is the text.
//!
//! The shared stores keep their own SQL next to their code: PostgreSQL in
//! `crates/overdue-postgres` (batched with `UNNEST`) and MySQL/MariaDB in `crates/overdue-mysql`
//! (multi-row `VALUES`, no `UPDATE … RETURNING`); `docs/sql-backends.md` compares them. An
//! earlier version of this file carried untested PostgreSQL and MySQL text; it was removed when
//! those stores landed, so there is one source of truth per backend.
//!
//! ## Ground rules
//!
//! - Columns and their meaning are the same on every SQL store: `timers(queue, key, due_at,
//!   payload, generation, attempts, last_error, lease_owner, lease_until, created_at,
//!   updated_at)` with `PRIMARY KEY (queue, key)` and an index on `(due_at, queue, key)`;
//!   `dead_letters` with an auto-increment `id`; times are `BIGINT` milliseconds since the Unix
//!   epoch. (The shared stores add a `part` column for partition leases.)
//! - Text compares **bytewise** (SQLite's `BINARY`), so `(due_at, queue, key)` keyset paging
//!   visits rows in the same order as Rust's `String` ordering.
//! - Schema changes are an ordered list of [`Migration`] steps, recorded in `overdue_schema` by
//!   version. Versions only grow; a step is never edited once released (add a new one). A store
//!   refuses to open a database whose recorded version is newer than [`Dialect::latest_version`].
//! - Placeholders are numbered `?N`, so one value can be used twice.

use std::fmt;

/// A SQL dialect of this crate (SQLite; the shared stores live in their own crates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// SQLite 3.37+ (bundled with this crate): `STRICT`, `WITHOUT ROWID`, `RETURNING`.
    Sqlite,
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One versioned schema step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migration {
    /// Strictly increasing from 1 within a dialect, without gaps.
    pub version: u32,
    /// A short description, stored next to the version.
    pub name: &'static str,
    /// The statements of the step, separated by `;`, run inside one transaction.
    pub sql: &'static str,
}

/// The statements of one dialect. Field docs list the parameters in order (`?1` is the first);
/// the SQLite store binds exactly these.
#[derive(Debug)]
#[non_exhaustive]
pub struct Queries {
    /// Creates the migration bookkeeping table if it is missing. No parameters.
    pub create_schema_table: &'static str,
    /// The highest applied schema version, 0 for a fresh database. No parameters.
    pub schema_version: &'static str,
    /// Records an applied step: `(version, name)`.
    pub record_migration: &'static str,
    /// Upserts one timer: `(queue, key, due_at, payload, generation, now)`. A new row gets
    /// `created_at = updated_at = now`; an existing row keeps `created_at`, and its attempts,
    /// last error and lease are reset.
    pub upsert_timer: &'static str,
    /// Reads a timer's `generation`: `(queue, key)`.
    pub lock_timer: &'static str,
    /// Moves a timer, keeping its payload: `(queue, key, due_at, generation, now)`. Clears the
    /// lease, attempts and last error. Affects 0 rows if there is no such timer.
    pub reschedule_timer: &'static str,
    /// Claims one generation: `(queue, key, generation, now, owner, lease_until)`. Applies only if
    /// the generation matches, `due_at <= now` and the lease is empty or expired; returns
    /// nothing (no `RETURNING`: SQLite builds a temporary table for every `RETURNING`), so the
    /// claimed row is read with [`Queries::claimed_row`] in the same transaction.
    pub claim_timer: &'static str,
    /// The `(payload, attempts, due_at)` of a timer just claimed: `(queue, key)` (`due_at`
    /// because a retry moves it without changing the generation).
    pub claimed_row: &'static str,
    /// Finds and claims due, unclaimed timers in one statement: `(due_before, now, limit, owner,
    /// lease_until)`, returning `(queue, key, generation, due_at, payload, attempts)` in no
    /// particular order (sort by `(due_at, queue, key)`).
    pub claim_due: &'static str,
    /// References to timers due by `until`, after a cursor, without payloads:
    /// `(after_due, after_queue, after_key, until, limit)`, returning
    /// `(queue, key, generation, due_at)`. The cursor is inclusive-exclusive: rows strictly after.
    pub due_refs_after: &'static str,
    /// As [`Queries::due_refs_after`] without a cursor: `(until, limit)`.
    pub due_refs_first: &'static str,
    /// Settles `Done`: `(queue, key, generation)`.
    pub settle_done: &'static str,
    /// Settles `Retry`: `(queue, key, generation, due_at, attempts, error, now)`.
    pub settle_retry: &'static str,
    /// Settles `Release`: `(queue, key, generation)`.
    pub settle_release: &'static str,
    /// Copies a timer into `dead_letters`: `(queue, key, generation, attempts, error, failed_at)`.
    /// Inserts nothing if the generation does not match. Follow with [`Queries::settle_done`].
    pub dead_letter_timer: &'static str,
    /// A dead letter's `(queue, key, payload)`: `(id)`.
    pub select_dead_letter: &'static str,
    /// Removes a dead letter: `(id)`.
    pub delete_dead_letter: &'static str,
    /// Persists the generation high-water mark: `(generation)`. Never lowers it.
    pub store_generation: &'static str,
    /// The largest generation ever handed out: the maximum of the stored high-water mark and
    /// every generation still in `timers` and `dead_letters`. No parameters.
    pub load_generation: &'static str,
    /// Clears every lease (SQLite at open, where the process lock proves no one else holds
    /// claims). No parameters.
    pub clear_leases: &'static str,
    /// One timer with every column: `(queue, key)`. Columns as [`TIMER_COLUMNS`].
    pub get_timer: &'static str,
    /// Per-queue `(queue, pending, in_flight)` counts of `timers`: `(now)`.
    pub count_timers: &'static str,
    /// Per-queue `(queue, dead)` counts of `dead_letters`. No parameters.
    pub count_dead_letters: &'static str,
}

/// The columns every timer-reading statement returns, in this order.
pub const TIMER_COLUMNS: &str = "queue, key, due_at, payload, generation, attempts, last_error, \
                                 lease_owner, lease_until, created_at, updated_at";

/// A value a dynamically built statement binds, in the order the builder returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// The queue filter.
    Queue,
    /// Inclusive lower bound on `due_at`.
    DueFrom,
    /// Inclusive upper bound on `due_at`.
    DueTo,
    /// The cursor's `due_at`.
    AfterDue,
    /// The cursor's queue.
    AfterQueue,
    /// The cursor's key.
    AfterKey,
    /// A dead-letter id cursor.
    AfterId,
    /// The page size.
    Limit,
}

/// Which optional filters a dynamically built `list` statement has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListShape {
    pub queue: bool,
    pub due_from: bool,
    pub due_to: bool,
    pub after: bool,
}

impl Dialect {
    /// Short lowercase name, as used in URLs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
        }
    }

    /// The ordered schema steps of this dialect.
    pub fn migrations(self) -> &'static [Migration] {
        match self {
            Dialect::Sqlite => SQLITE_MIGRATIONS,
        }
    }

    /// The schema version this build creates and understands.
    pub fn latest_version(self) -> u32 {
        self.migrations().last().map_or(0, |m| m.version)
    }

    /// The statements of this dialect.
    pub const fn queries(self) -> &'static Queries {
        match self {
            Dialect::Sqlite => &SQLITE,
        }
    }

    /// The placeholder for the `n`-th bound value (1-based): `?1`.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
        }
    }

    /// The `key` column as this dialect must spell it.
    pub fn key_column(self) -> &'static str {
        match self {
            Dialect::Sqlite => "key",
        }
    }

    /// Builds the `list` statement for the filters present, returning the SQL and the values to
    /// bind in order. Rows come in `(due_at, queue, key)` order.
    pub fn list_timers_sql(self, shape: ListShape) -> (String, Vec<Bind>) {
        let key = self.key_column();
        let mut binds = Vec::new();
        let mut conds: Vec<String> = Vec::new();
        let mut next = |binds: &mut Vec<Bind>, b: Bind| {
            binds.push(b);
            self.placeholder(binds.len())
        };
        if shape.queue {
            conds.push(format!("queue = {}", next(&mut binds, Bind::Queue)));
        }
        if shape.due_from {
            conds.push(format!("due_at >= {}", next(&mut binds, Bind::DueFrom)));
        }
        if shape.due_to {
            conds.push(format!("due_at <= {}", next(&mut binds, Bind::DueTo)));
        }
        if shape.after {
            conds.push(self.cursor_condition(&mut binds, &mut next));
        }
        let filter = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
        let limit = next(&mut binds, Bind::Limit);
        let columns = TIMER_COLUMNS.replace("key,", &format!("{key},"));
        let sql = format!("SELECT {columns} FROM timers{filter} ORDER BY due_at, queue, {key} LIMIT {limit}");
        (sql, binds)
    }

    /// `(due_at, queue, key) > cursor`, as this dialect can range-scan it.
    fn cursor_condition(
        self,
        binds: &mut Vec<Bind>,
        next: &mut impl FnMut(&mut Vec<Bind>, Bind) -> String,
    ) -> String {
        let key = self.key_column();
        match self {
            Dialect::Sqlite => {
                let d = next(binds, Bind::AfterDue);
                let q = next(binds, Bind::AfterQueue);
                let k = next(binds, Bind::AfterKey);
                format!("(due_at, queue, {key}) > ({d}, {q}, {k})")
            }
        }
    }

    /// Builds the dead-letter listing statement: ascending ids after a cursor, optionally one
    /// queue. Returns the SQL and the values to bind in order.
    pub fn dead_letters_sql(self, by_queue: bool) -> (String, Vec<Bind>) {
        let key = self.key_column();
        let mut binds = vec![Bind::AfterId];
        let mut sql = format!(
            "SELECT id, queue, {key}, generation, due_at, payload, attempts, error, failed_at \
             FROM dead_letters WHERE id > {}",
            self.placeholder(1)
        );
        if by_queue {
            binds.push(Bind::Queue);
            sql.push_str(&format!(" AND queue = {}", self.placeholder(binds.len())));
        }
        binds.push(Bind::Limit);
        sql.push_str(&format!(" ORDER BY id LIMIT {}", self.placeholder(binds.len())));
        (sql, binds)
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite
// ---------------------------------------------------------------------------------------------

const SQLITE_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "timers, dead letters and the generation high-water mark",
    // WITHOUT ROWID: the row lives in the (queue, key) primary-key b-tree, so an upsert touches
    // two b-trees (that one and timers_due) instead of three.
    sql: "
CREATE TABLE timers (
    queue       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    due_at      INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    generation  INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    lease_owner TEXT,
    lease_until INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (queue, key)
) STRICT, WITHOUT ROWID;
CREATE INDEX timers_due ON timers (due_at, queue, key);
CREATE INDEX timers_leased ON timers (lease_until) WHERE lease_until IS NOT NULL;

CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    generation  INTEGER NOT NULL,
    due_at      INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    attempts    INTEGER NOT NULL,
    error       TEXT    NOT NULL,
    failed_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX dead_letters_queue ON dead_letters (queue, id);

CREATE TABLE meta (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
INSERT INTO meta (name, value) VALUES ('generation', 0);
",
}, Migration {
    version: 2,
    name: "outbox of notices for external triggers",
    // Written only when the store is opened with its outbox on (an external trigger relays it);
    // see `overdue_core::trigger`. AUTOINCREMENT: a sequence number is never reused, so a relay
    // that acknowledges late cannot delete a newer row.
    sql: "
CREATE TABLE timer_outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    generation  INTEGER NOT NULL,
    due_at      INTEGER NOT NULL
) STRICT;
",
}, Migration {
    version: 3,
    name: "no lease index",
    // Every fired timer paid for an entry in `timers_leased` twice (the claim inserts it, the
    // settlement deletes it); its one reader was clearing leases at open, which is one scan of
    // `timers` without it. See docs/sqlite.md.
    sql: "DROP INDEX IF EXISTS timers_leased;",
}];

const SQLITE: Queries = Queries {
    create_schema_table: "CREATE TABLE IF NOT EXISTS overdue_schema (
        version    INTEGER PRIMARY KEY,
        name       TEXT NOT NULL,
        applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
    ) STRICT",
    schema_version: "SELECT COALESCE(MAX(version), 0) FROM overdue_schema",
    record_migration: "INSERT INTO overdue_schema (version, name) VALUES (?1, ?2)",
    upsert_timer: "INSERT INTO timers (queue, key, due_at, payload, generation, attempts, last_error, \
                   lease_owner, lease_until, created_at, updated_at) \
                   VALUES (?1, ?2, ?3, ?4, ?5, 0, NULL, NULL, NULL, ?6, ?6) \
                   ON CONFLICT (queue, key) DO UPDATE SET due_at = excluded.due_at, \
                   payload = excluded.payload, generation = excluded.generation, attempts = 0, \
                   last_error = NULL, lease_owner = NULL, lease_until = NULL, \
                   updated_at = excluded.updated_at",
    lock_timer: "SELECT generation FROM timers WHERE queue = ?1 AND key = ?2",
    reschedule_timer: "UPDATE timers SET due_at = ?3, generation = ?4, attempts = 0, last_error = NULL, \
                       lease_owner = NULL, lease_until = NULL, updated_at = ?5 \
                       WHERE queue = ?1 AND key = ?2",
    claim_timer: "UPDATE timers SET lease_owner = ?5, lease_until = ?6 \
                  WHERE queue = ?1 AND key = ?2 AND generation = ?3 AND due_at <= ?4 \
                  AND (lease_until IS NULL OR lease_until <= ?4)",
    claimed_row: "SELECT payload, attempts, due_at FROM timers WHERE queue = ?1 AND key = ?2",
    claim_due: "UPDATE timers SET lease_owner = ?4, lease_until = ?5 WHERE (queue, key) IN ( \
                SELECT queue, key FROM timers \
                WHERE due_at <= ?1 AND (lease_until IS NULL OR lease_until <= ?2) \
                ORDER BY due_at, queue, key LIMIT ?3) \
                RETURNING queue, key, generation, due_at, payload, attempts",
    due_refs_after: "SELECT queue, key, generation, due_at FROM timers \
                     WHERE (due_at, queue, key) > (?1, ?2, ?3) AND due_at <= ?4 \
                     ORDER BY due_at, queue, key LIMIT ?5",
    due_refs_first: "SELECT queue, key, generation, due_at FROM timers WHERE due_at <= ?1 \
                     ORDER BY due_at, queue, key LIMIT ?2",
    settle_done: "DELETE FROM timers WHERE queue = ?1 AND key = ?2 AND generation = ?3",
    settle_retry: "UPDATE timers SET due_at = ?4, attempts = ?5, last_error = ?6, lease_owner = NULL, \
                   lease_until = NULL, updated_at = ?7 \
                   WHERE queue = ?1 AND key = ?2 AND generation = ?3",
    settle_release: "UPDATE timers SET lease_owner = NULL, lease_until = NULL \
                     WHERE queue = ?1 AND key = ?2 AND generation = ?3",
    dead_letter_timer: "INSERT INTO dead_letters (queue, key, generation, due_at, payload, attempts, error, failed_at) \
                        SELECT queue, key, generation, due_at, payload, ?4, ?5, ?6 FROM timers \
                        WHERE queue = ?1 AND key = ?2 AND generation = ?3",
    select_dead_letter: "SELECT queue, key, payload FROM dead_letters WHERE id = ?1",
    delete_dead_letter: "DELETE FROM dead_letters WHERE id = ?1",
    store_generation: "UPDATE meta SET value = MAX(value, ?1) WHERE name = 'generation'",
    load_generation: "SELECT MAX( \
                        COALESCE((SELECT value FROM meta WHERE name = 'generation'), 0), \
                        COALESCE((SELECT MAX(generation) FROM timers), 0), \
                        COALESCE((SELECT MAX(generation) FROM dead_letters), 0))",
    clear_leases: "UPDATE timers SET lease_owner = NULL, lease_until = NULL WHERE lease_until IS NOT NULL",
    get_timer: "SELECT queue, key, due_at, payload, generation, attempts, last_error, lease_owner, \
                lease_until, created_at, updated_at FROM timers WHERE queue = ?1 AND key = ?2",
    count_timers: "SELECT queue, \
                   SUM(CASE WHEN lease_until > ?1 THEN 0 ELSE 1 END), \
                   SUM(CASE WHEN lease_until > ?1 THEN 1 ELSE 0 END) \
                   FROM timers GROUP BY queue",
    count_dead_letters: "SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue",
};

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Dialect; 1] = [Dialect::Sqlite];

    #[test]
    fn migration_versions_start_at_one_and_have_no_gaps() {
        for d in ALL {
            let versions: Vec<u32> = d.migrations().iter().map(|m| m.version).collect();
            let expected: Vec<u32> = (1..=versions.len() as u32).collect();
            assert_eq!(versions, expected, "{d} migrations must be numbered 1, 2, 3, …");
            assert_eq!(d.latest_version(), versions.len() as u32, "{d}");
        }
    }

    #[test]
    fn every_dialect_creates_the_same_tables_and_indexes() {
        for d in ALL {
            let sql = d.migrations().iter().map(|m| m.sql).collect::<String>();
            for name in ["timers", "dead_letters", "timers_due", "dead_letters_queue"] {
                assert!(sql.contains(name), "{d} schema lacks {name}");
            }
        }
    }

    #[test]
    fn list_sql_numbers_its_binds_in_order() {
        let shape = ListShape { queue: true, due_from: false, due_to: true, after: true };
        let (sql, binds) = Dialect::Sqlite.list_timers_sql(shape);
        assert_eq!(
            binds,
            [Bind::Queue, Bind::DueTo, Bind::AfterDue, Bind::AfterQueue, Bind::AfterKey, Bind::Limit]
        );
        assert!(sql.contains("queue = ?1") && sql.contains("due_at <= ?2"), "{sql}");
        assert!(sql.contains("(due_at, queue, key) > (?3, ?4, ?5)") && sql.ends_with("LIMIT ?6"), "{sql}");

        let (sql, _) = Dialect::Sqlite.list_timers_sql(ListShape::default());
        assert!(sql.ends_with("LIMIT ?1"), "{sql}");
    }

    #[test]
    fn dead_letter_sql_binds_match_placeholders() {
        for d in ALL {
            for by_queue in [false, true] {
                let (sql, binds) = d.dead_letters_sql(by_queue);
                assert_eq!(binds.len(), if by_queue { 3 } else { 2 });
                assert!(sql.contains(&d.placeholder(binds.len())), "{sql}");
            }
        }
    }
}
