//! The pipeline between a cluster's processes over gRPC (`proto/pipeline.proto`, an internal
//! port: never expose it).
//!
//! - **Services side**: [`PipelineService`] answers a gateway's `ws2ms_chat` calls with any
//!   [`Ws2Ms`] (the services' in-process pipeline), and streams `ms2ps_chat` to each subscribed
//!   gateway node from a [`DeliveryHub`], the services process's [`Ms2Ps`].
//! - **Gateway side**: [`GrpcPipeline`] is the gateway's [`Ws2Ms`] (each user's commands go to
//!   one services process, chosen by a hash of the user id, so they stay in order);
//!   [`subscribe`] keeps one delivery stream per services process open and hands what arrives
//!   to the gateway's own [`Ms2Ps`] (its shard inboxes).
//!
//! # Bounds
//! Each node's delivery stream queues at most [`NODE_QUEUE`] deliveries in the services process;
//! past it deliveries to that node are dropped (and counted in the log). Nothing is lost for
//! good: every pushed message is stored before it is delivered, and the client's sync fetches
//! it. A refusal code is interned once per distinct code, at most [`MAX_CODES`] (past it:
//! `internal`), since the contract's codes are `&'static str`.

use sai_pipeline::conversation::ChatType;
use sai_pipeline::flow::{BoxFuture, CloseReason, Delivery, Ms2Ps, Refusal, Route, Ws2Ms};
use sai_pipeline::frame::PushFrame;
use sai_pipeline::message::{ChatAck, ChatRequest, Push, SyncPage};
use sai_pipeline::trace::{self, TraceParent};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The generated messages and services.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("sai.pipeline.v1");
}

use pb::pipeline_client::PipelineClient;
use pb::pipeline_server::{Pipeline, PipelineServer};

/// Deliveries queued for one gateway node.
pub const NODE_QUEUE: usize = 65_536;

/// Distinct refusal codes interned.
pub const MAX_CODES: usize = 256;

/// The longest a gateway waits for one call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Shortest cluster key.
pub const MIN_KEY_BYTES: usize = 16;

/// The secret every process of one cluster shares: the internal port serves only callers that
/// present it (`authorization: Bearer <key>`), since it acts for any user it is told.
#[derive(Clone)]
pub struct ClusterKey(Arc<str>);

impl ClusterKey {
    /// A key of at least [`MIN_KEY_BYTES`] printable bytes.
    pub fn new(key: &str) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the cluster key must be at least {MIN_KEY_BYTES} printable ASCII bytes (no spaces)"
            ));
        }
        Ok(Self(Arc::from(format!("Bearer {key}"))))
    }

    /// Whether `presented` is this key, in time independent of where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let want = self.0.as_bytes();
        want.len() == presented.len() && want.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// The internal port's check: calls without the cluster key are refused (`unauthenticated`).
#[derive(Clone, Debug)]
pub struct RequireKey(ClusterKey);

impl Interceptor for RequireKey {
    fn call(&mut self, r: Request<()>) -> Result<Request<()>, Status> {
        match r.metadata().get("authorization") {
            Some(v) if self.0.matches(v.as_bytes()) => Ok(r),
            _ => Err(Status::unauthenticated("the cluster key is missing or wrong")),
        }
    }
}

/// A gateway's calls carry the cluster key.
#[derive(Clone, Debug)]
pub struct PresentKey(ClusterKey);

impl Interceptor for PresentKey {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        let v = self
            .0
             .0
            .parse()
            .map_err(|_| Status::internal("the cluster key is not a valid header value"))?;
        r.metadata_mut().insert("authorization", v);
        Ok(r)
    }
}

/// A client of a services process's internal port.
pub type Client = PipelineClient<InterceptedService<Channel, PresentKey>>;

/// The internal port's service, behind the key check.
pub type Server = InterceptedService<PipelineServer<PipelineService>, RequireKey>;

// ---- conversions -------------------------------------------------------------------------

fn intern(code: &str) -> &'static str {
    static CODES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut codes = CODES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = codes.iter().find(|c| **c == code) {
        return c;
    }
    if codes.len() >= MAX_CODES {
        return "internal";
    }
    // Leaked once per distinct code, at most MAX_CODES of them.
    let c: &'static str = Box::leak(code.to_string().into_boxed_str());
    codes.push(c);
    c
}

