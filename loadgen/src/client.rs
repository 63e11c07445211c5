//! A WebSocket client over tokio, driving the same sans-IO `sai-proto` codec as the gateway.
//!
//! Memory per connection: the task, the socket, a 2 KiB read buffer and the codec's buffers
//! (empty between frames).

use sai_proto::session::ClientSession;
use sai_proto::ws::{Event, WsError};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// Read buffer per connection.
pub const READ_BUF: usize = 2048;
/// Largest message accepted from the server.
const MAX_MESSAGE: usize = 1 << 20;

/// Why a connection could not be opened; the string is the failure cause in reports.
#[derive(Debug, Clone)]
pub enum ConnectError {
    /// TCP connect refused.
    Refused,
    /// No answer within the timeout.
    Timeout,
    /// The upgrade was answered with this status.
    Http(u16),
    /// Anything else (address in use, reset, ...).
    Io(String),
    /// A peer server refused the session (its cause, e.g. `mqtt_subscribe_refused`).
    Peer(String),
}

impl ConnectError {
    /// Stable cause name.
    pub fn cause(&self) -> String {
        match self {
            Self::Refused => "refused".into(),
            Self::Timeout => "timeout".into(),
            Self::Http(s) => format!("http_{s}"),
            Self::Io(e) => format!("io: {e}"),
            Self::Peer(e) => e.clone(),
        }
    }
}

/// An upgraded connection, split so reads and writes can proceed independently.
pub struct Client {
    /// Read half.
    pub rd: OwnedReadHalf,
    /// Write half.
    pub wr: OwnedWriteHalf,
    /// The client half of the protocol session (codec, heartbeat, push acks).
    pub session: ClientSession,
    /// Read buffer.
    pub buf: Box<[u8]>,
}

/// Connects (from `src` when given), upgrades with `token` as the subprotocol.
pub async fn connect(
    addr: SocketAddr,
    src: Option<IpAddr>,
    token: &str,
    timeout: Duration,
    seed: u64,
    heartbeat: Duration,
    rigor: bool,
) -> Result<Client, ConnectError> {
    match tokio::time::timeout(timeout, connect_inner(addr, src, token, seed, heartbeat, rigor)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

async fn connect_inner(
    addr: SocketAddr,
    src: Option<IpAddr>,
    token: &str,
    seed: u64,
    heartbeat: Duration,
    rigor: bool,
) -> Result<Client, ConnectError> {
    let mut stream = tcp(addr, src).await?;
    stream
        .write_all(upgrade_request(addr, token).as_bytes())
        .await
        .map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = vec![0u8; READ_BUF].into_boxed_slice();
    let end = loop {
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Err(ConnectError::Io("closed during upgrade".into()));
        }
        head.extend_from_slice(&buf[..n]);
        match upgrade_response(&head) {
            Ok(Some(done)) => break done,
            Ok(None) => {}
            Err(e) => return Err(e),
        }
    };
    let (status, end) = end;
    if status != 101 {
        return Err(ConnectError::Http(status));
    }
    let mut session = ClientSession::new(seed, MAX_MESSAGE, heartbeat, rigor, Instant::now());
    session.handle_bytes(&head[end..]);
    let (rd, wr) = stream.into_split();
    Ok(Client { rd, wr, session, buf })
}

/// A TCP connection to `addr` (from `src` when given), Nagle off.
pub async fn tcp(addr: SocketAddr, src: Option<IpAddr>) -> Result<TcpStream, ConnectError> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io)?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0)).map_err(io)?;
    }
    let stream = sock.connect(addr).await.map_err(io)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// An I/O error as a connect failure.
pub fn io(e: std::io::Error) -> ConnectError {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        _ => ConnectError::Io(e.to_string()),
    }
}

/// The upgrade request of `/ws` on `host` with `protocol` as the subprotocol (SAI-IM: the
/// token; XMPP: `xmpp`).
pub fn upgrade_request(host: impl std::fmt::Display, protocol: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )
}

/// The status of a complete upgrade response in `head` and where its head ends; `Ok(None)`
/// while incomplete.
pub fn upgrade_response(head: &[u8]) -> Result<Option<(u16, usize)>, ConnectError> {
    let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        if head.len() > 8192 {
            return Err(ConnectError::Io("oversized upgrade response".into()));
        }
        return Ok(None);
    };
    let end = p + 4;
    let status = std::str::from_utf8(&head[..end])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    Ok(Some((status, end)))
}

impl Client {
    /// Writes everything the codec has queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.session.output_is_empty() {
            return Ok(());
        }
        let out = self.session.take_output();
        self.wr.write_all(&out).await
    }

    /// Buffered events first, without reading.
    pub fn poll_event(&mut self) -> Result<Option<Event>, WsError> {
        self.session.poll_event()
    }

    /// Feeds `n` bytes just read into `buf`.
    pub fn feed(&mut self, n: usize) {
        let Client { session, buf, .. } = self;
        session.handle_bytes(&buf[..n]);
    }

    /// Sends a close frame and shuts the socket down.
    pub async fn close(mut self) {
        self.session.close(1000);
        let _ = self.flush().await;
        let _ = self.wr.shutdown().await;
    }
}
