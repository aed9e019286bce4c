//! Two overdue nodes on one PostgreSQL schema (outbox on) with a broker as the trigger — Kafka,
//! RocketMQ, then RabbitMQ — one killed with SIGKILL half-way through the load: every timer takes effect
//! exactly once, none before its due time, and both nodes did part of the work.
//!
//! The parent schedules [`TIMERS`] timers through a `PgStore` with its outbox on (so every
//! schedule also writes its notice), then starts two `overdue node-worker --trigger kafka|amqp`
//! children (see `src/node_worker.rs`) on the same schema and a fresh broker prefix. Each node
//! relays the shared outbox (a row published twice is harmless) and consumes: on Kafka the level
//! topics in one consumer group, so the two share the partitions; on RocketMQ the due topic's
//! queues in one consumer group; on RabbitMQ the one due queue,
//! as competing consumers. Each records a firing's effect in `effects` under `PRIMARY KEY
//! (key)`, first writer wins, a repeat only bumps `deliveries`. Once half the effects are in,
//! node 0 gets SIGKILL: on Kafka its partitions go to the survivor after the group's session
//! timeout (from their last committed offsets, so the notices it had read but not finished come
//! again); on RocketMQ its queues go to the survivor at the group's next rebalance; on RabbitMQ
//! the broker requeues its unacknowledged deliveries to the survivor when the
//! connection drops; and what it had claimed in the store comes back once the claim lease ran out
//! (the backstop fires it). The printed line says how late the timers around the kill were.
//!
//! Needs PostgreSQL (`OVERDUE_TEST_POSTGRES`, default 127.0.0.1:5432, database `test`), the
//! Kafka broker (`OVERDUE_TEST_KAFKA`, default 127.0.0.1:9092, `scripts/brokers.sh start
//! kafka`), the RocketMQ name server (`OVERDUE_TEST_ROCKETMQ`, default 127.0.0.1:9876) and
//! RabbitMQ (`OVERDUE_TEST_AMQP`); under `CI` an unreachable one fails the test. The three run
//! one after the other (one test), so six nodes never share the two cores.
#![cfg(all(unix, feature = "postgres", feature = "kafka", feature = "rabbitmq", feature = "rocketmq"))]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{broker_reachable, fresh_kafka_url, fresh_trigger_url, kafka_reachable, server_url};
use overdue::postgres::PgStore;
use overdue::{Store, TimerSpec};

/// Timers scheduled.
const TIMERS: i64 = 4_000;
/// They come due over this many milliseconds …
const SPREAD_MS: i64 = 10_000;
/// … starting this long after scheduling (the nodes start and join the group meanwhile).
const LEAD_MS: i64 = 10_000;
/// Worst lateness allowed: the group's session timeout (6 s) and a rebalance for the dead
/// node's partitions, or its claim lease (5 s) plus a backstop sweep (5 s) for what it had
/// claimed, with slack for a loaded 2-core machine.
const BOUND_MS: i64 = 25_000;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

struct Node {
    child: Child,
    name: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(url: &str, trigger: &str, trigger_url: &str, name: &str) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_overdue"))
        .args(["node-worker", "--backend", &format!("{url}&node={name}")])
        .args(["--trigger", trigger, "--trigger-url", trigger_url])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning overdue node-worker");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("reading READY");
    assert!(line.starts_with("READY"), "node {name} did not start: {line:?}");
    Node { child, name: name.to_owned() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_over_kafka_rocketmq_and_rabbitmq_survive_a_sigkill_with_every_timer_once() {
    if kafka_reachable() {
        two_nodes("kafka", &format!("{}&session_timeout_ms=6000", fresh_kafka_url())).await;
    }
    if common::rocketmq_reachable() {
        let ms = now_ms();
        two_nodes("rocketmq", &format!("rocketmq://{}?prefix=ot-{ms}-{:08x}", common::rocketmq_address(), rand::random::<u32>())).await;
    }
    let amqp = server_url();
    if broker_reachable(&amqp) {
        let url = fresh_trigger_url(&amqp);
        two_nodes("amqp", &url).await;
        // Delete the prefix's exchanges and queues (the nodes are gone).
        let trigger = overdue::rabbitmq::AmqpTrigger::from_url(&url).expect("amqp url");
        if let Err(e) = trigger.purge().await {
            eprintln!("deleting the test's exchanges and queues failed: {e}");
        }
    }
}

async fn two_nodes(trigger: &str, trigger_url: &str) {
    let base = std::env::var("OVERDUE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let admin = match sqlx::PgPool::connect(&base).await {
        Ok(p) => p,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "CI is set but PostgreSQL at {base} cannot be reached: {e}");
            return eprintln!("skipped: no PostgreSQL at {base} ({e})");
        }
    };
    let schema = format!("ot_{}_{:08x}", now_ms(), rand::random::<u32>());
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema={schema}&outbox=true");

