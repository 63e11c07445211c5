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
/// Largest cardinality a reader accepts (1,048,576 slots: ten times the largest group anyone
/// runs, and the server refuses a `group.max_members` above it), so that a few bytes of runs can
/// never make a reader iterate or allocate much: a 24-byte run bitmap of this many far slots
/// decodes to a 4 MiB array. (It was 2^24 until the fuzz target found such 20-byte inputs whose
/// 64 MiB decode, copies and re-encode took over a second; no bitmap above 2^20 was ever written,
/// since cardinality is bounded by a group's members.)
pub const MAX_CARDINALITY: u32 = 1 << 20;
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

/// Calls `$f::<W>($args)` for the body's value width `W` (1..=4).
macro_rules! by_width {
    ($width:expr, $f:ident($($arg:expr),*)) => {
        match $width {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            _ => $f::<4>($($arg),*),
        }
    };
}

/// Value `i` of a body of `width`-byte little-endian values (callers keep `i` in range).
#[inline]
fn get(b: &[u8], i: usize, width: usize) -> u32 {
    by_width!(width, load(b, i))
}

/// Value `i` of a body of `W`-byte little-endian values.
#[inline(always)]
fn load<const W: usize>(b: &[u8], i: usize) -> u32 {
    let mut x = [0u8; 4];
    x[..W].copy_from_slice(&b[i * W..i * W + W]);
    u32::from_le_bytes(x)
}

/// The words of a bitset body (8 bytes each, little endian; the last one zero padded).
#[inline]
fn body_words(body: &[u8]) -> impl Iterator<Item = u64> + '_ {
    let chunks = body.chunks_exact(8);
    let tail = chunks.remainder();
    // Byte by byte: a `memcpy` call costs more than the few bytes of a small bitmap.
    let last = (!tail.is_empty()).then(|| {
        tail.iter()
            .enumerate()
            .fold(0u64, |w, (k, &b)| w | u64::from(b) << (8 * k))
    });
    chunks
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .chain(last)
}

/// Word `i` of a bitset body, zero past the end.
#[inline]
fn body_word(body: &[u8], i: usize) -> u64 {
    match body.get(i * 8..i * 8 + 8) {
        Some(c) => u64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
        None => body_words(body.get(i * 8..).unwrap_or_default()).next().unwrap_or(0),
    }
}

/// Appends `values` as `W`-byte little-endian values.
fn put_all<const W: usize>(out: &mut Vec<u8>, values: impl Iterator<Item = u32>) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes()[..W]);
    }
}

/// Appends `(start, last)` runs as `(start, last - start)` pairs of `W`-byte values.
fn put_runs<const W: usize>(out: &mut Vec<u8>, runs: impl Iterator<Item = (u32, u32)>) {
    put_all::<W>(out, runs.flat_map(|(start, last)| [start, last - start]));
}

/// The runs `(start, last)` of set bits in `words`, ascending, found a word at a time.
fn word_runs(words: &[u64]) -> impl Iterator<Item = (u32, u32)> + '_ {
    let end = words.len() * 64;
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        // Next set bit at or after `pos`, then the next clear bit after it (`end` if none).
        let next = |pos: usize, want_set: bool| -> usize {
            let flip = |w: u64| if want_set { w } else { !w };
            let mut i = pos / 64;
            let Some(&first) = words.get(i) else {
                return end;
            };
            let mut w = flip(first) & (u64::MAX << (pos % 64));
            while w == 0 {
                i += 1;
                match words.get(i) {
                    Some(&x) => w = flip(x),
                    None => return end,
                }
            }
            i * 64 + w.trailing_zeros() as usize
        };
        let start = next(pos, true);
        if start >= end {
            return None;
        }
        pos = next(start, false);
        Some((start as u32, (pos - 1) as u32))
    })
}

/// The runs of set bits in a stream of words (bit `s % 64` of word `s / 64`), counted until
/// past `limit`: a run starts at every set bit whose lower neighbour is clear.
fn count_word_runs(words: impl Iterator<Item = u64>, limit: usize) -> usize {
    let (mut runs, mut carry) = (0usize, 0u64);
    for w in words {
        runs += (w & !((w << 1) | carry)).count_ones() as usize;
        carry = w >> 63;
        if runs > limit {
            break;
        }
    }
    runs
}

