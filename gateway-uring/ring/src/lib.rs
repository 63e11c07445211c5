//! The io_uring layer of SAI-IM's direct engine and of its load generator's million-connection
//! client: a [`Ring`] with its registered (direct) file table and its provided-buffer ring, and
//! the submission entries both use. The `unsafe` of touching io_uring's memory contract is here,
//! each block with the reason it holds; the few methods that lend the kernel a caller's buffer
//! are `unsafe fn`s that say what the caller must keep alive.
//!
//! # Numbers (per ring)
//! - File table: `slots` direct descriptors, at most `RLIMIT_NOFILE` (the kernel's per-ring cap;
//!   20,000 here). Direct descriptors do not use the process's fd table, so a shard opens as many
//!   rings as its connections need.
//! - Provided buffers: [`BUFFERS`] buffers of [`BUFFER_BYTES`] (1 MiB per ring, touched as the
//!   ring cycles). A multishot recv picks one only when data arrives and the engine hands it back
//!   as soon as the bytes are copied into the session, so an idle connection holds no read
//!   buffer. When they run out, the kernel ends that connection's multishot recv with
//!   `ENOBUFS` and the engine re-arms it after the loop turn has recycled buffers.
//! - Queues: [`SQ_ENTRIES`] submissions (what does not fit waits in an overflow list until the
//!   next submit), [`CQ_ENTRIES`] completions (the kernel keeps overflowing completions on a list
//!   of its own: nothing is dropped, `IORING_FEAT_NODROP`). 64 + 16 B each: 320 KiB per ring.
#![allow(unsafe_code)]

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

/// Provided buffers per ring.
pub const BUFFERS: u16 = 512;
/// Bytes per provided buffer: a handshake request or a few chat frames fit in one.
pub const BUFFER_BYTES: u32 = 2048;
/// Submission queue entries per ring.
pub const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries per ring.
pub const CQ_ENTRIES: u32 = 16384;
/// Rounds of "drain the queue, have the kernel flush what it kept aside" per
/// [`Ring::completions`] call: each round moves up to a queue's worth (16,384).
const OVERFLOW_FLUSHES: usize = 8;
/// The buffer group id of every ring's provided buffers (one group per ring).
const GROUP: u16 = 0;

/// `SOL_SOCKET` / `SO_PEERNAME`: the peer's address of a connected socket, asked through
/// `IORING_OP_URING_CMD` because a multishot accept reports none and a direct descriptor has no
/// fd to call `getpeername` on.
const SOL_SOCKET: u32 = libc::SOL_SOCKET as u32;
const SO_PEERNAME: u32 = libc::SO_PEERNAME as u32;

/// Largest direct-descriptor table per ring when `RLIMIT_NOFILE` is larger (a production host).
const MAX_SLOTS: u64 = 65_536;

/// Slots of each ring's direct-descriptor table under a descriptor limit of `nofile`: as many as
/// the kernel allows per ring (`RLIMIT_NOFILE`; one more fails with `EMFILE`), at most
/// [`MAX_SLOTS`], at least 64 (1,024 when the limit is unknown).
pub fn table_slots(nofile: Option<u64>) -> u32 {
    nofile.unwrap_or(1024).clamp(64, MAX_SLOTS) as u32
}

/// One completion, copied out of the queue so the ring can be used while it is handled.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// What the submission was for (see the engine's token layout).
    pub token: u64,
    /// The result: a count, a slot, or a negated errno.
    pub res: i32,
    /// `IORING_CQE_F_*`.
    pub flags: u32,
}

impl Completion {
    /// More completions will follow for this multishot submission.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer the kernel filled, if any.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// An io_uring instance with a sparse direct-descriptor table and a provided-buffer ring.
pub struct Ring {
    uring: IoUring,
    bufs: BufRing,
    /// Entries that did not fit the submission queue; pushed before the next submit.
    overflow: Vec<squeue::Entry>,
    /// Size of the direct-descriptor table.
    pub slots: u32,
    /// Direct descriptors held (accepted and not yet closed).
    pub used: u32,
    /// A multishot accept is armed on this ring.
    pub accepting: bool,
}

impl Ring {
    /// A ring with `slots` direct descriptors. A secondary ring signals `eventfd` on every
    /// completion, so the shard can sleep on its first ring alone.
    pub fn new(slots: u32, eventfd: Option<RawFd>) -> io::Result<Self> {
        Self::with_queues(slots, eventfd, SQ_ENTRIES, CQ_ENTRIES)
    }

