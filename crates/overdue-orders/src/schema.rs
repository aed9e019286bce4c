//! The order tables, as versioned migrations for SQLite (executed) and PostgreSQL / MySQL
//! (written out so those stores can follow; **untested** until they exist).
//!
//! ## Ground rules every dialect keeps
//!
//! - The same tables and columns everywhere: `products`, `orders`, `order_items`,
//!   `order_events` (`UNIQUE (order_id, kind)`: a transition happens at most once per order),
//!   `outbox`. Money is integer cents (`BIGINT`), times are `BIGINT` milliseconds since the Unix
//!   epoch, ids are short ASCII text compared **bytewise** (SQLite `BINARY`, PostgreSQL
//!   `COLLATE "C"`, MySQL `utf8mb4_bin`) so `id < ?` paging visits rows in the same order on
//!   every database.
//! - The order schema is versioned on its own, in `order_schema_version`, next to (not inside)
//!   the timer store's `overdue_schema`: the two evolve independently in one database. Versions
//!   only grow; a released step is never edited (add a new one). [`migrate_sqlite`] refuses a
//!   database whose recorded order schema is newer than this build.
//! - Indexes serve exactly the queries the service runs: `orders (status, id)` and
//!   `orders (buyer, id)` for newest-first listing, `order_events (kind)` for the transition
//!   counters, `outbox (delivered_at, id)` for the relay's "pending, oldest first".
//! - Foreign keys are declared for the reader and enforced by PostgreSQL / MySQL; SQLite does
//!   not enforce them (the store leaves `PRAGMA foreign_keys` off), and the service never writes
//!   an orphan: items and events are inserted in the same write as their order.
//!
//! | concern | SQLite | PostgreSQL | MySQL 8 |
//! |---|---|---|---|
//! | auto-increment id | `INTEGER PRIMARY KEY` (rowid) | `GENERATED ALWAYS AS IDENTITY` | `AUTO_INCREMENT` |
//! | "insert once" | `ON CONFLICT DO NOTHING` | `ON CONFLICT DO NOTHING` | `INSERT IGNORE` |
//! | transition result | `UPDATE`, then `SELECT` (cheaper than `RETURNING`'s ephemeral table) | `UPDATE … RETURNING` | `UPDATE`, then `SELECT` in the same transaction |
//! | text columns | `TEXT` (`STRICT` tables) | `TEXT COLLATE "C"` | `VARCHAR(n) … COLLATE utf8mb4_bin` |

use overdue_sql::dialect::Migration;
use overdue_sql::SqlResultExt;
use rusqlite::{Connection, OptionalExtension, params};


/// The table that records applied order-schema steps (same name in every dialect).
pub const VERSION_TABLE: &str = "order_schema_version";

const SQLITE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS order_schema_version (
    version    INTEGER PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    applied_at INTEGER NOT NULL
) STRICT";

const SQLITE_V1: &str = "
CREATE TABLE products (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    stock       INTEGER NOT NULL CHECK (stock >= 0),
    stock_total INTEGER NOT NULL CHECK (stock_total >= 0),
    created_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE orders (
    id           TEXT PRIMARY KEY NOT NULL,
    buyer        TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending_payment', 'paid', 'shipped', 'completed',
                     'closed', 'refund_requested', 'refunded', 'refund_rejected')),
    total_cents  INTEGER NOT NULL CHECK (total_cents >= 0),
    pay_deadline INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    close_reason TEXT
) STRICT, WITHOUT ROWID;
CREATE INDEX orders_status_id ON orders (status, id);
CREATE INDEX orders_buyer_id ON orders (buyer, id);

