//! Storage traits of SAI-IM. This crate sees no database driver.
//!
//! Services talk to storage only through these traits; each backend is one adapter crate or
//! module (the embedded SQLite adapter in `sai-services` is the reference implementation; MySQL,
//! MongoDB and Redis adapters implement the same traits). The contract each method documents is
//! what the shared conformance suite checks, so every adapter must keep it, including under
//! several service processes sharing one database:
//!
//! - [`UserStore`]: accounts, unique usernames.
//! - [`SocialStore`]: friend requests, friendships, groups and their members (each member holds a
//!   dense `slot`, the bit it owns in the group's read-receipt bitmaps).
//! - [`MessageStore`]: append-only conversations with a per-conversation `seq` that is strictly
//!   increasing from 1, gapless, never reused, and assigned atomically with the idempotency check
//!   on `(send_id, client_msg_id)`.

use async_trait::async_trait;

/// Why a storage call failed, classified by cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness constraint refused the write (e.g. the username exists). The caller's fault.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend is unreachable, overloaded or timed out; retrying may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data does not decode; a bug or corruption, not retryable.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Shorthand.
pub type StoreResult<T> = Result<T, StoreError>;

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Opaque, immutable id.
    pub user_id: String,
    /// Unique login name.
    pub username: String,
    /// Display name.
    pub nickname: String,
    /// bcrypt hash (`$2b$...`).
    pub password_hash: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Tokens carry the epoch they were issued in; only those of the current one are accepted.
    /// Starts at 0; every revocation (logout, password change, disable) adds one.
    pub token_epoch: u32,
    /// A disabled account cannot log in and its tokens are refused.
    pub disabled: bool,
}

/// Accounts.
#[async_trait]
pub trait UserStore: Send + Sync + 'static {
    /// Inserts a user; [`StoreError::Conflict`] if the username or id exists.
    async fn create_user(&self, user: &User) -> StoreResult<()>;
    /// Looks a user up by login name.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>>;
    /// Looks a user up by id.
    async fn user_by_id(&self, user_id: &str) -> StoreResult<Option<User>>;
    /// Inserts many users at once, skipping any whose id or username exists; returns how many
    /// were inserted. For provisioning load tests, not for sign-up.
    async fn create_users_bulk(&self, users: &[User]) -> StoreResult<u64>;
    /// Starts a new token epoch of `user_id` (every token issued before is refused from now on);
    /// the new epoch, or `None` for an unknown user. Atomic: two revocations give two epochs.
    async fn revoke_tokens(&self, user_id: &str) -> StoreResult<Option<u32>>;
    /// Replaces the password hash and starts a new token epoch in one write; the new epoch.
    async fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<Option<u32>>;
    /// Disables or enables the account and starts a new token epoch in one write; the new epoch.
    async fn set_disabled(&self, user_id: &str, disabled: bool) -> StoreResult<Option<u32>>;
}

/// A message to append; the store assigns its `seq`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Target conversation.
    pub conversation_id: String,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// Sender.
    pub send_id: String,
    /// Recipient user or group.
    pub recv_id: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Server-assigned id (kept if the message turns out to be a duplicate: the original's wins).
    pub msg_id: String,
    /// Milliseconds since the Unix epoch.
    pub send_time: i64,
    /// The body as raw JSON.
    pub body: String,
    /// Users who belong to the conversation (added on first append; both ends of a private chat).
    pub members: Vec<String>,
}

impl NewMessage {
    /// The message as stored with `seq`.
    pub fn stored(&self, seq: u64) -> StoredMessage {
        StoredMessage {
            conversation_id: self.conversation_id.clone(),
            chat_type: self.chat_type,
            seq,
            send_id: self.send_id.clone(),
            recv_id: self.recv_id.clone(),
            client_msg_id: self.client_msg_id.clone(),
            msg_id: self.msg_id.clone(),
            send_time: self.send_time,
            body: self.body.clone(),
        }
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Conversation.
    pub conversation_id: String,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// Position in the conversation, from 1.
    pub seq: u64,
    /// Sender.
    pub send_id: String,
    /// Recipient user or group.
    pub recv_id: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Server id.
    pub msg_id: String,
    /// Milliseconds since the Unix epoch.
    pub send_time: i64,
    /// Body as raw JSON.
    pub body: String,
}

/// What [`MessageStore::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored now with the next seq.
    New(StoredMessage),
    /// `(send_id, client_msg_id)` was stored before: this is the original, nothing was written.
    Duplicate(StoredMessage),
}