    fn with_queues(slots: u32, eventfd: Option<RawFd>, sq: u32, cq: u32) -> io::Result<Self> {
        let uring = IoUring::builder().setup_cqsize(cq).setup_single_issuer().build(sq)?;
        uring.submitter().register_files_sparse(slots)?;
        if let Some(fd) = eventfd {
            uring.submitter().register_eventfd(fd)?;
        }
        let bufs = BufRing::new(BUFFERS, BUFFER_BYTES)?;
        // SAFETY: the entries and the buffers live in `bufs`, which the ring owns and drops
        // after the io_uring instance (field order), so they outlive the registration.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(bufs.ring as u64, BUFFERS, GROUP, 0)?;
        }
        Ok(Self {
            uring,
            bufs,
            overflow: Vec::new(),
            slots,
            used: 0,
            accepting: false,
        })
    }

    fn push(&mut self, entry: squeue::Entry) {
        if !self.overflow.is_empty() {
            self.overflow.push(entry);
            return;
        }
        let mut sq = self.uring.submission();
        // SAFETY: every entry built in this module points only at memory that outlives the
        // operation: the ring's own buffers, or memory the caller of an `unsafe` method here
        // promised to keep (see each method).
        if unsafe { sq.push(&entry) }.is_err() {
            drop(sq);
            self.overflow.push(entry);
        }
    }