CREATE TABLE order_items (
    order_id    TEXT NOT NULL REFERENCES orders (id),
    product_id  TEXT NOT NULL REFERENCES products (id),
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, product_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE order_events (
    id       INTEGER PRIMARY KEY,
    order_id TEXT NOT NULL REFERENCES orders (id),
    kind     TEXT NOT NULL,
    at       INTEGER NOT NULL,
    source   TEXT NOT NULL,
    detail   TEXT,
    UNIQUE (order_id, kind)
) STRICT;
CREATE INDEX order_events_kind ON order_events (kind);

CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY,
    topic        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX outbox_pending ON outbox (delivered_at, id);
";

/// Version 2: `order_timer_outbox`, the timer changes of order writes whose timers live in another
/// store (Redis): written in the order's transaction, applied and deleted by the relay.
const SQLITE_V2: &str = "
CREATE TABLE order_timer_outbox (
    id         INTEGER PRIMARY KEY,
    op         TEXT NOT NULL CHECK (op IN ('schedule', 'cancel')),
    queue      TEXT NOT NULL,
    key        TEXT NOT NULL,
    due_at     INTEGER,
    created_at INTEGER NOT NULL
) STRICT;
";

const POSTGRES_V2: &str = r#"
CREATE TABLE order_timer_outbox (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    op         TEXT NOT NULL CHECK (op IN ('schedule', 'cancel')),
    queue      TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    due_at     BIGINT,
    created_at BIGINT NOT NULL
);
"#;

const MYSQL_V2: &str = "
CREATE TABLE IF NOT EXISTS order_timer_outbox (
    id         BIGINT AUTO_INCREMENT PRIMARY KEY,
    op         VARCHAR(8) NOT NULL CHECK (op IN ('schedule', 'cancel')),
    queue      VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    `key`      VARCHAR(512) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    due_at     BIGINT,
    created_at BIGINT NOT NULL
) ENGINE = InnoDB;
";

/// Version 3 (SQLite only; the other dialects record an empty step so the versions stay in
/// step): `orders` rebuilt with its status check written as `status = … OR …`. SQLite
/// evaluates `status IN (8 values)` by building an ephemeral table on every row it checks,
/// i.e. on every order insert and status change. The step cut the writer thread's instructions
/// per order in `overdue bench orders` by 15 % (callgrind, docs/benchmarks.md). The rebuild copies every order once (the
/// documented procedure for changing a constraint; foreign keys are off on this store, and
/// `order_items` / `order_events` keep naming `orders`, which is the new table once renamed).
const SQLITE_V3: &str = "
CREATE TABLE orders_v3 (
    id           TEXT PRIMARY KEY NOT NULL,
    buyer        TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status = 'pending_payment' OR status = 'paid' OR status = 'shipped'
                     OR status = 'completed' OR status = 'closed' OR status = 'refund_requested'
                     OR status = 'refunded' OR status = 'refund_rejected'),
    total_cents  INTEGER NOT NULL CHECK (total_cents >= 0),
    pay_deadline INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    close_reason TEXT
) STRICT, WITHOUT ROWID;
INSERT INTO orders_v3 (id, buyer, status, total_cents, pay_deadline, created_at, updated_at, version, close_reason)
    SELECT id, buyer, status, total_cents, pay_deadline, created_at, updated_at, version, close_reason FROM orders;
DROP TABLE orders;
ALTER TABLE orders_v3 RENAME TO orders;
CREATE INDEX orders_status_id ON orders (status, id);
CREATE INDEX orders_buyer_id ON orders (buyer, id);
";
/// PostgreSQL and MySQL evaluate an `IN` list check without building anything: nothing to
/// change, but the step is recorded so every dialect has the same versions.
const POSTGRES_V3: &str = "SELECT 1";
const MYSQL_V3: &str = "DO 0";

/// Version 4 (SQLite only; the others record an empty step): no `order_events_kind` index.
/// Every order writes two or three events, and each paid for an entry in that index; its only
/// reader is `transition_counts` (`GROUP BY kind`; metrics read in-process counters instead), which scans every
/// event with or without it (without it: the `(order_id, kind)` index and a temporary b-tree
/// for the grouping, ~6x slower: 760 against 130 ms on 2.5M events). One b-tree insert fewer per
/// event on the writer thread, 6 % of its instructions per order (docs/benchmarks.md).
const SQLITE_V4: &str = "DROP INDEX IF EXISTS order_events_kind;";
const POSTGRES_V4: &str = "SELECT 1";
const MYSQL_V4: &str = "DO 0";

