//! The payment-vs-timeout race: thousands of payments meet the close timers of the same orders.
//! Never both paid and closed; every order ends paid xor closed; stock is conserved.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use common::*;
use futures::future::{join_all, try_join_all};
use futures::future::BoxFuture;
use overdue::{Clock, ManualClock, Outcome};
use overdue_orders::*;

const ORDERS: usize = 2_000;

/// Orders per race: 2,000 on SQLite; 500 on a server, where every order is a few round trips
/// and 500 already keep every pooled connection busy at once.
fn orders_for(db: Db) -> usize {
    if db == Db::Sqlite { ORDERS } else { 500 }
}
const PRODUCTS: [&str; 4] = ["p0", "p1", "p2", "p3"];
const STOCK: i64 = 1_000_000;

async fn stocked_shop(db: Db) -> Option<Shop> {
    Some(stock(Shop::on(db).await?).await)
}

async fn stock(shop: Shop) -> Shop {
    for p in PRODUCTS {
        shop.product(p, 100, STOCK).await;
    }
    shop
}

/// Order `i` takes 1–3 units of one or two products.
fn lines(i: usize) -> Vec<(&'static str, i64)> {
    let q = (i % 3) as i64 + 1;
    if i.is_multiple_of(2) {
        vec![(PRODUCTS[i % 4], q)]
    } else {
        vec![(PRODUCTS[i % 4], q), (PRODUCTS[(i + 1) % 4], 1)]
    }
}

/// Creates `n` orders concurrently (they share group commits).
async fn create(shop: &Shop, n: usize, offset: usize) -> Vec<Order> {
    let svc = &shop.svc;
    let orders = try_join_all((0..n).map(|i| svc.create_order(new_order(&format!("buyer{}", (i + offset) % 97), &lines(i + offset)))))
        .await
        .expect("create orders");
    shop.flush().await;
    orders
}

/// The service's clock in the clock-crossing test: it follows the shop's manual clock, and once
/// armed, the `countdown`-th reading first moves that clock to `to`. The jump thus lands between
/// two payments being applied on the writer thread, at a known point in the stream.
#[derive(Debug)]
struct JumpClock {
    inner: ManualClock,
    countdown: AtomicI64,
    to: AtomicI64,
}

impl JumpClock {
    fn arm(&self, after_readings: i64, to: i64) {
        self.to.store(to, Ordering::SeqCst);
        self.countdown.store(after_readings, Ordering::SeqCst);
    }
}

impl Clock for JumpClock {
    fn now_ms(&self) -> i64 {
        if self.countdown.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.set(self.to.load(Ordering::SeqCst));
        }
        self.inner.now_ms()
    }

    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()> {
        self.inner.sleep_until(deadline_ms)
    }
}

