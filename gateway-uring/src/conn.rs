//! One WebSocket connection on a shard: upgrade, then a reader task and a writer task around a
//! sans-IO [`WsConn`].
//!
//! The reader parses frames and handles requests one at a time (so a client's messages are
//! stored in the order it sent them); everything to send, from any task, is appended to the
//! `WsConn` output buffer and the writer is woken. The writer takes the whole buffer per wakeup
//! and writes it with one syscall: pushes and acks produced in the same wakeup share a write.
//!
//! # Memory per connection
//! A `read_buffer_bytes` buffer (4 KiB by default) held while a read is in flight, the `WsConn`
//! input (empty between frames) and output (empty once flushed; bounded by
//! `max_outbound_bytes`, past which the connection is closed with 4003), the rigor pending set
//! (bounded by `PendingConfig::capacity`) and this struct.

use crate::shard::Shard;
use crate::AckMode;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, Splitable};
use monoio::net::TcpStream;
use sai_pipeline::flow::Refusal;
use sai_pipeline::frame::{ack_frame, data_frame, error_frame, ping_frame, PushFrame};
use sai_pipeline::message::method;
use sai_proto::close;
use sai_proto::handshake::{self, HandshakeError, UpgradeRequest};
use sai_proto::im::{self, ErrorCode, Request};
use sai_proto::pending::Pending;
use sai_proto::ws::{Event, Role, WsConn};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A live, authenticated connection.
pub(crate) struct Conn {
    pub id: u64,
    pub user: String,
    ws: RefCell<WsConn>,
    /// Wakes the writer; `notify_one` keeps a permit, so a wake is never lost.
    wake: tokio::sync::Notify,
    /// Shard clock (ms) of the last inbound bytes; the idle deadline derives from it.
    pub last_active: Cell<u64>,
    pending: RefCell<Pending<(Arc<str>, u64)>>,
    /// Highest acked push seq per conversation since the last flush (rigor mode).
    received: RefCell<HashMap<Arc<str>, u64>>,
    /// Cancels the in-flight read when the connection must be dropped.
    canceller: RefCell<Option<Canceller>>,
    /// Set once a close frame has been sent: drop the socket at this shard time if still open.
    force_close_at: Cell<Option<u64>>,
    /// The reader has finished (or was aborted): the writer flushes what it can and exits.
    done: Cell<bool>,
    rigor: bool,
    max_outbound: usize,
}

impl Conn {
    /// Queues a text frame and wakes the writer. Past the outbound bound the queue is dropped
    /// and the connection closed with 4003: the client reconnects and syncs, nothing is lost.
    fn enqueue(&self, shard: &Shard, text: &str) -> bool {
        let mut ws = self.ws.borrow_mut();
        if ws.close_sent() {
            return false;
        }
        if ws.output().len() + text.len() > self.max_outbound {
            ws.discard_output();
            drop(ws);
            self.close_with(
                shard,
                close::SLOW_CONSUMER,
                "outbound queue overflow: reconnect and sync",
            );
            return false;
        }
        ws.send_text(text);
        drop(ws);
        self.wake.notify_one();
        true
    }

    /// Sends a push frame (tracked for resend in rigor mode).
    pub fn push(&self, shard: &Shard, push: &PushFrame) {
        let id = self.pending.borrow_mut().allocate();
        let frame = push.frame(id);
        if self.rigor {
            if self.enqueue(shard, &frame) {
                let tag = (push.conversation_id.clone(), push.seq);
                self.pending.borrow_mut().track(id, frame, tag, shard.now());
                shard.rigor_active.borrow_mut().insert(self.id);
            }
        } else {
            self.enqueue(shard, &frame);
        }
    }

    /// Sends a notification frame (not tracked: notifications are not stored messages).
    pub fn notify(&self, shard: &Shard, frame: &str) {
        self.enqueue(shard, frame);
    }

    /// The client acked push `id`.
    fn acked(&self, shard: &Shard, id: &str) {
        let Some((conv, seq)) = self.pending.borrow_mut().ack(id) else {
            return;
        };
        let mut r = self.received.borrow_mut();
        let e = r.entry(conv).or_insert(0);
        *e = (*e).max(seq);
        shard.acked.borrow_mut().insert(self.id);
    }

