//! The gRPC (tonic) user and message services, over the same service layer as HTTP.

use crate::error::ServiceError;
use crate::users::{bearer, unauthorized};
use crate::Services;
use sai_pipeline::conversation::ChatType;
use sai_pipeline::message::Push;
use serde_json::value::RawValue;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Generated protobuf types and service traits (`proto/sai.proto`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sai.v1");
}

use pb::message_service_server::{MessageService, MessageServiceServer};
use pb::social_service_server::{SocialService, SocialServiceServer};
use pb::user_service_server::{UserService, UserServiceServer};

/// The three services, ready to add to a tonic router.
pub fn services(
    s: Arc<Services>,
) -> (
    UserServiceServer<UserGrpc>,
    MessageServiceServer<MessageGrpc>,
    SocialServiceServer<SocialGrpc>,
) {
    (
        UserServiceServer::new(UserGrpc(s.clone())),
        MessageServiceServer::new(MessageGrpc(s.clone())),
        SocialServiceServer::new(SocialGrpc(s)),
    )
}

fn status(e: ServiceError) -> Status {
    e.to_status()
}

async fn caller<T>(s: &Services, req: &Request<T>) -> Result<String, Status> {
    let h = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    let token = bearer(h).map_err(|e| status(unauthorized(e)))?;
    s.users.authorize(token).await.map_err(status)
}

fn to_pb(p: Push) -> pb::Message {
    pb::Message {
        conversation_id: p.conversation_id,
        chat_type: u32::from(p.chat_type),
        send_id: p.send_id,
        recv_id: p.recv_id,
        seq: p.seq,
        msg_id: p.msg_id,
        client_msg_id: p.client_msg_id,
        send_time: p.send_time,
        msg_json: p.msg.get().to_string(),
        status: String::new(),
        read_count: 0,
    }
}

fn group_info(g: sai_storage::Group, role: String) -> pb::GroupInfo {
    pb::GroupInfo {
        group_id: g.group_id,
        name: g.name,
        owner_id: g.owner_id,
        member_count: g.member_count,
        created_at: g.created_at,
        role,
    }
}

fn member_list(members: &[sai_storage::GroupMember]) -> pb::MemberList {
    pb::MemberList {
        members: members
            .iter()
            .map(|m| pb::MemberInfo {
                user_id: m.user_id.clone(),
                role: m.role.clone(),
                joined_at: m.joined_at,
            })
            .collect(),
    }
}

/// `sai.v1.UserService`.
pub struct UserGrpc(Arc<Services>);

#[tonic::async_trait]
impl UserService for UserGrpc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let from = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let nick = (!r.nickname.is_empty()).then_some(r.nickname.as_str());
        let user_id = self
            .0
            .users
            .register(&r.username, &r.password, nick, from)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RegisterResponse { user_id }))
    }

    async fn login(&self, req: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let from = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let s = self
            .0
            .users
            .login(&r.username, &r.password, from)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::LoginResponse {
            token: s.token,
            user_id: s.user_id,
            expires_at: s.expires_at,
        }))
    }

    async fn get_me(&self, req: Request<pb::GetMeRequest>) -> Result<Response<pb::UserInfo>, Status> {
        let user_id = caller(&self.0, &req).await?;
        let u = self.0.users.get(&user_id).await.map_err(status)?;
        Ok(Response::new(pb::UserInfo {
            user_id: u.user_id,
            username: u.username,
            nickname: u.nickname,
            created_at: u.created_at,
        }))
    }
}

/// `sai.v1.MessageService`.
pub struct MessageGrpc(Arc<Services>);

#[tonic::async_trait]
impl MessageService for MessageGrpc {
    async fn send(&self, req: Request<pb::SendRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let chat_type = u8::try_from(r.chat_type)
            .ok()
            .and_then(ChatType::from_u8)
            .ok_or_else(|| status(ServiceError::invalid("unsupported_chat_type", "unsupported chat_type")))?;
        let msg = RawValue::from_string(r.msg_json)
            .ok()
            .filter(|m| m.get().trim_start().starts_with('{'))
            .ok_or_else(|| status(ServiceError::invalid("invalid_field", "msg_json must be a JSON object")))?;
        if r.client_msg_id.is_empty() || r.client_msg_id.len() > sai_pipeline::message::MAX_ID_LEN {
            return Err(status(ServiceError::invalid(
                "invalid_field",
                "client_msg_id must be 1 to 128 bytes",
            )));
        }
        let sent = self
            .0
            .messages
            .send(&user, chat_type, &r.recv_id, &r.client_msg_id, &msg)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SendResponse {
            conversation_id: sent.ack.conversation_id,
            seq: sent.ack.seq,
            msg_id: sent.ack.msg_id,
            send_time: sent.ack.send_time,
            duplicate: sent.duplicate,
        }))
    }

    async fn sync(&self, req: Request<pb::SyncRequest>) -> Result<Response<pb::SyncResponse>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            200
        } else {
            r.limit.min(crate::messages::MAX_PAGE)
        };
        let known = r.known.into_iter().collect();
        let page = self.0.messages.sync(&user, &known, limit).await.map_err(status)?;
        Ok(Response::new(pb::SyncResponse {
            messages: page.pushes.into_iter().map(to_pb).collect(),
            heads: page.heads.into_iter().collect(),
            complete: page.complete,
        }))
    }

    async fn history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let before = (r.before_seq != 0).then_some(r.before_seq);
        let limit = (r.limit != 0).then_some(r.limit);
        let msgs = self
            .0
            .messages
            .history(&user, &r.conversation_id, before, limit)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::HistoryResponse {
            messages: msgs
                .into_iter()
                .map(|m| pb::Message {
                    status: m.status.unwrap_or_default().to_string(),
                    read_count: m.read_count.unwrap_or(0),
                    ..to_pb(m.push)
                })
                .collect(),
        }))
    }

    async fn mark_read(&self, req: Request<pb::MarkReadRequest>) -> Result<Response<pb::MarkReadResponse>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let read_seq = self
            .0
            .messages
            .mark_read(&user, &r.conversation_id, r.read_seq)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::MarkReadResponse { read_seq }))
    }

    async fn list_conversations(
        &self,
        req: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ConversationList>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let limit = if r.limit == 0 { 50 } else { r.limit };
        let list = self
            .0
            .messages
            .conversations(&user, r.offset, limit)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ConversationList {
            conversations: list
                .into_iter()
                .map(|c| pb::ConversationInfo {
                    conversation_id: c.conversation_id,
                    chat_type: u32::from(c.chat_type),
                    peer_id: c.peer_id.unwrap_or_default(),
                    group_id: c.group_id.unwrap_or_default(),
                    last_message: c.last_message.map(to_pb),
                    max_seq: c.max_seq,
                    read_seq: c.read_seq,
                    unread: c.unread,
                })
                .collect(),
        }))
    }

    async fn get_reads(&self, req: Request<pb::GetReadsRequest>) -> Result<Response<pb::GetReadsResponse>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let reads = self
            .0
            .messages
            .reads(&user, &r.conversation_id, r.seq)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetReadsResponse {
            read_count: reads.read_count,
            unread_count: reads.unread_count,
            reader_ids: reads.reader_ids,
        }))
    }
}

