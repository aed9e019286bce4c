//! The child process of the SIGKILL crash test (`tests/crash_sigkill.rs`), hidden from `--help`.
//!
//! It opens an SQLite store, records the effect of every firing in an `effects` table of the
//! same database (one row per key under a primary key; a repeated delivery only bumps a counter),
//! schedules `count` timers due within `spread_ms`, and prints `ACK <key> <due_at>` after each
//! schedule call returns, so the parent knows which timers were acknowledged before it kills us.
//! With `--until-idle` it exits once no timer is left.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use overdue::{Clock, Engine, EngineConfig, Firing, Outcome, QueueConfig, TimerSpec, TriggerKind};
use overdue_sql::{Durability, SqlResultExt, SqliteOptions, SqliteStore};
use rand::Rng;

/// Options of the hidden `crash-worker` subcommand.
#[derive(Debug, Args)]
pub struct CrashArgs {
    /// Database file.
    #[arg(long)]
    db: PathBuf,
    /// Key prefix for this run's timers.
    #[arg(long, default_value = "k")]
    prefix: String,
    /// Timers to schedule.
    #[arg(long, default_value_t = 200)]
    count: u64,
    /// Due times are spread over this many milliseconds from now.
    #[arg(long, default_value_t = 1_500)]
    spread_ms: i64,
    /// Trigger to use.
    #[arg(long, default_value = "wheel")]
    trigger: TriggerKind,
    /// Exit once no timer is pending.
    #[arg(long)]
    until_idle: bool,
}

pub async fn run(args: CrashArgs) -> anyhow::Result<ExitCode> {
    let store = SqliteStore::open(&args.db, SqliteOptions::with_durability(Durability::Full)).await?;
    store
        .write(|ctx| {
            ctx.connection()
                .execute_batch(
                    "CREATE TABLE IF NOT EXISTS effects (
                        key TEXT PRIMARY KEY,
                        due_at INTEGER NOT NULL,
                        fired_at INTEGER NOT NULL,
                        deliveries INTEGER NOT NULL)",
                )
                .store_err("creating the effects table")
        })
        .await?;
    let effects = store.clone();
    let handler = move |f: Firing| {
        let store = effects.clone();
        async move {
            let fired_at = overdue::SystemClock.now_ms();
            let res = store
                .write(move |ctx| {
                    ctx.connection()
                        .execute(
                            "INSERT INTO effects (key, due_at, fired_at, deliveries) VALUES (?1, ?2, ?3, 1)
                             ON CONFLICT(key) DO UPDATE SET deliveries = deliveries + 1",
                            rusqlite::params![f.key, f.due_at, fired_at],
                        )
                        .store_err("recording an effect")
                })
                .await;
            match res {
                Ok(_) => Outcome::Done,
                Err(e) => Outcome::fail(e),
            }
        }
    };
    let engine = Engine::builder(Arc::new(store))
        .config(EngineConfig { trigger: args.trigger, ..EngineConfig::default() })
        .handler("crash", QueueConfig::default(), handler)
        .start()
        .await?;
    let mut out = std::io::stdout().lock();
    let mut rng = rand::rng();
    let mut i = 0;
    while i < args.count {
        let n = rng.random_range(1..=10).min(args.count - i);
        let now = overdue::SystemClock.now_ms();
        let specs: Vec<TimerSpec> = (i..i + n)
            .map(|j| TimerSpec::new("crash", format!("{}-{j}", args.prefix), now + rng.random_range(0..=args.spread_ms)))
            .collect();
        let acks: Vec<(String, i64)> = specs.iter().map(|s| (s.key.clone(), s.due_at)).collect();
        engine.schedule_batch(specs).await?;
        for (key, due) in acks {
            writeln!(out, "ACK {key} {due}")?;
        }
        out.flush()?;
        i += n;
    }
    writeln!(out, "SCHEDULED")?;
    out.flush()?;
    loop {
        let left: u64 = engine.counts().await?.iter().map(|c| c.pending + c.in_flight).sum();
        if args.until_idle && left == 0 {
            engine.shutdown(Duration::from_secs(5)).await;
            writeln!(out, "IDLE")?;
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