pub(crate) fn refusal_to_pb(r: Refusal) -> pb::Refusal {
    pb::Refusal {
        code: r.code.to_string(),
        message: r.message,
    }
}

pub(crate) fn refusal_from_pb(r: pb::Refusal) -> Refusal {
    Refusal {
        code: intern(&r.code),
        message: r.message,
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> Refusal {
    Refusal {
        code: "service_unavailable",
        message: format!("the services cannot be reached: {e}"),
    }
}

/// A failed call, as the client is told (`service_unavailable`); a refused cluster key is also
/// logged, once per process, since every call after it fails the same way.
fn call_failed(s: Status) -> Refusal {
    if s.code() == tonic::Code::Unauthenticated {
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(error = %s, "the services refuse this gateway's cluster key: every call fails");
        }
    }
    unavailable(s)
}

/// A chat command as sent.
pub(crate) fn chat_call(user: &str, chat: ChatRequest) -> pb::ChatCall {
    pb::ChatCall {
        user: user.to_string(),
        chat_type: u32::from(chat.chat_type.as_u8()),
        recv_id: chat.recv_id,
        client_msg_id: chat.client_msg_id,
        msg_json: chat.msg.get().to_string(),
    }
}

/// A received chat command: its user and request, or what is wrong with it.
pub(crate) fn chat_request(c: pb::ChatCall) -> Result<(String, ChatRequest), &'static str> {
    let chat_type = u8::try_from(c.chat_type)
        .ok()
        .and_then(ChatType::from_u8)
        .ok_or("chat_type")?;
    let msg = serde_json::value::RawValue::from_string(c.msg_json).map_err(|_| "msg_json is not JSON")?;
    let req = ChatRequest {
        chat_type,
        recv_id: c.recv_id,
        client_msg_id: c.client_msg_id,
        msg,
        trace: None,
    };
    Ok((c.user, req))
}

/// The answer to a chat command, as sent.
pub(crate) fn chat_reply(r: Result<ChatAck, Refusal>) -> pb::ChatReply {
    use pb::chat_reply::Result as R;
    let result = match r {
        Ok(a) => R::Ack(pb::ChatAck {
            conversation_id: a.conversation_id,
            seq: a.seq,
            msg_id: a.msg_id,
            send_time: a.send_time,
        }),
        Err(e) => R::Refusal(refusal_to_pb(e)),
    };
    pb::ChatReply { result: Some(result) }
}

/// A received answer to a chat command.
pub(crate) fn chat_result(r: pb::ChatReply) -> Result<ChatAck, Refusal> {
    use pb::chat_reply::Result as R;
    match r.result {
        Some(R::Ack(a)) => Ok(ChatAck {
            conversation_id: a.conversation_id,
            seq: a.seq,
            msg_id: a.msg_id,
            send_time: a.send_time,
        }),
        Some(R::Refusal(r)) => Err(refusal_from_pb(r)),
        None => Err(unavailable("empty answer")),
    }
}

fn route_to_pb(r: Route) -> pb::RouteMsg {
    pb::RouteMsg {
        node: r.node,
        shard: r.shard,
        conn: r.conn,
    }
}

fn route_from_pb(r: &pb::RouteMsg) -> Route {
    Route {
        node: r.node,
        shard: r.shard,
        conn: r.conn,
    }
}

fn reason_to_pb(r: CloseReason) -> pb::CloseReason {
    match r {
        CloseReason::TokenRevoked => pb::CloseReason::TokenRevoked,
        CloseReason::AccountDisabled => pb::CloseReason::AccountDisabled,
        CloseReason::Replaced => pb::CloseReason::Replaced,
    }
}

