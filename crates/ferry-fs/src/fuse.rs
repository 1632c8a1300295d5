//! The FUSE protocol layer: translates fuser requests into [`Vfs`] calls.
//!
//! Each handler logs one trace line, delegates, and sends exactly one reply.
//! Cache policy lives here because it is a property of the protocol:
//!
//! * **Entry and attribute timeouts: 60 s** (see [`TTL`]). Every change to
//!   this volume on this host passes through the kernel, which updates or
//!   invalidates its own caches as it goes, and changes made behind its back
//!   (another host's, applied by replication) are invalidated explicitly
//!   through the FUSE notify channel. So the timeout is only a backstop for
//!   a lost invalidation, and a long one lets `stat` of a whole tree run
//!   from the kernel's cache at local speed.
//! * **Names that are not there are cached too**, for the same 60 s: a
//!   lookup that finds nothing answers an entry with inode 0, which the
//!   kernel keeps as a negative entry (an error would be forgotten at
//!   once), so the misses of a compiler's include path, `$PATH` or Python's
//!   imports ask once. A local create replaces it in the kernel itself; a
//!   name replication adds is invalidated like any other it changes.
//! * **Passthrough when the daemon may use it** (it needs CAP_SYS_ADMIN):
//!   an open regular file is backed by its data file in the kernel, so
//!   `read`, `write` and `mmap` run at the speed of the store's file system
//!   and never reach the daemon; size limits (EFBIG) are that file system's.
//!   The daemon learns of writes at open time and logs the change then.
//! * **Writeback cache otherwise** (the kernel refuses it together with
//!   passthrough): writes complete in the page cache and reach the daemon in
//!   large batches. `mmap` and `read`/`write` share that one page cache, so
//!   they are coherent either way.
//! * **Readdirplus**: a listing returns attributes too, so `ls -l` costs one
//!   request per batch instead of one per entry.
//! * **Requests that wait do not hold a request thread.** An fsync or close
//!   under `durability=remote`, an open that must fetch the file from the
//!   backend or runs a `reads=fresh` down-sync round, a setattr that must
//!   fetch before truncating, and anything the replication backlog throttles
//!   are served by a small bounded pool (see `offload.rs`), decided per
//!   request by a cheap test; everything else is answered on the request
//!   thread as it arrives. So a few request threads suffice (fewer wake-ups
//!   on a small machine), and a partitioned backend never stalls a `stat`.
//!   Local disk waits (a local fsync) stay on the request thread: they are
//!   short and bounded by the disk, not by a timeout.
//!
//! With metrics on ([`FerryFs::with_metrics`]), each request's time to its
//! reply goes into a histogram per operation, and each open of a replicated
//! volume counts as a cache hit or miss; without them, a request pays one
//! branch for it.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use prometheus::{HistogramTimer, HistogramVec, IntCounter, Registry};
use tracing::{debug, info, warn};

use crate::context::{Context, Durability, Reads};
use crate::ids::{Fh, Ino};
use crate::offload::Offload;
use crate::vfs::{Caller, SetAttr, Vfs};

/// How long the kernel may trust an entry or attribute reply (module docs).
pub const TTL: Duration = Duration::from_secs(60);

/// Largest write the kernel sends in one request: 1 MiB, so sequential I/O
/// costs few round trips.
const MAX_WRITE: u32 = 1 << 20;

/// Flags of every open file. KEEP_CACHE: only this daemon changes the data
/// files, and the kernel saw every change it made. NOFLUSH: `close` has
/// nothing to tell the daemon (bytes are in the data file, locks are the
/// kernel's), so it costs no round trip; with the writeback cache the
/// kernel still writes its dirty pages back first.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

/// Flags of a passed-through open: NOFLUSH as above; the kernel refuses
/// KEEP_CACHE together with passthrough (there is no FUSE page cache).
const PASSTHROUGH_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// The open flags for a file opened with `flags` by a caller in `context`:
/// a file opened for writing under `durability=remote` keeps FLUSH, so its
/// `close` reaches the daemon and waits for the backend; every other open
/// keeps `base`'s NOFLUSH (a close costs no round trip).
fn close_flags(base: FopenFlags, flags: i32, context: Option<Context>) -> FopenFlags {
    let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
    match context {
        Some(c) if writable && c.durability == Durability::Remote => {
            base.difference(FopenFlags::FOPEN_NOFLUSH)
        }
        _ => base,
    }
}

