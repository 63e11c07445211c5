//! Read-receipt bitmaps: which member slots of a group have read one message.
//!
//! Built for SAI-IM's workload, not as a general compressed bitmap: the universe is a group's
//! member slots (dense indexes from 0; groups of 2 to 100,000, usually under 2,000), each message
//! carries one bitmap stored as bytes, slots are set as members read, and the read path asks
//! "does slot s have it" and "how many" straight from the stored bytes.
//!
//! # Representations and thresholds
//! In memory ([`Bitmap`]):
//! - **inline** (`[u64; 4]`, inside the value, no allocation) while every slot is below
//!   [`INLINE_SLOTS`] (256): groups of up to 256 members never touch the allocator.
//! - **bits** (`Vec<u64>`): sized up front by [`Bitmap::with_universe`] for groups of up to
//!   [`MAX_BITS_UNIVERSE`] members (16 KiB at most; every group size the system allows); grown
//!   on demand while the largest slot is below [`SMALL_UNIVERSE`] (1 KiB at most), or while the
//!   set is dense (more than one member in 32 of the range up to its largest slot).
//! - **array** (sorted `Vec<u32>`) for sparse sets of far slots built without a universe; a
//!   bitset that a far slot would grow past the array's size turns back into an array.
//!
//! `insert` / `contains` are one word operation on inline and bits, a binary search on an array.
//! The cardinality is kept, so `len` is O(1).
//!
//! Serialized (see [`format`](mod@format)), the smallest of three encodings is written: a sorted array with
//! 1- to 4-byte elements (width from the largest slot), a plain bitset, or runs of consecutive
//! slots. [`View`] answers `contains` (O(1) for bits, O(log n) for array and runs) and `len`
//! (O(1): the header carries the cardinality) on the bytes themselves, without allocating.
//! [`validate`] rejects any malformed input with an error and never allocates; [`Bitmap::
//! deserialize`] validates first and then allocates in proportion to the cardinality, which the
//! format caps at 2^20 (at most 4 MiB, whatever the input length).
//!
//! Measured against `roaring` in `benches/vs_roaring.rs` (results and the command in
//! `README.md`).

pub mod format;

pub use format::{validate, Error, View, ViewIter};

/// Slots held inline, without allocating (4 words).
pub const INLINE_SLOTS: u32 = 256;
const INLINE_WORDS: usize = (INLINE_SLOTS / 64) as usize;
/// Largest slot + 1 below which a bitmap built without a universe stays a bitset (1 KiB).
pub const SMALL_UNIVERSE: u32 = 8192;
/// Largest universe [`Bitmap::with_universe`] allocates a bitset for (16 KiB).
pub const MAX_BITS_UNIVERSE: u32 = 1 << 17;

/// An adaptive set of member slots.
#[derive(Debug, Clone, Default)]
pub struct Bitmap {
    repr: Repr,
    len: u64,
}

#[derive(Debug, Clone)]
enum Repr {
    /// Slots below [`INLINE_SLOTS`]: bit `s % 64` of word `s / 64`.
    Inline([u64; INLINE_WORDS]),
    /// Bit `s % 64` of word `s / 64`.
    Bits(Vec<u64>),
    /// Sorted, distinct.
    Array(Vec<u32>),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Inline([0; INLINE_WORDS])
    }
}

impl PartialEq for Bitmap {
    /// Same members, whatever the representation.
    fn eq(&self, other: &Bitmap) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for Bitmap {}

impl Bitmap {
    /// An empty bitmap (inline: no allocation until a slot past 255 is set).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty bitmap sized for slots below `universe` (a group's member count): inline up to
    /// 256, a bitset allocated once up to [`MAX_BITS_UNIVERSE`]. Slots past `universe` are still
    /// accepted.
    pub fn with_universe(universe: u32) -> Self {
        if universe > INLINE_SLOTS && universe <= MAX_BITS_UNIVERSE {
            Self {
                repr: Repr::Bits(vec![0; universe.div_ceil(64) as usize]),
                len: 0,
            }
        } else {
            Self::new()
        }
    }

    /// Members in the set.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No member.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bitset words, for the inline and bits representations.
    #[inline]
    fn words(&self) -> Option<&[u64]> {
        match &self.repr {
            Repr::Inline(w) => Some(w),
            Repr::Bits(w) => Some(w),
            Repr::Array(_) => None,
        }
    }

