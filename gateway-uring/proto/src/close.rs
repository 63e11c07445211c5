//! WebSocket close codes sent by the gateway. 1xxx are RFC 6455 codes (1012 from the IANA
//! registry that extends it), 4xxx are SAI-IM's own.

/// Normal closure (client asked, or server shutdown of an idle connection).
pub const NORMAL: u16 = 1000;
/// The peer broke RFC 6455 (unmasked client frame, reserved bits, bad fragmentation, ...).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text frame that is not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A frame or message larger than the configured limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The server is restarting (a graceful stop): reconnect, here or to another gateway, and sync.
pub const SERVICE_RESTART: u16 = 1012;
/// The reason sent with [`SERVICE_RESTART`].
pub const SERVICE_RESTART_REASON: &str = "service restart: reconnect and sync";
/// Another connection of the same user logged in and replaced this one (exclusive login).
pub const REPLACED: u16 = 4001;
/// No traffic for the idle timeout.
pub const IDLE_TIMEOUT: u16 = 4002;
/// The client fell too far behind: its outbound queue overflowed. It should reconnect and sync.
pub const SLOW_CONSUMER: u16 = 4003;
/// The session's token was revoked (the user logged out or changed the password); log in again.
pub const TOKEN_REVOKED: u16 = 4004;
/// The account was disabled.
pub const ACCOUNT_DISABLED: u16 = 4005;

/// Every code the gateway sends (`docs/protocol.md` lists them; a test holds the two together).
pub const SENT: [u16; 10] = [
    NORMAL,
    PROTOCOL_ERROR,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    SERVICE_RESTART,
    REPLACED,
    IDLE_TIMEOUT,
    SLOW_CONSUMER,
    TOKEN_REVOKED,
    ACCOUNT_DISABLED,
];
