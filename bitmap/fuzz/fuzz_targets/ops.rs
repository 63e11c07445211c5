//! Arbitrary operation sequences applied to sai-bitmap and roaring side by side.
#![no_main]
use roaring::RoaringBitmap;
use sai_bitmap::Bitmap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first byte picks a member-count hint: none, or up to 2^16 slots.
    let Some((&hint, data)) = data.split_first() else {
        return;
    };
    let mut ours = match hint {
        0 => Bitmap::new(),
        h => Bitmap::with_universe(u32::from(h) << 8),
    };
    let mut theirs = RoaringBitmap::new();
    for c in data.chunks_exact(4) {
        let op = c[0] & 1;
        let slot = u32::from_le_bytes([c[1], c[2], c[3], 0]) >> (c[0] >> 4);
        if op == 0 {
            assert_eq!(ours.insert(slot), theirs.insert(slot));
        } else {
            assert_eq!(ours.contains(slot), theirs.contains(slot));
        }
        assert!(ours.check_invariants().is_ok());
        assert_eq!(ours.len(), theirs.len());
    }
    let bytes = ours.serialize();
    let view = sai_bitmap::validate(&bytes).expect("own output validates");
    assert!(view.iter().eq(theirs.iter()));
    // Adding a member on the stored bytes equals decode, insert, encode.
    if let Some(c) = data.chunks_exact(4).last() {
        let slot = u32::from_le_bytes([c[3], c[2], c[1], 0]);
        let mut want = ours.clone();
        want.insert(slot);
        assert_eq!(view.inserted(slot), want.serialize());
    }
});
