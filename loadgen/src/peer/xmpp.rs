//! XMPP over WebSocket (RFC 7395), e.g. ejabberd at `ws://<addr>/ws`.
//!
//! The session: WebSocket upgrade (subprotocol `xmpp`, frames by `sai-proto`'s client codec),
//! `<open/>`, optional in-band registration (XEP-0077; an existing account is fine), SASL PLAIN,
//! `<open/>` again, resource binding, stream management (XEP-0198) when the server offers it and
//! `--ack-mode only`, initial presence and one MUC join per group. It is ready once every room
//! has answered the join with the user's own presence.
//!
//! A private message is `<message type='chat'>` to `<user>@<domain>`, a group message
//! `<message type='groupchat'>` to `<group>@conference.<domain>`. With stream management every
//! message is followed by `<r/>`; the server's `<a h='n'/>` acks each message among the first
//! `n` stanzas sent. The room echoes a member's message to itself; the engine ignores echoes.
//! XML is read with `quick-xml` (each WebSocket message is one complete element, RFC 7395 §3.3).

use super::{Codec, PeerConfig, PeerEvent};
use base64::Engine as _;
use quick_xml::events::Event as Xml;
use sai_proto::ws::{Event, Role, WsConn};
use std::collections::VecDeque;

/// Largest WebSocket message accepted.
const MAX_MESSAGE: usize = 1 << 20;
const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
const SM: &str = "urn:xmpp:sm:3";

/// One element of a frame: local name, attributes, children and text.
#[derive(Debug, Default)]
pub struct Elem {
    /// Local name (prefix stripped).
    pub name: String,
    /// Attributes, unescaped, local names.
    pub attrs: Vec<(String, String)>,
    /// Child elements.
    pub children: Vec<Elem>,
    /// Text content, unescaped.
    pub text: String,
}

impl Elem {
    /// Attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// First child called `name`.
    pub fn child(&self, name: &str) -> Option<&Elem> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The first child's name (an error condition, a feature).
    fn first_child(&self) -> &str {
        self.children.first().map(|c| c.name.as_str()).unwrap_or("")
    }

    /// Name of the error condition inside `<error>`.
    fn condition(&self) -> String {
        self.child("error")
            .map(|e| e.first_child().to_string())
            .unwrap_or_default()
    }
}

fn local(name: &[u8]) -> String {
    let n = name.rsplit(|b| *b == b':').next().unwrap_or(name);
    String::from_utf8_lossy(n).into_owned()
}

fn start(e: &quick_xml::events::BytesStart<'_>) -> Result<Elem, String> {
    let mut el = Elem {
        name: local(e.name().as_ref()),
        ..Elem::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|e| format!("xmpp_xml: {e}"))?;
        let v = a.unescape_value().map_err(|e| format!("xmpp_xml: {e}"))?;
        el.attrs.push((local(a.key.as_ref()), v.into_owned()));
    }
    Ok(el)
}

