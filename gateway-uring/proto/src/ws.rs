//! A WebSocket connection as a state machine, for either role.
//!
//! Bytes read from the socket go in through [`WsConn::feed`]; [`WsConn::next_event`] yields whole
//! messages (fragments are joined, control frames answered). Everything to send accumulates in one
//! output buffer ([`WsConn::output`]), so a driver writes all frames produced in a wakeup with a
//! single syscall. Pings are answered and the close handshake is completed here; the driver only
//! moves bytes and closes the socket once [`WsConn::is_closed`] and the output is flushed.
//!
//! # Memory
//! The input buffer grows to at most one frame (header + `max_message` bytes) and is compacted
//! after each frame, so an idle connection holds only what its last read left, usually nothing.

use crate::close;
use crate::frame::{self, FrameError, Opcode};

/// Which side of the connection this is; decides masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Server: expects masked frames, sends unmasked ones.
    Server,
    /// Client: sends masked frames with the mask source given at construction.
    Client,
}

/// A complete message or a control event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A text message (valid UTF-8).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping arrived (already answered with a pong).
    Ping,
    /// A pong arrived.
    Pong,
    /// The peer sent a close frame; a reply has been queued if we had not closed first.
    Close {
        /// Close code, 1005 when the frame had none.
        code: u16,
        /// Close reason.
        reason: String,
    },
}

/// A fatal protocol error: the connection has been closed with [`WsError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A frame-level violation.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A fragmented message exceeded the size limit.
    #[error("message exceeds the limit of {0} bytes")]
    MessageTooBig(usize),
    /// Text that is not UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// Continuation without a start, or a new message inside an unfinished one.
    #[error("bad fragmentation")]
    BadFragmentation,
    /// A close frame with an invalid code or reason.
    #[error("invalid close frame")]
    BadClose,
}

impl WsError {
    /// The close code the connection was closed with.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Frame(FrameError::TooLarge { .. }) | Self::MessageTooBig(_) => close::MESSAGE_TOO_BIG,
            Self::InvalidUtf8 => close::INVALID_PAYLOAD,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

/// One WebSocket connection.
#[derive(Debug)]
pub struct WsConn {
    role: Role,
    /// Largest message (and so frame payload) accepted.
    max_message: usize,
    /// Unconsumed input; `start` marks where it begins so compaction happens once per feed.
    input: Vec<u8>,
    start: usize,
    /// Opcode and bytes of a fragmented message in progress.
    partial: Option<(Opcode, Vec<u8>)>,
    output: Vec<u8>,
    /// We sent a close frame.
    close_sent: bool,
    /// The peer sent a close frame (or broke the protocol): read nothing more.
    close_received: bool,
    /// Client masking keys come from this xorshift state (masks need not be secret on loopback
    /// tests and load generation; RFC 6455 only asks that they be unpredictable to the network).
    mask_state: u64,
}

impl WsConn {
    /// A new connection. `mask_seed` matters only to clients; any non-zero value.
    pub fn new(role: Role, max_message: usize, mask_seed: u64) -> Self {
        Self {
            role,
            max_message,
            input: Vec::new(),
            start: 0,
            partial: None,
            output: Vec::new(),
            close_sent: false,
            close_received: false,
            mask_state: mask_seed | 1,
        }
    }

    /// Appends bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        }
        self.input.extend_from_slice(data);
    }

    /// Bytes buffered but not yet parsed.
    pub fn buffered(&self) -> usize {
        self.input.len() - self.start
    }

