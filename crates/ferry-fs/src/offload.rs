//! A small, bounded pool of threads for FUSE requests that wait.
//!
//! A FUSE request thread that waits for the backend (a `durability=remote`
//! fsync, an open that fetches the file first, a `reads=fresh` open's
//! down-sync round) or for the replication backlog to drain serves nothing
//! else meanwhile: with two request threads, two such requests stall the
//! whole mount, a `stat` included. So the FUSE layer hands exactly those
//! requests, with their replies, to this pool and goes back to reading
//! `/dev/fuse`; everything else is answered on the request thread as before.
//!
//! The bounds: at most [`Offload::new`]'s `workers` threads (started when
//! first needed, so a mount that never waits has none), and at most `queued`
//! jobs waiting for one; a request that finds the queue full holds its FUSE
//! thread until a place frees up. That back-pressure is the old behaviour,
//! reached only after `workers + queued` requests already wait, and nothing
//! ever spawns without bound.
//!
//! [`Offload::stop`] (at unmount, and on drop) joins the threads after their
//! current jobs; jobs still queued then are dropped, and a dropped fuser
//! reply answers EIO on its own (the kernel has gone by then anyway).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{error, warn};

/// One request's remaining work, its reply included.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// The pool; see the module docs.
pub(crate) struct Offload {
    shared: Arc<Shared>,
    /// Thread name prefix (a number is appended).
    name: &'static str,
    workers: usize,
    queued: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued or the pool stops.
    work: Condvar,
    /// Signalled when a queued job is taken (a place frees up).
    space: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    threads: Vec<JoinHandle<()>>,
    stopping: bool,
}

impl Offload {
    /// A pool of at most `workers` threads named `name-N`, with at most
    /// `queued` jobs waiting for one of them.
    pub(crate) fn new(name: &'static str, workers: usize, queued: usize) -> Offload {
        Offload {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                work: Condvar::new(),
                space: Condvar::new(),
            }),
            name,
            workers: workers.max(1),
            queued: queued.max(1),
        }
    }

    /// Runs `job` on a pool thread, starting one if every thread is busy
    /// and the bound allows; waits while the queue is full. After
    /// [`Offload::stop`], `job` is dropped unrun.
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) {
        let mut state = self.shared.lock();
        while state.queue.len() >= self.queued && !state.stopping {
            state = self
                .shared
                .space
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        if state.stopping {
            return;
        }
        state.queue.push_back(Box::new(job));
        if state.queue.len() <= state.idle || state.threads.len() >= self.workers {
            self.shared.work.notify_one();
            return;
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{}", self.name, state.threads.len()))
            .spawn(move || shared.work_loop());
        match spawned {
            Ok(thread) => state.threads.push(thread),
            // The jobs wait for a thread that exists; with none, this one
            // runs here, as it would have without the pool.
            Err(e) if state.threads.is_empty() => {
                warn!("starting a {} thread: {e}; serving inline", self.name);
                let job = state.queue.pop_back().expect("the job just queued");
                drop(state);
                job();
            }
            Err(e) => warn!("starting a {} thread: {e}; queued", self.name),
        }
    }

    /// Stops taking jobs, drops the queued ones and joins the threads once
    /// their current jobs are done. Idempotent.
    pub(crate) fn stop(&self) {
        let (dropped, threads) = {
            let mut state = self.shared.lock();
            state.stopping = true;
            (
                std::mem::take(&mut state.queue),
                std::mem::take(&mut state.threads),
            )
        };
        self.shared.work.notify_all();
        self.shared.space.notify_all();
        if !dropped.is_empty() {
            warn!(
                "{} requests were still queued for {} threads at shutdown",
                dropped.len(),
                self.name
            );
        }
        drop(dropped);
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work_loop(&self) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.queue.pop_front() {
                drop(state);
                self.space.notify_one();
                // A panicking job has dropped its reply (EIO to the caller);
                // the thread stays, so the pool keeps its size.
                if catch_unwind(AssertUnwindSafe(job)).is_err() {
                    error!("a FUSE request panicked on a pool thread");
                }
                state = self.lock();
            } else if state.stopping {
                return;
            } else {
                state.idle += 1;
                state = self.work.wait(state).unwrap_or_else(|p| p.into_inner());
                state.idle -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Jobs that block run side by side up to the thread bound; the next
    /// ones queue, and the submitter is held only when the queue is full.
    #[test]
    fn bounds_threads_and_queue() {
        let pool = Offload::new("test-pool", 2, 1);
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let (started_tx, started) = mpsc::channel();
        let done = Arc::new(AtomicUsize::new(0));
        let job = || {
            let (gate, started_tx, done) = (gate.clone(), started_tx.clone(), done.clone());
            move || {
                started_tx.send(()).unwrap();
                gate.lock().unwrap().recv().unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }
        };
        pool.run(job());
        pool.run(job());
        for _ in 0..2 {
            started.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        // Both threads busy: the third job queues, and no third thread.
        pool.run(job());
        assert!(started.recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(pool.shared.lock().threads.len(), 2);
        // The queue (one place) is full: a fourth submitter waits.
        let (submitted_tx, submitted) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                pool.run(job());
                submitted_tx.send(()).unwrap();
            });
            assert!(submitted.recv_timeout(Duration::from_millis(200)).is_err());
            release.send(()).unwrap();
            submitted.recv_timeout(Duration::from_secs(10)).unwrap();
            for _ in 0..3 {
                release.send(()).unwrap();
            }
        });
        let all_done = (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            done.load(Ordering::SeqCst) == 4
        });
        assert!(all_done, "{} of 4 jobs done", done.load(Ordering::SeqCst));
        pool.stop();
    }

    /// A job that panics leaves the pool working; `stop` drops what is
    /// still queued without running it.
    #[test]
    fn survives_a_panic_and_drops_the_queue_at_stop() {
        let pool = Offload::new("test-pool", 1, 8);
        pool.run(|| panic!("a job panics"));
        let (tx, rx) = mpsc::channel();
        pool.run(move || tx.send(()).unwrap());
        rx.recv_timeout(Duration::from_secs(10)).unwrap();

        // One job holds the only thread; the next one waits in the queue.
        let (started_tx, started) = mpsc::channel();
        let (hold_tx, hold) = mpsc::channel::<()>();
        pool.run(move || {
            started_tx.send(()).unwrap();
            let _ = hold.recv();
        });
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        pool.run(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        std::thread::scope(|s| {
            s.spawn(|| pool.stop());
            let stopping = (0..1000).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                pool.shared.lock().stopping
            });
            drop(hold_tx);
            assert!(stopping);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 0, "a queued job ran after stop");
        let r = ran.clone();
        pool.run(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 0, "a job ran after stop");
    }
}