/// A delivery for the connections of one node (`to` filtered to it), as sent.
pub(crate) fn delivery_to_pb(d: &Delivery, node: u32) -> Option<pb::DeliveryMsg> {
    use pb::delivery_msg::Kind;
    let kind = match d {
        Delivery::Push { to, push, trace } => {
            let to: Vec<pb::RouteMsg> = to.iter().filter(|r| r.node == node).map(|r| route_to_pb(*r)).collect();
            if to.is_empty() {
                return None;
            }
            Kind::Push(pb::PushDelivery {
                to,
                conversation_id: push.conversation_id.to_string(),
                seq: push.seq,
                data_json: push.data().to_string(),
                traceparent: trace.map(|t| t.to_string()).unwrap_or_default(),
            })
        }
        Delivery::Notify { to, frame } if to.node == node => Kind::Notify(pb::NotifyDelivery {
            to: Some(route_to_pb(*to)),
            frame: frame.to_string(),
        }),
        Delivery::Close { to, reason } if to.node == node => Kind::Close(pb::CloseDelivery {
            to: Some(route_to_pb(*to)),
            reason: reason_to_pb(*reason) as i32,
        }),
        _ => return None,
    };
    Some(pb::DeliveryMsg { kind: Some(kind) })
}

/// The nodes a delivery goes to.
pub(crate) fn nodes_of(d: &Delivery) -> Vec<u32> {
    let mut nodes: Vec<u32> = match d {
        Delivery::Push { to, .. } => to.iter().map(|r| r.node).collect(),
        Delivery::Notify { to, .. } | Delivery::Close { to, .. } => vec![to.node],
    };
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// A received delivery, or `None` when it is malformed (logged and dropped).
pub(crate) fn delivery_from_pb(m: pb::DeliveryMsg) -> Option<Delivery> {
    use pb::delivery_msg::Kind;
    match m.kind? {
        Kind::Push(p) => Some(Delivery::Push {
            to: p.to.iter().map(route_from_pb).collect(),
            push: Arc::new(PushFrame::from_parts(&p.conversation_id, p.seq, p.data_json)),
            // A malformed one is dropped: the delivery still counts, its trace does not.
            trace: TraceParent::parse(&p.traceparent),
        }),
        Kind::Notify(n) => Some(Delivery::Notify {
            to: route_from_pb(n.to.as_ref()?),
            frame: Arc::from(n.frame),
        }),
        Kind::Close(c) => {
            let reason = match pb::CloseReason::try_from(c.reason).ok()? {
                pb::CloseReason::TokenRevoked => CloseReason::TokenRevoked,
                pb::CloseReason::AccountDisabled => CloseReason::AccountDisabled,
                pb::CloseReason::Replaced => CloseReason::Replaced,
                pb::CloseReason::Unspecified => return None,
            };
            Some(Delivery::Close {
                to: route_from_pb(c.to.as_ref()?),
                reason,
            })
        }
    }
}

// ---- services side ------------------------------------------------------------------------

/// The services process's `ms2ps_chat`: each delivery goes to the stream of the node its
/// routes name (a push to several nodes is split); a node with no subscriber gets nothing.
#[derive(Default)]
pub struct DeliveryHub {
    nodes: Mutex<HashMap<u32, mpsc::Sender<Result<pb::DeliveryMsg, Status>>>>,
}

impl DeliveryHub {
    fn subscribe(&self, node: u32) -> mpsc::Receiver<Result<pb::DeliveryMsg, Status>> {
        let (tx, rx) = mpsc::channel(NODE_QUEUE);
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).insert(node, tx);
        rx
    }
}

impl DeliveryHub {
    /// Ends every subscription stream (a services process stopping: its gateways subscribe
    /// again to the processes that remain, or to this one when it is back).
    pub fn close_all(&self) {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Ms2Ps for DeliveryHub {
    fn deliver(&self, delivery: Delivery) {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for node in nodes_of(&delivery) {
            let Some(tx) = nodes.get(&node) else {
                tracing::debug!(node, "no subscription of the node: delivery dropped (clients sync)");
                continue;
            };
            if let Some(msg) = delivery_to_pb(&delivery, node) {
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Ok(msg)) {
                    tracing::warn!(
                        node,
                        "the node's delivery queue is full: delivery dropped (clients sync)"
                    );
                }
            }
        }
    }
}

/// The gRPC service of the pipeline's services side.
pub struct PipelineService {
    ws2ms: Arc<dyn Ws2Ms>,
    hub: Arc<DeliveryHub>,
}

impl PipelineService {
    /// Answers calls that present `key` with `ws2ms`, and streams what `hub` is given.
    pub fn new(ws2ms: Arc<dyn Ws2Ms>, hub: Arc<DeliveryHub>, key: ClusterKey) -> Server {
        PipelineServer::with_interceptor(Self { ws2ms, hub }, RequireKey(key))
    }
}

#[tonic::async_trait]
impl Pipeline for PipelineService {
    async fn authenticate(&self, r: Request<pb::AuthCall>) -> Result<Response<pb::AuthReply>, Status> {
        use pb::auth_reply::Result as R;
        let result = match self.ws2ms.authenticate(&r.into_inner().token).await {
            Ok(user) => R::UserId(user),
            Err(e) => R::Refusal(refusal_to_pb(e)),
        };
        Ok(Response::new(pb::AuthReply { result: Some(result) }))
    }

