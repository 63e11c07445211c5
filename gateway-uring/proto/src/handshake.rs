//! The HTTP/1.1 upgrade that opens a WebSocket (RFC 6455 section 4), sans-IO.
//!
//! [`parse_request`] is fed the bytes read so far; `Ok(None)` means the header block is not
//! complete yet. The SAI-IM token travels in `Sec-WebSocket-Protocol` (browsers cannot set an
//! `Authorization` header on a WebSocket), and the server echoes the accepted value back.

use base64::Engine as _;
use thiserror::Error;

/// Largest request header block accepted, in bytes. Bigger requests get `431`.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Most header lines accepted.
const MAX_HEADERS: usize = 32;
/// The GUID every `Sec-WebSocket-Accept` is derived with.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid WebSocket upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// Request target without the query string.
    pub path: String,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// The comma-separated values of every `Sec-WebSocket-Protocol` header, trimmed.
    pub protocols: Vec<String>,
    /// Bytes of the request, so that anything after it (none, for a well-behaved client) is kept.
    pub len: usize,
}

/// Why an upgrade request was refused; each maps to an HTTP status and a stable code.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The bytes are not an HTTP/1.1 request.
    #[error("malformed HTTP request")]
    Malformed,
    /// The header block exceeds [`MAX_REQUEST_BYTES`] or [`MAX_HEADERS`].
    #[error("request header too large")]
    TooLarge,
    /// Not `GET`.
    #[error("method not allowed")]
    Method,
    /// A GET without the headers of a version-13 WebSocket upgrade.
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` other than 13.
    #[error("unsupported WebSocket version")]
    Version,
}

impl HandshakeError {
    /// HTTP status for the response.
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed | Self::NotUpgrade => 400,
            Self::TooLarge => 431,
            Self::Method => 405,
            Self::Version => 426,
        }
    }

    /// Stable snake_case code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed_request",
            Self::TooLarge => "request_too_large",
            Self::Method => "method_not_allowed",
            Self::NotUpgrade => "not_websocket_upgrade",
            Self::Version => "unsupported_websocket_version",
        }
    }
}

/// Parses an upgrade request from the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse_request(buf: &[u8]) -> Result<Option<UpgradeRequest>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_REQUEST_BYTES {
                return Err(HandshakeError::TooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    if len > MAX_REQUEST_BYTES {
        return Err(HandshakeError::TooLarge);
    }
    if req.method != Some("GET") {
        return Err(HandshakeError::Method);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::NotUpgrade);
    }
    let target = req.path.unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut upgrade = false;
    let mut connection = false;
    let mut version = None;
    let mut key = None;
    let mut protocols = Vec::new();
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HandshakeError::Malformed)?;
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= value.split(',').any(|v| v.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= value.split(',').any(|v| v.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            protocols.extend(value.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()));
        }
    }
    if !upgrade || !connection {
        return Err(HandshakeError::NotUpgrade);
    }
    match version.as_deref() {
        Some("13") => {}
        Some(_) => return Err(HandshakeError::Version),
        None => return Err(HandshakeError::NotUpgrade),
    }
    let key = key.ok_or(HandshakeError::NotUpgrade)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map_err(|_| HandshakeError::NotUpgrade)?;
    if decoded.len() != 16 {
        return Err(HandshakeError::NotUpgrade);
    }
    Ok(Some(UpgradeRequest {
        path,
        key,
        protocols,
        len,
    }))
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// The `101 Switching Protocols` response, echoing `protocol` when given.
pub fn response_101(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = protocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(p);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// An HTTP error response with a JSON body `{"code","message"}`, closing the connection.
pub fn response_error(status: u16, code: &str, message: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 426 {
        r.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    r.push_str("\r\n");
    r.push_str(&body);
    r.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = "GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tok.en, other\r\n\r\n";

    #[test]
    fn parses_upgrade() {
        let r = parse_request(REQ.as_bytes()).unwrap().unwrap();
        assert_eq!(r.path, "/ws");
        assert_eq!(r.protocols, vec!["tok.en", "other"]);
        assert_eq!(r.len, REQ.len());
        // RFC 6455 section 1.3 example.
        assert_eq!(accept_key(&r.key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for cut in 0..REQ.len() {
            assert_eq!(parse_request(&REQ.as_bytes()[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn refusals() {
        let post = REQ.replacen("GET", "POST", 1);
        assert_eq!(parse_request(post.as_bytes()), Err(HandshakeError::Method));
        let v8 = REQ.replace("Version: 13", "Version: 8");
        assert_eq!(parse_request(v8.as_bytes()), Err(HandshakeError::Version));
        let plain = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(parse_request(plain.as_bytes()), Err(HandshakeError::NotUpgrade));
        assert_eq!(
            parse_request(b"\x00\x01garbage\r\n\r\n"),
            Err(HandshakeError::Malformed)
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(parse_request(big.as_bytes()), Err(HandshakeError::TooLarge));
    }
}