/// Parses one frame: a single complete element.
pub fn parse(xml: &str) -> Result<Elem, String> {
    let mut r = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Elem> = Vec::new();
    loop {
        match r.read_event().map_err(|e| format!("xmpp_xml: {e}"))? {
            Xml::Start(e) => {
                if stack.len() > 32 {
                    return Err("xmpp_xml: nested too deep".into());
                }
                stack.push(start(&e)?);
            }
            Xml::Empty(e) => {
                let el = start(&e)?;
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None => return Ok(el),
                }
            }
            Xml::Text(t) => {
                if let Some(p) = stack.last_mut() {
                    p.text.push_str(&t.unescape().map_err(|e| format!("xmpp_xml: {e}"))?);
                }
            }
            Xml::End(_) => {
                let Some(el) = stack.pop() else {
                    return Err("xmpp_xml: unbalanced".into());
                };
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None => return Ok(el),
                }
            }
            Xml::Eof => return Err("xmpp_xml: incomplete element".into()),
            _ => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum St {
    Upgrade,
    Authenticating,
    Registering,
    Binding,
    Enabling,
    Joining,
    Ready,
}

/// The client side of one XMPP session.
pub struct Xmpp {
    cfg: PeerConfig,
    head: Vec<u8>,
    ws: WsConn,
    st: St,
    authed: bool,
    /// The server offers stream management.
    sm_offered: bool,
    /// Stream management is on: stanzas are counted both ways.
    sm: bool,
    sent_stanzas: u32,
    handled: u32,
    /// (stanza number, key) of each message not yet acked.
    pending: VecDeque<(u32, u64)>,
    joining: usize,
}

impl Xmpp {
    /// A session for `cfg`.
    pub fn new(cfg: PeerConfig) -> Self {
        let seed = cfg.user.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self {
            cfg,
            head: Vec::new(),
            ws: WsConn::new(Role::Client, MAX_MESSAGE, seed),
            st: St::Upgrade,
            authed: false,
            sm_offered: false,
            sm: false,
            sent_stanzas: 0,
            handled: 0,
            pending: VecDeque::new(),
            joining: 0,
        }
    }

    fn open(&mut self) {
        let open = format!("<open xmlns='{FRAMING}' to='{}' version='1.0'/>", self.cfg.domain);
        self.ws.send_text(&open);
    }

    /// Sends a stanza (counted for stream management).
    fn stanza(&mut self, xml: &str) {
        self.ws.send_text(xml);
        if self.sm {
            self.sent_stanzas = self.sent_stanzas.wrapping_add(1);
        }
    }

    fn password(&self) -> String {
        self.cfg.login.as_ref().map(|(_, p)| p.clone()).unwrap_or_default()
    }

    fn auth(&mut self) {
        let plain = format!("\0{}\0{}", self.cfg.user, self.password());
        let b64 = base64::engine::general_purpose::STANDARD.encode(plain);
        self.ws.send_text(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b64}</auth>"
        ));
        self.st = St::Authenticating;
    }

    /// Bound (and stream management settled): presence, then the rooms.
    fn online(&mut self, ev: &mut Vec<PeerEvent>) {
        self.stanza("<presence/>");
        let groups = self.cfg.groups.clone();
        for g in &groups {
            self.stanza(&format!(
                "<presence to='{g}@conference.{}/{}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>",
                self.cfg.domain, self.cfg.user
            ));
        }
        self.joining = groups.len();
        self.st = St::Joining;
        if self.joining == 0 {
            self.st = St::Ready;
            ev.push(PeerEvent::Ready);
        }
    }

    fn handle(&mut self, el: &Elem, ev: &mut Vec<PeerEvent>) -> Result<(), String> {
        let stanza = matches!(el.name.as_str(), "message" | "presence" | "iq");
        if stanza && self.sm {
            self.handled = self.handled.wrapping_add(1);
        }
        match el.name.as_str() {
            "open" => {}
            "features" if !self.authed => {
                if self.cfg.register && el.child("register").is_some() {
                    let user = &self.cfg.user;
                    let pass = self.password();
                    self.ws.send_text(&format!(
                        "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>{user}</username><password>{pass}</password></query></iq>"
                    ));
                    self.st = St::Registering;
                } else {
                    self.auth();
                }
            }
            "features" => {
                self.sm_offered = el.child("sm").is_some();
                self.ws.send_text(
                    "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>loadgen</resource></bind></iq>",
                );
                self.st = St::Binding;
            }
            "iq" if self.st == St::Registering && el.attr("id") == Some("reg") => {
                // An account that already exists (an earlier run) is what we wanted.
                if el.attr("type") == Some("error") && el.condition() != "conflict" {
                    return Err(format!("xmpp_register_{}", el.condition()));
                }
                self.auth();
            }
            "success" => {
                self.authed = true;
                self.open();
            }
            "failure" => return Err(format!("xmpp_auth_{}", el.first_child())),
            "iq" if self.st == St::Binding && el.attr("id") == Some("bind") => {
                if el.attr("type") != Some("result") {
                    return Err(format!("xmpp_bind_{}", el.condition()));
                }
                if self.sm_offered && self.cfg.acked {
                    self.ws.send_text(&format!("<enable xmlns='{SM}'/>"));
                    self.st = St::Enabling;
                } else {
                    self.online(ev);
                }
            }
            "enabled" => {
                self.sm = true;
                self.online(ev);
            }
            "failed" if self.st == St::Enabling => self.online(ev),
            "presence" if self.st == St::Joining => {
                if el.attr("type") == Some("error") {
                    return Err(format!("xmpp_join_{}", el.condition()));
                }
                let own = el
                    .children
                    .iter()
                    .filter(|x| x.name == "x")
                    .flat_map(|x| x.children.iter())
                    .any(|s| s.name == "status" && s.attr("code") == Some("110"));
                if own {
                    self.joining = self.joining.saturating_sub(1);
                    if self.joining == 0 {
                        self.st = St::Ready;
                        ev.push(PeerEvent::Ready);
                    }
                }
            }
            "message" => {
                if el.attr("type") == Some("error") {
                    ev.push(PeerEvent::Failed(format!("xmpp_message_{}", el.condition())));
                } else if let Some(body) = el.child("body") {
                    ev.push(PeerEvent::Delivery(body.text.clone().into_bytes()));
                }
            }
            "iq" if matches!(el.attr("type"), Some("get" | "set")) => {
                // Pings and anything else asked of us: answered, so the server keeps us.
                let id = el.attr("id").unwrap_or("");
                let to = el
                    .attr("from")
                    .map(|f| format!(" to='{}'", quick_xml::escape::escape(f)))
                    .unwrap_or_default();
                let id = quick_xml::escape::escape(id);
                self.stanza(&format!("<iq type='result' id='{id}'{to}/>"));
            }
            "r" => {
                let h = self.handled;
                self.ws.send_text(&format!("<a xmlns='{SM}' h='{h}'/>"));
            }
            "a" => {
                let h: u32 = el.attr("h").and_then(|h| h.parse().ok()).unwrap_or(0);
                while let Some(&(n, key)) = self.pending.front() {
                    // Stanza numbers wrap at 2^32 (XEP-0198 §4).
                    if h.wrapping_sub(n) > u32::MAX / 2 {
                        break;
                    }
                    self.pending.pop_front();
                    ev.push(PeerEvent::Acked(key));
                }
            }
            "close" => return Err("xmpp_stream_closed".into()),
            "error" => return Err(format!("xmpp_stream_error_{}", el.first_child())),
            _ => {}
        }
        Ok(())
    }
}

