//! `loadgen`: the SAI-IM load generator.
//!
//! Scenarios: `connect`, `chat`, `group`, `storm`, `capacity`; and `compare`, the benchmark
//! regression report. Every scenario counts correctness (sent, acked, delivered, missing,
//! duplicated, out of order) as well as speed; a run with a missing or duplicated message says
//! so and exits with status 3. See `results/README.md` for the output format.
//!
//! Benchmark mode: loadgen mints its own tokens with the gateway's JWT secret (`--jwt-secret`,
//! or `--data-dir` to read `jwt.secret`), for users made by `sai-im admin seed-users`.

mod client;
mod compare;
mod engine;
mod hold;
mod peer;
mod report;
mod sys;

use clap::{Args, Parser, Subcommand};
use engine::{Opts, Worker};
use peer::Target;
use report::{Report, Summary, WorkerOut};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

/// The same allocator as the server: loadgen shares the machine's cores with it, so every
/// microsecond it spends per message is one the server cannot use.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::rc::Rc;
use std::time::{Duration, Instant};
use sys::Rng;

#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about = "SAI-IM load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug, Clone)]
enum Cmd {
    /// Open N authenticated connections at a rate, hold them with heartbeats, close.
    Connect {
        #[command(flatten)]
        common: Common,
        /// How long to hold the connections, seconds.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
    },
    /// Random private pairs sending at a constant total rate (open loop).
    Chat {
        #[command(flatten)]
        common: Common,
        /// Messages per second, all workers together.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// G groups of S members, a send rate per group; fan-out latency to every member.
    Group {
        #[command(flatten)]
        common: Common,
        /// Groups.
        #[arg(long, default_value_t = 10)]
        groups: u64,
        /// Members per group (users = groups x size).
        #[arg(long, default_value_t = 200)]
        size: u64,
        /// Messages per second per group.
        #[arg(long, default_value_t = 2.0)]
        rate_per_group: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Chat while a fraction of users drops at once and reconnects with conversation.sync.
    Storm {
        #[command(flatten)]
        common: Common,
        /// Messages per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Seconds of sending (a third before the drop, a third while away, a third after).
        #[arg(long, default_value_t = 9.0)]
        duration: f64,
        /// Fraction of users dropped.
        #[arg(long, default_value_t = 0.3)]
        drop: f64,
    },
    /// Steps the chat rate up until p99 end-to-end latency exceeds the limit.
    Capacity {
        #[command(flatten)]
        common: Common,
        /// First rate (msg/s).
        #[arg(long, default_value_t = 500.0)]
        start_rate: f64,
        /// Added each step.
        #[arg(long, default_value_t = 500.0)]
        step_rate: f64,
        /// Stop here even if the limit holds.
        #[arg(long, default_value_t = 20000.0)]
        max_rate: f64,
        /// Seconds per step.
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        /// p99 end-to-end latency limit, ms.
        #[arg(long, default_value_t = 50.0)]
        p99_limit_ms: f64,
        /// Search group fan-out instead of private chat: groups of this many members (`--users`
        /// is then rounded down to whole groups); rates stay in messages per second, and each
        /// message is delivered to every other member.
        #[arg(long, default_value_t = 0)]
        group_size: u64,
    },
    /// Holds `--users` authenticated connections from this one process on io_uring direct
    /// descriptors (no descriptor limit), with heartbeats, then checks every one still answers.
    Hold {
        #[command(flatten)]
        common: Common,
        /// Seconds to hold once every connection is up.
        #[arg(long, default_value_t = 300.0)]
        hold: f64,
        /// Threads (each owns its share of the connections and its rings).
        #[arg(long, default_value_t = 1)]
        threads: u32,
    },
    /// Compares two summary.json files: a Markdown table; non-zero exit on a regression.
    Compare {
        /// Baseline summary.json.
        baseline: PathBuf,
        /// New summary.json.
        new: PathBuf,
        /// Largest tolerated worsening, e.g. "10%".
        #[arg(long, default_value = "10%")]
        max_regression: String,
    },
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// The server: SAI-IM's gateway, or a peer to compare it with (same scenario, schedule and
    /// counters): XMPP over WebSocket (ejabberd), MQTT 3.1.1 (Mosquitto), NATS (JetStream acks).
    #[arg(long, value_enum, default_value_t = Target::Sai)]
    target: Target,
    /// Server address; several, comma-separated, spread the users over a cluster's gateways
    /// (user i on gateway i mod n). Default per target: sai 127.0.0.1:8080, xmpp
    /// 127.0.0.1:5280 (path /ws), mqtt 127.0.0.1:1883, nats 127.0.0.1:4222.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    ws: Vec<SocketAddr>,
    /// Peers: password (XMPP: every user's; MQTT and NATS: with --peer-user).
    #[arg(long, env = "LOADGEN_PEER_PASSWORD", hide_env_values = true)]
    peer_password: Option<String>,
    /// MQTT and NATS: the account every connection logs in with (none by default).
    #[arg(long)]
    peer_user: Option<String>,
    /// XMPP: the server's domain.
    #[arg(long, default_value = "localhost")]
    xmpp_domain: String,
    /// XMPP: register each user in-band (XEP-0077) before logging in; an existing account is
    /// fine.
    #[arg(long)]
    xmpp_register: bool,
    /// HTTP API base URL (used by `group` to create groups).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    http: String,
    /// The gateway's JWT secret (benchmark mode).
    #[arg(long, env = "SAI_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Read the JWT secret from `<data-dir>/jwt.secret` instead.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seeded user prefix.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// First seeded user index to use.
    #[arg(long, default_value_t = 0)]
    first_user: u64,
    /// Users (connections).
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// Connections per second.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Connect + upgrade timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Spread connections over this many source addresses (127.0.0.1, .2, ...); 0 = automatic:
    /// one per 2,000 connections against a loopback gateway (under its per-address cap), else
    /// the kernel's choice.
    #[arg(long, default_value_t = 0)]
    src_addrs: u32,
    /// Gateway pid, to sample its RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The gateway's ack mode (rigor makes clients ack pushes).
    #[arg(long, default_value = "only")]
    ack_mode: String,
    /// Worker processes (each holds its share of connections; at most ~19k per process here).
    #[arg(long, default_value_t = 1)]
    procs: u32,
    /// PRNG seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Heartbeat interval, seconds.
    #[arg(long, default_value_t = 20.0)]
    heartbeat: f64,
    /// Longest wait for outstanding deliveries after sending, seconds.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Output directory: summary.json, series.csv, *.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Free-text note stored with the machine facts.
    #[arg(long, default_value = "")]
    note: String,
    /// No live progress output.
    #[arg(long)]
    quiet: bool,
    /// Behave like a client across a server restart: a connection the server closes (1012) or
    /// that breaks is opened again, synced, and its unacked messages (and those written while
    /// offline) are sent again; `unacked` at the end must be 0, and `reconnect_after_loss` says
    /// how long users were away.
    #[arg(long)]
    reconnect: bool,
    /// Internal: this process is worker N of a `--procs` run.
    #[arg(long, hide = true)]
    worker_index: Option<u32>,
    /// Internal: where a worker writes its results.
    #[arg(long, hide = true)]
    worker_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mut common, name) = match &cli.cmd {
        Cmd::Compare {
            baseline,
            new,
            max_regression,
        } => return compare::run(baseline, new, max_regression),
        Cmd::Connect { common, .. } => (common.clone(), "connect"),
        Cmd::Chat { common, .. } => (common.clone(), "chat"),
        Cmd::Group { common, .. } => (common.clone(), "group"),
        Cmd::Storm { common, .. } => (common.clone(), "storm"),
        Cmd::Capacity { common, .. } => (common.clone(), "capacity"),
        Cmd::Hold { common, .. } => (common.clone(), "hold"),
    };
    if common.ws.is_empty() {
        if let Ok(a) = common.target.default_addr().parse() {
            common.ws.push(a);
        }
    }
    if let Err(e) = peer_args(name, &common) {
        eprintln!("loadgen: {e}");
        return ExitCode::from(2);
    }
    let secret = match (&common.jwt_secret, &common.data_dir) {
        _ if common.target != Target::Sai => String::new(),
        (Some(s), _) => s.clone(),
        (None, Some(d)) => match std::fs::read_to_string(d.join("jwt.secret")) {
            Ok(s) => s.trim().to_string(),
            Err(e) => {
                eprintln!("loadgen: reading {}/jwt.secret: {e}", d.display());
                return ExitCode::from(2);
            }
        },
        (None, None) => {
            eprintln!("loadgen: give --jwt-secret or --data-dir (benchmark mode mints tokens)");
            return ExitCode::from(2);
        }
    };
    if let Some(i) = common.worker_index {
        return worker_main(&cli.cmd, &common, secret, i);
    }
    let started_at = sys::unix_us() / 1_000_000;
    let t0 = Instant::now();
    let merged = if let Cmd::Hold { hold, threads, .. } = &cli.cmd {
        match run_hold(&common, secret, *hold, *threads) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("loadgen: {e}");
                return ExitCode::from(2);
            }
        }
    } else if common.procs <= 1 {
        match run_worker(&cli.cmd, &common, secret, 0, 1) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("loadgen: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        match spawn_workers(&cli.cmd, &common) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("loadgen: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let report = build_report(name, &cli.cmd, &common, &merged, started_at, t0.elapsed());
    println!("{}", report.table());
    if let Some(dir) = &common.out {
        if let Err(e) = report.write(dir, &merged.series) {
            eprintln!("loadgen: writing {}: {e}", dir.display());
            return ExitCode::from(2);
        }
        println!("results written to {}", dir.display());
    }
    if !report.correct() {
        eprintln!(
            "\n!!! CORRECTNESS FAILURE: missing {} duplicated {} out_of_order {} unacked {} !!!\n",
            report.counters.get("missing").copied().unwrap_or(0),
            report.counters.get("duplicated").copied().unwrap_or(0),
            report.counters.get("out_of_order").copied().unwrap_or(0),
            report.counters.get("unacked").copied().unwrap_or(0)
        );
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}

/// What a peer target cannot do: SAI-IM's sync (storm, reconnect), io_uring `hold`, rigor acks.
fn peer_args(scenario: &str, c: &Common) -> Result<(), String> {
    if c.target == Target::Sai {
        return Ok(());
    }
    let t = c.target.name();
    if matches!(scenario, "storm" | "hold") || c.reconnect {
        return Err(format!(
            "--target {t}: `{scenario}`{} needs SAI-IM's conversation.sync; peers run connect, chat, group and capacity",
            if c.reconnect { " --reconnect" } else { "" }
        ));
    }
    if !["none", "only"].contains(&c.ack_mode.as_str()) {
        return Err(format!(
            "--target {t}: --ack-mode is `only` (the server acks each send) or `none`, not {}",
            c.ack_mode
        ));
    }
    if c.target == Target::Xmpp && c.peer_password.is_none() {
        return Err("--target xmpp needs --peer-password (every user's password)".into());
    }
    Ok(())
}

/// `hold`: one process, `threads` threads, direct descriptors.
fn run_hold(c: &Common, secret: String, hold: f64, threads: u32) -> Result<WorkerOut, String> {
    let Some(std::net::SocketAddr::V4(server)) = c.ws.first().copied() else {
        return Err("hold connects to an IPv4 gateway address".into());
    };
    if c.procs > 1 {
        return Err("hold runs in one process (--threads instead of --procs)".into());
    }
    hold::run(hold::HoldOpts {
        server,
        jwt_secret: secret,
        prefix: c.prefix.clone(),
        first_user: c.first_user,
        conns: c.users,
        connect_rate: c.connect_rate,
        timeout: Duration::from_secs_f64(c.connect_timeout),
        src_addrs: source_addresses_for(c.users, c).max(1),
        hold: Duration::from_secs_f64(hold),
        heartbeat: Duration::from_secs_f64(c.heartbeat.max(0.1)),
        threads,
        server_pid: c.server_pid,
        progress: !c.quiet,
    })
}

/// Runs P copies of this command as workers and merges what they write. A capacity search
/// steps them together ([`coordinate_capacity`]): each step's verdict is taken on all workers'
/// latencies merged, as if one process had sent the whole rate.
fn spawn_workers(cmd: &Cmd, common: &Common) -> Result<WorkerOut, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::env::temp_dir().join(format!("loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let stepped = matches!(cmd, Cmd::Capacity { .. });
    let mut children = Vec::new();
    for i in 0..common.procs {
        let out = dir.join(format!("w{i}.json"));
        let mut command = std::process::Command::new(&exe);
        command
            .args(&args)
            .arg("--worker-index")
            .arg(i.to_string())
            .arg("--worker-out")
            .arg(&out);
        if stepped {
            command.stdin(Stdio::piped()).stdout(Stdio::piped());
        }
        let child = command.spawn().map_err(|e| format!("spawning worker {i}: {e}"))?;
        children.push((child, out));
    }
    let search = if stepped {
        let pipes: Vec<_> = children
            .iter_mut()
            .map(|(c, _)| (c.stdin.take(), c.stdout.take()))
            .collect();
        Some(coordinate_capacity(cmd, pipes)?)
    } else {
        None
    };
    let mut merged = WorkerOut::default();
    for (i, (mut child, out)) in children.into_iter().enumerate() {
        let status = child.wait().map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&out).map_err(|e| format!("worker {i} ({status}) wrote no results: {e}"))?;
        let w: WorkerOut = serde_json::from_str(&text).map_err(|e| format!("worker {i}: {e}"))?;
        merged.merge(w);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some((steps, extra)) = search {
        merged.steps = steps;
        merged.extra.extend(extra);
    }
    Ok(merged)
}

/// A capacity search over worker processes. Each worker connects its users and says `ready`;
/// then for each step the coordinator sends every worker `step <total rate>` (each sends its
/// share), and each answers `done <missing> <server CPU s> <own CPU s> <latency histogram>`
/// once its step has drained. The step holds if the histograms merged have their p99 within
/// the limit and nothing is missing; the first step that does not ends the search (`stop`).
/// Returns the steps and the capacity figures for the summary.
#[allow(clippy::type_complexity)]
fn coordinate_capacity(
    cmd: &Cmd,
    pipes: Vec<(Option<std::process::ChildStdin>, Option<std::process::ChildStdout>)>,
) -> Result<(Vec<serde_json::Value>, Vec<(String, f64)>), String> {
    use std::io::{BufRead, Write};
    let Cmd::Capacity {
        start_rate,
        step_rate,
        max_rate,
        p99_limit_ms,
        group_size,
        ..
    } = cmd
    else {
        return Err("not a capacity search".into());
    };
    let fanout = if *group_size > 1 { (*group_size - 1) as f64 } else { 1.0 };
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Option<String>)>();
    let mut inputs = Vec::new();
    for (i, (stdin, stdout)) in pipes.into_iter().enumerate() {
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            return Err(format!("worker {i} has no pipes"));
        };
        inputs.push(stdin);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((i, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((i, None));
        });
    }
    let workers = inputs.len();
    // One line from every worker, in worker order.
    let gather = |what: &str| -> Result<Vec<String>, String> {
        let mut lines: Vec<Option<String>> = vec![None; workers];
        while lines.iter().any(Option::is_none) {
            match rx.recv() {
                Ok((i, Some(line))) => lines[i] = Some(line),
                Ok((i, None)) => return Err(format!("worker {i} ended before {what}")),
                Err(_) => return Err(format!("every worker ended before {what}")),
            }
        }
        Ok(lines.into_iter().flatten().collect())
    };
    let tell = |inputs: &mut Vec<std::process::ChildStdin>, line: &str| {
        for input in inputs.iter_mut() {
            let _ = writeln!(input, "{line}").and_then(|()| input.flush());
        }
    };
    gather("ready")?;
    let mut steps = Vec::new();
    let mut best = 0.0f64;
    let mut rate = *start_rate;
    while rate <= *max_rate {
        let t = Instant::now();
        tell(&mut inputs, &format!("step {rate}"));
        let mut all = report::new_hist();
        let (mut missing, mut server_cpu, mut loadgen_cpu) = (0u64, 0.0f64, 0.0f64);
        for line in gather("its step")? {
            let mut f = line.split(' ');
            let (Some("done"), Some(m), Some(sc), Some(lc), Some(h)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                return Err(format!("a worker said {line:?}"));
            };
            missing += m.parse::<u64>().map_err(|e| e.to_string())?;
            server_cpu += sc.parse::<f64>().map_err(|e| e.to_string())?;
            loadgen_cpu += lc.parse::<f64>().map_err(|e| e.to_string())?;
            let h = report::decode_hist(h).ok_or("a worker's histogram does not decode")?;
            let _ = all.add(&h);
        }
        let s = Summary::of(&all);
        let step = Step {
            rate,
            fanout,
            missing,
            server_cpu_s: server_cpu,
            loadgen_cores: loadgen_cpu / t.elapsed().as_secs_f64().max(1e-9),
        };
        if !step.judge(&s, *p99_limit_ms, &format!("over {workers} workers"), &mut steps) {
            break;
        }
        best = rate;
        rate += step_rate;
    }
    tell(&mut inputs, "stop");
    let extra = vec![
        ("capacity_msgs_per_s".to_string(), best),
        ("capacity_deliveries_per_s".to_string(), best * fanout),
    ];
    Ok((steps, extra))
}

/// One capacity step's figures besides its latencies.
struct Step {
    rate: f64,
    fanout: f64,
    missing: u64,
    server_cpu_s: f64,
    loadgen_cores: f64,
}

impl Step {
    /// Whether the step held (`latency`'s p99 within `limit_ms` and nothing missing): logged,
    /// with `detail`, and added to `steps` for the summary.
    fn judge(&self, latency: &Summary, limit_ms: f64, detail: &str, steps: &mut Vec<serde_json::Value>) -> bool {
        let Step {
            rate,
            fanout,
            missing,
            loadgen_cores,
            ..
        } = *self;
        let held = latency.p99_ms <= limit_ms && missing == 0;
        let server_us = self.server_cpu_s * 1e6 / (latency.count.max(1) as f64);
        eprintln!(
            "capacity step {rate:>9.0} msg/s ({:.0} deliveries/s) {detail}: p99 {:.3} ms, \
             missing {missing}, server {server_us:.0} us CPU/delivery, loadgen {loadgen_cores:.2} cores -> {}",
            rate * fanout,
            latency.p99_ms,
            if held { "held" } else { "exceeded" }
        );
        steps.push(serde_json::json!({"rate": rate, "deliveries_per_s": rate * fanout,
            "p50_ms": latency.p50_ms, "p99_ms": latency.p99_ms, "max_ms": latency.max_ms,
            "delivered": latency.count, "missing": missing, "held": held,
            "server_cpu_us_per_delivery": server_us, "loadgen_cores": loadgen_cores}));
        held
    }
}

/// A `--procs` capacity worker's step commands: stdin's lines, read on a thread of their own so
/// that the worker's runtime (heartbeats, the sampler) keeps running while it waits.
fn step_commands() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn worker_main(cmd: &Cmd, common: &Common, secret: String, i: u32) -> ExitCode {
    let Some(path) = &common.worker_out else {
        eprintln!("loadgen: --worker-index needs --worker-out");
        return ExitCode::from(2);
    };
    match run_worker(cmd, common, secret, i, common.procs.max(1)) {
        Ok(out) => match serde_json::to_string(&out).map(|j| std::fs::write(path, j)) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            _ => ExitCode::from(2),
        },
        Err(e) => {
            eprintln!("loadgen worker {i}: {e}");
            ExitCode::from(2)
        }
    }
}

