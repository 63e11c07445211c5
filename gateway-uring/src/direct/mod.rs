//! The direct engine: the gateway's data plane on raw io_uring (the `io-uring` crate), with
//! direct descriptors, so that one process holds far more connections than its descriptor
//! limit (20,000 here; a million in one process was the goal this engine was built for).
//!
//! It drives the same sans-IO [`Session`](sai_proto::session::Session), the same request
//! handlers and the same pipeline contract as the monoio engine; only the I/O differs:
//!
//! - **Rings**: each shard thread owns as many rings as its connections need, each with a
//!   sparse registered file table of `RLIMIT_NOFILE` slots (the kernel caps a table per ring,
//!   not per process). Secondary rings signal the shard's eventfd, which the first ring reads,
//!   so the thread sleeps in one place ([`shard`]).
//! - **Accept**: multishot, straight into free slots of the ring that is accepting; the peer
//!   address (for the per-address admission caps) is asked with `SO_PEERNAME` through
//!   `IORING_OP_URING_CMD`, since neither the multishot accept nor a direct descriptor offers
//!   another way.
//! - **Reads**: multishot recv with a provided-buffer ring per ring: a connection holds a read
//!   buffer only while its bytes are being copied into its session (`sai-ring`, the io_uring
//!   layer this engine shares with the load generator).
//! - **Writes**: one send per connection in flight, carrying every frame queued since the last
//!   one, started once per loop turn.
//! - **Time**: the shard's [`TimerWheel`](crate::wheel::TimerWheel) for handshake, idle, close
//!   grace and resend deadlines; the loop sleeps at most one tick.
//! - **Other threads**: the shard inbox (pushes, kicks) and the pipeline's futures wake the
//!   shard's tasks ([`exec`]), and a wake from another thread writes the eventfd.
//!
//! [`probe`] checks, at start, that the kernel does all of this; the gateway falls back to the
//! monoio engine, with a log line saying why, when it does not.

pub(crate) mod exec;
pub(crate) mod shard;
pub(crate) mod slab;

use crate::shard::{InboxReceiver, Shared};
use shard::RingPlan;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

/// Connections a direct-engine process holds when `admission.max_connections` is 0.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_048_576;

/// How the shards' rings are sized for `total` connections over `shards` shards: tables as
/// large as the kernel allows, and one ring more than an even spread needs (connections do not
/// spread evenly over the shards' listeners).
pub(crate) fn plan(total: usize, shards: usize, nofile: Option<u64>) -> RingPlan {
    let slots = sai_ring::table_slots(nofile);
    let per_shard = total.div_ceil(shards.max(1));
    RingPlan {
        slots,
        max_rings: per_shard.div_ceil(slots as usize) + 1,
    }
}

/// Whether this kernel does what the engine needs: a ring with a sparse file table and a
/// provided-buffer ring, a multishot accept into that table, `SO_PEERNAME` through
/// `IORING_OP_URING_CMD` (Linux 6.7), and a multishot recv that reads what a client sent.
/// `Err` says what failed, for the log line of the fallback.
#[allow(unsafe_code)] // one buffer lent to the kernel, reaped before it goes out of scope
pub fn probe() -> Result<(), String> {
    let step = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(step("binding a probe listener"))?;
    let addr = listener.local_addr().map_err(step("probe listener address"))?;
    let mut ring = sai_ring::Ring::new(8, None).map_err(step("io_uring with a sparse file table and a buffer ring"))?;
    ring.accept(listener.as_raw_fd(), 1);
    ring.submit().map_err(step("submitting a multishot accept"))?;
    let mut client = std::net::TcpStream::connect(addr).map_err(step("probe connect"))?;
    client.write_all(b"ping").map_err(step("probe write"))?;
    let mut out = Vec::new();
    let wait = |ring: &mut sai_ring::Ring, out: &mut Vec<sai_ring::Completion>, token: u64| {
        for _ in 0..50 {
            ring.completions(out);
            if let Some(c) = out.iter().find(|c| c.token == token) {
                return Ok(*c);
            }
            let _ = ring.submit_and_wait(Duration::from_millis(20));
        }
        Err(format!("no completion for step {token}"))
    };
    let accepted = wait(&mut ring, &mut out, 1)?;
    if accepted.res < 0 {
        return Err(format!(
            "multishot accept into a direct slot: {}",
            std::io::Error::from_raw_os_error(-accepted.res)
        ));
    }
    let slot = accepted.res as u32;
    let mut name = [0u8; 16];
    // SAFETY: `name` outlives the completion, which `wait` reaps before returning.
    unsafe { ring.peer_name(slot, name.as_mut_ptr(), 16, 2) };
    let peer = wait(&mut ring, &mut out, 2)?;
    if peer.res < 0 {
        return Err(format!(
            "SO_PEERNAME through IORING_OP_URING_CMD: {}",
            std::io::Error::from_raw_os_error(-peer.res)
        ));
    }
    ring.recv(slot, 3);
    let got = wait(&mut ring, &mut out, 3)?;
    let bid = got.buffer().ok_or("multishot recv picked no provided buffer")?;
    if got.res != 4 || ring.buffer(bid, 4) != b"ping" {
        return Err(format!("multishot recv read {} bytes, not the 4 sent", got.res));
    }
    ring.recycle(bid);
    ring.cancel_and_close(slot, 4, 5);
    let _ = ring.submit();
    let _ = wait(&mut ring, &mut out, 5)?;
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    Ok(())
}

/// Starts the direct engine's shards; each sends `Ok` on `ready` once its rings are up.
pub(crate) fn spawn_shards(
    listeners: Vec<std::net::TcpListener>,
    receivers: Vec<InboxReceiver>,
    shared: Arc<Shared>,
    plan: RingPlan,
    ready: &std::sync::mpsc::Sender<std::io::Result<()>>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(listeners.len());
    for (idx, (listener, rx)) in listeners.into_iter().zip(receivers).enumerate() {
        let shared = shared.clone();
        let ready = ready.clone();
        let t = std::thread::Builder::new()
            .name(format!("sai-direct-{idx}"))
            .spawn(move || shard::run_shard(idx, listener, rx, shared, plan, ready))?;
        threads.push(t);
    }
    Ok(threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_cover_the_cap_with_one_to_spare() {
        let p = plan(1_048_576, 2, Some(20_000));
        assert_eq!(p.slots, 20_000);
        assert_eq!(p.max_rings, 28, "524,288 per shard in 27 rings, plus one");
        let p = plan(100, 4, Some(20_000));
        assert_eq!((p.slots, p.max_rings), (20_000, 2));
        assert_eq!(plan(10, 1, Some(10_000_000)).slots, 65_536, "tables stay bounded");
    }
}
