//! SAI-IM services and the one-binary server.
//!
//! # Layout
//! - [`users`]: registration (bcrypt), login, tokens ([`auth`]: HS256 JWT).
//! - [`messages`]: send with per-conversation seq and idempotency, sync, history, read state,
//!   read receipts ([`receipts`]: the bitmap codec) and the conversation list.
//! - [`social`]: friend requests, friendships, groups.
//! - [`cache`]: the bounded read-through caches (user existence, friendships, group members).
//! - [`sqlite`]: the embedded storage adapter (reference implementation of `sai-storage`).
//! - [`http`]: the HTTP JSON API (axum); [`grpc`]: the tonic services.
//! - [`bridge`]: the gateway's [`sai_gateway::Backend`], handing work from monoio shards to the
//!   tokio runtime the services run on.
//! - [`admin`]: `sai-im admin ...` maintenance commands (bulk user seeding for load tests).
//! - [`config`] and [`server`]: settings (flags, environment, TOML) and [`server::run`], which
//!   starts everything in one process.

pub mod admin;
pub mod auth;
pub mod bridge;
pub mod cache;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod messages;
pub mod receipts;
pub mod server;
pub mod social;
pub mod sqlite;
pub mod users;

use serde::Serialize;
use std::sync::{Arc, OnceLock};

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
}

/// Where notifications (read receipts, friend requests) go: the gateway's [`sai_gateway::Notifier`]
/// once the gateway runs. Notifications are best effort: an offline user gets nothing (what they
/// announce can always be fetched over HTTP).
#[derive(Default)]
pub struct Notifications {
    gateway: OnceLock<sai_gateway::Notifier>,
}

impl Notifications {
    /// Connects the gateway (once).
    pub fn attach(&self, n: sai_gateway::Notifier) {
        let _ = self.gateway.set(n);
    }

    /// Sends `{"frameType":0,"method":<method>,"data":<data>}` to `user` if online.
    pub fn send<T: Serialize>(&self, user: &str, method: &str, data: &T) {
        if let Some(g) = self.gateway.get() {
            g.notify(user, Arc::from(sai_proto::im::data_frame(None, method, data)));
        }
    }
}
