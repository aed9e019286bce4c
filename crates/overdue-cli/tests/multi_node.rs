//! Three overdue nodes on one database (PostgreSQL, then MariaDB; then, in a test of its own,
//! one Redis) split 50,000 timers; one is killed with SIGKILL half-way. Every timer takes effect
//! exactly once, the dead node's timers are fired by the survivors within the claim lease plus
//! 5 s, and the load was split between the nodes.
//!
//! The parent schedules every timer (through a `PgStore` that it closes again, so it holds no
//! partitions), then starts three `overdue node-worker` children (see `src/node_worker.rs`) on
//! the same schema. Each records the effect of a firing in `effects` under `PRIMARY KEY (key)`,
//! first writer wins, repeats only bump `deliveries`. Once half the effects are in, node 0 gets
//! SIGKILL: its partition leases lapse, the survivors take its partitions (and reload their
//! wheels), and the timers it had claimed but not settled are fired by a survivor's backstop once
//! their claim lease has expired.
//!
//! On Redis (`redis://`, a fresh prefix `ot:<ms>:<random>`) there are no partitions: every node
//! loads every timer due soon into its wheel and the claim script picks the one that runs it; the
//! effects go into two hashes beside the store's keys, `HSETNX` on the key as the unique
//! constraint (see `src/node_worker.rs`). The killed node's claimed timers come back when their
//! claim lease lapses and a survivor's backstop sweep (every 5 s) takes them, so the bound there
//! is lease + backstop interval + the same 2.5 s of slack. The Redis nodes hold each claim 20 ms
//! around the effect (`--hold-ms`), so the kill always strands claims; the test lists them
//! (`Store::list`, in flight, owner = the dead node) right after the kill and checks each: taken
//! over only after its lease ran out and within a backstop sweep of it, or, if its effect had
//! already happened, re-delivered without a second effect.
//!
//! Needs the PostgreSQL server at `OVERDUE_TEST_POSTGRES` (default 127.0.0.1:5432, database
//! `test`), the MariaDB server at `OVERDUE_TEST_MYSQL` (default root@127.0.0.1:3306) and Redis at
//! `OVERDUE_TEST_REDIS` (default redis://127.0.0.1:6379); under `CI` an unreachable server fails
//! the test. The two tests take a file lock so they never run at once (six nodes on two cores
//! would measure the machine), under `cargo test` threads and `cargo nextest` processes alike.
//! The split and the lateness are printed: `cargo test -p overdue-cli --test multi_node -- --nocapture`.
#![cfg(all(unix, feature = "postgres", feature = "mysql"))]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use overdue::postgres::PgStore;
use overdue::{Store, TimerSpec};
use sqlx::Row;

/// Timers in the test.
const TIMERS: i64 = 50_000;
/// Nodes started.
const NODES: usize = 3;
/// Due times are spread evenly over this window…
const SPREAD_MS: i64 = 20_000;
/// …which opens this long after scheduling starts (time to schedule and start the nodes).
const LEAD_MS: i64 = 10_000;
/// Claim lease of each node (`EngineConfig::lease`).
const LEASE_MS: i64 = 5_000;
/// Partition lease of each node.
const PARTITION_LEASE_MS: i64 = 2_000;
/// The bound the issue sets on the dead node's timers: lease expiry + 5 s, plus 2.5 s for the
/// claim's own lateness, the settle, and the scheduling noise of two cores shared by three
/// nodes, the database and whatever else CI runs beside this test.
const TAKEOVER_BOUND_MS: i64 = LEASE_MS + 5_000 + 2_500;
/// The engine's backstop period (`EngineConfig::backstop_interval`, default, as the node-worker
/// runs it): how often a survivor looks for claims whose lease has lapsed.
const BACKSTOP_INTERVAL_MS: i64 = 5_000;
/// The bound on Redis, which has no partitions to take over: a dead node's claims are free again
/// at lease expiry and taken at the next backstop sweep, plus the same 2.5 s of slack.
#[cfg(feature = "redis")]
const REDIS_TAKEOVER_BOUND_MS: i64 = LEASE_MS + BACKSTOP_INTERVAL_MS + 2_500;
/// How long a Redis node holds each claim (`--hold-ms`), three quarters before recording its
/// effect and a quarter after: 10-25 claims per node are open at any moment, so the kill strands
/// some, most of them before their effect (the survivors must fire those after the lease: the
/// takeover the bound measures; the test requires at least one) and usually a few after it
/// (re-delivered without repeating the effect).
#[cfg(feature = "redis")]
const REDIS_HOLD_MS: u64 = 20;

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

