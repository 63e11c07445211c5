//! The pipeline's chat flows over Kafka topics, the seed's `ws2ms_chat` and `ms2ps_chat`
//! (records: `ChatRecord` and `NodeRecord` in `proto/pipeline.proto`).
//!
//! - **Gateway** ([`KafkaChat`], its [`Ws2Ms`]): each chat command is produced to `ws2ms_chat`
//!   (idempotent producer, `acks=all`, linger and batch size configurable), keyed by its
//!   conversation so that one conversation's commands stay in one partition, in order. The
//!   sender's answer comes back on `ms2ps_chat`. The other calls (authenticate, sync, markChat,
//!   receipts) are questions with an answer and stay on the internal gRPC port.
//! - **Services** ([`consume_chats`]): each services process reads its share of `ws2ms_chat`'s
//!   partitions (`--kafka-share i/M`: partition p goes to process p mod M), assigned, not
//!   balanced by a consumer group: tansu 0.6, the broker tested here, handed a member that
//!   rejoined after a `kill -9` no partitions at all, so that nothing was read until a timeout
//!   much later. A process that dies leaves its share waiting until it is back (its
//!   supervisor restarts it); it resumes from the offsets committed before. One conversation's
//!   commands run one after another, different conversations at once; a partition's offset is
//!   committed (every 100 ms) only up to the last command that, with every one before it, is
//!   stored (and its answer and pushes queued). After a
//!   crash the commands past the last commit are read again: the store's `(sender,
//!   clientMsgId)` key answers them with the original ack and pushes nothing twice.
//! - **Deliveries** ([`KafkaDeliveries`], the services' [`Ms2Ps`]): each delivery, split by
//!   node, goes to `ms2ps_chat` on partition `node mod partitions`; each gateway reads only its
//!   partition, from where it ended when the gateway started (a restarted gateway has no
//!   connection the older deliveries could reach: its clients reconnect and sync), and keeps
//!   what names its node.
//!
//! # Bounds
//! A gateway has at most [`MAX_PENDING`] chat commands waiting for their answers (past it:
//! `service_unavailable`), each for at most [`CALL_TIMEOUT`]. A producer queues at most
//! [`PRODUCER_QUEUE`] records; a delivery that finds it full is dropped and logged (the message
//! is stored: the client's sync fetches it), a chat command is refused. A services process
//! runs at most [`MAX_IN_FLIGHT`] commands at once, then reads no more until the oldest is done.
//!
//! The broker is as private as the internal port: records are not signed with the cluster key.

use crate::pipeline::{
    chat_call, chat_reply, chat_request, chat_result, delivery_from_pb, delivery_to_pb, nodes_of, pb, unavailable,
    Forward, GrpcPipeline, CALL_TIMEOUT,
};
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sai_pipeline::conversation::{ChatType, ConversationId};
use sai_pipeline::flow::{BoxFuture, Delivery, Ms2Ps, Refusal, Ws2Ms};
use sai_pipeline::message::{ChatAck, ChatRequest, SyncPage};
use sai_pipeline::trace::{self, TraceParent};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Chat commands a gateway waits on at once.
pub const MAX_PENDING: usize = 65_536;

/// Records a producer queues (librdkafka's `queue.buffering.max.messages`).
pub const PRODUCER_QUEUE: u32 = 100_000;

/// Chat commands a services process runs at once (past it, it waits for the oldest).
pub const MAX_IN_FLIGHT: usize = 4096;

/// The longest a graceful stop waits for a producer's queued records to reach the broker.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a services process commits the offsets of the commands done.
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// The longest a broker holds a fetch that finds nothing new, ms.
const FETCH_WAIT_MS: u32 = 5;

