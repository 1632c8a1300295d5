//! Replication: background threads ship the change log to a backend, and a
//! new host restores a volume from one.
//!
//! The shipper reads the log after the last shipped record, coalesces the
//! batch into *state*: every inode and every directory entry the batch
//! touched is sent as it is now (or deleted, if it is gone). So a file
//! written many times uploads once, create-then-delete sends nothing, and a
//! crash that repeats a batch only repeats the same state. Chunks are
//! content-addressed (BLAKE3, ≤ 4 MiB) and only the ones the backend lacks
//! are uploaded. They are collected across the files of a batch and sent a
//! group at a time (one `missing_chunks` and one `put_chunks` per group),
//! so a far backend costs a few round trips per batch, not per file.
//!
//! Every put carries the backend version the object was last seen at; the
//! backend applies it only if that still matches. A mismatch that is our own
//! earlier write (its acknowledgement was lost in a crash) is adopted; any
//! other is kept as a conflict and the object is held back — never
//! overwritten.
//!
//! Writers never wait on any of this: the shipper runs on its own thread,
//! retries with capped exponential backoff, and only a full backlog
//! (`max_backlog`) slows writers down, a little per operation.
//!
//! # The promises (DESIGN.md's I1–I4), and what keeps each
//!
//! - **I1, sync is honest.** After `ferry sync` returns 0, a store restored
//!   from the backend equals the mount as it stood when sync was called.
//!   Sync first logs every file open for writing whose latest writes no
//!   record covers ([`Vfs::log_open_writers`]: passthrough and mmap writes
//!   never reach the daemon), then waits until the shipper has committed
//!   everything up to the log's head *and* has checked this run that the
//!   backend is the store's own volume. Directories ship with the records
//!   that change their entries, so their mtimes travel too; holes ship as
//!   [`HOLE`] runs and are restored as holes.
//! - **I2, crashes lose nothing.** Every change is in the local log before
//!   it is acknowledged; the shipper reads current state, so repeating a
//!   batch after a crash repeats the same state. A file shipped while still
//!   open for writing is remembered durably ([`Tx::mark_writing`], in the
//!   commit that records the shipment) until its last writer closes and it
//!   is logged again; a daemon killed in between logs it again at start.
//! - **I3, the backend stays whole.** The backend refuses any op that
//!   would leave a state no restore can load (ferry-backend's commit
//!   rules); such refusals are conflicts here, kept and never overwritten.
//!   A local inode without names (unlinked but open) is deleted at the
//!   backend, never shipped as a nameless inode.
//! - **I4, no mix-ups.** Before its first shipment of each run the shipper
//!   checks that the backend is the volume this store belongs to and holds
//!   nothing newer from this host than the store does.
//!
//! A metadata-only change (chmod, rename, xattr) ships the chunk list the
//! backend already has instead of re-reading the data file, so bit rot in
//! a clean local file is never uploaded as a new version of it.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_backend::{
    Backend, BackendError, ChunkHash, InodeState, ObjectId, Op, Outcome, MAX_CHUNK,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::log::{Change, LogRecord};
use crate::store::{nanos_of, Inode, Kind, Queries, Store, Tx, ROOT_INO};
use crate::vfs::Vfs;

/// Records shipped per backend transaction, at most. A batch ships the
/// *current* state of what its records touched, and only the whole log up to
/// its head describes that state: a batch cut short would ship, say, an
/// inode's new name but not the removal of the old one, which is in a later
/// record. So a batch takes everything pending; the bound only caps memory
/// (records are about 100 bytes).
const BATCH: usize = 1 << 20;
/// Bytes of chunk data held in memory before a group is uploaded.
const UPLOAD_GROUP: usize = 16 << 20;
/// How long new changes settle before they ship.
const SETTLE: Duration = Duration::from_millis(50);
/// How long a batch waits for files still open for writing to close, so a
/// file written and closed soon ships once, whole; one held open longer
/// ships as it is and again after it closes.
const WRITER_GRACE: Duration = Duration::from_secs(2);
/// How long a backend call may take to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The chunk-list entry of a hole ([`ChunkHash::HOLE`]): with a length it
/// stands for that many zero bytes stored nowhere. It is never uploaded,
/// and a fetch leaves a hole for it.
pub const HOLE: [u8; 32] = ChunkHash::HOLE.0;
/// Longest single hole entry (a chunk length is a u32).
const HOLE_PIECE: u64 = 1 << 30;

/// The backend key of an inode: `i` + host + counter.
fn inode_key(id: ObjectId) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(b'i');
    k.extend_from_slice(&id.host.to_be_bytes());
    k.extend_from_slice(&id.counter.to_be_bytes());
    k
}

/// What a backend key names; the inverse of [`inode_key`] and [`entry_key`].
enum Key {
    Inode(ObjectId),
    Entry(ObjectId, Vec<u8>),
}

fn decode_key(key: &[u8]) -> Option<Key> {
    let (&kind, rest) = key.split_first()?;
    let host = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let counter = u64::from_be_bytes(rest.get(4..12)?.try_into().ok()?);
    let id = ObjectId { host, counter };
    match kind {
        b'i' if rest.len() == 12 => Some(Key::Inode(id)),
        b'e' => Some(Key::Entry(id, rest[12..].to_vec())),
        _ => None,
    }
}

/// The backend key of a directory entry: `e` + parent id + name.
fn entry_key(parent: ObjectId, name: &[u8]) -> Vec<u8> {
    let mut k = inode_key(parent);
    k[0] = b'e';
    k.extend_from_slice(name);
    k
}

