//! The order service over HTTP, in virtual time: create, pay, close on timeout, ship and
//! confirm, refunds, listing; the reminder through the outbox to a webhook.

mod common;

use common::{Db, Receiver, T0, TestServer, assert_error, every_backend, header};
use overdue_server::callback;
use serde_json::{Value, json};

const MIN: i64 = 60_000;
const DAY: i64 = 86_400_000;

async fn product(s: &TestServer, id: &str, stock: i64) -> Value {
    let (st, p) = s.post("/v1/products", json!({"id": id, "name": format!("product {id}"), "price_cents": 1250, "stock": stock})).await;
    assert_eq!(st, 201, "{p}");
    p
}

async fn order(s: &TestServer, buyer: &str, product_id: &str, quantity: i64) -> Value {
    let (st, o) = s.post("/v1/orders", json!({"buyer": buyer, "items": [{"product_id": product_id, "quantity": quantity}]})).await;
    assert_eq!(st, 201, "{o}");
    o
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

fn kinds(detail: &Value) -> Vec<String> {
    detail["events"].as_array().expect("events").iter().map(|e| e["kind"].as_str().expect("kind").to_owned()).collect()
}

fn timer_queues(detail: &Value) -> Vec<String> {
    detail["timers"].as_array().expect("timers").iter().map(|t| t["queue"].as_str().expect("queue").to_owned()).collect()
}

async fn stock(s: &TestServer, product_id: &str) -> i64 {
    let (st, p) = s.get(&format!("/v1/products/{product_id}")).await;
    assert_eq!(st, 200, "{p}");
    p["stock"].as_i64().expect("stock")
}

async fn product_then_order_then_pay(db: Db) {
    let Some(s) = TestServer::start_on(db).await else { return };
    let p = product(&s, "tea", 10).await;
    assert_eq!((p["stock"].as_i64(), p["stock_total"].as_i64()), (Some(10), Some(10)));
    let o = order(&s, "alice", "tea", 3).await;
    assert_eq!(o["status"], "pending_payment");
    assert_eq!(o["total_cents"], 3 * 1250);
    assert_eq!(o["pay_deadline"], T0 + 30 * MIN);
    assert_eq!(stock(&s, "tea").await, 7, "stock is reserved at creation");

    let oid = id(&o);
    let (st, d) = s.get(&format!("/v1/orders/{oid}")).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(kinds(&d), ["created"]);
    assert_eq!(timer_queues(&d), ["order.remind", "order.close"], "reminder 5 min before the close: {d}");
    assert_eq!(d["timers"][1]["due_at"], T0 + 30 * MIN);

    s.clock.advance(10 * MIN);
    let (st, paid) = s.post_empty(&format!("/v1/orders/{oid}/pay")).await;
    assert_eq!((st, &paid["status"]), (200, &json!("paid")), "{paid}");
    let (_, d) = s.get(&format!("/v1/orders/{oid}")).await;
    assert_eq!(kinds(&d), ["created", "paid"]);
    assert!(timer_queues(&d).is_empty(), "paying cancels the close and reminder timers: {d}");

    // Paying twice is an illegal transition that reports the current status.
    let again = s.post_empty(&format!("/v1/orders/{oid}/pay")).await;
    assert_error(&again, 409, "illegal_transition");
    assert_eq!(again.1["error"]["status"], "paid");

    // Long after the old deadline nothing closes the paid order.
    s.advance(DAY).await;
    let (_, d) = s.get(&format!("/v1/orders/{oid}")).await;
    assert_eq!(d["status"], "paid");
    assert_eq!(stock(&s, "tea").await, 7);
    assert_error(&s.get("/v1/orders/o-0000000000000-0000000000000000").await, 404, "not_found");
    assert_error(&s.get("/v1/products/nope").await, 404, "not_found");
    s.stop().await;
}

async fn unpaid_order_closes_at_its_deadline_and_a_late_payment_is_refused(db: Db) {
    let Some(s) = TestServer::start_on(db).await else { return };
    product(&s, "mug", 5).await;
    let o = order(&s, "bob", "mug", 2).await;
    let oid = id(&o);
    let (st, short) = s
        .post("/v1/orders", json!({"buyer": "carol", "items": [{"product_id": "mug", "quantity": 1}], "pay_timeout_ms": 2000}))
        .await;
    assert_eq!(st, 201, "{short}");
    assert_eq!(short["pay_deadline"], T0 + 2000);
    assert_eq!(stock(&s, "mug").await, 2);

    s.advance(1_999).await;
    let (_, d) = s.get(&format!("/v1/orders/{}", id(&short))).await;
    assert_eq!(d["status"], "pending_payment", "not a millisecond early");
    s.advance(1).await;
    let (_, d) = s.get(&format!("/v1/orders/{}", id(&short))).await;
    assert_eq!((&d["status"], &d["close_reason"]), (&json!("closed"), &json!("timeout")), "{d}");
    assert_eq!(d["events"][1]["source"], "order.close");

    s.advance(30 * MIN).await;
    let (_, d) = s.get(&format!("/v1/orders/{oid}")).await;
    assert_eq!(d["status"], "closed", "{d}");
    assert!(timer_queues(&d).is_empty(), "{d}");
    assert_eq!(stock(&s, "mug").await, 5, "closing releases the stock");

    let late = s.post_empty(&format!("/v1/orders/{oid}/pay")).await;
    assert_error(&late, 409, "order_closed");
    assert_eq!(late.1["error"]["status"], "closed");
    let (_, d) = s.get(&format!("/v1/orders/{oid}")).await;
    assert_eq!(d["status"], "closed", "the order stays closed");

    // Buyer cancel of another order.
    let o3 = order(&s, "dan", "mug", 1).await;
    let (st, c) = s.post_empty(&format!("/v1/orders/{}/cancel", id(&o3))).await;
    assert_eq!((st, &c["status"], &c["close_reason"]), (200, &json!("closed"), &json!("buyer_cancel")), "{c}");
    assert_error(&s.post_empty(&format!("/v1/orders/{}/pay", id(&o3))).await, 409, "order_closed");
    assert_eq!(stock(&s, "mug").await, 5);
    let inv = s.app.orders.check_invariants(0).await.expect("invariants");
    assert!(inv.ok(), "{inv:?}");
    s.stop().await;
}

async fn ship_confirm_and_auto_confirm(db: Db) {
    let Some(s) = TestServer::start_on(db).await else { return };
    product(&s, "pen", 10).await;
    let a = id(&order(&s, "erin", "pen", 1).await);
    let b = id(&order(&s, "erin", "pen", 1).await);
    assert_error(&s.post_empty(&format!("/v1/orders/{a}/ship")).await, 409, "illegal_transition");
    for o in [&a, &b] {
        assert_eq!(s.post_empty(&format!("/v1/orders/{o}/pay")).await.0, 200);
        let (st, v) = s.post_empty(&format!("/v1/orders/{o}/ship")).await;
        assert_eq!((st, &v["status"]), (200, &json!("shipped")), "{v}");
    }
    let (_, d) = s.get(&format!("/v1/orders/{a}")).await;
    assert_eq!(timer_queues(&d), ["order.auto_confirm"]);
    assert_eq!(d["timers"][0]["due_at"], T0 + 7 * DAY);

    let (st, v) = s.post_empty(&format!("/v1/orders/{a}/confirm")).await;
    assert_eq!((st, &v["status"]), (200, &json!("completed")), "{v}");
    let again = s.post_empty(&format!("/v1/orders/{a}/ship")).await;
    assert_error(&again, 409, "illegal_transition");
    assert_eq!(again.1["error"]["status"], "completed");

    s.advance(7 * DAY).await;
    let (_, d) = s.get(&format!("/v1/orders/{b}")).await;
    assert_eq!(d["status"], "completed", "auto-confirmed by its timer: {d}");
    assert_eq!(d["events"].as_array().and_then(|e| e.last()).map(|e| e["source"].clone()), Some(json!("order.auto_confirm")));
    s.stop().await;
}

async fn refunds_approved_rejected_and_auto_approved(db: Db) {
    let Some(s) = TestServer::start_on(db).await else { return };
    product(&s, "hat", 10).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let o = id(&order(&s, "fay", "hat", 1).await);
        assert_eq!(s.post_empty(&format!("/v1/orders/{o}/pay")).await.0, 200);
        ids.push(o);
    }
    assert_error(&s.post_empty(&format!("/v1/orders/{}/refund/approve", ids[0])).await, 409, "illegal_transition");
    for o in &ids {
        let (st, v) = s.post_empty(&format!("/v1/orders/{o}/refund")).await;
        assert_eq!((st, &v["status"]), (200, &json!("refund_requested")), "{v}");
    }
    let (_, d) = s.get(&format!("/v1/orders/{}", ids[2])).await;
    assert_eq!(timer_queues(&d), ["refund.auto_approve"]);

    let (st, v) = s.post_empty(&format!("/v1/orders/{}/refund/approve", ids[0])).await;
    assert_eq!((st, &v["status"]), (200, &json!("refunded")), "{v}");
    let (st, v) = s.post_empty(&format!("/v1/orders/{}/refund/reject", ids[1])).await;
    assert_eq!((st, &v["status"]), (200, &json!("refund_rejected")), "{v}");
    let late = s.post_empty(&format!("/v1/orders/{}/refund/approve", ids[1])).await;
    assert_error(&late, 409, "illegal_transition");
    assert_eq!(late.1["error"]["status"], "refund_rejected");

    s.advance(3 * DAY).await;
    let (_, d) = s.get(&format!("/v1/orders/{}", ids[2])).await;
    assert_eq!(d["status"], "refunded", "auto-approved: {d}");
    let (_, d) = s.get(&format!("/v1/orders/{}", ids[1])).await;
    assert_eq!(d["status"], "refund_rejected", "a rejected refund stays rejected: {d}");
    s.stop().await;
}

