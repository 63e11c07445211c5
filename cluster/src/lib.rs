//! The wiring of a SAI-IM cluster: several gateway and service processes that share state
//! through real backends instead of in-process channels, behind the pipeline contract
//! (`sai-pipeline`). It sees neither a gateway nor the services.
//!
//! - [`routes`]: the route directory in Redis (user -> gateway node, shard, connection; which
//!   nodes are alive; presence), with stale routes of dead or restarted gateways detected and
//!   cleaned, and everything rebuilt by the gateways after Redis loses it.
//! - [`pipeline`]: `ws2ms_chat` and `ms2ps_chat` between gateway and services processes over
//!   gRPC (an internal port).
//! - [`kafka`]: the same two chat flows over Kafka topics, with offsets committed after the
//!   commands are stored.
//! - [`task`]: the task process's `msg_to_mongo`, group read receipts' bitmap work written in
//!   batches.
//! - [`publisher`]: a gateway's routes published to the directory, kept fresh and repaired.
//! - [`bus`]: a broadcast between processes over Redis pub/sub (the services' cache
//!   invalidations).

pub mod bus;
pub mod kafka;
pub mod pipeline;
pub mod publisher;
pub mod routes;
pub mod task;
