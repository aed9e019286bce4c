//! `kill -9` of overdue in the middle of a load whose timers wait in RabbitMQ (`--trigger amqp`,
//! `mode=dlx`), over and over on one database and one broker prefix: every timer whose
//! `schedule` returned takes effect exactly once, never before it is due, and none is lost —
//! also when the broker holds deliveries the killed process never acknowledged.
//!
//! The same shape as `crash_sigkill.rs`, with the broker as the trigger. Each round starts
//! `overdue crash-worker --trigger amqp --trigger-url amqp://…?mode=dlx&prefix=P` (see
//! `src/crash_worker.rs`) on the same SQLite file (outbox on) and the same fresh prefix `P`. The
//! child schedules [`TIMERS_PER_ROUND`] timers due within [`SPREAD_MS`], printing
//! `ACK <key> <due_at>` once each schedule call returned (the timer and its outbox row are
//! committed; the engine's relay publishes the row with publisher confirms and deletes it after
//! the confirm). The notices wait in the TTL cascade and reach the due queue, whose consumer
//! hands them to the engine; the handler records the effect in the `effects` table (one row per
//! key, primary key; a repeat only bumps `deliveries`) and the message is acked only after the
//! timer's settlement committed. After a random [`KILL_AFTER_MS`] the parent sends SIGKILL:
//! outbox rows not yet published, messages delivered and not yet acked (the broker requeues them
//! when the connection drops and marks them `redelivered`), firings recorded but not yet
//! settled — all are left as they are. The child prints `STATS` lines (engine and trigger
//! counters) every 100 ms; the last complete one before the kill is the round's.
//!
//! A last child with `--count 0 --until-idle` on the same prefix fires what is left and exits
//! once nothing is pending. The test then reads the database and checks, for every acknowledged
//! key: **none lost** (exactly one `effects` row), **none early** (`fired_at >= due_at`, for
//! every effect), **the acknowledged due time** fired, **done** (no `timers` row left). It also
//! shows that the broker carried the load (the consumers received notices, and nearly all
//! firings did not need the backstop) and that redeliveries were harmless: messages the broker
//! delivered again after a kill and firings whose handler ran twice are counted, and the
//! exactly-once effect holds regardless.
//!
//! The prefix's exchanges and queues (and any stale notices still in them) are deleted at the
//! end, pass or fail. The broker is `OVERDUE_TEST_AMQP` (default the one on 127.0.0.1); without
//! it the test is skipped, and under `CI` it fails. Seeded like `crash_sigkill.rs`:
//! `OVERDUE_AMQP_CRASH_SEED=<seed> cargo test -p overdue-cli --test amqp_sigkill -- --nocapture`.
#![cfg(all(unix, feature = "rabbitmq"))]

mod common;

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::os::unix::process::ExitStatusExt;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use common::{broker_reachable, drain, fresh_trigger_url, parse_ack, read_effects, read_stderr, server_url, spawn_worker, timers_left};

/// Environment variable that fixes the RNG seed, to replay a failing run.
const SEED_ENV: &str = "OVERDUE_AMQP_CRASH_SEED";
/// Kill-and-restart rounds.
const ROUNDS: usize = 10;
/// Timers each round's child tries to schedule.
const TIMERS_PER_ROUND: u64 = 300;
/// Due times are spread over this many milliseconds after scheduling.
const SPREAD_MS: i64 = 1_500;
/// The child is killed this many milliseconds after it was spawned. A debug child needs a few
/// hundred milliseconds to open the store and declare the cascade (25 queues, 25 exchanges,
/// 350 bindings) and about as long again to schedule its timers, so kills land before, during
/// and after scheduling, and while notices are being delivered.
const KILL_AFTER_MS: RangeInclusive<u64> = 200..=2_000;
/// The queue the crash worker schedules in.
const QUEUE: &str = "crash";
/// How long the final `--until-idle` child may take to fire everything left and exit: its
/// notices come due within [`SPREAD_MS`], and a lost one would wait for the backstop (every 5 s,
/// 2 s overdue).
const IDLE_TIMEOUT: Duration = Duration::from_secs(40);
/// At most this share of the effects may come from the backstop sweep: the broker must carry
/// the load, not the store's safety net.
const MAX_BACKSTOP_SHARE: f64 = 0.1;

/// Deletes the prefix's exchanges and queues when the test ends, pass or fail.
struct PurgeOnDrop {
    url: String,
}

impl PurgeOnDrop {
    /// Deletes them now; returns how many messages were still in the queues.
    fn purge(&self) -> Result<u64, String> {
        let url = self.url.clone();
        // Drop may run while a panic unwinds: a thread with its own runtime.
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            let trigger = overdue::rabbitmq::AmqpTrigger::from_url(&url).map_err(|e| e.to_string())?;
            rt.block_on(trigger.purge()).map_err(|e| e.to_string())
        })
        .join()
        .unwrap_or_else(|_| Err("the purge thread panicked".into()))
    }
}

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.purge() {
            eprintln!("deleting the test's exchanges and queues failed: {e}");
        }
    }
}

