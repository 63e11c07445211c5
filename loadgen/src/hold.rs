//! `loadgen hold`: as many authenticated WebSocket connections as the kernel's memory allows,
//! from one process, on io_uring direct descriptors (the descriptor limit, 20,000 here, does not
//! apply to them), with heartbeats, and a check at the end that every one is still
//! authenticated and alive.
//!
//! Each thread owns its share of the connections and as many rings as they need (`sai-ring`,
//! the io_uring layer the gateway's direct engine uses). Connection `i` of a thread lives in
//! ring `i / slots`, slot `i % slots`, for its whole life (no reconnects: a lost connection is a
//! failure). Per connection: socket + bind (a loopback source address, so that each address
//! stays under the gateway's per-address cap and holds few ephemeral ports) + connect, linked in
//! one submission; the upgrade request; a multishot recv on provided buffers; then the sans-IO
//! [`ClientSession`] of `sai-proto`, the same one the other scenarios drive.
//!
//! Heartbeats sweep the connections: every tick, the next slice of them sends a ping, so each
//! sends one per `--heartbeat` and the server's idle timer never fires. At the end of the hold
//! every open connection pings once more and must answer within `--connect-timeout`: that is
//! the "alive" count.
//!
//! # Numbers
//! Per connection about 300 bytes of user space here (state, `ClientSession`, the token's
//! upgrade request only until it is sent); the kernel's socket memory is reported beside it.
#![allow(unsafe_code)]

use crate::client::{upgrade_request, upgrade_response};
use crate::report::{new_hist, record, Second, WorkerOut};
use crate::sys::{rss_kib, unix_us};
use sai_pipeline::token::{Claims, JwtKeys};
use sai_proto::session::ClientSession;
use sai_proto::ws::Event;
use sai_ring::{Completion, Ring};
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a hold run is told.
#[derive(Debug, Clone)]
pub struct HoldOpts {
    /// Gateway address (IPv4).
    pub server: SocketAddrV4,
    /// JWT secret to mint tokens with.
    pub jwt_secret: String,
    /// Seeded user prefix and first index.
    pub prefix: String,
    /// First user.
    pub first_user: u64,
    /// Connections in all.
    pub conns: u64,
    /// Connections started per second, all threads together.
    pub connect_rate: f64,
    /// Upgrade timeout, and the end-of-hold answer timeout.
    pub timeout: Duration,
    /// Loopback source addresses (127.0.0.1, .2, ...).
    pub src_addrs: u32,
    /// How long to hold every connection once all are up.
    pub hold: Duration,
    /// Ping period per connection.
    pub heartbeat: Duration,
    /// Threads.
    pub threads: u32,
    /// Gateway pid, to sample its RSS.
    pub server_pid: Option<u32>,
    /// Live progress lines.
    pub progress: bool,
}

/// Upgrades in flight per thread: more wait (the ramp is open-loop until this bound).
const MAX_CONNECTING: usize = 8192;
/// Heartbeat sweep tick.
const TICK: Duration = Duration::from_millis(50);
/// End-of-hold check pings per thread per tick (100,000/s): the whole set answers in seconds
/// without one burst of a million frames.
const CHECK_PER_TICK: usize = 5000;
/// Largest message accepted from the server.
const MAX_MESSAGE: usize = 1 << 20;

mod kind {
    pub const SOCKET: u64 = 1;
    pub const BIND: u64 = 2;
    pub const CONNECT: u64 = 3;
    pub const SEND: u64 = 4;
    pub const RECV: u64 = 5;
    pub const CLOSE: u64 = 6;
    pub const CANCEL: u64 = 7;
}

fn token(kind: u64, i: usize) -> u64 {
    (kind << 56) | i as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting,
    Upgrading,
    Open,
    Dead,
}

struct Conn {
    state: State,
    /// Upgrade response bytes until the head is complete.
    head: Vec<u8>,
    session: Option<Box<ClientSession>>,
    /// The send in flight and how much of it is written.
    sending: Option<(Vec<u8>, usize)>,
    /// Bytes waiting for the send in flight.
    queued: Vec<u8>,
    started: Instant,
    /// An answer (any text frame) arrived since the last ping.
    answered: bool,
}

