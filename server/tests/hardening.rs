//! What a hostile client must not be able to do (issue 10): guess passwords at full speed,
//! keep using a revoked token, take every descriptor. Each test fails on the code before its fix.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::json;

fn login(s: &Server, name: &str, password: &str) -> (u16, serde_json::Value, Option<u64>) {
    s.post_retry_after("/v1/users/login", &json!({"username": name, "password": password}))
}

#[test]
fn wrong_passwords_are_slowed_down_per_account_with_retry_after() {
    let s = Server::start(&[]);
    s.user("alice");
    // Five free attempts, then the sixth is let through and starts a block.
    for i in 0..6 {
        let (st, v, _) = login(&s, "alice", "wrong password");
        assert_eq!(st, 401, "attempt {i}: {v}");
    }
    let (st, v, retry) = login(&s, "alice", "wrong password");
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["code"], "too_many_attempts");
    assert!(matches!(retry, Some(1..=2)), "Retry-After {retry:?}");
    // While blocked even the right password waits (no bcrypt is run for it).
    let (st, _, _) = login(&s, "alice", "correct horse");
    assert_eq!(st, 429);
    // Other accounts are not blocked by alice's, and a success clears an account's record:
    // bob gets five free attempts again after logging in (the blocks' timing is proven on a
    // virtual clock in `sai_services::throttle`).
    s.user("bob");
    for _ in 0..4 {
        assert_eq!(login(&s, "bob", "wrong password").0, 401);
    }
    assert_eq!(login(&s, "bob", "correct horse").0, 200);
    for _ in 0..5 {
        assert_eq!(login(&s, "bob", "wrong password").0, 401);
    }
}

#[test]
fn one_address_guessing_many_accounts_is_slowed_down() {
    let s = Server::start(&[]);
    // 20 free attempts per address, spread over accounts that each stay under their own limit.
    for i in 0..21 {
        let (st, v, _) = login(&s, &format!("nobody{}", i % 7), "wrong password");
        assert_eq!(st, 401, "attempt {i}: {v}");
    }
    let (st, v, retry) = login(&s, "nobody9", "wrong password");
    assert_eq!(st, 429, "{v}");
    assert!(retry.is_some());
}

/// A connection the server has registered (a sync round trip proves it).
fn live(s: &Server, token: &str) -> common::Client {
    let mut c = s.connect(token);
    c.sync(json!({}));
    c
}

