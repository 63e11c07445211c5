//! The chat log in MongoDB (`--chat-log mongodb://host:port/database`): every message a document
//! of the collection `messages`, its read bitmap a Binary field of the same document
//! (`readRecords`, as the seed stores it). MySQL keeps everything else (conversations and their
//! seq high-water mark, members and read positions).
//!
//! **Seqs stay gapless across the two stores.** An append bumps the conversation's `max_seq` in
//! a MySQL transaction, which holds the conversation row's lock, writes the documents while it
//! holds it, and commits after MongoDB acknowledged them (journaled). So:
//! - a committed seq always has its document: no gap;
//! - a crash or a rollback after the documents were written leaves *orphans*: documents above
//!   the conversation's committed `max_seq`. Readers never see them (every read is bounded by
//!   the `max_seq` read from MySQL first), the next append to the conversation deletes every
//!   document at or above its first seq before it writes (nobody else can write there while it
//!   holds the lock), and a dedupe lookup ignores them;
//! - the idempotency key `(sendId, clientMsgId)` is a unique index here, and a batch is
//!   inserted without looking its keys up first: a key stored before, a key held by an orphan,
//!   or an orphan in the way make the insert fail, the transaction roll back, and the batch go
//!   one append at a time, each looking its key up (stored and committed: the original is the
//!   answer) and deleting its conversation's orphans before it writes.
//!
//! Indexes: unique `(conversationId, seq)`, `(conversationId, sendTime)` for time queries, and
//! unique `(sendId, clientMsgId)`.

use super::Key;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, Document};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, IndexModel};
use sai_storage::{ReadBitmapCodec, ReadMark, ReadRecord, StoreError, StoreResult, StoredMessage};
use std::collections::BTreeMap;
use std::time::Duration;

/// The collection of the chat log.
const COLLECTION: &str = "messages";

/// Database when the URL names none.
const DEFAULT_DATABASE: &str = "sai_im";

/// Longest wait for a server before a call fails as unavailable.
const SELECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Rounds of a read-bitmap update that lost to a concurrent reader of the same message before
/// the call fails (each round rereads the bitmap).
const BITMAP_ATTEMPTS: usize = 16;

/// MongoDB's duplicate-key error.
const DUPLICATE_KEY: i32 = 11000;

/// The chat log collection.
pub struct MongoLog {
    client: Client,
    messages: Collection<Document>,
}

fn unavailable(e: MongoError) -> StoreError {
    StoreError::Unavailable(format!("MongoDB: {e}"))
}

fn corrupt(what: &str) -> impl Fn(mongodb::bson::document::ValueAccessError) -> StoreError + '_ {
    move |e| StoreError::Corrupt(format!("chat log document field {what}: {e}"))
}

/// Whether `e` is a refusal by a unique index.
fn duplicate_key(e: &MongoError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().any(|w| w.code == DUPLICATE_KEY)),
        _ => false,
    }
}

fn seq_bson(seq: u64) -> Bson {
    Bson::Int64(i64::try_from(seq).unwrap_or(i64::MAX))
}

fn message_doc(m: &StoredMessage) -> Document {
    doc! {
        "conversationId": &m.conversation_id,
        "seq": seq_bson(m.seq),
        "chatType": i32::from(m.chat_type),
        "sendId": &m.send_id,
        "recvId": &m.recv_id,
        "clientMsgId": &m.client_msg_id,
        "msgId": &m.msg_id,
        "sendTime": m.send_time,
        "content": &m.body,
        "readVersion": 0_i64,
    }
}

fn message_from_doc(d: &Document) -> StoreResult<StoredMessage> {
    let seq = d.get_i64("seq").map_err(corrupt("seq"))?;
    let chat_type = d.get_i32("chatType").map_err(corrupt("chatType"))?;
    Ok(StoredMessage {
        conversation_id: d.get_str("conversationId").map_err(corrupt("conversationId"))?.into(),
        chat_type: u8::try_from(chat_type).map_err(|_| StoreError::Corrupt(format!("chatType {chat_type}")))?,
        seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("seq {seq}")))?,
        send_id: d.get_str("sendId").map_err(corrupt("sendId"))?.into(),
        recv_id: d.get_str("recvId").map_err(corrupt("recvId"))?.into(),
        client_msg_id: d.get_str("clientMsgId").map_err(corrupt("clientMsgId"))?.into(),
        msg_id: d.get_str("msgId").map_err(corrupt("msgId"))?.into(),
        send_time: d.get_i64("sendTime").map_err(corrupt("sendTime"))?,
        body: d.get_str("content").map_err(corrupt("content"))?.into(),
    })
}

