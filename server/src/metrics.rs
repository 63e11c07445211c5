//! The metrics endpoint: Prometheus text exposition (`GET /metrics`) of every process kind,
//! through `prometheus-client`.
//!
//! What each process exports:
//! - every process: `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//!   `process_open_fds` (read from `/proc/self` at scrape time) and `sai_build_info{version,role}`;
//! - a gateway (embedded or `gateway`), per shard, read at scrape time from the shards' own
//!   counters (`sai_proto::stats`): `sai_gateway_connections`, `sai_gateway_sessions_total`,
//!   `sai_gateway_messages_{in,out}_total`, `sai_gateway_bytes_{in,out}_total`,
//!   `sai_gateway_pushes_total`, `sai_gateway_rigor_resends_total`,
//!   `sai_gateway_rigor_evictions_total`, `sai_gateway_client_closes_total`,
//!   `sai_gateway_inbox_depth`; and by code: `sai_gateway_closes_total{code}` (closes the
//!   gateway started: 4003 is the slow consumer) and `sai_gateway_refusals_total{code}`
//!   (upgrades answered with an error);
//! - the pipeline calls as the gateway makes them (in-process, gRPC or Kafka alike):
//!   `sai_pipeline_call_seconds{call}` (a histogram) and `sai_pipeline_refusals_total{call,code}`;
//! - a process with storage: `sai_store_call_seconds{call}` (append, history, sync, receipts) and
//!   `sai_messages_stored_total` / `sai_messages_deduplicated_total` (an append whose
//!   `clientMsgId` was stored before).
//!
//! The hot-path cost: a shard's counters are relaxed atomic adds on lines only that shard writes;
//! a histogram observation takes the histogram's lock (uncontended, tens of ns) and the
//! decorators box one more future per call. `results/metrics/` has the capacity with and
//! without a scrape every second.

use crate::trace::{self, ChatSide};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sai_cluster::kafka::KafkaStats;
use sai_gateway::{GatewayStats, ShardStats};
use sai_pipeline::flow::{BoxFuture, Refusal, Ws2Ms};
use sai_pipeline::message::{ChatAck, ChatRequest, SyncPage};
use sai_proto::stats::Counters;
use sai_storage::{
    Appended, BitmapWrite, ConversationHead, ConversationSummary, MemberState, MessageStore, NewMessage,
    ReadBitmapCodec, ReadMark, ReadRecord, StoreResult, StoredMessage, WriteStats,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Latency buckets, seconds: 100 us doubling to about 3.3 s (16 buckets), covering an
/// in-process call on SQLite and a cluster's worst step alike.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 16)
}

type CallHistograms = Family<[(&'static str, &'static str); 1], Histogram, fn() -> Histogram>;

fn call_histograms() -> CallHistograms {
    Family::new_with_constructor(|| Histogram::new(latency_buckets()))
}

/// The pipeline calls timed.
const PIPELINE_CALLS: [&str; 5] = ["authenticate", "chat", "sync", "mark_read", "mark_received"];

/// The store calls timed.
const STORE_CALLS: [&str; 8] = [
    "append",
    "messages_after",
    "messages_before",
    "conversations_of",
    "conversation_summaries",
    "mark_read",
    "add_readers",
    "mark_received",
];

