//! Starts the system: all in one process (storage, services, HTTP, gRPC and the gateway, with
//! the pipeline's flows as in-process channels), or one process of a cluster: `services`
//! (storage, services, HTTP, gRPC and the internal pipeline port), `gateway` (WebSocket,
//! reaching the services over the internal port and the route directory in Redis) or `task`
//! (group read bitmaps from Kafka's `msg_to_mongo`, written in batches).

use crate::config::{Config, ReadBitmaps};
use crate::metrics::Metrics;
use crate::reload;
use crate::takeover::{DataDirLock, Deferred};
use crate::trace;
use opentelemetry::trace::SpanKind;
use prometheus_client::registry::Registry;
use sai_cluster::kafka::{KafkaChat, KafkaDeliveries};
use sai_cluster::pipeline::{ClusterKey, DeliveryHub, Forward, GrpcPipeline, PipelineService};
use sai_cluster::publisher::{self, Node};
use sai_cluster::routes::{RouteDirectory, RouteError, Ttls};
use sai_cluster::task::{KafkaReadMarks, ReadMarkWriter};
use sai_gateway::Gateway;
use sai_pipeline::edge::{EdgeCheck, UnixSeconds};
use sai_pipeline::flow::{Ms2Ps, Ws2Ms};
use sai_pipeline::token::Verifier;
use sai_services::auth::{load_or_create_keys, JwtKeys};
use sai_services::bridge::InProcessPipeline;
use sai_services::messages::{ChatPolicy, MessageService};
use sai_services::receipts::SaiCodec;
use sai_services::social::SocialService;
use sai_services::storage::Storage;
use sai_services::users::UserService;
use sai_services::{Clock, Outbound, Services, SystemClock};
use sai_storage::ReadMarkSink;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    /// The route directory (Redis) could not be used.
    #[error("route directory: {0}")]
    Routes(#[from] RouteError),
    /// The cluster settings are incomplete.
    #[error("{0}")]
    Config(String),
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
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
}

/// Runs until `shutdown` completes, then stops everything gracefully. `on_ready` is called once
/// every listener is bound.
pub async fn run(
    cfg: Config,
    source: reload::Source,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Bound),
) -> Result<(), ServerError> {
    let keys = jwt_keys(&cfg)?;
    // One process per data directory: its store is the only appender (see `takeover`).
    let lock = if cfg.take_over {
        None
    } else {
        let lock = DataDirLock::acquire(&cfg.data_dir).map_err(|e| ServerError::Config(e.to_string()))?;
        // The ports are shared (SO_REUSEPORT) only with a successor started with --take-over:
        // any other process already on them makes this one fail to start.
        for (what, addr) in [
            ("WebSocket", cfg.ws_listen),
            ("HTTP", cfg.http_listen),
            ("gRPC", cfg.grpc_listen),
        ] {
            if addr.port() != 0 {
                std::net::TcpListener::bind(addr).map_err(io(format!("binding {what} {addr}")))?;
            }
        }
        Some(lock)
    };
    let traces = start_traces(&cfg, "all")?;
    let apis = Apis::bind(&cfg)?;
    let mut metrics = Metrics::new("all");
    // The gateway's index and inboxes come first: the services send through them.
    let gateway = Gateway::prepare(sai_gateway::GatewayConfig {
        pipeline_runtime: Some(tokio::runtime::Handle::current()),
        ..cfg.gateway()
    });
    metrics.gateway(gateway.stats());
    let pushes = trace::deliveries(gateway.outbound(), "push", SpanKind::Consumer);
    let outbound = Arc::new(Outbound::new(gateway.route_lookup(), pushes));
    let start_gateway = |gateway: sai_gateway::Prepared, pipeline| {
        gateway
            .start(cfg.ws_listen, pipeline)
            .map_err(io(format!("starting gateway on {}", cfg.ws_listen)))
    };
    let (gateway, _lock, store, services) = match lock {
        Some(lock) => {
            let store = open_storage(&cfg).await?;
            let services = build_services(&cfg, keys, &store, outbound, None, &mut metrics)?;
            let pipeline = metrics.pipeline(Arc::new(InProcessPipeline::new(services.clone())));
            (start_gateway(gateway, pipeline)?, lock, store, services)
        }
        None => {
            // Taking over: connections are taken (their upgrades wait) while the running
            // server drains and lets go of the data directory.
            let deferred = Deferred::default();
            let gateway = start_gateway(gateway, metrics.pipeline(Arc::new(deferred.clone())))?;
            let wait = Duration::from_secs(cfg.shutdown_timeout_secs + 5);
            let lock = DataDirLock::take_over(&cfg.data_dir, wait)
                .await
                .map_err(|e| ServerError::Config(e.to_string()))?;
            let store = open_storage(&cfg).await?;
            let services = build_services(&cfg, keys, &store, outbound, None, &mut metrics)?;
            deferred.set(Arc::new(InProcessPipeline::new(services.clone())));
            (gateway, lock, store, services)
        }
    };
    reload::watch(
        source,
        cfg.clone(),
        reload::Targets {
            services: Some(services.clone()),
            gateway: Some(gateway.session_limits()),
        },
        metrics.reloads(),
    );
    let (metrics, on_http) = expose(&cfg, metrics, Some(apis.http)).await?;
    let bound = Bound {
        ws: gateway.local_addr(),
        http: apis.http,
        grpc: apis.grpc,
        engine: gateway.engine(),
        metrics,
    };
    let apis = apis.serve(services, None, on_http, Some(bound.ws.port()));
    on_ready(bound);
    tracing::info!(ws = %bound.ws, http = %bound.http, grpc = %bound.grpc, "sai-im ready");

    shutdown.await;
    tracing::info!("shutting down");
    // The gateway first (it closes clients with 1012 and joins its threads), then the APIs.
    shut_down(gateway).await?;
    apis.stop().await;
    store.close().await;
    stop_traces(traces).await;
    Ok(())
}

