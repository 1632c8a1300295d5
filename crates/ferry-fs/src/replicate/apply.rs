//! Down-sync: other hosts' changes come down (feed → store → kernel).
//!
//! A thread follows the backend's change feed. It wakes on the backend's
//! signal (LISTEN/NOTIFY on PostgreSQL, a file watch on `dir:`) and polls
//! every [`POLL`] besides. Each round asks for everything after its cursor
//! in one call ([`Backend::changes`]), which answers with the *current*
//! state of every object named, so a round costs one round trip however
//! many changes it brings. The round is applied in one store transaction
//! whose records are `pulled` (the log stays a faithful replay of the
//! store, and the shipper never sends them back), together with the new
//! cursor. Only then are the kernel's caches of what changed invalidated
//! through the FUSE notifier, so readers see the new state while the
//! caches stay on. Metadata lands at once; file contents stay at the
//! backend until opened (or prefetched), exactly as after a restore. A file
//! that is open here when its contents change is fetched at once, in
//! place, so a reader that reads it again sees the new bytes.
//!
//! # What waits
//!
//! An object with a change of this host's still to ship (in the pending
//! log, open for writing, or held as a conflict) is left alone, and its
//! key goes to the store's `recheck` table: it is fetched and tried again
//! each round until it applies. Meanwhile the shipper's commit of the same
//! object meets the other host's version as a conflict, which
//! [`super::resolve`] settles, preserving this host's version.
//!
//! # Never an orphan, never a loss
//!
//! - A new inode is imported only together with a name for it.
//! - A name is removed only if what it named has no change of this host's
//!   pending; an inode left with no name here is forgotten locally (a
//!   pulled delete, its backend version cleared): the backend has all of
//!   it, and if it is still alive there, its new name brings it back.
//! - A directory never gets a second name: such a change waits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_backend::{Backend, BackendError, Entry, InodeState, ObjectId};
use tracing::{debug, info, warn};

use super::fetch::Fetcher;
use super::{decode_key, entry_key, inode_key, listing_key, Backoff, Key, Link, ReplError, Shared};
use crate::fuse::NotifierSlot;
use crate::ids::Ino;
use crate::log::{Outbox, Touched};
use crate::store::{Inode, Kind, Queries, Tx, ROOT_INO};
use crate::unsettled::Unsettling;
use crate::vfs::Vfs;

/// Longest wait for the backend's signal before looking anyway.
const POLL: Duration = Duration::from_secs(1);
/// Feed items asked for per round (the backend adds the rest of the last
/// commit).
const ROUND: usize = 10_000;
/// Keys from `recheck` tried per round.
const RECHECKS: usize = 1_000;

/// Remote state to apply: what the backend has now for some keys.
#[derive(Default)]
pub(super) struct RemoteState {
    /// Inodes by identity (`None`: gone from the backend).
    pub inodes: HashMap<ObjectId, Option<InodeState>>,
    /// Entries by (parent, name) (`None`: no such name at the backend).
    pub entries: BTreeMap<(ObjectId, Vec<u8>), Option<Entry>>,
}

impl RemoteState {
    /// Adds the backend's answer for `keys` (the store's key encoding), a
    /// call per inode and per directory.
    pub fn fetch_keys(
        &mut self,
        backend: &dyn Backend,
        keys: &[Vec<u8>],
    ) -> Result<(), BackendError> {
        let mut dirs: BTreeMap<ObjectId, Vec<Vec<u8>>> = BTreeMap::new();
        for key in keys {
            match decode_key(key) {
                Some(Key::Inode(id)) => {
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.inodes.entry(id) {
                        slot.insert(backend.inode(&id)?);
                    }
                }
                Some(Key::Entry(parent, name)) => dirs.entry(parent).or_default().push(name),
                Some(Key::Listing(dir)) => {
                    for e in backend.entries(&dir)? {
                        self.entries.insert((dir, e.name.clone()), Some(e));
                    }
                }
                None => {}
            }
        }
        for (parent, names) in dirs {
            let listing: HashMap<Vec<u8>, Entry> = backend
                .entries(&parent)?
                .into_iter()
                .map(|e| (e.name.clone(), e))
                .collect();
            for name in names {
                let e = listing.get(&name).cloned();
                self.entries.insert((parent, name), e);
            }
        }
        Ok(())
    }

    /// Fetches the inodes that entries name and that are neither here nor
    /// known locally as the backend's (`local` tells), so a name never
    /// arrives without its inode.
    pub fn fetch_children(
        &mut self,
        backend: &dyn Backend,
        local: impl Fn(ObjectId) -> bool,
    ) -> Result<(), BackendError> {
        let wanted: BTreeSet<ObjectId> = self
            .entries
            .values()
            .flatten()
            .map(|e| e.child)
            .filter(|c| !self.inodes.contains_key(c) && !local(*c))
            .collect();
        for id in wanted {
            let state = backend.inode(&id)?;
            self.inodes.insert(id, state);
        }
        Ok(())
    }
}

/// A key, for the debug log.
fn show(key: &[u8]) -> String {
    match decode_key(key) {
        Some(Key::Inode(id)) => format!("inode {id}"),
        Some(Key::Entry(p, n)) => format!("{p}/{}", String::from_utf8_lossy(&n)),
        Some(Key::Listing(id)) => format!("listing of {id}"),
        None => "?".into(),
    }
}

/// Whether this store has `id` as the backend's (not forgotten).
pub(super) fn known_here(store: &crate::store::Store, id: ObjectId) -> bool {
    store
        .read(|r| -> rusqlite::Result<bool> {
            Ok(r.ino_of(id.host, id.counter)?.is_some()
                && r.remote_version(&inode_key(id))?.is_some())
        })
        .unwrap_or(false)
}

/// Directories listed whole in one round, at most: a subtree that comes
/// back (or moves in) arrives in one round down to this many directories.
const LISTINGS: usize = 10_000;

impl RemoteState {
    /// Lists, whole, every directory an entry here names that this host
    /// does not have as the backend's, and so on down (within
    /// [`LISTINGS`]): such a directory's entries are not in the feed
    /// ahead, and fetching them a level per round would make a deep tree
    /// take as many rounds.
    pub fn expand(
        &mut self,
        backend: &dyn Backend,
        local: impl Fn(ObjectId) -> bool,
    ) -> Result<(), BackendError> {
        let mut listed: BTreeSet<ObjectId> = BTreeSet::new();
        // Bounded: every pass lists at least one new directory, at most
        // LISTINGS in all.
        while listed.len() < LISTINGS {
            let dirs: Vec<ObjectId> = self
                .entries
                .values()
                .flatten()
                .map(|e| e.child)
                .filter(|c| !listed.contains(c))
                .filter(|c| {
                    matches!(self.inodes.get(c), Some(Some(st))
                        if Kind::from_mode(st.mode) == Some(Kind::Dir))
                })
                .filter(|c| !local(*c))
                .take(LISTINGS - listed.len())
                .collect();
            if dirs.is_empty() {
                break;
            }
            for dir in dirs {
                for e in backend.entries(&dir)? {
                    self.entries.entry((dir, e.name.clone())).or_insert(Some(e));
                }
                listed.insert(dir);
            }
            self.fetch_children(backend, &local)?;
        }
        Ok(())
    }
}