    async fn chat(&self, r: Request<pb::ChatCall>) -> Result<Response<pb::ChatReply>, Status> {
        let trace = r
            .metadata()
            .get(trace::HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let (user, mut req) = chat_request(r.into_inner()).map_err(Status::invalid_argument)?;
        req.trace = trace;
        Ok(Response::new(chat_reply(self.ws2ms.chat(&user, req).await)))
    }

    async fn sync(&self, r: Request<pb::SyncCall>) -> Result<Response<pb::SyncReply>, Status> {
        use pb::sync_reply::Result as R;
        let c = r.into_inner();
        let known: BTreeMap<String, u64> = c.known.into_iter().collect();
        let result = match self.ws2ms.sync(&c.user, known, c.limit).await {
            Ok(page) => {
                let mut pushes = Vec::with_capacity(page.pushes.len());
                for p in &page.pushes {
                    pushes.push(serde_json::to_string(p).map_err(|e| Status::internal(e.to_string()))?);
                }
                R::Page(pb::SyncPage {
                    pushes_json: pushes,
                    heads: page.heads.into_iter().collect(),
                    complete: page.complete,
                })
            }
            Err(e) => R::Refusal(refusal_to_pb(e)),
        };
        Ok(Response::new(pb::SyncReply { result: Some(result) }))
    }

    async fn mark_read(&self, r: Request<pb::MarkReadCall>) -> Result<Response<pb::MarkReadReply>, Status> {
        use pb::mark_read_reply::Result as R;
        let c = r.into_inner();
        let result = match self.ws2ms.mark_read(&c.user, c.conversation_id, c.read_seq).await {
            Ok(seq) => R::ReadSeq(seq),
            Err(e) => R::Refusal(refusal_to_pb(e)),
        };
        Ok(Response::new(pb::MarkReadReply { result: Some(result) }))
    }

    async fn mark_received(&self, r: Request<pb::MarkReceivedCall>) -> Result<Response<pb::Done>, Status> {
        let c = r.into_inner();
        let acked = c.acked.into_iter().map(|a| (a.conversation_id, a.seq)).collect();
        self.ws2ms.mark_received(&c.user, acked).await;
        Ok(Response::new(pb::Done {}))
    }

    type SubscribeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::DeliveryMsg, Status>>;

    async fn subscribe(&self, r: Request<pb::SubscribeCall>) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = r.into_inner().node;
        tracing::info!(node, "gateway subscribed to deliveries");
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            self.hub.subscribe(node),
        )))
    }

    async fn deliver(&self, r: Request<pb::DeliveryMsg>) -> Result<Response<pb::Done>, Status> {
        let d = delivery_from_pb(r.into_inner()).ok_or_else(|| Status::invalid_argument("malformed delivery"))?;
        self.hub.deliver(d);
        Ok(Response::new(pb::Done {}))
    }
}

// ---- gateway side -------------------------------------------------------------------------

/// The gateway's `ws2ms_chat` to the services processes at `endpoints`.
#[derive(Clone)]
pub struct GrpcPipeline {
    clients: Arc<Vec<Client>>,
    runtime: tokio::runtime::Handle,
}

