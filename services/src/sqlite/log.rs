//! The message log: appends and received positions as checksummed records in append-only segment
//! files beside the database, read back only after a crash.
//!
//! # Layout
//! `<database>.msglog/<generation>` (20 digits), one segment per merge: the writer appends to the
//! newest; the merger takes a segment's records from memory, writes them into SQLite and deletes the
//! file once that commit is durable. Segments still present at start-up hold records that may not
//! be in the tables yet; they are merged (idempotently) before anything else runs.
//!
//! # Record
//! `len: u32 LE | crc32(payload): u32 LE | payload` (`len` bytes), payload =
//! - `1 | seq u64 | chat_type u8 | send_time i64 | conversation_id | send_id | recv_id |
//!   client_msg_id | msg_id | body | member count u32 | members...` (a message), or
//! - `2 | seq u64 | conversation_id | user_id` (a received position),
//!
//! every string as `len u32 | UTF-8`, every integer little-endian. A torn or corrupt record ends
//! the segment's replay (only the last segment's tail can be torn: a write interrupted by a crash).

use sai_storage::StoredMessage;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest payload replay accepts (a message is bounded far below this by the gateway's frame
/// limit); a larger length is read as corruption, not allocated.
const MAX_PAYLOAD: usize = 64 << 20;

const MESSAGE: u8 = 1;
const RECEIVED: u8 = 2;

/// One logged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record {
    /// A new message with its seq; `members` join the conversation on its first message.
    Message { msg: StoredMessage, members: Vec<String> },
    /// A member's received position rises to `seq`.
    Received {
        conversation_id: String,
        user_id: String,
        seq: u64,
    },
}

impl Record {
    /// Appends the framed record to `out`.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 8]);
        match self {
            Record::Message { msg, members } => {
                out.push(MESSAGE);
                out.extend_from_slice(&msg.seq.to_le_bytes());
                out.push(msg.chat_type);
                out.extend_from_slice(&msg.send_time.to_le_bytes());
                for s in [
                    &msg.conversation_id,
                    &msg.send_id,
                    &msg.recv_id,
                    &msg.client_msg_id,
                    &msg.msg_id,
                    &msg.body,
                ] {
                    put_str(out, s);
                }
                out.extend_from_slice(&len_u32(members.len()).to_le_bytes());
                for m in members {
                    put_str(out, m);
                }
            }
            Record::Received {
                conversation_id,
                user_id,
                seq,
            } => {
                out.push(RECEIVED);
                out.extend_from_slice(&seq.to_le_bytes());
                put_str(out, conversation_id);
                put_str(out, user_id);
            }
        }
        let payload = &out[start + 8..];
        let len = len_u32(payload.len()).to_le_bytes();
        let crc = crc32fast::hash(payload).to_le_bytes();
        out[start..start + 4].copy_from_slice(&len);
        out[start + 4..start + 8].copy_from_slice(&crc);
    }

    /// Bytes this record keeps alive in memory while it waits for its merge (for the bound).
    pub(super) fn size(&self) -> usize {
        match self {
            Record::Message { msg, members } => {
                128 + msg.conversation_id.len()
                    + msg.send_id.len()
                    + msg.recv_id.len()
                    + msg.client_msg_id.len()
                    + msg.msg_id.len()
                    + msg.body.len()
                    + members.iter().map(|m| 24 + m.len()).sum::<usize>()
            }
            Record::Received {
                conversation_id,
                user_id,
                ..
            } => 64 + conversation_id.len() + user_id.len(),
        }
    }
}

/// Decodes the records of one segment; stops at the first torn or corrupt one and says so.
pub(super) fn decode_all(mut bytes: &[u8]) -> (Vec<Record>, Option<String>) {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        match decode_one(bytes) {
            Ok((r, used)) => {
                records.push(r);
                bytes = &bytes[used..];
            }
            Err(why) => return (records, Some(why)),
        }
    }
    (records, None)
}

