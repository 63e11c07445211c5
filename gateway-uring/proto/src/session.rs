//! The server side of one IM connection, sans-IO: bytes and `now` go in; requests, frames to
//! write and the next deadline come out (the shape of quinn-proto's `Connection`).
//!
//! A [`Session`] owns the WebSocket state ([`WsConn`]), the idle and close-grace deadlines, the
//! rigor pending set and its resends, the batching of push acks, and the order of requests. A
//! driver (the monoio gateway, a future direct io_uring engine) only moves bytes and time:
//!
//! ```text
//! read n bytes   -> handle_bytes(now, bytes); then poll_request() until None
//! timer fires    -> handle_timeout(now)
//! after either   -> take_output() to write; poll_timeout() to re-arm; should_drop() to close
//! pipeline reply -> send(now, frame) / push(now, &push_frame) / close(now, code, reason)
//! ```
//!
//! [`ClientSession`] is the other half, as the load generator drives it: the client's WebSocket
//! state, its heartbeat deadline and the acks of pushes in rigor mode.
//!
//! # Numbers
//! Requests parsed from one read are queued until polled: at most what one read buffer holds
//! (a 4 KiB read is at most ~200 minimal frames); the driver applies backpressure by not
//! reading while its own bounded request queue is full. Output is bounded by
//! [`SessionConfig::max_outbound_bytes`]: one frame more closes the session with 4003 (the
//! client reconnects and syncs; messages are durable, nothing is lost). Rigor pushes are bounded
//! by [`PendingConfig::capacity`].

use crate::close;
use crate::im::{self, ErrorCode, Request};
use crate::pending::{Pending, PendingConfig};
use crate::stats::Counters;
use crate::ws::{Event, Role, WsConn};
use sai_pipeline::frame::{error_frame, ping_frame, PushFrame};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of a session (per connection).
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Close with 4002 after this long without inbound bytes.
    pub idle_timeout: Duration,
    /// After our close frame, how long the peer gets to answer before the socket is dropped.
    pub close_grace: Duration,
    /// Largest inbound message; a bigger one closes with 1009.
    pub max_message_bytes: usize,
    /// Most bytes queued for writing; past it the session closes with 4003.
    pub max_outbound_bytes: usize,
    /// Rigor mode: pushes must be acked by the client and are resent until they are.
    pub rigor: bool,
    /// Rigor resend policy.
    pub pending: PendingConfig,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            close_grace: Duration::from_secs(3),
            max_message_bytes: 64 * 1024,
            max_outbound_bytes: 1024 * 1024,
            rigor: false,
            pending: PendingConfig::default(),
        }
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    /// Shared by every session of a gateway: one copy, not one per connection.
    cfg: Arc<SessionConfig>,
    ws: WsConn,
    /// Inbound silence past this closes the session (4002).
    idle_at: Instant,
    /// Set when our close frame is queued: the socket is dropped at this time if still open.
    close_at: Option<Instant>,
    /// The close grace ran out: the driver drops the socket.
    expired: bool,
    pending: Pending<(Arc<str>, u64)>,
    /// Highest acked push seq per conversation since the last [`Session::take_received`]
    /// (at most one entry per pending push, so a short list searched in place).
    received: Vec<(Arc<str>, u64)>,
    requests: VecDeque<Request>,
    /// The shard's counters, when the driver counts ([`Self::with_counters`]).
    counters: Option<Arc<Counters>>,
    /// Output bytes last added to the counters' `outbound_bytes` (see [`Self::account`]).
    accounted: usize,
    /// The gateway is stopping ([`Self::stop`]): new requests are refused.
    stopping: bool,
}

impl Session {
    /// A session whose upgrade completed at `now`. A driver hands every session the same
    /// `Arc<SessionConfig>`.
    pub fn new(cfg: impl Into<Arc<SessionConfig>>, now: Instant) -> Self {
        let cfg = cfg.into();
        Self {
            ws: WsConn::new(Role::Server, cfg.max_message_bytes, 0),
            idle_at: now + cfg.idle_timeout,
            close_at: None,
            expired: false,
            pending: Pending::new(),
            received: Vec::new(),
            cfg,
            requests: VecDeque::new(),
            counters: None,
            accounted: 0,
            stopping: false,
        }
    }

