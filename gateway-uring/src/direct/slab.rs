//! Connection state keyed by index + generation: a [`Key`] names one connection for its whole
//! life, and a key of a closed connection never finds the connection that reuses its place (the
//! generation moved on), so a late completion, timer or push for it is dropped.
//!
//! # Numbers
//! - A key is 48 bits: generation (24 bits) above the index (24 bits), so a shard holds up to
//!   16,777,216 connections and a place is reused 16,777,216 times before a generation repeats.
//! - Each place costs 16 bytes (generation + a boxed connection); the box is freed when the
//!   connection ends. The table only grows (to the shard's peak), by doubling.

/// Index bits of a key.
const INDEX_BITS: u32 = 24;
/// Largest index + 1.
pub const MAX_ENTRIES: usize = 1 << INDEX_BITS;
const GEN_MASK: u32 = (1 << 24) - 1;

/// A connection's name within its shard.
pub type Key = u64;

struct Entry<T> {
    gen: u32,
    value: Option<Box<T>>,
}

/// The table.
pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores the value `make` builds from its key; `None` when the table is full.
    pub fn insert(&mut self, make: impl FnOnce(Key) -> T) -> Option<Key> {
        let index = match self.free.pop() {
            Some(i) => i,
            None if self.entries.len() < MAX_ENTRIES => {
                self.entries.push(Entry { gen: 0, value: None });
                (self.entries.len() - 1) as u32
            }
            None => return None,
        };
        let e = &mut self.entries[index as usize];
        let key = (u64::from(e.gen) << INDEX_BITS) | u64::from(index);
        e.value = Some(Box::new(make(key)));
        self.len += 1;
        Some(key)
    }

    fn split(key: Key) -> (usize, u32) {
        (
            (key & (MAX_ENTRIES as u64 - 1)) as usize,
            (key >> INDEX_BITS) as u32 & GEN_MASK,
        )
    }

    /// The value under `key`, if it is still that connection.
    #[cfg(test)]
    pub fn get(&self, key: Key) -> Option<&T> {
        let (i, gen) = Self::split(key);
        let e = self.entries.get(i)?;
        if e.gen != gen {
            return None;
        }
        e.value.as_deref()
    }

    /// The value under `key`, if it is still that connection.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let (i, gen) = Self::split(key);
        let e = self.entries.get_mut(i)?;
        if e.gen != gen {
            return None;
        }
        e.value.as_deref_mut()
    }

    /// Removes the value under `key`; its place gets a new generation.
    pub fn remove(&mut self, key: Key) -> Option<Box<T>> {
        let (i, gen) = Self::split(key);
        let e = self.entries.get_mut(i)?;
        if e.gen != gen {
            return None;
        }
        let v = e.value.take()?;
        e.gen = (e.gen + 1) & GEN_MASK;
        self.free.push(i as u32);
        self.len -= 1;
        Some(v)
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every key held.
    pub fn keys(&self) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.value.is_some())
            .map(|(i, e)| (u64::from(e.gen) << INDEX_BITS) | i as u64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_key_finds_nothing_after_reuse() {
        let mut s: Slab<&str> = Slab::default();
        let a = s.insert(|_| "a").unwrap();
        assert_eq!(s.get(a), Some(&"a"));
        assert_eq!(s.remove(a).as_deref(), Some(&"a"));
        let b = s.insert(|_| "b").unwrap();
        assert_eq!(
            b & (MAX_ENTRIES as u64 - 1),
            a & (MAX_ENTRIES as u64 - 1),
            "the place is reused"
        );
        assert_ne!(a, b, "under a new generation");
        assert_eq!(s.get(a), None);
        assert!(s.remove(a).is_none());
        assert_eq!(s.get(b), Some(&"b"));
        assert!(!s.is_empty());
        assert_eq!(s.keys(), vec![b]);
    }

    #[test]
    fn the_key_handed_to_make_is_the_key_returned() {
        let mut s: Slab<Key> = Slab::default();
        for _ in 0..3 {
            let k = s.insert(|k| k).unwrap();
            assert_eq!(s.get(k), Some(&k));
        }
    }
}
