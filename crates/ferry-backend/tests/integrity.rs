//! Invariant I3, "the backend stays whole", against both implementations:
//! the failures seen between real hosts (each one a scenario here), each
//! rule of `commit` on its own, the checker (`ferry_backend::check`) on
//! states built behind the backend's back, and a seeded random workload of
//! several hosts with stale views.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ferry_backend::{Backend, ChunkHash, InodeState, ObjectId, Op, Outcome, Violation};

#[macro_use]
mod support;
use support::*;

conformance!(
    create_in_a_removed_directory_conflicts,
    concurrent_renames_of_a_directory_leave_one_name,
    concurrent_renames_of_a_file_leave_one_name,
    second_name_of_a_directory_conflicts_without_an_inode_op,
    edit_wins_over_a_concurrent_delete,
    crossed_moves_make_no_cycle,
    entries_need_a_live_directory_a_live_child_and_a_file_name,
    directories_keep_one_name_under_the_root,
    deletes_leave_nothing_named_or_orphaned,
    creates_need_a_name,
    inodes_keep_their_file_type,
    renames_and_creates_pass_in_any_op_order,
    checker_reports_each_violation,
    random_hosts_keep_the_backend_whole,
);

const ROOT: ObjectId = ObjectId::ROOT;

fn delete(inode: &InodeState, base: u64) -> Op {
    Op::DeleteInode { id: inode.id, base }
}

/// Host A creates `dir/fa` after host B removed `dir`: the name would be in
/// a deleted directory, so it is refused, and with it the new inode.
fn create_in_a_removed_directory_conflicts(v: &Volume) {
    let (host_a, host_b) = (v.init_open(), v.open());
    let d = dir(1, 1);
    assert_eq!(
        host_a.commit(1, &create(&d, ROOT, "dir")).unwrap(),
        [applied(1), applied(1)]
    );
    assert_eq!(
        host_b
            .commit(2, &[unlink(ROOT, "dir", 1), delete(&d, 1)])
            .unwrap(),
        [applied(2), applied(2)]
    );
    let seq = last_seq(&*host_a);
    let fa = file(1, 2);
    assert_eq!(
        host_a.commit(1, &create(&fa, d.id, "fa")).unwrap(),
        [conflict(None), conflict(None)]
    );
    assert!(host_a.inode(&fa.id).unwrap().is_none());
    assert!(host_a.entries(&d.id).unwrap().is_empty());
    assert_eq!(last_seq(&*host_a), seq, "nothing refused reaches the feed");
    assert_whole(&*host_a, "after create in a removed directory");
}

/// A and B rename one inode to two names. B's DeleteEntry and PutInode
/// conflict on versions, so its PutEntry is refused too (rule 3).
fn concurrent_renames(v: &Volume, inode: InodeState) {
    let (host_a, host_b) = (v.init_open(), v.open());
    host_a.commit(1, &create(&inode, ROOT, "d")).unwrap();
    let mut moved = inode.clone();
    moved.ctime_ns += 1;
    let rename = |to: &str| {
        [
            unlink(ROOT, "d", 1),
            put(moved.clone(), Some(1)),
            link(ROOT, to, inode.id, None),
        ]
    };
    assert_eq!(
        host_a.commit(1, &rename("x")).unwrap(),
        [applied(2), applied(2), applied(1)]
    );
    assert_eq!(
        host_b.commit(2, &rename("y")).unwrap(),
        [conflict(None), conflict(Some(2)), conflict(None)]
    );
    let names: Vec<Vec<u8>> = host_b
        .entries(&ROOT)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, [b"x"]);
    assert_whole(&*host_b, "after concurrent renames");
}

fn concurrent_renames_of_a_directory_leave_one_name(v: &Volume) {
    concurrent_renames(v, dir(1, 1));
}

fn concurrent_renames_of_a_file_leave_one_name(v: &Volume) {
    concurrent_renames(v, file(1, 1));
}

