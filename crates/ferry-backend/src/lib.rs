//! Shared storage backends for ferry-fs replication.
//!
//! Every host keeps its own local store; its replicator pushes changes to a
//! *backend* shared by all hosts of a volume, and pulls the other hosts'
//! changes from the backend's change feed. This crate is that backend side:
//!
//! - [`Backend`] — the trait the replicator talks to. It stores
//!   content-addressed chunks ([`ChunkHash`], at most [`MAX_CHUNK`] bytes)
//!   and versioned metadata: inodes ([`InodeState`], keyed by a global
//!   [`ObjectId`]) and directory entries ([`Entry`]).
//! - Metadata changes arrive as a batch of [`Op`]s through
//!   [`Backend::commit`]. Each op names the version it was based on; the
//!   backend applies it only if that still is the current version, and
//!   reports an [`Outcome`] per op. Conflicts are the replicator's to
//!   resolve — nothing is lost here. Ops that would leave a state no
//!   restore can load are conflicts too (see "Invariant I3" below).
//! - Each applied op appends a [`FeedItem`] to the change feed; the items
//!   of one commit are adjacent. Other hosts follow it: [`Backend::wait_feed`]
//!   blocks until there is something new (LISTEN/NOTIFY on PostgreSQL, an
//!   inotify signal file on `dir:`, a poll as the fallback), and
//!   [`Backend::changes`] returns the next whole commits *together with the
//!   current state of everything they name*, read in one consistent read
//!   (one round trip), so applying them never needs a second query.
//!   [`Backend::feed`] lists bare items.
//! - A new host starts from [`Backend::snapshot_each`]: the whole namespace
//!   streamed in one consistent read in bounded memory, plus the feed seq to
//!   follow on from.
//! - Contents are fetched with [`Backend::get_chunks`]: many chunks in one
//!   round trip, each verified against its hash.
//! - A [`Location`] is a parsed backend URL: `dir:/ABSOLUTE/PATH` (embedded
//!   SQLite + chunk files, no server) or `postgres://…` (shared server).
//!   [`Location::open`] opens the volume there and [`Location::init`]
//!   creates it (what `ferry init` runs); [`open`] and [`init`] do the same
//!   from a string.
//! - Per-host marks ([`Backend::host_mark`], [`Backend::set_shipped`]) let
//!   a host notice that its local store went back in time (restored from a
//!   backup, say): the backend holds ids of the host beyond the store's
//!   counter, or the host shipped log seqs beyond the store's log.
//! - [`check`] lists what breaks I3 in a backend's state (what
//!   `ferry fsck --backend URL` prints).
//!
//! Versions never repeat for a key: deleting keeps a tombstone, so a stale
//! base from before a delete can never match a re-created inode or entry.
//!
//! # Invariant I3: the backend stays whole
//!
//! Version checks alone let two hosts together commit a state no restore
//! can load: host A creates `dir/f` while host B removes `dir`; A and B
//! rename one directory to two names; A deletes a file B just edited. So
//! [`Backend::commit`] also refuses every op that would leave the committed
//! state broken, as [`Outcome::Conflict`] with the key's live version, and
//! applies nothing of it. The rules are checked on the state at the *end*
//! of the commit (a rename is a DeleteEntry then a PutEntry; in between
//! the directory legitimately has no name). After a commit:
//!
//! 1. Every entry a PutEntry of the commit wrote has a live directory as
//!    parent, a live inode as child, and a name a file system can hold
//!    (not empty, `.` or `..`, no `/` or NUL). Blame: that PutEntry.
//! 2. A directory that a PutEntry of the commit names has exactly one live
//!    name, and walking up through its parents' single names reaches
//!    [`ObjectId::ROOT`] (no cycle: "A moves x into y while B moves y into
//!    x"). The root itself has no name. Blame: that PutEntry.
//! 3. A PutEntry whose child has a PutInode in the same commit that was
//!    refused (by its version or by these rules) is refused too: a name
//!    depends on the state of the inode it names. This is what turns the
//!    losing side of a concurrent rename into a conflict.
//! 4. An inode deleted by the commit is named by no live entry and is the
//!    parent of none; the root is never deleted. Blame: that DeleteInode.
//! 5. An inode that lost a name in the commit (a DeleteEntry, or a
//!    PutEntry that points the name elsewhere) and is still live keeps at
//!    least one name: removing a last name is allowed only together with
//!    deleting the inode. Blame: that entry op.
//! 6. An inode created by the commit (PutInode with base `None`) that is
//!    still live has at least one name: a create whose name was refused is
//!    refused as a whole. Blame: that PutInode.
//! 7. A PutInode has a mode of a known file type and keeps the file type
//!    of the live inode it replaces. Blame: that PutInode.
//!
//! Refusing an op can break a rule elsewhere (a refused name leaves its new
//! inode unnamed), so the backend applies, checks, and re-applies without
//! the blamed ops until nothing breaks; see the `integrity` module.
//!
//! Calls are synchronous and meant for plain threads (the postgres backend
//! runs its own tokio runtime; from async code use `spawn_blocking`).
//! Errors are [`BackendError`]s; [`BackendError::is_transient`] tells the
//! replicator to back off and retry. No error or `Debug` output contains a
//! password ([`redact`]).
//!
//! The `testing` feature adds `testing::PgServer`, a throwaway
//! PostgreSQL cluster for integration tests (also for ferry-fs).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use ferry_backend::{ChunkHash, Location, ObjectId, Op, Outcome, InodeState};
//!
//! let dir = tempfile::tempdir()?;
//! let location: Location = format!("dir:{}", dir.path().display()).parse()?;
//! location.init("demo")?;
//! let backend = location.open(Duration::from_secs(5))?;
//!
//! // Upload the content first, then commit metadata that refers to it.
//! let data = b"hello, ferry";
//! let hash = ChunkHash::of(data);
//! backend.put_chunk(&hash, data)?;
//!
//! let id = ObjectId { host: 7, counter: 2 };
//! let mut file = InodeState::new(id, 0o100644);
//! file.size = data.len() as u64;
//! file.chunks = vec![(hash, data.len() as u32)];
//! let ops = [
//!     Op::PutInode { state: file, base: None },
//!     Op::PutEntry { parent: ObjectId::ROOT, name: b"hello.txt".to_vec(), child: id, base: None },
//! ];
//! let outcomes = backend.commit(7, &ops)?;
//! assert_eq!(outcomes, vec![Outcome::Applied { version: 1 }, Outcome::Applied { version: 1 }]);
//!
//! // Another host follows the feed: whole commits, with the current state
//! // of what they name, in one read; then the contents it needs.
//! let changes = backend.changes(0, 100)?;
//! assert!(!changes.more);
//! assert_eq!(changes.inodes.len(), 2); // the root from `init`, then our file
//! let (_, _, entry) = &changes.entries[0];
//! assert_eq!(entry.as_ref().map(|e| e.child), Some(id));
//! assert_eq!(backend.get_chunks(&[hash])?, [data.to_vec()]);
//! // Later: wait for more, and go on from `changes.seq`.
//! assert!(!backend.wait_feed(changes.seq, Duration::from_millis(10))?);
//!
//! // A name in a directory that does not exist would break I3: refused,
//! // and the new inode with it.
//! let orphan = InodeState::new(ObjectId { host: 7, counter: 3 }, 0o100644);
//! let nowhere = ObjectId { host: 7, counter: 99 };
//! let ops = [
//!     Op::PutInode { state: orphan, base: None },
//!     Op::PutEntry { parent: nowhere, name: b"lost".to_vec(), child: ObjectId { host: 7, counter: 3 }, base: None },
//! ];
//! let outcomes = backend.commit(7, &ops)?;
//! assert_eq!(outcomes, vec![Outcome::Conflict { current: None }; 2]);
//! assert!(ferry_backend::check(&*backend)?.is_empty(), "the backend is whole");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]

