//! `--trigger`: an in-process trigger (`wheel`, `heap`, `scan`, run by the engine over any
//! store) or an external one (`keyspace`: Redis key-expiry events; `amqp`: RabbitMQ, TTL
//! cascade or delayed-message plugin by the URL's `mode=`; `kafka`: level topics), with the
//! store as the source of truth and its outbox on. The external trigger's own address is `--trigger-url` (or
//! `OVERDUE_TRIGGER_URL`), default [`TriggerChoice::default_url`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use overdue::{ExternalTrigger, TriggerKind};

/// Where the `keyspace` trigger finds Redis unless `--trigger-url` says otherwise.
pub const DEFAULT_TRIGGER_URL: &str = "redis://127.0.0.1:6379";
/// Where the `amqp` trigger finds RabbitMQ unless `--trigger-url` says otherwise.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?mode=dlx";
/// Where the `kafka` trigger finds its brokers unless `--trigger-url` says otherwise.
pub const DEFAULT_KAFKA_URL: &str = "kafka://127.0.0.1:9092";
/// Where the `rocketmq` trigger finds its name server unless `--trigger-url` says otherwise.
pub const DEFAULT_ROCKETMQ_URL: &str = "rocketmq://127.0.0.1:9876";

/// A value of `--trigger`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerChoice {
    /// The engine's own wheel, heap or scan.
    InProcess(TriggerKind),
    /// Redis key-expiry events (`overdue_redis::KeyspaceTrigger`).
    Keyspace,
    /// RabbitMQ (`overdue_rabbitmq::AmqpTrigger`), `mode=dlx` or `mode=delayed`.
    Amqp,
    /// Kafka (`overdue_kafka::KafkaTrigger`): power-of-two level topics.
    Kafka,
    /// RocketMQ (`overdue_rocketmq::RocketTrigger`): timer messages or delay levels.
    Rocketmq,
}

impl FromStr for TriggerChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keyspace" => Ok(TriggerChoice::Keyspace),
            "amqp" => Ok(TriggerChoice::Amqp),
            "kafka" => Ok(TriggerChoice::Kafka),
            "rocketmq" => Ok(TriggerChoice::Rocketmq),
            other => other
                .parse::<TriggerKind>()
                .map(TriggerChoice::InProcess)
                .map_err(|_| format!("unknown trigger {other:?}: expected wheel, heap, scan, keyspace, amqp, kafka or rocketmq")),
        }
    }
}

impl fmt::Display for TriggerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TriggerChoice::InProcess(k) => k.fmt(f),
            TriggerChoice::Keyspace => f.write_str("keyspace"),
            TriggerChoice::Amqp => f.write_str("amqp"),
            TriggerChoice::Kafka => f.write_str("kafka"),
            TriggerChoice::Rocketmq => f.write_str("rocketmq"),
        }
    }
}

impl TriggerChoice {
    /// The in-process trigger for [`overdue::EngineConfig::trigger`] (unused, and the default,
    /// with an external trigger).
    pub fn kind(self) -> TriggerKind {
        match self {
            TriggerChoice::InProcess(k) => k,
            TriggerChoice::Keyspace | TriggerChoice::Amqp | TriggerChoice::Kafka | TriggerChoice::Rocketmq => {
                TriggerKind::default()
            }
        }
    }

