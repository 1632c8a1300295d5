//! FUSE over io_uring (Linux 6.14+, `FUSE_OVER_IO_URING` in INIT).
//!
//! Instead of `read`/`writev` on `/dev/fuse`, the kernel hands requests to
//! ring entries the daemon registered: one queue per possible CPU, and a
//! request goes to the queue of the CPU that issued it. Each queue's thread
//! is pinned to that CPU, so the request, its handler and the reply stay on
//! one CPU: on a virtualized machine that saves the cross-CPU wake-ups that
//! dominate a round trip (see ferry's docs/benchmarks.md, "FUSE over
//! io_uring").
//!
//! Protocol (`include/uapi/linux/fuse.h` 7.42; libfuse's `lib/fuse_uring.c`
//! is the reference user space):
//! - every queue is an io_uring with 128-byte SQEs and `/dev/fuse` as fixed
//!   file 0; each entry is one `IORING_OP_URING_CMD` whose 80-byte command
//!   area holds a `fuse_uring_cmd_req {flags, commit_id, qid}`;
//! - `FUSE_IO_URING_CMD_REGISTER` hands the kernel an entry's two buffers
//!   (`sqe->addr` → two iovecs, `sqe->len = 2`): a header
//!   (`fuse_uring_req_header`: `in_out[128]` with the `fuse_in_header`,
//!   `op_in[128]` with the opcode's own struct, then `fuse_uring_ent_in_out
//!   {flags, commit_id, payload_sz}`) and a payload buffer (names, write
//!   data, extensions);
//! - a CQE with result 0 means a request is in the entry; the reply goes in
//!   the same buffers (`fuse_out_header` in `in_out`, the reply's body in the
//!   payload, its size in `payload_sz`), and `COMMIT_AND_FETCH` with the
//!   request's commit id both delivers it and re-arms the entry.
//!
//! The kernel uses the rings only once every queue has an entry registered;
//! until then, and for FORGET, INTERRUPT and notifications always, it keeps
//! using `/dev/fuse`, so the classic loop keeps running beside the rings.
//!
//! A request is copied into one contiguous buffer (in header, op struct,
//! payload: the layout a `/dev/fuse` read gives), so fuser's parser and all
//! of its dispatch serve both transports. Replies may come from any thread
//! (a file system may answer from a worker pool): the submission queue is
//! behind a mutex, and only a reply given on the queue's own thread, while
//! it serves requests, leaves the submission to that thread's next wait.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::io::IoSlice;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::ptr;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::error;
use log::warn;
use nix::errno::Errno;
use nix::sched::CpuSet;
use nix::sys::eventfd::EfdFlags;
use nix::sys::eventfd::EventFd;
use nix::sys::mman::MapFlags;
use nix::sys::mman::ProtFlags;
use nix::unistd::Pid;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll;
use crate::ll::Operation;
use crate::read_buf::FuseReadBuf;
use crate::reply::Reply;
use crate::reply::ReplyEmpty;
use crate::reply::ReplyRaw;
use crate::request::ReplyTo;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `sizeof(struct fuse_in_header)`.
const IN_HEADER: usize = 40;
/// `sizeof(struct fuse_out_header)`.
const OUT_HEADER: usize = 16;
/// Where `op_in` starts in `fuse_uring_req_header`.
const OP_IN: usize = 128;
/// Largest `op_in` (`FUSE_URING_OP_IN_OUT_SZ`).
const OP_IN_MAX: usize = 128;
/// Where `fuse_uring_ent_in_out` starts: `commit_id` is 8 bytes into it,
/// `payload_sz` 16.
const ENT_IN_OUT: usize = 256;
/// `sizeof(struct fuse_uring_req_header)`.
const REQ_HEADER: usize = ENT_IN_OUT + 32;
/// `FUSE_IO_URING_CMD_REGISTER`.
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`.
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `user_data` of the poll on a queue's wake-up eventfd; entries use their
/// index.
const WAKE: u64 = u64::MAX;
/// `FUSE_MIN_READ_BUFFER`: the kernel's floor for the payload size.
const MIN_PAYLOAD: usize = 8192;
/// The kernel's `max_pages` when the reply to INIT sets none
/// (`FUSE_DEFAULT_MAX_PAGES_PER_REQ`).
const DEFAULT_MAX_PAGES: usize = 32;

/// The payload buffer each entry needs: the kernel refuses one smaller than
/// `max(FUSE_MIN_READ_BUFFER, max_write, max_pages * page size)`.
pub(crate) fn payload_size(max_write: u32, max_pages: Option<u16>) -> usize {
    let page = page_size::get();
    let pages = max_pages.map_or(DEFAULT_MAX_PAGES, usize::from);
    let size = MIN_PAYLOAD.max(max_write as usize).max(pages * page);
    size.div_ceil(page) * page
}

/// The rings of one session, registered with the kernel.
pub(crate) struct Pool {
    queues: Vec<Arc<Queue>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl Pool {
    /// Sets up one queue per possible CPU and registers `depth` entries on
    /// each. Must run after the INIT reply (the kernel refuses entries
    /// before). On `Ok` the kernel routes requests to the rings, where they
    /// wait until [`serve`] runs; on `Err` it never started to, and
    /// `/dev/fuse` serves everything.
    pub(crate) fn start(ch: &Channel, depth: u16, payload_size: usize) -> io::Result<Pool> {
        let cpus = possible_cpus()?;
        let qids = u16::try_from(cpus).map_err(|_| io::Error::other("too many CPUs"))?;
        let queues = (0..qids)
            .map(|qid| Queue::new(ch, qid, depth, payload_size).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        for queue in &queues {
            queue.register()?;
        }
        // A refused REGISTER completes at once; if a queue has no entry
        // left, the kernel never switches to the rings.
        for queue in &queues {
            let refused = queue.refused_at_start();
            if refused > 0 {
                warn!(
                    "io_uring queue {}: the kernel refused {refused} of {depth} entries",
                    queue.qid
                );
            }
            if refused >= usize::from(depth) {
                return Err(io::Error::other(format!(
                    "the kernel refused every entry of io_uring queue {}",
                    queue.qid
                )));
            }
        }
        Ok(Pool { queues })
    }

    /// The queues, one per possible CPU, each to be served by [`serve`].
    pub(crate) fn queues(&self) -> &[Arc<Queue>] {
        &self.queues
    }

    /// Ends every queue's [`serve`] loop (at unmount, once `/dev/fuse` is
    /// gone; entries still with the kernel are cancelled when the rings
    /// close).
    pub(crate) fn stop(&self) {
        for queue in &self.queues {
            if let Err(e) = queue.wake.write(1) {
                warn!("waking io_uring queue {}: {e}", queue.qid);
            }
        }
    }
}

/// How many queues the kernel expects: one per possible CPU
/// (`num_possible_cpus()`), numbered like the CPUs.
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let bad = || io::Error::other(format!("unreadable possible-CPU list {text:?}"));
    let mut count = 0;
    let mut next = 0;
    for range in text.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let first: usize = first.parse().map_err(|_| bad())?;
        let last: usize = last.parse().map_err(|_| bad())?;
        // The kernel numbers queues by CPU id and counts possible CPUs:
        // the two agree only without holes.
        if first != next || last < first {
            return Err(io::Error::other(format!(
                "possible CPUs {text:?} have holes; io_uring queues need 0..n"
            )));
        }
        count += last - first + 1;
        next = last + 1;
    }
    if count == 0 { Err(bad()) } else { Ok(count) }
}

/// Anonymous memory the kernel reads requests into and replies from; it is
/// only ever touched through raw pointers, by one side at a time.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        let length = NonZeroUsize::new(len).ok_or_else(|| io::Error::other("empty mapping"))?;
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let base = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(Mapping {
            base: base.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing points into it any more:
        // the queue (and its ring, which the kernel used it through) goes
        // with it.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.base.cast(), self.len) } {
            warn!("unmapping an io_uring buffer: {e}");
        }
    }
}

/// One ring: its entries' buffers, and the mutex that serializes pushes to
/// its submission queue.
pub(crate) struct Queue {
    qid: u16,
    ring: IoUring<squeue::Entry128>,
    /// Held while pushing a submission queue entry.
    submit: Mutex<()>,
    /// One page per entry for its `fuse_uring_req_header`.
    headers: Mapping,
    /// `payload_size` bytes per entry.
    payloads: Mapping,
    payload_size: usize,
    /// Per entry the two iovecs REGISTER points at (header, payload).
    iovecs: Box<[[libc::iovec; 2]]>,
    /// Per entry the commit id of its last COMMIT_AND_FETCH (0: its last
    /// command was REGISTER), to resubmit after EINTR/EAGAIN.
    last_commit: Box<[AtomicU64]>,
    /// Completions that arrived while registering, before [`serve`] ran.
    early: Mutex<Vec<(u64, i32)>>,
    /// `/dev/fuse`, for passthrough's backing-file ioctls.
    dev: ChannelSender,
    /// Written by [`Pool::stop`]; a poll on it ends [`serve`].
    wake: EventFd,
}

// SAFETY: the raw pointers (buffers, iovecs) point into mappings the queue
// owns. An entry's buffers belong to exactly one party at a time: the
// kernel until it posts the entry's completion, then the queue's thread
// (which copies the request out), then the one reply (ReplyRaw guarantees
// a single send), which hands them back with COMMIT_AND_FETCH, pushed under
// `submit`; the ring's own queues are reached only under `submit` (SQ) or
// from the one serving thread (CQ).
unsafe impl Send for Queue {}
// SAFETY: see `Send`.
unsafe impl Sync for Queue {}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue").field("qid", &self.qid).finish()
    }
}

thread_local! {
    /// The queue whose last completed request this thread is handling, if
    /// it is a ring thread: a reply given here is submitted by the thread's
    /// next wait, not by its own syscall.
    static SERVING: Cell<*const Queue> = const { Cell::new(ptr::null()) };
}

impl Queue {
    fn new(ch: &Channel, qid: u16, depth: u16, payload_size: usize) -> io::Result<Queue> {
        let entries = usize::from(depth);
        // One more for the wake-up poll; completions never outnumber that.
        let ring = IoUring::<squeue::Entry128>::builder()
            .setup_cqsize(2 * (u32::from(depth) + 1))
            .setup_submit_all()
            .build(u32::from(depth) + 1)?;
        ring.submitter().register_files(&[ch.as_fd().as_raw_fd()])?;
        let page = page_size::get();
        let headers = Mapping::new(entries * page)?;
        let payloads = Mapping::new(entries * payload_size)?;
        let iovecs = (0..entries)
            .map(|i| {
                [
                    libc::iovec {
                        iov_base: headers.base.as_ptr().wrapping_add(i * page).cast(),
                        iov_len: page,
                    },
                    libc::iovec {
                        iov_base: payloads.base.as_ptr().wrapping_add(i * payload_size).cast(),
                        iov_len: payload_size,
                    },
                ]
            })
            .collect();
        Ok(Queue {
            qid,
            ring,
            submit: Mutex::new(()),
            headers,
            payloads,
            payload_size,
            iovecs,
            last_commit: (0..entries).map(|_| AtomicU64::new(0)).collect(),
            early: Mutex::new(Vec::new()),
            dev: ch.sender(),
            wake: EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?,
        })
    }

    /// The queue's number: the CPU whose requests it serves.
    pub(crate) fn qid(&self) -> u16 {
        self.qid
    }

    /// The header of entry `idx` (a page each).
    fn header(&self, idx: usize) -> *mut u8 {
        let page = self.headers.len / self.iovecs.len();
        self.headers.base.as_ptr().wrapping_add(idx * page)
    }

    /// The payload buffer of entry `idx`.
    fn payload(&self, idx: usize) -> *mut u8 {
        self.payloads
            .base
            .as_ptr()
            .wrapping_add(idx * self.payload_size)
    }

    /// A `URING_CMD` on `/dev/fuse` for entry `idx`.
    fn command(&self, op: u32, idx: usize, commit_id: u64) -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let sqe = opcode::UringCmd80::new(types::Fixed(0), op)
            .cmd(cmd)
            .build()
            .user_data(idx as u64);
        if op == CMD_REGISTER {
            let iov = ptr::from_ref(&self.iovecs[idx]) as u64;
            with_addr_len(sqe, iov, 2)
        } else {
            sqe
        }
    }

    /// Queues REGISTER for every entry and the wake-up poll, submits them,
    /// and keeps what completed at once for [`serve`].
    fn register(&self) -> io::Result<()> {
        for idx in 0..self.iovecs.len() {
            self.push(&self.command(CMD_REGISTER, idx, 0))?;
        }
        let poll = opcode::PollAdd::new(types::Fd(self.wake.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE);
        self.push(&poll.into())?;
        self.ring.submit()?;
        // SAFETY: no thread serves this queue yet, so this is the only
        // completion queue view.
        let done = unsafe { self.ring.completion_shared() };
        self.early
            .lock()
            .extend(done.map(|c| (c.user_data(), c.result())));
        Ok(())
    }

    /// How many REGISTERs the kernel refused while registering.
    fn refused_at_start(&self) -> usize {
        self.early
            .lock()
            .iter()
            .filter(|&&(data, res)| data != WAKE && res < 0)
            .count()
    }

    /// Pushes one entry to the submission queue.
    fn push(&self, sqe: &squeue::Entry128) -> io::Result<()> {
        let _held = self.submit.lock();
        // SAFETY: `submit` is held, so no other submission queue view
        // exists; the SQE's buffers (iovecs, entry buffers) live as long as
        // the queue, which outlives the ring's use of them.
        let mut sq = unsafe { self.ring.submission_shared() };
        // SAFETY: as above.
        unsafe { sq.push(sqe) }.map_err(|_| {
            // Each entry has at most one command in flight and the ring has
            // room for all of them, so this is a bug.
            io::Error::other("io_uring submission queue full")
        })
    }

    /// Delivers a reply (`data[0]` is the `fuse_out_header`) for the
    /// request in entry `idx` and re-arms the entry.
    fn commit(&self, idx: usize, commit_id: u64, data: &[IoSlice<'_>]) -> io::Result<()> {
        let (out, body) = data
            .split_first()
            .filter(|(out, _)| out.len() == OUT_HEADER)
            .ok_or_else(|| io::Error::other("reply without a FUSE out header"))?;
        let len: usize = body.iter().map(|b| b.len()).sum();
        let header = self.header(idx);
        let mut out_header = [0u8; OUT_HEADER];
        out_header.copy_from_slice(out);
        let payload_sz = if len <= self.payload_size {
            let mut at = self.payload(idx);
            for part in body {
                // SAFETY: the entry is ours until the commit below (see
                // `Send`); `len` fits in the payload buffer.
                unsafe {
                    ptr::copy_nonoverlapping(part.as_ptr(), at, part.len());
                    at = at.add(part.len());
                }
            }
            len as u32
        } else {
            error!(
                "reply of {len} bytes exceeds the io_uring payload buffer ({}); replying EIO",
                self.payload_size
            );
            out_header[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
            out_header[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            0
        };
        // SAFETY: the entry's header page is ours until the commit below.
        unsafe {
            ptr::copy_nonoverlapping(out_header.as_ptr(), header, OUT_HEADER);
            ptr::copy_nonoverlapping(
                payload_sz.to_ne_bytes().as_ptr(),
                header.add(ENT_IN_OUT + 16),
                4,
            );
        }
        self.last_commit[idx].store(commit_id, Ordering::Relaxed);
        self.push(&self.command(CMD_COMMIT_AND_FETCH, idx, commit_id))?;
        if SERVING.get() != ptr::from_ref(self) {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Submits entry `idx`'s last command again (after EINTR/EAGAIN).
    fn resubmit(&self, idx: usize) -> io::Result<()> {
        let commit_id = self.last_commit[idx].load(Ordering::Relaxed);
        let op = if commit_id == 0 {
            CMD_REGISTER
        } else {
            CMD_COMMIT_AND_FETCH
        };
        self.push(&self.command(op, idx, commit_id))
    }
}

/// `sqe` with `addr` and `len` set: the `io-uring` crate's `UringCmd80`
/// has no `len`, which REGISTER needs (two iovecs).
fn with_addr_len(sqe: squeue::Entry128, addr: u64, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `repr(C)`: a 64-byte `io_uring_sqe` and 64 more
    // command bytes, no padding, and any bytes are a valid value.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    // `struct io_uring_sqe`: `addr` at byte 16, `len` at 24.
    raw[16..24].copy_from_slice(&addr.to_ne_bytes());
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Where a reply to a ring request goes: the queue and entry it came in,
/// and the commit id that matches it to the request.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    queue: Arc<Queue>,
    idx: usize,
    commit_id: u64,
}

impl Slot {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        self.queue.commit(self.idx, self.commit_id, data)
    }

    /// `/dev/fuse`: passthrough's backing files are registered there.
    pub(crate) fn channel(&self) -> &ChannelSender {
        &self.queue.dev
    }
}

/// Serves one queue until the connection ends or [`Pool::stop`]: the body
/// of the queue's thread, pinned to the queue's CPU.
pub(crate) fn serve<FS: Filesystem>(queue: Arc<Queue>, se: SessionEventLoop<FS>) -> io::Result<()> {
    let mut cpu = CpuSet::new();
    let pinned = cpu
        .set(usize::from(queue.qid))
        .and_then(|()| nix::sched::sched_setaffinity(Pid::from_raw(0), &cpu));
    if let Err(e) = pinned {
        // Still correct, only without the locality the rings are for.
        warn!("cannot pin io_uring queue {} to its CPU: {e}", queue.qid);
    }
    let mut buf = FuseReadBuf::with_size(IN_HEADER + OP_IN_MAX + queue.payload_size);
    let mut done = std::mem::take(&mut *queue.early.lock());
    let mut live = queue.iovecs.len();
    let result = loop {
        let mut stop = None;
        let last = done.len().saturating_sub(1);
        for (i, (data, res)) in done.drain(..).enumerate() {
            // A reply to the batch's last request is submitted by the wait
            // below (one syscall for both). Earlier ones go out at once: a
            // later handler may block on something that waits for them.
            SERVING.set(if i == last {
                Arc::as_ptr(&queue)
            } else {
                ptr::null()
            });
            if data == WAKE {
                stop = Some(Ok(()));
                break;
            }
            let idx = data as usize;
            if idx >= queue.iovecs.len() {
                // The kernel echoes our user_data; anything else is a bug.
                error!(
                    "io_uring queue {}: completion for unknown entry {data}",
                    queue.qid
                );
                continue;
            }
            match Errno::from_raw(-res) {
                _ if res >= 0 => handle(&queue, idx, &mut buf, &se),
                Errno::EINTR | Errno::EAGAIN => {
                    if let Err(e) = queue.resubmit(idx) {
                        stop = Some(Err(e));
                        break;
                    }
                }
                // The connection is gone (unmount, abort): every entry ends
                // like this, the first one is enough.
                Errno::ENOTCONN | Errno::ECONNABORTED | Errno::ENODEV => {
                    stop = Some(Ok(()));
                    break;
                }
                errno => {
                    error!("io_uring queue {} entry {idx}: {errno}", queue.qid);
                    live -= 1;
                    if live == 0 {
                        stop = Some(Err(io::Error::other(format!(
                            "io_uring queue {} lost all its entries",
                            queue.qid
                        ))));
                        break;
                    }
                }
            }
        }
        if let Some(result) = stop {
            break result;
        }
        // Submits the replies given on this thread, then waits.
        match queue.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                    Errno::EINTR | Errno::EAGAIN | Errno::EBUSY
                ) => {}
            Err(e) => break Err(e),
        }
        // SAFETY: this thread is the only reader of the completion queue.
        let cq = unsafe { queue.ring.completion_shared() };
        done.extend(cq.map(|c| (c.user_data(), c.result())));
    };
    SERVING.set(ptr::null());
    result
}

/// Copies the request in entry `idx` into `buf` in `/dev/fuse`'s layout
/// and dispatches it; a malformed one is answered with EIO, so the entry
/// returns to the kernel either way.
fn handle<FS: Filesystem>(
    queue: &Arc<Queue>,
    idx: usize,
    buf: &mut FuseReadBuf,
    se: &SessionEventLoop<FS>,
) {
    let header = queue.header(idx);
    let mut head = [0u8; REQ_HEADER];
    // SAFETY: the kernel posted this entry's completion, so it wrote the
    // header and leaves the entry alone until it is committed.
    unsafe { ptr::copy_nonoverlapping(header, head.as_mut_ptr(), REQ_HEADER) };
    let u32_at = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_ne_bytes(head[at..at + 8].try_into().unwrap());
    let (len, unique) = (u32_at(0), u64_at(8));
    let (commit_id, payload_sz) = (u64_at(ENT_IN_OUT + 8), u32_at(ENT_IN_OUT + 16));
    let to = ReplyTo::Ring(Slot {
        queue: queue.clone(),
        idx,
        commit_id,
    });
    // The op struct's size is whatever of the request's length is neither
    // header nor payload (0 for LOOKUP, UNLINK, …).
    let op_in = len
        .checked_sub(IN_HEADER + payload_sz)
        .filter(|&n| n <= OP_IN_MAX && payload_sz <= queue.payload_size);
    let request = op_in.and_then(|op_in| {
        let buf = buf.as_mut();
        buf[..IN_HEADER].copy_from_slice(&head[..IN_HEADER]);
        buf[IN_HEADER..IN_HEADER + op_in].copy_from_slice(&head[OP_IN..OP_IN + op_in]);
        // SAFETY: as above, for the payload the kernel filled.
        unsafe {
            ptr::copy_nonoverlapping(
                queue.payload(idx),
                buf[IN_HEADER + op_in..].as_mut_ptr(),
                payload_sz,
            );
        }
        RequestWithSender::new(to.clone(), &buf[..len])
    });
    match request {
        Some(req) if matches!(req.request.operation(), Ok(Operation::Destroy(_))) => {
            // The connection ends after this; the queue ends with it.
            req.reply::<ReplyEmpty>().ok();
        }
        Some(req) => req.dispatch(se),
        None => {
            error!("malformed io_uring request (len {len}, payload {payload_sz}); replying EIO");
            <ReplyRaw as Reply>::new(ll::RequestId(unique), to.sender()).error(ll::Errno::EIO);
        }
    }
}
