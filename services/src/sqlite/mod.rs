//! The embedded storage adapter: SQLite in WAL mode. The reference implementation of the
//! `sai-storage` traits.
//!
//! - Appends and received positions (the hot writes) go to the message writer ([`writer`]): one
//!   thread that appends them in batches to a log of checksummed records ([`log`]), seqs
//!   assigned in memory from each conversation's durable high-water mark, and answers once a
//!   batch is written. The merger ([`merge`]) moves the logged records into the tables in large
//!   batches (about once a second under load). Sync and history (`conversations_of`,
//!   `messages_after`, `messages_before`) read the tables and the unmerged messages in memory
//!   together; every other read of message state first waits until what was logged before it
//!   within its scope (its conversation, or the user's conversations) is merged
//!   ([`SqliteStore::settled`]). Either way readers see every acknowledged write.
//! - Every other write (users, friends, groups, read positions) goes through a sqlx pool of
//!   exactly one connection; SQLite serializes it with the writer (`busy_timeout` 5 s on both).
//! - Reads use a sqlx pool of `READERS` connections that WAL lets run beside the writers.
//! - WAL checkpoints: a checkpointer thread copies committed pages back every 100 ms without
//!   blocking anyone; the merger's own passive checkpoint at 16 MiB of WAL finds little left and
//!   lets the WAL rewind (the measurements behind this are in [`writer`]).
//!
//! `synchronous = NORMAL` in WAL mode, and log writes without `fsync`: an acknowledged write
//! survives a crash of the process; a power loss may drop the last ones (documented in the
//! README). The in-memory seqs assume this process is the database's only appender; a stale one
//! cannot duplicate a seq (the `(conversation_id, seq)` key refuses the merge, which is retried
//! and logged as an error).

use async_trait::async_trait;
use sai_storage::{
    Appended, BitmapWrite, ConversationHead, ConversationSummary, MemberState, MessageStore, NewMessage,
    ReadBitmapCodec, ReadMark, ReadRecord, StoreError, StoreResult, StoredMessage, User, UserStore,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The message columns, as a literal so queries stay `&'static str` (sqlx refuses dynamic SQL).
macro_rules! message_columns {
    () => {
        "conversation_id, seq, chat_type, send_id, recv_id, client_msg_id, msg_id, send_time, body"
    };
}

/// Reader connections.
const READERS: u32 = 4;

/// Attempts of a sync-path read to see the tables and the unmerged tails with no merge committed
/// in between (one a second at most under load), before it waits for the merge instead.
const OVERLAY_TRIES: usize = 4;

mod keys;
mod log;
mod merge;
mod point;
mod social;
mod writer;

/// Schema version stored in `PRAGMA user_version`: the number of [`MIGRATIONS`] applied.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Each step moves the schema one version up; a database at version `v` gets steps `v..`.
/// Steps are only ever appended, never edited.
const MIGRATIONS: &[&[&str]] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

/// Users, conversations, messages.
const SCHEMA_V1: &[&str] = &[
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

/// Read state, friends, groups, read receipts.
const SCHEMA_V2: &[&str] = &[
    "ALTER TABLE conversation_members ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE conversation_members ADD COLUMN received_seq INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE conversation_members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX conversation_members_by_conversation ON conversation_members (conversation_id)",
    "CREATE TABLE friend_requests (
        request_id TEXT PRIMARY KEY,
        from_user TEXT NOT NULL,
        to_user TEXT NOT NULL,
        message TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL)",
    "CREATE INDEX friend_requests_incoming ON friend_requests (to_user, status, created_at)",
    "CREATE UNIQUE INDEX friend_requests_one_pending ON friend_requests
        (min(from_user, to_user), max(from_user, to_user)) WHERE status = 'pending'",
    "CREATE TABLE friends (
        user_id TEXT NOT NULL,
        friend_id TEXT NOT NULL,
        since INTEGER NOT NULL,
        PRIMARY KEY (user_id, friend_id)) WITHOUT ROWID",
    "CREATE TABLE chat_groups (
        group_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        owner_id TEXT NOT NULL,
        member_count INTEGER NOT NULL,
        next_slot INTEGER NOT NULL,
        created_at INTEGER NOT NULL)",
    "CREATE TABLE group_members (
        group_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        slot INTEGER NOT NULL,
        joined_at INTEGER NOT NULL,
        PRIMARY KEY (group_id, user_id)) WITHOUT ROWID",
    "CREATE INDEX group_members_by_user ON group_members (user_id)",
    "CREATE TABLE read_records (
        conversation_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        format INTEGER NOT NULL,
        bitmap BLOB NOT NULL,
        PRIMARY KEY (conversation_id, seq)) WITHOUT ROWID",
];