impl GrpcPipeline {
    /// Clients of `endpoints` (`http://host:port`, at least one), connecting lazily; calls run
    /// on `runtime`, so any thread may poll their futures.
    pub fn new(endpoints: &[String], key: &ClusterKey, runtime: tokio::runtime::Handle) -> Result<Self, String> {
        if endpoints.is_empty() {
            return Err("no services endpoint".into());
        }
        let _guard = runtime.enter();
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let channel = Channel::from_shared(e.clone())
                .map_err(|err| format!("services endpoint {e}: {err}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(CALL_TIMEOUT)
                .connect_lazy();
            clients.push(PipelineClient::with_interceptor(channel, PresentKey(key.clone())));
        }
        Ok(Self {
            clients: Arc::new(clients),
            runtime,
        })
    }

    /// The client of the process that serves `user`.
    fn client(&self, user: &str) -> Client {
        let h = user.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let i = (h % self.clients.len() as u64) as usize;
        self.clients[i].clone()
    }

    /// Every client (one per services process).
    pub fn clients(&self) -> Vec<Client> {
        self.clients.iter().cloned().collect()
    }

    /// Runs `call` on the runtime; the answer, or `service_unavailable`.
    fn run<T, F>(&self, call: F) -> BoxFuture<Result<T, Refusal>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, Refusal>> + Send + 'static,
    {
        let task = self.runtime.spawn(call);
        Box::pin(async move { task.await.map_err(unavailable)? })
    }
}

/// Hands a delivery to the gateway node it names, from another gateway (closing a login that
/// another node now holds).
pub trait Forward: Send + Sync + 'static {
    /// Sends `delivery` on; an error says why it could not be.
    fn forward(&self, delivery: Delivery) -> BoxFuture<Result<(), String>>;
}

