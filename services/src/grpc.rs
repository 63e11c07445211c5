//! The gRPC (tonic) user and message services, over the same service layer as HTTP.

use crate::error::ServiceError;
use crate::users::{bearer, unauthorized};
use crate::Services;
use sai_proto::im::{ChatType, Push};
use serde_json::value::RawValue;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Generated protobuf types and service traits (`proto/sai.proto`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sai.v1");
}

use pb::message_service_server::{MessageService, MessageServiceServer};
use pb::user_service_server::{UserService, UserServiceServer};

/// Both services, ready to add to a tonic router.
pub fn services(s: Arc<Services>) -> (UserServiceServer<UserGrpc>, MessageServiceServer<MessageGrpc>) {
    (
        UserServiceServer::new(UserGrpc(s.clone())),
        MessageServiceServer::new(MessageGrpc(s)),
    )
}

fn status(e: ServiceError) -> Status {
    e.to_status()
}

fn caller<T>(s: &Services, req: &Request<T>) -> Result<String, Status> {
    let h = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    let token = bearer(h).map_err(|e| status(unauthorized(e)))?;
    s.users.authenticate(token).map_err(|e| status(unauthorized(e)))
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
    }
}

/// `sai.v1.UserService`.
pub struct UserGrpc(Arc<Services>);

#[tonic::async_trait]
impl UserService for UserGrpc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let nick = (!r.nickname.is_empty()).then_some(r.nickname.as_str());
        let user_id = self
            .0
            .users
            .register(&r.username, &r.password, nick)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RegisterResponse { user_id }))
    }

    async fn login(&self, req: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let r = req.into_inner();
        let s = self.0.users.login(&r.username, &r.password).await.map_err(status)?;
        Ok(Response::new(pb::LoginResponse {
            token: s.token,
            user_id: s.user_id,
            expires_at: s.expires_at,
        }))
    }

    async fn get_me(&self, req: Request<pb::GetMeRequest>) -> Result<Response<pb::UserInfo>, Status> {
        let user_id = caller(&self.0, &req)?;
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
        let user = caller(&self.0, &req)?;
        let r = req.into_inner();
        let chat_type = u8::try_from(r.chat_type)
            .ok()
            .and_then(ChatType::from_u8)
            .ok_or_else(|| status(ServiceError::invalid("unsupported_chat_type", "unsupported chat_type")))?;
        let msg = RawValue::from_string(r.msg_json)
            .ok()
            .filter(|m| m.get().trim_start().starts_with('{'))
            .ok_or_else(|| status(ServiceError::invalid("invalid_field", "msg_json must be a JSON object")))?;
        if r.client_msg_id.is_empty() || r.client_msg_id.len() > sai_proto::im::MAX_ID_LEN {
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
            duplicate: sent.push.is_none(),
        }))
    }

    async fn sync(&self, req: Request<pb::SyncRequest>) -> Result<Response<pb::SyncResponse>, Status> {
        let user = caller(&self.0, &req)?;
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
        let user = caller(&self.0, &req)?;
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
            messages: msgs.into_iter().map(|m| to_pb(m.push)).collect(),
        }))
    }
}