/// Token revocation and disabled accounts.
const SCHEMA_V3: &[&str] = &[
    "ALTER TABLE users ADD COLUMN token_epoch INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0",
];

/// The message writer thread (joined on close) and the checkpointer's stop signal.
type Threads = (std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>);

/// SQLite-backed [`UserStore`] + [`MessageStore`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Queue of the message writer thread.
    messages: mpsc::Sender<writer::Job>,
    /// What the writer does (metrics).
    write_stats: Arc<sai_storage::WriteStats>,
    /// Logged records not merged yet: the read barrier.
    log: Arc<merge::Shared>,
    /// Taken by [`Self::close`].
    threads: Arc<Mutex<Option<Threads>>>,
    /// Point reads on the upgrade path, on the caller's thread.
    points: Arc<point::PointReads>,
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
        migrate(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(opts.read_only(true))
            .await
            .map_err(unavailable)?;
        let started = writer::start(path)?;
        let checkpointer = writer::start_checkpointer(path)?;
        Ok(Self {
            writer,
            reader,
            messages: started.jobs,
            write_stats: started.stats,
            log: started.shared,
            threads: Arc::new(Mutex::new(Some((started.thread, checkpointer)))),
            points: Arc::new(point::PointReads::new(path)),
        })
    }

    /// Lets the message writer finish what is queued and the merger merge everything, stops them
    /// and the checkpointer, then closes the pools (the last connection to close checkpoints the WAL). Later writes are
    /// refused.
    pub async fn close(&self) {
        let threads = self.threads.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some((thread, checkpointer)) = threads {
            let _ = checkpointer.send(());
            let _ = self.messages.send(writer::Job::Stop).await;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.points.close();
        self.reader.close().await;
        self.writer.close().await;
    }

    /// The user whose `column` (`user_id` or `username`, both unique) is `value`: a point read
    /// in place (see `point`), not a round trip through sqlx's worker.
    fn user_where(&self, column: &'static str, value: &str) -> StoreResult<Option<User>> {
        use rusqlite::OptionalExtension;
        let sql = format!(
            "SELECT user_id, username, nickname, password_hash, created_at, token_epoch, disabled \
             FROM users WHERE {column} = ?"
        );
        let row = self.points.with(|c| {
            c.prepare_cached(&sql)?
                .query_row([value], |r| {
                    let user = User {
                        user_id: r.get(0)?,
                        username: r.get(1)?,
                        nickname: r.get(2)?,
                        password_hash: r.get(3)?,
                        created_at: r.get(4)?,
                        token_epoch: 0,
                        disabled: r.get(6)?,
                    };
                    Ok((user, r.get::<_, i64>(5)?))
                })
                .optional()
        })?;
        row.map(|(user, e)| {
            Ok(User {
                token_epoch: epoch(e)?,
                ..user
            })
        })
        .transpose()
    }

    /// The read barrier: returns once every write acknowledged before the call within `scope` is
    /// in the tables (at once when none waits for a merge; else after the merge this starts, a
    /// few milliseconds to a few hundred under load).
    async fn settled(&self, scope: merge::Scope<'_>) -> StoreResult<()> {
        match self.log.settle(scope)? {
            None => Ok(()),
            Some(rx) => rx
                .await
                .map_err(|_| StoreError::Unavailable("the message merger stopped".into()))?,
        }
    }

    /// [`Self::settled`] for a read of `user_id`'s conversations.
    async fn settled_for_user(&self, user_id: &str) -> StoreResult<()> {
        let conversations: Vec<String> =
            sqlx::query_scalar("SELECT conversation_id FROM conversation_members WHERE user_id = ?")
                .bind(user_id)
                .fetch_all(&self.reader)
                .await
                .map_err(unavailable)?;
        self.settled(merge::Scope::User {
            user: user_id,
            conversations: &conversations,
        })
        .await
    }

    /// A page of a conversation's messages with `after_seq < seq < before_seq` (no upper bound
    /// when `None`), by seq (newest first when `newest_first`), at most `limit`: the tables and
    /// the unmerged tail together, with no wait for a merge (sync and history).
    async fn page(
        &self,
        conversation_id: &str,
        after_seq: u64,
        before_seq: Option<u64>,
        limit: u32,
        newest_first: bool,
    ) -> StoreResult<Vec<StoredMessage>> {
        let seqs = (
            Bound::Excluded(after_seq),
            before_seq.map_or(Bound::Unbounded, Bound::Excluded),
        );
        for _ in 0..OVERLAY_TRIES {
            let merges = self.log.merges_done();
            let stored = self
                .stored_page(conversation_id, after_seq, before_seq, limit, newest_first)
                .await?;
            let (tail, merges_after) = self.log.tail(conversation_id, seqs);
            if merges_after != merges {
                // A merge moved records out of the tail after the table was read: read again.
                continue;
            }
            return Ok(overlay(stored, tail, limit, newest_first));
        }
        self.settled(merge::Scope::Conversation(conversation_id)).await?;
        self.stored_page(conversation_id, after_seq, before_seq, limit, newest_first)
            .await
    }

    /// [`Self::page`] from the tables alone.
    async fn stored_page(
        &self,
        conversation_id: &str,
        after_seq: u64,
        before_seq: Option<u64>,
        limit: u32,
        newest_first: bool,
    ) -> StoreResult<Vec<StoredMessage>> {
        let sql = if newest_first {
            concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE conversation_id = ? AND seq > ? AND seq < ? ORDER BY seq DESC LIMIT ?"
            )
        } else {
            concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE conversation_id = ? AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?"
            )
        };
        let rows = sqlx::query(sql)
            .bind(conversation_id)
            .bind(seq_param(after_seq))
            .bind(before_seq.map(seq_param).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        rows.iter().map(message_from_row).collect()
    }

    /// Heads of the tables alone, by conversation id.
    async fn stored_heads(&self, user_id: &str) -> StoreResult<Vec<ConversationHead>> {
        let rows = sqlx::query(
            "SELECT c.conversation_id, c.max_seq, m.joined_seq FROM conversation_members m
             JOIN conversations c ON c.conversation_id = m.conversation_id
             WHERE m.user_id = ? ORDER BY c.conversation_id",
        )
        .bind(user_id)
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(ConversationHead {
                    conversation_id: r.try_get("conversation_id").map_err(corrupt)?,
                    max_seq: get_u64(r, "max_seq")?,
                    joined_seq: get_u64(r, "joined_seq")?,
                })
            })
            .collect()
    }

    /// Hands a job to the message writer and waits for its answer.
    async fn to_writer<T>(&self, job: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> writer::Job) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        self.messages
            .send(job(tx))
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the message writer stopped".into()))?
    }
}

