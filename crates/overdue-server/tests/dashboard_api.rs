//! What the dashboard reads and does, through the API alone: `GET /v1/overview` counts what the
//! other routes show, `POST /v1/timers/{queue}/{key}/reschedule` moves a timer, and the page's
//! files are served without a token while the data still needs one.

mod common;

use common::{T0, TestServer, assert_error};
use serde_json::{Value, json};

const MIN: i64 = 60_000;

async fn overview(s: &TestServer) -> Value {
    let (st, o) = s.get("/v1/overview").await;
    assert_eq!(st, 200, "{o}");
    o
}

fn queue<'a>(o: &'a Value, name: &str) -> &'a Value {
    o["queues"].as_array().and_then(|qs| qs.iter().find(|q| q["queue"] == name)).unwrap_or_else(|| panic!("no queue {name} in {o}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_counts_timers_by_due_time_orders_by_status_and_firings() {
    let rx = common::Receiver::start("/hook").await;
    let s = TestServer::start().await;
    let (st, _) = s.post("/v1/products", json!({"id": "tea", "name": "tea", "price_cents": 500, "stock": 10})).await;
    assert_eq!(st, 201);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (st, o) = s.post("/v1/orders", json!({"buyer": "ann", "items": [{"product_id": "tea", "quantity": 1}]})).await;
        assert_eq!(st, 201, "{o}");
        ids.push(o["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(s.post_empty(&format!("/v1/orders/{}/pay", ids[0])).await.0, 200);
    for (key, delay) in [("soon", 30_000), ("hour", 30 * MIN), ("day", 5 * 60 * MIN), ("later", 3 * 24 * 60 * MIN)] {
        let (st, v) = s.post("/v1/timers", json!({"queue": "mail", "key": key, "delay_ms": delay, "callback_url": rx.url})).await;
        assert_eq!(st, 201, "{v}");
    }

    let o = overview(&s).await;
    assert_eq!(o["now"], T0);
    assert_eq!((o["node"]["store"].as_str(), o["node"]["trigger"].as_str()), (Some("sqlite"), Some("wheel")), "{o}");
    assert_eq!(o["node"]["store_healthy"], true);
    assert_eq!(o["orders"]["pending_payment"], 2, "{o}");
    assert_eq!(o["orders"]["paid"], 1, "{o}");
    let mail = queue(&o, "mail");
    assert_eq!(mail["pending"], 4);
    assert_eq!(mail["due"], json!({"overdue": 0, "next_minute": 1, "next_hour": 1, "next_day": 1, "later": 1}), "{o}");
    // Two unpaid orders: a reminder at 25 min and a close at 30 min each; the paid one has none.
    assert_eq!(queue(&o, "order.close")["due"]["next_hour"], 2, "{o}");
    assert_eq!(queue(&o, "order.remind")["due"]["next_hour"], 2, "{o}");
    assert_eq!(o["due_exact"], true);
    // The overview agrees with the listing routes.
    let (_, listed) = s.get("/v1/timers?queue=mail").await;
    assert_eq!(listed["timers"].as_array().map(Vec::len), Some(4));
    assert_eq!(o["engine"]["fired"], 0);
    assert_eq!(o["recent_lateness"]["count"], 0);

    // Thirty seconds on, "soon" fires (its callback answers 200) and everything moves a bucket.
    s.advance(30_000).await;
    let o = overview(&s).await;
    assert_eq!(o["engine"]["fired"], 1, "{o}");
    assert_eq!(o["recent_lateness"]["count"], 1, "{o}");
    assert_eq!(queue(&o, "mail")["due"], json!({"overdue": 0, "next_minute": 0, "next_hour": 1, "next_day": 1, "later": 1}), "{o}");

    // The deadline passes: both unpaid orders close, their timers are gone.
    s.advance(30 * MIN).await;
    let o = overview(&s).await;
    assert_eq!((o["orders"]["closed"].as_u64(), o["orders"]["pending_payment"].as_u64()), (Some(2), Some(0)), "{o}");
    assert!(o["queues"].as_array().expect("queues").iter().all(|q| q["queue"] != "order.close" || q["pending"] == 0), "{o}");
    assert_eq!(o["engine"]["fired"], 2 + 4, "two callbacks (soon, hour), two reminders, two closes: {o}");
    assert_eq!(queue(&o, "mail")["due"], json!({"overdue": 0, "next_minute": 0, "next_hour": 0, "next_day": 1, "later": 1}), "{o}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reschedule_moves_a_timer_and_refuses_bad_input() {
    let rx = common::Receiver::start("/hook").await;
    let s = TestServer::start().await;
    let (st, v) = s.post("/v1/timers", json!({"queue": "mail", "key": "k/1", "delay_ms": 60_000, "callback_url": rx.url, "payload": {"n": 1}})).await;
    assert_eq!(st, 201, "{v}");
    let first = v["generation"].as_u64().expect("generation");

    let (st, v) = s.post("/v1/timers/mail/k%2F1/reschedule", json!({"delay_ms": 3_600_000})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["due_at"], T0 + 3_600_000);
    assert!(v["generation"].as_u64().expect("generation") > first);
    let (_, t) = s.get("/v1/timers/mail/k%2F1").await;
    assert_eq!((t["due_at"].clone(), t["payload"].clone()), (json!(T0 + 3_600_000), json!({"n": 1})), "payload kept: {t}");
    let (st, v) = s.post("/v1/timers/mail/k%2F1/reschedule", json!({"due_at": T0 + 5})).await;
    assert_eq!((st, v["due_at"].as_i64()), (200, Some(T0 + 5)), "{v}");

    // Bad input changes nothing.
    for body in [json!({}), json!({"due_at": 1, "delay_ms": 1}), json!({"delay_ms": -1}), json!({"due_at": "soon"}), json!({"when": 1})] {
        assert_error(&s.post("/v1/timers/mail/k%2F1/reschedule", body).await, 400, "invalid_input");
    }
    assert_error(&s.post("/v1/timers/mail/nope/reschedule", json!({"delay_ms": 1})).await, 404, "not_found");
    assert_error(&s.post("/v1/timers/order.close/o-1/reschedule", json!({"delay_ms": 1})).await, 400, "invalid_input");
    assert_error(&s.post("/v1/timers/bad%20queue/k/reschedule", json!({"delay_ms": 1})).await, 400, "invalid_input");
    let (_, t) = s.get("/v1/timers/mail/k%2F1").await;
    assert_eq!(t["due_at"], T0 + 5, "{t}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_without_a_token_and_its_data_is_not() {
    let s = TestServer::start_with(|cfg| cfg.token = Some("s3cret".into())).await;
    for (path, kind) in [("/", "text/html"), ("/dashboard/app.js", "text/javascript"), ("/dashboard/style.css", "text/css")] {
        let resp = s.client.get(s.url(path)).send().await.expect("get");
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let h = resp.headers();
        assert!(h["content-type"].to_str().unwrap_or("").starts_with(kind), "{path}: {h:?}");
        assert!(h["content-security-policy"].to_str().unwrap_or("").contains("script-src 'self'"), "{path}: {h:?}");
        assert!(!resp.text().await.expect("body").is_empty());
    }
    let anonymous = common::send(s.client.get(s.url("/v1/overview"))).await;
    assert_error(&anonymous, 401, "unauthorized");
    assert_eq!(s.get("/v1/overview").await.0, 200, "with the token");
    s.stop().await;
}

/// On PostgreSQL (partition leases) the overview lists the nodes holding partitions, this one
/// among them, alive; on SQLite just this node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_lists_the_nodes_the_store_knows() {
    let s = TestServer::start().await;
    let o = overview(&s).await;
    assert_eq!(
        o["nodes"],
        json!([{"id": o["node"]["id"], "this": true, "alive": true, "partitions": null, "lease_until": null, "heartbeat_at": null}]),
        "{o}"
    );
    s.stop().await;

    for db in [common::Db::Postgres, common::Db::Mysql] {
        let Some(s) = TestServer::start_on(db).await else { continue };
        let o = overview(&s).await;
        let nodes = o["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 1, "{db:?}: one node on a fresh database: {o}");
        let me = &nodes[0];
        assert_eq!((me["this"].clone(), me["alive"].clone()), (json!(true), json!(true)), "{db:?}: {o}");
        // Leases and heartbeats are on the database's clock, not the test's manual one.
        assert!(me["partitions"].as_u64().is_some_and(|p| p > 0), "{db:?}: {o}");
        assert!(me["lease_until"].as_i64() > me["heartbeat_at"].as_i64(), "{db:?}: {o}");
        s.stop().await;
    }
}
