//! The message writer: one thread that owns a `rusqlite` connection and persists appends and
//! received positions in batches.
//!
//! # Why a thread of its own
//! sqlx's SQLite driver runs every statement on its worker thread and wakes the caller through a
//! channel: an append used to cost five hops (savepoint, dedupe select, seq upsert, insert,
//! release) and profiles showed about 60 % of the server's CPU in futex waits and wakes. Here the
//! whole batch runs on this thread with no hop per statement; a caller pays one channel send and
//! one oneshot wake-up.
//!
//! # One batch
//! Up to [`MAX_BATCH`] queued jobs in one `BEGIN IMMEDIATE` transaction:
//! 1. per append, the idempotency check on `(send_id, client_msg_id)`: within the batch in
//!    memory, against the table with one indexed lookup;
//! 2. the seq: `max_seq + 1` from the in-memory high-water mark of the conversation
//!    ([`SeqCache`], filled from `conversations.max_seq` on first use);
//! 3. messages inserted with multi-row statements ([`INSERT_ROWS`] rows each), one
//!    `conversations` upsert per conversation touched, members on a conversation's first message,
//!    received positions coalesced per (conversation, member);
//! 4. one commit; only then are callers answered and the new high-water marks kept.
//!
//! A batch that fails (a stale high-water mark hits the `(conversation_id, seq)` key, the disk is
//! full, ...) is rolled back whole, the high-water marks are forgotten and the batch is tried once
//! more from the database's values; if that fails too every caller gets `Unavailable` and nothing
//! of the batch is stored.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sai_storage::{Appended, NewMessage, StoreError, StoreResult, StoredMessage};
use std::collections::HashMap;
use std::path::Path;
use tokio::sync::{mpsc, oneshot};

/// Most jobs committed in one transaction.
pub(super) const MAX_BATCH: usize = 512;
/// Jobs queued for the writer before callers wait (backpressure: `send` awaits a free slot).
pub(super) const QUEUE: usize = 8192;
/// Under load, the shortest time between two commits' starts: a message waits up to this long
/// to share a commit, which amortizes each commit's fixed cost (WAL header and index, locks).
/// Light load commits at once: the wait applies only after a batch of [`GATHER_FROM`] jobs or
/// more (with it always on, the median send at 1,000 msg/s rose from 1.5 to 4 ms).
const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);
/// Batch size from which the writer waits out [`COMMIT_INTERVAL`] before the next commit.
const GATHER_FROM: usize = 8;
/// Rows per multi-row `INSERT INTO messages` (9 parameters a row, far below SQLite's 32,766).
const INSERT_ROWS: usize = 32;
/// Conversations whose high-water mark is kept in memory; past it the map is cleared and refilled
/// from the table on demand (a lookup per conversation, once).
const MAX_CACHED_SEQS: usize = 200_000;

/// Work for the writer.
pub(super) enum Job {
    /// Append a message; answered once durable.
    Append(NewMessage, oneshot::Sender<StoreResult<Appended>>),
    /// Raise a member's received position; answered once durable.
    Received {
        conversation_id: String,
        user_id: String,
        seq: u64,
        done: oneshot::Sender<StoreResult<()>>,
    },
    /// Finish what is queued before this, then stop.
    Stop,
}

/// The newest seq of each conversation this writer has committed or read.
struct SeqCache {
    max: HashMap<String, u64>,
}

impl SeqCache {
    fn get(&self, conversation_id: &str) -> Option<u64> {
        self.max.get(conversation_id).copied()
    }

    fn set(&mut self, conversation_id: &str, seq: u64) {
        if self.max.len() >= MAX_CACHED_SEQS && !self.max.contains_key(conversation_id) {
            self.max.clear();
        }
        self.max.insert(conversation_id.to_string(), seq);
    }
}

