//! `--trigger`: an in-process trigger (`wheel`, `heap`, `scan`, run by the engine over any
//! store) or an external one (`keyspace`: Redis key-expiry events; `amqp`: RabbitMQ, TTL
//! cascade or delayed-message plugin by the URL's `mode=`), with the store as the source of truth
//! and its outbox on. The external trigger's own address is `--trigger-url` (or
//! `OVERDUE_TRIGGER_URL`), default [`TriggerChoice::default_url`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use overdue::{ExternalTrigger, TriggerKind};

/// Where the `keyspace` trigger finds Redis unless `--trigger-url` says otherwise.
pub const DEFAULT_TRIGGER_URL: &str = "redis://127.0.0.1:6379";
/// Where the `amqp` trigger finds RabbitMQ unless `--trigger-url` says otherwise.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?mode=dlx";

/// A value of `--trigger`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerChoice {
    /// The engine's own wheel, heap or scan.
    InProcess(TriggerKind),
    /// Redis key-expiry events (`overdue_redis::KeyspaceTrigger`).
    Keyspace,
    /// RabbitMQ (`overdue_rabbitmq::AmqpTrigger`), `mode=dlx` or `mode=delayed`.
    Amqp,
}

impl FromStr for TriggerChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keyspace" => Ok(TriggerChoice::Keyspace),
            "amqp" => Ok(TriggerChoice::Amqp),
            other => other
                .parse::<TriggerKind>()
                .map(TriggerChoice::InProcess)
                .map_err(|_| format!("unknown trigger {other:?}: expected wheel, heap, scan, keyspace or amqp")),
        }
    }
}

impl fmt::Display for TriggerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TriggerChoice::InProcess(k) => k.fmt(f),
            TriggerChoice::Keyspace => f.write_str("keyspace"),
            TriggerChoice::Amqp => f.write_str("amqp"),
        }
    }
}

impl TriggerChoice {
    /// The in-process trigger for [`overdue::EngineConfig::trigger`] (unused, and the default,
    /// with an external trigger).
    pub fn kind(self) -> TriggerKind {
        match self {
            TriggerChoice::InProcess(k) => k,
            TriggerChoice::Keyspace | TriggerChoice::Amqp => TriggerKind::default(),
        }
    }

    /// The external trigger's address when `--trigger-url` is not given.
    pub fn default_url(self) -> &'static str {
        match self {
            TriggerChoice::Amqp => DEFAULT_AMQP_URL,
            _ => DEFAULT_TRIGGER_URL,
        }
    }

    /// The trigger a broker URL given as `--backend` stands for (`amqp://…`: an SQLite store
    /// with its outbox plus the `amqp` trigger on that URL), or `None` for a store URL.
    pub fn for_backend_url(url: &str) -> Option<TriggerChoice> {
        url.starts_with("amqp://").then_some(TriggerChoice::Amqp)
    }

    /// True for a trigger outside the process (the store then needs its outbox).
    pub fn is_external(self) -> bool {
        !matches!(self, TriggerChoice::InProcess(_))
    }

    /// The store URL with what the trigger needs: for an external trigger over SQLite, the
    /// outbox on (`outbox=true`) unless the URL sets it. Other stores have no outbox yet; the
    /// engine then refuses to start with a clear error.
    pub fn store_url(self, url: &str) -> String {
        if self.is_external() && url.starts_with("sqlite:") && !url.contains("outbox=") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}outbox=true")
        } else {
            url.to_owned()
        }
    }

    /// A new external trigger on `url` (one per engine), or `None` for an in-process one.
    pub fn external(self, url: &str) -> anyhow::Result<Option<Arc<dyn ExternalTrigger>>> {
        match self {
            TriggerChoice::InProcess(_) => Ok(None),
            #[cfg(feature = "redis")]
            TriggerChoice::Keyspace => keyspace(url).map(|t| Some(Arc::new(t) as Arc<dyn ExternalTrigger>)),
            #[cfg(not(feature = "redis"))]
            TriggerChoice::Keyspace => keyspace(url).map(|never| match never {}),
            #[cfg(feature = "rabbitmq")]
            TriggerChoice::Amqp => amqp(url).map(|t| Some(Arc::new(t) as Arc<dyn ExternalTrigger>)),
            #[cfg(not(feature = "rabbitmq"))]
            TriggerChoice::Amqp => amqp(url).map(|never| match never {}),
        }
    }

    /// Deletes what the external trigger still holds for timers nobody needs any more (the
    /// keyspace trigger's waiting expiry keys of its prefix; the amqp trigger's exchanges and
    /// queues of its prefix, with their messages); returns how many.
    pub async fn purge(self, url: &str) -> anyhow::Result<u64> {
        match self {
            TriggerChoice::InProcess(_) => Ok(0),
            #[cfg(feature = "redis")]
            TriggerChoice::Keyspace => Ok(keyspace(url)?.purge().await?),
            #[cfg(not(feature = "redis"))]
            TriggerChoice::Keyspace => keyspace(url).map(|_| 0),
            #[cfg(feature = "rabbitmq")]
            TriggerChoice::Amqp => Ok(amqp(url)?.purge().await?),
            #[cfg(not(feature = "rabbitmq"))]
            TriggerChoice::Amqp => amqp(url).map(|_| 0),
        }
    }
}