/// Brings the schema to [`SCHEMA_VERSION`], one transaction per step.
async fn migrate(writer: &SqlitePool) -> StoreResult<()> {
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(writer)
        .await
        .map_err(unavailable)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this binary's {SCHEMA_VERSION}"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let mut tx = writer.begin().await.map_err(unavailable)?;
        for stmt in *step {
            sqlx::query(*stmt).execute(&mut *tx).await.map_err(unavailable)?;
        }
        // PRAGMA takes no bind parameters; the value is a small integer we produce.
        let set = sqlx::AssertSqlSafe(format!("PRAGMA user_version = {}", i + 1));
        sqlx::query(set).execute(&mut *tx).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
    }
    Ok(())
}

/// The tables' page of a conversation's messages and the unmerged tail in the same seq range,
/// as one page: by seq (newest first when `newest_first`), each seq once (a message can be in
/// both while its merge is committed but not yet counted), at most `limit`. The table's page is
/// the `limit` nearest seqs it holds and every tail seq it lacks lies beyond them, so the union's
/// first `limit` are the answer.
fn overlay(
    mut page: Vec<StoredMessage>,
    tail: Vec<StoredMessage>,
    limit: u32,
    newest_first: bool,
) -> Vec<StoredMessage> {
    page.extend(tail);
    if newest_first {
        page.sort_by_key(|m| std::cmp::Reverse(m.seq));
    } else {
        page.sort_by_key(|m| m.seq);
    }
    page.dedup_by_key(|m| m.seq);
    page.truncate(limit as usize);
    page
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

/// Runs an `UPDATE users ... RETURNING token_epoch`: the new epoch, `None` for no such user.
async fn new_epoch<'q>(
    q: sqlx::query::QueryScalar<'q, sqlx::Sqlite, i64, sqlx::sqlite::SqliteArguments>,
    writer: &SqlitePool,
) -> StoreResult<Option<u32>> {
    q.fetch_optional(writer)
        .await
        .map_err(unavailable)?
        .map(epoch)
        .transpose()
}

