//! The user service: registration (bcrypt), login (JWT) and profile lookup.

use crate::auth::{Claims, JwtKeys, TokenError};
use crate::cache::Cached;
use crate::error::ServiceError;
use crate::throttle::{address_key, HashPool, HashPoolConfig, LoginLimits, LoginThrottle};
use crate::{Clock, Outbound};
use sai_pipeline::flow::CloseReason;
use sai_storage::{StoreError, User, UserStore};
use std::net::IpAddr;
use std::sync::Arc;

/// bcrypt reads at most 72 bytes of a password; longer ones are refused rather than truncated.
pub const MAX_PASSWORD_BYTES: usize = 72;
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest nickname, in characters.
pub const MAX_NICKNAME_CHARS: usize = 64;

/// A successful login (also the HTTP answer of login and of a password change).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The JWT: `Authorization: Bearer` over HTTP, `Sec-WebSocket-Protocol` on the upgrade.
    pub token: String,
    /// Whose it is.
    pub user_id: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

/// How the user service hashes, issues and throttles.
#[derive(Debug, Clone, Copy)]
pub struct UserConfig {
    /// bcrypt cost of new passwords.
    pub bcrypt_cost: u32,
    /// Token lifetime.
    pub token_ttl_secs: i64,
    /// Login and registration attempt limits.
    pub limits: LoginLimits,
    /// The bcrypt threads.
    pub hash_pool: HashPoolConfig,
}

/// Users and tokens.
pub struct UserService {
    store: Arc<dyn UserStore>,
    keys: JwtKeys,
    clock: Arc<dyn Clock>,
    bcrypt_cost: u32,
    token_ttl_secs: i64,
    /// bcrypt runs here, never on the runtime's threads (see [`crate::throttle`]).
    hashes: HashPool,
    /// Attempt limits of login and registration.
    throttle: LoginThrottle,
    /// Hash compared against when the username does not exist, so a login takes the same time
    /// either way and does not reveal which part was wrong.
    dummy_hash: String,
    /// What the token check needs of each account, for the upgrade and every authenticated
    /// request, and existence for every private send. Invalidated by every revocation; absent
    /// ids are not cached (they may be registered next).
    accounts: Cached<String, Account>,
    /// Other services processes, told of every account invalidated here.
    peers: crate::cache::Peers,
    /// Where revoked sessions are closed.
    outbound: Arc<Outbound>,
}

/// Accounts [`UserService`] remembers (about 100 bytes each).
const CACHED_ACCOUNTS: usize = 100_000;

/// The part of an account that decides whether its tokens hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Account {
    /// Only tokens of this epoch are accepted.
    epoch: u32,
    /// Disabled accounts' tokens are refused.
    disabled: bool,
}

impl UserService {
    /// A service over `store`.
    pub fn new(
        store: Arc<dyn UserStore>,
        keys: JwtKeys,
        clock: Arc<dyn Clock>,
        cfg: UserConfig,
        outbound: Arc<Outbound>,
    ) -> Result<Self, ServiceError> {
        let dummy_hash = bcrypt::hash("not a real password", cfg.bcrypt_cost).map_err(|e| {
            tracing::error!(error = %e, "bcrypt setup failed");
            ServiceError::Internal
        })?;
        let hashes = HashPool::new(cfg.hash_pool).map_err(|e| {
            tracing::error!(error = %e, "starting the hash threads failed");
            ServiceError::Internal
        })?;
        Ok(Self {
            store,
            keys,
            clock,
            bcrypt_cost: cfg.bcrypt_cost,
            token_ttl_secs: cfg.token_ttl_secs,
            hashes,
            throttle: LoginThrottle::new(cfg.limits),
            dummy_hash,
            accounts: Cached::new(CACHED_ACCOUNTS),
            peers: crate::cache::Peers::default(),
            outbound,
        })
    }

    /// Changes the login and registration limits (a configuration reload): the next attempt
    /// follows them; the counts so far and the blocks already started are kept.
    pub fn set_limits(&self, limits: LoginLimits) {
        self.throttle.set(limits);
    }

    /// Tells `peers` of every account invalidated here.
    pub fn set_peers(&self, peers: Arc<dyn crate::cache::CachePeers>) {
        self.peers.set(peers);
    }

    /// Forgets a cached account (a peer revoked it).
    pub fn forget_account(&self, user_id: &str) {
        self.accounts.invalidate(&user_id.to_string());
    }

    /// Forgets every cached account.
    pub fn forget_accounts(&self) {
        self.accounts.clear();
    }

