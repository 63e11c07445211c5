//! Which idempotency keys `(send_id, client_msg_id)` the tables may hold: a filter the writer
//! asks before it looks a key up, so a fresh message (nearly every one) costs no table lookup.
//!
//! # Why
//! The lookup was most of the writer's CPU once appends were logged (at 6,000 msg/s about 20 of
//! its 27 us per message, `results/pipeline/README.md`): every merge changes the database, which
//! empties the writer connection's page cache, so each lookup read its index pages back.
//!
//! # Numbers
//! Bloom filters (the `fastbloom` crate) at a 0.5 % false-positive rate: about 11 bits, 1.4 bytes,
//! per key. The first layer holds twice the keys found at start-up, at least [`MIN_LAYER`]; when a
//! layer is full the next one, twice as large, takes the new keys (a scalable Bloom filter:
//! nothing is rebuilt and no key is ever dropped, so a key the filter denies is certainly not in
//! the table). A lookup asks every layer: with `L` layers the false-positive rate is at most
//! `L x 0.5 %`, and a false positive costs only the table lookup every message used to pay.
//! Start-up reads every key once (one pass over the covering `messages_idempotency` index; its
//! time grows with the table).

use fastbloom::BloomFilter;
use rusqlite::Connection;

/// Keys the first layer holds at least.
const MIN_LAYER: usize = 1 << 20;
/// False-positive rate of each layer.
const FALSE_POSITIVE: f64 = 0.005;

/// The filter of keys the tables may hold.
pub(super) struct KeyFilter {
    /// `(filter, capacity, keys in it)`; new keys go to the last.
    layers: Vec<(BloomFilter, usize, usize)>,
}

impl KeyFilter {
    /// A filter of every key in the `messages` table.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let count: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
        let mut filter = Self::with_capacity(usize::try_from(count).unwrap_or(0).saturating_mul(2));
        let mut stmt = conn.prepare("SELECT send_id, client_msg_id FROM messages")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let send_id: String = r.get(0)?;
            let client_msg_id: String = r.get(1)?;
            filter.insert(&super::merge::key(&send_id, &client_msg_id));
        }
        Ok(filter)
    }

    fn with_capacity(capacity: usize) -> Self {
        let mut f = Self { layers: Vec::new() };
        f.add_layer(capacity.max(MIN_LAYER));
        f
    }

    fn add_layer(&mut self, capacity: usize) {
        let bloom = BloomFilter::with_false_pos(FALSE_POSITIVE).expected_items(capacity);
        self.layers.push((bloom, capacity, 0));
    }

    /// Records a key the tables will hold.
    pub(super) fn insert(&mut self, key: &str) {
        let full = self.layers.last().is_none_or(|(_, cap, n)| n >= cap);
        if full {
            let next = self
                .layers
                .last()
                .map_or(MIN_LAYER, |(_, cap, _)| cap.saturating_mul(2));
            self.add_layer(next);
        }
        if let Some((bloom, _, n)) = self.layers.last_mut() {
            bloom.insert(key);
            *n += 1;
        }
    }

    /// False: the key is certainly not in the tables. True: it may be; look it up.
    pub(super) fn may_contain(&self, key: &str) -> bool {
        self.layers.iter().any(|(bloom, _, _)| bloom.contains(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_inserted_key_is_ever_denied_across_layers_and_strangers_mostly_are() {
        let mut f = KeyFilter::with_capacity(0);
        let n = MIN_LAYER + 17;
        for i in 0..n {
            f.insert(&format!("u{i}\0k"));
        }
        assert_eq!(f.layers.len(), 2, "a full layer hands new keys to the next");
        for i in (0..n).step_by(101) {
            assert!(f.may_contain(&format!("u{i}\0k")), "key {i} denied");
        }
        let strangers = 100_000;
        let false_pos = (0..strangers).filter(|i| f.may_contain(&format!("x{i}\0k"))).count();
        assert!(false_pos < strangers / 50, "{false_pos} false positives in {strangers}");
    }
}