/// A conversation a user belongs to, with its newest seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationHead {
    /// Conversation id.
    pub conversation_id: String,
    /// Highest seq assigned (0: no message yet).
    pub max_seq: u64,
    /// The user sees only messages after this seq (the conversation's max seq when they joined a
    /// group; 0 for private chats).
    pub joined_seq: u64,
}

/// One member's position in a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    /// The member.
    pub user_id: String,
    /// Messages up to this seq are read (never moves backwards).
    pub read_seq: u64,
    /// Messages up to this seq were acknowledged by the member's client (rigor mode).
    pub received_seq: u64,
    /// See [`ConversationHead::joined_seq`].
    pub joined_seq: u64,
}

/// A conversation as its member's conversation list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    /// Conversation id.
    pub conversation_id: String,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// Highest seq.
    pub max_seq: u64,
    /// The member's read position.
    pub read_seq: u64,
    /// Messages after `read_seq` not sent by the member.
    pub unread: u64,
    /// Time of the last message (ms since the epoch).
    pub updated_at: i64,
    /// The newest message the member can see.
    pub last_message: Option<StoredMessage>,
}

/// How a read-receipt bitmap is encoded; the store keeps the bytes opaque, tagged with the codec's
/// format number, so a new codec can take over while bitmaps in older formats stay readable.
pub trait ReadBitmapCodec: Send + Sync {
    /// The format number this codec writes.
    fn format(&self) -> u8;
    /// `existing` (in any format the codec reads) with `slot` added, encoded in [`Self::format`].
    fn insert(&self, existing: Option<(u8, &[u8])>, slot: u32) -> Result<Vec<u8>, String>;
}

/// One read receipt's bitmap work: `user_id` (the member in `slot`) read the messages of
/// `conversation_id` in `(after_seq, up_to_seq]`, and joins the read bitmap of each of them it
/// did not send. What travels to the task process over `msg_to_mongo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMark {
    /// The group conversation.
    pub conversation_id: String,
    /// The reader (its own messages are not marked).
    pub user_id: String,
    /// The reader's bit in the group's bitmaps.
    pub slot: u32,
    /// The reader's read position before this receipt.
    pub after_seq: u64,
    /// The read position the receipt moved it to.
    pub up_to_seq: u64,
}

/// A durable queue of read marks (the task process's `msg_to_mongo`).
#[async_trait]
pub trait ReadMarkSink: Send + Sync {
    /// Returns once the queue holds `mark` durably; an error names what refused it.
    async fn hand(&self, mark: ReadMark) -> Result<(), String>;
}

/// Where a read receipt's bitmap updates go.
#[derive(Clone, Copy)]
pub enum BitmapWrite<'a> {
    /// Written in the receipt's own transaction, in this codec.
    Now(&'a dyn ReadBitmapCodec),
    /// Handed as a [`ReadMark`] to a queue before the receipt commits, and written later, in
    /// batches, by [`MessageStore::add_readers`]. A crash between the two leaves a mark for a
    /// receipt that did not commit (its reader lands in bitmaps of messages it said it read),
    /// never a committed receipt without its mark.
    Handed(&'a dyn ReadMarkSink),
}

/// A stored read-receipt bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// Codec format number.
    pub format: u8,
    /// Encoded bitmap of member slots that have read the message.
    pub bytes: Vec<u8>,
}

