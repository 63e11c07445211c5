//! The MySQL storage adapter (MySQL 8 / MariaDB 10.5+, InnoDB): users, the social graph,
//! conversations, their messages and read state, behind the same `sai-storage` traits as the
//! embedded SQLite adapter, so the services run on it unchanged. Chosen with
//! `--database-url mysql://...`.
//!
//! - **Several service processes share one database.** Every write that must be atomic is one
//!   InnoDB transaction; an append locks its conversation's row (the seq counter) for the length
//!   of the transaction, so seqs stay gapless and in order whatever process appends, and the
//!   unique key `(send_id, client_msg_id)` makes the idempotency check hold across processes.
//!   A transaction that loses a deadlock or a lock wait is run again from its start
//!   ([`TX_ATTEMPTS`] times).
//! - **Exact comparisons.** Every table uses a binary collation without padding
//!   (`utf8mb4_0900_bin` on MySQL 8, `utf8mb4_nopad_bin` on MariaDB): ids, usernames and
//!   client message ids compare byte for byte as they do in SQLite. A case-insensitive
//!   collation would merge `Alice` with `alice`, and a padding one (`utf8mb4_bin` on MariaDB)
//!   `k2` with `k2 `, taking another message for a duplicate; the conformance suite checks it.
//! - **Schema.** The database is created when it does not exist. [`MIGRATIONS`] are embedded
//!   and applied at start under a named lock
//!   (`GET_LOCK`), so processes starting together migrate once; `sai-im admin migrate` applies
//!   them alone. The version lives in the table `sai_schema`.
//! - **Pool.** [`POOL_SIZE`] connections by default (`?pool=N` in the URL sets it); a call
//!   waits at most [`ACQUIRE_TIMEOUT`] for one, then fails as unavailable.
//! - **Chat log.** Messages and their read bitmaps live in the tables `messages` and
//!   `read_records`, or, with `--chat-log mongodb://...`, in MongoDB ([`mongo`]), while the
//!   seq high-water mark stays in `conversations`. A database keeps the log it started with: a
//!   store refuses to open on the other one.

use async_trait::async_trait;
use sai_storage::{
    Appended, BitmapWrite, ConversationHead, ConversationSummary, MemberState, MessageStore, NewMessage,
    ReadBitmapCodec, ReadMark, ReadRecord, StoreError, StoreResult, StoredMessage, User, UserStore,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::Row;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

mod batch;
pub mod mongo;
mod social;

/// An idempotency key: `(send_id, client_msg_id)`.
type Key = (String, String);

/// Where the messages and their read bitmaps are.
#[derive(Clone)]
enum Log {
    /// The tables `messages` and `read_records` of the same database.
    Tables,
    /// A MongoDB collection.
    Mongo(std::sync::Arc<mongo::MongoLog>),
}

/// Connections in the pool unless the URL says otherwise.
pub const POOL_SIZE: u32 = 16;

/// Longest wait for a pooled connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs of a transaction that keeps losing deadlocks or lock waits before the call fails.
pub const TX_ATTEMPTS: usize = 5;

/// The message columns, as a literal so queries stay `&'static str` (sqlx refuses dynamic SQL).
macro_rules! message_columns {
    () => {
        "conversation_id, seq, chat_type, send_id, recv_id, client_msg_id, msg_id, send_time, body"
    };
}

/// The message columns, for the batch writer's dynamic statements.
const MESSAGE_COLUMNS: &str = message_columns!();

/// Table options of every table.
macro_rules! table {
    ($name:literal, $body:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS ",
            $name,
            " (",
            $body,
            ") ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {collation}"
        )
    };
}

/// Each step moves the schema one version up; a database at version `v` gets steps `v..`.
/// Steps are only ever appended, never edited. MySQL commits DDL as it goes, so every statement
/// of a step is written to be run again if a step was interrupted.
pub const MIGRATIONS: &[&[&str]] = &[SCHEMA_V1];

