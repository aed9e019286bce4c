//! Engine and per-queue configuration, with the defaults documented on each field.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use overdue_core::Error;

/// Which mechanism wakes the engine when timers come due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TriggerKind {
    /// In-process hierarchical timing wheel (overdue-wheel) over the near future. The default.
    #[default]
    Wheel,
    /// In-process binary heap over the near future: the JDK `DelayQueue` approach.
    Heap,
    /// A periodic indexed query for due timers: the Quartz / Spring-Task scheduled scan.
    Scan,
}

impl TriggerKind {
    /// All triggers, for tests and help texts.
    pub const ALL: [TriggerKind; 3] = [TriggerKind::Wheel, TriggerKind::Heap, TriggerKind::Scan];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Wheel => "wheel",
            TriggerKind::Heap => "heap",
            TriggerKind::Scan => "scan",
        }
    }
}

impl fmt::Display for TriggerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TriggerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "wheel" => Ok(TriggerKind::Wheel),
            "heap" => Ok(TriggerKind::Heap),
            "scan" => Ok(TriggerKind::Scan),
            other => Err(Error::Config(format!("unknown trigger {other:?}: expected wheel, heap or scan"))),
        }
    }
}

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Wake-up mechanism. Default: wheel.
    pub trigger: TriggerKind,
    /// How far ahead the wheel/heap hold timers in memory; later timers wait in the store and are
    /// paged in, in due order, as time advances. Memory is bounded by the timers due within this
    /// window (and by `max_resident`). Default: 30 s.
    pub horizon: Duration,
    /// Most timer references held in memory at once. Default: 1,000,000.
    pub max_resident: usize,
    /// Period of the scan trigger's query. Default: 1 s.
    pub scan_interval: Duration,
    /// How long a claim lasts before another node may fire the timer again. Handlers must finish
    /// well within it (see `QueueConfig::timeout`); a claim that waited in its queue until the
    /// handler could outlive the lease is released unrun and claimed afresh. Default: 60 s.
    pub lease: Duration,
    /// Most timers claimed in one store call. Default: 1024.
    pub claim_batch: u32,
    /// Most timers claimed and not yet settled, across all queues. Default: 8192.
    pub max_in_flight: usize,
    /// Period of the backstop sweep that claims timers overdue by more than `backstop_slack`
    /// that no trigger fired (a lost wake-up, an expired lease of a dead node). Default: 5 s.
    pub backstop_interval: Duration,
    /// How overdue an unclaimed timer must be before the backstop takes it. Default: 2 s.
    pub backstop_slack: Duration,
    /// Identity written into leases. Default: `<hostname-ish>-<pid>-<random>`.
    pub node_id: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            trigger: TriggerKind::Wheel,
            horizon: Duration::from_secs(30),
            max_resident: 1_000_000,
            scan_interval: Duration::from_secs(1),
            lease: Duration::from_secs(60),
            claim_batch: 1024,
            max_in_flight: 8192,
            backstop_interval: Duration::from_secs(5),
            backstop_slack: Duration::from_secs(2),
            node_id: None,
        }
    }
}

impl EngineConfig {
    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |m: String| Err(Error::Config(m));
        if self.horizon < Duration::from_millis(100) {
            return fail(format!("horizon {:?} is below the minimum of 100 ms", self.horizon));
        }
        if self.scan_interval < Duration::from_millis(1) {
            return fail("scan interval must be at least 1 ms".into());
        }
        if self.lease < Duration::from_secs(1) {
            return fail(format!("lease {:?} is below the minimum of 1 s", self.lease));
        }
        if self.claim_batch == 0 || self.max_in_flight == 0 || self.max_resident == 0 {
            return fail("claim_batch, max_in_flight and max_resident must be positive".into());
        }
        Ok(())
    }
}

/// Settings of one handler queue.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// Attempts before a timer is dead-lettered (the first delivery counts). Default: 5.
    pub max_attempts: u32,
    /// Backoff after the first failure; doubles per failure. Default: 1 s.
    pub backoff_base: Duration,
    /// Longest backoff. Default: 10 min.
    pub backoff_max: Duration,
    /// Fraction of the backoff that is randomised away (0 = none, 1 = full jitter). Default: 0.2.
    pub jitter: f64,
    /// A handler running longer than this counts as failed. Default: 30 s.
    pub timeout: Duration,
    /// Handlers of this queue running at once. Default: 256.
    pub concurrency: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            jitter: 0.2,
            timeout: Duration::from_secs(30),
            concurrency: 256,
        }
    }
}

impl QueueConfig {
    /// Checks the values.
    pub fn validate(&self, lease: Duration) -> Result<(), Error> {
        if self.max_attempts == 0 || self.concurrency == 0 {
            return Err(Error::Config("max_attempts and concurrency must be positive".into()));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::Config(format!("jitter {} must be within 0..=1", self.jitter)));
        }
        if self.timeout >= lease {
            return Err(Error::Config(format!(
                "handler timeout {:?} must be shorter than the lease {:?}, or a slow handler could be fired twice",
                self.timeout, lease
            )));
        }
        Ok(())
    }

    /// Backoff before the retry that follows `failures` failed attempts (1 = after the first):
    /// `base * 2^(failures-1)`, capped at `backoff_max`, then shortened by up to `jitter` of itself.
    /// `unit` is a random number in `0..1`.
    pub fn backoff(&self, failures: u32, unit: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(32);
        let raw = self.backoff_base.saturating_mul(1u32 << exp.min(31)).min(self.backoff_max);
        raw.mul_f64(1.0 - self.jitter * unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_down_only() {
        let q = QueueConfig { jitter: 0.0, ..QueueConfig::default() };
        assert_eq!(q.backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(q.backoff(2, 0.5), Duration::from_secs(2));
        assert_eq!(q.backoff(4, 0.5), Duration::from_secs(8));
        assert_eq!(q.backoff(40, 0.5), Duration::from_secs(600));
        let j = QueueConfig { jitter: 0.5, ..QueueConfig::default() };
        assert_eq!(j.backoff(2, 1.0), Duration::from_secs(1));
        assert_eq!(j.backoff(2, 0.0), Duration::from_secs(2));
    }

    #[test]
    fn trigger_names_round_trip_and_bad_names_are_clear() {
        for t in TriggerKind::ALL {
            assert_eq!(t.as_str().parse::<TriggerKind>().expect("parses"), t);
        }
        let err = "wheeel".parse::<TriggerKind>().expect_err("bad");
        assert!(err.to_string().contains("expected wheel, heap or scan"), "{err}");
    }

    #[test]
    fn timeouts_longer_than_the_lease_are_refused() {
        let q = QueueConfig { timeout: Duration::from_secs(90), ..QueueConfig::default() };
        assert!(q.validate(Duration::from_secs(60)).is_err());
        assert!(QueueConfig::default().validate(Duration::from_secs(60)).is_ok());
    }
}
