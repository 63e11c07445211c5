//! One worker's share of a run: virtual users on a current-thread tokio runtime, an open-loop
//! send schedule, correctness accounting and the per-second sampler.
//!
//! # Open loop
//! Message `k` of a phase is due at `start + k / rate`, fixed in advance. Its scheduled time (Unix
//! microseconds) travels inside the message (`msg.t`), and every latency is measured from it, so
//! a stall anywhere (loadgen, network, gateway, storage) shows up as latency instead of silently
//! lowering the send rate (coordinated omission).
//!
//! # Correctness
//! Every message has a unique key (`msg.k`; its `clientMsgId` is `<run id>-<key>`). The scheduler records how many
//! deliveries each key must get; receivers record `(receiver, key)`. At the end of a phase, after
//! draining, `missing` = expected deliveries not seen, `duplicated` = a `(receiver, key)` seen
//! twice, `out_of_order` = a push whose seq is below one already seen in that conversation.
//!
//! # Reconnect mode (`--reconnect`)
//! What a real client does when the server restarts under it: a connection the server closes
//! (1012 on a graceful stop) or that breaks is opened again (retried every 100 ms to 1 s, for at
//! most [`RECONNECT_FOR`]), `conversation.sync` fetches what was stored meanwhile, and every
//! message not yet acked, including those written while offline, is sent again with its
//! `clientMsgId` (the server stores it once). `reconnect_after_loss` is the time from the lost
//! connection to the sync's answer, `reconnect_retries` the attempts that failed meanwhile;
//! `unacked` (messages never acked at the end) must be 0, as must `missing` and `duplicated`.

use crate::client::{self, Client};
use crate::peer::{self, PeerClient, PeerConfig, PeerEvent, Target};
use crate::report::{new_hist, record, Second, Summary, WorkerOut};
use crate::sys::{rss_kib, unix_us, Rng};
use hdrhistogram::Histogram;
use sai_pipeline::frame::frame_type;
use sai_pipeline::message::method;
use sai_pipeline::token::{Claims, JwtKeys};
use sai_proto::ws::Event;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Settings shared by every scenario.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Gateway address.
    /// Gateways; user i connects to `ws[i % len]`.
    pub ws: Vec<SocketAddr>,
    /// HTTP API base URL (group scenario).
    pub http: String,
    /// The gateway's JWT secret (benchmark mode: loadgen mints tokens).
    pub jwt_secret: String,
    /// Seeded user prefix (`sai-im admin seed-users --prefix`).
    pub prefix: String,
    /// First user index of this worker.
    pub first_user: u64,
    /// Users of this worker.
    pub users: u64,
    /// Connections opened per second (this worker).
    pub connect_rate: f64,
    /// Per-connection connect + upgrade timeout.
    pub connect_timeout: Duration,
    /// Spread connections over this many source addresses 127.0.0.1.. (0: let the kernel pick).
    pub src_addrs: u32,
    /// Gateway pid, to sample its RSS.
    pub server_pid: Option<u32>,
    /// PRNG seed.
    pub seed: u64,
    /// Application heartbeat interval.
    pub heartbeat: Duration,
    /// The gateway's ack mode: `rigor` makes clients ack pushes.
    pub ack_mode: String,
    /// Longest wait for outstanding deliveries after a phase.
    pub drain: Duration,
    /// Worker index (keys are unique across workers).
    pub worker: u32,
    /// Print the live progress line.
    pub progress: bool,
    /// Reconnect, sync and resend when the server drops a connection (restart runs).
    pub reconnect: bool,
    /// The server kind: SAI-IM or a peer.
    pub target: Target,
    /// Peers: each session's settings but the user and its groups.
    pub peer: PeerConfig,
    /// The groups of this worker (created over HTTP on SAI-IM, named for a peer); local user
    /// `i` is a member of `groups[i / group_size]`.
    pub groups: Vec<String>,
    /// Members per group (0: no groups).
    pub group_size: u64,
}

/// A connection to either kind of server.
enum Conn {
    Sai(Client),
    Peer(PeerClient),
}

/// The longest a reconnecting user keeps trying.
pub const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Why a user's connection ended.
enum End {
    /// The run told it to (close, drop) or the protocol failed: stays closed.
    Told,
    /// The server closed it or it broke: a reconnecting user comes back.
    Lost,
}

