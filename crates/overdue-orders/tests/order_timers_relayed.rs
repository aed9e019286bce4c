//! Orders in SQLite, timers in Redis (`OrderBackend::SqliteRelayed`): the timer changes of an
//! order write are rows of `order_timer_outbox` in the same SQLite transaction, relayed to Redis
//! afterwards. What must hold: an order committed while nothing relays (the process dies before
//! its relay ran, or Redis is away) still gets its timers, from the next process that opens the
//! database, and they fire.

mod common;

use std::sync::Arc;

use common::*;
use overdue::{Engine, ManualClock, Store};
use overdue_orders::*;
use overdue_sql::{Durability, SqliteOptions, SqliteStore};

async fn redis_store() -> Option<Arc<dyn Store>> {
    let url = overdue_testkit::servers::redis::fresh_url().await?;
    Some(Arc::new(overdue_redis::RedisStore::open_url(&url).await.expect("open redis store")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_committed_before_any_relay_gets_its_timers_from_the_next_process() {
    let Some(timers) = redis_store().await else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("orders.db");
    let clock = ManualClock::new(T0);
    let opts = SqliteOptions::with_durability(Durability::Buffer);

    // Process 1: writes the order, then "dies" before any relay (no engine was ever attached).
    let order = {
        let orders = SqliteStore::open(&path, opts.clone()).await.expect("open orders");
        let svc = OrderService::open(OrderBackend::SqliteRelayed(orders), Arc::new(clock.clone()), OrderConfig::default())
            .await
            .expect("open service");
        svc.create_product(NewProduct { id: Some("tea".into()), name: "tea".into(), price_cents: 100, stock: 5 })
            .await
            .expect("product");
        let order = svc.create_order(new_order("alice", &[("tea", 2)])).await.expect("order");
        assert_eq!(svc.flush_timers().await.expect("flush"), 0, "nothing relays without an engine");
        order
    };
    assert!(timers.get(Q_CLOSE, &order.id, T0).await.expect("get").is_none(), "not in Redis yet");

    // Process 2: opens the same database with an engine on Redis; the relay brings the timers.
    let orders = SqliteStore::open(&path, opts).await.expect("reopen orders");
    let svc = OrderService::open(OrderBackend::SqliteRelayed(orders), Arc::new(clock.clone()), OrderConfig::default())
        .await
        .expect("reopen service");
    let builder = Engine::builder(timers.clone()).clock(Arc::new(clock.clone()));
    let engine = Arc::new(svc.register_handlers(builder).start().await.expect("engine"));
    svc.attach(engine.clone());
    svc.flush_timers().await.expect("flush");
    let close = timers.get(Q_CLOSE, &order.id, T0).await.expect("get").expect("the close timer is in Redis");
    assert_eq!(close.due_at, order.pay_deadline);
    assert!(timers.get(Q_REMIND, &order.id, T0).await.expect("get").is_some(), "the reminder too");
    assert_eq!(svc.flush_timers().await.expect("flush"), 0, "relayed once, then the outbox is empty");

    clock.set(order.pay_deadline);
    engine.settle().await;
    svc.flush_timers().await.expect("flush");
    let closed = svc.get_order(&order.id).await.expect("order");
    assert_eq!(closed.status, OrderStatus::Closed);
    assert_eq!(svc.get_product("tea").await.expect("product").stock, 5, "stock released");
    assert!(timers.get(Q_CLOSE, &order.id, T0).await.expect("get").is_none(), "nothing left in Redis");
    assert!(svc.check_invariants(0).await.expect("invariants").ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_cancels_the_redis_timers_through_the_outbox_in_write_order() {
    let Some(shop) = Shop::on(Db::Redis).await else { return };
    shop.product("tea", 100, 10).await;
    let order = shop.order("bob", &[("tea", 1)]).await;
    assert!(shop.timer(Q_CLOSE, &order.id).await.is_some());
    // Pay and ship before any relay: schedule, cancel, schedule again must arrive in that order.
    shop.svc.pay(&order.id).await.expect("pay");
    shop.svc.ship(&order.id).await.expect("ship");
    assert!(shop.timer(Q_CLOSE, &order.id).await.is_none(), "paying cancelled the close timer in Redis");
    assert!(shop.timer(Q_REMIND, &order.id).await.is_none());
    let confirm = shop.timer(Q_AUTO_CONFIRM, &order.id).await.expect("shipping scheduled auto-confirm in Redis");
    shop.at(confirm.due_at).await;
    assert_eq!(shop.svc.get_order(&order.id).await.expect("order").status, OrderStatus::Completed);
    shop.assert_invariants().await;
}
