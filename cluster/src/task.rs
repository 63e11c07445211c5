//! The task process's flow, the seed's `msg_to_mongo`: the bitmap work of group read receipts.
//!
//! With `--read-bitmaps task`, a services process does not write a receipt's read bitmaps
//! itself. It hands the receipt's [`ReadMark`] (reader, slot, the seq range it read) to
//! `msg_to_mongo` ([`KafkaReadMarks`]: keyed by conversation, `acks=all`) before the read
//! position commits, then answers the client. Task processes ([`ReadMarkWriter`]) read their
//! share of the topic (`--kafka-share i/M`, as the services do `ws2ms_chat`), gather up to
//! [`MAX_BATCH`] marks or what arrives within [`GATHER`] of the first, write them with one
//! [`MessageStore::add_readers`] (each message's readers in one write: a group of 200 that all
//! read a message costs one bitmap write, not 200), and only then commit the offsets. After a
//! crash the uncommitted marks are read again; writing a reader twice changes nothing.
//!
//! Why the bitmaps and not the chat log: a message is in the log before its ack, so that no
//! acked message depends on a queue; who has read what may trail by a batch.
//!
//! # Bounds
//! - A batch holds at most [`MAX_BATCH`] marks.
//! - A store that is unavailable is retried, backing off to [`MAX_BACKOFF`]; meanwhile the
//!   writer reads nothing more (the marks wait in Kafka, bounded by the topic's retention).
//! - A mark the store refuses for good (a corrupt bitmap) is logged and skipped, not retried
//!   forever; its batch's other marks are written one by one.
//! - A services process's producer refuses a mark at once when its queue is full
//!   ([`crate::kafka::PRODUCER_QUEUE`]): the receipt fails with `service_unavailable` and its
//!   read position stays where it was.

