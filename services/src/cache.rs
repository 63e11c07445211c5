//! Bounded read-through caches in front of storage, invalidated by the service that changes the
//! cached fact.
//!
//! Each [`Cached`] is a `quick_cache` (S3-FIFO eviction, bounded by entry count: when full, the
//! least useful entry goes; a miss only costs one storage read). A load that raced an
//! invalidation must not put the old value back: every invalidation bumps a generation counter
//! after the write it follows, and a load keeps its value only if the counter did not move while
//! it read (checked again after the insert, so an invalidation that lands between the check and
//! the insert still wins). The cost of that rule is an occasional extra miss, never a stale hit.
//!
//! The caches live in one process. In a cluster with several services processes every
//! invalidation is also told to the others ([`CachePeers`], over Redis), which forget the same
//! key; a process that may have missed some (its subscription was lost) forgets everything.

use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The caches peers name in their invalidations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheName {
    /// Accounts by user id (token epochs, disabled).
    Accounts,
    /// Friendships by private conversation id.
    Friendships,
    /// Group members by group id.
    Members,
}

impl CacheName {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accounts => "accounts",
            Self::Friendships => "friendships",
            Self::Members => "members",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accounts" => Some(Self::Accounts),
            "friendships" => Some(Self::Friendships),
            "members" => Some(Self::Members),
            _ => None,
        }
    }
}

/// The other services processes of a cluster, told of every invalidation made here.
pub trait CachePeers: Send + Sync + 'static {
    /// `key` of `cache` changed; the peers forget it.
    fn invalidated(&self, cache: CacheName, key: &str);
}

/// A service's peers, once the cluster wiring sets them (none in one process).
#[derive(Default)]
pub struct Peers(OnceLock<Arc<dyn CachePeers>>);

impl Peers {
    /// Sets the peers (the first call wins).
    pub fn set(&self, peers: Arc<dyn CachePeers>) {
        let _ = self.0.set(peers);
    }

    /// Tells the peers, if any, that `key` of `cache` changed.
    pub fn tell(&self, cache: CacheName, key: &str) {
        if let Some(p) = self.0.get() {
            p.invalidated(cache, key);
        }
    }
}

/// A bounded cache of `K -> V` filled from storage on a miss.
pub struct Cached<K, V> {
    cache: quick_cache::sync::Cache<K, V>,
    generation: AtomicU64,
}

impl<K: Eq + Hash + Clone, V: Clone> Cached<K, V> {
    /// A cache of at most about `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            cache: quick_cache::sync::Cache::new(capacity),
            generation: AtomicU64::new(0),
        }
    }

    /// The cached value, or `load()`'s, which is kept unless an invalidation raced it. Errors are
    /// passed through and never cached.
    pub async fn get_or_load<E, F>(&self, key: &K, load: F) -> Result<V, E>
    where
        F: Future<Output = Result<V, E>>,
    {
        if let Some(v) = self.cache.get(key) {
            return Ok(v);
        }
        let before = self.generation.load(Ordering::Acquire);
        let v = load.await?;
        if self.generation.load(Ordering::Acquire) == before {
            self.cache.insert(key.clone(), v.clone());
            if self.generation.load(Ordering::Acquire) != before {
                self.cache.remove(key);
            }
        }
        Ok(v)
    }

    /// Forgets `key`; call after the write that changed it has committed.
    pub fn invalidate(&self, key: &K) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.remove(key);
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_hit_does_not_load_and_an_invalidation_reloads() {
        let c: Cached<&str, u32> = Cached::new(16);
        block_on(async {
            assert_eq!(c.get_or_load(&"a", async { Ok::<_, ()>(1) }).await, Ok(1));
            assert_eq!(
                c.get_or_load(&"a", async { Ok::<_, ()>(2) }).await,
                Ok(1),
                "served from cache"
            );
            c.invalidate(&"a");
            assert_eq!(c.get_or_load(&"a", async { Ok::<_, ()>(3) }).await, Ok(3));
        });
    }

    #[test]
    fn errors_are_not_cached() {
        let c: Cached<&str, u32> = Cached::new(16);
        block_on(async {
            assert_eq!(c.get_or_load(&"a", async { Err::<u32, _>("down") }).await, Err("down"));
            assert_eq!(c.get_or_load(&"a", async { Ok::<_, &str>(7) }).await, Ok(7));
        });
    }

    #[test]
    fn a_load_that_raced_an_invalidation_is_not_kept() {
        let c: Cached<&str, u32> = Cached::new(16);
        block_on(async {
            // The load reads the old value, then the writer commits and invalidates.
            let v = c
                .get_or_load(&"a", async {
                    c.invalidate(&"a");
                    Ok::<_, ()>(1)
                })
                .await;
            assert_eq!(v, Ok(1), "the caller still gets what it read");
            assert_eq!(
                c.get_or_load(&"a", async { Ok::<_, ()>(2) }).await,
                Ok(2),
                "the stale value was not cached"
            );
        });
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c: Cached<u32, u32> = Cached::new(100);
        block_on(async {
            for i in 0..10_000 {
                let _ = c.get_or_load(&i, async move { Ok::<_, ()>(i) }).await;
            }
        });
        assert!(c.cache.len() <= 200, "{} entries", c.cache.len());
    }
}