/// What one killed round achieved.
#[derive(Debug)]
struct Round {
    kill_after_ms: u64,
    acked: usize,
    scheduled_all: bool,
    /// The last complete `STATS` line's values (empty if the child was killed before its first).
    stats: BTreeMap<String, u64>,
}

/// A line of the worker, parsed.
enum Line {
    Ack(String, i64),
    Scheduled,
    Stats(BTreeMap<String, u64>),
    Idle,
}

fn parse_line(line: &str) -> Line {
    if let Some((key, due)) = parse_ack(line) {
        return Line::Ack(key, due);
    }
    if let Some(rest) = line.strip_prefix("STATS ") {
        let stats = rest
            .split(' ')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("malformed STATS line: {line:?}"));
                (k.to_owned(), v.parse().unwrap_or_else(|e| panic!("bad number in {line:?}: {e}")))
            })
            .collect();
        return Line::Stats(stats);
    }
    match line {
        "SCHEDULED" => Line::Scheduled,
        "IDLE" => Line::Idle,
        other => panic!("unexpected line from the worker: {other:?}"),
    }
}

fn stat(stats: &BTreeMap<String, u64>, name: &str) -> u64 {
    stats.get(name).copied().unwrap_or(0)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn every_acknowledged_timer_takes_effect_exactly_once_across_sigkills_over_rabbitmq() {
    let base = server_url();
    if !broker_reachable(&base) {
        return;
    }
    let started = Instant::now();
    let seed = common::seed(SEED_ENV);
    println!("amqp_sigkill: seed {seed} (replay with {SEED_ENV}={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = TempDir::new().expect("tempdir");
    let db = dir.path().join("overdue.db");
    let trigger_url = fresh_trigger_url(&base);
    let purge = PurgeOnDrop { url: trigger_url.clone() };
    println!("amqp_sigkill: trigger {}", overdue::redact_url(&trigger_url));
    let trigger = ["--trigger", "amqp", "--trigger-url", trigger_url.as_str()];

    // key -> (acknowledged due_at, round)
    let mut acked: BTreeMap<String, (i64, usize)> = BTreeMap::new();
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let kill_after_ms = rng.random_range(KILL_AFTER_MS);
        let stderr = dir.path().join(format!("round-{round}.stderr"));
        let mut worker = spawn_worker(&db, &stderr, &format!("r{round}"), TIMERS_PER_ROUND, SPREAD_MS, &trigger, false);
        // The random moment is the point of the test: it is not waiting for a timer.
        thread::sleep(Duration::from_millis(kill_after_ms));
        worker.child.kill().expect("SIGKILL the worker");
        let status = worker.child.wait().expect("reap the worker");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the worker ended by itself before the kill ({status}); stderr:\n{}",
            read_stderr(&stderr)
        );
        worker.reader.join().expect("stdout reader thread");
        let (mut round_acks, mut scheduled_all, mut stats) = (0, false, BTreeMap::new());
        for line in worker.lines.try_iter() {
            match parse_line(&line) {
                Line::Ack(key, due_at) => {
                    let previous = acked.insert(key.clone(), (due_at, round));
                    assert!(previous.is_none(), "round {round}: key {key} acknowledged twice ({previous:?})");
                    round_acks += 1;
                }
                Line::Scheduled => scheduled_all = true,
                Line::Stats(s) => stats = s,
                Line::Idle => panic!("round {round}: IDLE from a worker without --until-idle"),
            }
        }
        println!(
            "round {round}: killed after {kill_after_ms:4} ms, {round_acks:3} acknowledged{}, \
             received {} (broker redelivered {}), fired {}, backstop {}",
            if scheduled_all { " (all scheduled)" } else { "" },
            stat(&stats, "received"),
            stat(&stats, "broker_redelivered"),
            stat(&stats, "fired"),
            stat(&stats, "backstop_rescued"),
        );
        rounds.push(Round { kill_after_ms, acked: round_acks, scheduled_all, stats });
    }

    // The last child fires everything left and exits once idle.
    let final_stderr = dir.path().join("final.stderr");
    let idle_started = Instant::now();
    let mut worker = spawn_worker(&db, &final_stderr, "final", 0, SPREAD_MS, &trigger, true);
    let final_lines = drain(&mut worker, IDLE_TIMEOUT).unwrap_or_else(|final_lines| {
        panic!(
            "the --until-idle worker did not exit within {IDLE_TIMEOUT:?}; {} timers left in the \
             database; last lines {:?}; stderr:\n{}",
            timers_left(&db),
            &final_lines[final_lines.len().saturating_sub(3)..],
            read_stderr(&final_stderr)
        )
    });
    let status = worker.child.wait().expect("reap the --until-idle worker");
    worker.reader.join().expect("stdout reader thread");
    let idle_took = idle_started.elapsed();
    let mut final_stats = BTreeMap::new();
    let mut idle = false;
    for line in &final_lines {
        match parse_line(line) {
            Line::Stats(s) if !idle => final_stats = s,
            Line::Idle => idle = true,
            Line::Scheduled | Line::Stats(_) => {}
            Line::Ack(..) => panic!("the --until-idle worker (count 0) acknowledged a timer: {line:?}"),
        }
    }
    assert!(
        status.success() && idle,
        "the --until-idle worker failed ({status}), last lines {:?}; stderr:\n{}",
        &final_lines[final_lines.len().saturating_sub(3)..],
        read_stderr(&final_stderr)
    );

    // What the database says.
    let conn = rusqlite::Connection::open(&db).expect("open the database after the last worker");
    let (effects, duplicate_rows) = read_effects(&conn);
    if let Some(key) = duplicate_rows.first() {
        panic!("key {key} has two effect rows");
    }
    let count = |sql: &str| conn.query_row(sql, [QUEUE], |r| r.get::<_, i64>(0)).expect(sql);
    let timers_left = count("SELECT COUNT(*) FROM timers WHERE queue = ?1");
    let dead = count("SELECT COUNT(*) FROM dead_letters WHERE queue = ?1");
    let outbox_left = conn.query_row("SELECT COUNT(*) FROM timer_outbox", [], |r| r.get::<_, i64>(0)).expect("outbox");

    let mut lost = Vec::new();
    let mut wrong_due = Vec::new();
    let mut early = Vec::new();
    for (key, &(due_at, round)) in &acked {
        match effects.get(key) {
            None => lost.push(format!("{key} (round {round}, due {due_at})")),
            Some(e) if e.due_at != due_at => {
                wrong_due.push(format!("{key}: acknowledged due {due_at}, fired as due {}", e.due_at))
            }
            Some(_) => {}
        }
    }
    for (key, e) in &effects {
        if e.fired_at < e.due_at {
            early.push(format!("{key}: due {}, fired {} ({} ms early)", e.due_at, e.fired_at, e.due_at - e.fired_at));
        }
    }
    let unacked_effects = effects.keys().filter(|k| !acked.contains_key(*k)).count();
    let deliveries: i64 = effects.values().map(|e| e.deliveries).sum();
    let twice: Vec<&String> = effects.iter().filter(|(_, e)| e.deliveries > 1).map(|(k, _)| k).collect();
    let mut lateness: Vec<i64> = effects.values().map(|e| e.fired_at - e.due_at).collect();
    lateness.sort_unstable();
    let all_stats = rounds.iter().map(|r| &r.stats).chain([&final_stats]);
    let sum = |name: &str| all_stats.clone().map(|s| stat(s, name)).sum::<u64>();
    let (received, broker_redelivered, backstop) = (sum("received"), sum("broker_redelivered"), sum("backstop_rescued"));
    let (published, fired, stale) = (sum("published"), sum("fired"), sum("stale_dropped"));
    let left_in_broker = purge.purge().unwrap_or_else(|e| panic!("deleting the test's exchanges and queues: {e}"));

    println!("amqp_sigkill summary (seed {seed}):");
    println!(
        "  rounds {ROUNDS}, kill moments {:?} ms, acknowledged per round {:?}, that scheduled all {}",
        rounds.iter().map(|r| r.kill_after_ms).collect::<Vec<_>>(),
        rounds.iter().map(|r| r.acked).collect::<Vec<_>>(),
        rounds.iter().filter(|r| r.scheduled_all).count()
    );
    println!(
        "  acknowledged {}, effects {} (of which unacknowledged {unacked_effects}), deliveries {deliveries}: \
         {} handler runs repeated over {} keys (effect recorded once each)",
        acked.len(),
        effects.len(),
        deliveries - effects.len() as i64,
        twice.len()
    );
    println!(
        "  broker: published {published} (at least; the last STATS before a kill), received {received}, \
         of which redelivered by the broker {broker_redelivered}; stale notices dropped {stale}; \
         fired {fired}, by the backstop {backstop}; left in the broker at the end {left_in_broker}"
    );
    println!(
        "  lateness ms p50 {} p99 {} max {}; timers left {timers_left}, outbox rows left {outbox_left}, \
         dead letters {dead}; final --until-idle run {:.1} s, test {:.1} s",
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        percentile(&lateness, 1.0),
        idle_took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    assert!(lost.is_empty(), "{} acknowledged timers never took effect (lost): {lost:#?}", lost.len());
    assert!(early.is_empty(), "{} effects happened before their due time: {early:#?}", early.len());
    assert!(wrong_due.is_empty(), "effects fired with another due time than acknowledged: {wrong_due:#?}");
    assert_eq!(timers_left, 0, "acknowledged timers are still in the timers table after IDLE");
    assert_eq!(dead, 0, "timers were dead-lettered");
    assert!(!acked.is_empty(), "no round acknowledged any timer: the kills came too early to test anything");
    assert!(received > 0, "no notice came through the broker: {rounds:?} {final_stats:?}");
    assert!(
        (backstop as f64) <= MAX_BACKSTOP_SHARE * effects.len() as f64,
        "{backstop} of {} firings came from the backstop, not the broker",
        effects.len()
    );
}
