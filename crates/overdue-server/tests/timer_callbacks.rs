//! Generic timers over HTTP: a callback to a receiver in the test, signed; failures retried,
//! then dead-lettered; replay through the API. Virtual time throughout.

mod common;

use common::{Receiver, T0, TestServer, assert_error, header};
use overdue::QueueConfig;
use overdue_server::callback;
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "test-secret";

async fn signed_server() -> TestServer {
    TestServer::start_with(|c| {
        c.callback_secret = Some(SECRET.into());
        c.callback_queue = QueueConfig {
            max_attempts: 3,
            backoff_base: Duration::from_secs(1),
            jitter: 0.0,
            ..QueueConfig::default()
        };
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_fires_its_callback_with_a_valid_signature_and_the_exact_payload() {
    let s = signed_server().await;
    let mut rx = Receiver::start("/hook").await;
    // Spacing and number formats must survive byte for byte.
    let body = format!(
        r#"{{"queue":"sms.send","key":"user/42","delay_ms":60000,"callback_url":"{}","payload":{{"to": "+1 555", "n": 1.50}}}}"#,
        rx.url
    );
    let resp = s
        .req(reqwest::Method::POST, "/v1/timers")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 201);
    let created: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(created["due_at"], T0 + 60_000);
    let generation = created["generation"].as_u64().expect("generation");

    let (st, t) = s.get("/v1/timers/sms.send/user%2F42").await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["callback_url"], rx.url.as_str());
    assert_eq!(t["payload"], json!({"to": "+1 555", "n": 1.5}));
    assert_eq!(t["state"], "pending");

    s.advance(59_999).await;
    assert!(rx.drain().is_empty(), "fired early");
    s.advance(1).await;
    let got = rx.next().await;
    assert_eq!(&got.body[..], br#"{"to": "+1 555", "n": 1.50}"#);
    assert_eq!(header(&got, "x-overdue-queue"), "sms.send");
    assert_eq!(header(&got, "x-overdue-key"), "user/42");
    assert_eq!(header(&got, "x-overdue-attempt"), "1");
    assert_eq!(header(&got, "x-overdue-generation"), generation.to_string());
    assert_eq!(header(&got, "content-type"), "application/json");
    let ts = header(&got, "x-overdue-timestamp");
    assert_eq!(ts, (T0 + 60_000).to_string(), "signed with the engine clock");
    let sig = header(&got, "x-overdue-signature");
    assert!(callback::verify(SECRET.as_bytes(), ts, &got.body, sig), "signature {sig} must verify");
    assert_eq!(sig, callback::sign(SECRET.as_bytes(), T0 + 60_000, &got.body));

    // Done: the timer is gone, nothing dead.
    assert_error(&s.get("/v1/timers/sms.send/user%2F42").await, 404, "not_found");
    let (_, dl) = s.get("/v1/dead-letters").await;
    assert_eq!(dl["dead_letters"], json!([]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_when_no_secret_and_cancel_and_fire_now_work() {
    let s = TestServer::start().await;
    let mut rx = Receiver::start("/cb").await;
    for key in ["a", "b"] {
        let (st, v) = s
            .post("/v1/timers", json!({"queue": "mail", "key": key, "due_at": T0 + 3_600_000, "callback_url": rx.url, "payload": {"k": key}}))
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let (st, v) = s.delete("/v1/timers/mail/a").await;
    assert_eq!((st, &v["cancelled"]), (200, &json!(true)), "{v}");
    assert_error(&s.delete("/v1/timers/mail/a").await, 404, "not_found");

    let (st, v) = s.post_empty("/v1/timers/mail/b/fire-now").await;
    assert_eq!((st, &v["due_at"]), (200, &json!(T0)), "{v}");
    s.app.engine.settle().await;
    let got = rx.next().await;
    assert_eq!(&got.body[..], br#"{"k":"b"}"#);
    assert!(got.headers.get("x-overdue-signature").is_none(), "no secret, no signature");
    assert!(got.headers.get("x-overdue-timestamp").is_some());
    assert!(rx.drain().is_empty(), "a cancelled timer never fires");
    assert_error(&s.post_empty("/v1/timers/mail/a/fire-now").await, 404, "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receiver_is_retried_with_backoff_then_dead_lettered_and_replayed() {
    let s = signed_server().await;
    let mut rx = Receiver::start("/flaky").await;
    rx.answer(500);
    let (st, v) = s
        .post("/v1/timers", json!({"queue": "billing.retry", "key": "inv-7", "delay_ms": 1000, "callback_url": rx.url, "payload": [1, 2, 3]}))
        .await;
    assert_eq!(st, 201, "{v}");

    // Attempt 1 at +1 s fails; retry after 1 s; attempt 2 fails; retry after 2 s; attempt 3 fails → dead.
    s.advance(1_000).await;
    assert_eq!(header(&rx.next().await, "x-overdue-attempt"), "1");
    let (_, t) = s.get("/v1/timers/billing.retry/inv-7").await;
    assert_eq!(t["attempts"], 1, "{t}");
    assert!(t["last_error"].as_str().is_some_and(|e| e.contains("500")), "{t}");
    s.advance(999).await;
    assert!(rx.drain().is_empty(), "retried before its backoff");
    s.advance(1).await;
    assert_eq!(header(&rx.next().await, "x-overdue-attempt"), "2");
    s.advance(2_000).await;
    assert_eq!(header(&rx.next().await, "x-overdue-attempt"), "3");

    assert_error(&s.get("/v1/timers/billing.retry/inv-7").await, 404, "not_found");
    let (st, dl) = s.get("/v1/dead-letters?queue=billing.retry").await;
    assert_eq!(st, 200, "{dl}");
    let dead = dl["dead_letters"].as_array().expect("array");
    assert_eq!(dead.len(), 1, "{dl}");
    assert_eq!(dead[0]["key"], "inv-7");
    assert_eq!(dead[0]["attempts"], 3);
    assert_eq!(dead[0]["callback_url"], rx.url.as_str());
    assert_eq!(dead[0]["payload"], json!([1, 2, 3]));
    assert!(dead[0]["error"].as_str().is_some_and(|e| e.contains("500")), "{dl}");
    let id = dead[0]["id"].as_i64().expect("id");

    // The receiver recovers; replay delivers once more, as a first attempt.
    rx.answer(204);
    let (st, v) = s.post_empty(&format!("/v1/dead-letters/{id}/replay")).await;
    assert_eq!(st, 200, "{v}");
    s.app.engine.settle().await;
    let got = rx.next().await;
    assert_eq!(header(&got, "x-overdue-attempt"), "1");
    assert_eq!(&got.body[..], b"[1,2,3]");
    let (_, dl) = s.get("/v1/dead-letters").await;
    assert_eq!(dl["dead_letters"], json!([]));
    assert_error(&s.post_empty(&format!("/v1/dead-letters/{id}/replay")).await, 404, "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_listing_pages_in_due_order() {
    let s = TestServer::start().await;
    for i in 0..5 {
        let (st, v) = s
            .post("/v1/timers", json!({"queue": "q.list", "key": format!("k{i}"), "due_at": T0 + 10_000 - i * 1000, "callback_url": "http://127.0.0.1:9/x"}))
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let mut keys = Vec::new();
    let mut path = "/v1/timers?queue=q.list&limit=2".to_owned();
    loop {
        let (st, page) = s.get(&path).await;
        assert_eq!(st, 200, "{page}");
        for t in page["timers"].as_array().expect("timers") {
            keys.push(t["key"].as_str().expect("key").to_owned());
            assert_eq!(t["payload"], serde_json::Value::Null);
        }
        let next = &page["next"];
        if next.is_null() {
            break;
        }
        path = format!(
            "/v1/timers?queue=q.list&limit=2&after_due={}&after_queue={}&after_key={}",
            next["after_due"], next["after_queue"].as_str().expect("q"), next["after_key"].as_str().expect("k")
        );
    }
    assert_eq!(keys, ["k4", "k3", "k2", "k1", "k0"]);
    let (_, page) = s.get(&format!("/v1/timers?queue=q.list&due_from={}&due_to={}", T0 + 7_000, T0 + 8_000)).await;
    assert_eq!(page["timers"].as_array().map(Vec::len), Some(2), "{page}");
    s.stop().await;
}
