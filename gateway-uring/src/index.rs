//! The process-wide user -> connection index that cross-shard delivery and exclusive login use.
//!
//! 64 stripes, each a `Mutex<HashMap>`, chosen by a hash of the user id: a lookup locks one
//! stripe for a hash-map probe, so shards rarely contend. With several gateway processes this
//! index is what the Redis routing adapter replaces.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

const STRIPES: usize = 64;

/// Where a user's connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    /// Shard (thread) index.
    pub shard: usize,
    /// Connection id, unique in the process.
    pub conn: u64,
}

/// The index.
#[derive(Debug)]
pub struct UserIndex {
    stripes: Vec<Mutex<HashMap<String, ConnRef>>>,
}

impl Default for UserIndex {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl UserIndex {
    fn stripe(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, ConnRef>> {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        let m = &self.stripes[(h.finish() as usize) % STRIPES];
        // A panic while holding a stripe cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still safe to use.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `r` the user's connection and returns the one it replaces.
    pub fn register(&self, user: &str, r: ConnRef) -> Option<ConnRef> {
        self.stripe(user).insert(user.to_string(), r)
    }

    /// Removes the user's entry if it is still connection `conn`.
    pub fn remove_if(&self, user: &str, conn: u64) {
        let mut s = self.stripe(user);
        if s.get(user).is_some_and(|r| r.conn == conn) {
            s.remove(user);
        }
    }

    /// The user's connection, if online.
    pub fn lookup(&self, user: &str) -> Option<ConnRef> {
        self.stripe(user).get(user).copied()
    }

    /// Users online.
    pub fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Nobody online.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
