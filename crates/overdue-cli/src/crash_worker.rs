//! The child process of the SIGKILL crash test (`tests/crash_sigkill.rs`), hidden from `--help`.
//!
//! It opens an SQLite store, records the effect of every firing in an `effects` table of the
//! same database (one row per key under a primary key; a repeated delivery only bumps a counter),
//! schedules `count` timers due within `spread_ms`, and prints `ACK <key> <due_at>` after each
//! schedule call returns, so the parent knows which timers were acknowledged before it kills us.
//! With `--until-idle` it exits once no timer is left.
//!
//! With an external trigger (`--trigger amqp --trigger-url amqp://…?prefix=P`, see
//! `tests/amqp_sigkill.rs`) the store has its outbox on and the broker does the waiting; the
//! worker then also prints `STATS k=v …` every [`STATS_EVERY`] (and once more before `IDLE`): the
//! engine's and, for amqp, the trigger's counters so far, so the parent sees how much came
//! through the broker, how much the broker delivered again after a kill, and what the backstop
//! fired. The in-process triggers print no `STATS` lines (`tests/crash_sigkill.rs` refuses
//! lines it does not know).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use overdue::{Clock, Engine, EngineConfig, ExternalTrigger, Firing, Outcome, QueueConfig, TimerSpec};
use overdue_sql::{Durability, SqlResultExt, SqliteOptions, SqliteStore};
use rand::Rng;

use crate::trigger::TriggerChoice;

/// How often a worker with an external trigger prints its `STATS` line.
const STATS_EVERY: Duration = Duration::from_millis(100);

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
    /// Trigger to use: wheel, heap, scan, or an external one (amqp, keyspace) at --trigger-url.
    #[arg(long, default_value = "wheel")]
    trigger: TriggerChoice,
    /// Where an external trigger connects (default: its usual local address).
    #[arg(long)]
    trigger_url: Option<String>,
    /// Exit once no timer is pending.
    #[arg(long)]
    until_idle: bool,
}

/// The external trigger, and a way to read its own counters for the `STATS` line.
struct External {
    trigger: Arc<dyn ExternalTrigger>,
    stats: Box<dyn Fn() -> String + Send + Sync>,
}

fn external(choice: TriggerChoice, url: &str) -> anyhow::Result<Option<External>> {
    #[cfg(feature = "rabbitmq")]
    if choice == TriggerChoice::Amqp {
        let t = overdue::rabbitmq::AmqpTrigger::from_url(url)?;
        let seen = t.clone();
        let stats = move || {
            let s = seen.stats();
            format!(
                "received={} broker_redelivered={} nacked={} early={} consumer_connections={}",
                s.received, s.broker_redelivered, s.redelivered, s.early, s.consumer_connections
            )
        };
        return Ok(Some(External { trigger: Arc::new(t), stats: Box::new(stats) }));
    }
    Ok(choice.external(url)?.map(|trigger| External { trigger, stats: Box::new(String::new) }))
}

fn stats_line(engine: &Engine, external: &External) -> String {
    let s = engine.stats();
    format!(
        "STATS published={} fired={} completed={} stale_dropped={} backstop_rescued={} {}",
        s.published,
        s.fired,
        s.completed,
        s.stale_dropped,
        s.backstop_rescued,
        (external.stats)()
    )
}

fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

pub async fn run(args: CrashArgs) -> anyhow::Result<ExitCode> {
    let url = args.trigger_url.clone().unwrap_or_else(|| args.trigger.default_url().to_owned());
    let external = external(args.trigger, &url)?;
    let options = SqliteOptions { outbox: external.is_some(), ..SqliteOptions::with_durability(Durability::Full) };
    let store = SqliteStore::open(&args.db, options).await?;
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
    let mut builder = Engine::builder(Arc::new(store))
        .config(EngineConfig { trigger: args.trigger.kind(), ..EngineConfig::default() })
        .handler("crash", QueueConfig::default(), handler);
    if let Some(ext) = &external {
        builder = builder.external_trigger(ext.trigger.clone());
    }
    let engine = Arc::new(builder.start().await?);
    let external = external.map(Arc::new);
    if let Some(ext) = external.clone() {
        let engine = engine.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(STATS_EVERY).await;
                if print_line(&stats_line(&engine, &ext)).is_err() {
                    return;
                }
            }
        });
    }
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
        {
            let mut out = std::io::stdout().lock();
            for (key, due) in acks {
                writeln!(out, "ACK {key} {due}")?;
            }
            out.flush()?;
        }
        i += n;
    }
    print_line("SCHEDULED")?;
    loop {
        let left: u64 = engine.counts().await?.iter().map(|c| c.pending + c.in_flight).sum();
        if args.until_idle && left == 0 {
            engine.shutdown(Duration::from_secs(5)).await;
            if let Some(ext) = &external {
                print_line(&stats_line(&engine, ext))?;
            }
            print_line("IDLE")?;
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
