//! The SAI-IM WebSocket gateway: thread-per-core on monoio (io_uring where the kernel allows it,
//! epoll otherwise).
//!
//! # Layout
//! - [`Gateway::start`] binds one `SO_REUSEPORT` listener per shard and starts one thread with
//!   its own monoio runtime per shard ([`shard`]).
//! - Each shard owns its connections ([`conn`]), one [`wheel::TimerWheel`] for idle and close
//!   deadlines, and an inbox channel; shards share only the [`index::UserIndex`] and each
//!   other's inbox senders. Cross-shard delivery and exclusive-login kicks travel as messages.
//! - Protocol work is done by the sans-IO `sai-proto` crate; storage and auth sit behind
//!   [`Backend`], which the services crate implements (in-process here; over gRPC/Kafka later).

pub mod conn;
pub mod index;
pub mod shard;
pub mod wheel;

pub use sai_proto::im::SyncPage;
use sai_proto::im::{ChatAck, ChatRequest, Push};
use sai_proto::pending::PendingConfig;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A future the gateway awaits on its shard thread.
pub type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T> + 'static>>;

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

/// Gateway settings. Every per-connection buffer is sized here.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
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
    /// After we send a close frame, how long the peer gets to answer before the socket is dropped.
    pub close_grace: Duration,
    /// Timer wheel tick.
    pub tick: Duration,
    /// Rigor-mode resend policy.
    pub pending: PendingConfig,
    /// Messages fetched per sync page.
    pub sync_page: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            shards: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            path: "/ws".into(),
            ack_mode: AckMode::Only,
            idle_timeout: Duration::from_secs(60),
            max_frame_bytes: 64 * 1024,
            max_outbound_bytes: 1024 * 1024,
            read_buffer_bytes: 4096,
            handshake_timeout: Duration::from_secs(10),
            close_grace: Duration::from_secs(3),
            tick: Duration::from_millis(100),
            pending: PendingConfig::default(),
            sync_page: 200,
        }
    }
}

/// A refused upgrade token.
#[derive(Debug, Clone)]
pub struct AuthRefusal {
    /// Stable code (`missing_token`, `invalid_token`, `token_expired`, ...).
    pub code: &'static str,
    /// Detail.
    pub message: String,
}

/// A request the backend refused or failed; sent to the client as an error frame.
#[derive(Debug, Clone)]
pub struct BackendError {
    /// Stable code.
    pub code: &'static str,
    /// Detail.
    pub message: String,
}

/// A stored message and whom to push it to.
#[derive(Debug)]
pub struct Delivery {
    /// The sender's ack.
    pub ack: ChatAck,
    /// The push; `None` for a duplicate (already pushed once).
    pub push: Option<Arc<Push>>,
    /// Recipients other than the sender.
    pub recipients: Vec<String>,
}

/// What the gateway needs from the services. Methods are called on shard threads; their futures
/// are polled there, so an implementation that runs on another runtime must hand the work over.
pub trait Backend: Send + Sync + 'static {
    /// Verifies an upgrade token, returning the user id.
    fn authenticate(&self, token: &str) -> Result<String, AuthRefusal>;
    /// Stores a message from `user`.
    fn send(&self, user: &str, chat: ChatRequest) -> LocalBoxFuture<Result<Delivery, BackendError>>;
    /// Messages after `known` (conversation -> last seq the client has), at most `limit`.
    fn sync(
        &self,
        user: &str,
        known: BTreeMap<String, u64>,
        limit: u32,
    ) -> LocalBoxFuture<Result<SyncPage, BackendError>>;
    /// `conversation.markChat`: returns the read seq now in force (never lower than before).
    fn mark_read(
        &self,
        user: &str,
        conversation_id: String,
        read_seq: u64,
    ) -> LocalBoxFuture<Result<u64, BackendError>>;
    /// The user's client acknowledged these pushes (conversation, highest seq), in rigor mode.
    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> LocalBoxFuture<()>;
}

/// Sends server frames (notifications such as read receipts and friend requests) to whichever
/// connection a user has, from any thread. Offline users get nothing: notifications are not
/// stored messages.
#[derive(Clone)]
pub struct Notifier {
    index: Arc<index::UserIndex>,
    inboxes: Vec<shard::Inbox>,
}

impl Notifier {
    /// Queues `frame` (a complete JSON text frame) for `user` if online. Returns whether it was.
    pub fn notify(&self, user: &str, frame: Arc<str>) -> bool {
        let Some(r) = self.index.lookup(user) else {
            return false;
        };
        self.inboxes
            .get(r.shard)
            .is_some_and(|i| i.send(shard::ShardMsg::Notify { conn: r.conn, frame }).is_ok())
    }
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    inboxes: Vec<shard::Inbox>,
    threads: Vec<std::thread::JoinHandle<()>>,
    index: Arc<index::UserIndex>,
}

impl Gateway {
    /// Binds `addr` (port 0 picks one) once per shard with `SO_REUSEPORT` and starts the shards.
    pub fn start(addr: SocketAddr, cfg: GatewayConfig, backend: Arc<dyn Backend>) -> std::io::Result<Self> {
        shard::start(addr, cfg, backend)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Users with a live connection.
    pub fn online_users(&self) -> usize {
        self.index.len()
    }

    /// A handle that sends frames to online users from any thread.
    pub fn notifier(&self) -> Notifier {
        Notifier {
            index: self.index.clone(),
            inboxes: self.inboxes.clone(),
        }
    }

    /// Closes every connection with 1001, stops accepting and joins the shard threads.
    pub fn shutdown(self) {
        for inbox in &self.inboxes {
            let _ = inbox.send(shard::ShardMsg::Shutdown);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