/// `sai.v1.SocialService`.
pub struct SocialGrpc(Arc<Services>);

#[tonic::async_trait]
impl SocialService for SocialGrpc {
    async fn send_friend_request(
        &self,
        req: Request<pb::SendFriendRequestRequest>,
    ) -> Result<Response<pb::SendFriendRequestResponse>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let request_id = self
            .0
            .social
            .request_friend(&user, &r.to_user_id, &r.message)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SendFriendRequestResponse { request_id }))
    }

    async fn list_friend_requests(&self, req: Request<pb::Empty>) -> Result<Response<pb::FriendRequestList>, Status> {
        let user = caller(&self.0, &req).await?;
        let reqs = self.0.social.incoming(&user).await.map_err(status)?;
        Ok(Response::new(pb::FriendRequestList {
            requests: reqs
                .into_iter()
                .map(|r| pb::FriendRequestInfo {
                    request_id: r.request_id,
                    from_user_id: r.from_user,
                    message: r.message,
                    created_at: r.created_at,
                })
                .collect(),
        }))
    }

    async fn answer_friend_request(
        &self,
        req: Request<pb::AnswerFriendRequestRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        self.0
            .social
            .answer(&user, &r.request_id, r.accept)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_friends(&self, req: Request<pb::Empty>) -> Result<Response<pb::FriendList>, Status> {
        let user = caller(&self.0, &req).await?;
        let friends = self.0.social.friends(&user).await.map_err(status)?;
        Ok(Response::new(pb::FriendList {
            friends: friends
                .into_iter()
                .map(|f| pb::FriendInfo {
                    user_id: f.user_id,
                    since: f.since,
                })
                .collect(),
        }))
    }

    async fn remove_friend(&self, req: Request<pb::UserRef>) -> Result<Response<pb::Empty>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        self.0.social.unfriend(&user, &r.user_id).await.map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn create_group(&self, req: Request<pb::CreateGroupRequest>) -> Result<Response<pb::GroupRef>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let group_id = self
            .0
            .social
            .create_group(&user, &r.name, &r.member_ids)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GroupRef { group_id }))
    }

    async fn list_groups(&self, req: Request<pb::Empty>) -> Result<Response<pb::GroupList>, Status> {
        let user = caller(&self.0, &req).await?;
        let groups = self.0.social.groups_of(&user).await.map_err(status)?;
        Ok(Response::new(pb::GroupList {
            groups: groups.into_iter().map(|(g, m)| group_info(g, m.role)).collect(),
        }))
    }

    async fn get_group(&self, req: Request<pb::GroupRef>) -> Result<Response<pb::GroupInfo>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let (g, me) = self.0.social.group_for(&user, &r.group_id).await.map_err(status)?;
        Ok(Response::new(group_info(g, me.role)))
    }

    async fn list_members(&self, req: Request<pb::GroupRef>) -> Result<Response<pb::MemberList>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        self.0.social.group_for(&user, &r.group_id).await.map_err(status)?;
        let members = self.0.social.members(&r.group_id).await.map_err(status)?;
        Ok(Response::new(member_list(&members)))
    }

    async fn add_members(&self, req: Request<pb::AddMembersRequest>) -> Result<Response<pb::MemberList>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let added = self
            .0
            .social
            .add_members(&user, &r.group_id, &r.user_ids)
            .await
            .map_err(status)?;
        Ok(Response::new(member_list(&added)))
    }

    async fn remove_member(&self, req: Request<pb::MemberRef>) -> Result<Response<pb::Empty>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        self.0
            .social
            .remove_member(&user, &r.group_id, &r.user_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn set_role(&self, req: Request<pb::SetRoleRequest>) -> Result<Response<pb::Empty>, Status> {
        let user = caller(&self.0, &req).await?;
        let r = req.into_inner();
        self.0
            .social
            .set_role(&user, &r.group_id, &r.user_id, &r.role)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }
}
