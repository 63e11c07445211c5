//! JWT issue and verification with the `jsonwebtoken` crate, sans-IO (the clock is passed in).
//! The services issue tokens and check them at each upgrade; the load generator mints tokens
//! with the same keys in benchmark mode.
//!
//! Claims are `{"sub": userId, "iat", "exp", "gen"}` (times in seconds; `gen` is the account's
//! token epoch when the token was issued: logout, a password change or disabling the account
//! start a new epoch, and the services refuse tokens of an older one).
//!
//! - **Keys.** HS256 with a shared secret (the embedded default: generated once, kept in the
//!   data dir), or EdDSA (Ed25519) with a private key to sign and a public key to verify, so
//!   that a process that only checks tokens holds no secret.
//! - **Key ids.** Every token names its key in the header (`kid`: the algorithm and the first
//!   8 bytes of the SHA-256 of the secret or the public key, in hex). A key set verifies with
//!   its own key and any previous ones it was given ([`JwtKeys::with_previous`]): a rotation
//!   signs with the new key while tokens of the old one stay good until they expire. A token
//!   without a `kid` (issued before key ids) is tried against the keys of its algorithm.
//! - **Refusals.** Only the algorithm of a known key is accepted (no `none`, no key
//!   confusion); `exp` is checked against the `now` passed in, without leeway.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    /// Every kind.
    pub const ALL: [TokenError; 4] = [Self::Missing, Self::Malformed, Self::BadSignature, Self::Expired];

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

/// One key: its id, its algorithm, and what it verifies with.
#[derive(Clone)]
struct VerifyKey {
    kid: String,
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys of a process: one to sign with, and every key whose tokens it accepts.
#[derive(Clone)]
pub struct JwtKeys {
    kid: String,
    alg: Algorithm,
    signing: EncodingKey,
    verifier: Verifier,
}

/// Keys that only verify: what a gateway holds when tokens are EdDSA (the public keys, current
/// and previous), so that it refuses forged and expired tokens without holding a secret.
#[derive(Clone, Default)]
pub struct Verifier {
    keys: Vec<VerifyKey>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        write!(f, "Verifier({kids:?})")
    }
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKeys({})", self.kid)
    }
}

/// `<prefix>-<the first 8 bytes of SHA-256 of bytes, hex>`.
fn key_id(prefix: &str, bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

impl JwtKeys {
    /// HS256 with a shared secret.
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        let secret = secret.into();
        let kid = key_id("hs256", &secret);
        Self {
            verifier: Verifier {
                keys: vec![VerifyKey {
                    kid: kid.clone(),
                    alg: Algorithm::HS256,
                    key: DecodingKey::from_secret(&secret),
                }],
            },
            kid,
            alg: Algorithm::HS256,
            signing: EncodingKey::from_secret(&secret),
        }
    }

    /// EdDSA (Ed25519): signs with the PKCS#8 PEM `private_pem`, verifies with the SPKI PEM
    /// `public_pem` (its pair: checked by signing a probe).
    pub fn ed25519(private_pem: &[u8], public_pem: &[u8]) -> Result<Self, String> {
        let signing = EncodingKey::from_ed_pem(private_pem).map_err(|e| format!("Ed25519 private key: {e}"))?;
        let verifying = ed25519_public(public_pem)?;
        let keys = Self {
            kid: verifying.kid.clone(),
            alg: Algorithm::EdDSA,
            signing,
            verifier: Verifier { keys: vec![verifying] },
        };
        let probe = Claims {
            sub: "probe".into(),
            iat: 0,
            exp: 2,
            gen: 0,
        };
        keys.verify(&keys.sign(&probe), 1)
            .map_err(|_| "the Ed25519 public key is not the private key's pair".to_string())?;
        Ok(keys)
    }

    /// Also accepts tokens signed by `previous` (a rotation: sign with the new key, keep the old
    /// one's tokens good until they expire).
    pub fn with_previous(mut self, previous: &JwtKeys) -> Self {
        for k in &previous.verifier.keys {
            self.verifier.add(k.clone());
        }
        self
    }

    /// Also accepts tokens of the Ed25519 public key `public_pem`.
    pub fn with_previous_ed25519(mut self, public_pem: &[u8]) -> Result<Self, String> {
        self.verifier = self.verifier.with_previous_ed25519(public_pem)?;
        Ok(self)
    }

    /// What verifies this key set's tokens (and its previous keys').
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The id of the key tokens are signed with.
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// Signs claims.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        // Signing with a key that was loaded and checked cannot fail; an empty token is
        // refused by every verifier if it ever did.
        jsonwebtoken::encode(&header, claims, &self.signing).unwrap_or_default()
    }

    /// Verifies a token at `now` (seconds since the epoch) and returns its claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        self.verifier.verify(token, now)
    }
}

