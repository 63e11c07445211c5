//! The merger: moves logged records into the SQLite tables in large batches, off the path every
//! send waits on, and the read barrier that lets readers see them.
//!
//! # Why merge later
//! Committing each small batch of appends straight into the tables wrote about three random
//! B-tree pages per message (the conversation's tail in `messages`, the sender's tail in the
//! idempotency index, the conversation's row in `conversations`): with a thousand busy
//! conversations nearly every message of a batch dirtied pages of its own, and SQLite writes each
//! dirty page whole (about 25 KB of WAL per message at 6,000 msg/s, 55 us of the writer's CPU per
//! message; `results/pipeline/README.md`). A merge of everything logged in the last
//! [`MERGE_EVERY`] puts many rows of each conversation and each sender on the same page, and
//! writes each conversation's row once.
//!
//! # When a merge runs
//! When the staged records reach [`MERGE_BYTES`], when [`MERGE_EVERY`] has passed since the last
//! one began, when a reader asks for the tables to be settled ([`Shared::settle`]) and when the
//! store closes. One merge at a time; while it runs the writer keeps staging the next segment,
//! and waits (backpressure: its queue fills, then senders wait) once [`MAX_STAGED_BYTES`] are
//! staged. A merge that fails is retried every [`RETRY`] with the same records; their segment
//! stays on disk until one succeeds.