use std::fmt;
use std::time::Duration;

mod check;
mod dir;
mod error;
mod integrity;
mod postgres;
#[cfg(feature = "testing")]
pub mod testing;
mod url;

pub use check::{check, Violation};
pub use error::BackendError;
pub use url::{redact, Location};

/// Global identity of an inode: the host that created it plus that host's
/// counter, so hosts can create inodes offline without colliding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    /// Id of the creating host (0 is reserved for the volume itself).
    pub host: u32,
    /// Per-host counter.
    pub counter: u64,
}

impl ObjectId {
    /// The root directory, created by [`init`].
    pub const ROOT: ObjectId = ObjectId {
        host: 0,
        counter: 1,
    };
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.counter)
    }
}

/// BLAKE3 hash of a chunk; chunks are stored and deduplicated by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Not a chunk: in a chunk list, `(HOLE, len)` stands for `len` zero
    /// bytes that are stored nowhere (a hole of a sparse file). No BLAKE3
    /// output is all zeros in practice, so it never names real data; it is
    /// never uploaded, and a reader makes a hole of it.
    pub const HOLE: ChunkHash = ChunkHash([0; 32]);

    /// Hashes `data`.
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, as used in chunk file names.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Reads a hash stored as bytes; anything but 32 bytes is corruption.
    pub(crate) fn from_stored(bytes: &[u8], what: &str) -> Result<ChunkHash, BackendError> {
        bytes
            .try_into()
            .map(ChunkHash)
            .map_err(|_| BackendError::corrupt(format!("{what}: hash of {} bytes", bytes.len())))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

/// Largest chunk the backend accepts: bounded so a chunk fits in memory and
/// in one database value.
pub const MAX_CHUNK: usize = 4 << 20;

/// What the backend stores per inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeState {
    /// Global identity.
    pub id: ObjectId,
    /// Backend-assigned: 1 on creation, +1 per applied change. Ignored on
    /// input (the backend sets it).
    pub version: u64,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Size in bytes.
    pub size: u64,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Extended attributes (name, value), in the order given.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Regular files: ordered (hash, length) list; the concatenation is the content.
    pub chunks: Vec<(ChunkHash, u32)>,
    /// Host that made the last change (set by [`Backend::commit`]).
    pub origin: u32,
}

