//! SAI-IM services and the one-binary server.
//!
//! # Layout
//! - [`users`]: registration (bcrypt), login, tokens ([`auth`]: JWT, HS256 or EdDSA); [`throttle`]: the
//!   attempt limits of login and registration and the bounded bcrypt pool.
//! - [`messages`]: send with per-conversation seq and idempotency, sync, history, read state,
//!   read receipts ([`receipts`]: the bitmap codec) and the conversation list.
//! - [`social`]: friend requests, friendships, groups.
//! - [`cache`]: the bounded read-through caches (user existence, friendships, group members).
//! - [`sqlite`]: the embedded storage adapter (reference implementation of `sai-storage`);
//!   [`mysql`]: the production adapter of the same traits (MySQL / MariaDB); [`storage`]: the
//!   one a process opens, chosen by the database URL.
//! - [`http`]: the HTTP JSON API (axum); [`grpc`]: the tonic services.
//! - [`bridge`]: the pipeline's `ws2ms_chat` receiving side ([`sai_pipeline::flow::Ws2Ms`])
//!   for gateways in the same process: each command is a future the gateway shard polls itself;
//!   [`Outbound`] is its `ms2ps_chat` sending side, the one path of every push and notification.
//! - [`admin`]: `sai-im admin ...` maintenance commands (bulk user seeding for load tests).
//!
//! This crate stands on the contract crate `sai-pipeline` and on `sai-storage`; it never sees a
//! gateway. The `sai-im` binary (`server/`) wires the two.

pub mod admin;
pub mod auth;
pub mod bridge;
pub mod cache;
pub mod error;
pub mod grpc;
pub mod http;
pub mod messages;
pub mod mysql;
pub mod receipts;
pub mod social;
pub mod sqlite;
pub mod storage;
pub mod throttle;
pub mod users;

use sai_pipeline::flow::{CloseReason, Delivery, Ms2Ps, RouteLookup};
use sai_pipeline::frame::{data_frame, PushFrame};
use sai_pipeline::message::Push;
use serde::Serialize;
use std::sync::Arc;

/// The largest `max_group_members` a server accepts: each group message's read receipts are a
/// bitmap of member slots, whose format caps its cardinality.
pub const MAX_GROUP_MEMBERS: u32 = sai_bitmap::format::MAX_CARDINALITY;
/// Wall-clock time, injected so tests can control it.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// Every service, shared by the HTTP API, gRPC and the gateway bridge.
pub struct Services {
    /// Users and tokens.
    pub users: Arc<users::UserService>,
    /// Messages.
    pub messages: Arc<messages::MessageService>,
    /// Friends and groups.
    pub social: Arc<social::SocialService>,
    /// The bearer token of the admin routes (`/v1/admin/...`); `None` turns them off.
    pub admin_token: Option<String>,
}

impl Services {
    /// Tells `peers` (the other services processes of a cluster) of every cache invalidation.
    pub fn set_cache_peers(&self, peers: Arc<dyn cache::CachePeers>) {
        self.users.set_peers(peers.clone());
        self.social.set_peers(peers);
    }

    /// Forgets what a peer invalidated.
    pub fn forget(&self, cache: cache::CacheName, key: &str) {
        match cache {
            cache::CacheName::Accounts => self.users.forget_account(key),
            other => self.social.forget(other, key),
        }
    }

    /// Forgets every cached fact (invalidations from peers may have been missed).
    pub fn forget_all(&self) {
        self.users.forget_accounts();
        self.social.forget_all();
    }
}

/// `ms2ps_chat`, the services' one way out to clients: stored messages and notifications alike
/// are addressed to the recipients' [`Route`](sai_pipeline::flow::Route)s and handed to the
/// gateways. Offline users get nothing: a stored message reaches them by sync, and what a
/// notification announces can always be fetched over HTTP.
pub struct Outbound {
    routes: Arc<dyn RouteLookup>,
    ms2ps: Arc<dyn Ms2Ps>,
}

impl Outbound {
    /// Deliveries to `ms2ps`, addressed through `routes` (the gateway's index in one process,
    /// the route directory in a cluster).
    pub fn new(routes: Arc<dyn RouteLookup>, ms2ps: Arc<dyn Ms2Ps>) -> Self {
        Self { routes, ms2ps }
    }

    /// The route of one user.
    async fn route(&self, user: &str) -> Option<sai_pipeline::flow::Route> {
        self.routes
            .lookup_many(&[user.to_string()])
            .await
            .into_iter()
            .next()
            .flatten()
    }

    /// Pushes a stored message to the online ones of `recipients`, serialized once for all.
    pub async fn push(&self, recipients: &[String], push: &Push) {
        let to: Vec<_> = self
            .routes
            .lookup_many(recipients)
            .await
            .into_iter()
            .flatten()
            .collect();
        if !to.is_empty() {
            let push = Arc::new(PushFrame::new(push));
            self.ms2ps.deliver(Delivery::Push { to, push, trace: None });
        }
    }

    /// Whether each of `users` has a live connection (a route), in order.
    pub async fn online(&self, users: &[String]) -> Vec<bool> {
        self.routes
            .lookup_many(users)
            .await
            .into_iter()
            .map(|r| r.is_some())
            .collect()
    }

    /// Closes `user`'s live connection, if any, for `reason`.
    pub async fn close(&self, user: &str, reason: CloseReason) {
        if let Some(to) = self.route(user).await {
            self.ms2ps.deliver(Delivery::Close { to, reason });
        }
    }

    /// Sends `{"frameType":0,"method":<method>,"data":<data>}` to `user` if online.
    pub async fn notify<T: Serialize>(&self, user: &str, method: &str, data: &T) {
        let frame: Arc<str> = Arc::from(data_frame(None, method, data));
        if let Some(to) = self.route(user).await {
            self.ms2ps.deliver(Delivery::Notify { to, frame });
        }
    }
}
