//! The shard's task queue: the few futures the direct engine runs (pipeline calls, the inbox
//! reader) are `async-task` tasks whose wakers put them on this queue, from any thread. A wake
//! from another thread while the shard sleeps in `io_uring_enter` also writes the shard's
//! eventfd, whose pending read on the first ring ends the sleep.
//!
//! A connection has a task only while it has a request in the pipeline: an idle connection
//! holds none.

use async_task::Runnable;
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Wakes a sleeping shard from any thread.
pub struct Waker {
    eventfd: OwnedFd,
    /// The shard is in (or about to enter) its sleep: the next wake must write the eventfd.
    sleeping: AtomicBool,
}

impl Waker {
    /// A waker with a fresh eventfd.
    pub fn new() -> std::io::Result<Self> {
        let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        Ok(Self {
            eventfd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// The eventfd the shard reads.
    pub fn eventfd(&self) -> &OwnedFd {
        &self.eventfd
    }

    /// Ends the shard's sleep if it sleeps; otherwise costs one atomic swap.
    pub fn wake(&self) {
        if self.sleeping.swap(false, Ordering::AcqRel) {
            let _ = rustix::io::write(self.eventfd.as_fd(), &1u64.to_ne_bytes());
        }
    }

    /// The shard is going to sleep; it checks its queues once more after this.
    pub fn sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// The shard is awake.
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::Release);
    }
}

/// Runnable tasks, pushed by wakers on any thread.
struct Queue {
    ready: Mutex<VecDeque<Runnable>>,
    waker: Arc<Waker>,
}

/// The shard's executor.
pub struct Executor {
    queue: Arc<Queue>,
}

impl Executor {
    /// An executor whose wakes end the shard's sleep through `waker`.
    pub fn new(waker: Arc<Waker>) -> Self {
        Self {
            queue: Arc::new(Queue {
                ready: Mutex::new(VecDeque::new()),
                waker,
            }),
        }
    }

    /// Runs `fut` on this shard to completion (its output is dropped).
    pub fn spawn(&self, fut: impl Future<Output = ()> + 'static) {
        let queue = self.queue.clone();
        let schedule = move |r: Runnable| {
            queue.ready.lock().unwrap_or_else(|p| p.into_inner()).push_back(r);
            queue.waker.wake();
        };
        let (runnable, task) = async_task::spawn_local(fut, schedule);
        runnable.schedule();
        task.detach();
    }

    /// Polls up to `budget` ready tasks; returns how many ran.
    pub fn run(&self, budget: usize) -> usize {
        let mut ran = 0;
        while ran < budget {
            let next = self.queue.ready.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            let Some(r) = next else {
                break;
            };
            r.run();
            ran += 1;
        }
        ran
    }

    /// Whether a task is ready to run.
    pub fn has_ready(&self) -> bool {
        !self.queue.ready.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}