    /// The signing keys (the gateway verifies tokens with them).
    pub fn keys(&self) -> &JwtKeys {
        &self.keys
    }

    /// Creates an account and returns its id. `from` is the client's address (registrations
    /// per address are limited; `None` for callers that are not clients).
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        nickname: Option<&str>,
        from: Option<IpAddr>,
    ) -> Result<String, ServiceError> {
        validate_username(username)?;
        validate_password(password)?;
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
        // Counted only once the request is valid and would cost a hash.
        if let Some(ip) = from {
            self.throttle
                .registrations
                .begin(&address_key(ip), self.clock.now_ms())?;
        }
        let hash = self.hash(password).await?;
        let user = User {
            user_id: uuid::Uuid::new_v4().simple().to_string(),
            username: username.to_string(),
            nickname: nickname.to_string(),
            password_hash: hash,
            created_at: self.clock.now_ms(),
            token_epoch: 0,
            disabled: false,
        };
        match self.store.create_user(&user).await {
            Ok(()) => Ok(user.user_id),
            Err(StoreError::Conflict(_)) => Err(username_taken()),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks credentials and issues a token. 401 `invalid_credentials` for an unknown user and
    /// for a wrong password alike; 429 `too_many_attempts` while the account name or `from` (the
    /// client's address) is blocked by the attempt limits (see [`crate::throttle`]).
    pub async fn login(&self, username: &str, password: &str, from: Option<IpAddr>) -> Result<Session, ServiceError> {
        let now = self.clock.now_ms();
        let account = username.to_string();
        let address = from.map(address_key);
        if let Some(a) = &address {
            self.throttle.addresses.begin(a, now)?;
        }
        if let Err(e) = self.throttle.accounts.begin(&account, now) {
            if let Some(a) = &address {
                // Refused before any work: not held against the address.
                self.throttle.addresses.forgive(a);
            }
            return Err(e);
        }
        let user = self.store.user_by_name(username).await?;
        let hash = user
            .as_ref()
            .map(|u| u.password_hash.clone())
            .unwrap_or_else(|| self.dummy_hash.clone());
        let ok = self.verify(password, hash).await?;
        let (Some(user), true) = (user, ok) else {
            return Err(invalid_credentials());
        };
        self.throttle.accounts.reset(&account);
        if let Some(a) = &address {
            self.throttle.addresses.forgive(a);
        }
        // Told only to who knows the password.
        if user.disabled {
            return Err(disabled());
        }
        Ok(self.issue(&user.user_id, user.token_epoch))
    }

    /// bcrypt of `password` at the configured cost, on the hash pool.
    async fn hash(&self, password: &str) -> Result<String, ServiceError> {
        let (pw, cost) = (password.to_string(), self.bcrypt_cost);
        self.hashes.run(move || bcrypt::hash(pw, cost)).await?.map_err(|e| {
            tracing::error!(error = %e, "bcrypt hash failed");
            ServiceError::Internal
        })
    }

    /// Whether `password` matches the bcrypt `hash`, checked on the hash pool (a malformed
    /// stored hash matches nothing).
    async fn verify(&self, password: &str, hash: String) -> Result<bool, ServiceError> {
        let pw = password.to_string();
        self.hashes
            .run(move || bcrypt::verify(pw, &hash).unwrap_or(false))
            .await
    }

    /// Issues a token for `user_id` in token epoch `gen`, valid for the configured TTL.
    fn issue(&self, user_id: &str, gen: u32) -> Session {
        let iat = self.clock.now_ms() / 1000;
        let exp = iat + self.token_ttl_secs;
        let token = self.keys.sign(&Claims {
            sub: user_id.to_string(),
            iat,
            exp,
            gen,
        });
        Session {
            token,
            user_id: user_id.to_string(),
            expires_at: exp,
        }
    }

    /// Verifies a token and returns its user id: signed by us, not expired, of an account that
    /// exists, is not disabled and has not revoked it (its epoch is the account's). The account
    /// is read through a cache, so this costs a store read only the first time.
    pub async fn authorize(&self, token: &str) -> Result<String, ServiceError> {
        let claims = self
            .keys
            .verify(token, self.clock.now_ms() / 1000)
            .map_err(unauthorized)?;
        match self.account(&claims.sub).await? {
            None => Err(ServiceError::Unauthorized {
                code: "invalid_token",
                message: "the token's user does not exist".into(),
            }),
            Some(a) if a.disabled => Err(disabled()),
            Some(a) if a.epoch != claims.gen => Err(ServiceError::Unauthorized {
                code: "token_revoked",
                message: "this token was revoked: log in again".into(),
            }),
            Some(_) => Ok(claims.sub),
        }
    }

    /// Logs `user_id` out everywhere: every token issued so far is refused from now on and the
    /// live session is closed with 4004.
    pub async fn logout(&self, user_id: &str) -> Result<(), ServiceError> {
        self.store.revoke_tokens(user_id).await?.ok_or_else(user_not_found)?;
        self.revoked(user_id, CloseReason::TokenRevoked).await;
        Ok(())
    }

    /// Replaces the password after checking the current one (attempts count against the
    /// account's limit like logins). Earlier tokens are revoked (the live session is closed
    /// with 4004); the answer is a token of the new epoch.
    pub async fn change_password(&self, user_id: &str, current: &str, new: &str) -> Result<Session, ServiceError> {
        validate_password(new)?;
        let user = self.get(user_id).await?;
        let now = self.clock.now_ms();
        self.throttle.accounts.begin(&user.username, now)?;
        if !self.verify(current, user.password_hash.clone()).await? {
            return Err(invalid_credentials());
        }
        self.throttle.accounts.reset(&user.username);
        let hash = self.hash(new).await?;
        let epoch = self
            .store
            .set_password(user_id, &hash)
            .await?
            .ok_or_else(user_not_found)?;
        self.revoked(user_id, CloseReason::TokenRevoked).await;
        Ok(self.issue(user_id, epoch))
    }

    /// Disables (or enables again) an account. Disabling refuses its logins and tokens and
    /// closes its live session with 4005; enabling lets it log in again (earlier tokens stay
    /// revoked).
    pub async fn set_disabled(&self, user_id: &str, disabled: bool) -> Result<(), ServiceError> {
        self.store
            .set_disabled(user_id, disabled)
            .await?
            .ok_or_else(user_not_found)?;
        let reason = if disabled {
            CloseReason::AccountDisabled
        } else {
            CloseReason::TokenRevoked
        };
        self.revoked(user_id, reason).await;
        Ok(())
    }

    /// After a committed revocation: forget the cached account, close the live session.
    async fn revoked(&self, user_id: &str, reason: CloseReason) {
        self.accounts.invalidate(&user_id.to_string());
        self.peers.tell(crate::cache::CacheName::Accounts, user_id);
        self.outbound.close(user_id, reason).await;
    }

    async fn account(&self, user_id: &str) -> Result<Option<Account>, ServiceError> {
        let found = self
            .accounts
            .get_or_load(&user_id.to_string(), async {
                match self.store.user_by_id(user_id).await {
                    Ok(Some(u)) => Ok(Account {
                        epoch: u.token_epoch,
                        disabled: u.disabled,
                    }),
                    Ok(None) => Err(None),
                    Err(e) => Err(Some(e)),
                }
            })
            .await;
        match found {
            Ok(a) => Ok(Some(a)),
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e.into()),
        }
    }

    /// The account behind an id.
    pub async fn get(&self, user_id: &str) -> Result<User, ServiceError> {
        self.store.user_by_id(user_id).await?.ok_or_else(user_not_found)
    }

    /// The user named exactly `username`: none or one.
    pub async fn by_name(&self, username: &str) -> Result<Vec<User>, ServiceError> {
        Ok(self.store.user_by_name(username).await?.into_iter().collect())
    }

    /// Whether a user id exists (disabled accounts exist).
    pub async fn exists(&self, user_id: &str) -> Result<bool, ServiceError> {
        Ok(self.account(user_id).await?.is_some())
    }
}

fn invalid_credentials() -> ServiceError {
    ServiceError::Unauthorized {
        code: "invalid_credentials",
        message: "invalid username or password".into(),
    }
}

fn disabled() -> ServiceError {
    ServiceError::Forbidden {
        code: "account_disabled",
        message: "this account is disabled".into(),
    }
}

fn user_not_found() -> ServiceError {
    ServiceError::NotFound {
        code: "user_not_found",
        message: "no such user".into(),
    }
}

fn username_taken() -> ServiceError {
    ServiceError::Conflict {
        code: "username_taken",
        message: "username already exists".into(),
    }
}

/// [`MIN_PASSWORD_CHARS`] characters to [`MAX_PASSWORD_BYTES`] bytes.
fn validate_password(password: &str) -> Result<(), ServiceError> {
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
    Ok(())
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