    /// Adds `slot`; returns whether it was new.
    #[inline]
    pub fn insert(&mut self, slot: u32) -> bool {
        let words: &mut [u64] = match &mut self.repr {
            Repr::Inline(w) => w,
            Repr::Bits(w) => w,
            Repr::Array(_) => return self.insert_slow(slot),
        };
        let Some(w) = words.get_mut((slot / 64) as usize) else {
            return self.insert_slow(slot);
        };
        let mask = 1u64 << (slot % 64);
        let added = *w & mask == 0;
        *w |= mask;
        self.len += u64::from(added);
        added
    }

    /// `insert` into an array, or past the end of the bitset words.
    #[cold]
    #[inline(never)]
    fn insert_slow(&mut self, slot: u32) -> bool {
        if let Repr::Array(v) = &mut self.repr {
            let Err(i) = v.binary_search(&slot) else {
                return false;
            };
            let max = v.last().copied().unwrap_or(0).max(slot);
            if max < SMALL_UNIVERSE || (v.len() + 1) * 32 > max as usize {
                let mut words = vec![0u64; (max / 64 + 1) as usize];
                v.iter().chain([&slot]).for_each(|&s| set_bit(&mut words, s));
                self.repr = Repr::Bits(words);
            } else {
                v.insert(i, slot);
            }
            self.len += 1;
            return true;
        }
        // Inline or bits, and the slot lies past the last word: it is new.
        if slot >= SMALL_UNIVERSE && (self.len as usize + 1) * 32 <= slot as usize {
            // A far slot in a sparse set: the bitset would outgrow the array.
            let mut v: Vec<u32> = Vec::with_capacity(self.len as usize + 1);
            v.extend(self.iter());
            v.push(slot);
            self.repr = Repr::Array(v);
        } else {
            let mut words = match std::mem::take(&mut self.repr) {
                Repr::Inline(w) => w.to_vec(),
                Repr::Bits(w) => w,
                Repr::Array(_) => Vec::new(),
            };
            words.resize((slot / 64 + 1) as usize, 0);
            set_bit(&mut words, slot);
            self.repr = Repr::Bits(words);
        }
        self.len += 1;
        true
    }

    /// Whether `slot` is in the set.
    #[inline]
    pub fn contains(&self, slot: u32) -> bool {
        let words: &[u64] = match &self.repr {
            Repr::Inline(w) => w,
            Repr::Bits(w) => w,
            Repr::Array(v) => return v.binary_search(&slot).is_ok(),
        };
        match words.get((slot / 64) as usize) {
            Some(w) => (w >> (slot % 64)) & 1 != 0,
            None => false,
        }
    }

    /// The largest member.
    pub fn max(&self) -> Option<u32> {
        match self.words() {
            Some(words) => {
                let i = words.iter().rposition(|&w| w != 0)?;
                Some(i as u32 * 64 + 63 - words[i].leading_zeros())
            }
            None => match &self.repr {
                Repr::Array(v) => v.last().copied(),
                _ => None,
            },
        }
    }

    /// Slots in ascending order.
    #[inline]
    pub fn iter(&self) -> Iter<'_> {
        match &self.repr {
            Repr::Array(v) => Iter::Array(v.iter()),
            Repr::Inline(w) => Iter::bits(w),
            Repr::Bits(w) => Iter::bits(w),
        }
    }

    /// The slots below `universe` that are not in the set ("unread by whom").
    pub fn complement_within(&self, universe: u32) -> Bitmap {
        let n = universe.div_ceil(64) as usize;
        let mut words = vec![u64::MAX; n];
        if !universe.is_multiple_of(64) {
            words[n - 1] = (1u64 << (universe % 64)) - 1;
        }
        match self.words() {
            Some(mine) => words.iter_mut().zip(mine).for_each(|(w, m)| *w &= !m),
            None => {
                for s in self.iter().take_while(|&s| s < universe) {
                    words[(s / 64) as usize] &= !(1u64 << (s % 64));
                }
            }
        }
        from_words(words)
    }

