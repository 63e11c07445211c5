//! Brakes on the expensive, unauthenticated routes (login and registration): attempt limits per
//! account and per client address with exponential backoff, and the bounded pool that runs
//! bcrypt away from everything else.
//!
//! # Attempt limits ([`Attempts`])
//! An attempt is counted when it starts (so a burst of concurrent attempts cannot all slip past
//! the check before the first one fails) and forgiven when it succeeds. The first `free` attempts
//! of a key pass; every further one starts a block of `1 s x 2^(n - free - 1)`, capped at
//! `max_block`, during which attempts are refused with 429 `too_many_attempts` and a
//! `Retry-After` without running bcrypt. A key that makes no attempt for `window` starts over.
//! The per-account limit makes guessing one account's password slow; the per-address limit does
//! the same for one client guessing many accounts. The price of the first, as in every lockout
//! scheme, is that a guesser can keep the right owner out for `max_block` at a time.
//!
//! Keys live in a bounded cache of [`TRACKED_KEYS`] entries (S3-FIFO eviction, about 100 bytes
//! each): a client that cycles through more keys than that can get some of its counters evicted,
//! which costs it nothing more than a fresh start on those keys.
//!
//! # The hash pool ([`HashPool`])
//! bcrypt costs ~200 ms of a core per hash at cost 12. It runs on `threads` threads of its own
//! (niced, so the scheduler prefers the chat threads when both want a core) behind a queue of
//! `queue` jobs; when the queue is full the request is refused at once with 503 `server_busy`
//! instead of waiting in line. So a login flood can take at most `threads` (niced) cores.

use crate::error::ServiceError;
pub use sai_pipeline::client::address_key;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Counters tracked per limit (accounts or addresses).
pub const TRACKED_KEYS: usize = 100_000;

/// First block after the free attempts, in milliseconds; each further attempt doubles it.
const BASE_BLOCK_MS: i64 = 1000;

/// One attempt limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptLimit {
    /// Attempts that pass before blocks start (0 turns the limit off).
    pub free: u32,
    /// The longest block, in milliseconds.
    pub max_block_ms: i64,
    /// A key quiet this long starts over, in milliseconds.
    pub window_ms: i64,
}

/// What one key has done lately.
#[derive(Debug, Default)]
struct Entry {
    /// Attempts counted and not forgiven.
    attempts: u32,
    /// Refused until then (ms since the epoch).
    blocked_until: i64,
    /// When the last attempt started.
    last: i64,
}

/// An [`AttemptLimit`] that a configuration reload can change while it is read.
struct LiveLimit {
    free: AtomicU32,
    max_block_ms: AtomicI64,
    window_ms: AtomicI64,
}

impl LiveLimit {
    fn new(l: AttemptLimit) -> Self {
        Self {
            free: AtomicU32::new(l.free),
            max_block_ms: AtomicI64::new(l.max_block_ms),
            window_ms: AtomicI64::new(l.window_ms),
        }
    }

    fn set(&self, l: AttemptLimit) {
        self.free.store(l.free, Ordering::Relaxed);
        self.max_block_ms.store(l.max_block_ms, Ordering::Relaxed);
        self.window_ms.store(l.window_ms, Ordering::Relaxed);
    }

    fn get(&self) -> AttemptLimit {
        AttemptLimit {
            free: self.free.load(Ordering::Relaxed),
            max_block_ms: self.max_block_ms.load(Ordering::Relaxed),
            window_ms: self.window_ms.load(Ordering::Relaxed),
        }
    }
}

/// Attempt counters of one kind of key (account names or addresses).
pub struct Attempts<K> {
    limit: LiveLimit,
    entries: quick_cache::sync::Cache<K, Arc<Mutex<Entry>>>,
}

impl<K: Eq + Hash + Clone> Attempts<K> {
    /// Counters for `limit`.
    pub fn new(limit: AttemptLimit) -> Self {
        Self {
            limit: LiveLimit::new(limit),
            entries: quick_cache::sync::Cache::new(TRACKED_KEYS),
        }
    }

