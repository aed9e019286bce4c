//! Admin subcommands against a running `overdue serve`: they call the same HTTP API as curl
//! would, so they get the same validation and errors.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

/// Where the server is and how to authenticate.
#[derive(Debug, Args)]
pub struct Remote {
    /// Base URL of the running server.
    #[arg(long, env = "OVERDUE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "OVERDUE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// `overdue orders [--server URL] [--token T] …`
#[derive(Debug, Args)]
pub struct OrdersArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    cmd: OrdersCmd,
}

/// `overdue timers [--server URL] [--token T] …`
#[derive(Debug, Args)]
pub struct TimersArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    cmd: TimersCmd,
}

/// `overdue dead-letters [--server URL] [--token T] …`
#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    cmd: DeadLettersCmd,
}

/// Order commands.
#[derive(Debug, Subcommand)]
pub enum OrdersCmd {
    /// One order with its events and timers.
    Get { id: String },
    /// Orders, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        buyer: Option<String>,
        #[arg(long)]
        before: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Timer commands.
#[derive(Debug, Subcommand)]
pub enum TimersCmd {
    /// Timers in due order.
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One timer.
    Get { queue: String, key: String },
    /// Cancel a timer.
    Cancel { queue: String, key: String },
    /// Make a timer due now.
    FireNow { queue: String, key: String },
}

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCmd {
    /// Dead letters in id order.
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Put a dead letter back, due now.
    Replay { id: i64 },
}

fn enc(s: &str) -> String {
    // Path segments and query values: percent-encode everything outside the unreserved set.
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v)))).collect();
    if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) }
}

/// Writes `text` and a newline to stdout. A reader that went away (`overdue orders list | head`)
/// is not an error: the output was not wanted any more. `println!` would panic there.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(e).context("cannot write to stdout")),
        _ => Ok(()),
    }
}

async fn call(remote: &Remote, method: reqwest::Method, path: &str) -> anyhow::Result<ExitCode> {
    let url = format!("{}{}", remote.server.trim_end_matches('/'), path);
    let mut req = reqwest::Client::new().request(method, &url);
    if let Some(t) = &remote.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.with_context(|| format!("cannot reach {url}; is `overdue serve` running?"))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        print_out(&serde_json::to_string_pretty(&body)?)?;
        Ok(ExitCode::SUCCESS)
    } else {
        let code = body.pointer("/error/code").and_then(Value::as_str).unwrap_or("error");
        let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("");
        eprintln!("error: {status}: {code}: {message}");
        Ok(ExitCode::FAILURE)
    }
}

pub async fn orders(args: OrdersArgs) -> anyhow::Result<ExitCode> {
    let OrdersArgs { remote, cmd } = args;
    use reqwest::Method;
    match cmd {
        OrdersCmd::Get { id } => call(&remote, Method::GET, &format!("/v1/orders/{}", enc(&id))).await,
        OrdersCmd::List { status, buyer, before, limit } => {
            let q = query(&[("status", status), ("buyer", buyer), ("before", before), ("limit", Some(limit.to_string()))]);
            call(&remote, Method::GET, &format!("/v1/orders{q}")).await
        }
    }
}

pub async fn timers(args: TimersArgs) -> anyhow::Result<ExitCode> {
    let TimersArgs { remote, cmd } = args;
    use reqwest::Method;
    match cmd {
        TimersCmd::List { queue, limit } => {
            call(&remote, Method::GET, &format!("/v1/timers{}", query(&[("queue", queue), ("limit", Some(limit.to_string()))]))).await
        }
        TimersCmd::Get { queue, key } => call(&remote, Method::GET, &format!("/v1/timers/{}/{}", enc(&queue), enc(&key))).await,
        TimersCmd::Cancel { queue, key } => {
            call(&remote, Method::DELETE, &format!("/v1/timers/{}/{}", enc(&queue), enc(&key))).await
        }
        TimersCmd::FireNow { queue, key } => {
            call(&remote, Method::POST, &format!("/v1/timers/{}/{}/fire-now", enc(&queue), enc(&key))).await
        }
    }
}

pub async fn dead_letters(args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let DeadLettersArgs { remote, cmd } = args;
    use reqwest::Method;
    match cmd {
        DeadLettersCmd::List { queue, limit } => {
            call(&remote, Method::GET, &format!("/v1/dead-letters{}", query(&[("queue", queue), ("limit", Some(limit.to_string()))]))).await
        }
        DeadLettersCmd::Replay { id } => call(&remote, Method::POST, &format!("/v1/dead-letters/{id}/replay")).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_and_query_values_are_percent_encoded() {
        assert_eq!(enc("order.close"), "order.close");
        assert_eq!(enc("a/b c?"), "a%2Fb%20c%3F");
        assert_eq!(query(&[("queue", Some("q 1".into())), ("x", None)]), "?queue=q%201");
        assert_eq!(query(&[("x", None)]), "");
    }
}
