//! A hashed timing wheel for per-connection deadlines, one per shard, sans-IO (time is a tick
//! count handed in by the caller).
//!
//! # Numbers
//! `slots` buckets (a power of two; the gateway uses 1,024) of `tick` width (the gateway uses
//! 100 ms), so one revolution spans 102.4 s; a deadline further out stays in its bucket and is
//! skipped (one comparison) on each pass until its round comes. Each entry is 16 bytes (key +
//! deadline tick). `insert` is O(1); `advance` costs O(ticks elapsed + entries in the passed
//! buckets). Entries are never removed early: the gateway re-checks a connection's real
//! deadline when its entry fires and re-inserts it if it moved (lazy reset), so activity on a
//! connection costs one store of a timestamp, not a wheel operation.

/// The wheel.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<(u64, u64)>>,
    mask: u64,
    /// Next tick to process; every tick below it has fired.
    current: u64,
    /// Entries inserted with a deadline already behind `current`: they fire on the next advance.
    overdue: Vec<u64>,
    len: usize,
}

impl TimerWheel {
    /// A wheel with `slots` buckets (rounded up to a power of two), starting at tick `now`.
    pub fn new(slots: usize, now: u64) -> Self {
        let n = slots.max(1).next_power_of_two();
        Self {
            slots: (0..n).map(|_| Vec::new()).collect(),
            mask: n as u64 - 1,
            current: now,
            overdue: Vec::new(),
            len: 0,
        }
    }

    /// Schedules `key` to fire at tick `deadline` (a deadline already passed fires on the next
    /// `advance`).
    pub fn insert(&mut self, key: u64, deadline: u64) {
        if deadline < self.current {
            self.overdue.push(key);
        } else {
            self.slots[(deadline & self.mask) as usize].push((key, deadline));
        }
        self.len += 1;
    }

    /// Fires every entry with a deadline up to and including tick `now`, appending keys to `out`.
    pub fn advance(&mut self, now: u64, out: &mut Vec<u64>) {
        self.len -= self.overdue.len();
        out.append(&mut self.overdue);
        if now < self.current {
            return;
        }
        // Visiting more than one revolution would only revisit the same buckets.
        let steps = (now - self.current + 1).min(self.mask + 1);
        for i in 0..steps {
            let slot = &mut self.slots[((self.current + i) & self.mask) as usize];
            let before = slot.len();
            slot.retain(|&(key, at)| {
                if at <= now {
                    out.push(key);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
        }
        self.current = now + 1;
    }

    /// Entries scheduled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_time_and_handles_long_deadlines() {
        let mut w = TimerWheel::new(8, 0);
        w.insert(1, 3);
        w.insert(2, 20); // more than two revolutions away
        w.insert(3, 0);
        let mut out = Vec::new();
        w.advance(2, &mut out);
        assert_eq!(out, vec![3]);
        w.advance(3, &mut out);
        assert_eq!(out, vec![3, 1]);
        w.advance(19, &mut out);
        assert_eq!(out.len(), 2);
        w.advance(100, &mut out);
        assert_eq!(out, vec![3, 1, 2]);
        assert!(w.is_empty());
    }

    #[test]
    fn matches_a_sorted_oracle() {
        // Deterministic pseudo-random schedule checked against a brute-force oracle.
        let mut w = TimerWheel::new(16, 0);
        let mut oracle: Vec<(u64, u64)> = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut now = 0;
        for key in 0..2_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let deadline = now + x % 200;
            w.insert(key, deadline);
            oracle.push((key, deadline));
            if key % 7 == 0 {
                now += x % 5;
                let mut out = Vec::new();
                w.advance(now, &mut out);
                let mut want: Vec<u64> = oracle.iter().filter(|e| e.1 <= now).map(|e| e.0).collect();
                oracle.retain(|e| e.1 > now);
                out.sort_unstable();
                want.sort_unstable();
                assert_eq!(out, want);
                assert_eq!(w.len(), oracle.len());
            }
        }
    }
}
