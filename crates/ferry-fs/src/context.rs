//! Per-process file-system context: how a process wants its later file
//! operations on a ferry volume to behave, inherited by its children as it
//! stood when they were forked (like umask or ioprio in the kernel).
//!
//! A context has two knobs the file system enforces, plus a bound:
//! - [`Durability`]: `local` (fsync and close return once the change is on
//!   local disk) or `remote` (they return once the file's data and metadata
//!   are committed at the backend);
//! - [`Reads`]: `cached` (open uses what this host has) or `fresh` (open
//!   revalidates with the backend first);
//! - a timeout: how long a `remote` fsync or close may wait before it fails
//!   with EIO (the data stays safe locally and replicates later).
//!
//! # Setting it: an ioctl
//!
//! A process sets its own context with [`FERRY_IOC_SET_CONTEXT`] on any open
//! file or directory of the mount (normally its root) and reads its
//! effective one with [`FERRY_IOC_GET_CONTEXT`]; the argument is a
//! [`RawContext`]. An ioctl needs no write permission on anything
//! (`setxattr` of a `user.*` name would, a `security.*` one needs
//! CAP_SYS_ADMIN), and FUSE hands the daemon the caller's thread id with the
//! request, so the daemon knows whose context it is without trusting
//! anything the caller says. The argument has a fixed size, so the kernel's
//! restricted FUSE ioctl copies it in and out from the sizes encoded in the
//! command numbers.
//!
//! # Identity and inheritance: [`ProcessTable`]
//!
//! A process is its pid *and* its start time, so a reused pid never
//! inherits stale state; each entry also holds a pidfd, whose readability
//! says at once (one `poll`, no /proc read) that the process has exited.
//! Threads share their process's context: a request's thread id is mapped
//! to its thread group.
//!
//! The kernel tells nobody about forks, so "as at fork" is kept by two
//! rules that together make the nearest ancestor with an entry always hold
//! the value it had when each of its entry-less descendants was forked:
//! - when a process changes its context, its existing descendants that have
//!   no entry of their own are first given its *old* value (one walk of
//!   /proc), so the change reaches only children forked later;
//! - a process seen for the first time takes the value of its nearest
//!   ancestor with an entry (a walk up the ppid chain) and keeps it as its
//!   own, so a later change in that ancestor does not reach it.
//!
//! A process without such an ancestor gets the mount's default, kept the
//! same way, so each process walks /proc once, not on every request. While
//! nobody has set a context at all, a lookup is one atomic load and touches
//! no /proc file.
//!
//! One case is out of reach: a process whose parent exited before the
//! process made its first request has been reparented (to init or a
//! subreaper) by then, and resolves through its new parent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Whether fsync and close wait for the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Durable on local disk (the default).
    #[default]
    Local,
    /// Committed at the backend.
    Remote,
}

/// What an open returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reads {
    /// What this host has (the default).
    #[default]
    Cached,
    /// The newest version committed at the backend (the cached one, with a
    /// log line, when the backend cannot be reached).
    Fresh,
}

/// How long a `remote` fsync or close waits by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest timeout accepted: a day. Far past any sensible wait, and it
/// keeps deadline arithmetic far from overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A process's file-system context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Context {
    /// When fsync and close return.
    pub durability: Durability,
    /// What open returns.
    pub reads: Reads,
    /// How long a `remote` fsync or close may wait before EIO.
    #[serde(rename = "timeout_ms", with = "millis")]
    pub timeout: Duration,
}

impl Default for Context {
    fn default() -> Context {
        Context {
            durability: Durability::Local,
            reads: Reads::Cached,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "durability={} reads={} timeout={}s",
            self.durability,
            self.reads,
            self.timeout.as_secs_f64()
        )
    }
}

/// A timeout as whole milliseconds in JSON.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The words of each knob, for parsing and printing.
macro_rules! words {
    ($ty:ident, $what:literal, $($variant:ident = $word:literal),+) => {
        impl $ty {
            /// The word for this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $word,)+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<$ty, String> {
                match s {
                    $($word => Ok($ty::$variant),)+
                    _ => Err(format!(
                        concat!("unknown ", $what, " {:?} (expected {})"),
                        s,
                        [$($word),+].join(" or ")
                    )),
                }
            }
        }
    };
}

words!(Durability, "durability", Local = "local", Remote = "remote");
words!(Reads, "reads mode", Cached = "cached", Fresh = "fresh");

/// A change of context: each `None` keeps the current value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextUpdate {
    /// New durability.
    pub durability: Option<Durability>,
    /// New reads mode.
    pub reads: Option<Reads>,
    /// New timeout.
    pub timeout: Option<Duration>,
}

impl ContextUpdate {
    /// `base` with this update's values.
    pub fn apply(&self, base: Context) -> Context {
        Context {
            durability: self.durability.unwrap_or(base.durability),
            reads: self.reads.unwrap_or(base.reads),
            timeout: self.timeout.unwrap_or(base.timeout),
        }
    }
}