/// The fields a message is read with (not its bitmap).
fn message_fields() -> Document {
    doc! { "readRecords": 0, "readFormat": 0, "readVersion": 0 }
}

impl MongoLog {
    /// Connects to `url` and creates the collection's indexes (once; they exist afterwards).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let mut opts = ClientOptions::parse(url)
            .await
            .map_err(|e| StoreError::Unavailable(format!("chat log URL: {e}")))?;
        opts.server_selection_timeout.get_or_insert(SELECT_TIMEOUT);
        opts.connect_timeout.get_or_insert(SELECT_TIMEOUT);
        opts.app_name.get_or_insert_with(|| "sai-im".into());
        // An append is acked to its sender only once its document is on the journal.
        opts.write_concern
            .get_or_insert_with(|| WriteConcern::builder().journal(true).build());
        let database = opts.default_database.clone().unwrap_or_else(|| DEFAULT_DATABASE.into());
        let client = Client::with_options(opts).map_err(unavailable)?;
        let messages = client.database(&database).collection::<Document>(COLLECTION);
        let index = |keys: Document, name: &str, unique: bool| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_string()).unique(unique).build())
                .build()
        };
        messages
            .create_indexes([
                index(doc! { "conversationId": 1, "seq": 1 }, "conversation_seq", true),
                index(doc! { "conversationId": 1, "sendTime": 1 }, "conversation_time", false),
                index(doc! { "sendId": 1, "clientMsgId": 1 }, "idempotency", true),
            ])
            .await
            .map_err(unavailable)?;
        Ok(Self { client, messages })
    }

    /// Closes the connections.
    pub async fn close(&self) {
        self.client.clone().shutdown().await;
    }

    /// Documents under any of `keys`, orphans included (the caller drops those above their
    /// conversation's committed seq). One equality query per key, on the idempotency index
    /// (SecantusDB scans the collection for an `$or`).
    pub(super) async fn stored(&self, keys: &[Key]) -> StoreResult<Vec<StoredMessage>> {
        let mut out = Vec::new();
        for (s, c) in keys {
            out.extend(
                self.find(doc! { "sendId": s, "clientMsgId": c }, doc! {}, Some(1))
                    .await?,
            );
        }
        Ok(out)
    }

    /// Deletes every document of the conversation at or above `from_seq`: orphans of appends
    /// that never committed. Called with the conversation's row locked.
    pub(super) async fn clear_orphans(&self, conversation_id: &str, from_seq: u64) -> StoreResult<()> {
        self.messages
            .delete_many(doc! { "conversationId": conversation_id, "seq": { "$gte": seq_bson(from_seq) } })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Writes `msgs` in one batch; `false` when a unique index refused one (an idempotency key
    /// held by another document): the caller appends one at a time.
    pub(super) async fn insert(&self, msgs: &[StoredMessage]) -> StoreResult<bool> {
        if msgs.is_empty() {
            return Ok(true);
        }
        match self.messages.insert_many(msgs.iter().map(message_doc)).await {
            Ok(_) => Ok(true),
            Err(e) if duplicate_key(&e) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Messages with `lo < seq <= hi`, ascending or newest first, at most `limit`.
    pub(super) async fn range(
        &self,
        conversation_id: &str,
        lo: u64,
        hi: u64,
        ascending: bool,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        if lo >= hi || limit == 0 {
            return Ok(Vec::new());
        }
        let filter = doc! {
            "conversationId": conversation_id,
            "seq": { "$gt": seq_bson(lo), "$lte": seq_bson(hi) },
        };
        let order = if ascending { 1 } else { -1 };
        self.find(filter, doc! { "seq": order }, Some(limit)).await
    }

    /// Messages with `lo < seq <= hi` not sent by `user`.
    pub(super) async fn count_not_by(&self, conversation_id: &str, lo: u64, hi: u64, user: &str) -> StoreResult<u64> {
        if lo >= hi {
            return Ok(0);
        }
        self.messages
            .count_documents(doc! {
                "conversationId": conversation_id,
                "seq": { "$gt": seq_bson(lo), "$lte": seq_bson(hi) },
                "sendId": { "$ne": user },
            })
            .await
            .map_err(unavailable)
    }

    /// The seqs of messages with `lo < seq <= hi` not sent by `user`, ascending.
    async fn seqs_not_by(&self, conversation_id: &str, lo: u64, hi: u64, user: &str) -> StoreResult<Vec<u64>> {
        if lo >= hi {
            return Ok(Vec::new());
        }
        let mut cursor = self
            .messages
            .find(doc! {
                "conversationId": conversation_id,
                "seq": { "$gt": seq_bson(lo), "$lte": seq_bson(hi) },
                "sendId": { "$ne": user },
            })
            .projection(doc! { "seq": 1 })
            .sort(doc! { "seq": 1 })
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        while cursor.advance().await.map_err(unavailable)? {
            let d = cursor.deserialize_current().map_err(unavailable)?;
            let seq = d.get_i64("seq").map_err(corrupt("seq"))?;
            out.push(u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("seq {seq}")))?);
        }
        Ok(out)
    }

    /// [`sai_storage::MessageStore::add_readers`]: each message's readers in one write.
    pub(super) async fn add_readers(&self, marks: &[ReadMark], codec: &dyn ReadBitmapCodec) -> StoreResult<u64> {
        let mut readers: BTreeMap<(&str, u64), Vec<u32>> = BTreeMap::new();
        for m in marks {
            for seq in self
                .seqs_not_by(&m.conversation_id, m.after_seq, m.up_to_seq, &m.user_id)
                .await?
            {
                readers.entry((&m.conversation_id, seq)).or_default().push(m.slot);
            }
        }
        let mut changed = 0;
        for ((conversation_id, seq), slots) in readers {
            if self.add_to_bitmap(conversation_id, seq, &slots, codec).await? {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Adds `slots` to the read bitmap of message `seq`: read, encode, and write only if no other
    /// reader wrote it meanwhile (its `readVersion` is unchanged), else again. False when the
    /// bitmap held them all already.
    async fn add_to_bitmap(
        &self,
        conversation_id: &str,
        seq: u64,
        slots: &[u32],
        codec: &dyn ReadBitmapCodec,
    ) -> StoreResult<bool> {
        let at = doc! { "conversationId": conversation_id, "seq": seq_bson(seq) };
        for _ in 0..BITMAP_ATTEMPTS {
            let Some(d) = self
                .messages
                .find_one(at.clone())
                .projection(doc! { "readRecords": 1, "readFormat": 1, "readVersion": 1 })
                .await
                .map_err(unavailable)?
            else {
                return Err(StoreError::Corrupt(format!("{conversation_id} #{seq} has no document")));
            };
            let version = d.get_i64("readVersion").unwrap_or(0);
            let Some(record) = ReadRecord::with_readers(record_of(&d)?, slots, codec)? else {
                return Ok(false);
            };
            let mut unchanged = at.clone();
            unchanged.insert("readVersion", version);
            let update = doc! { "$set": {
                "readRecords": Binary { subtype: BinarySubtype::Generic, bytes: record.bytes },
                "readFormat": i32::from(record.format),
                "readVersion": version + 1,
            } };
            let done = self.messages.update_one(unchanged, update).await.map_err(unavailable)?;
            if done.matched_count == 1 {
                return Ok(true);
            }
        }
        Err(StoreError::Unavailable(format!(
            "the read bitmap of {conversation_id} #{seq} kept changing; retry"
        )))
    }

    /// The read bitmap of message `seq`, if anyone has read it.
    pub(super) async fn read_record(&self, conversation_id: &str, seq: u64) -> StoreResult<Option<ReadRecord>> {
        let d = self
            .messages
            .find_one(doc! { "conversationId": conversation_id, "seq": seq_bson(seq) })
            .projection(doc! { "readRecords": 1, "readFormat": 1 })
            .await
            .map_err(unavailable)?;
        match d {
            Some(d) => record_of(&d),
            None => Ok(None),
        }
    }

    async fn find(&self, filter: Document, sort: Document, limit: Option<u32>) -> StoreResult<Vec<StoredMessage>> {
        let mut find = self.messages.find(filter).projection(message_fields()).sort(sort);
        if let Some(n) = limit {
            find = find.limit(i64::from(n));
        }
        let mut cursor = find.await.map_err(unavailable)?;
        let mut out = Vec::new();
        while cursor.advance().await.map_err(unavailable)? {
            out.push(message_from_doc(&cursor.deserialize_current().map_err(unavailable)?)?);
        }
        Ok(out)
    }
}

fn record_of(d: &Document) -> StoreResult<Option<ReadRecord>> {
    let Ok(bytes) = d.get_binary_generic("readRecords") else {
        return Ok(None);
    };
    let format = d.get_i32("readFormat").map_err(corrupt("readFormat"))?;
    Ok(Some(ReadRecord {
        format: u8::try_from(format).map_err(|_| StoreError::Corrupt(format!("readFormat {format}")))?,
        bytes: bytes.clone(),
    }))
}
