//! The SQLite statements the order service runs (DDL lives in [`crate::schema`], with the
//! PostgreSQL and MySQL text and the table of what differs). Parameters are `?N`; each
//! constant's doc lists them in order.
//!
//! Every state change is one conditional statement whose `WHERE` names the state it expects
//! (`… AND status IN (…)`, `… AND stock >= ?`): under concurrency (several writers on
//! PostgreSQL/MySQL, or simply a payment and a timer queued in the same SQLite group) exactly one
//! of two conflicting changes matches a row, and the loser sees "0 rows" and is told why.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::model::OrderStatus;

impl ToSql for OrderStatus {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for OrderStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        s.parse().map_err(|e: String| FromSqlError::Other(e.into()))
    }
}

/// `(id, name, price_cents, stock, created_at)`; `stock_total` starts equal to `stock`. Inserts
/// nothing if the id exists.
pub(crate) const INSERT_PRODUCT: &str = "INSERT INTO products (id, name, price_cents, stock, stock_total, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?4, ?5) ON CONFLICT (id) DO NOTHING";

/// `(id)`.
pub(crate) const SELECT_PRODUCT: &str =
    "SELECT id, name, price_cents, stock, stock_total, created_at FROM products WHERE id = ?1";

/// `(after_id, limit)`: products in id order after a cursor (`''` for the first page).
pub(crate) const LIST_PRODUCTS: &str =
    "SELECT id, name, price_cents, stock, stock_total, created_at FROM products WHERE id > ?1 ORDER BY id LIMIT ?2";

/// `(product_id, quantity)`: 1 row changed, or 0 when the product is missing or has less than
/// `quantity` left. The conditional decrement is the whole reservation; the unit price is read
/// after it with [`PRODUCT_PRICE`]. (No `RETURNING`: SQLite buffers `RETURNING` rows in an
/// ephemeral table, and opening and closing it cost more than the second point lookup.)
pub(crate) const RESERVE_STOCK: &str = "UPDATE products SET stock = stock - ?2 WHERE id = ?1 AND stock >= ?2";

/// `(product_id)` → the unit price.
pub(crate) const PRODUCT_PRICE: &str = "SELECT price_cents FROM products WHERE id = ?1";

/// `(product_id)` → stock; to explain a failed reservation.
pub(crate) const PRODUCT_STOCK: &str = "SELECT stock FROM products WHERE id = ?1";

/// `(product_id, quantity)`: gives a line's quantity back to its product. Run once per line of
/// [`SELECT_ITEMS`]; a plain per-row update reads the same on every database (no `UPDATE … FROM`
/// / `UPDATE … JOIN` split) and, on SQLite, stays prepared (an `UPDATE … FROM` was re-prepared on
/// every execution).
pub(crate) const RELEASE_STOCK: &str = "UPDATE products SET stock = stock + ?2 WHERE id = ?1";

/// Columns of an order, in [`crate::model::Order`] field order (without items).
pub(crate) const ORDER_COLUMNS: &str =
    "id, buyer, status, total_cents, pay_deadline, created_at, updated_at, version, close_reason";

/// `(id, buyer, total_cents, pay_deadline, now)`: a new order, `pending_payment`, version 1.
pub(crate) const INSERT_ORDER: &str = "INSERT INTO orders \
     (id, buyer, status, total_cents, pay_deadline, created_at, updated_at, version, close_reason) \
     VALUES (?1, ?2, 'pending_payment', ?3, ?4, ?5, ?5, 1, NULL)";

/// `(order_id, product_id, quantity, price_cents)`.
pub(crate) const INSERT_ITEM: &str =
    "INSERT INTO order_items (order_id, product_id, quantity, price_cents) VALUES (?1, ?2, ?3, ?4)";

/// `(order_id, kind, at, source, detail)`. A second event of the same kind for the same order
/// violates `UNIQUE (order_id, kind)` and fails the write.
pub(crate) const INSERT_EVENT: &str =
    "INSERT INTO order_events (order_id, kind, at, source, detail) VALUES (?1, ?2, ?3, ?4, ?5)";

/// Same parameters as [`INSERT_EVENT`]; inserts nothing (0 rows) if the event exists.
pub(crate) const INSERT_EVENT_ONCE: &str = "INSERT INTO order_events (order_id, kind, at, source, detail) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (order_id, kind) DO NOTHING";

/// The transition: `(id, to, now, close_reason or NULL, from_a, from_b, before_deadline 0|1)`.
/// Matches (1 row changed) only an order in `from_a` or `from_b` (and, when `before_deadline`
/// is 1, whose deadline is still ahead); the updated row is read after it with
/// [`SELECT_ORDER`] in the same write (no `RETURNING`, see [`RESERVE_STOCK`]).
pub(crate) const TRANSITION: &str = "UPDATE orders SET status = ?2, version = version + 1, updated_at = ?3, \
     close_reason = COALESCE(?4, close_reason) \
     WHERE id = ?1 AND (status = ?5 OR status = ?6) AND (?7 = 0 OR pay_deadline > ?3)";

/// `(id)` → `(status, pay_deadline)`: why a transition did not match.
pub(crate) const ORDER_STATE: &str = "SELECT status, pay_deadline FROM orders WHERE id = ?1";

