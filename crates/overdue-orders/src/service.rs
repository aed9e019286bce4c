//! [`OrderService`]: the order state machine over the embedded SQLite store.
//!
//! ## What it guarantees
//!
//! - **One write, one transaction.** Every change — an order with its stock reservations, lines,
//!   `created` event and its `order.remind` / `order.close` timers; a transition with its event,
//!   stock release and timer changes — is one write closure: it commits whole or not at all.
//!   No order exists without its close timer, no timer without its order. Closures that can be
//!   refused only before their first change (one-line orders, transitions, the timer handlers)
//!   run through [`SqliteStore::write_without_savepoint`]; multi-line orders, whose third line
//!   may be out of stock after two were reserved, through [`SqliteStore::write`].
//! - **Conditional transitions.** Each transition is `UPDATE orders … WHERE id = ? AND status IN
//!   (…)` (payment adds `AND pay_deadline > now`), and inserts its `order_events` row under
//!   `UNIQUE (order_id, kind)`. A payment and a timeout racing for the same order: exactly one
//!   matches; the other sees 0 rows and is refused (`order_closed`) or does nothing (the timer).
//! - **Idempotent handlers.** A timer handler that finds nothing to do (order paid, closed,
//!   gone, or already reminded) returns [`Outcome::Done`] and writes nothing; a store error
//!   returns [`Outcome::Fail`] so the engine retries with backoff.
//! - **Domain errors roll back.** A closure that finds a domain error halfway (product out of
//!   stock on line 3) returns `Err`; its savepoint undoes lines 1–2. The domain error travels
//!   inside the store error (see [`abort`]) and comes back out as the [`OrderError`] it was.
//! - **Reads beside the writer.** `get_*`, `list_*`, counts and the invariant check use the
//!   service's own read-only connections (see `read`), never the writer thread.
//!
//! ## Time
//!
//! "Now" is read from the injected [`Clock`] *inside* the write closure, on the writer thread,
//! so a payment is judged against the deadline at the moment it is applied (after any queueing),
//! not when it was requested.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use overdue::{Clock, Engine, EngineBuilder, Firing, Outcome, QueueConfig, TimerRef, TimerSpec};
use overdue_sql::{SqlResultExt, SqliteStore, WriteCtx};
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{OrderError, Result};
use crate::model::*;
use crate::read::{self, ReadPool};
use crate::{schema, sql, validate};

/// `backend` of the store error that carries a domain error out of a write closure.
const ABORT_BACKEND: &str = "orders";
/// Pause before the engine retries a firing that arrived while the service was being dropped.
const GONE_RETRY: Duration = Duration::from_secs(1);

/// Wraps a domain error so a write closure can return `Err` (rolling back its savepoint) and
/// the caller still gets the [`OrderError`] back from [`recover`].
pub(crate) fn abort(e: OrderError) -> overdue::Error {
    overdue::Error::Store { backend: ABORT_BACKEND, message: e.to_string(), transient: false, source: Some(Box::new(e)) }
}

/// Undoes [`abort`]; any other store error becomes [`OrderError::Store`].
pub(crate) fn recover(e: overdue::Error) -> OrderError {
    match e {
        overdue::Error::Store { backend, message, transient, source: Some(source) } if backend == ABORT_BACKEND => {
            match source.downcast::<OrderError>() {
                Ok(domain) => *domain,
                Err(source) => OrderError::Store(overdue::Error::Store { backend, message, transient, source: Some(source) }),
            }
        }
        other => OrderError::Store(other),
    }
}

/// The order service: products, stock, orders and the four timer queues that drive them.
///
/// Build it with [`OrderService::open`], register its handlers on the engine builder with
/// [`OrderService::register_handlers`], start the engine, then [`OrderService::attach`] it.
pub struct OrderService {
    store: SqliteStore,
    clock: Arc<dyn Clock>,
    config: OrderConfig,
    engine: OnceLock<Arc<Engine>>,
    readers: Arc<ReadPool>,
}

impl std::fmt::Debug for OrderService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderService")
            .field("store", &self.store)
            .field("config", &self.config)
            .field("attached", &self.engine.get().is_some())
            .finish_non_exhaustive()
    }
}