impl Verifier {
    /// The Ed25519 public key `public_pem` (SPKI PEM).
    pub fn ed25519(public_pem: &[u8]) -> Result<Self, String> {
        Ok(Self {
            keys: vec![ed25519_public(public_pem)?],
        })
    }

    /// Also accepts tokens of the Ed25519 public key `public_pem` (a rotation's previous key).
    pub fn with_previous_ed25519(mut self, public_pem: &[u8]) -> Result<Self, String> {
        self.add(ed25519_public(public_pem)?);
        Ok(self)
    }

    fn add(&mut self, k: VerifyKey) {
        if !self.keys.iter().any(|v| v.kid == k.kid) {
            self.keys.push(k);
        }
    }

    /// Verifies a token at `now` (seconds since the epoch) and returns its claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg && header.kid.as_ref().is_none_or(|kid| *kid == k.kid));
        let mut refusal = TokenError::BadSignature;
        for k in candidates {
            let mut v = Validation::new(k.alg);
            // Expiry is checked below against the clock passed in; nothing else is required.
            v.validate_exp = false;
            v.validate_nbf = false;
            v.validate_aud = false;
            v.leeway = 0;
            v.required_spec_claims.clear();
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => {
                    if data.claims.exp <= now {
                        return Err(TokenError::Expired);
                    }
                    return Ok(data.claims);
                }
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                Err(_) => refusal = TokenError::Malformed,
            }
        }
        Err(refusal)
    }
}