fn refused_upgrade(s: &Server, token: &str) -> (u16, String) {
    match common::Client::connect(&s.ws, token) {
        Err(common::ConnectError::Status(st, body)) => (st, body["code"].as_str().unwrap_or("").to_string()),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

#[test]
fn logout_revokes_every_token_and_closes_the_live_session_with_4004() {
    let s = Server::start(&[]);
    let (_, token) = s.user("alice");
    let (_, second) = s.user("alice2");
    let (st, _) = s.post(
        "/v1/users/login",
        &json!({"username": "alice", "password": "correct horse"}),
        None,
    );
    assert_eq!(st, 200);
    let mut ws = live(&s, &token);
    let (st, v) = s.post("/v1/users/logout", &json!({}), Some(&token));
    assert_eq!(st, 204, "{v}");
    let (code, reason) = ws.expect_close();
    assert_eq!(code, 4004, "{reason}");
    assert_eq!(refused_upgrade(&s, &token), (401, "token_revoked".into()));
    let (st, v) = s.get("/v1/users/me", Some(&token));
    assert_eq!((st, v["code"].as_str()), (401, Some("token_revoked")));
    // Other users are untouched; a fresh login works.
    assert_eq!(s.get("/v1/users/me", Some(&second)).0, 200);
    let (st, v) = s.post(
        "/v1/users/login",
        &json!({"username": "alice", "password": "correct horse"}),
        None,
    );
    assert_eq!(st, 200);
    let fresh = v["token"].as_str().unwrap().to_string();
    live(&s, &fresh);
    assert_eq!(s.get("/v1/users/me", Some(&fresh)).0, 200);
}

#[test]
fn a_password_change_revokes_earlier_tokens() {
    let s = Server::start(&[]);
    let (_, token) = s.user("alice");
    let mut ws = live(&s, &token);
    let change = |current: &str, new: &str, token: &str| {
        s.post(
            "/v1/users/me/password",
            &json!({"currentPassword": current, "newPassword": new}),
            Some(token),
        )
    };
    let (st, v) = change("not the password", "battery staple", &token);
    assert_eq!((st, v["code"].as_str()), (401, Some("invalid_credentials")));
    let (st, v) = change("correct horse", "short", &token);
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_password")));
    let (st, v) = change("correct horse", "battery staple", &token);
    assert_eq!(st, 200, "{v}");
    let new_token = v["token"].as_str().unwrap().to_string();
    assert_eq!(ws.expect_close().0, 4004);
    assert_eq!(refused_upgrade(&s, &token), (401, "token_revoked".into()));
    live(&s, &new_token);
    assert_eq!(login(&s, "alice", "correct horse").0, 401);
    assert_eq!(login(&s, "alice", "battery staple").0, 200);
}

#[test]
fn a_disabled_account_is_closed_with_4005_and_refused_until_enabled() {
    let admin = "an admin token of some length";
    let s = Server::start(&["--admin-token", admin]);
    let (bob, tb) = s.user("bob");
    let (_, ta) = s.user("alice");
    let mut ws = live(&s, &tb);
    let path = format!("/v1/admin/users/{bob}/disable");
    // Only the admin token may.
    let (st, v) = s.post(&path, &json!({}), Some(&ta));
    assert_eq!((st, v["code"].as_str()), (403, Some("not_admin")));
    let (st, _) = s.post(&path, &json!({}), Some(admin));
    assert_eq!(st, 204);
    assert_eq!(ws.expect_close().0, 4005);
    assert_eq!(refused_upgrade(&s, &tb), (403, "account_disabled".into()));
    let (st, v, _) = login(&s, "bob", "correct horse");
    assert_eq!((st, v["code"].as_str()), (403, Some("account_disabled")));
    // A wrong password is still just a wrong password (disabled is told only to the owner).
    assert_eq!(login(&s, "bob", "wrong password").0, 401);
    let (st, _) = s.post(&format!("/v1/admin/users/{bob}/enable"), &json!({}), Some(admin));
    assert_eq!(st, 204);
    assert_eq!(
        refused_upgrade(&s, &tb).0,
        401,
        "enabling does not bring old tokens back"
    );
    let (st, v, _) = login(&s, "bob", "correct horse");
    assert_eq!(st, 200, "{v}");
    live(&s, v["token"].as_str().unwrap());
    let (st, v) = s.post("/v1/admin/users/nobody/disable", &json!({}), Some(admin));
    assert_eq!((st, v["code"].as_str()), (404, Some("user_not_found")));
}

#[test]
fn admin_routes_are_off_without_an_admin_token() {
    let s = Server::start(&[]);
    let (bob, tb) = s.user("bob");
    let (st, v) = s.post(&format!("/v1/admin/users/{bob}/disable"), &json!({}), Some(&tb));
    assert_eq!((st, v["code"].as_str()), (403, Some("not_admin")));
}

/// A TCP connection to `addr` from the loopback address `from`.
fn tcp_from(from: &str, addr: &str) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let to: std::net::SocketAddr = addr.parse().unwrap();
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&format!("{from}:0").parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    s.connect(&to.into()).unwrap();
    let t: std::net::TcpStream = s.into();
    t.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    t
}

/// Reads the whole answer of a refused connection (the server closes it).
fn refusal(mut t: std::net::TcpStream) -> String {
    use std::io::Read;
    let mut answer = String::new();
    let _ = t.read_to_string(&mut answer);
    answer
}

/// Sends a WebSocket upgrade with `token` on `t` and returns the status line's code.
fn upgrade(t: &mut std::net::TcpStream, token: &str) -> u16 {
    use std::io::{Read, Write};
    write!(
        t,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    t.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[test]
fn one_address_cannot_take_every_connection() {
    // One shard: connections are accepted (and counted) in the order they were made.
    let s = Server::start(&[
        "--shards",
        "1",
        "--max-connections-per-address",
        "6",
        "--max-handshakes-per-address",
        "3",
        "--max-connections",
        "10",
    ]);
    let tokens: Vec<String> = (0..10).map(|i| s.user(&format!("user{i}")).1).collect();
    // Three idle TCP connections (no upgrade) are all one address may hold in the handshake.
    let idle: Vec<_> = (0..3).map(|_| tcp_from("127.0.0.1", &s.ws)).collect();
    let answer = refusal(tcp_from("127.0.0.1", &s.ws));
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("too_many_handshakes"), "{answer}");
    // Another address is not held up by them.
    let mut other = tcp_from("127.0.0.2", &s.ws);
    assert_eq!(upgrade(&mut other, &tokens[0]), 101);
    drop(idle);
    // Upgraded connections no longer count as handshakes, but count against the address: six.
    let mut held = Vec::new();
    for token in &tokens[1..7] {
        let mut t = tcp_from("127.0.0.3", &s.ws);
        assert_eq!(upgrade(&mut t, token), 101);
        held.push(t);
    }
    let answer = refusal(tcp_from("127.0.0.3", &s.ws));
    assert!(answer.contains("too_many_connections"), "{answer}");
    // 1 + 6 held, and three more from a fourth address fill the total of ten.
    let mut more = Vec::new();
    for token in &tokens[7..10] {
        let mut t = tcp_from("127.0.0.4", &s.ws);
        assert_eq!(upgrade(&mut t, token), 101);
        more.push(t);
    }
    let answer = refusal(tcp_from("127.0.0.5", &s.ws));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("server_full"), "{answer}");
    // Places are given back when connections close: a client that closes its socket is seen by
    // the server at once (its read ends), so a new upgrade gets in.
    drop(more);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut t = tcp_from("127.0.0.5", &s.ws);
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| upgrade(&mut t, &tokens[7])));
        match code {
            Ok(101) => break,
            _ if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => panic!("places were not given back: {other:?}"),
        }
    }
    drop(held);
}