/// Starts a node on `url` (which already has a `?`), adding `node=NAME`; `hold_ms` is the
/// node-worker's `--hold-ms`.
fn start_node(url: &str, name: &str, hold_ms: u64) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_overdue"))
        .args(["node-worker", "--backend", &format!("{url}&node={name}")])
        .args(["--lease-ms", &LEASE_MS.to_string(), "--hold-ms", &hold_ms.to_string()])
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

/// The database under test, for the parent's own queries.
enum Db {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
    /// The effect hashes of `prefix` and the store itself (for what is left in it).
    #[cfg(feature = "redis")]
    Redis { con: redis::aio::MultiplexedConnection, prefix: String, store: overdue::redis::RedisStore },
}

/// One effect row: `(key, node, due_at, fired_at, deliveries)`.
type Effect = (String, String, i64, i64, i32);

impl Db {
    async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self {
            Db::Pg(p) => sqlx::query_scalar(&sql).fetch_one(p).await.unwrap_or(-1),
            Db::My(p) => sqlx::query_scalar(&sql).fetch_one(p).await.unwrap_or(-1),
            // `effects`: the first-effect hash; `timers`: everything the store still holds.
            #[cfg(feature = "redis")]
            Db::Redis { con, prefix, store } => match table {
                "effects" => {
                    let mut con = con.clone();
                    redis::cmd("HLEN").arg(format!("{prefix}:effects:first")).query_async(&mut con).await.unwrap_or(-1)
                }
                _ => match store.counts(now_ms()).await {
                    Ok(c) => c.iter().map(|q| (q.pending + q.in_flight + q.dead) as i64).sum(),
                    Err(_) => -1,
                },
            },
        }
    }

    async fn effects(&self) -> Vec<Effect> {
        let rows: Result<Vec<Effect>, sqlx::Error> = match self {
            Db::Pg(p) => {
                sqlx::query_as("SELECT key, node, due_at, fired_at, deliveries FROM effects").fetch_all(p).await
            }
            Db::My(p) => sqlx::query("SELECT `key`, node, due_at, fired_at, deliveries FROM effects")
                .fetch_all(p)
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| {
                            let text = |i: usize| String::from_utf8_lossy(&r.get::<Vec<u8>, _>(i)).into_owned();
                            (text(0), text(1), r.get(2), r.get(3), r.get(4))
                        })
                        .collect()
                }),
            #[cfg(feature = "redis")]
            Db::Redis { con, prefix, .. } => return redis_effects(con.clone(), prefix).await,
        };
        rows.expect("reading effects")
    }

    /// The timers `node` holds claimed, as `(key, lease_until)` (Redis only: the SQL cases do
    /// not look).
    async fn claims_of(&self, node: &str) -> Option<Vec<(String, i64)>> {
        match self {
            #[cfg(feature = "redis")]
            Db::Redis { store, .. } => {
                // Claimed timers are due by now; page through everything due by now.
                let now = now_ms();
                let mut q = overdue::ListQuery { due_to: Some(now), limit: 10_000, ..Default::default() };
                let mut claims = Vec::new();
                loop {
                    let page = store.list(&q, now).await.expect("listing claimed timers");
                    claims.extend(page.iter().filter_map(|t| match &t.state {
                        overdue::TimerState::InFlight { owner, lease_until } if owner == node => {
                            Some((t.key.clone(), *lease_until))
                        }
                        _ => None,
                    }));
                    match page.last() {
                        Some(t) if page.len() == 10_000 => q.after = Some((t.due_at, t.queue.clone(), t.key.clone())),
                        _ => return Some(claims),
                    }
                }
            }
            _ => {
                let _ = node;
                None
            }
        }
    }
}

