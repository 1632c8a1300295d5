//! Shipping: the change log goes up, as the current state of what it
//! touched (see the module docs of [`super`]).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_backend::{
    Backend, BackendError, ChunkHash, InodeState, ObjectId, Op, Outcome, MAX_CHUNK,
};
use tracing::{info, warn};

use super::fetch::Fetcher;
use super::{apply, resolve};
use super::{
    decode_key, entry_key, inode_key, object_id, unix_secs, Backoff, ChunkList, Key, Link,
    ReplError, Shared, HOLE, HOLE_PIECE,
};
use crate::fuse::NotifierSlot;
use crate::ids::{Ino, Seq};
use crate::log::{Change, LogRecord, Outbox, Touched};
use crate::store::{nanos_of, Inode, Kind, Queries, Reader, Store, Tx, ROOT_INO};
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

/// Chunks read while planning a batch, uploaded a group at a time.
#[derive(Default)]
struct Uploads {
    /// Chunks of the current group, with the bytes they were hashed from.
    group: Vec<(ChunkHash, Vec<u8>)>,
    /// Their total size, bounded by [`UPLOAD_GROUP`] (plus one chunk).
    bytes: usize,
    /// Every chunk of the batch so far: a chunk two files share is sent once.
    seen: std::collections::HashSet<ChunkHash>,
}

