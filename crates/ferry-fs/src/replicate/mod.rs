//! Replication: background threads keep a mount and its volume's backend in
//! step, in four directions, each a module of its own over one shared
//! backend handle ([`Link`]):
//!
//! - [`ship`]: the change log goes up (log → backend);
//! - [`apply`]: other hosts' changes come down (feed → store → kernel
//!   notifications), and conflicts are resolved;
//! - [`restore`]: a new host loads the namespace (snapshot → empty store);
//! - [`fetch`]: file contents arrive on first open, a directory at a time,
//!   and in the background as the prefetch policy says.
//!
//! None of them reaches into the vfs beyond the small surface it offers the
//! replicator (open writers, the content source).
//!
//! # Shipping
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
//!   open for writing is remembered durably
//!   ([`crate::store::Tx::mark_writing`], in the commit that records the
//!   shipment) until its last writer closes and it is logged again; a
//!   daemon killed in between logs it again at start.
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

mod apply;
mod fetch;
mod resolve;
mod restore;
mod ship;
mod status;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_backend::{Backend, BackendError, ChunkHash, Location, ObjectId};
use tracing::{info, warn};

use crate::fuse::NotifierSlot;
use crate::ids::Seq;
use crate::log::Outbox;
use crate::store::{Inode, Store};
use crate::vfs::Vfs;

use fetch::Fetcher;
use ship::Shipper;
use status::count_pending;

pub use restore::{restore, RestoreError};
pub use status::{PrefetchProgress, Resolution, Status};

/// How long a backend call may take to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The chunk-list entry of a hole ([`ChunkHash::HOLE`]): with a length it
/// stands for that many zero bytes stored nowhere. It is never uploaded,
/// and a fetch leaves a hole for it.
pub const HOLE: ChunkHash = ChunkHash::HOLE;
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

/// What a backend key names; the inverse of [`inode_key`], [`entry_key`]
/// and [`listing_key`].
enum Key {
    Inode(ObjectId),
    Entry(ObjectId, Vec<u8>),
    /// Every entry of a directory (only ever a recheck: see `apply`).
    Listing(ObjectId),
}