/// What a pull changed, for the kernel and the data files, done after the
/// transaction commits.
#[derive(Debug, Default)]
pub(super) struct Effects {
    /// Inodes whose attributes or contents changed.
    pub inodes: BTreeSet<Ino>,
    /// Names that appeared or changed: (directory, name).
    pub added: Vec<(Ino, Vec<u8>)>,
    /// Names that went: (directory, name, the inode it named).
    pub removed: Vec<(Ino, Vec<u8>, Ino)>,
    /// Inodes of `removed` that ended here: files left with no name, and
    /// directories the backend deleted. Only these may the kernel be told
    /// were deleted: it takes that as the end of the inode, clears its link
    /// count, and marks a directory dead for as long as it keeps the inode
    /// (a process holding it open, or as its cwd, is enough; a lookup then
    /// brings the link count back). A dead directory lists empty and finds
    /// nothing in it, under any name, whatever the store holds: one moved
    /// away here (another host's rename, a conflict's rename aside), or
    /// forgotten and brought back later with the same inode number, would
    /// show an empty subtree for good.
    pub ended: BTreeSet<Ino>,
    /// Inodes that lost their last name here: deleted once the kernel
    /// lets go of them.
    pub orphans: BTreeSet<Ino>,
    /// Open files whose contents changed: fetched at once, in place.
    pub refresh: BTreeSet<Ino>,
    /// Regular files that arrived or changed (for prefetch).
    pub fetchable: BTreeSet<Ino>,
    /// Remote changes applied.
    pub applied: u64,
    /// Paths of what was moved to `/lost+found` because its directory went.
    pub rescued: Vec<String>,
}

impl Effects {
    /// This store moved `ino` from `from` to `to` (conflict resolution's
    /// rename aside, a rescue to `/lost+found`): the kernel's entries for
    /// both names go, and the link counts and times it caches of the inode
    /// and both directories. Left cached, the old name would still lead
    /// the kernel to `ino`, and an rmdir or a rename onto that name would
    /// act here on whatever the store has there now while the kernel took
    /// it as the end of `ino` (see [`settle`]).
    pub fn moved(&mut self, from: (Ino, &[u8]), ino: Ino, to: (Ino, &[u8])) {
        self.removed.push((from.0, from.1.to_vec(), ino));
        self.added.push((to.0, to.1.to_vec()));
        self.inodes.extend([from.0, ino, to.0]);
    }

    /// The names this changed, (directory, name): what the kernel may
    /// still map to what they named before (see [`crate::unsettled`]).
    pub fn names(&self) -> impl Iterator<Item = (Ino, &[u8])> {
        let removed = self.removed.iter().map(|(p, n, _)| (*p, n.as_slice()));
        removed.chain(self.added.iter().map(|(p, n)| (*p, n.as_slice())))
    }

    /// Adds what `other` changed.
    pub fn absorb(&mut self, other: Effects) {
        self.inodes.extend(other.inodes);
        self.added.extend(other.added);
        self.removed.extend(other.removed);
        self.ended.extend(other.ended);
        self.orphans.extend(other.orphans);
        self.refresh.extend(other.refresh);
        self.fetchable.extend(other.fetchable);
        self.applied += other.applied;
        self.rescued.extend(other.rescued);
    }
}

/// The local side of a pull: which objects have changes of this host's
/// pending, so the remote state must not overwrite them.
pub(super) struct Dirty {
    touched: Touched,
    writing: HashSet<Ino>,
    /// Directories with a change of this host's pending somewhere below
    /// them: taking one away (a pull of its removal or move) would take
    /// that change with it, so such a pull waits until it shipped (and,
    /// if the backend refuses it, conflict resolution decides).
    holding: HashSet<Ino>,
}

impl Dirty {
    /// Reads the store's outbox.
    pub fn read(tx: &Tx<'_>) -> rusqlite::Result<Dirty> {
        let pending = Outbox::pending(tx, usize::MAX >> 1)?;
        // An undecodable record makes its objects unknown: the shipper
        // reports it; here, everything it could name is held back by
        // treating the log as touching nothing new.
        let mut touched = Touched::of(&pending).unwrap_or_default();
        // What the next batch ships with the revived inodes waits too.
        touched.add_revived_names(tx)?;
        let writing: HashSet<Ino> = tx.writing()?.into_iter().collect();
        let mut holding = HashSet::new();
        for &ino in touched.inodes.iter().chain(&writing) {
            let mut at = ino;
            // Bounded: a store has no cycles, and no path is this deep.
            for _ in 0..4096 {
                match tx.parent_of(at)? {
                    Some(p) if holding.insert(p) => at = p,
                    _ => break,
                }
            }
        }
        Ok(Dirty {
            touched,
            writing,
            holding,
        })
    }

    /// Whether `ino` has a change of this host's to ship.
    pub fn inode_pending(&self, ino: Ino) -> bool {
        self.touched.inodes.contains(&ino) || self.writing.contains(&ino)
    }

    fn inode(&self, tx: &Tx<'_>, vfs: &Vfs, ino: Ino, id: ObjectId) -> rusqlite::Result<bool> {
        Ok(self.touched.inodes.contains(&ino)
            || self.writing.contains(&ino)
            || vfs.has_writers(ino)
            || tx.in_conflict(&inode_key(id))?)
    }

    fn name(&self, tx: &Tx<'_>, parent: Ino, name: &[u8], key: &[u8]) -> rusqlite::Result<bool> {
        Ok(self.touched.names.contains(&(parent, name.to_vec())) || tx.in_conflict(key)?)
    }

    /// Whether this host deleted `id` and the next batch ships that
    /// deletion (it is gone here and, as far as this host knows, still at
    /// the backend: what the shipper's snapshot sends as `DeleteInode`).
    fn deletes(&self, tx: &Tx<'_>, id: ObjectId) -> rusqlite::Result<bool> {
        Ok(self.touched.deleted.contains(&(id.host, id.counter))
            && tx.ino_of(id.host, id.counter)?.is_none()
            && tx.remote_version(&inode_key(id))?.is_some())
    }
}

/// Applies `remote` to the store in `tx`, skipping (and queueing for a
/// recheck) whatever has local changes pending, except the keys in
/// `force`, whose local changes conflict resolution has already preserved.
pub(super) fn pull(
    tx: &Tx<'_>,
    vfs: &Vfs,
    remote: &RemoteState,
    force: &HashSet<Vec<u8>>,
) -> rusqlite::Result<Effects> {
    let was = tx.pulling(true);
    let mut p = Pull {
        tx,
        vfs,
        remote,
        force,
        dirty: Dirty::read(tx)?,
        fx: Effects::default(),
        relink: BTreeSet::new(),
        gone: BTreeSet::new(),
    };
    p.inodes()?;
    p.names()?;
    p.orphans()?;
    tx.pulling(was);
    Ok(p.fx)
}

