//! The message writer: one thread that logs appends and received positions in batches and
//! answers each once its batch is in the log ([`super::log`]); the merger ([`super::merge`]) moves
//! them into the tables later, in large batches.
//!
//! # Why a thread of its own
//! sqlx's SQLite driver runs every statement on its worker thread and wakes the caller through a
//! channel: an append used to cost five hops (savepoint, dedupe select, seq upsert, insert,
//! release) and profiles showed about 60 % of the server's CPU in futex waits and wakes. Here the
//! whole batch runs on this thread with no hop per statement; a caller pays one channel send and
//! one oneshot wake-up.
//!
//! # One batch
//! Up to [`MAX_BATCH`] queued jobs:
//! 1. per append, the idempotency check on `(send_id, client_msg_id)`: within the batch, among the
//!    logged records not merged yet (in memory), then in the table with one indexed lookup when
//!    the key filter ([`KeyFilter`]) says the table may hold the key;
//! 2. the seq: `max_seq + 1` from the in-memory high-water mark of the conversation
//!    ([`SeqCache`], filled from `conversations.max_seq` on first use);
//! 3. the batch's records encoded and appended to the log segment with one `write`; only then are
//!    callers answered and the new high-water marks kept. A write that fails is cut back off the
//!    segment and every caller of the batch gets `Unavailable`; nothing of it is stored.
//!
//! The log write reaches the kernel, not the disk: like SQLite's `synchronous = NORMAL` before it,
//! an acknowledged message survives a crash of the process (kill -9), not a power loss.

use super::keys::KeyFilter;
use super::log::{self, AppendError, Record};
use super::merge::{self, Shared};
use rusqlite::{params, Connection, OptionalExtension};
use sai_storage::{Appended, NewMessage, StoreError, StoreResult, StoredMessage, WriteStats};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most jobs logged in one write.
pub(super) const MAX_BATCH: usize = 512;
/// Jobs queued for the writer before callers wait (backpressure: `send` awaits a free slot).
pub(super) const QUEUE: usize = 8192;
/// Under load, the shortest time between two log writes' starts: a message waits up to this long
/// to share a write, which amortizes each write's fixed cost (a system call, a wake-up per batch).
/// Light load writes at once: the wait applies only after a batch of [`GATHER_FROM`] jobs or more.
const WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);
/// Batch size from which the writer waits out [`WRITE_INTERVAL`] before the next write.
const GATHER_FROM: usize = 8;
/// Conversations whose high-water mark is kept in memory; past it the writer waits until every
/// logged record is merged, clears the map and refills it from the table on demand (a lookup per
/// conversation, once).
const MAX_CACHED_SEQS: usize = 200_000;

/// Work for the writer.
pub(super) enum Job {
    /// Append a message; answered once logged.
    Append(NewMessage, oneshot::Sender<StoreResult<Appended>>),
    /// Raise a member's received position; answered once logged.
    Received {
        conversation_id: String,
        user_id: String,
        seq: u64,
        done: oneshot::Sender<StoreResult<()>>,
    },
    /// Finish what is queued before this, merge everything, then stop.
    Stop,
}

/// The newest seq of each conversation this writer has logged or read.
struct SeqCache {
    max: HashMap<String, u64>,
}

/// The writer's queue, the state it shares with the merger and readers, and its thread.
pub(super) struct Started {
    pub(super) jobs: mpsc::Sender<Job>,
    pub(super) stats: Arc<WriteStats>,
    pub(super) shared: Arc<Shared>,
    pub(super) thread: std::thread::JoinHandle<()>,
}

/// Merges what a previous run left in the log, then starts the merger and the writer.
pub(super) fn start(path: &Path) -> StoreResult<Started> {
    let mut merge_conn = open(path)?;
    let dir = log::dir_of(path);
    let generation = merge::replay(&mut merge_conn, &dir)?;
    let segment = log::Segment::create(&dir, generation)
        .map_err(|e| StoreError::Unavailable(format!("creating a message log segment: {e}")))?;
    let shared = Arc::new(Shared::new(segment, dir));
    let merger = merge::start(merge_conn, shared.clone())?;
    // The writer's own connection only reads (idempotency keys, high-water marks).
    let conn = open(path)?;
    let mut filter = KeyFilter::load(&conn).map_err(unavailable)?;
    let (jobs, rx) = mpsc::channel(QUEUE);
    let writer_shared = shared.clone();
    let stats = Arc::new(WriteStats::default());
    let writer_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("sai-sqlite-writer".into())
        .spawn(move || {
            run(&conn, &mut filter, rx, &writer_shared, &writer_stats);
            writer_shared.stop();
            let _ = merger.join();
        })
        .map_err(|e| StoreError::Unavailable(format!("starting the writer thread: {e}")))?;
    Ok(Started {
        jobs,
        stats,
        shared,
        thread,
    })
}

