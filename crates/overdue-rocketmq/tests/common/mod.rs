//! What every RocketMQ test shares: the name server address, a fresh prefix per test (its topic
//! is deleted when the test ends; timer messages still waiting in the broker cannot be, which is
//! why every test has its own prefix), a conformance backend, and the rule that under `CI` an
//! unreachable broker fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use overdue_core::{ExternalTrigger, Result, Store};
use overdue_engine::TriggerKind;
use overdue_rocketmq::{Mode, RocketOptions, RocketTrigger};
use overdue_sql::{SqliteOptions, SqliteStore};
use overdue_testkit::Backend;

/// The name server the tests use: `OVERDUE_TEST_ROCKETMQ` (`host:port`), or 127.0.0.1:9876.
pub fn name_server() -> String {
    std::env::var("OVERDUE_TEST_ROCKETMQ").unwrap_or_else(|_| "127.0.0.1:9876".to_owned())
}

/// The broker's address, for the reachability check: `OVERDUE_TEST_ROCKETMQ_BROKER`, or
/// 127.0.0.1:10911.
pub fn broker_addr() -> String {
    std::env::var("OVERDUE_TEST_ROCKETMQ_BROKER").unwrap_or_else(|_| "127.0.0.1:10911".to_owned())
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() as u32
}

async fn reachable(addr: &str) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// A fresh prefix on the test broker; its topic is deleted on drop.
pub struct Fresh {
    pub prefix: String,
    pub mode: Mode,
    /// `max_delay_ms` of its triggers.
    pub max_delay_ms: i64,
}

impl Fresh {
    /// A fresh prefix, or `None` (test skipped) when the broker is unreachable outside CI.
    /// Under `CI` an unreachable broker panics.
    pub async fn new(mode: Mode) -> Option<Fresh> {
        let (ns, broker) = (name_server(), broker_addr());
        if !reachable(&ns).await || !reachable(&broker).await {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the RocketMQ name server {ns} or broker {broker} cannot be reached (scripts/brokers.sh start rocketmq)");
            }
            eprintln!("skipped: no RocketMQ name server at {ns} and broker at {broker}; set CI to make this a failure");
            return None;
        }
        Some(Fresh {
            prefix: format!("ot-{}-{:08x}", now_ms(), rand_u32()),
            mode,
            max_delay_ms: overdue_rocketmq::DEFAULT_MAX_TIMER_DELAY_MS,
        })
    }

    pub fn options(&self) -> RocketOptions {
        RocketOptions {
            name_server: name_server(),
            mode: self.mode,
            prefix: self.prefix.clone(),
            max_delay_ms: self.max_delay_ms,
            reconnect_min: Duration::from_millis(200),
            ..RocketOptions::default()
        }
    }

    /// A new trigger on this prefix.
    pub fn trigger(&self) -> RocketTrigger {
        RocketTrigger::new(self.options())
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let trigger = self.trigger();
        // Drop may run inside a runtime: purge on a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Err(e) = trigger.purge().await {
                    eprintln!("deleting the test's topic failed: {e}");
                }
                trigger.close().await;
            });
        })
        .join();
    }
}

/// A conformance backend: a fresh SQLite store (outbox on) in its own directory and a trigger
/// on a fresh prefix (the same prefix again after a simulated crash).
pub struct Rocket {
    pub fresh: Fresh,
    dir: tempfile::TempDir,
}

impl Rocket {
    pub async fn fresh(mode: Mode) -> Option<Rocket> {
        Some(Rocket { fresh: Fresh::new(mode).await?, dir: tempfile::tempdir().expect("temporary directory") })
    }

    pub async fn store(&self) -> SqliteStore {
        SqliteStore::open(self.dir.path().join("overdue.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
            .await
            .expect("open the store")
    }
}

impl Backend for Rocket {
    fn name(&self) -> String {
        format!("sqlite+rocketmq-{:?}", self.fresh.mode).to_lowercase()
    }
    fn trigger(&self) -> TriggerKind {
        TriggerKind::Wheel
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(async move { Ok(Arc::new(self.store().await) as Arc<dyn Store>) })
    }
    fn external(&self) -> Option<Arc<dyn ExternalTrigger>> {
        Some(Arc::new(self.fresh.trigger()))
    }
}

pub use overdue_testkit::until;
