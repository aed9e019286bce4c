//! The Redis key-expiry trigger (`--trigger keyspace`) over the SQLite store with its outbox on:
//! the whole conformance suite, a subscriber killed while timers come due (the backstop rescues
//! every one, once, and counts it), a private Redis killed and restarted (the reconnecting
//! trigger turns the forgotten events on again), and the configuration errors. Under `CI` an unreachable
//! Redis fails these tests; elsewhere it skips them.
//!
//! Key expiry happens in real time, so these tests wait for it, always by polling a condition
//! with a deadline, never by a fixed sleep; everything else runs on a manual clock.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Fresh, server_url};
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use overdue_core::{Error, ExternalTrigger, Firing, ManualClock, Outcome, Result, Store, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig, TriggerKind};
use overdue_redis::KeyspaceTrigger;
use overdue_redis::keyspace::{KeyspaceOptions, with_expired_events};
use overdue_sql::{SqliteOptions, SqliteStore};
use overdue_testkit::{Backend, T0};

/// A conformance backend: a fresh SQLite store (outbox on) in its own directory, and a keyspace
/// trigger on a fresh key prefix (the same prefix again after a simulated crash).
struct Keyspace {
    fresh: Fresh,
    dir: tempfile::TempDir,
}

impl Keyspace {
    async fn fresh() -> Option<Keyspace> {
        Some(Keyspace { fresh: Fresh::new().await?, dir: tempfile::tempdir().expect("temporary directory") })
    }
}

impl Backend for Keyspace {
    fn name(&self) -> String {
        "sqlite+redis-keyspace".to_owned()
    }
    fn trigger(&self) -> TriggerKind {
        TriggerKind::Wheel
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        let path = self.dir.path().join("overdue.db");
        let opts = SqliteOptions { outbox: true, ..SqliteOptions::default() };
        Box::pin(async move { Ok(Arc::new(SqliteStore::open(path, opts).await?) as Arc<dyn Store>) })
    }
    fn external(&self) -> Option<Arc<dyn ExternalTrigger>> {
        let t = KeyspaceTrigger::from_url(&self.fresh.url).expect("keyspace trigger url");
        Some(Arc::new(t))
    }
}

mod conformance {
    overdue_testkit::conformance_tests!(match super::Keyspace::fresh().await {
        Some(backend) => backend,
        None => return,
    });
}

/// The process-wide metrics recorder (installed once; every test of this binary shares it).
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("install the metrics recorder"))
}

/// The value of an unlabelled counter in the recorder's output (0 if it was never incremented).
fn counter(name: &str) -> u64 {
    metrics()
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |v| v as u64)
}

