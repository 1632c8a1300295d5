//! The conformance suite: every property is one generic function over a
//! [`Volume`], and `conformance!` runs each against both implementations
//! (`dir::NAME` and `pg::NAME`). The PostgreSQL cases share one throwaway
//! cluster per test binary (`PgServer::shared`), one database per test.
//!
//! The I3 rules of `commit` and the checker have their own binary
//! (`integrity.rs`).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use ferry_backend::{
    Backend, BackendError, ChunkHash, Entry, FeedChange, HostMark, InodeState, ObjectId, Op,
    Outcome, MAX_CHUNK, SCHEMA_VERSION,
};

#[macro_use]
mod support;
use support::*;

conformance!(
    init_and_info,
    open_refuses_uninitialized_and_unknown_schema,
    chunks_round_trip_and_verify,
    missing_chunks_reports_only_absent,
    corrupt_chunks_are_errors_not_data,
    create_twice_conflicts,
    stale_update_conflicts_and_leaves_state,
    stale_delete_conflicts,
    versions_never_repeat_after_delete,
    batch_reports_per_op_outcomes,
    entries_put_replace_delete,
    feed_order_and_content,
    snapshot_is_consistent_under_concurrent_commits,
    wait_feed_wakes_on_commit_from_other_host,
    wait_feed_times_out_without_commits,
    concurrent_counters_lose_no_update,
    garbage_rows_are_corrupt,
    inode_reads_are_consistent_under_concurrent_commits,
    host_marks_follow_ids_and_shipping,
    version_1_volume_is_refused_until_init_migrates_it,
);

fn init_and_info(v: &Volume) {
    let info = ferry_backend::init(&v.url, "photos").unwrap();
    assert_eq!(info.name, "photos");
    assert_eq!(info.schema_version, SCHEMA_VERSION);
    assert_eq!(info.volume_id.len(), 36, "{info:?}");
    let b = v.open();
    assert_eq!(b.info().unwrap(), info);
    let root = b
        .inode(&ObjectId::ROOT)
        .unwrap()
        .expect("init creates the root");
    assert_eq!(
        (root.mode, root.uid, root.gid, root.version),
        (0o40755, 0, 0, 1)
    );
    assert!(b.entries(&ObjectId::ROOT).unwrap().is_empty());
    let again = ferry_backend::init(&v.url, "other").unwrap_err();
    assert!(
        matches!(again, BackendError::AlreadyInitialized { ref volume, .. } if volume == "photos"),
        "{again}"
    );
    assert_eq!(b.info().unwrap(), info, "a refused init changes nothing");
    // Volume ids tell volumes apart.
    let other = v.sibling("other");
    assert_ne!(
        ferry_backend::init(&other.url, "photos").unwrap().volume_id,
        info.volume_id
    );
}

