//! What a gateway shard's sessions did, counted for the metrics endpoint.
//!
//! One [`Counters`] per shard, shared by that shard's sessions (the `Arc` is the one field a
//! counted session adds: 8 bytes) and read by whatever thread serves the scrape. Only the shard's
//! own thread writes it, so its relaxed atomic adds never contend: a few nanoseconds each, about
//! five per chat message (bytes and message in, bytes and message out, the push). Nothing here is
//! reset: every count only grows, as Prometheus counters expect, except the two whose difference
//! is the live sessions, and `outbound_bytes`, a gauge.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// The close codes counted one by one; any other code is counted as "other".
pub const CLOSE_CODES: [u16; 14] = [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1012, 4001, 4002, 4003, 4004, 4005,
];

/// Distinct refusal codes kept per shard; past it they are counted as "other" (the codes are
/// the gateway's and the pipeline's stable codes, a dozen or so).
const MAX_REFUSAL_CODES: usize = 64;

/// A shard's counts.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions started: upgrades that completed.
    pub sessions_started: AtomicU64,
    /// Sessions dropped.
    pub sessions_ended: AtomicU64,
    /// Complete WebSocket messages read (text or binary; control frames not counted).
    pub messages_in: AtomicU64,
    /// Bytes read after the upgrade.
    pub bytes_in: AtomicU64,
    /// Text frames queued: answers, pushes, notifications and errors.
    pub messages_out: AtomicU64,
    /// Bytes handed to the driver to write.
    pub bytes_out: AtomicU64,
    /// Bytes the shard's sessions hold for writing now (not yet handed to the driver): a gauge,
    /// what slow clients leave queued, each bounded by `max_outbound_bytes`.
    pub outbound_bytes: AtomicI64,
    /// Pushes queued (a subset of `messages_out`).
    pub pushes: AtomicU64,
    /// Rigor pushes sent again for want of an ack.
    pub resends: AtomicU64,
    /// Rigor pushes no longer tracked because the pending set was full (the client syncs them).
    pub pending_evictions: AtomicU64,
    /// Closes the client started.
    pub client_closes: AtomicU64,
    /// Closes this side started, by code: [`CLOSE_CODES`] then "other".
    closes: [AtomicU64; CLOSE_CODES.len() + 1],
    /// Upgrades refused, by stable code (rare: a lock is fine).
    refusals: Mutex<Vec<(&'static str, u64)>>,
}

impl Counters {
    /// Adds `n` to `counter` (relaxed: a count, not a synchronization).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Live sessions.
    pub fn sessions(&self) -> u64 {
        Self::get(&self.sessions_started).saturating_sub(Self::get(&self.sessions_ended))
    }

    /// This side started a close with `code`.
    pub fn closed(&self, code: u16) {
        let i = CLOSE_CODES.iter().position(|c| *c == code).unwrap_or(CLOSE_CODES.len());
        if let Some(c) = self.closes.get(i) {
            Self::add(c, 1);
        }
    }

    /// Closes this side started: (code, count) for each code of [`CLOSE_CODES`], then (`None`,
    /// count) for the others.
    pub fn closes(&self) -> impl Iterator<Item = (Option<u16>, u64)> + '_ {
        self.closes
            .iter()
            .enumerate()
            .map(|(i, c)| (CLOSE_CODES.get(i).copied(), Self::get(c)))
    }

    /// An upgrade was refused with `code` (an HTTP answer's stable code).
    pub fn refused(&self, code: &'static str) {
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = r.iter_mut().find(|(c, _)| *c == code) {
            entry.1 += 1;
        } else if r.len() < MAX_REFUSAL_CODES {
            r.push((code, 1));
        } else if let Some(entry) = r.iter_mut().find(|(c, _)| *c == "other") {
            entry.1 += 1;
        } else {
            r.push(("other", 1));
        }
    }

    /// Upgrades refused so far, by code.
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_and_refusals_are_counted_by_code() {
        let c = Counters::default();
        c.closed(4003);
        c.closed(4003);
        c.closed(1009);
        c.closed(4999);
        let closes: Vec<_> = c.closes().filter(|(_, n)| *n > 0).collect();
        assert_eq!(closes, vec![(Some(1009), 1), (Some(4003), 2), (None, 1)]);
        c.refused("invalid_token");
        c.refused("server_full");
        c.refused("invalid_token");
        assert_eq!(c.refusals(), vec![("invalid_token", 2), ("server_full", 1)]);
        for _ in 0..MAX_REFUSAL_CODES {
            c.refused(Box::leak(format!("code{}", c.refusals().len()).into_boxed_str()));
        }
        assert_eq!(c.refusals().len(), MAX_REFUSAL_CODES + 1, "the rest count as other");
        assert!(c.refusals().contains(&("other", 2)));
    }
}
