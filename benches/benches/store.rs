//! The embedded message store (SQLite, WAL): durable append with seq + idempotency, and history
//! page queries, on a fixed dataset.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sai_services::sqlite::SqliteStore;
use sai_storage::{MessageStore, NewMessage};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

fn msg(conv: u64, key: u64) -> NewMessage {
    NewMessage {
        conversation_id: format!("si_bench{conv}_bench{}", conv + 1),
        chat_type: 2,
        send_id: format!("bench{conv}"),
        recv_id: format!("bench{}", conv + 1),
        client_msg_id: format!("k{key}"),
        msg_id: format!("m{key}"),
        send_time: 1_795_756_690_320,
        body: r#"{"mType":0,"content":"hello, this is a typical short chat message"}"#.into(),
        members: vec![format!("bench{conv}"), format!("bench{}", conv + 1)],
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let dir = std::env::temp_dir().join(format!("sai-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let store = rt
        .block_on(SqliteStore::open(&dir.join("bench.db")))
        .unwrap_or_else(|e| panic!("open: {e}"));
    // Dataset: 100 conversations x 1,000 messages.
    rt.block_on(async {
        for conv in 0..100u64 {
            for i in 0..1000u64 {
                let _ = store.append(msg(conv * 2, conv * 1000 + i)).await;
            }
        }
    });
    let next = AtomicU64::new(10_000_000);
    let mut g = c.benchmark_group("message_store");
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_durable", |b| {
        b.iter(|| {
            let k = next.fetch_add(1, Ordering::Relaxed);
            black_box(rt.block_on(store.append(msg((k % 100) * 2, k))).is_ok())
        })
    });
    g.bench_function("append_duplicate", |b| {
        b.iter(|| black_box(rt.block_on(store.append(msg(0, 5))).is_ok()))
    });
    g.bench_function("page_newest_100", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(store.messages_before("si_bench0_bench1", None, 100))
                    .map(|v| v.len()),
            )
        })
    });
    g.bench_function("page_after_500_limit_200", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(store.messages_after("si_bench0_bench1", 500, 200))
                    .map(|v| v.len()),
            )
        })
    });
    g.finish();
    rt.block_on(store.close());
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