fn object_id(inode: &Inode) -> ObjectId {
    ObjectId {
        host: inode.host,
        counter: inode.counter,
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What `ferry status` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// The backend, with any password removed.
    pub backend: String,
    /// Log records not yet committed at the backend.
    pub pending_ops: u64,
    /// Bytes of file contents those records may need to upload.
    pub pending_bytes: u64,
    /// Age in seconds of the oldest pending record.
    pub oldest_pending_age_s: Option<f64>,
    /// Unix time of the last successful backend call.
    pub last_contact: Option<f64>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Errors since the daemon started.
    pub errors: u64,
    /// Conflicts kept, waiting to be resolved.
    pub conflicts: u64,
    /// Last log record committed at the backend.
    pub shipped_seq: u64,
    /// Newest log record.
    pub head_seq: u64,
    /// Chunks uploaded and bytes sent since the daemon started.
    pub chunks_uploaded: u64,
    /// Bytes uploaded since the daemon started.
    pub bytes_uploaded: u64,
    /// Whether this run of the daemon has checked that the backend is this
    /// store's volume (nothing ships before, and no sync is done before).
    #[serde(default)]
    pub verified: bool,
    /// The backend feed position this host has applied (down-sync).
    #[serde(default)]
    pub feed_seq: u64,
    /// Remote changes applied to this store since the daemon started.
    #[serde(default)]
    pub applied: u64,
    /// Conflicts resolved on this host, newest last (the most recent ones;
    /// every one is also in the daemon's log).
    #[serde(default)]
    pub resolved: Vec<Resolution>,
    /// Background prefetch of file contents, while one runs or after.
    #[serde(default)]
    pub prefetch: Option<PrefetchProgress>,
}

/// One conflict and how it was resolved, for `ferry status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Resolution {
    /// Unix time of the resolution.
    pub at: f64,
    /// The path the conflict was on (as it was on this host).
    pub path: String,
    /// What was done, in words ("kept this host's version as …").
    pub how: String,
}

/// Progress of a background prefetch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrefetchProgress {
    /// Files fetched so far, of `files_total` chosen by the policy.
    pub files_done: u64,
    /// Files the policy chose.
    pub files_total: u64,
    /// Bytes fetched so far.
    pub bytes_done: u64,
    /// Bytes the policy chose.
    pub bytes_total: u64,
}

/// Which file contents a mount fetches in the background, before anyone
/// opens them (Coda's hoarding): after a restore and after each down-sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    /// Only what is opened (and read ahead within its directory).
    None,
    /// Files up to the size limit.
    #[default]
    Small,
    /// Everything (still bounded by the cache size, if one is set).
    All,
}

impl std::str::FromStr for Prefetch {
    type Err = String;

    fn from_str(s: &str) -> Result<Prefetch, String> {
        match s {
            "none" => Ok(Prefetch::None),
            "small" => Ok(Prefetch::Small),
            "all" => Ok(Prefetch::All),
            other => Err(format!(
                "prefetch must be none, small or all, not {other:?}"
            )),
        }
    }
}

/// How the replicator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// `dir:PATH` or `postgres://…`.
    pub url: String,
    /// Backlog (bytes of pending contents) above which writers slow down.
    pub max_backlog: u64,
    /// What to fetch in the background.
    pub prefetch: Prefetch,
    /// Largest file `Prefetch::Small` fetches, in bytes.
    pub prefetch_max_file: u64,
}

/// State shared between the shipper thread, the vfs and the control socket.
pub struct Shared {
    status: Mutex<Status>,
    stop: AtomicBool,
    /// Pending content bytes, read by writers on every first write.
    backlog: AtomicU64,
    max_backlog: u64,
    /// How many `ferry sync`s are waiting: while any is, files still open
    /// for writing ship at once instead of after [`WRITER_GRACE`].
    urgent: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// The current status: counts read from `store` now, the rest as the
    /// shipper last left it.
    pub fn status(&self, store: &Store) -> Status {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Err(e) = count_pending(store, &mut s) {
            warn!("replication status: {e}");
        }
        s
    }

    /// Whether writers should slow down.
    pub fn over_backlog(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) > self.max_backlog
    }

    /// Asks the shipper to ship open files without waiting for their
    /// writers, for as long as the returned guard lives (a sync waits).
    pub fn urgent(&self) -> Urgent<'_> {
        self.urgent.fetch_add(1, Ordering::SeqCst);
        Urgent(self)
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// A waiting sync's claim on the shipper's haste; see [`Shared::urgent`].
pub struct Urgent<'a>(&'a Shared);

impl Drop for Urgent<'_> {
    fn drop(&mut self) {
        self.0.urgent.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The running replication of a mount: a handle on its threads.
///
/// Dropping it stops the threads and joins them. That is safe at any moment:
/// nothing is acknowledged locally before the backend committed it, so a
/// stop mid-batch only means the batch is shipped again next time.
pub struct Replication {
    shared: Arc<Shared>,
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    store_waker: Arc<Vfs>,
    thread: Option<JoinHandle<()>>,
}

impl Replication {
    /// Starts replicating `vfs` with the backend at `cfg.url`, and makes
    /// the vfs fetch contents from it. The backend need not be reachable:
    /// the threads keep trying.
    pub fn start(vfs: Arc<Vfs>, cfg: Config) -> std::io::Result<Replication> {
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                backend: ferry_backend::redact(&cfg.url),
                ..Status::default()
            }),
            stop: AtomicBool::new(false),
            backlog: AtomicU64::new(0),
            max_backlog: cfg.max_backlog,
            urgent: std::sync::atomic::AtomicUsize::new(0),
        });
        let cfg_url = cfg.url.clone();
        let thread = {
            let (vfs, shared) = (vfs.clone(), shared.clone());
            std::thread::Builder::new()
                .name("ferry-replicate".into())
                .spawn(move || Shipper::new(vfs, cfg.url, shared).run())?
        };
        vfs.attach_backend(Arc::new(Fetcher::new(cfg_url)), shared.clone());
        Ok(Replication {
            shared,
            notifier: Arc::default(),
            store_waker: vfs,
            thread: Some(thread),
        })
    }

    /// The state shared with the threads.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Gives down-sync the kernel's ear: each remote change it applies
    /// then invalidates what the kernel cached of it. Called once the FUSE
    /// session exists.
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.notifier.set(notifier);
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.store_waker.store().wake_log_waiters();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the replication thread panicked");
            }
        }
    }
}

/// Capped exponential backoff: 100 ms doubling to 10 s, reset on success.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(10);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        d
    }
}

/// Why a batch did not ship.
#[derive(Debug)]
enum ShipError {
    Backend(BackendError),
    Binding(crate::binding::BindingError),
    Store(rusqlite::Error),
    Io(std::io::Error),
}

impl std::fmt::Display for ShipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShipError::Backend(e) => e.fmt(f),
            ShipError::Binding(e) => e.fmt(f),
            ShipError::Store(e) => write!(f, "local store: {e}"),
            ShipError::Io(e) => write!(f, "reading a data file: {e}"),
        }
    }
}

