//! The flows between gateways and the message pipeline, named after the seed design's queues.
//!
//! - **`ws2ms_chat`** ([`Ws2Ms`]): a gateway hands a client's command (chat, sync, markChat, push
//!   receipts) to the pipeline and gets the sender's own answer back (the ack once the message is
//!   durable, a sync page, the read seq in force).
//! - **`ms2ps_chat`** ([`Ms2Ps`]): the pipeline hands [`Delivery`]s to the gateways: a stored
//!   message for other members' connections, serialized once ([`PushFrame`]), or a notification
//!   frame. Both take this one path, addressed by [`Route`]s found through [`Routes`].
//! - **`msg_to_mongo`** (persistence) is `sai_storage::MessageStore::append`, which the pipeline
//!   calls before it acks or pushes anything.
//!
//! The traits are synchronous or return plain boxed futures: no runtime is named here. The
//! embedded default implements them with in-process channels (the gateway's shard inboxes and
//! its user index); a cluster puts Kafka topics and Redis routes behind the same traits.

use crate::frame::PushFrame;
use crate::message::{ChatAck, ChatRequest, SyncPage};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A future any executor can poll and any thread can own.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A future that borrows what it was called with.
pub type BorrowedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where one connection lives: gateway node, shard (thread) on it, connection id on the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Gateway process (0 in the embedded default, which has one).
    pub node: u32,
    /// Shard thread within the gateway.
    pub shard: u32,
    /// Connection id, unique within the gateway process.
    pub conn: u64,
}

/// "Where is this user connected": one route per user (a new login replaces the older one).
pub trait Routes: Send + Sync + 'static {
    /// The user's connection, if online.
    fn lookup(&self, user: &str) -> Option<Route>;
    /// Records `route` as the user's connection; returns the one it replaced (to be closed).
    fn register(&self, user: &str, route: Route) -> Option<Route>;
    /// Forgets the user's connection if it is still `route` (a newer login is kept).
    fn remove(&self, user: &str, route: Route);
    /// Every user and route held (a cluster's gateway renews them in the route directory).
    fn held(&self) -> Vec<(String, Route)>;
}

/// Told of each route a gateway starts and ends, after its own index took it: a cluster
/// publishes them to the route directory. Called on the gateway's shard threads, so an
/// implementation only queues the work.
pub trait RouteSink: Send + Sync + 'static {
    /// `user` is now connected at `route`.
    fn registered(&self, user: &str, route: Route);
    /// `user`'s connection at `route` ended.
    fn removed(&self, user: &str, route: Route);
}

/// How the pipeline finds where users are before each delivery. In one process the gateway's
/// index answers at once; in a cluster the route directory in Redis does, over the network, so
/// the answer is a future (borrowing the user ids: a group push does not copy its members).
pub trait RouteLookup: Send + Sync + 'static {
    /// The live route of each user (`None`: offline), in order. A directory that cannot be
    /// reached answers `None` for everyone (and says so in its log): nothing is lost, the
    /// messages wait in storage for the clients' sync.
    fn lookup_many<'a>(&'a self, users: &'a [String]) -> BorrowedFuture<'a, Vec<Option<Route>>>;
}

/// Every [`Routes`] (an index in memory) answers lookups at once.
impl<R: Routes> RouteLookup for R {
    fn lookup_many<'a>(&'a self, users: &'a [String]) -> BorrowedFuture<'a, Vec<Option<Route>>> {
        let found = users.iter().map(|u| self.lookup(u)).collect();
        Box::pin(std::future::ready(found))
    }
}

/// What the pipeline sends to gateways (`ms2ps_chat`).
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A stored message for other members' connections; tracked for resend in rigor mode.
    Push {
        /// Recipient connections.
        to: Vec<Route>,
        /// The message, serialized once.
        push: Arc<PushFrame>,
        /// The trace of the chat message, when traces are on.
        trace: Option<crate::trace::TraceParent>,
    },
    /// A notification frame (read receipt, friend request, ...): sent as is, not stored, not
    /// tracked; offline users get nothing (the same facts are always available over HTTP).
    Notify {
        /// Recipient connection.
        to: Route,
        /// A complete JSON text frame.
        frame: Arc<str>,
    },
    /// Close the connection (its token no longer holds); the gateway picks the close code.
    Close {
        /// The connection.
        to: Route,
        /// Why.
        reason: CloseReason,
    },
}

/// Why the pipeline closes a client's connection ([`Delivery::Close`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The session's token was revoked: the user logged out or changed the password.
    TokenRevoked,
    /// The account was disabled.
    AccountDisabled,
    /// The user logged in on another gateway of the cluster (4001).
    Replaced,
}

/// The sending side of `ms2ps_chat`.
pub trait Ms2Ps: Send + Sync + 'static {
    /// Hands `delivery` to the gateway shards its routes name. A route whose connection has gone
    /// is skipped: every pushed message is durable first, and the client catches up by sync.
    fn deliver(&self, delivery: Delivery);
}

/// A command the pipeline refused or failed, as the client is told: a stable code and a detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable snake_case code (`not_friends`, `service_unavailable`, `invalid_token`, ...).
    pub code: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// The receiving side of `ws2ms_chat`: what a gateway asks of the pipeline for one user.
pub trait Ws2Ms: Send + Sync + 'static {
    /// Verifies an upgrade token and that its user exists, resolving to the user id.
    fn authenticate(&self, token: &str) -> BoxFuture<Result<String, Refusal>>;
    /// Stores a message from `user` and resolves, once it is durable, to the sender's ack. The
    /// pipeline pushes a new message to the other members itself (ms2ps_chat); a resend of a
    /// stored `clientMsgId` gets the original's ack and is not pushed again.
    fn chat(&self, user: &str, chat: ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>>;
    /// Up to `limit` messages after `known` (conversation -> last seq the client has).
    fn sync(&self, user: &str, known: BTreeMap<String, u64>, limit: u32) -> BoxFuture<Result<SyncPage, Refusal>>;
    /// `conversation.markChat`: resolves to the read seq now in force (never lower than before).
    fn mark_read(&self, user: &str, conversation_id: String, read_seq: u64) -> BoxFuture<Result<u64, Refusal>>;
    /// The user's client acknowledged these pushes (conversation, highest seq), in rigor mode.
    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> BoxFuture<()>;
}
