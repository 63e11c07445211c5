//! The contract of the storage traits as executable checks, run against every adapter (each
//! adapter's tests call these on a fresh, empty store). A failed check panics with what broke.
//!
//! Concurrency checks (many appends racing on one conversation) need a runtime to spawn on, so
//! they take the racing futures' outcome from the caller: see [`check_concurrent_appends`].

#![allow(clippy::expect_used)] // Every check is an assertion: failing loudly is its job.

use crate::{Appended, MessageStore, NewMessage, StoreError, User, UserStore};
use std::collections::BTreeSet;

fn user(id: &str, name: &str) -> User {
    User {
        user_id: id.into(),
        username: name.into(),
        nickname: name.into(),
        password_hash: "$2b$04$hash".into(),
        created_at: 1,
    }
}

/// A message from `from` to `to` in conversation `conv` with idempotency key `key`.
pub fn message(conv: &str, from: &str, to: &str, key: &str) -> NewMessage {
    NewMessage {
        conversation_id: conv.into(),
        chat_type: 2,
        send_id: from.into(),
        recv_id: to.into(),
        client_msg_id: key.into(),
        msg_id: format!("id-{from}-{key}"),
        send_time: 1_000,
        body: format!("{{\"k\":\"{key}\"}}"),
        members: vec![from.into(), to.into()],
    }
}

/// Usernames and ids are unique; lookups find what was stored.
pub async fn check_users(s: &dyn UserStore) {
    let a = user("u-a", "alice");
    s.create_user(&a).await.expect("create alice");
    assert!(matches!(
        s.create_user(&user("u-other", "alice")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.create_user(&user("u-a", "bob")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.user_by_name("alice").await.expect("by name"), Some(a.clone()));
    assert_eq!(s.user_by_id("u-a").await.expect("by id"), Some(a));
    assert_eq!(s.user_by_name("nobody").await.expect("missing"), None);
    assert_eq!(s.user_by_id("nobody").await.expect("missing"), None);
}

/// Seqs start at 1 per conversation, increase by one, and a repeated `(send_id, client_msg_id)`
/// returns the original without writing; pages come back in the documented order.
pub async fn check_messages(s: &dyn MessageStore) {
    let mut seqs = Vec::new();
    for i in 0..5 {
        match s
            .append(message("c1", "a", "b", &format!("k{i}")))
            .await
            .expect("append")
        {
            Appended::New(m) => seqs.push(m.seq),
            Appended::Duplicate(m) => panic!("fresh key reported duplicate: {m:?}"),
        }
    }
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    // Another conversation has its own sequence.
    let Appended::New(m) = s.append(message("c2", "a", "c", "k0-c2")).await.expect("append") else {
        panic!("fresh key reported duplicate");
    };
    assert_eq!(m.seq, 1);
    // Idempotency: same sender + key, even with another body, returns the original.
    let mut again = message("c1", "a", "b", "k2");
    again.body = "{\"changed\":true}".into();
    match s.append(again).await.expect("append dup") {
        Appended::Duplicate(m) => {
            assert_eq!(m.seq, 3);
            assert_eq!(m.body, "{\"k\":\"k2\"}");
        }
        Appended::New(m) => panic!("duplicate stored again: {m:?}"),
    }
    // The same key from another sender is a different message.
    let Appended::New(m) = s.append(message("c1", "b", "a", "k2")).await.expect("append") else {
        panic!("another sender's key reported duplicate");
    };
    assert_eq!(m.seq, 6);

    let after: Vec<u64> = s
        .messages_after("c1", 2, 10)
        .await
        .expect("after")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(after, vec![3, 4, 5, 6]);
    let after: Vec<u64> = s
        .messages_after("c1", 0, 2)
        .await
        .expect("after")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(after, vec![1, 2]);
    let before: Vec<u64> = s
        .messages_before("c1", None, 3)
        .await
        .expect("before")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(before, vec![6, 5, 4]);
    let before: Vec<u64> = s
        .messages_before("c1", Some(3), 10)
        .await
        .expect("before")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(before, vec![2, 1]);
    assert!(s.messages_after("nope", 0, 10).await.expect("empty").is_empty());

    let heads = s.conversations_of("a").await.expect("heads");
    let heads: Vec<(String, u64)> = heads.into_iter().map(|h| (h.conversation_id, h.max_seq)).collect();
    assert_eq!(heads, vec![("c1".to_string(), 6), ("c2".to_string(), 1)]);
    assert_eq!(s.conversations_of("c").await.expect("heads").len(), 1);
    assert!(s.is_member("c1", "b").await.expect("member"));
    assert!(!s.is_member("c1", "c").await.expect("member"));
}

/// Given the outcomes of `n` appends with distinct keys raced on one fresh conversation, checks
/// they got exactly the seqs 1..=n.
pub fn check_concurrent_appends(outcomes: Vec<Appended>, n: u64) {
    let seqs: BTreeSet<u64> = outcomes
        .into_iter()
        .map(|o| match o {
            Appended::New(m) => m.seq,
            Appended::Duplicate(m) => panic!("distinct key reported duplicate: {m:?}"),
        })
        .collect();
    assert_eq!(seqs, (1..=n).collect::<BTreeSet<u64>>(), "seqs must be exactly 1..=n");
}
