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
//! | `GET /openapi.json` | - | - | the OpenAPI document |
//!
//! The same API as an OpenAPI 3.1 document, generated from these handlers and the types they
//! answer with ([`openapi`]), is served at `GET /openapi.json`.
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
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use utoipa::ToSchema;

/// Largest request body.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// A [`ServiceError`] as an HTTP response.
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        Self(e)
    }
}

/// Every error's body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, snake_case: what clients branch on.
    pub code: String,
    /// For people: may change.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: self.0.code().to_string(),
            message: self.0.to_string(),
        };
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
    let (routes, _) = api().split_for_parts();
    routes
        .fallback(|| async {
            ApiError(ServiceError::NotFound {
                code: "not_found",
                message: "no such route".into(),
            })
        })
        .method_not_allowed_fallback(|| async {
            let body = ErrorBody {
                code: "method_not_allowed".into(),
                message: "method not allowed on this route".into(),
            };
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

// Request bodies. Their fields are `Option`s so that an absent one is answered 400
// `missing_field` naming it (serde's own error would say less); the OpenAPI document marks
// the ones a request needs as required.

/// `POST /v1/users/register`.
#[derive(Deserialize, ToSchema)]
pub struct RegisterBody {
    /// 3 to 32 of `A-Za-z0-9_.-`, unique.
    #[schema(required = true, value_type = String)]
    username: Option<String>,
    /// 8 or more characters, at most 72 bytes.
    #[schema(required = true, value_type = String)]
    password: Option<String>,
    /// Display name (the username when absent).
    nickname: Option<String>,
}

/// A new account.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    /// Its id.
    pub user_id: String,
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

/// Registers an account.
#[utoipa::path(post, path = "/v1/users/register", tag = "users", request_body = RegisterBody,
    responses((status = 201, description = "registered", body = Registered)))]
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
    Ok((StatusCode::CREATED, Json(Registered { user_id })).into_response())
}

/// `POST /v1/users/login`.
#[derive(Deserialize, ToSchema)]
pub struct LoginBody {
    /// The account's name.
    #[schema(required = true, value_type = String)]
    username: Option<String>,
    /// Its password.
    #[schema(required = true, value_type = String)]
    password: Option<String>,
}

/// Logs in: a token.
#[utoipa::path(post, path = "/v1/users/login", tag = "users", request_body = LoginBody,
    responses((status = 200, description = "signed in", body = crate::users::Session)))]
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
    Ok(Json(session).into_response())
}

/// Compares in time that depends on the length only, not on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Logs out everywhere: every token of the user is revoked, the live session closed with 4004.
#[utoipa::path(post, path = "/v1/users/logout", tag = "users", security(("bearer" = [])),
    responses((status = 204, description = "logged out")))]
