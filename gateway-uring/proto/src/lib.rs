//! Sans-IO protocol core of SAI-IM, shared by the gateway and the load generator.
//!
//! Nothing here opens a socket or reads the clock: callers hand in bytes and `now`, and take out
//! bytes, events and the next deadline. The gateway (`sai-gateway`) is a thin monoio driver of it.
//!
//! # Layout
//! - [`handshake`]: the HTTP/1.1 upgrade request parser and the `101` / error responses.
//! - [`frame`]: RFC 6455 frame header check + decode (two phases; "incomplete" is `Ok(None)`) and encode.
//! - [`ws`]: [`ws::WsConn`], a WebSocket connection state machine (fragments, control frames, close
//!   handshake, size limits) for either role.
//! - [`im`]: the IM frame shape (`frameType`, `id`, `method`, `data`, ...) and typed client
//!   requests with stable error codes. The domain types they carry and the server's frames live
//!   in the contract crate, `sai-pipeline`.
//! - [`pending`]: the bounded set of unacknowledged pushes of one connection in `rigor` ack mode,
//!   with resend backoff.
//! - [`session`]: [`session::Session`], the server side of one IM connection (WebSocket state,
//!   idle and close deadlines, rigor resends, push acks, request order): bytes and `now` in;
//!   requests, bytes to write and the next deadline out. The gateway is a thin driver of it.
//! - [`close`]: the WebSocket close codes the server uses.
//! - [`stats`]: a shard's counters (bytes, messages, closes by code, refusals), which its
//!   sessions write and the metrics endpoint reads.

pub mod close;
pub mod frame;
pub mod handshake;
pub mod im;
pub mod pending;
pub mod session;
pub mod stats;
pub mod ws;