fn open_refuses_uninitialized_and_unknown_schema(v: &Volume) {
    let err = ferry_backend::open(&v.url, TIMEOUT).unwrap_err();
    assert!(matches!(err, BackendError::NotInitialized { .. }), "{err}");
    v.init_open();
    v.set_schema_version(SCHEMA_VERSION + 1);
    let err = ferry_backend::open(&v.url, TIMEOUT).unwrap_err();
    assert!(
        matches!(err, BackendError::SchemaVersion { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    // init must not "upgrade" a newer volume either.
    let err = ferry_backend::init(&v.url, "x").unwrap_err();
    assert!(matches!(err, BackendError::SchemaVersion { .. }), "{err}");
}

fn chunks_round_trip_and_verify(v: &Volume) {
    let b = v.init_open();
    let big: Vec<u8> = (0..MAX_CHUNK).map(|i| (i * 7 % 251) as u8).collect();
    for data in [&b""[..], b"x", &big[..]] {
        let hash = ChunkHash::of(data);
        b.put_chunk(&hash, data).unwrap();
        b.put_chunk(&hash, data).unwrap(); // idempotent
        assert_eq!(b.get_chunk(&hash).unwrap(), data);
    }
    let wrong = b.put_chunk(&ChunkHash::of(b"a"), b"b").unwrap_err();
    assert!(matches!(wrong, BackendError::Invalid { .. }), "{wrong}");
    assert!(
        b.missing_chunks(&[ChunkHash::of(b"a")]).unwrap().len() == 1,
        "rejected upload stored nothing"
    );
    let oversize = vec![0u8; MAX_CHUNK + 1];
    let err = b
        .put_chunk(&ChunkHash::of(&oversize), &oversize)
        .unwrap_err();
    assert!(matches!(err, BackendError::Invalid { .. }), "{err}");
    let err = b.get_chunk(&ChunkHash::of(b"never stored")).unwrap_err();
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
}

fn missing_chunks_reports_only_absent(v: &Volume) {
    let b = v.init_open();
    let hashes: Vec<ChunkHash> = (0..10u8).map(|i| ChunkHash::of(&[i])).collect();
    for i in (0..10u8).step_by(3) {
        b.put_chunk(&hashes[i as usize], &[i]).unwrap();
    }
    let missing = b.missing_chunks(&hashes).unwrap();
    let expect: Vec<ChunkHash> = (0..10).filter(|i| i % 3 != 0).map(|i| hashes[i]).collect();
    assert_eq!(missing, expect, "order of the request is kept");
    assert!(b.missing_chunks(&[]).unwrap().is_empty());
}

fn corrupt_chunks_are_errors_not_data(v: &Volume) {
    let b = v.init_open();
    let data = b"some file content that will be damaged";
    let (h1, h2) = (ChunkHash::of(data), ChunkHash::of(&data[1..]));
    b.put_chunk(&h1, data).unwrap();
    b.put_chunk(&h2, &data[1..]).unwrap();
    v.truncate_chunk(&h1);
    v.flip_chunk(&h2, data.len() - 1);
    for h in [h1, h2] {
        let err = b.get_chunk(&h).unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
        assert!(!err.is_transient());
    }
    // Re-uploading repairs a truncated chunk.
    b.put_chunk(&h1, data).unwrap();
    assert_eq!(b.get_chunk(&h1).unwrap(), data);
}

fn create_twice_conflicts(v: &Volume) {
    let b = v.init_open();
    let f = file(1, 10);
    assert_eq!(
        b.commit(1, &create(&f, ObjectId::ROOT, "f")).unwrap(),
        vec![applied(1), applied(1)]
    );
    assert_eq!(
        b.commit(2, &[put(f.clone(), None)]).unwrap(),
        vec![conflict(Some(1))]
    );
    let stored = b.inode(&f.id).unwrap().unwrap();
    assert_eq!(
        stored,
        InodeState {
            version: 1,
            origin: 1,
            ..f
        }
    );
}

fn stale_update_conflicts_and_leaves_state(v: &Volume) {
    let b = v.init_open();
    let mut f = file(1, 10);
    b.commit(1, &create(&f, ObjectId::ROOT, "f")).unwrap();
    f.size = 5;
    assert_eq!(
        b.commit(1, &[put(f.clone(), Some(1))]).unwrap(),
        vec![applied(2)]
    );
    let before = b.inode(&f.id).unwrap().unwrap();
    let seq = last_seq(&*b);
    f.size = 99;
    for stale in [1, 3] {
        assert_eq!(
            b.commit(2, &[put(f.clone(), Some(stale))]).unwrap(),
            vec![conflict(Some(2))]
        );
    }
    assert_eq!(b.inode(&f.id).unwrap().unwrap(), before);
    assert_eq!(last_seq(&*b), seq, "a conflict appends nothing to the feed");
    // Updating an inode that does not exist conflicts with current None.
    assert_eq!(
        b.commit(2, &[put(file(9, 9), Some(1))]).unwrap(),
        vec![conflict(None)]
    );
}

fn stale_delete_conflicts(v: &Volume) {
    let b = v.init_open();
    let f = file(1, 10);
    let [new, name] = create(&f, ObjectId::ROOT, "f");
    b.commit(1, &[new, name, put(f.clone(), Some(1))]).unwrap();
    let del = |base| Op::DeleteInode { id: f.id, base };
    let unlink_f = unlink(ObjectId::ROOT, "f", 1);
    assert_eq!(
        b.commit(2, &[unlink_f.clone(), del(1)]).unwrap(),
        vec![conflict(Some(1)), conflict(Some(2))],
        "the name stays with the inode it names"
    );
    assert!(b.inode(&f.id).unwrap().is_some());
    assert_eq!(
        b.commit(2, &[unlink_f, del(2)]).unwrap(),
        vec![applied(2), applied(3)]
    );
    assert!(b.inode(&f.id).unwrap().is_none());
    assert_eq!(
        b.commit(2, &[del(3)]).unwrap(),
        vec![conflict(None)],
        "already deleted"
    );
}

fn versions_never_repeat_after_delete(v: &Volume) {
    let b = v.init_open();
    let f = file(1, 10);
    b.commit(1, &create(&f, ObjectId::ROOT, "n")).unwrap();
    let delete = [
        unlink(ObjectId::ROOT, "n", 1),
        Op::DeleteInode { id: f.id, base: 1 },
    ];
    assert_eq!(b.commit(1, &delete).unwrap(), vec![applied(2), applied(2)]);
    // Re-created: the versions continue past the tombstones' (2) ...
    assert_eq!(
        b.commit(1, &create(&f, ObjectId::ROOT, "n")).unwrap(),
        vec![applied(3), applied(3)]
    );
    // ... so a host still holding base 1 from the first life conflicts.
    assert_eq!(
        b.commit(2, &[put(f.clone(), Some(1))]).unwrap(),
        vec![conflict(Some(3))]
    );
    assert_eq!(
        b.commit(2, &[link(ObjectId::ROOT, "n", f.id, Some(1))])
            .unwrap(),
        vec![conflict(Some(3))]
    );
}

fn batch_reports_per_op_outcomes(v: &Volume) {
    let b = v.init_open();
    let (a, c) = (file(1, 1), file(1, 2));
    b.commit(1, &create(&a, ObjectId::ROOT, "a")).unwrap();
    let seq = last_seq(&*b);
    let ops = [
        put(a.clone(), None),                  // conflict: exists
        put(c.clone(), None),                  // applied
        put(a.clone(), Some(1)),               // applied (a -> 2)
        Op::DeleteInode { id: a.id, base: 1 }, // conflict: a is now 2 (ops see earlier ops)
        Op::PutEntry {
            parent: ObjectId::ROOT,
            name: b"c".to_vec(),
            child: c.id,
            base: None,
        },
        Op::DeleteEntry {
            parent: ObjectId::ROOT,
            name: b"zz".to_vec(),
            base: 1,
        }, // conflict: absent
    ];
    let outcomes = b.commit(7, &ops).unwrap();
    assert_eq!(
        outcomes,
        vec![
            conflict(Some(1)),
            applied(1),
            applied(2),
            conflict(Some(2)),
            applied(1),
            conflict(None)
        ]
    );
    assert_eq!(b.inode(&a.id).unwrap().unwrap().version, 2);
    assert_eq!(b.inode(&c.id).unwrap().unwrap().origin, 7);
    let feed = b.feed(seq, 100).unwrap();
    let changes: Vec<FeedChange> = feed.iter().map(|i| i.change.clone()).collect();
    assert_eq!(
        changes,
        vec![
            FeedChange::Inode(c.id),
            FeedChange::Inode(a.id),
            FeedChange::Entry {
                parent: ObjectId::ROOT,
                name: b"c".to_vec()
            }
        ],
        "only applied ops reach the feed, in op order"
    );
    assert!(feed.iter().all(|i| i.origin == 7));
    assert!(b.commit(7, &[]).unwrap().is_empty());
}

fn entries_put_replace_delete(v: &Volume) {
    let b = v.init_open();
    let (x, y) = (file(2, 1), file(2, 2));
    let dir = InodeState::new(
        ObjectId {
            host: 2,
            counter: 3,
        },
        0o40700,
    );
    let made = b
        .commit(
            2,
            &[
                put(x.clone(), None),
                put(y.clone(), None),
                put(dir.clone(), None),
                link(ObjectId::ROOT, "x", x.id, None),
                link(ObjectId::ROOT, "y", y.id, None),
                link(ObjectId::ROOT, "d", dir.id, None),
            ],
        )
        .unwrap();
    assert_eq!(made, vec![applied(1); 6]);
    let e = |name: &[u8], child, base| Op::PutEntry {
        parent: dir.id,
        name: name.to_vec(),
        child,
        base,
    };
    // Any bytes but `/` and NUL, UTF-8 or not.
    let names: [&[u8]; 3] = [b"b", b"a", b"\xff\x01bytes"];
    for n in names {
        assert_eq!(b.commit(2, &[e(n, x.id, None)]).unwrap(), vec![applied(1)]);
    }
    assert_eq!(
        b.commit(2, &[e(b"a", y.id, None)]).unwrap(),
        vec![conflict(Some(1))],
        "name taken"
    );
    assert_eq!(
        b.commit(2, &[e(b"a", y.id, Some(1))]).unwrap(),
        vec![applied(2)]
    );
    let del = Op::DeleteEntry {
        parent: dir.id,
        name: b"b".to_vec(),
        base: 1,
    };
    assert_eq!(b.commit(2, &[del]).unwrap(), vec![applied(2)]);
    let got = b.entries(&dir.id).unwrap();
    assert_eq!(
        got,
        vec![
            Entry {
                parent: dir.id,
                name: b"a".to_vec(),
                child: y.id,
                version: 2,
                origin: 2,
            },
            Entry {
                parent: dir.id,
                name: b"\xff\x01bytes".to_vec(),
                child: x.id,
                version: 1,
                origin: 2,
            },
        ]
    );
    let in_root: Vec<Vec<u8>> = b
        .entries(&ObjectId::ROOT)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(in_root, [b"d", b"x", b"y"], "entries are per parent");
}

fn feed_order_and_content(v: &Volume) {
    let b = v.init_open();
    let start = b.feed(0, 100).unwrap();
    assert_eq!(start.len(), 1, "init logs the root: {start:?}");
    assert_eq!(start[0].change, FeedChange::Inode(ObjectId::ROOT));
    let mut expect = vec![];
    for i in 1..=20u64 {
        let origin = (i % 3) as u32 + 1;
        let f = file(origin, i);
        let name = format!("f{i}");
        b.commit(origin, &create(&f, ObjectId::ROOT, &name))
            .unwrap();
        expect.push((origin, FeedChange::Inode(f.id)));
        expect.push((
            origin,
            FeedChange::Entry {
                parent: ObjectId::ROOT,
                name: name.into_bytes(),
            },
        ));
    }
    let all = b.feed(start[0].seq, 1000).unwrap();
    let got: Vec<_> = all.iter().map(|i| (i.origin, i.change.clone())).collect();
    assert_eq!(got, expect);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "seqs increase");
    // Paging by limit covers the same items exactly once.
    let (mut after, mut paged) = (start[0].seq, vec![]);
    loop {
        let page = b.feed(after, 7).unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert_eq!(
        b.feed(start[0].seq, usize::MAX).unwrap(),
        all,
        "huge limits are fine"
    );
    assert!(b.feed(u64::MAX, 10).unwrap().is_empty());
    assert_eq!(last_seq(&*b), all.last().unwrap().seq);
}

fn snapshot_is_consistent_under_concurrent_commits(v: &Volume) {
    let b: Arc<dyn Backend> = v.init_open().into();
    let data = b"chunk";
    let hash = ChunkHash::of(data);
    b.put_chunk(&hash, data).unwrap();
    let writer = {
        let b = b.clone();
        thread::spawn(move || {
            for i in 0..40u64 {
                let mut f = file(3, i + 10);
                f.chunks = vec![(hash, 5), (hash, 5)];
                f.size = 10;
                let entry = Op::PutEntry {
                    parent: ObjectId::ROOT,
                    name: format!("f{i}").into_bytes(),
                    child: f.id,
                    base: None,
                };
                b.commit(3, &[put(f, None), entry]).unwrap();
            }
        })
    };
    let mut snapshots = 0;
    while !writer.is_finished() || snapshots == 0 {
        let (seq, inodes, entries) = b.snapshot().unwrap();
        snapshots += 1;
        // Each commit adds one inode and one entry: the snapshot has exactly
        // the commits up to `seq`, never half a commit.
        let feed = b.feed(0, 10_000).unwrap();
        let upto = feed.iter().filter(|i| i.seq <= seq).count();
        assert_eq!(inodes.len(), upto / 2 + 1, "root + one inode per commit");
        assert_eq!(entries.len(), upto / 2);
        for e in &entries {
            let child = inodes
                .iter()
                .find(|i| i.id == e.child)
                .expect("entry's inode in snapshot");
            assert_eq!(child.chunks, vec![(hash, 5), (hash, 5)]);
        }
    }
    writer.join().unwrap();
    let (_, inodes, entries) = b.snapshot().unwrap();
    assert_eq!((inodes.len(), entries.len()), (41, 40));
    assert_eq!(
        inodes
            .iter()
            .find(|i| i.id
                == ObjectId {
                    host: 3,
                    counter: 10
                })
            .unwrap()
            .xattrs,
        file(0, 0).xattrs
    );
}

fn wait_feed_wakes_on_commit_from_other_host(v: &Volume) {
    let b = v.init_open();
    let other_host = v.open();
    let after = last_seq(&*b);
    let same_host_writer = v.open();
    for (label, writer) in [
        ("another Backend object", other_host),
        ("same process", same_host_writer),
    ] {
        let after = last_seq(&*b).max(after);
        let committer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let f = file(9, after + 100);
            writer
                .commit(9, &create(&f, ObjectId::ROOT, &format!("f{after}")))
                .unwrap();
        });
        let t0 = Instant::now();
        assert!(
            b.wait_feed(after, Duration::from_secs(20)).unwrap(),
            "{label}"
        );
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "{label}: returned before the commit ({waited:?})"
        );
        assert!(
            waited < Duration::from_secs(5),
            "{label}: woke late ({waited:?})"
        );
        committer.join().unwrap();
        assert_eq!(b.feed(after, 10).unwrap().len(), 2, "{label}");
    }
    // Already there: immediate.
    assert!(b.wait_feed(0, Duration::ZERO).unwrap());
}