impl From<BackendError> for ShipError {
    fn from(e: BackendError) -> Self {
        ShipError::Backend(e)
    }
}
impl From<crate::binding::BindingError> for ShipError {
    fn from(e: crate::binding::BindingError) -> Self {
        ShipError::Binding(e)
    }
}
impl From<rusqlite::Error> for ShipError {
    fn from(e: rusqlite::Error) -> Self {
        ShipError::Store(e)
    }
}
impl From<std::io::Error> for ShipError {
    fn from(e: std::io::Error) -> Self {
        ShipError::Io(e)
    }
}

/// A file's chunk list: BLAKE3 hashes and lengths, in order.
type ChunkList = Vec<([u8; 32], u32)>;

/// Fills the log positions and counts of `s` from the store.
fn count_pending(store: &Store, s: &mut Status) -> rusqlite::Result<()> {
    store.read(|r| {
        let shipped = r.meta_int("shipped_seq")?.unwrap_or(0) as u64;
        let (pending, oldest) = r.pending(shipped)?;
        let now = crate::store::now();
        s.shipped_seq = shipped;
        s.pending_ops = pending;
        s.oldest_pending_age_s = oldest.map(|t| (now - t).max(0) as f64 / 1e9);
        s.head_seq = r.log_head()?;
        s.conflicts = r.conflicts()?.len() as u64;
        Ok(())
    })
}

/// Chunks read while planning a batch, uploaded a group at a time.
#[derive(Default)]
struct Uploads {
    /// Chunks of the current group, with the bytes they were hashed from.
    group: Vec<(ChunkHash, Vec<u8>)>,
    /// Their total size, bounded by [`UPLOAD_GROUP`] (plus one chunk).
    bytes: usize,
    /// Every chunk of the batch so far: a chunk two files share is sent once.
    seen: std::collections::HashSet<[u8; 32]>,
}

/// One op of a batch and the local object it ships.
struct Planned {
    op: Op,
    key: Vec<u8>,
    /// For files: the chunk list to remember once applied.
    chunks: Option<(u64, ChunkList)>,
    /// The local file whose data file this batch read (so it may have had
    /// writers at the time: see [`Tx::mark_writing`]).
    read: Option<u64>,
    what: String,
}

/// Everything a batch ships, read from the store at one moment (under its
/// lock): the pending log up to its head, and the state of what it touched
/// as it is after that record. Read piecemeal instead, a name could be
/// looked up after a rename its inode was read before, and the batch would
/// ship a state that never existed (a name for an inode it does not ship, a
/// directory with two names), which the backend rightly refuses. Only file
/// contents are read later, and `begin_ship` covers those.
struct Snapshot {
    /// The last record it covers.
    last: u64,
    inodes: Vec<InodeSnap>,
    names: Vec<NameSnap>,
    /// Inodes gone here and still at the backend: (id, key, base).
    deleted: Vec<(ObjectId, Vec<u8>, u64)>,
}

/// A touched inode that still exists and is not held back by a conflict.
struct InodeSnap {
    inode: Inode,
    key: Vec<u8>,
    base: Option<u64>,
    /// Its bytes may have changed (a Create or Content record).
    rewritten: bool,
    target: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The chunk list the backend has (or a restore brought).
    known: ChunkList,
}

/// A touched name, not held back by a conflict.
struct NameSnap {
    parent: ObjectId,
    name: Vec<u8>,
    /// What it names now (`None`: nothing).
    child: Option<ObjectId>,
    key: Vec<u8>,
    base: Option<u64>,
}

impl Snapshot {
    /// Reads the log after `shipped` (at most [`BATCH`] records) and the
    /// state of everything it touched.
    fn take(r: &crate::store::Reader<'_>, shipped: u64) -> Result<Snapshot, ShipError> {
        let batch = read_batch(r, shipped)?;
        let mut inodes = BTreeSet::new();
        // Inodes whose bytes may have changed: only their data files are read.
        let mut rewritten = std::collections::HashSet::new();
        let mut names: BTreeSet<(u64, Vec<u8>)> = BTreeSet::new();
        let mut deleted: BTreeSet<ObjectId> = BTreeSet::new();
        for rec in &batch {
            let change = rec.change().ok_or_else(|| {
                ShipError::Store(rusqlite::Error::InvalidColumnType(
                    0,
                    format!("log record {}: {}", rec.seq, rec.op),
                    rusqlite::types::Type::Text,
                ))
            })?;
            match change {
                Change::Delete { .. } => {
                    deleted.insert(ObjectId {
                        host: rec.host,
                        counter: rec.counter,
                    });
                }
                Change::Content { ino } => {
                    inodes.insert(ino);
                    rewritten.insert(ino);
                }
                Change::SetAttr { ino } | Change::Xattr { ino } => {
                    inodes.insert(ino);
                }
                // Restored from the backend: already there.
                Change::Import { .. } => {}
                other => {
                    inodes.insert(other.ino());
                    if matches!(other, Change::Create { .. }) {
                        rewritten.insert(other.ino());
                    }
                    // The directories too: a changed entry changed their
                    // mtime and ctime, which must travel with it.
                    let (p, n, p2, n2) = other.places();
                    for (p, n) in [(p, n), (p2, n2)] {
                        if let (Some(p), Some(n)) = (p, n) {
                            names.insert((p, n.to_vec()));
                            inodes.insert(p);
                        }
                    }
                }
            }
        }
        let mut snap = Snapshot {
            last: batch.last().map_or(shipped, |rec| rec.seq),
            inodes: Vec::new(),
            names: Vec::new(),
            deleted: Vec::new(),
        };
        for ino in inodes {
            let Some(inode) = r.inode(ino)? else {
                // Gone, and its Delete record is in this batch.
                continue;
            };
            let key = inode_key(object_id(&inode));
            if r.in_conflict(&key)? {
                continue;
            }
            let mut xattrs = Vec::new();
            for name in r.xattr_names(ino)? {
                if let Some(v) = r.xattr(ino, &name)? {
                    xattrs.push((name, v));
                }
            }
            snap.inodes.push(InodeSnap {
                base: r.remote_version(&key)?,
                key,
                rewritten: rewritten.contains(&ino),
                target: r.symlink_target(ino)?,
                xattrs,
                known: if inode.kind() == Kind::File {
                    r.chunks(ino)?
                } else {
                    Vec::new()
                },
                inode,
            });
        }
        for (parent, name) in names {
            // A removed directory still names its entries at the backend
            // until they are deleted there; its log records know its id.
            let pid = match r.inode(parent)? {
                Some(dir) => object_id(&dir),
                None => match r.logged_identity(parent)? {
                    Some((host, counter)) => ObjectId { host, counter },
                    None => continue,
                },
            };
            let key = entry_key(pid, &name);
            if r.in_conflict(&key)? {
                continue;
            }
            snap.names.push(NameSnap {
                parent: pid,
                child: r.lookup(parent, &name)?.as_ref().map(object_id),
                base: r.remote_version(&key)?,
                key,
                name,
            });
        }
        for id in deleted {
            let key = inode_key(id);
            if let Some(base) = r.remote_version(&key)? {
                snap.deleted.push((id, key, base));
            }
        }
        Ok(snap)
    }
}

