//! RFC 6455 frame codec.
//!
//! Decoding runs in two phases, as mini-redis does: [`check`] reads only the header and says how
//! many bytes the whole frame needs (or that more input is needed, which is `Ok(None)`, not an
//! error), so an oversized frame is refused before a byte of it is buffered; [`decode`] then
//! unmasks the payload in place. Encoding appends to a caller-owned buffer so a connection can
//! batch many frames into one write.

use thiserror::Error;

/// Frame opcodes (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Connection close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Control frames (close, ping, pong) may not be fragmented and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Why a frame could not be decoded. Each maps to a close code in [`crate::close`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// RSV bits set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame with FIN clear or a payload over 125 bytes.
    #[error("malformed control frame")]
    BadControlFrame,
    /// A client frame without a mask (server role) or a server frame with one (client role).
    #[error("frame masking does not match the peer's role")]
    BadMasking,
    /// The payload length is larger than the configured limit.
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Declared payload length.
        len: u64,
        /// Configured limit.
        limit: usize,
    },
    /// A 64-bit length with the most significant bit set, or a non-minimal length encoding.
    #[error("invalid payload length encoding")]
    BadLength,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Final fragment of a message.
    pub fin: bool,
    /// The frame's opcode.
    pub opcode: Opcode,
    /// The masking key, present on every client-to-server frame.
    pub mask: Option<[u8; 4]>,
    /// Header length in bytes (2 to 14).
    pub header_len: usize,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl Header {
    /// Total frame length: header plus payload.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Phase one: reads the header from `buf`. `Ok(None)` means more bytes are needed to know.
///
/// `expect_masked` is true on the server (clients must mask) and false on a client.
pub fn check(buf: &[u8], max_payload: usize, expect_masked: bool) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    if masked != expect_masked {
        return Err(FrameError::BadMasking);
    }
    let len7 = b1 & 0x7F;
    let (payload_len, mut header_len): (u64, usize) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let n = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if n < 126 {
                return Err(FrameError::BadLength);
            }
            (n, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 || n <= u16::MAX as u64 {
                return Err(FrameError::BadLength);
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        return Err(FrameError::BadControlFrame);
    }
    if payload_len > max_payload as u64 {
        return Err(FrameError::TooLarge {
            len: payload_len,
            limit: max_payload,
        });
    }
    let mask = if masked {
        if buf.len() < header_len + 4 {
            return Ok(None);
        }
        let mut m = [0u8; 4];
        m.copy_from_slice(&buf[header_len..header_len + 4]);
        header_len += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        // Bounded by `max_payload`, which is a usize.
        payload_len: payload_len as usize,
    }))
}

/// Phase two: given a header from [`check`] and a buffer holding the whole frame, unmasks the
/// payload in place and returns its range within `buf`.
///
/// Returns `None` if `buf` is still shorter than the frame.
pub fn decode(buf: &mut [u8], header: &Header) -> Option<std::ops::Range<usize>> {
    let end = header.frame_len();
    if buf.len() < end {
        return None;
    }
    let payload = &mut buf[header.header_len..end];
    if let Some(mask) = header.mask {
        apply_mask(payload, mask);
    }
    Some(header.header_len..end)
}

/// XORs `data` with the 4-byte masking key (RFC 6455 section 5.3).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends one complete frame to `out`. `mask` is `Some` on a client, `None` on a server.
pub fn encode(out: &mut Vec<u8>, opcode: Opcode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) {
    let b0 = (if fin { 0x80 } else { 0 }) | opcode.as_u8();
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    out.reserve(len + 14);
    out.push(b0);
    if len < 126 {
        out.push(mbit | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(mbit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], m);
        }
        None => out.extend_from_slice(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn incomplete_is_none() {
        assert_eq!(check(&[0x81], 100, true), Ok(None));
        assert_eq!(check(&[0x81, 0x85, 1, 2], 100, true), Ok(None));
    }

    #[test]
    fn rfc_example_masked_hello() {
        // RFC 6455 section 5.7: a masked "Hello".
        let mut f = vec![0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let h = check(&f, 100, true).unwrap().unwrap();
        assert_eq!(h.payload_len, 5);
        let r = decode(&mut f, &h).unwrap();
        assert_eq!(&f[r], b"Hello");
    }

    #[test]
    fn refuses_oversize_before_buffering() {
        let f = [0x82, 0xFF, 0, 0, 0, 0, 0, 2, 0, 0];
        assert!(matches!(check(&f, 65536, true), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(check(&[0xC1, 0x80], 10, true), Err(FrameError::ReservedBits));
        assert_eq!(check(&[0x83, 0x80], 10, true), Err(FrameError::UnknownOpcode(3)));
        assert_eq!(check(&[0x81, 0x00], 10, true), Err(FrameError::BadMasking));
        assert_eq!(check(&[0x09, 0x80], 10, true), Err(FrameError::BadControlFrame));
        assert_eq!(check(&[0x81, 0xFE, 0, 5], 10, true), Err(FrameError::BadLength));
    }

    proptest! {
        #[test]
        fn encode_then_decode_roundtrips(payload in proptest::collection::vec(any::<u8>(), 0..70_000),
                                         mask in any::<[u8; 4]>(), fin in any::<bool>()) {
            let mut out = Vec::new();
            encode(&mut out, Opcode::Binary, fin, &payload, Some(mask));
            let h = check(&out, 1 << 20, true).unwrap().unwrap();
            prop_assert_eq!(h.frame_len(), out.len());
            prop_assert_eq!(h.fin, fin);
            let r = decode(&mut out, &h).unwrap();
            prop_assert_eq!(&out[r], &payload[..]);
        }

        #[test]
        fn every_prefix_is_incomplete_not_error(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = Vec::new();
            encode(&mut out, Opcode::Text, true, &payload, None);
            for cut in 0..out.len() {
                let r = check(&out[..cut], 1024, false).unwrap();
                if let Some(h) = r {
                    prop_assert!(h.frame_len() > cut);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), masked in any::<bool>()) {
            let mut b = bytes.clone();
            if let Ok(Some(h)) = check(&b, 1 << 16, masked) {
                let _ = decode(&mut b, &h);
            }
        }
    }
}