/// The ioctl argument, as the kernel copies it between the caller and the
/// daemon (native byte order, fixed size, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawContext {
    /// [`RAW_VERSION`]; anything else is refused, so the layout can change.
    pub version: u32,
    /// 0: keep (inherit), 1: local, 2: remote.
    pub durability: u32,
    /// 0: keep (inherit), 1: cached, 2: fresh.
    pub reads: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Milliseconds; 0: keep.
    pub timeout_ms: u64,
}

/// The layout version of [`RawContext`] this build speaks.
pub const RAW_VERSION: u32 = 1;
/// The size of [`RawContext`] in bytes.
pub const RAW_SIZE: usize = std::mem::size_of::<RawContext>();
/// The ioctl type byte: `'F'` for ferry.
const IOC_TYPE: u32 = b'F' as u32;
/// Sets the caller's context: `_IOW('F', 0x10, RawContext)`.
pub const FERRY_IOC_SET_CONTEXT: u32 = libc::_IOW::<RawContext>(IOC_TYPE, 0x10) as u32;
/// Reads the caller's effective context: `_IOR('F', 0x11, RawContext)`.
pub const FERRY_IOC_GET_CONTEXT: u32 = libc::_IOR::<RawContext>(IOC_TYPE, 0x11) as u32;

impl RawContext {
    /// The argument that asks for `update`.
    pub fn from_update(update: &ContextUpdate) -> RawContext {
        RawContext {
            version: RAW_VERSION,
            durability: update.durability.map_or(0, durability_code),
            reads: update.reads.map_or(0, reads_code),
            reserved: 0,
            timeout_ms: update
                .timeout
                .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The answer that describes `ctx` (every field explicit).
    pub fn from_context(ctx: &Context) -> RawContext {
        RawContext::from_update(&ContextUpdate {
            durability: Some(ctx.durability),
            reads: Some(ctx.reads),
            timeout: Some(ctx.timeout),
        })
    }

    /// The bytes the kernel copies.
    pub fn to_bytes(&self) -> [u8; RAW_SIZE] {
        let mut b = [0u8; RAW_SIZE];
        b[0..4].copy_from_slice(&self.version.to_ne_bytes());
        b[4..8].copy_from_slice(&self.durability.to_ne_bytes());
        b[8..12].copy_from_slice(&self.reads.to_ne_bytes());
        b[12..16].copy_from_slice(&self.reserved.to_ne_bytes());
        b[16..24].copy_from_slice(&self.timeout_ms.to_ne_bytes());
        b
    }

    /// Reads the bytes the kernel copied in; they must be exactly one
    /// [`RawContext`].
    pub fn from_bytes(bytes: &[u8]) -> Result<RawContext, ContextError> {
        let b: &[u8; RAW_SIZE] = bytes
            .try_into()
            .map_err(|_| ContextError::Size(bytes.len()))?;
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut timeout = [0u8; 8];
        timeout.copy_from_slice(&b[16..24]);
        Ok(RawContext {
            version: u32_at(0),
            durability: u32_at(4),
            reads: u32_at(8),
            reserved: u32_at(12),
            timeout_ms: u64::from_ne_bytes(timeout),
        })
    }

    /// The update this argument asks for; any unknown value refuses the
    /// whole of it.
    pub fn decode(&self) -> Result<ContextUpdate, ContextError> {
        if self.version != RAW_VERSION {
            return Err(ContextError::Version(self.version));
        }
        if self.reserved != 0 {
            return Err(ContextError::Reserved(self.reserved));
        }
        let durability = match self.durability {
            0 => None,
            1 => Some(Durability::Local),
            2 => Some(Durability::Remote),
            n => return Err(ContextError::Durability(n)),
        };
        let reads = match self.reads {
            0 => None,
            1 => Some(Reads::Cached),
            2 => Some(Reads::Fresh),
            n => return Err(ContextError::Reads(n)),
        };
        let timeout = match Duration::from_millis(self.timeout_ms) {
            t if t.is_zero() => None,
            t if t > MAX_TIMEOUT => return Err(ContextError::Timeout(self.timeout_ms)),
            t => Some(t),
        };
        Ok(ContextUpdate {
            durability,
            reads,
            timeout,
        })
    }

    /// The context a [`FERRY_IOC_GET_CONTEXT`] answer describes; every field
    /// must be explicit.
    pub fn context(&self) -> Result<Context, ContextError> {
        let update = self.decode()?;
        match update {
            ContextUpdate {
                durability: Some(durability),
                reads: Some(reads),
                timeout: Some(timeout),
            } => Ok(Context {
                durability,
                reads,
                timeout,
            }),
            _ => Err(ContextError::Incomplete),
        }
    }
}

fn durability_code(d: Durability) -> u32 {
    match d {
        Durability::Local => 1,
        Durability::Remote => 2,
    }
}

fn reads_code(r: Reads) -> u32 {
    match r {
        Reads::Cached => 1,
        Reads::Fresh => 2,
    }
}

/// Why a context could not be set or read.
#[derive(Debug)]
#[non_exhaustive]
pub enum ContextError {
    /// The ioctl argument has the wrong size.
    Size(usize),
    /// A layout version this build does not speak.
    Version(u32),
    /// The reserved field is not zero.
    Reserved(u32),
    /// An unknown durability code.
    Durability(u32),
    /// An unknown reads code.
    Reads(u32),
    /// A timeout above [`MAX_TIMEOUT`] (milliseconds).
    Timeout(u64),
    /// An answer that leaves a value unsaid.
    Incomplete,
    /// The process has exited, or the daemon cannot see it (pid 0: the
    /// caller is in a pid namespace the daemon's does not contain).
    NoSuchProcess(u32),
    /// /proc could not be read for this pid, or its pidfd not opened.
    Proc(u32, io::Error),
}

impl ContextError {
    /// The errno a file-system request answers with.
    pub fn errno(&self) -> i32 {
        match self {
            ContextError::NoSuchProcess(_) => libc::ESRCH,
            ContextError::Proc(_, e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EINVAL,
        }
    }
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextError::Size(n) => {
                write!(f, "a context is {RAW_SIZE} bytes, not {n}")
            }
            ContextError::Version(v) => write!(
                f,
                "context layout version {v} is unknown (this ferry speaks {RAW_VERSION})"
            ),
            ContextError::Reserved(v) => {
                write!(f, "the reserved field of a context must be 0, not {v}")
            }
            ContextError::Durability(n) => {
                write!(f, "unknown durability code {n} (0 keep, 1 local, 2 remote)")
            }
            ContextError::Reads(n) => {
                write!(f, "unknown reads code {n} (0 keep, 1 cached, 2 fresh)")
            }
            ContextError::Timeout(ms) => write!(
                f,
                "a timeout of {ms} ms is too long (at most {} s)",
                MAX_TIMEOUT.as_secs()
            ),
            ContextError::Incomplete => f.write_str("the context answer leaves a value unsaid"),
            ContextError::NoSuchProcess(0) => {
                f.write_str("the calling process is not visible to the ferry daemon")
            }
            ContextError::NoSuchProcess(pid) => write!(f, "no process {pid}: it has exited"),
            ContextError::Proc(pid, e) => write!(f, "reading process {pid}: {e}"),
        }
    }
}

impl std::error::Error for ContextError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ContextError::Proc(_, e) => Some(e),
            _ => None,
        }
    }
}

