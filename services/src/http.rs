//! The HTTP JSON API (axum). Every error is `{"code","message"}` with the matching status.
//!
//! | route | auth | body / query | answer |
//! |---|---|---|---|
//! | `POST /v1/users/register` | - | `{"username","password","nickname"}` | `{"userId"}` |
//! | `POST /v1/users/login` | - | `{"username","password"}` | `{"token","userId","expiresAt"}` |
//! | `GET /v1/users/me` | bearer | - | `{"userId","username","nickname","createdAt"}` |
//! | `GET /v1/users` | bearer | `username` | `{"users":[{"userId","username","nickname"}]}`: the user of that exact name, if any |
//! | `GET /v1/users/{id}` | bearer | - | `{"userId","username","nickname"}` |
//! | `POST /v1/users/logout` | bearer | - | 204; every token of the user is revoked, the live session closed with 4004 |
//! | `POST /v1/users/me/password` | bearer | `{"currentPassword","newPassword"}` | `{"token","userId","expiresAt"}`; earlier tokens revoked (4004) |
//! | `POST /v1/admin/users/{id}/disable` and `/enable` | admin token | - | 204; disabling closes the live session with 4005 |
//! | `GET /v1/conversations/{id}/messages` | bearer | `beforeSeq`, `limit` | `{"messages":[..]}` newest first |
//! | `GET /v1/conversations` | bearer | `offset`, `limit` | `{"conversations":[..]}` newest activity first |
//! | `POST /v1/conversations/{id}/read` | bearer | `{"readSeq"}` | `{"conversationId","readSeq"}` |
//! | `GET /v1/conversations/{id}/messages/{seq}/reads` | bearer | - | `{"readCount","unreadCount","readerIds"}` |
//! | `POST /v1/friends/requests` | bearer | `{"toUserId","message"}` | `{"requestId"}` |
//! | `GET /v1/friends/requests` | bearer | - | `{"requests":[..]}` incoming, pending |
//! | `POST /v1/friends/requests/{id}/accept` and `/reject` | bearer | - | `{"requestId","status"}` |
//! | `GET /v1/friends` | bearer | - | `{"friends":[..]}` |
//! | `DELETE /v1/friends/{userId}` | bearer | - | 204 |
//! | `POST /v1/groups` | bearer | `{"name","memberIds"}` | `{"groupId"}` |
//! | `GET /v1/groups` | bearer | - | `{"groups":[..]}` |
//! | `GET /v1/groups/{id}` | bearer | - | the group |
//! | `GET /v1/groups/{id}/members` | bearer | - | `{"members":[..]}` |
//! | `POST /v1/groups/{id}/members` | bearer | `{"userIds"}` | `{"added":[..]}` |
//! | `DELETE /v1/groups/{id}/members/{userId}` | bearer | - | 204 |
//! | `PUT /v1/groups/{id}/members/{userId}/role` | bearer | `{"role"}` | 204 |
//! | `GET /healthz` | - | - | `{"status":"ok"}` |
//!
//! Login and registration answer 429 `too_many_attempts` with `Retry-After` past their attempt
//! limits, and 503 `server_busy` (also with `Retry-After`) when the bcrypt queue is full
//! ([`crate::throttle`]).

