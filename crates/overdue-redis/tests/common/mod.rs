//! What every Redis test shares: the server URL, a fresh key prefix per test, cleanup of the
//! test's keys, and the rule that under `CI` an unreachable server fails the test instead of
//! skipping it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_redis::RedisStore;
use overdue_testkit::Backend;

/// The server the tests use: `OVERDUE_TEST_REDIS`, or the one on 127.0.0.1.
pub fn server_url() -> String {
    std::env::var("OVERDUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A new prefix, unique per test: `ot:<ms since epoch>:<random>`.
pub fn fresh_prefix() -> String {
    format!("ot:{}:{:08x}", now_ms(), rand::random::<u32>())
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

/// Deletes every key of `prefix` (its global keys and every queue's tagged keys).
pub async fn delete_prefix(con: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:q:*")] {
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(con).await;
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
}

/// Deletes the keys of test prefixes (`ot:<ms>:…`) older than an hour, left by runs that died.
pub async fn delete_old_prefixes(con: &mut redis::aio::MultiplexedConnection) {
    let cutoff = now_ms() - 3_600_000;
    let mut old = std::collections::BTreeSet::new();
    for pattern in ["ot:*", "{ot:*"] {
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(con).await;
            let Ok((next, keys)) = r else { break };
            for k in keys {
                let mut parts = k.trim_start_matches('{').splitn(3, ':');
                let (_, ms, rand) = (parts.next(), parts.next(), parts.next());
                let ms = ms.and_then(|m| m.parse::<i64>().ok());
                let rand = rand.and_then(|r| r.split(':').next());
                if let (Some(ms), Some(rand)) = (ms, rand)
                    && ms < cutoff
                {
                    old.insert(format!("ot:{ms}:{rand}"));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    for p in old {
        delete_prefix(con, &p).await;
    }
}

/// A fresh prefix on the test server; deletes its keys when dropped.
pub struct Fresh {
    pub prefix: String,
    pub url: String,
    con: redis::aio::MultiplexedConnection,
}

impl Fresh {
    /// `None` when the server is unreachable outside CI (the test is skipped).
    pub async fn new() -> Option<Fresh> {
        let mut con = connect().await?;
        delete_old_prefixes(&mut con).await;
        let prefix = fresh_prefix();
        let base = server_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}prefix={prefix}");
        Some(Fresh { prefix, url, con })
    }

    /// The URL with `node=NAME` added.
    pub fn node_url(&self, node: &str) -> String {
        format!("{}&node={node}", self.url)
    }

    /// A raw connection for checking keys.
    pub fn con(&self) -> redis::aio::MultiplexedConnection {
        self.con.clone()
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let mut con = self.con.clone();
        let prefix = self.prefix.clone();
        // Tests run on tokio runtimes; clean up on a thread of its own so a drop inside a
        // runtime does not block it.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(delete_prefix(&mut con, &prefix));
            }
        })
        .join();
    }
}

/// A conformance backend: one prefix per test, reopened after a simulated crash (Redis keeps the
/// keys: the process crashed, not the server).
pub struct Rd {
    pub trigger: TriggerKind,
    pub fresh: Fresh,
}

impl Rd {
    pub async fn fresh(trigger: TriggerKind) -> Option<Rd> {
        Some(Rd { trigger, fresh: Fresh::new().await? })
    }
}

impl Backend for Rd {
    fn name(&self) -> String {
        format!("redis/{}", self.trigger)
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(async move { Ok(Arc::new(RedisStore::open_url(&self.fresh.url).await?) as Arc<dyn Store>) })
    }
}
