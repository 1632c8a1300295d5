//! Conflict resolution: the same on every host, and nothing lost.
//!
//! The backend orders all commits, so the rule is simply: **the version
//! that reached the backend first keeps its place; the later one is kept
//! beside it.** Only the host whose commit was refused acts, so every host
//! sees the same outcome: the loser's version ships as new objects and
//! arrives everywhere through down-sync. Concretely, for the object of a
//! refused op:
//!
//! - **The same file changed on two hosts** (contents, or a name created on
//!   both): this host's version gets a new identity and the name
//!   `NAME.conflict-HOST-TIMESTAMP` (HOST is this host's name, TIMESTAMP
//!   the resolution's time, UTC); the other version takes the name. A
//!   change of attributes alone (chmod, touch) yields to the other host's
//!   version, which is logged.
//! - **Deleted on another host, changed here:** the change survives, under
//!   its name, as a new object (a file's bytes are never dropped because
//!   someone deleted an older version of them).
//! - **Changed on another host, deleted here:** the other host's version
//!   comes back.
//! - **A directory deleted on another host while this host put something
//!   in it** (a new file, a move into it): the deletion stands, and what
//!   this host put there moves to `/lost+found` (created when needed).
//! - **A directory moved to two places, or moves that would make a
//!   cycle:** the move that reached the backend first stands; this host's
//!   is undone.
//!
//! Each resolution is logged and recorded in the store, where `ferry
//! status` lists it with its path and what was done. A file still open for
//! writing here is resolved once it is closed (its writes may still be
//! arriving); until then it is held back, and counted as a conflict.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_backend::{Backend, ChunkHash, ObjectId};
use tracing::warn;

use super::apply::{pull, Dirty, Effects, RemoteState};
use super::{decode_key, entry_key, inode_key, object_id, Key, ReplError};
use crate::ids::Ino;
use crate::store::{Inode, Kind, NewInode, Queries, Tx, ROOT_INO};
use crate::unsettled::Unsettling;
use crate::vfs::Vfs;

/// Where orphans go when their directory is gone.
pub(super) const LOST_FOUND: &[u8] = b"lost+found";

/// Settles the conflicts on `keys` (the store's key encoding): fetches the
/// backend's state of each and of what it needs, then, in one transaction,
/// keeps this host's side where the rule says so and pulls the rest.
/// Returns what changed, for the kernel.
///
/// `ours` has the chunk lists this host just tried to ship for files (a
/// file without one, resolved later, counts as changed if it has bytes
/// here).
pub(super) fn resolve(
    vfs: &Vfs,
    unsettling: &Unsettling<'_>,
    backend: &dyn Backend,
    keys: &[Vec<u8>],
    ours: &HashMap<Vec<u8>, Vec<(ChunkHash, u32)>>,
) -> Result<Effects, ReplError> {
    let store = vfs.store();
    // The backend's side: the keys, the names of conflicting inodes here
    // (so the winner can take them), and the directories of conflicting
    // names (gone or not).
    let mut wanted: Vec<Vec<u8>> = keys.to_vec();
    store.read(|r| -> rusqlite::Result<()> {
        for key in keys {
            match decode_key(key) {
                Some(Key::Inode(id)) => {
                    if let Some(ino) = r.ino_of(id.host, id.counter)? {
                        for (p, n) in r.names_of(ino)? {
                            if let Some(dir) = r.inode(p)? {
                                wanted.push(entry_key(object_id(&dir), &n));
                            }
                        }
                    }
                }
                Some(Key::Entry(parent, _)) => wanted.push(inode_key(parent)),
                Some(Key::Listing(_)) | None => {}
            }
        }
        Ok(())
    })?;
    let mut remote = RemoteState::default();
    remote.fetch_keys(backend, &wanted)?;
    remote.fetch_children(backend, |id| super::apply::known_here(store, id))?;
    remote.expand(backend, |id| super::apply::known_here(store, id))?;
    let label = host_label();
    let fx = store.write(|tx| -> rusqlite::Result<Effects> {
        let cx = Cx {
            tx,
            vfs,
            remote: &remote,
            label: &label,
            ours,
            moved: RefCell::default(),
        };
        let mut force: HashSet<Vec<u8>> = HashSet::new();
        // Inodes first: resolving one decides its names too (they go to
        // the other host's version, or with the deletion that stands), and
        // a name decided so is not resolved again on its own (that would
        // move aside, say, a directory whose deletion stands, leaving it
        // named here and gone at the backend).
        let (inodes, names): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = keys
            .iter()
            .partition(|k| matches!(decode_key(k), Some(Key::Inode(_))));
        for key in inodes.into_iter().chain(names) {
            let settled = match decode_key(key) {
                Some(Key::Inode(id)) => cx.inode_conflict(id)?,
                Some(Key::Entry(..)) if force.contains(key) => Settled::Pull(Vec::new()),
                Some(Key::Entry(parent, name)) => cx.entry_conflict(parent, &name)?,
                Some(Key::Listing(_)) | None => Settled::Keep,
            };
            match settled {
                Settled::Wait => {}
                Settled::Keep => tx.clear_conflict(key)?,
                Settled::Pull(too) => {
                    tx.clear_conflict(key)?;
                    force.insert(key.clone());
                    force.extend(too);
                }
            }
        }
        let mut fx = pull(tx, vfs, &remote, &force)?;
        fx.absorb(cx.moved.into_inner());
        unsettling.mark(tx, fx.names());
        Ok(fx)
    })?;
    Ok(fx)
}

