//! sai-bitmap against roaring, side by side in one run, on seeded read-receipt datasets:
//! group sizes 10, 200, 2,000, 50,000; read fractions 1%, 50%, 99%; readers in slot order or
//! random order. Each benchmark id is `<op>/<impl>/<size>-<fraction>-<order>`.
//!
//! In memory:
//! - `set`: build a message's bitmap by setting every reader's slot, from empty (sai-bitmap is
//!   told the group's member count, which the read-receipt path knows).
//! - `contains`: every member's status on each of a page of [`STATUS_PAGE`] messages (the
//!   members asked from a list of their slots).
//! - `count`: the read counts of a page of [`PAGE`] messages' bitmaps (one `len` is below a
//!   nanosecond for both, under the measurement's own noise, so a page is timed).
//! - `iter`: list the readers.
//! - `unread`: the members who have not read it (complement within the member count).
//!
//! From the stored bytes (sai-bitmap reads them in place; roaring must deserialize first):
//! - `read_bytes`: the read count and whether one member (the viewer) has read it, which is
//!   what a history page asks of every message.
//! - `iter_bytes`: list the readers.
//! - `insert_bytes`: the write path: stored bytes in (validated: they come from storage), one
//!   more reader, stored bytes out.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use roaring::RoaringBitmap;
use sai_bitmap::{Bitmap, View};
use std::hint::black_box;

#[path = "datasets.rs"]
mod datasets;

/// Messages per page for `count`.
const PAGE: usize = 64;
/// Messages per page for `contains` (each asked about every member).
const STATUS_PAGE: usize = 8;

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
        let (n, viewer, name) = (d.size, d.size / 2, d.name.as_str());
        // The write path adds a member who has not read it yet.
        let newcomer = (0..n).find(|&s| !theirs.contains(s)).unwrap_or(n);

        let mut g = c.benchmark_group("set");
        g.bench_with_input(BenchmarkId::new("sai", name), &d, |b, d| {
            b.iter(|| {
                let mut bm = Bitmap::with_universe(d.size);
                for &s in &d.readers {
                    bm.insert(s);
                }
                black_box(bm.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("roaring", name), &d, |b, d| {
            b.iter(|| {
                let mut bm = RoaringBitmap::new();
                for &s in &d.readers {
                    bm.insert(s);
                }
                black_box(bm.len())
            })
        });
        g.finish();

        // Every member's status on each message of a page: the members asked are a list the
        // optimizer cannot see into, as a caller's would be.
        let members: Vec<u32> = (0..n).collect();
        let (our_msgs, their_msgs) = (vec![ours.clone(); STATUS_PAGE], vec![theirs.clone(); STATUS_PAGE]);
        let mut g = c.benchmark_group("contains");
        g.bench_function(BenchmarkId::new("sai", name), |b| {
            b.iter(|| {
                let members = black_box(&members);
                black_box(&our_msgs)
                    .iter()
                    .map(|bm| members.iter().filter(|&&s| bm.contains(s)).count())
                    .sum::<usize>()
            })
        });
        g.bench_function(BenchmarkId::new("roaring", name), |b| {
            b.iter(|| {
                let members = black_box(&members);
                black_box(&their_msgs)
                    .iter()
                    .map(|bm| members.iter().filter(|&&s| bm.contains(s)).count())
                    .sum::<usize>()
            })
        });
        g.finish();

        let our_page = vec![ours.clone(); PAGE];
        let their_page = vec![theirs.clone(); PAGE];
        let mut g = c.benchmark_group("count");
        g.bench_function(BenchmarkId::new("sai", name), |b| {
            b.iter(|| black_box(&our_page).iter().map(Bitmap::len).sum::<u64>())
        });
        g.bench_function(BenchmarkId::new("roaring", name), |b| {
            b.iter(|| black_box(&their_page).iter().map(RoaringBitmap::len).sum::<u64>())
        });
        g.finish();

        let mut g = c.benchmark_group("iter");
        g.bench_function(BenchmarkId::new("sai", name), |b| {
            b.iter(|| black_box(&ours).iter().map(u64::from).sum::<u64>())
        });
        g.bench_function(BenchmarkId::new("roaring", name), |b| {
            b.iter(|| black_box(&theirs).iter().map(u64::from).sum::<u64>())
        });
        g.finish();

        let mut g = c.benchmark_group("unread");
        g.bench_function(BenchmarkId::new("sai", name), |b| {
            b.iter(|| black_box(&ours).complement_within(n).len())
        });
        g.bench_function(BenchmarkId::new("roaring", name), |b| {
            b.iter(|| {
                let mut all = RoaringBitmap::new();
                all.insert_range(0..n);
                all -= black_box(&theirs);
                all.len()
            })
        });
        g.finish();

        let mut g = c.benchmark_group("read_bytes");
        g.bench_function(BenchmarkId::new("sai", name), |b| {
            b.iter(|| {
                let v = View::parse(black_box(&our_bytes)).unwrap_or_else(|e| panic!("{e}"));
                v.len() + u64::from(v.contains(viewer))
            })
        });
        g.bench_function(BenchmarkId::new("roaring", name), |b| {
            b.iter(|| {
                let r = RoaringBitmap::deserialize_from(black_box(&their_bytes[..])).unwrap_or_else(|e| panic!("{e}"));
                r.len() + u64::from(r.contains(viewer))
            })
        });
        g.finish();

        let mut g = c.benchmark_group("iter_bytes");
        g.bench_function(BenchmarkId::new("sai", name), |b| {
            b.iter(|| {
                let v = View::parse(black_box(&our_bytes)).unwrap_or_else(|e| panic!("{e}"));
                v.iter().map(u64::from).sum::<u64>()
            })
        });
        g.bench_function(BenchmarkId::new("roaring", name), |b| {
            b.iter(|| {
                let r = RoaringBitmap::deserialize_from(black_box(&their_bytes[..])).unwrap_or_else(|e| panic!("{e}"));
                r.iter().map(u64::from).sum::<u64>()
            })
        });
        g.finish();

        let mut g = c.benchmark_group("insert_bytes");
        g.bench_function(BenchmarkId::new("sai", name), |b| {
            b.iter(|| {
                let v = sai_bitmap::validate(black_box(&our_bytes)).unwrap_or_else(|e| panic!("{e}"));
                v.inserted(newcomer)
            })
        });
        g.bench_function(BenchmarkId::new("roaring", name), |b| {
            b.iter(|| {
                let mut r =
                    RoaringBitmap::deserialize_from(black_box(&their_bytes[..])).unwrap_or_else(|e| panic!("{e}"));
                r.insert(newcomer);
                let mut out = Vec::with_capacity(r.serialized_size());
                r.serialize_into(&mut out).unwrap_or_else(|e| panic!("{e}"));
                out
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
