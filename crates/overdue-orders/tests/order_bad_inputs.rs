//! Every invalid request is refused with `invalid_input` (or the documented error) and changes
//! nothing: no order, no event, no stock movement, no timer.

mod common;

use common::*;
use overdue_orders::*;

/// Orders, events, stock of every product and stored timers.
async fn state(shop: &Shop) -> (Vec<(OrderStatus, u64)>, Vec<(String, u64)>, Vec<Product>, usize) {
    (
        shop.svc.status_counts().await.expect("status counts"),
        shop.svc.transition_counts().await.expect("transition counts"),
        shop.svc.list_products(None, MAX_PAGE).await.expect("products"),
        shop.engine.list(&overdue::ListQuery::default()).await.expect("timers").len(),
    )
}

fn item(p: &str, q: i64) -> NewItem {
    NewItem { product_id: p.into(), quantity: q }
}

async fn invalid_orders_are_refused_and_change_nothing(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 100, 50).await;
    shop.product("pear", 100, 50).await;
    let ok = || new_order("zoe", &[("apple", 1)]);
    let too_many: Vec<NewItem> = (0..=MAX_LINES).map(|i| item(&format!("p{i}"), 1)).collect();
    let cases: Vec<(&str, NewOrder, &str)> = vec![
        ("empty buyer", NewOrder { buyer: String::new(), ..ok() }, "buyer"),
        ("blank buyer", NewOrder { buyer: "   ".into(), ..ok() }, "buyer"),
        ("long buyer", NewOrder { buyer: "b".repeat(MAX_BUYER_LEN + 1), ..ok() }, "buyer"),
        ("control char in buyer", NewOrder { buyer: "a\u{0}b".into(), ..ok() }, "buyer"),
        ("no lines", NewOrder { items: vec![], ..ok() }, "items"),
        ("101 lines", NewOrder { items: too_many, ..ok() }, "items"),
        ("duplicate product", NewOrder { items: vec![item("apple", 1), item("apple", 2)], ..ok() }, "items.product_id"),
        ("zero quantity", NewOrder { items: vec![item("apple", 0)], ..ok() }, "items.quantity"),
        ("negative quantity", NewOrder { items: vec![item("apple", -3)], ..ok() }, "items.quantity"),
        ("huge quantity", NewOrder { items: vec![item("apple", MAX_QUANTITY + 1)], ..ok() }, "items.quantity"),
        ("empty product id", NewOrder { items: vec![item("", 1)], ..ok() }, "items.product_id"),
        ("bad product id", NewOrder { items: vec![item("app le", 1)], ..ok() }, "items.product_id"),
        ("long product id", NewOrder { items: vec![item(&"p".repeat(MAX_ID_LEN + 1), 1)], ..ok() }, "items.product_id"),
        ("timeout too short", NewOrder { pay_timeout_ms: Some(999), ..ok() }, "pay_timeout_ms"),
        ("timeout negative", NewOrder { pay_timeout_ms: Some(-1), ..ok() }, "pay_timeout_ms"),
        ("timeout too long", NewOrder { pay_timeout_ms: Some(7 * DAY + 1), ..ok() }, "pay_timeout_ms"),
    ];
    let before = state(&shop).await;
    for (name, order, want) in cases {
        match shop.svc.create_order(order).await {
            Err(OrderError::Invalid { field, message }) => {
                assert_eq!(field, want, "{name}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{name}: expected invalid {want}, got {other:?}"),
        }
        assert_eq!(state(&shop).await, before, "{name} changed something");
    }
    // The bounds themselves are accepted.
    let edge = NewOrder { pay_timeout_ms: Some(1_000), items: vec![item("apple", 1), item("pear", 1)], ..ok() };
    shop.svc.create_order(edge).await.expect("1 s timeout is the minimum and allowed");
    shop.svc.create_order(NewOrder { pay_timeout_ms: Some(7 * DAY), ..ok() }).await.expect("7 days is allowed");
}

async fn out_of_stock_rolls_back_the_whole_order(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    shop.product("apple", 100, 50).await;
    shop.product("pear", 100, 2).await;
    shop.product("plum", 100, 50).await;
    let before = state(&shop).await;

    let err = shop
        .svc
        .create_order(new_order("zoe", &[("apple", 5), ("plum", 7), ("pear", 3)]))
        .await
        .expect_err("pear has 2");
    match &err {
        OrderError::OutOfStock { product_id, requested, available } => {
            assert_eq!((product_id.as_str(), *requested, *available), ("pear", 3, 2));
        }
        other => panic!("expected out of stock, got {other:?}"),
    }
    assert_eq!(err.code(), "out_of_stock");
    assert_eq!(state(&shop).await, before, "apple and plum were reserved and must be rolled back");

    let err = shop.svc.create_order(new_order("zoe", &[("apple", 5), ("ghost", 1)])).await.expect_err("unknown product");
    assert!(matches!(&err, OrderError::NotFound { what: "product", id } if id == "ghost"), "{err:?}");
    assert_eq!(state(&shop).await, before);

    // Exactly the remaining stock is fine, one more is not.
    shop.order("zoe", &[("pear", 2)]).await;
    assert_eq!(shop.stock("pear").await, 0);
    let err = shop.svc.create_order(new_order("zoe", &[("pear", 1)])).await.expect_err("sold out");
    assert!(matches!(err, OrderError::OutOfStock { available: 0, .. }), "{err:?}");
    shop.assert_invariants().await;
}