/// The effect hashes of a Redis run as effect rows (see `src/node_worker.rs` for the layout).
#[cfg(feature = "redis")]
async fn redis_effects(mut con: redis::aio::MultiplexedConnection, prefix: &str) -> Vec<Effect> {
    let first: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(format!("{prefix}:effects:first")).query_async(&mut con).await.expect("reading effects");
    let deliveries: std::collections::HashMap<String, i32> =
        redis::cmd("HGETALL").arg(format!("{prefix}:effects:deliveries")).query_async(&mut con).await.expect("reading deliveries");
    first
        .into_iter()
        .map(|(key, v)| {
            let mut f = v.splitn(3, ',');
            let mut num = || f.next().and_then(|n| n.parse::<i64>().ok()).unwrap_or_else(|| panic!("effect {key}: {v:?}"));
            let (due, fired) = (num(), num());
            let node = v.splitn(3, ',').nth(2).unwrap_or_default().to_owned();
            let n = deliveries.get(&key).copied().unwrap_or(0);
            (key, node, due, fired, n)
        })
        .collect()
}

/// An exclusive lock on a file in the temporary directory, held (until the file is dropped)
/// while the nodes of one test run, so the tests of this file never run at once (threads or
/// processes).
fn run_lock() -> std::fs::File {
    let path = std::env::temp_dir().join("overdue-multi-node-test.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).expect("lock file");
    // Blocks until the other test is done; the kernel drops the lock if this process dies.
    file.lock().unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    file
}

/// Fails under `CI`, skips otherwise, when the server cannot be reached.
fn unreachable(what: &str, url: &str, e: sqlx::Error) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but the {what} server at {url} cannot be reached: {e}");
    }
    eprintln!("skipped: no {what} at {url} ({e}); set CI to make this a failure");
}

fn fresh_name() -> String {
    format!("ot_{}_{:08x}", now_ms(), rand::random::<u32>())
}

/// One test for both databases, one after the other: six nodes at once on two cores would
/// measure the machine, not the takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_split_the_work_and_survive_a_sigkill() {
    let _lock = run_lock();
    postgres().await;
    mysql().await;
}

/// The same on one Redis, in a test of its own (each test stays near half a minute).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_redis_split_the_work_and_survive_a_sigkill() {
    let _lock = run_lock();
    let base = std::env::var("OVERDUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let reach = async {
        let client = redis::Client::open(base.as_str())?;
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut con).await?;
        Ok::<_, redis::RedisError>(con)
    };
    let con = match tokio::time::timeout(Duration::from_secs(5), reach).await {
        Ok(Ok(con)) => con,
        other => {
            let e = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the Redis server at {base} cannot be reached: {e}");
            }
            return eprintln!("skipped: no Redis at {base} ({e}); set CI to make this a failure");
        }
    };
    // The prefix form of the overdue-redis tests, whose runs delete such keys after an hour if
    // this run dies before its own cleanup.
    let prefix = format!("ot:{}:{:08x}", now_ms(), rand::random::<u32>());
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}prefix={prefix}");
    let store = overdue::redis::RedisStore::open_url(&format!("{url}&node=scheduler")).await.expect("open");
    schedule_all(&store).await;
    let db = Db::Redis { con: con.clone(), prefix: prefix.clone(), store };
    run_nodes("redis", &url, &db, REDIS_TAKEOVER_BOUND_MS, REDIS_HOLD_MS).await;
    delete_redis_prefix(con, &prefix).await;
}