    /// Writes the received positions gathered since the last flush.
    pub fn flush_received(&self, shard: &Shard) {
        let acked: Vec<(String, u64)> = self
            .received
            .borrow_mut()
            .drain()
            .map(|(c, s)| (c.to_string(), s))
            .collect();
        if !acked.is_empty() {
            monoio::spawn(shard.shared.pipeline.mark_received(&self.user, acked));
        }
    }

    /// Starts the close handshake with `code`; the socket is dropped after the grace period if
    /// the peer does not finish it.
    pub fn close_with(&self, shard: &Shard, code: u16, reason: &str) {
        {
            let mut ws = self.ws.borrow_mut();
            if ws.close_sent() {
                return;
            }
            ws.close(code, reason);
        }
        self.arm_close_timer(shard);
    }

    fn arm_close_timer(&self, shard: &Shard) {
        self.wake.notify_one();
        if self.force_close_at.get().is_none() {
            let at = shard.now_ms() + shard.shared.cfg.close_grace.as_millis() as u64;
            self.force_close_at.set(Some(at));
            shard.schedule(self.id, at);
        }
    }

    /// Drops the connection now: cancels the read, lets the writer exit.
    pub fn abort(&self) {
        self.done.set(true);
        if let Some(c) = self.canceller.borrow_mut().take() {
            c.cancel();
        }
        self.wake.notify_one();
    }

    /// The wheel fired for this connection.
    pub fn on_timer(&self, shard: &Shard, now_ms: u64) {
        if let Some(at) = self.force_close_at.get() {
            if now_ms >= at {
                self.abort();
            } else {
                shard.schedule(self.id, at);
            }
            return;
        }
        let idle_at = self.last_active.get() + shard.shared.cfg.idle_timeout.as_millis() as u64;
        if now_ms >= idle_at {
            self.close_with(shard, close::IDLE_TIMEOUT, "idle timeout");
        } else {
            shard.schedule(self.id, idle_at);
        }
    }

    /// Resends due rigor pushes; returns true when nothing is pending any more.
    pub fn resend_due(&self, shard: &Shard, now: Instant) -> bool {
        let mut out = Vec::new();
        self.pending.borrow_mut().poll(now, &mut out);
        for frame in out {
            self.enqueue(shard, &frame);
        }
        self.pending.borrow().is_empty()
    }
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let cfg = &shard.shared.cfg;
    let (req, acc) = match monoio::time::timeout(cfg.handshake_timeout, read_request(&mut stream)).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(e)) => {
            respond(
                &mut stream,
                handshake::response_error(e.status(), e.code(), &e.to_string()),
            )
            .await;
            return;
        }
    };
    if req.path != cfg.path {
        let body = handshake::response_error(404, "not_found", "no WebSocket endpoint at this path");
        respond(&mut stream, body).await;
        return;
    }
    let (user, protocol) = match authenticate(&shard, &req) {
        Ok(v) => v,
        Err(r) => {
            respond(&mut stream, handshake::response_error(401, r.code, &r.message)).await;
            return;
        }
    };
    let (res, _) = stream
        .write_all(handshake::response_101(&req.key, Some(&protocol)))
        .await;
    if res.is_err() {
        return;
    }
    let mut ws = WsConn::new(Role::Server, cfg.max_frame_bytes, 0);
    ws.feed(&acc[req.len..]);
    let canceller = Canceller::new();
    let handle = canceller.handle();
    let conn = Rc::new(Conn {
        id: shard.next_conn_id(),
        user,
        ws: RefCell::new(ws),
        wake: tokio::sync::Notify::new(),
        last_active: Cell::new(shard.now_ms()),
        pending: RefCell::new(Pending::new(cfg.pending)),
        received: RefCell::new(HashMap::new()),
        canceller: RefCell::new(Some(canceller)),
        force_close_at: Cell::new(None),
        done: Cell::new(false),
        rigor: cfg.ack_mode == AckMode::Rigor,
        max_outbound: cfg.max_outbound_bytes,
    });
    shard.register(&conn);
    let (mut rd, wr) = stream.into_split();
    monoio::spawn(write_loop(conn.clone(), wr));
    let (requests, queue) = tokio::sync::mpsc::channel(MAX_PIPELINED);
    monoio::spawn(request_loop(shard.clone(), conn.clone(), queue));
    // Bytes that arrived with the upgrade request.
    process_input(&shard, &conn, &requests).await;
    let mut buf = Vec::with_capacity(cfg.read_buffer_bytes);
    while !conn.done.get() && !conn.ws.borrow().is_closed() {
        let (res, b) = rd.cancelable_read(buf, handle.clone()).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                conn.last_active.set(shard.now_ms());
                conn.ws.borrow_mut().feed(&buf[..n]);
                buf.clear();
                process_input(&shard, &conn, &requests).await;
            }
        }
    }
    conn.done.set(true);
    conn.wake.notify_one();
    shard.unregister(&conn);
}

