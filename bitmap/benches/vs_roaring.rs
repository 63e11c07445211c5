//! sai-bitmap against roaring, side by side in one run, on seeded read-receipt datasets:
//! group sizes 10, 200, 2,000, 50,000; read fractions 1%, 50%, 99%; readers in slot order or
//! random order. Each benchmark id is `<op>/<impl>/<size>-<fraction>-<order>`.
//!
//! - `set`: build a message's bitmap by setting every reader's slot, from empty.
//! - `contains`: ask every slot of the group.
//! - `count`: the read count of a bitmap in memory.
//! - `read_bytes`: from the stored bytes, the read count plus every slot's `contains` (roaring
//!   must deserialize first; sai-bitmap reads the bytes in place).
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use roaring::RoaringBitmap;
use sai_bitmap::{Bitmap, View};
use std::hint::black_box;

#[path = "datasets.rs"]
mod datasets;

fn bench(c: &mut Criterion) {
    for d in datasets::all() {
        let ours: Bitmap = {
            let mut b = Bitmap::with_universe(d.size);
            d.readers.iter().for_each(|&s| {
                b.insert(s);
            });
            b
        };
        let theirs: RoaringBitmap = d.readers.iter().copied().collect();
        let our_bytes = ours.serialize();
        let mut their_bytes = Vec::new();
        theirs
            .serialize_into(&mut their_bytes)
            .unwrap_or_else(|e| panic!("roaring serialize: {e}"));

        let mut g = c.benchmark_group("set");
        g.bench_with_input(BenchmarkId::new("sai", &d.name), &d, |b, d| {
            b.iter(|| {
                let mut bm = Bitmap::with_universe(d.size);
                for &s in &d.readers {
                    bm.insert(s);
                }
                black_box(bm.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("roaring", &d.name), &d, |b, d| {
            b.iter(|| {
                let mut bm = RoaringBitmap::new();
                for &s in &d.readers {
                    bm.insert(s);
                }
                black_box(bm.len())
            })
        });
        g.finish();

        let mut g = c.benchmark_group("contains");
        g.bench_with_input(BenchmarkId::new("sai", &d.name), &d.size, |b, &n| {
            b.iter(|| (0..n).filter(|&s| black_box(&ours).contains(s)).count())
        });
        g.bench_with_input(BenchmarkId::new("roaring", &d.name), &d.size, |b, &n| {
            b.iter(|| (0..n).filter(|&s| black_box(&theirs).contains(s)).count())
        });
        g.finish();

        let mut g = c.benchmark_group("count");
        g.bench_function(BenchmarkId::new("sai", &d.name), |b| b.iter(|| black_box(&ours).len()));
        g.bench_function(BenchmarkId::new("roaring", &d.name), |b| {
            b.iter(|| black_box(&theirs).len())
        });
        g.finish();

        let mut g = c.benchmark_group("read_bytes");
        g.bench_with_input(BenchmarkId::new("sai", &d.name), &d.size, |b, &n| {
            b.iter(|| {
                let v = View::parse(black_box(&our_bytes)).unwrap_or_else(|e| panic!("{e}"));
                (0..n).filter(|&s| v.contains(s)).count() as u64 + v.len()
            })
        });
        g.bench_with_input(BenchmarkId::new("roaring", &d.name), &d.size, |b, &n| {
            b.iter(|| {
                let r = RoaringBitmap::deserialize_from(black_box(&their_bytes[..])).unwrap_or_else(|e| panic!("{e}"));
                (0..n).filter(|&s| r.contains(s)).count() as u64 + r.len()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
