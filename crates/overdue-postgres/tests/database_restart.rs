//! The database goes away mid-run and comes back: the node keeps running, retries with
//! backoff, shows the outage in its stats and health, and loses nothing.
//!
//! A restart of the shared server at 127.0.0.1:5432 would break every other test running beside
//! this one, so the test starts a **private PostgreSQL cluster** of its own (`initdb` into a
//! temporary directory, `pg_ctl start` on a free port, as the `postgres` user when run as root)
//! and stops and starts *that* with `pg_ctl` while timers come due and a producer keeps
//! scheduling (the scenario: `overdue_testkit::outage`). Every timer whose `schedule` returned Ok
//! must fire, none early.
//!
//! The PostgreSQL binaries are looked up in `OVERDUE_PG_BIN` or `/usr/lib/postgresql/*/bin`;
//! under `CI` their absence fails the test.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use overdue_postgres::PgStore;


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
    overdue_testkit::outage::outage("postgres", Arc::new(store.clone()), || cluster.stop(), || cluster.pg_ctl_start()).await;
    assert!(store.healthy(), "the partition heartbeat did not recover");
}