/// A command to a user task.
enum Cmd {
    Send {
        key: u64,
        to: Rc<str>,
        chat_type: u8,
        scheduled_us: u64,
    },
    /// Drop the connection without a close handshake (storm).
    Drop,
    /// Close cleanly.
    Close,
}

#[derive(Default)]
struct UserState {
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    /// Highest seq seen per conversation (kept across reconnects, for sync).
    last_seq: HashMap<String, u64>,
    /// Set while a `conversation.sync` is outstanding: pushes are sync deliveries.
    syncing_since: Option<u64>,
    /// Rigor mode: push ids seen on the current connection; a push with a seen id is the
    /// server's resend of an unacked push (by design), not a duplicate.
    push_ids: HashSet<u64>,
    /// Reconnect mode: frames sent (or written while offline) and not yet acked, by key; sent
    /// again after a reconnect.
    unacked: BTreeMap<u64, String>,
    /// Reconnect mode: when the connection was lost (until the sync after it answers).
    lost_since: Option<u64>,
}

#[derive(Default)]
struct Counters {
    sent: u64,
    acked: u64,
    delivered: u64,
    delivered_by_sync: u64,
    duplicated: u64,
    resent: u64,
    resync_overlap: u64,
    out_of_order: u64,
    errors: u64,
    connected: u64,
    open: u64,
    skipped_offline: u64,
    /// Connections the server closed or that broke (reconnect mode).
    lost: u64,
    /// Reconnections that succeeded (reconnect mode).
    reconnected: u64,
    /// Reconnection attempts that failed and were retried (reconnect mode).
    reconnect_retries: u64,
    /// Messages sent again after a reconnect (reconnect mode).
    resent_unacked: u64,
    /// Messages written while offline, sent on reconnect (reconnect mode).
    queued_offline: u64,
}

struct Stats {
    handshake: Histogram<u64>,
    ack: Histogram<u64>,
    e2e: Histogram<u64>,
    reconnect: Histogram<u64>,
    /// Reconnect mode: from a lost connection to the answer of the sync after it.
    back: Histogram<u64>,
    /// The current second's main latency.
    second: Histogram<u64>,
    c: Counters,
    failures: BTreeMap<String, u64>,
    /// key -> deliveries still expected.
    expected: HashMap<u64, u32>,
    /// (receiver, key) seen.
    /// (receiver, key) seen, and whether first by sync.
    received: HashMap<(u32, u64), bool>,
    /// frame id -> scheduled time, for ack latency.
    sent_at: HashMap<u64, u64>,
    syncs_pending: u64,
}

/// The worker's state, shared by its tasks (one thread).
pub struct Worker {
    pub opts: Opts,
    keys: JwtKeys,
    users: RefCell<Vec<UserState>>,
    stats: RefCell<Stats>,
    next_key: std::cell::Cell<u64>,
    series: RefCell<Vec<Second>>,
    started: Instant,
    /// Latency that the per-second series tracks: "e2e" or "handshake".
    series_metric: std::cell::Cell<&'static str>,
    sampling: std::cell::Cell<bool>,
    /// Prefix of every clientMsgId of this run: the server dedupes `(sender, clientMsgId)` for
    /// ever, so ids must never repeat across runs against the same data.
    run_id: String,
}

/// A server frame, borrowed from the text: every delivery is parsed here, and nothing of it needs
/// to be copied.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FrameRef<'a> {
    frame_type: u8,
    #[serde(borrow)]
    id: Option<&'a str>,
    #[serde(borrow)]
    method: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// The fields of a push that loadgen checks, borrowed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PushRef<'a> {
    #[serde(borrow)]
    conversation_id: &'a str,
    seq: u64,
    #[serde(borrow)]
    msg: &'a RawValue,
}

#[derive(Deserialize)]
struct MsgBody {
    t: Option<u64>,
    k: Option<u64>,
}