/// Opens the writer's connection and starts its thread.
pub(super) fn start(path: &Path) -> StoreResult<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)> {
    let conn = Connection::open(path).map_err(unavailable)?;
    // WAL and NORMAL as the pools; a 64 MiB page cache (the default 2 MiB made every batch read
    // index pages back from the OS); statement journals (multi-row inserts) in memory. See
    // [`start_checkpointer`] for the checkpoint set-up.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 4096;",
    )
    .map_err(unavailable)?;
    conn.busy_handler(Some(busy_wait)).map_err(unavailable)?;
    conn.set_prepared_statement_cache_capacity(64);
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = std::thread::Builder::new()
        .name("sai-sqlite-writer".into())
        .spawn(move || run(conn, rx))
        .map_err(|e| StoreError::Unavailable(format!("starting the writer thread: {e}")))?;
    Ok((tx, handle))
}

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut seqs = SeqCache { max: HashMap::new() };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stop = false;
    let mut last_commit = std::time::Instant::now();
    let mut last_len = 0;
    while !stop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        batch.push(first);
        // Under load, let a batch gather for what is left of the commit interval.
        if last_len >= GATHER_FROM {
            if let Some(wait) = COMMIT_INTERVAL.checked_sub(last_commit.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        last_commit = std::time::Instant::now();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        last_len = batch.len();
        if let Some(i) = batch.iter().position(|j| matches!(j, Job::Stop)) {
            // Jobs behind the stop were sent after close(): refuse them.
            for j in batch.drain(i..) {
                refuse(j, "the store is closed");
            }
            stop = true;
        }
        let outcome = match commit(&mut conn, &seqs, &batch) {
            Ok(o) => Ok(o),
            Err(first_err) => {
                tracing::warn!(error = %first_err, jobs = batch.len(), "message batch failed; retrying from stored seqs");
                seqs.max.clear();
                commit(&mut conn, &seqs, &batch)
            }
        };
        match outcome {
            Ok(o) => {
                for (conversation_id, seq) in &o.seqs {
                    seqs.set(conversation_id, *seq);
                }
                for (job, result) in batch.drain(..).zip(o.results) {
                    answer(job, result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "message batch failed twice; nothing of it was stored");
                let msg = e.to_string();
                for job in batch.drain(..) {
                    refuse(job, &msg);
                }
            }
        }
    }
    rx.close();
    while let Ok(j) = rx.try_recv() {
        refuse(j, "the store is closed");
    }
}

/// What one job produced, in batch order.
enum Outcome {
    Appended(Appended),
    Received,
}

struct Committed {
    results: Vec<Outcome>,
    /// The new high-water marks, kept only once committed.
    seqs: HashMap<String, u64>,
}

fn answer(job: Job, result: Outcome) {
    match (job, result) {
        (Job::Append(_, reply), Outcome::Appended(a)) => {
            let _ = reply.send(Ok(a));
        }
        (Job::Received { done, .. }, Outcome::Received) => {
            let _ = done.send(Ok(()));
        }
        (job, _) => refuse(job, "internal: batch result out of step"),
    }
}

fn refuse(job: Job, why: &str) {
    match job {
        Job::Append(_, reply) => {
            let _ = reply.send(Err(StoreError::Unavailable(why.to_string())));
        }
        Job::Received { done, .. } => {
            let _ = done.send(Err(StoreError::Unavailable(why.to_string())));
        }
        Job::Stop => {}
    }
}

/// Runs one batch in one transaction; on any error nothing of it is stored.
fn commit(conn: &mut Connection, seqs: &SeqCache, batch: &[Job]) -> rusqlite::Result<Committed> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    // Seqs assigned in this batch, and each conversation's chat type and newest send time.
    let mut assigned: HashMap<&str, (u64, u8, i64)> = HashMap::new();
    // (send_id, client_msg_id) -> the message the batch's first append with that key stands for.
    let mut keys: HashMap<(&str, &str), StoredMessage> = HashMap::new();
    let mut rows: Vec<&NewMessage> = Vec::new();
    let mut row_seqs: Vec<u64> = Vec::new();
    let mut received: HashMap<(&str, &str), u64> = HashMap::new();
    for job in batch {
        match job {
            Job::Append(m, _) => {
                let key = (m.send_id.as_str(), m.client_msg_id.as_str());
                if let Some(original) = keys.get(&key) {
                    results.push(Outcome::Appended(Appended::Duplicate(original.clone())));
                    continue;
                }
                if let Some(original) = stored_by_key(&tx, &m.send_id, &m.client_msg_id)? {
                    keys.insert(key, original.clone());
                    results.push(Outcome::Appended(Appended::Duplicate(original)));
                    continue;
                }
                let current = match assigned.get(m.conversation_id.as_str()) {
                    Some(&(seq, _, _)) => seq,
                    None => match seqs.get(&m.conversation_id) {
                        Some(seq) => seq,
                        None => stored_max_seq(&tx, &m.conversation_id)?,
                    },
                };
                let seq = current + 1;
                assigned.insert(&m.conversation_id, (seq, m.chat_type, m.send_time));
                if seq == 1 {
                    let mut add = tx.prepare_cached(
                        "INSERT OR IGNORE INTO conversation_members (user_id, conversation_id) VALUES (?1, ?2)",
                    )?;
                    for member in &m.members {
                        add.execute(params![member, m.conversation_id])?;
                    }
                }
                rows.push(m);
                row_seqs.push(seq);
                let fresh = stored(m, seq);
                keys.insert(key, fresh.clone());
                results.push(Outcome::Appended(Appended::New(fresh)));
            }
            Job::Received {
                conversation_id,
                user_id,
                seq,
                ..
            } => {
                let e = received.entry((conversation_id, user_id)).or_insert(0);
                *e = (*e).max(*seq);
                results.push(Outcome::Received);
            }
            // Taken out of the batch before it is committed.
            Job::Stop => {}
        }
    }
    insert_messages(&tx, &rows, &row_seqs)?;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO conversations (conversation_id, chat_type, max_seq, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (conversation_id) DO UPDATE SET max_seq = excluded.max_seq, updated_at = excluded.updated_at",
        )?;
        for (conversation_id, (seq, chat_type, at)) in &assigned {
            upsert.execute(params![conversation_id, chat_type, seq_param(*seq), at])?;
        }
        let mut raise = tx.prepare_cached(
            "UPDATE conversation_members SET received_seq = max(received_seq, ?1)
             WHERE conversation_id = ?2 AND user_id = ?3",
        )?;
        for ((conversation_id, user_id), seq) in &received {
            raise.execute(params![seq_param(*seq), conversation_id, user_id])?;
        }
    }
    tx.commit()?;
    let seqs = assigned.into_iter().map(|(c, (s, _, _))| (c.to_string(), s)).collect();
    Ok(Committed { results, seqs })
}

