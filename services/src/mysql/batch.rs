//! Appends in batches: one task per store takes every append queued while the last batch was
//! written and writes them in one transaction, so a message costs a share of four round
//! trips instead of four (the profile of one transaction per message was 84% kernel: the
//! wake-ups of each round trip; `results/cluster/`).
//!
//! A batch:
//! 1. answers keys `(send_id, client_msg_id)` stored before as duplicates (one query), and a key
//!    repeated within the batch with the first one's message;
//! 2. in one transaction, per conversation in id order (every process locks in the same order,
//!    so batches do not deadlock each other), bumps the seq by the number of its new messages
//!    (`LAST_INSERT_ID(max_seq + k)` answers the last), inserts them in multi-row statements,
//!    and adds the members of a conversation created now;
//! 3. if another process stored one of the keys since step 1 (the unique key refuses the
//!    insert), rolls back and appends the batch's messages one by one instead, each as a batch
//!    of its own after a lookup of its key.
//!
//! With the chat log in MongoDB ([`super::mongo`]) step 2 writes the batch's documents there
//! instead, before the commit, and a key refused by MongoDB's unique index makes the batch go
//! one append at a time as in step 3.
//!
//! The queue holds [`QUEUE`] appends; a caller waits for room when it is full (backpressure).

use super::{message_from_row, retrying, unavailable, Key, Log, MySqlPool};
use sai_storage::{Appended, NewMessage, StoreError, StoreResult, StoredMessage};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Appends waiting for the writer.
pub const QUEUE: usize = 8192;

/// Most appends in one transaction.
pub const BATCH: usize = 512;

/// Rows per multi-row statement (9 parameters a row).
const ROWS: usize = 64;

/// One append and where its answer goes.
pub(super) struct Job {
    pub msg: NewMessage,
    pub reply: oneshot::Sender<StoreResult<Appended>>,
}

/// Starts the writer on the current runtime; it ends when every sender is gone.
pub(super) fn start(pool: MySqlPool, log: Log, stats: Arc<sai_storage::WriteStats>) -> mpsc::Sender<Job> {
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
    tokio::spawn(async move {
        let mut jobs = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut jobs, BATCH).await > 0 {
            stats.batch(jobs.len(), rx.len());
            write(&pool, &log, std::mem::take(&mut jobs)).await;
        }
    });
    tx
}

fn key(m: &NewMessage) -> Key {
    (m.send_id.clone(), m.client_msg_id.clone())
}

async fn write(pool: &MySqlPool, log: &Log, jobs: Vec<Job>) {
    // The first job of each key; the others answer with its message.
    let mut first: HashMap<Key, usize> = HashMap::new();
    for (i, j) in jobs.iter().enumerate() {
        first.entry(key(&j.msg)).or_insert(i);
    }
    // The MongoDB log checks keys by inserting (its unique index refuses a stored one, and the
    // batch goes one by one): a lookup of many keys at once is an `$or` that SecantusDB
    // answers with a collection scan (311 ms for 10 keys among 2,200 documents).
    let looked_up = match log {
        Log::Tables => {
            let keys: Vec<Key> = first.keys().cloned().collect();
            stored_before(pool, log, &keys).await
        }
        Log::Mongo(_) => Ok(HashMap::new()),
    };
    let existing = match looked_up {
        Ok(e) => e,
        Err(e) => return fail(jobs, &e),
    };
    // New messages by conversation (id order), each in arrival order.
    let mut by_conversation: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        let k = key(&j.msg);
        if first.get(&k) == Some(&i) && !existing.contains_key(&k) {
            by_conversation
                .entry(j.msg.conversation_id.as_str())
                .or_default()
                .push(i);
        }
    }
    let msgs: Vec<&NewMessage> = jobs.iter().map(|j| &j.msg).collect();
    let seqs = match insert(pool, log, &msgs, &by_conversation, false).await {
        Ok(Some(seqs)) => seqs,
        Ok(None) => return one_by_one(pool, log, jobs).await,
        Err(e) => return fail(jobs, &e),
    };
    let mut answers: HashMap<Key, StoredMessage> = existing;
    let mut fresh = vec![false; jobs.len()];
    for (i, seq) in seqs {
        fresh[i] = true;
        answers.insert(key(&jobs[i].msg), jobs[i].msg.stored(seq));
    }
    for (i, j) in jobs.into_iter().enumerate() {
        let answer = match answers.get(&key(&j.msg)) {
            Some(m) if fresh[i] => Ok(Appended::New(m.clone())),
            Some(m) => Ok(Appended::Duplicate(m.clone())),
            None => Err(StoreError::Unavailable("an append lost its answer; retry".into())),
        };
        let _ = j.reply.send(answer);
    }
}

