//! MQTT 3.1.1 (e.g. Mosquitto): the packets are `rumqttc`'s, the session is loadgen's.
//!
//! Each user is a persistent session (`clean_session` false, client id = the user) subscribed to
//! its own topic `sai/u/<user>` and to `sai/g/<group>` for each of its groups. With
//! `--ack-mode only` messages go out and are subscribed at QoS 1: the sender's ack is the
//! broker's PUBACK, and the broker resends a delivery until the receiver's PUBACK (like SAI-IM's
//! rigor mode). With `--ack-mode none`, QoS 0 both ways.

use super::{Codec, PeerConfig, PeerEvent};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::{Error, QoS};
use std::collections::HashMap;

/// Largest packet accepted from or sent to the broker.
const MAX_PACKET: usize = 1 << 20;

/// The client side of one MQTT session.
pub struct Mqtt {
    cfg: PeerConfig,
    buf: BytesMut,
    next_pkid: u16,
    /// Packet id of each QoS 1 publish not yet acked -> its key.
    inflight: HashMap<u16, u64>,
    ready: bool,
}

impl Mqtt {
    /// A session for `cfg`.
    pub fn new(cfg: PeerConfig) -> Self {
        Self {
            cfg,
            buf: BytesMut::new(),
            next_pkid: 1,
            inflight: HashMap::new(),
            ready: false,
        }
    }

    fn qos(&self) -> QoS {
        if self.cfg.acked {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        }
    }