/// Traces as `cfg` asks (none without an endpoint).
fn start_traces(cfg: &Config, role: &'static str) -> Result<Option<trace::Traces>, ServerError> {
    trace::start(cfg.otlp_endpoint.as_deref(), cfg.trace_sampling, role).map_err(ServerError::Config)
}

/// Sends the spans still queued.
async fn stop_traces(traces: Option<trace::Traces>) {
    if let Some(t) = traces {
        t.stop().await;
    }
}

/// What a services process serves.
#[derive(Debug, Clone, Copy)]
pub struct ServicesBound {
    /// HTTP.
    pub http: SocketAddr,
    /// gRPC.
    pub grpc: SocketAddr,
    /// The internal pipeline port the gateways use.
    pub internal: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
}

/// A services process of a cluster: storage, the services, HTTP and gRPC, and the internal
/// pipeline port that gateways call (`ws2ms_chat`) and subscribe to (`ms2ps_chat`, addressed
/// through the route directory in Redis).
pub async fn run_services(
    cfg: Config,
    source: reload::Source,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(ServicesBound),
) -> Result<(), ServerError> {
    let key = cluster_key(&cfg)?;
    // Keys first: a process refused for them leaves nothing behind.
    let keys = jwt_keys(&cfg)?;
    let traces = start_traces(&cfg, "services")?;
    let directory = connect_directory(&cfg).await?;
    let store = open_storage(&cfg).await?;
    let mut metrics = Metrics::new("services");
    metrics.redis();
    let hub = Arc::new(DeliveryHub::default());
    // With Kafka, deliveries go to ms2ps_chat; else to the gateways' streams from the hub.
    let kafka = match cfg.kafka() {
        Some(k) => Some((
            Arc::new(KafkaDeliveries::connect(&k).await.map_err(ServerError::Config)?),
            k,
        )),
        None => None,
    };
    if let Some((_, k)) = &kafka {
        metrics.kafka(k.stats.clone());
    }
    let ms2ps: Arc<dyn Ms2Ps> = match &kafka {
        Some((out, _)) => out.clone(),
        None => hub.clone(),
    };
    let ms2ps = trace::deliveries(ms2ps, "ms2ps_chat send", SpanKind::Producer);
    let outbound = Arc::new(Outbound::new(Arc::new(directory), ms2ps));
    let read_marks: Option<Arc<dyn ReadMarkSink>> = match (&kafka, cfg.read_bitmaps) {
        (Some((_, k)), ReadBitmaps::Task) => {
            let queue = KafkaReadMarks::connect(k).await.map_err(ServerError::Config)?;
            tracing::info!(topic = %k.msg_to_mongo(), "group read bitmaps handed to the task processes");
            Some(Arc::new(queue))
        }
        _ => None,
    };
    let services = build_services(&cfg, keys, &store, outbound, read_marks, &mut metrics)?;
    share_invalidations(&cfg, &services).await?;
    // The services' side of the pipeline, for Kafka's chat commands and the internal port alike.
    let ws2ms = metrics.pipeline(Arc::new(InProcessPipeline::new(services.clone())));
    let chat_consumer = match &kafka {
        Some((out, k)) => {
            let c =
                sai_cluster::kafka::consume_chats(k, ws2ms.clone(), out.clone(), &tokio::runtime::Handle::current())
                    .await
                    .map_err(ServerError::Config)?;
            tracing::info!(brokers = %k.brokers, topic = %k.ws2ms(), "consuming chat commands from Kafka");
            Some(c)
        }
        None => None,
    };
    let apis = Apis::bind(&cfg)?;
    let internal_l =
        listen(cfg.internal_listen).map_err(io(format!("binding the internal port {}", cfg.internal_listen)))?;
    reload::watch(
        source,
        cfg.clone(),
        reload::Targets {
            services: Some(services.clone()),
            gateway: None,
        },
        metrics.reloads(),
    );
    let (metrics, on_http) = expose(&cfg, metrics, Some(apis.http)).await?;
    let bound = ServicesBound {
        http: apis.http,
        grpc: apis.grpc,
        internal: internal_l.local_addr().map_err(io("internal address"))?,
        metrics,
    };
    let pipeline = PipelineService::new(ws2ms, hub.clone(), key);
    let apis = apis.serve(services, Some((internal_l, pipeline)), on_http, None);
    on_ready(bound);
    tracing::info!(http = %bound.http, grpc = %bound.grpc, internal = %bound.internal, "services ready");
    shutdown.await;
    tracing::info!("shutting down");
    // Chat commands read from Kafka finish and their offsets are committed; what they queued
    // for the gateways is flushed to the broker.
    if let Some(c) = chat_consumer {
        c.stop().await;
    }
    if let Some((out, _)) = &kafka {
        out.clone().flush().await;
    }
    // The delivery streams end first: a graceful stop waits for every open stream.
    hub.close_all();
    apis.stop().await;
    store.close().await;
    stop_traces(traces).await;
    Ok(())
}

