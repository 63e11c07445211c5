//! The server's IM frames, as JSON text: `{"frameType","id","method","errMsg","data"}`.
//!
//! A push travels to every recipient connection as one [`PushFrame`], serialized once; each
//! connection only wraps it with its own push id ([`PushFrame::frame`]), so fan-out to N members
//! costs one serialization, not N.

use crate::message::{method, Push};
use serde::Serialize;
use std::sync::Arc;

/// `frameType` values.
pub mod frame_type {
    /// A data frame with a method.
    pub const DATA: u8 = 0;
    /// Application-level heartbeat.
    pub const PING: u8 = 1;
    /// Acknowledgement (server: message durable; client: push received).
    pub const ACK: u8 = 2;
    /// A data frame the sender wants no ack for.
    pub const NO_ACK: u8 = 3;
    /// An error.
    pub const ERROR: u8 = 9;
    /// Every frame type.
    pub const ALL: [u8; 5] = [DATA, PING, ACK, NO_ACK, ERROR];
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutFrame<'a, T: Serialize> {
    frame_type: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    err_msg: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

fn encode<T: Serialize>(f: OutFrame<'_, T>) -> String {
    // Serializing these types cannot fail: no maps with non-string keys, no failing Serialize impls.
    serde_json::to_string(&f).unwrap_or_else(|_| String::from("{\"frameType\":9}"))
}

/// `{"frameType":1}`: the answer to a ping.
pub fn ping_frame() -> String {
    String::from("{\"frameType\":1}")
}

/// `{"frameType":2,"id":..,"data":{..}}`.
pub fn ack_frame<T: Serialize>(id: Option<&str>, data: &T) -> String {
    encode(OutFrame {
        frame_type: frame_type::ACK,
        id,
        method: None,
        err_msg: None,
        data: Some(data),
    })
}

/// A data frame from the server: `{"frameType":0,"id":..,"method":..,"data":{..}}`.
pub fn data_frame<T: Serialize>(id: Option<&str>, method: &str, data: &T) -> String {
    encode(OutFrame {
        frame_type: frame_type::DATA,
        id,
        method: Some(method),
        err_msg: None,
        data: Some(data),
    })
}

/// `{"frameType":9,"id":..,"errMsg":..,"data":{"code":..}}`. `code` is a stable snake_case code.
pub fn error_frame(id: Option<&str>, code: &str, message: &str) -> String {
    #[derive(Serialize)]
    struct Code<'a> {
        code: &'a str,
    }
    encode(OutFrame {
        frame_type: frame_type::ERROR,
        id,
        method: None,
        err_msg: Some(message),
        data: Some(Code { code }),
    })
}

/// A push serialized once: its `data` JSON, plus the conversation and seq a rigor-mode
/// connection records when the client acks it.
#[derive(Debug, Clone)]
pub struct PushFrame {
    /// The push's conversation.
    pub conversation_id: Arc<str>,
    /// The push's seq.
    pub seq: u64,
    data: Box<str>,
}

impl PushFrame {
    /// Serializes `push`.
    pub fn new(push: &Push) -> Self {
        Self {
            conversation_id: Arc::from(push.conversation_id.as_str()),
            seq: push.seq,
            data: serde_json::to_string(push)
                .unwrap_or_else(|_| String::from("{}"))
                .into_boxed_str(),
        }
    }

    /// A push serialized elsewhere (another process of a cluster): its conversation, seq and
    /// `data` JSON as [`PushFrame::data`] gave them.
    pub fn from_parts(conversation_id: &str, seq: u64, data: String) -> Self {
        Self {
            conversation_id: Arc::from(conversation_id),
            seq,
            data: data.into_boxed_str(),
        }
    }

    /// The push's `data` JSON.
    pub fn data(&self) -> &str {
        &self.data
    }

    /// The frame for one connection: `{"frameType":0,"id":"<id>","method":"push","data":..}`.
    pub fn frame(&self, id: u64) -> String {
        let mut s = String::with_capacity(self.data.len() + 64);
        s.push_str("{\"frameType\":0,\"id\":\"");
        s.push_str(&id.to_string());
        s.push_str("\",\"method\":\"");
        s.push_str(method::PUSH);
        s.push_str("\",\"data\":");
        s.push_str(&self.data);
        s.push('}');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn a_push_frame_is_the_data_frame_of_its_push() {
        let push = Push {
            conversation_id: "si_a_b".into(),
            chat_type: 2,
            send_id: "a".into(),
            recv_id: "b".into(),
            seq: 7,
            msg_id: "m".into(),
            client_msg_id: "c\"quoted\"".into(),
            send_time: 1,
            msg: RawValue::from_string(r#"{"mType":0,"content":"hi \u00e9"}"#.into()).unwrap(),
        };
        let once = PushFrame::new(&push);
        for id in [1u64, 42, u64::MAX] {
            assert_eq!(
                once.frame(id),
                data_frame(Some(&id.to_string()), method::PUSH, &push),
                "push id {id}"
            );
        }
        assert_eq!((&*once.conversation_id, once.seq), ("si_a_b", 7));
    }

    #[test]
    fn frames_encode() {
        assert_eq!(
            error_frame(Some("a"), "unknown_method", "m"),
            r#"{"frameType":9,"id":"a","errMsg":"m","data":{"code":"unknown_method"}}"#
        );
        let ack = crate::message::ChatAck {
            conversation_id: "c".into(),
            seq: 3,
            msg_id: "m".into(),
            send_time: 5,
        };
        assert_eq!(
            ack_frame(None, &ack),
            r#"{"frameType":2,"data":{"conversationId":"c","seq":3,"msgId":"m","sendTime":5}}"#
        );
        assert_eq!(ping_frame(), r#"{"frameType":1}"#);
    }
}