/// Through a services process, which passes it to the node's stream.
impl Forward for GrpcPipeline {
    fn forward(&self, delivery: Delivery) -> BoxFuture<Result<(), String>> {
        let mut client = self.client("");
        Box::pin(async move {
            for node in nodes_of(&delivery) {
                if let Some(msg) = delivery_to_pb(&delivery, node) {
                    client.deliver(msg).await.map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })
    }
}

impl Ws2Ms for GrpcPipeline {
    fn authenticate(&self, token: &str) -> BoxFuture<Result<String, Refusal>> {
        let mut c = self.client(token);
        let token = token.to_string();
        self.run(async move {
            use pb::auth_reply::Result as R;
            match c
                .authenticate(pb::AuthCall { token })
                .await
                .map_err(call_failed)?
                .into_inner()
                .result
            {
                Some(R::UserId(u)) => Ok(u),
                Some(R::Refusal(r)) => Err(refusal_from_pb(r)),
                None => Err(unavailable("empty answer")),
            }
        })
    }

    fn chat(&self, user: &str, chat: ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>> {
        let mut c = self.client(user);
        let trace = chat.trace;
        let mut call = Request::new(chat_call(user, chat));
        if let Some(v) = trace.and_then(|t| t.to_string().parse().ok()) {
            call.metadata_mut().insert(trace::HEADER, v);
        }
        self.run(async move { chat_result(c.chat(call).await.map_err(call_failed)?.into_inner()) })
    }

    fn sync(&self, user: &str, known: BTreeMap<String, u64>, limit: u32) -> BoxFuture<Result<SyncPage, Refusal>> {
        let mut c = self.client(user);
        let call = pb::SyncCall {
            user: user.to_string(),
            known: known.into_iter().collect(),
            limit,
        };
        self.run(async move {
            use pb::sync_reply::Result as R;
            match c.sync(call).await.map_err(call_failed)?.into_inner().result {
                Some(R::Page(p)) => {
                    let mut pushes = Vec::with_capacity(p.pushes_json.len());
                    for j in &p.pushes_json {
                        let push: Push = serde_json::from_str(j).map_err(unavailable)?;
                        pushes.push(push);
                    }
                    Ok(SyncPage {
                        pushes,
                        heads: p.heads.into_iter().collect(),
                        complete: p.complete,
                    })
                }
                Some(R::Refusal(r)) => Err(refusal_from_pb(r)),
                None => Err(unavailable("empty answer")),
            }
        })
    }

    fn mark_read(&self, user: &str, conversation_id: String, read_seq: u64) -> BoxFuture<Result<u64, Refusal>> {
        let mut c = self.client(user);
        let call = pb::MarkReadCall {
            user: user.to_string(),
            conversation_id,
            read_seq,
        };
        self.run(async move {
            use pb::mark_read_reply::Result as R;
            match c.mark_read(call).await.map_err(call_failed)?.into_inner().result {
                Some(R::ReadSeq(s)) => Ok(s),
                Some(R::Refusal(r)) => Err(refusal_from_pb(r)),
                None => Err(unavailable("empty answer")),
            }
        })
    }

    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> BoxFuture<()> {
        let mut c = self.client(user);
        let call = pb::MarkReceivedCall {
            user: user.to_string(),
            acked: acked
                .into_iter()
                .map(|(conversation_id, seq)| pb::Received { conversation_id, seq })
                .collect(),
        };
        let task = self.runtime.spawn(async move {
            if let Err(e) = c.mark_received(call).await {
                tracing::warn!(error = %e, "marking pushes received failed");
            }
        });
        Box::pin(async move {
            let _ = task.await;
        })
    }
}

/// Keeps `node` subscribed to the deliveries of the services process behind `client` for as
/// long as the runtime runs, handing each to `local` (the gateway's shards); re-subscribes
/// after a lost stream (a services restart) within a second or two.
pub fn subscribe(mut client: Client, node: u32, local: Arc<dyn Ms2Ps>, runtime: &tokio::runtime::Handle) {
    runtime.spawn(async move {
        let mut wait = Duration::from_millis(100);
        loop {
            match client.subscribe(pb::SubscribeCall { node }).await {
                Ok(stream) => {
                    wait = Duration::from_millis(100);
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(m)) => match delivery_from_pb(m) {
                                Some(d) => local.deliver(d),
                                None => tracing::warn!("malformed delivery dropped"),
                            },
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "delivery stream lost");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "subscribing to deliveries failed"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_cross_the_wire_unchanged_and_split_by_node() {
        let r = |node, conn| Route { node, shard: 1, conn };
        let push = Arc::new(PushFrame::from_parts("si_a_b", 4, r#"{"seq":4}"#.into()));
        let trace = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(trace.is_some());
        let d = Delivery::Push {
            to: vec![r(1, 10), r(2, 20), r(1, 11)],
            push,
            trace,
        };
        assert_eq!(nodes_of(&d), vec![1, 2]);
        let Some(Delivery::Push { to, push, trace: t }) = delivery_to_pb(&d, 1).and_then(delivery_from_pb) else {
            panic!("push lost");
        };
        assert_eq!(to, vec![r(1, 10), r(1, 11)]);
        assert_eq!(t, trace);
        assert_eq!(
            (push.conversation_id.as_ref(), push.seq, push.data()),
            ("si_a_b", 4, r#"{"seq":4}"#)
        );
        assert!(delivery_to_pb(&d, 3).is_none());
        let close = Delivery::Close {
            to: r(2, 5),
            reason: CloseReason::Replaced,
        };
        assert!(matches!(
            delivery_to_pb(&close, 2).and_then(delivery_from_pb),
            Some(Delivery::Close {
                reason: CloseReason::Replaced,
                ..
            })
        ));
        assert!(delivery_to_pb(&close, 1).is_none());
    }

    #[test]
    fn the_internal_port_serves_only_callers_with_the_cluster_key() {
        assert!(ClusterKey::new("short").is_err());
        assert!(ClusterKey::new("sixteen bytes, sp").is_err(), "no spaces");
        let key = ClusterKey::new("0123456789abcdef").unwrap();
        let mut check = RequireKey(key.clone());
        assert_eq!(
            check.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let other = ClusterKey::new("0123456789abcdeX").unwrap();
        let wrong = PresentKey(other).call(Request::new(())).unwrap();
        assert_eq!(check.call(wrong).unwrap_err().code(), tonic::Code::Unauthenticated);
        let right = PresentKey(key).call(Request::new(())).unwrap();
        assert!(check.call(right).is_ok());
    }

    #[test]
    fn refusal_codes_are_interned_once_and_bounded() {
        let a = intern("not_friends");
        let b = intern("not_friends");
        assert!(std::ptr::eq(a, b));
        for i in 0..(MAX_CODES + 10) {
            let _ = intern(&format!("code_{i}"));
        }
        assert_eq!(intern("yet_another_code"), "internal");
        assert_eq!(intern("not_friends"), "not_friends");
    }
}
