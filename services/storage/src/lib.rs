//! Storage traits of SAI-IM. This crate sees no database driver.
//!
//! Services talk to storage only through these traits; each backend is one adapter crate or
//! module (the embedded SQLite adapter in `sai-services` is the reference implementation; MySQL,
//! MongoDB and Redis adapters implement the same traits). The contract each method documents is
//! what the shared conformance suite checks, so every adapter must keep it, including under
//! several service processes sharing one database:
//!
//! - [`UserStore`]: accounts, unique usernames.
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
}

/// Conversations and their messages.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
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
}

pub mod conformance;