/// A process with a context other than the mount's default, as `ferry
/// status --processes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its pid (in the daemon's pid namespace).
    pub pid: u32,
    /// Its start time, in clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    /// Its command line (or `[comm]` when it has none).
    pub command: String,
    /// Its context.
    #[serde(flatten)]
    pub context: Context,
}

/// How often dead entries are swept, so the table stays as small as the
/// set of live processes that have a context.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Longest ppid chain walked (a bound against a chain that loops while
/// pids are reused under the walk).
const MAX_DEPTH: usize = 4096;

/// One process with a context of its own (set or materialized).
struct Entry {
    start_time: u64,
    context: Context,
    pidfd: pidfd::PidFd,
}

impl Entry {
    fn exited(&self) -> bool {
        self.pidfd.exited()
    }
}

/// A descendant found by the walk of /proc that a change makes.
struct Found {
    pid: u32,
    start_time: u64,
    pidfd: pidfd::PidFd,
}

#[derive(Default)]
struct Entries {
    by_pid: HashMap<u32, Entry>,
    /// A lower bound on every entry's start time: a process that started
    /// before it can have no ancestor with an entry, so a walk stops there.
    earliest_start: u64,
}

impl Entries {
    fn insert(&mut self, pid: u32, entry: Entry) {
        if self.by_pid.is_empty() || entry.start_time < self.earliest_start {
            self.earliest_start = entry.start_time;
        }
        self.by_pid.insert(pid, entry);
    }

    /// The live entry of `pid`, dropping a stale one.
    fn live(&mut self, pid: u32) -> Option<&Entry> {
        if self.by_pid.get(&pid).is_some_and(Entry::exited) {
            self.by_pid.remove(&pid);
        }
        self.by_pid.get(&pid)
    }
}

/// The contexts of the processes that use one mount; see the module doc.
/// Safe to call from any number of FUSE threads at once; no lock is held
/// while /proc is read.
pub struct ProcessTable {
    default: Context,
    entries: RwLock<Entries>,
    /// Whether any entry exists: the whole cost of a lookup until then.
    populated: AtomicBool,
    last_sweep: Mutex<Instant>,
}