/// Encodes the set bits of `words` (`len` of them).
pub(crate) fn encode_words(words: &[u64], len: u64) -> Vec<u8> {
    let Some(last) = words.iter().rposition(|&w| w != 0) else {
        return header(KIND_BITS, 0, 0, 0);
    };
    let words = &words[..=last];
    let max = last as u32 * 64 + 63 - words[last].leading_zeros();
    // Runs are counted only until they can no longer be the smallest body.
    let card = len as u32;
    let width = width_for(max) as usize;
    let others = (max as usize / 8 + 1).min(card as usize * width);
    let runs = count_word_runs(words.iter().copied(), runs_limit(others, width));
    let (kind, width, body_len) = choose(card, max, runs);
    let mut out = header(kind, width, card, body_len);
    match kind {
        KIND_BITS => {
            out.resize(HEADER + last * 8, 0);
            for (c, w) in out[HEADER..].chunks_exact_mut(8).zip(words) {
                c.copy_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&words[last].to_le_bytes()[..body_len - last * 8]);
        }
        KIND_ARRAY => by_width!(width, put_all(&mut out, crate::Iter::bits(words))),
        _ => {
            out.extend_from_slice(&(runs as u32).to_le_bytes());
            by_width!(width, put_runs(&mut out, word_runs(words)));
        }
    }
    out
}

/// Encodes ascending distinct slots.
pub(crate) fn encode_sorted(slots: &[u32]) -> Vec<u8> {
    let Some(&max) = slots.last() else {
        return header(KIND_BITS, 0, 0, 0);
    };
    let runs = 1 + slots.windows(2).filter(|w| w[1] != w[0] + 1).count();
    let card = slots.len() as u32;
    let (kind, width, body_len) = choose(card, max, runs);
    let mut out = header(kind, width, card, body_len);
    match kind {
        KIND_BITS => {
            out.resize(HEADER + body_len, 0);
            for &s in slots {
                out[HEADER + s as usize / 8] |= 1 << (s % 8);
            }
        }
        KIND_ARRAY => by_width!(width, put_all(&mut out, slots.iter().copied())),
        _ => {
            out.extend_from_slice(&(runs as u32).to_le_bytes());
            let mut i = 0;
            let runs = std::iter::from_fn(|| {
                let start = *slots.get(i)?;
                let mut last = start;
                i += 1;
                while slots.get(i).is_some_and(|&s| s == last + 1) {
                    last += 1;
                    i += 1;
                }
                Some((start, last))
            });
            by_width!(width, put_runs(&mut out, runs));
        }
    }
    out
}

/// The smallest body for `card` slots up to `max` forming `runs` runs: its kind, value width
/// and length. Ties go to bits, then array.
fn choose(card: u32, max: u32, runs: usize) -> (u8, u8, usize) {
    let width = width_for(max);
    let bits_len = max as usize / 8 + 1;
    let array_len = card as usize * width as usize;
    let runs_len = 4 + runs * 2 * width as usize;
    if bits_len <= array_len && bits_len <= runs_len {
        (KIND_BITS, 0, bits_len)
    } else if array_len <= runs_len {
        (KIND_ARRAY, width, array_len)
    } else {
        (KIND_RUNS, width, runs_len)
    }
}

/// A run count above which runs of `width`-byte values take more room than `others` bytes.
#[inline]
fn runs_limit(others: usize, width: usize) -> usize {
    // Constant divisors: a `div` costs as much as the rest of a small insert.
    let x = others.saturating_sub(4);
    1 + match width {
        1 => x / 2,
        2 => x / 4,
        3 => x / 6,
        _ => x / 8,
    }
}