/// One edge (or set of edges) of the state machine and what comes with it.
#[derive(Clone, Copy, Debug)]
struct Move {
    /// Verb for [`OrderError::IllegalTransition`].
    action: &'static str,
    /// Statuses the order may be in (the second repeats the first when there is one).
    from: [OrderStatus; 2],
    to: OrderStatus,
    /// `order_events.kind` written.
    event: &'static str,
    close_reason: Option<&'static str>,
    /// Give the order's stock back (closing).
    release_stock: bool,
    /// Timers of this order removed in the same write.
    cancel: &'static [&'static str],
    /// Timer scheduled in the same write, if any (its delay comes from the config).
    schedule: Option<&'static str>,
    /// Only while `pay_deadline > now` (payment).
    before_deadline: bool,
}

use OrderStatus::*;

const PAY: Move = Move {
    action: "pay",
    from: [PendingPayment, PendingPayment],
    to: Paid,
    event: "paid",
    close_reason: None,
    release_stock: false,
    cancel: &[Q_CLOSE, Q_REMIND],
    schedule: None,
    before_deadline: true,
};
const CLOSE: Move = Move {
    action: "close",
    from: [PendingPayment, PendingPayment],
    to: Closed,
    event: "closed",
    close_reason: Some(CLOSE_TIMEOUT),
    release_stock: true,
    cancel: &[Q_CLOSE, Q_REMIND],
    schedule: None,
    before_deadline: false,
};
const CANCEL: Move = Move { action: "cancel", close_reason: Some(CLOSE_BUYER_CANCEL), ..CLOSE };
const SHIP: Move = Move {
    action: "ship",
    from: [Paid, Paid],
    to: Shipped,
    event: "shipped",
    close_reason: None,
    release_stock: false,
    cancel: &[],
    schedule: Some(Q_AUTO_CONFIRM),
    before_deadline: false,
};
const CONFIRM: Move = Move {
    action: "confirm",
    from: [Shipped, Shipped],
    to: Completed,
    event: "completed",
    cancel: &[Q_AUTO_CONFIRM],
    schedule: None,
    ..SHIP
};
const REQUEST_REFUND: Move = Move {
    action: "request a refund for",
    from: [Paid, Shipped],
    to: RefundRequested,
    event: "refund_requested",
    cancel: &[Q_AUTO_CONFIRM],
    schedule: Some(Q_REFUND_AUTO_APPROVE),
    ..SHIP
};
const APPROVE_REFUND: Move = Move {
    action: "approve the refund of",
    from: [RefundRequested, RefundRequested],
    to: Refunded,
    event: "refunded",
    cancel: &[Q_REFUND_AUTO_APPROVE],
    schedule: None,
    ..SHIP
};
const REJECT_REFUND: Move =
    Move { action: "reject the refund of", to: RefundRejected, event: "refund_rejected", ..APPROVE_REFUND };

/// What a transition write did.
enum Applied {
    /// The order moved; here it is (items loaded if asked) with the timers scheduled.
    Moved(Order, Vec<TimerRef>),
    /// The order is not in a state the move starts from.
    Refused { status: OrderStatus, pay_deadline: i64 },
    /// No such order.
    Missing,
}

/// Who caused a transition: `order_events.source` and `.detail`.
#[derive(Clone, Copy, Debug)]
struct Cause<'a> {
    source: &'a str,
    detail: Option<&'a str>,
}

const BY_API: Cause<'static> = Cause { source: SOURCE_API, detail: None };

