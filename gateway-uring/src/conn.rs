//! One WebSocket connection on a shard: the upgrade, then a thin monoio driver of the sans-IO
//! [`Session`] (`sai_proto::session`), which owns the protocol: frames, deadlines, rigor resends,
//! acks of pushes.
//!
//! Three tasks per connection: the reader feeds the session what the socket gives and hands its
//! requests, in order, to the request task; the request task calls the pipeline one request at a
//! time (so a client's messages are stored in the order it sent them) and queues the answers;
//! the writer takes everything queued since its last wakeup and writes it with one syscall. The
//! shard's timer wheel calls [`Conn::on_timer`] at the session's next deadline.
//!
//! # Memory per connection
//! A `read_buffer_bytes` buffer (4 KiB by default) held while a read is in flight, the session
//! (its input is empty between frames, its output empty once flushed and bounded by
//! `max_outbound_bytes`, at most `PendingConfig::capacity` rigor pushes) and this struct.

use crate::admission::Ticket;
use crate::shard::Shard;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, Canceller, Splitable,
};
use monoio::net::TcpStream;
use sai_pipeline::flow::{CloseReason, Refusal, Ws2Ms};
use sai_pipeline::frame::PushFrame;
use sai_proto::handshake::{self, HandshakeError, UpgradeRequest};
use sai_proto::im::Request;
use sai_proto::session::Session;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// A live, authenticated connection.
pub(crate) struct Conn {
    pub id: u64,
    pub user: String,
    session: RefCell<Session>,
    /// Wakes the writer; `notify_one` keeps a permit, so a wake is never lost.
    wake: tokio::sync::Notify,
    /// Wheel tick this connection is scheduled at, so an earlier deadline re-arms it and a
    /// stale wheel entry is ignored.
    scheduled_tick: Cell<Option<u64>>,
    /// Cancels the in-flight read and write when the connection must be dropped (a write to a
    /// client that stopped reading would otherwise hold the socket open for ever).
    canceller: RefCell<Option<Canceller>>,
    /// The reader has finished (or was aborted): the writer flushes what it can and exits.
    done: Cell<bool>,
    /// Requests handed to the request task and not finished.
    running: Cell<u32>,
}

impl Conn {
    /// Re-arms the wheel at the session's next deadline and wakes the writer if there is
    /// output: called after anything that may have changed either.
    fn after(&self, shard: &Shard) {
        let (deadline, output, drop) = {
            let s = self.session.borrow();
            (s.poll_timeout(), s.output_len() > 0 || s.close_sent(), s.should_drop())
        };
        if drop {
            self.abort();
            return;
        }
        if output {
            self.wake.notify_one();
        }
        if let Some(at) = deadline {
            let tick = shard.tick_of(at);
            if self.scheduled_tick.get().is_none_or(|t| tick < t) {
                self.scheduled_tick.set(Some(tick));
                shard.schedule_tick(self.id, tick);
            }
        }
    }

    /// Queues a text frame (an ack, an error, a notification, a sync reply).
    fn send(&self, shard: &Shard, text: &str) {
        self.session.borrow_mut().send(shard.now(), text);
        self.after(shard);
    }

    /// Sends a push (tracked for resend in rigor mode).
    pub fn push(&self, shard: &Shard, push: &PushFrame) {
        self.session.borrow_mut().push(shard.now(), push);
        self.after(shard);
    }

    /// Sends a notification frame (not tracked: notifications are not stored messages).
    pub fn notify(&self, shard: &Shard, frame: &str) {
        self.send(shard, frame);
    }

    /// Starts the close handshake with `code`; the socket is dropped after the grace period if
    /// the peer does not finish it.
    pub fn close_with(&self, shard: &Shard, code: u16, reason: &str) {
        self.session.borrow_mut().close(shard.now(), code, reason);
        self.after(shard);
    }

    /// The gateway is stopping: new requests are refused; those read already still run.
    pub fn stop(&self, shard: &Shard) {
        self.session.borrow_mut().stop();
        self.after(shard);
    }

    /// Every request read has been answered (a stopping gateway closes it then).
    pub fn idle(&self) -> bool {
        self.running.get() == 0 && self.session.borrow().queued_requests() == 0
    }

    /// Our close frame is queued.
    pub fn close_sent(&self) -> bool {
        self.session.borrow().close_sent()
    }

    /// Drops the connection now: cancels the read, lets the writer exit.
    pub fn abort(&self) {
        self.done.set(true);
        if let Some(c) = self.canceller.borrow_mut().take() {
            c.cancel();
        }
        self.wake.notify_one();
    }