/// Without a PutInode in B's rename, rule 2 alone keeps a directory at one
/// name (for a file, a second name is a hard link, which is fine).
fn second_name_of_a_directory_conflicts_without_an_inode_op(v: &Volume) {
    let b = v.init_open();
    let (d, f) = (dir(1, 1), file(1, 2));
    b.commit(1, &[create(&d, ROOT, "d"), create(&f, ROOT, "f")].concat())
        .unwrap();
    b.commit(1, &[unlink(ROOT, "d", 1), link(ROOT, "x", d.id, None)])
        .unwrap();
    assert_eq!(
        b.commit(2, &[unlink(ROOT, "d", 1), link(ROOT, "y", d.id, None)])
            .unwrap(),
        [conflict(None), conflict(None)]
    );
    assert_eq!(
        b.commit(2, &[link(ROOT, "hardlink", f.id, None)]).unwrap(),
        [applied(1)],
        "files may have several names"
    );
    assert_whole(&*b, "after a second name");
}

/// B edits a file that A deletes: A's delete conflicts on the inode, so
/// its DeleteEntry would leave a live file without a name (rule 5).
fn edit_wins_over_a_concurrent_delete(v: &Volume) {
    let (host_a, host_b) = (v.init_open(), v.open());
    let mut f = file(1, 1);
    host_a.commit(1, &create(&f, ROOT, "f")).unwrap();
    f.mtime_ns += 1;
    assert_eq!(
        host_b.commit(2, &[put(f.clone(), Some(1))]).unwrap(),
        [applied(2)]
    );
    assert_eq!(
        host_a
            .commit(1, &[unlink(ROOT, "f", 1), delete(&f, 1)])
            .unwrap(),
        [conflict(Some(1)), conflict(Some(2))]
    );
    assert_eq!(host_a.inode(&f.id).unwrap().unwrap().mtime_ns, f.mtime_ns);
    assert_eq!(host_a.entries(&ROOT).unwrap().len(), 1);
    assert_whole(&*host_a, "after edit vs delete");
}

/// A moves x into y while B moves y into x: B's move would make a cycle.
/// Its inode update is harmless and applies; the names do not.
fn crossed_moves_make_no_cycle(v: &Volume) {
    let (host_a, host_b) = (v.init_open(), v.open());
    let (x, y) = (dir(1, 1), dir(1, 2));
    host_a
        .commit(1, &[create(&x, ROOT, "x"), create(&y, ROOT, "y")].concat())
        .unwrap();
    let move_into = |what: &InodeState, name: &str, into: &InodeState| {
        [
            unlink(ROOT, name, 1),
            put(what.clone(), Some(1)),
            link(into.id, name, what.id, None),
        ]
    };
    assert_eq!(
        host_a.commit(1, &move_into(&x, "x", &y)).unwrap(),
        [applied(2), applied(2), applied(1)]
    );
    assert_eq!(
        host_b.commit(2, &move_into(&y, "y", &x)).unwrap(),
        [conflict(Some(1)), applied(2), conflict(None)]
    );
    assert_whole(&*host_b, "after crossed moves");
    // Within one commit too: a directory moved into its own subdirectory.
    let z = dir(1, 3);
    host_a.commit(1, &create(&z, y.id, "z")).unwrap();
    assert_eq!(
        host_a
            .commit(1, &[unlink(ROOT, "y", 1), link(z.id, "y", y.id, None)])
            .unwrap(),
        [conflict(Some(1)), conflict(None)]
    );
    assert_whole(&*host_a, "after a move into a subdirectory");
}

/// Rule 1.
fn entries_need_a_live_directory_a_live_child_and_a_file_name(v: &Volume) {
    let b = v.init_open();
    let (f, g) = (file(1, 1), file(1, 2));
    b.commit(1, &[create(&f, ROOT, "f"), create(&g, ROOT, "g")].concat())
        .unwrap();
    let ghost = ObjectId {
        host: 9,
        counter: 9,
    };
    for (what, op) in [
        ("parent is a file", link(f.id, "x", g.id, None)),
        ("parent does not exist", link(ghost, "x", g.id, None)),
        ("child does not exist", link(ROOT, "x", ghost, None)),
    ] {
        assert_eq!(b.commit(1, &[op]).unwrap(), [conflict(None)], "{what}");
    }
    for name in [&b""[..], b".", b"..", b"a/b", b"nul\0"] {
        let op = Op::PutEntry {
            parent: ROOT,
            name: name.to_vec(),
            child: g.id,
            base: None,
        };
        assert_eq!(b.commit(1, &[op]).unwrap(), [conflict(None)], "{name:?}");
    }
    assert_whole(&*b, "after rule 1");
}