impl InodeState {
    /// An empty inode of the given mode, owned by root, times zero.
    pub fn new(id: ObjectId, mode: u32) -> InodeState {
        InodeState {
            id,
            version: 0,
            mode,
            uid: 0,
            gid: 0,
            rdev: 0,
            size: 0,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            target: None,
            xattrs: Vec::new(),
            chunks: Vec::new(),
            origin: 0,
        }
    }
}

/// A directory entry: `name` in directory `parent` refers to `child`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The directory.
    pub parent: ObjectId,
    /// Name bytes: any bytes but `/` and NUL, and not empty, `.` or `..`
    /// (a commit refuses other names).
    pub name: Vec<u8>,
    /// The inode the name refers to.
    pub child: ObjectId,
    /// Backend-assigned version of this (parent, name) key.
    pub version: u64,
    /// Host that made the last change to this key (set by
    /// [`Backend::commit`]): how a host recognises, after a crash, its own
    /// write whose acknowledgement it lost.
    pub origin: u32,
}

/// One metadata change. Each carries the version it was based on and is
/// applied only if that is still the current version, and only if the
/// commit leaves the backend whole (the I3 rules of the crate docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create (`base: None`, the inode must not exist) or replace
    /// (`base: Some(v)`, the current version must be `v`) an inode.
    PutInode {
        /// The new state; `version` and `origin` are set by the backend.
        state: InodeState,
        /// Expected current version.
        base: Option<u64>,
    },
    /// Delete an inode whose current version is `base`.
    DeleteInode {
        /// Inode to delete.
        id: ObjectId,
        /// Expected current version.
        base: u64,
    },
    /// Create (`base: None`, the name must be free) or replace
    /// (`base: Some(v)`) a directory entry.
    PutEntry {
        /// The directory.
        parent: ObjectId,
        /// Name in it.
        name: Vec<u8>,
        /// Inode the name refers to.
        child: ObjectId,
        /// Expected current version.
        base: Option<u64>,
    },
    /// Remove a directory entry whose current version is `base`.
    DeleteEntry {
        /// The directory.
        parent: ObjectId,
        /// Name in it.
        name: Vec<u8>,
        /// Expected current version.
        base: u64,
    },
}