    let t0 = now_ms() + LEAD_MS;
    {
        let store = PgStore::open_url(&format!("{url}&node=scheduler")).await.expect("open");
        let specs: Vec<TimerSpec> =
            (0..TIMERS).map(|i| TimerSpec::new("effect", format!("k{i:05}"), t0 + i * SPREAD_MS / TIMERS)).collect();
        for chunk in specs.chunks(1_000) {
            store.schedule(chunk.to_vec(), now_ms()).await.expect("schedule");
        }
        store.close().await.expect("close");
    }
    let mut nodes: Vec<Node> = (0..2).map(|i| start_node(&url, trigger, trigger_url, &format!("n{i}"))).collect();
    let opts = base.parse::<sqlx::postgres::PgConnectOptions>().expect("url").options([("search_path", schema.as_str())]);
    let db = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(opts).await.expect("connect");
    let count = |table: &'static str| {
        let db = db.clone();
        async move { sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(&db).await.unwrap_or(-1) }
    };

    let deadline = Instant::now() + Duration::from_millis((LEAD_MS + SPREAD_MS + 90_000) as u64);
    while count("effects").await < TIMERS / 2 {
        assert!(Instant::now() < deadline, "{trigger}: half the timers did not fire in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed_at = now_ms();
    nodes[0].child.kill().expect("SIGKILL node 0");
    let _ = nodes[0].child.wait();
    // Every effect in, and every timer finished. A timer whose effect node 0 wrote just before
    // the kill, but which it never acknowledged, stays in the store claimed by the dead node
    // until the claim lease runs out; then the survivor fires it again (the effect row only
    // counts the repeat) and removes it. So the effects reach TIMERS before the store is empty.
    loop {
        let (done, left) = (count("effects").await, count("timers").await);
        if done >= TIMERS && left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{trigger}: {done} of {TIMERS} timers took effect, {left} still in the store"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(nodes[1].child.stdin.take());
    let status = nodes[1].child.wait().expect("wait");
    assert!(status.success(), "{trigger}: node {} exited with {status}", nodes[1].name);

    let effects: Vec<(String, String, i64, i64, i32)> =
        sqlx::query_as("SELECT key, node, due_at, fired_at, deliveries FROM effects").fetch_all(&db).await.expect("effects");
    assert_eq!(effects.len() as i64, TIMERS, "{trigger}: every timer takes effect exactly once (one row per key)");
    let early: Vec<_> = effects.iter().filter(|e| e.3 < e.2).collect();
    assert!(early.is_empty(), "{trigger}: fired before their due time: {:?}", &early[..early.len().min(5)]);
    let mut split: BTreeMap<&str, i64> = BTreeMap::new();
    for e in &effects {
        *split.entry(e.1.as_str()).or_default() += 1;
    }
    assert_eq!(split.len(), 2, "{trigger}: both nodes fired some timers: {split:?}");
    let mut lateness: Vec<i64> = effects.iter().map(|e| e.3 - e.2).collect();
    lateness.sort_unstable();
    let pct = |q: f64| lateness[((lateness.len() - 1) as f64 * q) as usize];
    let worst_after = effects.iter().filter(|e| e.3 >= killed_at).map(|e| e.3 - e.2.max(killed_at)).max().unwrap_or(0);
    let repeated = effects.iter().filter(|e| e.4 > 1).count();
    eprintln!(
        "{trigger} multi-node: split {split:?}; killed n0 at {} ms into the window; worst {worst_after} ms after max(due, kill); \
         lateness p50/p99/max {}/{}/{} ms; {repeated} keys delivered more than once",
        killed_at - t0,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    assert!(pct(1.0) <= BOUND_MS, "{trigger}: a timer fired {} ms late (bound {BOUND_MS} ms)", pct(1.0));
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await;
}