/// `INSERT INTO messages` with [`INSERT_ROWS`] rows per statement (the tail in one shorter one).
fn insert_messages(tx: &rusqlite::Transaction<'_>, rows: &[&NewMessage], seqs: &[u64]) -> rusqlite::Result<()> {
    for (chunk, chunk_seqs) in rows.chunks(INSERT_ROWS).zip(seqs.chunks(INSERT_ROWS)) {
        let mut stmt = tx.prepare_cached(&insert_sql(chunk.len()))?;
        let mut args: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 9);
        let seq_values: Vec<i64> = chunk_seqs.iter().map(|s| seq_param(*s)).collect();
        for (m, seq) in chunk.iter().zip(&seq_values) {
            args.extend_from_slice(&[
                &m.conversation_id as &dyn rusqlite::ToSql,
                seq,
                &m.chat_type,
                &m.send_id,
                &m.recv_id,
                &m.client_msg_id,
                &m.msg_id,
                &m.send_time,
                &m.body,
            ]);
        }
        stmt.execute(args.as_slice())?;
    }
    Ok(())
}

/// The statement text for `n` rows (the statement cache keeps one per distinct `n`).
fn insert_sql(n: usize) -> String {
    let mut sql = String::from(concat!("INSERT INTO messages (", message_columns!(), ") VALUES "));
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?)");
    }
    sql
}