impl ProcessTable {
    /// An empty table whose processes get `default` unless told otherwise.
    pub fn new(default: Context) -> ProcessTable {
        ProcessTable {
            default,
            entries: RwLock::new(Entries::default()),
            populated: AtomicBool::new(false),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// The effective context of the process that thread `tid` belongs to.
    /// A process seen for the first time keeps the value it inherited (see
    /// the module doc). A thread that is gone gets the default: it can no
    /// longer be waiting on anything.
    pub fn lookup(&self, tid: u32) -> Context {
        if !self.populated.load(Ordering::Acquire) || tid == 0 {
            return self.default;
        }
        self.sweep_if_due();
        if !self.populated.load(Ordering::Acquire) {
            return self.default;
        }
        // The main thread: a live entry under its id is its process's, as
        // no live task can share a live process's id.
        if let Some(ctx) = self.live(tid) {
            return ctx;
        }
        let Ok(pid) = tgid_of(tid) else {
            return self.default;
        };
        if pid != tid {
            if let Some(ctx) = self.live(pid) {
                return ctx;
            }
        }
        match read_stat(pid) {
            Ok(me) => self.inherit(pid, &me).unwrap_or(self.default),
            Err(_) => self.default,
        }
    }

    /// Sets the context of the process that thread `tid` belongs to: its
    /// effective context with `update` applied, which is returned. Its
    /// existing descendants without a context of their own keep its old
    /// one. A process that has exited is an error, and nothing changes.
    pub fn set(&self, tid: u32, update: &ContextUpdate) -> Result<Context, ContextError> {
        if tid == 0 {
            return Err(ContextError::NoSuchProcess(0));
        }
        self.sweep_if_due();
        let pid = tgid_of(tid).map_err(|e| proc_error(tid, e))?;
        let me = read_stat(pid).map_err(|e| proc_error(pid, e))?;
        let pidfd = open_verified(pid, me.start_time)?.ok_or(ContextError::NoSuchProcess(pid))?;
        let old = self
            .live(pid)
            .or_else(|| self.inherit(pid, &me))
            .unwrap_or(self.default);
        let descendants = self.descendants_without_context(pid)?;
        let new = update.apply(old);
        let mut entries = self.write();
        for found in descendants {
            // A child looked up meanwhile already holds this same old value.
            if entries.live(found.pid).is_none() {
                entries.insert(
                    found.pid,
                    Entry {
                        start_time: found.start_time,
                        context: old,
                        pidfd: found.pidfd,
                    },
                );
            }
        }
        entries.insert(
            pid,
            Entry {
                start_time: me.start_time,
                context: new,
                pidfd,
            },
        );
        self.populated.store(true, Ordering::Release);
        Ok(new)
    }

    /// The live processes whose context differs from the default, by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut found: Vec<(u32, u64, Context)> = self
            .read()
            .by_pid
            .iter()
            .filter(|(_, e)| e.context != self.default && !e.exited())
            .map(|(&pid, e)| (pid, e.start_time, e.context))
            .collect();
        found.sort_by_key(|&(pid, _, _)| pid);
        found
            .into_iter()
            .map(|(pid, start_time, context)| ProcessInfo {
                pid,
                start_time,
                command: command_of(pid),
                context,
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The context of `pid`'s live entry, dropping a stale one.
    fn live(&self, pid: u32) -> Option<Context> {
        {
            let entries = self.read();
            match entries.by_pid.get(&pid) {
                None => return None,
                Some(e) if !e.exited() => return Some(e.context),
                Some(_) => {}
            }
        }
        self.write().live(pid).map(|e| e.context)
    }

    /// The value `pid` (started as `me` says) inherits from its nearest
    /// ancestor with an entry, or the default if none has one, now stored
    /// as its own; `None` if /proc could not tell (an ancestor exited
    /// mid-walk), and nothing is stored then.
    fn inherit(&self, pid: u32, me: &Stat) -> Option<Context> {
        let earliest = self.read().earliest_start;
        let mut cur = *me;
        let mut ancestor = None;
        for _ in 0..MAX_DEPTH {
            if cur.start_time < earliest || cur.ppid == 0 {
                break;
            }
            if let Some(ctx) = self.live(cur.ppid) {
                ancestor = Some((cur.ppid, ctx));
                break;
            }
            cur = read_stat(cur.ppid).ok()?;
        }
        // No ancestor with a context: the default, kept all the same, so
        // the process's next request costs a table lookup rather than this
        // walk of /proc. (It is what a change of an ancestor would give it
        // too: the ancestor's old value, the default.)
        let (ancestor, seen) = ancestor.unwrap_or((0, self.default));
        // Without a pidfd the value is still right now, only not kept (the
        // daemon is out of descriptors); the next lookup walks again.
        let Ok(Some(pidfd)) = open_verified(pid, me.start_time) else {
            return Some(seen);
        };
        let mut entries = self.write();
        // Read again under the lock: a concurrent change of the ancestor
        // stored the old value in this process first (or_insert keeps it).
        if let Some(own) = entries.live(pid) {
            return Some(own.context);
        }
        let context = entries.live(ancestor).map_or(seen, |e| e.context);
        entries.insert(
            pid,
            Entry {
                start_time: me.start_time,
                context,
                pidfd,
            },
        );
        Some(context)
    }

    /// `pid`'s descendants, found by one walk of /proc, that have no entry
    /// (the walk stops at one that has); those that exit meanwhile are left
    /// out.
    fn descendants_without_context(&self, pid: u32) -> Result<Vec<Found>, ContextError> {
        let mut children: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
        let dir = std::fs::read_dir("/proc").map_err(|e| ContextError::Proc(pid, e))?;
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Ok(st) = read_stat(p) {
                children
                    .entry(st.ppid)
                    .or_default()
                    .push((p, st.start_time));
            }
        }
        let mut found = Vec::new();
        // The snapshot is read over time, so pids reused under it could
        // make a loop: each pid is visited once.
        let mut seen = HashSet::from([pid]);
        let mut queue = VecDeque::from([pid]);
        while let Some(parent) = queue.pop_front() {
            for &(child, start_time) in children.get(&parent).into_iter().flatten() {
                if !seen.insert(child) || self.live(child).is_some() {
                    continue;
                }
                if let Some(pidfd) = open_verified(child, start_time)? {
                    found.push(Found {
                        pid: child,
                        start_time,
                        pidfd,
                    });
                    queue.push_back(child);
                }
            }
        }
        Ok(found)
    }

    /// Drops the entries of processes that exited, at most every
    /// [`SWEEP_EVERY`]; a caller that finds another sweeping goes on.
    fn sweep_if_due(&self) {
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if last.elapsed() < SWEEP_EVERY {
            return;
        }
        *last = Instant::now();
        let mut entries = self.write();
        entries.by_pid.retain(|_, e| !e.exited());
        // Only defaults left: every process would get the default from an
        // empty table too, and an empty one costs nothing to ask.
        if entries.by_pid.values().all(|e| e.context == self.default) {
            entries.by_pid.clear();
        }
        entries.earliest_start = entries
            .by_pid
            .values()
            .map(|e| e.start_time)
            .min()
            .unwrap_or(0);
        if entries.by_pid.is_empty() {
            self.populated.store(false, Ordering::Release);
        }
    }
}

/// What /proc/PID/stat says of a process.
#[derive(Clone, Copy, Debug)]
struct Stat {
    ppid: u32,
    start_time: u64,
}

/// Reads `/proc/PID/stat`: ppid (field 4) and start time (field 22). The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted after its last `)`.
fn read_stat(pid: u32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: unexpected form")))
}

fn parse_stat(text: &str) -> Option<Stat> {
    let (_, after) = text.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The thread group (process) of thread `tid`, from `/proc/TID/status`
/// (a thread's /proc directory exists though `ls /proc` does not list it).
fn tgid_of(tid: u32) -> io::Result<u32> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("/proc/{tid}/status has no Tgid")))
}

/// A pidfd of `pid`, if it is still the process that started at
/// `start_time` and has not exited (a zombie counts as exited).
fn open_verified(pid: u32, start_time: u64) -> Result<Option<pidfd::PidFd>, ContextError> {
    let fd = match pidfd::PidFd::open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(ContextError::Proc(pid, e)),
    };
    // The pid may have been reused between the stat read and the open: the
    // start time read after the open names the process the pidfd holds.
    match read_stat(pid) {
        Ok(st) if st.start_time == start_time && !fd.exited() => Ok(Some(fd)),
        _ => Ok(None),
    }
}

