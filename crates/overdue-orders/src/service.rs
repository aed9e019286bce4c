//! [`OrderService`]: the order state machine, over the embedded SQLite store or over PostgreSQL
//! or MySQL (features `postgres`, `mysql`), whichever holds the timers.
//!
//! ## What it guarantees
//!
//! - **One write, one transaction.** Every change — an order with its stock reservations, lines,
//!   `created` event and its `order.remind` / `order.close` timers; a transition with its event,
//!   stock release and timer changes — is one write closure: it commits whole or not at all.
//!   No order exists without its close timer, no timer without its order: the order tables live
//!   in the same database as the timer tables, and each backend (`sqlite`, `sqlx_db`) writes both
//!   in one transaction.
//! - **Conditional transitions.** Each transition is `UPDATE orders … WHERE id = ? AND status IN
//!   (…)` (payment adds `AND pay_deadline > now`), and inserts its `order_events` row under
//!   `UNIQUE (order_id, kind)`. A payment and a timeout racing for the same order: exactly one
//!   matches; the other sees 0 rows and is refused (`order_closed`) or does nothing (the timer).
//! - **Idempotent handlers.** A timer handler that finds nothing to do (order paid, closed,
//!   gone, or already reminded) returns [`Outcome::Done`] and writes nothing; a store error
//!   returns [`Outcome::Fail`] so the engine retries with backoff.
//! - **Domain errors roll back.** A write that finds a domain error halfway (product out of
//!   stock on line 3) rolls back lines 1–2 and returns the [`OrderError`].
//! - **Reads beside the writer.** On SQLite, `get_*`, `list_*`, counts and the invariant check
//!   use the service's own read-only connections (see `read`), never the writer thread.
//!
//! ## Time
//!
//! "Now" is read from the injected [`Clock`] *inside* the write transaction, so a payment is judged against the deadline at the moment it is applied (after any queueing),
//! not when it was requested.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use overdue::{Clock, Engine, EngineBuilder, Firing, Outcome, QueueConfig, TimerRef};

use crate::db::{ApiMoved, OrderDb, OrderPlan};
use crate::sqlite::TimerHome;
use crate::error::{OrderError, Result};
use crate::machine::*;
use crate::model::*;
use crate::read::{fill_kinds, fill_statuses};
use crate::validate;

/// Where the orders live: the store whose database also holds the timers. Build it from the
/// store with `From` (`SqliteStore`, and with the features `PgStore`, `MysqlStore`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum OrderBackend {
    /// The embedded SQLite store (orders in the same file as the timers).
    Sqlite(overdue_sql::SqliteStore),
    /// Orders in this SQLite store, timers in the engine's store (Redis, or any store that is not
    /// SQL): each order write records its timer changes in `order_timer_outbox`, in the same
    /// transaction; a relay applies them to the engine's store in write order and deletes them.
    /// An order never exists without its timers being on their way: a crash before the relay
    /// leaves the rows for the next pass. See `docs/orders.md`, "Timers in another store".
    SqliteRelayed(overdue_sql::SqliteStore),
    /// PostgreSQL: the order tables beside the store's `timers`, in the same schema.
    #[cfg(feature = "postgres")]
    Postgres(overdue_postgres::PgStore),
    /// MySQL / MariaDB: the order tables beside the store's `timers`, in the same database.
    #[cfg(feature = "mysql")]
    Mysql(overdue_mysql::MysqlStore),
}

impl From<overdue_sql::SqliteStore> for OrderBackend {
    fn from(s: overdue_sql::SqliteStore) -> Self {
        OrderBackend::Sqlite(s)
    }
}

#[cfg(feature = "postgres")]
impl From<overdue_postgres::PgStore> for OrderBackend {
    fn from(s: overdue_postgres::PgStore) -> Self {
        OrderBackend::Postgres(s)
    }
}

#[cfg(feature = "mysql")]
impl From<overdue_mysql::MysqlStore> for OrderBackend {
    fn from(s: overdue_mysql::MysqlStore) -> Self {
        OrderBackend::Mysql(s)
    }
}

/// The order service: products, stock, orders and the four timer queues that drive them.
///
/// Build it with [`OrderService::open`], register its handlers on the engine builder with
/// [`OrderService::register_handlers`], start the engine, then [`OrderService::attach`] it.
pub struct OrderService {
    db: Box<dyn OrderDb>,
    clock: Arc<dyn Clock>,
    config: OrderConfig,
    engine: OnceLock<Arc<Engine>>,
    transitions: Transitions,
}