/// A header, in a buffer with room for a body of `body_len` bytes.
fn header(kind: u8, width: u8, card: u32, body_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER + body_len);
    h.extend_from_slice(&[VERSION, kind, width, 0]);
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
    #[inline]
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
    #[inline]
    pub fn len(&self) -> u64 {
        u64::from(self.card)
    }

    /// No member.
    pub fn is_empty(&self) -> bool {
        self.card == 0
    }

    #[inline]
    fn runs(&self) -> (usize, &'a [u8]) {
        let r = u32::from_le_bytes([self.body[0], self.body[1], self.body[2], self.body[3]]) as usize;
        (r, &self.body[4..])
    }

    /// Whether `slot` is a member, without allocating.
    #[inline]
    pub fn contains(&self, slot: u32) -> bool {
        match self.kind {
            KIND_BITS => self
                .body
                .get(slot as usize / 8)
                .is_some_and(|b| b & (1 << (slot % 8)) != 0),
            KIND_ARRAY => by_width!(self.width, search_array(self.body, self.card as usize, slot)),
            _ => {
                let (r, pairs) = self.runs();
                by_width!(self.width, search_runs(pairs, r, slot))
            }
        }
    }

    /// Sets the members' bits in `words` (bit `s % 64` of word `s / 64`); members past the end
    /// of `words` are skipped.
    pub(crate) fn fill_words(&self, words: &mut [u64]) {
        match self.kind {
            KIND_BITS => {
                for (w, x) in words.iter_mut().zip(body_words(self.body)) {
                    *w = x;
                }
            }
            KIND_ARRAY => {
                for s in self.array_values() {
                    if let Some(w) = words.get_mut((s / 64) as usize) {
                        *w |= 1 << (s % 64);
                    }
                }
            }
            _ => {
                let (r, pairs) = self.runs();
                by_width!(self.width, fill_runs(pairs, r, words));
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

    /// The values of an array body (empty for other kinds).
    pub(crate) fn array_values(&self) -> impl Iterator<Item = u32> + 'a {
        let (body, width) = (self.body, self.width);
        let n = if self.kind == KIND_ARRAY { self.card as usize } else { 0 };
        (0..n).map(move |i| get(body, i, width))
    }

    /// The bytes of this bitmap with `slot` added: exactly what [`crate::Bitmap::deserialize`],
    /// `insert` and `serialize` would give, but when the encoding keeps its kind and width (the
    /// common case) the body is copied with one value spliced in rather than decoded and
    /// re-encoded. This is the read-receipt write path. On a view from [`View::parse`] whose
    /// body breaks the format's invariants, the result is unspecified but it never panics.
    pub fn inserted(&self, slot: u32) -> Vec<u8> {
        let present = self.contains(slot);
        let card = self.card.saturating_add(u32::from(!present));
        let max = self.max().map_or(slot, |m| m.max(slot));
        let left = slot > 0 && self.contains(slot - 1);
        let right = slot < u32::MAX && self.contains(slot + 1);
        let width = width_for(max) as usize;
        let others = (max as usize / 8 + 1).min(card as usize * width);
        // Runs only need counting up to the point where they can no longer be the smallest body
        // (one more than that, as the new slot may join two runs into one).
        let old_runs = self.count_runs(runs_limit(others, width) + 1);
        let runs = if present {
            old_runs
        } else {
            (old_runs + 1).saturating_sub(usize::from(left) + usize::from(right))
        };
        let (kind, width, body_len) = choose(card, max, runs);
        if present && kind == self.kind && width as usize == self.width {
            // Already a member, and already in the encoding the writer picks: the same bytes.
            let mut out = header(self.kind, self.width as u8, self.card, self.body.len());
            out.extend_from_slice(self.body);
            return out;
        }
        // Bytes another writer encoded otherwise (valid, but not the smallest body; found by
        // fuzzing) are re-encoded, so that the result never depends on how the input was written.
        if present || kind != self.kind || width as usize != self.width {
            let mut b = crate::Bitmap::from_view(self);
            b.insert(slot);
            return b.serialize();
        }
        let mut out = header(kind, width, card, body_len);
        match kind {
            KIND_BITS => {
                out.extend_from_slice(self.body);
                out.resize(HEADER + body_len, 0);
                out[HEADER + slot as usize / 8] |= 1 << (slot % 8);
            }
            KIND_ARRAY => {
                let at = by_width!(self.width, rank_array(self.body, self.card as usize, slot)) * self.width;
                out.extend_from_slice(&self.body[..at]);
                out.extend_from_slice(&slot.to_le_bytes()[..self.width]);
                out.extend_from_slice(&self.body[at..]);
            }
            _ => {
                let (r, pairs) = self.runs();
                let w = self.width;
                let pair = |k: usize| {
                    if k < r {
                        (get(pairs, 2 * k, w), get(pairs, 2 * k + 1, w))
                    } else {
                        (0, 0)
                    }
                };
                // The run that starts at or below `slot`, and the one after it.
                let below = by_width!(w, last_at_most(pairs, r, 2, slot));
                let after = below.map_or(0, |i| i + 1);
                // Runs `from..to` give way to `(start, extra)`.
                let (from, to, (start, extra)) = match (left, right, below) {
                    (true, true, Some(i)) => {
                        let ((start, _), (s2, e2)) = (pair(i), pair(i + 1));
                        (i, i + 2, (start, s2.wrapping_add(e2).wrapping_sub(start)))
                    }
                    (true, _, Some(i)) => (i, i + 1, (pair(i).0, pair(i).1.wrapping_add(1))),
                    (_, true, _) => (after, after + 1, (slot, pair(after).1.wrapping_add(1))),
                    _ => (after, after, (slot, 0)),
                };
                out.extend_from_slice(&(runs as u32).to_le_bytes());
                out.extend_from_slice(&pairs[..(from * 2 * w).min(pairs.len())]);
                out.extend_from_slice(&start.to_le_bytes()[..w]);
                out.extend_from_slice(&extra.to_le_bytes()[..w]);
                out.extend_from_slice(&pairs[(to * 2 * w).min(pairs.len())..]);
            }
        }
        out
    }

    /// The number of runs of consecutive members, counted until it passes `limit`.
    fn count_runs(&self, limit: usize) -> usize {
        match self.kind {
            KIND_BITS => count_word_runs(body_words(self.body), limit),
            KIND_ARRAY => by_width!(self.width, count_array_runs(self.body, limit)),
            _ => self.runs().0,
        }
    }

    /// Appends the members to `out`, in ascending order.
    pub(crate) fn extend_into(&self, out: &mut Vec<u32>) {
        if self.kind == KIND_ARRAY {
            by_width!(self.width, extend_array(self.body, out));
        } else {
            out.extend(self.iter());
        }
    }

    /// Members in ascending order, read from the bytes.
    pub fn iter(&self) -> ViewIter<'a> {
        let state = match self.kind {
            KIND_BITS => IterState::Bits {
                next: 0,
                base: 0,
                cur: 0,
            },
            KIND_ARRAY => IterState::Array { i: 0 },
            _ => IterState::Runs { i: 0, next: 1, last: 0 },
        };
        ViewIter { view: *self, state }
    }
}