fn wait_feed_times_out_without_commits(v: &Volume) {
    let b = v.init_open();
    let after = last_seq(&*b);
    let t0 = Instant::now();
    assert!(!b.wait_feed(after, Duration::from_millis(400)).unwrap());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

fn concurrent_counters_lose_no_update(v: &Volume) {
    const THREADS: usize = 8;
    const INCREMENTS: u64 = 25;
    let shared: Arc<dyn Backend> = v.init_open().into();
    let counter = file(1, 1);
    shared
        .commit(1, &create(&counter, ObjectId::ROOT, "counter"))
        .unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            // Half the threads share one object; the others are separate
            // "hosts" with their own object (own connections).
            let b: Arc<dyn Backend> = if t % 2 == 0 {
                shared.clone()
            } else {
                v.open().into()
            };
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let mut conflicts = 0;
                for _ in 0..INCREMENTS {
                    loop {
                        let mut cur = b
                            .inode(&ObjectId {
                                host: 1,
                                counter: 1,
                            })
                            .unwrap()
                            .unwrap();
                        let base = cur.version;
                        cur.size += 1;
                        match b.commit(t as u32, &[put(cur, Some(base))]).unwrap()[..] {
                            [Outcome::Applied { version }] => {
                                assert_eq!(version, base + 1);
                                break;
                            }
                            [Outcome::Conflict { current }] => {
                                assert!(current.unwrap() > base);
                                conflicts += 1;
                            }
                            ref other => panic!("{other:?}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let end = shared.inode(&counter.id).unwrap().unwrap();
    assert_eq!(
        end.size,
        THREADS as u64 * INCREMENTS,
        "no lost update ({conflicts} conflicts retried)"
    );
    assert_eq!(end.version, 1 + THREADS as u64 * INCREMENTS);
}

fn garbage_rows_are_corrupt(v: &Volume) {
    let b = v.init_open();
    let mut f = file(4, 4);
    f.chunks = vec![(ChunkHash::of(b"x"), 1)];
    b.commit(4, &create(&f, ObjectId::ROOT, "f")).unwrap();
    let inodes = v.table("inodes");
    let expect_corrupt = |what: &str, r: Result<(), BackendError>| {
        let err = r.unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{what}: {err}");
    };
    let read = || b.inode(&f.id).map(drop);
    let snap = || b.snapshot().map(drop);

    v.exec(&format!(
        "UPDATE {inodes} SET xattrs = {} WHERE counter = 4",
        v.blob("ffffffff01")
    ));
    expect_corrupt("undecodable xattrs", read());
    expect_corrupt("undecodable xattrs in snapshot", snap());
    v.exec(&format!(
        "UPDATE {inodes} SET xattrs = {}, mode = -5 WHERE counter = 4",
        v.blob("")
    ));
    expect_corrupt("negative mode", read());
    v.exec(&format!(
        "UPDATE {inodes} SET mode = 33188 WHERE counter = 4"
    ));
    read().unwrap();
    v.exec(&format!(
        "UPDATE {} SET hash = {} WHERE counter = 4",
        v.table("inode_chunks"),
        v.blob("0102")
    ));
    expect_corrupt("short chunk hash", read());
    v.exec(&format!("UPDATE {} SET kind = 9", v.table("feed")));
    expect_corrupt("unknown feed kind", b.feed(0, 10).map(drop));
    v.exec(&format!("UPDATE {} SET version = -1", v.table("entries")));
    b.commit(
        4,
        &[Op::PutEntry {
            parent: ObjectId::ROOT,
            name: b"e".to_vec(),
            child: f.id,
            base: None,
        }],
    )
    .unwrap();
    v.exec(&format!("UPDATE {} SET version = -1", v.table("entries")));
    expect_corrupt(
        "negative entry version",
        b.entries(&ObjectId::ROOT).map(drop),
    );
}

fn inode_reads_are_consistent_under_concurrent_commits(v: &Volume) {
    let b: Arc<dyn Backend> = v.init_open().into();
    let hash = ChunkHash::of(b"c");
    b.put_chunk(&hash, b"c").unwrap();
    let mut f = file(6, 1);
    b.commit(6, &create(&f, ObjectId::ROOT, "f")).unwrap();
    let writer = {
        let b = v.open();
        thread::spawn(move || {
            // Invariant of every committed state: size == number of chunks.
            for version in 1..150u64 {
                let n = (version % 7) as usize;
                f.chunks = vec![(hash, 1); n];
                f.size = n as u64;
                assert_eq!(
                    b.commit(6, &[put(f.clone(), Some(version))]).unwrap(),
                    vec![applied(version + 1)]
                );
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let got = b
            .inode(&ObjectId {
                host: 6,
                counter: 1,
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            got.size,
            got.chunks.len() as u64,
            "inode row and chunk list from different commits"
        );
        reads += 1;
    }
    writer.join().unwrap();
    assert!(reads > 0);
}

fn host_marks_follow_ids_and_shipping(v: &Volume) {
    let b = v.init_open();
    assert_eq!(b.host_mark(1).unwrap(), HostMark::default());
    assert_eq!(
        b.host_mark(0).unwrap().max_counter,
        1,
        "the root is the volume's"
    );
    let (f5, f9, big) = (file(1, 5), file(1, 9), file(2, 1 << 40));
    b.commit(
        1,
        &[
            create(&f9, ObjectId::ROOT, "f9"),
            create(&f5, ObjectId::ROOT, "f5"),
            create(&big, ObjectId::ROOT, "big"),
        ]
        .concat(),
    )
    .unwrap();
    // Deleted inodes count: their ids are taken for good.
    let gone = [
        unlink(ObjectId::ROOT, "f9", 1),
        Op::DeleteInode { id: f9.id, base: 1 },
    ];
    assert_eq!(b.commit(1, &gone).unwrap(), [applied(2), applied(2)]);
    assert_eq!(b.host_mark(1).unwrap().max_counter, 9);
    assert_eq!(b.host_mark(2).unwrap().max_counter, 1 << 40);
    // A refused create takes no id.
    assert_eq!(
        b.commit(3, &[put(file(3, 50), None)]).unwrap(),
        [conflict(None)]
    );
    assert_eq!(b.host_mark(3).unwrap().max_counter, 0);

    b.set_shipped(1, 40).unwrap();
    b.set_shipped(1, 12).unwrap();
    assert_eq!(b.host_mark(1).unwrap().shipped_seq, 40, "marks only rise");
    b.set_shipped(1, 41).unwrap();
    b.set_shipped(u32::MAX, u64::from(u32::MAX) + 7).unwrap();
    assert_eq!(b.host_mark(2).unwrap().shipped_seq, 0, "marks are per host");
    let other = v.open();
    assert_eq!(
        other.host_mark(1).unwrap(),
        HostMark {
            max_counter: 9,
            shipped_seq: 41
        }
    );
    assert_eq!(
        other.host_mark(u32::MAX).unwrap(),
        HostMark {
            max_counter: 0,
            shipped_seq: u64::from(u32::MAX) + 7
        }
    );
}

/// A volume as version 1 left it (no host marks, no index of entries by
/// child, no origin of entries): `open` refuses it with the way out, `init`
/// migrates it in place.
fn version_1_volume_is_refused_until_init_migrates_it(v: &Volume) {
    let b = v.init_open();
    let info = b.info().unwrap();
    let f = file(1, 3);
    b.commit(1, &create(&f, ObjectId::ROOT, "f")).unwrap();
    drop(b);
    v.exec(&format!(
        "DROP TABLE {}; DROP INDEX {}; ALTER TABLE {} DROP COLUMN origin;",
        v.table("hosts"),
        v.table("entries_child"),
        v.table("entries")
    ));
    v.set_schema_version(1);

    let err = ferry_backend::open(&v.url, TIMEOUT).unwrap_err();
    assert!(
        matches!(err, BackendError::SchemaVersion { found: 1, supported } if supported == SCHEMA_VERSION),
        "{err}"
    );
    assert!(err.to_string().contains("ferry init"), "{err}");

    let migrated = ferry_backend::init(&v.url, "another name").unwrap();
    assert_eq!(
        migrated,
        ferry_backend::VolumeInfo {
            schema_version: SCHEMA_VERSION,
            ..info
        },
        "same volume, new schema"
    );
    let b = v.open();
    assert_eq!(b.info().unwrap(), migrated);
    assert_eq!(b.inode(&f.id).unwrap().unwrap().version, 1, "data kept");
    assert_eq!(b.host_mark(1).unwrap().max_counter, 3);
    b.set_shipped(1, 8).unwrap();
    assert_eq!(b.host_mark(1).unwrap().shipped_seq, 8);
    // The I3 rules run on the migrated volume.
    assert_eq!(
        b.commit(1, &[unlink(ObjectId::ROOT, "f", 1)]).unwrap(),
        [conflict(Some(1))]
    );
    assert!(matches!(
        ferry_backend::init(&v.url, "x").unwrap_err(),
        BackendError::AlreadyInitialized { .. }
    ));
}
