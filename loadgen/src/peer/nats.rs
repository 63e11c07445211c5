//! NATS client protocol (text), with JetStream for acknowledged sends.
//!
//! Hand-written rather than `async-nats`: that client runs its own connection task per client
//! and brings rustls, ring and nkeys; loadgen needs the protocol as a codec its own loop drives,
//! and the part it uses (CONNECT, SUB, PUB, MSG/HMSG, PING/PONG) is a few lines of text.
//!
//! Each user subscribes to `sai.u.<user>` and `sai.g.<group>` per group, with `echo` off (no
//! copy of its own group messages). With `--ack-mode only` a message is published with a reply
//! subject `_INBOX.<user>.<key>`; the stream `SAI` (subjects `sai.>`, file storage, created by
//! [`ensure_stream`]) stores it and answers a PubAck there, which is the sender's ack. The
//! receivers get it live from their core subscription. With `--ack-mode none`, core NATS only.

use super::{Codec, PeerConfig, PeerEvent};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest message accepted.
const MAX_PAYLOAD: usize = 1 << 20;
/// Longest control line accepted.
const MAX_LINE: usize = 4096;

/// The client side of one NATS connection.
pub struct Nats {
    cfg: PeerConfig,
    buf: Vec<u8>,
    inbox: String,
    ready: bool,
}

impl Nats {
    /// A connection for `cfg`.
    pub fn new(cfg: PeerConfig) -> Self {
        let inbox = format!("_INBOX.{}.", cfg.user);
        Self {
            cfg,
            buf: Vec::new(),
            inbox,
            ready: false,
        }
    }

    /// One complete protocol unit at the head of `buf`: its length, or `None` while incomplete.
    fn unit(&mut self, out: &mut Vec<u8>, ev: &mut Vec<PeerEvent>) -> Result<Option<usize>, String> {
        let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") else {
            if self.buf.len() > MAX_LINE {
                return Err("nats_protocol: line too long".into());
            }
            return Ok(None);
        };
        let line = std::str::from_utf8(&self.buf[..eol]).map_err(|_| "nats_protocol: not utf-8".to_string())?;
        let mut words = line.split_ascii_whitespace();
        let op = words.next().unwrap_or("").to_ascii_uppercase();
        match op.as_str() {
            "MSG" | "HMSG" => {
                let args: Vec<&str> = words.collect();
                let (hdr, total) = match (op.as_str(), args.len()) {
                    ("MSG", 3 | 4) => (0, args[args.len() - 1].parse::<usize>().ok()),
                    ("HMSG", 4 | 5) => (
                        args[args.len() - 2].parse::<usize>().unwrap_or(usize::MAX),
                        args[args.len() - 1].parse::<usize>().ok(),
                    ),
                    _ => return Err(format!("nats_protocol: {line}")),
                };
                let total = total.filter(|t| *t <= MAX_PAYLOAD && hdr <= *t);
                let Some(total) = total else {
                    return Err(format!("nats_protocol: {line}"));
                };
                let start = eol + 2;
                let end = start + total;
                if self.buf.len() < end + 2 {
                    return Ok(None);
                }
                let subject = args[0];
                let headers = &self.buf[start..start + hdr];
                let body = &self.buf[start + hdr..end];
                if let Some(key) = subject.strip_prefix(self.inbox.as_str()) {
                    let key = key.parse::<u64>().unwrap_or(u64::MAX);
                    if headers.starts_with(b"NATS/1.0 503") {
                        ev.push(PeerEvent::Failed("jetstream_no_stream".into()));
                    } else if body.windows(8).any(|w| w == b"\"error\":") {
                        ev.push(PeerEvent::Failed("jetstream_error".into()));
                    } else {
                        ev.push(PeerEvent::Acked(key));
                    }
                } else {
                    ev.push(PeerEvent::Delivery(body.to_vec()));
                }
                Ok(Some(end + 2))
            }
            "PING" => {
                out.extend_from_slice(b"PONG\r\n");
                Ok(Some(eol + 2))
            }
            "PONG" => {
                if !self.ready {
                    self.ready = true;
                    ev.push(PeerEvent::Ready);
                }
                Ok(Some(eol + 2))
            }
            "INFO" | "+OK" => Ok(Some(eol + 2)),
            "-ERR" => Err(format!("nats_err: {}", line[4..].trim().trim_matches('\''))),
            _ => Err(format!("nats_protocol: {line}")),
        }
    }
}

/// The CONNECT line: no echo, headers (JetStream's 503 "no responders" comes as one).
fn connect_line(login: Option<&(String, String)>) -> String {
    let auth = login
        .map(|(u, p)| format!(",\"user\":{},\"pass\":{}", json(u), json(p)))
        .unwrap_or_default();
    format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"lang\":\"rust\",\"version\":\"loadgen\",\"protocol\":1,\"echo\":false,\"headers\":true,\"no_responders\":true{auth}}}\r\n"
    )
}

