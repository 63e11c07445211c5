//! The process-wide user -> connection index that cross-shard delivery and exclusive login use.
//!
//! 64 stripes, each a `Mutex<HashMap>`, chosen by a hash of the user id: a lookup locks one
//! stripe for a hash-map probe, so shards rarely contend. With several gateway processes this
//! index is what the Redis routing adapter replaces.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use sai_pipeline::flow::{Route, RouteSink, Routes};
use std::sync::Arc;

const STRIPES: usize = 64;

/// The index: the embedded default's [`Routes`].
pub struct UserIndex {
    stripes: Vec<Mutex<HashMap<String, Route>>>,
    /// Told of each route taken and dropped (a cluster's route directory), outside the locks.
    sink: Option<Arc<dyn RouteSink>>,
}

impl Default for UserIndex {
    fn default() -> Self {
        Self::new(None)
    }
}

impl UserIndex {
    /// An empty index that tells `sink` of its changes.
    pub fn new(sink: Option<Arc<dyn RouteSink>>) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            sink,
        }
    }

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
        let old = self.stripe(user).insert(user.to_string(), route);
        if let Some(sink) = &self.sink {
            sink.registered(user, route);
        }
        old
    }

    fn remove(&self, user: &str, route: Route) {
        let removed = {
            let mut s = self.stripe(user);
            s.get(user) == Some(&route) && s.remove(user).is_some()
        };
        if let (true, Some(sink)) = (removed, &self.sink) {
            sink.removed(user, route);
        }
    }

    fn held(&self) -> Vec<(String, Route)> {
        let mut out = Vec::with_capacity(self.len());
        for s in &self.stripes {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(s.iter().map(|(u, r)| (u.clone(), *r)));
        }
        out
    }
}
