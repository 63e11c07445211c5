//! One shard: a thread, its monoio runtime, its listener, its connections and its timer wheel.
//!
//! Tasks on a shard: the accept loop, the inbox loop (pushes, notifications and kicks from any
//! thread), the tick loop (the timer wheel, which calls each connection's session at its next
//! deadline: idle, close grace, rigor resends; batched push acks; what a full inbox spilled), and
//! a reader, a request and a writer task per connection. They share the shard through an `Rc`:
//! nothing here is touched from another thread except the inbox and the [`UserIndex`].

use crate::admission::{Admission, Refused};
use crate::conn::{self, Conn};
use crate::index::UserIndex;
use crate::wheel::TimerWheel;
use crate::{Gateway, GatewayConfig, Prepared};
use monoio::io::Canceller;
use sai_pipeline::flow::{Route, Routes, Ws2Ms};
use sai_pipeline::frame::PushFrame;
use sai_proto::close;
use sai_proto::stats::Counters;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A message to a shard from any thread.
#[derive(Debug)]
pub enum ShardMsg {
    /// Push one message to some of this shard's connections (a group's fan-out is one channel
    /// message per shard, not per member).
    Push {
        /// Target connections.
        conns: Vec<u64>,
        /// The message, serialized once.
        push: Arc<PushFrame>,
    },
    /// Send a notification frame as is.
    Notify {
        /// Target connection.
        conn: u64,
        /// The frame.
        frame: Arc<str>,
    },
    /// Close this connection: exclusive login (4001) or a revoked token (4004, 4005).
    Kick {
        /// Target connection.
        conn: u64,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
    /// Close everything and stop.
    Shutdown,
}

/// Messages a shard's inbox holds before senders spill (see [`Inbox::send`]): 65,536, a few MiB
/// at most (the channel allocates its slots in blocks of 32 as they fill).
pub const INBOX_CAPACITY: usize = 65_536;

/// The sending side of a shard's inbox: bounded, and never blocking its sender (a pipeline on
/// another shard or a tokio task). What does not fit is recorded so that nothing is lost.
#[derive(Clone)]
pub struct Inbox {
    tx: mpsc::Sender<ShardMsg>,
    spill: Arc<Spill>,
}

/// The receiving side, owned by the shard's thread.
pub type InboxReceiver = mpsc::Receiver<ShardMsg>;

/// What senders could not fit in a full inbox; the shard acts on it every tick. Bounded by the
/// shard's connections (sets of connection ids).
#[derive(Default)]
pub(crate) struct Spill {
    state: std::sync::Mutex<SpillState>,
    any: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct SpillState {
    /// Connections that missed a push: closed with 4003; the client reconnects and syncs.
    missed: HashSet<u64>,
    /// Connections to close (a newer login, a revoked token), with code and reason.
    kicked: HashMap<u64, (u16, &'static str)>,
    stop: bool,
}

/// What [`Inbox::take_spilled`] hands over: (missed, kicked, stop).
pub(crate) type Spilled = (HashSet<u64>, HashMap<u64, (u16, &'static str)>, bool);

/// A new inbox and its receiver.
pub fn inbox() -> (Inbox, InboxReceiver) {
    inbox_of(INBOX_CAPACITY)
}

fn inbox_of(capacity: usize) -> (Inbox, InboxReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    let spill = Arc::new(Spill::default());
    (Inbox { tx, spill }, rx)
}

impl Inbox {
    /// Messages waiting in the inbox.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Sends `msg` without waiting. When the inbox is full the message is not dropped silently:
    /// a push's target connections are closed with 4003 on the shard's next tick (the message is
    /// durable; the client reconnects and syncs, as after any slow-consumer close), a kick or a
    /// shutdown is carried out on that tick, and a notification is dropped (notifications are
    /// best effort: what they announce is always available over HTTP).
    pub fn send(&self, msg: ShardMsg) {
        let msg = match self.tx.try_send(msg) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        let mut s = self.spill.state.lock().unwrap_or_else(|p| p.into_inner());
        match msg {
            ShardMsg::Push { conns, .. } => s.missed.extend(conns),
            ShardMsg::Kick { conn, code, reason } => {
                s.kicked.insert(conn, (code, reason));
            }
            ShardMsg::Notify { .. } => return,
            ShardMsg::Shutdown => s.stop = true,
        }
        self.spill.any.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Takes what was spilled since the last call: (missed, kicked, stop).
    pub(crate) fn take_spilled(&self) -> Option<Spilled> {
        if !self.spill.any.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        let mut s = self.spill.state.lock().unwrap_or_else(|p| p.into_inner());
        Some((
            std::mem::take(&mut s.missed),
            std::mem::take(&mut s.kicked),
            std::mem::take(&mut s.stop),
        ))
    }
}

/// What every shard shares.
pub(crate) struct Shared {
    pub cfg: GatewayConfig,
    /// Connection places, per address and in all.
    pub admission: Arc<Admission>,
    pub pipeline: Arc<dyn Ws2Ms>,
    pub index: Arc<UserIndex>,
    pub inboxes: Vec<Inbox>,
    /// The session settings of connections opened from now on, one copy (replaced by
    /// [`Gateway::set_session_limits`]; each session keeps the copy it started with).
    pub session: std::sync::RwLock<Arc<sai_proto::session::SessionConfig>>,
    /// Each shard's counters, by shard index (read by the metrics endpoint).
    pub counters: Vec<Arc<Counters>>,
}

impl Shared {
    /// A new session on shard `idx`, counted in its counters.
    pub fn session(&self, idx: usize, now: std::time::Instant) -> sai_proto::session::Session {
        let cfg = self.session.read().unwrap_or_else(|p| p.into_inner()).clone();
        let s = sai_proto::session::Session::new(cfg, now);
        match self.counters.get(idx) {
            Some(c) => s.with_counters(c.clone()),
            None => s,
        }
    }

    /// Counts an upgrade shard `idx` refused with `code`.
    pub fn refused(&self, idx: usize, code: &'static str) {
        if let Some(c) = self.counters.get(idx) {
            c.refused(code);
        }
    }
}

/// Per-shard state.
pub(crate) struct Shard {
    pub idx: usize,
    pub shared: Arc<Shared>,
    pub conns: RefCell<HashMap<u64, Rc<Conn>>>,
    wheel: RefCell<TimerWheel>,
    /// Connections whose client acked pushes since the last tick; their received positions are
    /// written once per tick, not once per ack.
    pub acked: RefCell<HashSet<u64>>,
    next_conn: Cell<u64>,
    epoch: Instant,
    tick_ms: u64,
    pub stopping: Cell<bool>,
}

/// Slots of each shard's wheel; with the 100 ms tick one revolution is 102.4 s.
const WHEEL_SLOTS: usize = 1024;

impl Shard {
    /// The shard's clock: the one place a connection's session is told the time.
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// The wheel tick at or after `at` (deadlines are rounded up, never fired early).
    pub fn tick_of(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_millis() as u64).div_ceil(self.tick_ms)
    }

    /// Schedules connection `id` to be checked at wheel tick `tick`.
    pub fn schedule_tick(&self, id: u64, tick: u64) {
        self.wheel.borrow_mut().insert(id, tick);
    }

    /// A new connection id, unique in the process (shard index in the top 16 bits).
    pub fn next_conn_id(&self) -> u64 {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        ((self.idx as u64) << 48) | n
    }

    /// The route of connection `conn` of this shard.
    pub fn route(&self, conn: u64) -> Route {
        Route {
            node: self.shared.cfg.node,
            shard: self.idx as u32,
            conn,
        }
    }

    /// Adds an authenticated connection: map, index, and kicks the user's older one. (The
    /// connection arms the wheel itself, at its session's first deadline.)
    pub fn register(&self, c: &Rc<Conn>) {
        self.conns.borrow_mut().insert(c.id, c.clone());
        if let Some(old) = self.shared.index.register(&c.user, self.route(c.id)) {
            let kick = ShardMsg::Kick {
                conn: old.conn,
                code: close::REPLACED,
                reason: "replaced by a new login",
            };
            self.send_to(old.shard as usize, kick);
        }
    }

    /// Removes a finished connection.
    pub fn unregister(&self, c: &Conn) {
        self.conns.borrow_mut().remove(&c.id);
        self.acked.borrow_mut().remove(&c.id);
        c.flush_received(self);
        self.shared.index.remove(&c.user, self.route(c.id));
    }

    fn send_to(&self, shard: usize, msg: ShardMsg) {
        if shard == self.idx {
            self.handle(msg);
        } else if let Some(inbox) = self.shared.inboxes.get(shard) {
            inbox.send(msg);
        }
    }

    fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Push { conns, push } => {
                for conn in conns {
                    if let Some(c) = self.conn(conn) {
                        c.push(self, &push);
                    }
                }
            }
            ShardMsg::Notify { conn, frame } => {
                if let Some(c) = self.conn(conn) {
                    c.notify(self, &frame);
                }
            }
            ShardMsg::Kick { conn, code, reason } => {
                if let Some(c) = self.conn(conn) {
                    c.close_with(self, code, reason);
                }
            }
            ShardMsg::Shutdown => self.stopping.set(true),
        }
    }

    fn on_tick(&self) {
        // The ticks that have fully passed (deadlines round up, the clock rounds down).
        let tick = self.now().saturating_duration_since(self.epoch).as_millis() as u64 / self.tick_ms;
        let mut fired = Vec::new();
        self.wheel.borrow_mut().advance(tick, &mut fired);
        for id in fired {
            if let Some(c) = self.conn(id) {
                c.on_timer(self, tick);
            }
        }
        let inbox = self.shared.inboxes.get(self.idx);
        let stop = act_on_spill(self.idx, inbox, |conn, code, reason| {
            if let Some(c) = self.conn(conn) {
                c.close_with(self, code, reason);
            }
        });
        if stop {
            self.stopping.set(true);
        }
        let acked: Vec<u64> = self.acked.borrow_mut().drain().collect();
        for id in acked {
            if let Some(c) = self.conn(id) {
                c.flush_received(self);
            }
        }
    }
}

/// What a shard does on its tick with what its full inbox spilled (either engine): closes the
/// connections that missed a push with 4003 and carries out the kicks, through `close`
/// (connection id, code, reason). Returns whether a shutdown was spilled.
pub(crate) fn act_on_spill(idx: usize, inbox: Option<&Inbox>, mut close: impl FnMut(u64, u16, &'static str)) -> bool {
    let Some((missed, kicked, stop)) = inbox.and_then(Inbox::take_spilled) else {
        return false;
    };
    if !missed.is_empty() {
        tracing::warn!(
            shard = idx,
            connections = missed.len(),
            "inbox full: closing connections that missed a push (4003)"
        );
    }
    for id in missed {
        close(
            id,
            close::SLOW_CONSUMER,
            "a push was lost in a full inbox: reconnect and sync",
        );
    }
    for (conn, (code, reason)) in kicked {
        close(conn, code, reason);
    }
    stop
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // Accepted sockets inherit it: the direct engine cannot set options on a socket it holds
    // only as a direct descriptor without one more submission per connection, and every write
    // is a whole batch of frames that must not wait for the peer's delayed ACK (Nagle).
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

pub(crate) fn start(addr: SocketAddr, prepared: Prepared, pipeline: Arc<dyn Ws2Ms>) -> std::io::Result<Gateway> {
    let Prepared {
        cfg,
        index,
        inboxes,
        receivers,
        counters,
    } = prepared;
    let n = inboxes.len();
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(bind_reuseport(bound)?);
    }
    let nofile = Admission::nofile();
    let engine = match cfg.engine {
        crate::Engine::Direct => match crate::direct::probe() {
            Ok(()) => crate::Engine::Direct,
            Err(why) => {
                tracing::warn!(%why, "the direct io_uring engine is not available here: using monoio");
                crate::Engine::Monoio
            }
        },
        crate::Engine::Monoio => crate::Engine::Monoio,
    };
    let mut limits = cfg.admission;
    if engine == crate::Engine::Direct && limits.max_connections == 0 {
        limits.max_connections = crate::direct::DEFAULT_MAX_CONNECTIONS;
    }
    let admission = Admission::new(limits, nofile);
    tracing::info!(
        %engine,
        max_connections = admission.total_cap(),
        descriptor_limit = nofile,
        per_address = limits.max_per_address,
        handshakes_per_address = limits.max_handshakes_per_address,
        "gateway connection limits"
    );
    let plan = crate::direct::plan(admission.total_cap(), n, nofile);
    let shared = Arc::new(Shared {
        admission,
        session: std::sync::RwLock::new(Arc::new(cfg.session_config())),
        cfg,
        pipeline,
        index: index.clone(),
        inboxes: inboxes.clone(),
        counters,
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let threads = match engine {
        crate::Engine::Direct => {
            tracing::info!(
                rings_per_shard = plan.max_rings,
                slots_per_ring = plan.slots,
                "direct engine: rings open as connections arrive"
            );
            crate::direct::spawn_shards(listeners, receivers, shared.clone(), plan, &ready_tx)?
        }
        crate::Engine::Monoio => {
            let mut threads = Vec::with_capacity(n);
            for (idx, (listener, rx)) in listeners.into_iter().zip(receivers).enumerate() {
                let shared = shared.clone();
                let ready = ready_tx.clone();
                let t = std::thread::Builder::new()
                    .name(format!("sai-shard-{idx}"))
                    .spawn(move || run_shard(idx, listener, rx, shared, ready))?;
                threads.push(t);
            }
            threads
        }
    };
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                for inbox in &inboxes {
                    inbox.send(ShardMsg::Shutdown);
                }
                return Err(e);
            }
            Err(_) => return Err(std::io::Error::other("a gateway shard died during start-up")),
        }
    }
    tracing::info!(%bound, shards = n, %engine, "gateway listening");
    Ok(Gateway {
        addr: bound,
        engine,
        inboxes,
        threads,
        index,
        shared,
    })
}

fn run_shard(
    idx: usize,
    listener: std::net::TcpListener,
    mut rx: InboxReceiver,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    // Lives as long as the thread: the pipeline's futures are polled here.
    let _pipeline_runtime = shared.cfg.pipeline_runtime.as_ref().map(|h| h.enter());
    let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let tick_ms = (shared.cfg.tick.as_millis() as u64).max(1);
        let shard = Rc::new(Shard {
            idx,
            shared,
            conns: RefCell::new(HashMap::new()),
            wheel: RefCell::new(TimerWheel::new(WHEEL_SLOTS, 0)),
            acked: RefCell::new(HashSet::new()),
            next_conn: Cell::new(0),
            epoch: Instant::now(),
            tick_ms,
            stopping: Cell::new(false),
        });
        let _ = ready.send(Ok(()));
        let accept_canceller = Canceller::new();
        monoio::spawn(accept_loop(shard.clone(), listener, accept_canceller.handle()));
        monoio::spawn(tick_loop(shard.clone()));
        while let Some(msg) = rx.recv().await {
            shard.handle(msg);
            if shard.stopping.get() {
                break;
            }
        }
        shard.stopping.set(true);
        accept_canceller.cancel();
        let conns: Vec<Rc<Conn>> = shard.conns.borrow().values().cloned().collect();
        // New requests are refused; each connection is closed once those it had read are
        // answered (their acks reach the client), or when the grace is over.
        for c in &conns {
            c.stop(&shard);
        }
        let until = Instant::now() + shard.shared.cfg.close_grace;
        loop {
            let mut waiting = false;
            for c in &conns {
                if c.close_sent() {
                    continue;
                }
                if c.idle() {
                    c.close_with(&shard, close::SERVICE_RESTART, close::SERVICE_RESTART_REASON);
                } else {
                    waiting = true;
                }
            }
            if !waiting || Instant::now() >= until {
                break;
            }
            monoio::time::sleep(DRAIN_EVERY).await;
        }
        for c in &conns {
            c.close_with(&shard, close::SERVICE_RESTART, close::SERVICE_RESTART_REASON);
        }
        // Give clients a moment to see the close frame, then drop whatever is left.
        let deadline = Instant::now() + shard.shared.cfg.close_grace;
        while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        let conns: Vec<Rc<Conn>> = shard.conns.borrow().values().cloned().collect();
        for c in conns {
            c.abort();
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    });
}

/// While a stopping shard waits for requests to finish, how often it looks.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// Refusals being written at once per shard; more are closed without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;
/// How long a refusal's answer may take to write before the socket is closed anyway.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(200);
/// Accept errors are logged at most once per this.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener, cancel: monoio::io::CancelHandle) {
    // A descriptor held in reserve: when accept fails for want of descriptors (EMFILE or
    // ENFILE), it is given up so that the waiting connection can be accepted and closed rather
    // than left in the backlog until its client gives up.
    let mut spare = std::fs::File::open("/dev/null").ok();
    let refusals = Rc::new(Cell::new(0usize));
    let mut backoff = Duration::ZERO;
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, peer)) => {
                if shard.stopping.get() {
                    return;
                }
                backoff = Duration::ZERO;
                match shard.shared.admission.admit(peer.ip()) {
                    Ok(ticket) => {
                        monoio::spawn(conn::serve(shard.clone(), stream, ticket));
                    }
                    Err(why) => {
                        shard.shared.refused(shard.idx, why.answer().1);
                        refuse(stream, why, &refusals)
                    }
                }
            }
            Err(e) => {
                if shard.stopping.get() {
                    return;
                }
                use rustix::io::Errno;
                let out_of_fds = matches!(Errno::from_io_error(&e), Some(Errno::MFILE | Errno::NFILE));
                if out_of_fds && spare.take().is_some() {
                    if let Ok((stream, _)) = listener.cancelable_accept(cancel.clone()).await {
                        shard.shared.refused(shard.idx, Refused::Full.answer().1);
                        refuse(stream, Refused::Full, &refusals);
                    }
                    spare = std::fs::File::open("/dev/null").ok();
                }
                // One line per ACCEPT_ERROR_LOG_EVERY, however many errors: the others are
                // counted into the next line.
                if last_log.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_EVERY) {
                    tracing::warn!(error = %e, shard = shard.idx, more_since_last_line = unlogged, "accept failed; backing off");
                    last_log = Some(Instant::now());
                    unlogged = 0;
                } else {
                    unlogged += 1;
                }
                // 10 ms doubling up to 1 s while accept keeps failing, instead of spinning.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                monoio::time::sleep(backoff).await;
            }
        }
    }
}

