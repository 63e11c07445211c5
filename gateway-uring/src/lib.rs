//! The SAI-IM WebSocket gateway: thread-per-core on monoio (io_uring where the kernel allows it,
//! epoll otherwise).
//!
//! # Layout
//! - [`Gateway::start`] binds one `SO_REUSEPORT` listener per shard and starts one thread with
//!   its own monoio runtime per shard ([`shard`]).
//! - Each shard owns its connections ([`conn`]), one [`wheel::TimerWheel`] for idle and close
//!   deadlines, and an inbox channel; shards share only the [`index::UserIndex`] and each
//!   other's inbox senders. Cross-shard delivery and exclusive-login kicks travel as messages.
//! - Protocol work is done by the sans-IO `sai-proto` crate. The gateway meets the message
//!   pipeline only through the contract crate `sai-pipeline`: it calls the pipeline's
//!   [`Ws2Ms`] for each client command, and offers the pipeline its user index as
//!   [`Routes`](sai_pipeline::flow::Routes) and its shard inboxes as
//!   [`Ms2Ps`](sai_pipeline::flow::Ms2Ps) ([`Prepared`], made before the pipeline exists, so
//!   neither side is built late).

pub mod admission;
pub mod conn;
pub mod direct;
pub mod index;
mod requests;
pub mod shard;
pub mod wheel;

use sai_pipeline::flow::{CloseReason, Delivery, Ms2Ps, RouteLookup, RouteSink, Routes, Ws2Ms};
use sai_proto::close;
use sai_proto::pending::PendingConfig;
use sai_proto::stats::Counters;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// When the gateway acknowledges, as in the seed design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// No acks.
    None,
    /// The sender gets an ack once its message is durable.
    Only,
    /// `only`, plus every push must be acked by the client; unacked pushes are resent.
    Rigor,
}

impl std::str::FromStr for AckMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "only" => Ok(Self::Only),
            "rigor" => Ok(Self::Rigor),
            other => Err(format!("unknown ack mode {other:?} (expected none, only or rigor)")),
        }
    }
}

impl std::fmt::Display for AckMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Only => "only",
            Self::Rigor => "rigor",
        })
    }
}

/// The data plane a gateway runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// monoio (io_uring, or epoll where io_uring is missing), ordinary descriptors: at most
    /// `RLIMIT_NOFILE` connections per process.
    Monoio,
    /// The [`direct`] engine: raw io_uring with direct descriptors and provided buffers, many
    /// rings per shard: connections per process bounded by memory, not by `RLIMIT_NOFILE`.
    /// Falls back to `Monoio` (with a log line saying why) where the kernel lacks a feature.
    Direct,
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "monoio" => Ok(Self::Monoio),
            "direct" => Ok(Self::Direct),
            other => Err(format!("unknown engine {other:?} (expected monoio or direct)")),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Monoio => "monoio",
            Self::Direct => "direct",
        })
    }
}

/// Gateway settings. Every per-connection buffer is sized here.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The data plane.
    pub engine: Engine,
    /// Shard threads.
    pub shards: usize,
    /// WebSocket path.
    pub path: String,
    /// Ack mode.
    pub ack_mode: AckMode,
    /// Close a connection after this long without any inbound traffic.
    pub idle_timeout: Duration,
    /// Largest inbound message; bigger frames close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Most bytes queued for one connection; past it the connection is closed with 4003.
    pub max_outbound_bytes: usize,
    /// Size of the read buffer each connection holds while a read is in flight.
    pub read_buffer_bytes: usize,
    /// Time allowed for the HTTP upgrade.
    pub handshake_timeout: Duration,
    /// Caps on connections in all and per client address ([`admission`]).
    pub admission: admission::Limits,
    /// After we send a close frame, how long the peer gets to answer before the socket is dropped.
    pub close_grace: Duration,
    /// Timer wheel tick.
    pub tick: Duration,
    /// Rigor-mode resend policy.
    pub pending: PendingConfig,
    /// Messages fetched per sync page.
    pub sync_page: u32,
    /// A tokio runtime each shard thread enters for its lifetime, so that the pipeline's futures
    /// that use that runtime's reactor or timers (an in-process pipeline on sqlx, say) can be
    /// polled right on the shard: no hop to another thread and back per command. `None` when
    /// the pipeline's futures need no runtime.
    pub pipeline_runtime: Option<tokio::runtime::Handle>,
    /// This gateway's node id in a cluster (the `node` of its routes; 0 alone).
    pub node: u32,
    /// Told of every route the index takes and drops (a cluster's route directory).
    pub route_sink: Option<Sink>,
}