use super::log::{segment_path, Record, Segment};
use parking_lot::{Condvar, Mutex};
use rusqlite::{params, Connection, TransactionBehavior};
use sai_storage::{StoreError, StoreResult, StoredMessage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Longest time records wait for their merge while nobody reads (at 10,000 msg/s: about 10,000
/// messages, ten per conversation of the capacity run's thousand).
pub(super) const MERGE_EVERY: Duration = Duration::from_millis(1000);
/// Staged bytes (in memory, [`Record::size`]) that start a merge before [`MERGE_EVERY`].
const MERGE_BYTES: usize = 16 << 20;
/// Staged bytes past which the writer waits for the merger to take them (with the copies the
/// read path keeps, at most about 4x this is held: staged and merging, each twice).
pub(super) const MAX_STAGED_BYTES: usize = 32 << 20;
/// Pause between attempts of a failing merge.
const RETRY: Duration = Duration::from_secs(1);
/// Nice value of the merger and the checkpointer: a merge is a burst of CPU once a second (about
/// 18 us per message merged, `results/pipeline/log/`), which at the default priority competes
/// with the shards for the same cores; niced, it runs in their idle time, and if it falls behind,
/// the staged bound holds the writer back (backpressure) rather than the shards starving.
pub(super) const BACKGROUND_NICE: i32 = 10;
/// Rows per multi-row `INSERT INTO messages` (9 parameters a row, far below SQLite's 32,766).
const INSERT_ROWS: usize = 64;

/// What the writer, the merger and readers share.
pub(super) struct Shared {
    state: Mutex<Staged>,
    /// The merger waits here for records or a settle request.
    work: Condvar,
    /// The writer waits here for room ([`MAX_STAGED_BYTES`]); readers never wait on it.
    room: Condvar,
}

/// Records logged but not yet merged, and who waits for them.
pub(super) struct Staged {
    /// The segment the writer appends to; `records` are exactly its contents.
    pub(super) segment: Segment,
    pub(super) records: Vec<Record>,
    /// Sum of [`Record::size`] of `records`.
    pub(super) bytes: usize,
    /// Generation of the segment being merged.
    merging: Option<u64>,
    /// The newest generation holding records of each conversation not merged yet: what a read
    /// scoped to it waits for (a read of a quiet conversation does not wait for a busy one's
    /// merge). Entries leave once their generation is merged, as in every map below; at most the
    /// conversations of two segments (staged and merging).
    unmerged_conversations: HashMap<String, u64>,
    /// The messages not merged yet, by conversation, ascending, with their generation: what sync
    /// and history (`conversations_of`, `messages_after`, `messages_before`) read beside the
    /// tables instead of waiting for a merge. Copies of the staged records: with them the staged
    /// messages take twice their bytes ([`MAX_STAGED_BYTES`] bounds the records).
    tails: HashMap<String, Vec<(u64, StoredMessage)>>,
    /// Where the message of each idempotency key ([`key`]) not merged yet lies in `tails`
    /// (generation, conversation, seq): a resend must find its original before the tables hold
    /// it.
    keys: HashMap<String, (u64, String, u64)>,
    /// The conversations each user joins with a message not merged yet, oldest first (a read of
    /// the user's conversations waits for the newest).
    joins: HashMap<String, Vec<(u64, String)>>,
    /// Merges committed by this process: a reader that saw the same count before its table
    /// read and after its look at the tails saw no record leave the tails in between.
    merges_done: u64,
    /// Readers waiting until every generation up to theirs is merged.
    waiters: Vec<(u64, oneshot::Sender<StoreResult<()>>)>,
    settle_wanted: bool,
    last_merge: Instant,
    /// The store is closing: merge what is left, then stop.
    stopping: bool,
    /// The merger has stopped; nothing staged now will be merged by this process.
    stopped: bool,
    /// A segment write failed and could not be cut back: no more appends.
    pub(super) broken: Option<String>,
    dir: PathBuf,
}

impl Shared {
    /// Shared state around the first segment of this process.
    pub(super) fn new(segment: Segment, dir: PathBuf) -> Self {
        Self {
            state: Mutex::new(Staged {
                segment,
                records: Vec::new(),
                bytes: 0,
                merging: None,
                unmerged_conversations: HashMap::new(),
                tails: HashMap::new(),
                keys: HashMap::new(),
                joins: HashMap::new(),
                merges_done: 0,
                waiters: Vec::new(),
                settle_wanted: false,
                last_merge: Instant::now(),
                stopping: false,
                stopped: false,
                broken: None,
                dir,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
        }
    }

    /// Locks the staged state for the writer, once there is room for more.
    pub(super) fn lock_with_room(&self) -> parking_lot::MutexGuard<'_, Staged> {
        let mut s = self.state.lock();
        while s.bytes >= MAX_STAGED_BYTES && !s.stopped {
            s.settle_wanted = true;
            self.work.notify_one();
            self.room.wait(&mut s);
        }
        s
    }

    /// Locks the staged state.
    pub(super) fn lock(&self) -> parking_lot::MutexGuard<'_, Staged> {
        self.state.lock()
    }

    /// Wakes the merger if the staged records call for a merge before its timer.
    pub(super) fn staged(&self, s: &Staged) {
        if s.bytes >= MERGE_BYTES {
            self.work.notify_one();
        }
    }

    /// The read barrier: `None` if every logged record within `scope` is in the tables, else a
    /// receiver that is answered once they are (merging starts at once).
    pub(super) fn settle(&self, scope: Scope<'_>) -> StoreResult<Option<oneshot::Receiver<StoreResult<()>>>> {
        let mut s = self.state.lock();
        let target = match scope {
            Scope::All if !s.records.is_empty() => Some(s.segment.generation),
            Scope::All => s.merging,
            Scope::Conversation(c) => s.unmerged_conversations.get(c).copied(),
            Scope::User { user, conversations } => conversations
                .iter()
                .filter_map(|c| s.unmerged_conversations.get(c.as_str()))
                .chain(s.joins.get(user).and_then(|l| l.last()).map(|(g, _)| g))
                .max()
                .copied(),
        };
        let Some(target) = target else {
            return Ok(None);
        };
        if s.stopped {
            return Err(StoreError::Unavailable("the message merger stopped".into()));
        }
        let (tx, rx) = oneshot::channel();
        s.waiters.push((target, tx));
        s.settle_wanted = true;
        self.work.notify_one();
        Ok(Some(rx))
    }

    /// Merges committed so far (see [`Staged::merges_done`]).
    pub(super) fn merges_done(&self) -> u64 {
        self.state.lock().merges_done
    }

    /// The unmerged messages of a conversation with a seq in `seqs`, ascending, and
    /// [`Self::merges_done`] as of this look.
    pub(super) fn tail(
        &self,
        conversation_id: &str,
        seqs: impl std::ops::RangeBounds<u64>,
    ) -> (Vec<StoredMessage>, u64) {
        let s = self.state.lock();
        let tail = s
            .tails
            .get(conversation_id)
            .map(|list| {
                list.iter()
                    .filter(|(_, m)| seqs.contains(&m.seq))
                    .map(|(_, m)| m.clone())
                    .collect()
            })
            .unwrap_or_default();
        (tail, s.merges_done)
    }

    /// For `user`: the newest unmerged seq of each of `conversations` that has one, the
    /// conversations the user joins with an unmerged message (with their newest seq), and
    /// [`Self::merges_done`] as of this look.
    pub(super) fn heads(&self, user: &str, conversations: &[String]) -> (Vec<(String, u64)>, u64) {
        let s = self.state.lock();
        let newest = |c: &str| s.tails.get(c).and_then(|l| l.last()).map(|(_, m)| m.seq);
        let mut out: Vec<(String, u64)> = conversations
            .iter()
            .filter_map(|c| newest(c).map(|seq| (c.clone(), seq)))
            .collect();
        for (_, c) in s.joins.get(user).into_iter().flatten() {
            if !out.iter().any(|(o, _)| o == c) && !conversations.contains(c) {
                out.push((c.clone(), newest(c).unwrap_or(0)));
            }
        }
        (out, s.merges_done)
    }

    /// Blocks this (non-async) thread until everything logged so far is merged.
    pub(super) fn settle_blocking(&self) -> StoreResult<()> {
        match self.settle(Scope::All)? {
            None => Ok(()),
            Some(rx) => rx
                .blocking_recv()
                .map_err(|_| StoreError::Unavailable("the message merger stopped".into()))?,
        }
    }

    /// Asks the merger to merge what is left and stop.
    pub(super) fn stop(&self) {
        self.state.lock().stopping = true;
        self.work.notify_one();
    }
}

/// What a read depends on: the logged records it must wait for are those within its scope.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scope<'a> {
    /// Everything logged.
    All,
    /// One conversation's messages, members and positions.
    Conversation(&'a str),
    /// A user's view: the conversations the tables say they belong to, and any they join with
    /// a message not merged yet.
    User { user: &'a str, conversations: &'a [String] },
}

impl Staged {
    /// The message logged under this idempotency key and not merged yet.
    pub(super) fn original(&self, key: &str) -> Option<StoredMessage> {
        let (_, conversation_id, seq) = self.keys.get(key)?;
        let tail = self.tails.get(conversation_id)?;
        let i = tail.binary_search_by_key(seq, |(_, m)| m.seq).ok()?;
        Some(tail[i].1.clone())
    }

    /// Stages records just appended to the current segment.
    pub(super) fn push(&mut self, records: Vec<Record>) {
        let generation = self.segment.generation;
        for r in records {
            let conversation = match &r {
                Record::Message { msg, members } => {
                    self.keys.insert(
                        key(&msg.send_id, &msg.client_msg_id),
                        (generation, msg.conversation_id.clone(), msg.seq),
                    );
                    for m in members {
                        self.joins
                            .entry(m.clone())
                            .or_default()
                            .push((generation, msg.conversation_id.clone()));
                    }
                    match self.tails.get_mut(&msg.conversation_id) {
                        Some(t) => t.push((generation, msg.clone())),
                        None => {
                            self.tails
                                .insert(msg.conversation_id.clone(), vec![(generation, msg.clone())]);
                        }
                    }
                    &msg.conversation_id
                }
                Record::Received { conversation_id, .. } => conversation_id,
            };
            match self.unmerged_conversations.get_mut(conversation) {
                Some(g) => *g = generation,
                None => {
                    self.unmerged_conversations.insert(conversation.clone(), generation);
                }
            }
            self.bytes += r.size();
            self.records.push(r);
        }
    }

    /// Every generation up to `generation` is in the tables: answers who waited for it.
    fn merged(&mut self, generation: u64) {
        self.merging = None;
        self.unmerged_conversations.retain(|_, g| *g > generation);
        self.keys.retain(|_, (g, _, _)| *g > generation);
        for list in self.tails.values_mut() {
            list.retain(|(g, _)| *g > generation);
        }
        self.tails.retain(|_, list| !list.is_empty());
        for list in self.joins.values_mut() {
            list.retain(|(g, _)| *g > generation);
        }
        self.joins.retain(|_, list| !list.is_empty());
        self.merges_done += 1;
        answer(self, generation, || Ok(()));
    }
}

/// The idempotency key of a message: `send_id` is a server-made id (no NUL), so the pair is
/// unambiguous.
pub(super) fn key(send_id: &str, client_msg_id: &str) -> String {
    let mut k = String::with_capacity(send_id.len() + 1 + client_msg_id.len());
    k.push_str(send_id);
    k.push('\0');
    k.push_str(client_msg_id);
    k
}

/// Starts the merger thread on its own connection.
pub(super) fn start(conn: Connection, shared: Arc<Shared>) -> StoreResult<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sai-sqlite-merge".into())
        .spawn(move || {
            crate::throttle::lower_priority(BACKGROUND_NICE);
            run(conn, &shared)
        })
        .map_err(|e| StoreError::Unavailable(format!("starting the merge thread: {e}")))
}

fn run(mut conn: Connection, shared: &Shared) {
    let dir = shared.state.lock().dir.clone();
    while let Some((records, generation)) = take(shared) {
        loop {
            match merge(&mut conn, &records, false) {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, records = records.len(), generation, "merging logged messages failed; retrying");
                    let mut s = shared.state.lock();
                    answer(&mut s, generation, || {
                        Err(StoreError::Unavailable(format!("merging messages: {e}")))
                    });
                    if s.stopping {
                        // The segment stays on disk: the next start merges it.
                        finish(&mut s);
                        shared.room.notify_all();
                        return;
                    }
                    drop(s);
                    std::thread::sleep(RETRY);
                }
            }
        }
        if let Err(e) = std::fs::remove_file(segment_path(&dir, generation)) {
            // Harmless: merging a segment twice changes nothing.
            tracing::warn!(error = %e, generation, "removing a merged log segment failed");
        }
        shared.state.lock().merged(generation);
    }
    let mut s = shared.state.lock();
    if s.records.is_empty() {
        // Closed cleanly: the current segment holds nothing.
        let _ = std::fs::remove_file(segment_path(&dir, s.segment.generation));
    }
    finish(&mut s);
    shared.room.notify_all();
}