/// The histograms of a fixed list of calls, taken from their family once: a call observes its
/// own without the family's lock and hash lookup (each series exists, at zero, from the start).
struct CallSeconds(Vec<(&'static str, Histogram)>);

impl CallSeconds {
    fn new(family: &CallHistograms, calls: &[&'static str]) -> Self {
        Self(
            calls
                .iter()
                .map(|&call| (call, family.get_or_create(&[("call", call)]).clone()))
                .collect(),
        )
    }

    /// Records that `call` (one of the list) took `seconds`.
    fn observe(&self, call: &'static str, seconds: f64) {
        let h = self.0.iter().find(|(c, _)| *c == call);
        debug_assert!(h.is_some(), "{call} is not in the list of calls timed");
        if let Some((_, h)) = h {
            h.observe(seconds);
        }
    }
}

/// A process's metrics, registered as it is wired, then served read-only.
pub struct Metrics {
    registry: Registry,
    role: &'static str,
}

impl Metrics {
    /// The metrics of a process of kind `role` (`all`, `services`, `gateway`, `task`).
    pub fn new(role: &'static str) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "sai_build",
            "The running build",
            Info::new([("version", env!("CARGO_PKG_VERSION")), ("role", role)]),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Self { registry, role }
    }

    /// Exports a gateway's per-shard counts.
    pub fn gateway(&mut self, stats: GatewayStats) {
        self.registry.register_collector(Box::new(GatewayCollector(stats)));
    }

    /// Exports what this process's Kafka clients report: `sai_kafka_producer_queue{client}`
    /// and `sai_kafka_consumer_lag{client,topic,partition}`.
    pub fn kafka(&mut self, stats: Arc<KafkaStats>) {
        self.registry.register_collector(Box::new(KafkaCollector(stats)));
    }

    /// Exports `sai_redis_errors_total`: the route directory's failed Redis commands.
    pub fn redis(&mut self) {
        self.registry.register_collector(Box::new(RedisCollector));
    }

    /// `inner`, timed per call (`sai_pipeline_call_seconds`, `sai_pipeline_refusals_total`),
    /// its chat commands traced (a trace starts here, except in a services process, which
    /// continues the gateway's).
    pub fn pipeline(&mut self, inner: Arc<dyn Ws2Ms>) -> Arc<dyn Ws2Ms> {
        let seconds = call_histograms();
        let refusals = Family::<[(&'static str, &'static str); 2], Counter>::default();
        self.registry.register(
            "sai_pipeline_call_seconds",
            "Pipeline calls as the gateway makes them (authenticate, chat, sync, mark_read, mark_received), from the call to its answer",
            seconds.clone(),
        );
        self.registry.register(
            "sai_pipeline_refusals",
            "Pipeline calls answered with a refusal, by call and stable code",
            refusals.clone(),
        );
        Arc::new(TimedPipeline {
            inner,
            side: match self.role {
                "services" => ChatSide::Process,
                _ => ChatSide::Receive,
            },
            seconds: Arc::new(CallSeconds::new(&seconds, &PIPELINE_CALLS)),
            refusals,
        })
    }

    /// `inner`, timed per call (`sai_store_call_seconds`), its appends counted, and its
    /// batching writer's work exported (`sai_store_write_*`) when it has one.
    pub fn store(&mut self, inner: Arc<dyn MessageStore>) -> Arc<dyn MessageStore> {
        if let Some(stats) = inner.write_stats() {
            self.registry.register_collector(Box::new(WriteCollector(stats)));
        }
        let seconds = call_histograms();
        let (stored, deduplicated) = (Counter::default(), Counter::default());
        self.registry.register(
            "sai_store_call_seconds",
            "Message store calls (append: until the message is durable)",
            seconds.clone(),
        );
        self.registry.register(
            "sai_messages_stored",
            "Messages appended to the chat log",
            stored.clone(),
        );
        self.registry.register(
            "sai_messages_deduplicated",
            "Appends answered with the message stored before under the same clientMsgId",
            deduplicated.clone(),
        );
        Arc::new(TimedStore {
            inner,
            seconds: CallSeconds::new(&seconds, &STORE_CALLS),
            stored,
            deduplicated,
        })
    }

    /// The count of configuration reloads, by result (`applied`, `refused`).
    pub fn reloads(&mut self) -> crate::reload::Reloads {
        let reloads = crate::reload::Reloads::default();
        self.registry.register(
            "sai_config_reloads",
            "Configuration file reloads, by result (applied, refused)",
            reloads.clone(),
        );
        reloads
    }

    /// The registry, ready to serve.
    pub fn finish(self) -> Arc<Registry> {
        Arc::new(self.registry)
    }
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    out
}

/// `GET /metrics` (the content type Prometheus asks for with the text format).
pub fn router(registry: Arc<Registry>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
            }
        }),
    )
}

// ---- process --------------------------------------------------------------------------------