/// A task process of a cluster: the group read receipts' bitmap work handed over Kafka's
/// `msg_to_mongo` by services processes run with `--read-bitmaps task`, written to the
/// services' storage in batches.
pub async fn run_task(
    cfg: Config,
    source: reload::Source,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(TaskBound),
) -> Result<(), ServerError> {
    let k = cfg
        .kafka()
        .ok_or_else(|| ServerError::Config("a task process needs --kafka (it reads the msg_to_mongo topic)".into()))?;
    if cfg.database_url.is_none() {
        return Err(ServerError::Config(
            "a task process needs the services' --database-url (and --chat-log, if they have one)".into(),
        ));
    }
    let store = open_storage(&cfg).await?;
    let mut metrics = Metrics::new("task");
    metrics.kafka(k.stats.clone());
    let messages = metrics.store(store.messages());
    let runtime = tokio::runtime::Handle::current();
    let writer = ReadMarkWriter::start(&k, messages, Arc::new(SaiCodec), &runtime)
        .await
        .map_err(ServerError::Config)?;
    let topic = k.msg_to_mongo();
    reload::watch(source, cfg.clone(), reload::Targets::default(), metrics.reloads());
    let (metrics, _) = expose(&cfg, metrics, None).await?;
    on_ready(TaskBound {
        topic: topic.clone(),
        metrics,
    });
    tracing::info!(brokers = %k.brokers, topic = %topic, "task ready");
    shutdown.await;
    tracing::info!("shutting down");
    writer.stop().await;
    store.close().await;
    Ok(())
}