fn epoch(v: i64) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("token_epoch = {v}")))
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

/// The mark of a receipt that moved `user`'s read position from `old` to `new`.
fn read_mark(conversation_id: &str, user: &str, slot: u32, old: u64, new: u64) -> ReadMark {
    ReadMark {
        conversation_id: conversation_id.into(),
        user_id: user.into(),
        slot,
        after_seq: old,
        up_to_seq: new,
    }
}

/// [`MessageStore::add_readers`] in `tx`: each message's readers are added in one write, in
/// (conversation, seq) order.
async fn add_readers_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    marks: &[ReadMark],
    codec: &dyn ReadBitmapCodec,
) -> StoreResult<u64> {
    let mut readers: BTreeMap<(&str, i64), Vec<u32>> = BTreeMap::new();
    for m in marks.iter().filter(|m| m.up_to_seq > m.after_seq) {
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT seq FROM messages WHERE conversation_id = ? AND seq > ? AND seq <= ? AND send_id != ?",
        )
        .bind(&m.conversation_id)
        .bind(seq_param(m.after_seq))
        .bind(seq_param(m.up_to_seq))
        .bind(&m.user_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(unavailable)?;
        for seq in seqs {
            readers.entry((&m.conversation_id, seq)).or_default().push(m.slot);
        }
    }
    let mut changed = 0;
    for ((conversation_id, seq), slots) in readers {
        let existing = sqlx::query("SELECT format, bitmap FROM read_records WHERE conversation_id = ? AND seq = ?")
            .bind(conversation_id)
            .bind(seq)
            .fetch_optional(&mut **tx)
            .await
            .map_err(unavailable)?;
        let existing = existing.as_ref().map(record_from_row).transpose()?;
        let Some(record) = ReadRecord::with_readers(existing, &slots, codec)? else {
            continue;
        };
        sqlx::query(
            "INSERT INTO read_records (conversation_id, seq, format, bitmap) VALUES (?, ?, ?, ?)
             ON CONFLICT (conversation_id, seq) DO UPDATE SET format = excluded.format, bitmap = excluded.bitmap",
        )
        .bind(conversation_id)
        .bind(seq)
        .bind(i64::from(record.format))
        .bind(record.bytes)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
        changed += 1;
    }
    Ok(changed)
}