/// Most threads serving requests that wait (module docs): each such
/// request is one caller blocked in a system call, so 16 at once is a busy
/// mount; beyond them, requests queue.
const WAIT_THREADS: usize = 16;

/// Most waiting requests queued for a thread before a request thread is
/// held too (back-pressure instead of an unbounded queue).
const WAIT_QUEUE: usize = 64;

/// The [`Filesystem`] fuser drives, one per mount.
pub struct FerryFs {
    ops: Arc<Ops>,
    /// Serves the requests that wait; stopped at unmount.
    waits: Offload,
}

/// What the handlers work with, shared with the [`Offload`] threads.
struct Ops {
    vfs: Arc<Vfs>,
    /// Whether opens are passed through (decided at `init`).
    passthrough: AtomicBool,
    backings: Mutex<Backings>,
    metrics: OnceLock<Metrics>,
    /// Tells the kernel of changes it did not ask for.
    notifier: NotifierSlot,
}

/// The session's notifier, set by the mount once the session exists, and
/// shared by everything that tells the kernel of changes it did not ask
/// for: the FUSE layer (set-ID bits it cleared) and replication (what
/// down-sync applied).
pub type NotifierSlot = Arc<OnceLock<fuser::Notifier>>;

/// What the FUSE layer reports to the metrics endpoint.
struct Metrics {
    /// Seconds from a request's arrival to its reply, by operation.
    latency: HistogramVec,
    /// Opens whose contents were here, and opens that fetched them from
    /// the backend; only for a replicated volume.
    cache: Option<(IntCounter, IntCounter)>,
}

/// Latency buckets: 10 µs to about 2.6 s, by fours.
const LATENCY_BUCKETS: [f64; 10] = [
    1e-5, 4e-5, 1.6e-4, 6.4e-4, 2.56e-3, 1.024e-2, 4.096e-2, 0.16384, 0.65536, 2.62144,
];

/// Kernel backing ids of passed-through files. The kernel insists that all
/// open files of one inode share one backing id, so ids are per inode and
/// counted; the last release closes the id.
#[derive(Default)]
struct Backings {
    by_ino: HashMap<Ino, (Arc<BackingId>, usize)>,
    ino_of_fh: HashMap<Fh, Ino>,
}

impl FerryFs {
    /// Serves `vfs` over FUSE; `passthrough` asks for kernel passthrough,
    /// which `init` falls back from when the kernel refuses it.
    pub fn new(vfs: Arc<Vfs>, passthrough: bool, notifier: NotifierSlot) -> FerryFs {
        FerryFs {
            ops: Arc::new(Ops {
                vfs,
                passthrough: AtomicBool::new(passthrough),
                backings: Mutex::new(Backings::default()),
                metrics: OnceLock::new(),
                notifier,
            }),
            waits: Offload::new("ferry-wait", WAIT_THREADS, WAIT_QUEUE),
        }
    }