async fn logout(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.users.logout(&user_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/users/me/password`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PasswordBody {
    /// The password now.
    #[schema(required = true, value_type = String)]
    current_password: Option<String>,
    /// The new one (the same rules as at registration).
    #[schema(required = true, value_type = String)]
    new_password: Option<String>,
}

/// Changes the password: a new token; earlier ones are revoked (the live session closed with 4004).
#[utoipa::path(post, path = "/v1/users/me/password", tag = "users", security(("bearer" = [])),
    request_body = PasswordBody,
    responses((status = 200, description = "changed: a new session", body = crate::users::Session)))]
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
    Ok(Json(session).into_response())
}

/// Disables an account (admin token): it cannot log in, its tokens are refused, its live
/// session is closed with 4005.
#[utoipa::path(post, path = "/v1/admin/users/{id}/disable", tag = "admin", security(("admin" = [])),
    params(("id" = String, Path, description = "user id")),
    responses((status = 204, description = "disabled")))]
async fn disable_user(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&s, &headers)?;
    s.users.set_disabled(&id, true).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Enables an account again (admin token); its old tokens stay revoked.
#[utoipa::path(post, path = "/v1/admin/users/{id}/enable", tag = "admin", security(("admin" = [])),
    params(("id" = String, Path, description = "user id")),
    responses((status = 204, description = "enabled")))]
async fn enable_user(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&s, &headers)?;
    s.users.set_disabled(&id, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The caller's own account.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    /// Id.
    pub user_id: String,
    /// Login name.
    pub username: String,
    /// Display name.
    pub nickname: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// The caller's account.
#[utoipa::path(get, path = "/v1/users/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, description = "the caller", body = Me)))]
async fn me(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let u = s.users.get(&user_id).await?;
    Ok(Json(Me {
        user_id: u.user_id,
        username: u.username,
        nickname: u.nickname,
        created_at: u.created_at,
    })
    .into_response())
}

/// What any signed-in user may see of another.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// Id.
    pub user_id: String,
    /// Login name.
    pub username: String,
    /// Display name.
    pub nickname: String,
}

impl From<sai_storage::User> for Profile {
    fn from(u: sai_storage::User) -> Self {
        Self {
            user_id: u.user_id,
            username: u.username,
            nickname: u.nickname,
        }
    }
}

/// Users found.
#[derive(Serialize, ToSchema)]
pub struct UserList {
    /// None or one.
    pub users: Vec<Profile>,
}

/// The user of exactly that name, if any: how a client finds someone to befriend.
#[utoipa::path(get, path = "/v1/users", tag = "users", security(("bearer" = [])),
    params(("username" = String, Query, description = "the exact username")),
    responses((status = 200, description = "none or one user", body = UserList)))]
async fn find_users(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller(&s, &headers).await?;
    let name = q
        .get("username")
        .ok_or_else(|| ApiError(ServiceError::invalid("missing_field", "missing query username")))?;
    let users = s.users.by_name(name).await?.into_iter().map(Profile::from).collect();
    Ok(Json(UserList { users }).into_response())
}

/// One user's public profile.
#[utoipa::path(get, path = "/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = String, Path, description = "user id")),
    responses((status = 200, description = "the user", body = Profile)))]
async fn profile(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    caller(&s, &headers).await?;
    Ok(Json(Profile::from(s.users.get(&id).await?)).into_response())
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

/// A page of history.
#[derive(Serialize, ToSchema)]
pub struct HistoryPage {
    /// Newest first.
    pub messages: Vec<crate::messages::HistoryMessage>,
}

/// A conversation's history, newest first (members only; a group's from when the caller joined).
#[utoipa::path(get, path = "/v1/conversations/{id}/messages", tag = "conversations", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "conversation id (`si_<a>_<b>` or `sg_<groupId>`)"),
        ("beforeSeq" = Option<u64>, Query, description = "only messages older than this seq"),
        ("limit" = Option<u32>, Query, description = "page size, 1 to 500 (default 100)"),
    ),
    responses((status = 200, description = "a page", body = HistoryPage)))]
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
    Ok(Json(HistoryPage { messages }).into_response())
}

/// The caller's conversations.
#[derive(Serialize, ToSchema)]
pub struct ConversationList {
    /// Newest activity first.
    pub conversations: Vec<crate::messages::ConversationEntry>,
}

/// The caller's conversations with their last message and unread count.
#[utoipa::path(get, path = "/v1/conversations", tag = "conversations", security(("bearer" = [])),
    params(
        ("offset" = Option<u32>, Query, description = "entries to skip"),
        ("limit" = Option<u32>, Query, description = "entries, 1 to 200 (default 50)"),
    ),
    responses((status = 200, description = "the list", body = ConversationList)))]
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
    Ok(Json(ConversationList { conversations: list }).into_response())
}

/// `POST /v1/conversations/{id}/read`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadBody {
    /// Read up to this seq.
    #[schema(required = true, value_type = u64)]
    read_seq: Option<u64>,
}

/// A read position.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadPosition {
    /// The conversation.
    pub conversation_id: String,
    /// The position in force (never backwards; clamped to the newest seq).
    pub read_seq: u64,
}

/// Moves the caller's read position.
#[utoipa::path(post, path = "/v1/conversations/{id}/read", tag = "conversations", security(("bearer" = [])),
    params(("id" = String, Path, description = "conversation id")),
    request_body = ReadBody,
    responses((status = 200, description = "the position in force", body = ReadPosition)))]
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
    Ok(Json(ReadPosition {
        conversation_id: id,
        read_seq: now,
    })
    .into_response())
}

/// Who read one message: the members other than the sender who could see it.
#[utoipa::path(get, path = "/v1/conversations/{id}/messages/{seq}/reads", tag = "conversations",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "conversation id"), ("seq" = u64, Path, description = "the message's seq")),
    responses((status = 200, description = "its readers", body = crate::messages::Reads)))]
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

/// `POST /v1/friends/requests`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FriendRequestBody {
    /// Whom to befriend.
    #[schema(required = true, value_type = String)]
    to_user_id: Option<String>,
    /// A note for them.
    #[serde(default)]
    message: String,
}

/// A new friend request.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestCreated {
    /// Its id.
    pub request_id: String,
}

/// Sends a friend request; the recipient, if online, gets `friend.request`.
#[utoipa::path(post, path = "/v1/friends/requests", tag = "friends", security(("bearer" = [])),
    request_body = FriendRequestBody,
    responses((status = 201, description = "sent", body = RequestCreated)))]
async fn request_friend(State(s): State<Arc<Services>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: FriendRequestBody = parse_body(&body)?;
    let to = required(&b.to_user_id, "toUserId")?;
    let request_id = s.social.request_friend(&user_id, to, &b.message).await?;
    Ok((StatusCode::CREATED, Json(RequestCreated { request_id })).into_response())
}

/// A friend request the caller received.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncomingRequest {
    /// Its id.
    pub request_id: String,
    /// Who sent it.
    pub from_user_id: String,
    /// Their note.
    pub message: String,
    /// `pending`.
    pub status: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// Incoming friend requests.
#[derive(Serialize, ToSchema)]
pub struct RequestList {
    /// Pending ones.
    pub requests: Vec<IncomingRequest>,
}

/// The friend requests waiting for the caller's answer.
#[utoipa::path(get, path = "/v1/friends/requests", tag = "friends", security(("bearer" = [])),
    responses((status = 200, description = "incoming, pending", body = RequestList)))]
async fn incoming_requests(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let requests = s
        .social
        .incoming(&user_id)
        .await?
        .into_iter()
        .map(|r| IncomingRequest {
            request_id: r.request_id,
            from_user_id: r.from_user,
            message: r.message,
            status: r.status,
            created_at: r.created_at,
        })
        .collect();
    Ok(Json(RequestList { requests }).into_response())
}

/// A request answered.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestAnswered {
    /// Its id.
    pub request_id: String,
    /// `accepted` or `rejected`.
    #[schema(pattern = "^(accepted|rejected)$")]
    pub status: &'static str,
}

async fn answer(s: &Services, headers: &HeaderMap, request_id: String, accept: bool) -> ApiResult {
    let user_id = caller(s, headers).await?;
    s.social.answer(&user_id, &request_id, accept).await?;
    let status = if accept { "accepted" } else { "rejected" };
    Ok(Json(RequestAnswered { request_id, status }).into_response())
}

/// Accepts a friend request (its recipient only); the requester gets `friend.accepted`.
#[utoipa::path(post, path = "/v1/friends/requests/{id}/accept", tag = "friends", security(("bearer" = [])),
    params(("id" = String, Path, description = "request id")),
    responses((status = 200, description = "accepted", body = RequestAnswered)))]
async fn accept_request(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    answer(&s, &headers, id, true).await
}

/// Rejects a friend request (its recipient only).
#[utoipa::path(post, path = "/v1/friends/requests/{id}/reject", tag = "friends", security(("bearer" = [])),
    params(("id" = String, Path, description = "request id")),
    responses((status = 200, description = "rejected", body = RequestAnswered)))]
async fn reject_request(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    answer(&s, &headers, id, false).await
}

/// A friend.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FriendView {
    /// Id.
    pub user_id: String,
    /// Login name.
    pub username: String,
    /// Display name.
    pub nickname: String,
    /// Friends since, milliseconds since the Unix epoch.
    pub since: i64,
}

/// The caller's friends.
#[derive(Serialize, ToSchema)]
pub struct FriendList {
    /// All of them.
    pub friends: Vec<FriendView>,
}

/// The caller's friends.
#[utoipa::path(get, path = "/v1/friends", tag = "friends", security(("bearer" = [])),
    responses((status = 200, description = "the friends", body = FriendList)))]
async fn friends(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let mut friends = Vec::new();
    for f in s.social.friends(&user_id).await? {
        let u = s.users.get(&f.user_id).await?;
        friends.push(FriendView {
            user_id: f.user_id,
            username: u.username,
            nickname: u.nickname,
            since: f.since,
        });
    }
    Ok(Json(FriendList { friends }).into_response())
}

/// Who is connected.
#[derive(Serialize, ToSchema)]
pub struct Presence {
    /// Each id asked about: connected to a gateway now.
    pub online: BTreeMap<String, bool>,
}

/// Whether the caller's friends (or the caller) are connected now.
#[utoipa::path(get, path = "/v1/presence", tag = "friends", security(("bearer" = [])),
    params(("userIds" = String, Query, description = "1 to 100 comma-separated ids: the caller or their friends")),
    responses((status = 200, description = "each one's presence", body = Presence)))]
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
    Ok(Json(Presence {
        online: ids.into_iter().zip(online).collect(),
    })
    .into_response())
}

/// Ends a friendship (either side).
#[utoipa::path(delete, path = "/v1/friends/{user_id}", tag = "friends", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "the friend's id")),
    responses((status = 204, description = "no longer friends")))]
async fn unfriend(State(s): State<Arc<Services>>, headers: HeaderMap, Path(other): Path<String>) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.social.unfriend(&user_id, &other).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/groups`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateGroupBody {
    /// 1 to 64 characters.
    #[schema(required = true, value_type = String)]
    name: Option<String>,
    /// The first members besides the caller (the owner).
    #[serde(default)]
    member_ids: Vec<String>,
}

/// A new group.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupCreated {
    /// Its id.
    pub group_id: String,
}

/// Creates a group owned by the caller.
#[utoipa::path(post, path = "/v1/groups", tag = "groups", security(("bearer" = [])),
    request_body = CreateGroupBody,
    responses((status = 201, description = "created", body = GroupCreated)))]