    /// Next complete event, `Ok(None)` when more input is needed. After an error the connection
    /// is closed (a close frame is queued) and no further events are produced.
    pub fn next_event(&mut self) -> Result<Option<Event>, WsError> {
        loop {
            if self.close_received {
                return Ok(None);
            }
            let before = self.start;
            match self.next_frame() {
                Ok(Some(ev)) => return Ok(Some(ev)),
                // A non-final fragment was consumed: there may be more frames behind it.
                Ok(None) if self.start > before => continue,
                Ok(None) => {
                    self.compact();
                    return Ok(None);
                }
                Err(e) => {
                    self.close_received = true;
                    self.input = Vec::new();
                    self.start = 0;
                    self.partial = None;
                    self.close(e.close_code(), &e.to_string());
                    return Err(e);
                }
            }
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        if self.input.is_empty() && self.input.capacity() > 0 {
            // Between frames a connection holds no input buffer: an idle one costs nothing
            // here (the direct engine's reads land in shared provided buffers).
            self.input = Vec::new();
        }
    }

    /// Parses one frame; `Ok(None)` if incomplete or if it was a fragment that completes nothing.
    fn next_frame(&mut self) -> Result<Option<Event>, WsError> {
        let buf = &mut self.input[self.start..];
        let Some(h) = frame::check(buf, self.max_message, self.role == Role::Server)? else {
            return Ok(None);
        };
        let Some(range) = frame::decode(buf, &h) else {
            return Ok(None);
        };
        let payload_start = self.start + range.start;
        let payload_end = self.start + range.end;
        self.start += h.frame_len();
        let payload = &self.input[payload_start..payload_end];
        match h.opcode {
            Opcode::Ping => {
                let p = payload.to_vec();
                if !self.close_sent {
                    self.send_frame(Opcode::Pong, &p);
                }
                Ok(Some(Event::Ping))
            }
            Opcode::Pong => Ok(Some(Event::Pong)),
            Opcode::Close => {
                let (code, reason) = parse_close(payload)?;
                self.close_received = true;
                if !self.close_sent {
                    let echo = if code == 1005 { close::NORMAL } else { code };
                    self.close(echo, "");
                }
                Ok(Some(Event::Close { code, reason }))
            }
            Opcode::Text | Opcode::Binary => {
                if self.partial.is_some() {
                    return Err(WsError::BadFragmentation);
                }
                if h.fin {
                    let p = payload.to_vec();
                    return finish(h.opcode, p).map(Some);
                }
                self.partial = Some((h.opcode, payload.to_vec()));
                Ok(None)
            }
            Opcode::Continuation => {
                let max = self.max_message;
                let Some((op, mut acc)) = self.partial.take() else {
                    return Err(WsError::BadFragmentation);
                };
                if acc.len() + payload.len() > max {
                    return Err(WsError::MessageTooBig(max));
                }
                acc.extend_from_slice(payload);
                if h.fin {
                    finish(op, acc).map(Some)
                } else {
                    self.partial = Some((op, acc));
                    Ok(None)
                }
            }
        }
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: &str) {
        if !self.close_sent {
            self.send_frame(Opcode::Text, text.as_bytes());
        }
    }

    /// Queues a ping.
    pub fn send_ping(&mut self, payload: &[u8]) {
        if !self.close_sent {
            self.send_frame(Opcode::Ping, &payload[..payload.len().min(125)]);
        }
    }

    /// Starts (or answers) the close handshake. Idempotent.
    pub fn close(&mut self, code: u16, reason: &str) {
        if self.close_sent {
            return;
        }
        let mut reason_bytes = reason.as_bytes();
        if reason_bytes.len() > 123 {
            let mut cut = 123;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason_bytes = &reason_bytes[..cut];
        }
        let mut p = Vec::with_capacity(2 + reason_bytes.len());
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(reason_bytes);
        self.send_frame(Opcode::Close, &p);
        self.close_sent = true;
    }

    fn send_frame(&mut self, op: Opcode, payload: &[u8]) {
        let mask = match self.role {
            Role::Server => None,
            Role::Client => Some(self.next_mask()),
        };
        frame::encode(&mut self.output, op, true, payload, mask);
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask_state = x;
        (x as u32).to_ne_bytes()
    }

    /// Bytes waiting to be written. The driver writes them and then calls [`Self::consume_output`].
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Takes the pending output, leaving an empty buffer behind.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Drops queued output that was not written yet (only whole frames are ever queued, so the
    /// stream stays well-formed). Used before closing a connection that fell behind.
    pub fn discard_output(&mut self) {
        self.output = Vec::new();
    }

    /// Marks `n` output bytes as written.
    pub fn consume_output(&mut self, n: usize) {
        self.output.drain(..n.min(self.output.len()));
    }

    /// We have sent a close frame: no more messages will be queued.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Both sides are done; once the output is flushed the socket can be closed.
    pub fn is_closed(&self) -> bool {
        self.close_sent && self.close_received
    }
}

fn finish(op: Opcode, payload: Vec<u8>) -> Result<Event, WsError> {
    match op {
        Opcode::Text => String::from_utf8(payload)
            .map(Event::Text)
            .map_err(|_| WsError::InvalidUtf8),
        _ => Ok(Event::Binary(payload)),
    }
}

fn parse_close(p: &[u8]) -> Result<(u16, String), WsError> {
    match p.len() {
        0 => Ok((1005, String::new())),
        1 => Err(WsError::BadClose),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            // RFC 6455's codes, the IANA-registered 1012-1014 (service restart, try again
            // later, bad gateway: this server sends 1012 when it stops), and the
            // application range.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(WsError::BadClose);
            }
            let reason = std::str::from_utf8(&p[2..]).map_err(|_| WsError::InvalidUtf8)?;
            Ok((code, reason.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> (WsConn, WsConn) {
        (
            WsConn::new(Role::Client, 1 << 16, 7),
            WsConn::new(Role::Server, 1 << 16, 0),
        )
    }

    fn pump(from: &mut WsConn, to: &mut WsConn) {
        let out = from.take_output();
        to.feed(&out);
    }

    #[test]
    fn text_roundtrip_both_ways() {
        let (mut c, mut s) = pair();
        c.send_text("hello");
        pump(&mut c, &mut s);
        assert_eq!(s.next_event().unwrap(), Some(Event::Text("hello".into())));
        assert_eq!(s.next_event().unwrap(), None);
        s.send_text("world");
        pump(&mut s, &mut c);
        assert_eq!(c.next_event().unwrap(), Some(Event::Text("world".into())));
    }

    #[test]
    fn ping_is_answered_and_close_completes() {
        let (mut c, mut s) = pair();
        c.send_ping(b"x");
        pump(&mut c, &mut s);
        assert_eq!(s.next_event().unwrap(), Some(Event::Ping));
        pump(&mut s, &mut c);
        assert_eq!(c.next_event().unwrap(), Some(Event::Pong));
        s.close(close::REPLACED, "replaced");
        pump(&mut s, &mut c);
        assert_eq!(
            c.next_event().unwrap(),
            Some(Event::Close {
                code: 4001,
                reason: "replaced".into()
            })
        );
        assert!(c.is_closed());
        pump(&mut c, &mut s);
        assert!(matches!(s.next_event().unwrap(), Some(Event::Close { code: 4001, .. })));
        assert!(s.is_closed());
    }

    #[test]
    fn a_service_restart_close_is_read_and_reserved_codes_are_refused() {
        let (mut c, mut s) = pair();
        s.close(close::SERVICE_RESTART, "service restart");
        pump(&mut s, &mut c);
        assert!(matches!(c.next_event().unwrap(), Some(Event::Close { code: 1012, .. })));
        for code in [1004u16, 1005, 1006, 1015, 2000, 5000] {
            let mut c = WsConn::new(Role::Client, 1 << 16, 7);
            let mut bytes = Vec::new();
            frame::encode(&mut bytes, Opcode::Close, true, &code.to_be_bytes(), None);
            c.feed(&bytes);
            assert!(c.next_event().is_err(), "close code {code} is refused");
        }
    }

    #[test]
    fn fragments_join_and_interleaved_control_frames_pass() {
        let mut s = WsConn::new(Role::Server, 100, 0);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, Opcode::Text, false, b"he", Some([1, 2, 3, 4]));
        frame::encode(&mut bytes, Opcode::Ping, true, b"", Some([1, 2, 3, 4]));
        frame::encode(&mut bytes, Opcode::Continuation, true, b"llo", Some([5, 6, 7, 8]));
        s.feed(&bytes);
        assert_eq!(s.next_event().unwrap(), Some(Event::Ping));
        assert_eq!(s.next_event().unwrap(), Some(Event::Text("hello".into())));
    }

    #[test]
    fn errors_close_with_the_right_code() {
        let mut s = WsConn::new(Role::Server, 10, 0);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, Opcode::Text, true, &[b'a'; 11], Some([1, 1, 1, 1]));
        s.feed(&bytes);
        let e = s.next_event().unwrap_err();
        assert_eq!(e.close_code(), close::MESSAGE_TOO_BIG);
        assert!(s.close_sent());
        assert_eq!(s.next_event().unwrap(), None);

        let mut s = WsConn::new(Role::Server, 10, 0);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, Opcode::Text, true, &[0xff, 0xfe], Some([1, 1, 1, 1]));
        s.feed(&bytes);
        assert_eq!(s.next_event().unwrap_err().close_code(), close::INVALID_PAYLOAD);

        let mut s = WsConn::new(Role::Server, 10, 0);
        s.feed(&[0x81, 0x01, b'a']); // unmasked client frame
        assert_eq!(s.next_event().unwrap_err().close_code(), close::PROTOCOL_ERROR);
    }

    proptest! {
        /// Any split of a stream of messages into reads yields the same messages.
        #[test]
        fn any_read_split_yields_same_messages(msgs in proptest::collection::vec("[a-z0-9]{0,300}", 1..8),
                                               split in 1usize..50) {
            let mut c = WsConn::new(Role::Client, 1 << 16, 99);
            let mut s = WsConn::new(Role::Server, 1 << 16, 0);
            for m in &msgs { c.send_text(m); }
            let out = c.take_output();
            let mut got = Vec::new();
            for chunk in out.chunks(split) {
                s.feed(chunk);
                while let Some(ev) = s.next_event().unwrap() { got.push(ev); }
            }
            let want: Vec<Event> = msgs.iter().map(|m| Event::Text(m.clone())).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(s.buffered(), 0);
        }

        /// Arbitrary input never panics, and an error always queues a close frame.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut s = WsConn::new(Role::Server, 64, 0);
            s.feed(&bytes);
            loop {
                match s.next_event() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => { prop_assert!(s.close_sent()); break; }
                }
            }
        }
    }
}