async fn read_request(stream: &mut TcpStream) -> Result<Option<(UpgradeRequest, Vec<u8>)>, HandshakeError> {
    let mut acc = Vec::new();
    let mut buf = Vec::with_capacity(1024);
    loop {
        let (res, b) = stream.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => {
                acc.extend_from_slice(&buf[..n]);
                buf.clear();
            }
        }
        if let Some(req) = handshake::parse_request(&acc)? {
            return Ok(Some((req, acc)));
        }
    }
}

async fn respond(stream: &mut TcpStream, bytes: Vec<u8>) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
}

/// The first offered subprotocol that is a valid token wins and is echoed back.
fn authenticate(shard: &Shard, req: &UpgradeRequest) -> Result<(String, String), Refusal> {
    let mut refusal = Refusal {
        code: "missing_token",
        message: "send the token in Sec-WebSocket-Protocol".into(),
    };
    for p in &req.protocols {
        match shard.shared.pipeline.authenticate(p) {
            Ok(user) => return Ok((user, p.clone())),
            Err(r) => refusal = r,
        }
    }
    Err(refusal)
}

/// Requests (chat, sync, markChat) queued per connection before its reader stops reading.
const MAX_PIPELINED: usize = 64;

/// The request queue. Requests are boxed: tokio's channel allocates its slots in blocks of 32 up
/// front, so a slot must be a pointer, not a ~200-byte request, to keep idle connections small.
type RequestQueue = tokio::sync::mpsc::Sender<Box<Request>>;

/// Handles every complete event buffered in the connection.
async fn process_input(shard: &Rc<Shard>, conn: &Rc<Conn>, requests: &RequestQueue) {
    loop {
        let ev = conn.ws.borrow_mut().next_event();
        match ev {
            Ok(Some(Event::Text(t))) => handle_text(shard, conn, &t, requests).await,
            Ok(Some(Event::Binary(_))) => {
                let e = error_frame(
                    None,
                    ErrorCode::UnsupportedMessageType.as_str(),
                    "binary messages are not supported; send JSON text frames",
                );
                conn.enqueue(shard, &e);
            }
            Ok(Some(Event::Ping | Event::Pong | Event::Close { .. })) => conn.wake.notify_one(),
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(conn = conn.id, error = %e, "protocol error, closing");
                conn.arm_close_timer(shard);
                return;
            }
        }
    }
}

/// Pings and push acks are answered on the spot; requests that wait on the backend go to the
/// connection's request task, in order, so acks keep flowing while a send is being stored.
async fn handle_text(shard: &Rc<Shard>, conn: &Rc<Conn>, text: &str, requests: &RequestQueue) {
    let req = match im::parse_request(text) {
        Ok(r) => r,
        Err(e) => {
            conn.enqueue(shard, &e.to_frame());
            return;
        }
    };
    match req {
        Request::Ping => {
            conn.enqueue(shard, &ping_frame());
        }
        Request::Ack { id } => {
            if conn.rigor {
                conn.acked(shard, &id);
            }
        }
        other => {
            // Waits (stops reading) while MAX_PIPELINED requests are queued: backpressure.
            let _ = requests.send(Box::new(other)).await;
        }
    }
}