    /// Reports request latencies (and, with `replicated`, cache hits and
    /// misses) to `registry`.
    pub fn with_metrics(
        self,
        registry: &Registry,
        replicated: bool,
    ) -> prometheus::Result<FerryFs> {
        let latency = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "fuse_request_duration_seconds",
                "Time from a FUSE request's arrival to its reply, by operation.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        let cache = if replicated {
            let hits = IntCounter::new(
                "cache_hits_total",
                "Opens of files whose contents were cached here.",
            )?;
            let misses = IntCounter::new(
                "cache_misses_total",
                "Opens of files whose contents had to be fetched from the backend.",
            )?;
            registry.register(Box::new(hits.clone()))?;
            registry.register(Box::new(misses.clone()))?;
            Some((hits, misses))
        } else {
            None
        };
        let _ = self.ops.metrics.set(Metrics { latency, cache });
        Ok(self)
    }

    /// Serves a request whose work (reply included) is `job`: here, on the
    /// request thread, or, when `waits` (the request will wait for the
    /// backend or the backlog), on the pool. `arg` is the request's borrowed
    /// payload (a name, a write's bytes), copied only for the pool, so the
    /// common path costs nothing extra.
    fn serve<A>(&self, waits: bool, arg: &A, job: impl FnOnce(&Ops, &A) + Send + 'static)
    where
        A: ToOwned + ?Sized,
        A::Owned: Send + 'static,
    {
        if waits {
            let (ops, arg) = (self.ops.clone(), arg.to_owned());
            self.waits.run(move || job(&ops, arg.borrow()));
        } else {
            job(&self.ops, arg);
        }
    }

    /// [`FerryFs::serve`] for a request with no borrowed payload.
    fn serve_owned(&self, waits: bool, job: impl FnOnce(&Ops) + Send + 'static) {
        self.serve(waits, &(), move |ops, ()| job(ops));
    }
}

impl Ops {
    /// Times a request of operation `op` until the returned guard drops.
    fn timer(&self, op: &str) -> Option<HistogramTimer> {
        let m = self.metrics.get()?;
        Some(m.latency.with_label_values(&[op]).start_timer())
    }

    /// Counts an open as a cache hit or, when it must `fetch` the contents
    /// from the backend first, a miss.
    fn count_cache_use(&self, fetch: bool) {
        if let Some((hits, misses)) = self.metrics.get().and_then(|m| m.cache.as_ref()) {
            if fetch {
                misses.inc();
            } else {
                hits.inc();
            }
        }
    }

    fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// The backing id for handle `fh` of `ino`, registering the handle's
    /// data file with the kernel if the inode has none yet; `None` (logged)
    /// when the kernel refuses, and the file is then served by the daemon.
    fn backing(
        &self,
        ino: Ino,
        fh: Fh,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        self.register_backing(ino, fh, register)
            .inspect_err(|e| {
                warn!("passthrough of inode {ino}: {e}; serving it through the daemon")
            })
            .ok()
    }

    fn register_backing(
        &self,
        ino: Ino,
        fh: Fh,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        let id = match b.by_ino.get_mut(&ino) {
            Some((id, count)) => {
                *count += 1;
                id.clone()
            }
            None => {
                let handle = self
                    .vfs
                    .handle(fh)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
                let id = Arc::new(register(&handle.file)?);
                b.by_ino.insert(ino, (id.clone(), 1));
                id
            }
        };
        b.ino_of_fh.insert(fh, ino);
        Ok(id)
    }

    /// If the caller of `req` runs under `durability=remote`: how long its
    /// fsync or close may wait for the backend (counted from the request's
    /// arrival, time in the pool's queue included).
    fn remote_deadline(&self, req: &Request) -> Option<Instant> {
        self.vfs
            .context_of(req.pid())
            .filter(|c| c.durability == Durability::Remote)
            .map(|c| Instant::now() + c.timeout)
    }