    /// The wheel fired at `tick` for this connection.
    pub fn on_timer(&self, shard: &Shard, tick: u64) {
        match self.scheduled_tick.get() {
            // A later deadline replaced this entry's: ignore it.
            Some(t) if t > tick => return,
            _ => self.scheduled_tick.set(None),
        }
        self.session.borrow_mut().handle_timeout(shard.now());
        self.flush_received(shard);
        self.after(shard);
    }

    /// Records the pushes the client acked (rigor), batched: called once per shard tick.
    pub fn flush_received(&self, shard: &Shard) {
        let acked = self.session.borrow_mut().take_received();
        if !acked.is_empty() {
            monoio::spawn(shard.shared.pipeline.mark_received(&self.user, acked));
        }
    }

    /// Whether acked pushes wait for [`Self::flush_received`].
    pub fn has_received(&self) -> bool {
        self.session.borrow().has_received()
    }
}

/// Serves one accepted TCP connection to the end.
/// `ticket` holds the connection's place ([`crate::admission`]) until it ends.
pub(crate) async fn serve(shard: Rc<Shard>, mut stream: TcpStream, mut ticket: Ticket) {
    let _ = stream.set_nodelay(true);
    let cfg = &shard.shared.cfg;
    let (req, acc) = match monoio::time::timeout(cfg.handshake_timeout, read_request(&mut stream)).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(e)) => {
            shard.shared.refused(shard.idx, e.code());
            respond(
                &mut stream,
                handshake::response_error(e.status(), e.code(), &e.to_string()),
            )
            .await;
            return;
        }
    };
    if req.path != cfg.path {
        shard.shared.refused(shard.idx, "not_found");
        let body = handshake::response_error(404, "not_found", "no WebSocket endpoint at this path");
        respond(&mut stream, body).await;
        return;
    }
    let (user, protocol) = match authenticate(shard.shared.pipeline.as_ref(), &req.protocols).await {
        Ok(v) => v,
        Err(r) => {
            shard.shared.refused(shard.idx, r.code);
            respond(
                &mut stream,
                handshake::response_error(refusal_status(r.code), r.code, &r.message),
            )
            .await;
            return;
        }
    };
    ticket.handshake_done();
    let (res, _) = stream
        .write_all(handshake::response_101(&req.key, Some(&protocol)))
        .await;
    if res.is_err() {
        return;
    }
    let canceller = Canceller::new();
    let handle = canceller.handle();
    let conn = Rc::new(Conn {
        id: shard.next_conn_id(),
        user,
        session: RefCell::new(shard.shared.session(shard.idx, shard.now())),
        wake: tokio::sync::Notify::new(),
        scheduled_tick: Cell::new(None),
        canceller: RefCell::new(Some(canceller)),
        done: Cell::new(false),
        running: Cell::new(0),
    });
    shard.register(&conn);
    if let Some((code, reason)) = recheck(shard.shared.pipeline.as_ref(), &protocol).await {
        conn.close_with(&shard, code, reason);
    }
    // Bytes that arrived with the upgrade request.
    conn.session.borrow_mut().handle_bytes(shard.now(), &acc[req.len..]);
    let (mut rd, wr) = stream.into_split();
    monoio::spawn(write_loop(conn.clone(), wr, handle.clone()));
    let (requests, queue) = tokio::sync::mpsc::channel(MAX_PIPELINED);
    monoio::spawn(request_loop(shard.clone(), conn.clone(), queue));
    forward_requests(&shard, &conn, &requests).await;
    let mut buf = Vec::with_capacity(cfg.read_buffer_bytes);
    while !conn.done.get() && !conn.session.borrow().is_closed() {
        let (res, b) = rd.cancelable_read(buf, handle.clone()).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                conn.session.borrow_mut().handle_bytes(shard.now(), &buf[..n]);
                buf.clear();
                forward_requests(&shard, &conn, &requests).await;
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

/// Writes a whole answer and shuts the socket down for writing.
pub(crate) async fn respond(stream: &mut TcpStream, bytes: Vec<u8>) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
}

/// The HTTP status of a refused upgrade: 403 for a disabled account, 503 when the pipeline could
/// not check the token, 401 for every other refusal of the token.
pub(crate) fn refusal_status(code: &str) -> u16 {
    match code {
        "account_disabled" => 403,
        "service_unavailable" | "server_busy" => 503,
        _ => 401,
    }
}