/// While the broker is unreachable, a consumer logs its read errors at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// A consumer's read errors: the first is logged at once, then one line per
/// [`ERROR_LOG_EVERY`] says how many there were.
#[derive(Default)]
pub(crate) struct ReadErrors {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl ReadErrors {
    pub(crate) fn record(&mut self, topic: &str, e: &rdkafka::error::KafkaError) {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < ERROR_LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(topic, error = %e, more = self.unlogged, "reading from Kafka failed; retrying");
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Where the topics are and how records are produced.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Put before each topic's and consumer group's name (several clusters on one broker).
    pub prefix: String,
    /// Partitions of each topic, when this process creates it.
    pub partitions: i32,
    /// How long a producer waits to fill a batch (`linger.ms`).
    pub linger_ms: u32,
    /// Largest batch of records per partition, in bytes (`batch.size`).
    pub batch_bytes: u32,
    /// This process's share of the topic it reads (a services process: `ws2ms_chat`; a task
    /// process: `msg_to_mongo`): (index, count), partition p being read by the process whose
    /// index is p mod count.
    pub share: (u32, u32),
    /// What this process's Kafka clients report every [`STATS_EVERY_MS`] (for the metrics).
    pub stats: Arc<KafkaStats>,
}

/// How often each client reports its statistics, ms (`statistics.interval.ms`).
pub const STATS_EVERY_MS: u32 = 1000;

/// The latest statistics of this process's Kafka clients, by client role (`services`, `task`,
/// `gateway`, `producer`): what is queued in the producers and how far each consumer trails the
/// end of its partitions.
#[derive(Debug, Default)]
pub struct KafkaStats {
    clients: Mutex<BTreeMap<&'static str, ClientStats>>,
}

/// One client's latest report.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    /// Records in the client's producer queue (librdkafka's `msg_cnt`).
    pub queued: u64,
    /// (topic, partition, records between the consumer's position and the partition's end)
    /// for each partition it reads.
    pub lag: Vec<(String, i32, i64)>,
}

impl KafkaStats {
    fn record(&self, role: &'static str, s: &rdkafka::statistics::Statistics) {
        let mut lag = Vec::new();
        for (topic, t) in &s.topics {
            for (partition, p) in &t.partitions {
                // -1: not consumed here (librdkafka's internal partition is -1 too).
                if *partition >= 0 && p.consumer_lag >= 0 {
                    lag.push((topic.clone(), *partition, p.consumer_lag));
                }
            }
        }
        lag.sort();
        let stats = ClientStats { queued: s.msg_cnt, lag };
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(role, stats);
        }
    }

    /// Each client's latest report, by role.
    pub fn snapshot(&self) -> Vec<(&'static str, ClientStats)> {
        self.clients
            .lock()
            .map(|c| c.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }
}

impl KafkaSettings {
    /// The topic of chat commands.
    pub fn ws2ms(&self) -> String {
        format!("{}ws2ms_chat", self.prefix)
    }

    /// The topic of deliveries and answers.
    pub fn ms2ps(&self) -> String {
        format!("{}ms2ps_chat", self.prefix)
    }

    /// The topic of read receipts' bitmap work, for the task process.
    pub fn msg_to_mongo(&self) -> String {
        format!("{}msg_to_mongo", self.prefix)
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("statistics.interval.ms", STATS_EVERY_MS.to_string());
        c
    }

    /// The context of a client in `role`: its log goes to ours, its statistics to `self.stats`.
    pub(crate) fn context(&self, role: &'static str) -> LibrdkafkaLog {
        LibrdkafkaLog {
            role,
            stats: self.stats.clone(),
        }
    }

    /// A consumer's settings: a fetch is answered within `FETCH_WAIT_MS` when the partition has
    /// nothing new (librdkafka's default, 500 ms, is what tansu then waits before answering:
    /// it put half a second into every chat message's path).
    fn consumer(&self, group: String) -> ClientConfig {
        let mut c = self.client();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS.to_string());
        c
    }