fn fail(jobs: Vec<Job>, e: &StoreError) {
    for j in jobs {
        let again = match e {
            StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
            StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
            StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        };
        let _ = j.reply.send(Err(again));
    }
}

async fn one_by_one(pool: &MySqlPool, log: &Log, jobs: Vec<Job>) {
    for j in jobs {
        let _ = j.reply.send(append_alone(pool, log, &j.msg).await);
    }
}

/// One append as a batch of its own: its key looked up, and (MongoDB log) its conversation's
/// orphans deleted first. A key the unique index still refuses belongs to a message that is not
/// committed (an append of another process in flight, or an orphan of another conversation in
/// the MongoDB log): the caller is told to retry.
async fn append_alone(pool: &MySqlPool, log: &Log, m: &NewMessage) -> StoreResult<Appended> {
    let k = key(m);
    if let Some(original) = stored_before(pool, log, std::slice::from_ref(&k)).await?.remove(&k) {
        return Ok(Appended::Duplicate(original));
    }
    let mut by_conversation = BTreeMap::new();
    by_conversation.insert(m.conversation_id.as_str(), vec![0]);
    match insert(pool, log, &[m], &by_conversation, true).await? {
        Some(seqs) => match seqs.first() {
            Some(&(_, seq)) => Ok(Appended::New(m.stored(seq))),
            None => Err(StoreError::Unavailable("an append lost its seq; retry".into())),
        },
        None => match stored_before(pool, log, std::slice::from_ref(&k)).await?.remove(&k) {
            Some(original) => Ok(Appended::Duplicate(original)),
            None => Err(StoreError::Unavailable(
                "this clientMsgId's original is not committed yet; retry".into(),
            )),
        },
    }
}

/// The messages already stored (committed) under any of `keys`.
pub(super) async fn stored_before(
    pool: &MySqlPool,
    log: &Log,
    keys: &[Key],
) -> StoreResult<HashMap<Key, StoredMessage>> {
    if let Log::Mongo(m) = log {
        return committed(pool, m.stored(keys).await?).await;
    }
    let mut out = HashMap::new();
    for chunk in keys.chunks(ROWS) {
        let tuples = vec!["(?, ?)"; chunk.len()].join(", ");
        // Only placeholders are formatted in; the values are bound.
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM messages WHERE (send_id, client_msg_id) IN ({tuples})",
            super::MESSAGE_COLUMNS
        ));
        let mut q = sqlx::query(sql);
        for (s, c) in chunk {
            q = q.bind(s).bind(c);
        }
        for row in q.fetch_all(pool).await.map_err(unavailable)? {
            let m = message_from_row(&row)?;
            out.insert((m.send_id.clone(), m.client_msg_id.clone()), m);
        }
    }
    Ok(out)
}

/// The documents of `found` at or below their conversation's committed seq, by key: the others
/// are orphans or appends still in flight.
async fn committed(pool: &MySqlPool, found: Vec<StoredMessage>) -> StoreResult<HashMap<Key, StoredMessage>> {
    let mut conversations: Vec<&str> = found.iter().map(|m| m.conversation_id.as_str()).collect();
    conversations.sort_unstable();
    conversations.dedup();
    let mut max: HashMap<String, u64> = HashMap::new();
    for chunk in conversations.chunks(ROWS) {
        let params = vec!["?"; chunk.len()].join(", ");
        // Only placeholders are formatted in; the values are bound.
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT conversation_id, max_seq FROM conversations WHERE conversation_id IN ({params})"
        ));
        let mut q = sqlx::query(sql);
        for c in chunk {
            q = q.bind(*c);
        }
        for row in q.fetch_all(pool).await.map_err(unavailable)? {
            let c: String = sqlx::Row::try_get(&row, "conversation_id").map_err(super::corrupt)?;
            max.insert(c, super::get_u64(&row, "max_seq")?);
        }
    }
    Ok(found
        .into_iter()
        .filter(|m| max.get(&m.conversation_id).is_some_and(|top| m.seq <= *top))
        .map(|m| ((m.send_id.clone(), m.client_msg_id.clone()), m))
        .collect())
}

