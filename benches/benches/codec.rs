//! Protocol codec: WebSocket frame check/decode/encode and IM frame parse/encode.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sai_pipeline::frame::{data_frame, PushFrame};
use sai_pipeline::message::{method, Push};
use sai_proto::frame::{self, Opcode};
use sai_proto::im;
use sai_proto::ws::{Role, WsConn};
use std::hint::black_box;

const CHAT: &str = r#"{"frameType":0,"id":"c1","method":"conversation.chat","data":{"chatType":2,"recvId":"load123","clientMsgId":"k-42","msg":{"mType":0,"content":"hello, this is a typical short chat message"}}}"#;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_frame");
    // 1,000 masked 200-byte text frames in one buffer, as a busy connection's read delivers them.
    let mut stream = Vec::new();
    for i in 0..1000u32 {
        frame::encode(&mut stream, Opcode::Text, true, CHAT.as_bytes(), Some(i.to_le_bytes()));
    }
    g.throughput(Throughput::Elements(1000));
    g.bench_function("server_parse_1000_masked_frames", |b| {
        b.iter_batched(
            || stream.clone(),
            |bytes| {
                let mut ws = WsConn::new(Role::Server, 1 << 16, 0);
                ws.feed(&bytes);
                let mut n = 0;
                while let Ok(Some(_)) = ws.next_event() {
                    n += 1;
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("server_encode_1000_frames", |b| {
        let mut out = Vec::with_capacity(256 * 1000);
        b.iter(|| {
            out.clear();
            for _ in 0..1000 {
                frame::encode(&mut out, Opcode::Text, true, CHAT.as_bytes(), None);
            }
            black_box(out.len())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("im_frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_chat_request", |b| {
        b.iter(|| black_box(im::parse_request(black_box(CHAT)).is_ok()))
    });
    let push: Push = serde_json::from_str(
        r#"{"conversationId":"si_load1_load2","chatType":2,"sendId":"load1","recvId":"load2","seq":12345,"msgId":"9f1c","clientMsgId":"k-42","sendTime":1795756690320,"msg":{"mType":0,"content":"hello"}}"#,
    )
    .unwrap_or_else(|e| panic!("dataset: {e}"));
    g.bench_function("encode_push", |b| {
        b.iter(|| black_box(data_frame(Some("17"), method::PUSH, &push)))
    });
    // Fan-out: the push is serialized once; each recipient connection only wraps it with its id.
    let once = PushFrame::new(&push);
    g.bench_function("push_frame_per_connection", |b| b.iter(|| black_box(once.frame(17))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