fn proc_error(pid: u32, e: io::Error) -> ContextError {
    match e.kind() {
        io::ErrorKind::NotFound => ContextError::NoSuchProcess(pid),
        _ => ContextError::Proc(pid, e),
    }
}

/// The command line of `pid`, its arguments joined by spaces, or `[comm]`
/// for a process without one.
fn command_of(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if !args.is_empty() {
        return args.join(" ");
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("[{}]", comm.trim_end())
}

/// Process file descriptors, through rustix (std and nix do not wrap them).
mod pidfd {
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};

    /// A pidfd: refers to one process for as long as it is open, and
    /// becomes readable when that process exits.
    pub struct PidFd(OwnedFd);

    impl PidFd {
        /// `pidfd_open(pid, 0)`; the descriptor is close-on-exec.
        pub fn open(pid: u32) -> io::Result<PidFd> {
            let pid = i32::try_from(pid)
                .ok()
                .and_then(Pid::from_raw)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
            Ok(PidFd(pidfd_open(pid, PidfdFlags::empty())?))
        }

        /// Whether the process has exited (readable, or the poll failed:
        /// an entry that cannot be checked is not trusted).
        pub fn exited(&self) -> bool {
            let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
            let now = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            !matches!(poll(&mut fds, Some(&now)), Ok(0))
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Child, Command, Stdio};

    const REMOTE: ContextUpdate = ContextUpdate {
        durability: Some(Durability::Remote),
        reads: None,
        timeout: None,
    };
    const FRESH: ContextUpdate = ContextUpdate {
        durability: None,
        reads: Some(Reads::Fresh),
        timeout: None,
    };

    fn remote() -> Context {
        REMOTE.apply(Context::default())
    }

    /// How long a test waits for a process to show up in /proc.
    const APPEAR: Duration = Duration::from_secs(10);

    /// A child that is killed and reaped however the test ends.
    struct Proc(Child);

    impl Proc {
        fn sh(script: &str) -> Proc {
            Proc(
                Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("spawn sh"),
            )
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        /// Writes a line to its stdin (the scripts `read` to fork on cue).
        fn say(&mut self, line: &str) {
            let stdin = self.0.stdin.as_mut().expect("piped stdin");
            writeln!(stdin, "{line}").expect("write to child");
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            // The whole tree: the shells' children are in no group of
            // their own (no job control).
            for pid in descendants(self.pid()) {
                // SAFETY: kill takes no pointers.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Every descendant of `pid` now, from /proc.
    fn descendants(pid: u32) -> Vec<u32> {
        let mut all = Vec::new();
        let mut queue = vec![pid];
        while let Some(p) = queue.pop() {
            let kids = children(p);
            queue.extend(&kids);
            all.extend(kids);
        }
        all
    }

    fn children(pid: u32) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&p| read_stat(p).is_ok_and(|s| s.ppid == pid))
            .collect()
    }

    /// Waits until `pid` has `n` children, returns them sorted by start.
    fn wait_children(pid: u32, n: usize) -> Vec<u32> {
        let deadline = Instant::now() + APPEAR;
        loop {
            let mut kids = children(pid);
            if kids.len() >= n {
                kids.sort_by_key(|&k| read_stat(k).map(|s| s.start_time).unwrap_or(0));
                return kids;
            }
            assert!(
                Instant::now() < deadline,
                "process {pid} has {} children, expected {n}",
                kids.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The only child of `pid`, once it exists.
    fn child_of(pid: u32) -> u32 {
        let kids = wait_children(pid, 1);
        assert_eq!(kids.len(), 1, "process {pid} has children {kids:?}");
        kids[0]
    }

    fn gettid() -> u32 {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        tid as u32
    }

    /// A script that forks a child `sh -c 'sleep 60 & wait'` (so a
    /// grandchild `sleep`) each time it reads a line.
    const FORK_ON_CUE: &str = "while read cue; do sh -c 'sleep 60 & wait' & done; wait";

    #[test]
    fn an_empty_table_answers_the_default_without_reading_proc() {
        let table = ProcessTable::new(Context::default());
        // No such thread exists; an empty table never looks.
        assert_eq!(table.lookup(u32::MAX - 1), Context::default());
        assert!(table.list().is_empty());
    }

    #[test]
    fn children_and_grandchildren_inherit_and_a_later_change_reaches_only_new_ones() {
        let table = ProcessTable::new(Context::default());
        let mut p = Proc::sh(FORK_ON_CUE);
        assert_eq!(table.set(p.pid(), &REMOTE).unwrap(), remote());

        // Forked after the set: child and grandchild inherit.
        p.say("1");
        let c1 = child_of(p.pid());
        let g1 = child_of(c1);
        assert_eq!(table.lookup(g1), remote(), "grandchild, seen first");
        assert_eq!(table.lookup(c1), remote(), "child");

        // Forked before the next change, never looked up until after it.
        p.say("2");
        let c2 = wait_children(p.pid(), 2)[1];
        let g2 = child_of(c2);
        let both = FRESH.apply(remote());
        assert_eq!(table.set(p.pid(), &FRESH).unwrap(), both);
        assert_eq!(table.lookup(p.pid()), both);
        assert_eq!(
            table.lookup(c2),
            remote(),
            "a child forked before the change"
        );
        assert_eq!(table.lookup(g2), remote(), "its child");
        assert_eq!(table.lookup(c1), remote());
        assert_eq!(table.lookup(g1), remote());

        // Forked after it: the new value.
        p.say("3");
        let c3 = wait_children(p.pid(), 3)[2];
        let g3 = child_of(c3);
        assert_eq!(table.lookup(g3), both);
        assert_eq!(table.lookup(c3), both);

        // A child's own change reaches neither its parent nor its siblings.
        table
            .set(
                c1,
                &ContextUpdate {
                    durability: Some(Durability::Local),
                    ..ContextUpdate::default()
                },
            )
            .unwrap();
        assert_eq!(table.lookup(c1).durability, Durability::Local);
        assert_eq!(table.lookup(g1), remote(), "g1 existed before c1's change");
        assert_eq!(table.lookup(p.pid()), both);
        assert_eq!(table.lookup(c2), remote());

        let listed: Vec<u32> = table.list().iter().map(|i| i.pid).collect();
        for pid in [p.pid(), c2, g1, g2, c3, g3] {
            assert!(listed.contains(&pid), "{pid} not in {listed:?}");
        }
        assert!(!listed.contains(&c1), "c1 is back at the default");
        let info = table.list().into_iter().find(|i| i.pid == p.pid()).unwrap();
        assert_eq!(info.context, both);
        assert!(
            info.command.starts_with("sh -c while read"),
            "{}",
            info.command
        );
    }

    #[test]
    fn a_process_without_an_ancestor_with_a_context_gets_the_default_kept_unlisted() {
        let default = Context {
            timeout: Duration::from_secs(5),
            ..Context::default()
        };
        let table = ProcessTable::new(default);
        let p = Proc::sh("sleep 60 & wait");
        let unrelated = Proc::sh("sleep 60 & wait");
        // p's child exists before p's change.
        let kid = child_of(p.pid());
        table.set(p.pid(), &REMOTE).unwrap();
        let child = child_of(unrelated.pid());
        assert_eq!(table.lookup(child), default);
        assert_eq!(table.lookup(unrelated.pid()), default);
        // Kept, so its next request does not walk /proc again.
        assert_eq!(
            table.read().by_pid.get(&child).map(|e| e.context),
            Some(default)
        );
        // p's existing child was kept at p's old value, the default, and
        // is therefore not listed.
        assert_eq!(table.lookup(kid), default);
        let listed: Vec<u32> = table.list().iter().map(|i| i.pid).collect();
        assert_eq!(listed, vec![p.pid()]);
    }

    #[test]
    fn threads_share_their_process_context() {
        let table = ProcessTable::new(Context::default());
        let me = std::process::id();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let _ = done_rx.recv_timeout(APPEAR);
        });
        let other = tid_rx.recv_timeout(APPEAR).unwrap();
        assert_ne!(other, me);
        // Set from the other thread: the process's context changes.
        assert_eq!(table.set(other, &FRESH).unwrap().reads, Reads::Fresh);
        assert_eq!(table.lookup(me).reads, Reads::Fresh);
        assert_eq!(table.lookup(gettid()).reads, Reads::Fresh);
        assert_eq!(table.lookup(other).reads, Reads::Fresh);
        let listed = table.list();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].pid, me);
        done_tx.send(()).unwrap();
        thread.join().unwrap();
    }

    /// Makes the next process forked in this pid namespace likely to get
    /// `pid`; `false` without the privilege to ask.
    fn aim_next_pid(pid: u32) -> bool {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_ok()
    }

    #[test]
    fn a_reused_pid_inherits_no_stale_context() {
        let table = ProcessTable::new(Context::default());
        let dead = {
            let mut p = Proc::sh(FORK_ON_CUE);
            table.set(p.pid(), &REMOTE).unwrap();
            p.say("1");
            let kid = child_of(p.pid());
            assert_eq!(table.lookup(kid), remote());
            p.pid()
        }; // killed and reaped, with its children
           // Other tests fork too: retry until the pid is really reused.
        let mut reused = None;
        for _ in 0..50 {
            if !aim_next_pid(dead) {
                eprintln!("SKIP: cannot write /proc/sys/kernel/ns_last_pid (not root?)");
                return;
            }
            let p = Proc::sh("sleep 60 & wait");
            if p.pid() == dead {
                reused = Some(p);
                break;
            }
        }
        let p = reused.unwrap_or_else(|| panic!("pid {dead} was not reused in 50 tries"));
        // The stale entry is first met as an ancestor, then directly.
        let kid = child_of(p.pid());
        assert_eq!(
            table.lookup(kid),
            Context::default(),
            "child of the reused pid"
        );
        assert_eq!(table.lookup(p.pid()), Context::default(), "the reused pid");
        assert!(table.list().is_empty(), "{:?}", table.list());
    }

    #[test]
    fn a_dead_or_zombie_process_cannot_be_set_and_nothing_changes() {
        let table = ProcessTable::new(Context::default());
        let mut gone = Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        let err = table.set(pid, &REMOTE).unwrap_err();
        assert!(
            matches!(err, ContextError::NoSuchProcess(p) if p == pid),
            "{err}"
        );
        assert_eq!(err.errno(), libc::ESRCH);
        assert_eq!(err.to_string(), format!("no process {pid}: it has exited"));

        // A zombie: exited, not yet reaped.
        let mut zombie = Command::new("true").spawn().unwrap();
        let zpid = zombie.id();
        let deadline = Instant::now() + APPEAR;
        while !std::fs::read_to_string(format!("/proc/{zpid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        }) {
            assert!(Instant::now() < deadline, "{zpid} never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        let err = table.set(zpid, &REMOTE).unwrap_err();
        zombie.wait().unwrap();
        assert!(
            matches!(err, ContextError::NoSuchProcess(p) if p == zpid),
            "{err}"
        );
        assert!(table.list().is_empty());
        assert!(table.read().by_pid.is_empty());
        assert_eq!(table.set(0, &REMOTE).unwrap_err().errno(), libc::ESRCH);
    }

    #[test]
    fn dead_entries_are_swept() {
        let table = ProcessTable::new(Context::default());
        {
            let p = Proc::sh("sleep 60");
            table.set(p.pid(), &REMOTE).unwrap();
            assert_eq!(table.list().len(), 1);
        }
        assert!(table.list().is_empty(), "a dead process is never listed");
        *table.last_sweep.lock().unwrap() = Instant::now() - SWEEP_EVERY;
        assert_eq!(table.lookup(gettid()), Context::default());
        assert!(table.read().by_pid.is_empty());
        assert!(!table.populated.load(Ordering::Acquire));
    }

    #[test]
    fn concurrent_lookups_and_sets_agree() {
        let table = ProcessTable::new(Context::default());
        let mut p = Proc::sh(FORK_ON_CUE);
        table.set(p.pid(), &REMOTE).unwrap();
        p.say("1");
        let c = child_of(p.pid());
        let g = child_of(c);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        assert_eq!(table.lookup(g), remote());
                        assert_eq!(table.lookup(c), remote());
                    }
                });
            }
            s.spawn(|| {
                for i in 0..50 {
                    let reads = if i % 2 == 0 {
                        Reads::Fresh
                    } else {
                        Reads::Cached
                    };
                    let update = ContextUpdate {
                        reads: Some(reads),
                        ..ContextUpdate::default()
                    };
                    assert_eq!(table.set(p.pid(), &update).unwrap().reads, reads);
                }
            });
        });
    }

    #[test]
    fn raw_contexts_round_trip_and_bad_values_are_refused() {
        let update = ContextUpdate {
            durability: Some(Durability::Remote),
            reads: None,
            timeout: Some(Duration::from_millis(2500)),
        };
        let raw = RawContext::from_update(&update);
        assert_eq!(RawContext::from_bytes(&raw.to_bytes()).unwrap(), raw);
        assert_eq!(raw.decode().unwrap(), update);
        let ctx = update.apply(Context::default());
        assert_eq!(RawContext::from_context(&ctx).context().unwrap(), ctx);
        assert!(matches!(raw.context(), Err(ContextError::Incomplete)));

        let bad = |f: fn(&mut RawContext)| {
            let mut r = raw;
            f(&mut r);
            r.decode().unwrap_err()
        };
        let cases = [
            (
                bad(|r| r.version = 2),
                "context layout version 2 is unknown (this ferry speaks 1)",
            ),
            (
                bad(|r| r.durability = 3),
                "unknown durability code 3 (0 keep, 1 local, 2 remote)",
            ),
            (
                bad(|r| r.reads = 7),
                "unknown reads code 7 (0 keep, 1 cached, 2 fresh)",
            ),
            (
                bad(|r| r.reserved = 1),
                "the reserved field of a context must be 0, not 1",
            ),
            (
                bad(|r| r.timeout_ms = u64::MAX),
                "a timeout of 18446744073709551615 ms is too long (at most 86400 s)",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(err.to_string(), text);
            assert_eq!(err.errno(), libc::EINVAL);
        }
        assert_eq!(
            RawContext::from_bytes(&[0; 8]).unwrap_err().to_string(),
            "a context is 24 bytes, not 8"
        );
    }

    #[test]
    fn ioctl_numbers_encode_direction_size_and_type() {
        assert_eq!(RAW_SIZE, 24);
        // As C computes _IOW('F', 0x10, 24 bytes) on x86-64 and arm64.
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert_eq!(FERRY_IOC_SET_CONTEXT, 0x4018_4610);
            assert_eq!(FERRY_IOC_GET_CONTEXT, 0x8018_4611);
        }
        assert_ne!(FERRY_IOC_SET_CONTEXT, libc::TCGETS as u32);
    }

    #[test]
    fn knobs_parse_and_print_their_words() {
        assert_eq!("remote".parse::<Durability>().unwrap(), Durability::Remote);
        assert_eq!("fresh".parse::<Reads>().unwrap(), Reads::Fresh);
        assert_eq!(
            "REMOTE".parse::<Durability>().unwrap_err(),
            "unknown durability \"REMOTE\" (expected local or remote)"
        );
        assert_eq!(
            "stale".parse::<Reads>().unwrap_err(),
            "unknown reads mode \"stale\" (expected cached or fresh)"
        );
        let info = ProcessInfo {
            pid: 7,
            start_time: 9,
            command: "make -j8".into(),
            context: remote(),
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "pid": 7, "start_time": 9, "command": "make -j8",
                "durability": "remote", "reads": "cached", "timeout_ms": 30000
            })
        );
        assert_eq!(serde_json::from_value::<ProcessInfo>(json).unwrap(), info);
        assert_eq!(
            remote().to_string(),
            "durability=remote reads=cached timeout=30s"
        );
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "42 (a) b (c)) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 \
                    1 2 3";
        let st = parse_stat(line).unwrap();
        assert_eq!((st.ppid, st.start_time), (7, 12345));
        assert!(parse_stat("42 (x) S").is_none());
    }
}
