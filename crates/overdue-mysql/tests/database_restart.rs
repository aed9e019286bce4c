//! The database goes away mid-run and comes back: the node keeps running, retries with
//! backoff, shows the outage in its stats and health, and loses nothing (MariaDB).
//!
//! A restart of the shared server at 127.0.0.1:3306 would break every other test running beside
//! this one, so the test starts a **private MariaDB server** of its own (`mariadb-install-db`
//! into a temporary directory, `mariadbd` on a free port with `--skip-grant-tables`) and stops
//! and starts *that* while timers come due and a producer keeps scheduling. Every timer whose
//! `schedule` returned Ok must fire, none early. The same scenario runs on PostgreSQL in
//! `crates/overdue-postgres/tests/database_restart.rs`.
//!
//! Needs the Debian package `mariadb-server` (`/usr/sbin/mariadbd`, `mariadb-install-db`);
//! under `CI` their absence fails the test.
#![cfg(unix)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overdue_core::{Clock, Firing, Outcome, Store, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig, TriggerKind};
use overdue_mysql::MysqlStore;
use parking_lot::Mutex;

/// How long the server stays down.
const OUTAGE: Duration = Duration::from_secs(5);
const MARIADBD: &str = "/usr/sbin/mariadbd";

/// A throwaway server: data directory and port of its own.
struct Server {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

impl Server {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn init() -> Server {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        let s = Server { dir, port, child: None };
        std::fs::create_dir_all(s.data()).expect("data directory");
        if is_root() {
            let _ = Command::new("chown").args(["-R", "mysql"]).arg(s.dir.path()).status();
        }
        let mut init = Command::new("mariadb-install-db");
        init.arg("--no-defaults").arg(format!("--datadir={}", s.data().display())).arg("--skip-test-db");
        if is_root() {
            init.arg("--user=mysql");
        }
        let out = init.output().expect("running mariadb-install-db");
        assert!(out.status.success(), "mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
        s
    }

    fn start(&mut self) {
        let mut cmd = Command::new(MARIADBD);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.data().display()))
            .arg(format!("--socket={}", self.dir.path().join("sock").display()))
            .arg(format!("--port={}", self.port))
            .args(["--bind-address=127.0.0.1", "--skip-grant-tables", "--skip-log-bin", "--innodb-buffer-pool-size=64M"])
            .arg(format!("--log-error={}", self.dir.path().join("err.log").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.arg("--user=mysql");
        }
        self.child = Some(cmd.spawn().expect("starting mariadbd"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mariadbd did not listen on port {} within 30 s", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: a clean shutdown, as `systemctl restart` would do.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_nothing() {
    if !std::path::Path::new(MARIADBD).exists() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but {MARIADBD} is missing (Debian package mariadb-server)");
        }
        eprintln!("skipped: {MARIADBD} not found");
        return;
    }
    let mut server = Server::init();
    server.start();
    let admin = sqlx::MySqlPool::connect(&format!("mysql://root@127.0.0.1:{}/mysql", server.port)).await.expect("connect");
    sqlx::query("CREATE DATABASE IF NOT EXISTS test").execute(&admin).await.expect("create database");
    admin.close().await;
    let store = MysqlStore::open_url(&format!("{}?pool=8&partition_lease_ms=2000", server.url())).await.expect("open");
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
    server.stop();
    tokio::time::sleep(OUTAGE).await;
    let during = engine.stats();
    server.start();
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
