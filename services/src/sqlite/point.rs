//! Indexed point reads answered on the caller's thread with a pooled rusqlite connection: the
//! account by id (on the path of every WebSocket upgrade the account cache misses) and by name
//! (login).
//!
//! Through sqlx each such read is two thread hand-offs (to its SQLite worker and back to the
//! runtime): at a ramp of 10,000 upgrades/s of users not in the account cache, sqlx's worker and
//! tokio took 49 % of the server's CPU, most of it in context switches (`perf`, results/million).
//! A primary-key lookup in the page cache takes a few microseconds, less than the hand-offs, so
//! it runs in place: the caller (a gateway shard polling the pipeline's future) blocks for that
//! long and no other thread is involved.
//!
//! # Numbers
//! At most [`MAX_IDLE`] connections are kept (one per thread that reads at once; more are opened
//! when needed and closed after), each with SQLite's default 2 MiB page cache. Read-only: every
//! write still goes through the writer pool.

use rusqlite::{Connection, OpenFlags};
use sai_storage::{StoreError, StoreResult};
use std::path::{Path, PathBuf};

/// Connections kept between reads.
const MAX_IDLE: usize = 8;

/// The pool.
pub(crate) struct PointReads {
    path: PathBuf,
    idle: parking_lot::Mutex<Vec<Connection>>,
}

impl PointReads {
    /// Reads from the database at `path` (opened lazily, read-only).
    pub(crate) fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            idle: parking_lot::Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> StoreResult<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(unavailable)?;
        conn.set_prepared_statement_cache_capacity(16);
        Ok(conn)
    }

    /// Runs `f` with a connection of the pool.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> StoreResult<T> {
        let pooled = self.idle.lock().pop();
        let conn = match pooled {
            Some(c) => c,
            None => self.open()?,
        };
        let out = f(&conn).map_err(unavailable);
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        out
    }
}

impl PointReads {
    /// Closes the idle connections (before the pools close, so the last connection to close is
    /// one that may checkpoint the WAL).
    pub(crate) fn close(&self) {
        self.idle.lock().clear();
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}