/// Result of one [`Op`] in a [`Backend::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the object now has `version` (for deletes: the tombstone's).
    Applied {
        /// New version.
        version: u64,
    },
    /// Not applied: the base did not match. `current` is the live version
    /// (`None` if the object does not exist), for the replicator to rebase on.
    Conflict {
        /// Current version, if the object exists.
        current: Option<u64>,
    },
}

/// What a feed item says changed; the reader fetches the current state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FeedChange {
    /// An inode was created, changed or deleted.
    Inode(ObjectId),
    /// A directory entry was created, changed or removed.
    Entry {
        /// The directory.
        parent: ObjectId,
        /// Name in it.
        name: Vec<u8>,
    },
}

/// One item of the change feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedItem {
    /// Position in the feed; strictly increasing in commit order.
    pub seq: u64,
    /// Host whose commit produced it (lets a host skip its own changes).
    pub origin: u32,
    /// What changed.
    pub change: FeedChange,
}

/// Identity of a volume, fixed at [`init`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Human name given to `ferry init`.
    pub name: String,
    /// Random unique id (uuid-like), so hosts can tell two volumes apart.
    pub volume_id: String,
    /// Schema version of the stored data.
    pub schema_version: u32,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
}

/// What the backend knows of one host, to tell whether the host's local
/// store went back in time (restored from an old backup, say): such a store
/// would hand out ids the backend already holds, and reuse log seqs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMark {
    /// Largest counter of any inode (live or deleted) whose id has this
    /// host; 0 if none.
    pub max_counter: u64,
    /// Largest local log seq the host reported through
    /// [`Backend::set_shipped`]; 0 if none.
    pub shipped_seq: u64,
}

/// What [`Backend::changes`] returns: a run of whole commits from the feed
/// and the current state of every key they name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The last feed seq this answer covers: follow on from here. The
    /// `after_seq` asked for when the answer covers nothing.
    pub seq: u64,
    /// Whether more feed items follow `seq` (the limit cut the answer).
    pub more: bool,
    /// Every inode a covered feed item names, deduplicated, with its current
    /// state (`None`: deleted / does not exist); plus the child of every
    /// live entry in `entries`, so a reader that has never seen that inode
    /// needs no second round trip. Sorted by id.
    pub inodes: Vec<(ObjectId, Option<InodeState>)>,
    /// Every entry key a covered feed item names, deduplicated: (parent,
    /// name, current entry or `None` when removed). Sorted by parent, name.
    pub entries: Vec<(ObjectId, Vec<u8>, Option<Entry>)>,
}

/// One item of [`Backend::snapshot_each`]'s stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotItem {
    /// A live inode (all of them come before the first entry).
    Inode(InodeState),
    /// A live directory entry.
    Entry(Entry),
}