/// Whether the conflict on `key` must wait for a writer of its object to
/// close the file (see the module docs).
pub(super) fn waits_on_writer(r: &impl Queries, vfs: &Vfs, key: &[u8]) -> bool {
    let ino = match decode_key(key) {
        Some(Key::Inode(id)) => r.ino_of(id.host, id.counter).ok().flatten(),
        Some(Key::Entry(pid, name)) => r
            .ino_of(pid.host, pid.counter)
            .ok()
            .flatten()
            .and_then(|p| r.lookup(p, &name).ok().flatten())
            .map(|i| i.ino),
        Some(Key::Listing(_)) | None => None,
    };
    ino.is_some_and(|ino| vfs.has_writers(ino))
}

/// How a conflict settles.
enum Settled {
    /// Not now: a writer still has the file open.
    Wait,
    /// This host's side ships again as it now is; nothing is pulled.
    Keep,
    /// The backend's side of the key is taken, and of these keys too.
    Pull(Vec<Vec<u8>>),
}

/// What resolving needs at hand.
struct Cx<'a, 't> {
    tx: &'a Tx<'t>,
    vfs: &'a Vfs,
    remote: &'a RemoteState,
    label: &'a str,
    ours: &'a HashMap<Vec<u8>, Vec<(ChunkHash, u32)>>,
    /// What resolving moved (renamed aside, rescued), for the kernel.
    moved: RefCell<Effects>,
}

