//! One direct-engine shard: a thread, its rings, its connections, its timer wheel and its task
//! queue, in one loop.
//!
//! # A loop turn
//! 1. Reap every ring's completions: accepts, peer addresses, reads (bytes go straight from the
//!    provided buffer into the connection's handshake or session, and the buffer goes back),
//!    sends, closes.
//! 2. Run the tasks that were woken: pipeline calls of connections with requests, the inbox
//!    reader (pushes, notifications, kicks from any thread).
//! 3. Advance the timer wheel when a tick has passed (idle, close grace, handshake deadlines,
//!    rigor resends), batch push acks, act on a spilled inbox.
//! 4. Re-arm reads that ran out of buffers, start one send per connection with output (all the
//!    frames queued since its last send, in one buffer), keep one ring accepting.
//! 5. Submit every ring; if nothing is ready, sleep in the first ring until a completion, an
//!    eventfd wake (a secondary ring's completion or another thread's wake) or the next tick.
//!
//! # A connection
//! accept (direct slot) -> peer address (`SO_PEERNAME`) -> admission -> multishot recv ->
//! upgrade request -> token check (a task) -> `101` -> [`Session`] until the close handshake,
//! an error or a deadline -> cancel + close the slot -> the place is freed once no operation of
//! it is in flight (their buffers live in the connection until then).
//!
//! `unsafe` here is only the calls that lend a buffer to the kernel (a send's bytes, the peer
//! address, the eventfd counter); each says why the buffer outlives the operation.
#![allow(unsafe_code)]

use super::exec::{Executor, Waker};
use super::slab::{Key, Slab};
use crate::admission::{Refused, Ticket};
use crate::requests::{self, Client};
use crate::shard::{InboxReceiver, ShardMsg, Shared};
use crate::wheel::TimerWheel;
use sai_pipeline::flow::{Route, Routes};
use sai_pipeline::frame::PushFrame;
use sai_proto::close;
use sai_proto::handshake::{self, HandshakeError};
use sai_proto::session::Session;
use sai_ring::{Completion, Ring};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// What a completion is for: the top 8 bits of its token; the low 48 bits are the connection's
/// [`Key`] (or the ring's index for an accept).
mod kind {
    pub const ACCEPT: u64 = 1;
    pub const EVENTFD: u64 = 2;
    pub const PEER: u64 = 3;
    pub const RECV: u64 = 4;
    pub const SEND: u64 = 5;
    pub const SHUTDOWN: u64 = 6;
    pub const CANCEL: u64 = 7;
    pub const CLOSE: u64 = 8;
    /// Cancel and close of a slot that never got a place (the table was full or the shard is
    /// stopping).
    pub const ORPHAN_CANCEL: u64 = 9;
    pub const ORPHAN_CLOSE: u64 = 10;
}

fn token(kind: u64, key: Key) -> u64 {
    (kind << 56) | key
}

fn split(token: u64) -> (u64, Key) {
    (token >> 56, token & ((1 << 48) - 1))
}

/// Requests parsed but not yet run, per connection, before its reads pause (backpressure).
const MAX_PIPELINED: usize = 64;
/// Reads resume once the queue is down to this.
const RESUME_PIPELINED: usize = MAX_PIPELINED / 2;
/// Bytes a client may send after its upgrade request and before our `101`.
const MAX_EARLY_BYTES: usize = 64 * 1024;
/// Tasks run per loop turn before the rings are looked at again.
const TASK_BUDGET: usize = 4096;
/// Free slots a ring keeps when it stops accepting. The kernel closes a connection it accepted
/// but could not place in a full table, so a ring's multishot accept is cancelled while this many
/// slots are still free: enough for the accepts already on their way (a loop turn's worth).
const ACCEPT_MARGIN: u32 = 1024;
/// Slots of each shard's wheel; with the 100 ms tick one revolution is 102.4 s.
const WHEEL_SLOTS: usize = 1024;
/// After the shutdown's close grace, how long closes may take to complete before the thread
/// exits anyway.
const EXIT_WAIT: Duration = Duration::from_secs(1);
/// While a stopping shard waits for requests to finish, how often it looks.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// Where a connection is in its life.
enum Phase {
    /// Accepted; its address is being asked for (into this buffer: a `sockaddr_in6` or
    /// `sockaddr_in`, owned here until the completion).
    Peer(Box<[u8; 28]>),
    /// Admitted; reading the upgrade request.
    Upgrade { buf: Vec<u8>, ticket: Ticket },
    /// The token is being checked; bytes that came after the request wait here.
    Auth { early: Vec<u8>, ticket: Ticket },
    /// Upgraded.
    Open(Box<OpenConn>),
    /// Answered with an error status: closing once it is written.
    Refused,
}

/// An upgraded connection.
struct OpenConn {
    user: Arc<str>,
    session: Session,
    /// Holds the connection's place in the admission counts.
    _ticket: Ticket,
    /// A task runs this connection's requests.
    busy: bool,
    /// A task waits for the output to drain (sync paging).
    drain: Option<std::task::Waker>,
}

