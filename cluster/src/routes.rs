//! The route directory of a cluster in Redis: which gateway connection each online user is on
//! (`user -> (node, shard, conn)`), which gateway processes are alive, and so who is online.
//!
//! # Keys (all under the directory's prefix, e.g. `sai:`)
//! - `route:{user}` = `"{node}:{incarnation}:{shard}:{conn}"`, expiring after the route TTL
//!   unless the gateway refreshes it (it does on every heartbeat sweep). One route per user: a
//!   login anywhere replaces the older one ([`RouteDirectory::register`] answers it, to be closed
//!   with 4001: exclusive login across gateways).
//! - `node:{node}` = the incarnation (a random number each gateway process draws at start),
//!   expiring after the node TTL unless the gateway renews it ([`RouteDirectory::announce`]).
//!
//! # Stale routes
//! A route counts only while its node key holds its incarnation: the routes of a gateway that
//! died stop counting when its node key expires (the node TTL, seconds), not when each route
//! would (the route TTL), and a restarted gateway that reuses its node id does not inherit the
//! routes of its previous life (their connection ids could name its new connections). Lookups
//! drop stale routes from their answer and delete them (compare-and-delete: a newer login that
//! took the key meanwhile is kept).
//!
//! # Losing Redis
//! Redis holds nothing that cannot be rebuilt: after a `FLUSHALL` or a restart without data,
//! [`RouteDirectory::announce`] puts the node key back and [`RouteDirectory::refresh`] puts back
//! every route of the connections the gateway still holds (`Healed`). Until then a lookup finds
//! the user offline and the message waits in storage for sync: nothing durable lives here. While
//! Redis is unreachable every call fails within the response timeout ([`RESPONSE_TIMEOUT`]) and
//! the connection manager reconnects by itself.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use sai_pipeline::flow::{BorrowedFuture, Route, RouteLookup};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for one Redis answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait to (re)connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Routes per refresh or lookup round trip; larger batches are split.
pub const BATCH: usize = 512;

/// Why a directory call failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Redis is unreachable or answered with an error; the caller retries on its next turn.
    #[error("route directory unavailable: {0}")]
    Unavailable(String),
    /// Another live process holds this node id.
    #[error("node id {node} is held by another live gateway process")]
    NodeTaken {
        /// The node id.
        node: u32,
    },
}

/// Redis commands of this process that failed (every error passes the conversion below).
static REDIS_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many Redis commands of this process's route directory have failed since it started.
pub fn redis_errors() -> u64 {
    REDIS_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

impl From<redis::RedisError> for RouteError {
    fn from(e: redis::RedisError) -> Self {
        REDIS_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RouteError::Unavailable(e.to_string())
    }
}

/// What [`RouteDirectory::refresh`] found for one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// Still the user's route; its TTL starts again.
    Kept,
    /// The key was gone (expired, or Redis lost it): written again.
    Healed,
    /// Another connection holds the user now (a newer login): this one should be closed.
    Replaced,
}

/// Durations of the directory.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    /// A route not refreshed for this long expires.
    pub route: Duration,
    /// A node not announced for this long is dead, and its routes with it.
    pub node: Duration,
}

impl Default for Ttls {
    fn default() -> Self {
        Self {
            route: Duration::from_secs(120),
            node: Duration::from_secs(15),
        }
    }
}

/// `SET key value PX ttl` unless another live process holds the node: 1 renewed, 2 written
/// (the key was missing), 0 taken.
const ANNOUNCE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if cur then return 1 end
return 2";

/// What [`RouteDirectory::announce`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// The node key was there: its TTL starts again.
    Renewed,
    /// The node key was missing (the first announce, or Redis lost it): the gateway's routes
    /// may be gone too, and are refreshed at once.
    Written,
}

/// For each key/value pair: 1 kept (TTL renewed), 2 healed (written again), 0 replaced.
/// ARGV[1] is the TTL in ms; ARGV[i + 1] the value of KEYS[i].
const REFRESH: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local want = ARGV[i + 1]
  local cur = redis.call('GET', key)
  if cur == want then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  elseif not cur then
    redis.call('SET', key, want, 'PX', ARGV[1])
    out[i] = 2
  else
    out[i] = 0
  end
end
return out";

/// Deletes KEYS[i] if it still holds ARGV[i]; the number deleted.
const REMOVE: &str = r"
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n";