    fn release_backing(&self, fh: Fh) {
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ino) = b.ino_of_fh.remove(&fh) else {
            return;
        };
        if let Some((_, count)) = b.by_ino.get_mut(&ino) {
            *count -= 1;
            if *count == 0 {
                b.by_ino.remove(&ino);
            }
        }
    }

    /// Work an open needs before its reply in passthrough mode: writes will
    /// bypass the daemon, so the change is logged now, and a writer other
    /// than root strips set-user/group-ID bits as a write would.
    fn before_passthrough_open(&self, by: Caller, ino: Ino, flags: i32) -> Result<(), Errno> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.vfs.will_modify(ino)?;
            if by.uid != 0 {
                self.clear_setid(ino, by)?;
            }
        }
        Ok(())
    }

    /// Clears the set-ID bits a write by someone without CAP_FSETID
    /// clears. Under FUSE_HANDLE_KILLPRIV_V2 (asked for in `init`, so that
    /// the kernel stops asking for `security.capability` before every
    /// write) that is the file system's job, and the kernel's cached mode
    /// would keep showing the bits: it is told to ask again.
    fn clear_setid(&self, ino: Ino, by: Caller) -> Result<(), Errno> {
        if self.vfs.clear_setid(ino, by)? {
            if let Some(n) = self.notifier.get() {
                // Attributes only (a negative offset): no page is touched.
                let _ = n.inval_inode(ino.into(), -1, 0);
            }
        }
        Ok(())
    }

    /// `open` by `by` in `context`, after the `reads=fresh` round if the
    /// context asks for one.
    fn open(&self, by: Caller, context: Option<Context>, ino: Ino, flags: i32, reply: ReplyOpen) {
        if let Some(c) = context.filter(|c| c.reads == Reads::Fresh) {
            self.vfs.refresh(ino, Instant::now() + c.timeout);
        }
        let fh = match self.vfs.open(ino, flags) {
            Ok(fh) => fh,
            Err(e) => return reply.error(e),
        };
        if self.passthrough() {
            if let Err(e) = self.before_passthrough_open(by, ino, flags) {
                self.vfs.release(fh);
                return reply.error(e);
            }
            if let Some(id) = self.backing(ino, fh, |f| reply.open_backing(f)) {
                let flags = close_flags(PASSTHROUGH_FLAGS, flags, context);
                return reply.opened_passthrough(fh.into(), flags, &id);
            }
        }
        reply.opened(fh.into(), close_flags(OPEN_FLAGS, flags, context));
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// A time as the kernel sent it.
///
/// fuser 0.18 decodes a pre-1970 `(secs, nsecs)` as `EPOCH - (|secs| s +
/// nsecs ns)` where the kernel means `secs s + nsecs ns`; this undoes that
/// here, where the protocol is decoded, so times before 1970 round-trip.
fn kernel_time(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => t,
        Err(e) => {
            let d = e.duration();
            UNIX_EPOCH - Duration::from_secs(d.as_secs())
                + Duration::from_nanos(d.subsec_nanos().into())
        }
    }
}

fn kernel_time_or_now(t: TimeOrNow) -> TimeOrNow {
    match t {
        TimeOrNow::SpecificTime(t) => TimeOrNow::SpecificTime(kernel_time(t)),
        TimeOrNow::Now => TimeOrNow::Now,
    }
}

/// The entry of a name that is not there: inode 0, which FUSE defines as
/// ENOENT that the kernel may cache for the entry's timeout.
const NEGATIVE: fuser::FileAttr = fuser::FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: UNIX_EPOCH,
    mtime: UNIX_EPOCH,
    ctime: UNIX_EPOCH,
    crtime: UNIX_EPOCH,
    kind: fuser::FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