/// One connection's state.
struct Conn {
    ring: u16,
    slot: u32,
    phase: Phase,
    /// Operations in flight; the place is freed only at zero (their buffers live here).
    ops: u8,
    recv_armed: bool,
    /// Reads are paused: too many requests queued.
    paused: bool,
    /// The peer shut its side (recv gave 0).
    eof: bool,
    /// Our FIN is sent or queued.
    fin: bool,
    /// Cancel submitted: the connection is ending.
    closing: bool,
    /// Close submitted (only once nothing else is in flight on the slot).
    released: bool,
    /// In the shard's flush list.
    dirty: bool,
    /// The bytes of the send in flight, and how many are written.
    sending: Option<(Vec<u8>, usize)>,
    /// Bytes to write before the session's (the `101` or an error answer).
    raw: Vec<u8>,
    /// Wheel tick this connection is scheduled at (an earlier deadline re-arms it; a stale wheel
    /// entry is ignored).
    tick: Option<u64>,
}

/// Everything the loop and the tasks share, borrowed one step at a time (never across an await
/// or a task poll).
struct Core {
    rings: Vec<Ring>,
    conns: Slab<Conn>,
    wheel: TimerWheel,
    /// Connections with output to start sending.
    dirty: Vec<Key>,
    /// Connections whose multishot recv must be re-armed.
    rearm: Vec<Key>,
    /// Connections whose client acked pushes since the last tick.
    acked: HashSet<Key>,
    /// Most rings this shard may open.
    max_rings: usize,
    /// Direct descriptors per ring.
    slots: u32,
    /// Accepting is wanted but no ring has room: retried when a slot frees.
    accept_blocked: bool,
    /// Where a read's bytes wait while the connection takes them (one provided buffer's worth).
    scratch: Vec<u8>,
}

impl Core {
    /// Queues operations of connection `key` on its ring, counting `ops` of them as in flight
    /// first: the connection, and every buffer it lends the kernel, stays until the last of
    /// them completes.
    fn submit(&mut self, key: Key, ops: u8, op: impl FnOnce(&mut Ring, u32)) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.ops += ops;
        if let Some(r) = self.rings.get_mut(usize::from(conn.ring)) {
            op(r, conn.slot);
        }
    }
}

/// A shard of the direct engine.
pub(crate) struct DirectShard {
    idx: usize,
    shared: Arc<Shared>,
    exec: Executor,
    core: RefCell<Core>,
    now: Cell<Instant>,
    epoch: Instant,
    tick_ms: u64,
    stopping: Cell<bool>,
    listener: std::net::TcpListener,
    listener_v6: bool,
    waker: Arc<Waker>,
    /// This shard, for the tasks it spawns.
    me: std::rc::Weak<DirectShard>,
}

/// The settings a shard's rings are sized by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingPlan {
    /// Direct descriptors per ring (at most `RLIMIT_NOFILE`).
    pub slots: u32,
    /// Rings per shard (enough for the shard's share of the connection cap).
    pub max_rings: usize,
}

impl DirectShard {
    fn now(&self) -> Instant {
        self.now.get()
    }

    fn conn_id(&self, key: Key) -> u64 {
        ((self.idx as u64) << 48) | key
    }

    fn route(&self, key: Key) -> Route {
        Route {
            node: self.shared.cfg.node,
            shard: self.idx as u32,
            conn: self.conn_id(key),
        }
    }

    fn key_of(&self, conn_id: u64) -> Option<Key> {
        ((conn_id >> 48) as usize == self.idx).then_some(conn_id & ((1 << 48) - 1))
    }