/// One pull in progress (see [`pull`]).
struct Pull<'a, 't> {
    tx: &'a Tx<'t>,
    vfs: &'a Vfs,
    remote: &'a RemoteState,
    force: &'a HashSet<Vec<u8>>,
    dirty: Dirty,
    fx: Effects,
    /// Inodes whose names changed: link counts to recount, and maybe
    /// orphans.
    relink: BTreeSet<Ino>,
    /// Local inodes the backend deleted.
    gone: BTreeSet<Ino>,
}

/// A name to add: (its key, local directory, name, the backend's entry).
type Add = (Vec<u8>, Ino, Vec<u8>, Entry);

impl Pull<'_, '_> {
    /// The key is settled: no recheck, no conflict left.
    fn settled(&mut self, key: &[u8]) -> rusqlite::Result<()> {
        self.tx.remove_recheck(key)?;
        if self.force.contains(key) {
            self.tx.clear_conflict(key)?;
        }
        self.fx.applied += 1;
        Ok(())
    }

    /// Inodes this host has: their new state, or their deletion.
    fn inodes(&mut self) -> rusqlite::Result<()> {
        let tx = self.tx;
        for (&id, state) in &self.remote.inodes {
            let key = inode_key(id);
            let forced = self.force.contains(&key);
            let Some(ino) = tx.ino_of(id.host, id.counter)? else {
                // Not here: imported only with a name (below). Its backend
                // version stays: if this host deleted it, the shipper
                // needs it as the base of that deletion.
                tx.remove_recheck(&key)?;
                if forced {
                    tx.clear_conflict(&key)?;
                }
                continue;
            };
            if !forced && self.dirty.inode(tx, self.vfs, ino, id)? {
                tx.add_recheck(&key)?;
                continue;
            }
            let rv = tx.remote_version(&key)?;
            // Forgotten here (no name left, its version cleared): as if not
            // here. Imported now, it would look known to the name that
            // brings it back, and a directory's entries, dropped when it
            // was forgotten, would never be listed again.
            let forgotten = rv.is_none() && !named_here(tx, ino)?;
            match state {
                Some(_) if forgotten => {
                    tx.remove_recheck(&key)?;
                    if forced {
                        tx.clear_conflict(&key)?;
                    }
                }
                // Already here, or this host's own write: the store has it
                // (or something newer) already.
                Some(st)
                    if !forced
                        && (rv.is_some_and(|v| v >= st.version) || st.origin == tx.host()) =>
                {
                    tx.remove_recheck(&key)?;
                }
                Some(st) => {
                    import(tx, self.vfs, st, Some(ino), &mut self.fx)?;
                    self.settled(&key)?;
                }
                None if rv.is_some() || forced => {
                    self.gone.insert(ino);
                    tx.set_remote_version(&key, None)?;
                    self.settled(&key)?;
                }
                None => tx.remove_recheck(&key)?,
            }
        }
        Ok(())
    }

    /// Names: removals first, so a rename's new name finds its directory
    /// free of the old one; then the adds. Names in directories this host
    /// does not have yet wait until an add has brought their directory, so
    /// a new tree arrives whole in one round, however deep.
    fn names(&mut self) -> rusqlite::Result<()> {
        let tx = self.tx;
        let mut adds: Vec<Add> = Vec::new();
        let mut unplaced: Vec<(Vec<u8>, ObjectId, Vec<u8>, Entry)> = Vec::new();
        for ((pid, name), entry) in &self.remote.entries {
            let key = entry_key(*pid, name);
            if self.waits_for_deletion(&key, *pid, entry.as_ref())? {
                continue;
            }
            match (placed(tx, *pid)?, entry) {
                (Some(parent), _) => self.name(key, parent, name, entry.as_ref(), &mut adds)?,
                // A removal is applied wherever the directory is (one out
                // of the tree too: it only gets closer to the backend's).
                (None, None) => match tx.ino_of(pid.host, pid.counter)? {
                    Some(parent) => self.name(key, parent, name, None, &mut adds)?,
                    None => tx.remove_recheck(&key)?,
                },
                (None, Some(e)) => unplaced.push((key, *pid, name.clone(), e.clone())),
            }
        }
        // Bounded: each pass places at least one name or stops.
        loop {
            for add in std::mem::take(&mut adds) {
                self.add(add)?;
            }
            let before = unplaced.len();
            let mut waiting = Vec::new();
            for (key, pid, name, e) in unplaced {
                match placed(tx, pid)? {
                    Some(parent) => self.name(key, parent, &name, Some(&e), &mut adds)?,
                    None => waiting.push((key, pid, name, e)),
                }
            }
            unplaced = waiting;
            if adds.is_empty() || unplaced.len() == before {
                break;
            }
        }
        // Directories this host still does not have (or that are out of
        // the tree): their own names bring them, and their entries are
        // fetched again then.
        for (key, ..) in &unplaced {
            postpone(tx, key)?;
        }
        Ok(())
    }

