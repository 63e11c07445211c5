//! The contract of the storage traits as executable checks, run against every adapter (each
//! adapter's tests call these on a fresh, empty store). A failed check panics with what broke.
//!
//! Concurrency checks (many appends racing on one conversation) need a runtime to spawn on, so
//! they take the racing futures' outcome from the caller: see [`check_concurrent_appends`].

#![allow(clippy::expect_used)] // Every check is an assertion: failing loudly is its job.

use crate::{
    AddMembersError, Appended, BitmapWrite, FriendRequest, Group, MessageStore, NewMessage, ReadBitmapCodec, ReadMark,
    ReadMarkSink, SocialStore, StoreError, User, UserStore,
};
use async_trait::async_trait;
use std::collections::BTreeSet;
use std::sync::Mutex;

fn user(id: &str, name: &str) -> User {
    User {
        user_id: id.into(),
        username: name.into(),
        nickname: name.into(),
        password_hash: "$2b$04$hash".into(),
        created_at: 1,
        token_epoch: 0,
        disabled: false,
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
    let bulk: Vec<User> = (0..50)
        .map(|i| user(&format!("bulk{i}"), &format!("bulk{i}")))
        .collect();
    assert_eq!(s.create_users_bulk(&bulk).await.expect("bulk"), 50);
    assert_eq!(
        s.create_users_bulk(&bulk[40..]).await.expect("bulk again"),
        0,
        "existing users are skipped"
    );
    assert_eq!(
        s.user_by_id("bulk49").await.expect("bulk user").map(|u| u.username),
        Some("bulk49".into())
    );
    check_revocation(s).await;
}

/// Every revocation starts a new token epoch, atomically with the change it comes with.
async fn check_revocation(s: &dyn UserStore) {
    s.create_user(&user("u-r", "revoked")).await.expect("create");
    assert_eq!(s.revoke_tokens("u-r").await.expect("revoke"), Some(1));
    assert_eq!(s.revoke_tokens("u-r").await.expect("revoke"), Some(2));
    assert_eq!(s.set_password("u-r", "$2b$04$new").await.expect("password"), Some(3));
    let u = s.user_by_id("u-r").await.expect("read").expect("exists");
    assert_eq!(
        (u.password_hash.as_str(), u.token_epoch, u.disabled),
        ("$2b$04$new", 3, false)
    );
    assert_eq!(s.set_disabled("u-r", true).await.expect("disable"), Some(4));
    let u = s.user_by_name("revoked").await.expect("read").expect("exists");
    assert_eq!((u.token_epoch, u.disabled), (4, true));
    assert_eq!(s.set_disabled("u-r", false).await.expect("enable"), Some(5));
    assert!(!s.user_by_id("u-r").await.expect("read").expect("exists").disabled);
    assert_eq!(s.revoke_tokens("nobody").await.expect("unknown"), None);
    assert_eq!(s.set_password("nobody", "x").await.expect("unknown"), None);
    assert_eq!(s.set_disabled("nobody", true).await.expect("unknown"), None);
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
    // Keys compare byte for byte: case and trailing spaces make another key.
    for (key, seq) in [("q", 1), ("Q", 2), ("q ", 3)] {
        let Appended::New(m) = s.append(message("c3", "kx", "ky", key)).await.expect("append") else {
            panic!("{key:?} taken for a duplicate");
        };
        assert_eq!(m.seq, seq);
    }

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

/// A test codec: slots as sorted little-endian u32s (format 200). The contract only needs the
/// store to hand the codec what it stored and keep what it returns.
pub struct ListCodec;

impl ReadBitmapCodec for ListCodec {
    fn format(&self) -> u8 {
        200
    }

    fn insert(&self, existing: Option<(u8, &[u8])>, slot: u32) -> Result<Vec<u8>, String> {
        let mut slots = match existing {
            None => Vec::new(),
            Some((200, b)) if b.len() % 4 == 0 => ListCodec::decode(b),
            Some((f, _)) => return Err(format!("bad record format {f}")),
        };
        if !slots.contains(&slot) {
            slots.push(slot);
            slots.sort_unstable();
        }
        Ok(slots.iter().flat_map(|s| s.to_le_bytes()).collect())
    }
}

impl ListCodec {
    /// The slots in a record.
    pub fn decode(b: &[u8]) -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// Friend requests (one pending per pair, resolved once), friendships both ways, groups with
/// dense never-reused slots, membership of the group conversation from the join seq, limits.
pub async fn check_social<S: SocialStore + MessageStore>(s: &S) {
    let req = |id: &str, from: &str, to: &str| FriendRequest {
        request_id: id.into(),
        from_user: from.into(),
        to_user: to.into(),
        message: "hi".into(),
        status: "pending".into(),
        created_at: 5,
    };
    s.create_friend_request(&req("r1", "a", "b")).await.expect("request");
    assert!(matches!(
        s.create_friend_request(&req("r2", "b", "a")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.incoming_friend_requests("b").await.expect("incoming").len(), 1);
    assert!(s.resolve_friend_request("r1", true, 9).await.expect("accept"));
    assert!(
        !s.resolve_friend_request("r1", false, 9).await.expect("again"),
        "resolved once"
    );
    assert!(s.incoming_friend_requests("b").await.expect("incoming").is_empty());
    assert!(s.are_friends("a", "b").await.expect("friends") && s.are_friends("b", "a").await.expect("friends"));
    assert_eq!(s.friends_of("a").await.expect("friends")[0].user_id, "b");
    // After an answer, a new request between the same pair may be made.
    s.create_friend_request(&req("r3", "b", "a"))
        .await
        .expect("new request");
    assert!(s.resolve_friend_request("r3", false, 9).await.expect("reject"));
    assert!(s.remove_friend("b", "a").await.expect("unfriend"));
    assert!(!s.are_friends("a", "b").await.expect("friends"));
    assert!(!s.remove_friend("a", "b").await.expect("unfriend twice"));

    let g = Group {
        group_id: "g1".into(),
        name: "team".into(),
        owner_id: "a".into(),
        member_count: 3,
        created_at: 1,
    };
    let members = vec!["a".to_string(), "b".to_string(), "c".to_string()];
    s.create_group(&g, "sg_g1", &members).await.expect("create group");
    let ms = s.group_members("g1").await.expect("members");
    let slots: Vec<(String, u32, String)> = ms.iter().map(|m| (m.user_id.clone(), m.slot, m.role.clone())).collect();
    assert_eq!(
        slots,
        vec![
            ("a".into(), 0, "owner".into()),
            ("b".into(), 1, "member".into()),
            ("c".into(), 2, "member".into())
        ]
    );
    for (i, key) in ["x", "y"].iter().enumerate() {
        let mut m = message("sg_g1", "a", "g1", key);
        m.chat_type = 1;
        m.members = Vec::new();
        let Appended::New(m) = s.append(m).await.expect("group append") else {
            panic!("fresh key reported duplicate");
        };
        assert_eq!(m.seq, i as u64 + 1);
    }
    assert!(s.remove_group_member("g1", "sg_g1", "c").await.expect("remove"));
    assert!(!s.is_member("sg_g1", "c").await.expect("member"));
    let added = s
        .add_group_members("g1", "sg_g1", &["d".into(), "b".into(), "d".into()], 4, 7)
        .await
        .expect("add");
    assert_eq!(added.len(), 1, "existing members and repeats are skipped");
    assert_eq!(added[0].slot, 3, "slots are never reused");
    let d = s.conversations_of("d").await.expect("heads");
    assert_eq!((d[0].max_seq, d[0].joined_seq), (2, 2), "joins at the current max seq");
    assert!(matches!(
        s.add_group_members("g1", "sg_g1", &["e".into(), "f".into()], 4, 7)
            .await,
        Err(AddMembersError::Full { limit: 4, .. })
    ));
    assert!(matches!(
        s.add_group_members("nope", "sg_nope", &["e".into()], 4, 7).await,
        Err(AddMembersError::NoGroup)
    ));
    assert_eq!(s.group("g1").await.expect("group").map(|g| g.member_count), Some(3));
    assert!(s.set_group_role("g1", "b", "admin").await.expect("role"));
    assert_eq!(
        s.group_member("g1", "b").await.expect("member").map(|m| m.role),
        Some("admin".into())
    );
    assert_eq!(s.groups_of("d").await.expect("groups")[0].0.group_id, "g1");
}

/// Read positions never move backwards and are clamped to the max seq; the reader's slot lands
/// in the bitmap of each newly read message not sent by the reader; received positions too.
pub async fn check_read_state(s: &dyn MessageStore) {
    for key in ["r1", "r2", "r3"] {
        s.append(message("rs", "a", "b", key)).await.expect("append");
    }
    s.append(message("rs", "b", "a", "from-b")).await.expect("append");
    let codec = ListCodec;
    assert_eq!(
        s.mark_read("rs", "b", 2, Some((7, BitmapWrite::Now(&codec))))
            .await
            .expect("read"),
        Some((0, 2))
    );
    assert_eq!(
        s.mark_read("rs", "b", 1, Some((7, BitmapWrite::Now(&codec))))
            .await
            .expect("read"),
        Some((2, 2))
    );
    assert_eq!(
        s.mark_read("rs", "b", 99, Some((7, BitmapWrite::Now(&codec))))
            .await
            .expect("read"),
        Some((2, 4))
    );
    assert_eq!(s.mark_read("rs", "stranger", 1, None).await.expect("read"), None);
    for seq in 1..=3 {
        let r = s.read_record("rs", seq).await.expect("record").expect("present");
        assert_eq!((r.format, ListCodec::decode(&r.bytes)), (200, vec![7]));
    }
    assert!(
        s.read_record("rs", 4).await.expect("record").is_none(),
        "own message is not marked"
    );
    assert_eq!(
        s.mark_read("rs", "a", 4, Some((3, BitmapWrite::Now(&codec))))
            .await
            .expect("read"),
        Some((0, 4))
    );
    assert_eq!(
        ListCodec::decode(&s.read_record("rs", 4).await.expect("r").expect("p").bytes),
        vec![3]
    );
    assert_eq!(
        ListCodec::decode(&s.read_record("rs", 1).await.expect("r").expect("p").bytes),
        vec![7]
    );
    s.mark_received("rs", "b", 3).await.expect("received");
    s.mark_received("rs", "b", 1).await.expect("received");
    let states = s.member_states("rs").await.expect("states");
    let b = states.iter().find(|m| m.user_id == "b").expect("b");
    assert_eq!((b.read_seq, b.received_seq), (4, 3));
    let list = s.conversation_summaries("b", 0, 10).await.expect("summaries");
    let rs = list.iter().find(|c| c.conversation_id == "rs").expect("rs listed");
    assert_eq!((rs.unread, rs.max_seq, rs.read_seq), (0, 4, 4));
    assert_eq!(rs.last_message.as_ref().map(|m| m.seq), Some(4));
}

/// A [`ReadMarkSink`] that keeps what it is handed, or refuses everything.
#[derive(Default)]
pub struct KeptMarks {
    /// Marks handed so far.
    pub marks: Mutex<Vec<ReadMark>>,
    /// Refuse every mark (a queue that is down).
    pub refuse: bool,
}

#[async_trait]
impl ReadMarkSink for KeptMarks {
    async fn hand(&self, mark: ReadMark) -> Result<(), String> {
        if self.refuse {
            return Err("the queue is down".into());
        }
        self.marks.lock().map_err(|e| e.to_string())?.push(mark);
        Ok(())
    }
}

/// Read receipts whose bitmaps are handed to a queue: the mark holds the advanced range, no
/// bitmap is written until [`MessageStore::add_readers`], a refused mark leaves the read
/// position where it was, and the batch write merges readers, skips each reader's own messages,
/// ignores ranges past the max seq, and changes nothing when applied again.
pub async fn check_handed_read_marks(s: &dyn MessageStore) {
    let members: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    for (from, key) in [("a", "h1"), ("a", "h2"), ("c", "h3"), ("b", "h4")] {
        let mut m = message("hm", from, "", key);
        (m.chat_type, m.members) = (1, members.clone());
        s.append(m).await.expect("append");
    }
    let kept = KeptMarks::default();
    let down = KeptMarks {
        refuse: true,
        ..KeptMarks::default()
    };
    let handed = |q| Some((7, BitmapWrite::Handed(q)));
    assert_eq!(
        s.mark_read("hm", "b", 2, handed(&kept)).await.expect("read"),
        Some((0, 2))
    );
    assert!(
        s.read_record("hm", 1).await.expect("record").is_none(),
        "handed, not written"
    );
    assert!(matches!(
        s.mark_read("hm", "b", 4, handed(&down)).await,
        Err(StoreError::Unavailable(_))
    ));
    let b = |states: Vec<crate::MemberState>| states.into_iter().find(|m| m.user_id == "b").map(|m| m.read_seq);
    assert_eq!(
        b(s.member_states("hm").await.expect("states")),
        Some(2),
        "a refused mark rolls back"
    );
    assert_eq!(
        s.mark_read("hm", "b", 99, handed(&kept)).await.expect("read"),
        Some((2, 4))
    );
    assert_eq!(
        s.mark_read("hm", "c", 4, Some((9, BitmapWrite::Handed(&kept))))
            .await
            .expect("read"),
        Some((0, 4))
    );
    let mut marks = kept.marks.lock().expect("marks").clone();
    let mark = |user: &str, slot, after_seq, up_to_seq| ReadMark {
        conversation_id: "hm".into(),
        user_id: user.into(),
        slot,
        after_seq,
        up_to_seq,
    };
    assert_eq!(marks, vec![mark("b", 7, 0, 2), mark("b", 7, 2, 4), mark("c", 9, 0, 4)]);
    // A repeat in the same batch, a range past the max seq, a conversation that does not exist.
    marks.push(mark("b", 7, 0, 2));
    marks.push(mark("a", 3, 2, 50));
    marks.push(ReadMark {
        conversation_id: "nowhere".into(),
        ..mark("a", 3, 0, 5)
    });
    let codec = ListCodec;
    assert_eq!(s.add_readers(&marks, &codec).await.expect("add"), 4);
    let slots = |seq| async move {
        let r = s.read_record("hm", seq).await.expect("record");
        r.map(|r| ListCodec::decode(&r.bytes)).unwrap_or_default()
    };
    assert_eq!(slots(1).await, vec![7, 9]);
    assert_eq!(slots(2).await, vec![7, 9]);
    assert_eq!(slots(3).await, vec![3, 7], "c's own message");
    assert_eq!(slots(4).await, vec![3, 9], "b's own message");
    assert_eq!(s.add_readers(&marks, &codec).await.expect("again"), 0, "applied twice");
    assert_eq!(s.add_readers(&[], &codec).await.expect("none"), 0);
}