/// Answers a connection that gets no place with its HTTP status and code, then closes it. At
/// most [`MAX_REFUSALS_IN_FLIGHT`] answers are in flight per shard (each is one small write into
/// an empty socket buffer, done within microseconds); past that the socket is just closed.
fn refuse(stream: monoio::net::TcpStream, why: Refused, in_flight: &Rc<Cell<usize>>) {
    if in_flight.get() >= MAX_REFUSALS_IN_FLIGHT {
        return;
    }
    in_flight.set(in_flight.get() + 1);
    let in_flight = in_flight.clone();
    monoio::spawn(async move {
        let (status, code, message) = why.answer();
        let mut stream = stream;
        let answer = conn::respond(&mut stream, sai_proto::handshake::response_error(status, code, message));
        let _ = monoio::time::timeout(REFUSAL_WRITE_TIMEOUT, answer).await;
        in_flight.set(in_flight.get() - 1);
    });
}

async fn tick_loop(shard: Rc<Shard>) {
    let tick = shard.shared.cfg.tick;
    while !shard.stopping.get() {
        monoio::time::sleep(tick).await;
        shard.on_tick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(conns: Vec<u64>) -> ShardMsg {
        let p = sai_pipeline::message::Push {
            conversation_id: "si_a_b".into(),
            chat_type: 2,
            send_id: "a".into(),
            recv_id: "b".into(),
            seq: 1,
            msg_id: "m".into(),
            client_msg_id: "c".into(),
            send_time: 0,
            msg: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        };
        ShardMsg::Push {
            conns,
            push: Arc::new(PushFrame::new(&p)),
        }
    }

    #[test]
    fn a_full_inbox_records_what_did_not_fit() {
        let (inbox, mut rx) = inbox_of(1);
        assert!(inbox.take_spilled().is_none());
        inbox.send(push(vec![1, 2]));
        inbox.send(push(vec![3, 4]));
        inbox.send(ShardMsg::Kick {
            conn: 5,
            code: close::REPLACED,
            reason: "replaced",
        });
        inbox.send(ShardMsg::Notify {
            conn: 6,
            frame: Arc::from("{}"),
        });
        inbox.send(ShardMsg::Shutdown);
        let (missed, kicked, stop) = inbox.take_spilled().expect("spilled");
        assert_eq!(missed, HashSet::from([3, 4]), "connections that missed a push");
        assert_eq!(kicked, HashMap::from([(5, (close::REPLACED, "replaced"))]));
        assert!(stop);
        assert!(inbox.take_spilled().is_none(), "taken once");
        assert!(matches!(rx.try_recv(), Ok(ShardMsg::Push { conns, .. }) if conns == vec![1, 2]));
        assert!(rx.try_recv().is_err(), "nothing else was queued");
    }
}
