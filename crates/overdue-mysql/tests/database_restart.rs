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

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overdue_mysql::MysqlStore;

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
    let server = std::cell::RefCell::new(server);
    overdue_testkit::outage::outage("mysql", Arc::new(store.clone()), || server.borrow_mut().stop(), || server.borrow_mut().start())
        .await;
    assert!(store.healthy(), "the partition heartbeat did not recover");
}
