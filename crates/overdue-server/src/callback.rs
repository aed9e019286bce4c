//! HTTP callbacks of generic timers, webhook delivery of the outbox, and their signature.
//!
//! ## What a receiver gets
//!
//! `POST <callback_url>` with the timer's payload as the body (byte for byte as it was given to
//! `POST /v1/timers`), `content-type: application/json`, and these headers:
//!
//! | header | value |
//! |---|---|
//! | `X-Overdue-Timestamp` | milliseconds since the Unix epoch when the request was signed |
//! | `X-Overdue-Signature` | `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, only when a secret is configured |
//! | `X-Overdue-Queue`, `X-Overdue-Key` | the timer's identity (the key as raw UTF-8) |
//! | `X-Overdue-Generation` | the timer's generation: `(queue, key, generation)` identifies one firing, for de-duplication |
//! | `X-Overdue-Attempt` | 1 for the first delivery, 2 for the first retry, … |
//!
//! A 2xx answer within the timeout (default 10 s) completes the timer. Anything else (another
//! status, a redirect — redirects are not followed —, a timeout, a refused connection) is a
//! failed attempt: the engine retries with exponential backoff and, after the queue's
//! `max_attempts`, moves the timer to the dead letters, where `POST
//! /v1/dead-letters/{id}/replay` puts it back. Delivery is at least once: a receiver must
//! tolerate a repeat of the same `(queue, key, generation)`.
//!
//! ## Verifying a signature
//!
//! Take the raw body bytes and the `X-Overdue-Timestamp` header, compute
//! `HMAC-SHA256(secret, timestamp + "." + body)`, hex-encode it, and compare it with the part of
//! `X-Overdue-Signature` after `sha256=` in constant time; refuse timestamps more than a few
//! minutes from your clock to stop replays. [`verify`] does exactly this.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use overdue::{Clock, Firing, Handler, Outcome};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::{Result, ServerError};

/// Milliseconds since the epoch when the request was signed.
pub const TIMESTAMP_HEADER: &str = "x-overdue-timestamp";
/// `sha256=<hex>` HMAC of `"<timestamp>.<body>"`.
pub const SIGNATURE_HEADER: &str = "x-overdue-signature";
/// The timer's queue.
pub const QUEUE_HEADER: &str = "x-overdue-queue";
/// The timer's key.
pub const KEY_HEADER: &str = "x-overdue-key";
/// The timer's generation.
pub const GENERATION_HEADER: &str = "x-overdue-generation";
/// The delivery attempt, from 1.
pub const ATTEMPT_HEADER: &str = "x-overdue-attempt";
/// The outbox message's topic (webhooks only).
pub const TOPIC_HEADER: &str = "x-overdue-topic";
/// The outbox message's id (webhooks only), for de-duplication.
pub const MESSAGE_ID_HEADER: &str = "x-overdue-message-id";
/// Longest accepted callback URL, in bytes.
pub const MAX_URL_LEN: usize = 2048;

type HmacSha256 = Hmac<Sha256>;

/// The `X-Overdue-Signature` value for `body` sent at `timestamp_ms`:
/// `sha256=` + hex(HMAC-SHA256(secret, `"<timestamp_ms>.<body>"`)).
pub fn sign(secret: &[u8], timestamp_ms: i64, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(mac(secret, &timestamp_ms.to_string(), body).finalize().into_bytes()))
}

/// Checks a received signature: `timestamp` and `signature` are the header values as received.
/// Constant-time in the signature. Does not check the timestamp's age; the caller should.
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else { return false };
    let Ok(sig) = hex::decode(hex_sig) else { return false };
    mac(secret, timestamp, body).verify_slice(&sig).is_ok()
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// Checks a callback or webhook URL: absolute `http` or `https` with a host, at most
/// [`MAX_URL_LEN`] bytes.
pub fn check_url(url: &str) -> Result<reqwest::Url, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("url is longer than {MAX_URL_LEN} bytes"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a valid absolute url: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?}: only http and https urls are allowed"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(parsed)
}

/// What a generic timer stores as its payload: where to call and what to send.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Envelope {
    pub(crate) callback_url: String,
    pub(crate) payload: Box<RawValue>,
}

impl Envelope {
    pub(crate) fn decode(bytes: &[u8]) -> Option<Envelope> {
        serde_json::from_slice(bytes).ok()
    }
}

/// An HTTP client that signs what it sends.
#[derive(Debug)]
pub(crate) struct Delivery {
    client: reqwest::Client,
    secret: Option<Vec<u8>>,
    clock: Arc<dyn Clock>,
}

