//! Who may hold a connection: a cap on all connections below the process's descriptor limit,
//! and per client address caps on connections and on handshakes in progress.
//!
//! Without them one client could open connections until the process ran out of descriptors
//! (20,000 here): every later accept failed with EMFILE and legitimate clients waited for the
//! handshake timeout to reap the idle ones. Now:
//!
//! - **Total** ([`Limits::max_connections`]): by default the descriptor limit (`RLIMIT_NOFILE`)
//!   minus [`Limits::fd_reserve`], the descriptors the process needs for everything else (the
//!   database and its WAL, listeners, rings, eventfds, HTTP and gRPC connections); past it new
//!   connections are answered 503 `server_full` and closed at once, so accept keeps working.
//! - **Per address** (IPv4 address, IPv6 /64): at most [`Limits::max_per_address`]
//!   connections and [`Limits::max_handshakes_per_address`] of them still in the handshake (the
//!   cheapest thing to open and hold); past them, 429 `too_many_connections` /
//!   `too_many_handshakes` and close.
//!
//! A [`Ticket`] holds a connection's place and gives it back when dropped. The counts live in
//! 64 mutex-striped maps shared by the shards, touched once per accept, handshake and close,
//! never per frame. Each map holds only addresses with a live connection, so its size is
//! bounded by the connections.

use sai_pipeline::client::address_key;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Stripes of the per-address maps.
const STRIPES: usize = 64;

/// The limits (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in all (0: the descriptor limit minus `fd_reserve`).
    pub max_connections: usize,
    /// Descriptors kept for everything but gateway connections when `max_connections` is 0.
    pub fd_reserve: usize,
    /// Connections per client address.
    pub max_per_address: usize,
    /// Connections per client address that have not finished the handshake.
    pub max_handshakes_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 0,
            fd_reserve: 64,
            max_per_address: 4096,
            max_handshakes_per_address: 1024,
        }
    }
}

impl Limits {
    /// `max_connections`, or the descriptor limit `nofile` minus the reserve when it is 0.
    pub fn total(&self, nofile: Option<u64>) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        match nofile.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => n.saturating_sub(self.fd_reserve).max(1),
            None => usize::MAX,
        }
    }
}

/// Why a connection was turned away: the HTTP status, code and message it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The process is at its connection cap.
    Full,
    /// This address holds its share of connections.
    TooManyConnections,
    /// This address holds its share of unfinished handshakes.
    TooManyHandshakes,
}

impl Refused {
    /// (status, code, message).
    pub fn answer(self) -> (u16, &'static str, &'static str) {
        match self {
            Self::Full => (503, "server_full", "the server holds all the connections it can"),
            Self::TooManyConnections => (429, "too_many_connections", "too many connections from this address"),
            Self::TooManyHandshakes => (
                429,
                "too_many_handshakes",
                "too many unfinished handshakes from this address",
            ),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    conns: usize,
    handshakes: usize,
}

/// The counts, shared by every shard.
pub struct Admission {
    total_cap: usize,
    limits: Limits,
    total: AtomicUsize,
    stripes: Vec<Mutex<HashMap<IpAddr, Count>>>,
}

impl Admission {
    /// Counts for `limits` under a descriptor limit of `nofile`.
    pub fn new(limits: Limits, nofile: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            total_cap: limits.total(nofile),
            limits,
            total: AtomicUsize::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// The process's descriptor limit, if it can be read.
    pub fn nofile() -> Option<u64> {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }

    /// The cap on connections in all.
    pub fn total_cap(&self) -> usize {
        self.total_cap
    }

    /// Connections held now.
    pub fn connections(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// A place for a new connection from `ip` (in the handshake), or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let key = address_key(ip);
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.total_cap {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        let mut map = self.stripe(&key);
        let c = map.entry(key).or_default();
        let refused = if c.conns >= self.limits.max_per_address {
            Some(Refused::TooManyConnections)
        } else if c.handshakes >= self.limits.max_handshakes_per_address {
            Some(Refused::TooManyHandshakes)
        } else {
            None
        };
        if let Some(r) = refused {
            if c.conns == 0 {
                map.remove(&key);
            }
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(r);
        }
        c.conns += 1;
        c.handshakes += 1;
        Ok(Ticket {
            admission: self.clone(),
            key,
            in_handshake: true,
        })
    }

    fn stripe(&self, key: &IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Count>> {
        use std::hash::{Hash, Hasher};
        // Fixed keys: one address must land on the same stripe on every call.
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        let i = (h.finish() as usize) % self.stripes.len();
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's place; given back on drop.
pub struct Ticket {
    admission: Arc<Admission>,
    key: IpAddr,
    in_handshake: bool,
}

impl Ticket {
    /// The handshake is over (the connection is upgraded): it no longer counts as one.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.in_handshake) {
            let mut map = self.admission.stripe(&self.key);
            if let Some(c) = map.get_mut(&self.key) {
                c.handshakes = c.handshakes.saturating_sub(1);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut map = self.admission.stripe(&self.key);
            if let Some(c) = map.get_mut(&self.key) {
                c.conns = c.conns.saturating_sub(1);
                if self.in_handshake {
                    c.handshakes = c.handshakes.saturating_sub(1);
                }
                if c.conns == 0 {
                    map.remove(&self.key);
                }
            }
        }
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admission(total: usize, per: usize, hs: usize) -> Arc<Admission> {
        Admission::new(
            Limits {
                max_connections: total,
                fd_reserve: 0,
                max_per_address: per,
                max_handshakes_per_address: hs,
            },
            None,
        )
    }

    #[test]
    fn handshakes_then_connections_per_address_then_the_total() {
        let a = admission(6, 3, 2);
        let mut t1 = a.admit(ip("10.0.0.1")).unwrap();
        let _t2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::TooManyHandshakes));
        t1.handshake_done();
        let _t3 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::TooManyConnections));
        // Another address has its own share, until the total is reached.
        let _o: Vec<Ticket> = (0..2).map(|_| a.admit(ip("10.0.0.2")).unwrap()).collect();
        let _p = a.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(a.connections(), 6);
        assert_eq!(a.admit(ip("10.0.0.4")).err(), Some(Refused::Full));
        assert_eq!(a.connections(), 6, "refusals hold no place");
        drop(t1);
        assert_eq!(a.connections(), 5);
        let _t4 = a.admit(ip("10.0.0.5")).unwrap();
    }

    #[test]
    fn places_are_given_back_and_empty_addresses_forgotten() {
        let a = admission(100, 10, 10);
        let tickets: Vec<Ticket> = (0..10).map(|_| a.admit(ip("2001:db8::1")).unwrap()).collect();
        assert_eq!(
            a.admit(ip("2001:db8::ffff")).err(),
            Some(Refused::TooManyConnections),
            "one /64 is one address"
        );
        drop(tickets);
        assert_eq!(a.connections(), 0);
        assert!(a.stripes.iter().all(|s| s.lock().unwrap().is_empty()));
        let _t = a.admit(ip("2001:db8::1")).unwrap();
    }

    #[test]
    fn the_default_total_leaves_the_reserve() {
        let l = Limits::default();
        assert_eq!(l.total(Some(20_000)), 20_000 - 64);
        assert_eq!(l.total(None), usize::MAX);
        let fixed = Limits {
            max_connections: 10,
            ..l
        };
        assert_eq!(fixed.total(Some(20_000)), 10);
    }
}
