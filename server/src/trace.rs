//! Traces: OpenTelemetry spans, exported over OTLP/gRPC when `otlp_endpoint` is set (off by
//! default: then no span is made and the decorators below pass every call straight through).
//!
//! One chat message is one trace. Its spans, and where they are made:
//!
//! ```text
//! chat receive     (gateway; the root)       TimedPipeline::chat at the gateway's Ws2Ms
//! └ chat process   (services; cluster only)  TimedPipeline::chat at the services' Ws2Ms
//!   ├ store append                           TimedStore (every store call under a traced span)
//!   └ ms2ps_chat send (services; cluster)    Traced deliveries at the services' Ms2Ps
//!     └ push       (gateway)                 Traced deliveries at the gateway's Ms2Ps
//! ```
//!
//! In the embedded default the gateway and the services share the process, so the chain is
//! `chat receive` > `store append`, `push`. Within a process the context follows the futures
//! (`FutureExt::with_context`); between processes it is a W3C `traceparent`
//! ([`sai_pipeline::trace::TraceParent`]) in the chat command (gRPC metadata, Kafka headers)
//! and in each push delivery (the delivery stream's message, Kafka headers).
//!
//! **Sampling** is decided once per trace, where it starts (the gateway), with the ratio
//! `trace_sampling` (live: a configuration reload changes it); every later span follows its
//! parent's decision, in whichever process it is made.
//!
//! **Bounds.** Spans wait for export in the SDK's batch queue (2,048 spans unless
//! `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise, sent every 5 s or `OTEL_BSP_SCHEDULE_DELAY`);
//! when it is full, new spans are dropped (the SDK counts and logs them), never the messages.
//! A collector that cannot be reached costs the export thread's retries, not the chat path.

use opentelemetry::trace::{
    FutureExt as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample};
use sai_pipeline::flow::{BoxFuture, Delivery, Ms2Ps, Refusal};
use sai_pipeline::message::{ChatAck, ChatRequest};
use sai_pipeline::trace::TraceParent;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The process's tracer, set once when traces are on.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The sampling ratio of new traces, as `f64` bits (1.0 until configured).
static RATIO: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000);

/// Sets the share of new traces recorded (0.0 to 1.0, validated with the config); traces
/// already started keep their decision.
pub fn set_sampling(ratio: f64) {
    RATIO.store(ratio.to_bits(), Ordering::Relaxed);
}

fn ratio() -> f64 {
    f64::from_bits(RATIO.load(Ordering::Relaxed))
}

/// Running exporter; [`Traces::stop`] sends what is queued.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Exports the spans still queued (bounded by the exporter's timeout) and stops.
    pub async fn stop(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "traces still queued at shutdown were not exported");
        }
    }
}

/// Starts exporting to `endpoint` (an `http://` URL of an OTLP/gRPC collector) as
/// `service.name = sai-im-<role>`, sampling new traces at `ratio`. Called once, inside the
/// tokio runtime (the exporter's gRPC channel lives on it); `None` without an endpoint.
pub fn start(endpoint: Option<&str>, ratio: f64, role: &'static str) -> Result<Option<Traces>, String> {
    set_sampling(ratio);
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("OTLP exporter to {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(format!("sai-im-{role}"))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(FirstDecides)
        .with_resource(resource)
        .build();
    if TRACER.set(provider.tracer("sai-im")).is_err() {
        return Err("traces were already started in this process".into());
    }
    tracing::info!(endpoint, ratio, "traces exported over OTLP");
    Ok(Some(Traces { provider }))
}

/// The sampler: a span with a parent follows its decision (one decision per trace, wherever
/// its spans are made); a new trace is recorded with the configured ratio, by trace id.
#[derive(Debug, Clone)]
struct FirstDecides;

impl ShouldSample for FirstDecides {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        if let Some(p) = parent.filter(|p| p.has_active_span()) {
            let span = p.span();
            let sc = span.span_context();
            if sc.is_valid() {
                return SamplingResult {
                    decision: if sc.is_sampled() {
                        SamplingDecision::RecordAndSample
                    } else {
                        SamplingDecision::Drop
                    },
                    attributes: Vec::new(),
                    trace_state: sc.trace_state().clone(),
                };
            }
        }
        Sampler::TraceIdRatioBased(ratio()).should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// The context of a span made in another process.
fn remote(t: TraceParent) -> Context {
    let flags = if t.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(t.span_id),
        flags,
        true,
        TraceState::default(),
    );
    Context::new().with_remote_span_context(sc)
}

/// What carries `cx`'s span to another process (`None`: no span).
fn carried(cx: &Context) -> Option<TraceParent> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        sampled: sc.is_sampled(),
    })
}

