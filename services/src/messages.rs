//! The message service: send (seq + idempotency), sync after seqs, history pages, read state,
//! read receipts and the conversation list.

use crate::error::ServiceError;
use crate::receipts::{self, SaiCodec};
use crate::social::SocialService;
use crate::users::UserService;
use crate::{Clock, Outbound};
use sai_pipeline::conversation::{ChatType, ConversationId};
use sai_pipeline::message::{json_depth, method, ChatAck, Push, SyncPage, MAX_MSG_DEPTH};
use sai_storage::{
    Appended, BitmapWrite, ConversationSummary, MemberState, MessageStore, NewMessage, ReadMarkSink, StoredMessage,
};
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Default page size of history.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest page of history.
pub const MAX_PAGE: u32 = 500;
/// Largest page of the conversation list.
pub const MAX_CONVERSATIONS_PAGE: u32 = 200;

/// What a send produced.
#[derive(Debug)]
pub struct Sent {
    /// The sender's ack.
    pub ack: ChatAck,
    /// The message was stored before (same sender and clientMsgId): this is the original's ack,
    /// and nobody was pushed to again (anything missed is recovered through sync).
    pub duplicate: bool,
}

/// A message as history shows it: the push fields plus its delivery state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryMessage {
    /// The message.
    #[serde(flatten)]
    pub push: Push,
    /// Private chats, the caller's own messages: `sent`, `received` or `read`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^(sent|received|read)$")]
    pub status: Option<&'static str>,
    /// Groups: how many members have read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_count: Option<u64>,
}

/// Who has read one message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reads {
    /// Members (other than the sender, and who could see it) that read it.
    pub read_count: u64,
    /// Those that have not.
    pub unread_count: u64,
    /// The readers.
    pub reader_ids: Vec<String>,
}

/// A conversation list entry.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationEntry {
    /// Conversation id.
    pub conversation_id: String,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// Private: the other user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// Group: its id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Newest message.
    pub last_message: Option<Push>,
    /// Newest seq.
    pub max_seq: u64,
    /// The caller's read position.
    pub read_seq: u64,
    /// Messages after `read_seq` not sent by the caller.
    pub unread: u64,
}

/// Chat policy.
#[derive(Debug, Clone, Copy)]
pub struct ChatPolicy {
    /// Private chat only between friends.
    pub require_friendship: bool,
}

/// Messages.
pub struct MessageService {
    store: Arc<dyn MessageStore>,
    users: Arc<UserService>,
    social: Arc<SocialService>,
    outbound: Arc<Outbound>,
    clock: Arc<dyn Clock>,
    /// Private chat only between friends (changed live by a configuration reload).
    require_friendship: std::sync::atomic::AtomicBool,
    /// Keeps each conversation's pushes in seq order (see [`PushOrder`]).
    order: PushOrder,
    /// Where group read receipts' bitmap work goes: `None`, written with the receipt; else
    /// handed to this queue (a task process's `msg_to_mongo`) and written there in batches.
    read_marks: Option<Arc<dyn ReadMarkSink>>,
}

/// Pushes leave in seq order per conversation: a send holds its conversation's stripe from
/// before its append until its push is handed to the gateways. Without it two members of a
/// group whose sends land in the same commit are answered on two shards, and the later seq can
/// reach the other members first (loadgen counted 30,318 out-of-order deliveries in 10,000 group
/// messages at 500 msg/s). A conversation therefore appends at most one message per commit
/// (about 150-200 messages a second, with the 5 ms commit interval); different conversations
/// still share every commit.
///
/// [`STRIPES`](Self::STRIPES) async mutexes chosen by a hash of the conversation id: a bounded
/// table with no cleanup, at the price of unrelated conversations sharing a stripe now and then.
/// A send dropped while holding one only releases it: the message is durable, and the members
/// get it by sync.
struct PushOrder {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl PushOrder {
    const STRIPES: usize = 4096;