/// A local inode as the backend will store it.
struct Described {
    state: InodeState,
    /// For files: the chunk list.
    chunks: Option<(u64, ChunkList)>,
    /// The file, if its data file was read for this.
    read: Option<u64>,
}

struct Shipper {
    vfs: Arc<Vfs>,
    url: String,
    shared: Arc<Shared>,
    backend: Option<Box<dyn Backend>>,
    /// The last attempt failed: check that the backend answers before
    /// reading a whole batch of files again (an outage must not turn into
    /// a loop of re-reading the backlog, competing with writers for disk
    /// and CPU).
    probe: bool,
}

impl Shipper {
    fn new(vfs: Arc<Vfs>, url: String, shared: Arc<Shared>) -> Shipper {
        Shipper {
            vfs,
            url,
            shared,
            backend: None,
            probe: false,
        }
    }

    fn store(&self) -> &Store {
        self.vfs.store()
    }

    fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut generation = 0;
        while !self.shared.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.refresh_status() {
                warn!("replication status: {e}");
            }
            if !self.verified() {
                match self.verify() {
                    Ok(()) => {
                        backoff.reset();
                        self.contacted();
                    }
                    Err(e) => {
                        self.failed(&e);
                        self.pause(backoff.step());
                        continue;
                    }
                }
            }
            let shipped = self.shipped_seq();
            let batch = match self.store().read(|r| read_batch(r, shipped)) {
                Ok(b) => b,
                Err(e) => {
                    self.failed(&ShipError::Store(e));
                    self.pause(backoff.step());
                    continue;
                }
            };
            if batch.is_empty() {
                generation = self
                    .store()
                    .wait_for_log(generation, Duration::from_secs(1));
                // Let a burst finish (a file being written, a tree being
                // unpacked): it then ships as one batch, each file once.
                self.pause(SETTLE);
                continue;
            }
            if self.writers_busy(&batch) {
                self.pause(SETTLE);
                continue;
            }
            match self.ship() {
                Ok(()) => {
                    backoff.reset();
                    self.probe = false;
                    self.contacted();
                }
                Err(e) => {
                    self.failed(&e);
                    self.probe = true;
                    self.pause(backoff.step());
                }
            }
        }
    }

    fn verified(&self) -> bool {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verified
    }

    /// Checks, once per run and before anything ships, that the backend
    /// answers, is this store's volume, and holds nothing newer from this
    /// host than the store does (see [`crate::binding`]); then learns what
    /// a batch in flight when the last daemon died did at the backend.
    fn verify(&mut self) -> Result<(), ShipError> {
        let (vfs, url) = (self.vfs.clone(), self.url.clone());
        crate::binding::verify(vfs.store(), self.backend()?, &url)?;
        self.relearn()?;
        self.shared.update(|s| s.verified = true);
        Ok(())
    }

    /// The last daemon died with a batch in flight: the backend may have
    /// committed it while this store never recorded the new versions. For
    /// each of its keys whose backend state this host wrote last, the
    /// backend's version becomes the base again, so the batch, shipped
    /// again, goes on top of its own earlier self instead of colliding with
    /// it (a name created then would otherwise never be deleted, and a
    /// directory moved since would get a second name). A key another host
    /// changed keeps its old base: that is a real conflict.
    fn relearn(&mut self) -> Result<(), ShipError> {
        let keys = self.store().read(|r| r.inflight())?;
        if keys.is_empty() {
            return Ok(());
        }
        let host = self.store().host();
        let mut learned = Vec::with_capacity(keys.len());
        for (key, deleting) in keys {
            let version = match decode_key(&key) {
                Some(Key::Inode(id)) => match self.backend()?.inode(&id)? {
                    Some(t) if t.origin == host => Some(Some(t.version)),
                    // Gone: deleting it again is recognised as done.
                    None => Some(None),
                    Some(_) => None,
                },
                Some(Key::Entry(parent, name)) => {
                    let entries = self.backend()?.entries(&parent)?;
                    match entries.into_iter().find(|e| e.name == name) {
                        Some(e) if e.origin == host => Some(Some(e.version)),
                        // We were deleting it, and it is gone: as we meant.
                        None if deleting => Some(None),
                        _ => None,
                    }
                }
                None => None,
            };
            if let Some(version) = version {
                learned.push((key, version));
            }
        }
        info!(
            "replication: relearned {} backend versions of the batch in flight at the last stop",
            learned.len()
        );
        self.store().write(|tx| {
            for (key, version) in &learned {
                tx.set_remote_version(key, *version)?;
            }
            tx.set_inflight(std::iter::empty())
        })?;
        Ok(())
    }

    /// The backend just answered a call that mattered.
    fn contacted(&self) {
        self.shared.update(|s| {
            s.last_contact = Some(unix_secs(SystemTime::now()));
            s.last_error = None;
        });
    }

    fn failed(&mut self, e: &ShipError) {
        warn!("replication: {e}; retrying");
        if matches!(e, ShipError::Backend(b) if !b.is_transient()) {
            // A fresh connection may see a repaired or re-initialised backend.
            self.backend = None;
        }
        self.shared.update(|s| {
            s.last_error = Some(e.to_string());
            s.errors += 1;
        });
    }

    /// Sleeps, waking early when the replicator stops.
    fn pause(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while !self.shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20).min(d));
        }
    }

    fn shipped_seq(&self) -> u64 {
        self.store()
            .read(|r| r.meta_int("shipped_seq"))
            .ok()
            .flatten()
            .unwrap_or(0) as u64
    }

    /// Whether a file the batch would read is still open for writing and
    /// the batch's oldest record is younger than [`WRITER_GRACE`] (older
    /// than that, it ships anyway: a log written forever must not hold
    /// everything else back).
    fn writers_busy(&self, batch: &[LogRecord]) -> bool {
        let oldest = batch.first().map_or(0, |r| r.at);
        let age = Duration::from_nanos((crate::store::now() - oldest).max(0) as u64);
        self.shared.urgent.load(Ordering::SeqCst) == 0
            && age < WRITER_GRACE
            && batch.iter().any(|r| {
                matches!(
                    r.change(),
                    Some(Change::Create { .. } | Change::Content { .. })
                ) && self.vfs.has_writers(r.ino)
            })
    }

    /// Measures the backlog's bytes (a stat per pending file, so only here,
    /// once per batch) for backpressure and status: the bytes allocated,
    /// not the logical size, because holes cost nothing to ship.
    fn refresh_status(&self) -> Result<(), rusqlite::Error> {
        let shipped = self.shipped_seq();
        let content = self.store().read(|r| r.pending_content(shipped))?;
        let bytes: u64 = content
            .iter()
            .filter_map(|&ino| std::fs::metadata(self.store().data_path(ino)).ok())
            .map(|m| m.len().min(m.blocks() * 512))
            .sum();
        self.shared.backlog.store(bytes, Ordering::Relaxed);
        self.shared.update(|s| s.pending_bytes = bytes);
        Ok(())
    }

    fn backend(&mut self) -> Result<&dyn Backend, BackendError> {
        if self.backend.is_none() {
            self.backend = Some(ferry_backend::open(&self.url, CONNECT_TIMEOUT)?);
            info!(
                "replication: connected to {}",
                ferry_backend::redact(&self.url)
            );
        }
        Ok(self.backend.as_deref().expect("set above"))
    }

    /// Ships one batch: plan, upload chunks, commit, record the outcome.
    fn ship(&mut self) -> Result<(), ShipError> {
        if self.probe {
            self.backend()?.info()?;
        }
        let shipped = self.shipped_seq();
        let snap = self.store().read(|r| Snapshot::take(r, shipped))?;
        let last = snap.last;
        let mut uploads = Uploads::default();
        let plan = self.plan(snap, &mut uploads)?;
        // Every chunk the ops refer to is at the backend before they commit.
        self.upload(&mut uploads)?;
        let host = self.store().host();
        // If the daemon dies between the backend's commit and ours, these
        // are the keys whose versions it must learn again (`relearn`).
        self.store().write(|tx| {
            tx.set_inflight(plan.iter().map(|p| {
                let deleting = matches!(p.op, Op::DeleteInode { .. } | Op::DeleteEntry { .. });
                (&p.key[..], deleting)
            }))
        })?;
        let ops: Vec<Op> = plan.iter().map(|p| p.op.clone()).collect();
        let outcomes = self.commit(&ops)?;
        let mut settled = Vec::with_capacity(plan.len());
        for (p, outcome) in plan.into_iter().zip(outcomes) {
            let verdict = match outcome {
                Outcome::Applied { version } => Verdict::Applied(version),
                // The version matched, so the backend refused it for I3:
                // something it depends on was refused (see `retry`).
                Outcome::Conflict { current } if p.op.base() == current => Verdict::Refused,
                Outcome::Conflict { current } => self.judge(&p, current)?,
            };
            settled.push((p, verdict));
        }
        self.retry(&mut settled)?;
        // What the backend has from this host, for the check that a store
        // never goes back in time (the store's log already reaches `last`).
        // Before the local record, so a batch is recorded as shipped only
        // once every call of it succeeded; a failure ships it again, on top
        // of its own earlier self.
        self.backend()?.set_shipped(host, last)?;
        let vfs = &self.vfs;
        self.store().write(|tx| -> rusqlite::Result<()> {
            for (p, verdict) in &settled {
                record(tx, p, verdict)?;
                // Read while a writer had it open, and still open now: the
                // writes after the read are not logged until the last close,
                // so remember durably, in this commit, that they may exist.
                // (Under the store lock, so a close cannot slip in between.)
                if let Some(ino) = p.read.filter(|&ino| vfs.has_writers(ino)) {
                    tx.mark_writing(ino)?;
                }
            }
            tx.set_inflight(std::iter::empty())?;
            tx.set_meta_int("shipped_seq", last as i64)
        })?;
        Ok(())
    }

    /// Commits `ops` (none: nothing to ask) and checks the answer's shape.
    fn commit(&mut self, ops: &[Op]) -> Result<Vec<Outcome>, ShipError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let host = self.store().host();
        let outcomes = self.backend()?.commit(host, ops)?;
        if outcomes.len() != ops.len() {
            return Err(BackendError::Corrupt {
                what: format!("{} outcomes for {} ops", outcomes.len(), ops.len()),
            }
            .into());
        }
        Ok(outcomes)
    }

    /// One more commit for what the first could not apply but now may: the
    /// ops the judge rebased on the backend's version, and the ops refused
    /// only because one they depend on was (a name depends on its inode's
    /// put). The real conflicts go along unchanged, to be refused again, so
    /// the backend judges the dependents on them as it did the first time.
    /// Whatever is refused again is a conflict.
    fn retry(&mut self, settled: &mut [(Planned, Verdict)]) -> Result<(), ShipError> {
        let mut again = Vec::new();
        for (i, (p, verdict)) in settled.iter().enumerate() {
            match (&p.op, verdict) {
                (Op::PutInode { state, .. }, Verdict::Rebase(theirs))
                    if Kind::from_mode(state.mode) == Some(Kind::Dir) =>
                {
                    // Both hosts changed entries in it: it changed when the
                    // later of them did.
                    let mut state = state.clone();
                    state.mtime_ns = state.mtime_ns.max(theirs.mtime_ns);
                    state.ctime_ns = state.ctime_ns.max(theirs.ctime_ns);
                    let base = Some(theirs.version);
                    again.push((i, Op::PutInode { state, base }));
                }
                (op, Verdict::Rebase(theirs)) => again.push((i, op.with_base(theirs.version))),
                (op, Verdict::RebaseEntry(v)) => again.push((i, op.with_base(*v))),
                (op, Verdict::Refused | Verdict::Conflict(_)) => again.push((i, op.clone())),
                (_, Verdict::Applied(_) | Verdict::Gone) => {}
            }
        }
        let rebased = settled
            .iter()
            .any(|(_, v)| matches!(v, Verdict::Rebase(_) | Verdict::RebaseEntry(_)));
        let ops: Vec<Op> = again.iter().map(|(_, op)| op.clone()).collect();
        // Without a rebased op, the refused ones would be refused again.
        let outcomes = if rebased {
            self.commit(&ops)?
        } else {
            vec![Outcome::Conflict { current: None }; ops.len()]
        };
        for ((i, _), outcome) in again.into_iter().zip(outcomes) {
            let verdict = &mut settled[i].1;
            *verdict = match (outcome, &*verdict) {
                (Outcome::Applied { version }, _) => Verdict::Applied(version),
                (Outcome::Conflict { .. }, Verdict::Conflict(detail)) => {
                    Verdict::Conflict(detail.clone())
                }
                (Outcome::Conflict { .. }, _) => Verdict::Conflict(
                    "refused by the backend: with the rest of the batch it would leave \
                     a state no restore can load, or the backend moved on meanwhile"
                        .into(),
                ),
            };
        }
        Ok(())
    }

    /// Turns the pending log into backend ops on current state (module
    /// docs), from one [`Snapshot`] of the store.
    fn plan(&mut self, snap: Snapshot, uploads: &mut Uploads) -> Result<Vec<Planned>, ShipError> {
        let mut puts = Vec::new();
        let mut inode_deletes = Vec::new();
        for obj in snap.inodes {
            let id = object_id(&obj.inode);
            let what = format!("inode {id}");
            if obj.inode.nlink == 0 && obj.inode.ino != ROOT_INO {
                // Unlinked but still open here: no other host can reach it,
                // and a nameless inode at the backend is data no restore
                // can reach. It goes now; its later writes stay local.
                if let Some(base) = obj.base {
                    inode_deletes.push(Planned {
                        op: Op::DeleteInode { id, base },
                        key: obj.key,
                        chunks: None,
                        read: None,
                        what,
                    });
                }
                continue;
            }
            let base = obj.base;
            let key = obj.key.clone();
            let Described {
                state,
                chunks,
                read,
            } = self.inode_state(obj, uploads)?;
            puts.push(Planned {
                what,
                op: Op::PutInode { state, base },
                key,
                chunks,
                read,
            });
        }
        let (mut entry_deletes, mut entry_puts) = (Vec::new(), Vec::new());
        for n in snap.names {
            let what = format!("entry {}/{}", n.parent, String::from_utf8_lossy(&n.name));
            let (parent, name, key) = (n.parent, n.name, n.key);
            match (n.child, n.base) {
                (Some(child), base) => entry_puts.push(Planned {
                    op: Op::PutEntry {
                        parent,
                        name,
                        child,
                        base,
                    },
                    key,
                    chunks: None,
                    read: None,
                    what,
                }),
                (None, Some(base)) => entry_deletes.push(Planned {
                    op: Op::DeleteEntry { parent, name, base },
                    key,
                    chunks: None,
                    read: None,
                    what,
                }),
                (None, None) => {} // created and removed before it ever shipped
            }
        }
        for (id, key, base) in snap.deleted {
            inode_deletes.push(Planned {
                op: Op::DeleteInode { id, base },
                key,
                chunks: None,
                read: None,
                what: format!("inode {id}"),
            });
        }
        // Objects before the names that point at them; names before the
        // objects they stop pointing at.
        puts.extend(entry_deletes);
        puts.extend(entry_puts);
        puts.extend(inode_deletes);
        Ok(puts)
    }

    /// The backend state of a local inode; the chunks of a regular file go
    /// to `uploads`.
    ///
    /// A file's data file is read only when its bytes may have changed
    /// (`rewritten`) or the chunk list the backend has does not add up to
    /// its size; otherwise that list is shipped again as it is.
    fn inode_state(
        &mut self,
        obj: InodeSnap,
        uploads: &mut Uploads,
    ) -> Result<Described, ShipError> {
        let inode = &obj.inode;
        let attr = self
            .vfs
            .attr(inode)
            .map_err(|e| ShipError::Io(std::io::Error::from_raw_os_error(e.code())))?;
        let mut state = InodeState::new(object_id(inode), inode.mode);
        state.uid = inode.uid;
        state.gid = inode.gid;
        state.rdev = inode.rdev;
        state.size = attr.size;
        state.atime_ns = nanos_of(attr.atime);
        state.mtime_ns = nanos_of(attr.mtime);
        state.ctime_ns = nanos_of(attr.ctime);
        state.target = obj.target;
        state.xattrs = obj.xattrs;
        state.origin = self.store().host();
        let mut chunks = None;
        let mut read = None;
        if inode.kind() == Kind::File {
            // Not cached here means not changed here: the list we have is
            // the backend's.
            let known = obj.known;
            let adds_up = known.iter().map(|(_, len)| u64::from(*len)).sum::<u64>() == attr.size;
            let list = if inode.cached && (obj.rewritten || !adds_up) {
                read = Some(inode.ino);
                self.read_chunks(inode.ino, uploads)?
            } else {
                known
            };
            state.chunks = list.iter().map(|(h, len)| (ChunkHash(*h), *len)).collect();
            // The bytes read, not the size stat'ed before reading: a file
            // written in between must still add up.
            state.size = list.iter().map(|(_, len)| u64::from(*len)).sum();
            chunks = Some((inode.ino, list));
        }
        Ok(Described {
            state,
            chunks,
            read,
        })
    }

    /// Reads the data file chunk by chunk into `uploads`, which keeps each
    /// chunk's bytes from the same buffer it was hashed from, so every chunk
    /// is consistent even if the file is being written. (A file caught
    /// mid-write ships as it was; `begin_ship` guarantees the writes after
    /// that point are logged and shipped again.)
    ///
    /// Holes are found with SEEK_DATA/SEEK_HOLE and become [`HOLE`] entries
    /// without being read: a 1 TiB sparse file costs a few entries, not a
    /// terabyte of hashing.
    fn read_chunks(&mut self, ino: u64, uploads: &mut Uploads) -> Result<ChunkList, ShipError> {
        self.vfs.begin_ship(ino);
        let file = File::open(self.store().data_path(ino))?;
        let len = file.metadata()?.len();
        let mut list = Vec::new();
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut at = 0;
        // Bounded: every pass moves `at` forward or returns.
        while at < len {
            let (data, hole) = extent(&file, at, len)?;
            while at < data {
                let piece = (data - at).min(HOLE_PIECE);
                list.push((HOLE, piece as u32));
                at += piece;
            }
            while at < hole {
                let want = (hole - at).min(MAX_CHUNK as u64) as usize;
                let n = read_full_at(&file, &mut buf[..want], at)?;
                if n > 0 {
                    let hash = ChunkHash::of(&buf[..n]);
                    if uploads.seen.insert(hash.0) {
                        uploads.bytes += n;
                        uploads.group.push((hash, buf[..n].to_vec()));
                        if uploads.bytes >= UPLOAD_GROUP {
                            self.upload(uploads)?;
                        }
                    }
                    list.push((hash.0, n as u32));
                    at += n as u64;
                }
                if n < want {
                    return Ok(list); // truncated while we read
                }
            }
        }
        Ok(list)
    }

    /// Uploads the chunks of the current group that the backend lacks:
    /// two backend calls for the whole group.
    fn upload(&mut self, uploads: &mut Uploads) -> Result<(), ShipError> {
        if uploads.group.is_empty() {
            return Ok(());
        }
        let hashes: Vec<ChunkHash> = uploads.group.iter().map(|(h, _)| *h).collect();
        let missing: BTreeSet<[u8; 32]> = self
            .backend()?
            .missing_chunks(&hashes)?
            .into_iter()
            .map(|h| h.0)
            .collect();
        let send: Vec<(ChunkHash, &[u8])> = uploads
            .group
            .iter()
            .filter(|(h, _)| missing.contains(&h.0))
            .map(|(h, d)| (*h, &d[..]))
            .collect();
        if !send.is_empty() {
            self.backend()?.put_chunks(&send)?;
        }
        let bytes = send.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        let count = send.len() as u64;
        self.shared.update(|s| {
            s.chunks_uploaded += count;
            s.bytes_uploaded += bytes;
        });
        uploads.group.clear();
        uploads.bytes = 0;
        Ok(())
    }

    /// Decides what a conflict is: our own write whose acknowledgement a
    /// crash lost (adopt the backend's version), or a real conflict.
    fn judge(&mut self, p: &Planned, current: Option<u64>) -> Result<Verdict, ShipError> {
        let host = self.store().host();
        Ok(match (&p.op, current) {
            // Deleting what is already gone: done.
            (Op::DeleteInode { .. } | Op::DeleteEntry { .. }, None) => Verdict::Gone,
            (Op::DeleteInode { id, .. }, Some(current)) => {
                match self.backend()?.inode(id)? {
                    // Our own put, whose acknowledgement a crash lost, then
                    // deleted here: the delete goes on top of it.
                    Some(t) if t.origin == host => Verdict::Rebase(t),
                    _ => Verdict::Conflict(format!(
                        "backend has version {current}, this host deleted another"
                    )),
                }
            }
            (Op::PutInode { state, .. }, Some(current)) => {
                let theirs = self.backend()?.inode(&state.id)?;
                match theirs {
                    // Our own earlier write, whose acknowledgement a crash
                    // lost: ours is newer, so it goes on top. (Merely
                    // adopting the version would leave the newer local
                    // state unshipped.) A directory's attributes are
                    // merged: every host's entries in it are its content,
                    // and the root, made by `ferry init`, is everyone's.
                    Some(t)
                        if t.origin == host
                            || (Kind::from_mode(t.mode) == Some(Kind::Dir)
                                && Kind::from_mode(state.mode) == Some(Kind::Dir)) =>
                    {
                        Verdict::Rebase(t)
                    }
                    _ => Verdict::Conflict(format!(
                        "backend has version {current}, this host based its change on another"
                    )),
                }
            }
            (
                Op::PutEntry { parent, name, .. } | Op::DeleteEntry { parent, name, .. },
                Some(current),
            ) => {
                let theirs = self
                    .backend()?
                    .entries(parent)?
                    .into_iter()
                    .find(|e| &e.name == name);
                match (&p.op, theirs) {
                    (Op::PutEntry { child, .. }, Some(e)) if e.child == *child => {
                        Verdict::Applied(current)
                    }
                    // Our own earlier write, as for inodes above.
                    (_, Some(e)) if e.origin == host => Verdict::RebaseEntry(current),
                    _ => Verdict::Conflict(format!(
                        "another host changed the name at the backend (version {current})"
                    )),
                }
            }
            (_, current) => Verdict::Conflict(format!(
                "backend version {current:?} does not match this host's base"
            )),
        })
    }
}