    /// The external trigger's address when `--trigger-url` is not given.
    pub fn default_url(self) -> &'static str {
        match self {
            TriggerChoice::Amqp => DEFAULT_AMQP_URL,
            TriggerChoice::Kafka => DEFAULT_KAFKA_URL,
            TriggerChoice::Rocketmq => DEFAULT_ROCKETMQ_URL,
            _ => DEFAULT_TRIGGER_URL,
        }
    }

    /// The trigger a broker URL given as `--backend` stands for (`amqp://…`, `kafka://…`: an
    /// SQLite store with its outbox plus that trigger on that URL), or `None` for a store URL.
    pub fn for_backend_url(url: &str) -> Option<TriggerChoice> {
        if url.starts_with("amqp://") {
            Some(TriggerChoice::Amqp)
        } else if url.starts_with("kafka://") {
            Some(TriggerChoice::Kafka)
        } else if url.starts_with("rocketmq://") {
            Some(TriggerChoice::Rocketmq)
        } else {
            None
        }
    }

    /// True for a trigger outside the process (the store then needs its outbox).
    pub fn is_external(self) -> bool {
        !matches!(self, TriggerChoice::InProcess(_))
    }

    /// The store URL with what the trigger needs: for an external trigger over SQLite,
    /// PostgreSQL or MySQL, the outbox on (`outbox=true`) unless the URL sets it. Redis has no
    /// outbox; the engine then refuses to start with a clear error.
    pub fn store_url(self, url: &str) -> String {
        let has_outbox = ["sqlite:", "postgres://", "postgresql://", "mysql://"].iter().any(|s| url.starts_with(s));
        if self.is_external() && has_outbox && !url.contains("outbox=") {
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
            #[cfg(feature = "kafka")]
            TriggerChoice::Kafka => kafka(url).map(|t| Some(Arc::new(t) as Arc<dyn ExternalTrigger>)),
            #[cfg(not(feature = "kafka"))]
            TriggerChoice::Kafka => kafka(url).map(|never| match never {}),
            #[cfg(feature = "rocketmq")]
            TriggerChoice::Rocketmq => rocketmq(url).map(|t| Some(Arc::new(t) as Arc<dyn ExternalTrigger>)),
            #[cfg(not(feature = "rocketmq"))]
            TriggerChoice::Rocketmq => rocketmq(url).map(|never| match never {}),
        }
    }

    /// Deletes what the external trigger still holds for timers nobody needs any more (the
    /// keyspace trigger's waiting expiry keys of its prefix; the amqp trigger's exchanges and
    /// queues of its prefix, with their messages; the kafka trigger's topics and group);
    /// returns how many.
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
            // Nothing to delete: a Kafka message cannot be withdrawn, and a stale notice is
            // dropped by the generation fence when it arrives (`KafkaTrigger::purge` deletes
            // the topics, for when no node of the prefix runs any more).
            TriggerChoice::Kafka => kafka(url).map(|_| 0),
            // The same for RocketMQ: its messages cannot be withdrawn either.
            TriggerChoice::Rocketmq => rocketmq(url).map(|_| 0),
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

#[cfg(feature = "kafka")]
fn kafka(url: &str) -> anyhow::Result<overdue::kafka::KafkaTrigger> {
    Ok(overdue::kafka::KafkaTrigger::from_url(url)?)
}

#[cfg(not(feature = "kafka"))]
fn kafka(_url: &str) -> anyhow::Result<std::convert::Infallible> {
    anyhow::bail!("the kafka trigger needs the kafka feature, which this build of overdue does not have")
}

#[cfg(feature = "rocketmq")]
fn rocketmq(url: &str) -> anyhow::Result<overdue::rocketmq::RocketTrigger> {
    Ok(overdue::rocketmq::RocketTrigger::from_url(url)?)
}

#[cfg(not(feature = "rocketmq"))]
fn rocketmq(_url: &str) -> anyhow::Result<std::convert::Infallible> {
    anyhow::bail!("the rocketmq trigger needs the rocketmq feature, which this build of overdue does not have")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trigger_name_parses_and_prints_back() {
        for name in ["wheel", "heap", "scan", "keyspace", "amqp", "kafka", "rocketmq"] {
            let t: TriggerChoice = name.parse().expect(name);
            assert_eq!(t.to_string(), name);
        }
        let e = "pulsar".parse::<TriggerChoice>().expect_err("unknown");
        assert!(e.contains("keyspace") && e.contains("amqp") && e.contains("kafka"), "{e}");
        assert_eq!(TriggerChoice::for_backend_url("kafka://127.0.0.1:9092"), Some(TriggerChoice::Kafka));
        assert_eq!(TriggerChoice::for_backend_url("rocketmq://127.0.0.1:9876"), Some(TriggerChoice::Rocketmq));
        assert_eq!(TriggerChoice::for_backend_url("amqp://h/%2f?mode=dlx"), Some(TriggerChoice::Amqp));
        assert_eq!(TriggerChoice::for_backend_url("sqlite:/a"), None);
        assert!(TriggerChoice::Amqp.default_url().starts_with("amqp://"));
    }

    #[test]
    fn an_external_trigger_turns_the_sql_outbox_on() {
        let k = TriggerChoice::Keyspace;
        assert_eq!(k.store_url("sqlite:/tmp/a.db"), "sqlite:/tmp/a.db?outbox=true");
        assert_eq!(k.store_url("sqlite:/tmp/a.db?durability=fast"), "sqlite:/tmp/a.db?durability=fast&outbox=true");
        assert_eq!(k.store_url("sqlite:/tmp/a.db?outbox=false"), "sqlite:/tmp/a.db?outbox=false");
        assert_eq!(TriggerChoice::InProcess(TriggerKind::Wheel).store_url("sqlite:/a"), "sqlite:/a");
        assert_eq!(TriggerChoice::Kafka.store_url("postgres://h/test"), "postgres://h/test?outbox=true");
        assert_eq!(TriggerChoice::Amqp.store_url("mysql://root@h/test?node=a"), "mysql://root@h/test?node=a&outbox=true");
        assert_eq!(TriggerChoice::Kafka.store_url("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn printed_trigger_urls_hide_the_password() {
        assert_eq!(redact("redis://u:pw@127.0.0.1:6379?prefix=a"), "redis://u:***@127.0.0.1:6379?prefix=a");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
