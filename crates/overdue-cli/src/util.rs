//! Small things the subcommands share.

use std::sync::Arc;

use futures::future::BoxFuture;
use overdue::{Clock, SystemClock};

/// Logs to stderr, `warn` and above unless `RUST_LOG` says otherwise.
pub fn init_tracing() {
    // Unless RUST_LOG says otherwise: warnings, but only errors from the RocketMQ client's
    // crates. At every stop they warn in pages of JSON that their tasks "did not shut down
    // cleanly" (the trigger drops the client's runtime without waiting out the client's own
    // shutdown, see overdue_rocketmq's `close`), and about routes of topics not created yet;
    // what matters to a user (the broker not answering, a send refused) the trigger itself
    // reports, with the broker's answer.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,rocketmq_client_rust=error,rocketmq_transport=error,rocketmq_runtime=error")
    });
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// The system clock shifted by a fixed offset: lets a benchmark make timers that were scheduled
/// an hour ahead due all at once, without waiting an hour.
#[derive(Debug, Clone, Copy)]
pub struct OffsetClock {
    pub offset_ms: i64,
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms
    }
    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()> {
        SystemClock.sleep_until(deadline_ms - self.offset_ms)
    }
}

/// The system clock as a shareable trait object.
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// Resident and peak resident memory of this process in bytes, from /proc (0 elsewhere).
pub fn rss_bytes() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return (0, 0) };
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }
}