/// A shared store of chunks and versioned metadata with a change feed.
///
/// Implementations are safe to call from many threads at once, and every
/// call is synchronous (a replicator runs in plain threads).
pub trait Backend: Send + Sync + fmt::Debug {
    /// The volume's identity.
    fn info(&self) -> Result<VolumeInfo, BackendError>;
    /// Which of `hashes` the backend lacks (so only those are uploaded).
    fn missing_chunks(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BackendError>;
    /// Stores a chunk. Verifies `blake3(data) == hash` and the size bound;
    /// idempotent.
    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<(), BackendError>;
    /// Stores many chunks, each as [`Backend::put_chunk`] would. A remote
    /// backend sends them together, so a batch of small files costs a few
    /// round trips instead of one per chunk.
    fn put_chunks(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), BackendError> {
        chunks.iter().try_for_each(|(h, d)| self.put_chunk(h, d))
    }
    /// Reads a chunk, verifying its hash: a truncated or altered chunk is
    /// [`BackendError::Corrupt`], never returned as data.
    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, BackendError>;
    /// Reads many chunks, answering in the order asked (a hash asked twice
    /// is answered twice), each verified as [`Backend::get_chunk`] does: a
    /// missing one is [`BackendError::NotFound`], a damaged one
    /// [`BackendError::Corrupt`]. A remote backend fetches them in one round
    /// trip, so reading many small files costs their bytes, not one round
    /// trip each. Everything is held in memory at once: the caller bounds
    /// the batch (by [`MAX_CHUNK`] times its length).
    fn get_chunks(&self, hashes: &[ChunkHash]) -> Result<Vec<Vec<u8>>, BackendError> {
        hashes.iter().map(|h| self.get_chunk(h)).collect()
    }
    /// Applies `ops` in one transaction, in order, each checked against its
    /// base. Conflicting ops are not applied and are reported; the others
    /// are applied (per-op, not all-or-nothing) and each appends to the
    /// change feed. Returns one [`Outcome`] per op.
    ///
    /// An op that would leave the committed state breaking invariant I3
    /// (the rules in the crate docs) is a conflict as well, reported with
    /// its key's live version, and nothing of it is applied.
    fn commit(&self, origin: u32, ops: &[Op]) -> Result<Vec<Outcome>, BackendError>;
    /// Current state of an inode, `None` if it does not exist (or was deleted).
    fn inode(&self, id: &ObjectId) -> Result<Option<InodeState>, BackendError>;
    /// Entries of a directory, sorted by name.
    fn entries(&self, parent: &ObjectId) -> Result<Vec<Entry>, BackendError>;
    /// Streams the whole namespace in one consistent read, in bounded
    /// memory (a restore of millions of files must not hold them all):
    /// every live inode (ordered by id) before any entry, then every live
    /// entry (ordered by parent, name). Returns the feed seq the stream is
    /// consistent with (follow the feed from there). An error from `sink`
    /// stops the stream and is returned.
    fn snapshot_each(
        &self,
        sink: &mut dyn FnMut(SnapshotItem) -> Result<(), BackendError>,
    ) -> Result<u64, BackendError>;
    /// [`Backend::snapshot_each`] collected in memory: every live inode and
    /// entry, plus the feed seq. For checks and small volumes; a restore
    /// streams.
    fn snapshot(&self) -> Result<(u64, Vec<InodeState>, Vec<Entry>), BackendError> {
        let (mut inodes, mut entries) = (Vec::new(), Vec::new());
        let seq = self.snapshot_each(&mut |item| {
            match item {
                SnapshotItem::Inode(inode) => inodes.push(inode),
                SnapshotItem::Entry(entry) => entries.push(entry),
            }
            Ok(())
        })?;
        Ok((seq, inodes, entries))
    }
    /// Up to `limit` feed items with `seq > after_seq`, in order.
    fn feed(&self, after_seq: u64, limit: usize) -> Result<Vec<FeedItem>, BackendError>;
    /// The changes after `after_seq`, with the current state of every
    /// object they name, read in ONE consistent read (one transaction, one
    /// round trip on PostgreSQL): so applying them never sees an entry whose
    /// inode this read has not caught up with.
    ///
    /// Covers up to `limit` feed items, plus the rest of the last commit
    /// they touch: an answer never ends inside a commit, because a commit's
    /// state is whole only as a whole (a rename is two items). "Current"
    /// means as of this read, which may be newer than [`Changes::seq`]; a
    /// reader compares versions. A feed item of unknown kind is
    /// [`BackendError::Corrupt`].
    fn changes(&self, after_seq: u64, limit: usize) -> Result<Changes, BackendError>;
    /// Blocks up to `timeout` until the feed has items after `after_seq`;
    /// returns whether it has.
    fn wait_feed(&self, after_seq: u64, timeout: Duration) -> Result<bool, BackendError>;
    /// What the backend knows of `host` ([`HostMark`]).
    fn host_mark(&self, host: u32) -> Result<HostMark, BackendError>;
    /// Records that `host` has shipped its local log up to `seq`. Marks
    /// only rise: a lower `seq` than the recorded one changes nothing.
    fn set_shipped(&self, host: u32, seq: u64) -> Result<(), BackendError>;
}

/// Opens the backend at `url` (`dir:/PATH`, `postgres://…` or
/// `postgresql://…`): [`Location::open`] of the parsed URL.
pub fn open(url: &str, connect_timeout: Duration) -> Result<Box<dyn Backend>, BackendError> {
    url.parse::<Location>()?.open(connect_timeout)
}

/// Creates a volume at `url` (what `ferry init` runs): [`Location::init`]
/// of the parsed URL.
pub fn init(url: &str, volume_name: &str) -> Result<VolumeInfo, BackendError> {
    url.parse::<Location>()?.init(volume_name)
}

/// Schema version this build reads and writes. Version 2 added the
/// per-host marks and the index of entries by child (for the I3 rules);
/// version 3 the commit of each feed item (so [`Backend::changes`] never
/// cuts a commit). [`open`] refuses an older volume (an older build would
/// write feed items without their commit); [`init`] migrates it.
pub const SCHEMA_VERSION: u32 = 3;

/// What `init` must do given the schema version found at the location
/// (0 = no volume). Shared by both implementations so they agree.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InitPlan {
    /// Nothing there: run all migrations, then create the root and volume row.
    Create,
    /// An older volume: run the migrations after `from`.
    Migrate {
        /// Version found.
        from: u32,
    },
}

