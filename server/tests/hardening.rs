//! What a hostile client must not be able to do (issue 10): guess passwords at full speed,
//! keep using a revoked token, take every descriptor. Each test fails on the code before its fix.

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
