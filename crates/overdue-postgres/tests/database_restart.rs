//! The database goes away mid-run and comes back: the node keeps running, retries with
//! backoff, shows the outage in its stats and health, and loses nothing.
//!
//! A restart of the shared server at 127.0.0.1:5432 would break every other test running beside
//! this one, so the test starts a **private PostgreSQL cluster** of its own (`initdb` into a
//! temporary directory, `pg_ctl start` on a free port, as the `postgres` user when run as root)
//! and stops and starts *that* with `pg_ctl` while timers come due and a producer keeps
//! scheduling. Every timer whose `schedule` returned Ok must fire, none early.
//!
//! The PostgreSQL binaries are looked up in `OVERDUE_PG_BIN` or `/usr/lib/postgresql/*/bin`;
//! under `CI` their absence fails the test.
#![cfg(unix)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use overdue_core::{Clock, Firing, Outcome, Store, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig, TriggerKind};
use overdue_postgres::PgStore;
use parking_lot::Mutex;

/// How long the server stays down.
const OUTAGE: Duration = Duration::from_secs(5);

fn pg_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OVERDUE_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop()
}

/// A throwaway cluster: data directory, socket directory and port of its own.
struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    fn as_postgres(&self, program: &str, args: &[&str]) -> Command {
        let is_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
            || Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
        let path = self.bin.join(program);
        let mut c = if is_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.args(args);
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.as_postgres(program, args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(bin: PathBuf) -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        let _ = Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status();
        let c = Cluster { bin, dir, port };
        let data = c.data();
        c.run("initdb", &["-D", path(&data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        c.pg_ctl_start();
        c
    }

    fn pg_ctl_start(&self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let log = self.dir.path().join("log");
        self.run("pg_ctl", &["-D", path(&self.data()), "-o", &opts, "-l", path(&log), "-w", "-t", "30", "start"]);
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", path(&self.data()), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.as_postgres("pg_ctl", &["-D", path(&self.data()), "-m", "immediate", "stop"]).output();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_nothing() {
    let Some(bin) = pg_bin() else {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but no PostgreSQL binaries (initdb, pg_ctl) were found; set OVERDUE_PG_BIN");
        }
        eprintln!("skipped: no PostgreSQL binaries found");
        return;
    };
    let cluster = Cluster::start(bin);
    let store = PgStore::open_url(&format!("{}?pool=8&partition_lease_ms=2000", cluster.url())).await.expect("open");
    let fired: Arc<Mutex<HashMap<String, (i64, i64)>>> = Arc::default();
    let f2 = fired.clone();
    let engine = Arc::new(
        Engine::builder(Arc::new(store.clone()) as Arc<dyn Store>)
            .config(EngineConfig { trigger: TriggerKind::Wheel, lease: Duration::from_secs(10), ..EngineConfig::default() })
            .default_queue_config(QueueConfig { timeout: Duration::from_secs(5), ..QueueConfig::default() })
            .handler(
                "q",
                QueueConfig { timeout: Duration::from_secs(5), ..QueueConfig::default() },
                move |f: Firing| {
                    let fired = f2.clone();
                    async move {
                        fired.lock().entry(f.key.clone()).or_insert((f.due_at, f.fired_at));
                        Outcome::Done
                    }
                },
            )
            .start()
            .await
            .expect("engine"),
    );

    // A producer schedules 20 timers every 50 ms, each due 0.5-2.5 s later, and remembers the
    // ones whose schedule returned Ok. It runs across the outage.
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producing = Duration::from_secs(4) + OUTAGE + Duration::from_secs(3);
    let producer = {
        let (engine, acked, failed) = (engine.clone(), acked.clone(), failed.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut i = 0u64;
            while started.elapsed() < producing {
                let now = SystemClock.now_ms();
                let specs: Vec<TimerSpec> = (i..i + 20)
                    .map(|j| TimerSpec::new("q", format!("k{j}"), now + 500 + (j as i64 * 97) % 2_000))
                    .collect();
                let ids: Vec<(String, i64)> = specs.iter().map(|s| (s.key.clone(), s.due_at)).collect();
                match engine.schedule_batch(specs).await {
                    Ok(_) => acked.lock().extend(ids),
                    Err(_) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                i += 20;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    let fired_before = fired.lock().len();
    assert!(fired_before > 0, "nothing fired before the outage");
    cluster.stop();
    tokio::time::sleep(OUTAGE).await;
    let during = engine.stats();
    cluster.pg_ctl_start();
    producer.await.expect("producer");

    // Everything acknowledged fires: wait for the last due time plus the backstop's reach.
    let acked: Vec<(String, i64)> = acked.lock().clone();
    let last_due = acked.iter().map(|(_, d)| *d).max().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let want: HashSet<&str> = acked.iter().map(|(k, _)| k.as_str()).collect();
    loop {
        let missing = {
            let f = fired.lock();
            want.iter().filter(|k| !f.contains_key(**k)).count()
        };
        if missing == 0 && SystemClock.now_ms() > last_due {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} acknowledged timers never fired after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let f = fired.lock().clone();
    let early: Vec<_> = f.iter().filter(|(_, (due, at))| at < due).collect();
    assert!(early.is_empty(), "timers fired early: {early:?}");
    assert!(!during.store_healthy && during.store_errors > 0, "the outage did not show in the stats: {during:?}");
    let after = engine.stats();
    assert!(after.store_healthy, "the store is still reported unhealthy after it came back: {after:?}");
    assert!(store.healthy(), "the partition heartbeat did not recover");
    eprintln!(
        "database restart: {} acknowledged timers, all fired; {} schedule calls refused during the outage; \
         {} store errors counted; {} rescued by the backstop; lateness p99 {} ms, max {} ms",
        acked.len(),
        failed.load(std::sync::atomic::Ordering::Relaxed),
        after.store_errors,
        after.backstop_rescued,
        after.lateness.p99_ms,
        after.lateness.max_ms
    );
    let engine = Arc::try_unwrap(engine).ok();
    if let Some(e) = engine {
        e.shutdown(Duration::from_secs(5)).await;
    }
}
