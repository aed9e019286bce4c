//! Every timer handler may be delivered twice; the second delivery changes and records nothing.

mod common;

use common::*;
use overdue::Outcome;
use overdue_orders::*;

/// Everything a handler could touch, for before/after comparison.
/// The in-process transition counters are checked against the events on every snapshot, so a
/// repeated firing that counted a transition it did not commit fails too.
async fn snapshot(shop: &Shop, id: &str) -> (Order, Vec<OrderEvent>, i64, usize, Vec<(String, u64)>) {
    shop.assert_transitions_counted().await;
    (
        shop.svc.get_order(id).await.expect("order"),
        shop.svc.order_events(id).await.expect("events"),
        shop.stock("apple").await,
        shop.svc.outbox_pending(0).await.expect("outbox").len(),
        shop.svc.transition_counts().await.expect("counts"),
    )
}

async fn close_fired_twice_closes_once(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 100, 10).await;
    let o = shop.order("amy", &[("apple", 4)]).await;
    shop.clock.set(o.pay_deadline);
    let f = firing(Q_CLOSE, &o.id, o.pay_deadline, o.pay_deadline);

    assert_eq!(shop.svc.handle(f.clone()).await, Outcome::Done);
    let first = snapshot(&shop, &o.id).await;
    assert_eq!(first.0.status, OrderStatus::Closed);
    assert_eq!(first.2, 10, "stock released once");

    shop.clock.advance(MIN);
    assert_eq!(shop.svc.handle(f.clone()).await, Outcome::Done);
    assert_eq!(snapshot(&shop, &o.id).await, first, "the second firing changed something");

    // And the engine's own firing afterwards (the timer was removed by the first close) too.
    shop.at(o.pay_deadline + 2 * MIN).await;
    assert_eq!(snapshot(&shop, &o.id).await, first);
    shop.assert_invariants().await;
}

async fn late_close_after_payment_changes_nothing(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 100, 10).await;
    let o = shop.order("ben", &[("apple", 2)]).await;
    shop.svc.pay(&o.id).await.expect("pay");
    let before = snapshot(&shop, &o.id).await;
    shop.clock.set(o.pay_deadline + DAY);
    assert_eq!(shop.svc.handle(firing(Q_CLOSE, &o.id, o.pay_deadline, o.pay_deadline + DAY)).await, Outcome::Done);
    assert_eq!(snapshot(&shop, &o.id).await, before);
    shop.assert_invariants().await;
}

async fn every_handler_is_idempotent(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 100, 10).await;

    // Reminder.
    let r = shop.order("cy", &[("apple", 1)]).await;
    let at = r.pay_deadline - 5 * MIN;
    shop.clock.set(at);
    let f = firing(Q_REMIND, &r.id, at, at);
    assert_eq!(shop.svc.handle(f.clone()).await, Outcome::Done);
    let first = snapshot(&shop, &r.id).await;
    assert_eq!(first.3, 1);
    assert_eq!(shop.svc.handle(f).await, Outcome::Done);
    assert_eq!(snapshot(&shop, &r.id).await, first);

    // Auto-confirm.
    let c = shop.order("cy", &[("apple", 1)]).await;
    shop.svc.pay(&c.id).await.expect("pay");
    shop.svc.ship(&c.id).await.expect("ship");
    let f = firing(Q_AUTO_CONFIRM, &c.id, at, at);
    assert_eq!(shop.svc.handle(f.clone()).await, Outcome::Done);
    let first = snapshot(&shop, &c.id).await;
    assert_eq!(first.0.status, OrderStatus::Completed);
    assert_eq!(shop.svc.handle(f).await, Outcome::Done);
    assert_eq!(snapshot(&shop, &c.id).await, first);

    // Refund auto-approve.
    let a = shop.order("cy", &[("apple", 1)]).await;
    shop.svc.pay(&a.id).await.expect("pay");
    shop.svc.request_refund(&a.id).await.expect("refund");
    let f = firing(Q_REFUND_AUTO_APPROVE, &a.id, at, at);
    assert_eq!(shop.svc.handle(f.clone()).await, Outcome::Done);
    let first = snapshot(&shop, &a.id).await;
    assert_eq!(first.0.status, OrderStatus::Refunded);
    assert_eq!(shop.svc.handle(f).await, Outcome::Done);
    assert_eq!(snapshot(&shop, &a.id).await, first);

    // A timer whose order does not exist, or a foreign queue.
    let ghost = "o-1700000000000-00000000000000aa";
    assert_eq!(shop.svc.handle(firing(Q_CLOSE, ghost, at, at)).await, Outcome::Done);
    assert!(matches!(shop.svc.handle(firing("other.queue", ghost, at, at)).await, Outcome::Fail(_)));
    shop.assert_invariants().await;
}

every_backend!(
    close_fired_twice_closes_once,
    late_close_after_payment_changes_nothing,
    every_handler_is_idempotent,
);
