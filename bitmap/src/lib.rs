//! Read-receipt bitmaps: which member slots of a group have read one message.
//!
//! Built for SAI-IM's workload, not as a general compressed bitmap: the universe is a group's
//! member slots (dense indexes from 0; groups of 2 to 100,000, usually under 2,000), each message
//! carries one bitmap stored as bytes, slots are set as members read, and the read path asks
//! "does slot s have it" and "how many" straight from the stored bytes.
//!
//! # Representations and thresholds
//! In memory ([`Bitmap`]):
//! - **bits** (`Vec<u64>`) whenever the largest slot is below [`SMALL_UNIVERSE`] (8,192: at most
//!   1 KiB), and for any set whose array would be larger than its bitset (more than one member
//!   in 32 of the range up to the largest slot): `insert` / `contains` are one word operation.
//! - **array** (sorted `Vec<u32>`) for sparse sets in large groups; a bitset that would have to
//!   grow past the array's size for a far slot turns back into an array. Either way memory stays
//!   within about 4 bytes per member or 1 bit per slot up to the largest, whichever is smaller.
//!
//! The cardinality is kept, so `len` is O(1).
//!
//! Serialized (see [`format`]), the smallest of three encodings is written: a sorted array with
//! 1- to 4-byte elements (width from the largest slot), a plain bitset, or runs of consecutive
//! slots. [`View`] answers `contains` (O(1) for bits, O(log n) for array and runs) and `len`
//! (O(1): the header carries the cardinality) on the bytes themselves, without allocating.
//! [`validate`] rejects any malformed input with an error and never allocates; [`Bitmap::
//! deserialize`] validates first and then allocates at most what the input length allows.
//!
//! Measured against `roaring` in `benches/vs_roaring.rs` (results and the command in
//! `README.md`).

pub mod format;

pub use format::{validate, Error, View};

/// Largest slot + 1 below which the in-memory form is always a bitset (1 KiB at most).
pub const SMALL_UNIVERSE: u32 = 8192;

/// An adaptive set of member slots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    repr: Repr,
    len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Repr {
    /// Sorted, distinct.
    Array(Vec<u32>),
    /// Bit `s` of word `s / 64`.
    Bits(Vec<u64>),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Array(Vec::new())
    }
}

impl Bitmap {
    /// An empty bitmap.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty bitmap sized for slots below `universe` (a group's member count).
    pub fn with_universe(universe: u32) -> Self {
        if universe <= SMALL_UNIVERSE {
            Self {
                repr: Repr::Bits(vec![0; universe.div_ceil(64) as usize]),
                len: 0,
            }
        } else {
            Self::new()
        }
    }

    /// Members in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No member.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `slot`; returns whether it was new.
    pub fn insert(&mut self, slot: u32) -> bool {
        let added = match &mut self.repr {
            Repr::Bits(words) => {
                let grows = (slot / 64) as usize >= words.len();
                if grows && slot >= SMALL_UNIVERSE && (self.len as usize + 1) * 32 <= slot as usize {
                    // A far slot in a sparse set: the bitset would outgrow the array.
                    let mut v: Vec<u32> = self.iter().collect();
                    v.push(slot);
                    self.repr = Repr::Array(v);
                    self.len += 1;
                    return true;
                }
                set_bit(words, slot)
            }
            Repr::Array(v) => match v.binary_search(&slot) {
                Ok(_) => false,
                Err(i) => {
                    let max = v.last().copied().unwrap_or(0).max(slot);
                    if max < SMALL_UNIVERSE || (v.len() + 1) * 32 > max as usize {
                        let mut words = to_words(v, slot);
                        set_bit(&mut words, slot);
                        self.repr = Repr::Bits(words);
                        self.len += 1;
                        return true;
                    }
                    v.insert(i, slot);
                    true
                }
            },
        };
        self.len += u64::from(added);
        added
    }

    /// Whether `slot` is in the set.
    pub fn contains(&self, slot: u32) -> bool {
        match &self.repr {
            Repr::Bits(words) => words
                .get((slot / 64) as usize)
                .is_some_and(|w| w & (1u64 << (slot % 64)) != 0),
            Repr::Array(v) => v.binary_search(&slot).is_ok(),
        }
    }

