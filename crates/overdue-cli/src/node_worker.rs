//! The child process of the many-nodes tests (`tests/multi_node.rs`), hidden from
//! `--help`.
//!
//! It runs one engine node on a shared store and records the effect of every firing of queue
//! `effect` in an `effects` table of the same database: one row per key under a primary key,
//! written by the node that fired it first; a repeated delivery only bumps `deliveries`. It
//! prints `READY <node>` once the engine runs, and stops gracefully (releasing its partitions)
//! on SIGTERM or when its standard input closes; the tests kill it with SIGKILL to simulate a crash.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use overdue::{Clock, Engine, EngineConfig, Firing, Outcome, QueueConfig, Store, TriggerKind};

/// Options of the hidden `node-worker` subcommand.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Store URL (`postgres://…` or `mysql://…`); its `node=` parameter names this node.
    #[arg(long)]
    backend: String,
    /// Trigger to use.
    #[arg(long, default_value = "wheel")]
    trigger: TriggerKind,
    /// Claim lease, milliseconds: how long a dead node's claimed timers wait before another
    /// node fires them.
    #[arg(long, default_value_t = 5_000)]
    lease_ms: u64,
}

/// Where a node records effects: the `effects` table of the store's own database.
#[derive(Clone, Debug)]
enum EffectLog {
    #[cfg(feature = "postgres")]
    Pg(sqlx::PgPool),
    #[cfg(feature = "mysql")]
    My(sqlx::MySqlPool),
}

impl EffectLog {
    async fn create(&self) -> Result<(), sqlx::Error> {
        match self {
            #[cfg(feature = "postgres")]
            EffectLog::Pg(pool) => sqlx::query(
                "CREATE TABLE IF NOT EXISTS effects (key TEXT COLLATE \"C\" PRIMARY KEY, node TEXT NOT NULL, \
                 due_at BIGINT NOT NULL, fired_at BIGINT NOT NULL, deliveries INTEGER NOT NULL)",
            )
            .execute(pool)
            .await
            .map(drop),
            #[cfg(feature = "mysql")]
            EffectLog::My(pool) => sqlx::query(
                "CREATE TABLE IF NOT EXISTS effects (`key` VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin PRIMARY KEY, \
                 node VARCHAR(255) NOT NULL, due_at BIGINT NOT NULL, fired_at BIGINT NOT NULL, deliveries INT NOT NULL) \
                 ENGINE = InnoDB",
            )
            .execute(pool)
            .await
            .map(drop),
        }
    }

    /// The first delivery of a key writes its row; a repeat only bumps `deliveries`.
    async fn record(&self, key: &str, node: &str, due_at: i64, fired_at: i64) -> Result<(), sqlx::Error> {
        match self {
            #[cfg(feature = "postgres")]
            EffectLog::Pg(pool) => sqlx::query(
                "INSERT INTO effects (key, node, due_at, fired_at, deliveries) VALUES ($1, $2, $3, $4, 1) \
                 ON CONFLICT (key) DO UPDATE SET deliveries = effects.deliveries + 1",
            )
            .bind(key)
            .bind(node)
            .bind(due_at)
            .bind(fired_at)
            .execute(pool)
            .await
            .map(drop),
            #[cfg(feature = "mysql")]
            EffectLog::My(pool) => sqlx::query(
                "INSERT INTO effects (`key`, node, due_at, fired_at, deliveries) VALUES (?, ?, ?, ?, 1) \
                 ON DUPLICATE KEY UPDATE deliveries = deliveries + 1",
            )
            .bind(key)
            .bind(node)
            .bind(due_at)
            .bind(fired_at)
            .execute(pool)
            .await
            .map(drop),
        }
    }
}

pub async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    // `closer` gives the node's partitions back at once on a graceful stop (instead of after
    // their lease); it runs only when awaited.
    type Closer = futures::future::BoxFuture<'static, overdue::Result<()>>;
    let (store, log, node, closer): (Arc<dyn Store>, EffectLog, String, Closer) = match args.backend.split_once("://").map(|(s, _)| s) {
        #[cfg(feature = "postgres")]
        Some("postgres" | "postgresql") => {
            let s = overdue::postgres::PgStore::open_url(&args.backend).await?;
            let (log, node) = (EffectLog::Pg(s.pool().clone()), s.node().to_owned());
            let c = s.clone();
            (Arc::new(s), log, node, Box::pin(async move { c.close().await }))
        }
        #[cfg(feature = "mysql")]
        Some("mysql") => {
            let s = overdue::mysql::MysqlStore::open_url(&args.backend).await?;
            let (log, node) = (EffectLog::My(s.pool().clone()), s.node().to_owned());
            let c = s.clone();
            (Arc::new(s), log, node, Box::pin(async move { c.close().await }))
        }
        _ => bail!("node-worker needs a shared store: a postgres:// or mysql:// URL"),
    };
    log.create().await.context("creating the effects table")?;
    let who = node.clone();
    let handler = move |f: Firing| {
        let log = log.clone();
        let node = who.clone();
        async move {
            let fired_at = overdue::SystemClock.now_ms();
            match log.record(&f.key, &node, f.due_at, fired_at).await {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::fail(e),
            }
        }
    };
    let config = EngineConfig {
        trigger: args.trigger,
        lease: Duration::from_millis(args.lease_ms),
        node_id: Some(node.clone()),
        ..EngineConfig::default()
    };
    let queue = QueueConfig {
        concurrency: 64,
        timeout: Duration::from_millis(args.lease_ms / 2),
        ..QueueConfig::default()
    };
    let engine = Engine::builder(store.clone())
        .config(config)
        .default_queue_config(queue.clone())
        .handler("effect", queue, handler)
        .start()
        .await?;
    println!("READY {node}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    tokio::select! {
        _ = term.recv() => {}
        _ = stdin_closed => {}
    }
    engine.shutdown(Duration::from_secs(5)).await;
    closer.await?;
    Ok(ExitCode::SUCCESS)
}
