//! Starts the whole system in one process: storage, services, HTTP, gRPC and the gateway, and
//! the pipeline's flows between the gateway and the services (in-process channels).

use crate::config::Config;
use sai_gateway::Gateway;
use sai_services::auth::{load_or_create_keys, JwtKeys};
use sai_services::bridge::InProcessPipeline;
use sai_services::messages::{ChatPolicy, MessageService};
use sai_services::social::SocialService;
use sai_services::storage::Storage;
use sai_services::users::UserService;
use sai_services::{Outbound, Services, SystemClock};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The database could not be opened.
    #[error("opening the database: {0}")]
    Store(#[from] sai_storage::StoreError),
    /// Service set-up failed.
    #[error("starting services: {0}")]
    Service(#[from] sai_services::error::ServiceError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// Bound addresses, printed on the ready line.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// Gateway.
    pub ws: SocketAddr,
    /// HTTP.
    pub http: SocketAddr,
    /// gRPC.
    pub grpc: SocketAddr,
    /// The gateway's engine (the configured one unless `direct` fell back to `monoio`).
    pub engine: sai_gateway::Engine,
}

/// Runs until `shutdown` completes, then stops everything gracefully. `on_ready` is called once
/// every listener is bound.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Bound),
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(io(format!("creating {}", cfg.data_dir.display())))?;
    let store = Storage::open(&cfg.data_dir, cfg.database_url.as_deref()).await?;
    tracing::info!(storage = store.kind(), "storage open");
    let keys = match &cfg.jwt_secret {
        Some(s) => JwtKeys::new(s.as_bytes().to_vec()),
        None => {
            let p = cfg.data_dir.join("jwt.secret");
            load_or_create_keys(&p).map_err(io(format!("JWT secret {}", p.display())))?
        }
    };
    let clock = Arc::new(SystemClock);
    // The gateway's index and inboxes come first: the services send through them.
    let gateway = Gateway::prepare(sai_gateway::GatewayConfig {
        pipeline_runtime: Some(tokio::runtime::Handle::current()),
        ..cfg.gateway()
    });
    let outbound = Arc::new(Outbound::new(gateway.route_lookup(), gateway.outbound()));
    let users = Arc::new(UserService::new(
        store.users(),
        keys,
        clock.clone(),
        cfg.users(),
        outbound.clone(),
    )?);
    let social = Arc::new(SocialService::new(
        store.social(),
        users.clone(),
        outbound.clone(),
        clock.clone(),
        cfg.group.max_members,
    ));
    let policy = ChatPolicy {
        require_friendship: cfg.chat.require_friendship,
    };
    let messages = Arc::new(MessageService::new(
        store.messages(),
        users.clone(),
        social.clone(),
        outbound,
        clock,
        policy,
    ));
    let services = Arc::new(Services {
        users,
        messages,
        social,
        admin_token: cfg.admin_token.clone(),
    });

    let http_l = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .map_err(io(format!("binding HTTP {}", cfg.http_listen)))?;
    let grpc_l = tokio::net::TcpListener::bind(cfg.grpc_listen)
        .await
        .map_err(io(format!("binding gRPC {}", cfg.grpc_listen)))?;
    let pipeline = Arc::new(InProcessPipeline::new(services.clone()));
    let gateway = gateway
        .start(cfg.ws_listen, pipeline)
        .map_err(io(format!("starting gateway on {}", cfg.ws_listen)))?;
    let bound = Bound {
        ws: gateway.local_addr(),
        http: http_l.local_addr().map_err(io("HTTP address"))?,
        grpc: grpc_l.local_addr().map_err(io("gRPC address"))?,
        engine: gateway.engine(),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let http = tokio::spawn({
        let app = sai_services::http::router(services.clone());
        let stop = wait(stop_rx.clone());
        // With the peer's address: login and registration are limited per address.
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        async move { axum::serve(http_l, app).with_graceful_shutdown(stop).await }
    });
    let grpc = tokio::spawn({
        let (u, m, so) = sai_services::grpc::services(services.clone());
        let stop = wait(stop_rx.clone());
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_l);
        async move {
            tonic::transport::Server::builder()
                .add_service(u)
                .add_service(m)
                .add_service(so)
                .serve_with_incoming_shutdown(incoming, stop)
                .await
        }
    });
    on_ready(bound);
    tracing::info!(ws = %bound.ws, http = %bound.http, grpc = %bound.grpc, "sai-im ready");

    shutdown.await;
    tracing::info!("shutting down");
    // The gateway first (it closes clients with 1001 and joins its threads), then the APIs.
    tokio::task::spawn_blocking(move || gateway.shutdown())
        .await
        .map_err(|e| io("gateway shutdown")(std::io::Error::other(e.to_string())))?;
    let _ = stop_tx.send(true);
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "HTTP server error");
    }
    if let Ok(Err(e)) = grpc.await {
        tracing::warn!(error = %e, "gRPC server error");
    }
    store.close().await;
    Ok(())
}
