//! The embedded storage adapter: SQLite through sqlx, in WAL mode. The reference implementation
//! of the `sai-storage` traits.
//!
//! Writes go through a pool of exactly one connection, so SQLite's single-writer rule never
//! surfaces as `SQLITE_BUSY` inside the process and the seq read-modify-write in [`append`] is
//! serialized; reads use a separate pool of `READERS` connections that WAL lets run beside the
//! writer. `synchronous = NORMAL` in WAL mode: a commit survives a crash of the process; a power
//! loss may drop the last commits before a checkpoint (documented in the README).
//!
//! [`append`]: sai_storage::MessageStore::append

use async_trait::async_trait;
use sai_storage::{
    Appended, ConversationHead, MessageStore, NewMessage, StoreError, StoreResult, StoredMessage, User, UserStore,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;
use std::path::Path;
use std::time::Duration;

/// Reader connections.
const READERS: u32 = 4;

/// Schema version stored in `PRAGMA user_version` (the literal in `open` must match).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS users (
        user_id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        nickname TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS conversations (
        conversation_id TEXT PRIMARY KEY,
        chat_type INTEGER NOT NULL,
        max_seq INTEGER NOT NULL,
        updated_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS conversation_members (
        user_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        PRIMARY KEY (user_id, conversation_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS messages (
        conversation_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        chat_type INTEGER NOT NULL,
        send_id TEXT NOT NULL,
        recv_id TEXT NOT NULL,
        client_msg_id TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        send_time INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (conversation_id, seq)) WITHOUT ROWID",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency ON messages (send_id, client_msg_id)",
];

/// SQLite-backed [`UserStore`] + [`MessageStore`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies the schema.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await
            .map_err(unavailable)?;
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&writer).await.map_err(unavailable)?;
        }
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&writer)
            .await
            .map_err(unavailable)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this binary's {SCHEMA_VERSION}"
            )));
        }
        sqlx::query("PRAGMA user_version = 1")
            .execute(&writer)
            .await
            .map_err(unavailable)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(opts.read_only(true))
            .await
            .map_err(unavailable)?;
        Ok(Self { writer, reader })
    }

    /// Closes both pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn write_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_string()),
        _ => unavailable(e),
    }
}

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn user_from_row(r: &SqliteRow) -> StoreResult<User> {
    Ok(User {
        user_id: r.try_get("user_id").map_err(corrupt)?,
        username: r.try_get("username").map_err(corrupt)?,
        nickname: r.try_get("nickname").map_err(corrupt)?,
        password_hash: r.try_get("password_hash").map_err(corrupt)?,
        created_at: r.try_get("created_at").map_err(corrupt)?,
    })
}

fn message_from_row(r: &SqliteRow) -> StoreResult<StoredMessage> {
    let seq: i64 = r.try_get("seq").map_err(corrupt)?;
    let chat_type: i64 = r.try_get("chat_type").map_err(corrupt)?;
    Ok(StoredMessage {
        conversation_id: r.try_get("conversation_id").map_err(corrupt)?,
        chat_type: u8::try_from(chat_type).map_err(|_| StoreError::Corrupt(format!("chat_type {chat_type}")))?,
        seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("seq {seq}")))?,
        send_id: r.try_get("send_id").map_err(corrupt)?,
        recv_id: r.try_get("recv_id").map_err(corrupt)?,
        client_msg_id: r.try_get("client_msg_id").map_err(corrupt)?,
        msg_id: r.try_get("msg_id").map_err(corrupt)?,
        send_time: r.try_get("send_time").map_err(corrupt)?,
        body: r.try_get("body").map_err(corrupt)?,
    })
}