const SCHEMA_V1: &[&str] = &[
    table!(
        "users",
        "user_id VARCHAR(128) NOT NULL PRIMARY KEY,
         username VARCHAR(128) NOT NULL,
         nickname VARCHAR(255) NOT NULL,
         password_hash VARCHAR(255) NOT NULL,
         created_at BIGINT NOT NULL,
         token_epoch BIGINT NOT NULL DEFAULT 0,
         disabled BOOLEAN NOT NULL DEFAULT FALSE,
         UNIQUE KEY users_username (username)"
    ),
    table!(
        "conversations",
        "conversation_id VARCHAR(255) NOT NULL PRIMARY KEY,
         chat_type SMALLINT NOT NULL,
         max_seq BIGINT NOT NULL,
         updated_at BIGINT NOT NULL"
    ),
    table!(
        "conversation_members",
        "user_id VARCHAR(128) NOT NULL,
         conversation_id VARCHAR(255) NOT NULL,
         read_seq BIGINT NOT NULL DEFAULT 0,
         received_seq BIGINT NOT NULL DEFAULT 0,
         joined_seq BIGINT NOT NULL DEFAULT 0,
         PRIMARY KEY (user_id, conversation_id),
         KEY conversation_members_by_conversation (conversation_id)"
    ),
    table!(
        "messages",
        "conversation_id VARCHAR(255) NOT NULL,
         seq BIGINT NOT NULL,
         chat_type SMALLINT NOT NULL,
         send_id VARCHAR(128) NOT NULL,
         recv_id VARCHAR(255) NOT NULL,
         client_msg_id VARCHAR(128) NOT NULL,
         msg_id VARCHAR(128) NOT NULL,
         send_time BIGINT NOT NULL,
         body MEDIUMTEXT NOT NULL,
         PRIMARY KEY (conversation_id, seq),
         UNIQUE KEY messages_idempotency (send_id, client_msg_id)"
    ),
    // One pending request per pair in either direction: the pair (length-prefixed, so no two
    // pairs spell the same key) exists only while pending, and NULLs do not collide.
    table!(
        "friend_requests",
        "request_id VARCHAR(128) NOT NULL PRIMARY KEY,
         from_user VARCHAR(128) NOT NULL,
         to_user VARCHAR(128) NOT NULL,
         message TEXT NOT NULL,
         status VARCHAR(16) NOT NULL,
         created_at BIGINT NOT NULL,
         pending_pair VARCHAR(270) AS (IF(status = 'pending',
             CONCAT(CHAR_LENGTH(LEAST(from_user, to_user)), ':', LEAST(from_user, to_user),
                    GREATEST(from_user, to_user)), NULL)) STORED,
         UNIQUE KEY friend_requests_one_pending (pending_pair),
         KEY friend_requests_incoming (to_user, status, created_at)"
    ),
    table!(
        "friends",
        "user_id VARCHAR(128) NOT NULL,
         friend_id VARCHAR(128) NOT NULL,
         since BIGINT NOT NULL,
         PRIMARY KEY (user_id, friend_id)"
    ),
    table!(
        "chat_groups",
        "group_id VARCHAR(128) NOT NULL PRIMARY KEY,
         name VARCHAR(255) NOT NULL,
         owner_id VARCHAR(128) NOT NULL,
         member_count BIGINT NOT NULL,
         next_slot BIGINT NOT NULL,
         created_at BIGINT NOT NULL"
    ),
    table!(
        "group_members",
        "group_id VARCHAR(128) NOT NULL,
         user_id VARCHAR(128) NOT NULL,
         role VARCHAR(16) NOT NULL,
         slot BIGINT NOT NULL,
         joined_at BIGINT NOT NULL,
         PRIMARY KEY (group_id, user_id),
         KEY group_members_by_user (user_id)"
    ),
    table!(
        "read_records",
        "conversation_id VARCHAR(255) NOT NULL,
         seq BIGINT NOT NULL,
         format SMALLINT NOT NULL,
         bitmap MEDIUMBLOB NOT NULL,
         PRIMARY KEY (conversation_id, seq)"
    ),
];

/// MySQL-backed [`UserStore`] + [`SocialStore`](sai_storage::SocialStore) + [`MessageStore`].
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    /// The batch writer's queue (see [`batch`]).
    appender: tokio::sync::mpsc::Sender<batch::Job>,
    /// What the batch writer does (metrics).
    write_stats: Arc<sai_storage::WriteStats>,
    log: Log,
}

impl MySqlStore {
    /// Connects to `url` (`mysql://user:password@host:port/database`, optionally `?pool=N`) and
    /// brings the schema up to date.
    pub async fn open(url: &str) -> StoreResult<Self> {
        Self::open_with(url, None).await
    }

    /// As [`Self::open`], with the messages in the MongoDB database `chat_log` names
    /// (`mongodb://host:port/database`) when given.
    pub async fn open_with(url: &str, chat_log: Option<&str>) -> StoreResult<Self> {
        let (url, size) = pool_size(url)?;
        let opts = MySqlConnectOptions::from_str(&url)
            .map_err(|e| StoreError::Unavailable(format!("database URL: {e}")))?
            .charset("utf8mb4");
        let connect = || {
            MySqlPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(opts.clone())
        };
        let pool = match connect().await {
            Err(e) if unknown_database(&e) => {
                create_database(&opts).await?;
                connect().await.map_err(unavailable)?
            }
            other => other.map_err(unavailable)?,
        };
        migrate(&pool).await?;
        let log = match chat_log {
            None => Log::Tables,
            Some(u) => Log::Mongo(std::sync::Arc::new(mongo::MongoLog::open(u).await?)),
        };
        same_log(&pool, &log).await?;
        let write_stats = Arc::new(sai_storage::WriteStats::default());
        let appender = batch::start(pool.clone(), log.clone(), write_stats.clone());
        Ok(Self {
            pool,
            appender,
            log,
            write_stats,
        })
    }

    /// Closes the pool (and the chat log's connections).
    pub async fn close(&self) {
        self.pool.close().await;
        if let Log::Mongo(m) = &self.log {
            m.close().await;
        }
    }