/// Rule 2 (beyond the scenarios): no name for the root, none for a
/// directory besides its one; a deep move that stays under the root is fine.
fn directories_keep_one_name_under_the_root(v: &Volume) {
    let b = v.init_open();
    let (a, c) = (dir(1, 1), dir(1, 2));
    b.commit(1, &[create(&a, ROOT, "a"), create(&c, a.id, "c")].concat())
        .unwrap();
    assert_eq!(
        b.commit(1, &[link(c.id, "root", ROOT, None)]).unwrap(),
        [conflict(None)]
    );
    assert_eq!(
        b.commit(1, &[link(ROOT, "c2", c.id, None)]).unwrap(),
        [conflict(None)]
    );
    assert_eq!(
        b.commit(1, &[unlink(a.id, "c", 1), link(ROOT, "c", c.id, None)])
            .unwrap(),
        [applied(2), applied(1)]
    );
    assert_eq!(
        b.commit(1, &[unlink(ROOT, "a", 1), link(c.id, "a", a.id, None)])
            .unwrap(),
        [applied(2), applied(1)],
        "a sibling, not a descendant"
    );
    assert_whole(&*b, "after rule 2");
}

/// Rules 4 and 5: deleting a named or non-empty inode, deleting the root,
/// removing a last name, or pointing it elsewhere, are refused unless the
/// same commit deletes the inode.
fn deletes_leave_nothing_named_or_orphaned(v: &Volume) {
    let b = v.init_open();
    let (d, f, g) = (dir(1, 1), file(1, 2), file(1, 3));
    b.commit(
        1,
        &[
            create(&d, ROOT, "d"),
            create(&f, d.id, "f"),
            create(&g, ROOT, "g"),
        ]
        .concat(),
    )
    .unwrap();
    let root_version = b.inode(&ROOT).unwrap().unwrap().version;
    for (what, ops, expect) in [
        ("named inode", vec![delete(&g, 1)], vec![conflict(Some(1))]),
        (
            "non-empty directory",
            vec![unlink(ROOT, "d", 1), delete(&d, 1)],
            vec![conflict(Some(1)), conflict(Some(1))],
        ),
        (
            "root",
            vec![Op::DeleteInode {
                id: ROOT,
                base: root_version,
            }],
            vec![conflict(Some(root_version))],
        ),
        (
            "last name",
            vec![unlink(ROOT, "g", 1)],
            vec![conflict(Some(1))],
        ),
        (
            "last name pointed elsewhere",
            vec![link(ROOT, "g", f.id, Some(1))],
            vec![conflict(Some(1))],
        ),
    ] {
        assert_eq!(b.commit(1, &ops).unwrap(), expect, "{what}");
    }
    // A second name may go; an overwriting rename deletes what it replaces.
    assert_eq!(
        b.commit(1, &[link(ROOT, "g2", g.id, None)]).unwrap(),
        [applied(1)]
    );
    assert_eq!(b.commit(1, &[unlink(ROOT, "g2", 1)]).unwrap(), [applied(2)]);
    assert_eq!(
        b.commit(
            1,
            &[
                unlink(d.id, "f", 1),
                link(ROOT, "g", f.id, Some(1)),
                delete(&g, 1)
            ]
        )
        .unwrap(),
        [applied(2), applied(2), applied(2)]
    );
    assert_eq!(
        b.commit(1, &[delete(&d, 1), unlink(ROOT, "d", 1)]).unwrap(),
        [applied(2), applied(2)],
        "an empty directory goes with its name, in either op order"
    );
    assert_whole(&*b, "after rules 4 and 5");
}