async fn invalid_products_and_lookups_are_refused(db: Db) {
    let Some(shop) = Shop::on(db).await else { return };
    let ok = || NewProduct { id: Some("apple".into()), name: "Apple".into(), price_cents: 100, stock: 1 };
    let cases: Vec<(&str, NewProduct, &str)> = vec![
        ("empty id", NewProduct { id: Some(String::new()), ..ok() }, "id"),
        ("id with slash", NewProduct { id: Some("a/b".into()), ..ok() }, "id"),
        ("long id", NewProduct { id: Some("a".repeat(MAX_ID_LEN + 1)), ..ok() }, "id"),
        ("empty name", NewProduct { name: String::new(), ..ok() }, "name"),
        ("long name", NewProduct { name: "n".repeat(MAX_PRODUCT_NAME_LEN + 1), ..ok() }, "name"),
        ("negative price", NewProduct { price_cents: -1, ..ok() }, "price_cents"),
        ("huge price", NewProduct { price_cents: MAX_PRICE_CENTS + 1, ..ok() }, "price_cents"),
        ("negative stock", NewProduct { stock: -1, ..ok() }, "stock"),
        ("huge stock", NewProduct { stock: MAX_STOCK + 1, ..ok() }, "stock"),
    ];
    for (name, p, want) in cases {
        match shop.svc.create_product(p).await {
            Err(OrderError::Invalid { field, .. }) => assert_eq!(field, want, "{name}"),
            other => panic!("{name}: expected invalid {want}, got {other:?}"),
        }
    }
    assert!(shop.svc.list_products(None, 0).await.expect("list").is_empty());

    let p = shop.svc.create_product(ok()).await.expect("create");
    let dup = shop.svc.create_product(NewProduct { stock: 99, ..ok() }).await.expect_err("duplicate");
    assert_eq!(dup.code(), "already_exists");
    assert_eq!(shop.svc.get_product("apple").await.expect("get"), p, "the duplicate changed nothing");
    let generated = shop.svc.create_product(NewProduct { id: None, ..ok() }).await.expect("generated id");
    assert!(generated.id.starts_with("p-"), "{}", generated.id);

    for bad in ["", "x y", &"o".repeat(MAX_ID_LEN + 1)] {
        assert_eq!(shop.svc.get_order(bad).await.expect_err("bad id").code(), "invalid_input");
        assert_eq!(shop.svc.pay(bad).await.expect_err("bad id").code(), "invalid_input");
        assert_eq!(shop.svc.get_product(bad).await.expect_err("bad id").code(), "invalid_input");
    }
    let q = |limit| OrderQuery { limit, ..Default::default() };
    assert_eq!(shop.svc.list_orders(&q(MAX_PAGE + 1)).await.expect_err("page").code(), "invalid_input");
    let bad_cursor = OrderQuery { before: Some("x y".into()), ..Default::default() };
    assert_eq!(shop.svc.list_orders(&bad_cursor).await.expect_err("cursor").code(), "invalid_input");
    assert_eq!(shop.svc.list_products(None, MAX_PAGE + 1).await.expect_err("page").code(), "invalid_input");
    assert_eq!(shop.svc.outbox_pending(MAX_PAGE + 1).await.expect_err("page").code(), "invalid_input");
    let too_many: Vec<i64> = (0..=MAX_OUTBOX_ACK as i64).collect();
    assert_eq!(shop.svc.outbox_delivered(&too_many).await.expect_err("ack").code(), "invalid_input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonsense_config_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = overdue_sql::SqliteStore::open(dir.path().join("x.db"), overdue_sql::SqliteOptions::default())
        .await
        .expect("store");
    let cfg = OrderConfig { pay_timeout: std::time::Duration::from_secs(30 * 86_400), ..OrderConfig::default() };
    let err = OrderService::open(store, std::sync::Arc::new(overdue::ManualClock::new(T0)), cfg)
        .await
        .expect_err("pay timeout above the maximum");
    assert!(matches!(err, OrderError::Invalid { field: "config", .. }), "{err:?}");
}

every_backend!(
    invalid_orders_are_refused_and_change_nothing,
    out_of_stock_rolls_back_the_whole_order,
    invalid_products_and_lookups_are_refused,
);
