//! The user service: registration (bcrypt), login (JWT) and profile lookup.

use crate::auth::{Claims, JwtKeys, TokenError};
use crate::cache::Cached;
use crate::error::ServiceError;
use crate::Clock;
use sai_storage::{StoreError, User, UserStore};
use std::sync::Arc;

/// bcrypt reads at most 72 bytes of a password; longer ones are refused rather than truncated.
pub const MAX_PASSWORD_BYTES: usize = 72;
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest nickname, in characters.
pub const MAX_NICKNAME_CHARS: usize = 64;

/// A successful login.
#[derive(Debug, Clone)]
pub struct Session {
    /// The JWT.
    pub token: String,
    /// Whose it is.
    pub user_id: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
}

/// Users and tokens.
pub struct UserService {
    store: Arc<dyn UserStore>,
    keys: JwtKeys,
    clock: Arc<dyn Clock>,
    bcrypt_cost: u32,
    token_ttl_secs: i64,
    /// Hash compared against when the username does not exist, so a login takes the same time
    /// either way and does not reveal which part was wrong.
    dummy_hash: String,
    /// Ids known to exist (every private send asks). Accounts are never deleted, so an entry
    /// never goes stale; absent ids are not cached (they may be registered next).
    known: Cached<String, ()>,
}

/// User ids [`UserService::exists`] remembers (about 100 bytes each).
const KNOWN_USERS: usize = 100_000;

impl UserService {
    /// A service over `store`.
    pub fn new(
        store: Arc<dyn UserStore>,
        keys: JwtKeys,
        clock: Arc<dyn Clock>,
        bcrypt_cost: u32,
        token_ttl_secs: i64,
    ) -> Result<Self, ServiceError> {
        let dummy_hash = bcrypt::hash("not a real password", bcrypt_cost).map_err(|e| {
            tracing::error!(error = %e, "bcrypt setup failed");
            ServiceError::Internal
        })?;
        Ok(Self {
            store,
            keys,
            clock,
            bcrypt_cost,
            token_ttl_secs,
            dummy_hash,
            known: Cached::new(KNOWN_USERS),
        })
    }

    /// The signing keys (the gateway verifies tokens with them).
    pub fn keys(&self) -> &JwtKeys {
        &self.keys
    }

    /// Creates an account and returns its id.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        nickname: Option<&str>,
    ) -> Result<String, ServiceError> {
        validate_username(username)?;
        if password.chars().count() < MIN_PASSWORD_CHARS {
            return Err(ServiceError::invalid(
                "invalid_password",
                format!("password must be at least {MIN_PASSWORD_CHARS} characters"),
            ));
        }
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(ServiceError::invalid(
                "invalid_password",
                format!("password must be at most {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        let nickname = nickname.map(str::trim).filter(|n| !n.is_empty()).unwrap_or(username);
        if nickname.chars().count() > MAX_NICKNAME_CHARS || nickname.chars().any(char::is_control) {
            return Err(ServiceError::invalid(
                "invalid_nickname",
                format!("nickname must be at most {MAX_NICKNAME_CHARS} printable characters"),
            ));
        }
        if self.store.user_by_name(username).await?.is_some() {
            return Err(username_taken());
        }
        let cost = self.bcrypt_cost;
        let pw = password.to_string();
        let hash = tokio::task::spawn_blocking(move || bcrypt::hash(pw, cost))
            .await
            .map_err(|_| ServiceError::Internal)?
            .map_err(|e| {
                tracing::error!(error = %e, "bcrypt hash failed");
                ServiceError::Internal
            })?;
        let user = User {
            user_id: uuid::Uuid::new_v4().simple().to_string(),
            username: username.to_string(),
            nickname: nickname.to_string(),
            password_hash: hash,
            created_at: self.clock.now_ms(),
        };
        match self.store.create_user(&user).await {
            Ok(()) => Ok(user.user_id),
            Err(StoreError::Conflict(_)) => Err(username_taken()),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks credentials and issues a token. 401 `invalid_credentials` for an unknown user and
    /// for a wrong password alike.
    pub async fn login(&self, username: &str, password: &str) -> Result<Session, ServiceError> {
        let user = self.store.user_by_name(username).await?;
        let hash = user
            .as_ref()
            .map(|u| u.password_hash.clone())
            .unwrap_or_else(|| self.dummy_hash.clone());
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pw, &hash).unwrap_or(false))
            .await
            .map_err(|_| ServiceError::Internal)?;
        let (Some(user), true) = (user, ok) else {
            return Err(ServiceError::Unauthorized {
                code: "invalid_credentials",
                message: "invalid username or password".into(),
            });
        };
        Ok(self.issue(&user.user_id))
    }

    /// Issues a token for `user_id` valid for the configured TTL.
    pub fn issue(&self, user_id: &str) -> Session {
        let iat = self.clock.now_ms() / 1000;
        let exp = iat + self.token_ttl_secs;
        let token = self.keys.sign(&Claims {
            sub: user_id.to_string(),
            iat,
            exp,
        });
        Session {
            token,
            user_id: user_id.to_string(),
            expires_at: exp,
        }
    }

    /// Verifies a token and returns its user id. Does not touch storage.
    pub fn authenticate(&self, token: &str) -> Result<String, TokenError> {
        self.keys.verify(token, self.clock.now_ms() / 1000).map(|c| c.sub)
    }

    /// The account behind an id.
    pub async fn get(&self, user_id: &str) -> Result<User, ServiceError> {
        self.store
            .user_by_id(user_id)
            .await?
            .ok_or_else(|| ServiceError::NotFound {
                code: "user_not_found",
                message: "no such user".into(),
            })
    }

    /// Whether a user id exists.
    pub async fn exists(&self, user_id: &str) -> Result<bool, ServiceError> {
        let found = self
            .known
            .get_or_load(&user_id.to_string(), async {
                match self.store.user_by_id(user_id).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(None),
                    Err(e) => Err(Some(e)),
                }
            })
            .await;
        match found {
            Ok(()) => Ok(true),
            Err(None) => Ok(false),
            Err(Some(e)) => Err(e.into()),
        }
    }
}

fn username_taken() -> ServiceError {
    ServiceError::Conflict {
        code: "username_taken",
        message: "username already exists".into(),
    }
}

/// 3 to 32 characters of `A-Z a-z 0-9 _ . -`.
fn validate_username(u: &str) -> Result<(), ServiceError> {
    let ok = (3..=32).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "invalid_username",
            "username must be 3 to 32 characters of letters, digits, '_', '.' or '-'",
        ))
    }
}

/// `Authorization: Bearer <token>` -> token.
pub fn bearer(header: Option<&str>) -> Result<&str, TokenError> {
    let h = header.ok_or(TokenError::Missing)?;
    let (scheme, token) = h.trim().split_once(' ').ok_or(TokenError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed);
    }
    Ok(token.trim())
}

/// The error for a refused token.
pub fn unauthorized(e: TokenError) -> ServiceError {
    ServiceError::Unauthorized {
        code: e.code(),
        message: e.to_string(),
    }
}