/// Rule 6: a new inode without a name, or whose name is refused.
fn creates_need_a_name(v: &Volume) {
    let b = v.init_open();
    let (f, g) = (file(1, 1), file(1, 2));
    assert_eq!(
        b.commit(1, &[put(f.clone(), None)]).unwrap(),
        [conflict(None)]
    );
    b.commit(1, &create(&f, ROOT, "taken")).unwrap();
    let seq = last_seq(&*b);
    assert_eq!(
        b.commit(1, &create(&g, ROOT, "taken")).unwrap(),
        [conflict(None), conflict(Some(1))]
    );
    assert!(b.inode(&g.id).unwrap().is_none());
    assert_eq!(last_seq(&*b), seq);
    assert_whole(&*b, "after rule 6");
}

/// Rule 7: a PutInode keeps the file type, and the mode is valid.
fn inodes_keep_their_file_type(v: &Volume) {
    let b = v.init_open();
    let (d, f) = (dir(1, 1), file(1, 2));
    b.commit(1, &[create(&d, ROOT, "d"), create(&f, d.id, "f")].concat())
        .unwrap();
    let with_mode = |inode: &InodeState, mode| InodeState {
        mode,
        ..inode.clone()
    };
    for (what, op) in [
        ("directory to file", put(with_mode(&d, 0o100644), Some(1))),
        ("file to directory", put(with_mode(&f, 0o40755), Some(1))),
        ("no file type", put(with_mode(&f, 0o644), Some(1))),
    ] {
        assert_eq!(b.commit(1, &[op]).unwrap(), [conflict(Some(1))], "{what}");
    }
    assert_eq!(
        b.commit(1, &[put(with_mode(&f, 0o100600), Some(1))])
            .unwrap(),
        [applied(2)],
        "permission bits may change"
    );
    let bad = file(1, 3);
    assert_eq!(
        b.commit(1, &create(&with_mode(&bad, 0o170644), ROOT, "bad"))
            .unwrap(),
        [conflict(None), conflict(None)]
    );
    assert_whole(&*b, "after rule 7");
}

/// The rules judge the end of a commit: names before the inodes they name,
/// a directory nameless between the halves of a rename, a chain of new
/// directories.
fn renames_and_creates_pass_in_any_op_order(v: &Volume) {
    let b = v.init_open();
    let (a, c, f) = (dir(1, 1), dir(1, 2), file(1, 3));
    assert_eq!(
        b.commit(
            1,
            &[
                link(c.id, "f", f.id, None),
                link(a.id, "c", c.id, None),
                link(ROOT, "a", a.id, None),
                put(f.clone(), None),
                put(c.clone(), None),
                put(a.clone(), None),
            ]
        )
        .unwrap(),
        [applied(1); 6]
    );
    assert_eq!(
        b.commit(
            1,
            &[
                link(ROOT, "c", c.id, None),
                put(c.clone(), Some(1)),
                unlink(a.id, "c", 1)
            ]
        )
        .unwrap(),
        [applied(1), applied(2), applied(2)]
    );
    assert_whole(&*b, "after creates and renames");
}

/// One case of [`checker_reports_each_violation`]: what it is, the SQL
/// that makes it, the violations expected, words the first one's line must
/// hold, and the SQL that repairs it.
type Case<'a> = (&'a str, String, Vec<Violation>, Vec<&'a str>, String);