impl Codec for Xmpp {
    fn start(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(crate::client::upgrade_request(&self.cfg.domain, "xmpp").as_bytes());
    }

    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, ev: &mut Vec<PeerEvent>) -> Result<(), String> {
        if self.st == St::Upgrade {
            self.head.extend_from_slice(data);
            let Some((status, end)) =
                crate::client::upgrade_response(&self.head).map_err(|e| format!("xmpp_{}", e.cause()))?
            else {
                return Ok(());
            };
            if status != 101 {
                return Err(format!("http_{status}"));
            }
            let rest = self.head.split_off(end);
            self.head = Vec::new();
            self.st = St::Authenticating;
            self.open();
            self.ws.feed(&rest);
        } else {
            self.ws.feed(data);
        }
        loop {
            match self.ws.next_event() {
                Ok(Some(Event::Text(t))) => {
                    let el = parse(&t)?;
                    self.handle(&el, ev)?;
                }
                Ok(Some(Event::Close { code, .. })) => {
                    out.extend(self.ws.take_output());
                    return Err(format!("closed_by_server_{code}"));
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    out.extend(self.ws.take_output());
                    return Err(format!("protocol: {e}"));
                }
            }
        }
        out.extend(self.ws.take_output());
        Ok(())
    }

    fn send(&mut self, key: u64, to: &str, group: bool, payload: &[u8], out: &mut Vec<u8>) {
        let body = quick_xml::escape::escape(std::str::from_utf8(payload).unwrap_or(""));
        let (to, kind) = if group {
            (format!("{to}@conference.{}", self.cfg.domain), "groupchat")
        } else {
            (format!("{to}@{}", self.cfg.domain), "chat")
        };
        self.stanza(&format!(
            "<message to='{to}' type='{kind}' id='{key}'><body>{body}</body></message>"
        ));
        if self.sm {
            self.pending.push_back((self.sent_stanzas, key));
            self.ws.send_text(&format!("<r xmlns='{SM}'/>"));
        }
        out.extend(self.ws.take_output());
    }

    fn keepalive(&mut self, out: &mut Vec<u8>) {
        self.ws.send_ping(b"");
        out.extend(self.ws.take_output());
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if self.st != St::Upgrade {
            self.ws.send_text(&format!("<close xmlns='{FRAMING}'/>"));
            self.ws.close(1000, "");
            out.extend(self.ws.take_output());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_parses_into_names_attributes_children_and_unescaped_text() {
        let el = parse(
            "<message xmlns='jabber:client' from='g0@conference.localhost/load1' type='groupchat'><body>{&quot;k&quot;:1} &amp; more</body></message>",
        )
        .unwrap();
        assert_eq!(el.name, "message");
        assert_eq!(el.attr("type"), Some("groupchat"));
        assert_eq!(el.child("body").unwrap().text, "{\"k\":1} & more");
        let f = parse("<stream:features xmlns:stream='http://etherx.jabber.org/streams'><sm xmlns='urn:xmpp:sm:3'/><bind/></stream:features>").unwrap();
        assert_eq!(f.name, "features");
        assert!(f.child("sm").is_some());
        assert!(parse("<message><body>").is_err());
        assert!(parse("</x>").is_err());
    }

    /// Feeds the server's frames (unmasked text frames) to the session.
    fn server(x: &mut Xmpp, frames: &[&str], ev: &mut Vec<PeerEvent>) -> Result<Vec<u8>, String> {
        let mut srv = WsConn::new(Role::Server, MAX_MESSAGE, 1);
        for f in frames {
            srv.send_text(f);
        }
        let mut out = Vec::new();
        x.feed(&srv.take_output(), &mut out, ev)?;
        Ok(out)
    }

    /// The texts of the client's (masked) frames in `out`.
    fn client_frames(out: &[u8]) -> Vec<String> {
        let mut srv = WsConn::new(Role::Server, MAX_MESSAGE, 1);
        srv.feed(out);
        let mut v = Vec::new();
        while let Ok(Some(Event::Text(t))) = srv.next_event() {
            v.push(t);
        }
        v
    }

    #[test]
    fn a_session_registers_authenticates_binds_enables_acks_joins_and_maps_acks_to_keys() {
        let mut x = Xmpp::new(PeerConfig {
            login: Some(("load1".into(), "pw".into())),
            domain: "localhost".into(),
            register: true,
            ..crate::peer::test_config(true)
        });
        let mut out = Vec::new();
        x.start(&mut out);
        assert!(String::from_utf8_lossy(&out).contains("Sec-WebSocket-Protocol: xmpp"));
        let mut ev = Vec::new();
        let mut out = Vec::new();
        x.feed(
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Protocol: xmpp\r\n\r\n",
            &mut out,
            &mut ev,
        )
        .unwrap();
        assert!(client_frames(&out)[0].starts_with("<open "));
        let features = "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms><register xmlns='http://jabber.org/features/iq-register'/></stream:features>";
        let out = server(
            &mut x,
            &["<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>", features],
            &mut ev,
        )
        .unwrap();
        assert!(client_frames(&out)[0].contains("jabber:iq:register"));
        let conflict = "<iq type='error' id='reg'><error type='cancel'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>";
        let out = server(&mut x, &[conflict], &mut ev).unwrap();
        let auth = &client_frames(&out)[0];
        assert!(
            auth.contains("mechanism='PLAIN'") && auth.contains("AGxvYWQxAHB3"),
            "{auth}"
        );
        let out = server(
            &mut x,
            &["<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"],
            &mut ev,
        )
        .unwrap();
        assert!(client_frames(&out)[0].starts_with("<open "));
        let bound = "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><sm xmlns='urn:xmpp:sm:3'/></stream:features>";
        let out = server(&mut x, &[bound], &mut ev).unwrap();
        assert!(client_frames(&out)[0].contains("xmpp-bind"));
        let out = server(&mut x, &["<iq type='result' id='bind'/>"], &mut ev).unwrap();
        assert!(client_frames(&out)[0].starts_with("<enable "));
        let out = server(&mut x, &["<enabled xmlns='urn:xmpp:sm:3'/>"], &mut ev).unwrap();
        let f = client_frames(&out);
        assert_eq!(f[0], "<presence/>");
        assert!(f[1].starts_with("<presence to='g0@conference.localhost/load1'"));
        assert!(ev.is_empty(), "not ready before the room answers");
        let joined = "<presence from='g0@conference.localhost/load1'><x xmlns='http://jabber.org/protocol/muc#user'><status code='110'/></x></presence>";
        server(&mut x, &[joined], &mut ev).unwrap();
        assert_eq!(ev, [PeerEvent::Ready]);

        // Two stanzas (presences) were counted; messages are stanzas 3 and 4.
        let mut out = Vec::new();
        x.send(10, "load2", false, b"{\"k\":10}", &mut out);
        x.send(11, "g0", true, b"{\"k\":11}", &mut out);
        let f = client_frames(&out);
        assert_eq!(
            f[0],
            "<message to='load2@localhost' type='chat' id='10'><body>{&quot;k&quot;:10}</body></message>"
        );
        assert_eq!(f[1], "<r xmlns='urn:xmpp:sm:3'/>");
        assert!(f[2].contains("to='g0@conference.localhost' type='groupchat'"));
        ev.clear();
        server(&mut x, &["<a xmlns='urn:xmpp:sm:3' h='3'/>"], &mut ev).unwrap();
        assert_eq!(ev, [PeerEvent::Acked(10)]);
        ev.clear();
        let delivery = "<message from='load2@localhost/loadgen' type='chat'><body>{\"k\":5}</body></message>";
        let out = server(
            &mut x,
            &[
                "<a xmlns='urn:xmpp:sm:3' h='4'/>",
                delivery,
                "<r xmlns='urn:xmpp:sm:3'/>",
            ],
            &mut ev,
        )
        .unwrap();
        assert_eq!(ev, [PeerEvent::Acked(11), PeerEvent::Delivery(b"{\"k\":5}".to_vec())]);
        // Handled: the room's presence and the message.
        assert_eq!(client_frames(&out), ["<a xmlns='urn:xmpp:sm:3' h='2'/>"]);
    }

    #[test]
    fn a_refused_login_or_upgrade_ends_the_session() {
        let cfg = PeerConfig {
            user: "u".into(),
            groups: vec![],
            login: Some(("u".into(), "bad".into())),
            domain: "localhost".into(),
            ..crate::peer::test_config(false)
        };
        let mut x = Xmpp::new(cfg.clone());
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        assert_eq!(
            x.feed(b"HTTP/1.1 404 Not Found\r\n\r\n", &mut out, &mut ev),
            Err("http_404".into())
        );
        let mut x = Xmpp::new(cfg);
        x.feed(b"HTTP/1.1 101 OK\r\n\r\n", &mut out, &mut ev).unwrap();
        let features =
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms/></stream:features>";
        server(&mut x, &[features], &mut ev).unwrap();
        let failure = "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>";
        assert_eq!(
            server(&mut x, &[failure], &mut ev),
            Err("xmpp_auth_not-authorized".into())
        );
    }
}