    fn tick_of(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_millis() as u64).div_ceil(self.tick_ms)
    }

    // ---- completions -------------------------------------------------------------------

    fn complete(&self, core: &mut Core, ring: usize, c: Completion) {
        let (kind, key) = split(c.token);
        match kind {
            kind::ACCEPT => self.on_accept(core, ring, c),
            kind::EVENTFD => {} // re-armed by the loop
            kind::PEER => self.on_peer(core, key, c.res),
            kind::RECV => self.on_recv(core, ring, key, c),
            kind::SEND => self.on_send(core, key, c.res),
            kind::SHUTDOWN | kind::CANCEL => self.op_done(core, key),
            kind::ORPHAN_CLOSE => {
                if let Some(r) = core.rings.get_mut(ring) {
                    r.used = r.used.saturating_sub(1);
                }
                core.accept_blocked = false;
            }
            kind::CLOSE => {
                if let Some(r) = core.rings.get_mut(ring) {
                    r.used = r.used.saturating_sub(1);
                }
                core.accept_blocked = false;
                self.op_done(core, key);
            }
            _ => {}
        }
    }

    fn on_accept(&self, core: &mut Core, ring: usize, c: Completion) {
        if !c.more() {
            if let Some(r) = core.rings.get_mut(ring) {
                r.accepting = false;
            }
        }
        if c.res < 0 {
            let errno = -c.res;
            if errno == libc::ENFILE {
                // This ring's table is full: the next ring takes over in the flush step.
                if let Some(r) = core.rings.get_mut(ring) {
                    r.used = r.slots;
                }
            } else if errno != libc::ECANCELED {
                tracing::debug!(shard = self.idx, errno, "accept failed");
            }
            return;
        }
        let slot = c.res as u32;
        let Some(r) = core.rings.get_mut(ring) else {
            return;
        };
        r.used += 1;
        if r.accepting && r.used + ACCEPT_MARGIN >= r.slots {
            // Nearly full: the next ring takes over (in the flush step) before any accept fails.
            r.cancel(token(kind::ACCEPT, ring as u64), token(kind::ORPHAN_CANCEL, 0));
            r.accepting = false;
        }
        if self.stopping.get() {
            r.cancel_and_close(slot, token(kind::ORPHAN_CANCEL, 0), token(kind::ORPHAN_CLOSE, 0));
            return;
        }
        let inserted = core.conns.insert(|_| Conn {
            ring: ring as u16,
            slot,
            phase: Phase::Peer(Box::new([0; 28])),
            ops: 0,
            recv_armed: false,
            paused: false,
            eof: false,
            fin: false,
            closing: false,
            released: false,
            dirty: false,
            sending: None,
            raw: Vec::new(),
            tick: None,
        });
        let Some(key) = inserted else {
            // 16.7M connections on one shard: close the slot straight away.
            r.cancel_and_close(slot, token(kind::ORPHAN_CANCEL, 0), token(kind::ORPHAN_CLOSE, 0));
            return;
        };
        let len = if self.listener_v6 { 28 } else { 16 };
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        let Phase::Peer(buf) = &mut conn.phase else {
            return;
        };
        let out = buf.as_mut_ptr();
        conn.ops += 1;
        // SAFETY: the buffer is boxed in the connection, which is not freed while an operation
        // of it is in flight (`ops`), and the phase leaves `Peer` only in `on_peer`.
        unsafe { r.peer_name(slot, out, len, token(kind::PEER, key)) };
        let deadline = self.tick_of(self.now() + self.shared.cfg.handshake_timeout);
        Self::schedule(core, key, deadline);
    }

    fn on_peer(&self, core: &mut Core, key: Key, res: i32) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        conn.ops = conn.ops.saturating_sub(1);
        if conn.closing {
            self.maybe_free(core, key);
            return;
        }
        let Phase::Peer(buf) = &conn.phase else {
            return;
        };
        let Some(ip) = (res > 0).then(|| parse_sockaddr(&buf[..res as usize])).flatten() else {
            // The peer left before we asked.
            self.teardown(core, key);
            return;
        };
        match self.shared.admission.admit(ip) {
            Ok(ticket) => {
                conn.phase = Phase::Upgrade {
                    buf: Vec::new(),
                    ticket,
                };
                self.arm_recv(core, key);
            }
            Err(why) => self.refuse(core, key, why),
        }
    }

    fn on_recv(&self, core: &mut Core, ring: usize, key: Key, c: Completion) {
        // The bytes are copied into the shard's scratch buffer (no allocation per read), so the
        // provided buffer goes back to the kernel at once; the connection then copies what it
        // keeps (a partial frame) into its session.
        let mut scratch = std::mem::take(&mut core.scratch);
        scratch.clear();
        let bytes = match (c.res, c.buffer()) {
            (n, Some(bid)) => {
                if let Some(r) = core.rings.get_mut(ring) {
                    if n > 0 {
                        scratch.extend_from_slice(r.buffer(bid, n as usize));
                    }
                    r.recycle(bid);
                }
                n > 0
            }
            _ => false,
        };
        self.on_read(core, key, c, bytes.then_some(&scratch[..]));
        core.scratch = scratch;
    }

    fn on_read(&self, core: &mut Core, key: Key, c: Completion, bytes: Option<&[u8]>) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        if !c.more() {
            conn.recv_armed = false;
            conn.ops = conn.ops.saturating_sub(1);
        }
        if conn.closing {
            self.maybe_free(core, key);
            return;
        }
        if let Some(data) = bytes {
            self.on_bytes(core, key, data);
            if !c.more() {
                self.rearm_later(core, key);
            }
            return;
        }
        match c.res {
            0 => {
                conn.eof = true;
                self.after_io(core, key);
            }
            n if n == -libc::ENOBUFS => self.rearm_later(core, key),
            n if n == -libc::ECANCELED => self.rearm_later(core, key),
            _ if !c.more() => self.teardown(core, key),
            _ => {}
        }
    }

    fn on_send(&self, core: &mut Core, key: Key, res: i32) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        conn.ops = conn.ops.saturating_sub(1);
        if conn.closing {
            self.maybe_free(core, key);
            return;
        }
        if res <= 0 {
            self.teardown(core, key);
            return;
        }
        if let Some((buf, done)) = &mut conn.sending {
            *done += res as usize;
            if *done < buf.len() {
                // A short send: the rest goes now.
                let (ptr, len) = (buf[*done..].as_ptr(), (buf.len() - *done) as u32);
                // SAFETY: the buffer is owned by `conn.sending` until this completion.
                core.submit(key, 1, |r, slot| unsafe {
                    r.send(slot, ptr, len, token(kind::SEND, key))
                });
                return;
            }
        }
        conn.sending = None;
        if let Phase::Open(open) = &mut conn.phase {
            if let Some(w) = open.drain.take() {
                w.wake();
            }
        }
        self.after_io(core, key);
    }

    fn op_done(&self, core: &mut Core, key: Key) {
        if let Some(conn) = core.conns.get_mut(key) {
            conn.ops = conn.ops.saturating_sub(1);
            self.maybe_free(core, key);
        }
    }

    // ---- connection steps --------------------------------------------------------------

    fn on_bytes(&self, core: &mut Core, key: Key, data: &[u8]) {
        let now = self.now();
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        match &mut conn.phase {
            Phase::Upgrade { buf, .. } => {
                buf.extend_from_slice(data);
                match handshake::parse_request(buf) {
                    Ok(None) => {}
                    Ok(Some(req)) => self.upgrade(core, key, req),
                    Err(e) => self.reject(core, key, &e),
                }
            }
            Phase::Auth { early, .. } => {
                early.extend_from_slice(data);
                if early.len() > MAX_EARLY_BYTES {
                    self.teardown(core, key);
                }
            }
            Phase::Open(open) => {
                open.session.handle_bytes(now, data);
                self.after_session(core, key);
            }
            Phase::Peer(_) | Phase::Refused => {}
        }
    }

    fn upgrade(&self, core: &mut Core, key: Key, req: handshake::UpgradeRequest) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        if req.path != self.shared.cfg.path {
            self.shared.refused(self.idx, "not_found");
            let body = handshake::response_error(404, "not_found", "no WebSocket endpoint at this path");
            self.answer_and_close(core, key, body);
            return;
        }
        let Phase::Upgrade { buf, ticket } = std::mem::replace(&mut conn.phase, Phase::Refused) else {
            return;
        };
        let early = buf.get(req.len..).map(<[u8]>::to_vec).unwrap_or_default();
        conn.phase = Phase::Auth { early, ticket };
        self.spawn_with(|shard| async move {
            let pipeline = shard.shared.pipeline.clone();
            let result = crate::conn::authenticate(pipeline.as_ref(), &req.protocols).await;
            let protocol = shard.finish_auth(key, &req.key, result);
            if let Some(protocol) = protocol {
                if let Some((code, reason)) = crate::conn::recheck(pipeline.as_ref(), &protocol).await {
                    shard.with_core(|core| shard.close_with(core, key, code, reason));
                }
            }
        });
    }

    /// The token check is over: opens the connection (returns the protocol it chose) or
    /// answers the refusal.
    fn finish_auth(
        &self,
        key: Key,
        ws_key: &str,
        result: Result<(String, String), sai_pipeline::flow::Refusal>,
    ) -> Option<String> {
        let mut core = self.core.borrow_mut();
        let core = &mut *core;
        let conn = core.conns.get_mut(key)?;
        if conn.closing {
            return None;
        }
        let (user, protocol) = match result {
            Ok(v) => v,
            Err(r) => {
                self.shared.refused(self.idx, r.code);
                let status = crate::conn::refusal_status(r.code);
                let body = handshake::response_error(status, r.code, &r.message);
                self.answer_and_close(core, key, body);
                return None;
            }
        };
        let Phase::Auth { early, mut ticket } = std::mem::replace(&mut conn.phase, Phase::Refused) else {
            return None;
        };
        ticket.handshake_done();
        conn.raw = handshake::response_101(ws_key, Some(&protocol));
        let user: Arc<str> = user.into();
        conn.phase = Phase::Open(Box::new(OpenConn {
            user: user.clone(),
            session: self.shared.session(self.idx, self.now()),
            _ticket: ticket,
            busy: false,
            drain: None,
        }));
        conn.tick = None;
        if let Some(old) = self.shared.index.register(&user, self.route(key)) {
            let kick = ShardMsg::Kick {
                conn: old.conn,
                code: close::REPLACED,
                reason: "replaced by a new login",
            };
            if let Some(inbox) = self.shared.inboxes.get(old.shard as usize) {
                inbox.send(kick);
            }
        }
        if let Some(Phase::Open(open)) = core.conns.get_mut(key).map(|c| &mut c.phase) {
            open.session.handle_bytes(self.now(), &early);
        }
        self.after_session(core, key);
        Some(protocol)
    }

    /// Answers a refused upgrade with its status and closes.
    fn reject(&self, core: &mut Core, key: Key, e: &HandshakeError) {
        self.shared.refused(self.idx, e.code());
        let body = handshake::response_error(e.status(), e.code(), &e.to_string());
        self.answer_and_close(core, key, body);
    }

    /// Answers a connection that got no place (no admission ticket yet).
    fn refuse(&self, core: &mut Core, key: Key, why: Refused) {
        let (status, code, message) = why.answer();
        self.shared.refused(self.idx, code);
        self.answer_and_close(core, key, handshake::response_error(status, code, message));
    }

    fn answer_and_close(&self, core: &mut Core, key: Key, body: Vec<u8>) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        conn.phase = Phase::Refused;
        conn.raw = body;
        let deadline = self.tick_of(self.now() + self.shared.cfg.close_grace);
        conn.tick = None;
        Self::schedule(core, key, deadline);
        Self::mark_dirty(core, key);
    }

    /// After the session took input, a timeout or a frame: queue its requests, its output and
    /// its next deadline.
    fn after_session(&self, core: &mut Core, key: Key) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        let Phase::Open(open) = &mut conn.phase else {
            return;
        };
        let s = &open.session;
        if s.should_drop() {
            self.teardown(core, key);
            return;
        }
        let start_task = !open.busy && s.queued_requests() > 0;
        if start_task {
            open.busy = true;
        }
        let pause = s.queued_requests() >= MAX_PIPELINED && conn.recv_armed && !conn.paused;
        let has_output = s.output_len() > 0 || s.close_sent() || !conn.raw.is_empty();
        let deadline = s.poll_timeout().map(|at| self.tick_of(at));
        let received = s.has_received();
        let user = start_task.then(|| open.user.clone());
        if pause {
            conn.paused = true;
            core.submit(key, 1, |r, _| {
                r.cancel(token(kind::RECV, key), token(kind::CANCEL, key))
            });
        }
        if has_output {
            Self::mark_dirty(core, key);
        }
        if let Some(tick) = deadline {
            Self::schedule(core, key, tick);
        }
        if received {
            core.acked.insert(key);
        }
        if let Some(user) = user {
            self.spawn_with(|shard| async move { shard.run_requests(key, user).await });
        }
    }

    /// After a send completed or the peer shut its side: more output goes out; once nothing
    /// is left to write, a peer that shut its side is dropped, and our FIN follows our close
    /// frame (or error answer), after which the peer's FIN or the grace deadline ends it.
    fn after_io(&self, core: &mut Core, key: Key) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        let (close_sent, output) = match &conn.phase {
            Phase::Open(o) => (o.session.close_sent(), o.session.output_len() > 0),
            Phase::Refused => (true, false),
            _ => (false, false),
        };
        if output || !conn.raw.is_empty() {
            Self::mark_dirty(core, key);
            return;
        }
        if conn.sending.is_some() {
            return;
        }
        if conn.eof {
            self.teardown(core, key);
            return;
        }
        if close_sent && !conn.fin {
            conn.fin = true;
            core.submit(key, 1, |r, slot| r.shutdown_write(slot, token(kind::SHUTDOWN, key)));
        }
    }

    fn arm_recv(&self, core: &mut Core, key: Key) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        if conn.recv_armed || conn.closing || conn.eof || conn.paused {
            return;
        }
        conn.recv_armed = true;
        core.submit(key, 1, |r, slot| r.recv(slot, token(kind::RECV, key)));
    }

    fn rearm_later(&self, core: &mut Core, key: Key) {
        core.rearm.push(key);
    }

    fn mark_dirty(core: &mut Core, key: Key) {
        if let Some(conn) = core.conns.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                core.dirty.push(key);
            }
        }
    }

    fn schedule(core: &mut Core, key: Key, tick: u64) {
        if let Some(conn) = core.conns.get_mut(key) {
            if conn.tick.is_none_or(|t| tick < t) {
                conn.tick = Some(tick);
                core.wheel.insert(key, tick);
            }
        }
    }

    /// Starts one send with everything queued for `key`, unless one is in flight.
    fn start_send(core: &mut Core, key: Key) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        conn.dirty = false;
        if conn.sending.is_some() || conn.closing {
            return;
        }
        let mut out = std::mem::take(&mut conn.raw);
        if let Phase::Open(open) = &mut conn.phase {
            let more = open.session.take_output();
            if out.is_empty() {
                out = more;
            } else {
                out.extend_from_slice(&more);
            }
        }
        if out.is_empty() {
            return;
        }
        let (ptr, len) = (out.as_ptr(), out.len() as u32);
        conn.sending = Some((out, 0));
        // SAFETY: the buffer moved into `conn.sending` (its heap memory does not move) and stays
        // there until this send's completion; the connection is not freed before.
        core.submit(key, 1, |r, slot| unsafe {
            r.send(slot, ptr, len, token(kind::SEND, key))
        });
    }

    /// Closes the session with `code` (the close handshake; the slot is dropped after the grace
    /// if the peer does not answer).
    fn close_with(&self, core: &mut Core, key: Key, code: u16, reason: &str) {
        let now = self.now();
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        match &mut conn.phase {
            Phase::Open(open) => {
                open.session.close(now, code, reason);
                self.after_session(core, key);
            }
            _ => self.teardown(core, key),
        }
    }

    /// Drops the connection: its route goes and every operation on its slot is cancelled; the
    /// slot is closed once none is in flight, and the place freed when the close is in.
    fn teardown(&self, core: &mut Core, key: Key) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        if conn.closing {
            return;
        }
        conn.closing = true;
        let mut flush = None;
        if let Phase::Open(open) = &mut conn.phase {
            if let Some(w) = open.drain.take() {
                w.wake();
            }
            let acked = open.session.take_received();
            flush = Some((open.user.clone(), acked));
        }
        // The close follows in `maybe_free`, once every operation on the slot has completed:
        // the cancel cannot reach one queued for the kernel's workers (a shutdown), and that
        // one would otherwise act on the next connection accepted into the slot.
        core.submit(key, 1, |r, slot| r.cancel_all(slot, token(kind::CANCEL, key)));
        core.acked.remove(&key);
        if let Some((user, acked)) = flush {
            self.shared.index.remove(&user, self.route(key));
            if !acked.is_empty() {
                let pipeline = self.shared.pipeline.clone();
                self.exec
                    .spawn(async move { pipeline.mark_received(&user, acked).await });
            }
        }
    }

    /// An ending connection's last steps: once no operation is in flight on its slot, the slot
    /// is closed; once that close is in and no task runs its requests, its place is freed.
    fn maybe_free(&self, core: &mut Core, key: Key) {
        let Some(conn) = core.conns.get_mut(key) else {
            return;
        };
        if !conn.closing || conn.ops > 0 {
            return;
        }
        if !conn.released {
            conn.released = true;
            core.submit(key, 1, |r, slot| r.close(slot, token(kind::CLOSE, key)));
            return;
        }
        if !matches!(&conn.phase, Phase::Open(o) if o.busy) {
            core.conns.remove(key);
        }
    }

    // ---- tasks -------------------------------------------------------------------------

    /// Spawns `task(shard)` on this shard (a task needs the shard beyond a borrow).
    fn spawn_with<F: std::future::Future<Output = ()> + 'static>(&self, task: impl FnOnce(Rc<DirectShard>) -> F) {
        if let Some(shard) = self.me.upgrade() {
            self.exec.spawn(task(shard));
        }
    }

    fn with_core<T>(&self, f: impl FnOnce(&mut Core) -> T) -> T {
        f(&mut self.core.borrow_mut())
    }

    /// Runs `key`'s requests one at a time, in order, until its queue is empty. Requests
    /// already read are carried out even if the client has gone: it sent them (a chat is
    /// stored and pushed; only its ack is lost, and the client's resend of it is deduplicated).
    async fn run_requests(self: Rc<Self>, key: Key, user: Arc<str>) {
        loop {
            let next = self.with_core(|core| {
                let conn = core.conns.get_mut(key)?;
                let Phase::Open(open) = &mut conn.phase else {
                    return None;
                };
                let req = open.session.poll_request();
                if req.is_none() {
                    open.busy = false;
                }
                let resume = conn.paused && open.session.queued_requests() <= RESUME_PIPELINED;
                if resume && !conn.closing {
                    conn.paused = false;
                    if !conn.recv_armed {
                        core.rearm.push(key);
                    }
                }
                req
            });
            let Some(req) = next else {
                // A connection that closed meanwhile is freed now that its task is done.
                self.with_core(|core| self.maybe_free(core, key));
                return;
            };
            let client = DirectClient {
                shard: &self,
                key,
                user: &user,
            };
            requests::handle(self.shared.pipeline.as_ref(), &self.shared.cfg, &client, req).await;
        }
    }

    fn handle(&self, core: &mut Core, msg: ShardMsg) {
        let now = self.now();
        match msg {
            ShardMsg::Push { conns, push } => {
                for id in conns {
                    let Some(key) = self.key_of(id) else { continue };
                    if let Some(Phase::Open(open)) = core.conns.get_mut(key).map(|c| &mut c.phase) {
                        open.session.push(now, &push);
                        self.after_session(core, key);
                    }
                }
            }
            ShardMsg::Notify { conn, frame } => {
                let Some(key) = self.key_of(conn) else { return };
                if let Some(Phase::Open(open)) = core.conns.get_mut(key).map(|c| &mut c.phase) {
                    open.session.send(now, &frame);
                    self.after_session(core, key);
                }
            }
            ShardMsg::Kick { conn, code, reason } => {
                if let Some(key) = self.key_of(conn) {
                    self.close_with(core, key, code, reason);
                }
            }
            ShardMsg::Shutdown => self.stopping.set(true),
        }
    }

    async fn inbox_loop(self: Rc<Self>, mut rx: InboxReceiver) {
        while let Some(msg) = rx.recv().await {
            self.with_core(|core| self.handle(core, msg));
            // Drain what else is queued without another wake.
            while let Ok(msg) = rx.try_recv() {
                self.with_core(|core| self.handle(core, msg));
            }
            if self.stopping.get() {
                return;
            }
        }
    }

    // ---- the loop ----------------------------------------------------------------------

    fn on_tick(&self, core: &mut Core) {
        let now = self.now();
        let tick = now.saturating_duration_since(self.epoch).as_millis() as u64 / self.tick_ms;
        let mut fired = Vec::new();
        core.wheel.advance(tick, &mut fired);
        for key in fired {
            let Some(conn) = core.conns.get_mut(key) else {
                continue;
            };
            match conn.tick {
                Some(t) if t > tick => continue,
                _ => conn.tick = None,
            }
            match &mut conn.phase {
                Phase::Open(open) => {
                    open.session.handle_timeout(now);
                    self.after_session(core, key);
                }
                // Handshake deadline or the refusal's grace.
                _ => self.teardown(core, key),
            }
        }
        let inbox = self.shared.inboxes.get(self.idx);
        let stop = crate::shard::act_on_spill(self.idx, inbox, |conn, code, reason| {
            if let Some(key) = self.key_of(conn) {
                self.close_with(core, key, code, reason);
            }
        });
        if stop {
            self.stopping.set(true);
        }
        let acked: Vec<Key> = core.acked.drain().collect();
        for key in acked {
            if let Some(Phase::Open(open)) = core.conns.get_mut(key).map(|c| &mut c.phase) {
                let received = open.session.take_received();
                if !received.is_empty() {
                    let (pipeline, user) = (self.shared.pipeline.clone(), open.user.clone());
                    self.exec
                        .spawn(async move { pipeline.mark_received(&user, received).await });
                }
            }
        }
    }

    /// Keeps exactly one ring accepting while there is room, opening rings as they fill.
    fn keep_accepting(&self, core: &mut Core) -> std::io::Result<()> {
        if self.stopping.get() || core.accept_blocked || core.rings.iter().any(|r| r.accepting) {
            return Ok(());
        }
        let fd = self.listener.as_raw_fd();
        let token = |i: usize| token(kind::ACCEPT, i as u64);
        if let Some(i) = core.rings.iter().position(|r| r.used + ACCEPT_MARGIN < r.slots) {
            core.rings[i].accept(fd, token(i));
            return Ok(());
        }
        if core.rings.len() >= core.max_rings {
            core.accept_blocked = true;
            return Ok(());
        }
        let ring = Ring::new(core.slots, Some(self.waker.eventfd().as_raw_fd()))?;
        tracing::debug!(shard = self.idx, rings = core.rings.len() + 1, "opened a ring");
        core.rings.push(ring);
        let i = core.rings.len() - 1;
        core.rings[i].accept(fd, token(i));
        Ok(())
    }

    fn flush(&self, core: &mut Core) -> std::io::Result<()> {
        for key in std::mem::take(&mut core.rearm) {
            self.arm_recv(core, key);
        }
        let mut dirty = std::mem::take(&mut core.dirty);
        for key in dirty.drain(..) {
            Self::start_send(core, key);
        }
        core.dirty = dirty;
        self.keep_accepting(core)?;
        for r in &mut core.rings[1..] {
            r.submit()?;
        }
        Ok(())
    }

    /// Takes the listener out of the port at once, so that while this shard drains, new
    /// connections go to the port's other listeners (a replacement's) instead of queueing here
    /// to be reset when the thread exits. `shutdown(SHUT_RD)` on a listening socket stops it
    /// (the kernel unhashes it; the armed accept completes with an error).
    fn stop_listening(&self) {
        if let Err(e) = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Read) {
            tracing::debug!(shard = self.idx, error = %e, "stopping the listener failed");
        }
    }

    /// A graceful stop's first step: every session refuses new requests (`first`), and each
    /// one whose queued requests are all answered is closed with 1012, so that the acks of what
    /// it had read reach the client first. True once none is left waiting.
    fn drain(&self, core: &mut Core, first: bool) -> bool {
        let mut waiting = false;
        for key in core.conns.keys() {
            let Some(conn) = core.conns.get_mut(key) else { continue };
            let Phase::Open(open) = &mut conn.phase else {
                // Not upgraded yet: nothing of theirs is running.
                if first {
                    self.teardown(core, key);
                }
                continue;
            };
            if first {
                open.session.stop();
            }
            if open.session.close_sent() {
                continue;
            }
            if open.busy || open.session.queued_requests() > 0 {
                waiting = true;
                continue;
            }
            self.close_with(core, key, close::SERVICE_RESTART, close::SERVICE_RESTART_REASON);
        }
        !waiting
    }

    fn shut_down(&self, core: &mut Core) {
        for key in core.conns.keys() {
            self.close_with(core, key, close::SERVICE_RESTART, close::SERVICE_RESTART_REASON);
        }
    }

    fn abort_all(&self, core: &mut Core) {
        for key in core.conns.keys() {
            self.teardown(core, key);
        }
    }

    fn run(self: &Rc<Self>, eventfd_buf: *mut u8) -> std::io::Result<()> {
        let efd = self.waker.eventfd().as_raw_fd();
        let mut cqes = Vec::with_capacity(1024);
        let mut next_tick = self.epoch + Duration::from_millis(self.tick_ms);
        let mut stop_at: Option<Instant> = None;
        // While stopping: until when connections may finish their requests, and the next look.
        let mut draining: Option<(Instant, Instant)> = None;
        // SAFETY (for the eventfd reads below): `eventfd_buf` is 8 bytes leaked for the
        // thread's lifetime, so a read in flight never outlives it.
        unsafe {
            self.core.borrow_mut().rings[0].read_eventfd(efd, eventfd_buf, token(kind::EVENTFD, 0));
        }
        loop {
            self.now.set(Instant::now());
            let mut worked = false;
            {
                let mut core = self.core.borrow_mut();
                let core = &mut *core;
                for ring in 0..core.rings.len() {
                    core.rings[ring].completions(&mut cqes);
                    worked |= !cqes.is_empty();
                    for c in cqes.drain(..) {
                        if split(c.token).0 == kind::EVENTFD {
                            // SAFETY: as above.
                            unsafe { core.rings[0].read_eventfd(efd, eventfd_buf, token(kind::EVENTFD, 0)) };
                        }
                        self.complete(core, ring, c);
                    }
                }
            }
            worked |= self.exec.run(TASK_BUDGET) > 0;
            let now = Instant::now();
            self.now.set(now);
            let mut core = self.core.borrow_mut();
            let core = &mut *core;
            if now >= next_tick {
                self.on_tick(core);
                next_tick = now + Duration::from_millis(self.tick_ms);
            }
            if self.stopping.get() {
                match (stop_at, draining) {
                    (None, None) => {
                        self.stop_listening();
                        let done = self.drain(core, true);
                        draining = Some((now + self.shared.cfg.close_grace, now + DRAIN_EVERY));
                        if done {
                            stop_at = Some(now + self.shared.cfg.close_grace);
                        }
                    }
                    (None, Some((until, next))) if now >= next => {
                        // Past `until`, whatever still runs is closed anyway (its client sends
                        // it again after reconnecting; a chat is stored once).
                        if self.drain(core, false) || now >= until {
                            self.shut_down(core);
                            stop_at = Some(now + self.shared.cfg.close_grace);
                        } else {
                            draining = Some((until, now + DRAIN_EVERY));
                        }
                    }
                    (None, Some(_)) => {}
                    (Some(at), _) if now >= at + EXIT_WAIT => return Ok(()),
                    (Some(at), _) if now >= at => self.abort_all(core),
                    (Some(_), _) => {}
                }
                if core.conns.is_empty() {
                    return Ok(());
                }
            }
            self.flush(core)?;
            if worked || self.exec.has_ready() {
                core.rings[0].submit()?;
                continue;
            }
            self.waker.sleep();
            if self.exec.has_ready() || core.rings.iter_mut().any(Ring::has_completions) {
                self.waker.awake();
                core.rings[0].submit()?;
                continue;
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            core.rings[0].submit_and_wait(wait)?;
            self.waker.awake();
        }
    }
}