/// Deletes every key of `prefix` (the store's and the effect hashes).
#[cfg(feature = "redis")]
async fn delete_redis_prefix(mut con: redis::aio::MultiplexedConnection, prefix: &str) {
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(&mut con).await;
            let Ok((next, keys)) = r else { break };
            if !keys.is_empty() {
                let _: redis::RedisResult<i64> = redis::cmd("UNLINK").arg(&keys).query_async(&mut con).await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

async fn postgres() {
    let base = std::env::var("OVERDUE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let admin = match sqlx::PgPool::connect(&base).await {
        Ok(p) => p,
        Err(e) => return unreachable("PostgreSQL", &base, e),
    };
    let schema = fresh_name();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema={schema}");
    {
        let store = PgStore::open_url(&format!("{url}&node=scheduler")).await.expect("open");
        schedule_all(&store).await;
        store.close().await.expect("close");
    }
    let opts = base.parse::<sqlx::postgres::PgConnectOptions>().expect("url").options([("search_path", schema.as_str())]);
    let db = Db::Pg(sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(opts).await.expect("connect"));
    run_nodes("postgres", &format!("{url}&partition_lease_ms={PARTITION_LEASE_MS}"), &db, TAKEOVER_BOUND_MS, 0).await;
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await;
}

async fn mysql() {
    let base = std::env::var("OVERDUE_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    let admin = match sqlx::MySqlPool::connect(&base).await {
        Ok(p) => p,
        Err(e) => return unreachable("MySQL/MariaDB", &base, e),
    };
    let name = fresh_name();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
    let server = base.rsplit_once('/').map(|(s, _)| s).unwrap_or(&base).to_owned();
    let url = format!("{server}/{name}?pool=8");
    {
        let store = overdue::mysql::MysqlStore::open_url(&format!("{url}&node=scheduler")).await.expect("open");
        schedule_all(&store).await;
        store.close().await.expect("close");
    }
    let db = Db::My(sqlx::mysql::MySqlPoolOptions::new().max_connections(2).connect(&format!("{server}/{name}")).await.expect("connect"));
    run_nodes("mysql", &format!("{url}&partition_lease_ms={PARTITION_LEASE_MS}"), &db, TAKEOVER_BOUND_MS, 0).await;
    let _ = sqlx::query(&format!("DROP DATABASE {name}")).execute(&admin).await;
}

/// Schedules every timer, due in [`LEAD_MS`] … [`LEAD_MS`] + [`SPREAD_MS`] from now.
async fn schedule_all(store: &dyn Store) -> i64 {
    let t0 = now_ms() + LEAD_MS;
    let specs: Vec<TimerSpec> =
        (0..TIMERS).map(|i| TimerSpec::new("effect", format!("k{i:05}"), t0 + i * SPREAD_MS / TIMERS)).collect();
    for chunk in specs.chunks(1_000) {
        store.schedule(chunk.to_vec(), now_ms()).await.expect("schedule");
    }
    assert!(now_ms() < t0, "scheduling took longer than the lead of {LEAD_MS} ms");
    T0.store(t0, std::sync::atomic::Ordering::Relaxed);
    t0
}

static T0: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Runs the nodes on `url` and checks the effects; `bound` is the worst lateness allowed around
/// the kill, `hold_ms` the nodes' `--hold-ms`.
async fn run_nodes(what: &str, url: &str, db: &Db, bound: i64, hold_ms: u64) {
    let t0 = T0.load(std::sync::atomic::Ordering::Relaxed);
    let mut nodes: Vec<Node> = (0..NODES).map(|i| start_node(url, &format!("n{i}"), hold_ms)).collect();

    // Kill node 0 once half the effects are in.
    let deadline = Instant::now() + Duration::from_millis((LEAD_MS + SPREAD_MS + 60_000) as u64);
    while db.count("effects").await < TIMERS / 2 {
        assert!(Instant::now() < deadline, "{what}: half the timers did not fire in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed_at = now_ms();
    nodes[0].child.kill().expect("SIGKILL node 0");
    let _ = nodes[0].child.wait();
    let dead = nodes[0].name.clone();
    // What the dead node left claimed (its leases still run): the takeover has work to do.
    let stranded = db.claims_of(&dead).await;
    if let Some(s) = &stranded {
        assert!(!s.is_empty(), "{what}: the killed node held no claims, so the takeover was not exercised");
    }

    loop {
        let done = db.count("effects").await;
        if done >= TIMERS {
            break;
        }
        assert!(Instant::now() < deadline, "{what}: only {done} of {TIMERS} timers took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the survivors settle what they fired, then stop them gracefully (stdin closes).
    for n in nodes.iter_mut().skip(1) {
        drop(n.child.stdin.take());
    }
    for n in nodes.iter_mut().skip(1) {
        let status = n.child.wait().expect("wait");
        assert!(status.success(), "{what}: node {} exited with {status}", n.name);
    }

    // Exactly once: one row per scheduled key (the primary key forbids two), none left over.
    let effects = db.effects().await;
    let keys: std::collections::BTreeSet<&str> = effects.iter().map(|e| e.0.as_str()).collect();
    let expected: std::collections::BTreeSet<String> = (0..TIMERS).map(|i| format!("k{i:05}")).collect();
    assert_eq!(effects.len() as i64, TIMERS, "{what}: every timer takes effect exactly once");
    assert!(expected.iter().all(|k| keys.contains(k.as_str())), "{what}: some scheduled keys have no effect");
    assert_eq!(db.count("timers").await, 0, "{what}: timers left in the store after every effect happened");
    let early: Vec<&Effect> = effects.iter().filter(|e| e.3 < e.2).collect();
    assert!(early.is_empty(), "{what}: timers fired before their due time: {:?}", &early[..early.len().min(5)]);

    // The split, and the lateness around the kill.
    let mut split: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
    for e in &effects {
        let s = split.entry(e.1.as_str()).or_default();
        s.0 += 1;
        s.1 = s.1.max(e.3 - e.2);
    }
    let report: Vec<String> = split.iter().map(|(n, (c, m))| format!("{n}: {c} fired, max lateness {m} ms")).collect();
    assert_eq!(split.len(), NODES, "{what}: every node fired some timers: {report:?}");
    for (node, (n, _)) in &split {
        assert!(*n >= TIMERS / 20, "{what}: node {node} fired only {n} of {TIMERS}: the work was not split ({report:?})");
    }
    let mut lateness: Vec<i64> = effects.iter().map(|e| e.3 - e.2).collect();
    lateness.sort_unstable();
    let pct = |q: f64| lateness[((lateness.len() - 1) as f64 * q) as usize];
    let after: Vec<&Effect> = effects.iter().filter(|e| e.3 >= killed_at).collect();
    let worst = after.iter().map(|e| e.3 - e.2.max(killed_at)).max().unwrap_or(0);
    let repeated = effects.iter().filter(|e| e.4 > 1).count();
    eprintln!(
        "multi-node {what}: split [{}]; killed {dead} at {} ms into the window{}; {} fired after the kill, worst {worst} ms \
         after max(due, kill); lateness p50/p99/max {}/{}/{} ms; {repeated} keys delivered more than once",
        report.join("; "),
        killed_at - t0,
        stranded.as_ref().map(|s| format!(", holding {} claims", s.len())).unwrap_or_default(),
        after.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    assert!(
        worst <= bound,
        "{what}: a timer due around the kill fired {worst} ms after it (bound: {bound} ms; lease {LEASE_MS} ms + 5 s + 2.5 s)"
    );
    assert!(pct(1.0) <= bound, "{what}: a timer fired {} ms late (bound {bound} ms)", pct(1.0));
    if let Some(stranded) = &stranded {
        // Each claim the dead node left: if its effect had happened, a survivor re-delivered it
        // and the effect log absorbed the repeat; if not, a survivor fired it only after its
        // lease ran out (no double claim), and within a backstop sweep plus the slack of it.
        let by_key: std::collections::HashMap<&str, &Effect> = effects.iter().map(|e| (e.0.as_str(), e)).collect();
        let (mut absorbed, mut taken_over, mut waited) = (0, 0, 0);
        for (key, lease_until) in stranded {
            let e = by_key[key.as_str()];
            if e.1 == dead {
                assert!(e.4 >= 2, "{what}: {key}: the dead node's claim was never re-delivered: {e:?}");
                absorbed += 1;
            } else {
                assert!(e.3 >= *lease_until, "{what}: {key} fired by {} at {} before the dead node's lease ran out at {lease_until}", e.1, e.3);
                waited = waited.max(e.3 - lease_until);
                taken_over += 1;
            }
        }
        eprintln!(
            "multi-node {what}: of the {} claims the dead node held, {taken_over} took effect on a survivor after the lease \
             (at most {waited} ms after it ran out), {absorbed} had taken effect before the kill and were re-delivered once more",
            stranded.len()
        );
        assert!(taken_over > 0, "{what}: no claim of the dead node was taken over before its effect: {stranded:?}");
        assert!(
            waited <= BACKSTOP_INTERVAL_MS + 2_500,
            "{what}: a taken-over claim fired {waited} ms after its lease ran out (bound: backstop {BACKSTOP_INTERVAL_MS} ms + 2.5 s)"
        );
    }
}