/// What a task process reads and serves.
#[derive(Debug, Clone)]
pub struct TaskBound {
    /// The topic it reads (`<prefix>msg_to_mongo`).
    pub topic: String,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
}

/// What a gateway process serves.
#[derive(Debug, Clone, Copy)]
pub struct GatewayBound {
    /// The WebSocket endpoint.
    pub ws: SocketAddr,
    /// Its engine.
    pub engine: sai_gateway::Engine,
    /// Its node id.
    pub node: u32,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
}

/// A gateway process of a cluster: WebSocket connections, whose commands go to the services
/// processes over the internal port and whose routes live in the directory in Redis.
pub async fn run_gateway(
    cfg: Config,
    source: reload::Source,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(GatewayBound),
) -> Result<(), ServerError> {
    if cfg.services.is_empty() {
        return Err(ServerError::Config(
            "a gateway needs --services (the internal address of each services process)".into(),
        ));
    }
    let key = cluster_key(&cfg)?;
    // Key files are read before the node announces itself.
    let verifier = gateway_verifier(&cfg)?;
    let traces = start_traces(&cfg, "gateway")?;
    let runtime = tokio::runtime::Handle::current();
    let directory = connect_directory(&cfg).await?;
    let incarnation = getrandom::u64().map_err(|e| ServerError::Config(format!("random incarnation: {e}")))?;
    let node = Node {
        directory,
        id: cfg.node,
        incarnation,
    };
    node.directory.announce(node.id, incarnation).await?;
    let endpoints: Vec<String> = cfg
        .services
        .iter()
        .map(|s| {
            if s.contains("://") {
                s.clone()
            } else {
                format!("http://{s}")
            }
        })
        .collect();
    let pipeline = GrpcPipeline::new(&endpoints, &key, runtime.clone()).map_err(ServerError::Config)?;
    let (sink, events) = publisher::channel();
    let gateway = Gateway::prepare(sai_gateway::GatewayConfig {
        pipeline_runtime: Some(runtime.clone()),
        node: cfg.node,
        route_sink: Some(sai_gateway::Sink(Arc::new(sink))),
        ..cfg.gateway()
    });
    let mut metrics = Metrics::new("gateway");
    metrics.gateway(gateway.stats());
    metrics.redis();
    let local = trace::deliveries(gateway.outbound(), "push", SpanKind::Consumer);
    // With Kafka, chat commands and deliveries take its topics; else the internal port's calls
    // and streams.
    let mut kafka_chat = None;
    let (ws2ms, forward): (Arc<dyn Ws2Ms>, Arc<dyn Forward>) = match cfg.kafka() {
        Some(k) => {
            let chat = KafkaChat::start(
                &k,
                pipeline.clone(),
                cfg.node,
                incarnation,
                local.clone(),
                runtime.clone(),
            )
            .await
            .map_err(ServerError::Config)?;
            tracing::info!(brokers = %k.brokers, topic = %k.ms2ps(), "chat through Kafka");
            kafka_chat = Some(chat.clone());
            metrics.kafka(k.stats.clone());
            (Arc::new(chat.clone()), Arc::new(chat))
        }
        None => {
            for client in pipeline.clients() {
                sai_cluster::pipeline::subscribe(client, cfg.node, local.clone(), &runtime);
            }
            (Arc::new(pipeline.clone()), Arc::new(pipeline))
        }
    };
    let ws2ms: Arc<dyn Ws2Ms> = match verifier {
        Some(verifier) => {
            tracing::info!(keys = ?verifier, "tokens verified here first");
            // Seconds, as the services read the same clock for the same check.
            let now: UnixSeconds = Arc::new(|| SystemClock.now_ms() / 1000);
            Arc::new(EdgeCheck::new(verifier, now, ws2ms))
        }
        None => ws2ms,
    };
    let ws2ms = metrics.pipeline(ws2ms);
    publisher::publish(events, node.clone(), forward, &runtime);
    let every = Ttls::default().node / 3;
    // Routes are renewed every 6th sweep (30 s), a quarter of their TTL.
    publisher::sweep(node.clone(), gateway.routes(), local, every, 6, &runtime);
    let gateway = gateway
        .start(cfg.ws_listen, ws2ms)
        .map_err(io(format!("starting gateway on {}", cfg.ws_listen)))?;
    reload::watch(
        source,
        cfg.clone(),
        reload::Targets {
            services: None,
            gateway: Some(gateway.session_limits()),
        },
        metrics.reloads(),
    );
    let (metrics, _) = expose(&cfg, metrics, None).await?;
    let bound = GatewayBound {
        ws: gateway.local_addr(),
        engine: gateway.engine(),
        node: cfg.node,
        metrics,
    };
    on_ready(bound);
    tracing::info!(ws = %bound.ws, node = bound.node, "gateway ready");
    shutdown.await;
    tracing::info!("shutting down");
    shut_down(gateway).await?;
    if let Some(chat) = kafka_chat {
        chat.flush().await;
    }
    // Its routes stop counting at once.
    if let Err(e) = node.directory.retire(node.id, incarnation).await {
        tracing::warn!(error = %e, "retiring the node failed: its routes lapse with its TTL");
    }
    stop_traces(traces).await;
    Ok(())
}

