//! An OTLP/gRPC trace collector inside the test: it takes the spans a real `sai-im` exports
//! and keeps them, flattened, for the test to check.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One span as received.
#[derive(Debug, Clone)]
pub struct SpanSeen {
    /// `service.name` of the process that made it.
    pub service: String,
    pub name: String,
    /// Hex, as in a `traceparent` and in the log lines.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent: String,
    /// Attributes, their values as text.
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (2: error).
    pub status: i32,
}

type Seen = Arc<Mutex<Vec<SpanSeen>>>;

/// The collector; it stops with the test process.
pub struct Collector {
    /// Its endpoint, for `--otlp-endpoint`.
    pub endpoint: String,
    seen: Seen,
}

struct Receiver(Seen);

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        r: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in r.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(text)
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                seen.push(SpanSeen {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(kv))).collect(),
                    status: span.status.map(|s| s.code).unwrap_or_default(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Listens on a free loopback port, on a thread of its own.
    pub fn start() -> Collector {
        let seen = Seen::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let receiver = Receiver(seen.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(receiver))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                    .await
                    .unwrap();
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Collector {
            endpoint: format!("http://{addr}"),
            seen,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SpanSeen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (at most 20 s) until `done` holds for the spans received, and returns them.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[SpanSeen]) -> bool) -> Vec<SpanSeen> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not received; spans so far: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The spans of the trace whose root (a `chat receive`) has `sai.client_msg_id` = `id`.
pub fn trace_of(spans: &[SpanSeen], id: &str) -> Vec<SpanSeen> {
    let Some(root) = spans
        .iter()
        .find(|s| s.name == "chat receive" && s.attributes.get("sai.client_msg_id").map(String::as_str) == Some(id))
    else {
        return Vec::new();
    };
    spans.iter().filter(|s| s.trace_id == root.trace_id).cloned().collect()
}

/// The one span of `trace` named `name`.
pub fn one<'a>(trace: &'a [SpanSeen], name: &str) -> &'a SpanSeen {
    let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {trace:#?}");
    found[0]
}