/// CPU, memory and descriptors of this process, from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ticks = 100.0; // USER_HZ on Linux
        let page = 4096.0;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command (which may hold spaces) start after the last ')'.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the command.
            let cpu = (field(11) + field(12)) / ticks;
            let rss = field(21) * page;
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time of this process",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of this process",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss as i64).encode(m)?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of this process",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(dir.count() as i64).encode(m)?;
        }
        Ok(())
    }
}

// ---- gateway --------------------------------------------------------------------------------

/// A gateway's shard counters, read at each scrape.
struct GatewayCollector(GatewayStats);

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

/// A per-shard counter of [`Counters`]: its name, help and field.
type ShardField = (&'static str, &'static str, fn(&Counters) -> u64);

const SHARD_COUNTERS: [ShardField; 9] = [
    (
        "sai_gateway_sessions",
        "WebSocket sessions opened (upgrades that completed)",
        |c| Counters::get(&c.sessions_started),
    ),
    ("sai_gateway_messages_in", "WebSocket messages read from clients", |c| {
        Counters::get(&c.messages_in)
    }),
    (
        "sai_gateway_messages_out",
        "Text frames queued to clients (answers, pushes, notifications, errors)",
        |c| Counters::get(&c.messages_out),
    ),
    (
        "sai_gateway_bytes_in",
        "Bytes read from clients after the upgrade",
        |c| Counters::get(&c.bytes_in),
    ),
    ("sai_gateway_bytes_out", "Bytes handed to the socket for clients", |c| {
        Counters::get(&c.bytes_out)
    }),
    ("sai_gateway_pushes", "Message pushes queued to clients", |c| {
        Counters::get(&c.pushes)
    }),
    (
        "sai_gateway_rigor_resends",
        "Rigor-mode pushes sent again for want of an ack",
        |c| Counters::get(&c.resends),
    ),
    (
        "sai_gateway_rigor_evictions",
        "Rigor-mode pushes no longer tracked because the connection's pending set was full",
        |c| Counters::get(&c.pending_evictions),
    ),
    ("sai_gateway_client_closes", "Closes the client started", |c| {
        Counters::get(&c.client_closes)
    }),
];

/// A per-shard gauge: its name, help and value.
type ShardGauge = (&'static str, &'static str, fn(&ShardStats) -> i64);