/// Polls `cond` every 5 ms until it holds, panicking with `what` after `within`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec { queue: "q".into(), key: key.into(), due_at, payload: Vec::new() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscriber_loses_events_and_the_backstop_rescues_every_timer_once() {
    let Some(fresh) = Fresh::new().await else { return };
    let mut redis = fresh.con();
    let rescued_metric_before = counter("overdue_backstop_rescued_total");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("o.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
        .await
        .expect("open");
    // A long first reconnect pause, so the keys surely expire while nobody listens.
    let opts = KeyspaceOptions { prefix: fresh.prefix.clone(), reconnect_min: Duration::from_secs(3), ..KeyspaceOptions::default() };
    let trigger = KeyspaceTrigger::new(&server_url(), opts).expect("trigger");
    let clock = ManualClock::new(T0);
    let fired: Arc<Mutex<Vec<Firing>>> = Arc::default();
    let rec = fired.clone();
    let config = EngineConfig {
        backstop_interval: Duration::from_millis(100),
        backstop_slack: Duration::from_millis(500),
        ..EngineConfig::default()
    };
    let engine = Engine::builder(Arc::new(store))
        .clock(Arc::new(clock.clone()))
        .config(config)
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |f: Firing| {
            rec.lock().expect("lock").push(f);
            async { Outcome::Done }
        })
        .start()
        .await
        .expect("start");
    let fired_keys = || fired.lock().expect("lock").iter().map(|f| f.key.clone()).collect::<Vec<_>>();
    until("the subscriber is subscribed", Duration::from_secs(10), || trigger.subscribed()).await;

    // The trigger's own path works: a due timer comes back through Redis (the virtual clock
    // stands still, so the backstop, which takes only what is 500 ms overdue, cannot fire it).
    engine.schedule(spec("heard", T0)).await.expect("schedule");
    until("the first timer fired through the trigger", Duration::from_secs(10), || fired_keys() == ["heard"]).await;
    assert_eq!(engine.stats().backstop_rescued, 0, "{:?}", engine.stats());

    // Kill exactly this trigger's subscriber connection.
    let addr = trigger.subscriber_addr().expect("subscriber address");
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("ADDR").arg(&addr).arg("SKIPME").arg("yes").query_async(&mut redis).await.expect("client kill");
    assert_eq!(killed, 1, "CLIENT KILL ADDR {addr} killed {killed} clients");
    until("the trigger noticed the disconnect", Duration::from_secs(10), || !trigger.subscribed()).await;
    until("the engine shows the trigger unhealthy", Duration::from_secs(10), || !engine.stats().trigger_healthy).await;

    // Timers come due while nobody listens: 50 keys with a 200 ms TTL.
    const N: usize = 50;
    let specs: Vec<TimerSpec> = (0..N).map(|i| spec(&format!("lost-{i}"), T0 + 200)).collect();
    let generations = engine.schedule_batch(specs).await.expect("schedule");
    until("the notices were published", Duration::from_secs(10), || trigger.stats().keys_set >= N as u64).await;
    let names: Vec<String> = generations
        .iter()
        .enumerate()
        .map(|(i, g)| {
            trigger.key_for(&overdue_core::TimerRef { queue: "q".into(), key: format!("lost-{i}"), generation: *g, due_at: T0 + 200 })
        })
        .collect();
    // Wait until Redis has expired every key (EXISTS on an expired key expires it at once).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = redis::cmd("EXISTS").arg(&names).query_async(&mut redis).await.expect("exists");
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} of {N} keys still waiting after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !trigger.subscribed(),
        "inconclusive: the subscriber reconnected before the keys expired (stats {:?})",
        trigger.stats()
    );
    assert_eq!(fired_keys(), ["heard"], "nothing could have been heard");

    // The backstop's turn: 800 ms later on the engine's clock they are 500 ms overdue.
    clock.set(T0 + 1_000);
    until("every lost timer rescued", Duration::from_secs(10), || engine.stats().completed == N as u64 + 1).await;
    let stats = engine.stats();
    assert_eq!(stats.backstop_rescued, N as u64, "every lost event was rescued: {stats:?}");
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for k in fired_keys() {
        *per_key.entry(k).or_default() += 1;
    }
    assert_eq!(per_key.len(), N + 1, "nothing lost: {per_key:?}");
    assert!(per_key.values().all(|&n| n == 1), "each fired exactly once: {per_key:?}");
    let rescued_metric = counter("overdue_backstop_rescued_total") - rescued_metric_before;
    assert!(rescued_metric >= N as u64, "overdue_backstop_rescued_total grew by {rescued_metric}, expected at least {N}");

    // The subscriber comes back by itself (after its 3 s pause) and the trigger works again.
    until("the subscriber reconnected", Duration::from_secs(20), || trigger.subscribed()).await;
    until("the engine shows the trigger healthy", Duration::from_secs(10), || engine.stats().trigger_healthy).await;
    assert!(trigger.stats().subscriptions >= 2, "{:?}", trigger.stats());
    engine.schedule(spec("heard-again", T0 + 1_000)).await.expect("schedule");
    until("the timer after the reconnect fired", Duration::from_secs(10), || fired_keys().len() == N + 2).await;
    assert_eq!(engine.stats().backstop_rescued, N as u64, "the last one came through the trigger: {:?}", engine.stats());
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_events_bring_future_timers_back_and_early_ones_are_set_again() {
    let Some(fresh) = Fresh::new().await else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("o.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
        .await
        .expect("open");
    let trigger = KeyspaceTrigger::from_url(&fresh.url).expect("trigger");
    let clock = ManualClock::new(T0);
    let fired: Arc<Mutex<Vec<Firing>>> = Arc::default();
    let rec = fired.clone();
    let engine = Engine::builder(Arc::new(store))
        .clock(Arc::new(clock.clone()))
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |f: Firing| {
            rec.lock().expect("lock").push(f);
            async { Outcome::Done }
        })
        .start()
        .await
        .expect("start");
    until("subscribed", Duration::from_secs(10), || trigger.subscribed()).await;
    // Keys that expire after 100 ms of real time while the engine's clock stands still: "soon"
    // is held until the clock reaches it; "later" (5 s ahead on the engine's clock, more than the
    // engine holds) is answered Early and set again for the 4.9 s that are left.
    engine.schedule(spec("a:b}{c", T0 + 100)).await.expect("schedule");
    engine.schedule(spec("later", T0 + 5_000)).await.expect("schedule");
    until("the early one was set again", Duration::from_secs(10), || trigger.stats().early >= 1).await;
    clock.set(T0 + 100);
    until("the key with awkward bytes fired", Duration::from_secs(10), || fired.lock().expect("lock").len() == 1).await;
    assert_eq!(fired.lock().expect("lock")[0].key, "a:b}{c");
    clock.set(T0 + 5_000);
    // The re-set key expires 4.9 s after it was set; the engine holds nothing of it meanwhile.
    until("the early one fired when its key expired again", Duration::from_secs(15), || engine.stats().completed == 2).await;
    assert_eq!(fired.lock().expect("lock").len(), 2);
    let st = engine.stats();
    assert_eq!((st.backstop_rescued, st.completed), (0, 2), "both came through the trigger: {st:?}");
    engine.shutdown(Duration::from_secs(5)).await;
}