const POSTGRES_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS order_schema_version (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

const POSTGRES_V1: &str = r#"
CREATE TABLE products (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    stock       BIGINT NOT NULL CHECK (stock >= 0),
    stock_total BIGINT NOT NULL CHECK (stock_total >= 0),
    created_at  BIGINT NOT NULL
);

CREATE TABLE orders (
    id           TEXT COLLATE "C" PRIMARY KEY,
    buyer        TEXT COLLATE "C" NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending_payment', 'paid', 'shipped', 'completed',
                     'closed', 'refund_requested', 'refunded', 'refund_rejected')),
    total_cents  BIGINT NOT NULL CHECK (total_cents >= 0),
    pay_deadline BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    close_reason TEXT
);
CREATE INDEX orders_status_id ON orders (status, id);
CREATE INDEX orders_buyer_id ON orders (buyer, id);

CREATE TABLE order_items (
    order_id    TEXT COLLATE "C" NOT NULL REFERENCES orders (id),
    product_id  TEXT COLLATE "C" NOT NULL REFERENCES products (id),
    quantity    BIGINT NOT NULL CHECK (quantity > 0),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, product_id)
);

CREATE TABLE order_events (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id TEXT COLLATE "C" NOT NULL REFERENCES orders (id),
    kind     TEXT NOT NULL,
    at       BIGINT NOT NULL,
    source   TEXT NOT NULL,
    detail   TEXT,
    UNIQUE (order_id, kind)
);
CREATE INDEX order_events_kind ON order_events (kind);

CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    delivered_at BIGINT,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_pending ON outbox (delivered_at, id);
"#;

const MYSQL_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS order_schema_version (
    version    INT PRIMARY KEY,
    name       VARCHAR(200) NOT NULL,
    applied_at BIGINT NOT NULL
) ENGINE = InnoDB";

/// MySQL commits each DDL statement on its own, so every statement of a step must be safe to
/// re-run after a crash halfway through (`IF NOT EXISTS`; MySQL 8.0.29+ has no
/// `CREATE INDEX IF NOT EXISTS`, hence the indexes inside `CREATE TABLE`).
const MYSQL_V1: &str = "
CREATE TABLE IF NOT EXISTS products (
    id          VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
    name        VARCHAR(200) CHARACTER SET utf8mb4 NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    stock       BIGINT NOT NULL CHECK (stock >= 0),
    stock_total BIGINT NOT NULL CHECK (stock_total >= 0),
    created_at  BIGINT NOT NULL
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS orders (
    id           VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
    buyer        VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    status       VARCHAR(32) NOT NULL CHECK (status IN ('pending_payment', 'paid', 'shipped',
                     'completed', 'closed', 'refund_requested', 'refunded', 'refund_rejected')),
    total_cents  BIGINT NOT NULL CHECK (total_cents >= 0),
    pay_deadline BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    close_reason VARCHAR(32),
    INDEX orders_status_id (status, id),
    INDEX orders_buyer_id (buyer, id)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS order_items (
    order_id    VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    product_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    quantity    BIGINT NOT NULL CHECK (quantity > 0),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, product_id),
    FOREIGN KEY (order_id) REFERENCES orders (id),
    FOREIGN KEY (product_id) REFERENCES products (id)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS order_events (
    id       BIGINT AUTO_INCREMENT PRIMARY KEY,
    order_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind     VARCHAR(32) NOT NULL,
    at       BIGINT NOT NULL,
    source   VARCHAR(64) NOT NULL,
    detail   VARCHAR(1024),
    UNIQUE KEY order_events_once (order_id, kind),
    INDEX order_events_kind (kind),
    FOREIGN KEY (order_id) REFERENCES orders (id)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS outbox (
    id           BIGINT AUTO_INCREMENT PRIMARY KEY,
    topic        VARCHAR(64) NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    delivered_at BIGINT,
    attempts     INT NOT NULL DEFAULT 0,
    INDEX outbox_pending (delivered_at, id)
) ENGINE = InnoDB;
";

const V1: &str = "orders, stock, events, outbox";
const V2: &str = "timer outbox";
const V3: &str = "orders status check without IN";
const V4: &str = "no order_events kind index";
const SQLITE: &[Migration] = &[
    Migration { version: 1, name: V1, sql: SQLITE_V1 },
    Migration { version: 2, name: V2, sql: SQLITE_V2 },
    Migration { version: 3, name: V3, sql: SQLITE_V3 },
    Migration { version: 4, name: V4, sql: SQLITE_V4 },
];
const POSTGRES: &[Migration] = &[
    Migration { version: 1, name: V1, sql: POSTGRES_V1 },
    Migration { version: 2, name: V2, sql: POSTGRES_V2 },
    Migration { version: 3, name: V3, sql: POSTGRES_V3 },
    Migration { version: 4, name: V4, sql: POSTGRES_V4 },
];
const MYSQL: &[Migration] = &[
    Migration { version: 1, name: V1, sql: MYSQL_V1 },
    Migration { version: 2, name: V2, sql: MYSQL_V2 },
    Migration { version: 3, name: V3, sql: MYSQL_V3 },
    Migration { version: 4, name: V4, sql: MYSQL_V4 },
];

/// The databases the order tables are written for. Only SQLite runs the order service today;
/// the PostgreSQL and MySQL steps are kept beside it so the three stay in step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    Sqlite,
    Postgres,
    Mysql,
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
            Dialect::Mysql => "mysql",
        })
    }
}