/// The index of the last of `n` ascending `W`-byte values at or below `slot`, the values being
/// every `stride`-th of `body` (1: an array body; 2: the run starts of a runs body). Branch-light:
/// the loop runs log2(n) times whatever the values.
#[inline(always)]
fn last_at_most<const W: usize>(body: &[u8], n: usize, stride: usize, slot: u32) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let (mut base, mut size) = (0usize, n);
    while size > 1 {
        let half = size / 2;
        if load::<W>(body, stride * (base + half)) <= slot {
            base += half;
        }
        size -= half;
    }
    (load::<W>(body, stride * base) <= slot).then_some(base)
}

/// Whether `slot` is one of `n` ascending `W`-byte values.
fn search_array<const W: usize>(body: &[u8], n: usize, slot: u32) -> bool {
    last_at_most::<W>(body, n, 1, slot).is_some_and(|i| load::<W>(body, i) == slot)
}

/// Whether `slot` lies in one of `r` runs of `W`-byte `(start, length - 1)` pairs.
fn search_runs<const W: usize>(pairs: &[u8], r: usize, slot: u32) -> bool {
    last_at_most::<W>(pairs, r, 2, slot).is_some_and(|i| slot - load::<W>(pairs, 2 * i) <= load::<W>(pairs, 2 * i + 1))
}

