//! What several CLI tests share: the RabbitMQ broker they use, and the `overdue crash-worker`
//! harness of the SIGKILL tests (spawn a worker, read its complete lines, drain the last one,
//! read the effects it left).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A port on 127.0.0.1 that was free a moment ago (the caller's server binds it next; another
/// process may take it in between, which is rare).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address of the ephemeral port").port()
}

/// The broker: `OVERDUE_TEST_AMQP`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn server_url() -> String {
    std::env::var("OVERDUE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `host:port` of an `amqp://` URL.
pub fn address(url: &str) -> String {
    let authority = url.trim_start_matches("amqp://").split(['/', '?']).next().unwrap_or("127.0.0.1:5672");
    let host = authority.rsplit('@').next().unwrap_or(authority);
    if host.contains(':') { host.to_owned() } else { format!("{host}:5672") }
}

/// True when `addr` accepts a TCP connection within 5 s. Under `CI` an unreachable server
/// panics (naming `what` and how to start it), elsewhere the test is skipped with a message.
pub fn reachable(what: &str, addr: &str, start_with: &str) -> bool {
    let ok = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but the {what} at {addr} cannot be reached ({start_with})");
        }
        eprintln!("skipped: no {what} at {addr} ({start_with}); set CI to make this a failure");
    }
    ok
}

/// True when the RabbitMQ broker at `url` answers; see [`reachable`].
pub fn broker_reachable(url: &str) -> bool {
    reachable("RabbitMQ broker", &address(url), "rabbitmq-server -detached")
}

/// The Kafka broker: `OVERDUE_TEST_KAFKA` (host:port), default 127.0.0.1:9092.
pub fn kafka_address() -> String {
    std::env::var("OVERDUE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// True when the Kafka broker answers; see [`reachable`].
pub fn kafka_reachable() -> bool {
    reachable("Kafka broker", &kafka_address(), "scripts/brokers.sh start kafka")
}

/// The RocketMQ name server: `OVERDUE_TEST_ROCKETMQ` (host:port), default 127.0.0.1:9876.
pub fn rocketmq_address() -> String {
    std::env::var("OVERDUE_TEST_ROCKETMQ").unwrap_or_else(|_| "127.0.0.1:9876".to_owned())
}

/// True when the RocketMQ name server answers; see [`reachable`].
pub fn rocketmq_reachable() -> bool {
    reachable("RocketMQ name server", &rocketmq_address(), "scripts/brokers.sh start rocketmq")
}

/// A `kafka://` trigger URL for one test: a fresh prefix (topics and consumer group).
pub fn fresh_kafka_url() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("kafka://{}?prefix=ot-{ms}-{:08x}&partitions=2", kafka_address(), rand::random::<u32>())
}

/// A trigger URL on `base` for one test: the broker, `mode=dlx`, a fresh prefix.
pub fn fresh_trigger_url(base: &str) -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}mode=dlx&prefix=ot-{ms}-{:08x}", rand::random::<u32>())
}

/// Sends each newline-terminated line of `stdout` (without the newline). A line cut short by
/// SIGKILL has no newline and is dropped: a truncated `ACK k 17000` would name a wrong due time,
/// and dropping it only makes the acknowledged set smaller, never wrong.
pub fn forward_complete_lines(stdout: ChildStdout, tx: &mpsc::Sender<String>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = String::new();
    loop {
        buf.clear();
        match reader.read_line(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let Some(line) = buf.strip_suffix('\n') else { return };
                if tx.send(line.to_owned()).is_err() {
                    return;
                }
            }
        }
    }
}


/// A worker child whose complete stdout lines arrive on `lines`; the channel disconnects when
/// the child's stdout closes, i.e. when it exits.
#[derive(Debug)]
pub struct Worker {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub reader: JoinHandle<()>,
}

/// `overdue crash-worker --db DB --prefix PREFIX --count COUNT --spread-ms SPREAD_MS` plus
/// `trigger_args` (e.g. `["--trigger", "wheel"]`), stderr into the file `stderr`.
pub fn spawn_worker(
    db: &Path,
    stderr: &Path,
    prefix: &str,
    count: u64,
    spread_ms: i64,
    trigger_args: &[&str],
    until_idle: bool,
) -> Worker {
    let stderr = File::create(stderr).expect("create the child's stderr file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_overdue"));
    cmd.arg("crash-worker")
        .arg("--db")
        .arg(db)
        .args(["--prefix", prefix])
        .args(trigger_args)
        .args(["--count", &count.to_string(), "--spread-ms", &spread_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    if until_idle {
        cmd.arg("--until-idle");
    }
    let mut child = cmd.spawn().expect("spawn overdue crash-worker");
    let stdout = child.stdout.take().expect("the child's stdout is piped");
    let (tx, lines) = mpsc::channel();
    let reader = thread::spawn(move || forward_complete_lines(stdout, &tx));
    Worker { child, lines, reader }
}

/// Collects the lines of a worker until it exits (`Ok`), or until `timeout`: then the worker is
/// killed and reaped and what it printed so far is the `Err`.
pub fn drain(worker: &mut Worker, timeout: Duration) -> Result<Vec<String>, Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    loop {
        match worker.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(lines),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                worker.child.kill().expect("SIGKILL the hung worker");
                worker.child.wait().expect("reap the hung worker");
                return Err(lines);
            }
        }
    }
}

/// Timers left in the worker's database, for a failure message.
pub fn timers_left(db: &Path) -> String {
    rusqlite::Connection::open(db)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM timers", [], |r| r.get::<_, i64>(0)))
        .map_or_else(|e| format!("<cannot count: {e}>"), |n| n.to_string())
}

/// `ACK <key> <due_at>` → `(key, due_at)`; `None` for the other lines the worker prints.
pub fn parse_ack(line: &str) -> Option<(String, i64)> {
    let rest = line.strip_prefix("ACK ")?;
    let mut parts = rest.split(' ');
    let (Some(key), Some(due), None) = (parts.next(), parts.next(), parts.next()) else {
        panic!("malformed ACK line from the worker: {line:?}");
    };
    let due = due.parse().unwrap_or_else(|e| panic!("bad due time in {line:?}: {e}"));
    Some((key.to_owned(), due))
}

pub fn read_stderr(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// The RNG seed: the variable `env` if set, else a random one.
pub fn seed(env: &str) -> u64 {
    match std::env::var(env) {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("{env}={s:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    }
}

/// One row of the worker's `effects` table.
#[derive(Debug, Clone, Copy)]
pub struct Effect {
    pub due_at: i64,
    pub fired_at: i64,
    pub deliveries: i64,
}

/// The `effects` table by key, and the keys that had more than one row.
pub fn read_effects(conn: &rusqlite::Connection) -> (BTreeMap<String, Effect>, Vec<String>) {
    let mut effects = BTreeMap::new();
    let mut duplicate_rows = Vec::new();
    let mut stmt = conn.prepare("SELECT key, due_at, fired_at, deliveries FROM effects").expect("prepare effects query");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, Effect { due_at: r.get(1)?, fired_at: r.get(2)?, deliveries: r.get(3)? })))
        .expect("query effects");
    for row in rows {
        let (key, effect) = row.expect("read an effect");
        if effects.insert(key.clone(), effect).is_some() {
            duplicate_rows.push(key);
        }
    }
    (effects, duplicate_rows)
}
