/*!
Names replication changed under the kernel, until the kernel has let go of
what it knew of them.

Down-sync and conflict resolution change what a name names in one store
commit, and only afterwards tell the kernel (`inval_entry`, `delete`). In
between, the kernel may still map the name to the inode it named before. A
lookup or a `stat` answered from that stale entry is a harmless read of a
moment ago. A removal is not: FUSE's `rmdir`, `unlink` and `rename` carry
the name only, not the inode the kernel resolved it to. The daemon would
remove or replace what the store has under the name *now* (another host's
directory that just took the name, say), while the kernel takes the success
as the end of the inode it meant: a directory that conflict resolution only
renamed aside is then marked dead, and lists empty under its new name for as
long as the kernel keeps it (docs/checker.md, item 12).

So the vfs refuses such an op on a name that is [`Unsettled::refuses`]: with
ENOENT, which is what the op would have met a moment later, once the name no
longer named what the caller resolved. The window is exact, not timed: it
opens inside the transaction that changes the name (an op committed before
it acted on what the kernel knew; one after it sees the mark) and closes when
the kernel's entry for the name has been invalidated ([`Unsettling`] is
dropped after the notifications). The kernel takes the directory's lock to
invalidate an entry, the same lock its `rmdir`, `unlink` and `rename` hold
from their lookup to the reply, and a lookup holds it shared. So an op that
starts after the invalidation returned looks the name up afresh and is told
what the store has now.
*/

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::ids::Ino;
use crate::store::Tx;

/// The unsettled names of one file system.
#[derive(Default)]
pub(crate) struct Unsettled {
    /// (directory, name) → the round ([`Unsettling`]) that changed it last.
    names: Mutex<HashMap<(Ino, Vec<u8>), u64>>,
    /// How many there are: read without the lock by every removal, which
    /// almost always finds none.
    count: AtomicUsize,
    rounds: AtomicU64,
}

impl Unsettled {
    /// A new round of changes to names, settled when it is dropped.
    pub fn round(&self) -> Unsettling<'_> {
        Unsettling {
            of: self,
            round: self.rounds.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// Whether an op that removes or replaces `parent/name` must be
    /// refused. Called inside the op's transaction, so that a change
    /// committed before it is seen.
    pub fn refuses(&self, parent: Ino, name: &[u8]) -> bool {
        if self.count.load(Ordering::SeqCst) == 0 {
            return false;
        }
        // Allocates only while some name is unsettled.
        self.lock().contains_key(&(parent, name.to_vec()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(Ino, Vec<u8>), u64>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One transaction's changes to names, unsettled from [`Unsettling::mark`]
/// until this is dropped: after the kernel's entries for them were
/// invalidated, or when the transaction failed.
pub(crate) struct Unsettling<'a> {
    of: &'a Unsettled,
    round: u64,
}

impl Unsettling<'_> {
    /// Marks `names` (directory, name) unsettled. Takes the transaction
    /// that changes them because it must be called inside it: the store's
    /// write lock orders the mark against every op that checks it.
    pub fn mark<'n>(&self, _changing: &Tx<'_>, names: impl IntoIterator<Item = (Ino, &'n [u8])>) {
        let mut marked = self.of.lock();
        for (parent, name) in names {
            marked.insert((parent, name.to_vec()), self.round);
        }
        self.of.count.store(marked.len(), Ordering::SeqCst);
    }
}

impl Drop for Unsettling<'_> {
    fn drop(&mut self) {
        let mut marked = self.of.lock();
        // A later round that changed a name again settles it itself.
        marked.retain(|_, round| *round != self.round);
        self.of.count.store(marked.len(), Ordering::SeqCst);
    }
}