/// Counters every thread adds to; the main thread samples them each second.
#[derive(Default)]
struct Shared {
    started: AtomicU64,
    open: AtomicU64,
    pings: AtomicU64,
    answers: AtomicU64,
    failed: AtomicU64,
    /// All threads finished their ramp (success or failure for every connection).
    ramped: AtomicU64,
    /// Start the end-of-hold check.
    check: AtomicBool,
    /// Threads done with the check.
    checked: AtomicU64,
    /// Close everything and report.
    stop: AtomicBool,
}

/// What a thread hands back.
struct ThreadOut {
    handshake: hdrhistogram::Histogram<u64>,
    failures: BTreeMap<String, u64>,
    alive: u64,
}

struct Thread {
    opts: HoldOpts,
    first: u64,
    rings: Vec<Ring>,
    slots: u32,
    conns: Vec<Conn>,
    keys: JwtKeys,
    shared: Arc<Shared>,
    /// One `sockaddr_in` per source address, and the server's; the kernel reads them until each
    /// connect completes.
    sources: Vec<libc::sockaddr_in>,
    remote: Box<libc::sockaddr_in>,
    connecting: VecDeque<(Instant, usize)>,
    failures: BTreeMap<String, u64>,
    handshake: hdrhistogram::Histogram<u64>,
    alive: u64,
    /// Closes submitted and not yet completed.
    closing: usize,
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

impl Thread {
    fn fail(&mut self, i: usize, cause: impl Into<String>) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if c.state == State::Dead {
            return;
        }
        let was_open = c.state == State::Open;
        c.state = State::Dead;
        *self.failures.entry(cause.into()).or_insert(0) += 1;
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        if was_open {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
        let (ring, slot) = self.place(i);
        self.rings[ring].cancel_and_close(slot, token(kind::CANCEL, i), token(kind::CLOSE, i));
        self.closing += 1;
    }

    fn place(&self, i: usize) -> (usize, u32) {
        (i / self.slots as usize, (i % self.slots as usize) as u32)
    }

