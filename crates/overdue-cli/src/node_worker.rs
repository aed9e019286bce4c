//! The child process of the many-nodes tests (`tests/multi_node.rs`), hidden from
//! `--help`.
//!
//! It runs one engine node on a shared store and records the effect of every firing of queue
//! `effect` in an `effects` table of the same database: one row per key under a primary key,
//! written by the node that fired it first; a repeated delivery only bumps `deliveries`. On a
//! `redis://` store (which has no tables) the same record goes into two hashes beside the
//! store's keys, written by one script so the pair is atomic: `P:effects:first` (field = key,
//! value = `<due_at>,<fired_at>,<node>`, set with `HSETNX`, so first writer wins: the hash field
//! is the unique constraint) and `P:effects:deliveries` (field = key, `HINCRBY` per delivery). It
//! prints `READY <node>` once the engine runs, and stops gracefully (releasing its partitions)
//! on SIGTERM or when its standard input closes; the tests kill it with SIGKILL to simulate a crash.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use overdue::{Clock, Engine, EngineConfig, Firing, Outcome, QueueConfig, Store};

use crate::trigger::TriggerChoice;

/// Options of the hidden `node-worker` subcommand.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Store URL (`postgres://…`, `mysql://…` or `redis://…`); its `node=` parameter names
    /// this node.
    #[arg(long)]
    backend: String,
    /// Trigger to use: wheel, heap, scan, or an external one (amqp, kafka) at --trigger-url,
    /// which turns the store's outbox on.
    #[arg(long, default_value = "wheel")]
    trigger: TriggerChoice,
    /// Where an external trigger connects (default: its usual local address).
    #[arg(long)]
    trigger_url: Option<String>,
    /// Claim lease, milliseconds: how long a dead node's claimed timers wait before another
    /// node fires them.
    #[arg(long, default_value_t = 5_000)]
    lease_ms: u64,
    /// Milliseconds a firing holds its claim, three quarters before recording its effect and a
    /// quarter after (work around the effect, before the acknowledgement): a SIGKILL then leaves
    /// claims whose effect has not happened (a survivor must fire them once their lease lapses)
    /// and, most likely, some whose effect has (a survivor re-delivers them and the effect log
    /// must absorb the repeat). Default 0.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
}

/// Where a node records effects: the `effects` table of the store's own database, or two
/// hashes beside a Redis store's keys (see the module docs).
#[derive(Clone)]
enum EffectLog {
    #[cfg(feature = "postgres")]
    Pg(sqlx::PgPool),
    #[cfg(feature = "mysql")]
    My(sqlx::MySqlPool),
    #[cfg(feature = "redis")]
    Redis { con: redis::aio::ConnectionManager, first: String, deliveries: String, script: Arc<redis::Script> },
}

/// The Redis effect record: `HSETNX` on the first-effect hash (first writer wins), `HINCRBY`
/// on the deliveries hash, in one script so the two agree.
#[cfg(feature = "redis")]
const REDIS_RECORD: &str = "redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) \
    return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)";

type EffectError = Box<dyn std::error::Error + Send + Sync>;

impl EffectLog {
    async fn create(&self) -> Result<(), EffectError> {
        match self {
            #[cfg(feature = "postgres")]
            EffectLog::Pg(pool) => sqlx::query(
                "CREATE TABLE IF NOT EXISTS effects (key TEXT COLLATE \"C\" PRIMARY KEY, node TEXT NOT NULL, \
                 due_at BIGINT NOT NULL, fired_at BIGINT NOT NULL, deliveries INTEGER NOT NULL)",
            )
            .execute(pool)
            .await
            .map(drop)?,
            #[cfg(feature = "mysql")]
            EffectLog::My(pool) => sqlx::query(
                "CREATE TABLE IF NOT EXISTS effects (`key` VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin PRIMARY KEY, \
                 node VARCHAR(255) NOT NULL, due_at BIGINT NOT NULL, fired_at BIGINT NOT NULL, deliveries INT NOT NULL) \
                 ENGINE = InnoDB",
            )
            .execute(pool)
            .await
            .map(drop)?,
            #[cfg(feature = "redis")]
            EffectLog::Redis { .. } => {}
        }
        Ok(())
    }

    /// The first delivery of a key writes its row; a repeat only bumps `deliveries`.
    async fn record(&self, key: &str, node: &str, due_at: i64, fired_at: i64) -> Result<(), EffectError> {
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
            .map(drop)?,
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
            .map(drop)?,
            #[cfg(feature = "redis")]
            EffectLog::Redis { con, first, deliveries, script } => {
                let mut con = con.clone();
                let _: i64 = script
                    .key(first)
                    .key(deliveries)
                    .arg(key)
                    .arg(format!("{due_at},{fired_at},{node}"))
                    .invoke_async(&mut con)
                    .await?;
            }
        }
        Ok(())
    }
}

pub async fn run(mut args: NodeArgs) -> anyhow::Result<ExitCode> {
    // `closer` gives the node's partitions back at once on a graceful stop (instead of after
    // their lease); it runs only when awaited.
    type Closer = futures::future::BoxFuture<'static, overdue::Result<()>>;
    args.backend = args.trigger.store_url(&args.backend);
    let trigger_url = args.trigger_url.clone().unwrap_or_else(|| args.trigger.default_url().to_owned());
    let external = args.trigger.external(&trigger_url)?;
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
        #[cfg(feature = "redis")]
        Some("redis") => {
            // No partitions to give back: a graceful stop only settles what is in flight.
            let s = overdue::redis::RedisStore::open_url(&args.backend).await?;
            let p = s.prefix();
            let log = EffectLog::Redis {
                con: s.connection(),
                first: format!("{p}:effects:first"),
                deliveries: format!("{p}:effects:deliveries"),
                script: Arc::new(redis::Script::new(REDIS_RECORD)),
            };
            let node = s.node().to_owned();
            (Arc::new(s), log, node, Box::pin(async { Ok(()) }))
        }
        _ => bail!("node-worker needs a shared store: a postgres://, mysql:// or redis:// URL"),
    };
    log.create().await.map_err(|e| anyhow::anyhow!(e)).context("creating the effects table")?;
    let who = node.clone();
    let hold = Duration::from_millis(args.hold_ms);
    let handler = move |f: Firing| {
        let log = log.clone();
        let node = who.clone();
        async move {
            if !hold.is_zero() {
                tokio::time::sleep(hold * 3 / 4).await;
            }
            let fired_at = overdue::SystemClock.now_ms();
            match log.record(&f.key, &node, f.due_at, fired_at).await {
                Ok(()) => {
                    if !hold.is_zero() {
                        tokio::time::sleep(hold / 4).await;
                    }
                    Outcome::Done
                }
                Err(e) => Outcome::fail(e),
            }
        }
    };
    let config = EngineConfig {
        trigger: args.trigger.kind(),
        lease: Duration::from_millis(args.lease_ms),
        node_id: Some(node.clone()),
        ..EngineConfig::default()
    };
    let queue = QueueConfig {
        concurrency: 64,
        timeout: Duration::from_millis(args.lease_ms / 2),
        ..QueueConfig::default()
    };
    let mut builder = Engine::builder(store.clone());
    if let Some(t) = external {
        builder = builder.external_trigger(t);
    }
    let engine = builder
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
