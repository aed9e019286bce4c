//! What every Redisson-layout test shares: the server URL, a fresh side-key prefix and a fresh
//! Redisson name prefix per test (Redisson's own keys are named by the queue, so two tests using
//! queue `q` would otherwise share them), cleanup of both, and the rule that under `CI` an
//! unreachable server fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_redisson::RedissonStore;
use overdue_testkit::Backend;

/// The server the tests use: `OVERDUE_TEST_REDIS` (a `redis://` URL), or the one on 127.0.0.1.
pub fn server_url() -> String {
    std::env::var("OVERDUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A connection to the test server, or `None` (test skipped) when it is unreachable outside
/// CI. Under `CI` an unreachable server panics.
pub async fn connect() -> Option<redis::aio::MultiplexedConnection> {
    let base = server_url();
    let r = async {
        let client = redis::Client::open(base.as_str())?;
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut con).await?;
        Ok::<_, redis::RedisError>(con)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), r).await {
        Ok(Ok(con)) => Some(con),
        other => {
            let e = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the Redis server at {base} cannot be reached: {e}");
            }
            eprintln!("skipped: no Redis at {base} ({e}); set CI to make this a failure");
            None
        }
    }
}

async fn delete_matching(con: &mut redis::aio::MultiplexedConnection, pattern: &str) {
    let mut cursor: u64 = 0;
    loop {
        let r: redis::RedisResult<(u64, Vec<String>)> =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(con).await;
        let Ok((next, keys)) = r else { break };
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("UNLINK").arg(&keys).query_async(con).await;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Deletes every key of one test: the side keys (`<tag>:*`) and Redisson's keys of queues
/// named `<tag>.<queue>` (`redisson_delay_queue*:{<tag>.…}` and the destination lists).
pub async fn delete_tag(con: &mut redis::aio::MultiplexedConnection, tag: &str) {
    for pattern in [format!("{tag}:*"), format!("redisson_delay_queue*:{{{tag}.*"), format!("{tag}.*")] {
        delete_matching(con, &pattern).await;
    }
}

/// Deletes the keys of test tags (`otr-<ms>-<random>`) older than an hour, left by runs that died.
pub async fn delete_old_tags(con: &mut redis::aio::MultiplexedConnection) {
    let cutoff = now_ms() - 3_600_000;
    let mut old = std::collections::BTreeSet::new();
    for pattern in ["otr-*", "redisson_delay_queue*:{otr-*"] {
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(con).await;
            let Ok((next, keys)) = r else { break };
            for k in keys {
                let Some(start) = k.find("otr-") else { continue };
                let mut parts = k[start..].splitn(3, '-');
                let (_, ms, rand) = (parts.next(), parts.next(), parts.next());
                let ms = ms.and_then(|m| m.parse::<i64>().ok());
                let rand: Option<String> = rand.map(|r| r.chars().take_while(char::is_ascii_hexdigit).collect());
                if let (Some(ms), Some(rand)) = (ms, rand)
                    && ms < cutoff
                {
                    old.insert(format!("otr-{ms}-{rand}"));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    for t in old {
        delete_tag(con, &t).await;
    }
}

/// A fresh tag on the test server: side-key prefix `<tag>` and Redisson name prefix `<tag>.`;
/// deletes its keys when dropped.
pub struct Fresh {
    pub tag: String,
    pub url: String,
    con: redis::aio::MultiplexedConnection,
}

impl Fresh {
    /// `None` when the server is unreachable outside CI (the test is skipped). `extra` is added
    /// to the URL's query (e.g. `codec=bytes`).
    pub async fn new(extra: &str) -> Option<Fresh> {
        let mut con = connect().await?;
        delete_old_tags(&mut con).await;
        let tag = format!("otr-{}-{:08x}", now_ms(), rand::random::<u32>());
        let base = server_url().replacen("redis://", "redisson://", 1);
        let sep = if base.contains('?') { '&' } else { '?' };
        let mut url = format!("{base}{sep}prefix={tag}&name_prefix={tag}.");
        if !extra.is_empty() {
            url = format!("{url}&{extra}");
        }
        Some(Fresh { tag, url, con })
    }

    /// The Redisson name of overdue queue `q`.
    pub fn name(&self, q: &str) -> String {
        format!("{}.{q}", self.tag)
    }

    /// The URL with more parameters.
    pub fn url_with(&self, extra: &str) -> String {
        format!("{}&{extra}", self.url)
    }

    /// A raw connection for checking keys.
    pub fn con(&self) -> redis::aio::MultiplexedConnection {
        self.con.clone()
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let mut con = self.con.clone();
        let tag = self.tag.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(delete_tag(&mut con, &tag));
            }
        })
        .join();
    }
}

/// A conformance backend: one tag per test, reopened after a simulated crash. The suite's
/// payloads are arbitrary bytes, so it runs with `ByteArrayCodec` (`codec=bytes`).
pub struct Rs {
    pub trigger: TriggerKind,
    pub fresh: Fresh,
}

impl Rs {
    pub async fn fresh(trigger: TriggerKind) -> Option<Rs> {
        Some(Rs { trigger, fresh: Fresh::new("codec=bytes").await? })
    }
}

impl Backend for Rs {
    fn name(&self) -> String {
        format!("redisson/{}", self.trigger)
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(async move { Ok(Arc::new(RedissonStore::open_url(&self.fresh.url).await?) as Arc<dyn Store>) })
    }
}