/// A connection of the writer or the merger. WAL and NORMAL as the pools; a 64 MiB page cache
/// (the default 2 MiB made every batch read index pages back from the OS); statement journals
/// (multi-row inserts) in memory. See [`start_checkpointer`] for the checkpoint set-up.
fn open(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 4096;",
    )
    .map_err(unavailable)?;
    conn.busy_handler(Some(busy_wait)).map_err(unavailable)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn run(conn: &Connection, filter: &mut KeyFilter, mut rx: mpsc::Receiver<Job>, shared: &Shared, stats: &WriteStats) {
    let mut seqs = SeqCache { max: HashMap::new() };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stop = false;
    let mut last_write = std::time::Instant::now();
    let mut last_len = 0;
    while !stop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        batch.push(first);
        // Under load, let a batch gather for what is left of the write interval.
        if last_len >= GATHER_FROM {
            if let Some(wait) = WRITE_INTERVAL.checked_sub(last_write.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        last_write = std::time::Instant::now();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        last_len = batch.len();
        stats.batch(batch.len(), rx.len());
        if let Some(i) = batch.iter().position(|j| matches!(j, Job::Stop)) {
            // Jobs behind the stop were sent after close(): refuse them.
            for j in batch.drain(i..) {
                refuse(j, "the store is closed");
            }
            stop = true;
        }
        match stage(conn, filter, &mut seqs, shared, &batch) {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    answer(job, result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "logging a message batch failed; nothing of it was stored");
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

/// Logs one batch; on any error nothing of it is stored.
fn stage(
    conn: &Connection,
    filter: &mut KeyFilter,
    seqs: &mut SeqCache,
    shared: &Shared,
    batch: &[Job],
) -> StoreResult<Vec<Outcome>> {
    // 1. Originals among the logged records not merged yet, under one lock.
    let keys: Vec<Option<String>> = batch
        .iter()
        .map(|j| match j {
            Job::Append(m, _) => Some(merge::key(&m.send_id, &m.client_msg_id)),
            _ => None,
        })
        .collect();
    let mut originals: Vec<Option<StoredMessage>> = {
        let s = shared.lock();
        keys.iter().map(|k| k.as_deref().and_then(|k| s.original(k))).collect()
    };
    // 2. Seqs, the batch's own duplicates and the table's originals.
    if seqs.max.len() >= MAX_CACHED_SEQS {
        // Every high-water mark the map forgets must be in the table before it is read back.
        shared.settle_blocking()?;
        seqs.max.clear();
    }
    // The table lookups of the batch in one read transaction: one snapshot and one round of
    // SQLite's file locks (two `fcntl` calls) per batch, not per statement. Rolled back when
    // dropped (it only reads).
    let read = conn.unchecked_transaction().map_err(unavailable)?;
    let mut results = Vec::with_capacity(batch.len());
    let mut records = Vec::with_capacity(batch.len());
    let mut assigned: HashMap<&str, u64> = HashMap::new();
    let mut fresh_keys: HashMap<&str, StoredMessage> = HashMap::new();
    for ((job, key), original) in batch.iter().zip(&keys).zip(originals.iter_mut()) {
        match job {
            Job::Append(m, _) => {
                let key = key.as_deref().unwrap_or_default();
                let original = match original.take() {
                    Some(o) => Some(o),
                    None => match fresh_keys.get(key) {
                        Some(o) => Some(o.clone()),
                        None if filter.may_contain(key) => {
                            stored_by_key(conn, &m.send_id, &m.client_msg_id).map_err(unavailable)?
                        }
                        None => None,
                    },
                };
                if let Some(o) = original {
                    results.push(Outcome::Appended(Appended::Duplicate(o)));
                    continue;
                }
                let current = match assigned.get(m.conversation_id.as_str()) {
                    Some(&seq) => seq,
                    None => match seqs.max.get(&m.conversation_id) {
                        Some(&seq) => seq,
                        None => stored_max_seq(conn, &m.conversation_id).map_err(unavailable)?,
                    },
                };
                let seq = current + 1;
                assigned.insert(&m.conversation_id, seq);
                let msg = m.stored(seq);
                fresh_keys.insert(key, msg.clone());
                results.push(Outcome::Appended(Appended::New(msg.clone())));
                // Members join with the conversation's first message.
                let members = if seq == 1 { m.members.clone() } else { Vec::new() };
                records.push(Record::Message { msg, members });
            }
            Job::Received {
                conversation_id,
                user_id,
                seq,
                ..
            } => {
                records.push(Record::Received {
                    conversation_id: conversation_id.clone(),
                    user_id: user_id.clone(),
                    seq: *seq,
                });
                results.push(Outcome::Received);
            }
            Job::Stop => {}
        }
    }
    drop(read);
    if records.is_empty() {
        return Ok(results);
    }
    // 3. One write, then the records are staged for the merger.
    let mut bytes = Vec::with_capacity(records.len() * 256);
    for r in &records {
        r.encode(&mut bytes);
    }
    let mut s = shared.lock_with_room();
    if let Some(why) = &s.broken {
        return Err(StoreError::Unavailable(format!("the message log is unusable: {why}")));
    }
    match s.segment.append(&bytes) {
        Ok(()) => {}
        Err(AppendError::Refused(e)) => return Err(StoreError::Unavailable(format!("writing the message log: {e}"))),
        Err(AppendError::Broken(why)) => {
            s.broken = Some(why.clone());
            return Err(StoreError::Unavailable(format!("writing the message log: {why}")));
        }
    }
    s.push(records);
    shared.staged(&s);
    drop(s);
    for k in fresh_keys.keys() {
        filter.insert(k);
    }
    for (conversation_id, seq) in assigned {
        seqs.max.insert(conversation_id.to_string(), seq);
    }
    Ok(results)
}

fn stored_by_key(conn: &Connection, send_id: &str, client_msg_id: &str) -> rusqlite::Result<Option<StoredMessage>> {
    let mut stmt = conn.prepare_cached(concat!(
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

fn stored_max_seq(conn: &Connection, conversation_id: &str) -> rusqlite::Result<u64> {
    let mut stmt = conn.prepare_cached("SELECT max_seq FROM conversations WHERE conversation_id = ?1")?;
    let v: Option<i64> = stmt.query_row([conversation_id], |r| r.get(0)).optional()?;
    Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
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
            crate::throttle::lower_priority(merge::BACKGROUND_NICE);
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
pub(super) fn busy_wait(attempt: i32) -> bool {
    std::thread::sleep(BUSY_RETRY);
    attempt < (5_000_000 / BUSY_RETRY.as_micros()) as i32
}

/// See [`busy_wait`].
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_micros(200);

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}