fn stored_by_key(
    tx: &rusqlite::Transaction<'_>,
    send_id: &str,
    client_msg_id: &str,
) -> rusqlite::Result<Option<StoredMessage>> {
    let mut stmt = tx.prepare_cached(concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages WHERE send_id = ?1 AND client_msg_id = ?2"
    ))?;
    stmt.query_row(params![send_id, client_msg_id], |r| {
        Ok(StoredMessage {
            conversation_id: r.get(0)?,
            seq: {
                let v: i64 = r.get(1)?;
                u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(1, v))?
            },
            chat_type: r.get(2)?,
            send_id: r.get(3)?,
            recv_id: r.get(4)?,
            client_msg_id: r.get(5)?,
            msg_id: r.get(6)?,
            send_time: r.get(7)?,
            body: r.get(8)?,
        })
    })
    .optional()
}

fn stored_max_seq(tx: &rusqlite::Transaction<'_>, conversation_id: &str) -> rusqlite::Result<u64> {
    let mut stmt = tx.prepare_cached("SELECT max_seq FROM conversations WHERE conversation_id = ?1")?;
    let v: Option<i64> = stmt.query_row([conversation_id], |r| r.get(0)).optional()?;
    Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
}

fn stored(m: &NewMessage, seq: u64) -> StoredMessage {
    StoredMessage {
        conversation_id: m.conversation_id.clone(),
        chat_type: m.chat_type,
        seq,
        send_id: m.send_id.clone(),
        recv_id: m.recv_id.clone(),
        client_msg_id: m.client_msg_id.clone(),
        msg_id: m.msg_id.clone(),
        send_time: m.send_time,
        body: m.body.clone(),
    }
}

/// Starts the checkpointer: a thread with a connection of its own that runs a passive checkpoint
/// every [`CHECKPOINT_EVERY`] until the returned sender is dropped or sent to.
///
/// Who checkpoints, measured at 5,000-8,000 msg/s:
/// - SQLite's automatic checkpoint alone, on the writer's thread: it stalls the batch behind it
///   (40 ms at p99 with the default 1,000 pages, 60 ms with 8,192), and its fsync was 7 % of the
///   server's CPU on the one thread every message waits for.
/// - Passive checkpoints from another thread alone: they copy frames back without blocking
///   anyone, but rarely finish while the writer commits every few milliseconds, so the WAL is
///   never rewound and grows without end (ext4 zeroing its new blocks then took 20 % of the CPU).
/// - This thread's passive checkpoints plus a `RESTART` one at 16 MiB: a `RESTART` blocks new
///   writers while it waits for every reader to leave old snapshots, and with readers about
///   (sync, history) a send then waited tens to hundreds of milliseconds: p99 60 ms at
///   1,000 msg/s on a database of 700,000 messages.
/// - Now: this thread copies nearly every frame back every 100 ms (each hot page once for many
///   commits; every 20 ms cost 22 us of CPU per message against 14), and the writer's own
///   automatic checkpoint at 4,096 pages finds little left, never waits for anyone (it is
///   passive), and lets the next commit rewind the WAL once it is fully copied.
pub(super) fn start_checkpointer(path: &Path) -> StoreResult<std::sync::mpsc::Sender<()>> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_handler(Some(busy_wait)).map_err(unavailable)?;
    let (stop, rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("sai-sqlite-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(CHECKPOINT_EVERY) {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("starting the checkpoint thread: {e}")))?;
    Ok(stop)
}

/// How often the checkpointer runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The busy handler of the writer and the checkpointer: retry every 200 us, for 5 s in all.
/// SQLite's own (`busy_timeout`) sleeps 1, 2, 5, 10, 15, 20, 25 ms and on, so a writer that waits
/// out another connection's write of a millisecond could oversleep by tens of milliseconds.
fn busy_wait(attempt: i32) -> bool {
    std::thread::sleep(BUSY_RETRY);
    attempt < (5_000_000 / BUSY_RETRY.as_micros()) as i32
}

/// See [`busy_wait`].
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_micros(200);

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}