/// Counts a finished payment when dropped (also when the task panics).
struct Finished(Arc<AtomicUsize>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Yields until `ready()` holds: waits for other tasks' progress, never for time.
async fn until(mut ready: impl FnMut() -> bool) {
    while !ready() {
        tokio::task::yield_now().await;
    }
}

/// Checks each order against the payment's answer, and the shop's invariant.
async fn verify(shop: &Shop, orders: &[Order], paid: &[bool]) -> (usize, usize) {
    let mut held: HashMap<String, i64> = HashMap::new();
    let (mut n_paid, mut n_closed) = (0, 0);
    for (o, &won) in orders.iter().zip(paid) {
        let now = shop.svc.get_order(&o.id).await.expect("get order");
        // A reminder may have come before either (it is not a status change).
        let kinds: Vec<String> = shop.kinds(&o.id).await.into_iter().filter(|k| k != "reminded").collect();
        let has = |k: &str| kinds.iter().any(|x| x == k);
        assert!(!(has("paid") && has("closed")), "order {} is both paid and closed: {kinds:?}", o.id);
        if won {
            assert_eq!(now.status, OrderStatus::Paid, "payment succeeded, so {} must be paid; events {kinds:?}", o.id);
            assert_eq!(kinds, ["created", "paid"], "{}", o.id);
            n_paid += 1;
            for it in &o.items {
                *held.entry(it.product_id.clone()).or_default() += it.quantity;
            }
        } else {
            assert_eq!(now.status, OrderStatus::Closed, "payment was refused, so {} must be closed; events {kinds:?}", o.id);
            assert_eq!(kinds, ["created", "closed"], "{}", o.id);
            assert_eq!(now.close_reason.as_deref(), Some(CLOSE_TIMEOUT));
            n_closed += 1;
        }
        assert!(shop.timer(Q_CLOSE, &o.id).await.is_none(), "no close timer left for {}", o.id);
    }
    for p in PRODUCTS {
        let product = shop.svc.get_product(p).await.expect("product");
        let sold = held.get(p).copied().unwrap_or(0);
        assert_eq!(product.stock, STOCK - sold, "{p}: stock {} + sold {sold} must be {STOCK}", product.stock);
        assert_eq!(product.stock_total, STOCK);
    }
    let report = shop.svc.check_invariants(0).await.expect("invariants");
    assert!(report.ok(), "{report:?}");
    shop.assert_transitions_counted().await;
    assert_eq!(report.orders as usize, shop.svc.status_counts().await.expect("counts").iter().map(|(_, n)| *n as usize).sum::<usize>());
    (n_paid, n_closed)
}

/// Pays every order concurrently; true where the payment succeeded. Any error other than
/// `order_closed` fails the test. Payment `i` first yields `i % stagger` times, so payments
/// spread over the engine's work instead of all queueing ahead of it.
async fn pay_all(svc: Arc<OrderService>, orders: &[Order], stagger: usize) -> Vec<bool> {
    pay_counted(svc, orders, stagger, Arc::default()).await
}

/// [`pay_all`], counting finished payments in `done`.
async fn pay_counted(svc: Arc<OrderService>, orders: &[Order], stagger: usize, done: Arc<AtomicUsize>) -> Vec<bool> {
    let tasks = orders.iter().enumerate().map(|(i, o)| {
        let svc = svc.clone();
        let id = o.id.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _count = Finished(done);
            for _ in 0..i % stagger.max(1) {
                tokio::task::yield_now().await;
            }
            match svc.pay(&id).await {
                Ok(o) => {
                    assert_eq!(o.status, OrderStatus::Paid);
                    true
                }
                Err(OrderError::OrderClosed { .. }) => false,
                Err(e) => panic!("payment of {id} failed with something other than order_closed: {e:?}"),
            }
        })
    });
    join_all(tasks).await.into_iter().map(|r| r.expect("pay task")).collect()
}

/// Half the orders are due at D, half at D + 1. At exactly D every payment runs while the
/// close timers fire: the D orders must all close (a payment at the deadline is refused, and
/// both the timer and the refused payment try to close them — once), the D + 1 orders must all
/// be paid.
async fn payments_at_the_deadline_race_the_close_timers(db: Db) {
    let Some(shop) = stocked_shop(db).await else { return };
    let n = orders_for(db);
    let mut orders = create(&shop, n / 2, 0).await;
    shop.clock.advance(1);
    orders.extend(create(&shop, n / 2, n / 2).await);
    let deadline = T0 + 30 * MIN;
    assert!(orders.iter().all(|o| o.pay_deadline == deadline || o.pay_deadline == deadline + 1));

    let fired_before = shop.engine.stats().fired;
    shop.clock.set(deadline);
    let settle = {
        let engine = shop.engine.clone();
        tokio::spawn(async move { engine.settle().await })
    };
    // Let the engine hand every reminder and the first close timers to their handlers, then pay
    // into the middle of it.
    until(|| shop.engine.stats().fired > fired_before + n as u64).await;
    let paid = pay_all(shop.svc.clone(), &orders, 64).await;
    settle.await.expect("settle");
    shop.at(deadline + 1).await; // the D + 1 timers were cancelled by the payments: nothing fires

    for (o, &won) in orders.iter().zip(&paid) {
        assert_eq!(won, o.pay_deadline > deadline, "order {} due at {} paid at {deadline}", o.id, o.pay_deadline);
    }
    let (n_paid, n_closed) = verify(&shop, &orders, &paid).await;
    assert_eq!((n_paid, n_closed), (n / 2, n / 2));
}