/// What became of one planned op.
enum Verdict {
    /// Committed at this version.
    Applied(u64),
    /// Ship again on top of the backend's current state (see `judge`).
    Rebase(InodeState),
    /// The same for a name, on top of this version.
    RebaseEntry(u64),
    /// Refused by the backend for I3 although its base matched: something
    /// it depends on was refused; `retry` decides.
    Refused,
    /// The object is gone from the backend, as we wanted.
    Gone,
    /// A real conflict, kept with this detail.
    Conflict(String),
}

fn record(tx: &Tx<'_>, p: &Planned, verdict: &Verdict) -> rusqlite::Result<()> {
    match verdict {
        Verdict::Applied(v) => {
            let gone = matches!(p.op, Op::DeleteInode { .. } | Op::DeleteEntry { .. });
            tx.set_remote_version(&p.key, (!gone).then_some(*v))?;
            if let Some((ino, list)) = &p.chunks {
                tx.set_chunks(*ino, list)?;
            }
            Ok(())
        }
        Verdict::Rebase(_) | Verdict::RebaseEntry(_) | Verdict::Refused => {
            unreachable!("retry settles every Rebase and Refused verdict")
        }
        Verdict::Gone => tx.set_remote_version(&p.key, None),
        Verdict::Conflict(detail) => {
            warn!("conflict on {}: {detail}; kept, not overwritten", p.what);
            tx.add_conflict(&p.key, &p.what, detail)
        }
    }
}