impl InitPlan {
    /// Decides, or refuses a current/newer volume.
    pub(crate) fn decide(
        found: u32,
        location: &str,
        existing_name: impl FnOnce() -> String,
    ) -> Result<InitPlan, BackendError> {
        match found {
            0 => Ok(InitPlan::Create),
            SCHEMA_VERSION => Err(BackendError::AlreadyInitialized {
                location: redact(location),
                volume: existing_name(),
            }),
            v if v < SCHEMA_VERSION => Ok(InitPlan::Migrate { from: v }),
            v => Err(BackendError::SchemaVersion {
                found: v,
                supported: SCHEMA_VERSION,
            }),
        }
    }

    /// Index of the first migration to run (`migrations[i]` goes from i to i+1).
    pub(crate) fn first_migration(&self) -> usize {
        match self {
            InitPlan::Create => 0,
            InitPlan::Migrate { from } => *from as usize,
        }
    }
}

/// Checks at open that the stored schema version is the supported one.
pub(crate) fn check_schema(found: u32, location: &str) -> Result<(), BackendError> {
    match found {
        0 => Err(BackendError::NotInitialized {
            location: redact(location),
        }),
        SCHEMA_VERSION => Ok(()),
        v => Err(BackendError::SchemaVersion {
            found: v,
            supported: SCHEMA_VERSION,
        }),
    }
}

impl Op {
    /// The key this op changes, which is also its feed item.
    pub(crate) fn target(&self) -> FeedChange {
        match self {
            Op::PutInode { state, .. } => FeedChange::Inode(state.id),
            Op::DeleteInode { id, .. } => FeedChange::Inode(*id),
            Op::PutEntry { parent, name, .. } | Op::DeleteEntry { parent, name, .. } => {
                FeedChange::Entry {
                    parent: *parent,
                    name: name.clone(),
                }
            }
        }
    }

    /// The version this op expects its key to have (`None` = absent).
    pub fn base(&self) -> Option<u64> {
        match self {
            Op::PutInode { base, .. } | Op::PutEntry { base, .. } => *base,
            Op::DeleteInode { base, .. } | Op::DeleteEntry { base, .. } => Some(*base),
        }
    }

    /// The same op, expecting its key to be at version `base` (what a host
    /// sends again on top of a version it learned is its own).
    pub fn with_base(&self, version: u64) -> Op {
        let mut op = self.clone();
        match &mut op {
            Op::PutInode { base, .. } | Op::PutEntry { base, .. } => *base = Some(version),
            Op::DeleteInode { base, .. } | Op::DeleteEntry { base, .. } => *base = version,
        }
        op
    }
}

/// File type bits of a mode (`S_IFMT`).
const S_IFMT: u32 = 0o170000;
/// Directory type (`S_IFDIR`).
const S_IFDIR: u32 = 0o040000;
/// Regular file type (`S_IFREG`).
const S_IFREG: u32 = 0o100000;

