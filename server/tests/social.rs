//! End-to-end tests of friends, groups, group chat, the conversation list, read state and
//! receipts: the real binary, real HTTP, a real WebSocket client.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{authed, Client, Server};
use serde_json::{json, Value};
use std::time::Duration;

fn code(r: &(u16, Value)) -> (u16, &str) {
    (r.0, r.1["code"].as_str().unwrap_or("<none>"))
}

#[test]
fn friend_requests_accept_reject_unfriend_and_refusals() {
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let (carol, tc) = s.user("carol");
    let mut b_ws = s.connect(&tb);
    let mut a_ws = s.connect(&ta);

    // Not friends yet: private chat is refused.
    a_ws.chat(&bob, "early", "hello?");
    let e = a_ws.recv();
    assert_eq!(
        (e["frameType"].as_i64(), e["data"]["code"].as_str()),
        (Some(9), Some("not_friends"))
    );

    let req = |t: &str, to: &str| {
        s.post(
            "/v1/friends/requests",
            &json!({"toUserId": to, "message": "hey"}),
            Some(t),
        )
    };
    assert_eq!(code(&req(&ta, &alice)), (400, "cannot_friend_self"));
    assert_eq!(code(&req(&ta, "nobody")), (404, "user_not_found"));
    let (st, v) = req(&ta, &bob);
    assert_eq!(st, 201);
    let rid = v["requestId"].as_str().unwrap().to_string();
    // The recipient is online: it gets a push.
    let push = b_ws.recv();
    assert_eq!(push["method"], "friend.request");
    assert_eq!(push["data"]["requestId"], rid.as_str());
    assert_eq!(push["data"]["fromUserId"], alice.as_str());
    // A second pending request, either way, is refused.
    assert_eq!(code(&req(&ta, &bob)), (409, "request_pending"));
    assert_eq!(code(&req(&tb, &alice)), (409, "request_pending"));

    let (_, inbox) = s.get("/v1/friends/requests", Some(&tb));
    assert_eq!(inbox["requests"].as_array().unwrap().len(), 1);
    assert_eq!(inbox["requests"][0]["message"], "hey");
    // Only the recipient may answer.
    assert_eq!(
        code(&s.post(&format!("/v1/friends/requests/{rid}/accept"), &json!({}), Some(&tc))),
        (404, "request_not_found")
    );
    let (st, _) = s.post(&format!("/v1/friends/requests/{rid}/accept"), &json!({}), Some(&tb));
    assert_eq!(st, 200);
    assert_eq!(a_ws.recv()["method"], "friend.accepted");
    assert_eq!(
        code(&s.post(&format!("/v1/friends/requests/{rid}/reject"), &json!({}), Some(&tb))),
        (409, "request_not_pending")
    );
    assert_eq!(code(&req(&ta, &bob)), (409, "already_friends"));
    let (_, fa) = s.get("/v1/friends", Some(&ta));
    assert_eq!(fa["friends"][0]["userId"], bob.as_str());
    assert_eq!(fa["friends"][0]["username"], "bob");
    let (_, fb) = s.get("/v1/friends", Some(&tb));
    assert_eq!(fb["friends"][0]["userId"], alice.as_str());

    // Friends can chat now.
    a_ws.chat(&bob, "now", "hello!");
    assert_eq!(a_ws.recv()["frameType"], 2);
    assert_eq!(b_ws.recv()["data"]["msg"]["content"], "hello!");

    // Rejecting.
    let (_, v) = req(&tc, &alice);
    let rid2 = v["requestId"].as_str().unwrap().to_string();
    assert_eq!(a_ws.recv()["data"]["requestId"], rid2.as_str());
    let (st, v) = s.post(&format!("/v1/friends/requests/{rid2}/reject"), &json!({}), Some(&ta));
    assert_eq!((st, v["status"].as_str()), (200, Some("rejected")));
    let (_, fc) = s.get("/v1/friends", Some(&tc));
    assert!(fc["friends"].as_array().unwrap().is_empty());
    let _ = carol;

    // Unfriending ends the chat permission.
    assert_eq!(delete(&s, &format!("/v1/friends/{alice}"), &tb).0, 204);
    assert_eq!(
        code(&delete(&s, &format!("/v1/friends/{alice}"), &tb)),
        (404, "not_friends")
    );
    a_ws.chat(&bob, "after", "still there?");
    assert_eq!(a_ws.recv()["data"]["code"], "not_friends");
    assert_eq!(
        code(&s.post("/v1/friends/requests", &json!({}), Some(&ta))),
        (400, "missing_field")
    );
}