/// A direct-engine connection as the request handlers see it.
struct DirectClient<'a> {
    shard: &'a DirectShard,
    key: Key,
    user: &'a str,
}

impl DirectClient<'_> {
    fn with_open(&self, f: impl FnOnce(&mut OpenConn, Instant)) {
        let now = self.shard.now();
        self.shard.with_core(|core| {
            if let Some(Phase::Open(open)) = core.conns.get_mut(self.key).map(|c| &mut c.phase) {
                f(open, now);
                self.shard.after_session(core, self.key);
            }
        });
    }
}

impl Client for DirectClient<'_> {
    fn user(&self) -> &str {
        self.user
    }

    fn send(&self, text: &str) {
        self.with_open(|open, now| {
            open.session.send(now, text);
        });
    }

    fn push(&self, push: &PushFrame) {
        self.with_open(|open, now| open.session.push(now, push));
    }

    async fn drained(&self, bytes: usize) -> bool {
        std::future::poll_fn(|cx| {
            self.shard.with_core(|core| {
                let Some(conn) = core.conns.get_mut(self.key) else {
                    return Poll::Ready(false);
                };
                let in_flight = conn.sending.as_ref().map_or(0, |(b, done)| b.len() - done);
                let closing = conn.closing;
                let Phase::Open(open) = &mut conn.phase else {
                    return Poll::Ready(false);
                };
                if closing || open.session.close_sent() {
                    return Poll::Ready(false);
                }
                if open.session.output_len() + in_flight <= bytes {
                    return Poll::Ready(true);
                }
                open.drain = Some(cx.waker().clone());
                Poll::Pending
            })
        })
        .await
    }
}