/// `total` split into `parts`: (offset, len) of part `i`.
fn share(total: u64, parts: u32, i: u32) -> (u64, u64) {
    let (p, i) = (u64::from(parts), u64::from(i));
    let base = total / p;
    let extra = total % p;
    let len = base + u64::from(i < extra);
    let off = base * i + i.min(extra);
    (off, len)
}

/// Connections put on one loopback source address when `--src-addrs` is 0: under the gateway's
/// default cap of 4,096 connections (and 1,024 unfinished handshakes) per client address, with
/// room to spare.
const AUTO_CONNECTIONS_PER_ADDRESS: u64 = 2000;

/// Every gateway is an IPv4 loopback address.
fn loopback_v4(c: &Common) -> bool {
    c.ws.iter().all(|w| w.is_ipv4() && w.ip().is_loopback())
}

/// `--src-addrs`, or with 0 and an IPv4 loopback target, as many loopback source addresses as
/// the run's connections need at [`AUTO_CONNECTIONS_PER_ADDRESS`] each (0, the kernel's choice,
/// when one address is enough).
fn source_addresses(cmd: &Cmd, c: &Common) -> u32 {
    if c.src_addrs > 0 || !loopback_v4(c) {
        return c.src_addrs;
    }
    let connections = match cmd {
        Cmd::Group { groups, size, .. } => groups.saturating_mul(*size),
        _ => c.users,
    };
    source_addresses_for(connections, c)
}