async fn create_group(State(s): State<Arc<Services>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let b: CreateGroupBody = parse_body(&body)?;
    let name = required(&b.name, "name")?;
    let group_id = s.social.create_group(&user_id, name, &b.member_ids).await?;
    Ok((StatusCode::CREATED, Json(GroupCreated { group_id })).into_response())
}

/// A group as its members see it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    /// Id.
    pub group_id: String,
    /// Name.
    pub name: String,
    /// The owner.
    pub owner_id: String,
    /// Members now.
    pub member_count: u32,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Its conversation: `sg_<groupId>`.
    pub conversation_id: String,
    /// The caller's role: `owner`, `admin` or `member`.
    pub role: String,
}

impl GroupView {
    fn new(g: sai_storage::Group, role: String) -> Self {
        Self {
            conversation_id: sai_pipeline::conversation::ConversationId::group(&g.group_id).to_string(),
            group_id: g.group_id,
            name: g.name,
            owner_id: g.owner_id,
            member_count: g.member_count,
            created_at: g.created_at,
            role,
        }
    }
}

/// A group member.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    /// Id.
    pub user_id: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
    /// Milliseconds since the Unix epoch.
    pub joined_at: i64,
}

impl From<&sai_storage::GroupMember> for MemberView {
    fn from(m: &sai_storage::GroupMember) -> Self {
        Self {
            user_id: m.user_id.clone(),
            role: m.role.clone(),
            joined_at: m.joined_at,
        }
    }
}

