//! Invariant I3 at commit time: the rules of the crate docs ("The backend
//! stays whole"), enforced in one place for both implementations.
//!
//! A commit is applied in rounds inside its transaction. Each round applies
//! every op not refused yet (version checks as usual), then checks the
//! rules on what the round did. If one is broken, the round is rolled back
//! to a savepoint taken before the first op, the ops to blame join the
//! refused set, and the next round starts over. Checking at the end of a
//! round, not per op, is what lets a rename pass: between its DeleteEntry
//! and its PutEntry a directory legitimately has no name.
//!
//! Only applied ops are ever blamed, so every round refuses at least one
//! more op, and a round that applies nothing breaks no rule: a commit takes
//! at most `ops.len() + 1` rounds. The usual commit breaks nothing and takes
//! one.
//!
//! The queries a round needs ([`CommitTx`]) touch only the keys the commit
//! wrote, plus the ancestors of directories it named.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures_util::future::try_join3;

use crate::{is_dir, same_type, valid_mode, valid_name, BackendError, ObjectId, Op, Outcome};

/// The stored row of an op's key, read (and locked) when the op is applied.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyRow {
    /// Version, tombstones included.
    pub version: u64,
    /// Whether the row is a tombstone.
    pub deleted: bool,
    /// An inode row's mode.
    pub mode: Option<u32>,
    /// An entry row's child.
    pub child: Option<ObjectId>,
}

/// What became of one op in a round.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Step {
    /// Written at `version`; `before` is the live row it replaced.
    Applied {
        version: u64,
        before: Option<KeyRow>,
    },
    /// Not written: its base did not match, or an earlier round refused it.
    /// `current` is the key's live version.
    Refused { current: Option<u64> },
}

impl Step {
    /// Decides one op: `row` is its key's stored row, `refused` whether an
    /// earlier round refused it. An applied op writes one more than the
    /// stored version, so versions never repeat for a key.
    pub(crate) fn decide(op: &Op, refused: bool, row: Option<KeyRow>) -> Step {
        let before = row.filter(|r| !r.deleted);
        let current = before.map(|r| r.version);
        if refused || op.base() != current {
            return Step::Refused { current };
        }
        Step::Applied {
            version: row.map_or(1, |r| r.version + 1),
            before,
        }
    }

    /// The version to write, if the op is to be written.
    pub(crate) fn version(&self) -> Option<u64> {
        match self {
            Step::Applied { version, .. } => Some(*version),
            Step::Refused { .. } => None,
        }
    }

    fn outcome(self) -> Outcome {
        match self {
            Step::Applied { version, .. } => Outcome::Applied { version },
            Step::Refused { current } => Outcome::Conflict { current },
        }
    }
}

/// What the rules need from a commit transaction. Implementations hold the
/// commit's write lock, so nothing changes between the queries.
pub(crate) trait CommitTx {
    /// Marks the state before the commit's first op.
    async fn savepoint(&self) -> Result<(), BackendError>;
    /// Returns to that state (the savepoint stays for the next round).
    async fn rollback_to_savepoint(&self) -> Result<(), BackendError>;
    /// Applies the ops in order, each as [`Step::decide`] says given the
    /// refused flag of the same index, and appends each written op to the
    /// feed.
    async fn apply(&self, ops: &[Op], refused: &[bool]) -> Result<Vec<Step>, BackendError>;
    /// The modes of the live inodes among `ids`.
    async fn live_modes(&self, ids: &[ObjectId]) -> Result<HashMap<ObjectId, u32>, BackendError>;
    /// For each inode among `ids`, the parents of up to two of its live
    /// names (an inode without names is absent). Two are enough to tell
    /// "none", "one (and where)" and "more than one".
    async fn name_parents(
        &self,
        ids: &[ObjectId],
    ) -> Result<HashMap<ObjectId, Vec<ObjectId>>, BackendError>;
    /// Which of `dirs` are the parent of a live entry.
    async fn with_entries(&self, dirs: &[ObjectId]) -> Result<HashSet<ObjectId>, BackendError>;
}

/// Bound on a walk from a directory up to the root: deeper than any real
/// tree, so only a broken chain of names reaches it.
const MAX_DEPTH: usize = 1 << 16;

/// A broken rule, for the log line of a refused op.
#[derive(Clone, Copy, Debug)]
enum Rule {
    /// Rule 1: the entry's parent is not a live directory, its child is not
    /// live, or its name is not a file name.
    EntryTargets,
    /// Rule 2: a directory left with other than one name, or not under the
    /// root through its names.
    DirectoryName,
    /// Rule 3: the inode this entry names was refused.
    InodeRefused,
    /// Rule 4: the deleted inode is still named or still has entries.
    DeleteInUse,
    /// Rule 5: an inode left alive without a name.
    LastName,
    /// Rule 6: a new inode without a name.
    Unnamed,
    /// Rule 7: an invalid mode or a change of file type.
    FileType,
}

