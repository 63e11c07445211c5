//! The SAI-IM frame protocol carried in WebSocket text messages.
//!
//! Every frame is a JSON object `{"frameType", "id", "ackSeq", "errMsg", "method", "formId", "data"}`
//! with `frameType` 0 = data (the default when absent), 1 = ping, 2 = ack, 3 = data without ack,
//! 9 = error. [`parse_request`] turns a client's text into a typed [`Request`] (its payloads are
//! the contract's domain types, `sai_pipeline::message`) or a [`ProtoError`] carrying a stable
//! [`ErrorCode`]. The server's frames are built by `sai_pipeline::frame`.
//! Message bodies (`msg`) stay raw JSON end to end: they are never parsed or re-encoded.

use sai_pipeline::conversation::ChatType;
use sai_pipeline::frame::{error_frame, frame_type};
use sai_pipeline::message::{method, ChatRequest, MAX_ID_LEN};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Stable error codes sent in `data.code` of error frames (and used by the HTTP API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The text is not a JSON object.
    InvalidJson,
    /// `frameType` is not 0, 1, 2 or 3.
    UnknownFrameType,
    /// `method` is absent or not one the server knows.
    UnknownMethod,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type or an invalid value.
    InvalidField,
    /// `recvId` names no user (or group).
    RecipientNotFound,
    /// `chatType` other than the supported ones.
    UnsupportedChatType,
    /// A binary WebSocket message; the protocol is JSON text.
    UnsupportedMessageType,
    /// A backend failed; the request may be retried.
    Unavailable,
    /// A bug on the server's side.
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 10] = [
        Self::InvalidJson,
        Self::UnknownFrameType,
        Self::UnknownMethod,
        Self::MissingField,
        Self::InvalidField,
        Self::RecipientNotFound,
        Self::UnsupportedChatType,
        Self::UnsupportedMessageType,
        Self::Unavailable,
        Self::Internal,
    ];

    /// The stable snake_case string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::UnknownFrameType => "unknown_frame_type",
            Self::UnknownMethod => "unknown_method",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::RecipientNotFound => "recipient_not_found",
            Self::UnsupportedChatType => "unsupported_chat_type",
            Self::UnsupportedMessageType => "unsupported_message_type",
            Self::Unavailable => "service_unavailable",
            Self::Internal => "internal_error",
        }
    }
}

/// A refused client frame: sent back as a `frameType` 9 error frame; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// The offending frame's `id`, when it could be read.
    pub id: Option<String>,
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl ProtoError {
    /// A new error.
    pub fn new(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            code,
            message: message.into(),
        }
    }

    /// The error frame to send.
    pub fn to_frame(&self) -> String {
        error_frame(self.id.as_deref(), self.code.as_str(), &self.message)
    }
}

/// A parsed client frame.
#[derive(Debug, Clone)]
pub enum Request {
    /// `frameType` 1.
    Ping,
    /// `frameType` 2: the client received the push with this id.
    Ack {
        /// The push's id.
        id: String,
    },
    /// `conversation.chat`.
    Chat {
        /// The frame id, echoed in the ack.
        id: Option<String>,
        /// False for `frameType` 3.
        want_ack: bool,
        /// The payload.
        chat: ChatRequest,
    },
    /// `conversation.markChat`: everything up to `read_seq` is read.
    MarkRead {
        /// The frame id, echoed in the ack.
        id: Option<String>,
        /// Conversation.
        conversation_id: String,
        /// New read position.
        read_seq: u64,
    },
    /// `conversation.sync`: conversation id -> last seq the client has (empty: everything).
    Sync {
        /// The frame id, echoed in the reply.
        id: Option<String>,
        /// Known seqs.
        conversations: BTreeMap<String, u64>,
    },
}