fn record_from_row(r: &SqliteRow) -> StoreResult<ReadRecord> {
    let format: i64 = r.try_get("format").map_err(corrupt)?;
    Ok(ReadRecord {
        format: u8::try_from(format).map_err(|_| StoreError::Corrupt(format!("bitmap format {format}")))?,
        bytes: r.try_get("bitmap").map_err(corrupt)?,
    })
}

fn get_u64(r: &SqliteRow, col: &str) -> StoreResult<u64> {
    let v: i64 = r.try_get(col).map_err(corrupt)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col} = {v}")))
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
        self.user_where("username", username)
    }

    async fn create_users_bulk(&self, users: &[User]) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let mut inserted = 0;
        for u in users {
            let done = sqlx::query(
                "INSERT OR IGNORE INTO users (user_id, username, nickname, password_hash, created_at)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&u.user_id)
            .bind(&u.username)
            .bind(&u.nickname)
            .bind(&u.password_hash)
            .bind(u.created_at)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            inserted += done.rows_affected();
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(inserted)
    }

    async fn revoke_tokens(&self, user_id: &str) -> StoreResult<Option<u32>> {
        let q = sqlx::query_scalar(
            "UPDATE users SET token_epoch = token_epoch + 1 WHERE user_id = ? RETURNING token_epoch",
        );
        new_epoch(q.bind(user_id), &self.writer).await
    }

    async fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<Option<u32>> {
        let q = sqlx::query_scalar(
            "UPDATE users SET password_hash = ?, token_epoch = token_epoch + 1 WHERE user_id = ? RETURNING token_epoch",
        );
        new_epoch(q.bind(password_hash).bind(user_id), &self.writer).await
    }

    async fn set_disabled(&self, user_id: &str, disabled: bool) -> StoreResult<Option<u32>> {
        let q = sqlx::query_scalar(
            "UPDATE users SET disabled = ?, token_epoch = token_epoch + 1 WHERE user_id = ? RETURNING token_epoch",
        );
        new_epoch(q.bind(disabled).bind(user_id), &self.writer).await
    }

    async fn user_by_id(&self, user_id: &str) -> StoreResult<Option<User>> {
        // On every upgrade of a user the account cache does not hold.
        self.user_where("user_id", user_id)
    }
}

#[async_trait]
impl MessageStore for SqliteStore {
    fn write_stats(&self) -> Option<Arc<sai_storage::WriteStats>> {
        Some(self.write_stats.clone())
    }