fn delete(s: &Server, path: &str, token: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut r = agent
        .delete(format!("{}{path}", s.http))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap();
    (
        r.status().as_u16(),
        r.body_mut().read_json::<Value>().unwrap_or(Value::Null),
    )
}

fn put(s: &Server, path: &str, body: &Value, token: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut r = agent
        .put(format!("{}{path}", s.http))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(body)
        .unwrap();
    (
        r.status().as_u16(),
        r.body_mut().read_json::<Value>().unwrap_or(Value::Null),
    )
}

fn member_ids(s: &Server, gid: &str, token: &str) -> Vec<String> {
    let (st, v) = s.get(&format!("/v1/groups/{gid}/members"), Some(token));
    assert_eq!(st, 200, "{v}");
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn groups_create_add_remove_leave_roles_and_limits() {
    let s = Server::start(&["--max-group-members", "4"]);
    let users: Vec<(String, String)> = ["owner", "ann", "ben", "cat", "dan"]
        .iter()
        .map(|n| s.user(n))
        .collect();
    let (owner, to) = &users[0];
    let (ann, ta) = &users[1];
    let (ben, tb) = &users[2];
    let (cat, tc) = &users[3];
    let (dan, td) = &users[4];

    let (st, v) = s.post(
        "/v1/groups",
        &json!({"name": "team", "memberIds": [ann, ben]}),
        Some(to),
    );
    assert_eq!(st, 201, "{v}");
    let gid = v["groupId"].as_str().unwrap().to_string();
    assert_eq!(member_ids(&s, &gid, to), vec![owner.clone(), ann.clone(), ben.clone()]);
    let (_, g) = s.get(&format!("/v1/groups/{gid}"), Some(ta));
    assert_eq!(
        (g["name"].as_str(), g["ownerId"].as_str(), g["memberCount"].as_u64()),
        (Some("team"), Some(owner.as_str()), Some(3))
    );
    assert_eq!(g["role"], "member");
    let (_, mine) = s.get("/v1/groups", Some(tb));
    assert_eq!(mine["groups"][0]["groupId"], gid.as_str());

    // Refusals.
    assert_eq!(
        code(&s.post("/v1/groups", &json!({"name": " "}), Some(to))),
        (400, "invalid_group_name")
    );
    assert_eq!(
        code(&s.post("/v1/groups", &json!({"name": "x", "memberIds": ["ghost"]}), Some(to))),
        (404, "user_not_found")
    );
    assert_eq!(
        code(&s.post(
            "/v1/groups",
            &json!({"name": "big", "memberIds": [ann, ben, cat, dan]}),
            Some(to)
        )),
        (409, "group_full")
    );
    assert_eq!(
        code(&s.get(&format!("/v1/groups/{gid}"), Some(tc))),
        (403, "not_a_member")
    );
    assert_eq!(
        code(&s.get(&format!("/v1/groups/{gid}/members"), Some(tc))),
        (403, "not_a_member")
    );
    assert_eq!(code(&s.get("/v1/groups/nope", Some(to))), (404, "group_not_found"));
    let add = |t: &str, ids: Value| {
        s.post(
            &format!("/v1/groups/{gid}/members"),
            &json!({ "userIds": ids }),
            Some(t),
        )
    };
    assert_eq!(code(&add(ta, json!([cat]))), (403, "not_group_admin"));
    assert_eq!(code(&add(to, json!(["ghost"]))), (404, "user_not_found"));

    // Owner adds; a duplicate is skipped; the limit holds.
    let (st, v) = add(to, json!([cat, ann]));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["added"].as_array().unwrap().len(), 1);
    assert_eq!(code(&add(to, json!([dan]))), (409, "group_full"));

    // Roles: only the owner sets them; an admin may add and remove plain members.
    let role_path = format!("/v1/groups/{gid}/members/{ann}/role");
    assert_eq!(
        code(&put(&s, &role_path, &json!({"role": "admin"}), tb)),
        (403, "not_group_owner")
    );
    assert_eq!(
        code(&put(&s, &role_path, &json!({"role": "king"}), to)),
        (400, "invalid_role")
    );
    assert_eq!(put(&s, &role_path, &json!({"role": "admin"}), to).0, 204);
    assert_eq!(delete(&s, &format!("/v1/groups/{gid}/members/{cat}"), ta).0, 204);
    assert_eq!(
        code(&delete(&s, &format!("/v1/groups/{gid}/members/{owner}"), ta)),
        (403, "not_group_admin")
    );
    // A plain member cannot remove others but can leave.
    assert_eq!(
        code(&delete(&s, &format!("/v1/groups/{gid}/members/{ann}"), tb)),
        (403, "not_group_admin")
    );
    assert_eq!(delete(&s, &format!("/v1/groups/{gid}/members/{ben}"), tb).0, 204);
    assert_eq!(
        code(&s.get(&format!("/v1/groups/{gid}"), Some(tb))),
        (403, "not_a_member")
    );
    assert_eq!(
        code(&delete(&s, &format!("/v1/groups/{gid}/members/{owner}"), to)),
        (409, "owner_cannot_leave")
    );
    assert_eq!(
        code(&delete(&s, &format!("/v1/groups/{gid}/members/{dan}"), to)),
        (404, "member_not_found")
    );
    assert_eq!(member_ids(&s, &gid, to), vec![owner.clone(), ann.clone()]);
    // Room again after the removals.
    assert_eq!(add(to, json!([dan])).0, 200);
    let _ = td;
}