/// The services' cache invalidations told to the other services processes over Redis
/// (`<prefix>cache`: `origin\ncache\nkey`), and theirs applied here; a (re)started
/// subscription forgets everything, since it may have missed some.
async fn share_invalidations(cfg: &Config, services: &Arc<Services>) -> Result<(), ServerError> {
    struct RedisPeers {
        bus: sai_cluster::bus::Bus,
        origin: u64,
    }
    impl sai_services::cache::CachePeers for RedisPeers {
        fn invalidated(&self, cache: sai_services::cache::CacheName, key: &str) {
            self.bus.publish(format!("{}\n{}\n{key}", self.origin, cache.as_str()));
        }
    }
    let url = redis_url(cfg)?;
    let channel = format!("{}cache", cfg.redis_prefix);
    let origin = getrandom::u64().map_err(|e| ServerError::Config(format!("random origin: {e}")))?;
    let bus = sai_cluster::bus::Bus::connect(url, &channel).await?;
    services.set_cache_peers(Arc::new(RedisPeers { bus, origin }));
    let (on_message, on_subscribed) = (services.clone(), services.clone());
    sai_cluster::bus::subscribe(
        url,
        &channel,
        move |payload| {
            let mut parts = payload.splitn(3, '\n');
            let (Some(from), Some(cache), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
                return;
            };
            if from == origin.to_string() {
                return;
            }
            if let Some(cache) = sai_services::cache::CacheName::parse(cache) {
                on_message.forget(cache, key);
            }
        },
        move || on_subscribed.forget_all(),
    )?;
    Ok(())
}

fn redis_url(cfg: &Config) -> Result<&str, ServerError> {
    cfg.redis_url
        .as_deref()
        .ok_or_else(|| ServerError::Config("a cluster process needs --redis-url".into()))
}

fn cluster_key(cfg: &Config) -> Result<ClusterKey, ServerError> {
    let key = cfg.cluster_key.as_deref().ok_or_else(|| {
        ServerError::Config("a cluster process needs --cluster-key (the secret its processes share)".into())
    })?;
    ClusterKey::new(key).map_err(ServerError::Config)
}

/// Stops a gateway (it closes its clients with 1012 and joins its threads) off the runtime.
async fn shut_down(gateway: Gateway) -> Result<(), ServerError> {
    tokio::task::spawn_blocking(move || gateway.shutdown())
        .await
        .map_err(|e| io("gateway shutdown")(std::io::Error::other(e.to_string())))
}

async fn connect_directory(cfg: &Config) -> Result<RouteDirectory, ServerError> {
    Ok(RouteDirectory::connect(redis_url(cfg)?, &cfg.redis_prefix, Ttls::default()).await?)
}