/// The next extent of `file` at or after `at`, within `len`: where its
/// data starts (`len` if only a hole is left) and where that data ends.
/// A file system without SEEK_DATA reports the rest as data.
fn extent(file: &File, at: u64, len: u64) -> std::io::Result<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let seek = |whence| lseek(file, at as i64, whence).map(|o| (o as u64).min(len));
    let data = match seek(Whence::SeekData) {
        Ok(data) => data,
        Err(nix::errno::Errno::ENXIO) => return Ok((len, len)),
        Err(nix::errno::Errno::EINVAL) => return Ok((at, len)),
        Err(e) => return Err(e.into()),
    };
    let hole = match lseek(file, data as i64, Whence::SeekHole) {
        Ok(hole) => (hole as u64).min(len),
        Err(nix::errno::Errno::ENXIO) => len,
        Err(e) => return Err(e.into()),
    };
    Ok((data, hole.max(data)))
}

/// The next batch of the log after `shipped`: [`BATCH`] records, extended
/// to the end of the transaction the last one belongs to (its records share
/// their time). A batch that ended inside one — between the unlink of a
/// rename's target and the rename — would ship a state that never existed.
fn read_batch(r: &crate::store::Reader<'_>, shipped: u64) -> rusqlite::Result<Vec<LogRecord>> {
    let mut batch = r.log_after(shipped, BATCH)?;
    if let Some(last) = batch.last().filter(|_| batch.len() == BATCH) {
        let (seq, at) = (last.seq, last.at);
        let rest = r.log_after(seq, BATCH)?;
        batch.extend(rest.into_iter().take_while(|rec| rec.at == at));
    }
    Ok(batch)
}