/// Applies `mv` to order `id` inside a write closure. Writes nothing unless the order matched.
fn apply(
    ctx: &mut WriteCtx<'_>,
    id: &str,
    mv: &Move,
    now: i64,
    cause: Cause<'_>,
    schedule_delay_ms: i64,
    with_items: bool,
) -> overdue::Result<Applied> {
    let conn = ctx.connection();
    let changed = conn
        .prepare_cached(sql::TRANSITION)
        .and_then(|mut s| {
            s.execute(params![id, mv.to, now, mv.close_reason, mv.from[0], mv.from[1], i64::from(mv.before_deadline)])
        })
        .store_err(mv.action)?;
    let moved = if changed == 0 {
        None
    } else {
        Some(
            conn.prepare_cached(sql::SELECT_ORDER)
                .and_then(|mut s| s.query_row([id], read::order_row))
                .store_err(mv.action)?,
        )
    };
    let Some(mut order) = moved else {
        let state = conn
            .prepare_cached(sql::ORDER_STATE)
            .and_then(|mut s| s.query_row([id], |r| Ok((r.get::<_, OrderStatus>(0)?, r.get::<_, i64>(1)?))).optional())
            .store_err(mv.action)?;
        return Ok(match state {
            Some((status, pay_deadline)) => Applied::Refused { status, pay_deadline },
            None => Applied::Missing,
        });
    };
    conn.prepare_cached(sql::INSERT_EVENT)
        .and_then(|mut s| s.execute(params![id, mv.event, now, cause.source, cause.detail]))
        .store_err("record order event")?;
    let items = if mv.release_stock || with_items { read::items(conn, id)? } else { Vec::new() };
    if mv.release_stock {
        let mut release = conn.prepare_cached(sql::RELEASE_STOCK).store_err("release stock")?;
        for it in &items {
            release.execute(params![it.product_id, it.quantity]).store_err("release stock")?;
        }
    }
    for queue in mv.cancel {
        ctx.cancel(queue, id)?;
    }
    let mut timers = Vec::new();
    if let Some(queue) = mv.schedule {
        let due_at = now.saturating_add(schedule_delay_ms);
        let generations = ctx.schedule(&[TimerSpec::new(queue, id, due_at)], now)?;
        timers.extend(generations.into_iter().map(|generation| TimerRef {
            queue: queue.to_owned(),
            key: id.to_owned(),
            generation,
            due_at,
        }));
    }
    if with_items {
        order.items = items;
    }
    Ok(Applied::Moved(order, timers))
}

/// A fresh id: `<prefix>-<13-digit ms>-<16 hex>`; sorts by creation time to the millisecond.
fn new_id(prefix: &str, now: i64) -> String {
    format!("{prefix}-{:013}-{:016x}", now.max(0), rand::random::<u64>())
}

impl OrderService {
    /// Opens the order service on `store`: checks `config`, applies the order-schema migrations
    /// (in one store write) and opens the read connections. Call it before the engine starts
    /// firing order timers.
    pub async fn open(store: SqliteStore, clock: Arc<dyn Clock>, config: OrderConfig) -> Result<Arc<OrderService>> {
        validate::config(&config)?;
        let now = clock.now_ms();
        let found = store.write(move |ctx| schema::migrate_sqlite(ctx.connection(), now)).await.map_err(recover)?;
        let path = store.path().to_path_buf();
        let readers = tokio::task::spawn_blocking(move || ReadPool::open(path, read::READERS))
            .await
            .map_err(|e| OrderError::Store(overdue::Error::store("sqlite", format!("opening readers failed: {e}"), false, e)))??;
        tracing::info!(db = %store.path().display(), schema_found = found, schema = schema::latest_version(), "order service opened");
        Ok(Arc::new(OrderService { store, clock, config, engine: OnceLock::new(), readers: Arc::new(readers) }))
    }

    /// The timeouts in force.
    pub fn config(&self) -> &OrderConfig {
        &self.config
    }

