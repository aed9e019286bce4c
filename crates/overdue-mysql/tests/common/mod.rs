//! What every MySQL test shares: the server URL, a fresh database per test, and the rule that
//! under `CI` an unreachable server fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_mysql::MysqlStore;
use overdue_testkit::Backend;

/// The server the tests use: `OVERDUE_TEST_MYSQL`, or the MariaDB on 127.0.0.1.
pub fn server_url() -> String {
    std::env::var("OVERDUE_TEST_MYSQL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A new database name, unique per test: `ot_<ms since epoch>_<random>`.
pub fn fresh_database() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("ot_{ms}_{:08x}", rand::random::<u32>())
}

/// `url` with its path (the database) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{host}/{database}?{q}"),
        None => format!("{host}/{database}"),
    }
}

/// The URL of a fresh database on the test server, or `None` (test skipped) when the server is
/// unreachable outside CI. Under `CI` an unreachable server panics. Also drops test databases
/// left over from runs more than an hour ago.
pub async fn fresh_url(extra: &str) -> Option<String> {
    let base = server_url();
    let database = fresh_database();
    let connect = sqlx::mysql::MySqlPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&base);
    match connect.await {
        Ok(pool) => {
            drop_old_databases(&pool).await;
            if let Err(e) = sqlx::query(&format!("CREATE DATABASE {database}"))
                .execute(&pool)
                .await
            {
                panic!("cannot create the test database {database} on {base}: {e}");
            }
            pool.close().await;
        }
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the MySQL server at {base} cannot be reached: {e}");
            }
            eprintln!("skipped: no MySQL at {base} ({e}); set CI to make this a failure");
            return None;
        }
    }
    let url = with_database(&base, &database);
    let sep = if url.contains('?') { '&' } else { '?' };
    let extra = extra.trim_start_matches('&');
    Some(if extra.is_empty() {
        url
    } else {
        format!("{url}{sep}{extra}")
    })
}

async fn drop_old_databases(pool: &sqlx::MySqlPool) {
    let cutoff = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        - 3_600_000;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE 'ot\\_%'",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    for name in names {
        let ms = name.split('_').nth(1).and_then(|s| s.parse::<i64>().ok());
        if ms.is_some_and(|ms| ms < cutoff) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(pool)
                .await;
        }
    }
}

/// The database named in a test URL.
pub fn database_of(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    base.rsplit('/').next().unwrap_or("").to_owned()
}

/// A conformance backend: one database per test, reopened under the same node name after a
/// simulated crash (a restarted node takes its partitions back at once).
pub struct My {
    pub trigger: TriggerKind,
    pub url: String,
}

impl My {
    pub async fn fresh(trigger: TriggerKind) -> Option<My> {
        let url = fresh_url("").await?;
        let node = database_of(&url);
        let sep = if url.contains('?') { '&' } else { '?' };
        Some(My {
            trigger,
            url: format!("{url}{sep}node={node}"),
        })
    }
}

impl Backend for My {
    fn name(&self) -> String {
        format!("mysql/{}", self.trigger)
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(
            async move { Ok(Arc::new(MysqlStore::open_url(&self.url).await?) as Arc<dyn Store>) },
        )
    }
}
