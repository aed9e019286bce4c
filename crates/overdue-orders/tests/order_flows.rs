//! Every path through the order state machine, driven by the engine in virtual time.

mod common;

use common::*;
use overdue_orders::*;

const PAY_TIMEOUT: i64 = 30 * MIN;

async fn create_then_pay_cancels_both_timers_and_never_closes(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    shop.product("pear", 90, 5).await;
    let o = shop.order("alice", &[("apple", 3), ("pear", 2)]).await;
    assert_eq!(o.status, OrderStatus::PendingPayment);
    assert_eq!(o.total_cents, 3 * 150 + 2 * 90);
    assert_eq!(o.pay_deadline, T0 + PAY_TIMEOUT);
    assert_eq!((shop.stock("apple").await, shop.stock("pear").await), (7, 3));
    let close = shop.timer(Q_CLOSE, &o.id).await.expect("close timer written with the order");
    assert_eq!(close.due_at, o.pay_deadline);
    let remind = shop.timer(Q_REMIND, &o.id).await.expect("reminder written with the order");
    assert_eq!(remind.due_at, o.pay_deadline - 5 * MIN);

    shop.at(T0 + MIN).await;
    let paid = shop.svc.pay(&o.id).await.expect("pay");
    assert_eq!(paid.status, OrderStatus::Paid);
    assert_eq!(paid.version, 2);
    assert_eq!(paid.items, o.items);
    assert!(shop.timer(Q_CLOSE, &o.id).await.is_none(), "paying cancels order.close");
    assert!(shop.timer(Q_REMIND, &o.id).await.is_none(), "paying cancels order.remind");

    shop.at(T0 + PAY_TIMEOUT + DAY).await;
    let after = shop.svc.get_order(&o.id).await.expect("get");
    assert_eq!(after.status, OrderStatus::Paid);
    assert_eq!(shop.kinds(&o.id).await, ["created", "paid"]);
    assert_eq!((shop.stock("apple").await, shop.stock("pear").await), (7, 3), "stock stays sold");
    assert!(shop.svc.outbox_pending(0).await.expect("outbox").is_empty(), "no reminder for a paid order");

    let again = shop.svc.pay(&o.id).await.expect_err("paying twice");
    assert!(matches!(again, OrderError::IllegalTransition { status: OrderStatus::Paid, .. }), "{again:?}");
    shop.assert_invariants().await;
}

async fn unpaid_order_closes_at_its_deadline_and_releases_stock(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let o = shop.order("bob", &[("apple", 4)]).await;
    assert_eq!(shop.stock("apple").await, 6);

    shop.at(o.pay_deadline - 1).await;
    assert_eq!(shop.svc.get_order(&o.id).await.expect("get").status, OrderStatus::PendingPayment, "never early");

    shop.at(o.pay_deadline).await;
    let closed = shop.svc.get_order(&o.id).await.expect("get");
    assert_eq!(closed.status, OrderStatus::Closed);
    assert_eq!(closed.close_reason.as_deref(), Some(CLOSE_TIMEOUT));
    assert_eq!(closed.updated_at, o.pay_deadline, "closed exactly at the deadline in virtual time");
    assert_eq!(shop.stock("apple").await, 10, "stock released");
    let events = shop.svc.order_events(&o.id).await.expect("events");
    let close = events.iter().find(|e| e.kind == "closed").expect("closed event");
    assert_eq!(close.source, Q_CLOSE);
    assert_eq!(close.at, o.pay_deadline);
    assert!(shop.timer(Q_CLOSE, &o.id).await.is_none(), "the close timer is settled");
    shop.assert_invariants().await;
}