impl Cx<'_, '_> {
    /// One conflicting inode.
    fn inode_conflict(&self, id: ObjectId) -> rusqlite::Result<Settled> {
        let (tx, vfs, remote, label) = (self.tx, self.vfs, self.remote, self.label);
        let Some(ino) = tx.ino_of(id.host, id.counter)? else {
            // Deleted here; theirs (if any) comes back with its names.
            return Ok(Settled::Pull(Vec::new()));
        };
        if vfs.has_writers(ino) {
            return Ok(Settled::Wait);
        }
        let Some(inode) = tx.inode(ino)? else {
            return Ok(Settled::Pull(Vec::new()));
        };
        let theirs = remote.inodes.get(&id).cloned().flatten();
        let path = path_of(tx, ino)?;
        // Its names here, which the backend's side takes over.
        let mut names = Vec::new();
        for (p, n) in tx.names_of(ino)? {
            if let Some(dir) = tx.inode(p)? {
                names.push(entry_key(object_id(&dir), &n));
            }
        }
        match (theirs, inode.kind()) {
            (None, Kind::Dir) => {
                // Deleted there: the deletion stands (the pull removes it);
                // what only this host has in it moves to lost+found.
                record(
                    tx,
                    &path,
                    "directory deleted on another host while this host changed it: deleted; \
                 what this host added to it is in /lost+found",
                )?;
            }
            (None, _) if tx.remote_version(&inode_key(id))?.is_none() => {
                // Never at the backend: a new object refused with its
                // name (or its directory); it ships again, with whatever
                // name its name's conflict gives it.
                if !tx.names_of(ino)?.is_empty() {
                    tx.relog(ino)?;
                }
                return Ok(Settled::Keep);
            }
            (None, _) => {
                // Deleted there, changed here: the change survives, under
                // its names, as a new object.
                for key in &names {
                    tx.set_remote_version(key, None)?;
                }
                tx.set_remote_version(&inode_key(id), None)?;
                tx.reidentify(ino)?;
                record(
                    tx,
                    &path,
                    "deleted on another host, changed on this one: this host's version is kept",
                )?;
                return Ok(Settled::Keep);
            }
            (Some(_), Kind::Dir) => {
                record(tx, &path, "directory attributes: the other host's are kept")?;
                return Ok(Settled::Pull(Vec::new()));
            }
            (Some(t), _)
                if self
                    .ours
                    .get(&inode_key(id))
                    .map_or(inode.cached, |c| *c != t.chunks) =>
            {
                let copies = keep_beside(tx, ino, label, &mut self.moved.borrow_mut())?;
                record(
                    tx,
                    &path,
                    &format!(
                    "changed on this host and another: the other host's version keeps the name, \
                     this host's is kept as {}",
                    copies.join(", ")
                ),
                )?;
            }
            (Some(_), _) => {
                record(
                    tx,
                    &path,
                    "attributes changed on this host and another: the other host's are kept",
                )?;
                return Ok(Settled::Pull(Vec::new()));
            }
        }
        Ok(Settled::Pull(names))
    }

    /// One conflicting name, `name` in the directory `pid`.
    fn entry_conflict(&self, pid: ObjectId, name: &[u8]) -> rusqlite::Result<Settled> {
        let (tx, vfs, remote, label) = (self.tx, self.vfs, self.remote, self.label);
        let Some(parent) = tx.ino_of(pid.host, pid.counter)? else {
            return Ok(Settled::Pull(Vec::new()));
        };
        let Some(ours) = tx.lookup(parent, name)? else {
            // Removed here, changed there: theirs comes back.
            if remote
                .entries
                .get(&(pid, name.to_vec()))
                .is_some_and(Option::is_some)
            {
                let path = join(&path_of(tx, parent)?, name);
                record(
                    tx,
                    &path,
                    "removed or moved away on this host, but the backend refused that (changed on \
                     another host first, or part of a refused move): it stays as the backend has it",
                )?;
            }
            return Ok(Settled::Pull(Vec::new()));
        };
        if vfs.has_writers(ours.ino) {
            return Ok(Settled::Wait);
        }
        let dir_gone = matches!(remote.inodes.get(&pid), Some(None));
        // A directory that lost its last name here (a pull took it away:
        // the backend deleted it, or moved it where this host has not
        // followed yet) never ships again; what this host put into it
        // meanwhile (through a process's cwd, an open directory, or a
        // lookup the kernel still had) would be sent again forever.
        let stranded = pid != ObjectId::ROOT && tx.names_of(parent)?.is_empty();
        if tx.remote_version(&inode_key(pid))?.is_none()
            && pid != ObjectId::ROOT
            && !(stranded && dir_gone)
        {
            // Its directory never reached the backend (refused, or renamed
            // by its own conflict), or comes back with its new name: the
            // name ships again with it.
            tx.relog(ours.ino)?;
            return Ok(Settled::Keep);
        }
        let path = join(&path_of(tx, parent)?, name);
        let theirs = remote.entries.get(&(pid, name.to_vec())).cloned().flatten();
        let ours_shipped = tx.remote_version(&inode_key(object_id(&ours)))?.is_some();
        if dir_gone && (ours.kind() != Kind::Dir || !ours_shipped) {
            let to = rescue(tx, parent, name, &ours, &mut self.moved.borrow_mut())?;
            record(
                tx,
                &path,
                &format!("its directory was deleted on another host: moved to {to}"),
            )?;
        } else if theirs.as_ref().is_some_and(|t| t.child != object_id(&ours)) {
            let to = rename_beside(tx, parent, name, &ours, label, &mut self.moved.borrow_mut())?;
            record(
                tx,
                &path,
                &format!(
                "name taken on another host first: that host's keeps it, this host's is now {to}"
            ),
            )?;
        } else if theirs.is_none() {
            record(
                tx,
                &path,
                "this host's move to here was refused (the object moved elsewhere first, or \
                 would be inside itself): the move that reached the backend first stands",
            )?;
        }
        Ok(Settled::Pull(Vec::new()))
    }
}