    /// The conversation's committed seq high-water mark (0: none yet). Every read of the
    /// MongoDB log is bounded by it, which hides orphans.
    async fn max_seq(&self, conversation_id: &str) -> StoreResult<u64> {
        let row = sqlx::query("SELECT max_seq FROM conversations WHERE conversation_id = ?")
            .bind(conversation_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map_or(Ok(0), |r| get_u64(r, "max_seq"))
    }

    async fn user_where(&self, sql: &'static str, value: &str) -> StoreResult<Option<User>> {
        sqlx::query(sql)
            .bind(value)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(user_from_row)
            .transpose()
    }

    /// Bumps the token epoch with `update` (bound to `args` then the user id) and reads it back
    /// in the same transaction.
    async fn new_epoch(&self, update: &'static str, user_id: &str, arg: Option<Arg>) -> StoreResult<Option<u32>> {
        let (pool, arg) = (&self.pool, &arg);
        retrying(move || async move {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            let q = sqlx::query(update);
            let q = match arg {
                Some(Arg::Text(s)) => q.bind(s.as_str()),
                Some(Arg::Flag(b)) => q.bind(*b),
                None => q,
            };
            let done = q.bind(user_id).execute(&mut *tx).await.map_err(unavailable)?;
            if done.rows_affected() == 0 {
                return Ok(None);
            }
            let e: i64 = sqlx::query_scalar("SELECT token_epoch FROM users WHERE user_id = ?")
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            epoch(e).map(Some)
        })
        .await
    }
}

/// Runs `attempt` (one transaction, begun and committed by it) again from its start while it
/// loses deadlocks or lock waits, at most [`TX_ATTEMPTS`] times. Dropping an uncommitted
/// transaction rolls it back.
async fn retrying<T, E, F, Fut>(mut attempt: F) -> Result<T, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(e) if tries < TX_ATTEMPTS && e.retryable() => {
                tokio::time::sleep(Duration::from_millis(2 << tries)).await;
            }
            other => return other,
        }
    }
}

/// An error [`retrying`] runs a transaction again for: a lost deadlock or lock wait.
trait Retryable {
    fn retryable(&self) -> bool;
}

impl Retryable for StoreError {
    fn retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(why) if is_retryable(why))
    }
}

impl Retryable for sai_storage::AddMembersError {
    fn retryable(&self) -> bool {
        matches!(self, sai_storage::AddMembersError::Store(e) if e.retryable())
    }
}

/// Refuses a database whose messages are in the other log: messages in the table with the
/// MongoDB log, or seqs without a message in the table without it.
async fn same_log(pool: &MySqlPool, log: &Log) -> StoreResult<()> {
    let any = |sql: &'static str| async move {
        sqlx::query(sql)
            .fetch_optional(pool)
            .await
            .map(|r| r.is_some())
            .map_err(unavailable)
    };
    let in_table = any("SELECT 1 FROM messages LIMIT 1").await?;
    match log {
        Log::Mongo(_) if in_table => Err(StoreError::Unavailable(
            "this database keeps its messages in its own table: start it without --chat-log".into(),
        )),
        Log::Tables if !in_table && any("SELECT 1 FROM conversations WHERE max_seq > 0 LIMIT 1").await? => {
            Err(StoreError::Unavailable(
                "this database's messages are in a MongoDB chat log: start it with --chat-log".into(),
            ))
        }
        _ => Ok(()),
    }
}

/// A value bound before the user id in [`MySqlStore::new_epoch`].
#[derive(Clone)]
enum Arg {
    Text(String),
    Flag(bool),
}

/// MySQL's "Unknown database" (1049).
fn unknown_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number()) == Some(1049))
}

/// Creates the database `opts` names (the server's default character set and collation; the
/// tables name their own), so a fresh server needs no manual step.
async fn create_database(opts: &MySqlConnectOptions) -> StoreResult<()> {
    use sqlx::Connection;
    let name = opts.get_database().unwrap_or_default().to_string();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(StoreError::Unavailable(format!(
            "database {name:?} does not exist, and only names of letters, digits and '_' are created"
        )));
    }
    let mut conn = sqlx::MySqlConnection::connect_with(&opts.clone().database(""))
        .await
        .map_err(unavailable)?;
    // The name is checked above: letters, digits and '_' only.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE IF NOT EXISTS `{name}`")))
        .execute(&mut conn)
        .await
        .map_err(unavailable)?;
    let _ = conn.close().await;
    tracing::info!(database = %name, "created the database");
    Ok(())
}

/// Splits `?pool=N` off the URL.
fn pool_size(url: &str) -> StoreResult<(String, u32)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), POOL_SIZE));
    };
    let mut size = POOL_SIZE;
    let mut rest = Vec::new();
    for kv in query.split('&') {
        match kv.strip_prefix("pool=") {
            Some(n) => {
                size = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    StoreError::Unavailable(format!("database URL: pool={n} is not a positive number"))
                })?;
            }
            None => rest.push(kv),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, size))
}

/// Brings the schema to the newest version, once across processes (a named lock).
pub async fn migrate(pool: &MySqlPool) -> StoreResult<()> {
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('sai_im_migrate', 60)")
        .fetch_one(&mut *conn)
        .await
        .map_err(unavailable)?;
    if locked != Some(1) {
        return Err(StoreError::Unavailable(
            "another process held the migration lock for 60 s".into(),
        ));
    }
    let out = migrate_locked(&mut conn).await;
    let _ = sqlx::query("SELECT RELEASE_LOCK('sai_im_migrate')")
        .execute(&mut *conn)
        .await;
    out
}

