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
    /// Every method, both ways.
    pub const ALL: [&str; 7] = [CHAT, SYNC, MARK_READ, READ, FRIEND_REQUEST, FRIEND_ACCEPTED, PUSH];
}

/// Longest accepted frame `id`, `recvId` or `clientMsgId`, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Deepest nesting of objects and arrays a message body (`msg`) may have; the body object itself
/// is level 1. Deeper bodies are refused with `invalid_message` before they are stored: common
/// JSON parsers (serde_json's default among them) give up at 128 levels, so a deeper stored body
/// would break every reader of the conversation.
pub const MAX_MSG_DEPTH: usize = 32;

/// How deeply `json` nests objects and arrays (0 for a scalar), counting brackets outside
/// strings. `json` is already known to be valid JSON; this only measures it, in one pass
/// without recursion, so no depth can exhaust the stack.
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

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
    /// The trace it belongs to, when traces are on (set by the process that received it).
    pub trace: Option<crate::trace::TraceParent>,
}

/// A message as delivered to a client (`data` of a push frame).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth("{}"), 1);
        assert_eq!(json_depth(r#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(json_depth(r#"{"a":"[[[{{{"}"#), 1, "brackets in strings do not count");
        assert_eq!(
            json_depth(r#"{"a":"\"[[","b":{}}"#),
            2,
            "an escaped quote does not end the string"
        );
        let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
        assert_eq!(json_depth(&deep), 30_000);
    }
}