    fn start(&mut self, i: usize) -> std::io::Result<()> {
        let (ring, slot) = self.place(i);
        while self.rings.len() <= ring {
            self.rings.push(Ring::new(self.slots, None)?);
        }
        let n = (self.first + i as u64) % u64::from(self.opts.src_addrs.max(1));
        let local: *const libc::sockaddr_in = &self.sources[n as usize];
        let remote: *const libc::sockaddr_in = &*self.remote;
        let tokens = [token(kind::SOCKET, i), token(kind::BIND, i), token(kind::CONNECT, i)];
        // SAFETY: `sources` and `remote` are never changed or dropped while the thread runs.
        unsafe {
            self.rings[ring].open_tcp(
                slot,
                libc::AF_INET,
                local.cast(),
                remote.cast(),
                size_of::<libc::sockaddr_in>() as u32,
                tokens,
            )?;
        }
        let c = &mut self.conns[i];
        c.state = State::Connecting;
        c.started = Instant::now();
        self.connecting.push_back((c.started + self.opts.timeout, i));
        self.shared.started.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn send(&mut self, i: usize, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let (ring, slot) = self.place(i);
        let c = &mut self.conns[i];
        if c.sending.is_some() {
            c.queued.extend_from_slice(&bytes);
            return;
        }
        let (ptr, len) = (bytes.as_ptr(), bytes.len() as u32);
        c.sending = Some((bytes, 0));
        // SAFETY: the bytes live in `c.sending` until this send completes (connections are never
        // dropped while the thread runs).
        unsafe { self.rings[ring].send(slot, ptr, len, token(kind::SEND, i)) };
    }

    fn flush_session(&mut self, i: usize) {
        let out = match self.conns[i].session.as_mut() {
            Some(s) => s.take_output(),
            None => return,
        };
        self.send(i, out);
    }

    fn ping(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.state != State::Open {
            return;
        }
        c.answered = false;
        if let Some(s) = c.session.as_mut() {
            s.send(&sai_pipeline::frame::ping_frame());
        }
        self.shared.pings.fetch_add(1, Ordering::Relaxed);
        self.flush_session(i);
    }

    fn complete(&mut self, ring: usize, c: Completion) {
        let kind = c.token >> 56;
        let i = (c.token & ((1 << 56) - 1)) as usize;
        if i >= self.conns.len() {
            return;
        }
        match kind {
            kind::SOCKET | kind::BIND if c.res < 0 => {
                let what = if kind == kind::SOCKET { "socket" } else { "bind" };
                self.fail(i, format!("{what}: {}", errno(c.res)));
            }
            kind::CONNECT => {
                if c.res < 0 {
                    // A failed socket or bind cancels the connect: that failure is counted.
                    if c.res != -libc::ECANCELED {
                        self.fail(i, format!("connect: {}", errno(c.res)));
                    }
                    return;
                }
                self.conns[i].state = State::Upgrading;
                let now = (unix_us() / 1_000_000) as i64;
                let user = format!("{}{}", self.opts.prefix, self.opts.first_user + self.first + i as u64);
                let jwt = self.keys.sign(&Claims {
                    gen: 0,
                    sub: user,
                    iat: now,
                    exp: now + 24 * 3600,
                });
                let req = upgrade_request(std::net::SocketAddr::V4(self.opts.server), &jwt);
                self.send(i, req.into_bytes());
                let (r, slot) = self.place(i);
                self.rings[r].recv(slot, token(kind::RECV, i));
            }
            kind::SEND => self.on_send(i, c.res),
            kind::CLOSE => self.closing = self.closing.saturating_sub(1),
            kind::RECV => self.on_recv(ring, i, c),
            _ => {}
        }
    }

    fn on_send(&mut self, i: usize, res: i32) {
        if res <= 0 {
            self.conns[i].sending = None;
            self.fail(i, format!("send: {}", errno(res)));
            return;
        }
        let (ring, slot) = self.place(i);
        let c = &mut self.conns[i];
        let Some((buf, done)) = &mut c.sending else {
            return;
        };
        *done += res as usize;
        if *done < buf.len() {
            let (ptr, len) = (buf[*done..].as_ptr(), (buf.len() - *done) as u32);
            // SAFETY: as in `send`.
            unsafe { self.rings[ring].send(slot, ptr, len, token(kind::SEND, i)) };
            return;
        }
        c.sending = None;
        let next = std::mem::take(&mut c.queued);
        self.send(i, next);
    }

    fn on_recv(&mut self, ring: usize, i: usize, c: Completion) {
        let data = match (c.res, c.buffer()) {
            (n, Some(bid)) if n > 0 => {
                let d = self.rings[ring].buffer(bid, n as usize).to_vec();
                self.rings[ring].recycle(bid);
                Some(d)
            }
            (_, Some(bid)) => {
                self.rings[ring].recycle(bid);
                None
            }
            _ => None,
        };
        let state = self.conns[i].state;
        if state == State::Dead {
            return;
        }
        if !c.more() && (data.is_some() || c.res == -libc::ENOBUFS) {
            let (r, slot) = self.place(i);
            self.rings[r].recv(slot, token(kind::RECV, i));
        }
        let Some(data) = data else {
            if c.res == 0 {
                self.fail(i, "closed_without_close_frame");
            } else if c.res != -libc::ENOBUFS && !c.more() {
                self.fail(i, format!("recv: {}", errno(c.res)));
            }
            return;
        };
        match state {
            State::Upgrading => {
                let conn = &mut self.conns[i];
                conn.head.extend_from_slice(&data);
                match upgrade_response(&conn.head) {
                    Ok(None) => {}
                    Ok(Some((101, end))) => {
                        let rest = conn.head.split_off(end);
                        conn.head = Vec::new();
                        let mut s =
                            ClientSession::new(i as u64 + 1, MAX_MESSAGE, self.opts.heartbeat, false, Instant::now());
                        s.handle_bytes(&rest);
                        conn.session = Some(Box::new(s));
                        conn.state = State::Open;
                        conn.answered = true;
                        let us = conn.started.elapsed().as_micros() as u64;
                        record(&mut self.handshake, us);
                        self.shared.open.fetch_add(1, Ordering::Relaxed);
                        self.on_events(i);
                    }
                    Ok(Some((status, _))) => self.fail(i, format!("http_{status}")),
                    Err(e) => self.fail(i, e.cause()),
                }
            }
            State::Open => {
                if let Some(s) = self.conns[i].session.as_mut() {
                    s.handle_bytes(&data);
                }
                self.on_events(i);
            }
            _ => {}
        }
    }

    fn on_events(&mut self, i: usize) {
        loop {
            let ev = match self.conns[i].session.as_mut().map(|s| s.poll_event()) {
                Some(Ok(Some(ev))) => ev,
                Some(Ok(None)) | None => break,
                Some(Err(e)) => {
                    self.fail(i, format!("protocol: {e}"));
                    return;
                }
            };
            match ev {
                Event::Text(_) => {
                    let c = &mut self.conns[i];
                    if !c.answered {
                        c.answered = true;
                        self.shared.answers.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Event::Close { code, .. } => {
                    self.fail(i, format!("closed_by_server_{code}"));
                    return;
                }
                _ => {}
            }
        }
        self.flush_session(i);
    }

    fn reap(&mut self, cqes: &mut Vec<Completion>) -> bool {
        let mut any = false;
        for r in 0..self.rings.len() {
            self.rings[r].completions(cqes);
            any |= !cqes.is_empty();
            for c in std::mem::take(cqes) {
                self.complete(r, c);
            }
        }
        any
    }

    fn submit(&mut self) -> std::io::Result<()> {
        for r in &mut self.rings {
            r.submit()?;
        }
        Ok(())
    }

    fn expire_handshakes(&mut self) {
        let now = Instant::now();
        while let Some(&(at, i)) = self.connecting.front() {
            if matches!(self.conns[i].state, State::Open | State::Dead) {
                self.connecting.pop_front();
                continue;
            }
            if at > now {
                break;
            }
            self.connecting.pop_front();
            self.fail(i, "connect_timeout");
        }
    }

    fn in_flight(&self) -> usize {
        self.connecting.len()
    }

    /// The whole life of this thread's connections.
    fn run(&mut self, rate: f64) -> std::io::Result<()> {
        let mut cqes = Vec::with_capacity(4096);
        let t0 = Instant::now();
        let mut next = 0usize;
        // Ramp: start connections on schedule, at most MAX_CONNECTING in flight.
        while next < self.conns.len() || self.in_flight() > 0 {
            let due = ((t0.elapsed().as_secs_f64() * rate) as usize).min(self.conns.len());
            while next < due && self.in_flight() < MAX_CONNECTING {
                self.start(next)?;
                next += 1;
            }
            self.submit()?;
            if !self.reap(&mut cqes) {
                std::thread::sleep(Duration::from_micros(500));
            }
            self.expire_handshakes();
        }
        self.shared.ramped.fetch_add(1, Ordering::Relaxed);
        // Hold: heartbeats swept over the connections.
        let per_tick =
            ((self.conns.len() as f64 * TICK.as_secs_f64() / self.opts.heartbeat.as_secs_f64()).ceil() as usize).max(1);
        let mut cursor = 0usize;
        let mut next_tick = Instant::now();
        while !self.shared.check.load(Ordering::Acquire) {
            if Instant::now() >= next_tick {
                for _ in 0..per_tick.min(self.conns.len()) {
                    self.ping(cursor);
                    cursor = (cursor + 1) % self.conns.len();
                }
                next_tick += TICK;
            }
            self.submit()?;
            if !self.reap(&mut cqes) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Check: one more ping each, [`CHECK_PER_TICK`] per tick; every open connection must
        // answer within the timeout of the last ping.
        let mut i = 0;
        let mut next_tick = Instant::now();
        while i < self.conns.len() {
            if Instant::now() >= next_tick {
                let end = (i + CHECK_PER_TICK).min(self.conns.len());
                for k in i..end {
                    self.ping(k);
                }
                i = end;
                next_tick += TICK;
            }
            self.submit()?;
            if !self.reap(&mut cqes) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let deadline = Instant::now() + self.opts.timeout;
        let unanswered = |t: &Thread| t.conns.iter().filter(|c| c.state == State::Open && !c.answered).count();
        while Instant::now() < deadline && unanswered(self) > 0 {
            for _ in 0..100 {
                self.submit()?;
                if !self.reap(&mut cqes) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        for i in 0..self.conns.len() {
            if self.conns[i].state == State::Open && !self.conns[i].answered {
                self.fail(i, "no_answer_at_end");
            }
        }
        self.alive = self.conns.iter().filter(|c| c.state == State::Open).count() as u64;
        self.shared.checked.fetch_add(1, Ordering::Relaxed);
        while !self.shared.stop.load(Ordering::Acquire) {
            self.submit()?;
            if !self.reap(&mut cqes) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Close every socket and let the kernel finish with our buffers before they are freed.
        for i in 0..self.conns.len() {
            if self.conns[i].state != State::Idle && self.conns[i].state != State::Dead {
                self.conns[i].state = State::Dead;
                let (ring, slot) = self.place(i);
                self.rings[ring].cancel_and_close(slot, token(kind::CANCEL, i), token(kind::CLOSE, i));
                self.closing += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.closing > 0 && Instant::now() < deadline {
            self.submit()?;
            if !self.reap(&mut cqes) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

fn errno(res: i32) -> String {
    std::io::Error::from_raw_os_error(-res).to_string()
}

/// Bytes of kernel slab memory in use (`Slab:` of /proc/meminfo).
fn kernel_slab_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Runs the hold: ramp, hold, check. Returns what a worker reports.
pub fn run(o: HoldOpts) -> Result<WorkerOut, String> {
    if o.conns == 0 || o.threads == 0 {
        return Err("hold needs --users > 0 and --threads > 0".into());
    }
    let slots = sai_ring::table_slots(crate::sys::nofile());
    let shared = Arc::new(Shared::default());
    let slab_before = kernel_slab_bytes();
    let server = o.server_pid.map(|p| p.to_string());
    let server_rss_before = server.as_deref().map(rss_kib).unwrap_or(0);
    let self_rss_before = rss_kib("self");
    let mut handles = Vec::new();
    for t in 0..o.threads {
        let (first, len) = crate::share(o.conns, o.threads, t);
        let shared = shared.clone();
        let o = o.clone();
        let rate = o.connect_rate / f64::from(o.threads);
        let h = std::thread::Builder::new()
            .name(format!("hold-{t}"))
            .spawn(move || -> Result<ThreadOut, String> {
                let sources = (1..=o.src_addrs.max(1))
                    .map(|n| sockaddr(SocketAddrV4::new(Ipv4Addr::new(127, 0, (n >> 8) as u8, n as u8), 0)))
                    .collect();
                let now = Instant::now();
                let mut th = Thread {
                    remote: Box::new(sockaddr(o.server)),
                    keys: JwtKeys::new(o.jwt_secret.as_bytes().to_vec()),
                    conns: (0..len)
                        .map(|_| Conn {
                            state: State::Idle,
                            head: Vec::new(),
                            session: None,
                            sending: None,
                            queued: Vec::new(),
                            started: now,
                            answered: false,
                        })
                        .collect(),
                    opts: o,
                    first,
                    rings: Vec::new(),
                    slots,
                    shared,
                    sources,
                    connecting: VecDeque::new(),
                    failures: BTreeMap::new(),
                    handshake: new_hist(),
                    alive: 0,
                    closing: 0,
                };
                th.run(rate).map_err(|e| e.to_string())?;
                Ok(ThreadOut {
                    handshake: std::mem::replace(&mut th.handshake, new_hist()),
                    failures: std::mem::take(&mut th.failures),
                    alive: th.alive,
                })
            })
            .map_err(|e| e.to_string())?;
        handles.push(h);
    }
    // The main thread samples once per second and moves the phases along.
    let t0 = Instant::now();
    let mut series = Vec::new();
    let mut ramp_s = 0.0;
    let mut held_since: Option<Instant> = None;
    let mut open_after_ramp = 0;
    let mut server_rss_held = 0;
    let mut self_rss_held = 0;
    let mut slab_held = 0;
    let (mut last_pings, mut last_answers, mut last_failed) = (0, 0, 0);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = &shared;
        let (open, pings, answers, failed) = (
            s.open.load(Ordering::Relaxed),
            s.pings.load(Ordering::Relaxed),
            s.answers.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
        );
        let x = Second {
            t: t0.elapsed().as_secs() as u32,
            connections: open,
            sent: pings - last_pings,
            acked: answers - last_answers,
            delivered: 0,
            errors: failed - last_failed,
            p50_ms: 0.0,
            p99_ms: 0.0,
            server_rss_kib: server.as_deref().map(rss_kib).unwrap_or(0),
            loadgen_rss_kib: rss_kib("self"),
            // One process: nothing to merge.
            hist: None,
        };
        (last_pings, last_answers, last_failed) = (pings, answers, failed);
        if o.progress {
            eprintln!(
                "[hold t={:>4}s] open {:>8} started {:>8} failed {:>6} pings {:>6}/s answers {:>6}/s server rss {} MiB",
                x.t,
                open,
                s.started.load(Ordering::Relaxed),
                failed,
                x.sent,
                x.acked,
                x.server_rss_kib / 1024
            );
        }
        series.push(x);
        if held_since.is_none() && s.ramped.load(Ordering::Relaxed) == u64::from(o.threads) {
            ramp_s = t0.elapsed().as_secs_f64();
            open_after_ramp = open;
            held_since = Some(Instant::now());
        }
        if let Some(since) = held_since {
            // Memory is read once the connections have settled, a few seconds into the hold.
            if server_rss_held == 0 && since.elapsed() >= Duration::from_secs(5).min(o.hold) {
                server_rss_held = server.as_deref().map(rss_kib).unwrap_or(0);
                self_rss_held = rss_kib("self");
                slab_held = kernel_slab_bytes();
            }
            if since.elapsed() >= o.hold && !s.check.swap(true, Ordering::AcqRel) {
                continue;
            }
        }
        if s.checked.load(Ordering::Relaxed) == u64::from(o.threads) {
            s.stop.store(true, Ordering::Release);
            break;
        }
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
    }
    shared.check.store(true, Ordering::Release);
    shared.stop.store(true, Ordering::Release);
    let mut threads = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => threads.push(t),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a hold thread panicked".into()),
        }
    }
    let mut out = WorkerOut::default();
    let mut handshake = new_hist();
    let mut alive = 0;
    for t in &threads {
        let _ = handshake.add(&t.handshake);
        alive += t.alive;
        for (k, v) in &t.failures {
            *out.failures.entry(k.clone()).or_insert(0) += v;
        }
    }
    let failed: u64 = out.failures.values().sum();
    out.put_hist("handshake", &handshake);
    out.counters.insert("connected".into(), handshake.len());
    out.counters.insert("alive_at_end".into(), alive);
    out.counters.insert("errors".into(), failed);
    out.counters
        .insert("pings".into(), shared.pings.load(Ordering::Relaxed));
    out.counters
        .insert("answers".into(), shared.answers.load(Ordering::Relaxed));
    let conns = open_after_ramp.max(1) as f64;
    out.extra.insert("ramp_s".into(), ramp_s);
    out.extra.insert("open_after_ramp".into(), open_after_ramp as f64);
    out.extra.insert("hold_s".into(), o.hold.as_secs_f64());
    out.extra.insert(
        "server_rss_delta_kib".into(),
        server_rss_held.saturating_sub(server_rss_before) as f64,
    );
    out.extra.insert(
        "loadgen_rss_delta_kib".into(),
        self_rss_held.saturating_sub(self_rss_before) as f64,
    );
    // Both ends of each connection are sockets of this machine: per socket is half.
    out.extra.insert(
        "kernel_slab_per_socket_bytes".into(),
        slab_held.saturating_sub(slab_before) as f64 / (2.0 * conns),
    );
    out.series = series;
    Ok(out)
}
