//! The route directory against a real Redis: the one on this machine (`SAI_TEST_REDIS_URL`,
//! default `redis://127.0.0.1:6379`) under a prefix of each test's own, and a private
//! `redis-server` the restart test kills and starts again. Every key the directory writes has
//! a TTL, so nothing outlives a failed test for long.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use sai_cluster::routes::{Announced, Placed, Refreshed, RouteDirectory, RouteError, Ttls};
use sai_pipeline::flow::{Route, RouteLookup};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn redis_url() -> String {
    std::env::var("SAI_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "sai-test:{}:{}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn directory(url: &str, prefix: &str) -> RouteDirectory {
    RouteDirectory::connect(url, prefix, Ttls::default())
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} (SAI_TEST_REDIS_URL): {e}"))
}

fn placed(node: u32, incarnation: u64, conn: u64) -> Placed {
    Placed {
        route: Route { node, shard: 0, conn },
        incarnation,
    }
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key under `prefix` (what a FLUSHALL would do to this test's keys).
async fn wipe(url: &str, prefix: &str) {
    let mut c = raw(url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut c).await.unwrap();
    }
}

#[tokio::test]
async fn one_login_per_user_across_gateways() {
    let (url, p) = (redis_url(), prefix());
    let d = directory(&url, &p).await;
    d.announce(1, 11).await.unwrap();
    d.announce(2, 22).await.unwrap();
    let on_a = placed(1, 11, 5);
    let on_b = placed(2, 22, 9);
    assert_eq!(d.register("alice", on_a).await.unwrap(), None);
    assert_eq!(
        d.register("alice", on_a).await.unwrap(),
        None,
        "the same connection again"
    );
    assert_eq!(
        d.register("alice", on_b).await.unwrap(),
        Some(on_a.route),
        "a login on B names A's connection, to be closed"
    );
    assert!(
        !d.remove("alice", on_a).await.unwrap(),
        "A's late goodbye keeps B's route"
    );
    assert_eq!(d.lookup(&["alice", "bob"]).await.unwrap(), vec![Some(on_b.route), None]);
    assert_eq!(d.online(&["alice", "bob"]).await.unwrap(), vec![true, false]);
    assert!(d.remove("alice", on_b).await.unwrap());
    assert_eq!(d.lookup(&["alice"]).await.unwrap(), vec![None]);
    wipe(&url, &p).await;
}

#[tokio::test]
async fn routes_of_dead_or_restarted_gateways_are_dropped_and_deleted() {
    let (url, p) = (redis_url(), prefix());
    let d = directory(&url, &p).await;
    d.announce(1, 100).await.unwrap();
    d.announce(2, 200).await.unwrap();
    let users: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        let node = if i % 2 == 0 { 1 } else { 2 };
        d.register(u, placed(node, u64::from(node) * 100, i as u64))
            .await
            .unwrap();
    }
    // Node 1 stops (its key is gone, as when its TTL runs out); node 2 restarts with a new
    // incarnation under the same id.
    d.retire(1, 100).await.unwrap();
    d.retire(2, 200).await.unwrap();
    d.announce(2, 201).await.unwrap();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let found = d.lookup(&names).await.unwrap();
    assert!(found.iter().all(Option::is_none), "no route of a dead life counts");
    let mut c = raw(&url).await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}route:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(left.is_empty(), "stale routes are deleted: {} left", left.len());
    // A login on the restarted node is not told to close a connection of the dead life.
    d.register("u0", placed(1, 100, 0)).await.unwrap();
    assert_eq!(d.register("u0", placed(2, 201, 7)).await.unwrap(), None);
    wipe(&url, &p).await;
}

#[tokio::test]
async fn a_node_id_is_held_by_one_live_process() {
    let (url, p) = (redis_url(), prefix());
    let d = directory(&url, &p).await;
    assert_eq!(d.announce(5, 1).await.unwrap(), Announced::Written);
    assert_eq!(d.announce(5, 1).await.unwrap(), Announced::Renewed);
    assert!(matches!(d.announce(5, 2).await, Err(RouteError::NodeTaken { node: 5 })));
    d.retire(5, 2).await.unwrap();
    assert!(
        d.announce(5, 2).await.is_err(),
        "retiring another life's key does nothing"
    );
    d.retire(5, 1).await.unwrap();
    d.announce(5, 2).await.unwrap();
    wipe(&url, &p).await;
}