/// Builds each kind of violation with raw rows, checks that exactly it is
/// reported (with a line naming its objects), then repairs it.
fn checker_reports_each_violation(v: &Volume) {
    let b = v.init_open();
    let data = b"abc";
    let hash = ChunkHash::of(data);
    b.put_chunk(&hash, data).unwrap();
    let (d, mut f, g) = (dir(1, 1), file(1, 2), file(1, 3));
    // A hole is stored nowhere and never missing.
    (f.chunks, f.size) = (vec![(hash, 3), (ChunkHash::HOLE, 5)], 8);
    b.commit(
        1,
        &[
            create(&d, ROOT, "d"),
            create(&f, d.id, "f"),
            create(&g, ROOT, "g"),
        ]
        .concat(),
    )
    .unwrap();
    assert_whole(&*b, "before tampering");

    let (inodes, entries, chunks) = (
        v.table("inodes"),
        v.table("entries"),
        v.table("inode_chunks"),
    );
    let hex = |bytes: &[u8]| {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    let add_entry = |parent: ObjectId, name: &[u8], child: ObjectId| {
        format!(
            "INSERT INTO {entries} (parent_host, parent_counter, name, child_host, child_counter,
                version, deleted) VALUES ({}, {}, {}, {}, {}, 1, false)",
            parent.host,
            parent.counter,
            v.blob(&hex(name)),
            child.host,
            child.counter
        )
    };
    let drop_entry = |parent: ObjectId, name: &[u8]| {
        format!(
            "DELETE FROM {entries} WHERE parent_host = {} AND parent_counter = {} AND name = {}",
            parent.host,
            parent.counter,
            v.blob(&hex(name))
        )
    };
    let set_inode = |id: ObjectId, set: &str| {
        format!(
            "UPDATE {inodes} SET {set} WHERE host = {} AND counter = {}",
            id.host, id.counter
        )
    };
    let set_entry = |name: &str, set: &str| {
        format!(
            "UPDATE {entries} SET {set} WHERE name = {}",
            v.blob(&hex(name.as_bytes()))
        )
    };
    let ghost = ObjectId {
        host: 9,
        counter: 9,
    };
    let lost = ChunkHash::of(b"never stored");
    let lost_hex = lost.to_hex();
    let cases: Vec<Case> = vec![
        (
            "entry naming a missing inode",
            add_entry(ROOT, b"ghost", ghost),
            vec![Violation::MissingChild {
                parent: ROOT,
                name: b"ghost".to_vec(),
                child: ghost,
            }],
            vec!["0:1", "ghost", "9:9"],
            drop_entry(ROOT, b"ghost"),
        ),
        (
            "entry in a missing directory",
            add_entry(ghost, b"orphan", g.id),
            vec![Violation::MissingParent {
                parent: ghost,
                name: b"orphan".to_vec(),
            }],
            vec!["9:9", "orphan"],
            drop_entry(ghost, b"orphan"),
        ),
        (
            "entry in a file",
            add_entry(g.id, b"x", f.id),
            vec![Violation::ParentNotDirectory {
                parent: g.id,
                name: b"x".to_vec(),
                mode: 0o100644,
            }],
            vec!["1:3", "\"x\""],
            drop_entry(g.id, b"x"),
        ),
        (
            "name with a slash",
            add_entry(ROOT, b"a/b", g.id),
            vec![Violation::BadName {
                parent: ROOT,
                name: b"a/b".to_vec(),
            }],
            vec!["0:1", "a/b"],
            drop_entry(ROOT, b"a/b"),
        ),
        (
            "directory with two names",
            add_entry(ROOT, b"d2", d.id),
            vec![Violation::DirectoryNames {
                dir: d.id,
                names: 2,
            }],
            vec!["1:1", "2 names"],
            drop_entry(ROOT, b"d2"),
        ),
        (
            "named root",
            add_entry(d.id, b"up", ROOT),
            vec![Violation::DirectoryNames {
                dir: ROOT,
                names: 1,
            }],
            vec!["root", "0:1"],
            drop_entry(d.id, b"up"),
        ),
        (
            "directory in itself",
            set_entry("d", "parent_host = 1, parent_counter = 1"),
            vec![
                Violation::Unreachable {
                    id: d.id,
                    in_cycle: true,
                },
                Violation::Unreachable {
                    id: f.id,
                    in_cycle: false,
                },
            ],
            vec!["1:1", "cycle"],
            set_entry("d", "parent_host = 0, parent_counter = 1"),
        ),
        (
            "file without a name",
            set_entry("g", "deleted = true"),
            vec![Violation::Unreachable {
                id: g.id,
                in_cycle: false,
            }],
            vec!["1:3", "not reachable"],
            set_entry("g", "deleted = false"),
        ),
        (
            "directory without a name",
            set_entry("d", "deleted = true"),
            vec![
                Violation::DirectoryNames {
                    dir: d.id,
                    names: 0,
                },
                Violation::Unreachable {
                    id: d.id,
                    in_cycle: false,
                },
                Violation::Unreachable {
                    id: f.id,
                    in_cycle: false,
                },
            ],
            vec!["1:1", "0 names"],
            set_entry("d", "deleted = false"),
        ),
        (
            "size not the sum of the chunks",
            set_inode(f.id, "size = 10"),
            vec![Violation::SizeMismatch {
                file: f.id,
                size: 10,
                chunks: 8,
            }],
            vec!["1:2", "10", "8 bytes"],
            set_inode(f.id, "size = 8"),
        ),
        (
            "missing chunk",
            format!(
                "INSERT INTO {chunks} (host, counter, idx, hash, len) VALUES (1, 2, 2, {}, 0)",
                v.blob(&lost.to_hex())
            ),
            vec![Violation::MissingChunk {
                file: f.id,
                hash: lost,
            }],
            vec!["1:2", &lost_hex],
            format!("DELETE FROM {chunks} WHERE idx = 2"),
        ),
        (
            "mode without a file type",
            set_inode(g.id, "mode = 420"),
            vec![Violation::InvalidMode {
                id: g.id,
                mode: 0o644,
            }],
            vec!["1:3", "644"],
            set_inode(g.id, "mode = 33188"),
        ),
        (
            "no root",
            set_inode(ROOT, "deleted = true"),
            vec![
                Violation::MissingRoot,
                Violation::MissingParent {
                    parent: ROOT,
                    name: b"d".to_vec(),
                },
                Violation::MissingParent {
                    parent: ROOT,
                    name: b"g".to_vec(),
                },
                Violation::Unreachable {
                    id: d.id,
                    in_cycle: false,
                },
                Violation::Unreachable {
                    id: f.id,
                    in_cycle: false,
                },
                Violation::Unreachable {
                    id: g.id,
                    in_cycle: false,
                },
            ],
            vec!["root", "0:1"],
            set_inode(ROOT, "deleted = false"),
        ),
    ];
    for (what, tamper, expect, words, repair) in cases {
        v.exec(&tamper);
        let found = ferry_backend::check(&*b).unwrap();
        assert_eq!(found, expect, "{what}");
        let lines: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(lines.iter().all(|l| !l.contains('\n')), "{what}: {lines:?}");
        let line = &lines[0];
        for word in words {
            assert!(line.contains(word), "{what}: {line:?} lacks {word:?}");
        }
        v.exec(&repair);
        assert_whole(&*b, &format!("after repairing: {what}"));
    }
}