/// `(id, now)` → `(buyer, pay_deadline, total_cents)` if a reminder still makes sense.
pub(crate) const REMIND_TARGET: &str = "SELECT buyer, pay_deadline, total_cents FROM orders \
     WHERE id = ?1 AND status = 'pending_payment' AND pay_deadline > ?2";

/// `(topic, payload, now)`.
pub(crate) const INSERT_OUTBOX: &str =
    "INSERT INTO outbox (topic, payload, created_at, delivered_at, attempts) VALUES (?1, ?2, ?3, NULL, 0)";

/// `(id)`.
pub(crate) const SELECT_ORDER: &str = "SELECT id, buyer, status, total_cents, pay_deadline, created_at, \
     updated_at, version, close_reason FROM orders WHERE id = ?1";

/// `(order_id)`: lines in product order.
pub(crate) const SELECT_ITEMS: &str =
    "SELECT product_id, quantity, price_cents FROM order_items WHERE order_id = ?1 ORDER BY product_id";

/// `(order_id)`: events in the order they happened.
pub(crate) const SELECT_EVENTS: &str =
    "SELECT kind, at, source, detail FROM order_events WHERE order_id = ?1 ORDER BY id";

/// `(limit)`: undelivered messages, fewest failed attempts first, then oldest.
pub(crate) const OUTBOX_PENDING: &str = "SELECT id, topic, payload, created_at, attempts FROM outbox \
     WHERE delivered_at IS NULL ORDER BY attempts, id LIMIT ?1";

/// `(id, now)`.
pub(crate) const OUTBOX_DELIVERED: &str =
    "UPDATE outbox SET delivered_at = ?2 WHERE id = ?1 AND delivered_at IS NULL";

/// `(id)`.
pub(crate) const OUTBOX_FAILED: &str = "UPDATE outbox SET attempts = attempts + 1 WHERE id = ?1";

/// Orders per status.
pub(crate) const STATUS_COUNTS: &str = "SELECT status, COUNT(*) FROM orders GROUP BY status";

/// Events per kind.
pub(crate) const TRANSITION_COUNTS: &str = "SELECT kind, COUNT(*) FROM order_events GROUP BY kind";

/// Products whose `stock_total` is not `stock` plus what open (not closed) orders hold:
/// `(id, stock, stock_total, held)`.
pub(crate) const INVARIANT_STOCK: &str = "SELECT p.id, p.stock, p.stock_total, COALESCE(h.held, 0) \
     FROM products p LEFT JOIN ( \
         SELECT i.product_id AS product_id, SUM(i.quantity) AS held \
         FROM order_items i JOIN orders o ON o.id = i.order_id \
         WHERE o.status <> 'closed' GROUP BY i.product_id \
     ) h ON h.product_id = p.id \
     WHERE p.stock_total <> p.stock + COALESCE(h.held, 0) ORDER BY p.id";

/// Every order with a bitmask of its event kinds (bits in [`crate::model::EVENT_KINDS`] order;
/// bit 9 marks an unknown kind) and its event count: `(id, status, version, close_reason,
/// pay_deadline, mask, events)`.
pub(crate) const INVARIANT_ORDERS: &str = "SELECT o.id, o.status, o.version, o.close_reason, o.pay_deadline, \
     COALESCE(SUM(CASE WHEN e.kind IS NULL THEN 0 \
         WHEN e.kind = 'created' THEN 1 WHEN e.kind = 'reminded' THEN 2 WHEN e.kind = 'paid' THEN 4 \
         WHEN e.kind = 'closed' THEN 8 WHEN e.kind = 'shipped' THEN 16 WHEN e.kind = 'completed' THEN 32 \
         WHEN e.kind = 'refund_requested' THEN 64 WHEN e.kind = 'refunded' THEN 128 \
         WHEN e.kind = 'refund_rejected' THEN 256 ELSE 512 END), 0), \
     COUNT(e.id) \
     FROM orders o LEFT JOIN order_events e ON e.order_id = o.id GROUP BY o.id ORDER BY o.id";

/// Events whose order does not exist: `(order_id)`.
pub(crate) const INVARIANT_ORPHAN_EVENTS: &str = "SELECT DISTINCT e.order_id FROM order_events e \
     LEFT JOIN orders o ON o.id = e.order_id WHERE o.id IS NULL ORDER BY e.order_id";

/// `(op 'schedule'|'cancel', queue, key, due_at or NULL, now)`: a timer change for the relay,
/// written in the order's transaction when the timers live in another store.
pub(crate) const TIMER_OUTBOX_INSERT: &str =
    "INSERT INTO order_timer_outbox (op, queue, key, due_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5)";

/// `(limit)`: the oldest timer changes, in the order they were written.
pub(crate) const TIMER_OUTBOX_PENDING: &str =
    "SELECT id, op, queue, key, due_at FROM order_timer_outbox ORDER BY id LIMIT ?1";

/// `(last id)`: the changes a relay pass applied.
pub(crate) const TIMER_OUTBOX_DONE: &str = "DELETE FROM order_timer_outbox WHERE id <= ?1";
