//! Operating a real `sai-im`: what the WebSocket clients and the pipeline did shows up in
//! `GET /metrics`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{metric as sum, Client, ConnectError, Server};
use std::time::Duration;

#[test]
fn metrics_count_what_the_gateway_and_the_pipeline_did() {
    let s = Server::start(&["--require-friendship", "false"]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let mut a = Client::connect(&s.ws, &ta).unwrap();
    let mut b = Client::connect(&s.ws, &tb).unwrap();
    for i in 1..=5 {
        a.chat(&bob, &format!("m{i}"), "hello");
        assert_eq!(a.recv()["data"]["seq"], i);
        assert_eq!(b.recv()["method"], "push");
    }
    // A resend of a stored clientMsgId is deduplicated, not stored again.
    a.chat(&bob, "m5", "hello");
    assert_eq!(a.recv()["data"]["seq"], 5);
    match Client::connect(&s.ws, "not.a.token") {
        Err(ConnectError::Status(401, body)) => assert_eq!(body["code"], "malformed_token"),
        other => panic!("{:?}", other.map(|_| "connected")),
    }

    let m = s.metrics();
    assert_eq!(sum(&m, "sai_gateway_connections", &[]), 2.0, "{m}");
    assert_eq!(sum(&m, "sai_gateway_sessions_total", &[]), 2.0);
    assert_eq!(sum(&m, "sai_gateway_pushes_total", &[]), 5.0);
    assert!(sum(&m, "sai_gateway_messages_in_total", &[]) >= 6.0);
    assert!(
        sum(&m, "sai_gateway_messages_out_total", &[]) >= 11.0,
        "6 acks and 5 pushes"
    );
    assert!(sum(&m, "sai_gateway_bytes_in_total", &[]) > 0.0);
    assert!(sum(&m, "sai_gateway_bytes_out_total", &[]) > sum(&m, "sai_gateway_bytes_in_total", &[]));
    assert_eq!(
        sum(&m, "sai_gateway_refusals_total", &["code=\"malformed_token\""]),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "sai_pipeline_refusals_total",
            &["call=\"authenticate\"", "code=\"malformed_token\""]
        ),
        1.0
    );
    assert_eq!(sum(&m, "sai_pipeline_call_seconds_count", &["call=\"chat\""]), 6.0);
    assert_eq!(
        sum(&m, "sai_pipeline_call_seconds_count", &["call=\"authenticate\""]),
        5.0,
        "two per connection (the upgrade's check and the recheck once it is routed), one refused"
    );
    assert_eq!(sum(&m, "sai_messages_stored_total", &[]), 5.0);
    assert_eq!(sum(&m, "sai_messages_deduplicated_total", &[]), 1.0);
    assert_eq!(sum(&m, "sai_store_call_seconds_count", &["call=\"append\""]), 6.0);
    assert!(sum(&m, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(sum(&m, "process_open_fds", &[]) > 0.0);
    assert_eq!(sum(&m, "sai_build_info", &["role=\"all\""]), 1.0);

    // A client that closes: the gateway counts it and the connection is gone.
    b.ws.close(None).unwrap();
    let _ = b.ws.flush();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.metrics();
        if sum(&m, "sai_gateway_connections", &[]) == 1.0 {
            assert_eq!(sum(&m, "sai_gateway_client_closes_total", &[]), 1.0, "{m}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection still counts: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