/// The IP address in a `sockaddr_in` / `sockaddr_in6` as `SO_PEERNAME` wrote it.
fn parse_sockaddr(b: &[u8]) -> Option<IpAddr> {
    let family = i32::from(u16::from_ne_bytes([*b.first()?, *b.get(1)?]));
    if family == libc::AF_INET {
        let a: [u8; 4] = b.get(4..8)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(a)))
    } else if family == libc::AF_INET6 {
        let a: [u8; 16] = b.get(8..24)?.try_into().ok()?;
        let v6 = Ipv6Addr::from(a);
        Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
    } else {
        None
    }
}

/// Starts shard `idx` on the current thread and runs it until shutdown.
pub(crate) fn run_shard(
    idx: usize,
    listener: std::net::TcpListener,
    rx: InboxReceiver,
    shared: Arc<Shared>,
    plan: RingPlan,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    // Lives as long as the thread: the pipeline's futures are polled here.
    let _pipeline_runtime = shared.cfg.pipeline_runtime.as_ref().map(|h| h.enter());
    let setup = || -> std::io::Result<Rc<DirectShard>> {
        let waker = Arc::new(Waker::new()?);
        let first = Ring::new(plan.slots, None)?;
        let listener_v6 = listener.local_addr()?.is_ipv6();
        let now = Instant::now();
        Ok(Rc::new_cyclic(|me| DirectShard {
            me: me.clone(),
            idx,
            exec: Executor::new(waker.clone()),
            core: RefCell::new(Core {
                rings: vec![first],
                conns: Slab::default(),
                wheel: TimerWheel::new(WHEEL_SLOTS, 0),
                dirty: Vec::new(),
                rearm: Vec::new(),
                acked: HashSet::new(),
                max_rings: plan.max_rings.max(1),
                slots: plan.slots,
                accept_blocked: false,
                scratch: Vec::with_capacity(sai_ring::BUFFER_BYTES as usize),
            }),
            now: Cell::new(now),
            epoch: now,
            tick_ms: (shared.cfg.tick.as_millis() as u64).max(1),
            stopping: Cell::new(false),
            shared,
            listener,
            listener_v6,
            waker,
        }))
    };
    let shard = match setup() {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    shard.exec.spawn(shard.clone().inbox_loop(rx));
    let _ = ready.send(Ok(()));
    let eventfd_buf = Box::leak(Box::new([0u8; 8])).as_mut_ptr();
    if let Err(e) = shard.run(eventfd_buf) {
        tracing::error!(shard = idx, error = %e, "direct engine shard stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_parse_from_both_families() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 9]);
        assert_eq!(parse_sockaddr(&v4), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))));
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[8..24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        assert_eq!(parse_sockaddr(&v6), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        // An IPv4 client of a dual-stack listener counts as its IPv4 address.
        v6[8..24].copy_from_slice(&Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets());
        assert_eq!(parse_sockaddr(&v6), Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));
        assert_eq!(parse_sockaddr(&v4[..6]), None, "truncated");
        assert_eq!(parse_sockaddr(&[0u8; 16]), None, "unknown family");
    }

    #[test]
    fn tokens_carry_kind_and_key() {
        let key = (0xAB_CDEF << 24) | 0x12_3456;
        assert_eq!(split(token(kind::SEND, key)), (kind::SEND, key));
    }
}