impl Worker {
    /// A worker for `opts`.
    pub fn new(opts: Opts) -> Rc<Self> {
        let n = opts.users as usize;
        Rc::new(Self {
            keys: JwtKeys::new(opts.jwt_secret.as_bytes().to_vec()),
            users: RefCell::new((0..n).map(|_| UserState::default()).collect()),
            stats: RefCell::new(Stats {
                handshake: new_hist(),
                ack: new_hist(),
                e2e: new_hist(),
                reconnect: new_hist(),
                back: new_hist(),
                second: new_hist(),
                c: Counters::default(),
                failures: BTreeMap::new(),
                expected: HashMap::new(),
                received: HashMap::new(),
                sent_at: HashMap::new(),
                syncs_pending: 0,
            }),
            next_key: std::cell::Cell::new(u64::from(opts.worker) << 40),
            series: RefCell::new(Vec::new()),
            started: Instant::now(),
            series_metric: std::cell::Cell::new("e2e"),
            sampling: std::cell::Cell::new(true),
            run_id: format!("{:x}", unix_us() ^ (u64::from(opts.worker) << 56)),
            opts,
        })
    }

    /// User id of local user `i`.
    pub fn user_id(&self, i: usize) -> String {
        format!("{}{}", self.opts.prefix, self.opts.first_user + i as u64)
    }

    fn token(&self, i: usize) -> String {
        let now = (unix_us() / 1_000_000) as i64;
        self.keys.sign(&Claims {
            gen: 0,
            sub: self.user_id(i),
            iat: now,
            exp: now + 24 * 3600,
        })
    }