/// The first offered subprotocol that is a valid token wins and is echoed back:
/// (user, protocol).
pub(crate) async fn authenticate(pipeline: &dyn Ws2Ms, protocols: &[String]) -> Result<(String, String), Refusal> {
    let mut refusal = Refusal {
        code: "missing_token",
        message: "send the token in Sec-WebSocket-Protocol".into(),
    };
    for p in protocols {
        match pipeline.authenticate(p).await {
            Ok(user) => return Ok((user, p.clone())),
            Err(r) => refusal = r,
        }
    }
    Err(refusal)
}

/// A revocation (logout, password change, disable) that committed while an upgrade was being
/// checked closed whatever route it found, which may not have been the new connection's yet:
/// asked again once the route is registered (a cache hit, unless the account just changed).
/// Returns the close code and reason, if the connection must go. (A failure to check,
/// `service_unavailable`, leaves the connection alone.)
pub(crate) async fn recheck(pipeline: &dyn Ws2Ms, protocol: &str) -> Option<(u16, &'static str)> {
    let r = pipeline.authenticate(protocol).await.err()?;
    let reason = match r.code {
        "account_disabled" => CloseReason::AccountDisabled,
        "token_revoked" | "invalid_token" => CloseReason::TokenRevoked,
        _ => return None,
    };
    Some(crate::close_for(reason))
}

/// Requests (chat, sync, markChat) queued per connection before its reader stops reading.
const MAX_PIPELINED: usize = 64;

/// The request queue. Requests are boxed: tokio's channel allocates its slots in blocks of 32 up
/// front, so a slot must be a pointer, not a ~200-byte request, to keep idle connections small.
type RequestQueue = tokio::sync::mpsc::Sender<Box<Request>>;

/// Hands the session's requests to the request task, in order. Waits (stops reading) while
/// `MAX_PIPELINED` are queued: backpressure.
async fn forward_requests(shard: &Rc<Shard>, conn: &Rc<Conn>, requests: &RequestQueue) {
    conn.after(shard);
    loop {
        let next = conn.session.borrow_mut().poll_request();
        let Some(req) = next else {
            break;
        };
        conn.running.set(conn.running.get() + 1);
        if requests.send(Box::new(req)).await.is_err() {
            conn.running.set(conn.running.get() - 1);
        }
    }
    if conn.has_received() {
        shard.acked.borrow_mut().insert(conn.id);
    }
}

/// Runs a connection's pipeline requests one at a time, in the order they arrived, so a client's
/// messages are stored in the order it sent them.
async fn request_loop(shard: Rc<Shard>, conn: Rc<Conn>, mut queue: tokio::sync::mpsc::Receiver<Box<Request>>) {
    // Requests already read are carried out even if the client has gone: it sent them.
    while let Some(req) = queue.recv().await {
        handle_request(&shard, &conn, *req).await;
        conn.running.set(conn.running.get().saturating_sub(1));
    }
}

/// A monoio connection as the request handlers see it.
struct MonoioClient<'a> {
    shard: &'a Shard,
    conn: &'a Conn,
}

impl crate::requests::Client for MonoioClient<'_> {
    fn user(&self) -> &str {
        &self.conn.user
    }

    fn send(&self, text: &str) {
        self.conn.send(self.shard, text);
    }

    fn push(&self, push: &PushFrame) {
        self.conn.push(self.shard, push);
    }

    async fn drained(&self, bytes: usize) -> bool {
        while self.conn.session.borrow().output_len() > bytes && !self.conn.done.get() {
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
        !self.conn.done.get() && !self.conn.session.borrow().close_sent()
    }
}

async fn handle_request(shard: &Rc<Shard>, conn: &Rc<Conn>, req: Request) {
    let client = MonoioClient { shard, conn };
    crate::requests::handle(shard.shared.pipeline.as_ref(), &shard.shared.cfg, &client, req).await;
}

async fn write_loop(conn: Rc<Conn>, mut wr: monoio::net::tcp::TcpOwnedWriteHalf, cancel: CancelHandle) {
    loop {
        let out = conn.session.borrow_mut().take_output();
        if out.is_empty() {
            if conn.done.get() {
                break;
            }
            if conn.session.borrow().close_sent() {
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
        let (res, _) = monoio::io::CancelableAsyncWriteRentExt::write_all(&mut wr, out, cancel.clone()).await;
        if res.is_err() {
            conn.abort();
            break;
        }
    }
}
