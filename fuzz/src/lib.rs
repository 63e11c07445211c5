//! The bodies of the fuzz targets, one function each, so that they can also be run over the
//! committed corpora by `cargo test` (see `tests/corpus.rs`) without AFL.
//!
//! Each body takes arbitrary bytes and may return early or see an error, but must never panic,
//! hang or grow without bound; where an invariant can be checked cheaply, it is asserted.

use sai_proto::session::{Session, SessionConfig};
use sai_proto::ws::{Event, Role, WsConn};
use std::time::{Duration, Instant};

/// Largest message the codec targets accept (small, so that size limits are reached).
const MAX_MESSAGE: usize = 4096;

/// The WebSocket frame codec (server side): the input is cut into reads at points taken from
/// its first bytes; every event is consumed until the codec wants more or closes.
pub fn frame(data: &[u8]) {
    let (cuts, rest) = data.split_at(data.len().min(2));
    let mut ws = WsConn::new(Role::Server, MAX_MESSAGE, 1);
    let mut chunks = Vec::new();
    let mut at = 0;
    for &c in cuts {
        let end = (at + usize::from(c)).min(rest.len());
        chunks.push(&rest[at..end]);
        at = end;
    }
    chunks.push(&rest[at..]);
    for chunk in chunks {
        ws.feed(chunk);
        let waiting = loop {
            match ws.next_event() {
                Ok(Some(Event::Text(t))) => assert!(t.len() <= MAX_MESSAGE, "message over the limit"),
                Ok(Some(Event::Binary(b))) => assert!(b.len() <= MAX_MESSAGE, "message over the limit"),
                Ok(Some(_)) => {}
                Ok(None) => break !ws.is_closed(),
                Err(_) => break false,
            }
        };
        if waiting {
            // What waits for more input is one incomplete frame: a header (at most 14 bytes)
            // and a payload within the limit, never more.
            assert!(ws.buffered() <= MAX_MESSAGE + 14, "{} bytes buffered", ws.buffered());
        }
    }
}

/// The HTTP upgrade parser: a request it accepts is within the input and answerable.
pub fn handshake(data: &[u8]) {
    if let Ok(Some(req)) = sai_proto::handshake::parse_request(data) {
        assert!(req.len <= data.len(), "request longer than its input");
        let answer = sai_proto::handshake::response_101(&req.key, req.protocols.first().map(String::as_str));
        assert!(answer.starts_with(b"HTTP/1.1 101"));
    }
}

/// Client text messages: the IM request parser and the JSON depth measure, then a whole
/// server session fed the same bytes as WebSocket input.
pub fn im(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sai_proto::im::parse_request(text);
        assert!(sai_pipeline::message::json_depth(text) <= text.len());
    }
    let now = Instant::now();
    let cfg = SessionConfig {
        max_message_bytes: MAX_MESSAGE,
        ..SessionConfig::default()
    };
    let mut s = Session::new(cfg, now);
    s.handle_bytes(now, data);
    while s.poll_request().is_some() {}
    let _ = s.take_output();
    s.handle_timeout(now + Duration::from_secs(3600));
}

/// The read-receipt bitmap deserializer: an error, or an exact round trip (see
/// `sai_bitmap::format::fuzz_bytes`).
pub fn bitmap(data: &[u8]) {
    sai_bitmap::format::fuzz_bytes(data);
}