fn decode_key(key: &[u8]) -> Option<Key> {
    let (&kind, rest) = key.split_first()?;
    let host = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let counter = u64::from_be_bytes(rest.get(4..12)?.try_into().ok()?);
    let id = ObjectId { host, counter };
    match kind {
        b'i' if rest.len() == 12 => Some(Key::Inode(id)),
        b'l' if rest.len() == 12 => Some(Key::Listing(id)),
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

/// The key down-sync uses to fetch a whole directory: `l` + its id.
fn listing_key(dir: ObjectId) -> Vec<u8> {
    let mut k = inode_key(dir);
    k[0] = b'l';
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
    /// Where the volume lives (`dir:PATH` or `postgres://…`).
    pub location: Location,
    /// Backlog (bytes of pending contents) above which writers slow down.
    pub max_backlog: u64,
    /// What to fetch in the background.
    pub prefetch: Prefetch,
    /// Largest file `Prefetch::Small` fetches, in bytes.
    pub prefetch_max_file: u64,
}

/// State shared between the replication threads, the vfs and the control
/// socket.
pub struct Shared {
    status: Mutex<Status>,
    stop: AtomicBool,
    /// Shipping and down-sync take turns at recording backend versions:
    /// the shipper from its commit until it has recorded the outcome (and
    /// resolved its conflicts), down-sync for a whole round. So down-sync
    /// never applies a state older than what the shipper just recorded,
    /// and the shipper never records over a pull.
    exchange: Mutex<()>,
    /// Pending content bytes, read by writers on every first write.
    backlog: AtomicU64,
    max_backlog: u64,
    /// How many `ferry sync`s are waiting: while any is, files still open
    /// for writing ship at once instead of after the writers' grace.
    urgent: AtomicUsize,
    /// Signalled (with `status`) whenever shipping or down-sync moves on,
    /// for the callers that wait on them: a `durability=remote` fsync, a
    /// `reads=fresh` open.
    progress: Condvar,
    /// Down-sync rounds, numbered, so a fresh open can wait for one that
    /// began after it asked; signalled as each ends.
    rounds: Mutex<Rounds>,
    round_ended: Condvar,
    /// The down-sync thread's work, for rounds run on demand.
    applier: OnceLock<Weak<apply::Applier>>,
    /// Background down-sync stopped by the operator (`ferry` control
    /// request `pause-down-sync`); rounds on demand still run.
    down_paused: AtomicBool,
}

/// The numbering of down-sync rounds (see [`Shared::fresh`]). One runs at a
/// time, whoever runs it.
#[derive(Default)]
struct Rounds {
    /// Rounds begun, and whether one is running now.
    started: u64,
    running: bool,
    /// Rounds ended, and the last one of them that succeeded.
    done: u64,
    ok: u64,
    /// The highest round a waiting caller needs.
    wanted: u64,
    /// Why the last failed round failed.
    error: Option<String>,
}

/// Why a `reads=fresh` open could not see the backend's newest state.
#[derive(Debug)]
pub enum FreshError {
    /// The backend did not answer within the caller's timeout.
    TimedOut,
    /// The round failed (the backend is unreachable, …).
    Failed(String),
}

impl std::fmt::Display for FreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FreshError::TimedOut => f.write_str("the backend did not answer in time"),
            FreshError::Failed(e) => f.write_str(e),
        }
    }
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
        // Under the lock a settling shipper checks `urgent` with, so it
        // either saw the count or is waiting and gets the signal.
        drop(self.status.lock().unwrap_or_else(|p| p.into_inner()));
        self.progress.notify_all();
        Urgent(self)
    }

    /// Waits `d` for a burst of writes to end, so it ships as one batch;
    /// at once if someone waits for the backend (a sync, a
    /// `durability=remote` fsync or close) or replication stops.
    fn settle(&self, d: Duration) {
        self.sleep(d, || self.urgent.load(Ordering::SeqCst) > 0);
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
        self.progress.notify_all();
    }

    /// Blocks until everything this host logged up to `target` is
    /// committed at the backend (as `ferry sync` means it: the backend was
    /// checked to be this volume, and no conflict is mid-resolution), or
    /// until `deadline`; returns whether it got there. Used by `fsync` and
    /// `close` under `durability=remote`: the shipper ships in log order,
    /// so waiting for the log position covers the file's data and metadata
    /// (and whatever was logged before them).
    pub fn wait_committed(&self, store: &Store, target: Seq, deadline: Instant) -> bool {
        let _urgent = self.urgent();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let shipped = store.read(|r| Outbox::cursor(r)).unwrap_or(Seq(0));
            if status.verified && shipped >= target && !status.resolving {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.stop.load(Ordering::SeqCst) {
                return false;
            }
            // The shipper signals each batch; the cap only bounds a missed
            // signal's cost.
            let wait = (deadline - now).min(Duration::from_millis(100));
            status = self
                .progress
                .wait_timeout(status, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Brings this store up to the backend's newest committed state before
    /// `deadline`: a down-sync round that begins after this call, run now
    /// (even while background down-sync is paused), waited for. Used by
    /// `open` under `reads=fresh`. On error the caller uses what it has.
    pub fn fresh(&self, deadline: Instant) -> Result<(), FreshError> {
        let applier = self
            .applier
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| FreshError::Failed("replication is stopping".into()))?;
        if !self.verified() {
            return Err(FreshError::Failed(
                "the backend has not been checked yet (unreachable?)".into(),
            ));
        }
        let mut rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        let want = rounds.started + 1;
        if rounds.wanted < want {
            // Nobody has asked for that round yet: run it on a thread of its
            // own, so this caller can give up at its deadline while the
            // round finishes for the next one.
            rounds.wanted = want;
            let spawned = std::thread::Builder::new()
                .name("ferry-fresh".into())
                .spawn(move || applier.round_on_demand());
            if let Err(e) = spawned {
                rounds.wanted = want - 1;
                return Err(FreshError::Failed(format!(
                    "starting a down-sync round: {e}"
                )));
            }
        }
        loop {
            if rounds.ok >= want {
                return Ok(());
            }
            if rounds.done >= want {
                let error = rounds.error.clone().unwrap_or_default();
                return Err(FreshError::Failed(error));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FreshError::TimedOut);
            }
            rounds = self
                .round_ended
                .wait_timeout(rounds, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops (or restarts) background down-sync; see [`Shared::down_paused`].
    /// A pause returns once no background round is running: the ones that
    /// begin later see the flag and skip.
    pub fn pause_down_sync(&self, paused: bool) {
        self.down_paused.store(paused, Ordering::SeqCst);
        let mut rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        while paused && rounds.running {
            rounds = self
                .round_ended
                .wait(rounds)
                .unwrap_or_else(|p| p.into_inner());
        }
        info!(paused, "background down-sync");
    }

    /// Runs `round` as the next numbered down-sync round, after any that
    /// is running, and lets waiting callers know how it went.
    fn numbered_round<T>(
        &self,
        round: impl FnOnce() -> Result<T, ReplError>,
    ) -> Result<T, ReplError> {
        let mut rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        while rounds.running {
            rounds = self
                .round_ended
                .wait(rounds)
                .unwrap_or_else(|p| p.into_inner());
        }
        rounds.running = true;
        rounds.started += 1;
        let number = rounds.started;
        drop(rounds);
        let result = round();
        let mut rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        rounds.running = false;
        rounds.done = number;
        match &result {
            Ok(_) => rounds.ok = number,
            Err(e) => rounds.error = Some(e.to_string()),
        }
        drop(rounds);
        self.round_ended.notify_all();
        result
    }

    /// Whether this run has checked that the backend is this store's
    /// volume; nothing is shipped or pulled before.
    fn verified(&self) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verified
    }

    /// Sleeps for `d`, waking early when replication stops.
    fn pause(&self, d: Duration) {
        self.sleep(d, || false);
    }

    /// Sleeps for `d`, waking early when replication stops or `wake` says
    /// so; both are signalled on `progress` (under the status lock, so no
    /// signal is missed between a check and the wait).
    fn sleep(&self, d: Duration, wake: impl Fn() -> bool) {
        let deadline = Instant::now() + d;
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            if wake() || self.stop.load(Ordering::SeqCst) || now >= deadline {
                return;
            }
            status = self
                .progress
                .wait_timeout(status, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The turn at recording backend versions (see [`Shared::exchange`]).
    fn exchange(&self) -> std::sync::MutexGuard<'_, ()> {
        self.exchange.lock().unwrap_or_else(|p| p.into_inner())
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
    fetcher: Arc<Fetcher>,
    store_waker: Arc<Vfs>,
    threads: Vec<JoinHandle<()>>,
}

impl Replication {
    /// Starts replicating `vfs` with the backend at `cfg.location`, and makes
    /// the vfs fetch contents from it. The backend need not be reachable:
    /// the threads keep trying. Each remote change applied invalidates what
    /// the kernel cached of it through `notifier`, once the mount has set it.
    pub fn start(
        vfs: Arc<Vfs>,
        cfg: Config,
        notifier: NotifierSlot,
    ) -> std::io::Result<Replication> {
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                backend: ferry_backend::redact(&cfg.location.url()),
                ..Status::default()
            }),
            stop: AtomicBool::new(false),
            exchange: Mutex::new(()),
            backlog: AtomicU64::new(0),
            max_backlog: cfg.max_backlog,
            urgent: AtomicUsize::new(0),
            progress: Condvar::new(),
            rounds: Mutex::default(),
            round_ended: Condvar::new(),
            applier: OnceLock::new(),
            down_paused: AtomicBool::new(false),
        });
        let link = Arc::new(Link::new(cfg.location));
        let fetcher = Arc::new(Fetcher::new(
            link.clone(),
            shared.clone(),
            cfg.prefetch,
            cfg.prefetch_max_file,
        ));
        let mut replication = Replication {
            shared: shared.clone(),
            fetcher: fetcher.clone(),
            store_waker: vfs.clone(),
            threads: Vec::new(),
        };
        let shipper = Shipper::new(
            vfs.clone(),
            link.clone(),
            shared.clone(),
            notifier.clone(),
            fetcher.clone(),
        );
        replication.threads.push(
            std::thread::Builder::new()
                .name("ferry-ship".into())
                .spawn(move || shipper.run())?,
        );
        let applier = Arc::new(apply::Applier {
            vfs: vfs.clone(),
            link,
            shared: shared.clone(),
            notifier,
            fetcher: fetcher.clone(),
        });
        let _ = shared.applier.set(Arc::downgrade(&applier));
        replication.threads.push(
            std::thread::Builder::new()
                .name("ferry-apply".into())
                .spawn(move || applier.run())?,
        );
        replication.threads.extend(fetcher.start(&vfs)?);
        vfs.attach_backend(fetcher, shared);
        Ok(replication)
    }

    /// The state shared with the threads.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Under the status lock, as `Shared::sleep` checks `stop` under it.
        drop(self.shared.status.lock().unwrap_or_else(|p| p.into_inner()));
        self.shared.progress.notify_all();
        self.store_waker.store().wake_log_waiters();
        self.fetcher.wake_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a replication thread panicked");
            }
        }
    }
}