async fn reminder_fires_once_before_the_deadline_and_writes_one_outbox_row(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let o = shop.order("carol", &[("apple", 1)]).await;
    let remind_at = o.pay_deadline - 5 * MIN;

    shop.at(remind_at - 1).await;
    assert!(shop.svc.outbox_pending(0).await.expect("outbox").is_empty());
    shop.at(remind_at).await;
    let pending = shop.svc.outbox_pending(0).await.expect("outbox");
    assert_eq!(pending.len(), 1, "{pending:?}");
    let msg = &pending[0];
    assert_eq!(msg.topic, TOPIC_REMINDER);
    assert_eq!(msg.created_at, remind_at);
    let payload: serde_json::Value = serde_json::from_str(&msg.payload).expect("json payload");
    assert_eq!(payload["order_id"], o.id.as_str());
    assert_eq!(payload["buyer"], "carol");
    assert_eq!(payload["pay_deadline"], o.pay_deadline);

    // Firing the reminder again (a redelivery) records nothing more.
    let again = shop.svc.handle(firing(Q_REMIND, &o.id, remind_at, remind_at + 10)).await;
    assert_eq!(again, overdue::Outcome::Done);
    shop.at(remind_at + MIN).await;
    assert_eq!(shop.svc.outbox_pending(0).await.expect("outbox").len(), 1);
    assert_eq!(shop.kinds(&o.id).await, ["created", "reminded"]);
    assert_eq!(shop.svc.get_order(&o.id).await.expect("get").version, 1, "a reminder is not a transition");

    // The relay acknowledges; failures count attempts.
    shop.svc.outbox_failed(msg.id).await.expect("fail once");
    assert_eq!(shop.svc.outbox_pending(0).await.expect("outbox")[0].attempts, 1);
    shop.svc.outbox_delivered(&[msg.id, 9_999]).await.expect("ack");
    assert!(shop.svc.outbox_pending(0).await.expect("outbox").is_empty());
    assert!(matches!(shop.svc.outbox_failed(9_999).await, Err(OrderError::NotFound { .. })));

    // Paid between reminder and deadline: still paid, one reminder.
    shop.svc.pay(&o.id).await.expect("pay");
    shop.assert_invariants().await;
}

async fn short_timeout_skips_the_reminder(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let o = shop
        .svc
        .create_order(NewOrder { pay_timeout_ms: Some(2 * MIN), ..new_order("dan", &[("apple", 1)]) })
        .await
        .expect("create");
    assert_eq!(o.pay_deadline, T0 + 2 * MIN);
    assert!(shop.timer(Q_REMIND, &o.id).await.is_none(), "reminder time already passed: not scheduled");
    assert!(shop.timer(Q_CLOSE, &o.id).await.is_some());
    shop.at(o.pay_deadline).await;
    assert_eq!(shop.svc.get_order(&o.id).await.expect("get").status, OrderStatus::Closed);
    assert!(shop.svc.outbox_pending(0).await.expect("outbox").is_empty());
}

async fn payment_after_the_deadline_is_refused_and_the_order_stays_closed(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;

    // Closed by its timer, then a late payment.
    let a = shop.order("erin", &[("apple", 2)]).await;
    shop.at(a.pay_deadline).await;
    let err = shop.svc.pay(&a.id).await.expect_err("late payment");
    assert_eq!(err.code(), "order_closed");
    assert_eq!(err.current_status(), Some(OrderStatus::Closed));
    assert_eq!(shop.svc.get_order(&a.id).await.expect("get").status, OrderStatus::Closed);

    // The deadline passed but the timer has not fired yet: the payment is refused all the same,
    // and the order is closed by that same write; the timer then finds nothing to do.
    let b = shop.order("erin", &[("apple", 3)]).await;
    shop.clock.set(b.pay_deadline);
    let err = shop.svc.pay(&b.id).await.expect_err("payment at the deadline");
    assert!(matches!(err, OrderError::OrderClosed { .. }), "{err:?}");
    let closed = shop.svc.get_order(&b.id).await.expect("get");
    assert_eq!(closed.status, OrderStatus::Closed);
    assert_eq!(closed.close_reason.as_deref(), Some(CLOSE_TIMEOUT));
    shop.engine.settle().await;
    assert_eq!(shop.svc.get_order(&b.id).await.expect("get").version, 2, "the timer changed nothing");
    assert_eq!(shop.kinds(&b.id).await, ["created", "closed"]);
    assert_eq!(shop.stock("apple").await, 10, "both orders' stock is back");
    shop.assert_invariants().await;
}