    /// Slots in either.
    pub fn union(&self, other: &Bitmap) -> Bitmap {
        match (self.words(), other.words()) {
            (Some(a), Some(b)) => {
                let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                let mut words = long.to_vec();
                words.iter_mut().zip(short).for_each(|(w, x)| *w |= x);
                from_words(words)
            }
            _ => {
                let (mut out, add) = if self.len >= other.len {
                    (self.clone(), other)
                } else {
                    (other.clone(), self)
                };
                for s in add.iter() {
                    out.insert(s);
                }
                out
            }
        }
    }

    /// Slots in both ("who has read all of these messages").
    pub fn intersection(&self, other: &Bitmap) -> Bitmap {
        match (self.words(), other.words()) {
            (Some(a), Some(b)) => from_words(a.iter().zip(b).map(|(x, y)| x & y).collect()),
            _ => {
                let (small, big) = if self.len <= other.len {
                    (self, other)
                } else {
                    (other, self)
                };
                small.iter().filter(|&s| big.contains(s)).collect()
            }
        }
    }

    /// The serialized bytes ([`format`](mod@format)), in the smallest encoding.
    pub fn serialize(&self) -> Vec<u8> {
        match &self.repr {
            Repr::Array(v) => format::encode_sorted(v),
            Repr::Inline(w) => format::encode_words(w, self.len),
            Repr::Bits(w) => format::encode_words(w, self.len),
        }
    }

    /// Parses serialized bytes, validating them completely first.
    pub fn deserialize(bytes: &[u8]) -> Result<Bitmap, Error> {
        validate(bytes).map(|v| Bitmap::from_view(&v))
    }

    /// The members of a view, in the representation [`Bitmap::insert`] would have reached.
    /// The allocation is bounded by the cardinality, which [`validate`] caps at 2^20: 4 bytes
    /// per member for an array, and a bitset only when it holds at least one member in 32
    /// slots (or is at most 1 KiB), so at most 4 MiB either way.
    pub(crate) fn from_view(view: &View<'_>) -> Bitmap {
        let Some(max) = view.max() else {
            return Bitmap::new();
        };
        let len = view.len();
        if max < INLINE_SLOTS {
            let mut w = [0; INLINE_WORDS];
            view.fill_words(&mut w);
            return Bitmap {
                repr: Repr::Inline(w),
                len,
            };
        }
        if max < SMALL_UNIVERSE || len * 32 > u64::from(max) {
            let mut words = vec![0; (max / 64 + 1) as usize];
            view.fill_words(&mut words);
            return Bitmap {
                repr: Repr::Bits(words),
                len,
            };
        }
        let mut v = Vec::with_capacity(len as usize);
        view.extend_into(&mut v);
        Bitmap {
            repr: Repr::Array(v),
            len,
        }
    }

    /// Checks the representation's invariants (tests call it after every operation).
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(words) = self.words() {
            let ones: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            if ones != self.len {
                return Err(format!("len {} but bitset holds {ones}", self.len));
            }
        } else if let Repr::Array(v) = &self.repr {
            if v.windows(2).any(|w| w[0] >= w[1]) {
                return Err("array not strictly increasing".into());
            }
            if v.len() as u64 != self.len {
                return Err(format!("len {} but array holds {}", self.len, v.len()));
            }
        }
        Ok(())
    }
}

#[inline]
fn set_bit(words: &mut [u64], slot: u32) {
    words[(slot / 64) as usize] |= 1u64 << (slot % 64);
}

/// A bitmap over `words`: inline when they fit.
fn from_words(words: Vec<u64>) -> Bitmap {
    let len = words.iter().map(|w| u64::from(w.count_ones())).sum();
    let used = words.iter().rposition(|&w| w != 0).map_or(0, |i| i + 1);
    let repr = if used <= INLINE_WORDS {
        let mut w = [0; INLINE_WORDS];
        w[..used].copy_from_slice(&words[..used]);
        Repr::Inline(w)
    } else {
        Repr::Bits(words)
    };
    Bitmap { repr, len }
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

impl<'a> Iter<'a> {
    pub(crate) fn bits(words: &'a [u64]) -> Self {
        Iter::Bits {
            words,
            i: 0,
            cur: words.first().copied().unwrap_or(0),
        }
    }
}

impl Iterator for Iter<'_> {
    type Item = u32;

    #[inline]
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
