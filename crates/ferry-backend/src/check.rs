//! [`check`]: whether a backend's committed state is whole (invariant I3),
//! judged from the outside, from [`Backend::snapshot`] — what a restore
//! loads. `ferry fsck --backend URL` prints its findings.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use crate::{
    is_dir, is_regular, valid_mode, valid_name, Backend, BackendError, ChunkHash, InodeState,
    ObjectId,
};

/// How many hashes one [`Backend::missing_chunks`] call asks about.
const MISSING_CHUNKS_BATCH: usize = 4096;

/// One way a backend's state breaks I3. [`fmt::Display`] gives one line
/// that names the objects.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// There is no root directory.
    MissingRoot,
    /// An entry's parent is not a live inode.
    MissingParent {
        /// The missing directory.
        parent: ObjectId,
        /// Name of the entry.
        name: Vec<u8>,
    },
    /// An entry's child is not a live inode.
    MissingChild {
        /// The directory holding the entry.
        parent: ObjectId,
        /// Name of the entry.
        name: Vec<u8>,
        /// The missing inode.
        child: ObjectId,
    },
    /// An entry's parent is not a directory.
    ParentNotDirectory {
        /// The entry's parent.
        parent: ObjectId,
        /// Name of the entry.
        name: Vec<u8>,
        /// The parent's mode.
        mode: u32,
    },
    /// An entry name no file system can hold (empty, `.`, `..`, or with
    /// `/` or NUL in it).
    BadName {
        /// The directory holding the entry.
        parent: ObjectId,
        /// The name.
        name: Vec<u8>,
    },
    /// A directory with other than exactly one name (the root: any name).
    DirectoryNames {
        /// The directory.
        dir: ObjectId,
        /// How many live entries name it.
        names: usize,
    },
    /// A live inode that no path from the root reaches.
    Unreachable {
        /// The inode.
        id: ObjectId,
        /// Whether it is a directory whose chain of names, walked up, runs
        /// into a cycle.
        in_cycle: bool,
    },
    /// A regular file whose chunk lengths do not add up to its size.
    SizeMismatch {
        /// The file.
        file: ObjectId,
        /// Its size.
        size: u64,
        /// The sum of its chunk lengths.
        chunks: u64,
    },
    /// A chunk a file refers to that the backend does not hold (holes,
    /// [`ChunkHash::HOLE`], are stored nowhere and never missing).
    MissingChunk {
        /// The file.
        file: ObjectId,
        /// The chunk.
        hash: ChunkHash,
    },
    /// An inode whose mode is not a known file type (or has stray bits).
    InvalidMode {
        /// The inode.
        id: ObjectId,
        /// Its mode.
        mode: u32,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entry =
            |parent: &ObjectId, name: &[u8]| format!("entry {parent}/\"{}\"", name.escape_ascii());
        match self {
            Violation::MissingRoot => write!(f, "the root directory {} is missing", ObjectId::ROOT),
            Violation::MissingParent { parent, name } => {
                write!(f, "{} is in directory {parent}, which does not exist", entry(parent, name))
            }
            Violation::MissingChild {
                parent,
                name,
                child,
            } => write!(f, "{} names inode {child}, which does not exist", entry(parent, name)),
            Violation::ParentNotDirectory { parent, name, mode } => write!(
                f,
                "{} is in inode {parent}, which is not a directory (mode {mode:o})",
                entry(parent, name)
            ),
            Violation::BadName { parent, name } => {
                write!(f, "{} has a name no file system can hold", entry(parent, name))
            }
            Violation::DirectoryNames { dir, names } if *dir == ObjectId::ROOT => {
                write!(f, "the root directory {dir} has {names} names (it must have none)")
            }
            Violation::DirectoryNames { dir, names } => {
                write!(f, "directory {dir} has {names} names (it must have exactly one)")
            }
            Violation::Unreachable { id, in_cycle: true } => write!(
                f,
                "directory {id} is not reachable from the root: walking up its names runs into a cycle"
            ),
            Violation::Unreachable {
                id,
                in_cycle: false,
            } => write!(f, "inode {id} is not reachable from the root"),
            Violation::SizeMismatch { file, size, chunks } => write!(
                f,
                "file {file} has size {size} but its chunks add up to {chunks} bytes"
            ),
            Violation::MissingChunk { file, hash } => {
                write!(f, "file {file} refers to chunk {}, which is missing", hash.to_hex())
            }
            Violation::InvalidMode { id, mode } => {
                write!(f, "inode {id} has an invalid mode {mode:o}")
            }
        }
    }
}