/// Waits until a merge is due and takes the staged records (rotating the segment); `None` once
/// the store is closing and nothing is left.
fn take(shared: &Shared) -> Option<(Vec<Record>, u64)> {
    let mut s = shared.state.lock();
    loop {
        if s.records.is_empty() {
            if s.stopping {
                return None;
            }
            shared.work.wait_for(&mut s, MERGE_EVERY);
            continue;
        }
        let since = s.last_merge.elapsed();
        if !(s.settle_wanted || s.stopping || s.bytes >= MERGE_BYTES || since >= MERGE_EVERY) {
            shared.work.wait_for(&mut s, MERGE_EVERY - since);
            continue;
        }
        let next = match Segment::create(&s.dir, s.segment.generation + 1) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "starting a new log segment failed; retrying");
                let current = s.segment.generation;
                answer(&mut s, current, || {
                    Err(StoreError::Unavailable(format!("rotating the message log: {e}")))
                });
                if s.stopping {
                    // The current segment stays on disk: the next start merges it.
                    return None;
                }
                shared.work.wait_for(&mut s, RETRY);
                continue;
            }
        };
        let old = std::mem::replace(&mut s.segment, next);
        s.merging = Some(old.generation);
        s.bytes = 0;
        s.settle_wanted = false;
        s.last_merge = Instant::now();
        shared.room.notify_all();
        return Some((std::mem::take(&mut s.records), old.generation));
    }
}