    pub(crate) fn producer(&self, role: &'static str) -> Result<FutureProducer<LibrdkafkaLog>, String> {
        self.client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_bytes.to_string())
            .set("queue.buffering.max.messages", PRODUCER_QUEUE.to_string())
            .set("message.timeout.ms", CALL_TIMEOUT.as_millis().to_string())
            .create_with_context(self.context(role))
            .map_err(|e| format!("Kafka producer: {e}"))
    }

    /// Creates the three topics unless they exist.
    pub async fn ensure_topics(&self) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> =
            self.client().create().map_err(|e| format!("Kafka admin client: {e}"))?;
        let names = [self.ws2ms(), self.ms2ps(), self.msg_to_mongo()];
        let topics = names
            .iter()
            .map(|name| NewTopic::new(name, self.partitions, TopicReplication::Fixed(1)))
            .collect::<Vec<_>>();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&topics, &opts)
            .await
            .map_err(|e| format!("creating Kafka topics at {}: {e}", self.brokers))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, e)) => return Err(format!("creating Kafka topic {topic}: {e}")),
            }
        }
        Ok(())
    }

    /// A consumer of this process's share of `topic` (`self.share`), in consumer group
    /// `<prefix><group>`, from the offsets committed before (the oldest record when none is).
    pub(crate) async fn share_of(
        &self,
        topic: &str,
        group: &'static str,
    ) -> Result<StreamConsumer<LibrdkafkaLog>, String> {
        let (index, count) = self.share;
        if count == 0 || index >= count {
            return Err(format!(
                "the Kafka share {index}/{count}: the index must be below the count"
            ));
        }
        let partitions = self.partitions_of(topic.to_string()).await?;
        let mut config = self.consumer(format!("{}{group}", self.prefix));
        config.set("auto.offset.reset", "earliest");
        if let Ok(debug) = std::env::var("SAI_KAFKA_DEBUG") {
            config.set("debug", debug);
        }
        let consumer: StreamConsumer<LibrdkafkaLog> = config
            .create_with_context(self.context(group))
            .map_err(|e| format!("Kafka consumer: {e}"))?;
        let mut mine = TopicPartitionList::new();
        for p in (0..partitions).filter(|p| (*p as u32) % count == index) {
            mine.add_partition_offset(topic, p, Offset::Stored)
                .map_err(|e| e.to_string())?;
        }
        consumer.assign(&mine).map_err(|e| format!("reading {topic}: {e}"))?;
        tracing::info!(share = %format!("{index}/{count}"), partitions = mine.count(), of = partitions, "reading {topic}");
        Ok(consumer)
    }

    /// The partitions `topic` has.
    async fn partitions_of(&self, topic: String) -> Result<i32, String> {
        let consumer: StreamConsumer = self
            .client()
            .set("group.id", format!("{}metadata", self.prefix))
            .create()
            .map_err(|e| format!("Kafka consumer: {e}"))?;
        let n = tokio::task::spawn_blocking(move || {
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| format!("Kafka metadata of {topic}: {e}"))?;
            let n = md.topics().first().map_or(0, |t| t.partitions().len());
            if n == 0 {
                return Err(format!("Kafka topic {topic} has no partitions"));
            }
            Ok(n)
        })
        .await
        .map_err(|e| e.to_string())??;
        i32::try_from(n).map_err(|e| e.to_string())
    }
}

/// A client's context: passes librdkafka's own log (and its `debug` contexts, named in
/// `SAI_KAFKA_DEBUG`) to ours, and its statistics to [`KafkaStats`].
pub(crate) struct LibrdkafkaLog {
    role: &'static str,
    stats: Arc<KafkaStats>,
}

impl ClientContext for LibrdkafkaLog {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        self.stats.record(self.role, &statistics);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(fac, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(fac, "librdkafka: {message}"),
            _ => tracing::debug!(fac, "librdkafka: {message}"),
        }
    }
}

impl ConsumerContext for LibrdkafkaLog {}

/// The partition of `node` in a topic of `partitions`.
fn partition_of(node: u32, partitions: i32) -> i32 {
    (i64::from(node) % i64::from(partitions.max(1))) as i32
}

// ---- services side ------------------------------------------------------------------------

/// The services' `ms2ps_chat` on Kafka: deliveries and chat answers, each on its node's
/// partition.
pub struct KafkaDeliveries {
    producer: FutureProducer<LibrdkafkaLog>,
    topic: String,
    partitions: i32,
}

impl KafkaDeliveries {
    /// A producer to `settings`' `ms2ps_chat` (created first if missing).
    pub async fn connect(settings: &KafkaSettings) -> Result<Self, String> {
        settings.ensure_topics().await?;
        let topic = settings.ms2ps();
        Ok(Self {
            producer: settings.producer("producer")?,
            partitions: settings.partitions_of(topic.clone()).await?,
            topic,
        })
    }