/// Whether `mode` is one file type (fifo, character device, directory,
/// block device, regular file, symlink, socket) plus permission bits.
pub(crate) fn valid_mode(mode: u32) -> bool {
    const TYPES: [u32; 7] = [
        0o010000, 0o020000, S_IFDIR, 0o060000, S_IFREG, 0o120000, 0o140000,
    ];
    mode & !(S_IFMT | 0o7777) == 0 && TYPES.contains(&(mode & S_IFMT))
}

pub(crate) fn is_dir(mode: u32) -> bool {
    mode & S_IFMT == S_IFDIR
}

pub(crate) fn is_regular(mode: u32) -> bool {
    mode & S_IFMT == S_IFREG
}

pub(crate) fn same_type(a: u32, b: u32) -> bool {
    a & S_IFMT == b & S_IFMT
}

/// Whether `name` can be a directory entry in a real file system.
pub(crate) fn valid_name(name: &[u8]) -> bool {
    !matches!(name, b"" | b"." | b"..") && !name.iter().any(|&b| b == b'/' || b == 0)
}

impl FeedChange {
    /// Stored form (kind, id, name): kind 0 = inode `id`; kind 1 = entry
    /// `name` in directory `id`. Inverse of [`decode_feed_row`].
    pub(crate) fn encode(&self) -> (i16, &ObjectId, Option<&[u8]>) {
        match self {
            FeedChange::Inode(id) => (0, id, None),
            FeedChange::Entry { parent, name } => (1, parent, Some(name)),
        }
    }
}

/// Rejects a chunk upload whose size or hash is wrong.
pub(crate) fn verify_upload(hash: &ChunkHash, data: &[u8]) -> Result<(), BackendError> {
    if data.len() > MAX_CHUNK {
        return Err(BackendError::Invalid {
            detail: format!(
                "chunk of {} bytes exceeds MAX_CHUNK ({MAX_CHUNK})",
                data.len()
            ),
        });
    }
    if ChunkHash::of(data) != *hash {
        return Err(BackendError::Invalid {
            detail: format!("chunk data does not hash to {}", hash.to_hex()),
        });
    }
    Ok(())
}

/// Verifies chunk bytes read back from storage.
pub(crate) fn verify_stored(hash: &ChunkHash, data: Vec<u8>) -> Result<Vec<u8>, BackendError> {
    if data.len() > MAX_CHUNK || ChunkHash::of(&data) != *hash {
        return Err(BackendError::corrupt(format!(
            "chunk {} ({} bytes stored) does not match its hash",
            hash.to_hex(),
            data.len()
        )));
    }
    Ok(data)
}

/// Encodes xattrs as one blob: (u32 len, bytes) for each name and value.
/// One column instead of a table: xattrs are small and always read whole.
pub(crate) fn encode_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in xattrs {
        for part in [name, value] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

/// Extended attributes as stored in [`InodeState::xattrs`].
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Inverse of [`encode_xattrs`]; a malformed blob is [`BackendError::Corrupt`].
pub(crate) fn decode_xattrs(mut blob: &[u8], id: &ObjectId) -> Result<Xattrs, BackendError> {
    let corrupt = || BackendError::corrupt(format!("xattrs of inode {id}"));
    let take = |blob: &mut &[u8]| -> Result<Vec<u8>, BackendError> {
        let (len, rest) = blob.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(corrupt());
        }
        let (part, rest) = rest.split_at(len);
        *blob = rest;
        Ok(part.to_vec())
    };
    let mut xattrs = Vec::new();
    while !blob.is_empty() {
        let name = take(&mut blob)?;
        let value = take(&mut blob)?;
        xattrs.push((name, value));
    }
    Ok(xattrs)
}

/// Converts a stored signed integer to the unsigned field it holds; a
/// negative or too large value is corruption.
pub(crate) fn stored<T: TryFrom<i64>>(
    value: i64,
    what: &dyn Fn() -> String,
) -> Result<T, BackendError> {
    T::try_from(value)
        .map_err(|_| BackendError::corrupt(format!("{}: value {value} out of range", what())))
}