    /// Hands queued submissions to the kernel without waiting (and moves completions the kernel
    /// holds past a full completion queue into it).
    pub fn submit(&mut self) -> io::Result<()> {
        self.drain_overflow();
        let idle = {
            let sq = self.uring.submission();
            sq.is_empty() && !sq.cq_overflow()
        };
        if idle {
            return Ok(());
        }
        match self.uring.submit() {
            Ok(_) => Ok(()),
            // The kernel holds overflowed completions: reap, then submit again.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits and sleeps until a completion arrives or `timeout` passes.
    pub fn submit_and_wait(&mut self, timeout: std::time::Duration) -> io::Result<()> {
        self.drain_overflow();
        let ts = io_uring::types::Timespec::from(timeout);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match self.uring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn drain_overflow(&mut self) {
        while !self.overflow.is_empty() {
            let mut sq = self.uring.submission();
            let room = sq.capacity() - sq.len();
            let n = room.min(self.overflow.len());
            if n == 0 {
                drop(sq);
                if self.uring.submit().is_err() {
                    return;
                }
                continue;
            }
            // SAFETY: as in `push`.
            let pushed = unsafe { sq.push_multiple(&self.overflow[..n]) };
            drop(sq);
            if pushed.is_err() {
                return;
            }
            self.overflow.drain(..n);
            if !self.overflow.is_empty() && self.uring.submit().is_err() {
                return;
            }
        }
    }

    /// Moves every available completion into `out`, including those the kernel kept aside
    /// while the completion queue was full: it posts them only when asked by an enter with
    /// `GETEVENTS`, so a ring whose queue once overflowed would otherwise stall for good.
    pub fn completions(&mut self, out: &mut Vec<Completion>) {
        for _ in 0..OVERFLOW_FLUSHES {
            out.extend(self.uring.completion().map(|c| Completion {
                token: c.user_data(),
                res: c.result(),
                flags: c.flags(),
            }));
            if !self.uring.submission().cq_overflow() {
                return;
            }
            // The crate's submit enters with GETEVENTS when the overflow flag is up.
            let _ = self.uring.submit();
        }
    }

    /// Whether completions are waiting.
    pub fn has_completions(&mut self) -> bool {
        !self.uring.completion().is_empty()
    }

    /// The first `len` bytes of provided buffer `bid`.
    pub fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        self.bufs.get(bid, len)
    }

    /// Gives provided buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.bufs.recycle(bid);
    }

    /// Arms a multishot accept on `listener` whose sockets go straight into free slots of this
    /// ring's table (`IORING_FILE_INDEX_ALLOC`): each completion's result is the slot.
    pub fn accept(&mut self, listener: RawFd, token: u64) {
        let e = opcode::AcceptMulti::new(Fd(listener))
            .allocate_file_index(true)
            .build()
            .user_data(token);
        self.push(e);
        self.accepting = true;
    }

    /// Arms a multishot recv on `slot` that picks provided buffers as data arrives.
    pub fn recv(&mut self, slot: u32, token: u64) {
        let e = opcode::RecvMulti::new(Fixed(slot), GROUP).build().user_data(token);
        self.push(e);
    }

    /// Sends `len` bytes at `ptr` on `slot`.
    ///
    /// # Safety
    /// The `len` bytes at `ptr` must stay allocated and unchanged until this submission's
    /// completion has been reaped.
    pub unsafe fn send(&mut self, slot: u32, ptr: *const u8, len: u32, token: u64) {
        let e = opcode::Send::new(Fixed(slot), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Asks for the peer address of `slot` into the `len` bytes at `out`; the completion's
    /// result is the length written.
    ///
    /// # Safety
    /// The `len` bytes at `out` must stay allocated, and not be read or written, until this
    /// submission's completion has been reaped.
    pub unsafe fn peer_name(&mut self, slot: u32, out: *mut u8, len: u32, token: u64) {
        let e = opcode::GetSockOpt::new(Fixed(slot), SOL_SOCKET, SO_PEERNAME, out.cast(), len)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Reads the 8-byte counter of `eventfd` into `out`.
    ///
    /// # Safety
    /// As for [`Self::peer_name`], with 8 bytes at `out`.
    pub unsafe fn read_eventfd(&mut self, eventfd: RawFd, out: *mut u8, token: u64) {
        let e = opcode::Read::new(Fd(eventfd), out, 8).build().user_data(token);
        self.push(e);
    }

    /// Cancels the operation submitted with `target` (a multishot recv ends with `ECANCELED`).
    pub fn cancel(&mut self, target: u64, token: u64) {
        let e = opcode::AsyncCancel::new(target).build().user_data(token);
        self.push(e);
    }

    /// Opens a TCP socket straight into `slot`, binds it to `local` and connects it to `remote`:
    /// three linked submissions (a failure cancels the rest), completing with `tokens[0..3]`.
    ///
    /// # Safety
    /// The addresses at `local` and `remote` (`len` bytes each) must stay allocated and unchanged
    /// until the connect's completion has been reaped.
    pub unsafe fn open_tcp(
        &mut self,
        slot: u32,
        domain: i32,
        local: *const libc::sockaddr,
        remote: *const libc::sockaddr,
        len: u32,
        tokens: [u64; 3],
    ) -> io::Result<()> {
        let dest = io_uring::types::DestinationSlot::try_from_slot_target(slot)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "slot out of range"))?;
        let link = squeue::Flags::IO_LINK;
        let socket = opcode::Socket::new(domain, libc::SOCK_STREAM, 0)
            .file_index(Some(dest))
            .build()
            .flags(link)
            .user_data(tokens[0]);
        let bind = opcode::Bind::new(Fixed(slot), local, len)
            .build()
            .flags(link)
            .user_data(tokens[1]);
        let connect = opcode::Connect::new(Fixed(slot), remote, len)
            .build()
            .user_data(tokens[2]);
        self.room_for(3);
        self.push(socket);
        self.push(bind);
        self.push(connect);
        Ok(())
    }

    /// Makes room for `n` submissions that must not be split across a submit (a link).
    fn room_for(&mut self, n: usize) {
        let room = {
            let sq = self.uring.submission();
            sq.capacity() - sq.len()
        };
        if room < n || !self.overflow.is_empty() {
            let _ = self.submit();
        }
    }

    /// Shuts `slot` down for writing (our FIN after the last byte we send).
    pub fn shutdown_write(&mut self, slot: u32, token: u64) {
        let e = opcode::Shutdown::new(Fixed(slot), libc::SHUT_WR)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Cancels every operation on `slot` that the kernel can still find by its file.
    ///
    /// An operation the kernel hands to its worker pool without trying it first (a shutdown)
    /// looks its fixed file up only when a worker runs it, so this cancel does not see it and
    /// it may run later: close the slot only once every operation on it has completed, or that
    /// late operation acts on whatever socket took the slot after the close.
    pub fn cancel_all(&mut self, slot: u32, token: u64) {
        let e = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(slot)).all())
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Closes `slot`: its socket goes and the slot is free for the next accept. Every operation
    /// on the slot must have completed (see [`Ring::cancel_all`]).
    pub fn close(&mut self, slot: u32, token: u64) {
        let e = opcode::Close::new(Fixed(slot)).build().user_data(token);
        self.push(e);
    }

    /// Cancels every operation on `slot` and then closes it (hard-linked: the close runs
    /// whatever the cancel finds). Each completes with its own token. Only for a slot with no
    /// operation the cancel cannot reach (see [`Ring::cancel_all`]): one just accepted, or one
    /// that is never reused.
    pub fn cancel_and_close(&mut self, slot: u32, cancel_token: u64, close_token: u64) {
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(slot)).all())
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(cancel_token);
        let close = opcode::Close::new(Fixed(slot)).build().user_data(close_token);
        self.room_for(2);
        self.push(cancel);
        self.push(close);
    }
}