/// Transitions this service committed since it opened, one counter per kind of [`EVENT_KINDS`],
/// counted once the write that made the transition has committed. `/metrics` and the demo read
/// these instead of counting `order_events`, which costs a scan of every event ever written.
#[derive(Debug, Default)]
struct Transitions([AtomicU64; EVENT_KINDS.len()]);

impl Transitions {
    fn add(&self, kind: &str) {
        match EVENT_KINDS.iter().position(|k| *k == kind) {
            Some(i) => {
                self.0[i].fetch_add(1, Ordering::Relaxed);
            }
            None => debug_assert!(false, "event kind {kind:?} is not in EVENT_KINDS"),
        }
    }
}

impl std::fmt::Debug for OrderService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderService")
            .field("db", &self.db)
            .field("config", &self.config)
            .field("attached", &self.engine.get().is_some())
            .finish_non_exhaustive()
    }
}

/// How often an idle relay looks at `order_timer_outbox` anyway (rows left by a crash, or by a write
/// whose wake-up raced the relay's start).
pub const RELAY_POLL: std::time::Duration = std::time::Duration::from_millis(200);
const RELAY_MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

/// The background relay of [`OrderBackend::SqliteRelayed`]: a pass after every wake-up (and every
/// [`RELAY_POLL`]), passes back to back while full, backoff while the target store fails.
async fn relay_loop(weak: Weak<OrderService>, wake: Arc<tokio::sync::Notify>) {
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        let Some(svc) = weak.upgrade() else { return };
        match svc.flush_timers().await {
            Ok(_) => backoff = std::time::Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "relaying order timers failed; retrying");
                drop(svc);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RELAY_MAX_BACKOFF);
                continue;
            }
        }
        drop(svc);
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RELAY_POLL) => {}
        }
    }
}

impl OrderService {
    /// Opens the order service on `backend` (a store: the order tables go into its database):
    /// checks `config` and applies the order-schema migrations (in one transaction where the
    /// database allows; under a lock, so several nodes may start at once). Call it before the
    /// engine starts firing order timers.
    pub async fn open(backend: impl Into<OrderBackend>, clock: Arc<dyn Clock>, config: OrderConfig) -> Result<Arc<OrderService>> {
        validate::config(&config)?;
        let now = clock.now_ms();
        let db: Box<dyn OrderDb> = match backend.into() {
            OrderBackend::Sqlite(store) => Box::new(crate::sqlite::SqliteDb::open(store, TimerHome::Here, now).await?),
            OrderBackend::SqliteRelayed(store) => {
                Box::new(crate::sqlite::SqliteDb::open(store, TimerHome::Outbox, now).await?)
            }
            #[cfg(feature = "postgres")]
            OrderBackend::Postgres(store) => Box::new(crate::sqlx_db::postgres(store, now).await?),
            #[cfg(feature = "mysql")]
            OrderBackend::Mysql(store) => Box::new(crate::sqlx_db::mysql(store, now).await?),
        };
        tracing::info!(db = db.name(), "order service opened");
        Ok(Arc::new(OrderService { db, clock, config, engine: OnceLock::new(), transitions: Transitions::default() }))
    }

    /// The timeouts in force.
    pub fn config(&self) -> &OrderConfig {
        &self.config
    }

