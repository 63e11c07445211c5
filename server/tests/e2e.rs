//! End-to-end tests: the real `sai-im` binary, real TCP, a real WebSocket client.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{authed, Client, ConnectError, Server};
use sai_pipeline::conversation::ConversationId;
use sai_services::auth::{Claims, JwtKeys};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn register_login_me_and_their_refusals() {
    let s = Server::start(&[]);
    let (uid, token) = s.user("alice");
    let (st, v) = s.get("/v1/users/me", Some(&token));
    assert_eq!(st, 200);
    assert_eq!(v["userId"], uid.as_str());
    assert_eq!(v["username"], "alice");

    let reg = |body: Value| s.post("/v1/users/register", &body, None);
    let (st, v) = reg(json!({"username": "alice", "password": "another pw", "nickname": "x"}));
    assert_eq!((st, v["code"].as_str()), (409, Some("username_taken")));
    let (st, v) = reg(json!({"username": "a b", "password": "long enough"}));
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_username")));
    let (st, v) = reg(json!({"username": "bobby", "password": "short"}));
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_password")));
    let (st, v) = reg(json!({"username": "bobby"}));
    assert_eq!((st, v["code"].as_str()), (400, Some("missing_field")));
    let (st, v) = s.post_raw("/v1/users/register", "{not json");
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_json")));

    let login = |u: &str, p: &str| s.post("/v1/users/login", &json!({"username": u, "password": p}), None);
    let (st, wrong_pw) = login("alice", "wrong password");
    let (st2, no_user) = login("nobody", "correct horse");
    assert_eq!((st, st2), (401, 401));
    assert_eq!(wrong_pw, no_user, "must not say which part was wrong");
    assert_eq!(wrong_pw["code"], "invalid_credentials");

    let (st, v) = s.get("/v1/users/me", None);
    assert_eq!((st, v["code"].as_str()), (401, Some("missing_token")));
    let (st, v) = s.get("/v1/users/me", Some("garbage"));
    assert_eq!((st, v["code"].as_str()), (401, Some("malformed_token")));
    let (st, v) = s.get("/v1/nowhere", None);
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
}