/// splitmix64: a tiny seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())].clone())
    }
}

/// What a simulated host believes the backend holds: its last fetch, plus
/// its own ops as they were applied. Other hosts' changes it sees only at
/// its next fetch, so its bases go stale.
#[derive(Default)]
struct View {
    inodes: BTreeMap<ObjectId, InodeState>,
    entries: BTreeMap<(ObjectId, Vec<u8>), (ObjectId, u64)>,
}

impl View {
    fn fetch(b: &dyn Backend) -> View {
        let (_, inodes, entries) = b.snapshot().unwrap();
        View {
            inodes: inodes.into_iter().map(|i| (i.id, i)).collect(),
            entries: entries
                .into_iter()
                .map(|e| ((e.parent, e.name), (e.child, e.version)))
                .collect(),
        }
    }

    fn is_dir(&self, id: ObjectId) -> bool {
        self.inodes
            .get(&id)
            .is_some_and(|i| i.mode & 0o170000 == 0o40000)
    }

    fn of_kind(&self, dirs: bool) -> Vec<ObjectId> {
        self.inodes
            .keys()
            .copied()
            .filter(|&id| self.is_dir(id) == dirs)
            .collect()
    }

    fn names(&self) -> Vec<(ObjectId, Vec<u8>)> {
        self.entries.keys().cloned().collect()
    }

    fn name_count(&self, id: ObjectId) -> usize {
        self.entries.values().filter(|(c, _)| *c == id).count()
    }

    fn is_empty_dir(&self, id: ObjectId) -> bool {
        self.is_dir(id) && !self.entries.keys().any(|(p, _)| *p == id)
    }

    /// Whether `dir` is `at` or above it (moving `dir` into `at` would
    /// make a cycle, as far as this view knows).
    fn is_above(&self, dir: ObjectId, mut at: ObjectId) -> bool {
        for _ in 0..=self.inodes.len() {
            if at == dir {
                return true;
            }
            match self.entries.iter().find(|(_, (c, _))| *c == at) {
                Some(((parent, _), _)) => at = *parent,
                None => return false,
            }
        }
        true
    }

