//! `sai-im`: parses settings, installs logging and runs the server until Ctrl-C / SIGTERM.
//!
//! # Layout
//! - [`config`]: settings from flags, environment and a TOML file.
//! - [`logs`]: the JSON log line format, with trace ids.
//! - [`metrics`]: the Prometheus endpoint and what it exports.
//! - [`reload`]: the config file read again on SIGHUP and when it changes; live settings applied.
//! - [`server`]: wires one deployment (the embedded default: SQLite, the services, the gateway
//!   and the in-process pipeline flows between them), or one process of a cluster (`services`,
//!   `gateway`, `task`), and runs it until shutdown.
//! - [`takeover`]: one embedded server per data directory, and `--take-over` to replace it.
//! - [`trace`]: OpenTelemetry traces over OTLP: one trace per chat message, across processes.

mod config;
mod logs;
mod metrics;
mod reload;
mod server;
mod takeover;
mod trace;
mod web;

use clap::Parser;
use config::{AdminCommand, Cli, Command, Config, LogFormat};
use std::io::Write;
use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: per-thread free lists, no `malloc_consolidate` sweeps; the
/// shards allocate and free a few buffers per message (see `results/pipeline/README.md`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = cli.overrides.clone();
    let cfg = match Config::load(cli.config.as_deref(), cli.overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sai-im: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = std::time::Duration::from_secs(cfg.shutdown_timeout_secs);
    let source = reload::Source {
        file: cli.config.clone(),
        overrides,
        log: Some(init_logging(&cfg)),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg, source),
        Command::Services => run_with(|rt| {
            rt.block_on(server::run_services(cfg, source, shutdown_signal(deadline), |b| {
                ready(&format!(
                    "services ready http={} grpc={} internal={} metrics={}",
                    b.http, b.grpc, b.internal, b.metrics
                ))
            }))
        }),
        Command::Gateway => run_with(|rt| {
            rt.block_on(server::run_gateway(cfg, source, shutdown_signal(deadline), |b| {
                ready(&format!(
                    "gateway ready ws={} engine={} node={} metrics={}",
                    b.ws, b.engine, b.node, b.metrics
                ))
            }))
        }),
        Command::Task => run_with(|rt| {
            rt.block_on(server::run_task(cfg, source, shutdown_signal(deadline), |b| {
                ready(&format!("task ready topic={} metrics={}", b.topic, b.metrics))
            }))
        }),
        Command::Admin { command } => admin(cfg, command),
    }
}

fn admin(cfg: Config, command: AdminCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sai-im: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        AdminCommand::Migrate => rt.block_on(sai_services::admin::migrate(
            &cfg.data_dir,
            cfg.database_url.as_deref(),
            cfg.chat_log.as_deref(),
        )),
        AdminCommand::SeedUsers {
            count,
            prefix,
            password,
        } => rt.block_on(sai_services::admin::seed_users(
            &cfg.data_dir,
            cfg.database_url.as_deref(),
            cfg.chat_log.as_deref(),
            cfg.bcrypt_cost,
            count,
            &prefix,
            &password,
        )),
    };
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sai-im admin: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr in the configured format, filtered by `log_level`, else RUST_LOG, else `info`
/// (the level was validated with the config).
/// The filter can be changed later through the handle returned (a configuration reload).
fn init_logging(cfg: &Config) -> reload::LogHandle {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(reload::log_filter(cfg.log_level.as_deref()));
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.event_format(logs::JsonLines)).init(),
    }
    handle
}

/// Prints the ready line (scripts and tests wait for it to learn the bound ports).
fn ready(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs `f` on a fresh runtime; its error, if any, ends the process with status 1.
fn run_with(f: impl FnOnce(&tokio::runtime::Runtime) -> Result<(), server::ServerError>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sai-im: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Entered, so that what `f` builds before `block_on` (the signal handlers) finds it.
    let _entered = rt.enter();
    match f(&rt) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sai-im: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: Config, source: reload::Source) -> ExitCode {
    let deadline = std::time::Duration::from_secs(cfg.shutdown_timeout_secs);
    run_with(|rt| {
        rt.block_on(server::run(cfg, source, shutdown_signal(deadline), |b| {
            ready(&format!(
                "sai-im ready ws={} http={} grpc={} engine={} metrics={}",
                b.ws, b.http, b.grpc, b.engine, b.metrics
            ))
        }))
    })
}

/// Resolves on Ctrl-C or SIGTERM, and from then on gives the graceful stop `deadline`: past
/// it the process exits with status 1 whatever is still running.
///
/// The handlers are installed when this is called (inside the runtime), not when the future is
/// first polled: a signal sent as soon as the ready line is out must stop the process
/// gracefully, not kill it with the default action.
fn shutdown_signal(deadline: std::time::Duration) -> impl std::future::Future<Output = ()> {
    let signalled = signal_received();
    async move {
        signalled.await;
        std::thread::spawn(move || {
            std::thread::sleep(deadline);
            eprintln!("sai-im: not stopped within {deadline:?} of the signal: exiting");
            std::process::exit(1);
        });
    }
}

/// Installs the Ctrl-C and SIGTERM handlers now; the future resolves on the first of them.
#[cfg(unix)]
fn signal_received() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        match (int, term) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(not(unix))]
fn signal_received() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
