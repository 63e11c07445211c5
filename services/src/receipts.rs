//! Read-receipt bitmaps: which member slots of a group have read a message.
//!
//! Stored bytes are tagged with a format number ([`sai_storage::ReadRecord::format`]):
//! format 1 is roaring's portable serialization. The project's own bitmap crate will add a format
//! and read format 1, so stored bitmaps stay readable with no migration step.

use roaring::RoaringBitmap;
use sai_storage::ReadBitmapCodec;

/// Format 1: `roaring` portable serialization.
pub const FORMAT_ROARING: u8 = 1;

/// Largest bitmap accepted from storage, in bytes (a full 100,000-member bitmap is ~12.5 KB).
const MAX_BITMAP_BYTES: usize = 1 << 20;

/// The codec the services write with.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoaringCodec;

/// Decodes a stored bitmap of any known format.
pub fn decode(format: u8, bytes: &[u8]) -> Result<RoaringBitmap, String> {
    if bytes.len() > MAX_BITMAP_BYTES {
        return Err(format!("read bitmap of {} bytes exceeds the limit", bytes.len()));
    }
    match format {
        FORMAT_ROARING => RoaringBitmap::deserialize_from(bytes).map_err(|e| format!("read bitmap: {e}")),
        other => Err(format!("unknown read bitmap format {other}")),
    }
}

impl ReadBitmapCodec for RoaringCodec {
    fn format(&self) -> u8 {
        FORMAT_ROARING
    }

    fn insert(&self, existing: Option<(u8, &[u8])>, slot: u32) -> Result<Vec<u8>, String> {
        let mut bm = match existing {
            Some((format, bytes)) => decode(format, bytes)?,
            None => RoaringBitmap::new(),
        };
        bm.insert(slot);
        let mut out = Vec::with_capacity(bm.serialized_size());
        bm.serialize_into(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_roundtrips_and_bad_bytes_are_errors() {
        let c = RoaringCodec;
        let a = c.insert(None, 3).unwrap();
        let b = c.insert(Some((FORMAT_ROARING, &a)), 1000).unwrap();
        let bm = decode(FORMAT_ROARING, &b).unwrap();
        assert_eq!(bm.iter().collect::<Vec<_>>(), vec![3, 1000]);
        assert!(decode(FORMAT_ROARING, b"garbage").is_err());
        assert!(decode(9, &b).is_err());
        assert!(c.insert(Some((FORMAT_ROARING, b"x")), 1).is_err());
    }
}
