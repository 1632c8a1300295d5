//! Restore: a new host loads the volume's namespace into an empty store.

use ferry_backend::{Backend, BackendError, InodeState, ObjectId, SnapshotItem};

use super::{entry_key, inode_key};
use crate::ids::Ino;
use crate::log::Outbox;
use crate::store::{Inode, Kind, Queries, Store, Tx};

/// Fills an empty store from the backend: the whole namespace, streamed
/// from one consistent read in bounded memory (a restore of millions of
/// files holds one row at a time, plus SQLite's page cache), in one store
/// transaction, so a restore interrupted anywhere leaves the store empty
/// and is simply run again. File contents stay at the backend until read
/// (or prefetched). Down-sync then follows the feed from the snapshot's
/// position. Returns the number of inodes restored.
pub fn restore(store: &Store, backend: &dyn Backend) -> Result<u64, RestoreError> {
    store.write(|tx| -> Result<u64, RestoreError> {
        let was = tx.pulling(true);
        let mut count = 0;
        let mut sink = |item: SnapshotItem| -> Result<(), BackendError> {
            let sql = |e: rusqlite::Error| BackendError::Corrupt {
                what: format!("storing the restored namespace: {e}"),
            };
            match item {
                SnapshotItem::Inode(state) => {
                    import_inode(tx, &state).map_err(|e| match e {
                        RestoreError::Backend(b) => b,
                        RestoreError::Store(s) => sql(s),
                    })?;
                    count += 1;
                }
                SnapshotItem::Entry(e) => {
                    let parent = local_ino(tx, e.parent).map_err(sql)?;
                    let child = local_ino(tx, e.child).map_err(sql)?;
                    let (Some(parent), Some(child)) = (parent, child) else {
                        return Err(BackendError::Corrupt {
                            what: format!("entry {}/{:?} names a missing inode", e.parent, e.name),
                        });
                    };
                    tx.import_entry(parent, &e.name, child).map_err(sql)?;
                    tx.set_remote_version(&entry_key(e.parent, &e.name), Some(e.version))
                        .map_err(sql)?;
                }
            }
            Ok(())
        };
        let seq = backend.snapshot_each(&mut sink)?;
        tx.recount_links()?;
        tx.pulling(was);
        // Everything logged by the restore is the backend's own state.
        let head = tx.log_head()?;
        Outbox::advance(tx, head)?;
        tx.set_meta_int("feed_seq", seq as i64)?;
        Ok(count)
    })
}

/// One restored inode: regular files arrive uncached.
fn import_inode(tx: &Tx<'_>, state: &InodeState) -> Result<(), RestoreError> {
    let kind = Kind::from_mode(state.mode).ok_or_else(|| {
        RestoreError::Backend(BackendError::Corrupt {
            what: format!("inode {} has mode {:o}", state.id, state.mode),
        })
    })?;
    let inode = Inode {
        ino: Ino(0),
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
    // The root is {host 0, counter 1} on every host, so it maps onto the
    // local root like any other identity.
    let ino = tx.import_inode(&inode, state.target.as_deref())?;
    tx.import_xattrs(ino, &state.xattrs)?;
    if kind == Kind::File {
        tx.set_chunks(ino, &state.chunks)?;
    }
    tx.set_remote_version(&inode_key(state.id), Some(state.version))?;
    Ok(())
}

fn local_ino(tx: &Tx<'_>, id: ObjectId) -> rusqlite::Result<Option<Ino>> {
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