async fn migrate_locked(conn: &mut sqlx::MySqlConnection) -> StoreResult<()> {
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT COLLATION_NAME FROM information_schema.COLLATIONS
         WHERE COLLATION_NAME IN ('utf8mb4_0900_bin', 'utf8mb4_nopad_bin')",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(unavailable)?;
    let collation = ["utf8mb4_0900_bin", "utf8mb4_nopad_bin"]
        .into_iter()
        .find(|c| found.iter().any(|f| f == c))
        .ok_or_else(|| {
            StoreError::Unavailable(
                "the MySQL server has no binary collation without padding (MySQL 8 or MariaDB 10.2+ needed)".into(),
            )
        })?;
    sqlx::query(sqlx::AssertSqlSafe(
        table!("sai_schema", "id TINYINT NOT NULL PRIMARY KEY, version BIGINT NOT NULL")
            .replace("{collation}", collation),
    ))
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    let version: i64 = sqlx::query_scalar("SELECT version FROM sai_schema WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await
        .map_err(unavailable)?
        .unwrap_or(0);
    let newest = MIGRATIONS.len() as i64;
    if version > newest {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this binary's {newest}"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        for stmt in *step {
            // The collation is one of two names we chose above, never input.
            let stmt = sqlx::AssertSqlSafe(stmt.replace("{collation}", collation));
            sqlx::query(stmt).execute(&mut *conn).await.map_err(unavailable)?;
        }
        sqlx::query("INSERT INTO sai_schema (id, version) VALUES (1, ?) ON DUPLICATE KEY UPDATE version = ?")
            .bind(i as i64 + 1)
            .bind(i as i64 + 1)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

fn unavailable(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(d) = &e {
        // The retry loop recognises these by their prefix.
        match (
            d.code().as_deref(),
            d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|m| m.number()),
        ) {
            (Some("40001"), _) | (_, Some(1213)) => return StoreError::Unavailable(format!("{RETRY}deadlock: {d}")),
            (_, Some(1205)) => return StoreError::Unavailable(format!("{RETRY}lock wait timeout: {d}")),
            _ => {}
        }
    }
    StoreError::Unavailable(e.to_string())
}

/// Prefix of the errors a transaction is run again for.
const RETRY: &str = "[retryable] ";

fn is_retryable(why: &str) -> bool {
    why.starts_with(RETRY)
}

fn write_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_string()),
        _ => unavailable(e),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn epoch(v: i64) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("token_epoch = {v}")))
}

fn get_u64(r: &MySqlRow, col: &str) -> StoreResult<u64> {
    let v: i64 = r.try_get(col).map_err(corrupt)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col} = {v}")))
}

fn get_u8(r: &MySqlRow, col: &str) -> StoreResult<u8> {
    let v: i16 = r.try_get(col).map_err(corrupt)?;
    u8::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col} = {v}")))
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn user_from_row(r: &MySqlRow) -> StoreResult<User> {
    Ok(User {
        user_id: r.try_get("user_id").map_err(corrupt)?,
        username: r.try_get("username").map_err(corrupt)?,
        nickname: r.try_get("nickname").map_err(corrupt)?,
        password_hash: r.try_get("password_hash").map_err(corrupt)?,
        created_at: r.try_get("created_at").map_err(corrupt)?,
        token_epoch: epoch(r.try_get("token_epoch").map_err(corrupt)?)?,
        disabled: r.try_get("disabled").map_err(corrupt)?,
    })
}