async fn open_storage(cfg: &Config) -> Result<Storage, ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(io(format!("creating {}", cfg.data_dir.display())))?;
    let store = Storage::open(&cfg.data_dir, cfg.database_url.as_deref(), cfg.chat_log.as_deref()).await?;
    tracing::info!(storage = store.kind(), "storage open");
    Ok(store)
}

/// The token keys: EdDSA from key files, else HS256 from the secret (given, or generated once
/// and kept in the data dir).
fn jwt_keys(cfg: &Config) -> Result<JwtKeys, ServerError> {
    if let (Some(private), Some(public)) = (&cfg.jwt_private_key, &cfg.jwt_public_key) {
        let mut keys =
            JwtKeys::ed25519(&read_key_file(private)?, &read_key_file(public)?).map_err(ServerError::Config)?;
        if let Some(previous) = &cfg.jwt_previous_public_key {
            keys = keys
                .with_previous_ed25519(&read_key_file(previous)?)
                .map_err(ServerError::Config)?;
        }
        tracing::info!(kid = keys.key_id(), "tokens: EdDSA");
        return Ok(keys);
    }
    if cfg.jwt_public_key.is_some() {
        return Err(ServerError::Config(
            "a process that issues tokens needs jwt_private_key beside jwt_public_key (a public key alone is for gateways)"
                .into(),
        ));
    }
    Ok(match &cfg.jwt_secret {
        Some(s) => JwtKeys::new(s.as_bytes().to_vec()),
        None => {
            std::fs::create_dir_all(&cfg.data_dir).map_err(io(format!("creating {}", cfg.data_dir.display())))?;
            let p = cfg.data_dir.join("jwt.secret");
            load_or_create_keys(&p).map_err(io(format!("JWT secret {}", p.display())))?
        }
    })
}

/// A listener on `addr` with `SO_REUSEPORT`, as the gateway's shards have: a new process (a
/// zero-downtime upgrade) binds the same port beside this one and takes new connections, and
/// this one drains and stops. (So a second process started on a port by mistake shares it
/// instead of failing.)
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Serves `metrics` on `--metrics-listen` when given; else beside the HTTP API when the
/// process has one (`http`: the registry is returned for [`Apis::serve`]), or on a free
/// loopback port. Returns where they are served.
async fn expose(
    cfg: &Config,
    metrics: Metrics,
    http: Option<SocketAddr>,
) -> Result<(SocketAddr, Option<Arc<Registry>>), ServerError> {
    let registry = metrics.finish();
    let addr = match (cfg.metrics_listen, http) {
        (None, Some(http)) => return Ok((http, Some(registry))),
        (Some(addr), _) => addr,
        (None, None) => (std::net::Ipv4Addr::LOCALHOST, 0).into(),
    };
    let l = listen(addr).map_err(io(format!("binding the metrics listener {addr}")))?;
    let bound = l.local_addr().map_err(io("metrics address"))?;
    // Served for as long as the process runs: a scrape needs no graceful drain.
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, crate::metrics::router(registry)).await {
            tracing::warn!(error = %e, "the metrics listener failed");
        }
    });
    Ok((bound, None))
}

/// A key file's bytes.
fn read_key_file(p: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(p).map_err(io(format!("reading {}", p.display())))
}

/// A gateway's verify-only keys: the EdDSA public key (and a rotation's previous one) when
/// configured. Without them the gateway leaves the whole token check to the services.
fn gateway_verifier(cfg: &Config) -> Result<Option<Verifier>, ServerError> {
    let Some(public) = &cfg.jwt_public_key else {
        return Ok(None);
    };
    let mut verifier = Verifier::ed25519(&read_key_file(public)?).map_err(ServerError::Config)?;
    if let Some(previous) = &cfg.jwt_previous_public_key {
        verifier = verifier
            .with_previous_ed25519(&read_key_file(previous)?)
            .map_err(ServerError::Config)?;
    }
    if cfg.jwt_private_key.is_some() {
        tracing::warn!("a gateway needs only jwt_public_key: its jwt_private_key is not used");
    }
    Ok(Some(verifier))
}

