//! A cluster on this machine: one `sai-im services` process on MySQL and three `sai-im gateway`
//! processes, sharing the route directory in Redis (a key prefix of the test's own), with real
//! WebSocket clients spread across the gateways. Through Kafka, the cluster is the production
//! wiring whole: its messages live in a MongoDB chat log (a database of the test's own).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::otlp::{self, Collector};
use common::{drop_database, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// The secret of the test clusters' internal port.
const KEY: &str = "test-cluster-key-0123";

/// The token secret every services process of a test cluster shares.
const JWT_SECRET: &str = "test-cluster-jwt-secret-0123";

struct Cluster {
    services: Server,
    gateways: Vec<Server>,
    redis: String,
    prefix: String,
    database: (String, String),
    /// `--kafka` and `--kafka-prefix` when chat goes through Kafka.
    kafka: Vec<String>,
    /// More arguments of every gateway.
    gateway_args: Vec<String>,
    /// The MongoDB database of the chat log, if it has one.
    chat_log: Option<String>,
}

/// The Kafka-protocol broker of the tests (`scripts/backends.sh kafka` starts one).
fn kafka_brokers() -> String {
    std::env::var("SAI_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A services process of a test cluster, its internal port at `internal`.
fn start_services(redis: &str, prefix: &str, database_url: &str, internal: &str, extra: &[String]) -> Server {
    let mut args = vec![
        "--cluster-key",
        KEY,
        "--redis-url",
        redis,
        "--redis-prefix",
        prefix,
        "--database-url",
        database_url,
        "--internal-listen",
        internal,
        "--require-friendship",
        "false",
        "--jwt-secret",
        JWT_SECRET,
    ];
    args.extend(extra.iter().map(String::as_str));
    Server::start_as(Some("services"), &args)
}

/// How the chat flows run: over the internal port, or through the Kafka topics of a broker.
#[derive(Clone, Debug, PartialEq)]
enum Flows {
    Grpc,
    Kafka(String),
}

impl Flows {
    /// Through the tests' broker.
    fn kafka() -> Flows {
        Flows::Kafka(kafka_brokers())
    }
}

impl Cluster {
    fn start(gateways: u32) -> Cluster {
        Self::start_on("127.0.0.1:0", gateways, Flows::Grpc)
    }

    /// With the services' internal port at `internal` (a fixed port survives a restart).
    fn start_on(internal: &str, gateways: u32, flows: Flows) -> Cluster {
        Self::start_with(internal, gateways, flows, &[], &[])
    }

    /// With more arguments for the services process and for each gateway.
    fn start_with(
        internal: &str,
        gateways: u32,
        flows: Flows,
        services_args: &[String],
        gateway_args: &[String],
    ) -> Cluster {
        let redis = std::env::var("SAI_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mysql = std::env::var("SAI_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
        let tag = format!("{}_{}", std::process::id(), rand_tag());
        let prefix = format!("sai-e2e:{tag}:");
        let database = (mysql.clone(), format!("sai_cluster_{tag}"));
        let url = format!("{mysql}/{}?pool=8", database.1);
        // Topics and groups of the test's own.
        let kafka = match flows {
            Flows::Grpc => Vec::new(),
            Flows::Kafka(brokers) => vec![
                "--kafka".into(),
                brokers,
                "--kafka-prefix".into(),
                format!("sai-e2e.{tag}."),
                "--kafka-partitions".into(),
                "4".into(),
            ],
        };
        // Through Kafka, the chat log is in MongoDB.
        let chat_log = (!kafka.is_empty()).then(|| format!("sai_e2e_{tag}"));
        let log_args = match &chat_log {
            Some(db) => vec!["--chat-log".to_string(), format!("{}/{db}", common::mongo_server())],
            None => Vec::new(),
        };
        let extra: Vec<String> = kafka.iter().chain(&log_args).chain(services_args).cloned().collect();
        let services = start_services(&redis, &prefix, &url, internal, &extra);
        let internal = services.field("internal").expect("internal address");
        let mut c = Cluster {
            services,
            gateways: Vec::new(),
            redis,
            prefix,
            database,
            kafka,
            gateway_args: gateway_args.to_vec(),
            chat_log,
        };
        for node in 1..=gateways {
            c.gateways.push(c.gateway(node, &internal));
        }
        c
    }

    fn gateway(&self, node: u32, internal: &str) -> Server {
        let node_s = node.to_string();
        let mut args = vec![
            "--cluster-key",
            KEY,
            "--redis-url",
            &self.redis,
            "--redis-prefix",
            &self.prefix,
            "--services",
            internal,
            "--node",
            &node_s,
        ];
        args.extend(self.kafka.iter().chain(&self.gateway_args).map(String::as_str));
        let g = Server::start_as(Some("gateway"), &args);
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

impl Cluster {
    /// A task process of this cluster (through Kafka): its broker, topics, database and chat log.
    fn task(&self) -> Server {
        let url = format!("{}/{}?pool=4", self.database.0, self.database.1);
        let mut args: Vec<String> = self.kafka.clone();
        args.extend(["--database-url".into(), url]);
        if let Some(db) = &self.chat_log {
            args.extend(["--chat-log".into(), format!("{}/{db}", common::mongo_server())]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Server::start_as(Some("task"), &args);
        assert!(
            t.field("topic").is_some_and(|topic| topic.ends_with("msg_to_mongo")),
            "{}",
            t.ready
        );
        t
    }

    /// A gateway (node 9) with a wrong cluster key, and `extra` arguments: every call it makes
    /// to the services is refused.
    fn cut_off_gateway(&self, extra: &[&str]) -> Server {
        let internal = self.services.field("internal").expect("internal address");
        let mut args = vec![
            "--cluster-key",
            "not-the-cluster-key",
            "--redis-url",
            &self.redis,
            "--redis-prefix",
            &self.prefix,
            "--services",
            &internal,
            "--node",
            "9",
        ];
        args.extend_from_slice(extra);
        Server::start_as(Some("gateway"), &args)
    }

    /// Waits until the route directory holds `user`'s connection on gateway node `node`.
    fn await_route(&self, user: &str, node: u32) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ttls = sai_cluster::routes::Ttls::default();
            let d = sai_cluster::routes::RouteDirectory::connect(&self.redis, &self.prefix, ttls)
                .await
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while d.lookup(&[user]).await.unwrap()[0].map(|r| r.node) != Some(node) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{user}'s route never reached node {node}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for g in &mut self.gateways {
            g.stop(false);
        }
        self.services.stop(false);
        drop_database(&self.database.0, &self.database.1);
        if let Some(db) = &self.chat_log {
            common::drop_mongo_database(db);
        }
    }
}

/// A test over the internal port, and the same test through Kafka.
macro_rules! over_both {
    ($grpc:ident, $kafka:ident, $body:ident) => {
        #[test]
        fn $grpc() {
            $body(Flows::Grpc);
        }

        #[test]
        fn $kafka() {
            $body(Flows::kafka());
        }
    };
}

/// A loopback port nothing listens on now (for a process that must come back on the same one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rand_tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_007)
        .unwrap_or(0)
}

over_both!(
    private_and_group_chat_cross_gateways_in_order_exactly_once,
    through_kafka_private_and_group_chat_cross_gateways_in_order_exactly_once,
    chat_across_gateways
);

fn chat_across_gateways(flows: Flows) {
    let c = Cluster::start_on("127.0.0.1:0", 3, flows);
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

over_both!(
    a_chat_message_is_one_trace_across_the_gateways_and_the_services,
    through_kafka_a_chat_message_is_one_trace_across_the_gateways_and_the_services,
    traced_across_processes
);

/// The trace of one message sent on gateway 1 to a user on gateway 2: each process's span
/// hangs under the one before it, with the context carried in gRPC metadata and the delivery
/// stream, or in Kafka headers.
fn traced_across_processes(flows: Flows) {
    let otlp = Collector::start();
    let traced = ["--otlp-endpoint".to_string(), otlp.endpoint.clone()];
    let c = Cluster::start_with("127.0.0.1:0", 2, flows, &traced, &traced);
    let s = &c.services;
    let (alice, bob) = (s.user("alice"), s.user("bob"));
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(1, &bob);
    a.chat(&bob.0, "traced-1", "across");
    assert_eq!(a.recv()["data"]["seq"], 1);
    assert_eq!(b.recv()["data"]["clientMsgId"], "traced-1");

    let spans = otlp.wait_for("the message's trace", |s| otlp::trace_of(s, "traced-1").len() >= 5);
    let trace = otlp::trace_of(&spans, "traced-1");
    let receive = otlp::one(&trace, "chat receive");
    let process = otlp::one(&trace, "chat process");
    let store = otlp::one(&trace, "store append");
    let send = otlp::one(&trace, "ms2ps_chat send");
    let push = otlp::one(&trace, "push");
    let chain = [
        (receive, "", "sai-im-gateway"),
        (process, receive.span_id.as_str(), "sai-im-services"),
        (store, process.span_id.as_str(), "sai-im-services"),
        (send, process.span_id.as_str(), "sai-im-services"),
        (push, send.span_id.as_str(), "sai-im-gateway"),
    ];
    for (span, parent, service) in chain {
        assert_eq!(
            (span.parent.as_str(), span.service.as_str()),
            (parent, service),
            "{span:#?}"
        );
    }
    assert_eq!(receive.attributes["sai.seq"], "1");
    assert_eq!(process.attributes["sai.client_msg_id"], "traced-1");
    assert_eq!(push.attributes["sai.seq"], "1");
    let gateways: std::collections::BTreeSet<_> = trace
        .iter()
        .filter(|s| s.service == "sai-im-gateway")
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(gateways, ["chat receive", "push"].into());
}

over_both!(
    a_login_on_another_gateway_closes_the_first_with_4001,
    through_kafka_a_login_on_another_gateway_closes_the_first_with_4001,
    login_elsewhere
);

fn login_elsewhere(flows: Flows) {
    let c = Cluster::start_on("127.0.0.1:0", 2, flows);
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
    // Bob's gateway dies; he logs in on the other one, and messages find him there. (Until
    // his new route is written, the dead gateway's route still counts and a push would go
    // there, for bob's sync to fetch: presence cannot tell the two apart, the directory can.)
    c.gateways[1].stop(false);
    drop(b);
    let mut b = c.connect(0, &bob_user);
    c.await_route(&bob, 1);
    a.chat(&bob, "after", "found you");
    a.recv();
    let p = b.recv();
    assert_eq!(
        (p["data"]["seq"].as_i64(), p["data"]["msg"]["content"].as_str()),
        (Some(6), Some("found you"))
    );
}

/// Sends `key` until it is acked, resending after an error frame (the services were down) or
/// silence; the ack's data.
fn send_until_acked(a: &mut common::Client, to: &str, key: &str) -> Value {
    for _ in 0..20 {
        let id = a.chat(to, key, key);
        while let Some(f) = a.try_recv(Duration::from_secs(15)) {
            if f["id"] != id.as_str() {
                continue;
            }
            if f["frameType"] == 9 {
                assert_eq!(f["data"]["code"], "service_unavailable", "{f}");
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            return f["data"].clone();
        }
    }
    panic!("{key} never acked");
}

over_both!(
    killing_the_services_process_loses_no_acked_message,
    through_kafka_killing_the_services_process_loses_no_acked_message,
    services_killed
);

fn services_killed(flows: Flows) {
    let port = free_port();
    let mut c = Cluster::start_on(&format!("127.0.0.1:{port}"), 2, flows);
    let alice = c.services.user("alice");
    let bob = c.services.user("bob");
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(1, &bob);
    let mut acked = Vec::new();
    for i in 1..=40 {
        if i == 21 {
            // In flight when the process dies: its answer is an error or nothing, and the
            // resend of the same key is stored once.
            a.chat(&bob.0, "m21", "m21");
            c.services.restart(false);
        }
        let ack = send_until_acked(&mut a, &bob.0, &format!("m{i}"));
        acked.push(ack["seq"].as_u64().unwrap());
    }
    assert_eq!(
        acked,
        (1..=40).collect::<Vec<u64>>(),
        "every ack in order, no gap, no duplicate"
    );
    let conv = sai_pipeline::conversation::ConversationId::private(&alice.0, &bob.0).to_string();
    let (st, hist) = c
        .services
        .get(&format!("/v1/conversations/{conv}/messages?limit=100"), Some(&bob.1));
    assert_eq!(st, 200, "{hist}");
    let mut stored: Vec<(u64, String)> = hist["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["clientMsgId"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    stored.sort();
    let want: Vec<(u64, String)> = (1..=40).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(stored, want, "each message stored once, in order");
    // Bob got what was pushed while the services ran and syncs the rest: all 40, once each.
    each_once_by_push_or_sync(&mut b, 40);
}

/// `a` sends messages `m<i>` for each seq `i` of `seqs` to `b` (user `to`), the next one once
/// the last is acked with its seq and pushed to `b`.
fn chat_acked_and_pushed(
    a: &mut common::Client,
    b: &mut common::Client,
    to: &str,
    seqs: std::ops::RangeInclusive<u64>,
) {
    for i in seqs {
        a.chat(to, &format!("m{i}"), "hello");
        assert_eq!(a.recv()["data"]["seq"], i);
        assert_eq!(b.recv()["data"]["seq"], i);
    }
}

/// Every seq 1..=n reaches `b` exactly once: pushed (each push once) or, for the rest, synced.
fn each_once_by_push_or_sync(b: &mut common::Client, n: u64) {
    let mut seen = std::collections::BTreeSet::new();
    while let Some(p) = b.try_recv(Duration::from_millis(500)) {
        if p["method"] == "push" {
            assert!(seen.insert(p["data"]["seq"].as_u64().unwrap()), "pushed twice: {p}");
        }
    }
    let (pushes, _) = b.sync(json!({}));
    seen.extend(pushes.iter().map(|p| p["data"]["seq"].as_u64().unwrap()));
    assert_eq!(seen, (1..=n).collect(), "all {n} reach the recipient, pushed or synced");
}

#[test]
fn the_internal_port_refuses_a_gateway_without_the_cluster_key() {
    let c = Cluster::start(1);
    let internal = c.services.field("internal").unwrap();
    let stranger = c.cut_off_gateway(&[]);
    let bob = c.services.user("bob");
    // Its upgrade check is a call the services refuse: the client is told the service is
    // unavailable, and nothing was done for it.
    match common::Client::connect(&stranger.ws, &bob.1) {
        Err(common::ConnectError::Status(503, body)) => assert_eq!(body["code"], "service_unavailable", "{body}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a gateway without the key got a user in"),
    }
    // A process without a key does not start at all.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sai-im"))
        .args(["gateway", "--services", &internal, "--redis-url", &c.redis])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster-key"));
}

/// Two Ed25519 key pairs (PKCS#8 and SPKI PEM): the EdDSA cluster's, and a forger's.
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOvaE+U7szTB5rJkXv/r/7PqhgDN0YC7VHAjDqVx00DE\n-----END PRIVATE KEY-----\n";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAyEcxMahsg9u9g+J29m0uBR7mfaWqvJHOyy95k/9ItRc=\n-----END PUBLIC KEY-----\n";
const ED_OTHER_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIHMMIVyrxGUVLY4pGTIuB3d9ngLvqZAeXDtwAsNHSorF\n-----END PRIVATE KEY-----\n";
const ED_OTHER_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAvGXuGRPrQsRRmG22iJZEy5DyiisE+dYSU2Du7DvpN58=\n-----END PUBLIC KEY-----\n";

#[test]
fn gateways_holding_only_the_public_key_refuse_forged_tokens_themselves() {
    let dir = std::env::temp_dir().join(format!("sai-eddsa-{}-{}", std::process::id(), rand_tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (private, public) = (file("ed.key", ED_PRIVATE), file("ed.pub", ED_PUBLIC));
    let services_args = [
        "--jwt-private-key".to_string(),
        private,
        "--jwt-public-key".into(),
        public.clone(),
    ];
    let gateway_args = ["--jwt-public-key".to_string(), public.clone()];
    let c = Cluster::start_with("127.0.0.1:0", 2, Flows::Grpc, &services_args, &gateway_args);
    // EdDSA tokens from the services work on a gateway that holds only the public key.
    let (alice, bob) = (c.services.user("alice"), c.services.user("bob"));
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(1, &bob);
    a.chat(&bob.0, "eddsa-1", "signed by the services, checked by the gateways");
    let ack = a.recv();
    assert_eq!(ack["data"]["seq"], 1, "{ack}");
    let push = b.recv();
    assert_eq!(
        (push["method"].as_str(), push["data"]["seq"].as_i64()),
        (Some("push"), Some(1)),
        "{push}"
    );

    // A token of another key: a gateway whose every services call fails (a wrong cluster key)
    // still refuses it as a bad token, so the refusal was its own.
    let cut_off = c.cut_off_gateway(&["--jwt-public-key", &public]);
    let forger =
        sai_pipeline::token::JwtKeys::ed25519(ED_OTHER_PRIVATE.as_bytes(), ED_OTHER_PUBLIC.as_bytes()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let forged = forger.sign(&sai_pipeline::token::Claims {
        sub: bob.0.clone(),
        iat: now,
        exp: now + 3600,
        gen: 0,
    });
    for (token, code, status) in [
        (forged.as_str(), "invalid_token", 401),
        ("not.a.token", "malformed_token", 401),
        // A good token passes the gateway and then meets the cut-off services.
        (bob.1.as_str(), "service_unavailable", 503),
    ] {
        match common::Client::connect(&cut_off.ws, token) {
            Err(common::ConnectError::Status(st, body)) => {
                assert_eq!((st, body["code"].as_str()), (status, Some(code)), "{body}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{code}: a client got in"),
        }
    }
    // A services process, which signs, does not start with the public key alone, and opens
    // nothing before it says so.
    let refused_dir = dir.join("refused");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sai-im"))
        .args([
            "services",
            "--cluster-key",
            KEY,
            "--redis-url",
            &c.redis,
            "--jwt-public-key",
            &public,
        ])
        .arg("--data-dir")
        .arg(&refused_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jwt_private_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!refused_dir.exists(), "a refused process created its data dir");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn when_redis_loses_everything_routes_heal_within_a_sweep() {
    let c = Cluster::start(2);
    let alice = c.services.user("alice");
    let bob = c.services.user("bob");
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(1, &bob);
    // What a FLUSHALL does to this cluster's keys (other users of this Redis are left alone).
    let mut r = redis::Client::open(c.redis.as_str()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", c.prefix)).query(&mut r).unwrap();
    assert!(keys.len() >= 4, "two nodes and two routes: {keys:?}");
    let _: i64 = redis::cmd("DEL").arg(&keys).query(&mut r).unwrap();
    let online = || {
        let (_, v) = c.services.get(&format!("/v1/presence?userIds={}", bob.0), Some(&bob.1));
        v["online"][&bob.0] == true
    };
    // Bob looks offline until his gateway's next sweep (every 5 s) finds its node key gone and
    // writes every route back.
    let t0 = std::time::Instant::now();
    while !online() {
        assert!(t0.elapsed() < Duration::from_secs(12), "routes did not heal");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.chat(&bob.0, "healed", "found you again");
    a.recv();
    assert_eq!(b.recv()["data"]["msg"]["content"], "found you again");
}

/// A second services process on the same database: a logout through the first closes the
/// account's tokens on the second too (its cached account is forgotten over Redis), and so
/// does an ended friendship.
#[test]
fn a_second_services_process_hears_every_invalidation() {
    let c = Cluster::start(1);
    let db = format!("{}/{}?pool=4", c.database.0, c.database.1);
    let other = start_services(&c.redis, &c.prefix, &db, "127.0.0.1:0", &c.kafka);
    let (alice, ta) = c.services.user("alice");
    let (bob, tb) = c.services.user("bob");
    // The second process caches both facts: alice's account, and that they are friends.
    c.services.befriend(&ta, &bob, &tb);
    assert_eq!(other.get("/v1/users/me", Some(&ta)).0, 200);
    let (st, v) = other.get(&format!("/v1/presence?userIds={bob}"), Some(&ta));
    assert_eq!(st, 200, "friends on the second process: {v}");
    // Changed through the first process.
    let (st, v) = c.services.post("/v1/users/logout", &json!({}), Some(&ta));
    assert!(st == 204 || st == 200, "{st} {v}");
    let (st, _) = c.services.delete(&format!("/v1/friends/{alice}"), Some(&tb));
    assert_eq!(st, 204);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while other.get("/v1/users/me", Some(&ta)).0 != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second process still takes the revoked token"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, v) = other.post(
        "/v1/users/login",
        &json!({"username": "alice", "password": "correct horse"}),
        None,
    );
    assert_eq!(st, 200, "{v}");
    let ta2 = v["token"].as_str().unwrap().to_string();
    while other.get(&format!("/v1/presence?userIds={bob}"), Some(&ta2)).0 != 403 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second process still sees the friendship"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tansu broker of the test's own (port, SQLite storage in a directory of its own), killed
/// with SIGKILL and started again on the same port and storage.
struct Broker {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Broker {
    fn binary() -> std::path::PathBuf {
        if let Ok(b) = std::env::var("SAI_TEST_TANSU") {
            return b.into();
        }
        let home = std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
        let installed = std::path::PathBuf::from(home).join("bin/tansu");
        if installed.exists() {
            installed
        } else {
            "tansu".into()
        }
    }

    fn start() -> Broker {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sai-tansu-{}-{}", std::process::id(), rand_tag()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn(port, &dir);
        Broker { child, port, dir }
    }

    fn spawn(port: u16, dir: &std::path::Path) -> std::process::Child {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log")).unwrap();
        let child = std::process::Command::new(Self::binary())
            .current_dir(dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // Relative to the working directory (tansu reads `sqlite:///abs` as relative too).
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting tansu ({}): {e}", Self::binary().display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::spawn(self.port, &self.dir);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn through_kafka_killing_the_broker_loses_no_acked_message() {
    let mut broker = Broker::start();
    let c = Cluster::start_on("127.0.0.1:0", 2, Flows::Kafka(broker.brokers()));
    let alice = c.services.user("alice");
    let bob = c.services.user("bob");
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(1, &bob);
    let mut acked = Vec::new();
    for i in 1..=30 {
        if i == 11 {
            // In flight when the broker dies.
            a.chat(&bob.0, "m11", "m11");
            broker.kill_and_restart();
        }
        let ack = send_until_acked(&mut a, &bob.0, &format!("m{i}"));
        acked.push(ack["seq"].as_u64().unwrap());
    }
    assert_eq!(
        acked,
        (1..=30).collect::<Vec<u64>>(),
        "every ack in order, no gap, no duplicate"
    );
    each_once_by_push_or_sync(&mut b, 30);
}

/// With `--read-bitmaps task`, group read receipts reach the bitmaps only through the task
/// process: nothing while it is down (the marks wait in Kafka), all of them once it is back,
/// and none lost or doubled by a `kill -9` in the middle of its backlog.
#[test]
fn through_kafka_read_bitmaps_are_the_task_processes_work_and_survive_its_kill_9() {
    let bitmaps_by_task = ["--read-bitmaps".to_string(), "task".to_string()];
    let c = Cluster::start_with("127.0.0.1:0", 1, Flows::kafka(), &bitmaps_by_task, &[]);
    let mut task = c.task();
    let s = &c.services;
    let owner = s.user("owner");
    let members: Vec<(String, String)> = (0..6).map(|i| s.user(&format!("reader{i}"))).collect();
    let ids: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
    let (st, g) = s.post(
        "/v1/groups",
        &json!({"name": "readers", "memberIds": ids}),
        Some(&owner.1),
    );
    assert_eq!(st, 201, "{g}");
    let gid = g["groupId"].as_str().unwrap().to_string();
    let conv = sai_pipeline::conversation::ConversationId::group(&gid).to_string();
    let mut a = c.connect(0, &owner);
    let n = 20;
    for i in 1..=n {
        a.send(&json!({"frameType": 0, "id": format!("g{i}"), "method": "conversation.chat",
            "data": {"chatType": 1, "recvId": gid, "clientMsgId": format!("gm{i}"), "msg": {"mType": 0, "content": format!("g{i}")}}}));
        assert_eq!(a.recv()["data"]["seq"], i);
    }
    let reads = |seq: u64| {
        let (st, v) = s.get(
            &format!("/v1/conversations/{conv}/messages/{seq}/reads"),
            Some(&owner.1),
        );
        assert_eq!(st, 200, "{v}");
        let mut readers: Vec<String> = v["readerIds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        readers.sort();
        readers
    };
    let read = |m: &(String, String), seq: u64| {
        let (st, v) = s.post(
            &format!("/v1/conversations/{conv}/read"),
            &json!({"readSeq": seq}),
            Some(&m.1),
        );
        assert_eq!((st, v["readSeq"].as_u64()), (200, Some(seq)), "{v}");
    };
    // While the task runs, a receipt reaches the bitmaps.
    read(&members[0], 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reads(1) != [members[0].0.clone()] {
        assert!(
            std::time::Instant::now() < deadline,
            "the task never wrote the first receipt"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // With the task down, receipts are answered and their positions move; bitmaps wait.
    task.stop(false);
    for seq in 2..=n {
        for m in &members {
            read(m, seq);
        }
    }
    let (st, list) = s.get("/v1/conversations", Some(&members[5].1));
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["conversations"][0]["unread"], 0, "positions moved: {list}");
    assert_eq!(reads(n), Vec::<String>::new(), "no bitmap is written without the task");
    // Back, it works through the backlog; killed again in the middle of it, and back again.
    task.restart(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reads(n / 2).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    task.restart(false);
    let mut everyone: Vec<String> = members.iter().map(|m| m.0.clone()).collect();
    everyone.sort();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for seq in 1..=n {
        while reads(seq) != everyone {
            assert!(
                std::time::Instant::now() < deadline,
                "#{seq} read by {:?}, not all six",
                reads(seq)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // One more receipt, which only the task running now can write (its predecessor may have
    // finished the whole backlog before it was killed, leaving this one nothing to time).
    let last = n + 1;
    a.send(&json!({"frameType": 0, "id": "last", "method": "conversation.chat",
        "data": {"chatType": 1, "recvId": gid, "clientMsgId": "gm-last", "msg": {"mType": 0, "content": "last"}}}));
    assert_eq!(a.recv()["data"]["seq"], last);
    read(&members[0], last);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reads(last) != [members[0].0.clone()] {
        assert!(
            std::time::Instant::now() < deadline,
            "the last receipt was never written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every process kind serves its metrics: the task timed its batches, the services the
    // receipts, the gateway holds the owner's connection.
    let t = task.metrics();
    assert_eq!(common::metric(&t, "sai_build_info", &["role=\"task\""]), 1.0, "{t}");
    assert!(common::metric(&t, "sai_store_call_seconds_count", &["call=\"add_readers\""]) >= 1.0);
    let sm = s.metrics();
    assert_eq!(common::metric(&sm, "sai_build_info", &["role=\"services\""]), 1.0);
    let receipts = common::metric(&sm, "sai_store_call_seconds_count", &["call=\"mark_read\""]);
    assert!(receipts >= (6 * (n - 1) + 1) as f64, "{receipts} receipts");
    let g = c.gateways[0].metrics();
    assert_eq!(common::metric(&g, "sai_build_info", &["role=\"gateway\""]), 1.0);
    assert_eq!(common::metric(&g, "sai_gateway_connections", &[]), 1.0, "{g}");
    assert!(g.contains("sai_redis_errors_total 0"), "{g}");
    // The task's consumer reports (every second) that it trails msg_to_mongo by nothing now.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = task.metrics();
        let reported = t.contains("sai_kafka_consumer_lag{client=\"task\"");
        if reported && common::metric(&t, "sai_kafka_consumer_lag", &["client=\"task\""]) == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no lag of 0 reported: {t}");
        std::thread::sleep(Duration::from_millis(100));
    }
    task.stop(true);
}

/// Zero-downtime replacement of a gateway: the new process binds the same port beside the old
/// one (SO_REUSEPORT); the old one, stopped with SIGTERM, closes its clients with 1012, and
/// they reconnect to the same address, now served by the new process, and miss nothing.
#[test]
fn a_gateway_stopped_beside_its_replacement_on_the_same_port_loses_no_message() {
    let port = free_port();
    let on_port = ["--ws-listen".to_string(), format!("127.0.0.1:{port}")];
    let mut c = Cluster::start_with("127.0.0.1:0", 0, Flows::Grpc, &[], &on_port);
    let internal = c.services.field("internal").unwrap();
    c.gateways.push(c.gateway(1, &internal));
    let (alice, bob) = (c.services.user("alice"), c.services.user("bob"));
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(0, &bob);
    chat_acked_and_pushed(&mut a, &mut b, &bob.0, 1..=5);
    let next = c.gateway(2, &internal);
    assert_eq!(next.ws, c.gateways[0].ws, "both processes serve one address");
    c.gateways[0].stop(true);
    assert_eq!(a.expect_close().0, 1012);
    assert_eq!(b.expect_close().0, 1012);
    c.gateways[0] = next;
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(0, &bob);
    for i in 6..=10 {
        a.chat(&bob.0, &format!("m{i}"), "after");
        assert_eq!(a.recv()["data"]["seq"], i);
    }
    each_once_by_push_or_sync(&mut b, 10);
}

/// A graceful stop of a services process finishes the chat commands it read from Kafka and
/// commits their offsets, so that its successor reads none of them again.
#[test]
fn through_kafka_a_graceful_services_restart_reads_no_command_twice() {
    let port = free_port();
    let mut c = Cluster::start_on(&format!("127.0.0.1:{port}"), 1, Flows::kafka());
    let (alice, bob) = (c.services.user("alice"), c.services.user("bob"));
    let mut a = c.connect(0, &alice);
    for i in 1..=20 {
        a.chat(&bob.0, &format!("m{i}"), "before the restart");
        assert_eq!(a.recv()["data"]["seq"], i);
    }
    // At once, within the 100 ms between two periodic commits.
    c.services.restart(true);
    // One conversation is one partition: anything read again would run before this one.
    let ack = send_until_acked(&mut a, &bob.0, "m21");
    assert_eq!(ack["seq"], 21);
    let m = c.services.metrics();
    assert_eq!(
        common::metric(&m, "sai_pipeline_call_seconds_count", &["call=\"chat\""]),
        1.0,
        "the new process ran m21 only: {m}"
    );
}

/// Zero-downtime replacement of a services process: the new one binds the same HTTP, gRPC and
/// internal ports beside the running one (SO_REUSEPORT), the old one stops gracefully, and the
/// gateway's calls and delivery stream move to the new one with no message lost.
#[test]
fn a_services_process_started_beside_the_running_one_takes_over_its_ports() {
    let port = free_port();
    let mut c = Cluster::start_on(&format!("127.0.0.1:{port}"), 1, Flows::Grpc);
    let (alice, bob) = (c.services.user("alice"), c.services.user("bob"));
    let mut a = c.connect(0, &alice);
    let mut b = c.connect(0, &bob);
    chat_acked_and_pushed(&mut a, &mut b, &bob.0, 1..=5);
    let ports =
        |s: &Server| ["http", "grpc", "internal"].map(|k| s.field(k).unwrap_or_else(|| panic!("{k} on {}", s.ready)));
    let [http, grpc, internal] = ports(&c.services);
    let url = format!("{}/{}?pool=8", c.database.0, c.database.1);
    let same_ports = ["--http-listen".to_string(), http, "--grpc-listen".into(), grpc];
    let next = start_services(&c.redis, &c.prefix, &url, &internal, &same_ports);
    assert_eq!(ports(&next), ports(&c.services), "both processes serve the same ports");
    c.services.stop(true);
    c.services = next;
    for i in 6..=10 {
        let ack = send_until_acked(&mut a, &bob.0, &format!("m{i}"));
        assert_eq!(ack["seq"], i);
    }
    each_once_by_push_or_sync(&mut b, 10);
}
