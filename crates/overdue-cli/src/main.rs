//! The `overdue` command. Parses options and hands over; the work is in the modules.

mod admin;
mod bench;
mod bench_orders;
mod crash_worker;
mod demo;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod node_worker;
mod plot;
mod serve;
mod trigger;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// overdue: timers that fire once, on time.
#[derive(Debug, Parser)]
#[command(name = "overdue", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The HTTP API with the order service (default: 127.0.0.1:8080, embedded SQLite).
    Serve(serve::ServeArgs),
    /// Measure schedule and fire throughput, lateness and memory on a backend.
    Bench(bench::BenchArgs),
    /// A simulated shop on the embedded store: orders close on time unless paid.
    Demo(demo::DemoArgs),
    /// Orders of a running server.
    Orders(admin::OrdersArgs),
    /// Timers of a running server.
    Timers(admin::TimersArgs),
    /// Dead letters of a running server.
    #[command(name = "dead-letters")]
    DeadLetters(admin::DeadLettersArgs),
    /// Used by the crash-safety test: schedules and fires timers until killed.
    #[command(hide = true, name = "crash-worker")]
    CrashWorker(crash_worker::CrashArgs),
    /// Used by the many-nodes tests: one engine node on a shared store, until killed.
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    #[command(hide = true, name = "node-worker")]
    NodeWorker(node_worker::NodeArgs),
}

/// Sets the broker clients' settings that only the environment can carry
/// (`overdue_rocketmq::CLIENT_ENVIRONMENT`), unless the user set them.
fn set_client_environment() {
    #[cfg(feature = "rocketmq")]
    for (name, value) in overdue::rocketmq::CLIENT_ENVIRONMENT {
        if std::env::var_os(name).is_none() {
            // SAFETY: the first statement of `main`: no other thread exists yet that could
            // read the environment while it changes.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(name, value)
            };
        }
    }
}

fn main() -> ExitCode {
    set_client_environment();
    let cli = Cli::parse();
    util::init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Orders(cmd) => admin::orders(cmd).await,
            Command::Timers(cmd) => admin::timers(cmd).await,
            Command::DeadLetters(cmd) => admin::dead_letters(cmd).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::CrashWorker(args) => crash_worker::run(args).await,
            #[cfg(any(feature = "postgres", feature = "mysql"))]
            Command::NodeWorker(args) => node_worker::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