fn decode_one(bytes: &[u8]) -> Result<(Record, usize), String> {
    let mut r = Reader(bytes);
    let len = r.u32()? as usize;
    let crc = r.u32()?;
    if len > MAX_PAYLOAD {
        return Err(format!("record length {len} past the limit"));
    }
    let payload = r.take(len)?;
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let mut p = Reader(payload);
    let record = match p.u8()? {
        MESSAGE => {
            let seq = p.u64()?;
            let chat_type = p.u8()?;
            let send_time = p.u64()? as i64;
            let conversation_id = p.string()?;
            let send_id = p.string()?;
            let recv_id = p.string()?;
            let client_msg_id = p.string()?;
            let msg_id = p.string()?;
            let body = p.string()?;
            let n = p.u32()?;
            let mut members = Vec::new();
            for _ in 0..n {
                members.push(p.string()?);
            }
            Record::Message {
                msg: StoredMessage {
                    conversation_id,
                    chat_type,
                    seq,
                    send_id,
                    recv_id,
                    client_msg_id,
                    msg_id,
                    send_time,
                    body,
                },
                members,
            }
        }
        RECEIVED => {
            let seq = p.u64()?;
            Record::Received {
                conversation_id: p.string()?,
                user_id: p.string()?,
                seq,
            }
        }
        kind => return Err(format!("unknown record kind {kind}")),
    };
    if !p.0.is_empty() {
        return Err("trailing bytes in a record".into());
    }
    Ok((record, 8 + len))
}

/// A little-endian cursor over a record.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("torn record".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&len_u32(s.len()).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Lengths come from strings the services bounded long before (frames are at most a few MiB).
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The segment directory of a database file.
pub(super) fn dir_of(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".msglog");
    db.with_file_name(name)
}

/// The segment file of one generation.
pub(super) fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}"))
}

/// The generations present in `dir`, oldest first (files with other names are left alone).
pub(super) fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(g) = name.to_str().filter(|n| n.len() == 20).and_then(|n| n.parse().ok()) {
            found.push(g);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The segment being appended to.
pub(super) struct Segment {
    pub(super) generation: u64,
    file: std::fs::File,
    len: u64,
}

impl Segment {
    /// Creates the segment file of `generation` (it must not exist).
    pub(super) fn create(dir: &Path, generation: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(segment_path(dir, generation))?;
        Ok(Self {
            generation,
            file,
            len: 0,
        })
    }

    /// Appends framed records with one `write`. A write that fails part-way is cut back off, so a
    /// later record never follows a torn one; if even that fails the segment is unusable.
    pub(super) fn append(&mut self, bytes: &[u8]) -> Result<(), AppendError> {
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => match self.file.set_len(self.len) {
                Ok(()) => Err(AppendError::Refused(e)),
                Err(cut) => Err(AppendError::Broken(format!("{e}; cutting the torn tail failed: {cut}"))),
            },
        }
    }
}

/// Why [`Segment::append`] failed.
pub(super) enum AppendError {
    /// Nothing of the write is in the segment; a later write may succeed.
    Refused(std::io::Error),
    /// The segment may end in a torn record; no more writes may follow.
    Broken(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, body: &str, members: &[&str]) -> Record {
        Record::Message {
            msg: StoredMessage {
                conversation_id: "si_a_b".into(),
                chat_type: 2,
                seq,
                send_id: "a".into(),
                recv_id: "b".into(),
                client_msg_id: format!("c{seq}"),
                msg_id: format!("m{seq}"),
                send_time: -5,
                body: body.into(),
            },
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn records_round_trip() {
        let records = vec![
            message(1, r#"{"text":"héllo"}"#, &["a", "b"]),
            Record::Received {
                conversation_id: "si_a_b".into(),
                user_id: "b".into(),
                seq: u64::MAX,
            },
            message(2, "", &[]),
        ];
        let mut bytes = Vec::new();
        for r in &records {
            r.encode(&mut bytes);
        }
        assert_eq!(decode_all(&bytes), (records, None));
    }

    #[test]
    fn replay_stops_at_a_torn_or_corrupt_record() {
        let mut bytes = Vec::new();
        message(1, "one", &[]).encode(&mut bytes);
        let whole = bytes.len();
        message(2, "two", &[]).encode(&mut bytes);
        for cut in whole + 1..bytes.len() {
            let (got, why) = decode_all(&bytes[..cut]);
            assert_eq!(got, vec![message(1, "one", &[])], "cut at {cut}");
            assert!(why.is_some());
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let (got, why) = decode_all(&flipped);
        assert_eq!((got.len(), why.as_deref()), (1, Some("checksum mismatch")));
        let mut huge = bytes[..whole].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(
            decode_all(&huge).0.len(),
            1,
            "a huge length is corruption, not an allocation"
        );
    }

    #[test]
    fn segments_are_listed_oldest_first() {
        let dir = std::env::temp_dir().join(format!("sai-msglog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for g in [10, 2, 7] {
            Segment::create(&dir, g).unwrap();
        }
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        assert_eq!(segments(&dir).unwrap(), vec![2, 7, 10]);
        assert!(Segment::create(&dir, 7).is_err(), "a generation is never reopened");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
