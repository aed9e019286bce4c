//! Fresh, private places on the test servers on 127.0.0.1 (a PostgreSQL schema, a MySQL
//! database), for the tests of every crate that talks to them (features `postgres`, `mysql`).
//! Under `CI` an unreachable server panics (the test fails); otherwise the helpers return `None`
//! and the test is skipped with a note on stderr. Each also drops what runs more than an hour old
//! left behind.

/// Where a test keeps its data: the embedded SQLite file, or a fresh place on a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
    Mysql,
    /// Orders in SQLite, timers in Redis (the order service's relayed mode).
    Redis,
}

/// For each test function `name(db: Db)` listed, one `#[tokio::test]` per [`Db`], in modules
/// `sqlite`, `postgres`, `mysql` and `redis` of the calling file. The function decides what an
/// unreachable server means (the helpers here skip, or fail under `CI`).
#[macro_export]
macro_rules! every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::every_backend!(@on sqlite, Sqlite; $($name),*);
        $crate::every_backend!(@on postgres, Postgres; $($name),*);
        $crate::every_backend!(@on mysql, Mysql; $($name),*);
        $crate::every_backend!(@on redis, Redis; $($name),*);
    };
    (@on $module:ident, $db:ident; $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::servers::Db::$db).await;
                }
            )*
        }
    };
}

/// The test Redis: `OVERDUE_TEST_REDIS`, or the one on 127.0.0.1.
pub mod redis {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn server_url() -> String {
        std::env::var("OVERDUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// The URL of the test Redis with a fresh key prefix `ot:<ms>:<random>`, or `None` (test
    /// skipped) when nothing listens there outside CI. Under `CI` an unreachable server panics.
    pub async fn fresh_url() -> Option<String> {
        let base = server_url();
        let addr = base.trim_start_matches("redis://").split(['/', '?']).next().unwrap_or("127.0.0.1:6379").to_owned();
        let addr = addr.rsplit('@').next().unwrap_or(&addr).to_owned();
        let reachable = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(&addr)).await;
        if !matches!(reachable, Ok(Ok(_))) {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the Redis server at {base} cannot be reached");
            }
            eprintln!("skipped: no Redis at {base}; set CI to make this a failure");
            return None;
        }
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let sep = if base.contains('?') { '&' } else { '?' };
        Some(format!("{base}{sep}prefix=ot:{ms}:{:08x}", rand_u32()))
    }

    fn rand_u32() -> u32 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        h.finish() as u32
    }
}

#[cfg(feature = "postgres")]
pub mod postgres {
    use std::time::{SystemTime, UNIX_EPOCH};

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
}

#[cfg(feature = "mysql")]
pub mod mysql {
    use std::time::{SystemTime, UNIX_EPOCH};

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
    pub fn with_database(url: &str, database: &str) -> String {
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
}