async fn list_orders_with_status_filter_and_pagination(db: Db) {
    let Some(s) = TestServer::start_on(db).await else { return };
    product(&s, "cup", 100).await;
    let mut all = Vec::new();
    for i in 0..7 {
        s.clock.advance(1);
        let o = id(&order(&s, if i % 2 == 0 { "gus" } else { "hal" }, "cup", 1).await);
        if i < 3 {
            assert_eq!(s.post_empty(&format!("/v1/orders/{o}/pay")).await.0, 200);
        }
        all.push(o);
    }
    let (st, v) = s.get("/v1/orders?status=paid").await;
    assert_eq!(st, 200, "{v}");
    let paid: Vec<&str> = v["orders"].as_array().expect("orders").iter().map(|o| o["id"].as_str().expect("id")).collect();
    assert_eq!(paid, [all[2].as_str(), all[1].as_str(), all[0].as_str()], "newest first");
    assert!(v["next_before"].is_null());

    let (_, v) = s.get("/v1/orders?status=pending_payment&buyer=gus").await;
    assert_eq!(v["orders"].as_array().map(Vec::len), Some(2), "{v}"); // i = 4, 6

    let mut seen = Vec::new();
    let mut path = "/v1/orders?limit=3".to_owned();
    loop {
        let (st, page) = s.get(&path).await;
        assert_eq!(st, 200, "{page}");
        let orders = page["orders"].as_array().expect("orders");
        assert!(orders.len() <= 3);
        seen.extend(orders.iter().map(|o| o["id"].as_str().expect("id").to_owned()));
        match page["next_before"].as_str() {
            Some(b) => path = format!("/v1/orders?limit=3&before={b}"),
            None => break,
        }
    }
    let mut expected = all.clone();
    expected.reverse();
    assert_eq!(seen, expected);

    let (_, v) = s.get("/v1/products?limit=1").await;
    assert_eq!(v["products"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["next_after"], "cup");
    let (_, v) = s.get("/v1/products?after=cup").await;
    assert_eq!(v["products"], json!([]));
    assert!(v["next_after"].is_null());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_reminder_goes_through_the_outbox_to_the_signed_webhook() {
    let mut rx = Receiver::start("/webhook").await;
    let url = rx.url.clone();
    let s = TestServer::start_with(|c| {
        c.webhook_url = Some(url);
        c.callback_secret = Some("whsec".into());
    })
    .await;
    product(&s, "book", 3).await;
    rx.answer(503);
    let oid = id(&order(&s, "ivy", "book", 1).await);
    s.advance(25 * MIN).await;
    let (_, d) = s.get(&format!("/v1/orders/{oid}")).await;
    assert_eq!(kinds(&d), ["created", "reminded"], "{d}");
    let (_, d) = s.get(&format!("/v1/orders/{oid}")).await;
    assert_eq!(d["events"][1]["source"], "order.remind");

    // The receiver is down: the message stays pending with its failed attempts counted.
    assert_eq!(s.app.relay_outbox_once().await.expect("relay pass"), 0);
    let pending = s.app.orders.outbox_pending(10).await.expect("outbox");
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert!(pending[0].attempts >= 1, "{pending:?}");
    let first = rx.next().await;
    assert_eq!(header(&first, "x-overdue-topic"), "order.reminder");

    // Back up: the next pass (ours, or the relay task's) delivers it, once.
    rx.answer(200);
    s.app.relay_outbox_once().await.expect("relay pass");
    assert!(s.app.orders.outbox_pending(10).await.expect("outbox").is_empty());
    let got = rx.drain().pop().unwrap_or(first);
    let body: Value = serde_json::from_slice(&got.body).expect("json body");
    assert_eq!(body["topic"], "order.reminder");
    assert_eq!(body["payload"]["order_id"], oid.as_str());
    assert_eq!(body["payload"]["buyer"], "ivy");
    assert_eq!(header(&got, "x-overdue-message-id"), body["id"].to_string());
    let ts = header(&got, "x-overdue-timestamp");
    assert!(callback::verify(b"whsec", ts, &got.body, header(&got, "x-overdue-signature")));
    assert_eq!(s.app.relay_outbox_once().await.expect("relay pass"), 0, "nothing left to deliver");
    assert!(rx.drain().is_empty(), "a delivered message is not sent again");
    s.stop().await;
}

every_backend!(
    product_then_order_then_pay,
    unpaid_order_closes_at_its_deadline_and_a_late_payment_is_refused,
    ship_confirm_and_auto_confirm,
    refunds_approved_rejected_and_auto_approved,
    list_orders_with_status_filter_and_pagination,
);
