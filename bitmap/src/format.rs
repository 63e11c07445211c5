//! The byte format, version 1. Stable: a reader of version 1 will always read these bytes.
//!
//! ```text
//! offset size  field
//! 0      1     version = 1
//! 1      1     kind: 0 = array, 1 = bits, 2 = runs
//! 2      1     width: bytes per slot value (1..=4) for array and runs; 0 for bits
//! 3      1     reserved, 0
//! 4      4     cardinality, u32 little endian
//! 8      ..    body
//! ```
//!
//! Bodies:
//! - array: `cardinality` values, strictly increasing, each `width` bytes little endian.
//! - bits: bit `s % 8` of byte `s / 8` is slot `s`; the last byte is not zero (no trailing zero
//!   bytes); the number of set bits equals the cardinality. Empty for the empty set.
//! - runs: a u32 run count `r`, then `r` pairs `(start, length - 1)` of `width` bytes each;
//!   runs ascending, neither overlapping nor touching; the lengths sum to the cardinality.
//!
//! The writer picks the smallest body; ties go to bits, then array.

use std::fmt;

/// Format version written and read.
pub const VERSION: u8 = 1;
/// Largest cardinality a reader accepts (16,777,216 slots: far above any group), so that a few
/// bytes of runs can never make a reader iterate or allocate without bound.
pub const MAX_CARDINALITY: u32 = 1 << 24;
const HEADER: usize = 8;
const KIND_ARRAY: u8 = 0;
const KIND_BITS: u8 = 1;
const KIND_RUNS: u8 = 2;

/// Why bytes are not a valid bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Shorter than the header.
    Truncated,
    /// A version this reader does not know.
    Version(u8),
    /// Unknown kind, bad width or non-zero reserved byte.
    Header,
    /// The body length does not match the header.
    Length,
    /// Values out of order, a trailing zero byte, overlapping runs or a wrong cardinality.
    Invariant(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("bitmap bytes are shorter than the header"),
            Error::Version(v) => write!(f, "unknown bitmap format version {v}"),
            Error::Header => f.write_str("invalid bitmap header"),
            Error::Length => f.write_str("bitmap body length does not match its header"),
            Error::Invariant(what) => write!(f, "invalid bitmap: {what}"),
        }
    }
}

impl std::error::Error for Error {}

fn width_for(max: u32) -> u8 {
    match max {
        0..=0xFF => 1,
        0x100..=0xFFFF => 2,
        0x1_0000..=0xFF_FFFF => 3,
        _ => 4,
    }
}

fn put(out: &mut Vec<u8>, v: u32, width: u8) {
    out.extend_from_slice(&v.to_le_bytes()[..width as usize]);
}

/// Value `i` of a body of `width`-byte little-endian values (callers keep `i` in range).
#[inline]
fn get(b: &[u8], i: usize, width: usize) -> u32 {
    let o = i * width;
    match width {
        1 => u32::from(b[o]),
        2 => u32::from(u16::from_le_bytes([b[o], b[o + 1]])),
        3 => u32::from_le_bytes([b[o], b[o + 1], b[o + 2], 0]),
        _ => u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]),
    }
}

/// Encodes ascending distinct slots in the smallest of the three bodies.
pub(crate) fn encode(slots: impl Iterator<Item = u32> + Clone, len: u64, max: Option<u32>) -> Vec<u8> {
    let card = len as u32;
    let Some(max) = max else {
        return header(KIND_BITS, 0, 0);
    };
    let width = width_for(max);
    let mut runs = 0usize;
    let mut prev: Option<u32> = None;
    for s in slots.clone() {
        if prev.is_none_or(|p| p + 1 != s) {
            runs += 1;
        }
        prev = Some(s);
    }
    let bits_len = max as usize / 8 + 1;
    let array_len = card as usize * width as usize;
    let runs_len = 4 + runs * 2 * width as usize;
    if bits_len <= array_len && bits_len <= runs_len {
        let mut out = header(KIND_BITS, 0, card);
        out.resize(HEADER + bits_len, 0);
        for s in slots {
            out[HEADER + s as usize / 8] |= 1 << (s % 8);
        }
        out
    } else if array_len <= runs_len {
        let mut out = header(KIND_ARRAY, width, card);
        out.reserve(array_len);
        for s in slots {
            put(&mut out, s, width);
        }
        out
    } else {
        let mut out = header(KIND_RUNS, width, card);
        out.reserve(runs_len);
        out.extend_from_slice(&(runs as u32).to_le_bytes());
        let mut it = slots.peekable();
        while let Some(start) = it.next() {
            let mut end = start;
            while it.peek() == Some(&(end + 1)) {
                end += 1;
                it.next();
            }
            put(&mut out, start, width);
            put(&mut out, end - start, width);
        }
        out
    }
}

