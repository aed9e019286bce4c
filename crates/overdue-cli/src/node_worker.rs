//! The child process of the many-nodes tests (`tests/multi_node_postgres.rs`), hidden from
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
use overdue::{Clock, Engine, EngineConfig, Firing, Outcome, QueueConfig, TriggerKind};

/// Options of the hidden `node-worker` subcommand.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Store URL (`postgres://…`); its `node=` parameter names this node.
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

pub async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    if !args.backend.starts_with("postgres") {
        bail!("node-worker supports postgres:// backends");
    }
    let store = overdue::postgres::PgStore::open_url(&args.backend).await?;
    let pool = store.pool().clone();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS effects (key TEXT COLLATE \"C\" PRIMARY KEY, node TEXT NOT NULL, \
         due_at BIGINT NOT NULL, fired_at BIGINT NOT NULL, deliveries INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await
    .context("creating the effects table")?;
    let node = store.node().to_owned();
    let who = node.clone();
    let handler = move |f: Firing| {
        let pool = pool.clone();
        let node = who.clone();
        async move {
            let fired_at = overdue::SystemClock.now_ms();
            let res = sqlx::query(
                "INSERT INTO effects (key, node, due_at, fired_at, deliveries) VALUES ($1, $2, $3, $4, 1) \
                 ON CONFLICT (key) DO UPDATE SET deliveries = effects.deliveries + 1",
            )
            .bind(&f.key)
            .bind(&node)
            .bind(f.due_at)
            .bind(fired_at)
            .execute(&pool)
            .await;
            match res {
                Ok(_) => Outcome::Done,
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
    let shared = Arc::new(store.clone());
    let engine = Engine::builder(shared)
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
    store.close().await?;
    Ok(ExitCode::SUCCESS)
}