    /// Changes the limit (a configuration reload): the next attempt of every key follows it;
    /// blocks already started run out as they were.
    pub fn set_limit(&self, limit: AttemptLimit) {
        self.limit.set(limit);
    }

    /// Counts an attempt by `key` at `now_ms`, or refuses it with the seconds to wait.
    pub fn begin(&self, key: &K, now_ms: i64) -> Result<(), ServiceError> {
        let limit = self.limit.get();
        if limit.free == 0 {
            return Ok(());
        }
        let entry = match self.entries.get_or_insert_with(key, || Ok::<_, ()>(Arc::default())) {
            Ok(e) => e,
            Err(()) => return Ok(()),
        };
        let mut e = entry.lock().unwrap_or_else(|p| p.into_inner());
        if now_ms < e.blocked_until {
            return Err(too_many(e.blocked_until - now_ms));
        }
        if now_ms - e.last >= limit.window_ms {
            e.attempts = 0;
        }
        e.last = now_ms;
        e.attempts = e.attempts.saturating_add(1);
        if e.attempts > limit.free {
            let doublings = (e.attempts - limit.free - 1).min(30);
            let block = BASE_BLOCK_MS.saturating_mul(1 << doublings).min(limit.max_block_ms);
            e.blocked_until = now_ms + block;
        }
        Ok(())
    }

    /// Forgives the attempt `key` began (it succeeded): the count drops by one and so does any
    /// block that attempt started.
    pub fn forgive(&self, key: &K) {
        if let Some(entry) = self.entries.get(key) {
            let mut e = entry.lock().unwrap_or_else(|p| p.into_inner());
            e.attempts = e.attempts.saturating_sub(1);
            if e.attempts <= self.limit.get().free {
                e.blocked_until = 0;
            }
        }
    }

    /// Clears `key`'s record (the account's owner proved who they are).
    pub fn reset(&self, key: &K) {
        self.entries.remove(key);
    }
}

fn too_many(wait_ms: i64) -> ServiceError {
    let secs = u64::try_from((wait_ms + 999) / 1000).unwrap_or(1).max(1);
    ServiceError::TooManyAttempts { retry_after_secs: secs }
}

/// The limits of login and registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Login attempts per account name.
    pub account: AttemptLimit,
    /// Login attempts per client address.
    pub address: AttemptLimit,
    /// Registrations per client address (each costs a hash).
    pub register: AttemptLimit,
}

impl Default for LoginLimits {
    fn default() -> Self {
        let limit = |free| AttemptLimit {
            free,
            max_block_ms: 300_000,
            window_ms: 900_000,
        };
        Self {
            account: limit(5),
            address: limit(20),
            register: limit(20),
        }
    }
}

/// Every counter of [`LoginLimits`].
pub struct LoginThrottle {
    /// Per account name.
    pub accounts: Attempts<String>,
    /// Login per address.
    pub addresses: Attempts<IpAddr>,
    /// Registration per address.
    pub registrations: Attempts<IpAddr>,
}

impl LoginThrottle {
    /// Counters for `limits`.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            accounts: Attempts::new(limits.account),
            addresses: Attempts::new(limits.address),
            registrations: Attempts::new(limits.register),
        }
    }

    /// Changes every limit (a configuration reload); the counts so far are kept.
    pub fn set(&self, limits: LoginLimits) {
        self.accounts.set_limit(limits.account);
        self.addresses.set_limit(limits.address);
        self.registrations.set_limit(limits.register);
    }
}

/// Sizes of the [`HashPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashPoolConfig {
    /// Threads (0: half the cores, at least one).
    pub threads: usize,
    /// Jobs waiting at most; past it requests get 503 `server_busy`.
    pub queue: usize,
}