async fn shipped_order_auto_confirms_after_seven_days(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let o = shop.order("fay", &[("apple", 1)]).await;
    shop.svc.pay(&o.id).await.expect("pay");
    shop.at(T0 + DAY).await;
    let shipped = shop.svc.ship(&o.id).await.expect("ship");
    assert_eq!(shipped.status, OrderStatus::Shipped);
    let timer = shop.timer(Q_AUTO_CONFIRM, &o.id).await.expect("auto-confirm scheduled");
    assert_eq!(timer.due_at, T0 + DAY + 7 * DAY);

    shop.at(T0 + 8 * DAY - 1).await;
    assert_eq!(shop.svc.get_order(&o.id).await.expect("get").status, OrderStatus::Shipped);
    shop.at(T0 + 8 * DAY).await;
    let done = shop.svc.get_order(&o.id).await.expect("get");
    assert_eq!(done.status, OrderStatus::Completed);
    let events = shop.svc.order_events(&o.id).await.expect("events");
    assert_eq!(events.last().map(|e| e.source.as_str()), Some(Q_AUTO_CONFIRM));
    assert_eq!(shop.kinds(&o.id).await, ["created", "paid", "shipped", "completed"]);
    let err = shop.svc.confirm(&o.id).await.expect_err("already completed");
    assert!(matches!(err, OrderError::IllegalTransition { status: OrderStatus::Completed, .. }), "{err:?}");
    shop.assert_invariants().await;
}

async fn buyer_confirmation_cancels_auto_confirm(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let o = shop.order("gus", &[("apple", 1)]).await;
    shop.svc.pay(&o.id).await.expect("pay");
    shop.svc.ship(&o.id).await.expect("ship");
    let done = shop.svc.confirm(&o.id).await.expect("confirm");
    assert_eq!(done.status, OrderStatus::Completed);
    assert!(shop.timer(Q_AUTO_CONFIRM, &o.id).await.is_none());
    shop.at(T0 + 30 * DAY).await;
    let events = shop.svc.order_events(&o.id).await.expect("events");
    assert_eq!(events.last().map(|e| e.source.as_str()), Some(SOURCE_API));
    shop.assert_invariants().await;
}

async fn ignored_refund_request_is_auto_approved_after_three_days(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let o = shop.order("hal", &[("apple", 1)]).await;
    shop.svc.pay(&o.id).await.expect("pay");
    shop.svc.ship(&o.id).await.expect("ship");
    shop.at(T0 + DAY).await;
    let req = shop.svc.request_refund(&o.id).await.expect("request refund");
    assert_eq!(req.status, OrderStatus::RefundRequested);
    assert!(shop.timer(Q_AUTO_CONFIRM, &o.id).await.is_none(), "a refund request stops auto-confirm");
    assert_eq!(shop.timer(Q_REFUND_AUTO_APPROVE, &o.id).await.expect("auto-approve").due_at, T0 + 4 * DAY);

    shop.at(T0 + 4 * DAY - 1).await;
    assert_eq!(shop.svc.get_order(&o.id).await.expect("get").status, OrderStatus::RefundRequested);
    shop.at(T0 + 4 * DAY).await;
    assert_eq!(shop.svc.get_order(&o.id).await.expect("get").status, OrderStatus::Refunded);
    // The auto-confirm that was due at day 8 never comes.
    shop.at(T0 + 10 * DAY).await;
    assert_eq!(shop.kinds(&o.id).await, ["created", "paid", "shipped", "refund_requested", "refunded"]);
    let events = shop.svc.order_events(&o.id).await.expect("events");
    assert_eq!(events.last().map(|e| e.source.as_str()), Some(Q_REFUND_AUTO_APPROVE));
    shop.assert_invariants().await;
}