    /// `bytes`, an encoded record for `node`, addressed to that node's partition, with the
    /// trace of its push (if any) in the headers.
    fn to_node<'a>(&'a self, node: u32, bytes: &'a [u8], trace: &'a str) -> FutureRecord<'a, (), [u8]> {
        let record = FutureRecord::to(&self.topic)
            .partition(partition_of(node, self.partitions))
            .payload(bytes);
        match trace {
            "" => record,
            t => record.headers(trace_header(t)),
        }
    }

    /// Queues `record` for its node; a full queue drops it (logged).
    fn send(&self, record: &mut pb::NodeRecord) {
        let trace = take_trace(record);
        let bytes = record.encode_to_vec();
        // The delivery report is not awaited: a record that never arrives is a push the
        // client's sync fetches, or an answer the gateway stops waiting for.
        if let Err((e, _)) = self.producer.send_result(self.to_node(record.node, &bytes, &trace)) {
            tracing::warn!(node = record.node, error = %e, "ms2ps_chat record dropped (clients sync)");
        }
    }

    /// Waits (at most [`FLUSH_TIMEOUT`]) for every queued record to reach the broker, on a
    /// blocking thread (librdkafka's flush blocks). For a graceful stop.
    pub async fn flush(self: Arc<Self>) {
        let flushed = tokio::task::spawn_blocking(move || {
            rdkafka::producer::Producer::flush(&self.producer, rdkafka::util::Timeout::After(FLUSH_TIMEOUT))
        })
        .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "records still queued at shutdown (clients sync what they miss)"),
            Err(e) => tracing::warn!(error = %e, "flushing the producer failed"),
        }
    }

    fn answer(&self, node: u32, incarnation: u64, request: u64, reply: pb::ChatReply) {
        self.send(&mut pb::NodeRecord {
            node,
            kind: Some(pb::node_record::Kind::Answer(pb::ChatAnswer {
                incarnation,
                request,
                reply: Some(reply),
            })),
        });
    }
}

/// Kafka headers holding one `traceparent`.
fn trace_header(traceparent: &str) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: trace::HEADER,
        value: Some(traceparent),
    })
}

/// The `traceparent` header of a record read, if it has one.
fn trace_of(m: &impl Message) -> Option<&str> {
    m.headers()?
        .iter()
        .find(|h| h.key == trace::HEADER)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

/// Moves a push record's trace out of its payload: on Kafka it travels in the headers.
fn take_trace(record: &mut pb::NodeRecord) -> String {
    match &mut record.kind {
        Some(pb::node_record::Kind::Delivery(pb::DeliveryMsg {
            kind: Some(pb::delivery_msg::Kind::Push(p)),
        })) => std::mem::take(&mut p.traceparent),
        _ => String::new(),
    }
}

/// The records of `delivery`, one for each node it names.
fn node_records(delivery: &Delivery) -> impl Iterator<Item = pb::NodeRecord> + '_ {
    nodes_of(delivery).into_iter().filter_map(move |node| {
        Some(pb::NodeRecord {
            node,
            kind: Some(pb::node_record::Kind::Delivery(delivery_to_pb(delivery, node)?)),
        })
    })
}

impl Ms2Ps for KafkaDeliveries {
    fn deliver(&self, delivery: Delivery) {
        for mut record in node_records(&delivery) {
            self.send(&mut record);
        }
    }
}

/// A services process's reader of `ws2ms_chat`, running until [`Self::stop`].
pub struct ChatConsumer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ChatConsumer {
    /// Stops reading, lets every command read so far finish (stored, answered, pushed) and
    /// commits their offsets before it returns: a graceful stop leaves nothing to read again.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "the ws2ms_chat reader ended abnormally");
        }
    }
}