use crate::error::ServiceError;
use crate::users::{bearer, unauthorized};
use crate::Services;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Largest request body.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// A [`ServiceError`] as an HTTP response.
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({ "code": self.0.code(), "message": self.0.to_string() });
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = self.0.retry_after_secs() {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

/// The router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so that login
/// and registration are limited per client address (without it only the per-account limit
/// applies).
pub fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/v1/users/register", post(register))
        .route("/v1/users/login", post(login))
        .route("/v1/users/me", get(me))
        .route("/v1/users", get(find_users))
        .route("/v1/users/{id}", get(profile))
        .route("/v1/users/logout", post(logout))
        .route("/v1/users/me/password", post(change_password))
        .route("/v1/admin/users/{id}/disable", post(disable_user))
        .route("/v1/admin/users/{id}/enable", post(enable_user))
        .route("/v1/conversations", get(conversations))
        .route("/v1/conversations/{id}/messages", get(history))
        .route("/v1/conversations/{id}/read", post(mark_read))
        .route("/v1/conversations/{id}/messages/{seq}/reads", get(reads))
        .route("/v1/friends/requests", post(request_friend).get(incoming_requests))
        .route("/v1/friends/requests/{id}/accept", post(accept_request))
        .route("/v1/friends/requests/{id}/reject", post(reject_request))
        .route("/v1/friends", get(friends))
        .route("/v1/presence", get(presence))
        .route("/v1/friends/{user_id}", axum::routing::delete(unfriend))
        .route("/v1/groups", post(create_group).get(my_groups))
        .route("/v1/groups/{id}", get(group))
        .route("/v1/groups/{id}/members", get(group_members).post(add_members))
        .route(
            "/v1/groups/{id}/members/{user_id}",
            axum::routing::delete(remove_member),
        )
        .route("/v1/groups/{id}/members/{user_id}/role", put(set_role))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async {
            ApiError(ServiceError::NotFound {
                code: "not_found",
                message: "no such route".into(),
            })
        })
        .method_not_allowed_fallback(|| async {
            let body = json!({"code": "method_not_allowed", "message": "method not allowed on this route"});
            (StatusCode::METHOD_NOT_ALLOWED, Json(body))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // The last line of defence: a handler that panics answers 500 `internal_error` (and is
        // logged once, here) instead of dropping the connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .with_state(services)
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = detail, "HTTP handler panicked");
    ApiError(ServiceError::Internal).into_response()
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() { "invalid_request" } else { "invalid_json" };
        ApiError(ServiceError::invalid(code, format!("request body: {e}")))
    })
}

fn required<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str, ApiError> {
    v.as_deref()
        .ok_or_else(|| ApiError(ServiceError::invalid("missing_field", format!("missing field {name}"))))
}

/// The token of `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let h = headers.get("authorization").and_then(|v| v.to_str().ok());
    bearer(h).map_err(|e| ApiError(unauthorized(e)))
}

async fn caller(services: &Services, headers: &HeaderMap) -> Result<String, ApiError> {
    Ok(services.users.authorize(bearer_token(headers)?).await?)
}

/// `Authorization: Bearer <admin_token>` of the configuration; without one configured the
/// admin routes answer 403.
fn admin(services: &Services, headers: &HeaderMap) -> Result<(), ApiError> {
    let forbidden = |message: &str| {
        ApiError(ServiceError::Forbidden {
            code: "not_admin",
            message: message.into(),
        })
    };
    let Some(expected) = services.admin_token.as_deref() else {
        return Err(forbidden("no admin token is configured"));
    };
    if !same_secret(bearer_token(headers)?.as_bytes(), expected.as_bytes()) {
        return Err(forbidden("not the admin token"));
    }
    Ok(())
}

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    nickname: Option<String>,
}

/// The client's address, where the server was started with connection info (see
/// [`router`]); the attempt limits of login and registration are kept per address.
struct ClientAddr(Option<IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let info = parts.extensions.get::<axum::extract::ConnectInfo<SocketAddr>>();
        Ok(Self(info.map(|c| c.0.ip())))
    }
}

async fn register(State(s): State<Arc<Services>>, ClientAddr(from): ClientAddr, body: Bytes) -> ApiResult {
    let b: RegisterBody = parse_body(&body)?;
    let user_id = s
        .users
        .register(
            required(&b.username, "username")?,
            required(&b.password, "password")?,
            b.nickname.as_deref(),
            from,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "userId": user_id }))).into_response())
}

#[derive(Deserialize)]
struct LoginBody {
    username: Option<String>,
    password: Option<String>,
}

async fn login(State(s): State<Arc<Services>>, ClientAddr(from): ClientAddr, body: Bytes) -> ApiResult {
    let b: LoginBody = parse_body(&body)?;
    let session = s
        .users
        .login(
            required(&b.username, "username")?,
            required(&b.password, "password")?,
            from,
        )
        .await?;
    Ok(session_answer(&session))
}

/// `{"token","userId","expiresAt"}`: the answer of login and of a password change.
fn session_answer(session: &crate::users::Session) -> Response {
    Json(json!({
        "token": session.token,
        "userId": session.user_id,
        "expiresAt": session.expires_at,
    }))
    .into_response()
}