/// The services over `store`, signing with `keys`, sending to clients through `outbound`, and handing group read
/// receipts' bitmap work to `read_marks` when given.
fn build_services(
    cfg: &Config,
    keys: JwtKeys,
    store: &Storage,
    outbound: Arc<Outbound>,
    read_marks: Option<Arc<dyn ReadMarkSink>>,
    metrics: &mut Metrics,
) -> Result<Arc<Services>, ServerError> {
    let clock = Arc::new(SystemClock);
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
    let mut messages = MessageService::new(
        metrics.store(store.messages()),
        users.clone(),
        social.clone(),
        outbound,
        clock,
        policy,
    );
    if let Some(queue) = read_marks {
        messages = messages.handing_read_marks_to(queue);
    }
    let messages = Arc::new(messages);
    Ok(Arc::new(Services {
        users,
        messages,
        social,
        admin_token: cfg.admin_token.clone(),
    }))
}

/// The HTTP and gRPC listeners, bound.
struct Apis {
    http_l: tokio::net::TcpListener,
    grpc_l: tokio::net::TcpListener,
    http: SocketAddr,
    grpc: SocketAddr,
}

/// The APIs, serving until [`Serving::stop`].
struct Serving {
    stop_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<Result<(), String>>)>,
}

type Internal = (tokio::net::TcpListener, sai_cluster::pipeline::Server);

impl Apis {
    /// Binds the HTTP and gRPC ports, with `SO_REUSEPORT` (see [`listen`]).
    fn bind(cfg: &Config) -> Result<Self, ServerError> {
        let http_l = listen(cfg.http_listen).map_err(io(format!("binding HTTP {}", cfg.http_listen)))?;
        let grpc_l = listen(cfg.grpc_listen).map_err(io(format!("binding gRPC {}", cfg.grpc_listen)))?;
        Ok(Self {
            http: http_l.local_addr().map_err(io("HTTP address"))?,
            grpc: grpc_l.local_addr().map_err(io("gRPC address"))?,
            http_l,
            grpc_l,
        })
    }

    /// Serves HTTP and gRPC (and the internal pipeline port, in a services process).
    /// `metrics`, when given, is served at `/metrics` beside the HTTP API; so is the web
    /// client when the process has a gateway (its WebSocket port `web`).
    fn serve(
        self,
        services: Arc<Services>,
        internal: Option<Internal>,
        metrics: Option<Arc<Registry>>,
        web: Option<u16>,
    ) -> Serving {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let mut tasks = Vec::new();
        let http = tokio::spawn({
            let mut app = sai_services::http::router(services.clone());
            if let Some(registry) = metrics {
                app = app.merge(crate::metrics::router(registry));
            }
            if let Some(ws_port) = web {
                app = app.merge(crate::web::router(ws_port));
            }
            let stop = wait(stop_rx.clone());
            // With the peer's address: login and registration are limited per address.
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let l = self.http_l;
            async move {
                axum::serve(l, app)
                    .with_graceful_shutdown(stop)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        tasks.push(("HTTP", http));
        let grpc = tokio::spawn({
            let (u, m, so) = sai_services::grpc::services(services);
            let stop = wait(stop_rx.clone());
            let incoming = tonic::transport::server::TcpIncoming::from(self.grpc_l);
            async move {
                tonic::transport::Server::builder()
                    .add_service(u)
                    .add_service(m)
                    .add_service(so)
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        tasks.push(("gRPC", grpc));
        if let Some((l, pipeline)) = internal {
            let stop = wait(stop_rx.clone());
            let incoming = tonic::transport::server::TcpIncoming::from(l);
            tasks.push((
                "internal pipeline",
                tokio::spawn(async move {
                    tonic::transport::Server::builder()
                        .add_service(pipeline)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                        .map_err(|e| e.to_string())
                }),
            ));
        }
        Serving { stop_tx, tasks }
    }
}

impl Serving {
    async fn stop(self) {
        let _ = self.stop_tx.send(true);
        for (what, task) in self.tasks {
            if let Ok(Err(e)) = task.await {
                tracing::warn!(error = %e, "{what} server error");
            }
        }
    }
}