/// Answers the waiters whose generation is at most `upto`.
fn answer(s: &mut Staged, upto: u64, result: impl Fn() -> StoreResult<()>) {
    let mut i = 0;
    while i < s.waiters.len() {
        if s.waiters[i].0 <= upto {
            let (_, tx) = s.waiters.swap_remove(i);
            let _ = tx.send(result());
        } else {
            i += 1;
        }
    }
}

/// The merger is gone: refuse whoever still waits.
fn finish(s: &mut Staged) {
    s.stopped = true;
    for (_, tx) in s.waiters.drain(..) {
        let _ = tx.send(Err(StoreError::Unavailable("the message merger stopped".into())));
    }
}

/// Writes `records` into the tables in one transaction. `replay`: records of a segment that may
/// have been merged already (a crash between the commit and the segment's removal), so rows that
/// exist are skipped; otherwise an existing row is an error (a second appender on the database).
pub(super) fn merge(conn: &mut Connection, records: &[Record], replay: bool) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut messages: Vec<&StoredMessage> = Vec::with_capacity(records.len());
    // Each conversation's newest seq, chat type and newest send time.
    let mut heads: HashMap<&str, (u64, u8, i64)> = HashMap::new();
    let mut received: HashMap<(&str, &str), u64> = HashMap::new();
    {
        let mut join =
            tx.prepare_cached("INSERT OR IGNORE INTO conversation_members (user_id, conversation_id) VALUES (?1, ?2)")?;
        for r in records {
            match r {
                Record::Message { msg, members } => {
                    let head = heads
                        .entry(&msg.conversation_id)
                        .or_insert((0, msg.chat_type, msg.send_time));
                    head.0 = head.0.max(msg.seq);
                    head.2 = head.2.max(msg.send_time);
                    for m in members {
                        join.execute(params![m, msg.conversation_id])?;
                    }
                    messages.push(msg);
                }
                Record::Received {
                    conversation_id,
                    user_id,
                    seq,
                } => {
                    let e = received.entry((conversation_id, user_id)).or_insert(0);
                    *e = (*e).max(*seq);
                }
            }
        }
    }
    // In key order: rows of one conversation land on the same pages, one after another.
    messages.sort_unstable_by(|a, b| (&a.conversation_id, a.seq).cmp(&(&b.conversation_id, b.seq)));
    insert_messages(&tx, &messages, replay)?;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO conversations (conversation_id, chat_type, max_seq, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (conversation_id) DO UPDATE SET max_seq = max(max_seq, excluded.max_seq),
               updated_at = max(updated_at, excluded.updated_at)",
        )?;
        for (conversation_id, (seq, chat_type, at)) in &heads {
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
    tx.commit()
}

