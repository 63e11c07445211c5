//! Other servers as loadgen targets (`--target mqtt|nats|xmpp`), so the same scenario, schedule
//! and counters measure SAI-IM and the servers people would pick instead.
//!
//! Each peer protocol is a sans-IO codec ([`Codec`]): bytes in, events and bytes out; the
//! engine's tokio loop ([`crate::engine`]) does the I/O for every target alike. What the
//! scenarios need of a peer maps onto it like this:
//!
//! | | private chat | group | sender's ack (`--ack-mode only`) |
//! |---|---|---|---|
//! | MQTT 3.1.1 | topic `sai/u/<user>`, QoS 1, persistent session | topic `sai/g/<group>` | PUBACK |
//! | NATS | subject `sai.u.<user>` | subject `sai.g.<group>` | JetStream PubAck (stream `SAI` on `sai.>`) |
//! | XMPP (RFC 7395) | `<message type='chat'>` to `<user>@<domain>` | MUC room `<group>@conference.<domain>` | XEP-0198 `<a h=…/>` |
//!
//! Every message carries the same body as a SAI-IM message (`t`: scheduled send time, `k`: key)
//! plus the sender (`s`) and the conversation (`c`), so latency, missing, duplicated and
//! out-of-order are counted by the same code for every target. A peer that echoes a group
//! message to its sender (MQTT 3.1.1, a MUC) has the echo ignored.

pub mod mqtt;
pub mod nats;
pub mod xmpp;

use crate::client::{self, ConnectError};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Which server loadgen talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// SAI-IM's WebSocket gateway.
    Sai,
    /// XMPP over WebSocket (RFC 7395), e.g. ejabberd.
    Xmpp,
    /// MQTT 3.1.1, e.g. Mosquitto.
    Mqtt,
    /// NATS, with JetStream for acknowledged sends.
    Nats,
}

impl Target {
    /// The name used in flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sai => "sai",
            Self::Xmpp => "xmpp",
            Self::Mqtt => "mqtt",
            Self::Nats => "nats",
        }
    }

    /// The address loadgen connects to when none is given.
    pub fn default_addr(self) -> &'static str {
        match self {
            Self::Sai => "127.0.0.1:8080",
            Self::Xmpp => "127.0.0.1:5280",
            Self::Mqtt => "127.0.0.1:1883",
            Self::Nats => "127.0.0.1:4222",
        }
    }
}

/// What one peer connection is set up with.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The user's name (MQTT client id, NATS subject part, XMPP local part).
    pub user: String,
    /// Groups the user is a member of.
    pub groups: Vec<String>,
    /// Senders wait for the server's ack (`--ack-mode only`); otherwise fire and forget.
    pub acked: bool,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Credentials, when the peer wants them (XMPP always: password; MQTT/NATS optional).
    pub login: Option<(String, String)>,
    /// XMPP domain.
    pub domain: String,
    /// XMPP: register the account in-band first (XEP-0077); an existing account is fine.
    pub register: bool,
}

/// What a peer connection reports.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The handshake finished: the user can send and receive.
    Ready,
    /// The server acknowledged message `key`.
    Acked(u64),
    /// A message arrived; its payload.
    Delivery(Vec<u8>),
    /// The server refused something; a stable cause for the failure counters.
    Failed(String),
}

/// A peer protocol's client side, sans IO.
pub trait Codec {
    /// Bytes that open the session (connect, authenticate, subscribe).
    fn start(&mut self, out: &mut Vec<u8>);
    /// Bytes read from the server; replies go to `out`, what happened to `ev`. `Err` is a
    /// protocol failure: the connection is over.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, ev: &mut Vec<PeerEvent>) -> Result<(), String>;
    /// Message `key` with `payload` to a user (`group` false) or a group.
    fn send(&mut self, key: u64, to: &str, group: bool, payload: &[u8], out: &mut Vec<u8>);
    /// A keepalive is due.
    fn keepalive(&mut self, out: &mut Vec<u8>);
    /// Bytes that end the session politely.
    fn close(&mut self, out: &mut Vec<u8>);
}