/// Compares in time that depends on the length only, not on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn logout(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.users.logout(&user_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PasswordBody {
    current_password: Option<String>,
    new_password: Option<String>,
}

async fn change_password(State(s): State<Arc<Services>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: PasswordBody = parse_body(&body)?;
    let session = s
        .users
        .change_password(
            &user_id,
            required(&b.current_password, "currentPassword")?,
            required(&b.new_password, "newPassword")?,
        )
        .await?;
    Ok(session_answer(&session))
}

async fn disable_user(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&s, &headers)?;
    s.users.set_disabled(&id, true).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn enable_user(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&s, &headers)?;
    s.users.set_disabled(&id, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn me(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let u = s.users.get(&user_id).await?;
    Ok(Json(json!({
        "userId": u.user_id,
        "username": u.username,
        "nickname": u.nickname,
        "createdAt": u.created_at,
    }))
    .into_response())
}

/// What any signed-in user may see of another: id, name and nickname.
fn public_profile(u: &sai_storage::User) -> serde_json::Value {
    json!({"userId": u.user_id, "username": u.username, "nickname": u.nickname})
}

/// `GET /v1/users?username=`: the user of exactly that name (an empty list when none), so
/// that a client can find someone to befriend.
async fn find_users(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller(&s, &headers).await?;
    let name = q
        .get("username")
        .ok_or_else(|| ApiError(ServiceError::invalid("missing_field", "missing query username")))?;
    let users: Vec<_> = s.users.by_name(name).await?.iter().map(public_profile).collect();
    Ok(Json(json!({ "users": users })).into_response())
}

async fn profile(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    caller(&s, &headers).await?;
    Ok(Json(public_profile(&s.users.get(&id).await?)).into_response())
}

fn query_u64(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError(ServiceError::invalid(
                    "invalid_query",
                    format!("{name} must be a non-negative integer"),
                ))
            })
        })
        .transpose()
}

async fn history(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let before = query_u64(&q, "beforeSeq")?;
    let limit = query_u64(&q, "limit")?.map(|l| u32::try_from(l).unwrap_or(u32::MAX));
    let messages = s.messages.history(&user_id, &id, before, limit).await?;
    // Typed, so stored bodies are written out as they are, never parsed again (`json!` would
    // parse each into a `Value`).
    #[derive(serde::Serialize)]
    struct Page {
        messages: Vec<crate::messages::HistoryMessage>,
    }
    Ok(Json(Page { messages }).into_response())
}