/// `INSERT INTO messages` with [`INSERT_ROWS`] rows per statement (the tail in one shorter one).
fn insert_messages(tx: &rusqlite::Transaction<'_>, rows: &[&StoredMessage], replay: bool) -> rusqlite::Result<()> {
    for chunk in rows.chunks(INSERT_ROWS) {
        let mut stmt = tx.prepare_cached(&insert_sql(chunk.len(), replay))?;
        let seqs: Vec<i64> = chunk.iter().map(|m| seq_param(m.seq)).collect();
        let mut args: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 9);
        for (m, seq) in chunk.iter().zip(&seqs) {
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
fn insert_sql(n: usize, replay: bool) -> String {
    let verb = if replay { "INSERT OR IGNORE" } else { "INSERT" };
    let mut sql = format!(concat!("{} INTO messages (", message_columns!(), ") VALUES "), verb);
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?)");
    }
    sql
}

/// Merges the segments a previous run left (oldest first) and removes them; the generation the
/// next segment takes.
pub(super) fn replay(conn: &mut Connection, dir: &Path) -> StoreResult<u64> {
    std::fs::create_dir_all(dir).map_err(|e| io_unavailable("creating the message log directory", e))?;
    let generations = super::log::segments(dir).map_err(|e| io_unavailable("listing the message log", e))?;
    for (i, &g) in generations.iter().enumerate() {
        let path = segment_path(dir, g);
        let bytes = std::fs::read(&path).map_err(|e| io_unavailable("reading the message log", e))?;
        let (records, damage) = super::log::decode_all(&bytes);
        if let Some(why) = damage {
            if i + 1 == generations.len() {
                // The tail of the newest segment: a write the crash interrupted, never acknowledged.
                tracing::warn!(generation = g, kept = records.len(), %why, "message log ends in a torn record; dropped it");
            } else {
                return Err(StoreError::Corrupt(format!(
                    "message log segment {} is damaged before its end ({why}); move it aside to start without it",
                    path.display()
                )));
            }
        }
        merge(conn, &records, true).map_err(|e| StoreError::Unavailable(format!("replaying the message log: {e}")))?;
        tracing::info!(
            generation = g,
            records = records.len(),
            "merged a message log segment left by the previous run"
        );
    }
    for &g in &generations {
        std::fs::remove_file(segment_path(dir, g)).map_err(|e| io_unavailable("removing a replayed log segment", e))?;
    }
    Ok(generations.last().map_or(0, |g| g + 1))
}