fn header(kind: u8, width: u8, card: u32) -> Vec<u8> {
    let mut h = vec![VERSION, kind, width, 0];
    h.extend_from_slice(&card.to_le_bytes());
    h
}

/// A bitmap read in place from its bytes.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    kind: u8,
    width: usize,
    card: u32,
    body: &'a [u8],
}

impl<'a> View<'a> {
    /// Checks the header and the body length only (O(1)). Reads of a view whose body breaks the
    /// format's order invariants give wrong answers but never panic; use [`validate`] for
    /// untrusted bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<View<'a>, Error> {
        if bytes.len() < HEADER {
            return Err(Error::Truncated);
        }
        if bytes[0] != VERSION {
            return Err(Error::Version(bytes[0]));
        }
        let (kind, width) = (bytes[1], bytes[2] as usize);
        let card = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let body = &bytes[HEADER..];
        if bytes[3] != 0 {
            return Err(Error::Header);
        }
        if card > MAX_CARDINALITY {
            return Err(Error::Invariant("cardinality above the format's limit"));
        }
        match kind {
            KIND_BITS if width == 0 => {
                if (card == 0) != body.is_empty() {
                    return Err(Error::Length);
                }
            }
            KIND_ARRAY if (1..=4).contains(&width) => {
                if body.len() != card as usize * width {
                    return Err(Error::Length);
                }
            }
            KIND_RUNS if (1..=4).contains(&width) => {
                if body.len() < 4 {
                    return Err(Error::Length);
                }
                let r = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
                if body.len() - 4 != r.checked_mul(2 * width).ok_or(Error::Length)? {
                    return Err(Error::Length);
                }
            }
            _ => return Err(Error::Header),
        }
        Ok(View {
            kind,
            width,
            card,
            body,
        })
    }

    /// Members (from the header: O(1)).
    pub fn len(&self) -> u64 {
        u64::from(self.card)
    }

    /// No member.
    pub fn is_empty(&self) -> bool {
        self.card == 0
    }

    fn runs(&self) -> (usize, &'a [u8]) {
        let r = u32::from_le_bytes([self.body[0], self.body[1], self.body[2], self.body[3]]) as usize;
        (r, &self.body[4..])
    }

    /// Whether `slot` is a member, without allocating.
    pub fn contains(&self, slot: u32) -> bool {
        match self.kind {
            KIND_BITS => self
                .body
                .get(slot as usize / 8)
                .is_some_and(|b| b & (1 << (slot % 8)) != 0),
            KIND_ARRAY => {
                let (mut lo, mut hi) = (0usize, self.card as usize);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    let v = get(self.body, mid, self.width);
                    if v == slot {
                        return true;
                    }
                    if v < slot {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                false
            }
            _ => {
                let (r, pairs) = self.runs();
                let w = self.width;
                let (mut lo, mut hi) = (0usize, r);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    let start = get(pairs, 2 * mid, w);
                    let last = u64::from(start) + u64::from(get(pairs, 2 * mid + 1, w));
                    if u64::from(slot) < u64::from(start) {
                        hi = mid;
                    } else if u64::from(slot) > last {
                        lo = mid + 1;
                    } else {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// The largest member.
    pub fn max(&self) -> Option<u32> {
        if self.card == 0 {
            return None;
        }
        match self.kind {
            KIND_BITS => {
                let last = self.body.len() - 1;
                let b = self.body[last];
                (b != 0).then(|| (last * 8) as u32 + 7 - b.leading_zeros())
            }
            KIND_ARRAY => Some(get(self.body, self.card as usize - 1, self.width)),
            _ => {
                let (r, pairs) = self.runs();
                (r > 0).then(|| get(pairs, 2 * r - 2, self.width).saturating_add(get(pairs, 2 * r - 1, self.width)))
            }
        }
    }

    /// Members in ascending order, read from the bytes.
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        let v = *self;
        let bits = (v.kind == KIND_BITS).then(|| {
            v.body.iter().enumerate().flat_map(|(i, &b)| {
                (0..8u32)
                    .filter(move |k| b & (1 << k) != 0)
                    .map(move |k| i as u32 * 8 + k)
            })
        });
        let array = (v.kind == KIND_ARRAY).then(|| (0..v.card as usize).map(move |i| get(v.body, i, v.width)));
        let runs = (v.kind == KIND_RUNS).then(|| {
            let (r, pairs) = v.runs();
            (0..r).flat_map(move |i| {
                let start = get(pairs, 2 * i, v.width);
                let extra = get(pairs, 2 * i + 1, v.width);
                (0..=extra).map_while(move |k| start.checked_add(k))
            })
        });
        bits.into_iter()
            .flatten()
            .chain(array.into_iter().flatten())
            .chain(runs.into_iter().flatten())
    }
}

/// Checks every rule of the format without allocating; the [`View`] it returns is then exact.
pub fn validate(bytes: &[u8]) -> Result<View<'_>, Error> {
    let v = View::parse(bytes)?;
    match v.kind {
        KIND_BITS => {
            if v.body.last().is_some_and(|&b| b == 0) {
                return Err(Error::Invariant("trailing zero byte in bits"));
            }
            let ones: u64 = v.body.iter().map(|b| u64::from(b.count_ones())).sum();
            if ones != u64::from(v.card) {
                return Err(Error::Invariant("bit count differs from the cardinality"));
            }
        }
        KIND_ARRAY => {
            let mut prev = None;
            for i in 0..v.card as usize {
                let x = get(v.body, i, v.width);
                if prev.is_some_and(|p| p >= x) {
                    return Err(Error::Invariant("array values not strictly increasing"));
                }
                prev = Some(x);
            }
        }
        _ => {
            let (r, pairs) = v.runs();
            let mut total: u64 = 0;
            let mut prev_end: Option<u64> = None;
            for i in 0..r {
                let start = u64::from(get(pairs, 2 * i, v.width));
                let end = start + u64::from(get(pairs, 2 * i + 1, v.width));
                if end > u64::from(u32::MAX) {
                    return Err(Error::Invariant("run past the largest slot"));
                }
                if prev_end.is_some_and(|p| start <= p + 1) {
                    return Err(Error::Invariant("runs overlap, touch or are out of order"));
                }
                total += end - start + 1;
                prev_end = Some(end);
            }
            if total != u64::from(v.card) {
                return Err(Error::Invariant("run lengths differ from the cardinality"));
            }
        }
    }
    Ok(v)
}

/// The fuzz target's body (`fuzz/fuzz_targets/bytes.rs`), also run as a property test on
/// stable: any bytes are refused with an error or read back identically; nothing panics.
pub fn fuzz_bytes(bytes: &[u8]) {
    let Ok(view) = validate(bytes) else {
        return;
    };
    let n = view.len();
    assert_eq!(view.iter().count() as u64, n, "validated cardinality matches");
    let b = match crate::Bitmap::deserialize(bytes) {
        Ok(b) => b,
        Err(e) => panic!("validated bytes failed to deserialize: {e}"),
    };
    assert_eq!(b.len(), n);
    assert!(b.iter().eq(view.iter()));
    let again = b.serialize();
    let v2 = match validate(&again) {
        Ok(v) => v,
        Err(e) => panic!("our own output does not validate: {e}"),
    };
    assert!(v2.iter().eq(view.iter()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bitmap;

    #[test]
    fn picks_the_smallest_encoding() {
        let sparse: Bitmap = [3u32, 60_000].into_iter().collect();
        assert_eq!(sparse.serialize()[1], KIND_ARRAY);
        let run: Bitmap = (1000..1500u32).collect();
        assert_eq!(run.serialize()[1], KIND_RUNS);
        let dense: Bitmap = (0..200u32).filter(|s| s % 3 != 0).collect();
        assert_eq!(dense.serialize()[1], KIND_BITS);
        assert_eq!(Bitmap::new().serialize(), vec![1, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_malformed_bytes() {
        assert_eq!(validate(&[1, 0, 1]).unwrap_err(), Error::Truncated);
        assert_eq!(validate(&[9, 0, 1, 0, 0, 0, 0, 0]).unwrap_err(), Error::Version(9));
        assert_eq!(validate(&[1, 7, 1, 0, 0, 0, 0, 0]).unwrap_err(), Error::Header);
        assert_eq!(validate(&[1, 0, 5, 0, 0, 0, 0, 0]).unwrap_err(), Error::Header);
        // Array claiming 2 values with 1 byte of body.
        assert_eq!(validate(&[1, 0, 1, 0, 2, 0, 0, 0, 5]).unwrap_err(), Error::Length);
        // Unsorted array.
        assert!(matches!(
            validate(&[1, 0, 1, 0, 2, 0, 0, 0, 5, 4]),
            Err(Error::Invariant(_))
        ));
        // Bits with a wrong count and with a trailing zero.
        assert!(matches!(
            validate(&[1, 1, 0, 0, 2, 0, 0, 0, 1]),
            Err(Error::Invariant(_))
        ));
        assert!(matches!(
            validate(&[1, 1, 0, 0, 1, 0, 0, 0, 1, 0]),
            Err(Error::Invariant(_))
        ));
        // Runs: a huge run count must not overflow or allocate.
        assert_eq!(
            validate(&[1, 2, 4, 0, 0, 0, 0, 0, 255, 255, 255, 255]).unwrap_err(),
            Error::Length
        );
        // Touching runs.
        assert!(matches!(
            validate(&[1, 2, 1, 0, 4, 0, 0, 0, 2, 0, 0, 0, 0, 1, 2, 1]),
            Err(Error::Invariant(_))
        ));
    }
}