/// Inserts the new messages in one transaction; their seqs, or `None` when the unique key
/// refused one (another process stored it meanwhile; with the MongoDB log also a key stored
/// before, or an orphan in the way). With `clear_orphans`, the MongoDB log's documents at or
/// above each conversation's first new seq are deleted first.
async fn insert(
    pool: &MySqlPool,
    log: &Log,
    msgs: &[&NewMessage],
    by_conversation: &BTreeMap<&str, Vec<usize>>,
    clear_orphans: bool,
) -> StoreResult<Option<Vec<(usize, u64)>>> {
    if by_conversation.is_empty() {
        return Ok(Some(Vec::new()));
    }
    retrying(move || async move {
        let mut tx = pool.begin().await.map_err(unavailable)?;
        let mut seqs = Vec::new();
        for (conversation, idx) in by_conversation {
            let Some(&head) = idx.first() else { continue };
            let m = msgs[head];
            let k = idx.len() as i64;
            let latest = idx.iter().map(|i| msgs[*i].send_time).max().unwrap_or(m.send_time);
            let bumped = sqlx::query(
                "INSERT INTO conversations (conversation_id, chat_type, max_seq, updated_at)
                 VALUES (?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE max_seq = LAST_INSERT_ID(max_seq + VALUES(max_seq)),
                   updated_at = GREATEST(updated_at, VALUES(updated_at))",
            )
            .bind(*conversation)
            .bind(i16::from(m.chat_type))
            .bind(k)
            .bind(latest)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            let created = bumped.rows_affected() == 1;
            let last = if created { k as u64 } else { bumped.last_insert_id() };
            let first = last + 1 - k as u64;
            seqs.extend(idx.iter().enumerate().map(|(n, i)| (*i, first + n as u64)));
            if clear_orphans {
                if let Log::Mongo(log) = log {
                    // The row's lock is held: whatever lies at or above its first seq is an
                    // orphan.
                    log.clear_orphans(conversation, first).await?;
                }
            }
            if created {
                for user in &m.members {
                    sqlx::query("INSERT IGNORE INTO conversation_members (user_id, conversation_id) VALUES (?, ?)")
                        .bind(user)
                        .bind(*conversation)
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                }
            }
        }
        if let Log::Mongo(log) = log {
            let docs: Vec<StoredMessage> = seqs.iter().map(|(i, seq)| msgs[*i].stored(*seq)).collect();
            if !log.insert(&docs).await? {
                return Ok(None);
            }
        }
        for chunk in seqs.chunks(ROWS).filter(|_| matches!(log, Log::Tables)) {
            let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            // Only placeholders are formatted in; the values are bound.
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO messages ({}) VALUES {rows}",
                super::MESSAGE_COLUMNS
            ));
            let mut q = sqlx::query(sql);
            for (i, seq) in chunk {
                let m = msgs[*i];
                q = q
                    .bind(&m.conversation_id)
                    .bind(i64::try_from(*seq).unwrap_or(i64::MAX))
                    .bind(i16::from(m.chat_type))
                    .bind(&m.send_id)
                    .bind(&m.recv_id)
                    .bind(&m.client_msg_id)
                    .bind(&m.msg_id)
                    .bind(m.send_time)
                    .bind(&m.body);
            }
            match q.execute(&mut *tx).await {
                Ok(_) => {}
                Err(e) if super::is_unique_violation(&e) => return Ok(None),
                Err(e) => return Err(unavailable(e)),
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(seqs))
    })
    .await
}