fn message_from_row(r: &MySqlRow) -> StoreResult<StoredMessage> {
    Ok(StoredMessage {
        conversation_id: r.try_get("conversation_id").map_err(corrupt)?,
        chat_type: get_u8(r, "chat_type")?,
        seq: get_u64(r, "seq")?,
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

/// [`MessageStore::add_readers`] on the tables, in `tx`: each message's readers are added in
/// one write, its row locked in (conversation, seq) order, the same order in every process.
async fn add_readers_in(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
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
        let existing =
            sqlx::query("SELECT format, bitmap FROM read_records WHERE conversation_id = ? AND seq = ? FOR UPDATE")
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
             ON DUPLICATE KEY UPDATE format = VALUES(format), bitmap = VALUES(bitmap)",
        )
        .bind(conversation_id)
        .bind(seq)
        .bind(i16::from(record.format))
        .bind(record.bytes)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
        changed += 1;
    }
    Ok(changed)
}

fn record_from_row(r: &MySqlRow) -> StoreResult<ReadRecord> {
    Ok(ReadRecord {
        format: get_u8(r, "format")?,
        bytes: r.try_get("bitmap").map_err(corrupt)?,
    })
}

const USER_BY_ID: &str = "SELECT user_id, username, nickname, password_hash, created_at, token_epoch, disabled \
                          FROM users WHERE user_id = ?";
const USER_BY_NAME: &str = "SELECT user_id, username, nickname, password_hash, created_at, token_epoch, disabled \
                            FROM users WHERE username = ?";

#[async_trait]
impl UserStore for MySqlStore {
    async fn create_user(&self, u: &User) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO users (user_id, username, nickname, password_hash, created_at, token_epoch, disabled)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&u.user_id)
        .bind(&u.username)
        .bind(&u.nickname)
        .bind(&u.password_hash)
        .bind(u.created_at)
        .bind(i64::from(u.token_epoch))
        .bind(u.disabled)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        self.user_where(USER_BY_NAME, username).await
    }

    async fn user_by_id(&self, user_id: &str) -> StoreResult<Option<User>> {
        self.user_where(USER_BY_ID, user_id).await
    }

    async fn create_users_bulk(&self, users: &[User]) -> StoreResult<u64> {
        let pool = &self.pool;
        retrying(move || async move {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            let mut inserted = 0;
            for u in users {
                let done = sqlx::query(
                    "INSERT IGNORE INTO users (user_id, username, nickname, password_hash, created_at)
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
        })
        .await
    }

    async fn revoke_tokens(&self, user_id: &str) -> StoreResult<Option<u32>> {
        self.new_epoch(
            "UPDATE users SET token_epoch = token_epoch + 1 WHERE user_id = ?",
            user_id,
            None,
        )
        .await
    }

    async fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<Option<u32>> {
        self.new_epoch(
            "UPDATE users SET password_hash = ?, token_epoch = token_epoch + 1 WHERE user_id = ?",
            user_id,
            Some(Arg::Text(password_hash.to_string())),
        )
        .await
    }

    async fn set_disabled(&self, user_id: &str, disabled: bool) -> StoreResult<Option<u32>> {
        self.new_epoch(
            "UPDATE users SET disabled = ?, token_epoch = token_epoch + 1 WHERE user_id = ?",
            user_id,
            Some(Arg::Flag(disabled)),
        )
        .await
    }
}

#[async_trait]
impl MessageStore for MySqlStore {
    fn write_stats(&self) -> Option<Arc<sai_storage::WriteStats>> {
        Some(self.write_stats.clone())
    }

    async fn append(&self, m: NewMessage) -> StoreResult<Appended> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.appender
            .send(batch::Job { msg: m, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the append writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the append writer stopped".into()))?
    }

    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        if let Log::Mongo(log) = &self.log {
            let top = self.max_seq(conversation_id).await?;
            return log.range(conversation_id, after_seq, top, true, limit).await;
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
        ))
        .bind(conversation_id)
        .bind(seq_param(after_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        if let Log::Mongo(log) = &self.log {
            let top = self.max_seq(conversation_id).await?;
            let top = before_seq.map_or(top, |b| top.min(b.saturating_sub(1)));
            return log.range(conversation_id, 0, top, false, limit).await;
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
        ))
        .bind(conversation_id)
        .bind(before_seq.map(seq_param).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn conversations_of(&self, user_id: &str) -> StoreResult<Vec<ConversationHead>> {
        let rows = sqlx::query(
            "SELECT c.conversation_id, c.max_seq, m.joined_seq FROM conversation_members m
             JOIN conversations c ON c.conversation_id = m.conversation_id
             WHERE m.user_id = ? ORDER BY c.conversation_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
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

    async fn is_member(&self, conversation_id: &str, user_id: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM conversation_members WHERE user_id = ? AND conversation_id = ?")
            .bind(user_id)
            .bind(conversation_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }

    async fn message(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<StoredMessage>> {
        if let Log::Mongo(log) = &self.log {
            if seq == 0 || seq > self.max_seq(conversation_id).await? {
                return Ok(None);
            }
            return Ok(log.range(conversation_id, seq - 1, seq, true, 1).await?.pop());
        }
        sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? AND seq = ?"
        ))
        .bind(conversation_id)
        .bind(seq_param(seq))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(message_from_row)
        .transpose()
    }

    async fn member_states(&self, conversation_id: &str) -> StoreResult<Vec<MemberState>> {
        let rows = sqlx::query(
            "SELECT user_id, read_seq, received_seq, joined_seq FROM conversation_members
             WHERE conversation_id = ? ORDER BY user_id",
        )
        .bind(conversation_id)
        .fetch_all(&self.pool)
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
        /// A member's conversations, newest first, with `$unread` as their unread count.
        macro_rules! summaries {
            ($unread:literal) => {
                concat!(
                    "SELECT c.conversation_id, c.chat_type, c.max_seq, c.updated_at, m.read_seq, m.joined_seq, ",
                    $unread,
                    " AS unread FROM conversation_members m
                     JOIN conversations c ON c.conversation_id = m.conversation_id
                     WHERE m.user_id = ? ORDER BY c.updated_at DESC, c.conversation_id LIMIT ? OFFSET ?"
                )
            };
        }
        // With the MongoDB log the unread counts are counted there, below.
        let sql = match self.log {
            Log::Tables => summaries!(
                "(SELECT COUNT(*) FROM messages x WHERE x.conversation_id = c.conversation_id
                   AND x.seq > GREATEST(m.read_seq, m.joined_seq) AND x.send_id != m.user_id)"
            ),
            Log::Mongo(_) => summaries!("0"),
        };
        let rows = sqlx::query(sql)
            .bind(user_id)
            .bind(i64::from(limit))
            .bind(i64::from(offset))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let conversation_id: String = r.try_get("conversation_id").map_err(corrupt)?;
            let max_seq = get_u64(r, "max_seq")?;
            let joined_seq = get_u64(r, "joined_seq")?;
            let read_seq = get_u64(r, "read_seq")?.max(joined_seq);
            // The row's max_seq is committed: the MongoDB log is read up to it without
            // another look at MySQL.
            let (last_message, unread) = match &self.log {
                Log::Tables if max_seq > joined_seq => {
                    (self.message(&conversation_id, max_seq).await?, get_u64(r, "unread")?)
                }
                Log::Tables => (None, get_u64(r, "unread")?),
                Log::Mongo(log) if max_seq > joined_seq => (
                    log.range(&conversation_id, max_seq - 1, max_seq, true, 1).await?.pop(),
                    log.count_not_by(&conversation_id, read_seq, max_seq, user_id).await?,
                ),
                Log::Mongo(_) => (None, 0),
            };
            out.push(ConversationSummary {
                conversation_id,
                chat_type: get_u8(r, "chat_type")?,
                max_seq,
                read_seq,
                unread,
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
        let (pool, log) = (&self.pool, &self.log);
        retrying(move || async move {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            let row = sqlx::query(
                "SELECT m.read_seq, m.joined_seq, c.max_seq FROM conversation_members m
                     JOIN conversations c ON c.conversation_id = m.conversation_id
                     WHERE m.conversation_id = ? AND m.user_id = ? FOR UPDATE",
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
            // The member's row stays locked while the bitmaps are written or the mark handed;
            // a rollback after them leaves the reader in bitmaps it will be added to again.
            match reader_slot {
                Some((slot, BitmapWrite::Now(codec))) => {
                    let mark = read_mark(conversation_id, user_id, slot, old, new);
                    match log {
                        Log::Mongo(log) => log.add_readers(std::slice::from_ref(&mark), codec).await?,
                        Log::Tables => add_readers_in(&mut tx, std::slice::from_ref(&mark), codec).await?,
                    };
                }
                Some((slot, BitmapWrite::Handed(queue))) => {
                    let mark = read_mark(conversation_id, user_id, slot, old, new);
                    queue.hand(mark).await.map_err(StoreError::Unavailable)?;
                }
                None => {}
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(Some((old, new)))
        })
        .await
    }

    async fn add_readers(&self, marks: &[ReadMark], codec: &dyn ReadBitmapCodec) -> StoreResult<u64> {
        let (pool, log) = (&self.pool, &self.log);
        match log {
            // The documents hold the bitmaps. Each range is cut at its conversation's committed
            // max seq, so that no orphan (a document above it) is ever marked.
            Log::Mongo(log) => {
                let mut max_seqs = BTreeMap::new();
                let mut cut = Vec::with_capacity(marks.len());
                for m in marks {
                    let max_seq = match max_seqs.get(m.conversation_id.as_str()) {
                        Some(max_seq) => *max_seq,
                        None => {
                            let max_seq = self.max_seq(&m.conversation_id).await?;
                            max_seqs.insert(m.conversation_id.as_str(), max_seq);
                            max_seq
                        }
                    };
                    cut.push(ReadMark {
                        up_to_seq: m.up_to_seq.min(max_seq),
                        ..m.clone()
                    });
                }
                log.add_readers(&cut, codec).await
            }
            Log::Tables => {
                retrying(move || async move {
                    let mut tx = pool.begin().await.map_err(unavailable)?;
                    let changed = add_readers_in(&mut tx, marks, codec).await?;
                    tx.commit().await.map_err(unavailable)?;
                    Ok(changed)
                })
                .await
            }
        }
    }

    async fn mark_received(&self, conversation_id: &str, user_id: &str, seq: u64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE conversation_members SET received_seq = GREATEST(received_seq, ?)
             WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(seq_param(seq))
        .bind(conversation_id)
        .bind(user_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn read_record(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<ReadRecord>> {
        if let Log::Mongo(log) = &self.log {
            return log.read_record(conversation_id, seq).await;
        }
        sqlx::query("SELECT format, bitmap FROM read_records WHERE conversation_id = ? AND seq = ?")
            .bind(conversation_id)
            .bind(seq_param(seq))
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(record_from_row)
            .transpose()
    }
}

/// Scratch databases on the MySQL server the tests use, each dropped with its handle.
#[cfg(test)]
pub(crate) mod testing {
    use sqlx::mysql::MySqlConnection;
    use sqlx::Connection;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The server: `SAI_TEST_MYSQL_URL` (a URL without a database), by default the MariaDB that
    /// runs on this machine.
    pub fn server_url() -> String {
        std::env::var("SAI_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
    }

    pub struct TestDatabase {
        pub url: String,
        name: String,
    }

    impl TestDatabase {
        /// Creates a database no other test or run uses.
        pub async fn create(tag: &str) -> TestDatabase {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "sai_t_{}_{}_{tag}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let mut c = MySqlConnection::connect(&server_url())
                .await
                .unwrap_or_else(|e| panic!("MySQL at {} (SAI_TEST_MYSQL_URL): {e}", server_url()));
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut c)
                .await
                .expect("create database");
            TestDatabase {
                url: format!("{}/{name}", server_url()),
                name,
            }
        }

        /// The database at the end of `url`, to drop.
        pub fn named(url: &str) -> TestDatabase {
            TestDatabase {
                url: url.to_string(),
                name: url.rsplit('/').next().unwrap_or_default().to_string(),
            }
        }
    }

    /// A MongoDB database of the chat log no other test or run uses, on the server
    /// `SAI_TEST_MONGO_URL` names (by default the one `scripts/backends.sh mongo` starts);
    /// dropped with its handle.
    pub struct TestChatLog {
        pub url: String,
        name: String,
    }

    fn mongo_server() -> String {
        std::env::var("SAI_TEST_MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
    }

    impl TestChatLog {
        pub fn create() -> TestChatLog {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!("sai_t_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            TestChatLog {
                url: format!("{}/{name}", mongo_server().trim_end_matches('/')),
                name,
            }
        }
    }

    impl Drop for TestChatLog {
        fn drop(&mut self) {
            let name = std::mem::take(&mut self.name);
            clean_up(async move {
                if let Ok(c) = mongodb::Client::with_uri_str(mongo_server()).await {
                    let _ = c.database(&name).drop().await;
                }
            });
        }
    }

    /// Runs `cleanup` to its end on a thread and runtime of its own: a handle is dropped inside
    /// a runtime, or after its test panicked.
    fn clean_up(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(cleanup);
            }
        })
        .join();
    }

    /// Drops the database, also when the test panicked (on a thread of its own: this may run
    /// inside a runtime).
    impl Drop for TestDatabase {
        fn drop(&mut self) {
            let name = std::mem::take(&mut self.name);
            clean_up(async move {
                if let Ok(mut c) = MySqlConnection::connect(&server_url()).await {
                    let drop = sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"));
                    let _ = sqlx::query(drop).execute(&mut c).await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{TestChatLog, TestDatabase};
    use super::*;
    use sai_storage::conformance;
    use std::sync::Arc;

    /// Two tests of `$body` (an `async fn(Option<&str>)` taking the chat log's URL): on the
    /// database's tables, and with the chat log in a MongoDB database of its own.
    macro_rules! on_both_logs {
        ($tables:ident, $mongo:ident, $body:ident) => {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $tables() {
                $body(None).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $mongo() {
                let log = TestChatLog::create();
                $body(Some(&log.url)).await;
            }
        };
    }

    on_both_logs!(
        conforms_to_the_storage_contract,
        conforms_to_the_storage_contract_with_the_chat_log_in_mongodb,
        conforms
    );

    async fn conforms(log: Option<&str>) {
        let db = TestDatabase::create("conf").await;
        let s = MySqlStore::open_with(&db.url, log).await.unwrap();
        conformance::check_users(&s).await;
        conformance::check_messages(&s).await;
        conformance::check_social(&s).await;
        conformance::check_read_state(&s).await;
        conformance::check_handed_read_marks(&s).await;
        s.close().await;
    }

    /// Documents of appends that never committed (a crash between MongoDB's ack and MySQL's
    /// commit) are invisible, do not count as duplicates, and give way to the next append.
    #[tokio::test]
    async fn orphans_in_the_mongodb_log_stay_hidden_and_give_way() {
        use mongodb::bson::{doc, Document};
        let db = TestDatabase::create("orph").await;
        let log = TestChatLog::create();
        let s = MySqlStore::open_with(&db.url, Some(&log.url)).await.unwrap();
        let first = s.append(conformance::message("c1", "a", "b", "k1")).await.unwrap();
        assert!(matches!(first, Appended::New(ref m) if m.seq == 1), "{first:?}");
        let raw = mongodb::Client::with_uri_str(&log.url).await.unwrap();
        let docs = raw.default_database().unwrap().collection::<Document>("messages");
        for (seq, key) in [(2_i64, "k2"), (3, "k-lost")] {
            docs.insert_one(doc! {
                "conversationId": "c1", "seq": seq, "chatType": 2_i32, "sendId": "a", "recvId": "b",
                "clientMsgId": key, "msgId": format!("orphan-{seq}"), "sendTime": 1_i64,
                "content": "{\"orphan\":true}", "readVersion": 0_i64,
            })
            .await
            .unwrap();
        }
        let seqs = |v: Vec<StoredMessage>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(seqs(s.messages_after("c1", 0, 10).await.unwrap()), [1]);
        assert_eq!(seqs(s.messages_before("c1", None, 10).await.unwrap()), [1]);
        assert_eq!(s.message("c1", 2).await.unwrap(), None);
        // The orphan's key is not a duplicate: its append is stored, at the orphan's seq.
        let again = s.append(conformance::message("c1", "a", "b", "k2")).await.unwrap();
        let Appended::New(m) = again else { panic!("{again:?}") };
        assert_eq!(m.seq, 2);
        let stored = s.messages_after("c1", 0, 10).await.unwrap();
        assert_eq!(seqs(stored.clone()), [1, 2]);
        assert_eq!(stored[1].msg_id, m.msg_id, "the orphan gave way");
        assert_eq!(docs.count_documents(doc! { "conversationId": "c1" }).await.unwrap(), 2);
        s.close().await;
    }

    /// A database keeps the chat log it started with.
    #[tokio::test]
    async fn a_database_refuses_the_other_chat_log() {
        let log = TestChatLog::create();
        let db = TestDatabase::create("tbl").await;
        let s = MySqlStore::open(&db.url).await.unwrap();
        s.append(conformance::message("c1", "a", "b", "k1")).await.unwrap();
        s.close().await;
        let Err(e) = MySqlStore::open_with(&db.url, Some(&log.url)).await else {
            panic!("opened a table log on MongoDB");
        };
        assert!(e.to_string().contains("without --chat-log"), "{e}");
        let db = TestDatabase::create("mgo").await;
        let s = MySqlStore::open_with(&db.url, Some(&log.url)).await.unwrap();
        s.append(conformance::message("c2", "a", "b", "k2")).await.unwrap();
        s.close().await;
        let Err(e) = MySqlStore::open(&db.url).await else {
            panic!("opened a MongoDB log's database without it");
        };
        assert!(e.to_string().contains("with --chat-log"), "{e}");
    }

    // Appends raced from two stores (two "processes") on one conversation get exactly 1..=n;
    // the same keys raced again are all answered as duplicates of those.
    on_both_logs!(
        appends_from_two_processes_get_gapless_seqs_once,
        appends_from_two_processes_get_gapless_seqs_once_in_the_mongodb_log,
        appends_from_two_processes
    );

    async fn appends_from_two_processes(log: Option<&str>) {
        let db = TestDatabase::create("race").await;
        let stores = [
            Arc::new(MySqlStore::open_with(&db.url, log).await.unwrap()),
            Arc::new(MySqlStore::open_with(&db.url, log).await.unwrap()),
        ];
        let n = 100u64;
        let race = |stores: &[Arc<MySqlStore>; 2]| {
            (0..n)
                .map(|i| {
                    let s = stores[i as usize % 2].clone();
                    tokio::spawn(
                        async move { s.append(conformance::message("race", "a", "b", &format!("k{i}"))).await },
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut outcomes = Vec::new();
        for t in race(&stores) {
            outcomes.push(t.await.unwrap().unwrap());
        }
        conformance::check_concurrent_appends(outcomes.clone(), n);
        for t in race(&stores) {
            match t.await.unwrap().unwrap() {
                Appended::Duplicate(m) => assert!(outcomes.iter().any(|o| o == &Appended::New(m.clone()))),
                Appended::New(m) => panic!("stored twice: {m:?}"),
            }
        }
        for s in &stores {
            s.close().await;
        }
    }

    // The same keys sent twice at once land in the same batches: each is stored once, one
    // answer new and the other its duplicate, across many conversations.
    on_both_logs!(
        a_key_twice_in_one_batch_is_stored_once,
        a_key_twice_in_one_batch_is_stored_once_in_the_mongodb_log,
        a_key_twice_in_one_batch
    );

    async fn a_key_twice_in_one_batch(log: Option<&str>) {
        let db = TestDatabase::create("dup").await;
        let s = Arc::new(MySqlStore::open_with(&db.url, log).await.unwrap());
        let tasks: Vec<_> = (0..200u64)
            .map(|i| {
                let s = s.clone();
                let conv = format!("c{}", i % 20 / 2);
                tokio::spawn(async move {
                    s.append(conformance::message(&conv, "a", "b", &format!("k{}", i / 2)))
                        .await
                })
            })
            .collect();
        let mut by_key: std::collections::HashMap<String, Vec<Appended>> = std::collections::HashMap::new();
        for t in tasks {
            let a = t.await.unwrap().unwrap();
            let (Appended::New(m) | Appended::Duplicate(m)) = &a;
            by_key.entry(m.client_msg_id.clone()).or_default().push(a);
        }
        assert_eq!(by_key.len(), 100);
        for (k, answers) in &by_key {
            let news = answers.iter().filter(|a| matches!(a, Appended::New(_))).count();
            assert_eq!(news, 1, "{k}: {answers:?}");
            let seqs: std::collections::BTreeSet<u64> = answers
                .iter()
                .map(|(Appended::New(m) | Appended::Duplicate(m))| m.seq)
                .collect();
            assert_eq!(seqs.len(), 1, "{k}: one message, one seq");
        }
        for c in 0..10 {
            let seqs: Vec<u64> = s
                .messages_after(&format!("c{c}"), 0, 100)
                .await
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect();
            assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gapless");
        }
        s.close().await;
    }

    #[tokio::test]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let db = TestDatabase::create("mig").await;
        let s = MySqlStore::open(&db.url).await.unwrap();
        // Opening again finds the schema current.
        MySqlStore::open(&db.url).await.unwrap().close().await;
        sqlx::query("UPDATE sai_schema SET version = 99 WHERE id = 1")
            .execute(&s.pool)
            .await
            .unwrap();
        assert!(matches!(MySqlStore::open(&db.url).await, Err(StoreError::Corrupt(_))));
        s.close().await;
    }

    #[tokio::test]
    async fn a_missing_database_is_created() {
        let db = TestDatabase::create("new").await;
        let url = format!("{}_fresh", db.url);
        let s = MySqlStore::open(&url).await.unwrap();
        conformance::check_users(&s).await;
        s.close().await;
        drop(TestDatabase::named(&url));
    }

    #[test]
    fn pool_size_comes_off_the_url() {
        assert_eq!(pool_size("mysql://h/db").unwrap(), ("mysql://h/db".into(), POOL_SIZE));
        assert_eq!(pool_size("mysql://h/db?pool=4").unwrap(), ("mysql://h/db".into(), 4));
        assert_eq!(
            pool_size("mysql://h/db?ssl-mode=disabled&pool=2").unwrap(),
            ("mysql://h/db?ssl-mode=disabled".into(), 2)
        );
        assert!(pool_size("mysql://h/db?pool=0").is_err());
    }
}