    /// `sqlite`, `postgres` or `mysql`: where the orders live.
    pub fn backend_name(&self) -> &'static str {
        self.db.name()
    }

    /// Registers the handlers of the four order queues ([`ORDER_QUEUES`]) with the default
    /// [`QueueConfig`]. The handlers hold a weak reference: dropping the service does not leak.
    pub fn register_handlers(self: &Arc<Self>, builder: EngineBuilder) -> EngineBuilder {
        self.register_handlers_with(builder, QueueConfig::default())
    }

    /// [`OrderService::register_handlers`] with a queue configuration of your own (retries,
    /// concurrency, handler timeout).
    pub fn register_handlers_with(self: &Arc<Self>, mut builder: EngineBuilder, config: QueueConfig) -> EngineBuilder {
        for queue in ORDER_QUEUES {
            let weak: Weak<OrderService> = Arc::downgrade(self);
            builder = builder.handler(queue, config.clone(), move |firing: Firing| {
                let weak = weak.clone();
                async move {
                    match weak.upgrade() {
                        Some(svc) => svc.handle(firing).await,
                        None => Outcome::Retry { after: GONE_RETRY, error: "the order service is shut down".into() },
                    }
                }
            });
        }
        builder
    }

    /// Hands the started engine to the service, so timers written in order transactions are
    /// announced to its trigger at once ([`Engine::track`]) instead of waiting for the horizon
    /// load or the backstop sweep. With [`OrderBackend::SqliteRelayed`] it also starts the relay
    /// that moves the timer changes to the engine's store. A second call is ignored.
    pub fn attach(self: &Arc<Self>, engine: Arc<Engine>) {
        if self.engine.set(engine).is_err() {
            tracing::warn!("OrderService::attach called twice; keeping the first engine");
            return;
        }
        if let Some(wake) = self.db.relay_wake() {
            tokio::spawn(relay_loop(Arc::downgrade(self), wake));
        }
    }

    /// Relays every pending timer change to the engine's store now (the background relay does
    /// this within [`RELAY_POLL`] of each write); returns how many were applied. Tests call it
    /// before moving a manual clock. 0 when the timers are written beside the orders.
    pub async fn flush_timers(&self) -> Result<usize> {
        let Some(engine) = self.engine.get() else { return Ok(0) };
        let mut total = 0;
        loop {
            let (refs, n) = self.db.relay_timers(engine.store().as_ref(), self.clock.now_ms()).await?;
            engine.track(refs);
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    fn track(&self, timers: Vec<TimerRef>) {
        if let (Some(engine), false) = (self.engine.get(), timers.is_empty()) {
            engine.track(timers);
        }
    }

    /// Creates a product whose `stock_total` starts at `stock`.
    pub async fn create_product(&self, p: NewProduct) -> Result<Product> {
        validate::new_product(&p)?;
        self.db.create_product(p, Arc::clone(&self.clock)).await
    }

    /// One product.
    pub async fn get_product(&self, id: &str) -> Result<Product> {
        validate::id("id", id)?;
        self.db.product(id.to_owned()).await
    }

    /// Products in id order after the cursor `after` (exclusive); `limit` 0 means 50, at most 500.
    pub async fn list_products(&self, after: Option<&str>, limit: u32) -> Result<Vec<Product>> {
        if let Some(a) = after {
            validate::id("after", a)?;
        }
        let limit = validate::page(limit)?;
        self.db.products(after.unwrap_or("").to_owned(), limit).await
    }

    /// Creates an order: reserves every line's stock, inserts the order, its lines and its
    /// `created` event, and schedules `order.remind` (if the reminder time is still ahead) and
    /// `order.close` at the deadline — all in one write. A line that cannot be reserved fails the
    /// whole order ([`OrderError::OutOfStock`] / [`OrderError::NotFound`]) and reserves nothing.
    pub async fn create_order(&self, o: NewOrder) -> Result<Order> {
        let pay_timeout_ms = validate::new_order(&o, &self.config)?;
        let plan = OrderPlan { pay_timeout_ms, remind_before_ms: validate::ms(self.config.remind_before) };
        let (order, timers) = self.db.create_order(o, plan, Arc::clone(&self.clock)).await?;
        self.transitions.add("created");
        self.track(timers);
        Ok(order)
    }

    /// One order with its lines.
    pub async fn get_order(&self, id: &str) -> Result<Order> {
        validate::id("id", id)?;
        self.db.order(id.to_owned()).await
    }

    /// An order's transitions, oldest first.
    pub async fn order_events(&self, id: &str) -> Result<Vec<OrderEvent>> {
        validate::id("id", id)?;
        self.db.events(id.to_owned()).await
    }

    /// Orders newest first (by id), filtered by status and/or buyer, before the id cursor.
    pub async fn list_orders(&self, q: &OrderQuery) -> Result<Vec<Order>> {
        let limit = validate::query(q)?;
        self.db.orders(q.clone(), limit).await
    }

    /// An API transition: applies `mv` in one write and maps a refusal to its error.
    async fn api_move(&self, id: &str, mv: Move) -> Result<Order> {
        validate::id("id", id)?;
        let delay = schedule_delay(&mv, &self.config);
        match self.db.api_move(id.to_owned(), mv, delay, Arc::clone(&self.clock)).await? {
            ApiMoved::Moved(order, timers) => {
                self.transitions.add(mv.event);
                self.track(timers);
                Ok(order)
            }
            ApiMoved::ClosedLate => {
                self.transitions.add(CLOSE.event);
                Err(OrderError::OrderClosed { id: id.to_owned() })
            }
        }
    }

    /// `pending_payment → paid`, only while `pay_deadline > now`; cancels `order.close` and
    /// `order.remind`. At or after the deadline, or on a closed order: [`OrderError::OrderClosed`]
    /// (and a still-pending order is closed in the same write, reason `timeout`).
    pub async fn pay(&self, id: &str) -> Result<Order> {
        self.api_move(id, PAY).await
    }

    /// Buyer cancel: `pending_payment → closed` (`buyer_cancel`), stock released, both payment
    /// timers cancelled.
    pub async fn cancel(&self, id: &str) -> Result<Order> {
        self.api_move(id, CANCEL).await
    }

    /// `paid → shipped`; schedules `order.auto_confirm` after [`OrderConfig::auto_confirm_after`].
    pub async fn ship(&self, id: &str) -> Result<Order> {
        self.api_move(id, SHIP).await
    }

    /// Buyer confirms receipt: `shipped → completed`; cancels `order.auto_confirm`.
    pub async fn confirm(&self, id: &str) -> Result<Order> {
        self.api_move(id, CONFIRM).await
    }

    /// `paid | shipped → refund_requested`; schedules `refund.auto_approve` after
    /// [`OrderConfig::refund_auto_approve_after`] and cancels `order.auto_confirm`.
    pub async fn request_refund(&self, id: &str) -> Result<Order> {
        self.api_move(id, REQUEST_REFUND).await
    }

    /// Merchant approves: `refund_requested → refunded`; cancels `refund.auto_approve`.
    pub async fn approve_refund(&self, id: &str) -> Result<Order> {
        self.api_move(id, APPROVE_REFUND).await
    }

    /// Merchant rejects: `refund_requested → refund_rejected`; cancels `refund.auto_approve`.
    pub async fn reject_refund(&self, id: &str) -> Result<Order> {
        self.api_move(id, REJECT_REFUND).await
    }

    /// Runs the effect of one order-timer firing. This is what the registered handlers call;
    /// tests call it directly to fire a timer twice. Idempotent: a firing with nothing (left) to
    /// do returns [`Outcome::Done`] and writes nothing; a store failure returns
    /// [`Outcome::Fail`] so the engine retries.
    pub async fn handle(&self, firing: Firing) -> Outcome {
        let id = firing.key.clone();
        if validate::id("key", &id).is_err() {
            tracing::warn!(queue = %firing.queue, key = %id, "order timer with an invalid order id; nothing to do");
            return Outcome::Done;
        }
        let result = match firing.queue.as_str() {
            Q_CLOSE => self.timer_move(firing, CLOSE).await,
            Q_AUTO_CONFIRM => self.timer_move(firing, CONFIRM).await,
            Q_REFUND_AUTO_APPROVE => self.timer_move(firing, APPROVE_REFUND).await,
            Q_REMIND => self.remind(firing).await,
            other => return Outcome::Fail(format!("queue {other:?} is not an order queue")),
        };
        match result {
            Ok(changed) => {
                tracing::debug!(order = %id, changed, "order timer handled");
                Outcome::Done
            }
            Err(e) => Outcome::fail(e),
        }
    }

    /// A timer-driven transition; `Ok(false)` when the order was not in the move's start state.
    async fn timer_move(&self, firing: Firing, mv: Move) -> overdue::Result<bool> {
        let moved = self.db.timer_move(firing.key, mv, firing.queue, Arc::clone(&self.clock)).await?;
        if moved {
            self.transitions.add(mv.event);
        }
        Ok(moved)
    }

    /// The payment reminder: once per order (the `reminded` event is inserted at most once, and
    /// the outbox row only when it was), and only while the order is unpaid and its deadline
    /// ahead.
    async fn remind(&self, firing: Firing) -> overdue::Result<bool> {
        let reminded = self.db.remind(firing.key, firing.queue, Arc::clone(&self.clock)).await?;
        if reminded {
            self.transitions.add("reminded");
        }
        Ok(reminded)
    }

    /// Undelivered outbox messages, fewest failed attempts first, then oldest (a message its receiver keeps refusing sinks behind fresh ones); `limit` 0 means 50, at most 500.
    pub async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxMessage>> {
        let limit = validate::page(limit)?;
        self.db.outbox_pending(limit).await
    }

    /// Marks messages delivered (at most [`MAX_OUTBOX_ACK`] ids; unknown or already delivered
    /// ids are ignored).
    pub async fn outbox_delivered(&self, ids: &[i64]) -> Result<()> {
        if ids.len() > MAX_OUTBOX_ACK {
            return Err(OrderError::Invalid {
                field: "ids",
                message: format!("{} ids; at most {MAX_OUTBOX_ACK} per call", ids.len()),
            });
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.db.outbox_delivered(ids.to_vec(), self.clock.now_ms()).await
    }

    /// Counts a failed delivery attempt (`attempts += 1`); the message stays pending.
    pub async fn outbox_failed(&self, id: i64) -> Result<()> {
        self.db.outbox_failed(id).await
    }

    /// Transitions this service committed since it opened, per kind: every kind of
    /// [`EVENT_KINDS`] in that order (0 if none). Free to call (no database read): this is what
    /// `/metrics` exports as `overdue_order_transitions_total`. Counts only this process's
    /// writes, so on several nodes over one database each counts its own (sum them). It can fall
    /// short of the events, never exceed them: a write whose commit reply was lost, or that
    /// committed after its caller stopped waiting (handler timeout, shutdown), is not counted.
    /// [`OrderService::transition_counts`] counts the database's events instead.
    pub fn transitions_committed(&self) -> Vec<(&'static str, u64)> {
        EVENT_KINDS.iter().zip(&self.transitions.0).map(|(k, n)| (*k, n.load(Ordering::Relaxed))).collect()
    }

    /// `order_events` rows per kind, every kind of [`EVENT_KINDS`] (0 if none), then any unknown
    /// kinds found: a scan of the whole event table (O(events); 0.75 s for 2.5M events on SQLite,
    /// `docs/benchmarks.md`), for tests and checks, not for every metrics scrape
    /// ([`OrderService::transitions_committed`]).
    pub async fn transition_counts(&self) -> Result<Vec<(String, u64)>> {
        Ok(fill_kinds(self.db.transition_counts().await?))
    }

    /// Orders per status, every status (0 if none), in lifecycle order.
    pub async fn status_counts(&self) -> Result<Vec<(OrderStatus, u64)>> {
        Ok(fill_statuses(&self.db.status_counts().await?))
    }

    /// Checks the invariant on one consistent snapshot: stock conserved per product; no order
    /// that reached `paid` has a `closed` event; no order still `pending_payment` more than
    /// `bound_ms` after its deadline; every status agrees with its events, version and close
    /// reason. Each list holds at most 1,000 ids.
    pub async fn check_invariants(&self, bound_ms: i64) -> Result<InvariantReport> {
        let now = self.clock.now_ms();
        let bound = bound_ms.max(0);
        self.db.invariants(now, bound).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_survive_the_trip_through_the_store_error() {
        let e = recover(abort(OrderError::OutOfStock { product_id: "p".into(), requested: 3, available: 1 }));
        assert!(matches!(e, OrderError::OutOfStock { requested: 3, available: 1, .. }), "{e:?}");
        let e = recover(overdue::Error::Config("x".into()));
        assert_eq!(e.code(), "store_error");
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let a = new_id("o", 1_700_000_000_000);
        let b = new_id("o", 1_700_000_000_001);
        assert!(a < b, "{a} !< {b}");
        assert_eq!(a.len(), 2 + 13 + 1 + 16);
        assert!(validate::id("id", &a).is_ok());
    }

    #[test]
    fn every_move_starts_somewhere_and_names_its_event() {
        for mv in [PAY, CLOSE, CANCEL, SHIP, CONFIRM, REQUEST_REFUND, APPROVE_REFUND, REJECT_REFUND] {
            assert!(EVENT_KINDS.contains(&mv.event), "{mv:?}");
            assert!(!mv.from.contains(&mv.to), "{mv:?}");
        }
    }
}
