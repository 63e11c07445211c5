//! Messages as the pipeline and its clients see them: what a sender asks to send
//! ([`ChatRequest`]), what it is told once the message is durable ([`ChatAck`]), what recipients
//! receive ([`Push`]) and a page of catch-up ([`SyncPage`]).
//!
//! Message bodies (`msg`) stay raw JSON end to end: they are never parsed or re-encoded.

use crate::conversation::ChatType;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Method names of the IM frames (client requests and server notifications).
pub mod method {
    /// Send a message.
    pub const CHAT: &str = "conversation.chat";
    /// Fetch everything after the given per-conversation seqs.
    pub const SYNC: &str = "conversation.sync";
    /// Mark a conversation read up to a seq.
    pub const MARK_READ: &str = "conversation.markChat";
    /// Server-to-client read receipt (private chats).
    pub const READ: &str = "conversation.read";
    /// Server-to-client: someone sent you a friend request.
    pub const FRIEND_REQUEST: &str = "friend.request";
    /// Server-to-client: your friend request was accepted.
    pub const FRIEND_ACCEPTED: &str = "friend.accepted";
    /// Server-to-client message delivery.
    pub const PUSH: &str = "push";
}

/// Longest accepted frame `id`, `recvId` or `clientMsgId`, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A validated `conversation.chat` payload.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// Private or group.
    pub chat_type: ChatType,
    /// Recipient user (private) or group id.
    pub recv_id: String,
    /// The client's id for this message; a resend with the same id is not stored twice.
    pub client_msg_id: String,
    /// The message body, an object, kept as raw JSON.
    pub msg: Box<RawValue>,
}

/// A message as delivered to a client (`data` of a push frame).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Push {
    /// `si_<a>_<b>` for private chats (a < b), `sg_<groupId>` for groups.
    pub conversation_id: String,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// Sender.
    pub send_id: String,
    /// Recipient user or group.
    pub recv_id: String,
    /// Position in the conversation, from 1, gapless.
    pub seq: u64,
    /// Server-assigned id.
    pub msg_id: String,
    /// The sender's id for it.
    pub client_msg_id: String,
    /// Milliseconds since the Unix epoch, assigned when stored.
    pub send_time: i64,
    /// The body, as the sender sent it.
    pub msg: Box<RawValue>,
}

/// One page of `conversation.sync`, as the message service produces it.
#[derive(Debug, Default)]
pub struct SyncPage {
    /// Messages, ascending seq within each conversation.
    pub pushes: Vec<Push>,
    /// Newest seq of each of the user's conversations.
    pub heads: BTreeMap<String, u64>,
    /// Nothing left after this page.
    pub complete: bool,
}

/// `data` of the ack a sender gets once its message is durable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatAck {
    /// Conversation the message went to.
    pub conversation_id: String,
    /// Its seq.
    pub seq: u64,
    /// Its server id.
    pub msg_id: String,
    /// When it was stored (ms since the epoch).
    pub send_time: i64,
}