/// Runs a connection's backend requests one at a time, in the order they arrived, so a client's
/// messages are stored in the order it sent them.
async fn request_loop(shard: Rc<Shard>, conn: Rc<Conn>, mut queue: tokio::sync::mpsc::Receiver<Box<Request>>) {
    // Requests already read are carried out even if the client has gone: it sent them.
    while let Some(req) = queue.recv().await {
        handle_request(&shard, &conn, *req).await;
    }
}

async fn handle_request(shard: &Rc<Shard>, conn: &Rc<Conn>, req: Request) {
    let pipeline = &shard.shared.pipeline;
    match req {
        Request::Ping | Request::Ack { .. } => {}
        Request::MarkRead {
            id,
            conversation_id,
            read_seq,
        } => match pipeline.mark_read(&conn.user, conversation_id.clone(), read_seq).await {
            Ok(read_seq) => {
                if shard.shared.cfg.ack_mode != AckMode::None {
                    #[derive(serde::Serialize)]
                    #[serde(rename_all = "camelCase")]
                    struct Marked<'a> {
                        conversation_id: &'a str,
                        read_seq: u64,
                    }
                    let data = Marked {
                        conversation_id: &conversation_id,
                        read_seq,
                    };
                    conn.enqueue(shard, &ack_frame(id.as_deref(), &data));
                }
            }
            Err(e) => {
                conn.enqueue(shard, &error_frame(id.as_deref(), e.code, &e.message));
            }
        },
        // The pipeline pushes the message to the other members itself (ms2ps_chat).
        Request::Chat { id, want_ack, chat } => match pipeline.chat(&conn.user, chat).await {
            Ok(ack) => {
                if want_ack && shard.shared.cfg.ack_mode != AckMode::None {
                    conn.enqueue(shard, &ack_frame(id.as_deref(), &ack));
                }
            }
            Err(e) => {
                conn.enqueue(shard, &error_frame(id.as_deref(), e.code, &e.message));
            }
        },
        Request::Sync { id, conversations } => sync(shard, conn, id, conversations).await,
    }
}

/// Pushes everything after the client's seqs, page by page, waiting for the writer to drain
/// between pages, then answers with the conversations' newest seqs.
async fn sync(shard: &Rc<Shard>, conn: &Rc<Conn>, id: Option<String>, mut known: BTreeMap<String, u64>) {
    let cfg = &shard.shared.cfg;
    let mut pushed = 0usize;
    let heads = loop {
        let page = match shard
            .shared
            .pipeline
            .sync(&conn.user, known.clone(), cfg.sync_page)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                conn.enqueue(shard, &error_frame(id.as_deref(), e.code, &e.message));
                return;
            }
        };
        let n = page.pushes.len();
        for p in &page.pushes {
            let seq = known.entry(p.conversation_id.clone()).or_insert(0);
            *seq = (*seq).max(p.seq);
            conn.push(shard, &PushFrame::new(p));
        }
        pushed += n;
        if page.complete || n == 0 {
            break page.heads;
        }
        while conn.ws.borrow().output().len() > cfg.max_outbound_bytes / 2 && !conn.done.get() {
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
        if conn.done.get() || conn.ws.borrow().close_sent() {
            return;
        }
    };
    #[derive(serde::Serialize)]
    struct SyncDone<'a> {
        conversations: &'a BTreeMap<String, u64>,
        pushed: usize,
    }
    let done = SyncDone {
        conversations: &heads,
        pushed,
    };
    conn.enqueue(shard, &data_frame(id.as_deref(), method::SYNC, &done));
}

async fn write_loop(conn: Rc<Conn>, mut wr: monoio::net::tcp::TcpOwnedWriteHalf) {
    loop {
        let out = conn.ws.borrow_mut().take_output();
        if out.is_empty() {
            if conn.done.get() {
                break;
            }
            if conn.ws.borrow().close_sent() {
                // Our close frame is out: half-close and wait for the peer (or the grace timer).
                let _ = wr.shutdown().await;
                while !conn.done.get() {
                    conn.wake.notified().await;
                }
                break;
            }
            conn.wake.notified().await;
            continue;
        }
        let (res, _) = wr.write_all(out).await;
        if res.is_err() {
            conn.abort();
            break;
        }
    }
}