/// The ordered schema steps of a dialect (versions 1, 2, … without gaps).
pub fn migrations(dialect: Dialect) -> &'static [Migration] {
    match dialect {
        Dialect::Postgres => POSTGRES,
        Dialect::Mysql => MYSQL,
        Dialect::Sqlite => SQLITE,
    }
}

/// `CREATE TABLE IF NOT EXISTS order_schema_version …` for a dialect.
pub fn version_table(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => POSTGRES_VERSION_TABLE,
        Dialect::Mysql => MYSQL_VERSION_TABLE,
        Dialect::Sqlite => SQLITE_VERSION_TABLE,
    }
}

/// The newest order-schema version this build knows.
pub fn latest_version() -> u32 {
    SQLITE.last().map_or(0, |m| m.version)
}

/// Brings the order tables on `conn` up to [`latest_version`]; meant to run inside
/// `SqliteStore::write`, so it commits with the store's transaction or not at all. Returns the
/// version found before migrating.
pub(crate) fn migrate_sqlite(conn: &Connection, now: i64) -> overdue::Result<u32> {
    conn.execute(SQLITE_VERSION_TABLE, []).store_err("create order_schema_version")?;
    let found: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM order_schema_version", [], |r| r.get(0))
        .optional()
        .store_err("read order schema version")?
        .flatten();
    let found = u32::try_from(found.unwrap_or(0)).unwrap_or(u32::MAX);
    let latest = latest_version();
    if found > latest {
        return Err(overdue::Error::Config(format!(
            "the database has order schema version {found}, newer than the version {latest} this \
             build understands; upgrade overdue or open another database"
        )));
    }
    for step in SQLITE.iter().filter(|m| m.version > found) {
        conn.execute_batch(step.sql)
            .store_err(&format!("order schema migration {} ({})", step.version, step.name))?;
        conn.execute(
            "INSERT INTO order_schema_version (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![step.version, step.name, now],
        )
        .store_err("record order schema migration")?;
        tracing::info!(version = step.version, name = step.name, "applied order schema migration");
    }
    Ok(found)
}

