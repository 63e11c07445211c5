//! JWT (HS256) issue and verification, and the persistent signing secret.
//!
//! Tokens are `base64url(header).base64url(claims).base64url(HMAC-SHA256)` with claims
//! `{"sub": userId, "iat", "exp"}` in seconds. Only `alg: HS256` is accepted (no `none`, no key
//! confusion), the MAC is compared in constant time, and the clock is passed in.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;

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

    /// Reads the secret from `path`, or generates 32 random bytes and writes them there (mode 0600)
    /// so tokens survive a restart.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(s) if !s.trim().is_empty() => return Ok(Self::new(s.trim().as_bytes().to_vec())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        write_private(path, hex.as_bytes())?;
        Ok(Self::new(hex.into_bytes()))
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

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
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

    #[test]
    fn secret_persists() {
        let dir = std::env::temp_dir().join(format!("sai-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("jwt.secret");
        let _ = std::fs::remove_file(&p);
        let a = JwtKeys::load_or_create(&p).unwrap();
        let b = JwtKeys::load_or_create(&p).unwrap();
        let t = a.sign(&claims(200));
        assert!(b.verify(&t, 150).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