impl ReadRecord {
    /// `existing` with `slots` added, in `codec`'s format; `None` when it already held them all
    /// in that format (nothing to write). Bytes the codec cannot read are [`StoreError::Corrupt`].
    pub fn with_readers(
        existing: Option<ReadRecord>,
        slots: &[u32],
        codec: &dyn ReadBitmapCodec,
    ) -> StoreResult<Option<ReadRecord>> {
        let mut bytes: Option<Vec<u8>> = None;
        for &slot in slots {
            let current = match (&bytes, &existing) {
                (Some(b), _) => Some((codec.format(), b.as_slice())),
                (None, Some(r)) => Some((r.format, r.bytes.as_slice())),
                (None, None) => None,
            };
            bytes = Some(codec.insert(current, slot).map_err(StoreError::Corrupt)?);
        }
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        if existing.is_some_and(|r| r.format == codec.format() && r.bytes == bytes) {
            return Ok(None);
        }
        Ok(Some(ReadRecord {
            format: codec.format(),
            bytes,
        }))
    }
}

/// A friend request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FriendRequest {
    /// Request id.
    pub request_id: String,
    /// Who asked.
    pub from_user: String,
    /// Who is asked.
    pub to_user: String,
    /// Free text.
    pub message: String,
    /// `pending`, `accepted` or `rejected`.
    pub status: String,
    /// ms since the epoch.
    pub created_at: i64,
}

/// A friendship, from one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Friend {
    /// The friend.
    pub user_id: String,
    /// When the friendship began (ms).
    pub since: i64,
}

/// A group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group id.
    pub group_id: String,
    /// Name.
    pub name: String,
    /// Owner.
    pub owner_id: String,
    /// Members now.
    pub member_count: u32,
    /// ms since the epoch.
    pub created_at: i64,
}

/// A group member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The member.
    pub user_id: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
    /// The member's bit in the group's read bitmaps. Slots are never reused within a group, so a
    /// bit always means the same person.
    pub slot: u32,
    /// ms since the epoch.
    pub joined_at: i64,
}

/// Why [`SocialStore::add_group_members`] refused.
#[derive(Debug, thiserror::Error)]
pub enum AddMembersError {
    /// The group would exceed its member limit.
    #[error("group would have {would_have} members; the limit is {limit}")]
    Full {
        /// Members after the add.
        would_have: u32,
        /// The limit.
        limit: u32,
    },
    /// The group does not exist.
    #[error("no such group")]
    NoGroup,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Friends and groups.
#[async_trait]
pub trait SocialStore: Send + Sync + 'static {
    /// Stores a pending request; [`StoreError::Conflict`] if one is pending between the two users
    /// in either direction.
    async fn create_friend_request(&self, req: &FriendRequest) -> StoreResult<()>;
    /// A request by id.
    async fn friend_request(&self, request_id: &str) -> StoreResult<Option<FriendRequest>>;
    /// Pending requests sent to `user_id`, oldest first.
    async fn incoming_friend_requests(&self, user_id: &str) -> StoreResult<Vec<FriendRequest>>;
    /// Moves a pending request to `accepted` (creating the friendship both ways) or `rejected`,
    /// atomically. Returns false if it was not pending.
    async fn resolve_friend_request(&self, request_id: &str, accept: bool, now: i64) -> StoreResult<bool>;
    /// Friends of a user.
    async fn friends_of(&self, user_id: &str) -> StoreResult<Vec<Friend>>;
    /// Whether two users are friends.
    async fn are_friends(&self, a: &str, b: &str) -> StoreResult<bool>;
    /// Ends a friendship (both ways). Returns false if there was none.
    async fn remove_friend(&self, a: &str, b: &str) -> StoreResult<bool>;

    /// Creates a group with its members (the owner first, with role `owner`) and its
    /// conversation `conversation_id`, atomically.
    async fn create_group(&self, group: &Group, conversation_id: &str, members: &[String]) -> StoreResult<()>;
    /// A group by id.
    async fn group(&self, group_id: &str) -> StoreResult<Option<Group>>;
    /// Groups a user belongs to, with the user's membership.
    async fn groups_of(&self, user_id: &str) -> StoreResult<Vec<(Group, GroupMember)>>;
    /// Members of a group, by slot.
    async fn group_members(&self, group_id: &str) -> StoreResult<Vec<GroupMember>>;
    /// One member.
    async fn group_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupMember>>;
    /// Adds users (skipping existing members) with fresh slots and makes them members of the
    /// group's conversation from its current max seq; refuses past `limit` members.
    async fn add_group_members(
        &self,
        group_id: &str,
        conversation_id: &str,
        users: &[String],
        limit: u32,
        now: i64,
    ) -> Result<Vec<GroupMember>, AddMembersError>;
    /// Removes a member from the group and its conversation. Returns false if not a member.
    async fn remove_group_member(&self, group_id: &str, conversation_id: &str, user_id: &str) -> StoreResult<bool>;
    /// Changes a member's role. Returns false if not a member.
    async fn set_group_role(&self, group_id: &str, user_id: &str, role: &str) -> StoreResult<bool>;
}