/// Both sides eligible at once: the close handler fires (as after a clock skew between nodes,
/// or an operator's fire-now) while the buyer pays, before the deadline. The submission order
/// alternates, so both sides win about half the time — and never both.
async fn close_handler_and_payment_racing_on_each_order_have_one_winner(db: Db) {
    let Some(shop) = stocked_shop(db).await else { return };
    let n = orders_for(db);
    let orders = create(&shop, n, 0).await;
    let now = T0 + MIN;
    shop.clock.set(now);
    let tasks = orders.iter().enumerate().map(|(i, o)| {
        let svc = shop.svc.clone();
        let id = o.id.clone();
        let due = o.pay_deadline;
        tokio::spawn(async move {
            let close = svc.handle(firing(Q_CLOSE, &id, due, now));
            let pay = svc.pay(&id);
            let (outcome, paid) = if i.is_multiple_of(2) {
                tokio::join!(close, pay)
            } else {
                let (p, c) = tokio::join!(pay, close);
                (c, p)
            };
            assert_eq!(outcome, Outcome::Done, "the close handler never fails on a race");
            match paid {
                Ok(_) => true,
                Err(OrderError::OrderClosed { .. }) => false,
                Err(e) => panic!("payment of {id} failed with something other than order_closed: {e:?}"),
            }
        })
    });
    let paid: Vec<bool> = join_all(tasks).await.into_iter().map(|r| r.expect("task")).collect();
    // The real close timers come due now; every one of them finds nothing left to do.
    shop.at(T0 + 31 * MIN).await;
    let (n_paid, n_closed) = verify(&shop, &orders, &paid).await;
    assert_eq!(n_paid + n_closed, n);
    assert!(n_paid > 0 && n_closed > 0, "both sides should win sometimes: paid {n_paid}, closed {n_closed}");
}

/// Time moves while payments are being applied. A quarter of the orders are paid at D − 1
/// (they must win). Then the next 70 % are paid while the service's clock jumps to D right
/// before the `K`-th of them is applied, and the engine fires the close timers as soon as it
/// sees D: exactly the first `K − 1` of those payments win. The last 5 % pay after the jump and
/// must lose. Whatever wins, the shop stays consistent and each answer matches its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_crossing_the_deadline_while_payments_are_applied() {
    let manual = ManualClock::new(T0);
    let jump = Arc::new(JumpClock { inner: manual.clone(), countdown: AtomicI64::new(0), to: AtomicI64::new(0) });
    let shop = stock(Shop::with_clocks(OrderConfig::default(), manual, jump.clone()).await).await;
    let orders = create(&shop, ORDERS, 0).await;
    let deadline = orders[0].pay_deadline;
    let (early, rest) = orders.split_at(ORDERS / 4);
    let (racing, late) = rest.split_at(ORDERS * 70 / 100);

    shop.at(deadline - 1).await; // the reminders fire
    let mut paid = pay_all(shop.svc.clone(), early, 1).await;
    assert!(paid.iter().all(|&p| p), "before the deadline every payment wins");

    let k = racing.len() / 2;
    jump.arm(k as i64, deadline);
    let closer = {
        let (engine, clock) = (shop.engine.clone(), shop.clock.clone());
        tokio::spawn(async move {
            until(|| clock.now() >= deadline).await;
            engine.settle().await;
        })
    };
    let racing_paid = pay_all(shop.svc.clone(), racing, 16).await;
    closer.await.expect("closer");
    assert_eq!(racing_paid.iter().filter(|&&p| p).count(), k - 1, "payments applied before the jump win, the rest lose");
    paid.extend(racing_paid);

    let late_paid = pay_all(shop.svc.clone(), late, 1).await;
    assert!(late_paid.iter().all(|&p| !p), "after the deadline every payment loses");
    paid.extend(late_paid);
    shop.at(deadline + MIN).await;

    let (n_paid, n_closed) = verify(&shop, &orders, &paid).await;
    assert_eq!((n_paid, n_closed), (early.len() + k - 1, ORDERS - early.len() - k + 1));
}

every_backend!(
    payments_at_the_deadline_race_the_close_timers,
    close_handler_and_payment_racing_on_each_order_have_one_winner,
);