    /// The store underneath.
    pub fn store(&self) -> &SqliteStore {
        &self.store
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
    /// load or the backstop sweep. A second call is ignored.
    pub fn attach(&self, engine: Arc<Engine>) {
        if self.engine.set(engine).is_err() {
            tracing::warn!("OrderService::attach called twice; keeping the first engine");
        }
    }

    fn track(&self, timers: Vec<TimerRef>) {
        if let (Some(engine), false) = (self.engine.get(), timers.is_empty()) {
            engine.track(timers);
        }
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        self.readers.read(f).await
    }

    /// Creates a product whose `stock_total` starts at `stock`.
    pub async fn create_product(&self, p: NewProduct) -> Result<Product> {
        validate::new_product(&p)?;
        let clock = Arc::clone(&self.clock);
        self.store
            .write(move |ctx| {
                let now = clock.now_ms();
                let id = p.id.clone().unwrap_or_else(|| new_id("p", now));
                let inserted = ctx
                    .connection()
                    .prepare_cached(sql::INSERT_PRODUCT)
                    .and_then(|mut s| s.execute(params![id, p.name, p.price_cents, p.stock, now]))
                    .store_err("insert product")?;
                if inserted == 0 {
                    return Err(abort(OrderError::AlreadyExists { what: "product", id }));
                }
                Ok(Product { id, name: p.name, price_cents: p.price_cents, stock: p.stock, stock_total: p.stock, created_at: now })
            })
            .await
            .map_err(recover)
    }

    /// One product.
    pub async fn get_product(&self, id: &str) -> Result<Product> {
        validate::id("id", id)?;
        let id = id.to_owned();
        self.read(move |c| read::product(c, &id)).await
    }

    /// Products in id order after the cursor `after` (exclusive); `limit` 0 means 50, at most 500.
    pub async fn list_products(&self, after: Option<&str>, limit: u32) -> Result<Vec<Product>> {
        if let Some(a) = after {
            validate::id("after", a)?;
        }
        let limit = validate::page(limit)?;
        let after = after.unwrap_or("").to_owned();
        self.read(move |c| read::products(c, &after, limit)).await
    }

    /// Creates an order: reserves every line's stock, inserts the order, its lines and its
    /// `created` event, and schedules `order.remind` (if the reminder time is still ahead) and
    /// `order.close` at the deadline — all in one write. A line that cannot be reserved fails the
    /// whole order ([`OrderError::OutOfStock`] / [`OrderError::NotFound`]) and reserves nothing.
    pub async fn create_order(&self, o: NewOrder) -> Result<Order> {
        let pay_timeout = validate::new_order(&o, &self.config)?;
        let remind_before = validate::ms(self.config.remind_before);
        let clock = Arc::clone(&self.clock);
        // A one-line order can only be refused by its reservation, its first write: it needs no
        // savepoint (see `SqliteStore::write_without_savepoint`). More lines need one, to undo
        // the lines already reserved when a later one is out of stock.
        let single_line = o.items.len() == 1;
        let job = move |ctx: &mut WriteCtx<'_>| {
                let now = clock.now_ms();
                let id = new_id("o", now);
                let deadline = now.saturating_add(pay_timeout);
                let conn = ctx.connection();
                let mut items = Vec::with_capacity(o.items.len());
                let mut total: i64 = 0;
                {
                    let mut reserve = conn.prepare_cached(sql::RESERVE_STOCK).store_err("reserve stock")?;
                    let mut price_of = conn.prepare_cached(sql::PRODUCT_PRICE).store_err("reserve stock")?;
                    for line in &o.items {
                        let reserved = reserve.execute(params![line.product_id, line.quantity]).store_err("reserve stock")?;
                        let price = if reserved == 0 {
                            None
                        } else {
                            Some(price_of.query_row([&line.product_id], |r| r.get::<_, i64>(0)).store_err("reserve stock")?)
                        };
                        let Some(price) = price else {
                            let available = conn
                                .prepare_cached(sql::PRODUCT_STOCK)
                                .and_then(|mut s| s.query_row([&line.product_id], |r| r.get::<_, i64>(0)).optional())
                                .store_err("read stock")?;
                            return Err(abort(match available {
                                None => OrderError::NotFound { what: "product", id: line.product_id.clone() },
                                Some(available) => OrderError::OutOfStock {
                                    product_id: line.product_id.clone(),
                                    requested: line.quantity,
                                    available,
                                },
                            }));
                        };
                        total = price
                            .checked_mul(line.quantity)
                            .and_then(|line_total| total.checked_add(line_total))
                            .ok_or_else(|| abort(OrderError::Invalid { field: "items", message: "the order total overflows".into() }))?;
                        items.push(OrderItem { product_id: line.product_id.clone(), quantity: line.quantity, price_cents: price });
                    }
                }
                conn.prepare_cached(sql::INSERT_ORDER)
                    .and_then(|mut s| s.execute(params![id, o.buyer, total, deadline, now]))
                    .store_err("insert order")?;
                {
                    let mut insert = conn.prepare_cached(sql::INSERT_ITEM).store_err("insert order item")?;
                    for it in &items {
                        insert.execute(params![id, it.product_id, it.quantity, it.price_cents]).store_err("insert order item")?;
                    }
                }
                conn.prepare_cached(sql::INSERT_EVENT)
                    .and_then(|mut s| s.execute(params![id, "created", now, SOURCE_API, Option::<String>::None]))
                    .store_err("record order event")?;
                let mut specs = Vec::with_capacity(2);
                let remind_at = deadline.saturating_sub(remind_before);
                if remind_before > 0 && remind_at > now {
                    specs.push(TimerSpec::new(Q_REMIND, id.clone(), remind_at));
                }
                specs.push(TimerSpec::new(Q_CLOSE, id.clone(), deadline));
                // The closure returns the error, so its savepoint undoes everything on failure.
                let generations = ctx.schedule_or_fail(&specs, now)?;
                let timers = specs
                    .into_iter()
                    .zip(generations)
                    .map(|(s, generation)| TimerRef { queue: s.queue, key: s.key, generation, due_at: s.due_at })
                    .collect::<Vec<_>>();
                let order = Order {
                    id,
                    buyer: o.buyer,
                    status: PendingPayment,
                    total_cents: total,
                    pay_deadline: deadline,
                    created_at: now,
                    updated_at: now,
                    version: 1,
                    close_reason: None,
                    items,
                };
                Ok((order, timers))
            };
        let written = if single_line { self.store.write_without_savepoint(job).await } else { self.store.write(job).await };
        let (order, timers) = written.map_err(recover)?;
        self.track(timers);
        Ok(order)
    }