/// A Redis user with the given ACL rules, deleted again when dropped.
struct AclUser {
    name: String,
    con: redis::aio::MultiplexedConnection,
}

impl AclUser {
    async fn new(rules: &[&str], con: redis::aio::MultiplexedConnection) -> AclUser {
        let name = format!("ot-keyspace-{:08x}", rand::random::<u32>());
        let mut c = con.clone();
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(&name).arg("on").arg(">secret-pw").arg("~*").arg("&*");
        for r in rules {
            cmd.arg(*r);
        }
        cmd.query_async::<()>(&mut c).await.expect("ACL SETUSER");
        AclUser { name, con }
    }

    /// The test server's URL with this user's credentials and `query`.
    fn url(&self, query: &str) -> String {
        let base = server_url();
        let rest = base.strip_prefix("redis://").expect("a redis:// test url");
        let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
        let sep = if rest.contains('?') { '&' } else { '?' };
        format!("redis://{}:secret-pw@{rest}{sep}{query}", self.name)
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        let mut con = self.con.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _: redis::RedisResult<i64> = rt.block_on(redis::cmd("ACL").arg("DELUSER").arg(&name).query_async(&mut con));
            }
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_config_is_a_clear_error_that_says_what_to_configure() {
    let Some(fresh) = Fresh::new().await else { return };
    let user = AclUser::new(&["+@all", "-config"], fresh.con()).await;
    let url = user.url(&format!("prefix={}", fresh.prefix));
    let trigger = KeyspaceTrigger::from_url(&url).expect("trigger");
    let err = trigger.start().await.expect_err("CONFIG is refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(msg.contains("notify-keyspace-events Ex"), "the error says what to configure: {msg}");
    assert!(msg.contains("events=assume"), "the error names the way out for managed Redis: {msg}");
    assert!(!msg.contains("secret-pw"), "the password is not in the message: {msg}");
    // The engine refuses to start with it, with the same explanation.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("o.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
        .await
        .expect("open");
    let err = Engine::builder(Arc::new(store))
        .external_trigger(Arc::new(KeyspaceTrigger::from_url(&url).expect("trigger")) as Arc<dyn ExternalTrigger>)
        .start()
        .await
        .expect_err("the engine must not start");
    assert!(err.to_string().contains("notify-keyspace-events Ex"), "{err}");
    // `events=assume` skips CONFIG altogether (the operator configured the events).
    let assumed = KeyspaceTrigger::from_url(&user.url(&format!("prefix={}&events=assume", fresh.prefix))).expect("trigger");
    assumed.start().await.expect("events=assume starts without CONFIG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_a_transient_error_naming_the_address() {
    // Port 1 on 127.0.0.1: nothing listens there.
    let trigger = KeyspaceTrigger::from_url("redis://127.0.0.1:1?prefix=ot-unreachable").expect("trigger");
    let err = trigger.start().await.expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_turns_expired_events_on_and_keeps_the_other_flags() {
    let Some(fresh) = Fresh::new().await else { return };
    let mut con = fresh.con();
    let get = |mut con: redis::aio::MultiplexedConnection| async move {
        let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut con).await.expect("config get");
        v.get(1).cloned().unwrap_or_default()
    };
    let original = get(con.clone()).await;
    // Keyspace (K) events only: the expired key-event channel is off. Other keyspace tests of
    // this binary running right now may miss an event in this moment; their backstop covers it.
    let _: () = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("Kg").query_async(&mut con).await.expect("config set");
    let trigger = KeyspaceTrigger::from_url(&fresh.url).expect("trigger");
    let started = trigger.start().await;
    let now = get(con.clone()).await;
    // Put back what was there (with the expired events, which other tests rely on).
    let restore = with_expired_events(&original).unwrap_or(original.clone());
    let _: () = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&restore).query_async(&mut con).await.expect("restore");
    started.expect("start turns the events on");
    let mut flags: Vec<char> = now.chars().collect();
    flags.sort_unstable();
    let mut want: Vec<char> = "KgEx".chars().collect();
    want.sort_unstable();
    assert_eq!(flags, want, "Ex added, Kg kept: {now:?} (Redis normalises the order)");
}

/// A private `redis-server` (its own free 127.0.0.1 port and directory, nothing on disk), so
/// that killing and restarting it touches no other test. Killed on drop.
struct PrivateRedis {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// `None` (skipped) without a `redis-server` on `PATH` (or `OVERDUE_REDIS_SERVER`) outside
    /// CI; under `CI` a failure.
    fn start() -> Option<PrivateRedis> {
        let bin = std::env::var_os("OVERDUE_REDIS_SERVER").map(std::path::PathBuf::from).or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path).map(|d| d.join("redis-server")).find(|p| p.is_file())
        });
        let Some(bin) = bin else {
            assert!(std::env::var_os("CI").is_none(), "CI is set but no redis-server was found (Debian package redis-server)");
            eprintln!("skipped: no redis-server found; set CI to make this a failure");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
        let mut s = PrivateRedis { bin, dir: tempfile::tempdir().expect("tempdir"), port, child: None };
        s.spawn();
        Some(s)
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A connection, once the server answers (polled for up to 10 s).
    async fn con(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("url");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await
                && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                return c;
            }
            assert!(tokio::time::Instant::now() < deadline, "private redis on port {} did not come up", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn events(&self) -> String {
        let mut c = self.con().await;
        let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut c).await.expect("config get");
        v.get(1).cloned().unwrap_or_default()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_forgets_the_events_and_the_reconnecting_trigger_turns_them_on_again() {
    let Some(mut server) = PrivateRedis::start() else { return };
    assert_eq!(server.events().await, "", "a fresh redis has key-space events off");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("o.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
        .await
        .expect("open");
    let trigger = KeyspaceTrigger::from_url(&format!("{}?prefix=ot-restart", server.url())).expect("trigger");
    let clock = ManualClock::new(T0);
    let engine = Engine::builder(Arc::new(store))
        .clock(Arc::new(clock.clone()))
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), |_f: Firing| async { Outcome::Done })
        .start()
        .await
        .expect("start");
    let events = server.events().await;
    assert!(with_expired_events(&events).is_none(), "start turned the expired events on: {events:?}");
    until("subscribed", Duration::from_secs(10), || trigger.subscribed()).await;
    // The clock moves by milliseconds only, so the backstop (2 s slack) can fire nothing here:
    // every firing below came through an expiry event.
    engine.schedule(spec("before", T0 + 100)).await.expect("schedule");
    until("its key was set", Duration::from_secs(10), || trigger.stats().keys_set == 1).await;
    clock.set(T0 + 100);
    until("fired before the restart", Duration::from_secs(10), || engine.stats().completed == 1).await;

    server.kill();
    until("the trigger noticed", Duration::from_secs(10), || !trigger.subscribed()).await;
    server.spawn();
    until("resubscribed after the restart", Duration::from_secs(20), || trigger.subscribed()).await;
    let events = server.events().await;
    assert!(with_expired_events(&events).is_none(), "the reconnect turned the events on again: {events:?}");
    until("healthy again", Duration::from_secs(10), || engine.stats().trigger_healthy).await;

    engine.schedule(spec("after", T0 + 200)).await.expect("schedule after the restart");
    until("its key was set", Duration::from_secs(10), || trigger.stats().keys_set == 2).await;
    clock.set(T0 + 200);
    until("fired after the restart", Duration::from_secs(10), || engine.stats().completed == 2).await;
    let st = engine.stats();
    assert_eq!(st.backstop_rescued, 0, "both came through expiry events: {st:?}");
    assert!(trigger.stats().subscriptions >= 2, "{:?}", trigger.stats());
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_hear_every_event_and_the_claim_runs_each_timer_once() {
    let Some(fresh) = Fresh::new().await else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("o.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
            .await
            .expect("open"),
    );
    let clock = ManualClock::new(T0);
    let fired: Arc<Mutex<Vec<Firing>>> = Arc::default();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let trigger = KeyspaceTrigger::from_url(&fresh.url).expect("trigger");
        let rec = fired.clone();
        let engine = Engine::builder(store.clone())
            .clock(Arc::new(clock.clone()))
            .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
            .handler("q", QueueConfig::default(), move |f: Firing| {
                rec.lock().expect("lock").push(f);
                async { Outcome::Done }
            })
            .start()
            .await
            .expect("start");
        until("subscribed", Duration::from_secs(10), || trigger.subscribed()).await;
        nodes.push((engine, trigger));
    }
    // 100 already due (the due channel) and 100 due in 200 ms (expiry events); both nodes
    // subscribe to both, so every notice is delivered at least twice.
    const N: usize = 100;
    let mut specs: Vec<TimerSpec> = (0..N).map(|i| spec(&format!("now-{i}"), T0)).collect();
    specs.extend((0..N).map(|i| spec(&format!("soon-{i}"), T0 + 200)));
    nodes[0].0.schedule_batch(specs).await.expect("schedule");
    until("published", Duration::from_secs(10), || nodes.iter().map(|(_, t)| t.stats().keys_set).sum::<u64>() >= N as u64).await;
    clock.set(T0 + 200);
    let completed = || nodes.iter().map(|(e, _)| e.stats().completed).sum::<u64>();
    until("every timer completed", Duration::from_secs(15), || completed() == 2 * N as u64).await;
    let received: u64 = nodes.iter().map(|(_, t)| t.stats().received).sum();
    until("both nodes heard every notice", Duration::from_secs(15), || {
        nodes.iter().map(|(_, t)| t.stats().received).sum::<u64>() >= 4 * N as u64
    })
    .await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for f in fired.lock().expect("lock").iter() {
        *per_key.entry(f.key.clone()).or_default() += 1;
    }
    assert_eq!(per_key.len(), 2 * N, "nothing lost");
    assert!(per_key.values().all(|&n| n == 1), "each ran once: {per_key:?}");
    let rescued: u64 = nodes.iter().map(|(e, _)| e.stats().backstop_rescued).sum();
    assert_eq!(rescued, 0, "all came through the trigger (received {received})");
    until("the losers' wake-ups were dropped", Duration::from_secs(10), || {
        nodes.iter().map(|(e, _)| e.stats().stale_dropped).sum::<u64>() >= 2 * N as u64
    })
    .await;
    for (e, _) in nodes {
        e.shutdown(Duration::from_secs(5)).await;
    }
}
