//! The gateway's [`Backend`], in-process: each call is spawned on the services' tokio runtime
//! and its `JoinHandle` awaited from the monoio shard (tokio's handles wake any waker, and
//! monoio's `sync` feature accepts wakes from other threads).

use crate::error::ServiceError;
use crate::users::UserService;
use crate::Services;
use sai_gateway::{AuthRefusal, Backend, BackendError, Delivery, LocalBoxFuture, SyncPage};
use sai_proto::im::ChatRequest;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Services + the runtime they run on.
pub struct InProcessBackend {
    services: Arc<Services>,
    rt: tokio::runtime::Handle,
}

impl InProcessBackend {
    /// A backend running calls on `rt`.
    pub fn new(services: Arc<Services>, rt: tokio::runtime::Handle) -> Self {
        Self { services, rt }
    }

    fn run<T, F>(&self, fut: F) -> LocalBoxFuture<Result<T, BackendError>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        let handle = self.rt.spawn(fut);
        Box::pin(async move {
            match handle.await {
                Ok(r) => r.map_err(to_backend_error),
                Err(e) => {
                    tracing::error!(error = %e, "service task failed");
                    Err(to_backend_error(ServiceError::Internal))
                }
            }
        })
    }
}

fn to_backend_error(e: ServiceError) -> BackendError {
    BackendError {
        code: e.code(),
        message: e.to_string(),
    }
}

fn users(s: &Services) -> &UserService {
    &s.users
}

impl Backend for InProcessBackend {
    fn authenticate(&self, token: &str) -> Result<String, AuthRefusal> {
        users(&self.services).authenticate(token).map_err(|e| AuthRefusal {
            code: e.code(),
            message: e.to_string(),
        })
    }

    fn send(&self, user: &str, chat: ChatRequest) -> LocalBoxFuture<Result<Delivery, BackendError>> {
        let services = self.services.clone();
        let user = user.to_string();
        self.run(async move {
            let sent = services
                .messages
                .send(&user, chat.chat_type, &chat.recv_id, &chat.client_msg_id, &chat.msg)
                .await?;
            Ok(Delivery {
                ack: sent.ack,
                push: sent.push.map(Arc::new),
                recipients: sent.recipients,
            })
        })
    }

    fn sync(
        &self,
        user: &str,
        known: BTreeMap<String, u64>,
        limit: u32,
    ) -> LocalBoxFuture<Result<SyncPage, BackendError>> {
        let services = self.services.clone();
        let user = user.to_string();
        self.run(async move { services.messages.sync(&user, &known, limit).await })
    }

    fn mark_read(
        &self,
        user: &str,
        conversation_id: String,
        read_seq: u64,
    ) -> LocalBoxFuture<Result<u64, BackendError>> {
        let services = self.services.clone();
        let user = user.to_string();
        self.run(async move { services.messages.mark_read(&user, &conversation_id, read_seq).await })
    }

    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> LocalBoxFuture<()> {
        let services = self.services.clone();
        let user = user.to_string();
        let done = self.run(async move { services.messages.mark_received(&user, &acked).await });
        Box::pin(async move {
            if let Err(e) = done.await {
                tracing::warn!(code = e.code, "recording received pushes failed");
            }
        })
    }
}
