//! The process-wide user -> connection index that cross-shard delivery and exclusive login use.
//!
//! 64 stripes, each a `Mutex<HashMap>`, chosen by a hash of the user id: a lookup locks one
//! stripe for a hash-map probe, so shards rarely contend. With several gateway processes this
//! index is what the Redis routing adapter replaces.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use sai_pipeline::flow::{Route, Routes};

const STRIPES: usize = 64;

/// The index: the embedded default's [`Routes`].
#[derive(Debug)]
pub struct UserIndex {
    stripes: Vec<Mutex<HashMap<String, Route>>>,
}

impl Default for UserIndex {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl UserIndex {
    fn stripe(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        let m = &self.stripes[(h.finish() as usize) % STRIPES];
        // A panic while holding a stripe cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still safe to use.
        m.lock().unwrap_or_else(|p| p.into_inner())
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

impl Routes for UserIndex {
    fn lookup(&self, user: &str) -> Option<Route> {
        self.stripe(user).get(user).copied()
    }

    fn register(&self, user: &str, route: Route) -> Option<Route> {
        self.stripe(user).insert(user.to_string(), route)
    }

    fn remove(&self, user: &str, route: Route) {
        let mut s = self.stripe(user);
        if s.get(user) == Some(&route) {
            s.remove(user);
        }
    }
}