/// One op of a batch and the local object it ships.
struct Planned {
    op: Op,
    key: Vec<u8>,
    /// For files: the chunk list to remember once applied.
    chunks: Option<(Ino, ChunkList)>,
    /// The local file whose data file this batch read (so it may have had
    /// writers at the time: see [`Tx::mark_writing`]).
    read: Option<Ino>,
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
    last: Seq,
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
    /// Whether it has a name here (the root always has).
    named: bool,
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
    fn take(r: &Reader<'_>, shipped: Seq) -> Result<Snapshot, ReplError> {
        let batch = Outbox::pending(r, BATCH)?;
        let mut touched = Touched::of(&batch).map_err(|seq| {
            ReplError::Store(rusqlite::Error::InvalidColumnType(
                0,
                format!("log record {seq}: undecodable"),
                rusqlite::types::Type::Text,
            ))
        })?;
        // A revived inode ships with every name it has now.
        touched.add_revived_names(r)?;
        let Touched {
            inodes,
            rewritten,
            names,
            deleted,
            ..
        } = touched;
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
                named: ino == ROOT_INO || !r.names_of(ino)?.is_empty(),
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
        for (host, counter) in deleted {
            if r.ino_of(host, counter)?.is_some() {
                // Deleted here once, back since (down-sync brought it
                // again): the deletion is history.
                continue;
            }
            let id = ObjectId { host, counter };
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
    chunks: Option<(Ino, ChunkList)>,
    /// The file, if its data file was read for this.
    read: Option<Ino>,
}

pub(super) struct Shipper {
    vfs: Arc<Vfs>,
    link: Arc<Link>,
    shared: Arc<Shared>,
    notifier: NotifierSlot,
    fetcher: Arc<Fetcher>,
    /// The last attempt failed: check that the backend answers before
    /// reading a whole batch of files again (an outage must not turn into
    /// a loop of re-reading the backlog, competing with writers for disk
    /// and CPU).
    probe: bool,
}

impl Shipper {
    pub(super) fn new(
        vfs: Arc<Vfs>,
        link: Arc<Link>,
        shared: Arc<Shared>,
        notifier: NotifierSlot,
        fetcher: Arc<Fetcher>,
    ) -> Shipper {
        Shipper {
            vfs,
            link,
            shared,
            notifier,
            fetcher,
            probe: false,
        }
    }

    fn store(&self) -> &Store {
        self.vfs.store()
    }

    pub(super) fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut generation = 0;
        while !self.shared.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.refresh_status() {
                warn!("replication status: {e}");
            }
            if !self.shared.verified() {
                match self.verify() {
                    Ok(()) => {
                        backoff.reset();
                        self.contacted();
                    }
                    Err(e) => {
                        self.failed(&e);
                        self.shared.pause(backoff.step());
                        continue;
                    }
                }
            }
            let batch = match self.store().read(|r| Outbox::pending(r, BATCH)) {
                Ok(b) => b,
                Err(e) => {
                    self.failed(&ReplError::Store(e));
                    self.shared.pause(backoff.step());
                    continue;
                }
            };
            // Conflicts that had to wait (a file open for writing) are
            // tried again first: what they hold back may be what the batch
            // needs (a new file's name, say).
            if let Err(e) = self.resolve_held() {
                self.failed(&e);
            }
            if batch.is_empty() {
                generation = self
                    .store()
                    .wait_for_log(generation, Duration::from_secs(1));
                // Let a burst finish (a file being written, a tree being
                // unpacked): it then ships as one batch, each file once.
                self.shared.settle(SETTLE);
                continue;
            }
            if self.writers_busy(&batch) {
                self.shared.settle(SETTLE);
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
                    self.shared.pause(backoff.step());
                }
            }
        }
    }

    /// Checks, once per run and before anything ships, that the backend
    /// answers, is this store's volume, and holds nothing newer from this
    /// host than the store does (see [`crate::binding`]); then learns what
    /// a batch in flight when the last daemon died did at the backend.
    fn verify(&mut self) -> Result<(), ReplError> {
        let backend = self.backend()?;
        crate::binding::verify(self.store(), &*backend, self.link.location())?;
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
    fn relearn(&mut self) -> Result<(), ReplError> {
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
                Some(Key::Listing(_)) | None => None,
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

    fn failed(&mut self, e: &ReplError) {
        warn!("replication: {e}; retrying");
        if matches!(e, ReplError::Backend(b) if !b.is_transient()) {
            // A fresh connection may see a repaired or re-initialised backend.
            self.link.reset();
        }
        self.shared.update(|s| {
            s.last_error = Some(e.to_string());
            s.errors += 1;
        });
    }

    fn shipped_seq(&self) -> Seq {
        self.store().read(|r| Outbox::cursor(r)).unwrap_or(Seq(0))
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

    fn backend(&self) -> Result<Arc<dyn Backend>, BackendError> {
        self.link.get()
    }

    /// Ships one batch: plan, upload chunks, commit, record the outcome.
    fn ship(&mut self) -> Result<(), ReplError> {
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
        // From the commit until the outcome is recorded and its conflicts
        // resolved, down-sync waits (see `Shared::exchange`).
        let shared = self.shared.clone();
        let _turn = shared.exchange();
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
        if settled
            .iter()
            .any(|(_, v)| matches!(v, Verdict::Conflict(_)))
        {
            for (p, v) in &settled {
                tracing::debug!("batch to {last}: {:?} -> {}", p.op, v.name());
            }
        }
        // What the backend has from this host, for the check that a store
        // never goes back in time (the store's log already reaches `last`).
        // Before the local record, so a batch is recorded as shipped only
        // once every call of it succeeded; a failure ships it again, on top
        // of its own earlier self.
        self.backend()?.set_shipped(host, last.0)?;
        let conflicted = settled
            .iter()
            .any(|(_, v)| matches!(v, Verdict::Conflict(_)));
        // Cleared by `resolve`, whatever its outcome.
        self.shared.update(|s| s.resolving = conflicted);
        let vfs = &self.vfs;
        self.store().write(|tx| -> rusqlite::Result<()> {
            for (p, verdict) in &settled {
                record(tx, p, verdict)?;
                // Read while a writer had it open, and still open now: the
                // writes after the read are not logged until the last close,
                // so remember durably, in this commit, that they may exist.
                // (Under the store lock, so a close cannot slip in between.)
                // The writers now may have opened after the read, in a run
                // that the read never ended, so `begin_ship` ends the run
                // open now, under the lock it checks the writers with: its
                // last close logs the file again and clears the mark (left
                // set, it would hold the file as changed here, and every
                // pull of it back, until the next mount).
                if let Some(ino) = p.read.filter(|&ino| vfs.begin_ship(ino)) {
                    tx.mark_writing(ino)?;
                }
            }
            tx.set_inflight(std::iter::empty())?;
            Outbox::advance(tx, last)
        })?;
        let conflicts: Vec<Vec<u8>> = settled
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Conflict(_)))
            .map(|(p, _)| p.key.clone())
            .collect();
        if !conflicts.is_empty() {
            let ours: HashMap<Vec<u8>, Vec<(ChunkHash, u32)>> = settled
                .iter()
                .filter_map(|(p, _)| match &p.op {
                    Op::PutInode { state, .. } if p.chunks.is_some() => {
                        Some((p.key.clone(), state.chunks.clone()))
                    }
                    _ => None,
                })
                .collect();
            self.resolve(&conflicts, &ours)?;
            // What resolving logged ships next; a moment first, so two
            // hosts resolving against each other never spin.
            self.shared.pause(SETTLE);
        }
        Ok(())
    }

    /// Settles conflicts (see [`super::resolve`]) and tells the kernel
    /// what that changed. What cannot be settled yet (a file still open
    /// for writing) stays in the conflict table, tried again each round.
    fn resolve(
        &mut self,
        keys: &[Vec<u8>],
        ours: &HashMap<Vec<u8>, Vec<(ChunkHash, u32)>>,
    ) -> Result<(), ReplError> {
        let unsettling = self.vfs.unsettling();
        let resolved = self
            .backend()
            .map_err(ReplError::from)
            .and_then(|backend| resolve::resolve(&self.vfs, &unsettling, &*backend, keys, ours));
        self.shared.update(|s| s.resolving = false);
        let fx = resolved?;
        apply::settle(
            &self.vfs,
            self.notifier.get(),
            &self.fetcher,
            &fx,
            unsettling,
        );
        Ok(())
    }

    /// Tries again the conflicts that had to wait, with the backend's
    /// state now.
    fn resolve_held(&mut self) -> Result<(), ReplError> {
        let held = self.store().read(|r| r.conflict_keys())?;
        if held.is_empty() {
            return Ok(());
        }
        // Only what can be settled now: a key that waits on a writer
        // would only cost a backend round trip per batch.
        let vfs = self.vfs.clone();
        let held: Vec<Vec<u8>> = self.store().read(|r| {
            held.into_iter()
                .filter(|k| !resolve::waits_on_writer(r, &vfs, k))
                .collect()
        });
        if held.is_empty() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let _turn = shared.exchange();
        self.resolve(&held, &HashMap::new())
    }

    /// Commits `ops` (none: nothing to ask) and checks the answer's shape.
    fn commit(&mut self, ops: &[Op]) -> Result<Vec<Outcome>, ReplError> {
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
    fn retry(&mut self, settled: &mut [(Planned, Verdict)]) -> Result<(), ReplError> {
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
    fn plan(&mut self, snap: Snapshot, uploads: &mut Uploads) -> Result<Vec<Planned>, ReplError> {
        let mut puts = Vec::new();
        let mut inode_deletes = Vec::new();
        for obj in snap.inodes {
            let id = object_id(&obj.inode);
            let what = format!("inode {id}");
            if !obj.named {
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
    ) -> Result<Described, ReplError> {
        let inode = &obj.inode;
        let attr = self
            .vfs
            .attr(inode)
            .map_err(|e| ReplError::Io(std::io::Error::from_raw_os_error(e.code())))?;
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
            state.chunks = list.clone();
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
    fn read_chunks(&mut self, ino: Ino, uploads: &mut Uploads) -> Result<ChunkList, ReplError> {
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
                    if uploads.seen.insert(hash) {
                        uploads.bytes += n;
                        uploads.group.push((hash, buf[..n].to_vec()));
                        if uploads.bytes >= UPLOAD_GROUP {
                            self.upload(uploads)?;
                        }
                    }
                    list.push((hash, n as u32));
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
    fn upload(&mut self, uploads: &mut Uploads) -> Result<(), ReplError> {
        if uploads.group.is_empty() {
            return Ok(());
        }
        let hashes: Vec<ChunkHash> = uploads.group.iter().map(|(h, _)| *h).collect();
        let missing: BTreeSet<ChunkHash> = self
            .backend()?
            .missing_chunks(&hashes)?
            .into_iter()
            .collect();
        let send: Vec<(ChunkHash, &[u8])> = uploads
            .group
            .iter()
            .filter(|(h, _)| missing.contains(h))
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
    fn judge(&mut self, p: &Planned, current: Option<u64>) -> Result<Verdict, ReplError> {
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

impl Verdict {
    /// For the debug log.
    fn name(&self) -> &'static str {
        match self {
            Verdict::Applied(_) => "applied",
            Verdict::Rebase(_) | Verdict::RebaseEntry(_) => "rebase",
            Verdict::Refused => "refused",
            Verdict::Gone => "gone",
            Verdict::Conflict(_) => "conflict",
        }
    }
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