fn json(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

impl Codec for Nats {
    fn start(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(connect_line(self.cfg.login.as_ref()).as_bytes());
        out.extend_from_slice(format!("SUB sai.u.{} 1\r\n", self.cfg.user).as_bytes());
        for (n, g) in self.cfg.groups.iter().enumerate() {
            out.extend_from_slice(format!("SUB sai.g.{g} {}\r\n", n + 3).as_bytes());
        }
        if self.cfg.acked {
            out.extend_from_slice(format!("SUB {}* 2\r\n", self.inbox).as_bytes());
        }
        // The PONG says the server has taken everything above.
        out.extend_from_slice(b"PING\r\n");
    }

    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, ev: &mut Vec<PeerEvent>) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        while let Some(n) = self.unit(out, ev)? {
            self.buf.drain(..n);
        }
        Ok(())
    }

    fn send(&mut self, key: u64, to: &str, group: bool, payload: &[u8], out: &mut Vec<u8>) {
        let kind = if group { 'g' } else { 'u' };
        let head = if self.cfg.acked {
            format!("PUB sai.{kind}.{to} {}{key} {}\r\n", self.inbox, payload.len())
        } else {
            format!("PUB sai.{kind}.{to} {}\r\n", payload.len())
        };
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
    }

    fn keepalive(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"PING\r\n");
    }

    fn close(&mut self, _out: &mut Vec<u8>) {}
}

/// Creates the JetStream stream `SAI` (subjects `sai.>`, file storage, an hour or 1 GiB,
/// oldest dropped first) unless it exists with that configuration.
pub fn ensure_stream(addr: SocketAddr, login: Option<&(String, String)>) -> Result<(), String> {
    let io = |e: std::io::Error| format!("nats {addr}: {e}");
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    let mut w = s.try_clone().map_err(io)?;
    let config = serde_json::json!({
        "name": "SAI", "subjects": ["sai.>"], "storage": "file", "retention": "limits",
        "max_age": 3_600_000_000_000u64, "max_bytes": 1u64 << 30, "discard": "old",
        "num_replicas": 1, "duplicate_window": 120_000_000_000u64,
    })
    .to_string();
    let req = format!(
        "{}SUB _INBOX.setup 1\r\nPUB $JS.API.STREAM.CREATE.SAI _INBOX.setup {}\r\n{config}\r\n",
        connect_line(login),
        config.len()
    );
    w.write_all(req.as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io)? == 0 {
            return Err(format!("nats {addr}: closed"));
        }
        if line.starts_with("-ERR") {
            return Err(format!("nats {addr}: {}", line.trim()));
        }
        if line.starts_with("HMSG") {
            return Err(format!("nats {addr}: JetStream is not enabled ({})", line.trim()));
        }
        if line.starts_with("MSG") {
            let mut body = String::new();
            r.read_line(&mut body).map_err(io)?;
            let v: serde_json::Value = serde_json::from_str(body.trim()).map_err(|e| e.to_string())?;
            return match v.get("error") {
                // 10058: a stream of that name exists with another configuration; ours is the
                // only writer of `sai.>`, so the one there serves as well.
                Some(e) if e["err_code"] != 10058 => Err(format!("nats {addr}: creating stream SAI: {e}")),
                _ => Ok(()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats(acked: bool) -> Nats {
        Nats::new(crate::peer::test_config(acked))
    }

    #[test]
    fn a_connection_subscribes_and_is_ready_at_the_first_pong() {
        let mut n = nats(true);
        let mut out = Vec::new();
        n.start(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("CONNECT {") && text.contains("\"echo\":false"),
            "{text}"
        );
        assert!(text.contains("SUB sai.u.load1 1\r\n") && text.contains("SUB sai.g.g0 3\r\n"));
        assert!(text.contains("SUB _INBOX.load1.* 2\r\n") && text.ends_with("PING\r\n"));
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        n.feed(b"INFO {\"server_id\":\"x\"}\r\nPO", &mut out, &mut ev).unwrap();
        assert!(ev.is_empty());
        n.feed(b"NG\r\nPING\r\n", &mut out, &mut ev).unwrap();
        assert_eq!(ev, [PeerEvent::Ready]);
        assert_eq!(out, b"PONG\r\n");
    }

    #[test]
    fn messages_split_anywhere_come_out_whole_and_pubacks_map_to_keys() {
        let mut n = nats(true);
        let mut out = Vec::new();
        n.send(42, "load2", false, b"{\"k\":42}", &mut out);
        assert_eq!(out, b"PUB sai.u.load2 _INBOX.load1.42 8\r\n{\"k\":42}\r\n");
        let input: &[u8] = b"MSG sai.u.load1 1 5\r\nhello\r\nMSG _INBOX.load1.42 2 27\r\n{\"stream\":\"SAI\",\"seq\":1234}\r\nHMSG _INBOX.load1.43 2 16 16\r\nNATS/1.0 503\r\n\r\n\r\nMSG _INBOX.load1.44 2 12\r\n{\"error\":{}}\r\n";
        for split in 0..input.len() {
            let mut n = nats(true);
            let (mut out, mut ev) = (Vec::new(), Vec::new());
            n.feed(&input[..split], &mut out, &mut ev).unwrap();
            n.feed(&input[split..], &mut out, &mut ev).unwrap();
            assert_eq!(
                ev,
                [
                    PeerEvent::Delivery(b"hello".to_vec()),
                    PeerEvent::Acked(42),
                    PeerEvent::Failed("jetstream_no_stream".into()),
                    PeerEvent::Failed("jetstream_error".into()),
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn errors_and_garbage_end_the_connection() {
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        assert_eq!(
            nats(false).feed(b"-ERR 'Authorization Violation'\r\n", &mut out, &mut ev),
            Err("nats_err: Authorization Violation".into())
        );
        assert!(nats(false).feed(b"MSG a 1 99999999\r\n", &mut out, &mut ev).is_err());
        assert!(nats(false).feed(b"HELLO\r\n", &mut out, &mut ev).is_err());
        assert!(nats(false).feed(&[b'x'; MAX_LINE + 1], &mut out, &mut ev).is_err());
    }
}
