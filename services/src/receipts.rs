//! Read-receipt bitmaps: which member slots of a group have read a message.
//!
//! Stored bytes are tagged with a format number ([`sai_storage::ReadRecord::format`]):
//! - format 2, written now: the project's own `sai-bitmap` format, read in place (count and
//!   membership straight from the bytes, no decoding into a heap structure);
//! - format 1: roaring's portable serialization, written before `sai-bitmap` existed; still read,
//!   and rewritten as format 2 the next time a reader is added to that message. No migration
//!   step is needed.

use roaring::RoaringBitmap;
use sai_bitmap::{Bitmap, View};
use sai_storage::ReadBitmapCodec;

/// Format 1: `roaring` portable serialization (read only).
pub const FORMAT_ROARING: u8 = 1;
/// Format 2: `sai-bitmap` version 1 bytes.
pub const FORMAT_SAI: u8 = 2;

/// Largest bitmap accepted from storage, in bytes (a full 100,000-member bitset is 12.5 KB).
const MAX_BITMAP_BYTES: usize = 1 << 20;

/// The codec the services write with.
#[derive(Debug, Default, Clone, Copy)]
pub struct SaiCodec;

/// A stored read record, ready to answer count / contains / iterate.
pub enum Readers<'a> {
    /// Read in place.
    Sai(View<'a>),
    /// Decoded from the legacy format.
    Roaring(RoaringBitmap),
}

impl Readers<'_> {
    /// Readers.
    pub fn len(&self) -> u64 {
        match self {
            Readers::Sai(v) => v.len(),
            Readers::Roaring(r) => r.len(),
        }
    }

    /// No reader.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the member in `slot` read it.
    pub fn contains(&self, slot: u32) -> bool {
        match self {
            Readers::Sai(v) => v.contains(slot),
            Readers::Roaring(r) => r.contains(slot),
        }
    }

    /// The readers' slots, ascending.
    pub fn slots(&self) -> Vec<u32> {
        match self {
            Readers::Sai(v) => v.iter().collect(),
            Readers::Roaring(r) => r.iter().collect(),
        }
    }
}

/// Reads a stored bitmap of any known format; corrupt bytes are an error, never a panic.
pub fn decode(format: u8, bytes: &[u8]) -> Result<Readers<'_>, String> {
    if bytes.len() > MAX_BITMAP_BYTES {
        return Err(format!("read bitmap of {} bytes exceeds the limit", bytes.len()));
    }
    match format {
        FORMAT_SAI => sai_bitmap::validate(bytes)
            .map(Readers::Sai)
            .map_err(|e| format!("read bitmap: {e}")),
        FORMAT_ROARING => RoaringBitmap::deserialize_from(bytes)
            .map(Readers::Roaring)
            .map_err(|e| format!("read bitmap: {e}")),
        other => Err(format!("unknown read bitmap format {other}")),
    }
}

impl ReadBitmapCodec for SaiCodec {
    fn format(&self) -> u8 {
        FORMAT_SAI
    }

    fn insert(&self, existing: Option<(u8, &[u8])>, slot: u32) -> Result<Vec<u8>, String> {
        let mut bm: Bitmap = match existing {
            None => Bitmap::new(),
            // Spliced into the stored bytes, without decoding them.
            Some((FORMAT_SAI, bytes)) => {
                return sai_bitmap::validate(bytes)
                    .map(|v| v.inserted(slot))
                    .map_err(|e| format!("read bitmap: {e}"))
            }
            Some((format, bytes)) => decode(format, bytes)?.slots().into_iter().collect(),
        };
        bm.insert(slot);
        Ok(bm.serialize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_sai_and_still_reads_roaring_records() {
        let c = SaiCodec;
        let a = c.insert(None, 3).unwrap();
        let b = c.insert(Some((FORMAT_SAI, &a)), 1000).unwrap();
        let r = decode(FORMAT_SAI, &b).unwrap();
        assert_eq!((r.len(), r.slots()), (2, vec![3, 1000]));
        // A record stored by the roaring codec before sai-bitmap: read, then upgraded on write.
        let mut legacy = Vec::new();
        RoaringBitmap::from_iter([5u32, 7]).serialize_into(&mut legacy).unwrap();
        assert_eq!(decode(FORMAT_ROARING, &legacy).unwrap().slots(), vec![5, 7]);
        let upgraded = c.insert(Some((FORMAT_ROARING, &legacy)), 9).unwrap();
        assert_eq!(decode(FORMAT_SAI, &upgraded).unwrap().slots(), vec![5, 7, 9]);
        assert!(decode(FORMAT_ROARING, b"garbage").is_err());
        assert!(decode(FORMAT_SAI, b"garbage").is_err());
        assert!(decode(9, &b).is_err());
        assert!(c.insert(Some((FORMAT_SAI, b"x")), 1).is_err());
    }
}
