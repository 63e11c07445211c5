//! The message service: send (seq + idempotency), sync after seqs, and history pages.

use crate::error::ServiceError;
use crate::users::UserService;
use crate::Clock;
use sai_proto::im::{ChatAck, ChatType, Push, SyncPage};
use sai_storage::{Appended, MessageStore, NewMessage, StoredMessage};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Default page size of history.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest page of history.
pub const MAX_PAGE: u32 = 500;

/// What a send produced.
#[derive(Debug)]
pub struct Sent {
    /// The sender's ack.
    pub ack: ChatAck,
    /// The push for the recipients; `None` when this was a duplicate (it was pushed already,
    /// and anything missed is recovered through sync).
    pub push: Option<Push>,
    /// Users to push to (the sender excluded).
    pub recipients: Vec<String>,
}

/// Messages.
pub struct MessageService {
    store: Arc<dyn MessageStore>,
    users: Arc<UserService>,
    clock: Arc<dyn Clock>,
}

/// `si_<a>_<b>` with `a < b`.
pub fn private_conversation_id(a: &str, b: &str) -> String {
    if a <= b {
        format!("si_{a}_{b}")
    } else {
        format!("si_{b}_{a}")
    }
}

/// A stored message as a push.
pub fn to_push(m: StoredMessage) -> Result<Push, ServiceError> {
    let msg = RawValue::from_string(m.body).map_err(|e| {
        tracing::error!(error = %e, "stored message body is not JSON");
        ServiceError::Internal
    })?;
    Ok(Push {
        conversation_id: m.conversation_id,
        chat_type: m.chat_type,
        send_id: m.send_id,
        recv_id: m.recv_id,
        seq: m.seq,
        msg_id: m.msg_id,
        client_msg_id: m.client_msg_id,
        send_time: m.send_time,
        msg,
    })
}

impl MessageService {
    /// A service over `store`.
    pub fn new(store: Arc<dyn MessageStore>, users: Arc<UserService>, clock: Arc<dyn Clock>) -> Self {
        Self { store, users, clock }
    }

    /// Stores a message from `sender` and says whom to push it to.
    pub async fn send(
        &self,
        sender: &str,
        chat_type: ChatType,
        recv_id: &str,
        client_msg_id: &str,
        msg: &RawValue,
    ) -> Result<Sent, ServiceError> {
        if chat_type != ChatType::Private {
            return Err(ServiceError::invalid(
                "unsupported_chat_type",
                "only private chat (chatType 2) is supported",
            ));
        }
        if recv_id == sender {
            return Err(ServiceError::invalid(
                "invalid_recipient",
                "cannot send a message to yourself",
            ));
        }
        if !self.users.exists(recv_id).await? {
            return Err(ServiceError::NotFound {
                code: "recipient_not_found",
                message: "recipient does not exist".into(),
            });
        }
        let conversation_id = private_conversation_id(sender, recv_id);
        let appended = self
            .store
            .append(NewMessage {
                conversation_id: conversation_id.clone(),
                chat_type: chat_type.as_u8(),
                send_id: sender.to_string(),
                recv_id: recv_id.to_string(),
                client_msg_id: client_msg_id.to_string(),
                msg_id: uuid::Uuid::new_v4().simple().to_string(),
                send_time: self.clock.now_ms(),
                body: msg.get().to_string(),
                members: vec![sender.to_string(), recv_id.to_string()],
            })
            .await?;
        let (stored, fresh) = match appended {
            Appended::New(m) => (m, true),
            Appended::Duplicate(m) => (m, false),
        };
        if stored.conversation_id != conversation_id {
            // The client reused a clientMsgId for a different conversation.
            return Err(ServiceError::Conflict {
                code: "client_msg_id_reused",
                message: "clientMsgId was already used for another conversation".into(),
            });
        }
        let ack = ChatAck {
            conversation_id: stored.conversation_id.clone(),
            seq: stored.seq,
            msg_id: stored.msg_id.clone(),
            send_time: stored.send_time,
        };
        let push = if fresh { Some(to_push(stored)?) } else { None };
        Ok(Sent {
            ack,
            push,
            recipients: vec![recv_id.to_string()],
        })
    }

    /// Up to `limit` messages the user lacks, given the last seq it has per conversation
    /// (conversations absent from `known` start at 0; unknown ids are ignored).
    pub async fn sync(&self, user: &str, known: &BTreeMap<String, u64>, limit: u32) -> Result<SyncPage, ServiceError> {
        let heads = self.store.conversations_of(user).await?;
        let mut page = SyncPage {
            complete: true,
            ..SyncPage::default()
        };
        let mut room = limit;
        for h in heads {
            let from = known.get(&h.conversation_id).copied().unwrap_or(0);
            if h.max_seq > from {
                if room == 0 {
                    page.complete = false;
                } else {
                    let msgs = self.store.messages_after(&h.conversation_id, from, room).await?;
                    room -= msgs.len() as u32;
                    if msgs.last().map(|m| m.seq) < Some(h.max_seq) {
                        page.complete = false;
                    }
                    for m in msgs {
                        page.pushes.push(to_push(m)?);
                    }
                }
            }
            page.heads.insert(h.conversation_id, h.max_seq);
        }
        Ok(page)
    }

    /// A page of history, newest first, for a member of the conversation.
    pub async fn history(
        &self,
        user: &str,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Vec<Push>, ServiceError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be 1 to {MAX_PAGE}"),
            ));
        }
        if !self.store.is_member(conversation_id, user).await? {
            return Err(ServiceError::Forbidden {
                code: "not_a_member",
                message: "you are not a member of this conversation".into(),
            });
        }
        let msgs = self.store.messages_before(conversation_id, before_seq, limit).await?;
        msgs.into_iter().map(to_push).collect()
    }
}