/// Reads at `offset` until `buf` is full or the file ends.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Fills an empty store from the backend: the whole namespace at once,
/// file contents left at the backend until first read. Returns the number
/// of inodes restored.
pub fn restore(store: &Store, backend: &dyn Backend) -> Result<u64, RestoreError> {
    let (_seq, inodes, entries) = backend.snapshot()?;
    store.write(|tx| -> Result<u64, RestoreError> {
        let mut count = 0;
        for state in &inodes {
            let kind = Kind::from_mode(state.mode).ok_or_else(|| {
                RestoreError::Backend(BackendError::Corrupt {
                    what: format!("inode {} has mode {:o}", state.id, state.mode),
                })
            })?;
            let inode = Inode {
                ino: 0,
                host: state.id.host,
                counter: state.id.counter,
                mode: state.mode,
                uid: state.uid,
                gid: state.gid,
                nlink: 0,
                size: state.size,
                atime: state.atime_ns,
                mtime: state.mtime_ns,
                ctime: state.ctime_ns,
                crtime: state.ctime_ns,
                rdev: state.rdev,
                version: 1,
                cached: kind != Kind::File,
            };
            // The root is {host 0, counter 1} on every host, so it maps onto
            // the local root like any other identity.
            let ino = tx.import_inode(&inode, state.target.as_deref())?;
            tx.import_xattrs(ino, &state.xattrs)?;
            if kind == Kind::File {
                let list: ChunkList = state.chunks.iter().map(|(h, len)| (h.0, *len)).collect();
                tx.set_chunks(ino, &list)?;
            }
            tx.set_remote_version(&inode_key(state.id), Some(state.version))?;
            count += 1;
        }
        for e in &entries {
            let (Some(parent), Some(child)) = (local_ino(tx, e.parent)?, local_ino(tx, e.child)?)
            else {
                return Err(RestoreError::Backend(BackendError::Corrupt {
                    what: format!("entry {}/{:?} names a missing inode", e.parent, e.name),
                }));
            };
            tx.import_entry(parent, &e.name, child)?;
            tx.set_remote_version(&entry_key(e.parent, &e.name), Some(e.version))?;
        }
        tx.recount_links()?;
        // Everything logged by the restore is the backend's own state.
        let head = tx.log_head()?;
        tx.set_meta_int("shipped_seq", head as i64)?;
        Ok(count)
    })
}

