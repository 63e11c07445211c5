//! The HTTP JSON API (axum). Every error is `{"code","message"}` with the matching status.
//!
//! | route | auth | body / query | answer |
//! |---|---|---|---|
//! | `POST /v1/users/register` | - | `{"username","password","nickname"}` | `{"userId"}` |
//! | `POST /v1/users/login` | - | `{"username","password"}` | `{"token","userId","expiresAt"}` |
//! | `GET /v1/users/me` | bearer | - | `{"userId","username","nickname","createdAt"}` |
//! | `GET /v1/conversations/{id}/messages` | bearer | `beforeSeq`, `limit` | `{"messages":[..]}` newest first |
//! | `GET /healthz` | - | - | `{"status":"ok"}` |

use crate::error::ServiceError;
use crate::users::{bearer, unauthorized};
use crate::Services;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
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
        (status, Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// The router.
pub fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/v1/users/register", post(register))
        .route("/v1/users/login", post(login))
        .route("/v1/users/me", get(me))
        .route("/v1/conversations/{id}/messages", get(history))
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
        .with_state(services)
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

fn caller(services: &Services, headers: &HeaderMap) -> Result<String, ApiError> {
    let h = headers.get("authorization").and_then(|v| v.to_str().ok());
    let token = bearer(h).map_err(|e| ApiError(unauthorized(e)))?;
    services
        .users
        .authenticate(token)
        .map_err(|e| ApiError(unauthorized(e)))
}

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    nickname: Option<String>,
}

async fn register(State(s): State<Arc<Services>>, body: Bytes) -> ApiResult {
    let b: RegisterBody = parse_body(&body)?;
    let user_id = s
        .users
        .register(
            required(&b.username, "username")?,
            required(&b.password, "password")?,
            b.nickname.as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "userId": user_id }))).into_response())
}

#[derive(Deserialize)]
struct LoginBody {
    username: Option<String>,
    password: Option<String>,
}

async fn login(State(s): State<Arc<Services>>, body: Bytes) -> ApiResult {
    let b: LoginBody = parse_body(&body)?;
    let session = s
        .users
        .login(required(&b.username, "username")?, required(&b.password, "password")?)
        .await?;
    Ok(Json(json!({
        "token": session.token,
        "userId": session.user_id,
        "expiresAt": session.expires_at,
    }))
    .into_response())
}

async fn me(State(s): State<Arc<Services>>, headers: HeaderMap) -> ApiResult {
    let user_id = caller(&s, &headers)?;
    let u = s.users.get(&user_id).await?;
    Ok(Json(json!({
        "userId": u.user_id,
        "username": u.username,
        "nickname": u.nickname,
        "createdAt": u.created_at,
    }))
    .into_response())
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
    let user_id = caller(&s, &headers)?;
    let before = query_u64(&q, "beforeSeq")?;
    let limit = query_u64(&q, "limit")?.map(|l| u32::try_from(l).unwrap_or(u32::MAX));
    let msgs = s.messages.history(&user_id, &id, before, limit).await?;
    Ok(Json(json!({ "messages": msgs })).into_response())
}