impl Default for HashPoolConfig {
    fn default() -> Self {
        Self { threads: 0, queue: 64 }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run password hashing and nothing else.
pub struct HashPool {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

/// Niceness of the hash threads: at 10 the scheduler gives a thread about a tenth of the weight
/// of a normal one, so hashing yields to chat when both want the same core.
const HASH_NICE: i32 = 10;

impl HashPool {
    /// Starts the threads.
    pub fn new(cfg: HashPoolConfig) -> std::io::Result<Self> {
        let threads = match cfg.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .max(1),
            n => n,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(cfg.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("sai-hash-{i}"))
                .spawn(move || {
                    lower_priority(HASH_NICE);
                    loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                            rx.recv()
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self { jobs: tx })
    }

    /// Runs `f` on the pool; 503 `server_busy` when the queue is full.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ServiceError> {
        self.submit(f)?.await.map_err(|_| ServiceError::Internal)
    }

    /// Queues `f` now (or refuses with 503 `server_busy`); its result arrives on the receiver.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, ServiceError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(std::sync::mpsc::TrySendError::Full(_)) => Err(ServiceError::Busy),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(ServiceError::Internal),
        }
    }
}

/// Gives the calling thread the nice value `nice` (background work: bcrypt, merges,
/// checkpoints), so that the scheduler prefers the chat threads when both want a core.
#[cfg(target_os = "linux")]
pub(crate) fn lower_priority(nice: i32) {
    // On Linux a thread id names one thread for setpriority(PRIO_PROCESS, ...).
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::debug!(error = %e, "could not lower a background thread's priority");
    }
}

/// See the Linux version.
#[cfg(not(target_os = "linux"))]
pub(crate) fn lower_priority(_nice: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(free: u32) -> AttemptLimit {
        AttemptLimit {
            free,
            max_block_ms: 8_000,
            window_ms: 60_000,
        }
    }

    fn wait(r: Result<(), ServiceError>) -> Option<u64> {
        match r {
            Ok(()) => None,
            Err(ServiceError::TooManyAttempts { retry_after_secs }) => Some(retry_after_secs),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn free_attempts_then_doubling_blocks_up_to_the_cap() {
        let a = Attempts::new(limit(3));
        let k = "alice".to_string();
        let mut t = 1_000_000;
        for _ in 0..3 {
            assert_eq!(wait(a.begin(&k, t)), None);
        }
        // The 4th attempt is let through but starts a 1 s block.
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), Some(1));
        assert_eq!(wait(a.begin(&k, t + 999)), Some(1));
        t += 1000;
        assert_eq!(wait(a.begin(&k, t)), None, "the block is over");
        assert_eq!(wait(a.begin(&k, t)), Some(2), "and the next one is twice as long");
        t += 2000;
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t + 1)), Some(4));
        t += 4000;
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), Some(8));
        t += 8000;
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), Some(8), "capped at max_block");
        assert_eq!(
            wait(a.begin(&"bob".to_string(), t)),
            None,
            "other keys are not affected"
        );
    }

    #[test]
    fn a_quiet_window_starts_over_and_success_is_forgiven() {
        let a = Attempts::new(limit(2));
        let k = "alice".to_string();
        let t = 1_000_000;
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), Some(1));
        // A whole window later the count is back to zero.
        let t = t + 60_000;
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), None);
        // Successful attempts are forgiven one by one: they never lead to a block.
        for _ in 0..10 {
            a.forgive(&k);
            assert_eq!(wait(a.begin(&k, t)), None);
        }
        a.reset(&k);
        assert_eq!(wait(a.begin(&k, t)), None);
        assert_eq!(wait(a.begin(&k, t)), None);
    }

    #[test]
    fn a_zero_limit_is_off() {
        let a = Attempts::new(limit(0));
        for _ in 0..100 {
            assert_eq!(wait(a.begin(&"k".to_string(), 5)), None);
        }
    }

    #[tokio::test]
    async fn a_full_hash_queue_refuses_at_once() {
        let pool = HashPool::new(HashPoolConfig { threads: 1, queue: 1 }).unwrap();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        // One job holds the thread, one waits in the queue; the third is refused.
        let first = pool
            .submit(move || {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
                1
            })
            .unwrap();
        started_rx.recv().unwrap();
        let second = pool.submit(|| 2).unwrap();
        assert!(matches!(pool.submit(|| 3), Err(ServiceError::Busy)));
        release_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), 1);
        assert_eq!(second.await.unwrap(), 2);
        assert_eq!(pool.run(|| 4).await.unwrap(), 4, "room again once the queue drained");
    }
}