    fn absorb(&mut self, ops: &[Op], outcomes: &[Outcome]) {
        for (op, outcome) in ops.iter().zip(outcomes) {
            let Outcome::Applied { version } = *outcome else {
                continue;
            };
            match op {
                Op::PutInode { state, .. } => {
                    let state = InodeState {
                        version,
                        ..state.clone()
                    };
                    self.inodes.insert(state.id, state);
                }
                Op::DeleteInode { id, .. } => {
                    self.inodes.remove(id);
                }
                Op::PutEntry {
                    parent,
                    name,
                    child,
                    ..
                } => {
                    self.entries
                        .insert((*parent, name.clone()), (*child, version));
                }
                Op::DeleteEntry { parent, name, .. } => {
                    self.entries.remove(&(*parent, name.clone()));
                }
            }
        }
    }
}

/// A simulated host: its id, its next inode counter and its view.
struct Host {
    id: u32,
    counter: u64,
    view: View,
}

/// The chunks files are made of (stored up front, so every file's chunk
/// list is whole and adds up).
fn chunk_pool() -> Vec<(ChunkHash, Vec<u8>)> {
    (1..=4u8)
        .map(|n| {
            let data = vec![n; usize::from(n) * 3];
            (ChunkHash::of(&data), data)
        })
        .collect()
}

/// Ops a host with `host`'s view might send for one random file-system
/// operation; empty if the drawn operation makes no sense in the view.
fn action(rng: &mut Rng, host: &mut Host, pool: &[(ChunkHash, Vec<u8>)]) -> Vec<Op> {
    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
    let view = &host.view;
    let name = rng.pick(&NAMES).unwrap();
    let Some(dir) = rng.pick(&view.of_kind(true)) else {
        return Vec::new();
    };
    let base_of = |parent: ObjectId, name: &str| {
        view.entries
            .get(&(parent, name.as_bytes().to_vec()))
            .map(|(_, v)| *v)
    };
    // A stale view may name inodes it no longer has: then nothing is sent.
    let version_of = |id: &ObjectId| view.inodes.get(id).map(|i| i.version);
    let touched = |id: ObjectId, rng: &mut Rng| {
        let mut state = view.inodes.get(&id)?.clone();
        state.ctime_ns += 1;
        if state.mode & 0o170000 == 0o100000 && rng.percent(50) {
            state.chunks = (0..rng.below(3))
                .map(|_| {
                    let (hash, data) = rng.pick(pool).unwrap();
                    (hash, data.len() as u32)
                })
                .collect();
            state.size = state.chunks.iter().map(|(_, l)| u64::from(*l)).sum();
        }
        Some(Op::PutInode {
            base: Some(state.version),
            state,
        })
    };
    match rng.below(10) {
        // Create a file or a directory (a taken name refuses the create).
        0..=3 => {
            host.counter += 1;
            let id = ObjectId {
                host: host.id,
                counter: host.counter,
            };
            let mode = if rng.percent(35) { 0o40755 } else { 0o100644 };
            create(&InodeState::new(id, mode), dir, name).to_vec()
        }
        // Rename, possibly over an existing name; half of the time a
        // directory's, for crossed moves.
        4..=6 => {
            let mut names = view.names();
            if rng.percent(50) {
                names.retain(|key| view.is_dir(view.entries[key].0));
            }
            let Some((parent, old)) = rng.pick(&names) else {
                return Vec::new();
            };
            let (child, version) = view.entries[&(parent, old.clone())];
            if (parent, old.as_slice()) == (dir, name.as_bytes())
                || (view.is_dir(child) && view.is_above(child, dir))
            {
                return Vec::new();
            }
            let Some(touch) = touched(child, rng) else {
                return Vec::new();
            };
            let mut ops = vec![
                Op::DeleteEntry {
                    parent,
                    name: old,
                    base: version,
                },
                touch,
                link(dir, name, child, base_of(dir, name)),
            ];
            if let Some((replaced, _)) = view.entries.get(&(dir, name.as_bytes().to_vec())) {
                let replaceable = if view.is_dir(child) {
                    view.is_empty_dir(*replaced)
                } else {
                    !view.is_dir(*replaced) && view.name_count(*replaced) == 1
                };
                match version_of(replaced) {
                    Some(base) if replaceable => ops.push(Op::DeleteInode {
                        id: *replaced,
                        base,
                    }),
                    _ => return Vec::new(),
                }
            }
            ops
        }
        // Remove a name: the last name of a file, or an empty directory,
        // goes with its inode.
        7 => {
            let Some((parent, old)) = rng.pick(&view.names()) else {
                return Vec::new();
            };
            let (child, version) = view.entries[&(parent, old.clone())];
            let mut ops = vec![Op::DeleteEntry {
                parent,
                name: old,
                base: version,
            }];
            if view.is_dir(child) && !view.is_empty_dir(child) {
                return Vec::new();
            }
            if view.is_dir(child) || view.name_count(child) == 1 {
                let Some(base) = version_of(&child) else {
                    return Vec::new();
                };
                ops.push(Op::DeleteInode { id: child, base });
            }
            ops
        }
        // Edit a file.
        8 => rng
            .pick(&view.of_kind(false))
            .and_then(|f| touched(f, rng))
            .into_iter()
            .collect(),
        // A hard link.
        _ => match rng.pick(&view.of_kind(false)) {
            Some(f) if base_of(dir, name).is_none() => touched(f, rng)
                .map(|touch| vec![touch, link(dir, name, f, None)])
                .unwrap_or_default(),
            _ => Vec::new(),
        },
    }
}