    /// Slots in ascending order.
    pub fn iter(&self) -> Iter<'_> {
        match &self.repr {
            Repr::Array(v) => Iter::Array(v.iter()),
            Repr::Bits(words) => Iter::Bits {
                words,
                i: 0,
                cur: words.first().copied().unwrap_or(0),
            },
        }
    }

    /// The slots below `universe` that are not in the set ("unread by whom").
    pub fn complement_within(&self, universe: u32) -> Bitmap {
        let mut out = Bitmap::with_universe(universe);
        let mut it = self.iter().peekable();
        for s in 0..universe {
            while it.peek().is_some_and(|&x| x < s) {
                it.next();
            }
            if it.peek() != Some(&s) {
                out.insert(s);
            }
        }
        out
    }

    /// Slots in either.
    pub fn union(&self, other: &Bitmap) -> Bitmap {
        match (&self.repr, &other.repr) {
            (Repr::Bits(a), Repr::Bits(b)) => {
                let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                let mut words = long.clone();
                for (w, x) in words.iter_mut().zip(short) {
                    *w |= x;
                }
                from_words(words)
            }
            _ => {
                let mut out = self.clone();
                for s in other.iter() {
                    out.insert(s);
                }
                out
            }
        }
    }

    /// Slots in both ("who has read all of these messages").
    pub fn intersection(&self, other: &Bitmap) -> Bitmap {
        match (&self.repr, &other.repr) {
            (Repr::Bits(a), Repr::Bits(b)) => from_words(a.iter().zip(b).map(|(x, y)| x & y).collect()),
            _ => {
                let (small, big) = if self.len <= other.len {
                    (self, other)
                } else {
                    (other, self)
                };
                let mut out = Bitmap::new();
                for s in small.iter().filter(|s| big.contains(*s)) {
                    out.insert(s);
                }
                out
            }
        }
    }

    /// The serialized bytes ([`format`]), in the smallest encoding.
    pub fn serialize(&self) -> Vec<u8> {
        format::encode(self.iter(), self.len, self.iter().last())
    }

    /// Parses serialized bytes, validating them completely first.
    pub fn deserialize(bytes: &[u8]) -> Result<Bitmap, Error> {
        let view = validate(bytes)?;
        let mut out = match view.max() {
            Some(m) if m < SMALL_UNIVERSE => Bitmap::with_universe(m + 1),
            _ => Bitmap::new(),
        };
        if let Repr::Array(v) = &mut out.repr {
            // Bounded by the input: validate checked the cardinality against the body length.
            v.reserve(view.len().min(bytes.len() as u64 * 8) as usize);
        }
        for s in view.iter() {
            out.insert(s);
        }
        Ok(out)
    }

    /// Checks the representation's invariants (tests call it after every operation).
    pub fn check_invariants(&self) -> Result<(), String> {
        match &self.repr {
            Repr::Array(v) => {
                if v.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("array not strictly increasing".into());
                }
                if v.len() as u64 != self.len {
                    return Err(format!("len {} but array holds {}", self.len, v.len()));
                }
            }
            Repr::Bits(words) => {
                let ones: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                if ones != self.len {
                    return Err(format!("len {} but bitset holds {ones}", self.len));
                }
            }
        }
        Ok(())
    }
}

fn set_bit(words: &mut Vec<u64>, slot: u32) -> bool {
    let i = (slot / 64) as usize;
    if i >= words.len() {
        words.resize(i + 1, 0);
    }
    let mask = 1u64 << (slot % 64);
    let new = words[i] & mask == 0;
    words[i] |= mask;
    new
}

fn to_words(v: &[u32], extra: u32) -> Vec<u64> {
    let max = v.last().copied().unwrap_or(0).max(extra);
    let mut words = vec![0u64; (max / 64 + 1) as usize];
    for &s in v {
        words[(s / 64) as usize] |= 1u64 << (s % 64);
    }
    words
}

fn from_words(words: Vec<u64>) -> Bitmap {
    let len = words.iter().map(|w| u64::from(w.count_ones())).sum();
    Bitmap {
        repr: Repr::Bits(words),
        len,
    }
}

/// Ascending slots of a [`Bitmap`].
#[derive(Clone)]
pub enum Iter<'a> {
    /// Over an array.
    Array(std::slice::Iter<'a, u32>),
    /// Over a bitset.
    Bits {
        /// The words.
        words: &'a [u64],
        /// Current word index.
        i: usize,
        /// Bits of the current word not yet returned.
        cur: u64,
    },
}

impl Iterator for Iter<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        match self {
            Iter::Array(it) => it.next().copied(),
            Iter::Bits { words, i, cur } => loop {
                if *cur != 0 {
                    let b = cur.trailing_zeros();
                    *cur &= *cur - 1;
                    return Some(*i as u32 * 64 + b);
                }
                *i += 1;
                *cur = *words.get(*i)?;
            },
        }
    }
}

impl FromIterator<u32> for Bitmap {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut b = Bitmap::new();
        for s in iter {
            b.insert(s);
        }
        b
    }
}