/// Reads pushes until `n` have arrived; panics on anything else.
fn pushes(c: &mut Client, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let f = c.recv();
            assert_eq!(f["method"], "push", "{f}");
            f
        })
        .collect()
}

#[test]
fn group_chat_reaches_online_and_offline_members_in_order_exactly_once() {
    let s = Server::start(&[]);
    let users: Vec<(String, String)> = (0..7).map(|i| s.user(&format!("member{i}"))).collect();
    let (sender, ts) = &users[0];
    let others: Vec<&String> = users[1..6].iter().map(|u| &u.0).collect();
    let (outsider, tout) = &users[6];
    let (_, g) = s.post("/v1/groups", &json!({"name": "g", "memberIds": others}), Some(ts));
    let gid = g["groupId"].as_str().unwrap().to_string();
    let conv = format!("sg_{gid}");

    let mut snd = s.connect(ts);
    // Members 1-3 online (N = 3), members 4-5 offline (M = 2).
    let mut online: Vec<Client> = users[1..4].iter().map(|(_, t)| s.connect(t)).collect();
    let n_msgs = 6;
    // Frames other than acks that a sender read while waiting for its ack, per connection.
    let mut early: Vec<Vec<Value>> = vec![Vec::new(), Vec::new()];
    for i in 0..n_msgs {
        // Two senders interleave: the owner and member 1.
        let k = (i % 2) as usize;
        let (c, who) = if k == 0 {
            (&mut snd, sender)
        } else {
            (&mut online[0], &users[1].0)
        };
        c.send(&json!({"frameType": 0, "id": format!("g{i}"), "method": "conversation.chat",
            "data": {"chatType": 1, "recvId": gid, "clientMsgId": format!("gm{i}"), "msg": {"mType": 0, "content": format!("m{i}")}}}));
        let ack = loop {
            let f = c.recv();
            if f["frameType"] == 2 {
                break f;
            }
            early[k].push(f);
        };
        assert_eq!(ack["data"]["seq"], i + 1, "{who}");
        assert_eq!(ack["data"]["conversationId"], conv.as_str());
    }
    // Each online member other than a sender gets every message it did not send, in seq order.
    for (k, c) in online.iter_mut().enumerate() {
        let expect: Vec<u64> = (1..=n_msgs).filter(|seq| !(k == 0 && seq % 2 == 0)).collect();
        let mut got: Vec<Value> = if k == 0 {
            std::mem::take(&mut early[1])
        } else {
            Vec::new()
        };
        let more = expect.len() - got.len();
        got.extend(pushes(c, more));
        let got: Vec<u64> = got.iter().map(|p| p["data"]["seq"].as_u64().unwrap()).collect();
        assert_eq!(got, expect, "member {}", k + 1);
        assert!(c.try_recv(Duration::from_millis(200)).is_none(), "no duplicates");
    }
    // The sender's own connection gets member 1's messages only.
    let mut got = std::mem::take(&mut early[0]);
    let more = 3 - got.len();
    got.extend(pushes(&mut snd, more));
    let got: Vec<u64> = got.iter().map(|p| p["data"]["seq"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![2, 4, 6]);
    // Offline members get everything through sync.
    for (_, t) in &users[4..6] {
        let mut c = s.connect(t);
        let (ps, reply) = c.sync(json!({}));
        let seqs: Vec<u64> = ps.iter().map(|p| p["data"]["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=n_msgs).collect::<Vec<_>>());
        assert!(ps
            .iter()
            .all(|p| p["data"]["chatType"] == 1 && p["data"]["recvId"] == gid.as_str()));
        assert_eq!(reply["data"]["conversations"][&conv], n_msgs);
    }
    // A non-member cannot send; a missing group is not found.
    let mut out = s.connect(tout);
    out.send(&json!({"frameType": 0, "id": "x", "method": "conversation.chat",
        "data": {"chatType": 1, "recvId": gid, "clientMsgId": "o1", "msg": {}}}));
    assert_eq!(out.recv()["data"]["code"], "not_a_member");
    out.send(&json!({"frameType": 0, "id": "y", "method": "conversation.chat",
        "data": {"chatType": 1, "recvId": "nogroup", "clientMsgId": "o2", "msg": {}}}));
    assert_eq!(out.recv()["data"]["code"], "recipient_not_found");
    // A member added later sees only what comes after joining.
    s.post(
        &format!("/v1/groups/{gid}/members"),
        &json!({"userIds": [outsider]}),
        Some(ts),
    );
    let (ps, _) = out.sync(json!({}));
    assert!(ps.is_empty(), "history before joining is not synced: {ps:?}");
    snd.chat_to_group(&gid, "late", "welcome");
    assert_eq!(out.recv()["data"]["seq"], n_msgs + 1);
    assert_eq!(
        code(&s.get(&format!("/v1/conversations/{conv}/messages"), Some(tout))).0,
        200
    );
}

trait GroupChat {
    fn chat_to_group(&mut self, gid: &str, key: &str, content: &str);
}

impl GroupChat for Client {
    fn chat_to_group(&mut self, gid: &str, key: &str, content: &str) {
        self.send(&json!({"frameType": 3, "method": "conversation.chat",
            "data": {"chatType": 1, "recvId": gid, "clientMsgId": key, "msg": {"mType": 0, "content": content}}}));
    }
}

#[test]
fn unread_counts_mark_read_and_private_receipts() {
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let (_, tc) = s.user("carol");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    for i in 1..=3 {
        a.chat(&bob, &format!("u{i}"), &format!("n{i}"));
        a.recv();
    }
    let list = |t: &str| s.get("/v1/conversations", Some(t)).1["conversations"].clone();
    let lb = list(&tb);
    assert_eq!(lb.as_array().unwrap().len(), 1);
    let conv = lb[0]["conversationId"].as_str().unwrap().to_string();
    assert_eq!(
        (
            lb[0]["unread"].as_u64(),
            lb[0]["maxSeq"].as_u64(),
            lb[0]["readSeq"].as_u64()
        ),
        (Some(3), Some(3), Some(0))
    );
    assert_eq!(lb[0]["peerId"], alice.as_str());
    assert_eq!(lb[0]["chatType"], 2);
    assert_eq!(lb[0]["lastMessage"]["msg"]["content"], "n3");
    // The sender's own messages are not unread for her.
    assert_eq!(list(&ta)[0]["unread"], 0);

    let mut b = s.connect(&tb);
    b.send(&json!({"frameType": 0, "id": "r1", "method": "conversation.markChat",
                   "data": {"conversationId": conv, "readSeq": 2}}));
    let ack = b.recv();
    assert_eq!(
        (
            ack["frameType"].as_i64(),
            ack["id"].as_str(),
            ack["data"]["readSeq"].as_u64()
        ),
        (Some(2), Some("r1"), Some(2))
    );
    // The sender gets a read receipt.
    let receipt = a.recv();
    assert_eq!(receipt["method"], "conversation.read");
    assert_eq!(
        receipt["data"],
        json!({"conversationId": conv, "readerId": bob, "readSeq": 2})
    );
    assert_eq!(list(&tb)[0]["unread"], 1);
    // History shows the sender each message's status.
    let (_, h) = s.get(&format!("/v1/conversations/{conv}/messages"), Some(&ta));
    let statuses: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["sent", "read", "read"]);

    // Never backwards; no receipt for a no-op.
    b.send(&json!({"frameType": 0, "id": "r2", "method": "conversation.markChat",
                   "data": {"conversationId": conv, "readSeq": 1}}));
    assert_eq!(b.recv()["data"]["readSeq"], 2);
    assert!(a.try_recv(Duration::from_millis(300)).is_none());
    // Over HTTP, clamped to the newest seq.
    let (st, v) = s.post(
        &format!("/v1/conversations/{conv}/read"),
        &json!({"readSeq": 99}),
        Some(&tb),
    );
    assert_eq!((st, v["readSeq"].as_u64()), (200, Some(3)));
    assert_eq!(list(&tb)[0]["unread"], 0);
    assert_eq!(a.recv()["data"]["readSeq"], 3);

    // Refusals: another user's conversation, bad input.
    assert_eq!(
        code(&s.post(
            &format!("/v1/conversations/{conv}/read"),
            &json!({"readSeq": 1}),
            Some(&tc)
        )),
        (403, "not_a_member")
    );
    assert_eq!(
        code(&s.get(&format!("/v1/conversations/{conv}/messages"), Some(&tc))),
        (403, "not_a_member")
    );
    assert_eq!(
        code(&s.get(&format!("/v1/conversations/{conv}/messages/1/reads"), Some(&tc))),
        (403, "not_a_member")
    );
    assert_eq!(
        code(&s.post(&format!("/v1/conversations/{conv}/read"), &json!({}), Some(&tb))),
        (400, "missing_field")
    );
    let mut c = s.connect(&tc);
    c.send(&json!({"id": "m", "method": "conversation.markChat", "data": {"conversationId": conv, "readSeq": 1}}));
    assert_eq!(c.recv()["data"]["code"], "not_a_member");
    c.send(&json!({"id": "m2", "method": "conversation.markChat", "data": {"conversationId": conv}}));
    assert_eq!(c.recv()["data"]["code"], "missing_field");
    // The private reads endpoint.
    let (_, r) = s.get(&format!("/v1/conversations/{conv}/messages/3/reads"), Some(&ta));
    assert_eq!(r, json!({"readCount": 1, "unreadCount": 0, "readerIds": [bob]}));
    assert_eq!(
        code(&s.get(&format!("/v1/conversations/{conv}/messages/9/reads"), Some(&ta))),
        (404, "message_not_found")
    );
}

#[test]
fn group_who_read_counts_after_several_members_read() {
    let s = Server::start(&[]);
    let users: Vec<(String, String)> = ["owner", "bee", "cee", "dee"].iter().map(|n| s.user(n)).collect();
    let ids: Vec<&String> = users[1..].iter().map(|u| &u.0).collect();
    let (_, g) = s.post(
        "/v1/groups",
        &json!({"name": "readers", "memberIds": ids}),
        Some(&users[0].1),
    );
    let gid = g["groupId"].as_str().unwrap().to_string();
    let conv = format!("sg_{gid}");
    let mut o = s.connect(&users[0].1);
    for i in 0..2 {
        o.chat_to_group(&gid, &format!("k{i}"), "hello all");
    }
    // frameType 3: no acks; wait until both are stored.
    let head = || s.get("/v1/conversations", Some(&users[3].1)).1["conversations"][0]["maxSeq"].as_u64();
    for _ in 0..100 {
        if head() == Some(2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(head(), Some(2));
    let mark = |t: &str, seq: u64| {
        s.post(
            &format!("/v1/conversations/{conv}/read"),
            &json!({"readSeq": seq}),
            Some(t),
        )
    };
    assert_eq!(mark(&users[1].1, 2).0, 200);
    assert_eq!(mark(&users[2].1, 1).0, 200);
    let reads = |seq: u64| {
        s.get(
            &format!("/v1/conversations/{conv}/messages/{seq}/reads"),
            Some(&users[0].1),
        )
        .1
    };
    let r1 = reads(1);
    assert_eq!(
        (r1["readCount"].as_u64(), r1["unreadCount"].as_u64()),
        (Some(2), Some(1))
    );
    let mut readers: Vec<String> = r1["readerIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    readers.sort();
    let mut want = vec![users[1].0.clone(), users[2].0.clone()];
    want.sort();
    assert_eq!(readers, want);
    let r2 = reads(2);
    assert_eq!(r2, json!({"readCount": 1, "unreadCount": 2, "readerIds": [users[1].0]}));
    // History carries readCount in groups; the unread count of d is 2.
    let (_, h) = s.get(&format!("/v1/conversations/{conv}/messages"), Some(&users[0].1));
    let counts: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["readCount"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![1, 2]);
    let ld = s.get("/v1/conversations", Some(&users[3].1)).1;
    assert_eq!(ld["conversations"][0]["unread"], 2);
    assert_eq!(ld["conversations"][0]["groupId"], gid.as_str());
}

#[test]
fn rigor_acks_mark_messages_received() {
    let s = Server::start(&["--ack-mode", "rigor"]);
    let (_, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    s.befriend(&ta, &bob, &tb);
    let mut a = s.connect(&ta);
    let mut b = s.connect(&tb);
    a.chat(&bob, "x1", "one");
    let conv = a.recv()["data"]["conversationId"].as_str().unwrap().to_string();
    let push = b.recv();
    b.ack(&push);
    let status = || {
        s.get(&format!("/v1/conversations/{conv}/messages"), Some(&ta)).1["messages"][0]["status"]
            .as_str()
            .map(String::from)
    };
    let mut seen = status();
    for _ in 0..100 {
        if seen.as_deref() == Some("received") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        seen = status();
    }
    assert_eq!(seen.as_deref(), Some("received"));
}

#[test]
fn grpc_social_and_read_state() {
    use pb::message_service_client::MessageServiceClient;
    use pb::social_service_client::SocialServiceClient;
    use sai_services::grpc::pb;

    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    common::block_on(async {
        let mut social = SocialServiceClient::connect(s.grpc.clone()).await.unwrap();
        let mut msgs = MessageServiceClient::connect(s.grpc.clone()).await.unwrap();
        let rid = social
            .send_friend_request(authed(
                &ta,
                pb::SendFriendRequestRequest {
                    to_user_id: bob.clone(),
                    message: "hi".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .request_id;
        let inbox = social
            .list_friend_requests(authed(&tb, pb::Empty {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(inbox.requests[0].request_id, rid);
        social
            .answer_friend_request(authed(
                &tb,
                pb::AnswerFriendRequestRequest {
                    request_id: rid,
                    accept: true,
                },
            ))
            .await
            .unwrap();
        let friends = social
            .list_friends(authed(&ta, pb::Empty {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(friends.friends[0].user_id, bob);
        let err = social
            .send_friend_request(authed(
                &ta,
                pb::SendFriendRequestRequest {
                    to_user_id: bob.clone(),
                    message: String::new(),
                },
            ))
            .await
            .unwrap_err();
        assert!(err.message().starts_with("already_friends:"), "{}", err.message());

        let gid = social
            .create_group(authed(
                &ta,
                pb::CreateGroupRequest {
                    name: "g".into(),
                    member_ids: vec![bob.clone()],
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .group_id;
        let members = social
            .list_members(authed(&tb, pb::GroupRef { group_id: gid.clone() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(members.members.len(), 2);
        let sent = msgs
            .send(authed(
                &ta,
                pb::SendRequest {
                    chat_type: 1,
                    recv_id: gid.clone(),
                    client_msg_id: "g1".into(),
                    msg_json: r#"{"content":"hi group"}"#.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let convs = msgs
            .list_conversations(authed(&tb, pb::ListConversationsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(convs.conversations[0].group_id, gid);
        assert_eq!(convs.conversations[0].unread, 1);
        let read = msgs
            .mark_read(authed(
                &tb,
                pb::MarkReadRequest {
                    conversation_id: sent.conversation_id.clone(),
                    read_seq: 1,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(read.read_seq, 1);
        let reads = msgs
            .get_reads(authed(
                &ta,
                pb::GetReadsRequest {
                    conversation_id: sent.conversation_id.clone(),
                    seq: 1,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (reads.read_count, reads.unread_count, reads.reader_ids.clone()),
            (1, 0, vec![bob.clone()])
        );
        let hist = msgs
            .history(authed(
                &ta,
                pb::HistoryRequest {
                    conversation_id: sent.conversation_id,
                    before_seq: 0,
                    limit: 10,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hist.messages[0].read_count, 1);
        let denied = social
            .set_role(authed(
                &tb,
                pb::SetRoleRequest {
                    group_id: gid,
                    user_id: alice.clone(),
                    role: "admin".into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    });
}

#[test]
fn presence_is_shown_to_friends_and_follows_the_connection() {
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, tb) = s.user("bob");
    let (carol, _) = s.user("carol");
    s.befriend(&ta, &bob, &tb);
    let online = |who: &str| {
        let (st, v) = s.get(&format!("/v1/presence?userIds={who},{alice}"), Some(&ta));
        assert_eq!(st, 200, "{v}");
        (
            v["online"][who].as_bool().unwrap(),
            v["online"][&alice].as_bool().unwrap(),
        )
    };
    assert_eq!(online(&bob), (false, false));
    // The route is taken right after the upgrade (the monoio engine writes the 101 first).
    let until = |want: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while online(&bob) != (want, false) {
            assert!(std::time::Instant::now() < deadline, "bob never showed online={want}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let b = s.connect(&tb);
    until(true);
    drop(b);
    until(false);
    assert_eq!(
        code(&s.get(&format!("/v1/presence?userIds={carol}"), Some(&ta))),
        (403, "not_friends")
    );
    assert_eq!(
        code(&s.get("/v1/presence?userIds=", Some(&ta))),
        (400, "invalid_user_ids")
    );
    let many = vec![bob.as_str(); 101].join(",");
    assert_eq!(
        code(&s.get(&format!("/v1/presence?userIds={many}"), Some(&ta))),
        (400, "invalid_user_ids")
    );
    assert_eq!(code(&s.get(&format!("/v1/presence?userIds={bob}"), None)).0, 401);
}

#[test]
fn users_are_found_by_exact_name_and_shown_without_their_secrets() {
    let s = Server::start(&[]);
    let (alice, ta) = s.user("alice");
    let (bob, _) = s.user("bob");

    let (st, v) = s.get("/v1/users?username=bob", Some(&ta));
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v,
        json!({"users": [{"userId": bob, "username": "bob", "nickname": "bob"}]})
    );
    let (st, v) = s.get("/v1/users?username=bo", Some(&ta));
    assert_eq!((st, v), (200, json!({"users": []})), "exact names only");
    let (st, v) = s.get(&format!("/v1/users/{alice}"), Some(&ta));
    assert_eq!(st, 200);
    assert_eq!(v, json!({"userId": alice, "username": "alice", "nickname": "alice"}));

    assert_eq!(code(&s.get("/v1/users?username=bob", None)), (401, "missing_token"));
    assert_eq!(code(&s.get("/v1/users", Some(&ta))), (400, "missing_field"));
    assert_eq!(
        code(&s.get("/v1/users/no-such-user", Some(&ta))),
        (404, "user_not_found")
    );
}

#[test]
fn the_web_client_is_served_with_the_gateway_port_it_needs() {
    let s = Server::start(&[]);
    let page = |path: &str| {
        let mut resp = ureq::get(format!("{}{path}", s.http)).call().unwrap();
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        (kind, resp.body_mut().read_to_string().unwrap())
    };
    let (kind, html) = page("/");
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(html.contains("/app.js") && html.contains("/app.css"));
    let (kind, js) = page("/app.js");
    assert!(kind.starts_with("text/javascript"), "{kind}");
    assert!(js.contains("conversation.sync"));
    assert!(page("/app.css").0.starts_with("text/css"));
    let (_, client) = page("/client.json");
    let client: Value = serde_json::from_str(&client).unwrap();
    let ws_port =
        s.ws.rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches("/ws")
            .parse::<u64>()
            .unwrap();
    assert_eq!(client["wsPort"], ws_port, "{client} vs {}", s.ws);
}
