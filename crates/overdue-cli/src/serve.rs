//! `overdue serve`: the HTTP API with the order service on the embedded store.
//!
//! `--trigger amqp --trigger-url amqp://…` (or `--backend amqp://…`, which means the default
//! SQLite store plus that broker, as in `bench`) lets RabbitMQ do the waiting: the SQLite store
//! gets its outbox, an order's timers and their notices commit in the order's transaction, the
//! engine's relay publishes them with publisher confirms and fires what the broker delivers
//! back (see `docs/rabbitmq.md`). A bad trigger name or URL, or a broker that cannot be reached,
//! stops `serve` before it listens, with the reason.

use std::net::SocketAddr;

/// The `overdue` binary's allocator (this attribute applies to the whole binary, whichever
/// module holds it). Under `overdue bench orders` glibc's malloc/free were about 30 % of the
/// server's tokio threads' instructions and 7 % of the SQLite writer's; mimalloc's thread-local
/// free lists cost a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use overdue_server::{App, AppConfig};

use crate::trigger::TriggerChoice;

/// Options of `overdue serve`; every flag can also be set by its `OVERDUE_*` variable.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. A non-loopback address requires --token.
    #[arg(long, env = "OVERDUE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Store URL. A broker URL (`amqp://…?mode=dlx`) means the default SQLite store (with its
    /// outbox) plus that broker as the trigger, like --trigger amqp --trigger-url URL.
    #[arg(long, env = "OVERDUE_BACKEND", default_value = overdue::DEFAULT_STORE_URL)]
    backend: String,
    /// With a redis:// backend, where the orders live (sqlite:PATH); default
    /// sqlite:overdue-data/orders.db. Their timer changes are relayed to Redis through an
    /// outbox table written in each order's transaction.
    #[arg(long, env = "OVERDUE_ORDERS")]
    orders: Option<String>,
    /// Trigger: wheel, heap, scan (in-process), amqp (RabbitMQ at --trigger-url), kafka (level
    /// topics at --trigger-url) or keyspace (Redis key-expiry events at --trigger-url); an
    /// external trigger needs a SQL backend (sqlite:, postgres://, mysql://), whose outbox is then
    /// turned on.
    #[arg(long, env = "OVERDUE_TRIGGER", default_value = "wheel")]
    trigger: TriggerChoice,
    /// Where an external trigger connects (amqp: an amqp:// URL, default
    /// amqp://guest:guest@127.0.0.1:5672/%2f?mode=dlx, exchanges and queues named after its
    /// `prefix=`, default `overdue`; keyspace: a redis:// URL, default redis://127.0.0.1:6379).
    #[arg(long, env = "OVERDUE_TRIGGER_URL")]
    trigger_url: Option<String>,
    /// Bearer token required on every API call (except /healthz and /openapi.json).
    #[arg(long, env = "OVERDUE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// HMAC-SHA256 key for the X-Overdue-Signature header of callbacks and webhooks.
    #[arg(long, env = "OVERDUE_CALLBACK_SECRET", hide_env_values = true)]
    callback_secret: Option<String>,
    /// Where order notifications (reminders) are POSTed; logged when unset.
    #[arg(long, env = "OVERDUE_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Payment timeout of an order, seconds.
    #[arg(long, env = "OVERDUE_PAY_TIMEOUT_SECS", default_value_t = 30 * 60)]
    pay_timeout_secs: u64,
    /// Reminder this many seconds before the payment deadline.
    #[arg(long, env = "OVERDUE_REMIND_BEFORE_SECS", default_value_t = 5 * 60)]
    remind_before_secs: u64,
    /// Receipt is confirmed automatically this many seconds after shipping.
    #[arg(long, env = "OVERDUE_AUTO_CONFIRM_SECS", default_value_t = 7 * 86_400)]
    auto_confirm_secs: u64,
    /// An unanswered refund request is approved after this many seconds.
    #[arg(long, env = "OVERDUE_REFUND_AUTO_APPROVE_SECS", default_value_t = 3 * 86_400)]
    refund_auto_approve_secs: u64,
    /// Largest request body, bytes.
    #[arg(long, env = "OVERDUE_BODY_LIMIT", default_value_t = 64 * 1024)]
    body_limit: usize,
}

pub async fn run(mut args: ServeArgs) -> anyhow::Result<ExitCode> {
    // An empty OVERDUE_TOKEN / OVERDUE_CALLBACK_SECRET means "not set".
    args.token = args.token.filter(|t| !t.is_empty());
    args.callback_secret = args.callback_secret.filter(|t| !t.is_empty());
    args.webhook_url = args.webhook_url.filter(|t| !t.is_empty());
    args.trigger_url = args.trigger_url.filter(|t| !t.is_empty());
    overdue_server::check_bind(args.listen, args.token.as_deref())?;
    // A broker URL as the backend: the default SQLite store and that trigger.
    if let Some(t) = TriggerChoice::for_backend_url(&args.backend) {
        if args.trigger_url.is_some() {
            anyhow::bail!("--backend {} names the trigger's broker already; drop --trigger-url", overdue::redact_url(&args.backend));
        }
        args.trigger = t;
        args.trigger_url = Some(std::mem::replace(&mut args.backend, overdue::DEFAULT_STORE_URL.to_owned()));
    }
    if !args.trigger.is_external() && args.trigger_url.is_some() {
        anyhow::bail!("--trigger-url is for an external trigger (amqp, keyspace); --trigger {} runs in the process", args.trigger);
    }
    let trigger_url = args.trigger_url.clone().unwrap_or_else(|| args.trigger.default_url().to_owned());
    // Fails here, before anything is opened, on a URL the trigger cannot use.
    let external = args.trigger.external(&trigger_url).with_context(|| format!("--trigger {}", args.trigger))?;
    let trigger_text = if args.trigger.is_external() {
        format!("{} at {}", args.trigger, overdue::redact_url(&trigger_url))
    } else {
        args.trigger.to_string()
    };
    let mut cfg = AppConfig {
        backend_url: args.backend.clone(),
        orders_url: args.orders.clone().filter(|o| !o.is_empty()),
        trigger: args.trigger.kind(),
        external_trigger: external,
        token: args.token,
        callback_secret: args.callback_secret,
        webhook_url: args.webhook_url,
        body_limit: args.body_limit,
        ..AppConfig::default()
    };
    cfg.order.pay_timeout = Duration::from_secs(args.pay_timeout_secs);
    cfg.order.remind_before = Duration::from_secs(args.remind_before_secs);
    cfg.order.auto_confirm_after = Duration::from_secs(args.auto_confirm_secs);
    cfg.order.refund_auto_approve_after = Duration::from_secs(args.refund_auto_approve_secs);
    let app = App::start(cfg)
        .await
        .with_context(|| format!("starting on {} (trigger {trigger_text})", overdue::redact_url(&args.backend)))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("overdue serving on http://{} (backend {}, trigger {trigger_text})", args.listen, overdue::redact_url(&args.backend));
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    };
    overdue_server::serve(listener, app.router(), shutdown).await.context("serving")?;
    eprintln!("stopping: letting running handlers finish");
    let report = app.shutdown().await;
    eprintln!("stopped ({} released for re-delivery)", report.released);
    Ok(ExitCode::SUCCESS)
}