/// The applied order-schema versions, ascending.
#[cfg(test)]
fn applied_versions(conn: &Connection) -> overdue::Result<Vec<u32>> {
    let mut stmt = conn.prepare("SELECT version FROM order_schema_version ORDER BY version").store_err("versions")?;
    let rows = stmt.query_map([], |r| r.get::<_, u32>(0)).store_err("versions")?;
    rows.collect::<rusqlite::Result<Vec<_>>>().store_err("versions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dialect_has_the_same_steps_numbered_from_one() {
        for d in [Dialect::Sqlite, Dialect::Postgres, Dialect::Mysql] {
            let steps = migrations(d);
            assert_eq!(steps.len(), SQLITE.len(), "{d}");
            for (i, m) in steps.iter().enumerate() {
                assert_eq!(m.version as usize, i + 1, "{d}: step {i} is numbered {}", m.version);
                assert_eq!(m.name, SQLITE[i].name, "{d}: step {} has another name than on sqlite", m.version);
            }
            let all: String = steps.iter().map(|m| m.sql).collect();
            for table in ["products", "orders", "order_items", "order_events", "outbox", "order_timer_outbox"] {
                assert!(all.contains(&format!("TABLE {table} ")) || all.contains(&format!("EXISTS {table} ")), "{d}: no table {table}");
            }
            assert!(steps[0].sql.contains("UNIQUE"), "{d}: order_events must be unique per (order_id, kind)");
            assert!(version_table(d).contains(VERSION_TABLE));
        }
    }

    #[test]
    fn step_3_keeps_every_order_and_still_refuses_an_unknown_status() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute(SQLITE_VERSION_TABLE, []).expect("version table");
        for m in &SQLITE[..2] {
            conn.execute_batch(m.sql).expect("old step");
            conn.execute("INSERT INTO order_schema_version VALUES (?1, ?2, 0)", params![m.version, m.name]).expect("record");
        }
        for (id, status) in [("o1", "pending_payment"), ("o2", "closed"), ("o3", "refund_rejected")] {
            conn.execute(
                "INSERT INTO orders VALUES (?1, 'b', ?2, 100, 5, 1, 2, 3, NULL)",
                params![id, status],
            )
            .expect("order");
        }
        assert_eq!(migrate_sqlite(&conn, 9).expect("migrate"), 2);
        let rows: Vec<(String, String, i64)> = conn
            .prepare("SELECT id, status, version FROM orders ORDER BY id")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert_eq!(
            rows,
            vec![("o1".into(), "pending_payment".into(), 3), ("o2".into(), "closed".into(), 3), ("o3".into(), "refund_rejected".into(), 3)]
        );
        let bad = conn.execute("INSERT INTO orders VALUES ('o4', 'b', 'lost', 100, 5, 1, 2, 3, NULL)", []);
        assert!(bad.expect_err("unknown status").to_string().contains("CHECK"));
        conn.execute("UPDATE orders SET status = 'paid' WHERE id = 'o1'", []).expect("a known status");
        let sql: String = conn.query_row("SELECT sql FROM sqlite_master WHERE name = 'orders'", [], |r| r.get(0)).expect("sql");
        assert!(!sql.contains(" IN ("), "{sql}");
        let indexes: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'orders' AND name IN ('orders_status_id', 'orders_buyer_id')",
                [],
                |r| r.get(0),
            )
            .expect("indexes");
        assert_eq!(indexes, 2);
        assert!(!conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'orders_v3'", [], |r| r.get::<_, i64>(0)).map(|n| n > 0).expect("gone"));
    }

    #[test]
    fn sqlite_migration_applies_once_and_is_recorded() {
        let conn = Connection::open_in_memory().expect("open");
        assert_eq!(migrate_sqlite(&conn, 1).expect("first"), 0);
        assert_eq!(migrate_sqlite(&conn, 2).expect("second"), latest_version());
        assert_eq!(applied_versions(&conn).expect("versions"), vec![1, 2, 3, 4]);
        let kind_index: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'order_events_kind'", [], |r| r.get(0))
            .expect("schema");
        assert_eq!(kind_index, 0, "step 4 drops the kind index");
        conn.execute("INSERT INTO order_schema_version VALUES (99, 'future', 3)", []).expect("future");
        let err = migrate_sqlite(&conn, 4).expect_err("newer schema is refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