fn ed25519_public(public_pem: &[u8]) -> Result<VerifyKey, String> {
    let key = DecodingKey::from_ed_pem(public_pem).map_err(|e| format!("Ed25519 public key: {e}"))?;
    let text = String::from_utf8_lossy(public_pem);
    // The id hashes the key, not its PEM layout (line breaks, trailing newline).
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok(VerifyKey {
        kid: key_id("ed25519", body.trim().as_bytes()),
        alg: Algorithm::EdDSA,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;

    const ED1: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOvaE+U7szTB5rJkXv/r/7PqhgDN0YC7VHAjDqVx00DE\n-----END PRIVATE KEY-----\n";
    const ED1_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAyEcxMahsg9u9g+J29m0uBR7mfaWqvJHOyy95k/9ItRc=\n-----END PUBLIC KEY-----\n";
    const ED2: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIHMMIVyrxGUVLY4pGTIuB3d9ngLvqZAeXDtwAsNHSorF\n-----END PRIVATE KEY-----\n";
    const ED2_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAvGXuGRPrQsRRmG22iJZEy5DyiisE+dYSU2Du7DvpN58=\n-----END PUBLIC KEY-----\n";

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
        // The header names the key.
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(
            (header["alg"].as_str(), header["kid"].as_str()),
            (Some("HS256"), Some(k.key_id()))
        );
    }

    #[test]
    fn ed25519_tokens_and_key_confusion() {
        let k = JwtKeys::ed25519(ED1.as_bytes(), ED1_PUB.as_bytes()).unwrap();
        let t = k.sign(&claims(200));
        assert_eq!(k.verify(&t, 150), Ok(claims(200)));
        assert_eq!(k.verify(&t, 200), Err(TokenError::Expired));
        assert!(
            JwtKeys::ed25519(ED1.as_bytes(), ED2_PUB.as_bytes()).is_err(),
            "a mismatched pair is refused"
        );
        let other = JwtKeys::ed25519(ED2.as_bytes(), ED2_PUB.as_bytes()).unwrap();
        assert_eq!(other.verify(&t, 150), Err(TokenError::BadSignature));
        // An HS256 token signed with the public key's text as the secret is not accepted by
        // an EdDSA key set (the classic confusion).
        let confused = JwtKeys::new(ED1_PUB.as_bytes().to_vec()).sign(&claims(200));
        assert!(k.verify(&confused, 150).is_err());
        assert!(k.key_id().starts_with("ed25519-"));
    }

    #[test]
    fn a_public_key_alone_verifies_what_its_private_key_signed() {
        let signer = JwtKeys::ed25519(ED1.as_bytes(), ED1_PUB.as_bytes()).unwrap();
        let t = signer.sign(&claims(200));
        let gate = Verifier::ed25519(ED1_PUB.as_bytes()).unwrap();
        assert_eq!(gate.verify(&t, 150), Ok(claims(200)));
        assert_eq!(gate.verify(&t, 200), Err(TokenError::Expired));
        let other = JwtKeys::ed25519(ED2.as_bytes(), ED2_PUB.as_bytes()).unwrap();
        let t2 = other.sign(&claims(200));
        assert_eq!(gate.verify(&t2, 150), Err(TokenError::BadSignature));
        // No HS256 token passes a public-key verifier, whatever its secret.
        let confused = JwtKeys::new(ED1_PUB.as_bytes().to_vec()).sign(&claims(200));
        assert!(gate.verify(&confused, 150).is_err());
        // A rotation: the previous public key's tokens stay good.
        let rotated = Verifier::ed25519(ED1_PUB.as_bytes())
            .unwrap()
            .with_previous_ed25519(ED2_PUB.as_bytes())
            .unwrap();
        assert_eq!(rotated.verify(&t2, 150), Ok(claims(200)));
        assert_eq!(rotated.verify(&t, 150), Ok(claims(200)));
        assert!(Verifier::ed25519(b"not a key").is_err());
    }

    #[test]
    fn a_rotation_keeps_the_previous_keys_tokens_good() {
        let old = JwtKeys::new(b"old secret".to_vec());
        let old_token = old.sign(&claims(200));
        let new = JwtKeys::ed25519(ED1.as_bytes(), ED1_PUB.as_bytes())
            .unwrap()
            .with_previous(&old);
        assert_eq!(new.verify(&old_token, 150), Ok(claims(200)));
        assert_eq!(new.verify(&new.sign(&claims(300)), 150), Ok(claims(300)));
        let alone = JwtKeys::ed25519(ED1.as_bytes(), ED1_PUB.as_bytes()).unwrap();
        assert!(
            alone.verify(&old_token, 150).is_err(),
            "without it, the old key's tokens are refused"
        );
        let ed_old = JwtKeys::ed25519(ED2.as_bytes(), ED2_PUB.as_bytes()).unwrap();
        let via_pem = alone.with_previous_ed25519(ED2_PUB.as_bytes()).unwrap();
        assert_eq!(via_pem.verify(&ed_old.sign(&claims(200)), 150), Ok(claims(200)));
    }

    #[test]
    fn tokens_without_a_key_id_are_tried_against_their_algorithm() {
        // As the hand-written HS256 signer before key ids made them: header {"alg":"HS256","typ":"JWT"}.
        use hmac::{Hmac, Mac};
        let h = B64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let p = B64.encode(serde_json::to_vec(&claims(200)).unwrap());
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("{h}.{p}").as_bytes());
        let t = format!("{h}.{p}.{}", B64.encode(mac.finalize().into_bytes()));
        assert_eq!(JwtKeys::new(b"secret".to_vec()).verify(&t, 150), Ok(claims(200)));
    }
}