/// Decodes a stored feed row. Kind 0 is an inode change (`host`,
/// `counter` = its id), kind 1 an entry change (`host`, `counter` = the
/// parent, plus `name`); both backends store the feed this way.
pub(crate) fn decode_feed_row(
    seq: i64,
    origin: i64,
    kind: i64,
    host: i64,
    counter: i64,
    name: Option<Vec<u8>>,
) -> Result<FeedItem, BackendError> {
    let what = || format!("feed item {seq}");
    let id = ObjectId {
        host: stored(host, &what)?,
        counter: counter as u64,
    };
    let change = match (kind, name) {
        (0, None) => FeedChange::Inode(id),
        (1, Some(name)) => FeedChange::Entry { parent: id, name },
        (kind, _) => return Err(BackendError::corrupt(format!("{}: kind {kind}", what()))),
    };
    Ok(FeedItem {
        seq: stored(seq, &what)?,
        origin: stored(origin, &what)?,
        change,
    })
}

/// A u64 query argument (seq, limit) as a signed 64-bit SQL integer;
/// values beyond `i64::MAX` mean "no bound" anyway.
pub(crate) fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A fresh uuid-like volume id (v4 layout) from BLAKE3 of time, pid and a
/// process-local counter; unique enough to tell volumes apart without a
/// uuid/rand dependency.
pub(crate) fn new_volume_id(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&now_ns().to_le_bytes());
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hasher.update(name.as_bytes());
    let mut b = *hasher.finalize().as_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b[..16].iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Now, ns since the epoch.
pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The root directory `init` creates.
pub(crate) fn root_inode(now: i64) -> InodeState {
    let mut root = InodeState::new(ObjectId::ROOT, 0o40755);
    root.version = 1;
    root.atime_ns = now;
    root.mtime_ns = now;
    root.ctime_ns = now;
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattrs_round_trip_and_garbage_is_corrupt() {
        let id = ObjectId {
            host: 1,
            counter: 2,
        };
        let x = vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (b"user.b".to_vec(), vec![]),
        ];
        assert_eq!(decode_xattrs(&encode_xattrs(&x), &id).unwrap(), x);
        let blob = encode_xattrs(&x);
        for cut in 1..blob.len() {
            // Every truncation either decodes to fewer pairs or is Corrupt; never panics.
            if let Ok(got) = decode_xattrs(&blob[..cut], &id) {
                assert!(got.len() < x.len());
            }
        }
        assert!(matches!(
            decode_xattrs(&[0xff, 0xff, 0xff, 0xff, 1], &id),
            Err(BackendError::Corrupt { .. })
        ));
    }

    #[test]
    fn init_plan_refuses_current_and_newer() {
        assert_eq!(
            InitPlan::decide(0, "dir:/x", String::new).unwrap(),
            InitPlan::Create
        );
        assert!(matches!(
            InitPlan::decide(SCHEMA_VERSION, "dir:/x", || "v".into()),
            Err(BackendError::AlreadyInitialized { .. })
        ));
        assert!(matches!(
            InitPlan::decide(SCHEMA_VERSION + 1, "dir:/x", String::new),
            Err(BackendError::SchemaVersion { .. })
        ));
        let plan = InitPlan::decide(1, "dir:/x", String::new).unwrap();
        assert_eq!(plan, InitPlan::Migrate { from: 1 });
        assert_eq!(plan.first_migration(), 1);
    }

    #[test]
    fn modes_and_names() {
        for ok in [
            0o100644, 0o40755, 0o120777, 0o20600, 0o60600, 0o10644, 0o140755, 0o104755,
        ] {
            assert!(valid_mode(ok), "{ok:o}");
        }
        for bad in [0, 0o644, 0o170644, 0o30644, 0o1100644] {
            assert!(!valid_mode(bad), "{bad:o}");
        }
        assert!(is_dir(0o40700) && !is_dir(0o100700) && is_regular(0o100000));
        for ok in [&b"a"[..], b"...", b"\xff\x01 x", b".hidden"] {
            assert!(valid_name(ok), "{ok:?}");
        }
        for bad in [&b""[..], b".", b"..", b"a/b", b"nul\0"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn volume_ids_are_uuid_shaped_and_distinct() {
        let a = new_volume_id("v");
        let b = new_volume_id("v");
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
