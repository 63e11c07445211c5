//! Differential tests: every operation against `roaring` on random inputs, with the invariant
//! check after each operation, and arbitrary bytes into the parser.
#![allow(missing_docs, clippy::unwrap_used)]

use proptest::prelude::*;
use roaring::RoaringBitmap;
use sai_bitmap::{validate, Bitmap, View};

#[derive(Debug, Clone)]
enum Op {
    Insert(u32),
    Contains(u32),
}

fn slot(universe: u32) -> impl Strategy<Value = u32> {
    prop_oneof![0..universe, Just(0), Just(universe - 1)]
}

/// A universe for the slots, a size hint given to `with_universe` (none, smaller than,
/// equal to or larger than the universe: hints only change the representation), and ops.
fn ops() -> impl Strategy<Value = (u32, Option<u32>, Vec<Op>)> {
    let universe = prop_oneof![
        Just(16u32),
        Just(200),
        Just(256),
        Just(2_000),
        Just(9_000),
        Just(100_000),
        Just(u32::MAX)
    ];
    let hint = prop_oneof![
        Just(None),
        Just(Some(10u32)),
        Just(Some(256)),
        Just(Some(2_000)),
        Just(Some(100_000)),
        Just(Some(1 << 20))
    ];
    (universe, hint).prop_flat_map(|(u, h)| {
        let op = prop_oneof![slot(u).prop_map(Op::Insert), slot(u).prop_map(Op::Contains)];
        (Just(u), Just(h), proptest::collection::vec(op, 0..400))
    })
}

/// Applies `ops` to both and compares after every step; returns both.
fn run(hint: Option<u32>, ops: &[Op]) -> (Bitmap, RoaringBitmap) {
    let mut ours = hint.map_or_else(Bitmap::new, Bitmap::with_universe);
    let mut theirs = RoaringBitmap::new();
    for op in ops {
        match *op {
            Op::Insert(s) => assert_eq!(ours.insert(s), theirs.insert(s), "insert {s}"),
            Op::Contains(s) => assert_eq!(ours.contains(s), theirs.contains(s), "contains {s}"),
        }
        ours.check_invariants().unwrap();
        assert_eq!(ours.len(), theirs.len());
    }
    assert_eq!(ours.max(), theirs.max());
    (ours, theirs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn operations_match_roaring((_, hint, ops) in ops()) {
        let (ours, theirs) = run(hint, &ops);
        prop_assert!(ours.iter().eq(theirs.iter()));
        // Serialized form answers the same, in place.
        let bytes = ours.serialize();
        let view = validate(&bytes).unwrap();
        prop_assert_eq!(view.len(), theirs.len());
        for op in &ops {
            let (Op::Insert(s) | Op::Contains(s)) = *op;
            prop_assert_eq!(view.contains(s), theirs.contains(s));
        }
        prop_assert!(view.iter().eq(theirs.iter()));
        prop_assert_eq!(view.max(), theirs.max());
        for op in ops.iter().take(16) {
            let (Op::Insert(s) | Op::Contains(s)) = *op;
            for s in [s, s.wrapping_add(1), s.wrapping_sub(1)] {
                let mut want = ours.clone();
                want.insert(s);
                prop_assert_eq!(view.inserted(s), want.serialize());
            }
        }
        let mut back = Bitmap::deserialize(&bytes).unwrap();
        back.check_invariants().unwrap();
        prop_assert!(back.iter().eq(theirs.iter()));
        prop_assert!(back == ours);
        // A deserialized bitmap goes on taking members (the read-receipt write path).
        let mut more = theirs.clone();
        for op in ops.iter().rev().take(8) {
            let (Op::Insert(s) | Op::Contains(s)) = *op;
            let s = s.wrapping_add(1);
            prop_assert_eq!(back.insert(s), more.insert(s));
            back.check_invariants().unwrap();
        }
        prop_assert!(back.iter().eq(more.iter()));
    }

    #[test]
    fn set_operations_match_roaring((u1, h1, a) in ops(), (_, h2, b) in ops(), within in 0u32..3000) {
        let (x, rx) = run(h1, &a);
        let (y, ry) = run(h2, &b);
        let un = x.union(&y);
        un.check_invariants().unwrap();
        prop_assert!(un.iter().eq((&rx | &ry).iter()));
        let inter = x.intersection(&y);
        inter.check_invariants().unwrap();
        prop_assert!(inter.iter().eq((&rx & &ry).iter()));
        // The member count may be below the largest slot set (members left).
        for u in [u1.min(100_000), within] {
            let comp = x.complement_within(u);
            comp.check_invariants().unwrap();
            let mut all = RoaringBitmap::new();
            all.insert_range(0..u);
            prop_assert!(comp.iter().eq((&all - &rx).iter()));
        }
    }

    /// Adding a member on the stored bytes gives exactly the bytes of decode, insert, encode,
    /// across every kind change (sets near the inline, width and kind boundaries, with runs).
    #[test]
    fn insert_on_bytes_matches_decode_insert_encode(
        base in prop_oneof![Just(0u32), Just(200), Just(65_400), Just(1 << 20)],
        offs in proptest::collection::btree_set(0u32..700, 0..300),
        runs in proptest::collection::vec((0u32..800, 0u32..40), 0..12),
        gaps in 0u32..4,
        extra in 0u32..760,
    ) {
        // Scattered members (every `gaps + 1`-th slot) or a few runs.
        let b: Bitmap = if gaps == 3 {
            runs.iter().flat_map(|&(at, n)| base + at..base + at + n).collect()
        } else {
            offs.iter().map(|&o| base + o * (gaps + 1)).collect()
        };
        let bytes = b.serialize();
        let view = validate(&bytes).unwrap();
        let edges = runs.iter().flat_map(|&(at, n)| [base + at, base + at + n, (base + at).saturating_sub(1)]);
        for slot in [base + extra, base + extra * (gaps + 1), base.saturating_sub(1), 0, 255, 256, 65_536]
            .into_iter()
            .chain(edges)
        {
            let mut want = b.clone();
            want.insert(slot);
            let got = view.inserted(slot);
            prop_assert_eq!(&got, &want.serialize(), "slot {}", slot);
            validate(&got).unwrap();
        }
    }

    /// The fuzz target's body on stable: arbitrary bytes never panic, and whatever validates
    /// round-trips.
    #[test]
    fn arbitrary_bytes_are_refused_or_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        sai_bitmap::format::fuzz_bytes(&bytes);
    }

    /// Headers that validate are well formed even when tweaked.
    #[test]
    fn mutated_serializations_never_panic(slots in proptest::collection::btree_set(0u32..5000, 0..200),
                                          at in any::<usize>(), val in any::<u8>()) {
        let b: Bitmap = slots.iter().copied().collect();
        let mut bytes = b.serialize();
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = val;
        }
        sai_bitmap::format::fuzz_bytes(&bytes);
        if let Ok(v) = View::parse(&bytes) {
            let _ = v.contains(7);
            let _ = v.max();
            let _ = v.iter().take(10_000).count();
            for s in [0, 7, 8, 1000, u32::MAX] {
                let _ = v.inserted(s);
            }
        }
    }
}