    fn src(&self, i: usize) -> Option<IpAddr> {
        let k = self.opts.src_addrs;
        if k == 0 {
            return None;
        }
        let n = (i as u32 % k) + 1;
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, (n >> 8) as u8, (n & 0xff) as u8)))
    }

    fn fail(&self, cause: String) {
        let mut s = self.stats.borrow_mut();
        *s.failures.entry(cause).or_insert(0) += 1;
        s.c.errors += 1;
    }

    /// Opens connections for local users `range` at the configured rate; returns when all
    /// attempts finished. Records handshake latency and failures.
    pub async fn connect_all(self: &Rc<Self>, range: std::ops::Range<usize>, sync_on_connect: bool) {
        let start = Instant::now();
        let rate = self.opts.connect_rate.max(1.0);
        let mut pending = Vec::new();
        for (k, i) in range.clone().enumerate() {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let w = self.clone();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            tokio::task::spawn_local(async move { w.open(i, sync_on_connect, done_tx).await });
            pending.push(done_rx);
            if self.opts.progress && k % 500 == 0 {
                self.progress_bar(k, range.len());
            }
        }
        for p in pending {
            let _ = p.await;
        }
        if self.opts.progress {
            self.progress_bar(range.len(), range.len());
            eprintln!();
        }
    }

    fn progress_bar(&self, done: usize, total: usize) {
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        let c = &self.stats.borrow().c;
        eprint!(
            "\r[w{}] connecting [{}{}] {done}/{total} open {} failed {}   ",
            self.opts.worker,
            "=".repeat(filled),
            " ".repeat(width - filled),
            c.open,
            c.errors
        );
    }

    /// Connects user `i` (saying so on `done` once the attempt is over) and runs its task until
    /// told to stop.
    /// In reconnect mode, a connection the server drops is opened again, synced, and what was
    /// not acked is sent again, until the run tells the user to stop.
    async fn open(self: Rc<Self>, i: usize, sync_on_connect: bool, done: tokio::sync::oneshot::Sender<()>) {
        let mut done = Some(done);
        let say_done = |done: &mut Option<tokio::sync::oneshot::Sender<()>>| {
            if let Some(d) = done.take() {
                let _ = d.send(());
            }
        };
        let mut attempt = 0u64;
        loop {
            let t0 = Instant::now();
            let seed = self.opts.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9) ^ (attempt << 40);
            let Some(ws) = self.opts.ws.get(i % self.opts.ws.len().max(1)).copied() else {
                self.fail("no_gateway".into());
                say_done(&mut done);
                return;
            };
            let c = match self.opts.target {
                Target::Sai => client::connect(
                    ws,
                    self.src(i),
                    &self.token(i),
                    self.opts.connect_timeout,
                    seed,
                    self.opts.heartbeat,
                    self.opts.ack_mode == "rigor",
                )
                .await
                .map(Conn::Sai),
                t => peer::connect(t, ws, self.src(i), self.peer_config(i), self.opts.connect_timeout)
                    .await
                    .map(Conn::Peer),
            };
            let lost_since = self.users.borrow()[i].lost_since;
            let mut conn = match c {
                Ok(c) => c,
                Err(e) => match lost_since {
                    Some(since) if unix_us().saturating_sub(since) < RECONNECT_FOR.as_micros() as u64 => {
                        // The server is not back yet: try again, 100 ms more each time, up to 1 s.
                        attempt += 1;
                        self.stats.borrow_mut().c.reconnect_retries += 1;
                        tokio::time::sleep(Duration::from_millis((100 * attempt).min(1000))).await;
                        continue;
                    }
                    _ => {
                        self.fail(format!("connect_{}", e.cause()));
                        say_done(&mut done);
                        return;
                    }
                },
            };
            attempt = 0;
            let us = t0.elapsed().as_micros() as u64;
            let (tx, rx) = mpsc::unbounded_channel();
            {
                let mut s = self.stats.borrow_mut();
                record(&mut s.handshake, us);
                if self.series_metric.get() == "handshake" {
                    record(&mut s.second, us);
                }
                s.c.connected += 1;
                s.c.open += 1;
                if lost_since.is_some() {
                    s.c.reconnected += 1;
                }
            }
            if let (Conn::Sai(client), true) = (&mut conn, sync_on_connect || lost_since.is_some()) {
                let known = self.users.borrow()[i].last_seq.clone();
                let f = serde_json::json!({"frameType": 0, "id": "sync", "method": "conversation.sync",
                                           "data": {"conversations": known}});
                client.session.send(&f.to_string());
                self.users.borrow_mut()[i].syncing_since = Some(unix_us());
                self.stats.borrow_mut().syncs_pending += 1;
            }
            {
                let mut users = self.users.borrow_mut();
                let u = &mut users[i];
                if let (Conn::Sai(client), Some(_)) = (&mut conn, lost_since) {
                    for frame in u.unacked.values() {
                        client.session.send(frame);
                    }
                    self.stats.borrow_mut().c.resent_unacked += u.unacked.len() as u64;
                }
                u.tx = Some(tx);
                u.push_ids.clear();
            }
            say_done(&mut done);
            let mut rx = rx;
            let end = match conn {
                Conn::Sai(client) => self.run_user(i, client, &mut rx).await,
                Conn::Peer(client) => self.run_peer(i, client, &mut rx).await,
            };
            self.users.borrow_mut()[i].tx = None;
            self.stats.borrow_mut().c.open -= 1;
            match end {
                End::Lost if self.opts.reconnect => {
                    // Messages handed to this connection's task and not written yet go with
                    // the rest of the unacked ones.
                    while let Ok(cmd) = rx.try_recv() {
                        if let Cmd::Send {
                            key,
                            to,
                            chat_type,
                            scheduled_us,
                        } = cmd
                        {
                            self.queue_offline(i, key, &to, chat_type, scheduled_us);
                        }
                    }
                    self.users.borrow_mut()[i].lost_since.get_or_insert_with(unix_us);
                    self.stats.borrow_mut().c.lost += 1;
                }
                _ => return,
            }
        }
    }

    /// A connection lost: a failure, unless the user comes back (reconnect mode).
    fn lost(&self, cause: String) -> End {
        if !self.opts.reconnect {
            self.fail(cause);
        }
        End::Lost
    }

    async fn run_user(&self, i: usize, mut client: Client, rx: &mut mpsc::UnboundedReceiver<Cmd>) -> End {
        let rigor = self.opts.ack_mode == "rigor";
        // One timer per connection, re-armed at the session's next heartbeat.
        let heartbeat = tokio::time::sleep_until(client.session.poll_timeout().into());
        tokio::pin!(heartbeat);
        loop {
            loop {
                match client.poll_event() {
                    Ok(Some(ev)) => {
                        if let Some(end) = self.on_event(i, &mut client, ev, rigor) {
                            let _ = client.flush().await;
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(format!("protocol: {e}"));
                        let _ = client.flush().await;
                        return End::Told;
                    }
                }
            }
            if client.flush().await.is_err() {
                return self.lost("write_failed".into());
            }
            tokio::select! {
                r = client.rd.read(&mut client.buf) => match r {
                    Ok(0) => return self.lost("closed_without_close_frame".into()),
                    Ok(n) => client.feed(n),
                    Err(e) => return self.lost(format!("read: {e}")),
                },
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Send { key, to, chat_type, scheduled_us }) => {
                        let frame = self.chat_frame(key, &to, chat_type, scheduled_us);
                        client.session.send(&frame);
                        if self.opts.reconnect {
                            self.users.borrow_mut()[i].unacked.insert(key, frame);
                        }
                        self.count_sent(key, scheduled_us);
                    }
                    Some(Cmd::Drop) => return End::Told,
                    Some(Cmd::Close) | None => { client.close().await; return End::Told; }
                },
                _ = &mut heartbeat => {
                    client.session.handle_timeout(Instant::now());
                    heartbeat.as_mut().reset(client.session.poll_timeout().into());
                }
            }
        }
    }

    /// The peer session settings of local user `i`.
    fn peer_config(&self, i: usize) -> PeerConfig {
        let user = self.user_id(i);
        let group = (self.opts.group_size > 0)
            .then(|| self.opts.groups.get(i / self.opts.group_size as usize).cloned())
            .flatten();
        let login = match self.opts.target {
            // XMPP users log in as themselves; MQTT and NATS share one broker account, if any.
            Target::Xmpp => self.opts.peer.login.clone().map(|(_, p)| (user.clone(), p)),
            _ => self.opts.peer.login.clone(),
        };
        PeerConfig {
            user,
            groups: group.into_iter().collect(),
            login,
            ..self.opts.peer.clone()
        }
    }

    /// [`Self::run_user`] for a peer server: the same commands and accounting, the peer's codec.
    async fn run_peer(&self, i: usize, mut c: PeerClient, rx: &mut mpsc::UnboundedReceiver<Cmd>) -> End {
        let me: Rc<str> = Rc::from(self.user_id(i).as_str());
        let every = self.opts.heartbeat;
        let mut keepalive = tokio::time::interval_at((Instant::now() + every).into(), every);
        loop {
            for e in std::mem::take(&mut c.events) {
                match e {
                    PeerEvent::Acked(key) => self.on_ack(i, Some(key)),
                    PeerEvent::Delivery(p) => self.on_peer_delivery(i, &me, &p),
                    PeerEvent::Failed(cause) => self.fail(cause),
                    PeerEvent::Ready => {}
                }
            }
            if c.flush().await.is_err() {
                return self.lost("write_failed".into());
            }
            tokio::select! {
                r = c.rd.read(&mut c.buf) => match r {
                    Ok(0) => return self.lost("closed_by_server".into()),
                    Ok(n) => if let Err(e) = c.feed(n) {
                        self.fail(e);
                        let _ = c.flush().await;
                        return End::Told;
                    },
                    Err(e) => return self.lost(format!("read: {e}")),
                },
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Send { key, to, chat_type, scheduled_us }) => {
                        let group = chat_type == 1;
                        let conversation = if group { format!("{to}/{me}") } else { me.to_string() };
                        let body = peer::payload(scheduled_us, key, &me, &conversation);
                        c.codec.send(key, &to, group, body.as_bytes(), &mut c.out);
                        self.count_sent(key, scheduled_us);
                    }
                    Some(Cmd::Drop) => return End::Told,
                    Some(Cmd::Close) | None => { c.close().await; return End::Told; }
                },
                _ = keepalive.tick() => c.codec.keepalive(&mut c.out),
            }
        }
    }

    /// A message from a peer server: its payload says who sent it in which conversation; a
    /// group message echoed to its sender is not a delivery.
    fn on_peer_delivery(&self, i: usize, me: &str, payload: &[u8]) {
        let Ok(p) = serde_json::from_slice::<peer::Payload<'_>>(payload) else {
            self.fail("unparsable_message".into());
            return;
        };
        if p.s == me {
            return;
        }
        // Keys grow in send order, and each conversation has one sender: a key below one seen
        // is a message overtaken.
        self.delivered(
            i,
            p.c,
            p.k,
            MsgBody {
                t: Some(p.t),
                k: Some(p.k),
            },
        );
    }

    /// Message `key`, scheduled at `scheduled_us`, went to the server: counted, and awaiting its
    /// ack unless the server sends none.
    fn count_sent(&self, key: u64, scheduled_us: u64) {
        let mut s = self.stats.borrow_mut();
        s.c.sent += 1;
        if self.opts.ack_mode != "none" {
            s.sent_at.insert(key, scheduled_us);
        }
    }

    /// Keeps message `key` of user `i`, who is offline, to be sent when the user is back.
    fn queue_offline(&self, i: usize, key: u64, to: &str, chat_type: u8, scheduled_us: u64) {
        let frame = self.chat_frame(key, to, chat_type, scheduled_us);
        self.users.borrow_mut()[i].unacked.insert(key, frame);
        let mut s = self.stats.borrow_mut();
        s.c.queued_offline += 1;
        if self.opts.ack_mode != "none" {
            s.sent_at.insert(key, scheduled_us);
        }
    }

    /// The `conversation.chat` frame of message `key`.
    fn chat_frame(&self, key: u64, to: &str, chat_type: u8, scheduled_us: u64) -> String {
        let run = &self.run_id;
        format!(
            "{{\"frameType\":0,\"id\":\"{key}\",\"method\":\"conversation.chat\",\"data\":{{\"chatType\":{chat_type},\"recvId\":\"{to}\",\"clientMsgId\":\"{run}-{key}\",\"msg\":{{\"mType\":0,\"t\":{scheduled_us},\"k\":{key}}}}}}}"
        )
    }

    /// Handles one event; `Some` ends the connection.
    fn on_event(&self, i: usize, client: &mut Client, ev: Event, rigor: bool) -> Option<End> {
        let text = match ev {
            Event::Text(t) => t,
            Event::Close { code, .. } => return Some(self.lost(format!("closed_by_server_{code}"))),
            _ => return None,
        };
        let Ok(f) = serde_json::from_str::<FrameRef<'_>>(&text) else {
            self.fail("unparsable_frame".into());
            return None;
        };
        match (f.frame_type, f.method) {
            (frame_type::ACK, _) => self.on_ack(i, f.id.and_then(|id| id.parse::<u64>().ok())),
            (frame_type::DATA, Some(method::PUSH)) => {
                if rigor {
                    if let Some(id) = f.id {
                        client.session.ack_push(id);
                        let n = id.parse::<u64>().unwrap_or(u64::MAX);
                        if !self.users.borrow_mut()[i].push_ids.insert(n) {
                            self.stats.borrow_mut().c.resent += 1;
                            return None;
                        }
                    }
                }
                if let Some(p) = f.data.and_then(|d| serde_json::from_str::<PushRef<'_>>(d.get()).ok()) {
                    self.on_push(i, &p);
                }
            }
            (frame_type::DATA, Some(method::SYNC)) => {
                let (since, lost_since) = {
                    let mut users = self.users.borrow_mut();
                    (users[i].syncing_since.take(), users[i].lost_since.take())
                };
                let now = unix_us();
                let mut s = self.stats.borrow_mut();
                if let Some(since) = since {
                    record(&mut s.reconnect, now.saturating_sub(since));
                    s.syncs_pending = s.syncs_pending.saturating_sub(1);
                }
                if let Some(lost) = lost_since {
                    record(&mut s.back, now.saturating_sub(lost));
                }
            }
            (frame_type::ERROR, _) => {
                let code = f
                    .data
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(d.get()).ok())
                    .and_then(|v| v["code"].as_str().map(String::from))
                    .unwrap_or_default();
                self.fail(format!("error_frame_{code}"));
            }
            _ => {}
        }
        None
    }

    /// The server acked message `key` of user `i`.
    fn on_ack(&self, i: usize, key: Option<u64>) {
        let now = unix_us();
        if let Some(k) = key.filter(|_| self.opts.reconnect) {
            self.users.borrow_mut()[i].unacked.remove(&k);
        }
        let mut s = self.stats.borrow_mut();
        s.c.acked += 1;
        if let Some(at) = key.and_then(|k| s.sent_at.remove(&k)) {
            record(&mut s.ack, now.saturating_sub(at));
        }
    }

    fn on_push(&self, i: usize, p: &PushRef<'_>) {
        let body: MsgBody = serde_json::from_str(p.msg.get()).unwrap_or(MsgBody { t: None, k: None });
        self.delivered(i, p.conversation_id, p.seq, body);
    }

    /// User `i` got message `body`, number `seq` of `conversation`: counted as delivered (or
    /// duplicated, out of order, synced), with its end-to-end latency.
    fn delivered(&self, i: usize, conversation: &str, seq: u64, body: MsgBody) {
        let now = unix_us();
        let syncing = {
            let mut users = self.users.borrow_mut();
            let u = &mut users[i];
            let last = match u.last_seq.get_mut(conversation) {
                Some(last) => last,
                None => u.last_seq.entry(conversation.to_string()).or_insert(0),
            };
            let ooo = seq < *last;
            *last = (*last).max(seq);
            let syncing = u.syncing_since.is_some();
            if ooo && !syncing {
                self.stats.borrow_mut().c.out_of_order += 1;
            }
            syncing
        };
        let Some(key) = body.k else {
            return;
        };
        let mut s = self.stats.borrow_mut();
        if !s.expected.contains_key(&key) {
            // A message from another run or worker: not ours to account.
            return;
        }
        if let Some(by_sync) = s.received.insert((i as u32, key), syncing) {
            // A message both synced and pushed (its push was still on its way when the sync
            // read it) is the overlap the protocol allows: clients keep one per seq.
            if syncing || by_sync {
                s.c.resync_overlap += 1;
            } else {
                s.c.duplicated += 1;
            }
            return;
        }
        if let Some(e) = s.expected.get_mut(&key) {
            *e = e.saturating_sub(1);
        }
        if syncing {
            s.c.delivered_by_sync += 1;
        } else {
            s.c.delivered += 1;
            if let Some(t) = body.t {
                let us = now.saturating_sub(t);
                record(&mut s.e2e, us);
                if self.series_metric.get() == "e2e" {
                    record(&mut s.second, us);
                }
            }
        }
    }

    /// Open loop: `rate` messages per second for `duration`; `pick` chooses the sender, the
    /// recipient id, the chat type and how many deliveries the message must get.
    pub async fn schedule(
        &self,
        rate: f64,
        duration: Duration,
        rng: &mut Rng,
        mut pick: impl FnMut(&mut Rng) -> (usize, Rc<str>, u8, u32),
    ) {
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let start = Instant::now();
        let start_us = unix_us();
        for k in 0..total {
            let offset = Duration::from_secs_f64(k as f64 / rate);
            let due = start + offset;
            if due > Instant::now() + Duration::from_micros(500) {
                tokio::time::sleep_until(due.into()).await;
            }
            let (sender, to, chat_type, deliveries) = pick(rng);
            let key = self.next_key.get();
            self.next_key.set(key + 1);
            let tx = self.users.borrow()[sender].tx.clone();
            let scheduled_us = start_us + offset.as_micros() as u64;
            let Some(tx) = tx else {
                if self.opts.reconnect {
                    // Written while offline: sent when the user is back.
                    self.stats.borrow_mut().expected.insert(key, deliveries);
                    self.queue_offline(sender, key, &to, chat_type, scheduled_us);
                } else {
                    self.stats.borrow_mut().c.skipped_offline += 1;
                }
                continue;
            };
            self.stats.borrow_mut().expected.insert(key, deliveries);
            let _ = tx.send(Cmd::Send {
                key,
                to,
                chat_type,
                scheduled_us,
            });
        }
    }

    /// Waits until every expected delivery and sync arrived, or the drain timeout.
    pub async fn drain(&self) {
        let until = Instant::now() + self.opts.drain;
        while Instant::now() < until {
            {
                let s = self.stats.borrow();
                if s.syncs_pending == 0 && s.expected.values().all(|v| *v == 0) && self.unacked() == 0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Messages not acked yet (reconnect mode; 0 otherwise).
    pub fn unacked(&self) -> u64 {
        self.users.borrow().iter().map(|u| u.unacked.len() as u64).sum()
    }

    /// Expected deliveries not seen.
    pub fn missing(&self) -> u64 {
        self.stats.borrow().expected.values().map(|v| u64::from(*v)).sum()
    }

    /// Sends `cmd` to each user in `range` that is online.
    fn tell(&self, range: std::ops::Range<usize>, mk: impl Fn() -> Cmd) {
        let users = self.users.borrow();
        for u in &users[range] {
            if let Some(tx) = &u.tx {
                let _ = tx.send(mk());
            }
        }
    }

    /// Drops users' connections abruptly (storm).
    pub fn drop_users(&self, range: std::ops::Range<usize>) {
        self.tell(range, || Cmd::Drop);
    }

    /// Closes every connection cleanly and waits for them to go.
    pub async fn close_all(&self) {
        self.tell(0..self.opts.users as usize, || Cmd::Close);
        for _ in 0..250 {
            if self.stats.borrow().c.open == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Open connections.
    pub fn open_count(&self) -> u64 {
        self.stats.borrow().c.open
    }

    /// Users of this worker that are connected.
    pub fn online(&self, i: usize) -> bool {
        self.users.borrow()[i].tx.is_some()
    }

    /// Chooses which latency the per-second series follows.
    pub fn set_series_metric(&self, m: &'static str) {
        self.series_metric.set(m);
    }

    /// A fresh e2e histogram (capacity steps); returns the old one.
    pub fn take_e2e(&self) -> Histogram<u64> {
        std::mem::replace(&mut self.stats.borrow_mut().e2e, new_hist())
    }

    /// Installs `h` as the e2e histogram.
    pub fn put_e2e(&self, h: Histogram<u64>) {
        self.stats.borrow_mut().e2e = h;
    }

    /// Samples once per second until stopped: counters' deltas, the second's percentiles, RSS.
    pub async fn sampler(self: Rc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let (mut sent, mut acked, mut delivered, mut errors) = (0, 0, 0, 0);
        let server = self.opts.server_pid.map(|p| p.to_string());
        while self.sampling.get() {
            tick.tick().await;
            let mut s = self.stats.borrow_mut();
            let sec = std::mem::replace(&mut s.second, new_hist());
            let sum = Summary::of(&sec);
            let x = Second {
                t: self.started.elapsed().as_secs() as u32,
                connections: s.c.open,
                sent: s.c.sent - sent,
                acked: s.c.acked - acked,
                delivered: s.c.delivered - delivered,
                errors: s.c.errors - errors,
                p50_ms: sum.p50_ms,
                p99_ms: sum.p99_ms,
                server_rss_kib: server.as_deref().map(rss_kib).unwrap_or(0),
                loadgen_rss_kib: rss_kib("self"),
                hist: crate::report::encode_hist(&sec),
            };
            (sent, acked, delivered, errors) = (s.c.sent, s.c.acked, s.c.delivered, s.c.errors);
            drop(s);
            if self.opts.progress {
                eprintln!(
                    "[w{} t={:>3}s] conns {:>7} sent {:>7}/s acked {:>7}/s delivered {:>7}/s p50 {:>8.3} ms p99 {:>8.3} ms errors {}",
                    self.opts.worker, x.t, x.connections, x.sent, x.acked, x.delivered, x.p50_ms, x.p99_ms, x.errors
                );
            }
            self.series.borrow_mut().push(x);
        }
    }

    /// Stops the sampler after its next tick.
    pub fn stop_sampler(&self) {
        self.sampling.set(false);
    }

    /// Everything measured, for the coordinator.
    pub fn output(&self) -> WorkerOut {
        let s = self.stats.borrow();
        let mut out = WorkerOut::default();
        for (name, h) in [
            ("handshake", &s.handshake),
            ("ack", &s.ack),
            ("e2e", &s.e2e),
            ("reconnect", &s.reconnect),
            ("reconnect_after_loss", &s.back),
        ] {
            if !h.is_empty() {
                out.put_hist(name, h);
            }
        }
        let c = &s.c;
        for (k, v) in [
            ("sent", c.sent),
            ("acked", c.acked),
            ("delivered", c.delivered),
            ("delivered_by_sync", c.delivered_by_sync),
            ("duplicated", c.duplicated),
            ("resent", c.resent),
            ("resync_overlap", c.resync_overlap),
            ("out_of_order", c.out_of_order),
            ("errors", c.errors),
            ("connected", c.connected),
            ("skipped_offline", c.skipped_offline),
            ("lost", c.lost),
            ("reconnected", c.reconnected),
            ("reconnect_retries", c.reconnect_retries),
            ("resent_unacked", c.resent_unacked),
            ("queued_offline", c.queued_offline),
        ] {
            out.counters.insert(k.into(), v);
        }
        out.counters
            .insert("missing".into(), s.expected.values().map(|v| u64::from(*v)).sum());
        out.counters
            .insert("messages_scheduled".into(), s.expected.len() as u64);
        out.counters.insert("unacked".into(), self.unacked());
        out.failures = s.failures.clone();
        out.series = self.series.borrow().clone();
        out
    }
}