/// Runs a commit's rounds and returns one outcome per op.
pub(crate) async fn commit(tx: &impl CommitTx, ops: &[Op]) -> Result<Vec<Outcome>, BackendError> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    let mut refused = vec![false; ops.len()];
    tx.savepoint().await?;
    for _round in 0..=ops.len() {
        let steps = tx.apply(ops, &refused).await?;
        let blamed = blame(tx, ops, &steps).await?;
        if blamed.is_empty() {
            return Ok(steps.into_iter().map(Step::outcome).collect());
        }
        tx.rollback_to_savepoint().await?;
        for (i, rule) in blamed {
            tracing::debug!(key = ?ops[i].target(), ?rule, "refused: the backend would not stay whole");
            refused[i] = true;
        }
    }
    Err(BackendError::other(
        "commit: refusing ops did not settle the I3 rules (a bug)",
    ))
}

/// The applied ops that break a rule after a round with `steps`. Rules
/// about single objects come first; the walks to the root (rule 2's "no
/// cycle") run only when those pass, so an op is not blamed for a chain
/// that another op of the round broke.
///
/// Much of what the rules ask, the round itself tells: the last op applied
/// to a key decides that key's final state. Only the rest is queried, so a
/// batch of creates asks the database next to nothing.
async fn blame(
    tx: &impl CommitTx,
    ops: &[Op],
    steps: &[Step],
) -> Result<BTreeMap<usize, Rule>, BackendError> {
    let mut blamed = BTreeMap::new();
    // What the round did, by the rules that apply to it.
    let mut named = Vec::new(); // (op, parent, child): entries written
    let mut unnamed = Vec::new(); // (op, inode that lost a name)
    let mut created = Vec::new(); // (op, new inode)
    let mut deleted = Vec::new(); // (op, deleted inode)
    let mut refused_inodes = HashSet::new();
    // Final state of the keys the round wrote: an inode's mode (None:
    // deleted), an entry's child (None: removed).
    let mut inodes: HashMap<ObjectId, Option<u32>> = HashMap::new();
    let mut entries: HashMap<(ObjectId, &[u8]), Option<ObjectId>> = HashMap::new();
    for (i, (op, step)) in ops.iter().zip(steps).enumerate() {
        let Step::Applied { before, .. } = step else {
            if let Op::PutInode { state, .. } = op {
                refused_inodes.insert(state.id);
            }
            continue;
        };
        let replaced_child = before.and_then(|b| b.child);
        match op {
            Op::PutInode { state, base } => {
                let old_mode = before.and_then(|b| b.mode);
                if !valid_mode(state.mode) || old_mode.is_some_and(|m| !same_type(m, state.mode)) {
                    blamed.insert(i, Rule::FileType);
                }
                if base.is_none() {
                    created.push((i, state.id));
                }
                inodes.insert(state.id, Some(state.mode));
            }
            Op::DeleteInode { id, .. } => {
                deleted.push((i, *id));
                inodes.insert(*id, None);
            }
            Op::PutEntry {
                parent,
                name,
                child,
                ..
            } => {
                if !valid_name(name) {
                    blamed.insert(i, Rule::EntryTargets);
                }
                named.push((i, *parent, *child));
                if let Some(old) = replaced_child.filter(|old| old != child) {
                    unnamed.push((i, old));
                }
                entries.insert((*parent, name), Some(*child));
            }
            Op::DeleteEntry { parent, name, .. } => {
                unnamed.extend(replaced_child.map(|old| (i, old)));
                entries.insert((*parent, name), None);
            }
        }
    }
    for &(i, _, child) in &named {
        if refused_inodes.contains(&child) {
            blamed.insert(i, Rule::InodeRefused);
        }
    }
    // Inodes the round leaves named: they have at least one name.
    let locally_named: HashSet<ObjectId> = entries.values().flatten().copied().collect();

    // What the round does not tell: modes of inodes it did not write; all
    // names of directories it named (rule 2 needs the exact count) and of
    // inodes it deleted; whether inodes left without a local name have
    // others.
    let mut ask_modes = Vec::new();
    let mut ask_names = Vec::new();
    let known_dead = |id: &ObjectId| inodes.get(id) == Some(&None);
    for &(_, parent, child) in &named {
        ask_modes.extend(
            [parent, child]
                .into_iter()
                .filter(|id| !inodes.contains_key(id)),
        );
        if inodes.get(&child).is_none_or(|m| m.is_some_and(is_dir)) {
            ask_names.push(child);
        }
    }
    for &(_, id) in unnamed.iter().chain(&created) {
        if !inodes.contains_key(&id) {
            ask_modes.push(id);
        }
        if !locally_named.contains(&id) && !known_dead(&id) {
            ask_names.push(id);
        }
    }
    ask_names.extend(deleted.iter().map(|d| d.1));
    let ask_entries: Vec<ObjectId> = deleted.iter().map(|d| d.1).collect();
    let (modes, names, nonempty) = try_join3(
        unless_empty(ask_modes, async |ids| tx.live_modes(ids).await),
        unless_empty(ask_names, async |ids| tx.name_parents(ids).await),
        unless_empty(ask_entries, async |ids| tx.with_entries(ids).await),
    )
    .await?;
    let mode = |id: &ObjectId| match inodes.get(id) {
        Some(known) => *known,
        None => modes.get(id).copied(),
    };
    let name_count = |id: &ObjectId| names.get(id).map_or(0, Vec::len);
    let has_name = |id: &ObjectId| locally_named.contains(id) || names.contains_key(id);

    let mut named_dirs = Vec::new();
    for &(i, parent, child) in &named {
        match (mode(&parent), mode(&child)) {
            (Some(p), Some(c)) if is_dir(p) => {
                if !is_dir(c) {
                    continue;
                }
                if child == ObjectId::ROOT || name_count(&child) != 1 {
                    blamed.insert(i, Rule::DirectoryName);
                } else {
                    named_dirs.push((i, child));
                }
            }
            _ => {
                blamed.insert(i, Rule::EntryTargets);
            }
        }
    }
    for &(i, id) in &deleted {
        if id == ObjectId::ROOT || name_count(&id) > 0 || nonempty.contains(&id) {
            blamed.insert(i, Rule::DeleteInUse);
        }
    }
    for &(i, id) in &unnamed {
        if mode(&id).is_some() && !has_name(&id) {
            blamed.insert(i, Rule::LastName);
        }
    }
    for &(i, id) in &created {
        if mode(&id).is_some() && !has_name(&id) {
            blamed.insert(i, Rule::Unnamed);
        }
    }
    if blamed.is_empty() {
        for i in walk_to_root(tx, named_dirs, names).await? {
            blamed.insert(i, Rule::DirectoryName);
        }
    }
    Ok(blamed)
}