    /// One order with its lines.
    pub async fn get_order(&self, id: &str) -> Result<Order> {
        validate::id("id", id)?;
        let id = id.to_owned();
        self.read(move |c| read::order(c, &id)).await
    }

    /// An order's transitions, oldest first.
    pub async fn order_events(&self, id: &str) -> Result<Vec<OrderEvent>> {
        validate::id("id", id)?;
        let id = id.to_owned();
        self.read(move |c| read::events(c, &id)).await
    }

    /// Orders newest first (by id), filtered by status and/or buyer, before the id cursor.
    pub async fn list_orders(&self, q: &OrderQuery) -> Result<Vec<Order>> {
        let limit = validate::query(q)?;
        let q = q.clone();
        self.read(move |c| read::orders(c, &q, limit)).await
    }

    /// An API transition: applies `mv` in one write and maps a refusal to its error.
    async fn api_move(&self, id: &str, mv: Move) -> Result<Order> {
        validate::id("id", id)?;
        let delay = match mv.schedule {
            Some(Q_AUTO_CONFIRM) => validate::ms(self.config.auto_confirm_after),
            Some(Q_REFUND_AUTO_APPROVE) => validate::ms(self.config.refund_auto_approve_after),
            _ => 0,
        };
        let clock = Arc::clone(&self.clock);
        let id = id.to_owned();
        // `apply` writes nothing unless the transition matched, and every refusal returns before
        // that: no savepoint needed.
        let outcome = self
            .store
            .write_without_savepoint(move |ctx| {
                let now = clock.now_ms();
                match apply(ctx, &id, &mv, now, BY_API, delay, true)? {
                    Applied::Moved(order, timers) => Ok(Ok((order, timers))),
                    Applied::Missing => Err(abort(OrderError::NotFound { what: "order", id })),
                    Applied::Refused { status: PendingPayment, pay_deadline } if mv.before_deadline && pay_deadline <= now => {
                        // The payment lost the race against the clock. Close the order now, in the
                        // same write, rather than leave it pending for its timer: the caller is told
                        // `order_closed` and every later read agrees. The timer then finds nothing
                        // to do.
                        let cause = Cause { source: SOURCE_API, detail: Some("payment arrived after the deadline") };
                        apply(ctx, &id, &CLOSE, now, cause, 0, false)?;
                        Ok(Err(OrderError::OrderClosed { id }))
                    }
                    Applied::Refused { status: Closed, .. } if mv.before_deadline => {
                        Err(abort(OrderError::OrderClosed { id }))
                    }
                    Applied::Refused { status, .. } => {
                        Err(abort(OrderError::IllegalTransition { id, action: mv.action, status }))
                    }
                }
            })
            .await
            .map_err(recover)?;
        let (order, timers) = outcome?;
        self.track(timers);
        Ok(order)
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
        let clock = Arc::clone(&self.clock);
        self.store
            .write_without_savepoint(move |ctx| {
                let now = clock.now_ms();
                let applied = apply(ctx, &firing.key, &mv, now, Cause { source: &firing.queue, detail: None }, 0, false)?;
                Ok(matches!(applied, Applied::Moved(..)))
            })
            .await
    }