#[test]
fn grpc_login_has_the_same_limits_and_revocation() {
    use sai_services::grpc::pb;
    use sai_services::grpc::pb::user_service_client::UserServiceClient;

    let s = Server::start(&[]);
    let (_, token) = s.user("alice");
    common::block_on(async {
        let mut users = UserServiceClient::connect(s.grpc.clone()).await.unwrap();
        let wrong = || pb::LoginRequest {
            username: "alice".into(),
            password: "wrong password".into(),
        };
        for _ in 0..6 {
            let e = users.login(wrong()).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
        }
        let e = users.login(wrong()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().starts_with("too_many_attempts:"), "{}", e.message());
        // A token revoked over HTTP is refused over gRPC too.
        assert_eq!(s.post("/v1/users/logout", &json!({}), Some(&token)).0, 204);
        let e = users
            .get_me(common::authed(&token, pb::GetMeRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().starts_with("token_revoked:"), "{}", e.message());
    });
}

const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOvaE+U7szTB5rJkXv/r/7PqhgDN0YC7VHAjDqVx00DE\n-----END PRIVATE KEY-----\n";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAyEcxMahsg9u9g+J29m0uBR7mfaWqvJHOyy95k/9ItRc=\n-----END PUBLIC KEY-----\n";
const ED_OTHER_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAvGXuGRPrQsRRmG22iJZEy5DyiisE+dYSU2Du7DvpN58=\n-----END PUBLIC KEY-----\n";

#[test]
fn eddsa_tokens_name_their_key_and_a_mismatched_pair_does_not_start() {
    use base64::Engine as _;
    let dir = std::env::temp_dir().join(format!("sai-ed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (private, public, other) = (dir.join("ed.pem"), dir.join("ed.pub"), dir.join("other.pub"));
    std::fs::write(&private, ED_PRIVATE).unwrap();
    std::fs::write(&public, ED_PUBLIC).unwrap();
    std::fs::write(&other, ED_OTHER_PUBLIC).unwrap();
    let s = Server::start(&[
        "--jwt-private-key",
        private.to_str().unwrap(),
        "--jwt-public-key",
        public.to_str().unwrap(),
    ]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(ta.split('.').next().unwrap())
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert!(header["kid"].as_str().unwrap().starts_with("ed25519-"), "{header}");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    let mut b = s.connect(&tb);
    a.chat(&bob, "ed1", "signed with Ed25519");
    a.recv();
    assert_eq!(b.recv()["data"]["msg"]["content"], "signed with Ed25519");
    // A public key that is not the private key's pair: the server says so and does not start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sai-im"))
        .args([
            "--jwt-private-key",
            private.to_str().unwrap(),
            "--jwt-public-key",
            other.to_str().unwrap(),
        ])
        .args([
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--ws-listen",
            "127.0.0.1:0",
        ])
        .args(["--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pair"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