    /// Counts what this session does into `counters` (its shard's), from its start to its drop.
    pub fn with_counters(mut self, counters: Arc<Counters>) -> Self {
        Counters::add(&counters.sessions_started, 1);
        self.counters = Some(counters);
        self
    }

    fn count(&self, f: impl FnOnce(&Counters)) {
        if let Some(c) = &self.counters {
            f(c);
        }
    }

    /// Brings the counters' `outbound_bytes` up to date with the bytes this session holds for
    /// writing (called after everything that adds to them or takes them).
    fn account(&mut self) {
        let now = self.ws.output().len();
        if now != self.accounted {
            let delta = now as i64 - self.accounted as i64;
            self.count(|c| {
                c.outbound_bytes.fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
            });
            self.accounted = now;
        }
    }

    /// Bytes read from the socket at `now`: every complete frame is handled. Pings are answered
    /// and push acks recorded here; requests that need the pipeline wait for
    /// [`Self::poll_request`]. A protocol violation queues the close frame and starts the grace.
    ///
    /// Only complete frames count as activity: a client that trickles a partial frame a byte at
    /// a time is still closed at the idle deadline. Pongs (queued by the WebSocket layer for each
    /// ping) count against the outbound bound like any frame: a ping flood from a client that
    /// never reads is closed with 4003.
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) {
        self.read(now, bytes);
        // Pongs and the echo of a close are queued by the WebSocket layer itself.
        self.account();
    }

    fn read(&mut self, now: Instant, bytes: &[u8]) {
        self.count(|c| Counters::add(&c.bytes_in, bytes.len() as u64));
        self.ws.feed(bytes);
        loop {
            let event = self.ws.next_event();
            if let Ok(Some(_)) = event {
                self.idle_at = now + self.cfg.idle_timeout;
            }
            if let Ok(Some(Event::Text(_) | Event::Binary(_))) = &event {
                self.count(|c| Counters::add(&c.messages_in, 1));
            }
            match event {
                Ok(Some(Event::Text(t))) => self.handle_text(now, &t),
                Ok(Some(Event::Binary(_))) => {
                    let e = error_frame(
                        None,
                        ErrorCode::UnsupportedMessageType.as_str(),
                        "binary messages are not supported; send JSON text frames",
                    );
                    self.send(now, &e);
                }
                Ok(Some(Event::Ping)) => {
                    if self.ws.output().len() > self.cfg.max_outbound_bytes {
                        self.overflow(now);
                        return;
                    }
                }
                Ok(Some(Event::Pong)) => {}
                Ok(Some(Event::Close { .. })) => {
                    // Our reply is queued; the driver closes once it is written.
                    if self.close_at.is_none() {
                        self.count(|c| Counters::add(&c.client_closes, 1));
                    }
                    self.arm_close(now);
                    return;
                }
                Ok(None) => return,
                Err(e) => {
                    // The close frame with the violation's code is queued.
                    if self.close_at.is_none() {
                        self.count(|c| c.closed(e.close_code()));
                    }
                    self.arm_close(now);
                    return;
                }
            }
        }
    }

    fn handle_text(&mut self, now: Instant, text: &str) {
        match im::parse_request(text) {
            Ok(Request::Ping) => {
                self.send(now, &ping_frame());
            }
            Ok(Request::Ack { id }) => {
                if let Some((conversation, seq)) = self.pending.ack(&id) {
                    match self.received.iter_mut().find(|(c, _)| *c == conversation) {
                        Some((_, s)) => *s = (*s).max(seq),
                        None => self.received.push((conversation, seq)),
                    }
                }
            }
            Ok(other) if self.stopping => {
                let e = error_frame(
                    other.id(),
                    ErrorCode::Unavailable.as_str(),
                    "the server is restarting: send it again once reconnected",
                );
                self.send(now, &e);
            }
            Ok(other) => self.requests.push_back(other),
            Err(e) => {
                self.send(now, &e.to_frame());
            }
        }
    }

    /// The gateway is stopping: requests read from now on are answered `service_unavailable`
    /// and not carried out (the client sends them again once it has reconnected), while those
    /// already queued still are; the driver closes with 1012 once they are answered
    /// ([`Self::queued_requests`] is 0 and none is running), so their acks reach the client.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// The next request for the pipeline, in the order the client sent them.
    pub fn poll_request(&mut self) -> Option<Request> {
        let r = self.requests.pop_front();
        if self.requests.is_empty() && self.requests.capacity() > 0 {
            // An idle connection holds no queue (a million of them would hold 32 MiB).
            self.requests = VecDeque::new();
        }
        r
    }

    /// Requests parsed and not yet polled: a driver stops reading past its bound.
    pub fn queued_requests(&self) -> usize {
        self.requests.len()
    }

    /// Time has come to `now`: drops the socket once the close grace is over, closes an idle
    /// session (4002), resends due rigor pushes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.close_at {
            if now >= at {
                self.expired = true;
            }
            return;
        }
        if now >= self.idle_at {
            self.close(now, close::IDLE_TIMEOUT, "idle timeout");
            return;
        }
        let mut due = Vec::new();
        self.pending.poll(&self.cfg.pending, now, &mut due);
        self.count(|c| Counters::add(&c.resends, due.len() as u64));
        for frame in due {
            if !self.send(now, &frame) {
                return;
            }
        }
    }

    /// When [`Self::handle_timeout`] next has work; `None` once the socket is to be dropped.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.expired {
            return None;
        }
        if let Some(at) = self.close_at {
            return Some(at);
        }
        Some(match self.pending.next_deadline() {
            Some(resend) => resend.min(self.idle_at),
            None => self.idle_at,
        })
    }

    /// Queues a text frame. Past the outbound bound the queue is dropped and the session closed
    /// with 4003. Returns whether the frame was queued (false once closing).
    pub fn send(&mut self, now: Instant, text: &str) -> bool {
        if self.ws.close_sent() {
            return false;
        }
        if self.ws.output().len() + text.len() > self.cfg.max_outbound_bytes {
            self.overflow(now);
            return false;
        }
        self.ws.send_text(text);
        self.count(|c| Counters::add(&c.messages_out, 1));
        self.account();
        true
    }

    /// The client does not read what it is sent: the backlog is dropped (whole frames only, so
    /// the stream stays well-formed) and the session closed with 4003; it reconnects and syncs.
    fn overflow(&mut self, now: Instant) {
        self.ws.discard_output();
        self.close(now, close::SLOW_CONSUMER, "outbound queue overflow: reconnect and sync");
    }

    /// Queues a push with a fresh push id; in rigor mode it is tracked until acked.
    pub fn push(&mut self, now: Instant, push: &PushFrame) {
        let id = self.pending.allocate();
        let frame = push.frame(id);
        if !self.send(now, &frame) {
            return;
        }
        self.count(|c| Counters::add(&c.pushes, 1));
        if self.cfg.rigor {
            if self.pending.len() >= self.cfg.pending.capacity.max(1) {
                self.count(|c| Counters::add(&c.pending_evictions, 1));
            }
            let tag = (push.conversation_id.clone(), push.seq);
            self.pending.track(&self.cfg.pending, id, frame, tag, now);
        }
    }

    /// Starts the close handshake with `code` (idempotent); the socket is dropped after the
    /// grace if the peer does not finish it.
    pub fn close(&mut self, now: Instant, code: u16, reason: &str) {
        if !self.ws.close_sent() {
            self.ws.close(code, reason);
            self.count(|c| c.closed(code));
        }
        self.account();
        self.arm_close(now);
    }

    fn arm_close(&mut self, now: Instant) {
        if self.close_at.is_none() {
            self.close_at = Some(now + self.cfg.close_grace);
        }
    }

    /// The pushes the client acked since the last call: (conversation, highest seq).
    pub fn take_received(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.received)
            .into_iter()
            .map(|(c, s)| (c.to_string(), s))
            .collect()
    }

    /// Whether acked pushes wait for [`Self::take_received`].
    pub fn has_received(&self) -> bool {
        !self.received.is_empty()
    }

    /// Takes the bytes to write (`poll_transmit`).
    pub fn take_output(&mut self) -> Vec<u8> {
        let out = self.ws.take_output();
        self.count(|c| Counters::add(&c.bytes_out, out.len() as u64));
        self.account();
        out
    }

    /// Bytes waiting to be written.
    pub fn output_len(&self) -> usize {
        self.ws.output().len()
    }

    /// Our close frame is queued: nothing more will be.
    pub fn close_sent(&self) -> bool {
        self.ws.close_sent()
    }

    /// Both sides closed: read nothing more; drop the socket once the output is written.
    pub fn is_closed(&self) -> bool {
        self.ws.is_closed()
    }

    /// The close grace is over: drop the socket now.
    pub fn should_drop(&self) -> bool {
        self.expired
    }

    /// Unacked rigor pushes held.
    pub fn pending_pushes(&self) -> usize {
        self.pending.len()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let held = self.accounted as i64;
        self.count(|c| {
            Counters::add(&c.sessions_ended, 1);
            c.outbound_bytes.fetch_sub(held, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

/// The client side of one IM connection, sans-IO: the WebSocket (masked frames), the heartbeat
/// deadline, and in rigor mode the ack of every push.
#[derive(Debug)]
pub struct ClientSession {
    ws: WsConn,
    heartbeat: Duration,
    /// The next `{"frameType":1}` is due then.
    ping_at: Instant,
    rigor: bool,
}

impl ClientSession {
    /// A session whose upgrade completed at `now`; frames are masked from `mask_seed`.
    pub fn new(mask_seed: u64, max_message_bytes: usize, heartbeat: Duration, rigor: bool, now: Instant) -> Self {
        Self {
            ws: WsConn::new(Role::Client, max_message_bytes, mask_seed),
            heartbeat,
            ping_at: now + heartbeat,
            rigor,
        }
    }

    /// Bytes read from the socket (or that came with the upgrade response).
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.ws.feed(bytes);
    }

    /// The next event from the server; after an error the session is closed.
    pub fn poll_event(&mut self) -> Result<Option<Event>, crate::ws::WsError> {
        self.ws.next_event()
    }

    /// Acknowledges push `id` when the server asks for acks (rigor); returns whether it did.
    pub fn ack_push(&mut self, id: &str) -> bool {
        if self.rigor {
            self.ws.send_text(&format!("{{\"frameType\":2,\"id\":\"{id}\"}}"));
        }
        self.rigor
    }

    /// Queues a text frame.
    pub fn send(&mut self, text: &str) {
        self.ws.send_text(text);
    }

    /// Sends the heartbeat when it is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.ping_at {
            self.ws.send_text(&ping_frame());
            self.ping_at = now + self.heartbeat;
        }
    }

    /// When the next heartbeat is due.
    pub fn poll_timeout(&self) -> Instant {
        self.ping_at
    }

    /// Starts the close handshake.
    pub fn close(&mut self, code: u16) {
        self.ws.close(code, "");
    }

    /// Takes the bytes to write.
    pub fn take_output(&mut self) -> Vec<u8> {
        self.ws.take_output()
    }

    /// Nothing waits to be written.
    pub fn output_is_empty(&self) -> bool {
        self.ws.output().is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests take one base instant; every `now` derives from it.
mod tests {
    use super::*;
    use crate::frame::{self as wsframe, Opcode};
    use sai_pipeline::message::Push;
    use serde_json::value::RawValue;

    /// A client frame as a browser would send it.
    fn client_text(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        wsframe::encode(&mut out, Opcode::Text, true, text.as_bytes(), Some([1, 2, 3, 4]));
        out
    }

    /// The text frames in server output (unmasked).
    fn texts(bytes: &[u8]) -> Vec<String> {
        let mut client = WsConn::new(Role::Client, 1 << 20, 7);
        client.feed(bytes);
        let mut out = Vec::new();
        while let Ok(Some(ev)) = client.next_event() {
            match ev {
                Event::Text(t) => out.push(t),
                Event::Close { code, .. } => out.push(format!("close {code}")),
                _ => {}
            }
        }
        out
    }

    fn push(seq: u64) -> PushFrame {
        PushFrame::new(&Push {
            conversation_id: "si_a_b".into(),
            chat_type: 2,
            send_id: "a".into(),
            recv_id: "b".into(),
            seq,
            msg_id: format!("m{seq}"),
            client_msg_id: format!("c{seq}"),
            send_time: 0,
            msg: RawValue::from_string("{}".into()).unwrap(),
        })
    }

    fn cfg() -> SessionConfig {
        SessionConfig {
            idle_timeout: Duration::from_secs(60),
            close_grace: Duration::from_secs(3),
            ..SessionConfig::default()
        }
    }

    #[test]
    fn a_counted_session_counts_its_traffic_and_its_close() {
        let t0 = Instant::now();
        let counters = Arc::new(Counters::default());
        let mut s = Session::new(cfg(), t0).with_counters(counters.clone());
        assert_eq!(counters.sessions(), 1);
        let inbound = client_text(r#"{"frameType":1}"#);
        s.handle_bytes(t0, &inbound);
        s.push(t0, &push(1));
        let out = s.take_output();
        assert_eq!(texts(&out).len(), 2, "the heartbeat's answer and the push");
        s.close(t0, close::SLOW_CONSUMER, "test");
        s.close(t0, close::SLOW_CONSUMER, "again: one close");
        let get = Counters::get;
        assert_eq!(
            (get(&counters.messages_in), get(&counters.bytes_in)),
            (1, inbound.len() as u64)
        );
        assert_eq!(
            (
                get(&counters.messages_out),
                get(&counters.pushes),
                get(&counters.bytes_out)
            ),
            (2, 1, out.len() as u64)
        );
        assert!(counters.closes().any(|c| c == (Some(close::SLOW_CONSUMER), 1)));
        let queued = counters.outbound_bytes.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(queued, s.output_len() as i64, "the close frame, not yet taken");
        assert!(queued > 0);
        drop(s);
        assert_eq!(counters.sessions(), 0);
        assert_eq!(counters.outbound_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn idle_closes_at_the_deadline_and_traffic_moves_it() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        s.handle_timeout(t0 + Duration::from_secs(59));
        assert!(!s.close_sent(), "not idle yet");
        // A heartbeat at 30 s moves the deadline to 90 s and is answered.
        s.handle_bytes(t0 + Duration::from_secs(30), &client_text(r#"{"frameType":1}"#));
        assert_eq!(texts(&s.take_output()), vec![r#"{"frameType":1}"#]);
        s.handle_timeout(t0 + Duration::from_secs(60));
        assert!(!s.close_sent(), "the heartbeat reset the idle deadline");
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(90)));
        s.handle_timeout(t0 + Duration::from_secs(90));
        assert_eq!(texts(&s.take_output()), vec!["close 4002"]);
        // The peer never answers: the socket is dropped after the grace, not before.
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(93)));
        s.handle_timeout(t0 + Duration::from_millis(92_999));
        assert!(!s.should_drop());
        s.handle_timeout(t0 + Duration::from_secs(93));
        assert!(s.should_drop());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_peer_close_is_answered_and_finishes_the_session() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        let mut close = Vec::new();
        wsframe::encode(
            &mut close,
            Opcode::Close,
            true,
            &1000u16.to_be_bytes(),
            Some([9, 9, 9, 9]),
        );
        s.handle_bytes(t0, &close);
        assert!(s.is_closed());
        assert_eq!(texts(&s.take_output()), vec!["close 1000"]);
    }

    #[test]
    fn requests_come_out_in_order_and_bad_frames_get_error_frames() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        let mut bytes =
            client_text(r#"{"id":"1","method":"conversation.markChat","data":{"conversationId":"c","readSeq":1}}"#);
        bytes.extend(client_text("not json"));
        bytes.extend(client_text(r#"{"id":"2","method":"conversation.sync"}"#));
        // Split anywhere: the session buffers partial frames.
        s.handle_bytes(t0, &bytes[..7]);
        s.handle_bytes(t0, &bytes[7..]);
        assert!(matches!(s.poll_request(), Some(Request::MarkRead { id: Some(id), .. }) if id == "1"));
        assert!(matches!(s.poll_request(), Some(Request::Sync { id: Some(id), .. }) if id == "2"));
        assert!(s.poll_request().is_none());
        let out = texts(&s.take_output());
        assert_eq!(out.len(), 1);
        assert!(out[0].contains("invalid_json"), "{out:?}");
    }

    #[test]
    fn a_stopping_session_refuses_new_requests_and_keeps_the_queued_ones() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        s.handle_bytes(t0, &client_text(r#"{"id":"1","method":"conversation.sync"}"#));
        s.stop();
        s.handle_bytes(t0, &client_text(r#"{"id":"2","method":"conversation.sync"}"#));
        s.handle_bytes(t0, &client_text(r#"{"frameType":1}"#));
        assert!(matches!(s.poll_request(), Some(Request::Sync { id: Some(id), .. }) if id == "1"));
        assert!(
            s.poll_request().is_none(),
            "the request after the stop is not carried out"
        );
        let out = texts(&s.take_output());
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].contains(r#""id":"2""#) && out[0].contains("service_unavailable"),
            "{out:?}"
        );
        assert!(
            out[1].contains(r#""frameType":1"#),
            "heartbeats are still answered: {out:?}"
        );
    }

    #[test]
    fn a_protocol_violation_closes_with_its_code_and_starts_the_grace() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        let mut unmasked = Vec::new();
        wsframe::encode(&mut unmasked, Opcode::Text, true, b"{}", None);
        s.handle_bytes(t0, &unmasked);
        assert_eq!(texts(&s.take_output()), vec!["close 1002"]);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    }

    #[test]
    fn rigor_pushes_are_resent_on_the_backoff_until_acked() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig { rigor: true, ..cfg() }, t0);
        s.push(t0, &push(1));
        s.push(t0, &push(2));
        let first = texts(&s.take_output());
        assert_eq!(first.len(), 2);
        assert!(first[0].starts_with(r#"{"frameType":0,"id":"1","method":"push""#));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        // The client acks push 2 only.
        s.handle_bytes(
            t0 + Duration::from_millis(10),
            &client_text(r#"{"frameType":2,"id":"2"}"#),
        );
        assert_eq!(s.take_received(), vec![("si_a_b".to_string(), 2)]);
        assert!(!s.has_received());
        // Push 1 is resent with the same id after 2 s, then 4 s later, 8 s, 16 s (capped), 4 times.
        let mut at = t0;
        for gap in [2, 4, 8, 16] {
            at += Duration::from_secs(gap);
            s.handle_timeout(at - Duration::from_millis(1));
            assert!(s.take_output().is_empty(), "not due {gap} s in");
            s.handle_timeout(at);
            assert_eq!(texts(&s.take_output()), vec![first[0].clone()], "resend after {gap} s");
            // Keep the session from going idle.
            s.handle_bytes(at, &client_text(r#"{"frameType":1}"#));
            let _ = s.take_output();
        }
        at += Duration::from_secs(16);
        s.handle_timeout(at);
        assert!(texts(&s.take_output()).is_empty(), "given up after 4 resends");
        assert_eq!(s.pending_pushes(), 0);
    }

    #[test]
    fn an_ack_stops_the_resends() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig { rigor: true, ..cfg() }, t0);
        s.push(t0, &push(5));
        let _ = s.take_output();
        s.handle_bytes(t0 + Duration::from_secs(1), &client_text(r#"{"frameType":2,"id":"1"}"#));
        s.handle_timeout(t0 + Duration::from_secs(30));
        assert!(s.take_output().is_empty());
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + Duration::from_secs(61)),
            "only the idle deadline is left"
        );
    }

    #[test]
    fn pushes_are_not_tracked_outside_rigor() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        s.push(t0, &push(1));
        assert_eq!(s.pending_pushes(), 0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_ping_flood_that_is_never_read_is_closed_with_4003() {
        let t0 = Instant::now();
        let mut s = Session::new(
            SessionConfig {
                max_outbound_bytes: 10_000,
                ..cfg()
            },
            t0,
        );
        let mut ping = Vec::new();
        wsframe::encode(&mut ping, Opcode::Ping, true, &[7; 100], Some([1, 2, 3, 4]));
        let flood: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1_000).collect();
        s.handle_bytes(t0, &flood);
        assert!(s.close_sent(), "closed");
        let out = s.take_output();
        assert!(
            out.len() < 200,
            "the pong backlog was dropped: {} bytes left",
            out.len()
        );
        assert_eq!(texts(&out), vec!["close 4003"]);
    }

    #[test]
    fn a_trickled_partial_frame_does_not_keep_the_session_alive() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        let frame = client_text(&format!(r#"{{"frameType":1,"pad":"{}"}}"#, "x".repeat(200)));
        // One byte a second: the frame never completes within the idle timeout.
        for sec in 0..60u64 {
            s.handle_bytes(t0 + Duration::from_secs(sec), &frame[sec as usize..sec as usize + 1]);
        }
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        s.handle_timeout(t0 + Duration::from_secs(60));
        assert_eq!(texts(&s.take_output()), vec!["close 4002"]);
    }

    #[test]
    fn a_client_session_talks_to_a_server_session() {
        let t0 = Instant::now();
        let mut server = Session::new(SessionConfig { rigor: true, ..cfg() }, t0);
        let mut client = ClientSession::new(42, 1 << 20, Duration::from_secs(20), true, t0);
        // Heartbeats every 20 s, on the virtual clock.
        assert_eq!(client.poll_timeout(), t0 + Duration::from_secs(20));
        client.handle_timeout(t0 + Duration::from_secs(19));
        assert!(client.output_is_empty());
        client.handle_timeout(t0 + Duration::from_secs(20));
        assert_eq!(client.poll_timeout(), t0 + Duration::from_secs(40));
        server.handle_bytes(t0 + Duration::from_secs(20), &client.take_output());
        client.handle_bytes(&server.take_output());
        assert_eq!(client.poll_event(), Ok(Some(Event::Text(r#"{"frameType":1}"#.into()))));
        // A push is acked by the client and the server stops tracking it.
        server.push(t0 + Duration::from_secs(21), &push(3));
        client.handle_bytes(&server.take_output());
        let Ok(Some(Event::Text(t))) = client.poll_event() else {
            panic!("no push")
        };
        let id = serde_json::from_str::<serde_json::Value>(&t).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(client.ack_push(&id));
        server.handle_bytes(t0 + Duration::from_secs(22), &client.take_output());
        assert_eq!(server.pending_pushes(), 0);
        assert_eq!(server.take_received(), vec![("si_a_b".to_string(), 3)]);
    }

    #[test]
    fn overflowing_the_outbound_bound_closes_with_4003() {
        let t0 = Instant::now();
        let mut s = Session::new(
            SessionConfig {
                max_outbound_bytes: 1000,
                ..cfg()
            },
            t0,
        );
        let mut queued = 0;
        while s.send(t0, &"x".repeat(100)) {
            queued += 1;
        }
        assert!(queued >= 8, "{queued} frames fit");
        assert_eq!(
            texts(&s.take_output()),
            vec!["close 4003"],
            "the backlog is dropped, the close sent"
        );
        assert!(!s.send(t0, "late"), "nothing is queued after the close");
    }
}