/// Gives this host's version of `ino` a new identity and renames each of
/// its names `NAME.conflict-HOST-TIMESTAMP`; the old identity and names
/// are left for the other host's version (pulled next). Returns the new
/// names; `fx` learns the moves.
fn keep_beside(
    tx: &Tx<'_>,
    ino: Ino,
    label: &str,
    fx: &mut Effects,
) -> rusqlite::Result<Vec<String>> {
    let names = tx.names_of(ino)?;
    let Some(inode) = tx.inode(ino)? else {
        return Ok(Vec::new());
    };
    tx.reidentify(ino)?;
    let mut out = Vec::new();
    for (p, n) in names {
        out.push(rename_beside(tx, p, &n, &inode, label, fx)?);
    }
    Ok(out)
}

/// Moves `ours`, named `name` in `parent`, to a conflict name beside it.
/// The old name's removal is pulled (the other host's version takes it);
/// the new name ships. Returns the new path; `fx` learns the move.
fn rename_beside(
    tx: &Tx<'_>,
    parent: Ino,
    name: &[u8],
    ours: &Inode,
    label: &str,
    fx: &mut Effects,
) -> rusqlite::Result<String> {
    let stamp = timestamp(SystemTime::now());
    let base = [name, format!(".conflict-{label}-{stamp}").as_bytes()].concat();
    let new = free_name(tx, parent, &base)?;
    relink(tx, parent, name, ours, parent, &new)?;
    fx.moved((parent, name), ours.ino, (parent, &new));
    Ok(join(&path_of(tx, parent)?, &new))
}

/// Whether `child`, named by the entry `key` in a directory that goes,
/// holds something only this host has, and so must move to `/lost+found`
/// rather than go with it: an object never shipped (or revived), or a
/// non-directory whose bytes, attributes or name have changes pending. A
/// directory the backend has goes its own way (the backend keeps it
/// wherever it is; down-sync brings it back there), and what only this
/// host has inside it is rescued in turn.
pub(super) fn must_rescue(
    tx: &Tx<'_>,
    dirty: &Dirty,
    child: &Inode,
    key: &[u8],
) -> rusqlite::Result<bool> {
    let id = inode_key(object_id(child));
    if tx.remote_version(&id)?.is_none() {
        return Ok(true);
    }
    Ok(child.kind() != Kind::Dir
        && (dirty.inode_pending(child.ino)
            || tx.in_conflict(&id)?
            || tx.remote_version(key)?.is_none()))
}

/// Moves `ours` from `parent/name` to `/lost+found`; returns the new path;
/// `fx` learns the move.
pub(super) fn rescue(
    tx: &Tx<'_>,
    parent: Ino,
    name: &[u8],
    ours: &Inode,
    fx: &mut Effects,
) -> rusqlite::Result<String> {
    // A plain rename of this host's: it ships (the old name's removal
    // too, if the backend still has it).
    let was = tx.pulling(false);
    let lf = lost_found(tx, fx)?;
    let new = free_name(tx, lf, name)?;
    tx.rename(parent, name, lf, &new, ours)?;
    tx.pulling(was);
    fx.moved((parent, name), ours.ino, (lf, &new));
    Ok(join("/lost+found", &new))
}

