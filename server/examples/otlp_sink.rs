//! An OTLP/gRPC trace sink for benchmarks: accepts every export, counts the spans, and prints
//! the running total once a second (`results/traces/run.sh` runs it beside the server).
//!   cargo run --release -p sai-im --example otlp_sink -- 127.0.0.1:4317
#![allow(missing_docs)]

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        r: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = r
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into())
        .parse()?;
    let count = Arc::new(AtomicU64::new(0));
    let shown = count.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        println!("spans {}", shown.load(Ordering::Relaxed));
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink(count)))
            .serve(addr),
    )?;
    Ok(())
}