const SHARD_GAUGES: [ShardGauge; 3] = [
    ("sai_gateway_connections", "Open WebSocket sessions", |s| {
        s.counters.sessions() as i64
    }),
    (
        "sai_gateway_outbound_bytes",
        "Bytes the shard's sessions hold for clients, not yet handed to the socket",
        |s| s.counters.outbound_bytes.load(std::sync::atomic::Ordering::Relaxed),
    ),
    (
        "sai_gateway_inbox_depth",
        "Messages waiting in a shard's inbox (pushes and kicks)",
        |s| s.inbox_depth as i64,
    ),
];

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shards: Vec<_> = self.0.shards().collect();
        let label = |i: usize| [("shard", i.to_string())];
        for (name, help, get) in SHARD_GAUGES {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (i, s) in shards.iter().enumerate() {
                ConstGauge::new(get(s)).encode(m.encode_family(&label(i))?)?;
            }
        }
        for (name, help, get) in SHARD_COUNTERS {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (i, s) in shards.iter().enumerate() {
                ConstCounter::new(get(s.counters)).encode(m.encode_family(&label(i))?)?;
            }
        }
        // Summed over the shards: codes are few, shards may be many.
        let mut closes: BTreeMap<String, u64> = BTreeMap::new();
        let mut refusals: BTreeMap<&'static str, u64> = BTreeMap::new();
        for s in &shards {
            for (code, n) in s.counters.closes().filter(|(_, n)| *n > 0) {
                let code = code.map_or_else(|| "other".to_string(), |c| c.to_string());
                *closes.entry(code).or_default() += n;
            }
            for (code, n) in s.counters.refusals() {
                *refusals.entry(code).or_default() += n;
            }
        }
        let mut m = encoder.encode_descriptor(
            "sai_gateway_closes",
            "Closes the gateway started, by WebSocket close code (4003: slow consumer)",
            None,
            MetricType::Counter,
        )?;
        for (code, n) in closes {
            ConstCounter::new(n).encode(m.encode_family(&[("code", code)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "sai_gateway_refusals",
            "Upgrades answered with an HTTP error, by stable code",
            None,
            MetricType::Counter,
        )?;
        for (code, n) in refusals {
            ConstCounter::new(n).encode(m.encode_family(&[("code", code)])?)?;
        }
        Ok(())
    }
}

// ---- cluster --------------------------------------------------------------------------------

/// The latest reports of this process's Kafka clients (every second).
#[derive(Debug)]
struct KafkaCollector(Arc<KafkaStats>);

impl Collector for KafkaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let clients = self.0.snapshot();
        let mut m = encoder.encode_descriptor(
            "sai_kafka_producer_queue",
            "Records waiting in a Kafka client's producer queue",
            None,
            MetricType::Gauge,
        )?;
        for (client, s) in &clients {
            ConstGauge::new(s.queued as i64).encode(m.encode_family(&[("client", *client)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "sai_kafka_consumer_lag",
            "Records between a consumer's position and the end of a partition it reads",
            None,
            MetricType::Gauge,
        )?;
        for (client, s) in &clients {
            for (topic, partition, lag) in &s.lag {
                let labels = [
                    ("client", client.to_string()),
                    ("topic", topic.clone()),
                    ("partition", partition.to_string()),
                ];
                ConstGauge::new(*lag).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The route directory's failed Redis commands.
#[derive(Debug)]
struct RedisCollector;

impl Collector for RedisCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = encoder.encode_descriptor(
            "sai_redis_errors",
            "Redis commands of the route directory that failed",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(sai_cluster::routes::redis_errors()).encode(m)
    }
}

/// The store's batching writer: batches, the jobs in them, and its queue.
#[derive(Debug)]
struct WriteCollector(Arc<WriteStats>);

impl Collector for WriteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        for (name, help, value) in [
            (
                "sai_store_write_batches",
                "Batches the store's writer wrote",
                &s.batches,
            ),
            (
                "sai_store_write_jobs",
                "Appends and received positions in those batches (per batch: the mean batch size)",
                &s.jobs,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value.load(Relaxed)).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "sai_store_write_queue",
            "Jobs left waiting in the store writer's queue when it took its last batch",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.queued.load(Relaxed) as i64).encode(m)
    }
}

// ---- pipeline -------------------------------------------------------------------------------

/// A [`Ws2Ms`] that times each call of the one it wraps.
struct TimedPipeline {
    inner: Arc<dyn Ws2Ms>,
    side: ChatSide,
    seconds: Arc<CallSeconds>,
    refusals: Family<[(&'static str, &'static str); 2], Counter>,
}

/// The refusal code of a pipeline answer, if it is one.
fn refusal_of<T>(r: &Result<T, Refusal>) -> Option<&'static str> {
    r.as_ref().err().map(|e| e.code)
}

impl TimedPipeline {
    /// `f`, timed as `call`; an answer that `refusal` finds a refusal in is counted by code.
    fn timed<T: Send + 'static>(
        &self,
        call: &'static str,
        f: BoxFuture<T>,
        refusal: fn(&T) -> Option<&'static str>,
    ) -> BoxFuture<T> {
        let (seconds, refusals) = (self.seconds.clone(), self.refusals.clone());
        Box::pin(async move {
            let start = Instant::now();
            let r = f.await;
            seconds.observe(call, start.elapsed().as_secs_f64());
            if let Some(code) = refusal(&r) {
                refusals.get_or_create(&[("call", call), ("code", code)]).inc();
            }
            r
        })
    }
}

impl Ws2Ms for TimedPipeline {
    fn authenticate(&self, token: &str) -> BoxFuture<Result<String, Refusal>> {
        self.timed("authenticate", self.inner.authenticate(token), refusal_of)
    }

    fn chat(&self, user: &str, chat: ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>> {
        let inner = &self.inner;
        let traced = trace::chat(self.side, user, chat, |chat| inner.chat(user, chat));
        self.timed("chat", traced, refusal_of)
    }

    fn sync(&self, user: &str, known: BTreeMap<String, u64>, limit: u32) -> BoxFuture<Result<SyncPage, Refusal>> {
        self.timed("sync", self.inner.sync(user, known, limit), refusal_of)
    }

    fn mark_read(&self, user: &str, conversation_id: String, read_seq: u64) -> BoxFuture<Result<u64, Refusal>> {
        self.timed(
            "mark_read",
            self.inner.mark_read(user, conversation_id, read_seq),
            refusal_of,
        )
    }

    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> BoxFuture<()> {
        self.timed("mark_received", self.inner.mark_received(user, acked), |_| None)
    }
}

// ---- store ----------------------------------------------------------------------------------

/// A [`MessageStore`] that times the calls of the one it wraps and counts its appends.
struct TimedStore {
    inner: Arc<dyn MessageStore>,
    seconds: CallSeconds,
    stored: Counter,
    deduplicated: Counter,
}

impl TimedStore {
    /// `f`, timed as `call`, in a span of its own under a traced chat command.
    async fn timed<T>(&self, call: &'static str, f: impl std::future::Future<Output = T>) -> T {
        let start = Instant::now();
        let r = trace::child(|| format!("store {call}"), f).await;
        self.seconds.observe(call, start.elapsed().as_secs_f64());
        r
    }
}

#[async_trait::async_trait]
impl MessageStore for TimedStore {
    fn write_stats(&self) -> Option<Arc<WriteStats>> {
        self.inner.write_stats()
    }

    async fn append(&self, msg: NewMessage) -> StoreResult<Appended> {
        let r = self.timed("append", self.inner.append(msg)).await;
        match &r {
            Ok(Appended::New(_)) => self.stored.inc(),
            Ok(Appended::Duplicate(_)) => self.deduplicated.inc(),
            Err(_) => 0,
        };
        r
    }

    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.timed(
            "messages_after",
            self.inner.messages_after(conversation_id, after_seq, limit),
        )
        .await
    }

    async fn messages_before(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.timed(
            "messages_before",
            self.inner.messages_before(conversation_id, before_seq, limit),
        )
        .await
    }

    async fn conversations_of(&self, user_id: &str) -> StoreResult<Vec<ConversationHead>> {
        self.timed("conversations_of", self.inner.conversations_of(user_id))
            .await
    }

    async fn is_member(&self, conversation_id: &str, user_id: &str) -> StoreResult<bool> {
        self.inner.is_member(conversation_id, user_id).await
    }

    async fn message(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<StoredMessage>> {
        self.inner.message(conversation_id, seq).await
    }

    async fn member_states(&self, conversation_id: &str) -> StoreResult<Vec<MemberState>> {
        self.inner.member_states(conversation_id).await
    }

    async fn conversation_summaries(
        &self,
        user_id: &str,
        offset: u32,
        limit: u32,
    ) -> StoreResult<Vec<ConversationSummary>> {
        self.timed(
            "conversation_summaries",
            self.inner.conversation_summaries(user_id, offset, limit),
        )
        .await
    }

    async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        read_seq: u64,
        reader_slot: Option<(u32, BitmapWrite<'_>)>,
    ) -> StoreResult<Option<(u64, u64)>> {
        self.timed(
            "mark_read",
            self.inner.mark_read(conversation_id, user_id, read_seq, reader_slot),
        )
        .await
    }

    async fn add_readers(&self, marks: &[ReadMark], codec: &dyn ReadBitmapCodec) -> StoreResult<u64> {
        self.timed("add_readers", self.inner.add_readers(marks, codec)).await
    }

    async fn mark_received(&self, conversation_id: &str, user_id: &str, seq: u64) -> StoreResult<()> {
        self.timed("mark_received", self.inner.mark_received(conversation_id, user_id, seq))
            .await
    }

    async fn read_record(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<ReadRecord>> {
        self.inner.read_record(conversation_id, seq).await
    }
}