/// Replies to an entry-creating request.
fn entry(reply: ReplyEntry, result: Result<fuser::FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// Answers a getxattr/listxattr: the size probe, the value, or ERANGE.
fn xattr(reply: ReplyXattr, size: u32, result: Result<Vec<u8>, Errno>) {
    match result {
        Ok(value) if size == 0 => reply.size(value.len() as u32),
        Ok(value) if value.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(value) => reply.data(&value),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for FerryFs {
    /// The unmount: the pool's requests in progress finish (each within
    /// its own deadline; queued ones are dropped, their caller is gone with
    /// the connection), then the store is left at rest, its WAL emptied.
    fn destroy(&mut self) {
        self.waits.stop();
        self.ops.vfs.store().checkpoint();
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.ops.passthrough() {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                warn!("kernel refuses FUSE passthrough; using the writeback cache");
                self.ops.passthrough.store(false, Ordering::Relaxed);
            }
        }
        let cache = if self.ops.passthrough() {
            InitFlags::empty()
        } else {
            InitFlags::FUSE_WRITEBACK_CACHE
        };
        let wanted = cache
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_SPLICE_READ
            | InitFlags::FUSE_SPLICE_WRITE
            | InitFlags::FUSE_SPLICE_MOVE;
        if let Err(missing) = config.add_capabilities(wanted) {
            // Older kernels lack some; everything still works without them.
            warn!("kernel lacks FUSE capabilities {missing:?}; continuing without them");
            let _ = config.add_capabilities(wanted - missing);
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.ops.timer("lookup");
        debug!(parent = parent.0, ?name, "lookup");
        match self.ops.vfs.lookup(parent.into(), name.as_bytes()) {
            Err(Errno::ENOENT) => reply.entry(&TTL, &NEGATIVE, Generation(0)),
            found => entry(reply, found),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _timer = self.ops.timer("forget");
        self.ops.vfs.forget(ino.into(), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.ops.timer("getattr");
        debug!(ino = ino.0, "getattr");
        match self.ops.vfs.getattr(ino.into()) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let timer = self.ops.timer("setattr");
        debug!(ino = ino.0, ?mode, ?uid, ?gid, ?size, "setattr");
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(kernel_time_or_now),
            mtime: mtime.map(kernel_time_or_now),
            ctime: ctime.map(kernel_time),
            // FUSE_HANDLE_KILLPRIV_V2 leaves these to us: a chown, a
            // truncate by a caller without CAP_FSETID (root stands for it,
            // as in `before_passthrough_open`), and a request with nothing
            // to set but perhaps the ctime, which is what is left of the
            // kernel's own kill (a `chown(-1, -1)`, a write's
            // `file_remove_privs`).
            kill_setid: (uid.is_some()
                || gid.is_some()
                || (size.is_some() && req.uid() != 0)
                || (mode, size, atime, mtime) == (None, None, None, None))
                .then(|| caller(req)),
        };
        let (ino, fh) = (Ino::from(ino), fh.map(Fh::from));
        // A truncate or utime by path of a file whose contents are not here
        // fetches them first (an open file's are here).
        let fetch = fh.is_none()
            && (set.size.is_some() || set.mtime.is_some())
            && self.ops.vfs.must_fetch(ino);
        let waits = fetch || (set.size.is_some() && self.ops.vfs.throttled());
        self.serve_owned(waits, move |ops| {
            let _timer = timer;
            match ops.vfs.setattr(ino, &set, fh) {
                Ok(attr) => reply.attr(&TTL, &attr),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.ops.timer("readlink");
        debug!(ino = ino.0, "readlink");
        match self.ops.vfs.readlink(ino.into()) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let timer = self.ops.timer("mknod");
        debug!(parent = parent.0, ?name, mode, "mknod");
        let caller = caller(req);
        self.serve(self.ops.vfs.throttled(), name, move |ops, name| {
            let _timer = timer;
            let made = ops
                .vfs
                .make(caller, parent.into(), name.as_bytes(), mode, rdev, None);
            entry(reply, made);
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let timer = self.ops.timer("mkdir");
        debug!(parent = parent.0, ?name, mode, "mkdir");
        let mode = libc::S_IFDIR | (mode & 0o7777);
        let caller = caller(req);
        self.serve(self.ops.vfs.throttled(), name, move |ops, name| {
            let _timer = timer;
            let made = ops
                .vfs
                .make(caller, parent.into(), name.as_bytes(), mode, 0, None);
            entry(reply, made);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.ops.timer("unlink");
        debug!(parent = parent.0, ?name, "unlink");
        empty(
            reply,
            self.ops.vfs.remove(parent.into(), name.as_bytes(), false),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.ops.timer("rmdir");
        debug!(parent = parent.0, ?name, "rmdir");
        empty(
            reply,
            self.ops.vfs.remove(parent.into(), name.as_bytes(), true),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let timer = self.ops.timer("symlink");
        debug!(parent = parent.0, ?link_name, ?target, "symlink");
        let mode = libc::S_IFLNK | 0o777;
        let (caller, target) = (caller(req), target.to_owned());
        self.serve(self.ops.vfs.throttled(), link_name, move |ops, name| {
            let _timer = timer;
            let target = target.as_os_str().as_bytes();
            let made = ops.vfs.make(
                caller,
                parent.into(),
                name.as_bytes(),
                mode,
                0,
                Some(target),
            );
            entry(reply, made);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.ops.timer("rename");
        debug!(
            parent = parent.0,
            ?name,
            newparent = newparent.0,
            ?newname,
            "rename"
        );
        empty(
            reply,
            self.ops.vfs.rename(
                parent.into(),
                name.as_bytes(),
                newparent.into(),
                newname.as_bytes(),
                flags.bits(),
            ),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timer = self.ops.timer("link");
        debug!(ino = ino.0, newparent = newparent.0, ?newname, "link");
        entry(
            reply,
            self.ops
                .vfs
                .link(ino.into(), newparent.into(), newname.as_bytes()),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let timer = self.ops.timer("open");
        debug!(ino = ino.0, flags = flags.0, "open");
        let (ino, flags, by) = (Ino::from(ino), flags.0, caller(req));
        let context = self.ops.vfs.context_of(req.pid());
        let fetch = self.ops.vfs.must_fetch(ino);
        self.ops.count_cache_use(fetch);
        let fresh = context.is_some_and(|c| c.reads == Reads::Fresh);
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let waits = fetch || fresh || (writes && self.ops.vfs.throttled());
        self.serve_owned(waits, move |ops| {
            let _timer = timer;
            ops.open(by, context, ino, flags, reply);
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timer = self.ops.timer("read");
        debug!(fh = fh.0, offset, size, "read");
        match self.ops.vfs.read(fh.into(), offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let timer = self.ops.timer("write");
        debug!(fh = fh.0, offset, len = data.len(), "write");
        // FUSE_HANDLE_KILLPRIV_V2: a writer without CAP_FSETID clears the
        // set-ID bits, and the kernel leaves that to us.
        let killer = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| caller(req));
        self.serve(self.ops.vfs.throttled(), data, move |ops, data| {
            let _timer = timer;
            if let Some(by) = killer {
                if let Err(e) = ops.clear_setid(ino.into(), by) {
                    return reply.error(e);
                }
            }
            match ops.vfs.write(fh.into(), offset, data) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let timer = self.ops.timer("flush");
        // Writes are already in the data file (the kernel flushed its
        // writeback cache before sending this); nothing is buffered here.
        // Only a file opened for writing under durability=remote gets here
        // at all (see `close_flags`), and waits if its closer is remote.
        let writable = self.ops.vfs.handle(fh.into()).is_ok_and(|h| h.writable());
        match self.ops.remote_deadline(req) {
            Some(deadline) if writable => self.serve_owned(true, move |ops| {
                let _timer = timer;
                empty(reply, ops.vfs.wait_remote(ino.into(), deadline));
            }),
            _ => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.ops.timer("release");
        debug!(fh = fh.0, "release");
        self.ops.release_backing(fh.into());
        self.ops.vfs.release(fh.into());
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let timer = self.ops.timer("fsync");
        debug!(fh = fh.0, datasync, "fsync");
        let remote = self.ops.remote_deadline(req);
        self.serve_owned(remote.is_some(), move |ops| {
            let _timer = timer;
            let local = ops.vfs.fsync(Some(fh.into()), datasync);
            match (local, remote) {
                (Ok(()), Some(deadline)) => empty(reply, ops.vfs.wait_remote(ino.into(), deadline)),
                (local, _) => empty(reply, local),
            }
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.ops.timer("opendir");
        // Listings resume from cookies in the store, so a directory handle
        // carries no state.
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.ops.timer("readdir");
        debug!(ino = ino.0, offset, "readdir");
        let result = self
            .ops
            .vfs
            .readdir(ino.into(), offset, false, |next, name, attr| {
                !reply.add(attr.ino, next, attr.kind, OsStr::from_bytes(name))
            });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = self.ops.timer("readdirplus");
        debug!(ino = ino.0, offset, "readdirplus");
        let result = self
            .ops
            .vfs
            .readdir(ino.into(), offset, true, |next, name, attr| {
                !reply.add(
                    attr.ino,
                    next,
                    OsStr::from_bytes(name),
                    &TTL,
                    attr,
                    Generation(0),
                )
            });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.ops.timer("fsyncdir");
        debug!("fsyncdir");
        empty(reply, self.ops.vfs.fsync(None, false));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.ops.timer("statfs");
        match (self.ops.vfs.statfs(), self.ops.vfs.inode_count()) {
            (Ok(s), Ok(used)) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files().max(used),
                s.files_free(),
                s.block_size() as u32,
                crate::vfs::NAME_MAX as u32,
                s.fragment_size() as u32,
            ),
            (Err(e), _) | (_, Err(e)) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.ops.timer("setxattr");
        debug!(ino = ino.0, ?name, len = value.len(), "setxattr");
        empty(
            reply,
            self.ops
                .vfs
                .setxattr(ino.into(), name.as_bytes(), value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.ops.timer("getxattr");
        debug!(ino = ino.0, ?name, size, "getxattr");
        xattr(
            reply,
            size,
            self.ops.vfs.getxattr(ino.into(), name.as_bytes()),
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.ops.timer("listxattr");
        debug!(ino = ino.0, size, "listxattr");
        xattr(reply, size, self.ops.vfs.listxattr(ino.into()));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.ops.timer("removexattr");
        debug!(ino = ino.0, ?name, "removexattr");
        empty(reply, self.ops.vfs.removexattr(ino.into(), name.as_bytes()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let timer = self.ops.timer("create");
        debug!(parent = parent.0, ?name, mode, flags, "create");
        let (caller, context) = (caller(req), self.ops.vfs.context_of(req.pid()));
        self.serve(self.ops.vfs.throttled(), name, move |ops, name| {
            let _timer = timer;
            let made = ops
                .vfs
                .create(caller, parent.into(), name.as_bytes(), mode, flags);
            let (attr, fh) = match made {
                Ok(made) => made,
                Err(e) => return reply.error(e),
            };
            if ops.passthrough() {
                if let Some(id) = ops.backing(attr.ino.into(), fh, |f| reply.open_backing(f)) {
                    return reply.created_passthrough(
                        &TTL,
                        &attr,
                        Generation(0),
                        fh.into(),
                        close_flags(PASSTHROUGH_FLAGS, flags, context),
                        &id,
                    );
                }
            }
            let flags = close_flags(OPEN_FLAGS, flags, context);
            reply.created(&TTL, &attr, Generation(0), fh.into(), flags);
        });
    }

    fn ioctl(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        use crate::context::{RawContext, FERRY_IOC_GET_CONTEXT, FERRY_IOC_SET_CONTEXT};
        let _timer = self.ops.timer("ioctl");
        let table = self.ops.vfs.processes();
        match cmd {
            FERRY_IOC_SET_CONTEXT => {
                let set = RawContext::from_bytes(in_data)
                    .and_then(|raw| raw.decode())
                    .and_then(|update| table.set(req.pid(), &update));
                match set {
                    Ok(ctx) => {
                        info!(pid = req.pid(), %ctx, "context set");
                        reply.ioctl(0, &[]);
                    }
                    Err(e) => {
                        info!(pid = req.pid(), "context refused: {e}");
                        reply.error(Errno::from_i32(e.errno()));
                    }
                }
            }
            FERRY_IOC_GET_CONTEXT => {
                let ctx = table.lookup(req.pid());
                reply.ioctl(0, &RawContext::from_context(&ctx).to_bytes());
            }
            // Terminal probes (TCGETS from isatty) land here for every file
            // a program opens; "not a terminal" is the right answer to all.
            _ => reply.error(Errno::ENOTTY),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let timer = self.ops.timer("fallocate");
        debug!(fh = fh.0, offset, length, mode, "fallocate");
        self.serve_owned(self.ops.vfs.throttled(), move |ops| {
            let _timer = timer;
            empty(reply, ops.vfs.fallocate(fh.into(), offset, length, mode));
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _timer = self.ops.timer("lseek");
        debug!(fh = fh.0, offset, whence, "lseek");
        match self.ops.vfs.lseek(fh.into(), offset, whence) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let timer = self.ops.timer("copy_file_range");
        debug!(fh_in = fh_in.0, fh_out = fh_out.0, len, "copy_file_range");
        let (src, dst) = ((fh_in.into(), offset_in), (fh_out.into(), offset_out));
        self.serve_owned(self.ops.vfs.throttled(), move |ops| {
            let _timer = timer;
            match ops.vfs.copy_file_range(src, dst, len) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }
}