/// A provided-buffer ring: `entries` descriptors the kernel reads (page-aligned, as
/// `IORING_REGISTER_PBUF_RING` requires) and the buffers they point at.
struct BufRing {
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    data: *mut u8,
    data_layout: Layout,
    entries: u16,
    size: u32,
    /// Our copy of the tail; published to the kernel with a release store.
    tail: u16,
}

impl BufRing {
    fn new(entries: u16, size: u32) -> io::Result<Self> {
        let oom = || io::Error::new(io::ErrorKind::OutOfMemory, "provided-buffer ring");
        let ring_layout =
            Layout::from_size_align(usize::from(entries) * size_of::<BufRingEntry>(), 4096).map_err(|_| oom())?;
        let data_layout = Layout::from_size_align(usize::from(entries) * size as usize, 4096).map_err(|_| oom())?;
        // SAFETY: both layouts have a non-zero size (entries and size are non-zero constants).
        let (ring, data) = unsafe {
            (
                alloc_zeroed(ring_layout).cast::<BufRingEntry>(),
                alloc_zeroed(data_layout),
            )
        };
        if ring.is_null() || data.is_null() {
            return Err(oom());
        }
        let mut b = Self {
            ring,
            ring_layout,
            data,
            data_layout,
            entries,
            size,
            tail: 0,
        };
        for bid in 0..entries {
            b.recycle(bid);
        }
        Ok(b)
    }

    fn get(&self, bid: u16, len: usize) -> &[u8] {
        let bid = bid % self.entries;
        let len = len.min(self.size as usize);
        // SAFETY: `bid < entries`, so the range lies inside `data`; the kernel wrote it before
        // posting the completion that named `bid`, and does not touch it again until recycled.
        unsafe { std::slice::from_raw_parts(self.data.add(usize::from(bid) * self.size as usize), len) }
    }

    fn recycle(&mut self, bid: u16) {
        let bid = bid % self.entries;
        let idx = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `idx < entries`; the kernel reads only entries between its head and the
        // published tail, and this one is past the tail until the store below.
        unsafe {
            let e = &mut *self.ring.add(idx);
            e.set_addr(self.data.add(usize::from(bid) * self.size as usize) as u64);
            e.set_len(self.size);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays the first entry's reserved word, as the ABI defines,
        // and is only ever accessed atomically by us and the kernel.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the io_uring instance that used them
        // was dropped first (it is declared before `bufs` in `Ring`).
        unsafe {
            dealloc(self.ring.cast(), self.ring_layout);
            dealloc(self.data, self.data_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_past_a_full_queue_are_not_stranded() {
        // A completion queue of 2: the rest of the 40 completions wait in the kernel's overflow
        // list, which only an enter with GETEVENTS flushes.
        let mut ring = Ring::with_queues(4, None, 2, 2).expect("ring");
        for i in 0..40 {
            // Cancelling nothing completes at once (ENOENT).
            ring.cancel(1 << 40, i);
            ring.submit().expect("submit");
        }
        let mut got = Vec::new();
        for _ in 0..100 {
            ring.completions(&mut got);
            if got.len() == 40 {
                break;
            }
        }
        let mut tokens: Vec<u64> = got.iter().map(|c| c.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..40).collect::<Vec<_>>());
        assert!(got.iter().all(|c| c.res == -libc::ENOENT));
    }

    #[test]
    fn provided_buffers_cycle() {
        let mut b = BufRing::new(4, 64).expect("buffers");
        assert_eq!(b.tail, 4, "every buffer offered at start");
        b.recycle(2);
        assert_eq!(b.tail, 5);
        assert_eq!(b.get(2, 100).len(), 64, "a read never goes past its buffer");
    }
}