    async fn append(&self, m: NewMessage) -> StoreResult<Appended> {
        self.to_writer(|reply| writer::Job::Append(m, reply)).await
    }

    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.page(conversation_id, after_seq, None, limit, false).await
    }

    async fn messages_before(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.page(conversation_id, 0, before_seq, limit, true).await
    }

    async fn conversations_of(&self, user_id: &str) -> StoreResult<Vec<ConversationHead>> {
        // The sync path: the tables' heads raised by the unmerged tails, no wait for a merge.
        for _ in 0..OVERLAY_TRIES {
            let merges = self.log.merges_done();
            let mut heads = self.stored_heads(user_id).await?;
            let ids: Vec<String> = heads.iter().map(|h| h.conversation_id.clone()).collect();
            let (newer, merges_after) = self.log.heads(user_id, &ids);
            if merges_after != merges {
                continue;
            }
            for (conversation_id, seq) in newer {
                match heads.iter_mut().find(|h| h.conversation_id == conversation_id) {
                    Some(h) => h.max_seq = h.max_seq.max(seq),
                    // Joined with a message not merged yet: a private conversation, from its start.
                    None => heads.push(ConversationHead {
                        conversation_id,
                        max_seq: seq,
                        joined_seq: 0,
                    }),
                }
            }
            heads.sort_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
            return Ok(heads);
        }
        self.settled_for_user(user_id).await?;
        self.stored_heads(user_id).await
    }

    async fn is_member(&self, conversation_id: &str, user_id: &str) -> StoreResult<bool> {
        self.settled(merge::Scope::Conversation(conversation_id)).await?;
        let row = sqlx::query("SELECT 1 FROM conversation_members WHERE user_id = ? AND conversation_id = ?")
            .bind(user_id)
            .bind(conversation_id)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }

    async fn message(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<StoredMessage>> {
        self.settled(merge::Scope::Conversation(conversation_id)).await?;
        sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? AND seq = ?"
        ))
        .bind(conversation_id)
        .bind(seq_param(seq))
        .fetch_optional(&self.reader)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(message_from_row)
        .transpose()
    }

    async fn member_states(&self, conversation_id: &str) -> StoreResult<Vec<MemberState>> {
        self.settled(merge::Scope::Conversation(conversation_id)).await?;
        let rows = sqlx::query(
            "SELECT user_id, read_seq, received_seq, joined_seq FROM conversation_members
             WHERE conversation_id = ? ORDER BY user_id",
        )
        .bind(conversation_id)
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(MemberState {
                    user_id: r.try_get("user_id").map_err(corrupt)?,
                    read_seq: get_u64(r, "read_seq")?,
                    received_seq: get_u64(r, "received_seq")?,
                    joined_seq: get_u64(r, "joined_seq")?,
                })
            })
            .collect()
    }

    async fn conversation_summaries(
        &self,
        user_id: &str,
        offset: u32,
        limit: u32,
    ) -> StoreResult<Vec<ConversationSummary>> {
        self.settled_for_user(user_id).await?;
        let rows = sqlx::query(
            "SELECT c.conversation_id, c.chat_type, c.max_seq, c.updated_at, m.read_seq, m.joined_seq,
                (SELECT COUNT(*) FROM messages x WHERE x.conversation_id = c.conversation_id
                   AND x.seq > max(m.read_seq, m.joined_seq) AND x.send_id != m.user_id) AS unread
             FROM conversation_members m JOIN conversations c ON c.conversation_id = m.conversation_id
             WHERE m.user_id = ? ORDER BY c.updated_at DESC, c.conversation_id LIMIT ? OFFSET ?",
        )
        .bind(user_id)
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let conversation_id: String = r.try_get("conversation_id").map_err(corrupt)?;
            let max_seq = get_u64(r, "max_seq")?;
            let joined_seq = get_u64(r, "joined_seq")?;
            let last_message = if max_seq > joined_seq {
                self.message(&conversation_id, max_seq).await?
            } else {
                None
            };
            let chat_type: i64 = r.try_get("chat_type").map_err(corrupt)?;
            out.push(ConversationSummary {
                conversation_id,
                chat_type: u8::try_from(chat_type)
                    .map_err(|_| StoreError::Corrupt(format!("chat_type {chat_type}")))?,
                max_seq,
                read_seq: get_u64(r, "read_seq")?.max(joined_seq),
                unread: get_u64(r, "unread")?,
                updated_at: r.try_get("updated_at").map_err(corrupt)?,
                last_message,
            });
        }
        Ok(out)
    }

    async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        read_seq: u64,
        reader_slot: Option<(u32, BitmapWrite<'_>)>,
    ) -> StoreResult<Option<(u64, u64)>> {
        self.settled(merge::Scope::Conversation(conversation_id)).await?;
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let row = sqlx::query(
            "SELECT m.read_seq, m.joined_seq, c.max_seq FROM conversation_members m
             JOIN conversations c ON c.conversation_id = m.conversation_id
             WHERE m.conversation_id = ? AND m.user_id = ?",
        )
        .bind(conversation_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let old = get_u64(&row, "read_seq")?.max(get_u64(&row, "joined_seq")?);
        let new = read_seq.min(get_u64(&row, "max_seq")?).max(old);
        if new == old {
            return Ok(Some((old, old)));
        }
        sqlx::query("UPDATE conversation_members SET read_seq = ? WHERE conversation_id = ? AND user_id = ?")
            .bind(seq_param(new))
            .bind(conversation_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        match reader_slot {
            Some((slot, BitmapWrite::Now(codec))) => {
                let mark = read_mark(conversation_id, user_id, slot, old, new);
                add_readers_in(&mut tx, std::slice::from_ref(&mark), codec).await?;
            }
            Some((slot, BitmapWrite::Handed(queue))) => {
                // The writer is held until the queue has the mark: SQLite stores are not
                // wired to a task process, whose queue is a broker away.
                let mark = read_mark(conversation_id, user_id, slot, old, new);
                queue.hand(mark).await.map_err(StoreError::Unavailable)?;
            }
            None => {}
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Some((old, new)))
    }

    async fn add_readers(&self, marks: &[ReadMark], codec: &dyn ReadBitmapCodec) -> StoreResult<u64> {
        let conversations: BTreeSet<&str> = marks.iter().map(|m| m.conversation_id.as_str()).collect();
        for c in conversations {
            self.settled(merge::Scope::Conversation(c)).await?;
        }
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let changed = add_readers_in(&mut tx, marks, codec).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(changed)
    }

    async fn mark_received(&self, conversation_id: &str, user_id: &str, seq: u64) -> StoreResult<()> {
        self.to_writer(|done| writer::Job::Received {
            conversation_id: conversation_id.to_string(),
            user_id: user_id.to_string(),
            seq,
            done,
        })
        .await
    }

    async fn read_record(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<ReadRecord>> {
        sqlx::query("SELECT format, bitmap FROM read_records WHERE conversation_id = ? AND seq = ?")
            .bind(conversation_id)
            .bind(seq_param(seq))
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(record_from_row)
            .transpose()
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
        conformance::check_social(&s).await;
        conformance::check_read_state(&s).await;
        conformance::check_handed_read_marks(&s).await;
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

    /// What a kill -9 leaves: the tables without the last acknowledged writes, which sit in log
    /// segments (the newest ending in a torn record). Opening merges them, once.
    #[tokio::test]
    async fn a_restart_merges_what_the_log_holds_and_drops_a_torn_tail() {
        let path = temp_db("replay");
        let s = SqliteStore::open(&path).await.unwrap();
        let Appended::New(first) = s.append(conformance::message("c1", "a", "b", "k1")).await.unwrap() else {
            panic!("fresh key reported duplicate");
        };
        s.close().await;
        let dir = log::dir_of(&path);
        assert!(
            log::segments(&dir).unwrap().is_empty(),
            "a clean close merges everything"
        );
        let logged = |seq: u64, key: &str, members: &[&str]| log::Record::Message {
            msg: StoredMessage {
                seq,
                client_msg_id: key.into(),
                msg_id: format!("id-{key}"),
                ..first.clone()
            },
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        let mut older = Vec::new();
        logged(2, "k2", &[]).encode(&mut older);
        log::Record::Received {
            conversation_id: "c1".into(),
            user_id: "b".into(),
            seq: 2,
        }
        .encode(&mut older);
        let mut newest = Vec::new();
        logged(3, "k3", &[]).encode(&mut newest);
        let whole = newest.len();
        logged(4, "k4", &[]).encode(&mut newest);
        newest.truncate(whole + 5);
        std::fs::write(log::segment_path(&dir, 7), &older).unwrap();
        std::fs::write(log::segment_path(&dir, 8), &newest).unwrap();

        for round in 0..2 {
            let s = SqliteStore::open(&path).await.unwrap();
            let seqs: Vec<u64> = s
                .messages_after("c1", 0, 10)
                .await
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect();
            assert_eq!(seqs, vec![1, 2, 3], "round {round}: replayed up to the torn record");
            let states = s.member_states("c1").await.unwrap();
            assert!(states.iter().any(|m| m.user_id == "b" && m.received_seq == 2));
            let again = s.append(conformance::message("c1", "a", "b", "k3")).await.unwrap();
            assert!(
                matches!(again, Appended::Duplicate(m) if m.seq == 3),
                "a replayed key stays a duplicate"
            );
            s.close().await;
            assert!(log::segments(&dir).unwrap().is_empty());
            // A crash between a merge's commit and the segment's removal: the same records again.
            std::fs::write(log::segment_path(&dir, 9), &older).unwrap();
        }
        let s = SqliteStore::open(&path).await.unwrap();
        let Appended::New(next) = s.append(conformance::message("c1", "a", "b", "k5")).await.unwrap() else {
            panic!("fresh key reported duplicate");
        };
        assert_eq!(
            next.seq, 4,
            "seqs continue after the replayed ones, never over the torn one"
        );
        s.close().await;
    }

    /// A page of the tables and the tail around a merge that was committed but not yet counted.
    #[test]
    fn a_page_joins_the_tables_and_the_tail_each_seq_once() {
        let m = |seq: u64| StoredMessage {
            conversation_id: "c".into(),
            chat_type: 2,
            seq,
            send_id: "a".into(),
            recv_id: "b".into(),
            client_msg_id: format!("k{seq}"),
            msg_id: format!("m{seq}"),
            send_time: 0,
            body: "{}".into(),
        };
        let seqs = |v: Vec<StoredMessage>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        let asc = overlay(vec![m(4), m(5), m(6)], vec![m(6), m(7), m(8)], 4, false);
        assert_eq!(seqs(asc), vec![4, 5, 6, 7]);
        let desc = overlay(vec![m(6), m(5)], vec![m(6), m(7), m(8)], 3, true);
        assert_eq!(seqs(desc), vec![8, 7, 6]);
        assert_eq!(seqs(overlay(Vec::new(), Vec::new(), 3, true)), Vec::<u64>::new());
    }

    /// A segment damaged before its end is not the tail of a crashed write: refuse to start
    /// rather than drop what follows it.
    #[tokio::test]
    async fn a_segment_damaged_in_the_middle_is_refused() {
        let path = temp_db("damaged");
        SqliteStore::open(&path).await.unwrap().close().await;
        let dir = log::dir_of(&path);
        let mut bytes = Vec::new();
        let rec = log::Record::Received {
            conversation_id: "c".into(),
            user_id: "u".into(),
            seq: 1,
        };
        rec.encode(&mut bytes);
        bytes[9] ^= 1;
        std::fs::write(log::segment_path(&dir, 1), &bytes).unwrap();
        std::fs::write(log::segment_path(&dir, 2), b"").unwrap();
        assert!(matches!(SqliteStore::open(&path).await, Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn reads_see_every_acknowledged_write_before_its_merge() {
        let s = SqliteStore::open(&temp_db("settle")).await.unwrap();
        for i in 0..50 {
            s.append(conformance::message("c", "a", "b", &format!("k{i}")))
                .await
                .unwrap();
            // Read at once, long before the merge timer.
            let heads = s.conversations_of("b").await.unwrap();
            assert_eq!(
                heads.iter().find(|h| h.conversation_id == "c").map(|h| h.max_seq),
                Some(i + 1)
            );
            let from = i.saturating_sub(3);
            let seqs: Vec<u64> = s
                .messages_after("c", from, 10)
                .await
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect();
            assert_eq!(seqs, (from + 1..=i + 1).collect::<Vec<_>>());
            assert_eq!(s.messages_before("c", None, 1).await.unwrap()[0].seq, i + 1);
            let older: Vec<u64> = s
                .messages_before("c", Some(i + 1), 2)
                .await
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect();
            assert_eq!(
                older,
                (i.saturating_sub(1)..=i).rev().filter(|&q| q > 0).collect::<Vec<_>>()
            );
        }
        s.close().await;
    }
}
