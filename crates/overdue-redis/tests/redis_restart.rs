//! Redis dies mid-run (SIGKILL) and comes back: what the store keeps is what Redis kept on disk.
//!
//! A restart of the shared Redis at 127.0.0.1:6379 would break every test beside this one, so
//! each test starts a **private `redis-server`** of its own (a child process on a free
//! 127.0.0.1 port, its `dir` a fresh temporary directory) and kills and restarts *that*:
//!
//! - [`an_aof_always_redis_killed_mid_run_loses_nothing`]: `--appendonly yes --appendfsync
//!   always`, through the shared scenario `overdue_testkit::outage` (a producer keeps scheduling
//!   while timers come due, Redis is SIGKILLed for 5 s and restarted on the same directory): the
//!   engine keeps running, its store health shows the outage and clears, and every timer whose
//!   `schedule` returned Ok fires, none early.
//! - [`what_a_killed_redis_keeps_depends_on_its_persistence`]: in virtual time (a manual clock),
//!   2,000 timers are scheduled, half fired, Redis SIGKILLed and restarted; then the clock moves
//!   past the rest. With AOF (`always`, and `everysec` too: a killed *process* loses nothing the
//!   kernel has, only a machine crash loses `everysec`'s last second) every timer takes effect
//!   exactly once and nothing is left; with nothing on disk (`--save "" --appendonly no`, the
//!   development machines' setting) the store warns at open, [`RedisStore::persistence`] says so,
//!   every pending timer is gone after the restart, and the engine carries on with new ones.
//!
//! `redis-server` is `OVERDUE_REDIS_SERVER` or found on `PATH`; under `CI` its absence fails
//! the tests. See docs/redis.md, "Durability", for what this means for a production Redis.
#![cfg(unix)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overdue_core::{Clock, Firing, ManualClock, Outcome, Store, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig, TriggerKind};
use overdue_redis::RedisStore;
use tracing::instrument::WithSubscriber;

/// `std::sync::Mutex` that ignores poisoning: a test that panicked holding it has failed already.
struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    fn new(t: T) -> Self {
        Mutex(std::sync::Mutex::new(t))
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T: Default> Default for Mutex<T> {
    fn default() -> Self {
        Mutex::new(T::default())
    }
}

/// How long a (re)started server may take to answer `PING` (an AOF replay included).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Timers in the virtual-time test; half fire before the kill.
const TIMERS: usize = 2_000;
/// Start of virtual time in that test.
const T0: i64 = 1_700_000_000_000;

/// What the private server keeps on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Persist {
    /// `appendonly yes`, `appendfsync always`: fsync before every reply.
    AofAlways,
    /// `appendonly yes`, `appendfsync everysec`: written before the reply, fsynced once a second.
    AofEverysec,
    /// `save ""`, `appendonly no`: nothing, as on the development machines.
    Nothing,
}

impl Persist {
    fn args(self) -> &'static [&'static str] {
        match self {
            Persist::AofAlways => &["--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            Persist::AofEverysec => &["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
            Persist::Nothing => &["--save", "", "--appendonly", "no"],
        }
    }
}

fn redis_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OVERDUE_REDIS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("redis-server")).find(|p| p.is_file())
}

/// `None` (test skipped) without a `redis-server`, outside CI; under `CI` a failure.
fn server_binary() -> Option<PathBuf> {
    let found = redis_server();
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but no redis-server was found (Debian package redis-server); set OVERDUE_REDIS_SERVER");
        }
        eprintln!("skipped: no redis-server found; set CI to make this a failure");
    }
    found
}

/// A private `redis-server`: its own port and directory; killed and the directory removed on
/// drop.
struct Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    persist: Persist,
    child: Option<Child>,
}