/// The backend connection a mount's replication threads share: opened on
/// first use, and dropped after a failure a new connection may cure (the
/// next caller opens another). Backends are safe to call from many threads
/// at once, so the threads never wait on each other here.
pub(crate) struct Link {
    location: Location,
    backend: Mutex<Option<Arc<dyn Backend>>>,
}

impl Link {
    pub(crate) fn new(location: Location) -> Link {
        Link {
            location,
            backend: Mutex::new(None),
        }
    }

    /// The backend location as given (its URL may hold a password: show it
    /// through [`ferry_backend::redact`]).
    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    /// The shared connection, opened now if there is none.
    pub(crate) fn get(&self) -> Result<Arc<dyn Backend>, BackendError> {
        let mut slot = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = &*slot {
            return Ok(b.clone());
        }
        let b: Arc<dyn Backend> = Arc::from(self.location.open(CONNECT_TIMEOUT)?);
        info!(
            "replication: connected to {}",
            ferry_backend::redact(&self.location.url())
        );
        *slot = Some(b.clone());
        Ok(b)
    }

    /// Drops the connection after a failure (see [`Link`]).
    pub(crate) fn reset(&self) {
        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Why a replication step (a batch, a down-sync round, a resolution) did
/// not complete; it is tried again.
#[derive(Debug)]
pub(super) enum ReplError {
    Backend(BackendError),
    Binding(crate::binding::BindingError),
    Store(rusqlite::Error),
    Io(std::io::Error),
}

impl std::fmt::Display for ReplError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplError::Backend(e) => e.fmt(f),
            ReplError::Binding(e) => e.fmt(f),
            ReplError::Store(e) => write!(f, "local store: {e}"),
            ReplError::Io(e) => write!(f, "reading a data file: {e}"),
        }
    }
}

impl From<BackendError> for ReplError {
    fn from(e: BackendError) -> Self {
        ReplError::Backend(e)
    }
}
impl From<crate::binding::BindingError> for ReplError {
    fn from(e: crate::binding::BindingError) -> Self {
        ReplError::Binding(e)
    }
}
impl From<rusqlite::Error> for ReplError {
    fn from(e: rusqlite::Error) -> Self {
        ReplError::Store(e)
    }
}
impl From<std::io::Error> for ReplError {
    fn from(e: std::io::Error) -> Self {
        ReplError::Io(e)
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

/// A file's chunk list: BLAKE3 hashes and lengths, in order.
type ChunkList = Vec<(ChunkHash, u32)>;