/// Three hosts with stale views send random batches to one backend; after
/// every commit the backend must be whole. Set `FERRY_SEED` to replay.
fn random_hosts_keep_the_backend_whole(v: &Volume) {
    const COMMITS: usize = 300;
    let seed = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("random_hosts_keep_the_backend_whole: seed {seed} (replay with FERRY_SEED={seed})");
    let mut rng = Rng(seed);
    let b = v.init_open();
    let pool = chunk_pool();
    for (hash, data) in &pool {
        b.put_chunk(hash, data).unwrap();
    }
    let mut hosts: Vec<Host> = (1..=3)
        .map(|id| Host {
            id,
            counter: 0,
            view: View::fetch(&*b),
        })
        .collect();
    let (mut applied_ops, mut i3_refusals, mut commits) = (0, 0, 0);
    // Bounded: each try either commits or draws nothing sensible.
    for _try in 0..COMMITS * 20 {
        if commits == COMMITS {
            break;
        }
        let host = &mut hosts[rng.below(3)];
        if rng.percent(30) {
            host.view = View::fetch(&*b);
        }
        let ops: Vec<Op> = (0..1 + rng.below(3))
            .flat_map(|_| action(&mut rng, host, &pool))
            .collect();
        if ops.is_empty() {
            continue;
        }
        let outcomes = b.commit(host.id, &ops).unwrap();
        commits += 1;
        for (op, outcome) in ops.iter().zip(&outcomes) {
            match *outcome {
                Outcome::Applied { .. } => applied_ops += 1,
                // The base matched, so only the I3 rules refused it.
                Outcome::Conflict { current } if current == op_base(op) => i3_refusals += 1,
                Outcome::Conflict { .. } => {}
            }
        }
        host.view.absorb(&ops, &outcomes);
        assert_whole(
            &*b,
            &format!("seed {seed}, commit {commits}: {ops:?} -> {outcomes:?}"),
        );
    }
    eprintln!("{commits} commits: {applied_ops} ops applied, {i3_refusals} refused by I3");
    assert_eq!(commits, COMMITS, "seed {seed}: too few sensible batches");
    assert!(
        applied_ops > COMMITS && i3_refusals > 10,
        "seed {seed}: a workload that tests little ({applied_ops} ops applied, \
         {i3_refusals} refused by I3)"
    );
}

fn op_base(op: &Op) -> Option<u64> {
    match op {
        Op::PutInode { base, .. } | Op::PutEntry { base, .. } => *base,
        Op::DeleteInode { base, .. } | Op::DeleteEntry { base, .. } => Some(*base),
    }
}