/// A [`RouteSink`] in the config (`Debug` for the config's sake).
#[derive(Clone)]
pub struct Sink(pub Arc<dyn RouteSink>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteSink")
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            engine: Engine::Direct,
            shards: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            path: "/ws".into(),
            ack_mode: AckMode::Only,
            idle_timeout: Duration::from_secs(60),
            max_frame_bytes: 64 * 1024,
            max_outbound_bytes: 1024 * 1024,
            read_buffer_bytes: 4096,
            handshake_timeout: Duration::from_secs(10),
            admission: admission::Limits::default(),
            close_grace: Duration::from_secs(3),
            tick: Duration::from_millis(100),
            pending: PendingConfig::default(),
            sync_page: 200,
            pipeline_runtime: None,
            node: 0,
            route_sink: None,
        }
    }
}

impl GatewayConfig {
    /// The session settings of this gateway's connections.
    pub(crate) fn session_config(&self) -> sai_proto::session::SessionConfig {
        sai_proto::session::SessionConfig {
            idle_timeout: self.idle_timeout,
            close_grace: self.close_grace,
            max_message_bytes: self.max_frame_bytes,
            max_outbound_bytes: self.max_outbound_bytes,
            rigor: self.ack_mode == AckMode::Rigor,
            pending: self.pending,
        }
    }
}

/// The gateway's side of the contract, made before the pipeline (which needs it) and started
/// with it: the user index and the shard inboxes exist from here on; the shards start in
/// [`Prepared::start`].
pub struct Prepared {
    cfg: GatewayConfig,
    index: Arc<index::UserIndex>,
    inboxes: Vec<shard::Inbox>,
    receivers: Vec<shard::InboxReceiver>,
    counters: Vec<Arc<Counters>>,
}

impl Prepared {
    /// What the metrics endpoint reads of this gateway, from now on.
    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            counters: self.counters.clone(),
            inboxes: self.inboxes.clone(),
        }
    }

    /// "Where is this user connected", answered by this gateway's index.
    pub fn routes(&self) -> Arc<dyn Routes> {
        self.index.clone()
    }

    /// The same index as the pipeline's route lookups see it (answered at once).
    pub fn route_lookup(&self) -> Arc<dyn RouteLookup> {
        self.index.clone()
    }

    /// `ms2ps_chat` into this gateway's shards.
    pub fn outbound(&self) -> Arc<dyn Ms2Ps> {
        Arc::new(ShardOutbound {
            inboxes: self.inboxes.clone(),
        })
    }

    /// Binds `addr` (port 0 picks one) once per shard with `SO_REUSEPORT` and starts the shards,
    /// which hand client commands to `pipeline`.
    pub fn start(self, addr: SocketAddr, pipeline: Arc<dyn Ws2Ms>) -> std::io::Result<Gateway> {
        shard::start(addr, self, pipeline)
    }
}

/// A gateway's counts, per shard, for the metrics endpoint (cheap to clone; reads are relaxed
/// atomic loads, and one lock per shard for the refusals).
#[derive(Clone)]
pub struct GatewayStats {
    counters: Vec<Arc<Counters>>,
    inboxes: Vec<shard::Inbox>,
}

/// One shard's counts.
pub struct ShardStats<'a> {
    /// What its sessions did.
    pub counters: &'a Counters,
    /// Messages waiting in its inbox (pushes and kicks from the pipeline and the other shards).
    pub inbox_depth: usize,
}