async fn merchant_decision_cancels_auto_approve(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let approved = shop.order("ivy", &[("apple", 1)]).await;
    let rejected = shop.order("ivy", &[("apple", 1)]).await;
    for o in [&approved, &rejected] {
        shop.svc.pay(&o.id).await.expect("pay");
        shop.svc.request_refund(&o.id).await.expect("refund requested straight from paid");
    }
    assert_eq!(shop.svc.approve_refund(&approved.id).await.expect("approve").status, OrderStatus::Refunded);
    assert_eq!(shop.svc.reject_refund(&rejected.id).await.expect("reject").status, OrderStatus::RefundRejected);
    for o in [&approved, &rejected] {
        assert!(shop.timer(Q_REFUND_AUTO_APPROVE, &o.id).await.is_none(), "decision cancels the timer");
    }
    shop.at(T0 + 5 * DAY).await;
    assert_eq!(shop.svc.get_order(&rejected.id).await.expect("get").status, OrderStatus::RefundRejected);
    let err = shop.svc.approve_refund(&rejected.id).await.expect_err("decided already");
    assert!(matches!(err, OrderError::IllegalTransition { status: OrderStatus::RefundRejected, .. }), "{err:?}");
    assert_eq!(err.code(), "illegal_transition");
    shop.assert_invariants().await;
}

async fn buyer_cancel_closes_releases_stock_and_cancels_timers(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    shop.product("pear", 90, 10).await;
    let o = shop.order("jo", &[("apple", 2), ("pear", 7)]).await;
    let cancelled = shop.svc.cancel(&o.id).await.expect("cancel");
    assert_eq!(cancelled.status, OrderStatus::Closed);
    assert_eq!(cancelled.close_reason.as_deref(), Some(CLOSE_BUYER_CANCEL));
    assert_eq!((shop.stock("apple").await, shop.stock("pear").await), (10, 10));
    assert!(shop.timer(Q_CLOSE, &o.id).await.is_none());
    assert!(shop.timer(Q_REMIND, &o.id).await.is_none());
    let err = shop.svc.pay(&o.id).await.expect_err("paying a cancelled order");
    assert_eq!(err.code(), "order_closed");
    let err = shop.svc.cancel(&o.id).await.expect_err("cancelling twice");
    assert!(matches!(err, OrderError::IllegalTransition { status: OrderStatus::Closed, .. }), "{err:?}");
    let err = shop.svc.ship(&o.id).await.expect_err("shipping a closed order");
    assert_eq!(err.current_status(), Some(OrderStatus::Closed));
    shop.at(T0 + DAY).await;
    assert_eq!(shop.kinds(&o.id).await, ["created", "closed"]);
    shop.assert_invariants().await;
}

async fn illegal_moves_name_the_current_status_and_unknown_orders_are_not_found(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 10).await;
    let o = shop.order("kim", &[("apple", 1)]).await;
    for (what, r) in [
        ("ship", shop.svc.ship(&o.id).await),
        ("confirm", shop.svc.confirm(&o.id).await),
        ("refund", shop.svc.request_refund(&o.id).await),
        ("approve", shop.svc.approve_refund(&o.id).await),
        ("reject", shop.svc.reject_refund(&o.id).await),
    ] {
        let err = r.expect_err(what);
        assert_eq!(err.current_status(), Some(OrderStatus::PendingPayment), "{what}: {err:?}");
    }
    let missing = "o-1700000000000-0000000000000000";
    for r in [shop.svc.pay(missing).await, shop.svc.get_order(missing).await, shop.svc.cancel(missing).await] {
        assert_eq!(r.expect_err("missing").code(), "not_found");
    }
    assert_eq!(shop.svc.order_events(missing).await.expect_err("missing").code(), "not_found");
    assert_eq!(shop.svc.get_product("nope").await.expect_err("missing").code(), "not_found");
    assert_eq!(shop.svc.get_order(&o.id).await.expect("get").version, 1, "refused moves change nothing");
}