impl Request {
    /// The frame id the answer echoes, if the request has one.
    pub fn id(&self) -> Option<&str> {
        match self {
            Self::Ping => None,
            Self::Ack { id } => Some(id),
            Self::Chat { id, .. } | Self::MarkRead { id, .. } | Self::Sync { id, .. } => id.as_deref(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFrame {
    frame_type: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    method: Option<String>,
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawChat {
    chat_type: Option<u8>,
    recv_id: Option<String>,
    client_msg_id: Option<String>,
    msg: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMarkRead {
    conversation_id: Option<String>,
    read_seq: Option<u64>,
}

#[derive(Deserialize)]
struct RawSync {
    conversations: Option<BTreeMap<String, u64>>,
}

/// Parses one client text message.
pub fn parse_request(text: &str) -> Result<Request, ProtoError> {
    let raw: RawFrame = serde_json::from_str(text)
        .map_err(|e| ProtoError::new(None, ErrorCode::InvalidJson, format!("invalid frame: {e}")))?;
    let id = match raw.id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.len() <= MAX_ID_LEN => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Err(ProtoError::new(
                None,
                ErrorCode::InvalidField,
                format!("id must be a string of at most {MAX_ID_LEN} bytes"),
            ))
        }
    };
    let frame_type = match raw.frame_type {
        None | Some(serde_json::Value::Null) => frame_type::DATA,
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= u8::MAX as u64 => v as u8,
            _ => 255,
        },
        Some(_) => {
            return Err(ProtoError::new(
                id,
                ErrorCode::InvalidField,
                "frameType must be a number",
            ));
        }
    };
    match frame_type {
        frame_type::PING => Ok(Request::Ping),
        frame_type::ACK => match id {
            Some(id) => Ok(Request::Ack { id }),
            None => Err(ProtoError::new(None, ErrorCode::MissingField, "ack frame needs an id")),
        },
        frame_type::DATA | frame_type::NO_ACK => {
            let want_ack = frame_type == frame_type::DATA;
            let Some(method) = raw.method else {
                return Err(ProtoError::new(
                    id,
                    ErrorCode::UnknownMethod,
                    "data frame needs a method",
                ));
            };
            match method.as_str() {
                method::CHAT => {
                    let chat = parse_chat(id.as_ref(), raw.data.as_deref())?;
                    Ok(Request::Chat { id, want_ack, chat })
                }
                method::MARK_READ => {
                    let err = |code, m: &str| ProtoError::new(id.clone(), code, m);
                    let d = raw
                        .data
                        .ok_or_else(|| err(ErrorCode::MissingField, "missing field data"))?;
                    let m: RawMarkRead = serde_json::from_str(d.get())
                        .map_err(|e| err(ErrorCode::InvalidField, &format!("data: {e}")))?;
                    let conversation_id = m
                        .conversation_id
                        .ok_or_else(|| err(ErrorCode::MissingField, "missing field data.conversationId"))?;
                    let read_seq = m
                        .read_seq
                        .ok_or_else(|| err(ErrorCode::MissingField, "missing field data.readSeq"))?;
                    Ok(Request::MarkRead {
                        id,
                        conversation_id,
                        read_seq,
                    })
                }
                method::SYNC => {
                    let conversations = match raw.data {
                        None => BTreeMap::new(),
                        Some(d) => {
                            let s: RawSync = serde_json::from_str(d.get()).map_err(|e| {
                                ProtoError::new(id.clone(), ErrorCode::InvalidField, format!("data: {e}"))
                            })?;
                            s.conversations.unwrap_or_default()
                        }
                    };
                    Ok(Request::Sync { id, conversations })
                }
                other => Err(ProtoError::new(
                    id,
                    ErrorCode::UnknownMethod,
                    format!("unknown method {:?}", truncate(other, 64)),
                )),
            }
        }
        other => Err(ProtoError::new(
            id,
            ErrorCode::UnknownFrameType,
            format!("unknown frameType {other}"),
        )),
    }
}

fn parse_chat(id: Option<&String>, data: Option<&RawValue>) -> Result<ChatRequest, ProtoError> {
    let err = |code, m: String| ProtoError::new(id.cloned(), code, m);
    let data = data.ok_or_else(|| err(ErrorCode::MissingField, "missing field data".into()))?;
    let c: RawChat =
        serde_json::from_str(data.get()).map_err(|e| err(ErrorCode::InvalidField, format!("data: {e}")))?;
    let chat_type = c
        .chat_type
        .ok_or_else(|| err(ErrorCode::MissingField, "missing field data.chatType".into()))?;
    let chat_type = ChatType::from_u8(chat_type).ok_or_else(|| {
        err(
            ErrorCode::UnsupportedChatType,
            format!("unsupported chatType {chat_type}"),
        )
    })?;
    let recv_id = c
        .recv_id
        .ok_or_else(|| err(ErrorCode::MissingField, "missing field data.recvId".into()))?;
    let client_msg_id = c
        .client_msg_id
        .ok_or_else(|| err(ErrorCode::MissingField, "missing field data.clientMsgId".into()))?;
    let msg = c
        .msg
        .ok_or_else(|| err(ErrorCode::MissingField, "missing field data.msg".into()))?;
    for (name, v) in [("recvId", &recv_id), ("clientMsgId", &client_msg_id)] {
        if v.is_empty() || v.len() > MAX_ID_LEN {
            return Err(err(
                ErrorCode::InvalidField,
                format!("data.{name} must be 1 to {MAX_ID_LEN} bytes"),
            ));
        }
    }
    if !msg.get().trim_start().starts_with('{') {
        return Err(err(ErrorCode::InvalidField, "data.msg must be an object".into()));
    }
    Ok(ChatRequest {
        chat_type,
        recv_id,
        client_msg_id,
        msg,
        trace: None,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// A client's frame, as the load generator and tests see the server's frames.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerFrame {
    /// frameType.
    pub frame_type: u8,
    /// id.
    pub id: Option<String>,
    /// method.
    pub method: Option<String>,
    /// errMsg.
    pub err_msg: Option<String>,
    /// data, unparsed.
    pub data: Option<Box<RawValue>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(text: &str) -> ErrorCode {
        parse_request(text).unwrap_err().code
    }

    #[test]
    fn parses_chat() {
        let t = r#"{"frameType":0,"id":"c1","method":"conversation.chat","data":{"chatType":2,"recvId":"u2","clientMsgId":"m1","msg":{"mType":0,"content":"hi"}}}"#;
        match parse_request(t).unwrap() {
            Request::Chat { id, want_ack, chat } => {
                assert_eq!(id.as_deref(), Some("c1"));
                assert!(want_ack);
                assert_eq!(chat.chat_type, ChatType::Private);
                assert_eq!(chat.recv_id, "u2");
                assert_eq!(chat.msg.get(), r#"{"mType":0,"content":"hi"}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sync_without_frame_type_or_data() {
        assert!(matches!(
            parse_request(r#"{"method":"conversation.sync","data":{"conversations":{"si_a_b":3}}}"#),
            Ok(Request::Sync { conversations, .. }) if conversations["si_a_b"] == 3
        ));
        assert!(matches!(
            parse_request(r#"{"method":"conversation.sync"}"#),
            Ok(Request::Sync { conversations, .. }) if conversations.is_empty()
        ));
    }

    #[test]
    fn refusal_codes() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"frameType":7}"#), ErrorCode::UnknownFrameType);
        assert_eq!(code(r#"{"frameType":"x"}"#), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"frameType":0,"method":"nope"}"#), ErrorCode::UnknownMethod);
        assert_eq!(code(r#"{"frameType":0}"#), ErrorCode::UnknownMethod);
        assert_eq!(code(r#"{"frameType":2}"#), ErrorCode::MissingField);
        let base =
            r#"{"id":"x","method":"conversation.chat","data":{"chatType":2,"recvId":"u","clientMsgId":"m","msg":{}}}"#;
        assert!(parse_request(base).is_ok());
        for (from, to, want) in [
            (r#""recvId":"u","#, "", ErrorCode::MissingField),
            (r#""chatType":2"#, r#""chatType":5"#, ErrorCode::UnsupportedChatType),
            (r#""msg":{}"#, r#""msg":"s""#, ErrorCode::InvalidField),
            (r#""recvId":"u""#, r#""recvId":7"#, ErrorCode::InvalidField),
            (r#""clientMsgId":"m""#, r#""clientMsgId":"""#, ErrorCode::InvalidField),
        ] {
            let t = base.replace(from, to);
            let e = parse_request(&t).unwrap_err();
            assert_eq!(e.code, want, "{t}");
            assert_eq!(e.id.as_deref(), Some("x"), "{t}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = parse_request(&s);
        }

        #[test]
        fn arbitrary_json_frames_never_panic(ft in proptest::option::of(0i64..20), m in "[a-z.]{0,20}",
                                             data in "[{}\\[\\]\",:a-z0-9]{0,40}") {
            let t = match ft {
                Some(f) => format!(r#"{{"frameType":{f},"method":"{m}","data":{data}}}"#),
                None => format!(r#"{{"method":"{m}","data":{data}}}"#),
            };
            let _ = parse_request(&t);
        }
    }
}
