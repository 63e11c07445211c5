//! The contract between SAI-IM's gateways and its message pipeline. It names no async runtime,
//! socket library or database driver, so the embedded default (one process, in-process channels)
//! and the cluster (Kafka topics, Redis routes) are two wirings of the same code.
//!
//! ```text
//!               ws2ms_chat (Ws2Ms)                        msg_to_mongo
//!  client ──> gateway shard ──────────────> message pipeline ───────────> storage
//!               ^      ^                        │  (services)
//!               │      └── Routes: user -> Route │
//!               └──────────── ms2ps_chat (Ms2Ps: Delivery by Route) ──────┘
//! ```
//!
//! The gateway and the services both depend on this crate and neither on the other; only the
//! binary that wires a deployment sees both.
//!
//! # Layout
//! - [`client`]: client addresses as the abuse limits key them.
//! - [`conversation`]: [`ChatType`](conversation::ChatType) and the typed
//!   [`ConversationId`](conversation::ConversationId) (`si_<a>_<b>` / `sg_<group>`).
//! - [`message`]: the domain messages: chat request, ack, push, sync page; method names.
//! - [`frame`]: the server's JSON frames, and [`PushFrame`](frame::PushFrame), a push serialized
//!   once for all its recipients.
//! - [`flow`]: the flows: [`Ws2Ms`](flow::Ws2Ms), [`Ms2Ps`](flow::Ms2Ps) with
//!   [`Delivery`](flow::Delivery), [`Routes`](flow::Routes) and [`Route`](flow::Route).
//! - [`trace`]: [`TraceParent`](trace::TraceParent), the W3C trace context a chat message and
//!   its pushes carry across the flows.
//! - [`token`]: JWT sign / verify, HS256 or EdDSA with key ids (the clock is an argument): services issue tokens,
//!   gateways and the load generator present them.

pub mod client;
pub mod conversation;
pub mod edge;
pub mod flow;
pub mod frame;
pub mod message;
pub mod token;
pub mod trace;
