//! `/metrics`, `/openapi.json` and `/healthz`.

mod common;

use common::{T0, TestServer};
use overdue::QueueConfig;
use overdue_server::ROUTES;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_engine_order_and_http_series_after_traffic() {
    let s = TestServer::start_with(|c| c.callback_queue = QueueConfig { max_attempts: 1, ..QueueConfig::default() }).await;
    let mut rx = common::Receiver::start("/ok").await;
    assert_eq!(s.post("/v1/products", json!({"id": "m1", "name": "m", "price_cents": 5, "stock": 9})).await.0, 201);
    let (_, o) = s.post("/v1/orders", json!({"buyer": "z", "items": [{"product_id": "m1", "quantity": 2}]})).await;
    let (_, o2) = s.post("/v1/orders", json!({"buyer": "z", "items": [{"product_id": "m1", "quantity": 1}]})).await;
    assert_eq!(s.post_empty(&format!("/v1/orders/{}/pay", o["id"].as_str().expect("id"))).await.0, 200);
    assert!(o2["id"].is_string());
    // One callback that succeeds, one that fails into the dead letters.
    for (key, url) in [("good", rx.url.clone()), ("bad", "http://127.0.0.1:9/".to_owned())] {
        let (st, v) = s.post("/v1/timers", json!({"queue": "metrics.q", "key": key, "due_at": T0, "callback_url": url})).await;
        assert_eq!(st, 201, "{v}");
    }
    let (st, v) = s.post("/v1/timers", json!({"queue": "metrics.q", "key": "gone", "delay_ms": 1000, "callback_url": rx.url})).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(s.delete("/v1/timers/metrics.q/gone").await.0, 200);
    s.app.engine.settle().await;
    rx.next().await;

    let resp = s.client.get(s.url("/metrics")).send().await.expect("metrics");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"].to_str().expect("ct").starts_with("text/plain"));
    let text = resp.text().await.expect("text");
    for name in [
        "overdue_timers_scheduled_total{queue=\"metrics.q\"}",
        "overdue_timers_fired_total{queue=\"metrics.q\"}",
        "overdue_timers_completed_total{queue=\"metrics.q\"}",
        "overdue_timers_cancelled_total{queue=\"metrics.q\"}",
        "overdue_fire_lateness_seconds_bucket{queue=\"metrics.q\",le=\"0.001\"}",
        "overdue_handler_failures_total{queue=\"metrics.q\"}",
        "overdue_dead_letters_total{queue=\"metrics.q\"}",
        "overdue_backstop_rescued_total",
        "overdue_store_errors_total 0",
        "overdue_store_healthy 1",
        "overdue_timers_pending{queue=\"order.close\"} 1",
        "overdue_dead_letters_stored{queue=\"metrics.q\"} 1",
        "overdue_orders{status=\"paid\"} 1",
        "overdue_orders{status=\"pending_payment\"} 1",
        "overdue_orders{status=\"refunded\"} 0",
        "overdue_order_transitions_total{kind=\"created\"} 2",
        "overdue_order_transitions_total{kind=\"paid\"} 1",
        "overdue_http_requests_total{method=\"POST\",route=\"/v1/orders/{id}/pay\",status=\"200\"}",
        "overdue_http_request_duration_seconds_bucket",
        "# HELP overdue_timers_pending",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }

    // A queue that empties drops to 0 instead of keeping its last value.
    assert_eq!(s.post_empty(&format!("/v1/orders/{}/cancel", o2["id"].as_str().expect("id"))).await.0, 200);
    let text = s.client.get(s.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(text.contains("overdue_timers_pending{queue=\"order.close\"} 0"), "{text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_parses_and_lists_every_served_route() {
    let s = TestServer::start_with(|c| c.token = Some("tok".into())).await;
    let (st, doc) = common::send(s.client.get(s.url("/openapi.json"))).await;
    assert_eq!(st, 200, "served without a token");
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path) in ROUTES {
        assert!(doc["paths"][*path][*method].is_object(), "openapi.json lacks {method} {path}");
        assert!(doc["paths"][*path][*method]["responses"].is_object(), "{method} {path} documents no responses");
        // The router serves it: whatever the answer, it is not "no such route / method".
        let concrete = path.replace("{id}", "x1").replace("{queue}", "q").replace("{key}", "k");
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let (st, v) = common::send(s.req(m, &concrete)).await;
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(st != 405 && !msg.starts_with("no route"), "{method} {path} is not routed: {st} {v}");
    }
    let operations: usize = doc["paths"].as_object().expect("paths").values().map(|p| p.as_object().map_or(0, |o| o.len())).sum();
    assert_eq!(operations, ROUTES.len(), "openapi.json documents operations the server does not serve");
    // Every $ref resolves.
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/").skip(1) {
        let target = part.split('"').next().expect("ref");
        let (kind, name) = target.split_once('/').expect("kind/name");
        assert!(doc["components"][kind][name].is_object(), "dangling $ref {target}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_ok_without_a_token() {
    let s = TestServer::start_with(|c| c.token = Some("tok".into())).await;
    let (st, v): (u16, Value) = common::send(s.client.get(s.url("/healthz"))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["store"], "sqlite");
    assert_eq!(v["trigger"], "wheel");
    assert_eq!((v["store_healthy"].as_bool(), v["store_errors"].as_u64()), (Some(true), Some(0)), "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_and_the_store_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("o.db").display());
    for round in 0..2 {
        let app = overdue_server::App::start(overdue_server::AppConfig { backend_url: url.clone(), ..Default::default() })
            .await
            .expect("start");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(overdue_server::serve(listener, app.router(), async move {
            let _ = rx.await;
        }));
        let c = reqwest::Client::new();
        if round == 0 {
            let r = c.post(format!("{base}/v1/products")).json(&json!({"id": "keep", "name": "k", "price_cents": 1, "stock": 1})).send().await;
            assert_eq!(r.expect("post").status().as_u16(), 201);
        } else {
            let r = c.get(format!("{base}/v1/products/keep")).send().await.expect("get");
            assert_eq!(r.status().as_u16(), 200, "the product survived the restart");
        }
        let _ = tx.send(());
        server.await.expect("join").expect("serve");
        assert!(app.shutdown().await.drained);
    }
}