/// Private chat both ways; returns the frames seen for further checks.
fn chat_both_ways(mode: &str) {
    let s = Server::start(&["--ack-mode", mode]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    let mut b = s.connect(&tb);

    let fid = a.chat(&bob, "a-1", "hi bob");
    if mode != "none" {
        let ack = a.recv();
        assert_eq!(ack["frameType"], 2, "{ack}");
        assert_eq!(ack["id"], fid.as_str());
        assert_eq!(ack["data"]["seq"], 1);
    }
    let push = b.recv();
    assert_eq!(push["frameType"], 0);
    assert_eq!(push["method"], "push");
    let d = &push["data"];
    assert_eq!(d["sendId"], alice.as_str());
    assert_eq!(d["recvId"], bob.as_str());
    assert_eq!(d["chatType"], 2);
    assert_eq!(d["seq"], 1);
    assert_eq!(d["clientMsgId"], "a-1");
    assert_eq!(d["msg"], json!({"mType": 0, "content": "hi bob"}));
    assert!(d["msgId"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(d["sendTime"].as_i64().unwrap() > 0);
    let conv = d["conversationId"].as_str().unwrap().to_string();
    if mode == "rigor" {
        b.ack(&push);
    }

    b.chat(&alice, "b-1", "hi alice");
    if mode != "none" {
        let ack = b.recv();
        assert_eq!(ack["frameType"], 2);
        assert_eq!(ack["data"]["seq"], 2, "same conversation, next seq");
        assert_eq!(ack["data"]["conversationId"], conv.as_str());
    }
    let push = a.recv();
    assert_eq!(push["data"]["seq"], 2);
    assert_eq!(push["data"]["msg"]["content"], "hi alice");
    if mode == "rigor" {
        a.ack(&push);
    }
    if mode == "none" {
        // No ack ever arrives in mode none.
        assert!(a.try_recv(Duration::from_millis(300)).is_none());
    }
}

#[test]
fn private_chat_ack_mode_none() {
    chat_both_ways("none");
}

#[test]
fn private_chat_ack_mode_only() {
    chat_both_ways("only");
}

#[test]
fn private_chat_ack_mode_rigor() {
    chat_both_ways("rigor");
}

#[test]
fn rigor_resends_unacked_pushes_until_acked() {
    let s = Server::start(&["--ack-mode", "rigor"]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    let mut b = s.connect(&tb);
    a.chat(&bob, "m1", "are you there");
    a.recv();
    let first = b.recv();
    // Not acked: the same push (same id) comes again after the backoff.
    let again = b.try_recv(Duration::from_secs(5)).expect("resend");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["data"]["seq"], first["data"]["seq"]);
    b.ack(&again);
    assert!(
        b.try_recv(Duration::from_secs(5)).is_none(),
        "acked push must not be resent"
    );
}

#[test]
fn offline_messages_arrive_through_sync_in_order_exactly_once() {
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let (carol, tc) = s.user("carol");
    s.befriend(&ta, &bob, &tb);
    s.befriend(&tc, &bob, &tb);
    let mut a = s.connect(&ta);
    for i in 1..=5 {
        a.chat(&bob, &format!("ab-{i}"), &format!("msg {i}"));
        assert_eq!(a.recv()["data"]["seq"], i);
    }
    let mut c = s.connect(&tc);
    c.chat(&bob, "cb-1", "from carol");
    c.recv();

    let mut b = s.connect(&tb);
    let (pushes, reply) = b.sync(json!({}));
    assert_eq!(pushes.len(), 6);
    let from_alice: Vec<i64> = pushes
        .iter()
        .filter(|p| p["data"]["sendId"] == alice.as_str())
        .map(|p| p["data"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(from_alice, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        pushes.iter().filter(|p| p["data"]["sendId"] == carol.as_str()).count(),
        1
    );
    let conv_ab = ConversationId::private(&alice, &bob).to_string();
    let conv_cb = ConversationId::private(&carol, &bob).to_string();
    assert_eq!(reply["data"]["conversations"][&conv_ab], 5);
    assert_eq!(reply["data"]["conversations"][&conv_cb], 1);
    assert_eq!(reply["data"]["pushed"], 6);

    // Knowing seq 3 of alice's conversation and all of carol's: only 4 and 5 come.
    let (pushes, _) = b.sync(json!({ conv_ab.clone(): 3, conv_cb: 1 }));
    let seqs: Vec<i64> = pushes.iter().map(|p| p["data"]["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 5]);
    // Up to date: nothing.
    let (pushes, _) = b.sync(json!({ conv_ab: 5, "si_unknown_conv": 9 }));
    assert_eq!(
        pushes.len(),
        1,
        "carol's conversation was not in the map, so it syncs from 0"
    );
}

#[test]
fn resent_client_msg_id_is_stored_once() {
    let s = Server::start(&[]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    let mut b = s.connect(&tb);
    a.chat(&bob, "same", "once");
    let first = a.recv();
    assert_eq!(b.recv()["data"]["seq"], 1);
    a.chat(&bob, "same", "once");
    let second = a.recv();
    assert_eq!(
        second["data"], first["data"],
        "the resend gets the original seq and msgId"
    );
    assert!(b.try_recv(Duration::from_millis(500)).is_none(), "no second push");
    a.chat(&bob, "other", "twice");
    assert_eq!(a.recv()["data"]["seq"], 2);
    let (_, hist) = s.get(
        &format!(
            "/v1/conversations/{}/messages",
            first["data"]["conversationId"].as_str().unwrap()
        ),
        Some(&tb),
    );
    assert_eq!(hist["messages"].as_array().unwrap().len(), 2);
}

fn seq_survives(graceful: bool) {
    let mut s = Server::start(&[]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    a.chat(&bob, "r1", "before");
    a.recv();
    a.chat(&bob, "r2", "before");
    assert_eq!(a.recv()["data"]["seq"], 2);
    drop(a);
    s.restart(graceful);
    // The old token still works: the JWT secret lives in the data dir.
    let mut a = s.connect(&ta);
    a.chat(&bob, "r3", "after");
    assert_eq!(a.recv()["data"]["seq"], 3);
    // A resend of a message from before the restart is still recognised.
    a.chat(&bob, "r1", "before");
    assert_eq!(a.recv()["data"]["seq"], 1);
    let mut b = s.connect(&tb);
    let (pushes, _) = b.sync(json!({}));
    let seqs: Vec<i64> = pushes.iter().map(|p| p["data"]["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[test]
fn seq_continues_across_graceful_restart() {
    seq_survives(true);
}

#[test]
fn seq_continues_across_killed_process() {
    seq_survives(false);
}

#[test]
fn second_login_replaces_the_first_with_4001() {
    let s = Server::start(&[]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut first = s.connect(&ta);
    let mut second = s.connect(&ta);
    let (code, reason) = first.expect_close();
    assert_eq!(code, 4001);
    assert!(reason.contains("replaced"), "{reason}");
    // Messages now go to the new connection.
    let mut b = s.connect(&tb);
    let _ = &bob;
    let alice_id = s.get("/v1/users/me", Some(&ta)).1["userId"]
        .as_str()
        .unwrap()
        .to_string();
    b.chat(&alice_id, "x", "to the new one");
    b.recv();
    assert_eq!(second.recv()["data"]["msg"]["content"], "to the new one");
}

#[test]
fn idle_connection_is_closed() {
    let s = Server::start(&["--idle-timeout-secs", "1"]);
    let (_, ta) = s.user("alice");
    let mut a = s.connect(&ta);
    let t0 = std::time::Instant::now();
    let (code, _) = a.expect_close();
    assert_eq!(code, 4002);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        t0.elapsed()
    );
}

#[test]
fn heartbeats_keep_a_connection_alive_and_are_answered() {
    let s = Server::start(&["--idle-timeout-secs", "2"]);
    let (_, ta) = s.user("alice");
    let mut a = s.connect(&ta);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        a.send(&json!({"frameType": 1}));
        assert_eq!(a.recv(), json!({"frameType": 1}));
    }
    // WebSocket-level ping is answered with a pong carrying the same payload.
    a.ws.send(tungstenite::Message::Ping(b"hb".to_vec().into())).unwrap();
    match a.ws.read().unwrap() {
        tungstenite::Message::Pong(p) => assert_eq!(&p[..], b"hb"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[test]
fn bad_input_gets_error_frames_and_the_connection_stays_open() {
    let s = Server::start(&[]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid_json"),
        (r#"{"frameType":0,"id":"u","method":"conversation.nope"}"#.into(), "unknown_method"),
        (r#"{"frameType":42,"id":"f"}"#.into(), "unknown_frame_type"),
        (
            r#"{"frameType":0,"id":"m","method":"conversation.chat","data":{"chatType":2,"clientMsgId":"x","msg":{}}}"#.into(),
            "missing_field",
        ),
        (
            r#"{"frameType":0,"id":"r","method":"conversation.chat","data":{"chatType":2,"recvId":"nobody","clientMsgId":"x","msg":{}}}"#.into(),
            "recipient_not_found",
        ),
        (
            format!(r#"{{"frameType":0,"id":"t","method":"conversation.chat","data":{{"chatType":2,"recvId":"{bob}","clientMsgId":"x","msg":"text"}}}}"#),
            "invalid_field",
        ),
    ];
    for (text, code) in cases {
        a.send_text(&text);
        let e = a.recv();
        assert_eq!(e["frameType"], 9, "{text} -> {e}");
        assert_eq!(e["data"]["code"], code, "{text} -> {e}");
        assert!(e["errMsg"].as_str().is_some_and(|m| !m.is_empty()));
    }
    a.ws.send(tungstenite::Message::Binary(vec![1, 2, 3].into())).unwrap();
    assert_eq!(a.recv()["data"]["code"], "unsupported_message_type");
    // Still open and working.
    a.chat(&bob, "ok", "still here");
    assert_eq!(a.recv()["frameType"], 2);
}

#[test]
fn deeply_nested_messages_are_refused_and_history_stays_readable() {
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    // `{"a":{"a":...{}}}`, `depth` objects deep.
    let nested = |depth: usize| format!("{}{{}}{}", r#"{"a":"#.repeat(depth - 1), "}".repeat(depth - 1));
    let chat = |id: &str, depth: usize| {
        format!(
            r#"{{"frameType":0,"id":"{id}","method":"conversation.chat","data":{{"chatType":2,"recvId":"{bob}","clientMsgId":"{id}","msg":{}}}}}"#,
            nested(depth)
        )
    };
    for depth in [33, 200, 5_000] {
        a.send_text(&chat(&format!("deep{depth}"), depth));
        let e = a.recv();
        assert_eq!(e["frameType"], 9, "depth {depth}: {e}");
        assert_eq!(e["data"]["code"], "invalid_message", "depth {depth}");
    }
    // The deepest accepted body is stored, acked and read back as it was sent.
    a.send_text(&chat("ok32", 32));
    let ack = a.recv();
    assert_eq!(ack["frameType"], 2, "{ack}");
    let conv = sai_pipeline::conversation::ConversationId::private(&alice, &bob).to_string();
    let (status, page) = s.get(&format!("/v1/conversations/{conv}/messages"), Some(&ta));
    assert_eq!(status, 200, "{page}");
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "only the accepted message was stored");
    assert_eq!(messages[0]["msg"].to_string(), nested(32));
    let (status, list) = s.get("/v1/conversations", Some(&tb));
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["conversations"][0]["lastMessage"]["seq"], 1);
}

/// The kernel's TCP state (`/proc/net/tcp`, hex `st`) of the socket from `local_port` to
/// `remote_port` on 127.0.0.1, if there is one.
fn tcp_state(local_port: u16, remote_port: u16) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = (
        format!("0100007F:{local_port:04X}"),
        format!("0100007F:{remote_port:04X}"),
    );
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&want.0.as_str()) && f.get(2) == Some(&want.1.as_str()))
            .then(|| u8::from_str_radix(f[3], 16).unwrap())
    })
}

#[test]
fn a_client_that_stops_reading_is_released_after_the_close_grace() {
    const ESTABLISHED: u8 = 1;
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    // Alice connects and never reads again.
    let a = s.connect(&ta);
    let alice_port = a.ws.get_ref().local_addr().unwrap().port();
    let server_port: u16 = s.ws.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(tcp_state(server_port, alice_port), Some(ESTABLISHED));
    // About 9 MB of pushes: more than the loopback socket buffers and the 1 MiB outbound bound
    // hold, so the server's write to her blocks and her session is closed with 4003; the close
    // frame itself can never be delivered.
    let mut b = s.connect(&tb);
    let body = "x".repeat(60_000);
    for i in 0..150 {
        b.chat(&alice, &format!("big{i}"), &body);
        assert_eq!(b.recv()["frameType"], 2);
    }
    // After the close grace (3 s) the server drops the socket even though the write is stuck:
    // its side of the connection leaves ESTABLISHED (it lingers in FIN_WAIT1 against her zero
    // window, with no descriptor and no task of ours behind it).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while tcp_state(server_port, alice_port) == Some(ESTABLISHED) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server still holds the connection of a client that stopped reading"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(a);
}

#[test]
fn oversized_frame_closes_with_1009() {
    let s = Server::start(&["--max-frame-bytes", "1024"]);
    let (_, ta) = s.user("alice");
    let mut a = s.connect(&ta);
    a.send_text(&format!(r#"{{"frameType":1,"pad":"{}"}}"#, "x".repeat(2000)));
    assert_eq!(a.expect_close().0, 1009);
}

/// Upgrades a raw TCP connection by hand, so the test can send bytes no client library would.
fn raw_upgrade(addr: &str, token: &str) -> std::net::TcpStream {
    let mut t = std::net::TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        t,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {token}\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        t.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    t
}

fn read_close_code(t: &mut std::net::TcpStream) -> u16 {
    let mut h = [0u8; 4];
    t.read_exact(&mut h).unwrap();
    assert_eq!(h[0], 0x88, "expected a close frame");
    u16::from_be_bytes([h[2], h[3]])
}

#[test]
fn protocol_violations_close_with_their_codes() {
    let s = Server::start(&[]);
    let (_, ta) = s.user("alice");
    // An unmasked client frame: 1002.
    let mut t = raw_upgrade(&s.ws, &ta);
    t.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(read_close_code(&mut t), 1002);
    // Invalid UTF-8 in a text frame: 1007.
    let mut t = raw_upgrade(&s.ws, &ta);
    t.write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe]).unwrap();
    assert_eq!(read_close_code(&mut t), 1007);
}

/// Refused upgrades back to back on one shard, each client leaving as soon as it has its answer:
/// the slot of a connection that ends is reused by the next accept, and nothing still queued for
/// the old connection (our FIN after the answer) may reach the new one before its own answer.
/// The kernel's first shutdown waits for a worker thread to start, so each fresh server gives
/// the race its widest window.
#[test]
fn back_to_back_refusals_each_get_their_whole_answer() {
    for run in 0..30 {
        let s = Server::start(&["--shards", "1"]);
        for i in 0..20 {
            match Client::connect(&s.ws, "") {
                Err(ConnectError::Status(401, body)) => assert_eq!(body["code"], "missing_token", "{body}"),
                Err(e) => panic!("server {run}, connection {i}: {e}"),
                Ok(_) => panic!("server {run}, connection {i}: upgrade accepted without a token"),
            }
        }
    }
}

#[test]
fn bad_tokens_get_401_and_no_upgrade() {
    let s = Server::start(&[]);
    let (uid, token) = s.user("alice");
    let expect_401 = |token: &str, code: &str| match Client::connect(&s.ws, token) {
        Err(ConnectError::Status(401, body)) => assert_eq!(body["code"], code, "{body}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("upgrade accepted for {code}"),
    };
    expect_401("", "missing_token");
    expect_401("not-a-jwt", "malformed_token");
    // Forged: right shape, signed with another secret.
    let forged = JwtKeys::new(b"not the server secret".to_vec()).sign(&Claims {
        gen: 0,
        sub: uid.clone(),
        iat: now_secs(),
        exp: now_secs() + 3600,
    });
    expect_401(&forged, "invalid_token");
    // Tampered: the real token with its subject swapped.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1].replace_range(0..4, "eyJz");
    parts[1] = parts[1].chars().rev().collect();
    expect_401(&parts.join("."), "invalid_token");
    // Expired: signed with the server's own secret, exp in the past.
    let expired = JwtKeys::new(s.secret()).sign(&Claims {
        gen: 0,
        sub: uid,
        iat: now_secs() - 7200,
        exp: now_secs() - 3600,
    });
    expect_401(&expired, "token_expired");
    // Valid signature and expiry, but no such user.
    let ghost = JwtKeys::new(s.secret()).sign(&Claims {
        gen: 0,
        sub: "no-such-user".into(),
        iat: now_secs(),
        exp: now_secs() + 3600,
    });
    expect_401(&ghost, "invalid_token");
    // And a wrong path is 404.
    let mut t = std::net::TcpStream::connect(&s.ws).unwrap();
    write!(t, "GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut resp = String::new();
    t.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}

#[test]
fn history_pages_newest_first_for_members_only() {
    let s = Server::start(&[]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let (_, tc) = s.user("carol");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    let mut conv = String::new();
    for i in 1..=7 {
        a.chat(&bob, &format!("h{i}"), &format!("n{i}"));
        conv = a.recv()["data"]["conversationId"].as_str().unwrap().to_string();
    }
    let path = format!("/v1/conversations/{conv}/messages");
    let (st, v) = s.get(&format!("{path}?limit=3"), Some(&ta));
    assert_eq!(st, 200);
    let seqs: Vec<i64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![7, 6, 5]);
    let (_, v) = s.get(&format!("{path}?beforeSeq=5&limit=100"), Some(&ta));
    let seqs: Vec<i64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 3, 2, 1]);
    let (st, v) = s.get(&path, Some(&tc));
    assert_eq!((st, v["code"].as_str()), (403, Some("not_a_member")));
    let (st, v) = s.get(&format!("{path}?limit=501"), Some(&ta));
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_limit")));
    let (st, v) = s.get(&format!("{path}?beforeSeq=x"), Some(&ta));
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_query")));
    let (st, _) = s.get(&path, None);
    assert_eq!(st, 401);
}

#[test]
fn sending_to_yourself_is_refused() {
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let mut a = s.connect(&ta);
    a.chat(&alice, "self", "me");
    let e = a.recv();
    assert_eq!(e["frameType"], 9);
    assert_eq!(e["data"]["code"], "invalid_recipient");
}

#[test]
fn grpc_services_work_against_the_same_storage() {
    use pb::message_service_client::MessageServiceClient;
    use pb::user_service_client::UserServiceClient;
    use sai_services::grpc::pb;

    let s = Server::start(&["--require-friendship", "false"]);
    let (alice, ta) = s.user("alice");
    common::block_on(async {
        let mut users = UserServiceClient::connect(s.grpc.clone()).await.unwrap();
        let bob = users
            .register(pb::RegisterRequest {
                username: "bob".into(),
                password: "password1".into(),
                nickname: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .user_id;
        let dup = users
            .register(pb::RegisterRequest {
                username: "bob".into(),
                password: "password1".into(),
                nickname: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(dup.code(), tonic::Code::AlreadyExists);
        assert!(dup.message().starts_with("username_taken:"), "{}", dup.message());
        let login = users
            .login(pb::LoginRequest {
                username: "bob".into(),
                password: "password1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(login.user_id, bob);

        let mut msgs = MessageServiceClient::connect(s.grpc.clone()).await.unwrap();
        let sent = msgs
            .send(authed(
                &login.token,
                pb::SendRequest {
                    chat_type: 2,
                    recv_id: alice.clone(),
                    client_msg_id: "g1".into(),
                    msg_json: r#"{"mType":0,"content":"over grpc"}"#.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((sent.seq, sent.duplicate), (1, false));
        let unauth = msgs
            .send(tonic::Request::new(pb::SendRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(unauth.code(), tonic::Code::Unauthenticated);

        let page = msgs
            .sync(authed(&ta, pb::SyncRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(page.complete);
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].msg_json, r#"{"mType":0,"content":"over grpc"}"#);
        assert_eq!(page.heads[&sent.conversation_id], 1);
        let me = users
            .get_me(authed(&ta, pb::GetMeRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(me.username, "alice");
    });
    // What gRPC stored is what the WebSocket side syncs.
    let mut a = s.connect(&ta);
    let (pushes, _) = a.sync(json!({}));
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0]["data"]["msg"]["content"], "over grpc");
}