impl Server {
    fn start(bin: PathBuf, persist: Persist) -> Server {
        let dir = std::env::temp_dir().join(format!("overdue-redis-restart-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        let mut s = Server { bin, dir, port, persist, child: None };
        s.spawn();
        s
    }

    /// Starts the server on the same port and directory and waits until it answers `PING`
    /// (after replaying its AOF, if any).
    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(self.persist.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let started = Instant::now();
        loop {
            match self.ping() {
                Ok(reply) if reply.starts_with("+PONG") => return,
                other => {
                    if started.elapsed() > READY_TIMEOUT {
                        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                        panic!("private redis on port {} not ready after {READY_TIMEOUT:?}: {other:?}\n{log}", self.port);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// SIGKILL: Redis gets no chance to write anything more.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, prefix: &str) -> String {
        format!("redis://127.0.0.1:{}/0?prefix={prefix}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Collects the WARN and ERROR events of the future it is attached to (`with_subscriber`).
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn of_redis_store(&self) -> Vec<String> {
        self.0.lock().iter().filter(|w| w.starts_with("overdue_redis")).cloned().collect()
    }
}

struct Message<'a>(&'a mut String);

impl tracing::field::Visit for Message<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut line = e.metadata().target().to_owned();
        e.record(&mut Message(&mut line));
        self.0.lock().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Opens the store and returns the warnings it logged while opening.
async fn open(url: &str) -> (RedisStore, Vec<String>) {
    let w = Warnings::default();
    let store = RedisStore::open_url(url).with_subscriber(w.clone()).await.expect("open the private redis");
    (store, w.of_redis_store())
}

fn prefix() -> String {
    format!("ot:{}:{:08x}", overdue_core::SystemClock.now_ms(), rand::random::<u32>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aof_always_redis_killed_mid_run_loses_nothing() {
    let Some(bin) = server_binary() else { return };
    let server = Mutex::new(Server::start(bin, Persist::AofAlways));
    let url = server.lock().url(&prefix());
    let (store, warnings) = open(&url).await;
    let p = store.persistence().clone();
    assert_eq!((p.appendonly.as_deref(), p.appendfsync.as_deref()), (Some("yes"), Some("always")), "{p:?}");
    assert!(!p.keeps_nothing() && warnings.is_empty(), "an AOF redis is not one that keeps nothing: {p:?} {warnings:?}");
    overdue_testkit::outage::outage(
        "redis (appendfsync always, SIGKILL)",
        Arc::new(store.clone()),
        || server.lock().kill(),
        || server.lock().spawn(),
    )
    .await;
    assert!(store.healthy(), "the store did not recover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_killed_redis_keeps_depends_on_its_persistence() {
    let Some(bin) = server_binary() else { return };
    for persist in [Persist::AofAlways, Persist::AofEverysec, Persist::Nothing] {
        kill_between_firings(bin.clone(), persist).await;
    }
}

/// Schedules [`TIMERS`], fires half, SIGKILLs Redis, restarts it, fires the rest (see the
/// module docs for what each `persist` must show).
async fn kill_between_firings(bin: PathBuf, persist: Persist) {
    let started = Instant::now();
    let what = format!("{persist:?}");
    let mut server = Server::start(bin, persist);
    let (store, warnings) = open(&server.url(&prefix())).await;
    let keeps_nothing = store.persistence().keeps_nothing();
    assert_eq!(keeps_nothing, persist == Persist::Nothing, "{what}: {:?}", store.persistence());
    if keeps_nothing {
        assert!(
            warnings.iter().any(|w| w.contains("appendonly")),
            "{what}: no warning that redis keeps nothing on disk: {warnings:?}"
        );
    } else {
        assert!(warnings.is_empty(), "{what}: unexpected warnings at open: {warnings:?}");
    }

    let deliveries: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let d2 = deliveries.clone();
    let clock = Arc::new(ManualClock::new(T0));
    let queue = QueueConfig { timeout: Duration::from_secs(5), ..QueueConfig::default() };
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .config(EngineConfig { trigger: TriggerKind::Wheel, lease: Duration::from_secs(10), ..EngineConfig::default() })
        .default_queue_config(queue.clone())
        .handler("q", queue, move |f: Firing| {
            let d = d2.clone();
            async move {
                *d.lock().entry(f.key).or_default() += 1;
                Outcome::Done
            }
        })
        .start()
        .await
        .expect("engine");
    let due = |i: usize| T0 + 1_000 + i as i64;
    let specs: Vec<TimerSpec> = (0..TIMERS).map(|i| TimerSpec::new("q", format!("k{i:04}"), due(i))).collect();
    let mut last_gen = 0;
    for chunk in specs.chunks(500) {
        last_gen = *engine.schedule_batch(chunk.to_vec()).await.expect("schedule").last().unwrap_or(&0);
    }
    clock.set(due(TIMERS / 2 - 1));
    engine.settle().await;
    assert_eq!(deliveries.lock().len(), TIMERS / 2, "{what}: half the timers fire before the kill");

    // SIGKILL right after the last acknowledged write. While Redis is down a schedule is refused
    // (transiently: the caller retries), never acknowledged, and the engine's next pass over the
    // store reports it unhealthy.
    server.kill();
    let refused = engine.schedule(TimerSpec::new("q", "during-outage", due(TIMERS))).await.expect_err("schedule while redis is down");
    assert!(refused.is_transient(), "{what}: a refused schedule is transient: {refused}");
    clock.advance(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().store_healthy && Instant::now() < deadline {
        // A pass over the store: it fails, or hangs until the driver's timeout; either is fine.
        let _ = tokio::time::timeout(Duration::from_millis(200), engine.settle()).await;
    }
    let s = engine.stats();
    assert!(!s.store_healthy && s.store_error.is_some(), "{what}: the outage does not show in the stats: {s:?}");
    server.spawn();

    // After the restart: the clock moves past every due time, and the engine fires what Redis
    // still has (its first calls may meet the dropped connection and retry: poll, in real time).
    clock.set(due(TIMERS) + 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let left = loop {
        engine.settle().await;
        let left: u64 = match store.counts(clock.now()).await {
            Ok(c) => c.iter().map(|q| q.pending + q.in_flight + q.dead).sum(),
            Err(_) => u64::MAX,
        };
        let fired = deliveries.lock().len();
        let done = if keeps_nothing { left == 0 } else { left == 0 && fired == TIMERS };
        if done && engine.stats().store_healthy {
            break left;
        }
        assert!(Instant::now() < deadline, "{what}: after the restart {fired} of {TIMERS} fired, {left} left: {:?}", engine.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(left, 0, "{what}: nothing is left in the store");
    let d = deliveries.lock().clone();
    let repeated: Vec<_> = d.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "{what}: timers delivered more than once: {repeated:?}");
    if keeps_nothing {
        // Every timer still pending at the kill is gone: no firing, no trace in the store.
        assert_eq!(d.len(), TIMERS / 2, "{what}: only the timers fired before the kill took effect");
        assert!(store.get("q", &format!("k{:04}", TIMERS - 1), clock.now()).await.expect("get").is_none());
    } else {
        assert_eq!(d.len(), TIMERS, "{what}: every acknowledged timer took effect exactly once");
    }

    // The engine carries on: a timer scheduled after the restart fires. (Without persistence
    // the generation counter started again from zero.)
    let gen_after = engine.schedule(TimerSpec::new("q", "after-restart", due(TIMERS) + 10)).await.expect("schedule after the restart");
    clock.set(due(TIMERS) + 10);
    engine.settle().await;
    assert_eq!(deliveries.lock().get("after-restart"), Some(&1), "{what}: a timer scheduled after the restart fires");
    eprintln!(
        "redis restart, {what}: {} of {TIMERS} timers took effect exactly once; generation {last_gen} before the kill, \
         {gen_after} after; {:.1} s",
        d.len(),
        started.elapsed().as_secs_f64()
    );
    engine.shutdown(Duration::from_secs(5)).await;
}
