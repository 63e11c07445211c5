//! The embedded default replaced without downtime (`sai-im --take-over`).
//!
//! One process owns a data directory at a time: it holds an exclusive lock on
//! `<data_dir>/sai-im.lock` (which names its pid) for as long as it runs, since its store
//! assigns seqs as the only appender. A second process started on the same data directory
//! fails at once, unless it is started with `--take-over`:
//!
//! 1. it binds the same WebSocket, HTTP and gRPC ports beside the running one (every embedded
//!    listener is `SO_REUSEPORT`) and starts its gateway on a [`Deferred`] pipeline, so new
//!    connections are taken from that moment, their upgrades waiting;
//! 2. it sends SIGTERM to the lock's holder, which drains as on any graceful stop (requests it
//!    had read are answered, clients closed with 1012, its store closed) and exits;
//! 3. it gets the lock, opens the store and the services, and the waiting upgrades and requests
//!    go through; HTTP and gRPC requests queued on its listeners are served.
//!
//! A client of the old process reconnects to the same address and lands on the new one. If the
//! old one does not let go within the deadline, the new one gives up (exit 1): then neither
//! serves, and the operator starts one.

use sai_pipeline::flow::{BoxFuture, Refusal, Ws2Ms};
use sai_pipeline::message::{ChatAck, ChatRequest, SyncPage};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The lock file in a data directory.
const LOCK_FILE: &str = "sai-im.lock";

/// How often a taking-over process tries the lock.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// The data directory's lock, held until dropped (or the process ends).
pub struct DataDirLock {
    _file: File,
}

/// Why the lock was not had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{path} is held by another sai-im (pid {holder}); stop it first, or start this one with --take-over to replace it")]
    Held {
        /// The lock file.
        path: PathBuf,
        /// What the file says.
        holder: String,
    },
    /// The holder did not let go in time.
    #[error("the sai-im holding {path} (pid {holder}) did not stop within {waited:?}")]
    NotReleased {
        /// The lock file.
        path: PathBuf,
        /// What the file says.
        holder: String,
        /// How long this one waited.
        waited: Duration,
    },
    /// The file could not be opened or written.
    #[error("{path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl DataDirLock {
    /// Takes the lock of `dir` (created if missing), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let (mut file, path) = open(dir)?;
        if try_lock(&file) {
            return claim(file, &path);
        }
        Err(LockError::Held {
            holder: holder(&mut file),
            path,
        })
    }

    /// Takes the lock of `dir` from the process that holds it: sends it SIGTERM and waits (at
    /// most `wait`) for it to let go. Without a holder, takes it at once.
    pub async fn take_over(dir: &Path, wait: Duration) -> Result<Self, LockError> {
        let (mut file, path) = open(dir)?;
        if try_lock(&file) {
            tracing::info!(dir = %dir.display(), "nothing to take over: the data directory was free");
            return claim(file, &path);
        }
        let pid = holder(&mut file);
        match pid.parse::<i32>().ok().and_then(rustix::process::Pid::from_raw) {
            Some(p) => {
                tracing::info!(pid = %pid, "taking over: asking the running server to stop");
                if let Err(e) = rustix::process::kill_process(p, rustix::process::Signal::TERM) {
                    tracing::warn!(pid = %pid, error = %e, "could not signal the running server; waiting for it to stop");
                }
            }
            None => tracing::warn!(holder = %pid, "the lock names no pid; waiting for its holder to stop"),
        }
        let start = Instant::now();
        while !try_lock(&file) {
            if start.elapsed() >= wait {
                return Err(LockError::NotReleased {
                    path,
                    holder: pid,
                    waited: wait,
                });
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
        tracing::info!(
            pid = %pid,
            waited_ms = start.elapsed().as_millis() as u64,
            "took over the data directory"
        );
        claim(file, &path)
    }
}

fn open(dir: &Path) -> Result<(File, PathBuf), LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    Ok((file, path))
}

fn try_lock(file: &File) -> bool {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
}

/// The pid written in the lock file.
fn holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind().and_then(|()| file.read_to_string(&mut s));
    s.trim().to_string()
}

/// Writes this process's pid into the locked file.
fn claim(mut file: File, path: &Path) -> Result<DataDirLock, LockError> {
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock { _file: file })
}

/// A pipeline that is not there yet: calls wait until [`Deferred::set`] gives it, then go
/// straight to it (no wrapper future once it is set).
#[derive(Clone, Default)]
pub struct Deferred {
    inner: Arc<OnceLock<Arc<dyn Ws2Ms>>>,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Deferred {
    /// Every waiting call and every later one goes to `pipeline`.
    pub fn set(&self, pipeline: Arc<dyn Ws2Ms>) {
        let _ = self.inner.set(pipeline);
        self.ready.send_replace(true);
    }

    fn when_ready<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Ws2Ms) -> BoxFuture<T> + Send + 'static,
    ) -> BoxFuture<T> {
        if let Some(p) = self.inner.get() {
            return f(p.as_ref());
        }
        let (inner, mut ready) = (self.inner.clone(), self.ready.subscribe());
        Box::pin(async move {
            // The sender lives in `self`, which the gateway holds for as long as it runs.
            let _ = ready.wait_for(|r| *r).await;
            match inner.get() {
                Some(p) => f(p.as_ref()).await,
                None => std::future::pending().await,
            }
        })
    }
}

impl Ws2Ms for Deferred {
    fn authenticate(&self, token: &str) -> BoxFuture<Result<String, Refusal>> {
        let token = token.to_string();
        self.when_ready(move |p| p.authenticate(&token))
    }

    fn chat(&self, user: &str, chat: ChatRequest) -> BoxFuture<Result<ChatAck, Refusal>> {
        let user = user.to_string();
        self.when_ready(move |p| p.chat(&user, chat))
    }

    fn sync(&self, user: &str, known: BTreeMap<String, u64>, limit: u32) -> BoxFuture<Result<SyncPage, Refusal>> {
        let user = user.to_string();
        self.when_ready(move |p| p.sync(&user, known, limit))
    }

    fn mark_read(&self, user: &str, conversation_id: String, read_seq: u64) -> BoxFuture<Result<u64, Refusal>> {
        let user = user.to_string();
        self.when_ready(move |p| p.mark_read(&user, conversation_id, read_seq))
    }

    fn mark_received(&self, user: &str, acked: Vec<(String, u64)>) -> BoxFuture<()> {
        let user = user.to_string();
        self.when_ready(move |p| p.mark_received(&user, acked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = std::env::temp_dir().join(format!("sai-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = DataDirLock::acquire(&dir).ok();
        assert!(first.is_some());
        match DataDirLock::acquire(&dir) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, std::process::id().to_string()),
            other => panic!("expected Held, got {:?}", other.err()),
        }
        drop(first);
        assert!(DataDirLock::acquire(&dir).is_ok(), "free again once dropped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
