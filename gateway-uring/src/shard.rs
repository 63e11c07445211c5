//! One shard: a thread, its monoio runtime, its listener, its connections and its timer wheel.
//!
//! Tasks on a shard: the accept loop, the inbox loop (messages from other shards), the tick loop
//! (timer wheel + rigor resends), and a reader and a writer task per connection. They share the
//! shard through an `Rc`: nothing here is touched from another thread except the inbox channel
//! and the [`UserIndex`].

use crate::conn::{self, Conn};
use crate::index::UserIndex;
use crate::wheel::TimerWheel;
use crate::{Gateway, GatewayConfig, Prepared};
use monoio::io::Canceller;
use sai_pipeline::flow::{Route, Routes, Ws2Ms};
use sai_pipeline::frame::PushFrame;
use sai_proto::close;
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
    /// Exclusive login: close this connection with 4001.
    Kick {
        /// Target connection.
        conn: u64,
    },
    /// Close everything and stop.
    Shutdown,
}

/// The sending side of a shard's inbox.
pub type Inbox = mpsc::UnboundedSender<ShardMsg>;
/// The receiving side, owned by the shard's thread.
pub type InboxReceiver = mpsc::UnboundedReceiver<ShardMsg>;

/// What every shard shares.
pub(crate) struct Shared {
    pub cfg: GatewayConfig,
    pub pipeline: Arc<dyn Ws2Ms>,
    pub index: Arc<UserIndex>,
    pub inboxes: Vec<Inbox>,
}

/// Per-shard state.
pub(crate) struct Shard {
    pub idx: usize,
    pub shared: Arc<Shared>,
    pub conns: RefCell<HashMap<u64, Rc<Conn>>>,
    wheel: RefCell<TimerWheel>,
    /// Connections with unacked rigor pushes, polled each tick.
    pub rigor_active: RefCell<HashSet<u64>>,
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
    /// Milliseconds since the shard started (the shard's clock).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The instant form of `now`, for the sans-IO pending set.
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// Schedules connection `id` to be checked at `at_ms` (rounded up to a tick).
    pub fn schedule(&self, id: u64, at_ms: u64) {
        self.wheel.borrow_mut().insert(id, at_ms.div_ceil(self.tick_ms));
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
            node: 0,
            shard: self.idx as u32,
            conn,
        }
    }

    /// Adds an authenticated connection: map, wheel, index, and kicks the user's older one.
    pub fn register(&self, c: &Rc<Conn>) {
        self.conns.borrow_mut().insert(c.id, c.clone());
        self.schedule(
            c.id,
            c.last_active.get() + self.shared.cfg.idle_timeout.as_millis() as u64,
        );
        if let Some(old) = self.shared.index.register(&c.user, self.route(c.id)) {
            self.send_to(old.shard as usize, ShardMsg::Kick { conn: old.conn });
        }
    }

    /// Removes a finished connection.
    pub fn unregister(&self, c: &Conn) {
        self.conns.borrow_mut().remove(&c.id);
        self.rigor_active.borrow_mut().remove(&c.id);
        self.acked.borrow_mut().remove(&c.id);
        c.flush_received(self);
        self.shared.index.remove(&c.user, self.route(c.id));
    }

    fn send_to(&self, shard: usize, msg: ShardMsg) {
        if shard == self.idx {
            self.handle(msg);
        } else if let Some(inbox) = self.shared.inboxes.get(shard) {
            // A closed inbox means that shard is shutting down; its connections are closing.
            let _ = inbox.send(msg);
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
            ShardMsg::Kick { conn } => {
                if let Some(c) = self.conn(conn) {
                    c.close_with(self, close::REPLACED, "replaced by a new login");
                }
            }
            ShardMsg::Shutdown => self.stopping.set(true),
        }
    }

    fn on_tick(&self) {
        let now_ms = self.now_ms();
        let mut fired = Vec::new();
        self.wheel.borrow_mut().advance(now_ms / self.tick_ms, &mut fired);
        for id in fired {
            if let Some(c) = self.conn(id) {
                c.on_timer(self, now_ms);
            }
        }
        let acked: Vec<u64> = self.acked.borrow_mut().drain().collect();
        for id in acked {
            if let Some(c) = self.conn(id) {
                c.flush_received(self);
            }
        }
        let active: Vec<u64> = self.rigor_active.borrow().iter().copied().collect();
        if active.is_empty() {
            return;
        }
        let now = self.now();
        for id in active {
            match self.conn(id) {
                Some(c) => {
                    if c.resend_due(self, now) {
                        self.rigor_active.borrow_mut().remove(&id);
                    }
                }
                None => {
                    self.rigor_active.borrow_mut().remove(&id);
                }
            }
        }
    }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
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
    } = prepared;
    let n = inboxes.len();
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(bind_reuseport(bound)?);
    }
    let shared = Arc::new(Shared {
        cfg,
        pipeline,
        index: index.clone(),
        inboxes: inboxes.clone(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::with_capacity(n);
    for (idx, (listener, rx)) in listeners.into_iter().zip(receivers).enumerate() {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("sai-shard-{idx}"))
            .spawn(move || run_shard(idx, listener, rx, shared, ready))?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                for inbox in &inboxes {
                    let _ = inbox.send(ShardMsg::Shutdown);
                }
                return Err(e);
            }
            Err(_) => return Err(std::io::Error::other("a gateway shard died during start-up")),
        }
    }
    tracing::info!(%bound, shards = n, "gateway listening");
    Ok(Gateway {
        addr: bound,
        inboxes,
        threads,
        index,
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
            rigor_active: RefCell::new(HashSet::new()),
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
        for c in &conns {
            c.close_with(&shard, close::GOING_AWAY, "server shutting down");
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

async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener, cancel: monoio::io::CancelHandle) {
    loop {
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, _peer)) => {
                if shard.stopping.get() {
                    return;
                }
                monoio::spawn(conn::serve(shard.clone(), stream));
            }
            Err(e) => {
                if shard.stopping.get() {
                    return;
                }
                // EMFILE / ENFILE under the fd cap, or a connection reset before accept: back off
                // briefly instead of spinning.
                tracing::warn!(error = %e, shard = shard.idx, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn tick_loop(shard: Rc<Shard>) {
    let tick = shard.shared.cfg.tick;
    while !shard.stopping.get() {
        monoio::time::sleep(tick).await;
        shard.on_tick();
    }
}