/// How many of `n` ascending `W`-byte values are below `slot`.
fn rank_array<const W: usize>(body: &[u8], n: usize, slot: u32) -> usize {
    slot.checked_sub(1)
        .and_then(|s| last_at_most::<W>(body, n, 1, s))
        .map_or(0, |i| i + 1)
}

/// Sets the bits of `r` runs of `W`-byte pairs (clamped to `words`).
fn fill_runs<const W: usize>(pairs: &[u8], r: usize, words: &mut [u64]) {
    let cap = words.len() * 64;
    for i in 0..r {
        let start = load::<W>(pairs, 2 * i) as usize;
        if start < cap {
            let last = (start + load::<W>(pairs, 2 * i + 1) as usize).min(cap - 1);
            set_range(words, start, last);
        }
    }
}

/// Sets bits `start..=last` (`start <= last < words.len() * 64`).
fn set_range(words: &mut [u64], start: usize, last: usize) {
    let (a, b) = (start / 64, last / 64);
    let lo = u64::MAX << (start % 64);
    let hi = u64::MAX >> (63 - last % 64);
    if a == b {
        words[a] |= lo & hi;
    } else {
        words[a] |= lo;
        words[a + 1..b].fill(u64::MAX);
        words[b] |= hi;
    }
}

/// Ascending members of a [`View`], read from its bytes.
#[derive(Debug, Clone)]
pub struct ViewIter<'a> {
    view: View<'a>,
    state: IterState,
}

#[derive(Debug, Clone)]
enum IterState {
    /// `cur`: bits of the word for slots `base..base + 64` not yet returned; `next`: the
    /// following word's index.
    Bits {
        next: usize,
        base: u32,
        cur: u64,
    },
    Array {
        i: usize,
    },
    /// Run `i` is the next to load; `next..=last` remain of the current one.
    Runs {
        i: usize,
        next: u64,
        last: u64,
    },
}

impl Iterator for ViewIter<'_> {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        let v = &self.view;
        match &mut self.state {
            IterState::Bits { next, base, cur } => loop {
                if *cur != 0 {
                    let b = cur.trailing_zeros();
                    *cur &= *cur - 1;
                    return Some(*base + b);
                }
                if *next * 8 >= v.body.len() {
                    return None;
                }
                *cur = body_word(v.body, *next);
                *base = (*next as u32).wrapping_mul(64);
                *next += 1;
            },
            IterState::Array { i } => {
                if *i >= v.card as usize {
                    return None;
                }
                *i += 1;
                Some(get(v.body, *i - 1, v.width))
            }
            IterState::Runs { i, next, last } => {
                if *next > *last {
                    let (r, pairs) = v.runs();
                    if *i >= r {
                        return None;
                    }
                    *next = u64::from(get(pairs, 2 * *i, v.width));
                    *last = (*next + u64::from(get(pairs, 2 * *i + 1, v.width))).min(u64::from(u32::MAX));
                    *i += 1;
                }
                *next += 1;
                Some((*next - 1) as u32)
            }
        }
    }
}

/// Runs of consecutive values in an ascending `W`-byte body, counted until past `limit`.
fn count_array_runs<const W: usize>(body: &[u8], limit: usize) -> usize {
    let n = body.len() / W;
    let mut runs = usize::from(n > 0);
    for i in 1..n {
        runs += usize::from(load::<W>(body, i - 1).wrapping_add(1) != load::<W>(body, i));
        if runs > limit {
            break;
        }
    }
    runs
}

/// Appends a body of `W`-byte values to `out`.
fn extend_array<const W: usize>(body: &[u8], out: &mut Vec<u32>) {
    out.extend(body.chunks_exact(W).map(|c| {
        let mut x = [0u8; 4];
        x[..W].copy_from_slice(c);
        u32::from_le_bytes(x)
    }));
}

/// Whether a body of `W`-byte values is strictly increasing.
fn increasing<const W: usize>(body: &[u8]) -> bool {
    let n = body.len() / W;
    (1..n).all(|i| load::<W>(body, i - 1) < load::<W>(body, i))
}