async fn conversations(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let offset = query_u64(&q, "offset")?.unwrap_or(0);
    let limit = query_u64(&q, "limit")?.unwrap_or(50);
    let list = s
        .messages
        .conversations(
            &user_id,
            u32::try_from(offset).unwrap_or(u32::MAX),
            u32::try_from(limit).unwrap_or(u32::MAX),
        )
        .await?;
    #[derive(serde::Serialize)]
    struct List {
        conversations: Vec<crate::messages::ConversationEntry>,
    }
    Ok(Json(List { conversations: list }).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadBody {
    read_seq: Option<u64>,
}

async fn mark_read(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: ReadBody = parse_body(&body)?;
    let read_seq = b
        .read_seq
        .ok_or_else(|| ApiError(ServiceError::invalid("missing_field", "missing field readSeq")))?;
    let now = s.messages.mark_read(&user_id, &id, read_seq).await?;
    Ok(Json(json!({ "conversationId": id, "readSeq": now })).into_response())
}

async fn reads(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Path((id, seq)): Path<(String, String)>,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let seq: u64 = seq.parse().map_err(|_| {
        ApiError(ServiceError::invalid(
            "invalid_query",
            "seq must be a non-negative integer",
        ))
    })?;
    let r = s.messages.reads(&user_id, &id, seq).await?;
    Ok(Json(r).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FriendRequestBody {
    to_user_id: Option<String>,
    #[serde(default)]
    message: String,
}

async fn request_friend(State(s): State<Arc<Services>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: FriendRequestBody = parse_body(&body)?;
    let to = required(&b.to_user_id, "toUserId")?;
    let id = s.social.request_friend(&user_id, to, &b.message).await?;
    Ok((StatusCode::CREATED, Json(json!({ "requestId": id }))).into_response())
}

async fn incoming_requests(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let reqs: Vec<_> = s
        .social
        .incoming(&user_id)
        .await?
        .into_iter()
        .map(|r| {
            json!({"requestId": r.request_id, "fromUserId": r.from_user, "message": r.message,
                   "status": r.status, "createdAt": r.created_at})
        })
        .collect();
    Ok(Json(json!({ "requests": reqs })).into_response())
}

async fn answer(s: &Services, headers: &HeaderMap, id: &str, accept: bool) -> ApiResult {
    let user_id = caller(s, headers).await?;
    s.social.answer(&user_id, id, accept).await?;
    let status = if accept { "accepted" } else { "rejected" };
    Ok(Json(json!({ "requestId": id, "status": status })).into_response())
}

async fn accept_request(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    answer(&s, &headers, &id, true).await
}

async fn reject_request(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    answer(&s, &headers, &id, false).await
}

async fn friends(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let mut out = Vec::new();
    for f in s.social.friends(&user_id).await? {
        let u = s.users.get(&f.user_id).await?;
        out.push(json!({"userId": f.user_id, "username": u.username, "nickname": u.nickname, "since": f.since}));
    }
    Ok(Json(json!({ "friends": out })).into_response())
}

/// `GET /v1/presence?userIds=a,b`: whether the caller's friends (or the caller) are connected.
async fn presence(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let ids: Vec<String> = q
        .get("userIds")
        .map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let online = s.social.presence(&user_id, &ids).await?;
    let map: serde_json::Map<String, serde_json::Value> =
        ids.into_iter().zip(online).map(|(id, on)| (id, json!(on))).collect();
    Ok(Json(json!({ "online": map })).into_response())
}

async fn unfriend(State(s): State<Arc<Services>>, headers: HeaderMap, Path(other): Path<String>) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.social.unfriend(&user_id, &other).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateGroupBody {
    name: Option<String>,
    #[serde(default)]
    member_ids: Vec<String>,
}

async fn create_group(State(s): State<Arc<Services>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: CreateGroupBody = parse_body(&body)?;
    let name = required(&b.name, "name")?;
    let id = s.social.create_group(&user_id, name, &b.member_ids).await?;
    Ok((StatusCode::CREATED, Json(json!({ "groupId": id }))).into_response())
}

fn group_json(g: &sai_storage::Group, role: &str) -> serde_json::Value {
    json!({"groupId": g.group_id, "name": g.name, "ownerId": g.owner_id, "memberCount": g.member_count,
           "createdAt": g.created_at, "conversationId": sai_pipeline::conversation::ConversationId::group(&g.group_id).to_string(),
           "role": role})
}

fn member_json(m: &sai_storage::GroupMember) -> serde_json::Value {
    json!({"userId": m.user_id, "role": m.role, "joinedAt": m.joined_at})
}

async fn my_groups(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let groups: Vec<_> = s
        .social
        .groups_of(&user_id)
        .await?
        .iter()
        .map(|(g, m)| group_json(g, &m.role))
        .collect();
    Ok(Json(json!({ "groups": groups })).into_response())
}

async fn group(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let (g, me) = s.social.group_for(&user_id, &id).await?;
    Ok(Json(group_json(&g, &me.role)).into_response())
}

async fn group_members(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.social.group_for(&user_id, &id).await?;
    let members: Vec<_> = s.social.members(&id).await?.iter().map(member_json).collect();
    Ok(Json(json!({ "members": members })).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddMembersBody {
    user_ids: Option<Vec<String>>,
}

async fn add_members(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: AddMembersBody = parse_body(&body)?;
    let ids = b
        .user_ids
        .ok_or_else(|| ApiError(ServiceError::invalid("missing_field", "missing field userIds")))?;
    let added: Vec<_> = s
        .social
        .add_members(&user_id, &id, &ids)
        .await?
        .iter()
        .map(member_json)
        .collect();
    Ok(Json(json!({ "added": added })).into_response())
}

async fn remove_member(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Path((id, target)): Path<(String, String)>,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.social.remove_member(&user_id, &id, &target).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct RoleBody {
    role: Option<String>,
}

async fn set_role(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Path((id, target)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: RoleBody = parse_body(&body)?;
    let role = required(&b.role, "role")?;
    s.social.set_role(&user_id, &id, &target, role).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
