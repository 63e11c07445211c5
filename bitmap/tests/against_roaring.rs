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

fn ops() -> impl Strategy<Value = (u32, Vec<Op>)> {
    prop_oneof![
        Just(16u32),
        Just(200),
        Just(2_000),
        Just(9_000),
        Just(100_000),
        Just(u32::MAX)
    ]
    .prop_flat_map(|u| {
        let op = prop_oneof![slot(u).prop_map(Op::Insert), slot(u).prop_map(Op::Contains)];
        (Just(u), proptest::collection::vec(op, 0..400))
    })
}

/// Applies `ops` to both and compares after every step; returns both.
fn run(universe: u32, ops: &[Op]) -> (Bitmap, RoaringBitmap) {
    let mut ours = if universe <= 100_000 {
        Bitmap::with_universe(universe)
    } else {
        Bitmap::new()
    };
    let mut theirs = RoaringBitmap::new();
    for op in ops {
        match *op {
            Op::Insert(s) => assert_eq!(ours.insert(s), theirs.insert(s), "insert {s}"),
            Op::Contains(s) => assert_eq!(ours.contains(s), theirs.contains(s), "contains {s}"),
        }
        ours.check_invariants().unwrap();
        assert_eq!(ours.len(), theirs.len());
    }
    (ours, theirs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn operations_match_roaring((universe, ops) in ops()) {
        let (ours, theirs) = run(universe, &ops);
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
        let back = Bitmap::deserialize(&bytes).unwrap();
        back.check_invariants().unwrap();
        prop_assert!(back.iter().eq(theirs.iter()));
    }

    #[test]
    fn set_operations_match_roaring((u1, a) in ops(), (_, b) in ops()) {
        let (x, rx) = run(u1, &a);
        let (y, ry) = run(u1, &b);
        let un = x.union(&y);
        un.check_invariants().unwrap();
        prop_assert!(un.iter().eq((&rx | &ry).iter()));
        let inter = x.intersection(&y);
        inter.check_invariants().unwrap();
        prop_assert!(inter.iter().eq((&rx & &ry).iter()));
        if u1 <= 100_000 {
            let comp = x.complement_within(u1);
            comp.check_invariants().unwrap();
            let mut all = RoaringBitmap::new();
            all.insert_range(0..u1);
            prop_assert!(comp.iter().eq((&all - &rx).iter()));
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
        }
    }
}