/// The members of `r` runs of `W`-byte pairs, checking that they ascend without touching.
fn runs_total<const W: usize>(pairs: &[u8], r: usize) -> Result<u64, Error> {
    let mut total: u64 = 0;
    let mut prev_end: Option<u64> = None;
    for i in 0..r {
        let start = u64::from(load::<W>(pairs, 2 * i));
        let end = start + u64::from(load::<W>(pairs, 2 * i + 1));
        if end > u64::from(u32::MAX) {
            return Err(Error::Invariant("run past the largest slot"));
        }
        if prev_end.is_some_and(|p| start <= p + 1) {
            return Err(Error::Invariant("runs overlap, touch or are out of order"));
        }
        total += end - start + 1;
        prev_end = Some(end);
    }
    Ok(total)
}

/// Checks every rule of the format without allocating; the [`View`] it returns is then exact.
pub fn validate(bytes: &[u8]) -> Result<View<'_>, Error> {
    let v = View::parse(bytes)?;
    match v.kind {
        KIND_BITS => {
            if v.body.last().is_some_and(|&b| b == 0) {
                return Err(Error::Invariant("trailing zero byte in bits"));
            }
            let ones: u64 = body_words(v.body).map(|w| u64::from(w.count_ones())).sum();
            if ones != u64::from(v.card) {
                return Err(Error::Invariant("bit count differs from the cardinality"));
            }
        }
        KIND_ARRAY => {
            if !by_width!(v.width, increasing(v.body)) {
                return Err(Error::Invariant("array values not strictly increasing"));
            }
        }
        _ => {
            let (r, pairs) = v.runs();
            if by_width!(v.width, runs_total(pairs, r))? != u64::from(v.card) {
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
    assert_eq!(v2.len(), n);
    assert!(v2.iter().eq(view.iter()));
    // Adding a member on the bytes equals decode, insert, encode.
    for slot in [
        0,
        n as u32,
        view.max().unwrap_or(0).wrapping_add(1),
        u32::from(bytes[0]) * 31,
    ] {
        let mut want = b.clone();
        want.insert(slot);
        assert_eq!(view.inserted(slot), want.serialize(), "insert {slot} on the bytes");
    }
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
    fn inserting_a_member_into_bytes_written_otherwise_gives_the_canonical_bytes() {
        // Slots 0..=135 as runs of width 2 (width 1 suffices): valid, not what we write.
        let wide = [1, KIND_RUNS, 2, 0, 136, 0, 0, 0, 1, 0, 0, 0, 0, 0, 135, 0];
        let view = validate(&wide).unwrap();
        let canonical: Bitmap = (0..=135u32).collect();
        assert_eq!(view.inserted(0), canonical.serialize());
        assert_eq!(view.inserted(135), canonical.serialize());
        fuzz_bytes(&wide);
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

    /// One run of `len` slots from `start`, as 20 bytes.
    fn one_run(start: u32, len: u32) -> Vec<u8> {
        let mut b = vec![VERSION, KIND_RUNS, 4, 0];
        for v in [len, 1, start, len - 1] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn the_largest_readable_bitmaps_read_back_whole() {
        // The most members a reader accepts, dense (decoded as a bitset) and far apart from the
        // slots below them (decoded as a 4 MiB array): what the fuzz target found at 2^24.
        for start in [3, 0x5d01_2a1c] {
            let bytes = one_run(start, MAX_CARDINALITY);
            let b = crate::Bitmap::deserialize(&bytes).unwrap();
            assert_eq!(b.len(), u64::from(MAX_CARDINALITY));
            assert_eq!(b.max(), Some(start + MAX_CARDINALITY - 1));
            assert_eq!(crate::Bitmap::deserialize(&b.serialize()).unwrap(), b);
            fuzz_bytes(&bytes);
        }
        assert_eq!(
            validate(&one_run(3, MAX_CARDINALITY + 1)).unwrap_err(),
            Error::Invariant("cardinality above the format's limit")
        );
    }
}