    /// A packet id not in flight (0 is not a packet id).
    fn pkid(&mut self) -> u16 {
        for _ in 0..u16::MAX {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
        self.next_pkid
    }
}

fn write(p: Packet, out: &mut Vec<u8>) {
    let mut b = BytesMut::new();
    // Only loadgen's own packets are written, all far under the size limit.
    if p.write(&mut b, MAX_PACKET).is_ok() {
        out.extend_from_slice(&b);
    }
}

impl Codec for Mqtt {
    fn start(&mut self, out: &mut Vec<u8>) {
        let mut c = Connect::new(self.cfg.user.clone());
        c.clean_session = false;
        // The broker drops a client silent for 1.5 x keep_alive; loadgen pings every interval.
        c.keep_alive = self.cfg.keepalive.as_secs().clamp(1, 600) as u16 * 2;
        if let Some((u, p)) = &self.cfg.login {
            c.set_login(u.clone(), p.clone());
        }
        write(Packet::Connect(c), out);
        let mut s = Subscribe::new(format!("sai/u/{}", self.cfg.user), self.qos());
        for g in &self.cfg.groups {
            s.add(format!("sai/g/{g}"), self.qos());
        }
        s.pkid = self.pkid();
        write(Packet::Subscribe(s), out);
    }

    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, ev: &mut Vec<PeerEvent>) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        loop {
            let p = match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(p) => p,
                Err(Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(format!("mqtt_protocol: {e}")),
            };
            match p {
                Packet::ConnAck(a) if a.code != ConnectReturnCode::Success => {
                    return Err(format!("mqtt_connack_{:?}", a.code));
                }
                Packet::SubAck(a) => {
                    if a.return_codes.contains(&SubscribeReasonCode::Failure) {
                        return Err("mqtt_subscribe_refused".into());
                    }
                    if !self.ready {
                        self.ready = true;
                        ev.push(PeerEvent::Ready);
                    }
                }
                Packet::Publish(p) => {
                    if p.qos != QoS::AtMostOnce {
                        write(Packet::PubAck(PubAck::new(p.pkid)), out);
                    }
                    ev.push(PeerEvent::Delivery(p.payload.to_vec()));
                }
                Packet::PubAck(a) => {
                    if let Some(key) = self.inflight.remove(&a.pkid) {
                        ev.push(PeerEvent::Acked(key));
                    }
                }
                Packet::Disconnect => return Err("mqtt_disconnect".into()),
                _ => {}
            }
        }
    }

    fn send(&mut self, key: u64, to: &str, group: bool, payload: &[u8], out: &mut Vec<u8>) {
        let topic = if group {
            format!("sai/g/{to}")
        } else {
            format!("sai/u/{to}")
        };
        let mut p = Publish::new(topic, self.qos(), payload.to_vec());
        if self.cfg.acked {
            p.pkid = self.pkid();
            self.inflight.insert(p.pkid, key);
        }
        write(Packet::Publish(p), out);
    }

    fn keepalive(&mut self, out: &mut Vec<u8>) {
        write(Packet::PingReq, out);
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        write(Packet::Disconnect, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::test_config as cfg;

    fn bytes(p: Packet) -> Vec<u8> {
        let mut out = Vec::new();
        write(p, &mut out);
        out
    }

    #[test]
    fn a_session_subscribes_acks_deliveries_and_maps_pubacks_to_keys() {
        let mut m = Mqtt::new(cfg(true));
        let mut out = Vec::new();
        m.start(&mut out);
        let mut sent = BytesMut::from(&out[..]);
        let Ok(Packet::Connect(c)) = Packet::read(&mut sent, MAX_PACKET) else {
            panic!("connect first")
        };
        assert!(!c.clean_session);
        let Ok(Packet::Subscribe(s)) = Packet::read(&mut sent, MAX_PACKET) else {
            panic!("then subscribe")
        };
        let topics: Vec<&str> = s.filters.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(topics, ["sai/u/load1", "sai/g/g0"]);
        assert_ne!(s.pkid, 0);

        // CONNACK + SUBACK split across two reads: ready only once both arrived.
        let mut ev = Vec::new();
        let mut answer = bytes(Packet::ConnAck(rumqttc::mqttbytes::v4::ConnAck::new(
            rumqttc::mqttbytes::v4::ConnectReturnCode::Success,
            false,
        )));
        answer.extend(bytes(Packet::SubAck(rumqttc::mqttbytes::v4::SubAck::new(
            s.pkid,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); 2],
        ))));
        let (a, b) = answer.split_at(5);
        out.clear();
        m.feed(a, &mut out, &mut ev).unwrap();
        assert!(ev.is_empty());
        m.feed(b, &mut out, &mut ev).unwrap();
        assert_eq!(ev, [PeerEvent::Ready]);

        out.clear();
        m.send(77, "load2", false, b"{}", &mut out);
        let Ok(Packet::Publish(p)) = Packet::read(&mut BytesMut::from(&out[..]), MAX_PACKET) else {
            panic!()
        };
        assert_eq!((p.topic.as_str(), p.qos), ("sai/u/load2", QoS::AtLeastOnce));
        ev.clear();
        out.clear();
        let mut delivery = Publish::new("sai/u/load1", QoS::AtLeastOnce, b"hi".to_vec());
        delivery.pkid = 9;
        let mut input = bytes(Packet::PubAck(PubAck::new(p.pkid)));
        input.extend(bytes(Packet::Publish(delivery)));
        m.feed(&input, &mut out, &mut ev).unwrap();
        assert_eq!(ev, [PeerEvent::Acked(77), PeerEvent::Delivery(b"hi".to_vec())]);
        assert_eq!(out, bytes(Packet::PubAck(PubAck::new(9))), "the delivery is acked");
    }

    #[test]
    fn a_refused_subscription_or_garbage_ends_the_session() {
        let mut m = Mqtt::new(cfg(false));
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        let refused = bytes(Packet::SubAck(rumqttc::mqttbytes::v4::SubAck::new(
            1,
            vec![SubscribeReasonCode::Failure],
        )));
        assert_eq!(
            m.feed(&refused, &mut out, &mut ev),
            Err("mqtt_subscribe_refused".into())
        );
        let mut m = Mqtt::new(cfg(false));
        assert!(m.feed(&[0xf0, 0x00], &mut out, &mut ev).is_err());
    }
}