async fn listing_pages_newest_first_and_filters(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 150, 1_000).await;
    let mut ids = Vec::new();
    for i in 0..12u32 {
        shop.clock.advance(1);
        let buyer = if i.is_multiple_of(2) { "even" } else { "odd" };
        ids.push(shop.order(buyer, &[("apple", 1)]).await.id);
    }
    for id in ids.iter().take(3) {
        shop.svc.pay(id).await.expect("pay");
    }
    let page1 = shop.svc.list_orders(&OrderQuery { limit: 5, ..Default::default() }).await.expect("list");
    let want: Vec<_> = ids.iter().rev().take(5).cloned().collect();
    assert_eq!(page1.iter().map(|o| o.id.clone()).collect::<Vec<_>>(), want);
    assert!(page1.iter().all(|o| o.items.len() == 1));
    let page2 = shop
        .svc
        .list_orders(&OrderQuery { limit: 5, before: page1.last().map(|o| o.id.clone()), ..Default::default() })
        .await
        .expect("page 2");
    assert_eq!(page2.iter().map(|o| o.id.clone()).collect::<Vec<_>>(), ids.iter().rev().skip(5).take(5).cloned().collect::<Vec<_>>());
    let paid = shop.svc.list_orders(&OrderQuery { status: Some(OrderStatus::Paid), ..Default::default() }).await.expect("paid");
    assert_eq!(paid.len(), 3);
    let odd = shop
        .svc
        .list_orders(&OrderQuery { buyer: Some("odd".into()), status: Some(OrderStatus::PendingPayment), ..Default::default() })
        .await
        .expect("odd");
    assert_eq!(odd.len(), 5, "odd buyers: 6 orders, one of them (index 1) paid");
    assert!(odd.windows(2).all(|w| w[0].id > w[1].id), "newest first");

    let products = shop.svc.list_products(None, 0).await.expect("products");
    assert_eq!(products.len(), 1);
    assert!(shop.svc.list_products(Some("apple"), 10).await.expect("after").is_empty());

    let counts = shop.svc.status_counts().await.expect("status counts");
    assert_eq!(counts.len(), OrderStatus::ALL.len());
    assert!(counts.contains(&(OrderStatus::Paid, 3)) && counts.contains(&(OrderStatus::PendingPayment, 9)), "{counts:?}");
    let transitions = shop.svc.transition_counts().await.expect("transition counts");
    assert!(transitions.contains(&("created".to_string(), 12)) && transitions.contains(&("paid".to_string(), 3)), "{transitions:?}");
    assert!(transitions.contains(&("refunded".to_string(), 0)), "every kind is listed: {transitions:?}");
    shop.assert_transitions_counted().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_orders_and_timers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shop.db");
    let opts = overdue_sql::SqliteOptions::with_durability(overdue_sql::Durability::Buffer);
    let clock = overdue::ManualClock::new(T0);
    let id = {
        let store = overdue_sql::SqliteStore::open(&path, opts.clone()).await.expect("open");
        let svc = OrderService::open(store, std::sync::Arc::new(clock.clone()), OrderConfig::default()).await.expect("svc");
        svc.create_product(NewProduct { id: Some("apple".into()), name: "Apple".into(), price_cents: 1, stock: 3 })
            .await
            .expect("product");
        svc.create_order(new_order("lou", &[("apple", 3)])).await.expect("order").id
    };
    // Opened again (migrations already applied), with the engine this time.
    let store = overdue_sql::SqliteStore::open(&path, opts).await.expect("reopen");
    let svc = OrderService::open(store.clone(), std::sync::Arc::new(clock.clone()), OrderConfig::default()).await.expect("svc");
    let engine = svc
        .register_handlers(overdue::Engine::builder(std::sync::Arc::new(store)).clock(std::sync::Arc::new(clock.clone())))
        .start()
        .await
        .expect("engine");
    clock.set(T0 + PAY_TIMEOUT);
    engine.settle().await;
    assert_eq!(svc.get_order(&id).await.expect("get").status, OrderStatus::Closed);
    assert_eq!(svc.get_product("apple").await.expect("apple").stock, 3);
}

every_backend!(
    create_then_pay_cancels_both_timers_and_never_closes,
    unpaid_order_closes_at_its_deadline_and_releases_stock,
    reminder_fires_once_before_the_deadline_and_writes_one_outbox_row,
    short_timeout_skips_the_reminder,
    payment_after_the_deadline_is_refused_and_the_order_stays_closed,
    shipped_order_auto_confirms_after_seven_days,
    buyer_confirmation_cancels_auto_confirm,
    ignored_refund_request_is_auto_approved_after_three_days,
    merchant_decision_cancels_auto_approve,
    buyer_cancel_closes_releases_stock_and_cancels_timers,
    illegal_moves_name_the_current_status_and_unknown_orders_are_not_found,
    listing_pages_newest_first_and_filters,
);