    fn new() -> Self {
        Self {
            stripes: (0..Self::STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    async fn lock(&self, conversation_id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(conversation_id);
        self.stripes[(h as usize) % Self::STRIPES].lock().await
    }
}

/// The other member of a private conversation, seen from `me`.
fn peer_of(conversation_id: &str, me: &str) -> Option<String> {
    ConversationId::parse(conversation_id)?.peer_of(me).map(str::to_string)
}

/// The group of a group conversation.
fn group_of(conversation_id: &str) -> Option<String> {
    ConversationId::parse(conversation_id)?.group_id().map(str::to_string)
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

/// A stored read record, decoded; corrupt bytes are an internal error, logged here.
fn readers(r: &sai_storage::ReadRecord) -> Result<receipts::Readers<'_>, ServiceError> {
    receipts::decode(r.format, &r.bytes).map_err(|e| {
        tracing::error!(error = %e, "corrupt read record");
        ServiceError::Internal
    })
}

fn not_a_member() -> ServiceError {
    ServiceError::Forbidden {
        code: "not_a_member",
        message: "you are not a member of this conversation".into(),
    }
}

impl MessageService {
    /// A service over `store`.
    pub fn new(
        store: Arc<dyn MessageStore>,
        users: Arc<UserService>,
        social: Arc<SocialService>,
        outbound: Arc<Outbound>,
        clock: Arc<dyn Clock>,
        policy: ChatPolicy,
    ) -> Self {
        Self {
            store,
            users,
            social,
            outbound,
            clock,
            require_friendship: policy.require_friendship.into(),
            order: PushOrder::new(),
            read_marks: None,
        }
    }

    /// Changes the chat policy (a configuration reload); the next message follows it.
    pub fn set_policy(&self, policy: ChatPolicy) {
        self.require_friendship
            .store(policy.require_friendship, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands group read receipts' bitmap work to `queue` instead of writing it with each
    /// receipt: "read by" catches up when a task process has written the batch.
    pub fn handing_read_marks_to(mut self, queue: Arc<dyn ReadMarkSink>) -> Self {
        self.read_marks = Some(queue);
        self
    }

    /// Stores a message from `sender` and, when it is new, pushes it to the other members that are
    /// online (ms2ps_chat); answers once it is durable.
    pub async fn send(
        &self,
        sender: &str,
        chat_type: ChatType,
        recv_id: &str,
        client_msg_id: &str,
        msg: &RawValue,
    ) -> Result<Sent, ServiceError> {
        if json_depth(msg.get()) > MAX_MSG_DEPTH {
            return Err(ServiceError::invalid(
                "invalid_message",
                format!("msg nests objects and arrays deeper than {MAX_MSG_DEPTH} levels"),
            ));
        }
        let (conversation_id, members, recipients) = match chat_type {
            ChatType::Private => {
                if recv_id == sender {
                    return Err(ServiceError::invalid(
                        "invalid_recipient",
                        "cannot send a message to yourself",
                    ));
                }
                let Some(conversation) = ConversationId::private_between(sender, recv_id) else {
                    // Ids made before `_` was refused in them (issue 10): chatting is refused
                    // rather than mixed with another pair's conversation.
                    return Err(ServiceError::invalid(
                        "invalid_recipient",
                        "user ids containing '_' cannot have private conversations",
                    ));
                };
                if !self.users.exists(recv_id).await? {
                    return Err(ServiceError::NotFound {
                        code: "recipient_not_found",
                        message: "recipient does not exist".into(),
                    });
                }
                if self.require_friendship.load(std::sync::atomic::Ordering::Relaxed)
                    && !self.social.are_friends(sender, recv_id).await?
                {
                    return Err(ServiceError::Forbidden {
                        code: "not_friends",
                        message: "private chat requires friendship".into(),
                    });
                }
                (
                    conversation.to_string(),
                    vec![sender.to_string(), recv_id.to_string()],
                    vec![recv_id.to_string()],
                )
            }
            ChatType::Group => {
                // A group always has its owner as a member: no members, no group.
                let members = self.social.members(recv_id).await?;
                if members.is_empty() {
                    return Err(ServiceError::NotFound {
                        code: "recipient_not_found",
                        message: "group does not exist".into(),
                    });
                }
                if !members.iter().any(|m| m.user_id == sender) {
                    return Err(ServiceError::Forbidden {
                        code: "not_a_member",
                        message: "only members can send to a group".into(),
                    });
                }
                let recipients = members
                    .iter()
                    .filter(|m| m.user_id != sender)
                    .map(|m| m.user_id.clone())
                    .collect();
                (ConversationId::group(recv_id).to_string(), Vec::new(), recipients)
            }
        };
        let _in_order = self.order.lock(&conversation_id).await;
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
                members,
            })
            .await?;
        let (stored, fresh) = match appended {
            Appended::New(m) => (m, true),
            Appended::Duplicate(m) => (m, false),
        };
        tracing::debug!(conversation = %stored.conversation_id, seq = stored.seq, fresh, "message stored");
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
        if fresh {
            self.outbound.push(&recipients, &to_push(stored)?).await;
        }
        Ok(Sent { ack, duplicate: !fresh })
    }

    /// Up to `limit` messages the user lacks, given the last seq it has per conversation
    /// (conversations absent from `known` start where the user joined; unknown ids are ignored).
    pub async fn sync(&self, user: &str, known: &BTreeMap<String, u64>, limit: u32) -> Result<SyncPage, ServiceError> {
        let heads = self.store.conversations_of(user).await?;
        let mut page = SyncPage {
            complete: true,
            ..SyncPage::default()
        };
        let mut room = limit;
        for h in heads {
            let from = known.get(&h.conversation_id).copied().unwrap_or(0).max(h.joined_seq);
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

    async fn member_states(
        &self,
        user: &str,
        conversation_id: &str,
    ) -> Result<(Vec<MemberState>, MemberState), ServiceError> {
        let states = self.store.member_states(conversation_id).await?;
        let me = states
            .iter()
            .find(|s| s.user_id == user)
            .cloned()
            .ok_or_else(not_a_member)?;
        Ok((states, me))
    }

    /// A page of history, newest first, for a member of the conversation.
    pub async fn history(
        &self,
        user: &str,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Vec<HistoryMessage>, ServiceError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be 1 to {MAX_PAGE}"),
            ));
        }
        let (states, me) = self.member_states(user, conversation_id).await?;
        let msgs = self.store.messages_before(conversation_id, before_seq, limit).await?;
        let peer = states.iter().find(|s| s.user_id != user);
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs.into_iter().filter(|m| m.seq > me.joined_seq) {
            let (status, read_count) = if m.chat_type == ChatType::Group.as_u8() {
                let count = match self.store.read_record(conversation_id, m.seq).await? {
                    Some(r) => readers(&r)?.len(),
                    None => 0,
                };
                (None, Some(count))
            } else if m.send_id == user {
                let status = match peer {
                    Some(p) if p.read_seq >= m.seq => "read",
                    Some(p) if p.received_seq >= m.seq => "received",
                    _ => "sent",
                };
                (Some(status), None)
            } else {
                (None, None)
            };
            out.push(HistoryMessage {
                push: to_push(m)?,
                status,
                read_count,
            });
        }
        Ok(out)
    }

    /// Marks the conversation read up to `read_seq` (never backwards, clamped to the newest
    /// seq). Private chats push a `conversation.read` receipt to the other member; groups record
    /// the reader in each newly read message's bitmap (now, or through the read-mark queue).
    /// Returns the read seq in force.
    pub async fn mark_read(&self, user: &str, conversation_id: &str, read_seq: u64) -> Result<u64, ServiceError> {
        let group_id = group_of(conversation_id);
        let slot = match &group_id {
            Some(g) => Some(self.social.member(g, user).await?.ok_or_else(not_a_member)?.slot),
            None => None,
        };
        let bitmaps = match &self.read_marks {
            Some(queue) => BitmapWrite::Handed(queue.as_ref()),
            None => BitmapWrite::Now(&SaiCodec),
        };
        let (old, new) = self
            .store
            .mark_read(conversation_id, user, read_seq, slot.map(|s| (s, bitmaps)))
            .await?
            .ok_or_else(not_a_member)?;
        if new > old && group_id.is_none() {
            if let Some(peer) = peer_of(conversation_id, user) {
                self.outbound
                    .notify(
                        &peer,
                        method::READ,
                        &serde_json::json!({"conversationId": conversation_id, "readerId": user, "readSeq": new}),
                    )
                    .await;
            }
        }
        Ok(new)
    }

    /// Records pushes the user's client acknowledged.
    pub async fn mark_received(&self, user: &str, acked: &[(String, u64)]) -> Result<(), ServiceError> {
        for (conv, seq) in acked {
            self.store.mark_received(conv, user, *seq).await?;
        }
        Ok(())
    }

    /// Who has read message `seq`.
    pub async fn reads(&self, user: &str, conversation_id: &str, seq: u64) -> Result<Reads, ServiceError> {
        let (states, me) = self.member_states(user, conversation_id).await?;
        let msg = self
            .store
            .message(conversation_id, seq)
            .await?
            .filter(|m| m.seq > me.joined_seq)
            .ok_or_else(|| ServiceError::NotFound {
                code: "message_not_found",
                message: "no such message".into(),
            })?;
        // Members other than the sender who could see the message.
        let eligible: Vec<&MemberState> = states
            .iter()
            .filter(|s| s.user_id != msg.send_id && s.joined_seq < seq)
            .collect();
        let reader_ids: Vec<String> = match group_of(conversation_id) {
            Some(group_id) => {
                let record = self.store.read_record(conversation_id, seq).await?;
                let bitmap = record.as_ref().map(readers).transpose()?;
                let members = self.social.members(&group_id).await?;
                members
                    .iter()
                    .filter(|m| {
                        bitmap.as_ref().is_some_and(|b| b.contains(m.slot))
                            && eligible.iter().any(|s| s.user_id == m.user_id)
                    })
                    .map(|m| m.user_id.clone())
                    .collect()
            }
            None => eligible
                .iter()
                .filter(|s| s.read_seq >= seq)
                .map(|s| s.user_id.clone())
                .collect(),
        };
        Ok(Reads {
            read_count: reader_ids.len() as u64,
            unread_count: (eligible.len() - reader_ids.len()) as u64,
            reader_ids,
        })
    }

    /// The user's conversations, newest activity first.
    pub async fn conversations(
        &self,
        user: &str,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<ConversationEntry>, ServiceError> {
        if limit == 0 || limit > MAX_CONVERSATIONS_PAGE {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be 1 to {MAX_CONVERSATIONS_PAGE}"),
            ));
        }
        let rows: Vec<ConversationSummary> = self.store.conversation_summaries(user, offset, limit).await?;
        rows.into_iter()
            .map(|c| {
                Ok(ConversationEntry {
                    peer_id: peer_of(&c.conversation_id, user),
                    group_id: group_of(&c.conversation_id),
                    conversation_id: c.conversation_id,
                    chat_type: c.chat_type,
                    last_message: c.last_message.map(to_push).transpose()?,
                    max_seq: c.max_seq,
                    read_seq: c.read_seq,
                    unread: c.unread,
                })
            })
            .collect()
    }
}