/// Checks that `backend` holds a state a restore can load (invariant I3):
/// every entry links a live directory to a live inode under a valid name;
/// every directory but the root has exactly one name and the root none;
/// every inode is reachable from the root; every regular file's chunks add
/// up to its size and are all stored (but holes, [`ChunkHash::HOLE`]);
/// every mode is a known file type.
///
/// Returns the violations found, in a stable order; an empty list means
/// the backend is whole. Errors are the backend's.
pub fn check(backend: &dyn Backend) -> Result<Vec<Violation>, BackendError> {
    let (_, inodes, entries) = backend.snapshot()?;
    let by_id: HashMap<ObjectId, &InodeState> = inodes.iter().map(|i| (i.id, i)).collect();
    let mut found = Vec::new();

    if !by_id.contains_key(&ObjectId::ROOT) {
        found.push(Violation::MissingRoot);
    }
    let mut names: HashMap<ObjectId, Vec<ObjectId>> = HashMap::new();
    for e in &entries {
        let (parent, name) = (e.parent, e.name.clone());
        if !valid_name(&e.name) {
            found.push(Violation::BadName {
                parent,
                name: name.clone(),
            });
        }
        match by_id.get(&e.parent) {
            None => found.push(Violation::MissingParent {
                parent,
                name: name.clone(),
            }),
            Some(p) if !is_dir(p.mode) => found.push(Violation::ParentNotDirectory {
                parent,
                name: name.clone(),
                mode: p.mode,
            }),
            Some(_) => {}
        }
        if by_id.contains_key(&e.child) {
            names.entry(e.child).or_default().push(e.parent);
        } else {
            found.push(Violation::MissingChild {
                parent,
                name,
                child: e.child,
            });
        }
    }

    for inode in &inodes {
        let id = inode.id;
        if !valid_mode(inode.mode) {
            found.push(Violation::InvalidMode {
                id,
                mode: inode.mode,
            });
        }
        let count = names.get(&id).map_or(0, Vec::len);
        let wanted = usize::from(id != ObjectId::ROOT);
        if is_dir(inode.mode) && count != wanted {
            found.push(Violation::DirectoryNames {
                dir: id,
                names: count,
            });
        }
        if is_regular(inode.mode) {
            let chunks = inode.chunks.iter().map(|(_, len)| u64::from(*len)).sum();
            if chunks != inode.size {
                found.push(Violation::SizeMismatch {
                    file: id,
                    size: inode.size,
                    chunks,
                });
            }
        }
    }

    let reached = reachable(&by_id, &entries);
    for inode in inodes.iter().filter(|i| !reached.contains(&i.id)) {
        found.push(Violation::Unreachable {
            id: inode.id,
            in_cycle: is_dir(inode.mode) && in_cycle(inode.id, &names),
        });
    }

    found.extend(missing_chunks(backend, &inodes)?);
    Ok(found)
}

/// The inodes reachable from the root through entries whose parents are
/// directories.
fn reachable(
    by_id: &HashMap<ObjectId, &InodeState>,
    entries: &[crate::Entry],
) -> HashSet<ObjectId> {
    let mut children: HashMap<ObjectId, Vec<ObjectId>> = HashMap::new();
    for e in entries {
        children.entry(e.parent).or_default().push(e.child);
    }
    let mut reached = HashSet::new();
    if !by_id.contains_key(&ObjectId::ROOT) {
        return reached;
    }
    let mut queue = VecDeque::from([ObjectId::ROOT]);
    reached.insert(ObjectId::ROOT);
    while let Some(dir) = queue.pop_front() {
        for child in children.get(&dir).into_iter().flatten() {
            let Some(inode) = by_id.get(child) else {
                continue;
            };
            if reached.insert(*child) && is_dir(inode.mode) {
                queue.push_back(*child);
            }
        }
    }
    reached
}

/// Whether walking up from `dir` through single names comes back to a
/// directory already passed (bounded by the number of named inodes).
fn in_cycle(dir: ObjectId, names: &HashMap<ObjectId, Vec<ObjectId>>) -> bool {
    let mut passed = HashSet::new();
    let mut at = dir;
    for _ in 0..=names.len() {
        if !passed.insert(at) {
            return true;
        }
        match names.get(&at).map(Vec::as_slice) {
            Some([parent]) => at = *parent,
            _ => return false,
        }
    }
    false
}

/// One violation per (file, chunk) whose chunk the backend lacks.
fn missing_chunks(
    backend: &dyn Backend,
    inodes: &[InodeState],
) -> Result<Vec<Violation>, BackendError> {
    let mut hashes: Vec<ChunkHash> = inodes
        .iter()
        .flat_map(|i| i.chunks.iter().map(|(h, _)| *h))
        .filter(|h| *h != ChunkHash::HOLE)
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    let mut missing = HashSet::new();
    for batch in hashes.chunks(MISSING_CHUNKS_BATCH) {
        missing.extend(backend.missing_chunks(batch)?);
    }
    let mut found = Vec::new();
    let mut reported = HashSet::new();
    for inode in inodes {
        for (hash, _) in &inode.chunks {
            if missing.contains(hash) && reported.insert((inode.id, *hash)) {
                found.push(Violation::MissingChunk {
                    file: inode.id,
                    hash: *hash,
                });
            }
        }
    }
    Ok(found)
}