/// Consumes this process's share of `ws2ms_chat` (`settings.share`) until stopped, from the
/// offsets committed before: each command goes to `ws2ms` (storage, seq, pushes), its answer
/// to `out`.
pub async fn consume_chats(
    settings: &KafkaSettings,
    ws2ms: Arc<dyn Ws2Ms>,
    out: Arc<KafkaDeliveries>,
    runtime: &tokio::runtime::Handle,
) -> Result<ChatConsumer, String> {
    let topic = settings.ws2ms();
    let consumer = settings.share_of(&topic, "services").await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = runtime.spawn(async move {
        let mut inflight = InFlight::default();
        let mut tick = tokio::time::interval(COMMIT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut errors = ReadErrors::default();
        loop {
            if inflight.count >= MAX_IN_FLIGHT {
                inflight.wait_oldest().await;
            }
            tokio::select! {
                // The guard `wait_for` resolves to is dropped here: it must not live across
                // the other branches' awaits.
                () = async { let _ = stopped.wait_for(|s| *s).await; } => break,
                m = consumer.recv() => match m {
                    Ok(m) => inflight.start(m.detach(), &ws2ms, &out),
                    Err(e) => {
                        errors.record("ws2ms_chat", &e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = tick.tick() => {
                    inflight.collect();
                    commit(&consumer, &topic, std::mem::take(&mut inflight.done), CommitMode::Async);
                }
            }
        }
        while inflight.count > 0 {
            inflight.wait_oldest().await;
        }
        commit(&consumer, &topic, std::mem::take(&mut inflight.done), CommitMode::Sync);
    });
    Ok(ChatConsumer { stop, task })
}

/// Commits `done` (partition -> highest offset whose record and every earlier one is done).
/// A commit lost with a crash only means those records are read again.
pub(crate) fn commit(
    consumer: &StreamConsumer<LibrdkafkaLog>,
    topic: &str,
    done: BTreeMap<i32, i64>,
    mode: CommitMode,
) {
    if done.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in done {
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1)) {
            tracing::warn!(error = %e, "an offset to commit");
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(topic, error = %e, "committing offsets failed: the records will be read again");
    }
}

/// The commands a services process is running. Each runs as its own task once the one before
/// it in its conversation is done (one conversation in order, conversations at once); a
/// partition's offset is committed once its command and every earlier one are done.
#[derive(Default)]
struct InFlight {
    /// Per partition, in offset order.
    partitions: BTreeMap<i32, VecDeque<(i64, tokio::task::JoinHandle<()>)>>,
    /// Per conversation key, what ends when its latest command is done.
    last_of: HashMap<Vec<u8>, oneshot::Receiver<()>>,
    /// Commands in `partitions`.
    count: usize,
    /// Offsets done and not yet committed.
    done: BTreeMap<i32, i64>,
}

impl InFlight {
    fn start(&mut self, m: OwnedMessage, ws2ms: &Arc<dyn Ws2Ms>, out: &Arc<KafkaDeliveries>) {
        let key = m.key().unwrap_or_default().to_vec();
        let (tx, rx) = oneshot::channel::<()>();
        let before = self.last_of.insert(key, rx);
        if self.last_of.len() > MAX_IN_FLIGHT {
            // Forget conversations whose latest command is done.
            self.last_of
                .retain(|_, rx| !matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
        }
        let record = pb::ChatRecord::decode(m.payload().unwrap_or_default()).ok();
        let trace = trace_of(&m).and_then(TraceParent::parse);
        let (ws2ms, out) = (ws2ms.clone(), out.clone());
        let task = tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            run_command(record, trace, &*ws2ms, &out).await;
            drop(tx);
        });
        self.partitions
            .entry(m.partition())
            .or_default()
            .push_back((m.offset(), task));
        self.count += 1;
    }

    /// Moves the finished heads of each partition into `done`.
    fn collect(&mut self) {
        for (partition, queue) in &mut self.partitions {
            while queue.front().is_some_and(|(_, t)| t.is_finished()) {
                if let Some((offset, _)) = queue.pop_front() {
                    self.done.insert(*partition, offset);
                    self.count -= 1;
                }
            }
        }
    }

    /// Waits for the oldest command of some partition.
    async fn wait_oldest(&mut self) {
        if let Some((_, task)) = self.partitions.values_mut().find_map(|q| q.front_mut()) {
            let _ = task.await;
        }
        self.collect();
    }
}

/// One chat command: stored through `ws2ms`, its answer to the sender's node.
async fn run_command(
    record: Option<pb::ChatRecord>,
    trace: Option<TraceParent>,
    ws2ms: &dyn Ws2Ms,
    out: &KafkaDeliveries,
) {
    match record.and_then(|r| Some((r.node, r.incarnation, r.request, chat_request(r.call?).ok()?))) {
        Some((node, incarnation, request, (user, mut req))) => {
            req.trace = trace;
            let result = ws2ms.chat(&user, req).await;
            out.answer(node, incarnation, request, chat_reply(result));
        }
        None => tracing::warn!("malformed ws2ms_chat record skipped"),
    }
}

// ---- gateway side -------------------------------------------------------------------------

type Answers = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<ChatAck, Refusal>>>>>;

/// A gateway's [`Ws2Ms`] whose chat commands go through Kafka (the rest through `grpc`).
#[derive(Clone)]
pub struct KafkaChat {
    grpc: GrpcPipeline,
    /// Its producer also writes the chat commands.
    out: Arc<KafkaDeliveries>,
    ws2ms: Arc<str>,
    node: u32,
    incarnation: u64,
    next: Arc<AtomicU64>,
    pending: Answers,
    runtime: tokio::runtime::Handle,
}

impl KafkaChat {
    /// Waits (at most [`FLUSH_TIMEOUT`]) for the chat commands queued to reach the broker (a
    /// graceful stop: the services store them, and their senders sync the acks they missed).
    pub async fn flush(&self) {
        self.out.clone().flush().await;
    }

    /// Creates the topics if missing and starts reading this node's partition of `ms2ps_chat`
    /// (from where it ends now), handing deliveries to `local` (the gateway's shards).
    pub async fn start(
        settings: &KafkaSettings,
        grpc: GrpcPipeline,
        node: u32,
        incarnation: u64,
        local: Arc<dyn Ms2Ps>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, String> {
        let out = Arc::new(KafkaDeliveries::connect(settings).await?);
        let ms2ps = out.topic.clone();
        let consumer: StreamConsumer<LibrdkafkaLog> = settings
            .consumer(format!("{}gateway-{node}", settings.prefix))
            .set("enable.auto.offset.store", "false")
            .create_with_context(settings.context("gateway"))
            .map_err(|e| format!("Kafka consumer: {e}"))?;
        // The end as of now, read before the gateway takes connections: `Offset::End` would be
        // resolved whenever the fetcher starts, which under load came after the first
        // deliveries to this gateway's new connections had been written, and skipped them.
        let partition = partition_of(node, out.partitions);
        let (consumer, end) = {
            let topic = ms2ps.clone();
            tokio::task::spawn_blocking(move || {
                let end = consumer
                    .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                    .map(|(_, high)| high);
                (consumer, end)
            })
            .await
            .map_err(|e| e.to_string())?
        };
        let end = end.map_err(|e| format!("the end of {ms2ps}[{partition}]: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&ms2ps, partition, Offset::Offset(end))
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| format!("reading {ms2ps}: {e}"))?;
        let chat = Self {
            grpc,
            out,
            ws2ms: settings.ws2ms().into(),
            node,
            incarnation,
            next: Arc::new(AtomicU64::new(0)),
            pending: Arc::default(),
            runtime: runtime.clone(),
        };
        let pending = chat.pending.clone();
        runtime.spawn(async move {
            let mut errors = ReadErrors::default();
            loop {
                match consumer.recv().await {
                    Ok(m) => take(&m, node, incarnation, &*local, &pending),
                    Err(e) => {
                        errors.record("ms2ps_chat", &e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(chat)
    }
}

/// One `ms2ps_chat` record read by gateway `node`.
fn take(m: &impl Message, node: u32, incarnation: u64, local: &dyn Ms2Ps, pending: &Answers) {
    use pb::node_record::Kind;
    let Ok(r) = pb::NodeRecord::decode(m.payload().unwrap_or_default()) else {
        tracing::warn!("malformed ms2ps_chat record skipped");
        return;
    };
    if r.node != node {
        return;
    }
    match r.kind {
        Some(Kind::Delivery(d)) => match delivery_from_pb(d) {
            Some(Delivery::Push { to, push, .. }) => local.deliver(Delivery::Push {
                to,
                push,
                trace: trace_of(m).and_then(TraceParent::parse),
            }),
            Some(d) => local.deliver(d),
            None => tracing::warn!("malformed delivery dropped"),
        },
        Some(Kind::Answer(a)) if a.incarnation == incarnation => {
            let waiting = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&a.request);
            if let (Some(tx), Some(reply)) = (waiting, a.reply) {
                let _ = tx.send(chat_result(reply));
            }
        }
        // An answer to this node's previous incarnation.
        Some(Kind::Answer(_)) | None => {}
    }
}

/// What keeps one conversation's commands in one partition.
fn conversation_key(user: &str, chat: &ChatRequest) -> String {
    match chat.chat_type {
        ChatType::Private => ConversationId::private(user, &chat.recv_id).to_string(),
        ChatType::Group => ConversationId::group(&chat.recv_id).to_string(),
    }
}

impl Ws2Ms for KafkaChat {
    fn authenticate(&self, token: &str) -> BoxFuture<Result<String, Refusal>> {
        self.grpc.authenticate(token)
    }

    fn chat(&self, user: &str, chat: ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>> {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() >= MAX_PENDING {
                return Box::pin(std::future::ready(Err(unavailable("too many messages in flight"))));
            }
            pending.insert(request, tx);
        }
        let key = conversation_key(user, &chat);
        let trace = chat.trace.map(|t| t.to_string());
        let record = pb::ChatRecord {
            node: self.node,
            incarnation: self.incarnation,
            request,
            call: Some(chat_call(user, chat)),
        }
        .encode_to_vec();
        let (out, topic, pending) = (self.out.clone(), self.ws2ms.clone(), self.pending.clone());
        let forget = move |why: String| {
            pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&request);
            Err(unavailable(why))
        };
        let task = self.runtime.spawn(async move {
            let mut r = FutureRecord::to(&topic).key(&key).payload(&record);
            if let Some(t) = &trace {
                r = r.headers(trace_header(t));
            }
            if let Err((e, _)) = out.producer.send(r, CALL_TIMEOUT).await {
                return forget(format!("ws2ms_chat: {e}"));
            }
            match tokio::time::timeout(CALL_TIMEOUT, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => forget("the answer was lost".into()),
                Err(_) => forget(format!("no answer within {} s", CALL_TIMEOUT.as_secs())),
            }
        });
        Box::pin(async move { task.await.map_err(unavailable)? })
    }

    fn sync(&self, user: &str, known: BTreeMap<String, u64>, limit: u32) -> BoxFuture<Result<SyncPage, Refusal>> {
        self.grpc.sync(user, known, limit)
    }

    fn mark_read(&self, user: &str, conversation_id: String, read_seq: u64) -> BoxFuture<Result<u64, Refusal>> {
        self.grpc.mark_read(user, conversation_id, read_seq)
    }

    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> BoxFuture<()> {
        self.grpc.mark_received(user, acked)
    }
}

/// Straight onto the named node's partition of `ms2ps_chat`.
impl Forward for KafkaChat {
    fn forward(&self, delivery: Delivery) -> BoxFuture<Result<(), String>> {
        let out = self.out.clone();
        Box::pin(async move {
            for mut record in node_records(&delivery) {
                let trace = take_trace(&mut record);
                let bytes = record.encode_to_vec();
                out.producer
                    .send(out.to_node(record.node, &bytes, &trace), CALL_TIMEOUT)
                    .await
                    .map_err(|(e, _)| e.to_string())?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_conversation_is_one_key_from_either_end() {
        let req = |t, recv: &str| ChatRequest {
            chat_type: t,
            recv_id: recv.into(),
            client_msg_id: "c1".into(),
            msg: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            trace: None,
        };
        assert_eq!(
            conversation_key("alice", &req(ChatType::Private, "bob")),
            conversation_key("bob", &req(ChatType::Private, "alice"))
        );
        assert_eq!(
            conversation_key("alice", &req(ChatType::Group, "g1")),
            conversation_key("bob", &req(ChatType::Group, "g1"))
        );
        assert_eq!(partition_of(5, 4), 1);
        assert_eq!(partition_of(u32::MAX, 0), 0);
    }
}