/// A handle on the directory, for one node (gateway process) or for a reader (services).
#[derive(Clone)]
pub struct RouteDirectory {
    conn: ConnectionManager,
    prefix: String,
    ttls: Ttls,
    scripts: Arc<Scripts>,
}

struct Scripts {
    announce: Script,
    refresh: Script,
    remove: Script,
}

/// A route as the directory stores it: the route and its node's incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Where the connection is.
    pub route: Route,
    /// The life of its gateway process the route belongs to.
    pub incarnation: u64,
}

impl Placed {
    fn encode(&self) -> String {
        let r = self.route;
        format!("{}:{}:{}:{}", r.node, self.incarnation, r.shard, r.conn)
    }

    fn decode(s: &str) -> Option<Placed> {
        let mut it = s.split(':');
        let node = it.next()?.parse().ok()?;
        let incarnation = it.next()?.parse().ok()?;
        let shard = it.next()?.parse().ok()?;
        let conn = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Placed {
            route: Route { node, shard, conn },
            incarnation,
        })
    }
}

/// A connection to the Redis at `url` that reconnects by itself, with the timeouts every
/// cluster call has (the directory's and the bus's alike).
pub(crate) async fn connection(url: &str) -> Result<ConnectionManager, RouteError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

impl RouteDirectory {
    /// Connects to Redis at `url` (`redis://host:port/db`); every key gets `prefix`.
    pub async fn connect(url: &str, prefix: &str, ttls: Ttls) -> Result<Self, RouteError> {
        Ok(Self {
            conn: connection(url).await?,
            prefix: prefix.to_string(),
            ttls,
            scripts: Arc::new(Scripts {
                announce: Script::new(ANNOUNCE),
                refresh: Script::new(REFRESH),
                remove: Script::new(REMOVE),
            }),
        })
    }

    fn route_key(&self, user: &str) -> String {
        format!("{}route:{user}", self.prefix)
    }