/// What a store's batching writer does, for metrics: relaxed counters the writer adds to once
/// per batch and a scrape reads.
#[derive(Debug, Default)]
pub struct WriteStats {
    /// Batches written.
    pub batches: std::sync::atomic::AtomicU64,
    /// Jobs (appends, received positions) in them: divided by `batches`, the mean batch size.
    pub jobs: std::sync::atomic::AtomicU64,
    /// Jobs left waiting in the writer's queue when it took its last batch.
    pub queued: std::sync::atomic::AtomicU64,
}

impl WriteStats {
    /// The writer took a batch of `jobs`, leaving `queued` behind.
    pub fn batch(&self, jobs: usize, queued: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.batches.fetch_add(1, Relaxed);
        self.jobs.fetch_add(jobs as u64, Relaxed);
        self.queued.store(queued as u64, Relaxed);
    }
}

/// Conversations and their messages.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// The batching writer's counts, when the store has one (metrics).
    fn write_stats(&self) -> Option<std::sync::Arc<WriteStats>> {
        None
    }

    /// Durably appends a message with the conversation's next seq, unless `(send_id,
    /// client_msg_id)` exists, in which case the original is returned and nothing is written.
    /// Returns only once the message is durable.
    async fn append(&self, msg: NewMessage) -> StoreResult<Appended>;
    /// Messages with `seq > after_seq`, ascending, at most `limit`.
    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>>;
    /// Messages with `seq < before_seq` (all when `None`), newest first, at most `limit`.
    async fn messages_before(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>>;
    /// Every conversation `user_id` belongs to.
    async fn conversations_of(&self, user_id: &str) -> StoreResult<Vec<ConversationHead>>;
    /// Whether `user_id` belongs to the conversation.
    async fn is_member(&self, conversation_id: &str, user_id: &str) -> StoreResult<bool>;
    /// The message with this seq.
    async fn message(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<StoredMessage>>;
    /// Every member's position in the conversation.
    async fn member_states(&self, conversation_id: &str) -> StoreResult<Vec<MemberState>>;
    /// The user's conversations, most recent activity first.
    async fn conversation_summaries(
        &self,
        user_id: &str,
        offset: u32,
        limit: u32,
    ) -> StoreResult<Vec<ConversationSummary>>;
    /// Moves the member's read position to `read_seq` (clamped to the max seq; never backwards)
    /// and, when `reader_slot` is given, adds it to the read bitmap of every message in the
    /// advanced range not sent by the reader: atomically ([`BitmapWrite::Now`]), or by handing
    /// the range to a queue before the position commits ([`BitmapWrite::Handed`]; a queue that
    /// refuses it leaves the position where it was). Returns `(old, new)` read seqs, or `None`
    /// if the user is not a member.
    async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        read_seq: u64,
        reader_slot: Option<(u32, BitmapWrite<'_>)>,
    ) -> StoreResult<Option<(u64, u64)>>;
    /// Adds each mark's reader to the read bitmap of every message in its range that it did
    /// not send, several readers of one message in one write. A reader already in a bitmap
    /// leaves it unchanged, so a batch applied twice (a task restarted before it committed its
    /// offsets) changes nothing the second time; a range past the conversation's max seq marks
    /// only the messages that exist. Returns how many bitmaps changed.
    async fn add_readers(&self, marks: &[ReadMark], codec: &dyn ReadBitmapCodec) -> StoreResult<u64>;
    /// Raises the member's received position to `seq` (never backwards).
    async fn mark_received(&self, conversation_id: &str, user_id: &str, seq: u64) -> StoreResult<()>;
    /// The read bitmap of a message, if anyone has read it.
    async fn read_record(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<ReadRecord>>;
}

pub mod conformance;
