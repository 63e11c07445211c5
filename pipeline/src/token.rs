//! JWT (HS256) issue and verification, sans-IO (the clock is passed in). The gateway checks
//! upgrade tokens with it; the load generator mints tokens with it in benchmark mode.
//!
//! Tokens are `base64url(header).base64url(claims).base64url(HMAC-SHA256)` with claims
//! `{"sub": userId, "iat", "exp", "gen"}` (times in seconds; `gen` is the account's token
//! epoch when the token was issued: logout, a password change or disabling the account start a
//! new epoch, and the services refuse tokens of an older one). Only `alg: HS256` is accepted (no `none`, no key
//! confusion), the MAC is compared in constant time, and the clock is passed in.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
/// Longest token looked at; anything longer is malformed.
const MAX_TOKEN_LEN: usize = 4096;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token was presented.
    #[error("no token presented")]
    Missing,
    /// Not three base64url parts of JSON, or a header other than HS256.
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify with our secret.
    #[error("invalid token signature")]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
}

impl TokenError {
    /// Stable code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Malformed => "malformed_token",
            Self::BadSignature => "invalid_token",
            Self::Expired => "token_expired",
        }
    }
}

/// Token claims.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    /// The account's token epoch at issue (absent in tokens of older builds: epoch 0).
    #[serde(default)]
    pub gen: u32,
}

/// The HS256 key.
#[derive(Clone)]
pub struct JwtKeys {
    secret: Vec<u8>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(..)")
    }
}

impl JwtKeys {
    /// A key from raw secret bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self { secret: secret.into() }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        match HmacSha256::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    /// Signs claims.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut token = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
        let mut mac = self.mac();
        mac.update(token.as_bytes());
        let sig = mac.finalize().into_bytes();
        token.push('.');
        token.push_str(&B64.encode(sig));
        token
    }

    /// Verifies a token at `now` (seconds since the epoch) and returns its claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let header = B64.decode(h).map_err(|_| TokenError::Malformed)?;
        let header: serde_json::Value = serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(TokenError::Malformed);
        }
        let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(&token.as_bytes()[..h.len() + 1 + p.len()]);
        mac.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
        let payload = B64.decode(p).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            gen: 0,
            sub: "u1".into(),
            iat: 100,
            exp,
        }
    }

    #[test]
    fn sign_verify_expire_forge() {
        let k = JwtKeys::new(b"secret".to_vec());
        let t = k.sign(&claims(200));
        assert_eq!(k.verify(&t, 150), Ok(claims(200)));
        assert_eq!(k.verify(&t, 200), Err(TokenError::Expired));
        let other = JwtKeys::new(b"other".to_vec());
        assert_eq!(other.verify(&t, 150), Err(TokenError::BadSignature));
        // Tampered claims with the original signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(serde_json::to_vec(&claims(999_999)).unwrap());
        parts[1] = &forged;
        assert_eq!(k.verify(&parts.join("."), 150), Err(TokenError::BadSignature));
        // alg none.
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode("{}"));
        assert_eq!(k.verify(&none, 150), Err(TokenError::Malformed));
        assert_eq!(k.verify("a.b", 150), Err(TokenError::Malformed));
        assert_eq!(k.verify("", 150), Err(TokenError::Missing));
    }
}