/// Moves `ours` from `parent/name` to `newparent/newname` beside it: the
/// removal is pulled (the other host's version takes the old name), the
/// new name is this host's change and ships.
fn relink(
    tx: &Tx<'_>,
    parent: Ino,
    name: &[u8],
    ours: &Inode,
    newparent: Ino,
    newname: &[u8],
) -> rusqlite::Result<()> {
    let was = tx.pulling(true);
    tx.drop_entry(parent, name, ours.ino)?;
    tx.pulling(false);
    tx.recount(ours.ino)?;
    tx.recount(parent)?;
    tx.link(ours.ino, newparent, newname)?;
    tx.recount(ours.ino)?;
    tx.recount(newparent)?;
    tx.pulling(was);
    Ok(())
}

/// `/lost+found`, made if there is none (`fx` learns the new name: the
/// kernel may hold a negative entry for it).
fn lost_found(tx: &Tx<'_>, fx: &mut Effects) -> rusqlite::Result<Ino> {
    if let Some(dir) = tx
        .lookup(ROOT_INO, LOST_FOUND)?
        .filter(|i| i.kind() == Kind::Dir)
    {
        return Ok(dir.ino);
    }
    let name = free_name(tx, ROOT_INO, LOST_FOUND)?;
    let made = tx.create(
        ROOT_INO,
        &name,
        &NewInode {
            mode: libc::S_IFDIR | 0o700,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
        },
        None,
    )?;
    fx.added.push((ROOT_INO, name));
    fx.inodes.insert(ROOT_INO);
    Ok(made.ino)
}

/// `base`, or `base-2`, `base-3`, … whichever is free in `dir` (cut to
/// the longest name a file system takes).
fn free_name(tx: &Tx<'_>, dir: Ino, base: &[u8]) -> rusqlite::Result<Vec<u8>> {
    const NAME_MAX: usize = 255;
    let cut = |b: &[u8], room: usize| -> Vec<u8> { b[b.len().saturating_sub(room)..].to_vec() };
    // Bounded: a thousand tries, then a name with the time in nanoseconds.
    for n in 1..=1000u32 {
        let suffix = if n == 1 {
            Vec::new()
        } else {
            format!("-{n}").into_bytes()
        };
        let name = [cut(base, NAME_MAX - suffix.len()), suffix].concat();
        if tx.lookup(dir, &name)?.is_none() {
            return Ok(name);
        }
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let suffix = format!("-{nanos}").into_bytes();
    Ok([cut(base, NAME_MAX - suffix.len()), suffix].concat())
}

fn record(tx: &Tx<'_>, path: &str, how: &str) -> rusqlite::Result<()> {
    warn!("conflict on {path}: {how}");
    tx.add_resolved(path, how)
}

/// A path from the root to `ino`, through first names (`?` if it has
/// none).
fn path_of(tx: &Tx<'_>, ino: Ino) -> rusqlite::Result<String> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut at = ino;
    // Bounded: a store has no cycles, and no path is deeper than this.
    for _ in 0..4096 {
        if at == ROOT_INO {
            break;
        }
        let Some((p, n)) = tx.names_of(at)?.into_iter().next() else {
            parts.push(b"?".to_vec());
            break;
        };
        parts.push(n);
        at = p;
    }
    parts.reverse();
    let mut s = String::new();
    for p in parts {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(&p));
    }
    Ok(if s.is_empty() { "/".into() } else { s })
}

fn join(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// This host's name, as conflict copies carry it: the kernel's host name,
/// cut to the characters a file name can always hold.
fn host_label() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if label.is_empty() {
        "host".into()
    } else {
        label
    }
}

/// `YYYYMMDDTHHMMSSZ`, UTC.
fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_time() {
        let at = |s| timestamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(1_795_904_130), "20261128T221530Z");
    }
}