/// The codec for `target`; none for [`Target::Sai`], which has its own client.
pub fn codec(target: Target, cfg: PeerConfig) -> Option<Box<dyn Codec>> {
    match target {
        Target::Mqtt => Some(Box::new(mqtt::Mqtt::new(cfg))),
        Target::Nats => Some(Box::new(nats::Nats::new(cfg))),
        Target::Xmpp => Some(Box::new(xmpp::Xmpp::new(cfg))),
        Target::Sai => None,
    }
}

/// The payload every target carries: the SAI-IM message body plus sender and conversation.
pub fn payload(scheduled_us: u64, key: u64, sender: &str, conversation: &str) -> String {
    format!("{{\"t\":{scheduled_us},\"k\":{key},\"s\":\"{sender}\",\"c\":\"{conversation}\"}}")
}

/// The fields of a payload that loadgen checks.
#[derive(serde::Deserialize, Debug)]
pub struct Payload<'a> {
    /// Scheduled send time, Unix microseconds.
    pub t: u64,
    /// Key.
    pub k: u64,
    /// Sender.
    #[serde(borrow)]
    pub s: &'a str,
    /// Conversation (per sender: ordering holds per publisher).
    #[serde(borrow)]
    pub c: &'a str,
}

/// An open peer session, split so reads and writes proceed independently.
pub struct PeerClient {
    /// Read half.
    pub rd: OwnedReadHalf,
    /// Write half.
    pub wr: OwnedWriteHalf,
    /// The protocol.
    pub codec: Box<dyn Codec>,
    /// Read buffer.
    pub buf: Box<[u8]>,
    /// Bytes to write.
    pub out: Vec<u8>,
    /// Events not handled yet (some may arrive with the handshake's last answer).
    pub events: Vec<PeerEvent>,
}

impl PeerClient {
    /// Writes what the codec produced.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.wr.write_all(&self.out).await;
        self.out.clear();
        r
    }

    /// Feeds `n` bytes just read into `buf`; `Err` ends the session.
    pub fn feed(&mut self, n: usize) -> Result<(), String> {
        let Self {
            codec,
            buf,
            out,
            events,
            ..
        } = self;
        codec.feed(&buf[..n], out, events)
    }

    /// Ends the session politely and shuts the socket down.
    pub async fn close(mut self) {
        self.codec.close(&mut self.out);
        let _ = self.flush().await;
        let _ = self.wr.shutdown().await;
    }
}

/// Connects to a `target` server (from `src` when given) and runs the session's handshake until
/// it is ready, within `timeout`.
pub async fn connect(
    target: Target,
    addr: SocketAddr,
    src: Option<IpAddr>,
    cfg: PeerConfig,
    timeout: Duration,
) -> Result<PeerClient, ConnectError> {
    let codec = codec(target, cfg).ok_or_else(|| ConnectError::Peer("not_a_peer".into()))?;
    tokio::time::timeout(timeout, async move {
        let stream = client::tcp(addr, src).await?;
        let (rd, wr) = stream.into_split();
        let mut c = PeerClient {
            rd,
            wr,
            codec,
            buf: vec![0u8; client::READ_BUF].into_boxed_slice(),
            out: Vec::new(),
            events: Vec::new(),
        };
        c.codec.start(&mut c.out);
        loop {
            c.flush().await.map_err(client::io)?;
            if let Some(at) = c.events.iter().position(|e| *e == PeerEvent::Ready) {
                c.events.remove(at);
                return Ok(c);
            }
            let n = c.rd.read(&mut c.buf).await.map_err(client::io)?;
            if n == 0 {
                return Err(ConnectError::Io("closed during the handshake".into()));
            }
            c.feed(n).map_err(ConnectError::Peer)?;
        }
    })
    .await
    .unwrap_or(Err(ConnectError::Timeout))
}

/// The settings the codecs' tests start from: user `load1` in group `g0`, no login.
#[cfg(test)]
pub fn test_config(acked: bool) -> PeerConfig {
    PeerConfig {
        user: "load1".into(),
        groups: vec!["g0".into()],
        acked,
        keepalive: Duration::from_secs(20),
        login: None,
        domain: String::new(),
        register: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_reads_back() {
        let p = payload(17, 42, "load3", "g/load0/load3");
        let r: Payload<'_> = serde_json::from_str(&p).unwrap();
        assert_eq!((r.t, r.k, r.s, r.c), (17, 42, "load3", "g/load0/load3"));
    }
}