use crate::kafka::{commit, KafkaSettings, LibrdkafkaLog, ReadErrors};
use crate::pipeline::pb;
use async_trait::async_trait;
use prost::Message as _;
use rdkafka::consumer::{CommitMode, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use sai_storage::{MessageStore, ReadBitmapCodec, ReadMark, ReadMarkSink, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Marks written by one [`MessageStore::add_readers`] call.
pub const MAX_BATCH: usize = 1024;

/// How long a batch waits for more marks after its first.
const GATHER: Duration = Duration::from_millis(5);

/// The longest wait between two tries of a store that is unavailable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A services process's way into `msg_to_mongo`.
pub struct KafkaReadMarks {
    producer: FutureProducer<LibrdkafkaLog>,
    topic: String,
}

impl KafkaReadMarks {
    /// A producer to `settings`' `msg_to_mongo` (created first if missing).
    pub async fn connect(settings: &KafkaSettings) -> Result<Self, String> {
        settings.ensure_topics().await?;
        Ok(Self {
            producer: settings.producer("read-marks")?,
            topic: settings.msg_to_mongo(),
        })
    }
}

#[async_trait]
impl ReadMarkSink for KafkaReadMarks {
    async fn hand(&self, mark: ReadMark) -> Result<(), String> {
        let bytes = record_of(mark.clone()).encode_to_vec();
        let record = FutureRecord::to(&self.topic)
            .key(mark.conversation_id.as_bytes())
            .payload(&bytes);
        // A full queue refuses at once; the broker has `message.timeout.ms` (`CALL_TIMEOUT`).
        self.producer
            .send(record, Timeout::After(Duration::ZERO))
            .await
            .map(|_| ())
            .map_err(|(e, _)| format!("msg_to_mongo: {e}"))
    }
}

/// A task process's writer of read marks, running until [`Self::stop`].
pub struct ReadMarkWriter {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadMarkWriter {
    /// Starts reading this process's share of `msg_to_mongo` (`settings.share`) from the
    /// offsets committed before, writing its marks to `store` in `codec`.
    pub async fn start(
        settings: &KafkaSettings,
        store: Arc<dyn MessageStore>,
        codec: Arc<dyn ReadBitmapCodec>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, String> {
        settings.ensure_topics().await?;
        let topic = settings.msg_to_mongo();
        let consumer = settings.share_of(&topic, "task").await?;
        let (stop, mut stopped) = watch::channel(false);
        let task = runtime.spawn(async move {
            let mut errors = ReadErrors::default();
            let mut written = BTreeMap::new();
            loop {
                let batch = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    batch = gather(&consumer, &topic, &mut errors) => batch,
                };
                let mut offsets = BTreeMap::new();
                let mut marks = Vec::with_capacity(batch.len());
                for m in &batch {
                    offsets.insert(m.partition(), m.offset());
                    match pb::ReadMarkRecord::decode(m.payload().unwrap_or_default()) {
                        Ok(r) => marks.push(mark_of(r)),
                        Err(e) => tracing::warn!(error = %e, "malformed msg_to_mongo record skipped"),
                    }
                }
                if !write(&*store, &*codec, &marks, &mut stopped).await {
                    break;
                }
                written.extend(offsets.iter().map(|(p, o)| (*p, *o)));
                commit(&consumer, &topic, offsets, CommitMode::Async);
            }
            // What is written is committed before the process goes.
            commit(&consumer, &topic, written, CommitMode::Sync);
        });
        Ok(Self { stop, task })
    }

    /// Stops once the batch in hand is written (or, with the store down, left for the next
    /// start to read again) and the offsets written are committed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "the read mark writer ended abnormally");
        }
    }
}

/// The next batch: a first record, then what else arrives within [`GATHER`], at most
/// [`MAX_BATCH`]. Empty after a read error (logged, then a pause).
async fn gather(consumer: &StreamConsumer<LibrdkafkaLog>, topic: &str, errors: &mut ReadErrors) -> Vec<OwnedMessage> {
    let first = match consumer.recv().await {
        Ok(m) => m.detach(),
        Err(e) => {
            errors.record(topic, &e);
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Vec::new();
        }
    };
    let mut batch = vec![first];
    let until = tokio::time::Instant::now() + GATHER;
    while batch.len() < MAX_BATCH {
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => {
                errors.record(topic, &e);
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

/// How one try of a write ended.
enum Outcome {
    Written,
    /// Asked to stop while the store was unavailable.
    Stopped,
    /// Refused for good (not retryable).
    Refused(StoreError),
}

/// Writes `marks`; false when asked to stop before they were written. A batch refused for good
/// is written one mark at a time, skipping (and logging) the marks refused.
async fn write(
    store: &dyn MessageStore,
    codec: &dyn ReadBitmapCodec,
    marks: &[ReadMark],
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    if marks.is_empty() {
        return true;
    }
    match write_retrying(store, codec, marks, stopped).await {
        Outcome::Written => return true,
        Outcome::Stopped => return false,
        Outcome::Refused(e) => {
            tracing::warn!(error = %e, marks = marks.len(), "a batch of read marks was refused; writing them one by one");
        }
    }
    for m in marks {
        match write_retrying(store, codec, std::slice::from_ref(m), stopped).await {
            Outcome::Written => {}
            Outcome::Stopped => return false,
            Outcome::Refused(e) => tracing::error!(
                conversation = %m.conversation_id,
                user = %m.user_id,
                error = %e,
                "read mark skipped: the store cannot apply it"
            ),
        }
    }
    true
}

/// Writes `marks`, trying again while the store is unavailable.
async fn write_retrying(
    store: &dyn MessageStore,
    codec: &dyn ReadBitmapCodec,
    marks: &[ReadMark],
    stopped: &mut watch::Receiver<bool>,
) -> Outcome {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.add_readers(marks, codec).await {
            Ok(changed) => {
                tracing::debug!(marks = marks.len(), bitmaps = changed, "read marks written");
                return Outcome::Written;
            }
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "writing read marks failed");
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return Outcome::Stopped,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Outcome::Refused(e),
        }
    }
}

fn record_of(m: ReadMark) -> pb::ReadMarkRecord {
    pb::ReadMarkRecord {
        conversation_id: m.conversation_id,
        user_id: m.user_id,
        slot: m.slot,
        after_seq: m.after_seq,
        up_to_seq: m.up_to_seq,
    }
}

fn mark_of(r: pb::ReadMarkRecord) -> ReadMark {
    ReadMark {
        conversation_id: r.conversation_id,
        user_id: r.user_id,
        slot: r.slot,
        after_seq: r.after_seq,
        up_to_seq: r.up_to_seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_survives_its_record() {
        let mark = ReadMark {
            conversation_id: "sg_g1".into(),
            user_id: "u7".into(),
            slot: 41,
            after_seq: 3,
            up_to_seq: u64::MAX,
        };
        let bytes = record_of(mark.clone()).encode_to_vec();
        let back = pb::ReadMarkRecord::decode(bytes.as_slice()).map(mark_of);
        assert_eq!(back.ok(), Some(mark));
    }
}