/// `url` without its password (`scheme://user:***@host…`), for printing.
pub fn redact(url: &str) -> String {
    overdue::redact_url(url)
}

#[cfg(feature = "redis")]
fn keyspace(url: &str) -> anyhow::Result<overdue::redis::KeyspaceTrigger> {
    Ok(overdue::redis::KeyspaceTrigger::from_url(url)?)
}

#[cfg(not(feature = "redis"))]
fn keyspace(_url: &str) -> anyhow::Result<std::convert::Infallible> {
    anyhow::bail!("the keyspace trigger needs the redis feature, which this build of overdue does not have")
}

#[cfg(feature = "rabbitmq")]
fn amqp(url: &str) -> anyhow::Result<overdue::rabbitmq::AmqpTrigger> {
    Ok(overdue::rabbitmq::AmqpTrigger::from_url(url)?)
}

#[cfg(not(feature = "rabbitmq"))]
fn amqp(_url: &str) -> anyhow::Result<std::convert::Infallible> {
    anyhow::bail!("the amqp trigger needs the rabbitmq feature, which this build of overdue does not have")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trigger_name_parses_and_prints_back() {
        for name in ["wheel", "heap", "scan", "keyspace", "amqp"] {
            let t: TriggerChoice = name.parse().expect(name);
            assert_eq!(t.to_string(), name);
        }
        let e = "kafka".parse::<TriggerChoice>().expect_err("unknown");
        assert!(e.contains("keyspace") && e.contains("amqp"), "{e}");
        assert_eq!(TriggerChoice::for_backend_url("amqp://h/%2f?mode=dlx"), Some(TriggerChoice::Amqp));
        assert_eq!(TriggerChoice::for_backend_url("sqlite:/a"), None);
        assert!(TriggerChoice::Amqp.default_url().starts_with("amqp://"));
    }

    #[test]
    fn an_external_trigger_turns_the_sqlite_outbox_on() {
        let k = TriggerChoice::Keyspace;
        assert_eq!(k.store_url("sqlite:/tmp/a.db"), "sqlite:/tmp/a.db?outbox=true");
        assert_eq!(k.store_url("sqlite:/tmp/a.db?durability=fast"), "sqlite:/tmp/a.db?durability=fast&outbox=true");
        assert_eq!(k.store_url("sqlite:/tmp/a.db?outbox=false"), "sqlite:/tmp/a.db?outbox=false");
        assert_eq!(TriggerChoice::InProcess(TriggerKind::Wheel).store_url("sqlite:/a"), "sqlite:/a");
    }

    #[test]
    fn printed_trigger_urls_hide_the_password() {
        assert_eq!(redact("redis://u:pw@127.0.0.1:6379?prefix=a"), "redis://u:***@127.0.0.1:6379?prefix=a");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
