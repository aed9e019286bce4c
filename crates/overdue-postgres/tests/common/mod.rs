//! What every PostgreSQL test shares: the server URL, a fresh schema per test, and the rule that
//! under `CI` an unreachable server fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_postgres::PgStore;
use overdue_testkit::Backend;

/// The server the tests use: `OVERDUE_TEST_POSTGRES`, or the one on 127.0.0.1.
pub fn server_url() -> String {
    std::env::var("OVERDUE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A new schema name, unique per test: `ot_<ms since epoch>_<random>`.
pub fn fresh_schema() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("ot_{ms}_{:08x}", rand::random::<u32>())
}

/// The URL of a fresh schema on the test server, or `None` (test skipped) when the server is
/// unreachable outside CI. Under `CI` an unreachable server panics. Also drops test schemas
/// left over from runs more than an hour ago.
pub async fn fresh_url(extra: &str) -> Option<String> {
    let base = server_url();
    match sqlx::PgPool::connect(&base).await {
        Ok(pool) => {
            drop_old_schemas(&pool).await;
            pool.close().await;
        }
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the PostgreSQL server at {base} cannot be reached: {e}");
            }
            eprintln!("skipped: no PostgreSQL at {base} ({e}); set CI to make this a failure");
            return None;
        }
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}schema={}{extra}", fresh_schema()))
}

async fn drop_old_schemas(pool: &sqlx::PgPool) {
    let cutoff = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0) - 3_600_000;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'ot\\_%'")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    for name in names {
        let ms = name.split('_').nth(1).and_then(|s| s.parse::<i64>().ok());
        if ms.is_some_and(|ms| ms < cutoff) {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).execute(pool).await;
        }
    }
}

/// A conformance backend: one schema per test, reopened under the same node name after a
/// simulated crash (a restarted node takes its partitions back at once).
pub struct Pg {
    pub trigger: TriggerKind,
    pub url: String,
}

impl Pg {
    pub async fn fresh(trigger: TriggerKind) -> Option<Pg> {
        let url = fresh_url("").await?;
        let node = url.rsplit("schema=").next().unwrap_or("node").to_owned();
        Some(Pg { trigger, url: format!("{url}&node={node}") })
    }
}

impl Backend for Pg {
    fn name(&self) -> String {
        format!("postgres/{}", self.trigger)
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(async move { Ok(Arc::new(PgStore::open_url(&self.url).await?) as Arc<dyn Store>) })
    }
}
