//! A cluster on this machine: one `sai-im services` process on MySQL and three `sai-im gateway`
//! processes, sharing the route directory in Redis (a key prefix of the test's own), with real
//! WebSocket clients spread across the gateways.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{drop_database, Server};
use serde_json::json;
use std::time::Duration;

struct Cluster {
    services: Server,
    gateways: Vec<Server>,
    redis: String,
    prefix: String,
    database: (String, String),
}

impl Cluster {
    fn start(gateways: u32) -> Cluster {
        let redis = std::env::var("SAI_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mysql = std::env::var("SAI_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
        let tag = format!("{}_{}", std::process::id(), rand_tag());
        let prefix = format!("sai-e2e:{tag}:");
        let database = (mysql.clone(), format!("sai_cluster_{tag}"));
        let url = format!("{mysql}/{}?pool=8", database.1);
        let services = Server::start_as(
            Some("services"),
            &[
                "--redis-url",
                &redis,
                "--redis-prefix",
                &prefix,
                "--database-url",
                &url,
                "--internal-listen",
                "127.0.0.1:0",
                "--require-friendship",
                "false",
            ],
        );
        let internal = services.field("internal").expect("internal address");
        let mut c = Cluster {
            services,
            gateways: Vec::new(),
            redis,
            prefix,
            database,
        };
        for node in 1..=gateways {
            c.gateways.push(c.gateway(node, &internal));
        }
        c
    }

    fn gateway(&self, node: u32, internal: &str) -> Server {
        let g = Server::start_as(
            Some("gateway"),
            &[
                "--redis-url",
                &self.redis,
                "--redis-prefix",
                &self.prefix,
                "--services",
                internal,
                "--node",
                &node.to_string(),
            ],
        );
        assert_eq!(g.field("node").as_deref(), Some(node.to_string().as_str()));
        g
    }

    /// A client of `user` (id, token) on gateway `i`, once the services see it online (its
    /// route reaches Redis after the upgrade, asynchronously).
    fn connect(&self, i: usize, user: &(String, String)) -> common::Client {
        let c = common::Client::connect(&self.gateways[i].ws, &user.1).unwrap_or_else(|e| panic!("connect: {e}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (st, v) = self
                .services
                .get(&format!("/v1/presence?userIds={}", user.0), Some(&user.1));
            assert_eq!(st, 200, "{v}");
            if v["online"][&user.0] == true {
                return c;
            }
            assert!(std::time::Instant::now() < deadline, "{} never showed online", user.0);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for g in &mut self.gateways {
            g.stop(false);
        }
        self.services.stop(false);
        drop_database(&self.database.0, &self.database.1);
    }
}

fn rand_tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_007)
        .unwrap_or(0)
}

#[test]
fn private_and_group_chat_cross_gateways_in_order_exactly_once() {
    let c = Cluster::start(3);
    let s = &c.services;
    let alice = s.user("alice");
    let (bob, carol) = (s.user("bob"), s.user("carol"));
    let ta = alice.1.clone();
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(1, &bob);
    let mut k = c.connect(2, &carol);
    let (bob, carol) = (bob.0, carol.0);
    for i in 1..=20 {
        a.chat(&bob, &format!("ab{i}"), &format!("hello {i}"));
        let ack = a.recv();
        assert_eq!(ack["data"]["seq"], i, "{ack}");
    }
    for i in 1..=20 {
        let p = b.recv();
        assert_eq!(
            (p["method"].as_str(), p["data"]["seq"].as_i64()),
            (Some("push"), Some(i)),
            "{p}"
        );
        assert_eq!(p["data"]["msg"]["content"], format!("hello {i}"));
    }
    assert!(b.try_recv(Duration::from_millis(300)).is_none(), "each push once");

    let (st, g) = s.post(
        "/v1/groups",
        &json!({"name": "team", "memberIds": [bob, carol]}),
        Some(&ta),
    );
    assert_eq!(st, 201, "{g}");
    let gid = g["groupId"].as_str().unwrap().to_string();
    for i in 1..=10 {
        a.send(&json!({"frameType": 0, "id": format!("g{i}"), "method": "conversation.chat",
            "data": {"chatType": 1, "recvId": gid, "clientMsgId": format!("gm{i}"), "msg": {"mType": 0, "content": format!("g{i}")}}}));
        assert_eq!(a.recv()["data"]["seq"], i);
    }
    for member in [&mut b, &mut k] {
        let seqs: Vec<i64> = (0..10)
            .map(|_| member.recv()["data"]["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<i64>>());
        assert!(member.try_recv(Duration::from_millis(300)).is_none(), "each push once");
    }
}

#[test]
fn a_login_on_another_gateway_closes_the_first_with_4001() {
    let c = Cluster::start(2);
    let s = &c.services;
    let alice = s.user("alice");
    let bob = s.user("bob");
    let mut first = c.connect(0, &bob);
    let mut second = common::Client::connect(&c.gateways[1].ws, &bob.1).unwrap();
    assert_eq!(
        first.expect_close().0,
        4001,
        "the older login, on the other gateway, goes"
    );
    let mut a = c.connect(0, &alice);
    a.chat(&bob.0, "m1", "to the new login");
    a.recv();
    let p = second.recv();
    assert_eq!(p["data"]["msg"]["content"], "to the new login");
}

#[test]
fn offline_messages_arrive_by_sync_and_a_killed_gateway_is_left_behind() {
    let mut c = Cluster::start(2);
    let alice = c.services.user("alice");
    let bob_user = c.services.user("bob");
    let bob = bob_user.0.clone();
    let mut a = c.connect(0, &alice);
    for i in 1..=5 {
        a.chat(&bob, &format!("o{i}"), "while you were away");
        assert_eq!(a.recv()["data"]["seq"], i);
    }
    let mut b = c.connect(1, &bob_user);
    let (pushes, _) = b.sync(json!({}));
    let seqs: Vec<i64> = pushes.iter().map(|p| p["data"]["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert!(pushes.iter().all(|p| p["data"]["sendId"] == alice.0.as_str()));
    // Bob's gateway dies; he logs in on the other one, and messages find him there.
    c.gateways[1].stop(false);
    drop(b);
    let mut b = c.connect(0, &bob_user);
    a.chat(&bob, "after", "found you");
    a.recv();
    let p = b.recv();
    assert_eq!(
        (p["data"]["seq"].as_i64(), p["data"]["msg"]["content"].as_str()),
        (Some(6), Some("found you"))
    );
}