/// The caller's groups.
#[derive(Serialize, ToSchema)]
pub struct GroupList {
    /// All of them.
    pub groups: Vec<GroupView>,
}

/// The groups the caller is a member of.
#[utoipa::path(get, path = "/v1/groups", tag = "groups", security(("bearer" = [])),
    responses((status = 200, description = "the groups", body = GroupList)))]
async fn my_groups(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let groups = s
        .social
        .groups_of(&user_id)
        .await?
        .into_iter()
        .map(|(g, m)| GroupView::new(g, m.role))
        .collect();
    Ok(Json(GroupList { groups }).into_response())
}

/// One group (members only).
#[utoipa::path(get, path = "/v1/groups/{id}", tag = "groups", security(("bearer" = [])),
    params(("id" = String, Path, description = "group id")),
    responses((status = 200, description = "the group", body = GroupView)))]
async fn group(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    let (g, me) = s.social.group_for(&user_id, &id).await?;
    Ok(Json(GroupView::new(g, me.role)).into_response())
}

/// A group's members.
#[derive(Serialize, ToSchema)]
pub struct MemberList {
    /// All of them.
    pub members: Vec<MemberView>,
}

/// A group's members (members only).
#[utoipa::path(get, path = "/v1/groups/{id}/members", tag = "groups", security(("bearer" = [])),
    params(("id" = String, Path, description = "group id")),
    responses((status = 200, description = "the members", body = MemberList)))]
async fn group_members(State(s): State<Arc<Services>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.social.group_for(&user_id, &id).await?;
    let members = s.social.members(&id).await?.iter().map(MemberView::from).collect();
    Ok(Json(MemberList { members }).into_response())
}

/// `POST /v1/groups/{id}/members`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddMembersBody {
    /// Users to add (existing members are skipped).
    #[schema(required = true, value_type = Vec<String>)]
    user_ids: Option<Vec<String>>,
}

/// Members added.
#[derive(Serialize, ToSchema)]
pub struct Added {
    /// The new members.
    pub added: Vec<MemberView>,
}