/// [`source_addresses`] for `connections` connections.
fn source_addresses_for(connections: u64, c: &Common) -> u32 {
    if c.src_addrs > 0 || !loopback_v4(c) {
        return c.src_addrs;
    }
    if connections <= AUTO_CONNECTIONS_PER_ADDRESS {
        return 0;
    }
    u32::try_from(connections.div_ceil(AUTO_CONNECTIONS_PER_ADDRESS)).unwrap_or(u32::MAX)
}

fn run_worker(cmd: &Cmd, c: &Common, secret: String, index: u32, workers: u32) -> Result<WorkerOut, String> {
    let w = f64::from(workers);
    let (off, users) = match cmd {
        Cmd::Group { groups, size, .. } => {
            let (g_off, g_len) = share(*groups, workers, index);
            (g_off * size, g_len * size)
        }
        _ => share(c.users, workers, index),
    };
    let mut opts = Opts {
        ws: c.ws.clone(),
        http: c.http.clone(),
        jwt_secret: secret,
        prefix: c.prefix.clone(),
        first_user: c.first_user + off,
        users,
        connect_rate: c.connect_rate / w,
        connect_timeout: Duration::from_secs_f64(c.connect_timeout),
        src_addrs: source_addresses(cmd, c),
        server_pid: if index == 0 { c.server_pid } else { None },
        seed: c.seed ^ u64::from(index),
        heartbeat: Duration::from_secs_f64(c.heartbeat.max(0.1)),
        ack_mode: c.ack_mode.clone(),
        drain: Duration::from_secs_f64(c.drain),
        worker: index,
        progress: !c.quiet,
        reconnect: c.reconnect,
        target: c.target,
        peer: peer::PeerConfig {
            user: String::new(),
            groups: Vec::new(),
            acked: c.ack_mode == "only",
            keepalive: Duration::from_secs_f64(c.heartbeat.max(0.1)),
            // XMPP: each user logs in as itself (the name is filled in per user); MQTT and NATS:
            // one broker account for every connection, when given.
            login: match (&c.peer_user, &c.peer_password) {
                (_, Some(p)) if c.target == Target::Xmpp => Some((String::new(), p.clone())),
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                _ => None,
            },
            domain: c.xmpp_domain.clone(),
            register: c.xmpp_register,
        },
        groups: Vec::new(),
        group_size: 0,
    };
    if !["none", "only", "rigor"].contains(&opts.ack_mode.as_str()) {
        return Err(format!("unknown --ack-mode {}", opts.ack_mode));
    }
    let size = match cmd {
        Cmd::Group { size, .. } => *size,
        Cmd::Capacity { group_size, .. } if *group_size > 1 => *group_size,
        _ => 0,
    };
    opts.group_size = size;
    opts.groups = match (size, opts.target) {
        (0, _) => Vec::new(),
        (_, Target::Sai) => create_groups(&opts, size)?,
        // A peer's group is a topic, subject or room: named, not created.
        _ => (0..opts.users / size)
            .map(|g| format!("{}g{}", opts.prefix, opts.first_user + g * size))
            .collect(),
    };
    if opts.target == Target::Nats && opts.peer.acked {
        let addr = opts.ws.first().copied().ok_or("no server address")?;
        peer::nats::ensure_stream(addr, opts.peer.login.as_ref())?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let cmd = cmd.clone();
    Ok(local.block_on(&rt, async move { scenario(cmd, opts, w).await }))
}

/// Creates this worker's groups over HTTP (owner = first member) and returns their ids.
fn create_groups(o: &Opts, size: u64) -> Result<Vec<String>, String> {
    let keys = sai_pipeline::token::JwtKeys::new(o.jwt_secret.as_bytes().to_vec());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let now = (sys::unix_us() / 1_000_000) as i64;
    let mut ids = Vec::new();
    for g in 0..o.users / size.max(1) {
        let first = o.first_user + g * size;
        let owner = format!("{}{first}", o.prefix);
        let token = keys.sign(&sai_pipeline::token::Claims {
            gen: 0,
            sub: owner,
            iat: now,
            exp: now + 3600,
        });
        let members: Vec<String> = (first + 1..first + size).map(|u| format!("{}{u}", o.prefix)).collect();
        let mut resp = agent
            .post(format!("{}/v1/groups", o.http))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(serde_json::json!({"name": format!("load-{first}"), "memberIds": members}))
            .map_err(|e| format!("creating group: {e}"))?;
        let body: serde_json::Value = resp.body_mut().read_json().map_err(|e| e.to_string())?;
        let id = body["groupId"]
            .as_str()
            .ok_or_else(|| format!("creating group: {} {body}", resp.status()))?;
        ids.push(id.to_string());
    }
    Ok(ids)
}

fn rss_delta(pid: Option<u32>, before: u64) -> f64 {
    pid.map(|p| sys::rss_kib(&p.to_string()).saturating_sub(before) as f64)
        .unwrap_or(0.0)
}

async fn scenario(cmd: Cmd, opts: Opts, workers: f64) -> WorkerOut {
    let n = opts.users as usize;
    let server_pid = opts.server_pid;
    let mut rng = Rng::new(opts.seed);
    let w = Worker::new(opts);
    let ids: Vec<Rc<str>> = (0..n).map(|i| Rc::from(w.user_id(i).as_str())).collect();
    let sampler = tokio::task::spawn_local(w.clone().sampler());
    let server_before = server_pid.map(|p| sys::rss_kib(&p.to_string())).unwrap_or(0);
    let self_before = sys::rss_kib("self");
    let mut extra = std::collections::BTreeMap::new();
    let mut steps = Vec::new();
    let t_connect = Instant::now();
    if matches!(cmd, Cmd::Connect { .. }) {
        w.set_series_metric("handshake");
    }
    w.connect_all(0..n, false).await;
    extra.insert("ramp_s".to_string(), t_connect.elapsed().as_secs_f64());
    extra.insert("server_rss_delta_kib".to_string(), rss_delta(server_pid, server_before));
    extra.insert(
        "loadgen_rss_delta_kib".to_string(),
        sys::rss_kib("self").saturating_sub(self_before) as f64,
    );
    extra.insert("open_after_ramp".to_string(), w.open_count() as f64);
    // Random private pairs.
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut partner = vec![0usize; n];
    for p in order.chunks(2) {
        if let [a, b] = p {
            partner[*a] = *b;
            partner[*b] = *a;
        } else if let [a] = p {
            // An odd one out talks to the first of the order.
            partner[*a] = order[0];
        }
    }
    let pair_pick = |rng: &mut Rng| {
        let s = rng.below(n as u64) as usize;
        (s, ids[partner[s]].clone(), 2u8, 1u32)
    };
    let t_phase = Instant::now();
    let server_cpu = || server_pid.map(|p| sys::cpu_s(&p.to_string())).unwrap_or(0.0);
    let (server_cpu_before, self_cpu_before) = (server_cpu(), sys::cpu_s("self"));
    match &cmd {
        Cmd::Connect { hold, .. } => {
            tokio::time::sleep(Duration::from_secs_f64(*hold)).await;
            extra.insert("held_at_end".to_string(), w.open_count() as f64);
        }
        Cmd::Chat { rate, duration, .. } => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            w.schedule(rate / workers, Duration::from_secs_f64(*duration), &mut rng, pair_pick)
                .await;
            w.drain().await;
        }
        Cmd::Group {
            size,
            rate_per_group,
            duration,
            ..
        } => {
            let size = *size as usize;
            let gids: Vec<Rc<str>> = w.opts.groups.iter().map(|g| Rc::from(g.as_str())).collect();
            let g_n = gids.len().max(1);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let rate = rate_per_group * gids.len() as f64;
            w.schedule(rate, Duration::from_secs_f64(*duration), &mut rng, |rng| {
                let g = rng.below(g_n as u64) as usize;
                let s = g * size + rng.below(size as u64) as usize;
                (s, gids[g].clone(), 1u8, (size - 1) as u32)
            })
            .await;
            w.drain().await;
        }
        Cmd::Storm {
            rate, duration, drop, ..
        } => {
            let third = Duration::from_secs_f64(duration / 3.0);
            let dropped = ((n as f64) * drop.clamp(0.0, 1.0)).round() as usize;
            let r = rate / workers;
            tokio::time::sleep(Duration::from_millis(300)).await;
            w.schedule(r, third, &mut rng, pair_pick).await;
            w.drop_users(0..dropped);
            for _ in 0..250 {
                if (0..dropped).all(|i| !w.online(i)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            w.schedule(r, third, &mut rng, pair_pick).await;
            let t = Instant::now();
            w.connect_all(0..dropped, true).await;
            w.drain().await;
            extra.insert("reconnect_s".to_string(), t.elapsed().as_secs_f64());
            extra.insert("dropped".to_string(), dropped as f64);
            w.schedule(r, third, &mut rng, pair_pick).await;
            w.drain().await;
        }
        Cmd::Capacity {
            start_rate,
            step_rate,
            max_rate,
            step_secs,
            p99_limit_ms,
            group_size,
            ..
        } => {
            // Private pairs, or (with --group-size) a random member of a random group.
            let size = *group_size as usize;
            let gids: Vec<Rc<str>> = w.opts.groups.iter().map(|g| Rc::from(g.as_str())).collect();
            let mut pick = |rng: &mut Rng| {
                if size > 1 && !gids.is_empty() {
                    let g = rng.below(gids.len() as u64) as usize;
                    let s = g * size + rng.below(size as u64) as usize;
                    (s, gids[g].clone(), 1u8, (size - 1) as u32)
                } else {
                    pair_pick(rng)
                }
            };
            let fanout = if size > 1 { (size - 1) as f64 } else { 1.0 };
            tokio::time::sleep(Duration::from_millis(300)).await;
            // With --procs the coordinator picks each step's rate and judges it on every
            // worker's latencies (`coordinate_capacity`); alone, this loop does both.
            let mut commands = (workers > 1.0).then(step_commands);
            if commands.is_some() {
                println!("ready");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
            let mut rate = *start_rate;
            let mut best = 0.0f64;
            let mut all = report::new_hist();
            loop {
                match commands.as_mut() {
                    None if rate > *max_rate => break,
                    None => {}
                    Some(rx) => match rx.recv().await.as_deref().and_then(|l| l.strip_prefix("step ")) {
                        Some(r) => rate = r.parse().unwrap_or(0.0),
                        None => break,
                    },
                }
                let before = w.missing();
                let (cpu_before, self_before) = (server_cpu(), sys::cpu_s("self"));
                let t = Instant::now();
                w.schedule(rate / workers, Duration::from_secs_f64(*step_secs), &mut rng, &mut pick)
                    .await;
                let sent_s = t.elapsed().as_secs_f64();
                w.drain().await;
                let h = w.take_e2e();
                let _ = all.add(&h);
                let missing = w.missing() - before;
                if commands.is_some() {
                    println!(
                        "done {missing} {} {} {}",
                        server_cpu() - cpu_before,
                        sys::cpu_s("self") - self_before,
                        report::encode_hist(&h).unwrap_or_default()
                    );
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                    continue;
                }
                // Server CPU per message and loadgen's own share of the step (cores busy).
                let step = Step {
                    rate,
                    fanout,
                    missing,
                    server_cpu_s: server_cpu() - cpu_before,
                    loadgen_cores: (sys::cpu_s("self") - self_before) / t.elapsed().as_secs_f64().max(1e-9),
                };
                if !step.judge(
                    &Summary::of(&h),
                    *p99_limit_ms,
                    &format!("sent in {sent_s:.2} s"),
                    &mut steps,
                ) {
                    break;
                }
                best = rate;
                rate += step_rate;
            }
            // The summary's e2e covers every step.
            w.put_e2e(all);
            if commands.is_none() {
                extra.insert("capacity_msgs_per_s".to_string(), best);
                extra.insert("capacity_deliveries_per_s".to_string(), best * fanout);
            }
        }
        // Not tokio scenarios: `compare` runs in main, `hold` on its own threads.
        Cmd::Compare { .. } | Cmd::Hold { .. } => {}
    }
    extra.insert("phase_s".to_string(), t_phase.elapsed().as_secs_f64());
    // CPU seconds over the traffic phase: the server's (worker 0 only, which alone knows its pid)
    // and this worker's own; workers' figures add up in the merge.
    extra.insert("server_cpu_total".to_string(), server_cpu() - server_cpu_before);
    extra.insert("loadgen_cpu_total".to_string(), sys::cpu_s("self") - self_cpu_before);
    w.close_all().await;
    w.stop_sampler();
    let _ = sampler.await;
    let mut out = w.output();
    out.extra = extra;
    out.steps = steps;
    out
}

fn build_report(name: &str, cmd: &Cmd, c: &Common, m: &WorkerOut, started_at: u64, wall: Duration) -> Report {
    let mut latency = std::collections::BTreeMap::new();
    for h in m.hists.keys() {
        if let Some(hist) = m.hist(h) {
            latency.insert(h.clone(), Summary::of(&hist));
        }
    }
    let x = |k: &str| m.extra.get(k).copied().unwrap_or(0.0);
    let n = |k: &str| m.counters.get(k).copied().unwrap_or(0);
    let mut rates = std::collections::BTreeMap::new();
    if x("ramp_s") > 0.0 {
        rates.insert("connect_per_s".to_string(), n("connected") as f64 / x("ramp_s"));
    }
    if name != "connect" && x("phase_s") > 0.0 {
        rates.insert("sent_per_s".to_string(), n("sent") as f64 / x("phase_s"));
        rates.insert("acked_per_s".to_string(), n("acked") as f64 / x("phase_s"));
        rates.insert("delivered_per_s".to_string(), n("delivered") as f64 / x("phase_s"));
    }
    if name == "capacity" {
        rates.insert("capacity_msgs_per_s".to_string(), x("capacity_msgs_per_s"));
        rates.insert("capacity_deliveries_per_s".to_string(), x("capacity_deliveries_per_s"));
    }
    let conns = x("open_after_ramp").max(1.0);
    let mut memory = std::collections::BTreeMap::new();
    let peak = m.series.iter().map(|s| s.server_rss_kib).max().unwrap_or(0);
    if c.server_pid.is_some() {
        memory.insert("server_rss_peak_kib".to_string(), peak as f64);
        memory.insert(
            "server_rss_per_conn_bytes".to_string(),
            x("server_rss_delta_kib") * 1024.0 / conns,
        );
    }
    memory.insert(
        "loadgen_rss_per_conn_bytes".to_string(),
        x("loadgen_rss_delta_kib") * 1024.0 / conns,
    );
    if name == "hold" {
        memory.insert(
            "kernel_slab_per_socket_bytes".to_string(),
            x("kernel_slab_per_socket_bytes"),
        );
    }
    let mut cpu = std::collections::BTreeMap::new();
    if name != "connect" && x("phase_s") > 0.0 {
        let sent = n("sent").max(1) as f64;
        if c.server_pid.is_some() {
            cpu.insert("server_cpu_s".to_string(), x("server_cpu_total"));
            cpu.insert("server_cpu_us_per_msg".to_string(), x("server_cpu_total") * 1e6 / sent);
        }
        cpu.insert("loadgen_cpu_s".to_string(), x("loadgen_cpu_total"));
        cpu.insert("loadgen_cores".to_string(), x("loadgen_cpu_total") / x("phase_s"));
    }
    let mut counters = m.counters.clone();
    counters.insert("held_connections".to_string(), x("open_after_ramp") as u64);
    if name == "storm" {
        counters.insert("dropped".to_string(), x("dropped") as u64);
        counters.insert("reconnect_all_ms".to_string(), (x("reconnect_s") * 1000.0) as u64);
    }
    let params = match cmd {
        Cmd::Connect { hold, .. } => {
            serde_json::json!({"users": c.users, "connect_rate": c.connect_rate, "hold_s": hold})
        }
        Cmd::Chat { rate, duration, .. } => serde_json::json!({"users": c.users, "rate": rate, "duration_s": duration}),
        Cmd::Group {
            groups,
            size,
            rate_per_group,
            duration,
            ..
        } => serde_json::json!({"groups": groups,
            "size": size, "rate_per_group": rate_per_group, "duration_s": duration}),
        Cmd::Storm {
            rate, duration, drop, ..
        } => serde_json::json!({"users": c.users, "rate": rate,
            "duration_s": duration, "drop": drop}),
        Cmd::Capacity {
            start_rate,
            step_rate,
            max_rate,
            step_secs,
            p99_limit_ms,
            group_size,
            ..
        } => serde_json::json!({
            "users": c.users, "start_rate": start_rate, "step_rate": step_rate, "max_rate": max_rate,
            "step_secs": step_secs, "p99_limit_ms": p99_limit_ms, "group_size": group_size}),
        Cmd::Hold { hold, threads, .. } => serde_json::json!({"users": c.users, "connect_rate": c.connect_rate,
            "hold_s": hold, "threads": threads, "heartbeat_s": c.heartbeat}),
        Cmd::Compare { .. } => serde_json::Value::Null,
    };
    let mut params = params;
    if let Some(o) = params.as_object_mut() {
        o.insert("ack_mode".into(), c.ack_mode.clone().into());
        o.insert("target".into(), c.target.name().into());
        o.insert("procs".into(), c.procs.into());
        o.insert("src_addrs".into(), source_addresses(cmd, c).into());
        o.insert("seed".into(), c.seed.into());
    }
    let mut r = Report {
        schema: report::SCHEMA,
        scenario: name.to_string(),
        params,
        git_rev: sys::git_rev(),
        machine: sys::machine(&c.note),
        started_at,
        duration_s: wall.as_secs_f64(),
        latency,
        rates,
        counters,
        failures: m.failures.clone(),
        memory,
        cpu,
        steps: m.steps.clone(),
        verdict: String::new(),
    };
    r.verdict = if !r.correct() {
        "CORRECTNESS FAILURE".into()
    } else if n("errors") > 0 {
        format!("ok with {} errors (see failures)", n("errors"))
    } else {
        "ok".into()
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(args: &[&str]) -> u32 {
        let cli = Cli::try_parse_from(args).expect("arguments");
        let common = match &cli.cmd {
            Cmd::Connect { common, .. } | Cmd::Chat { common, .. } | Cmd::Group { common, .. } => common,
            other => panic!("not a load command: {other:?}"),
        };
        source_addresses(&cli.cmd, common)
    }

    #[test]
    fn large_loopback_runs_spread_over_source_addresses_by_default() {
        assert_eq!(
            addrs(&["loadgen", "connect", "--users", "2000"]),
            0,
            "one address is enough"
        );
        assert_eq!(addrs(&["loadgen", "connect", "--users", "19800"]), 10);
        assert_eq!(addrs(&["loadgen", "chat", "--users", "2001"]), 2);
        assert_eq!(addrs(&["loadgen", "group", "--groups", "30", "--size", "200"]), 3);
        assert_eq!(
            addrs(&["loadgen", "connect", "--users", "19800", "--src-addrs", "8"]),
            8,
            "given"
        );
        let remote = ["loadgen", "connect", "--users", "19800", "--ws", "10.0.0.1:8080"];
        assert_eq!(addrs(&remote), 0, "not loopback: the kernel's choice");
    }
}