    fn node_key(&self, node: u32) -> String {
        format!("{}node:{node}", self.prefix)
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks `node` alive in this `incarnation` for the node TTL; call it well within the TTL
    /// (a third of it). Fails with [`RouteError::NodeTaken`] while another live process holds
    /// the node id.
    pub async fn announce(&self, node: u32, incarnation: u64) -> Result<Announced, RouteError> {
        let set: i64 = self
            .scripts
            .announce
            .key(self.node_key(node))
            .arg(incarnation.to_string())
            .arg(Self::ms(self.ttls.node))
            .invoke_async(&mut self.conn.clone())
            .await?;
        match set {
            1 => Ok(Announced::Renewed),
            2 => Ok(Announced::Written),
            _ => Err(RouteError::NodeTaken { node }),
        }
    }

    /// Ends `node`'s life now (a graceful stop): its routes stop counting at once.
    pub async fn retire(&self, node: u32, incarnation: u64) -> Result<(), RouteError> {
        let _: i64 = self
            .scripts
            .remove
            .key(self.node_key(node))
            .arg(incarnation.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Makes `placed` the user's route; answers the previous one if it is live and another
    /// connection (to be closed: one login per user across the cluster).
    pub async fn register(&self, user: &str, placed: Placed) -> Result<Option<Route>, RouteError> {
        let old: Option<String> = redis::cmd("SET")
            .arg(self.route_key(user))
            .arg(placed.encode())
            .arg("PX")
            .arg(Self::ms(self.ttls.route))
            .arg("GET")
            .query_async(&mut self.conn.clone())
            .await?;
        let Some(old) = old.as_deref().and_then(Placed::decode) else {
            return Ok(None);
        };
        if old == placed || !self.live(&[old]).await?.first().copied().unwrap_or(false) {
            return Ok(None);
        }
        Ok(Some(old.route))
    }

    /// Renews the routes of connections a gateway holds, writing back any Redis lost; one
    /// answer per entry, in order.
    pub async fn refresh(&self, routes: &[(&str, Placed)]) -> Result<Vec<Refreshed>, RouteError> {
        let mut out = Vec::with_capacity(routes.len());
        for chunk in routes.chunks(BATCH) {
            let mut call = self.scripts.refresh.prepare_invoke();
            call.arg(Self::ms(self.ttls.route));
            for (user, placed) in chunk {
                call.key(self.route_key(user));
                call.arg(placed.encode());
            }
            let codes: Vec<i64> = call.invoke_async(&mut self.conn.clone()).await?;
            if codes.len() != chunk.len() {
                return Err(RouteError::Unavailable(format!(
                    "refresh answered {} codes for {} routes",
                    codes.len(),
                    chunk.len()
                )));
            }
            out.extend(codes.into_iter().map(|c| match c {
                1 => Refreshed::Kept,
                2 => Refreshed::Healed,
                _ => Refreshed::Replaced,
            }));
        }
        Ok(out)
    }

    /// Forgets the user's route if it is still `placed` (a newer login is kept).
    pub async fn remove(&self, user: &str, placed: Placed) -> Result<bool, RouteError> {
        let n: i64 = self
            .scripts
            .remove
            .key(self.route_key(user))
            .arg(placed.encode())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// The live route of each user (`None`: offline), in order. Stale routes (their gateway is
    /// dead or restarted) are answered `None` and deleted.
    pub async fn lookup(&self, users: &[&str]) -> Result<Vec<Option<Route>>, RouteError> {
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(BATCH) {
            let keys: Vec<String> = chunk.iter().map(|u| self.route_key(u)).collect();
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut self.conn.clone())
                .await?;
            let placed: Vec<Option<Placed>> = values.iter().map(|v| v.as_deref().and_then(Placed::decode)).collect();
            let found: Vec<Placed> = placed.iter().flatten().copied().collect();
            let live = self.live(&found).await?;
            let mut live = live.into_iter();
            let mut stale_keys = Vec::new();
            let mut stale_values = Vec::new();
            for (i, p) in placed.into_iter().enumerate() {
                let route = match p {
                    Some(p) if live.next().unwrap_or(false) => Some(p.route),
                    Some(p) => {
                        stale_keys.push(keys[i].clone());
                        stale_values.push(p.encode());
                        None
                    }
                    None => None,
                };
                out.push(route);
            }
            if !stale_keys.is_empty() {
                let mut call = self.scripts.remove.prepare_invoke();
                for (k, v) in stale_keys.iter().zip(&stale_values) {
                    call.key(k);
                    call.arg(v);
                }
                let removed: i64 = call.invoke_async(&mut self.conn.clone()).await?;
                tracing::debug!(removed, "stale routes deleted");
            }
        }
        Ok(out)
    }

    /// Whether each user is online (has a live route).
    pub async fn online(&self, users: &[&str]) -> Result<Vec<bool>, RouteError> {
        Ok(self.lookup(users).await?.into_iter().map(|r| r.is_some()).collect())
    }

    /// Whether each placed route's node is alive in that incarnation, in order.
    async fn live(&self, placed: &[Placed]) -> Result<Vec<bool>, RouteError> {
        if placed.is_empty() {
            return Ok(Vec::new());
        }
        let nodes: BTreeSet<u32> = placed.iter().map(|p| p.route.node).collect();
        let nodes: Vec<u32> = nodes.into_iter().collect();
        let keys: Vec<String> = nodes.iter().map(|n| self.node_key(*n)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await?;
        let alive: HashMap<u32, u64> = nodes
            .iter()
            .zip(values)
            .filter_map(|(n, v)| Some((*n, v?.parse().ok()?)))
            .collect();
        Ok(placed
            .iter()
            .map(|p| alive.get(&p.route.node) == Some(&p.incarnation))
            .collect())
    }
}

/// The pipeline's lookups (`Outbound`) in a services process.
impl RouteLookup for RouteDirectory {
    fn lookup_many<'a>(&'a self, users: &'a [String]) -> BorrowedFuture<'a, Vec<Option<Route>>> {
        Box::pin(async move {
            let names: Vec<&str> = users.iter().map(String::as_str).collect();
            match self.lookup(&names).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(error = %e, users = users.len(), "route lookup failed: the users will sync");
                    vec![None; users.len()]
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_routes_round_trip_and_garbage_is_refused() {
        let p = Placed {
            route: Route {
                node: 3,
                shard: 1,
                conn: u64::MAX,
            },
            incarnation: 77,
        };
        assert_eq!(Placed::decode(&p.encode()), Some(p));
        for bad in ["", "1:2:3", "1:2:3:4:5", "a:2:3:4", "1:2:3:-4"] {
            assert_eq!(Placed::decode(bad), None, "{bad}");
        }
    }
}