/// The message columns, as a literal so queries stay `&'static str` (sqlx refuses dynamic SQL).
macro_rules! message_columns {
    () => {
        "conversation_id, seq, chat_type, send_id, recv_id, client_msg_id, msg_id, send_time, body"
    };
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_user(&self, u: &User) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO users (user_id, username, nickname, password_hash, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&u.user_id)
        .bind(&u.username)
        .bind(&u.nickname)
        .bind(&u.password_hash)
        .bind(u.created_at)
        .execute(&self.writer)
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        sqlx::query("SELECT * FROM users WHERE username = ?")
            .bind(username)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(user_from_row)
            .transpose()
    }

    async fn user_by_id(&self, user_id: &str) -> StoreResult<Option<User>> {
        sqlx::query("SELECT * FROM users WHERE user_id = ?")
            .bind(user_id)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(user_from_row)
            .transpose()
    }
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn append(&self, m: NewMessage) -> StoreResult<Appended> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let existing = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE send_id = ? AND client_msg_id = ?"
        ))
        .bind(&m.send_id)
        .bind(&m.client_msg_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        if let Some(row) = existing {
            return Ok(Appended::Duplicate(message_from_row(&row)?));
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO conversations (conversation_id, chat_type, max_seq, updated_at) VALUES (?, ?, 1, ?)
             ON CONFLICT (conversation_id) DO UPDATE SET max_seq = max_seq + 1, updated_at = excluded.updated_at
             RETURNING max_seq",
        )
        .bind(&m.conversation_id)
        .bind(i64::from(m.chat_type))
        .bind(m.send_time)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        if seq == 1 {
            for member in &m.members {
                sqlx::query("INSERT OR IGNORE INTO conversation_members (user_id, conversation_id) VALUES (?, ?)")
                    .bind(member)
                    .bind(&m.conversation_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
        }
        sqlx::query(concat!(
            "INSERT INTO messages (",
            message_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&m.conversation_id)
        .bind(seq)
        .bind(i64::from(m.chat_type))
        .bind(&m.send_id)
        .bind(&m.recv_id)
        .bind(&m.client_msg_id)
        .bind(&m.msg_id)
        .bind(m.send_time)
        .bind(&m.body)
        .execute(&mut *tx)
        .await
        .map_err(write_error)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Appended::New(StoredMessage {
            conversation_id: m.conversation_id,
            chat_type: m.chat_type,
            seq: seq as u64,
            send_id: m.send_id,
            recv_id: m.recv_id,
            client_msg_id: m.client_msg_id,
            msg_id: m.msg_id,
            send_time: m.send_time,
            body: m.body,
        }))
    }

    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
        ))
        .bind(conversation_id)
        .bind(seq_param(after_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn messages_before(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
        ))
        .bind(conversation_id)
        .bind(before_seq.map(seq_param).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn conversations_of(&self, user_id: &str) -> StoreResult<Vec<ConversationHead>> {
        let rows = sqlx::query(
            "SELECT c.conversation_id, c.max_seq FROM conversation_members m
             JOIN conversations c ON c.conversation_id = m.conversation_id
             WHERE m.user_id = ? ORDER BY c.conversation_id",
        )
        .bind(user_id)
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let max_seq: i64 = r.try_get("max_seq").map_err(corrupt)?;
                Ok(ConversationHead {
                    conversation_id: r.try_get("conversation_id").map_err(corrupt)?,
                    max_seq: u64::try_from(max_seq).map_err(|_| StoreError::Corrupt(format!("max_seq {max_seq}")))?,
                })
            })
            .collect()
    }

    async fn is_member(&self, conversation_id: &str, user_id: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM conversation_members WHERE user_id = ? AND conversation_id = ?")
            .bind(user_id)
            .bind(conversation_id)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sai_storage::conformance;
    use std::sync::Arc;

    fn temp_db(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sai-sqlite-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("t.db")
    }

    #[tokio::test]
    async fn conforms_to_the_storage_contract() {
        let s = SqliteStore::open(&temp_db("conf")).await.unwrap();
        conformance::check_users(&s).await;
        conformance::check_messages(&s).await;
        s.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_gapless_seqs_and_survive_reopen() {
        let path = temp_db("race");
        let s = Arc::new(SqliteStore::open(&path).await.unwrap());
        let n = 200u64;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.append(conformance::message("race", "a", "b", &format!("k{i}"))).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap().unwrap());
        }
        conformance::check_concurrent_appends(outcomes, n);
        s.close().await;
        let s = SqliteStore::open(&path).await.unwrap();
        let Appended::New(m) = s.append(conformance::message("race", "a", "b", "after")).await.unwrap() else {
            panic!("fresh key reported duplicate");
        };
        assert_eq!(m.seq, n + 1, "seq continues after reopening");
    }
}
