//! Gateway data structures: the per-shard timer wheel and the user -> connection index.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sai_benches::Seeded;
use sai_gateway::index::UserIndex;
use sai_gateway::wheel::TimerWheel;
use sai_pipeline::flow::{Route, Routes};
use std::hint::black_box;

const N: u64 = 100_000;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel");
    g.throughput(Throughput::Elements(N));
    // 100k connections with idle deadlines spread over 60 s of 100 ms ticks (600 ticks).
    let mut rng = Seeded::new(7);
    let deadlines: Vec<u64> = (0..N).map(|_| rng.next_u64() % 600).collect();
    g.bench_function("insert_100k", |b| {
        b.iter(|| {
            let mut w = TimerWheel::new(1024, 0);
            for (k, d) in deadlines.iter().enumerate() {
                w.insert(k as u64, *d);
            }
            black_box(w.len())
        })
    });
    g.bench_function("advance_through_100k", |b| {
        b.iter_batched(
            || {
                let mut w = TimerWheel::new(1024, 0);
                for (k, d) in deadlines.iter().enumerate() {
                    w.insert(k as u64, *d);
                }
                w
            },
            |mut w| {
                let mut out = Vec::with_capacity(N as usize);
                for t in 0..600 {
                    w.advance(t, &mut out);
                }
                black_box(out.len())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("user_index");
    g.throughput(Throughput::Elements(N));
    let users: Vec<String> = (0..N).map(|i| format!("load{i}")).collect();
    g.bench_function("register_100k", |b| {
        b.iter(|| {
            let idx = UserIndex::default();
            for (i, u) in users.iter().enumerate() {
                idx.register(
                    u,
                    Route {
                        node: 0,
                        shard: (i % 16) as u32,
                        conn: i as u64,
                    },
                );
            }
            black_box(idx.len())
        })
    });
    let idx = UserIndex::default();
    for (i, u) in users.iter().enumerate() {
        idx.register(
            u,
            Route {
                node: 0,
                shard: (i % 16) as u32,
                conn: i as u64,
            },
        );
    }
    let mut rng = Seeded::new(11);
    let probes: Vec<&String> = (0..N).map(|_| &users[(rng.next_u64() % N) as usize]).collect();
    g.bench_function("lookup_100k_random", |b| {
        b.iter(|| {
            let mut hits = 0;
            for u in &probes {
                hits += usize::from(idx.lookup(u).is_some());
            }
            black_box(hits)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