/// Runs a query on `ids` (deduplicated) only if there is something to ask
/// (a remote backend would spend a round trip on an empty one).
async fn unless_empty<T: Default>(
    mut ids: Vec<ObjectId>,
    query: impl AsyncFnOnce(&[ObjectId]) -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    if ids.is_empty() {
        return Ok(T::default());
    }
    ids.sort_unstable();
    ids.dedup();
    query(&ids).await
}

/// One directory's walk up to the root.
struct Walk {
    /// The op that named the directory.
    op: usize,
    /// Where the walk is.
    at: ObjectId,
    /// The directories passed, to tell a cycle.
    path: HashSet<ObjectId>,
}

/// Walks up from each `(op, dir)` through single names; returns the ops
/// whose directory does not reach the root (a cycle, a missing or second
/// name on the way, or deeper than [`MAX_DEPTH`]). `names` holds what is
/// known already; all walks advance together, one query per level, and a
/// directory known to reach the root ends every walk that gets there.
async fn walk_to_root(
    tx: &impl CommitTx,
    starts: Vec<(usize, ObjectId)>,
    mut names: HashMap<ObjectId, Vec<ObjectId>>,
) -> Result<Vec<usize>, BackendError> {
    let mut walks: Vec<Walk> = starts
        .into_iter()
        .map(|(op, at)| Walk {
            op,
            at,
            path: HashSet::new(),
        })
        .collect();
    let mut reach_root = HashSet::from([ObjectId::ROOT]);
    let mut broken = Vec::new();
    for _level in 0..MAX_DEPTH {
        if walks.is_empty() {
            return Ok(broken);
        }
        let mut ask: Vec<ObjectId> = walks
            .iter()
            .map(|w| w.at)
            .filter(|at| !names.contains_key(at))
            .collect();
        ask.sort_unstable();
        ask.dedup();
        if !ask.is_empty() {
            let found = tx.name_parents(&ask).await?;
            for id in ask {
                names.entry(id).or_default();
            }
            names.extend(found);
        }
        walks.retain_mut(|w| {
            let parent = match names[&w.at][..] {
                [parent] => parent,
                _ => {
                    broken.push(w.op);
                    return false;
                }
            };
            w.path.insert(w.at);
            if reach_root.contains(&parent) {
                reach_root.extend(w.path.drain());
                false
            } else if w.path.contains(&parent) {
                broken.push(w.op);
                false
            } else {
                w.at = parent;
                true
            }
        });
    }
    broken.extend(walks.iter().map(|w| w.op));
    Ok(broken)
}