impl Delivery {
    pub(crate) fn new(secret: Option<String>, timeout: Duration, clock: Arc<dyn Clock>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ServerError::Config(format!("cannot build the http client: {e}")))?;
        Ok(Delivery { client, secret: secret.map(String::into_bytes), clock })
    }

    /// POSTs `body` to `url` with the timestamp, the signature (if a secret is set) and
    /// `headers`. `Ok` only for a 2xx answer.
    pub(crate) async fn post(&self, url: &str, body: Vec<u8>, headers: HeaderMap) -> Result<(), String> {
        let ts = self.clock.now_ms();
        let mut req = self
            .client
            .post(url)
            .headers(headers)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("overdue/", env!("CARGO_PKG_VERSION")))
            .header(TIMESTAMP_HEADER, ts.to_string());
        if let Some(secret) = &self.secret {
            req = req.header(SIGNATURE_HEADER, sign(secret, ts, &body));
        }
        let resp = req.body(body).send().await.map_err(|e| format!("delivery failed: {e}"))?;
        let status = resp.status();
        if status.is_success() { Ok(()) } else { Err(format!("receiver answered {status}")) }
    }
}

/// Headers from name/value pairs; a value that cannot be a header is an error.
pub(crate) fn headers(pairs: &[(&'static str, &str)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let v = HeaderValue::from_bytes(value.as_bytes()).map_err(|_| format!("{name} value {value:?} cannot be sent as a header"))?;
        map.insert(HeaderName::from_static(name), v);
    }
    Ok(map)
}

/// The engine handler of every queue without one of its own: delivers generic timers.
#[derive(Debug, Clone)]
pub(crate) struct CallbackHandler {
    delivery: Arc<Delivery>,
}

impl CallbackHandler {
    pub(crate) fn new(delivery: Arc<Delivery>) -> Self {
        CallbackHandler { delivery }
    }
}

impl Handler for CallbackHandler {
    fn call(&self, f: Firing) -> BoxFuture<'static, Outcome> {
        let delivery = self.delivery.clone();
        Box::pin(async move {
            let Some(env) = Envelope::decode(&f.payload) else {
                return Outcome::Fail(format!(
                    "timer ({}, {}) has no callback: it was not created through POST /v1/timers and no handler serves its queue",
                    f.queue, f.key
                ));
            };
            let generation = f.generation.to_string();
            let attempt = f.attempt.to_string();
            let hs = match headers(&[
                (QUEUE_HEADER, &f.queue),
                (KEY_HEADER, &f.key),
                (GENERATION_HEADER, &generation),
                (ATTEMPT_HEADER, &attempt),
            ]) {
                Ok(h) => h,
                Err(e) => return Outcome::Fail(e),
            };
            let body = env.payload.get().as_bytes().to_vec();
            match delivery.post(&env.callback_url, body, hs).await {
                Ok(()) => Outcome::Done,
                Err(e) => {
                    tracing::info!(queue = %f.queue, key = %f.key, attempt = f.attempt, error = %e, "callback failed");
                    Outcome::Fail(e)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector_and_verifies() {
        // Python: hmac.new(b"key", b"1700000000000.{\"a\":1}", hashlib.sha256).hexdigest()
        let sig = sign(b"key", 1_700_000_000_000, br#"{"a":1}"#);
        assert_eq!(sig, "sha256=2c8bc12f88d77789404ce0a63cf69acf735ba98832f7a7d36147f537be556f3e");
        assert!(verify(b"key", "1700000000000", br#"{"a":1}"#, &sig));
        assert!(!verify(b"key", "1700000000001", br#"{"a":1}"#, &sig), "timestamp is signed");
        assert!(!verify(b"other", "1700000000000", br#"{"a":1}"#, &sig), "secret matters");
        assert!(!verify(b"key", "1700000000000", br#"{"a":2}"#, &sig), "body is signed");
        assert!(!verify(b"key", "1700000000000", br#"{"a":1}"#, "sha256=zz"));
        assert!(!verify(b"key", "1700000000000", br#"{"a":1}"#, &sig[7..]), "prefix required");
    }

    #[test]
    fn urls() {
        assert!(check_url("http://127.0.0.1:9/x?y=1").is_ok());
        assert!(check_url("https://example.com/hook").is_ok());
        for bad in ["ftp://example.com/", "file:///etc/passwd", "not a url", "/relative", "http://", "javascript:alert(1)"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(MAX_URL_LEN))).is_err());
    }

    #[test]
    fn envelope_keeps_the_payload_bytes() {
        let raw = r#"{"callback_url":"http://h/x","payload":{"b": 1.50, "a":[1,2]}}"#;
        let env = Envelope::decode(raw.as_bytes()).expect("decodes");
        assert_eq!(env.payload.get(), r#"{"b": 1.50, "a":[1,2]}"#);
        assert!(Envelope::decode(b"{}").is_none());
        assert!(Envelope::decode(b"").is_none());
    }
}