/// The trace id and span id of the recorded span the current task runs in, for log lines (a
/// trace that was not sampled is not in the collector, and is not named).
pub fn current_ids() -> Option<(String, String)> {
    TRACER.get()?;
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_sampled()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Where a process's chat span sits in the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatSide {
    /// Where the client's message arrives (gateway, embedded default): the trace starts here.
    Receive,
    /// A services process, continuing the gateway's trace.
    Process,
}

/// Runs the chat command `run` makes of `chat` inside its span (`chat receive` at a gateway,
/// `chat process` at services), with the span's context in `chat.trace` for the next process.
/// Without traces, `run(chat)` as is.
pub fn chat(
    side: ChatSide,
    user: &str,
    mut chat: ChatRequest,
    run: impl FnOnce(ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>>,
) -> BoxFuture<Result<ChatAck, Refusal>> {
    let Some(tracer) = TRACER.get() else {
        return run(chat);
    };
    let (parent, name, kind) = match (side, chat.trace) {
        (ChatSide::Process, Some(t)) => (remote(t), "chat process", SpanKind::Consumer),
        // A new trace: not under whatever the calling task runs in.
        (ChatSide::Process, None) => (Context::new(), "chat process", SpanKind::Consumer),
        (ChatSide::Receive, _) => (Context::new(), "chat receive", SpanKind::Server),
    };
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes([
            KeyValue::new("enduser.id", user.to_string()),
            KeyValue::new("sai.chat_type", i64::from(chat.chat_type.as_u8())),
            KeyValue::new("sai.recv_id", chat.recv_id.clone()),
            KeyValue::new("sai.client_msg_id", chat.client_msg_id.clone()),
        ])
        .start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    chat.trace = carried(&cx);
    let done = run(chat).with_context(cx.clone());
    Box::pin(async move {
        let r = done.await;
        let span = cx.span();
        match &r {
            Ok(ack) => {
                span.set_attribute(KeyValue::new("sai.conversation_id", ack.conversation_id.clone()));
                span.set_attribute(KeyValue::new("sai.seq", ack.seq as i64));
            }
            Err(e) => span.set_status(Status::error(e.code)),
        }
        span.end();
        r
    })
}

/// Runs `f` in a child span (named by `name`, called only then) of the span the calling task
/// runs in, when that one is recorded; else just `f`.
pub async fn child<T>(name: impl FnOnce() -> String, f: impl Future<Output = T>) -> T {
    let Some(tracer) = TRACER.get() else {
        return f.await;
    };
    let parent = Context::current();
    if !parent.span().span_context().is_sampled() {
        return f.await;
    }
    let span = tracer
        .span_builder(name())
        .with_kind(SpanKind::Client)
        .start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    let r = f.with_context(cx.clone()).await;
    cx.span().end();
    r
}

/// `inner` with a span for each push it is handed (`name`, of `kind`), the child of the trace
/// the push carries, else of the span the caller runs in; the push then carries the new span.
/// `inner` itself without traces.
pub fn deliveries(inner: Arc<dyn Ms2Ps>, name: &'static str, kind: SpanKind) -> Arc<dyn Ms2Ps> {
    if TRACER.get().is_none() {
        return inner;
    }
    Arc::new(TracedDeliveries { inner, name, kind })
}

struct TracedDeliveries {
    inner: Arc<dyn Ms2Ps>,
    name: &'static str,
    kind: SpanKind,
}

impl Ms2Ps for TracedDeliveries {
    fn deliver(&self, mut delivery: Delivery) {
        let Some(tracer) = TRACER.get() else {
            return self.inner.deliver(delivery);
        };
        let Delivery::Push { to, push, trace } = &mut delivery else {
            return self.inner.deliver(delivery);
        };
        let parent = match trace {
            Some(t) => remote(*t),
            None => Context::current(),
        };
        if !parent.span().span_context().is_valid() {
            return self.inner.deliver(delivery);
        }
        let span = tracer
            .span_builder(self.name)
            .with_kind(self.kind.clone())
            .with_attributes([
                KeyValue::new("sai.conversation_id", push.conversation_id.to_string()),
                KeyValue::new("sai.seq", push.seq as i64),
                KeyValue::new("sai.connections", to.len() as i64),
            ])
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        *trace = carried(&cx);
        self.inner.deliver(delivery);
        cx.span().end();
    }
}