fn local_ino(tx: &Tx<'_>, id: ObjectId) -> rusqlite::Result<Option<u64>> {
    tx.ino_of(id.host, id.counter)
}

/// Why a restore failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RestoreError {
    /// The backend failed or sent garbage.
    Backend(BackendError),
    /// The local store failed.
    Store(rusqlite::Error),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::Backend(e) => write!(f, "restoring from the backend: {e}"),
            RestoreError::Store(e) => write!(f, "restoring into the local store: {e}"),
        }
    }
}

impl std::error::Error for RestoreError {}

impl From<BackendError> for RestoreError {
    fn from(e: BackendError) -> Self {
        RestoreError::Backend(e)
    }
}
impl From<rusqlite::Error> for RestoreError {
    fn from(e: rusqlite::Error) -> Self {
        RestoreError::Store(e)
    }
}

/// Fetches the contents of uncached files from the backend, on first open.
pub struct Fetcher {
    url: String,
    backend: Mutex<Option<Box<dyn Backend>>>,
}

impl Fetcher {
    /// A fetcher for the backend at `url` (connected on first use).
    pub fn new(url: String) -> Fetcher {
        Fetcher {
            url,
            backend: Mutex::new(None),
        }
    }
}

impl crate::vfs::ContentSource for Fetcher {
    /// Writes the chunks, verified by the backend against their hashes, to
    /// a temporary file that is fsync'd and renamed over `dest`: a failed
    /// or interrupted fetch never leaves a partial file behind. [`HOLE`]
    /// entries are skipped, so holes arrive as holes.
    fn fetch(&self, chunks: &[([u8; 32], u32)], dest: &Path) -> Result<(), String> {
        let mut guard = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard =
                Some(ferry_backend::open(&self.url, CONNECT_TIMEOUT).map_err(|e| e.to_string())?);
        }
        let backend = guard.as_deref().expect("set above");
        let tmp = dest.with_extension("fetch");
        let result = (|| -> Result<(), String> {
            let out = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| e.to_string())?;
            let mut at = 0;
            for (hash, len) in chunks {
                if *hash != HOLE {
                    let hash = ChunkHash(*hash);
                    let data = backend.get_chunk(&hash).map_err(|e| e.to_string())?;
                    if data.len() != *len as usize {
                        return Err(format!(
                            "chunk {} has {} bytes, expected {len}",
                            hash.to_hex(),
                            data.len()
                        ));
                    }
                    out.write_all_at(&data, at).map_err(|e| e.to_string())?;
                }
                at += u64::from(*len);
            }
            out.set_len(at).map_err(|e| e.to_string())?;
            out.sync_all().map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, dest).map_err(|e| e.to_string())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            // The connection may be what failed; reconnect next time.
            *guard = None;
        }
        result
    }
}
