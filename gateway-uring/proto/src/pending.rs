//! Unacknowledged pushes of one connection in `rigor` ack mode.
//!
//! Each push gets a numeric id (its decimal string is the frame `id`); the client acks it with a
//! `frameType` 2 frame carrying that id. An unacked push is resent after `initial_backoff`, then
//! after twice that, and so on up to `max_backoff`, at most `max_retries` times; after that it is
//! dropped and counted, and the client is expected to resync by seq (`conversation.sync`). Messages
//! are durable before they are pushed, so dropping a push never loses a message.
//!
//! # Numbers
//! At most `capacity` entries (default 256) are held per connection; tracking one more evicts the
//! oldest (counted as dropped). Entries are kept in id order in a `VecDeque`: `track` is O(1),
//! `ack` is a binary search plus removal, O(capacity) worst case, `poll` scans only while the
//! front entries are due after a resend reorders deadlines (O(capacity)), all of it in one
//! connection's small window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Resend policy.
#[derive(Debug, Clone, Copy)]
pub struct PendingConfig {
    /// First resend this long after the push.
    pub initial_backoff: Duration,
    /// Backoff doubles up to this.
    pub max_backoff: Duration,
    /// Resends before giving up on a push.
    pub max_retries: u32,
    /// Most unacked pushes kept per connection.
    pub capacity: usize,
}

impl Default for PendingConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(16),
            max_retries: 4,
            capacity: 256,
        }
    }
}

#[derive(Debug)]
struct Entry<T> {
    id: u64,
    frame: String,
    tag: T,
    resends: u32,
    deadline: Instant,
}

/// The pending set of one connection. `T` is what the caller wants back when a push is acked
/// (the gateway keeps the conversation and seq, to record the message as received).
#[derive(Debug)]
pub struct Pending<T = ()> {
    next_id: u64,
    entries: VecDeque<Entry<T>>,
    /// Pushes given up on (retries exhausted or evicted); the client must resync to get them.
    pub dropped: u64,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Pending<T> {
    /// An empty set. The settings are handed to each call that needs them (one copy per
    /// gateway, not one per connection).
    pub fn new() -> Self {
        Self {
            next_id: 1,
            entries: VecDeque::new(),
            dropped: 0,
        }
    }

    /// A fresh push id (used in every ack mode so push ids are unique per connection).
    pub fn allocate(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Starts tracking a sent push. Ids must come from [`Self::allocate`], in order.
    pub fn track(&mut self, cfg: &PendingConfig, id: u64, frame: String, tag: T, now: Instant) {
        if self.entries.len() >= cfg.capacity.max(1) {
            self.entries.pop_front();
            self.dropped += 1;
        }
        self.entries.push_back(Entry {
            id,
            frame,
            tag,
            resends: 0,
            deadline: now + cfg.initial_backoff,
        });
    }

    /// The client acked `id`. Returns the push's tag if it was pending.
    pub fn ack(&mut self, id: &str) -> Option<T> {
        let id = id.parse::<u64>().ok()?;
        let i = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        self.entries.remove(i).map(|e| e.tag)
    }

    /// Appends every push due at `now` to `out` for resending and reschedules it, dropping those
    /// out of retries.
    pub fn poll(&mut self, cfg: &PendingConfig, now: Instant, out: &mut Vec<String>) {
        let before = self.entries.len();
        self.entries.retain_mut(|e| {
            if e.deadline > now {
                return true;
            }
            if e.resends >= cfg.max_retries {
                return false;
            }
            e.resends += 1;
            let backoff = cfg
                .initial_backoff
                .saturating_mul(1u32 << e.resends.min(16))
                .min(cfg.max_backoff);
            e.deadline = now + backoff;
            out.push(e.frame.clone());
            true
        });
        self.dropped += (before - self.entries.len()) as u64;
    }

    /// When [`Self::poll`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.deadline).min()
    }

    /// Unacked pushes held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests take one base instant; every `now` derives from it.
mod tests {
    use super::*;

    fn cfg() -> PendingConfig {
        PendingConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            max_retries: 2,
            capacity: 3,
        }
    }

    #[test]
    fn resends_with_backoff_then_drops() {
        let t0 = Instant::now();
        let (c, mut p) = (cfg(), Pending::new());
        let id = p.allocate();
        p.track(&c, id, "f".into(), (), t0);
        let mut out = Vec::new();
        p.poll(&c, t0 + Duration::from_millis(99), &mut out);
        assert!(out.is_empty());
        p.poll(&c, t0 + Duration::from_millis(100), &mut out);
        assert_eq!(out, vec!["f"]);
        // Second resend after 200 ms more.
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_millis(300)));
        p.poll(&c, t0 + Duration::from_millis(300), &mut out);
        assert_eq!(out.len(), 2);
        p.poll(&c, t0 + Duration::from_secs(5), &mut out);
        assert_eq!(out.len(), 2);
        assert!(p.is_empty());
        assert_eq!(p.dropped, 1);
    }

    #[test]
    fn ack_removes_and_capacity_evicts_oldest() {
        let t0 = Instant::now();
        let (c, mut p) = (cfg(), Pending::new());
        for _ in 0..4 {
            let id = p.allocate();
            p.track(&c, id, id.to_string(), id * 10, t0);
        }
        assert_eq!(p.len(), 3);
        assert_eq!(p.dropped, 1);
        assert_eq!(p.ack("1"), None);
        assert_eq!(p.ack("3"), Some(30));
        assert_eq!(p.ack("3"), None);
        assert_eq!(p.ack("x"), None);
        let mut out = Vec::new();
        p.poll(&c, t0 + Duration::from_secs(1), &mut out);
        assert_eq!(out, vec!["2", "4"]);
    }
}