/// Adds members (owner or admin).
#[utoipa::path(post, path = "/v1/groups/{id}/members", tag = "groups", security(("bearer" = [])),
    params(("id" = String, Path, description = "group id")),
    request_body = AddMembersBody,
    responses((status = 200, description = "the members added", body = Added)))]
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
    let added = s
        .social
        .add_members(&user_id, &id, &ids)
        .await?
        .iter()
        .map(MemberView::from)
        .collect();
    Ok(Json(Added { added }).into_response())
}

/// Removes a member: the owner removes anyone but itself, an admin plain members, a member itself.
#[utoipa::path(delete, path = "/v1/groups/{id}/members/{user_id}", tag = "groups", security(("bearer" = [])),
    params(("id" = String, Path, description = "group id"), ("user_id" = String, Path, description = "the member")),
    responses((status = 204, description = "removed")))]
async fn remove_member(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    Path((id, target)): Path<(String, String)>,
) -> ApiResult {
    let user_id = caller(&s, &headers).await?;
    s.social.remove_member(&user_id, &id, &target).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /v1/groups/{id}/members/{userId}/role`.
#[derive(Deserialize, ToSchema)]
pub struct RoleBody {
    /// `admin` or `member`.
    #[schema(required = true, value_type = String)]
    role: Option<String>,
}

/// Sets a member's role (owner only).
#[utoipa::path(put, path = "/v1/groups/{id}/members/{user_id}/role", tag = "groups", security(("bearer" = [])),
    params(("id" = String, Path, description = "group id"), ("user_id" = String, Path, description = "the member")),
    request_body = RoleBody,
    responses((status = 204, description = "set")))]
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

/// Liveness.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
}

/// Liveness: answers while the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "serving", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// This API as an OpenAPI 3.1 document (generated from the handlers above, built once).
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI document", body = Object, content_type = "application/json")))]
async fn openapi_json() -> ApiResult {
    static DOC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| openapi().to_json().ok());
    // A document that does not serialize is a bug: 500 `internal_error`, like any other.
    let doc = doc.as_deref().ok_or(ApiError(ServiceError::Internal))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], doc).into_response())
}

/// Every route with its handler, each path and method taken from the handler's `utoipa::path`
/// attribute: the router and the OpenAPI document are built from this one list, so neither can
/// have a route the other lacks.
fn api() -> utoipa_axum::router::OpenApiRouter<Arc<Services>> {
    use utoipa::OpenApi;
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(me))
        .routes(routes!(find_users))
        .routes(routes!(profile))
        .routes(routes!(logout))
        .routes(routes!(change_password))
        .routes(routes!(disable_user))
        .routes(routes!(enable_user))
        .routes(routes!(conversations))
        .routes(routes!(history))
        .routes(routes!(mark_read))
        .routes(routes!(reads))
        .routes(routes!(request_friend, incoming_requests))
        .routes(routes!(accept_request))
        .routes(routes!(reject_request))
        .routes(routes!(friends))
        .routes(routes!(presence))
        .routes(routes!(unfriend))
        .routes(routes!(create_group, my_groups))
        .routes(routes!(group))
        .routes(routes!(group_members, add_members))
        .routes(routes!(remove_member))
        .routes(routes!(set_role))
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
}

/// The OpenAPI document of [`router`]'s routes: the paths from the handlers' `utoipa::path`
/// attributes, the schemas from the types they answer with (serde's renames applied), and, on
/// every route that can fail, a `default` answer of [`ErrorBody`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = api().split_for_parts();
    utoipa::Modify::modify(&Conventions, &mut doc);
    doc
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "SAI-IM HTTP API",
        description = "Accounts, friends, groups, conversations and read state. Messages are sent and \
            pushed over the WebSocket protocol (docs/protocol.md); this API reads what was stored. \
            Every error is `{\"code\",\"message\"}` with a stable snake_case code."
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// What every route shares: the two bearer schemes and the error answer.
struct Conventions;

impl utoipa::Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("the token of login"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("the configured admin_token"))
                    .build(),
            ),
        );
        let error = ResponseBuilder::new()
            .description("an error: the status says which kind, `code` exactly which")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for (path, item) in doc.paths.paths.iter_mut() {
            if path == "/healthz" || path == "/openapi.json" {
                continue;
            }
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete]
                .into_iter()
                .flatten()
            {
                op.responses.responses.insert("default".into(), error.clone().into());
            }
        }
    }
}