    /// A name in, or naming, an object whose deletion here the next batch
    /// ships waits for that batch (and, if the backend refuses the
    /// deletion, for conflict resolution). Taken now, it would bring the
    /// object back as a new local inode that the pending log does not know
    /// (its records name the old one), so nothing holds its names back;
    /// the batch's record of the deletion then clears the backend versions
    /// of the names it removed, the backend's removal of them looks applied
    /// here, and this host keeps them for good.
    fn waits_for_deletion(
        &self,
        key: &[u8],
        pid: ObjectId,
        entry: Option<&Entry>,
    ) -> rusqlite::Result<bool> {
        if self.force.contains(key) {
            return Ok(false);
        }
        for id in std::iter::once(pid).chain(entry.map(|e| e.child)) {
            if self.dirty.deletes(self.tx, id)? {
                debug!("pull: {} waits: {id} was deleted here", show(key));
                self.tx.add_recheck(key)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One name the backend has (`entry`) or removed (`None`) in the local
    /// directory `parent`: a removal (of what the name names here) is done
    /// at once, an add goes to `adds`; what has changes of this host's
    /// pending waits.
    fn name(
        &mut self,
        key: Vec<u8>,
        parent: Ino,
        name: &[u8],
        entry: Option<&Entry>,
        adds: &mut Vec<Add>,
    ) -> rusqlite::Result<()> {
        let tx = self.tx;
        let forced = self.force.contains(&key);
        if !forced && self.dirty.name(tx, parent, name, &key)? {
            debug!("pull: {} waits: changed here", show(&key));
            return tx.add_recheck(&key);
        }
        let rv = tx.remote_version(&key)?;
        let current = tx.lookup(parent, name)?;
        let target = match entry {
            Some(e) => tx.ino_of(e.child.host, e.child.counter)?,
            None => None,
        };
        // Whether the name already names what the backend says.
        let linked = matches!((&current, target), (Some(c), Some(t)) if c.ino == t);
        // This host's own write is here already, unless this host forgot
        // the name since (its version cleared with a directory it forgot):
        // then the backend's entry brings it back. Either way only if the
        // name is here as the backend has it: with nothing of this host's
        // pending on it (above), anything else is a name this host lost
        // track of, and the backend's version brings it back.
        let known = match entry {
            Some(e) => linked && rv.is_some_and(|v| v >= e.version || e.origin == tx.host()),
            None => rv.is_none(),
        };
        if known && !forced {
            return tx.remove_recheck(&key);
        }
        if let Some(cur) = current.as_ref().filter(|_| !linked) {
            let changed_here = self
                .dirty
                .inode(tx, self.vfs, cur.ino, super::object_id(cur))?
                || self.dirty.holding.contains(&cur.ino);
            if !forced && changed_here {
                debug!(
                    "pull: {} waits: what it names here is changed here",
                    show(&key)
                );
                return tx.add_recheck(&key);
            }
            debug!("pull: {} no longer names inode {}", show(&key), cur.ino);
            tx.drop_entry(parent, name, cur.ino)?;
            self.relink.insert(cur.ino);
            self.relink.insert(parent);
            self.fx.removed.push((parent, name.to_vec(), cur.ino));
            // Its link count changed too, which the kernel caches.
            self.fx.inodes.extend([parent, cur.ino]);
        }
        match entry {
            Some(e) if !linked => adds.push((key, parent, name.to_vec(), e.clone())),
            _ => {
                tx.set_remote_version(&key, entry.map(|e| e.version))?;
                self.settled(&key)?;
            }
        }
        Ok(())
    }

    /// Adds one name the backend has, importing what it names if this host
    /// does not have it.
    fn add(&mut self, (key, parent, name, e): Add) -> rusqlite::Result<()> {
        let tx = self.tx;
        let known = tx.ino_of(e.child.host, e.child.counter)?;
        let forgotten = match known {
            Some(ino) => tx.remote_version(&inode_key(e.child))?.is_none() && !named_here(tx, ino)?,
            None => false,
        };
        let child = match known.filter(|_| !forgotten) {
            Some(ino) => {
                let inode = tx.inode(ino)?;
                if let Some(inode) = inode.filter(|i| i.kind() == Kind::Dir) {
                    // One name per directory: if it still has another, the
                    // change that frees it has not arrived (or waits here).
                    if !tx.names_of(inode.ino)?.is_empty() {
                        debug!(
                            "pull: {} waits: directory {} still has a name",
                            show(&key),
                            inode.ino
                        );
                        return postpone(tx, &key);
                    }
                }
                ino
            }
            // New here, or forgotten (kept only while the kernel held it,
            // its entries dropped): imported as the backend has it.
            None => match self.remote.inodes.get(&e.child) {
                Some(Some(st)) => {
                    let ino = import(tx, self.vfs, st, known, &mut self.fx)?;
                    if Kind::from_mode(st.mode) == Some(Kind::Dir) {
                        // A directory new here: whatever of its entries
                        // this answer lacks (it came back, or moved in with
                        // them) is fetched whole next round.
                        tx.add_recheck(&listing_key(st.id))?;
                    }
                    ino
                }
                // Gone meanwhile, or not fetched: try again next round.
                _ => {
                    debug!("pull: {} waits: its inode is not here", show(&key));
                    return postpone(tx, &key);
                }
            },
        };
        let is_dir = tx.inode(child)?.is_some_and(|i| i.kind() == Kind::Dir);
        if is_dir && tx.encloses(child, parent)? {
            // This host moved `parent` into the directory (a change still
            // to ship, or to be refused as a cycle): named there, the
            // directory would hold itself, cut off from the root.
            debug!(
                "pull: {} waits: directory {child} holds it here",
                show(&key)
            );
            return postpone(tx, &key);
        }
        if tx.lookup(parent, &name)?.is_some() {
            // Still taken: what holds it waits on a change of this host.
            debug!("pull: {} waits: the name is taken here", show(&key));
            return tx.add_recheck(&key);
        }
        debug!(
            "pull: {} names inode {child} ({}, version {}, origin {}){}",
            show(&key),
            e.child,
            e.version,
            e.origin,
            if forgotten { ", brought back" } else { "" }
        );
        tx.import_entry(parent, &name, child)?;
        self.gone.remove(&child);
        self.relink.insert(child);
        self.relink.insert(parent);
        self.fx.added.push((parent, name));
        self.fx.inodes.extend([parent, child]);
        tx.set_remote_version(&key, Some(e.version))?;
        self.settled(&key)
    }

    /// Link counts, then the inodes left without a name here: the backend
    /// has all of them.
    fn orphans(&mut self) -> rusqlite::Result<()> {
        let tx = self.tx;
        for &ino in &self.relink {
            tx.recount(ino)?;
        }
        let candidates: Vec<Ino> = self.relink.iter().chain(&self.gone).copied().collect();
        for ino in candidates {
            let Some(inode) = tx.inode(ino)? else {
                continue;
            };
            if ino == ROOT_INO || !tx.names_of(ino)?.is_empty() {
                continue;
            }
            forget(tx, &self.dirty, &inode, &mut self.fx)?;
        }
        for (_, _, child) in &self.fx.removed {
            let ended = match tx.inode(*child)? {
                Some(i) if !tx.names_of(i.ino)?.is_empty() => false,
                Some(i) => i.kind() != Kind::Dir || self.gone.contains(&i.ino),
                None => true,
            };
            if ended {
                self.fx.ended.insert(*child);
            }
        }
        Ok(())
    }
}

/// The local directory `pid` as a place for names: only while it has a
/// name here (or is the root). A directory that lost its last name (taken
/// away by a pull, or forgotten) is out of the tree until its own name
/// brings it back; names put into it meanwhile would only be dropped again
/// with it, round after round.
fn placed(tx: &Tx<'_>, pid: ObjectId) -> rusqlite::Result<Option<Ino>> {
    Ok(match tx.ino_of(pid.host, pid.counter)? {
        Some(ino) if named_here(tx, ino)? => Some(ino),
        _ => None,
    })
}

/// Whether `ino` is in this host's tree: the root, or named somewhere.
fn named_here(tx: &Tx<'_>, ino: Ino) -> rusqlite::Result<bool> {
    Ok(ino == ROOT_INO || !tx.names_of(ino)?.is_empty())
}

/// A name the backend has that this host lacks (never had, or just
/// dropped: a pulled removal, or conflict resolution moving this host's
/// name aside) waits for the next round. Its backend version goes: kept,
/// it could equal the backend's, and the name would look applied here
/// forever.
fn postpone(tx: &Tx<'_>, key: &[u8]) -> rusqlite::Result<()> {
    tx.set_remote_version(key, None)?;
    tx.add_recheck(key)
}

/// Drops the local copy of an inode the backend has all of (or deleted):
/// its backend version is cleared, so nothing ships for it, and it is
/// deleted once the kernel lets go (see [`Effects::orphans`]). A
/// directory's entries go with it, except what only this host has (a name
/// or an object never shipped, or one with changes pending): that moves to
/// `/lost+found`.
fn forget(tx: &Tx<'_>, dirty: &Dirty, inode: &Inode, fx: &mut Effects) -> rusqlite::Result<()> {
    debug!(
        "pull: forgetting inode {} ({})",
        inode.ino,
        inode.global_id()
    );
    if inode.kind() == Kind::Dir {
        let did = super::object_id(inode);
        // Bounded: each pass removes an entry.
        while let Some(e) = tx.entries(inode.ino, 0, 1)?.into_iter().next() {
            let child = &e.inode;
            if super::resolve::must_rescue(tx, dirty, child, &entry_key(did, &e.name))? {
                let to = super::resolve::rescue(tx, inode.ino, &e.name, child, fx)?;
                fx.rescued.push(to);
                continue;
            }
            tx.drop_entry(inode.ino, &e.name, child.ino)?;
            // Forgotten with its directory: if the backend still has the
            // name, a listing brings it back.
            tx.set_remote_version(&entry_key(did, &e.name), None)?;
            fx.removed.push((inode.ino, e.name.clone(), child.ino));
            fx.inodes.insert(child.ino);
            tx.recount(child.ino)?;
            if tx.names_of(child.ino)?.is_empty() {
                forget(tx, dirty, child, fx)?;
            }
        }
    }
    tx.set_remote_version(&inode_key(super::object_id(inode)), None)?;
    fx.orphans.insert(inode.ino);
    Ok(())
}

/// Writes the backend's state of an inode into the store (a new local
/// inode if `local` is `None`); returns its local number. A regular file
/// whose chunks changed becomes uncached: its bytes are fetched on open.
fn import(
    tx: &Tx<'_>,
    vfs: &Vfs,
    st: &InodeState,
    local: Option<Ino>,
    fx: &mut Effects,
) -> rusqlite::Result<Ino> {
    let kind = Kind::from_mode(st.mode);
    let chunks: super::ChunkList = st.chunks.clone();
    let old = match local {
        Some(ino) => tx.inode(ino)?,
        None => None,
    };
    let same_bytes = match &old {
        Some(o) if kind == Some(Kind::File) => o.cached && tx.chunks(o.ino)? == chunks,
        _ => false,
    };
    let inode = Inode {
        ino: Ino(0),
        host: st.id.host,
        counter: st.id.counter,
        mode: st.mode,
        uid: st.uid,
        gid: st.gid,
        nlink: 0,
        size: st.size,
        atime: st.atime_ns,
        mtime: st.mtime_ns,
        ctime: st.ctime_ns,
        crtime: st.ctime_ns,
        rdev: st.rdev,
        version: 1,
        cached: kind != Some(Kind::File) || same_bytes,
    };
    let ino = tx.import_inode(&inode, st.target.as_deref())?;
    tx.import_xattrs(ino, &st.xattrs)?;
    if kind == Some(Kind::File) {
        tx.set_chunks(ino, &chunks)?;
        if same_bytes {
            // The data file holds the bytes and stands for the mtime.
            set_data_mtime(vfs, ino, st.mtime_ns);
        } else {
            fx.fetchable.insert(ino);
            if vfs.is_open(ino) {
                fx.refresh.insert(ino);
            }
        }
    }
    tx.set_remote_version(&inode_key(st.id), Some(st.version))?;
    fx.inodes.insert(ino);
    Ok(ino)
}

fn set_data_mtime(vfs: &Vfs, ino: Ino, mtime: i64) {
    let path = vfs.store().data_path(ino);
    if let Ok(f) = std::fs::File::options().write(true).open(&path) {
        if let Err(e) = f.set_modified(crate::vfs::to_system_time(mtime)) {
            debug!("mtime of {}: {e}", path.display());
        }
    }
}

/// Tells the kernel, and the data files, what a committed pull changed;
/// the names it changed (marked in `unsettling`) are settled once the
/// kernel's entries for them are gone.
pub(super) fn settle(
    vfs: &Vfs,
    notifier: Option<&fuser::Notifier>,
    fetcher: &Fetcher,
    fx: &Effects,
    unsettling: Unsettling<'_>,
) {
    if let Some(n) = notifier {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        for (parent, name, child) in &fx.removed {
            let name = OsStr::from_bytes(name);
            // `delete` also tells inotify watchers, but the kernel takes it
            // as the end of the inode, so only for what ended here (see
            // `Effects::ended`). It fails if the kernel holds another inode
            // under the name; then, and for the rest, a plain invalidation
            // does.
            if !fx.ended.contains(child)
                || n.delete((*parent).into(), (*child).into(), name).is_err()
            {
                let _ = n.inval_entry((*parent).into(), name);
            }
        }
        for (parent, name) in &fx.added {
            let _ = n.inval_entry((*parent).into(), OsStr::from_bytes(name));
        }
    }
    drop(unsettling);
    for &ino in &fx.refresh {
        if let Err(e) = fetcher.refresh(vfs, ino) {
            warn!("down-sync: fetching the new contents of open inode {ino}: {e}");
        }
    }
    if let Some(n) = notifier {
        for &ino in &fx.inodes {
            // Attributes, and every cached page: offset 0, length 0 (to
            // the end).
            let _ = n.inval_inode(ino.into(), 0, 0);
        }
    }
    for &ino in &fx.orphans {
        vfs.delete_if_forgotten(ino);
    }
}

/// The down-sync thread.
pub(super) struct Applier {
    pub vfs: Arc<Vfs>,
    pub link: Arc<Link>,
    pub shared: Arc<Shared>,
    pub notifier: NotifierSlot,
    pub fetcher: Arc<Fetcher>,
}

impl Applier {
    pub fn run(&self) {
        let mut backoff = Backoff::new();
        let mut more = true;
        while !self.shared.stop.load(Ordering::SeqCst) {
            // Down-sync starts once the shipper has checked that the
            // backend is this store's volume (and relearned a batch in
            // flight): before that, nothing may be taken from it.
            if !self.shared.verified() || self.shared.down_paused.load(Ordering::SeqCst) {
                self.shared.pause(Duration::from_millis(50));
                continue;
            }
            let round = self.link.get().map_err(ReplError::from).and_then(|b| {
                if !more {
                    // Woken by the backend's signal, or after POLL anyway:
                    // the rechecks get their turn either way.
                    b.wait_feed(self.cursor()?, POLL)?;
                }
                // Paused meanwhile: the round is skipped (see
                // `Shared::pause_down_sync`).
                self.shared.numbered_round(|| {
                    match self.shared.down_paused.load(Ordering::SeqCst) {
                        true => Ok(false),
                        false => self.round(&*b),
                    }
                })
            });
            match round {
                Ok(m) => {
                    more = m;
                    backoff.reset();
                }
                Err(e) => {
                    warn!("down-sync: {e}; retrying");
                    self.failed(&e);
                    more = true;
                    self.shared.pause(backoff.step());
                }
            }
        }
    }

    /// One round now, for a caller that waits for it (see
    /// [`Shared::fresh`]); it learns the outcome from the round's number.
    pub fn round_on_demand(&self) {
        let round = self
            .link
            .get()
            .map_err(ReplError::from)
            .and_then(|b| self.shared.numbered_round(|| self.round(&*b)));
        if let Err(e) = round {
            warn!("down-sync on demand: {e}");
            self.failed(&e);
        }
    }

    /// After a failed round: a fresh connection may cure what a transient
    /// error does not explain.
    fn failed(&self, e: &ReplError) {
        if let ReplError::Backend(b) = e {
            if !b.is_transient() {
                self.link.reset();
            }
        }
    }

    /// The feed position this store has applied; kept with the store, in
    /// the transaction of each round, so rounds on any thread follow on.
    fn cursor(&self) -> Result<u64, ReplError> {
        let seq = self.vfs.store().read(|r| r.meta_int("feed_seq"))?;
        Ok(seq.unwrap_or(0) as u64)
    }

    /// One round: fetch, apply, settle. Returns whether to go again at
    /// once. Rounds run one at a time ([`Shared::numbered_round`]).
    fn round(&self, backend: &dyn Backend) -> Result<bool, ReplError> {
        let cursor = self.cursor()?;
        let store = self.vfs.store();
        // Shipping and pulling take turns: a key's backend version is
        // recorded by one of them at a time (see `Shared::exchange`).
        let _turn = self.shared.exchange();
        let changes = backend.changes(cursor, ROUND)?;
        let rechecks = store.read(|r| r.rechecks(RECHECKS))?;
        if changes.seq == cursor
            && changes.inodes.is_empty()
            && changes.entries.is_empty()
            && rechecks.is_empty()
        {
            return Ok(false);
        }
        let mut remote = RemoteState::default();
        for (id, st) in changes.inodes {
            remote.inodes.insert(id, st);
        }
        for (parent, name, e) in changes.entries {
            remote.entries.insert((parent, name), e);
        }
        remote.fetch_keys(backend, &rechecks)?;
        remote.fetch_children(backend, |id| known_here(store, id))?;
        remote.expand(backend, |id| known_here(store, id))?;
        let seq = changes.seq.max(cursor);
        let unsettling = self.vfs.unsettling();
        let fx = store.write(|tx| -> rusqlite::Result<Effects> {
            // A listing is done once fetched: its entries are keys of
            // their own from here on.
            for key in &rechecks {
                if matches!(decode_key(key), Some(Key::Listing(_))) {
                    tx.remove_recheck(key)?;
                }
            }
            let fx = pull(tx, &self.vfs, &remote, &HashSet::new())?;
            tx.set_meta_int("feed_seq", seq as i64)?;
            unsettling.mark(tx, fx.names());
            Ok(fx)
        })?;
        drop(_turn);
        if fx.applied > 0 {
            info!(
                "down-sync: applied {} remote change(s), feed at {seq}",
                fx.applied
            );
        }
        self.shared.update(|s| s.applied += fx.applied);
        settle(
            &self.vfs,
            self.notifier.get(),
            &self.fetcher,
            &fx,
            unsettling,
        );
        self.fetcher.prefetch(&self.vfs, &fx.fetchable);
        // Again at once while the feed has more, or while rechecks are
        // making progress (one may unblock another).
        Ok(changes.more || (fx.applied > 0 && !rechecks.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewInode, Store};
    use fuser::Errno;

    /// A store with its file system in a fresh directory, removed on drop.
    struct Scratch {
        dir: std::path::PathBuf,
        vfs: Option<Vfs>,
    }

    impl Scratch {
        fn new(what: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "ferry-apply-{what}-{}-{}",
                std::process::id(),
                crate::store::now()
            ));
            let store = Store::open(&dir).expect("a fresh store");
            let vfs = Vfs::new(store, false).expect("a file system on it");
            Scratch {
                dir,
                vfs: Some(vfs),
            }
        }

        fn vfs(&self) -> &Vfs {
            self.vfs.as_ref().expect("open until dropped")
        }

        /// Makes the directory `parent/name`, as if it had shipped long
        /// ago: its inode and name at version 1 at the backend, nothing
        /// pending.
        fn shipped_dir(&self, parent: Ino, name: &[u8]) -> Inode {
            self.shipped(parent, name, libc::S_IFDIR | 0o755)
        }

        /// [`Scratch::shipped_dir`] for any `mode`.
        fn shipped(&self, parent: Ino, name: &[u8], mode: u32) -> Inode {
            self.vfs()
                .store()
                .write(|tx| -> rusqlite::Result<Inode> {
                    let new = NewInode {
                        mode,
                        uid: 0,
                        gid: 0,
                        rdev: 0,
                        target: None,
                    };
                    let dir = tx.create(parent, name, &new, None)?;
                    let pid = match tx.inode(parent)? {
                        Some(p) if parent != ROOT_INO => super::super::object_id(&p),
                        _ => ObjectId::ROOT,
                    };
                    tx.set_remote_version(&inode_key(super::super::object_id(&dir)), Some(1))?;
                    tx.set_remote_version(&entry_key(pid, name), Some(1))?;
                    if let Some(last) = Outbox::pending(tx, usize::MAX >> 1)?.last() {
                        Outbox::advance(tx, last.seq)?;
                    }
                    Ok(dir)
                })
                .expect("make a directory")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            drop(self.vfs.take());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The backend's state of a directory another host (7) changed.
    fn theirs_dir(id: ObjectId, version: u64) -> InodeState {
        InodeState {
            version,
            origin: 7,
            ..InodeState::new(id, libc::S_IFDIR | 0o755)
        }
    }

    /// Puts into `remote` the backend's name `parent/name` for `child`, at
    /// `version`, as another host (7) made it.
    fn name_theirs(
        remote: &mut RemoteState,
        parent: ObjectId,
        name: &[u8],
        child: ObjectId,
        version: u64,
    ) {
        let entry = Entry {
            parent,
            name: name.to_vec(),
            child,
            version,
            origin: 7,
        };
        remote.entries.insert((parent, name.to_vec()), Some(entry));
    }

    #[test]
    fn what_the_next_batch_ships_waits() {
        let s = Scratch::new("revived");
        // Here: /d/x, both at the backend, and x revived (conflict
        // resolution relogged it), so the next batch ships x with every
        // name it has now: d/x, and with it d's state. Another host changed
        // d's attributes. Pulled now, between the batch's read and its
        // commit, they would be overwritten at the backend by the state the
        // batch read (a directory's attributes rebase), and this host would
        // record that version as its own while keeping the pulled ones.
        let d = s.shipped_dir(ROOT_INO, b"d");
        let x = s.shipped_dir(d.ino, b"x");
        let did = super::super::object_id(&d);
        let store = s.vfs().store();
        store.write(|tx| tx.relog(x.ino)).expect("revive x");
        let mut remote = RemoteState::default();
        let theirs = InodeState {
            xattrs: vec![(b"user.k".to_vec(), b"theirs".to_vec())],
            ..theirs_dir(did, 2)
        };
        remote.inodes.insert(did, Some(theirs));
        store
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("pull");
        let (xattr, version, rechecks) = store
            .read(|r| {
                Ok::<_, rusqlite::Error>((
                    r.xattr(d.ino, b"user.k")?,
                    r.remote_version(&inode_key(did))?,
                    r.rechecks(100)?,
                ))
            })
            .expect("read back");
        assert_eq!(
            (xattr, version),
            (None, Some(1)),
            "d took the other host's state while the next batch ships d as it was"
        );
        assert!(
            rechecks.contains(&inode_key(did)),
            "d is tried again once the batch is recorded: {rechecks:?}"
        );
    }

    #[test]
    fn a_pull_never_puts_a_directory_inside_itself() {
        let s = Scratch::new("cycle");
        // Here: /d/p. At the backend, d went into p (p's own move out of d
        // not in this answer: it waits, or was not asked for), which is
        // what a forced pull of conflict resolution may see.
        let d = s.shipped_dir(ROOT_INO, b"d");
        let p = s.shipped_dir(d.ino, b"p");
        let (did, pid) = (super::super::object_id(&d), super::super::object_id(&p));
        let mut remote = RemoteState::default();
        remote.entries.insert((ObjectId::ROOT, b"d".to_vec()), None);
        name_theirs(&mut remote, pid, b"x", did, 1);
        remote.inodes.insert(did, Some(theirs_dir(did, 2)));
        let store = s.vfs().store();
        store
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("pull");
        let (named, rechecks) = store
            .read(|r| Ok::<_, rusqlite::Error>((r.lookup(p.ino, b"x")?, r.rechecks(100)?)))
            .expect("read back");
        assert!(
            named.is_none(),
            "d was named inside p, its own child: a cycle cut off from the root"
        );
        assert!(
            rechecks.contains(&entry_key(pid, b"x")),
            "the name waits for the next round: {rechecks:?}"
        );
    }

    #[test]
    fn a_name_recorded_as_applied_but_missing_here_comes_back() {
        let s = Scratch::new("stale");
        // Here: /d, empty, but the store records d/f at the backend's
        // version (it was moved aside here, and the move then undone by
        // conflict resolution, say): the backend's d/f is not "known".
        let d = s.shipped_dir(ROOT_INO, b"d");
        let did = super::super::object_id(&d);
        let f = ObjectId {
            host: 7,
            counter: 1,
        };
        let store = s.vfs().store();
        store
            .write(|tx| tx.set_remote_version(&entry_key(did, b"f"), Some(1)))
            .expect("record d/f");
        let mut remote = RemoteState::default();
        name_theirs(&mut remote, did, b"f", f, 1);
        remote.inodes.insert(
            f,
            Some(InodeState {
                version: 1,
                origin: 7,
                ..InodeState::new(f, libc::S_IFREG | 0o644)
            }),
        );
        store
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("pull");
        let named = store
            .read(|r| Ok::<_, rusqlite::Error>(r.lookup(d.ino, b"f")?.map(|i| i.global_id())))
            .expect("read back");
        assert!(named.is_some(), "d/f looked applied and never came back");
    }

    #[test]
    fn a_forgotten_directory_comes_back_whole() {
        let s = Scratch::new("forgotten");
        // Here: d was forgotten (a pull took its name; its entries went
        // with it). The backend names it again, with its state changed by
        // another host: it must come back listed whole, not as an empty
        // directory that looks up to date.
        let d = s.shipped_dir(ROOT_INO, b"d");
        s.shipped_dir(d.ino, b"sub");
        let did = super::super::object_id(&d);
        let store = s.vfs().store();
        store
            .write(|tx| -> rusqlite::Result<()> {
                let was = tx.pulling(true);
                tx.drop_entry(ROOT_INO, b"d", d.ino)?;
                tx.recount(d.ino)?;
                let mut fx = Effects::default();
                forget(tx, &Dirty::read(tx)?, &d, &mut fx)?;
                tx.pulling(was);
                Ok(())
            })
            .expect("forget d");
        let mut remote = RemoteState::default();
        name_theirs(&mut remote, ObjectId::ROOT, b"d", did, 2);
        remote.inodes.insert(did, Some(theirs_dir(did, 2)));
        store
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("pull");
        let (named, rechecks) = store
            .read(|r| Ok::<_, rusqlite::Error>((r.lookup(ROOT_INO, b"d")?, r.rechecks(100)?)))
            .expect("read back");
        assert_eq!(named.map(|i| i.ino), Some(d.ino), "d is back");
        assert!(
            rechecks.contains(&listing_key(did)),
            "d's entries are listed next round: {rechecks:?}"
        );
    }

    #[test]
    fn a_pulled_link_tells_the_kernel_the_new_link_count() {
        let s = Scratch::new("nlink");
        // Here: /f. At the backend, f got a second name, /g: f's link
        // count changes, and the kernel, which caches it for a minute,
        // must be told.
        let f = s.shipped(ROOT_INO, b"f", libc::S_IFREG | 0o644);
        let fid = super::super::object_id(&f);
        let mut remote = RemoteState::default();
        name_theirs(&mut remote, ObjectId::ROOT, b"g", fid, 1);
        let store = s.vfs().store();
        let fx = store
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("pull");
        let nlink = store
            .read(|r| r.inode(f.ino))
            .expect("read back")
            .map(|i| i.nlink);
        assert_eq!(nlink, Some(2));
        assert!(fx.inodes.contains(&f.ino), "f's attributes stay cached");
    }

    #[test]
    fn only_what_ended_here_is_told_to_the_kernel_as_deleted() {
        let s = Scratch::new("ended");
        // Here: /d/x (a directory) and /f. At the backend, another host
        // moved x to /y and deleted f: f ended here, x only moved. Told
        // "deleted", the kernel would mark x dead for as long as it keeps
        // it, and list it empty at /y.
        let d = s.shipped_dir(ROOT_INO, b"d");
        let x = s.shipped_dir(d.ino, b"x");
        let f = s.shipped(ROOT_INO, b"f", libc::S_IFREG | 0o644);
        let (did, xid) = (super::super::object_id(&d), super::super::object_id(&x));
        let mut remote = RemoteState::default();
        remote.entries.insert((did, b"x".to_vec()), None);
        name_theirs(&mut remote, ObjectId::ROOT, b"y", xid, 1);
        remote.entries.insert((ObjectId::ROOT, b"f".to_vec()), None);
        let fx = s
            .vfs()
            .store()
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("pull");
        let removed: BTreeSet<Ino> = fx.removed.iter().map(|r| r.2).collect();
        assert_eq!(removed, BTreeSet::from([x.ino, f.ino]));
        assert_eq!(fx.ended, BTreeSet::from([f.ino]), "x lives on at /y");
    }

    #[test]
    fn a_name_pulled_under_the_kernel_is_not_removed_until_settled() {
        let s = Scratch::new("unsettled");
        // Here: /d and /o, directories, and /f. At the backend, another
        // host moved d to /y and made a new directory, z, named d. Until
        // the kernel's entry for d is invalidated, it may still map d to
        // the old directory: an rmdir of d, or a rename onto or from it,
        // would act on z here while the kernel took it as the end of the
        // old d (now /y), which it would then list empty.
        let d = s.shipped_dir(ROOT_INO, b"d");
        let o = s.shipped_dir(ROOT_INO, b"o");
        s.shipped(ROOT_INO, b"f", libc::S_IFREG | 0o644);
        let did = super::super::object_id(&d);
        let z = ObjectId {
            host: 7,
            counter: 1,
        };
        let mut remote = RemoteState::default();
        let vfs = s.vfs();
        name_theirs(&mut remote, ObjectId::ROOT, b"d", z, 1);
        name_theirs(&mut remote, ObjectId::ROOT, b"y", did, 1);
        remote.inodes.insert(z, Some(theirs_dir(z, 1)));
        let unsettling = vfs.unsettling();
        vfs.store()
            .write(|tx| {
                let fx = pull(tx, vfs, &remote, &HashSet::new())?;
                unsettling.mark(tx, fx.names());
                Ok::<_, rusqlite::Error>(fx)
            })
            .expect("pull");
        let at_d = || {
            vfs.store()
                .read(|r| r.lookup(ROOT_INO, b"d"))
                .expect("read")
        };
        let new_d = at_d().expect("z took the name d").ino;
        assert_ne!(new_d, d.ino);
        assert_eq!(vfs.remove(ROOT_INO, b"d", true), Err(Errno::ENOENT));
        assert_eq!(
            vfs.rename(ROOT_INO, b"d", ROOT_INO, b"q", 0),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            vfs.rename(ROOT_INO, b"o", ROOT_INO, b"d", 0),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            vfs.rename(ROOT_INO, b"y", ROOT_INO, b"q", 0),
            Err(Errno::ENOENT)
        );
        assert_eq!(at_d().map(|i| i.ino), Some(new_d), "z still named d");
        // Names the pull did not change are not held up.
        assert_eq!(vfs.remove(ROOT_INO, b"f", false), Ok(()));
        // Settled (the kernel's entries invalidated): the ops go ahead, on
        // what the names name now.
        drop(unsettling);
        assert_eq!(vfs.rename(ROOT_INO, b"o", ROOT_INO, b"d", 0), Ok(()));
        assert_eq!(at_d().map(|i| i.ino), Some(o.ino), "o replaced empty z");
        let y = vfs
            .store()
            .read(|r| r.lookup(ROOT_INO, b"y"))
            .expect("read");
        assert_eq!(y.map(|i| i.ino), Some(d.ino), "the old d lives on at /y");
        // A round whose transaction failed leaves nothing unsettled.
        let failed = vfs.unsettling();
        let _ = vfs.store().write(|tx| -> rusqlite::Result<()> {
            failed.mark(tx, [(ROOT_INO, &b"y"[..])]);
            Err(rusqlite::Error::InvalidQuery)
        });
        drop(failed);
        assert_eq!(vfs.rename(ROOT_INO, b"y", ROOT_INO, b"q", 0), Ok(()));
    }

    #[test]
    fn what_this_host_deleted_is_not_brought_back_before_the_deletion_ships() {
        let s = Scratch::new("deleted");
        // Here: /a/b, directories at the backend; then rmdir a/b and rmdir
        // a, not shipped yet. Meanwhile another host moved a to /y, so the
        // deletion of a will be refused (its state changed) and the one of
        // b applied. A pull between the batch's read and its commit that
        // brought a and b back, as new local inodes the log knows nothing
        // of, would keep y/b here for good: the batch's record of the
        // deletions clears the backend versions of a/b and of b, and the
        // backend's removal of them then looks applied already.
        let a = s.shipped_dir(ROOT_INO, b"a");
        let b = s.shipped_dir(a.ino, b"b");
        let (aid, bid) = (super::super::object_id(&a), super::super::object_id(&b));
        let store = s.vfs().store();
        store
            .write(|tx| -> rusqlite::Result<()> {
                tx.unlink(a.ino, b"b", &b)?;
                tx.delete(b.ino)?;
                let a = tx.inode(a.ino)?.expect("a is here");
                tx.unlink(ROOT_INO, b"a", &a)?;
                tx.delete(a.ino)
            })
            .expect("rmdir a/b, then a");
        let mut remote = RemoteState::default();
        name_theirs(&mut remote, ObjectId::ROOT, b"y", aid, 1);
        name_theirs(&mut remote, aid, b"b", bid, 1);
        remote.inodes.insert(aid, Some(theirs_dir(aid, 2)));
        remote.inodes.insert(bid, Some(theirs_dir(bid, 1)));
        store
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("the pull before the batch's commit");
        // The batch's record: a/b and b deleted at the backend (a's
        // deletion refused, a conflict that keeps the backend's a).
        store
            .write(|tx| -> rusqlite::Result<()> {
                tx.set_remote_version(&entry_key(aid, b"b"), None)?;
                tx.set_remote_version(&inode_key(bid), None)?;
                let last = Outbox::pending(tx, usize::MAX >> 1)?.last().map(|r| r.seq);
                Outbox::advance(tx, last.expect("the deletions were logged"))
            })
            .expect("record the batch");
        // The next round: a at /y, without b.
        let mut feed = RemoteState::default();
        name_theirs(&mut feed, ObjectId::ROOT, b"y", aid, 1);
        feed.entries.insert((aid, b"b".to_vec()), None);
        feed.inodes.insert(aid, Some(theirs_dir(aid, 2)));
        feed.inodes.insert(bid, None);
        store
            .write(|tx| pull(tx, s.vfs(), &feed, &HashSet::new()))
            .expect("the next round");
        let (y, in_y, b_here) = store
            .read(|r| -> rusqlite::Result<_> {
                let y = r.lookup(ROOT_INO, b"y")?;
                let in_y = match &y {
                    Some(y) => r.entries(y.ino, 0, 100)?.len(),
                    None => 0,
                };
                Ok((y, in_y, r.ino_of(bid.host, bid.counter)?))
            })
            .expect("read back");
        assert_eq!(
            y.as_ref().map(super::super::object_id),
            Some(aid),
            "a is at /y"
        );
        assert_eq!(
            (in_y, b_here),
            (0, None),
            "y/b, deleted here and at the backend, is still here"
        );
    }

    #[test]
    fn names_wait_for_a_directory_that_lost_its_name() {
        let s = Scratch::new("nameless");
        // Here: /d. At the backend, d is gone from / (its new name not in
        // this answer) and has a new entry: it waits until d is back in
        // the tree, instead of being put into a directory no one sees.
        let d = s.shipped_dir(ROOT_INO, b"d");
        let did = super::super::object_id(&d);
        let f = ObjectId {
            host: 7,
            counter: 1,
        };
        let mut remote = RemoteState::default();
        remote.entries.insert((ObjectId::ROOT, b"d".to_vec()), None);
        name_theirs(&mut remote, did, b"f", f, 1);
        remote.inodes.insert(
            f,
            Some(InodeState {
                version: 1,
                origin: 7,
                ..InodeState::new(f, libc::S_IFREG | 0o644)
            }),
        );
        let store = s.vfs().store();
        store
            .write(|tx| pull(tx, s.vfs(), &remote, &HashSet::new()))
            .expect("pull");
        let (named, known) = store
            .read(|r| {
                Ok::<_, rusqlite::Error>((r.lookup(d.ino, b"f")?, r.ino_of(f.host, f.counter)?))
            })
            .expect("read back");
        assert!(
            named.is_none() && known.is_none(),
            "f was put into nameless d"
        );
    }
}