fn io_unavailable(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(conversation_id: &str, seq: u64, members: &[&str]) -> Record {
        Record::Message {
            msg: StoredMessage {
                conversation_id: conversation_id.into(),
                chat_type: 2,
                seq,
                send_id: "a".into(),
                recv_id: "b".into(),
                client_msg_id: format!("{conversation_id}-{seq}"),
                msg_id: format!("m{seq}"),
                send_time: 1,
                body: "{}".into(),
            },
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    /// Which reads wait, driven by hand (no merger thread): a read waits for the generation
    /// that holds its scope's newest unmerged record, and only for that.
    #[test]
    fn a_read_waits_only_for_the_records_within_its_scope() {
        let dir = std::env::temp_dir().join(format!("sai-merge-scope-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let shared = Shared::new(Segment::create(&dir, 5).unwrap(), dir.clone());
        let waits = |scope: Scope<'_>| shared.settle(scope).unwrap().is_some();
        let none: &[String] = &[];
        assert!(!waits(Scope::All), "nothing logged");

        shared.lock().push(vec![message("busy", 1, &["a", "b"])]);
        assert!(waits(Scope::All));
        assert!(waits(Scope::Conversation("busy")));
        assert!(!waits(Scope::Conversation("quiet")));
        // b joins "busy" with its first message: b's view waits though the tables do not list it.
        assert!(waits(Scope::User {
            user: "b",
            conversations: none
        }));
        let quiet = ["quiet".to_string()];
        assert!(!waits(Scope::User {
            user: "c",
            conversations: &quiet
        }));
        let both = ["quiet".to_string(), "busy".to_string()];
        assert!(waits(Scope::User {
            user: "c",
            conversations: &both
        }));

        // Generation 5 is taken for merging and 6 gets a received position of "busy".
        let receiver = shared.settle(Scope::Conversation("busy")).unwrap().unwrap();
        {
            let mut s = shared.lock();
            s.records.clear();
            s.merging = Some(5);
            s.segment = Segment::create(&dir, 6).unwrap();
            s.push(vec![Record::Received {
                conversation_id: "busy".into(),
                user_id: "b".into(),
                seq: 1,
            }]);
        }
        let later = shared.settle(Scope::Conversation("busy")).unwrap().unwrap();
        shared.lock().merged(5);
        assert!(
            matches!(receiver.blocking_recv(), Ok(Ok(()))),
            "answered by generation 5"
        );
        assert!(waits(Scope::Conversation("busy")), "6 still holds a record of it");
        assert!(
            !waits(Scope::User {
                user: "b",
                conversations: none
            }),
            "b's join is merged"
        );
        shared.lock().merged(6);
        assert!(matches!(later.blocking_recv(), Ok(Ok(()))));
        assert!(!waits(Scope::Conversation("busy")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What the sync path reads beside the tables: the unmerged messages of a conversation, the
    /// conversations a user joins with one, and a merge count that tells a reader to read again.
    #[test]
    fn the_tails_hold_what_is_not_merged_and_count_the_merges() {
        let dir = std::env::temp_dir().join(format!("sai-merge-tails-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let shared = Shared::new(Segment::create(&dir, 1).unwrap(), dir.clone());
        shared
            .lock()
            .push(vec![message("p", 1, &["a", "b"]), message("g", 8, &[])]);
        shared.lock().segment = Segment::create(&dir, 2).unwrap();
        shared.lock().push(vec![message("p", 2, &[]), message("p", 3, &[])]);
        let seqs = |after: u64| {
            shared
                .tail("p", after + 1..)
                .0
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(0), vec![1, 2, 3]);
        assert_eq!(seqs(2), vec![3]);
        let groups = ["g".to_string()];
        let (heads, count) = shared.heads("b", &groups);
        assert_eq!((heads, count), (vec![("g".to_string(), 8), ("p".to_string(), 3)], 0));
        shared.lock().merged(1);
        assert_eq!(seqs(0), vec![2, 3], "generation 1 is in the tables now");
        let (heads, count) = shared.heads("b", &groups);
        assert_eq!((heads, count), (vec![], 1), "b's join and g's message are merged");
        assert_eq!(shared.merges_done(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
