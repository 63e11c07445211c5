//! A gateway's own token check: with EdDSA tokens a gateway holds the public keys
//! ([`Verifier`]) and refuses a forged, malformed or expired token at the upgrade, before any
//! call to the services. A token that verifies still goes to the pipeline's
//! [`Ws2Ms::authenticate`], which alone knows whether its account exists, is enabled and has not
//! revoked it.

use crate::flow::{BoxFuture, Refusal, Ws2Ms};
use crate::message::{ChatAck, ChatRequest, SyncPage};
use crate::token::Verifier;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Seconds since the Unix epoch, as the process's clock reads them.
pub type UnixSeconds = Arc<dyn Fn() -> i64 + Send + Sync>;

/// [`Ws2Ms`] with tokens verified here first; every other call passes through unchanged.
pub struct EdgeCheck {
    verifier: Verifier,
    now: UnixSeconds,
    inner: Arc<dyn Ws2Ms>,
}

impl EdgeCheck {
    /// Checks tokens with `verifier` at `now()` before handing them to `inner`.
    pub fn new(verifier: Verifier, now: UnixSeconds, inner: Arc<dyn Ws2Ms>) -> Self {
        Self { verifier, now, inner }
    }
}

impl Ws2Ms for EdgeCheck {
    fn authenticate(&self, token: &str) -> BoxFuture<Result<String, Refusal>> {
        let claims = match self.verifier.verify(token, (self.now)()) {
            Ok(c) => c,
            Err(e) => {
                let refusal = Refusal {
                    code: e.code(),
                    message: e.to_string(),
                };
                return Box::pin(std::future::ready(Err(refusal)));
            }
        };
        let checked = self.inner.authenticate(token);
        Box::pin(async move {
            let user = checked.await?;
            // The pipeline verified the same token; a different user would mean the two sides
            // hold different keys for one key id.
            if user != claims.sub {
                return Err(Refusal {
                    code: "invalid_token",
                    message: "the token's user does not match the services' answer".into(),
                });
            }
            Ok(user)
        })
    }

    fn chat(&self, user: &str, chat: ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>> {
        self.inner.chat(user, chat)
    }

    fn sync(&self, user: &str, known: BTreeMap<String, u64>, limit: u32) -> BoxFuture<Result<SyncPage, Refusal>> {
        self.inner.sync(user, known, limit)
    }

    fn mark_read(&self, user: &str, conversation_id: String, read_seq: u64) -> BoxFuture<Result<u64, Refusal>> {
        self.inner.mark_read(user, conversation_id, read_seq)
    }

    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> BoxFuture<()> {
        self.inner.mark_received(user, acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, JwtKeys};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ED1: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOvaE+U7szTB5rJkXv/r/7PqhgDN0YC7VHAjDqVx00DE\n-----END PRIVATE KEY-----\n";
    const ED1_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAyEcxMahsg9u9g+J29m0uBR7mfaWqvJHOyy95k/9ItRc=\n-----END PUBLIC KEY-----\n";

    /// Counts the token checks that reach it and answers with the token's subject.
    #[derive(Default)]
    struct Services {
        asked: AtomicUsize,
    }

    impl Ws2Ms for Services {
        fn authenticate(&self, token: &str) -> BoxFuture<Result<String, Refusal>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let keys = JwtKeys::ed25519(ED1.as_bytes(), ED1_PUB.as_bytes()).map_err(|m| Refusal {
                code: "internal",
                message: m,
            });
            let user = keys.and_then(|k| {
                k.verify(token, 150).map(|c| c.sub).map_err(|e| Refusal {
                    code: e.code(),
                    message: e.to_string(),
                })
            });
            Box::pin(std::future::ready(user))
        }
        fn chat(&self, _: &str, _: ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>> {
            unreachable!("not used")
        }
        fn sync(&self, _: &str, _: BTreeMap<String, u64>, _: u32) -> BoxFuture<Result<SyncPage, Refusal>> {
            unreachable!("not used")
        }
        fn mark_read(&self, _: &str, _: String, _: u64) -> BoxFuture<Result<u64, Refusal>> {
            unreachable!("not used")
        }
        fn mark_received(&self, _: &str, _: Vec<(String, u64)>) -> BoxFuture<()> {
            unreachable!("not used")
        }
    }

    fn block_on<T>(f: BoxFuture<T>) -> T {
        // The futures here are ready at once.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = f;
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("pending"),
        }
    }

    #[test]
    fn bad_tokens_stop_at_the_gateway_and_good_ones_reach_the_services() {
        let services = Arc::new(Services::default());
        let now: UnixSeconds = Arc::new(|| 150);
        let gate = EdgeCheck::new(Verifier::ed25519(ED1_PUB.as_bytes()).unwrap(), now, services.clone());
        let keys = JwtKeys::ed25519(ED1.as_bytes(), ED1_PUB.as_bytes()).unwrap();
        let token = |exp| {
            keys.sign(&Claims {
                sub: "u1".into(),
                iat: 100,
                exp,
                gen: 0,
            })
        };
        assert_eq!(block_on(gate.authenticate(&token(200))), Ok("u1".to_string()));
        assert_eq!(services.asked.load(Ordering::SeqCst), 1);
        let refused = |t: &str| block_on(gate.authenticate(t)).unwrap_err().code;
        assert_eq!(refused(&token(150)), "token_expired");
        let hs = JwtKeys::new(b"a shared secret, not ours".to_vec()).sign(&Claims {
            sub: "u1".into(),
            iat: 100,
            exp: 200,
            gen: 0,
        });
        assert_eq!(refused(&hs), "invalid_token");
        assert_eq!(refused("not.a.token"), "malformed_token");
        assert_eq!(refused(""), "missing_token");
        assert_eq!(
            services.asked.load(Ordering::SeqCst),
            1,
            "no refused token reached the services"
        );
    }
}