#[tokio::test]
async fn refresh_renews_heals_after_a_flush_and_reports_replaced() {
    let (url, p) = (redis_url(), prefix());
    let d = directory(&url, &p).await;
    d.announce(1, 1).await.unwrap();
    d.announce(2, 2).await.unwrap();
    let a = placed(1, 1, 1);
    let b = placed(1, 1, 2);
    d.register("a", a).await.unwrap();
    d.register("b", b).await.unwrap();
    let mut c = raw(&url).await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{p}route:a"))
        .query_async(&mut c)
        .await
        .unwrap();
    let route_ttl = Ttls::default().route.as_millis() as i64;
    assert!(ttl > 0 && ttl <= route_ttl, "routes expire: {ttl} ms");
    // b logged in again on node 2.
    d.register("b", placed(2, 2, 9)).await.unwrap();
    assert_eq!(
        d.refresh(&[("a", a), ("b", b)]).await.unwrap(),
        vec![Refreshed::Kept, Refreshed::Replaced]
    );
    // Redis loses everything: lookups find nobody until the gateways' next sweep puts it back.
    wipe(&url, &p).await;
    assert_eq!(d.lookup(&["a"]).await.unwrap(), vec![None]);
    assert_eq!(
        d.announce(1, 1).await.unwrap(),
        Announced::Written,
        "the gateway learns that Redis lost its keys"
    );
    assert_eq!(d.refresh(&[("a", a)]).await.unwrap(), vec![Refreshed::Healed]);
    assert_eq!(d.lookup(&["a"]).await.unwrap(), vec![Some(a.route)]);
    // Batches larger than one round trip.
    let many: Vec<(String, Placed)> = (0..1300).map(|i| (format!("m{i}"), placed(1, 1, i))).collect();
    let refs: Vec<(&str, Placed)> = many.iter().map(|(u, pl)| (u.as_str(), *pl)).collect();
    let codes = d.refresh(&refs).await.unwrap();
    assert_eq!(codes.len(), 1300);
    assert!(codes.iter().all(|c| *c == Refreshed::Healed));
    let names: Vec<&str> = refs.iter().map(|(u, _)| *u).collect();
    let found = d.lookup(&names).await.unwrap();
    assert!(found
        .iter()
        .enumerate()
        .all(|(i, r)| r.map(|r| r.conn) == Some(i as u64)));
    wipe(&url, &p).await;
}

/// A private Redis server on a free port, killed when dropped.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis { child, port }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_redis_restart_fails_calls_quickly_and_the_next_sweep_heals() {
    let port = PrivateRedis::free_port();
    let server = PrivateRedis::start(port);
    let d = directory(&server.url(), "sai:").await;
    d.announce(1, 1).await.unwrap();
    let a = placed(1, 1, 1);
    d.register("a", a).await.unwrap();
    drop(server); // kill -9
    let t0 = Instant::now();
    let down = d.lookup(&["a"]).await;
    assert!(matches!(down, Err(RouteError::Unavailable(_))), "{down:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "a dead Redis answers within the timeouts"
    );
    let _server = PrivateRedis::start(port); // back, empty
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The gateway's sweep: announce, then refresh what it holds.
        if d.announce(1, 1).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the connection manager reconnects");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(d.refresh(&[("a", a)]).await.unwrap(), vec![Refreshed::Healed]);
    assert_eq!(d.lookup(&["a"]).await.unwrap(), vec![Some(a.route)]);
}

/// The pipeline's view: lookups through `RouteLookup`, and a Redis that is down answers
/// everyone offline (their messages wait for sync) instead of failing the send.
#[tokio::test]
async fn the_pipeline_looks_routes_up_and_treats_a_dead_redis_as_offline() {
    let server = PrivateRedis::start(PrivateRedis::free_port());
    let d = directory(&server.url(), "sai:").await;
    d.announce(1, 1).await.unwrap();
    d.register("a", placed(1, 1, 3)).await.unwrap();
    let lookup: std::sync::Arc<dyn RouteLookup> = std::sync::Arc::new(d);
    assert_eq!(
        lookup.lookup_many(&["a".into(), "b".into()]).await,
        vec![Some(placed(1, 1, 3).route), None]
    );
    drop(server);
    assert_eq!(lookup.lookup_many(&["a".into()]).await, vec![None]);
}