/// Edges the random inputs rarely reach: slots at the top of the u32 range (runs that end at
/// `u32::MAX`), whole words, and the inline / bits / array boundaries.
#[test]
fn edges_match_roaring() {
    let sets: Vec<Vec<u32>> = vec![
        (u32::MAX - 70..=u32::MAX).collect(),
        vec![0, u32::MAX],
        (0..64).chain(128..192).collect(),
        (0..256).collect(),
        (255..257).collect(),
        (8_000..8_300).collect(),
        vec![3, 70_000, 70_001, 70_002, 1 << 30],
        (0..100_000).step_by(33).collect(),
    ];
    for slots in sets {
        let mut first: Option<Vec<u8>> = None;
        for hint in [None, Some(256), Some(100_000)] {
            let mut ours = hint.map_or_else(Bitmap::new, Bitmap::with_universe);
            let theirs: RoaringBitmap = slots.iter().copied().collect();
            slots.iter().for_each(|&s| {
                ours.insert(s);
            });
            ours.check_invariants().unwrap();
            assert!(ours.iter().eq(theirs.iter()), "{hint:?}");
            let bytes = ours.serialize();
            // One set, one encoding, whatever the in-memory representation.
            assert_eq!(first.get_or_insert_with(|| bytes.clone()), &bytes);
            let view = validate(&bytes).unwrap();
            assert!(view.iter().eq(theirs.iter()));
            assert_eq!(view.max(), theirs.max());
            for &s in &slots {
                assert!(view.contains(s) && ours.contains(s));
                assert_eq!(view.contains(s.wrapping_add(1)), theirs.contains(s.wrapping_add(1)));
            }
            let back = Bitmap::deserialize(&bytes).unwrap();
            back.check_invariants().unwrap();
            assert_eq!(back, ours);
        }
    }
}