impl GatewayStats {
    /// Each shard's counts, by shard index.
    pub fn shards(&self) -> impl Iterator<Item = ShardStats<'_>> {
        self.counters.iter().zip(&self.inboxes).map(|(c, i)| ShardStats {
            counters: c,
            inbox_depth: i.depth(),
        })
    }
}

/// [`Ms2Ps`] over the shard inboxes: one inbox message per shard however many of its
/// connections a push goes to.
struct ShardOutbound {
    inboxes: Vec<shard::Inbox>,
}

impl ShardOutbound {
    fn send(&self, shard: u32, msg: shard::ShardMsg) {
        if let Some(inbox) = self.inboxes.get(shard as usize) {
            inbox.send(msg);
        }
    }
}

impl Ms2Ps for ShardOutbound {
    fn deliver(&self, delivery: Delivery) {
        match delivery {
            Delivery::Push { to, push, .. } => {
                let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); self.inboxes.len()];
                for r in to {
                    if let Some(v) = by_shard.get_mut(r.shard as usize) {
                        v.push(r.conn);
                    }
                }
                for (shard, conns) in by_shard.into_iter().enumerate() {
                    if !conns.is_empty() {
                        let push = push.clone();
                        self.send(shard as u32, shard::ShardMsg::Push { conns, push });
                    }
                }
            }
            Delivery::Notify { to, frame } => self.send(to.shard, shard::ShardMsg::Notify { conn: to.conn, frame }),
            Delivery::Close { to, reason } => {
                let (code, reason) = close_for(reason);
                let kick = shard::ShardMsg::Kick {
                    conn: to.conn,
                    code,
                    reason,
                };
                self.send(to.shard, kick);
            }
        }
    }
}

/// The close code and reason a connection gets when the pipeline closes it for `reason`.
pub(crate) fn close_for(reason: CloseReason) -> (u16, &'static str) {
    match reason {
        CloseReason::TokenRevoked => (close::TOKEN_REVOKED, "token revoked: log in again"),
        CloseReason::AccountDisabled => (close::ACCOUNT_DISABLED, "account disabled"),
        CloseReason::Replaced => (close::REPLACED, "replaced by a new login"),
    }
}

/// Changes a running gateway's session limits (a configuration reload).
#[derive(Clone)]
pub struct SessionLimits(Arc<shard::Shared>);

impl SessionLimits {
    /// New limits for the connections opened from now on: the idle timeout, the largest
    /// inbound message and the most bytes queued for a client. Open connections keep the
    /// limits they started with, so none is dropped by the change.
    pub fn set(&self, idle_timeout: Duration, max_frame_bytes: usize, max_outbound_bytes: usize) {
        let mut current = self.0.session.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(sai_proto::session::SessionConfig {
            idle_timeout,
            max_message_bytes: max_frame_bytes,
            max_outbound_bytes,
            ..**current
        });
    }
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    engine: Engine,
    inboxes: Vec<shard::Inbox>,
    threads: Vec<std::thread::JoinHandle<()>>,
    index: Arc<index::UserIndex>,
    shared: Arc<shard::Shared>,
}

impl Gateway {
    /// The index and inboxes of a gateway with `cfg`, to wire the pipeline before starting.
    pub fn prepare(cfg: GatewayConfig) -> Prepared {
        let n = cfg.shards.max(1);
        let (inboxes, receivers) = (0..n).map(|_| shard::inbox()).unzip();
        let index = Arc::new(index::UserIndex::new(cfg.route_sink.clone().map(|s| s.0)));
        let counters = (0..n).map(|_| Arc::new(Counters::default())).collect();
        Prepared {
            cfg,
            index,
            inboxes,
            receivers,
            counters,
        }
    }

    /// The engine that runs (the one configured, unless `direct` fell back to `monoio`).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that changes the limits of the connections opened from now on.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits(self.shared.clone())
    }

    /// Users with a live connection.
    pub fn online_users(&self) -> usize {
        self.index.len()
    }

    /// Stops accepting, closes every connection with 1012 (service restart: clients reconnect
    /// and sync) and joins the shard threads.
    pub fn shutdown(self) {
        for inbox in &self.inboxes {
            inbox.send(shard::ShardMsg::Shutdown);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