    /// The payment reminder: once per order (the `reminded` event is inserted at most once, and
    /// the outbox row only when it was), and only while the order is unpaid and its deadline
    /// ahead.
    async fn remind(&self, firing: Firing) -> overdue::Result<bool> {
        let clock = Arc::clone(&self.clock);
        // The event insert is the first change; nothing refuses after it: no savepoint needed.
        self.store
            .write_without_savepoint(move |ctx| {
                let now = clock.now_ms();
                let conn = ctx.connection();
                let id = &firing.key;
                let target = conn
                    .prepare_cached(sql::REMIND_TARGET)
                    .and_then(|mut s| {
                        s.query_row(params![id, now], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                            .optional()
                    })
                    .store_err("read order for reminder")?;
                let Some((buyer, pay_deadline, total_cents)) = target else { return Ok(false) };
                let inserted = conn
                    .prepare_cached(sql::INSERT_EVENT_ONCE)
                    .and_then(|mut s| s.execute(params![id, "reminded", now, firing.queue, Option::<String>::None]))
                    .store_err("record reminder")?;
                if inserted == 0 {
                    return Ok(false);
                }
                let payload = serde_json::json!({
                    "order_id": id,
                    "buyer": buyer,
                    "pay_deadline": pay_deadline,
                    "total_cents": total_cents,
                })
                .to_string();
                conn.prepare_cached(sql::INSERT_OUTBOX)
                    .and_then(|mut s| s.execute(params![TOPIC_REMINDER, payload, now]))
                    .store_err("write reminder to the outbox")?;
                Ok(true)
            })
            .await
    }

    /// Undelivered outbox messages, fewest failed attempts first, then oldest (a message its receiver keeps refusing sinks behind fresh ones); `limit` 0 means 50, at most 500.
    pub async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxMessage>> {
        let limit = validate::page(limit)?;
        self.read(move |c| read::outbox_pending(c, limit)).await
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
        let ids = ids.to_vec();
        let clock = Arc::clone(&self.clock);
        self.store
            .write(move |ctx| {
                let now = clock.now_ms();
                let mut stmt = ctx.connection().prepare_cached(sql::OUTBOX_DELIVERED).store_err("ack outbox")?;
                for id in &ids {
                    stmt.execute(params![id, now]).store_err("ack outbox")?;
                }
                Ok(())
            })
            .await
            .map_err(recover)
    }

    /// Counts a failed delivery attempt (`attempts += 1`); the message stays pending.
    pub async fn outbox_failed(&self, id: i64) -> Result<()> {
        self.store
            .write(move |ctx| {
                let n = ctx
                    .connection()
                    .prepare_cached(sql::OUTBOX_FAILED)
                    .and_then(|mut s| s.execute([id]))
                    .store_err("count outbox failure")?;
                if n == 0 {
                    return Err(abort(OrderError::NotFound { what: "outbox message", id: id.to_string() }));
                }
                Ok(())
            })
            .await
            .map_err(recover)
    }

    /// `order_events` rows per kind: every kind of [`EVENT_KINDS`] (0 if none), for metrics.
    pub async fn transition_counts(&self) -> Result<Vec<(String, u64)>> {
        self.read(|c| read::transition_counts(c)).await
    }

    /// Orders per status, every status (0 if none), in lifecycle order.
    pub async fn status_counts(&self) -> Result<Vec<(OrderStatus, u64)>> {
        self.read(|c| read::status_counts(c)).await
    }

    /// Checks the invariant on one consistent snapshot: stock conserved per product; no order
    /// that reached `paid` has a `closed` event; no order still `pending_payment` more than
    /// `bound_ms` after its deadline; every status agrees with its events, version and close
    /// reason. Each list holds at most 1,000 ids.
    pub async fn check_invariants(&self, bound_ms: i64) -> Result<InvariantReport> {
        let now = self.clock.now_ms();
        let bound = bound_ms.max(0);
        self.read(move |c| read::invariants(c, now, bound)).await
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
