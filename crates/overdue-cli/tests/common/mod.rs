//! What several CLI tests share: the RabbitMQ broker they use and the child-output reader of
//! the crash tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// True when the broker answers; under `CI` an unreachable broker panics, elsewhere the test is
/// skipped.
pub fn broker_reachable(url: &str) -> bool {
    let addr = address(url);
    let ok = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but the RabbitMQ broker at {addr} cannot be reached");
        }
        eprintln!("skipped: no RabbitMQ at {addr}; set CI to make this a failure");
    }
    ok
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

