//! The conformance suite: every property is one generic function over a
//! [`Volume`], and `conformance!` runs each against both implementations
//! (`dir::NAME` and `pg::NAME`). The PostgreSQL cases share one throwaway
//! cluster per test binary (`PgServer::shared`), one database per test.
//!
//! The I3 rules of `commit` and the checker have their own binary
//! (`integrity.rs`); streaming a large snapshot and timings through a
//! delay proxy have theirs too (`snapshot_stream.rs`, `pg_latency.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use ferry_backend::{
    Backend, BackendError, Changes, ChunkHash, Entry, FeedChange, HostMark, InodeState, Location,
    ObjectId, Op, Outcome, SnapshotItem, MAX_CHUNK, SCHEMA_VERSION,
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
    older_volumes_are_refused_until_init_migrates_them,
    get_chunks_answers_in_order_verified,
    changes_cover_whole_commits_with_current_state,
    changes_limits_and_ends,
    changes_are_consistent_under_concurrent_commits,
    snapshot_each_streams_in_order_and_stops_on_sink_error,
    wait_feed_wakes_promptly_on_another_objects_commit,
    location_parses_opens_and_inits,
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
    expect_corrupt("undecodable xattrs in changes", b.changes(0, 100).map(drop));
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
    expect_corrupt("short chunk hash in snapshot", snap());
    v.exec(&format!("UPDATE {} SET kind = 9", v.table("feed")));
    expect_corrupt("unknown feed kind", b.feed(0, 10).map(drop));
    expect_corrupt("unknown feed kind in changes", b.changes(0, 10).map(drop));
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

/// Volumes as versions 1 and 2 left them: `open` refuses them with the
/// way out, `init` migrates them in place, and what the newer versions add
/// works on the migrated volume.
fn older_volumes_are_refused_until_init_migrates_them(v: &Volume) {
    old_volume_is_refused_until_init_migrates_it(v, 1);
    old_volume_is_refused_until_init_migrates_it(&v.sibling("v2"), 2);
}

/// Takes a fresh volume back to schema `version` (undoing the later
/// migrations), then checks `open` and `init` on it.
fn old_volume_is_refused_until_init_migrates_it(v: &Volume, version: u32) {
    let b = v.init_open();
    let info = b.info().unwrap();
    let f = file(1, 3);
    let g = file(1, 4);
    // Two commits of two items each before the downgrade.
    b.commit(1, &create(&f, ObjectId::ROOT, "f")).unwrap();
    b.commit(1, &create(&g, ObjectId::ROOT, "g")).unwrap();
    drop(b);
    // Version 3 added the commit of feed items.
    let mut undo = format!("ALTER TABLE {} DROP COLUMN txn;", v.table("feed"));
    if version < 2 {
        // Version 2 added the host marks, the index of entries by child and
        // the origin of entries.
        undo += &format!(
            "DROP TABLE {}; DROP INDEX {}; ALTER TABLE {} DROP COLUMN origin;",
            v.table("hosts"),
            v.table("entries_child"),
            v.table("entries")
        );
    }
    v.exec(&undo);
    v.set_schema_version(version);

    let err = ferry_backend::open(&v.url, TIMEOUT).unwrap_err();
    assert!(
        matches!(err, BackendError::SchemaVersion { found, supported } if found == version && supported == SCHEMA_VERSION),
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
    assert_eq!(b.host_mark(1).unwrap().max_counter, 4);
    b.set_shipped(1, 8).unwrap();
    assert_eq!(b.host_mark(1).unwrap().shipped_seq, 8);
    // The I3 rules run on the migrated volume.
    assert_eq!(
        b.commit(1, &[unlink(ObjectId::ROOT, "f", 1)]).unwrap(),
        [conflict(Some(1))]
    );
    // Items from before the migration have no known commit: each stands
    // alone. Commits after it are whole again.
    let old = b.feed(0, 100).unwrap();
    assert_eq!(old.len(), 5, "root, then two creates");
    let one = b.changes(old[0].seq, 1).unwrap();
    assert_eq!((one.seq, one.more), (old[1].seq, true));
    let h = file(1, 5);
    b.commit(1, &create(&h, ObjectId::ROOT, "h")).unwrap();
    let new = b.changes(old[4].seq, 1).unwrap();
    let all = b.feed(0, 100).unwrap();
    assert_eq!(new.seq, all[6].seq, "the new commit comes whole");
    assert!(!new.more);
    assert!(matches!(
        ferry_backend::init(&v.url, "x").unwrap_err(),
        BackendError::AlreadyInitialized { .. }
    ));
}

fn get_chunks_answers_in_order_verified(v: &Volume) {
    let b = v.init_open();
    let data: Vec<Vec<u8>> = (0..6u8)
        .map(|i| vec![i; (i as usize) * 20_000 + 1])
        .collect();
    let hashes: Vec<ChunkHash> = data.iter().map(|d| ChunkHash::of(d)).collect();
    for (h, d) in hashes.iter().zip(&data) {
        b.put_chunk(h, d).unwrap();
    }
    assert!(b.get_chunks(&[]).unwrap().is_empty());
    // Any order, duplicates included (adjacent and not).
    let order = [5, 0, 5, 5, 2, 1, 0, 3, 4];
    let asked: Vec<ChunkHash> = order.iter().map(|&i| hashes[i]).collect();
    let got = b.get_chunks(&asked).unwrap();
    assert_eq!(got.len(), order.len());
    for (g, &i) in got.iter().zip(&order) {
        assert!(g == &data[i], "answer for chunk {i} has the wrong bytes");
    }
    assert_eq!(b.get_chunk(&hashes[3]).unwrap(), data[3]);

    let never = ChunkHash::of(b"never stored");
    let err = b.get_chunks(&[hashes[0], never, hashes[1]]).unwrap_err();
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains(&never.to_hex()), "{err}");

    v.truncate_chunk(&hashes[4]);
    v.flip_chunk(&hashes[2], data[2].len());
    for damaged in [4, 2] {
        let err = b.get_chunks(&[hashes[1], hashes[damaged]]).unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
        // Asked twice, damaged once: still an error, never data.
        let err = b
            .get_chunks(&[hashes[damaged], hashes[damaged]])
            .unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
    }
    assert_eq!(b.get_chunks(&[hashes[1]]).unwrap(), [data[1].clone()]);
}

/// What a reader following `changes` holds: inodes and entries by key.
#[derive(Debug, Default, PartialEq)]
struct Model {
    inodes: BTreeMap<ObjectId, InodeState>,
    entries: BTreeMap<(ObjectId, Vec<u8>), Entry>,
}

impl Model {
    /// Applies one answer: its states are current, so they replace.
    fn apply(&mut self, changes: &Changes) {
        for (id, state) in &changes.inodes {
            match state {
                Some(state) => self.inodes.insert(*id, state.clone()),
                None => self.inodes.remove(id),
            };
        }
        for (parent, name, entry) in &changes.entries {
            let key = (*parent, name.clone());
            match entry {
                Some(entry) => self.entries.insert(key, entry.clone()),
                None => self.entries.remove(&key),
            };
        }
    }

    fn of_snapshot(b: &dyn Backend) -> Model {
        let (_, inodes, entries) = b.snapshot().unwrap();
        Model {
            inodes: inodes.into_iter().map(|i| (i.id, i)).collect(),
            entries: entries
                .into_iter()
                .map(|e| ((e.parent, e.name.clone()), e))
                .collect(),
        }
    }
}

/// Checks what every answer promises on its own: sorted, deduplicated
/// keys; each state under its own key; and the child of every live entry
/// in the answer's inodes, live.
fn assert_answer_whole(c: &Changes) {
    assert!(
        c.inodes.windows(2).all(|w| w[0].0 < w[1].0),
        "inodes sorted, no duplicates: {c:?}"
    );
    assert!(
        c.entries
            .windows(2)
            .all(|w| (w[0].0, &w[0].1) < (w[1].0, &w[1].1)),
        "entries sorted, no duplicates: {c:?}"
    );
    for (id, state) in &c.inodes {
        assert!(state.as_ref().is_none_or(|s| s.id == *id), "{c:?}");
    }
    for (parent, name, entry) in &c.entries {
        let Some(entry) = entry else { continue };
        assert_eq!((&entry.parent, &entry.name), (parent, name));
        assert!(
            c.inodes
                .iter()
                .any(|(id, state)| *id == entry.child && state.is_some()),
            "child of live entry {parent}/{name:?} missing: {c:?}"
        );
    }
}

fn changes_cover_whole_commits_with_current_state(v: &Volume) {
    let b = v.init_open();
    let hash = ChunkHash::of(b"c");
    b.put_chunk(&hash, b"c").unwrap();
    let d = dir(1, 1);
    let (mut f1, mut f2) = (file(1, 2), file(1, 3));
    f2.chunks = vec![(hash, 1), (hash, 1)];
    f2.size = 2;
    // Items per commit, in feed order: init's root first.
    let mut commit_sizes = vec![1];
    let mut run = |ops: &[Op]| {
        let outcomes = b.commit(1, ops).unwrap();
        assert!(outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Applied { .. })));
        commit_sizes.push(ops.len());
    };
    run(&create(&d, ObjectId::ROOT, "d"));
    run(&[create(&f1, d.id, "f1"), create(&f2, d.id, "f2")].concat());
    f1.size = 0;
    f1.mtime_ns += 1;
    run(&[put(f1.clone(), Some(1))]);
    // A rename: two items, one commit.
    run(&[
        unlink(d.id, "f2", 1),
        link(ObjectId::ROOT, "g", f2.id, None),
    ]);
    run(&[
        unlink(d.id, "f1", 1),
        Op::DeleteInode { id: f1.id, base: 2 },
    ]);
    let feed = b.feed(0, 1000).unwrap();
    assert_eq!(feed.len(), commit_sizes.iter().sum::<usize>());
    // The index of the last item of the commit each item belongs to.
    let commit_end: Vec<usize> = commit_sizes
        .iter()
        .scan(0, |end, n| {
            *end += n;
            Some(vec![*end - 1; *n])
        })
        .flatten()
        .collect();

    // Everything at once: each key once, in its current state.
    let all = b.changes(0, 1000).unwrap();
    assert_answer_whole(&all);
    assert_eq!((all.seq, all.more), (feed.last().unwrap().seq, false));
    let live = |id: &ObjectId| b.inode(id).unwrap();
    let ids = [ObjectId::ROOT, d.id, f1.id, f2.id];
    assert_eq!(
        all.inodes,
        ids.iter().map(|id| (*id, live(id))).collect::<Vec<_>>()
    );
    assert_eq!(all.inodes[2].1, None, "f1 is deleted");
    assert_eq!(all.inodes[3].1.as_ref().unwrap().chunks, f2.chunks);
    let entry = |parent: ObjectId, name: &str| {
        let e = b.entries(&parent).unwrap();
        e.into_iter().find(|e| e.name == name.as_bytes())
    };
    let keys = [
        (ObjectId::ROOT, "d"),
        (ObjectId::ROOT, "g"),
        (d.id, "f1"),
        (d.id, "f2"),
    ];
    assert_eq!(
        all.entries,
        keys.iter()
            .map(|&(p, n)| (p, n.as_bytes().to_vec(), entry(p, n)))
            .collect::<Vec<_>>()
    );
    assert!(all.entries[2].2.is_none() && all.entries[3].2.is_none());

    // Paged by every limit: each answer ends at the end of a commit, covers
    // `limit` items or more only to finish one, and the pages together
    // rebuild the state a snapshot shows.
    for limit in 1..=feed.len() + 1 {
        let (mut at, mut model) = (0, Model::default());
        let mut after = 0;
        loop {
            let c = b.changes(after, limit).unwrap();
            assert_answer_whole(&c);
            let end = commit_end[(at + limit - 1).min(feed.len() - 1)];
            assert_eq!(c.seq, feed[end].seq, "limit {limit}, from item {at}");
            assert_eq!(c.more, end + 1 < feed.len(), "limit {limit}");
            model.apply(&c);
            (after, at) = (c.seq, end + 1);
            if !c.more {
                break;
            }
        }
        assert_eq!(model, Model::of_snapshot(&*b), "limit {limit}");
    }
    // The rename alone: g's child is in the answer though no item of it
    // names that inode.
    let rename_at = commit_sizes[..4].iter().sum::<usize>();
    let c = b.changes(feed[rename_at - 1].seq, 1).unwrap();
    assert_eq!(c.seq, feed[rename_at + 1].seq);
    assert_eq!(
        c.inodes,
        [(f2.id, live(&f2.id))],
        "the child of a renamed entry"
    );
}

fn changes_limits_and_ends(v: &Volume) {
    let b = v.init_open();
    let end = last_seq(&*b);
    // Limit 0 covers nothing but still tells whether more is there.
    assert_eq!(
        b.changes(0, 0).unwrap(),
        Changes {
            seq: 0,
            more: true,
            ..Changes::default()
        }
    );
    for after in [end, end + 5, u64::MAX] {
        assert_eq!(
            b.changes(after, 10).unwrap(),
            Changes {
                seq: after,
                ..Changes::default()
            },
            "nothing after {after}"
        );
    }
    // A commit bigger than the limit comes whole.
    let files: Vec<InodeState> = (1..=10).map(|i| file(2, i)).collect();
    let ops: Vec<Op> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| create(f, ObjectId::ROOT, &format!("f{i}")))
        .collect();
    b.commit(2, &ops).unwrap();
    let c = b.changes(end, 3).unwrap();
    assert_eq!((c.seq, c.more), (end + 20, false));
    assert_eq!(c.inodes.len(), 10);
    assert_eq!(c.entries.len(), 10);
    assert_eq!(
        b.changes(end, usize::MAX).unwrap(),
        c,
        "huge limits are fine"
    );
    // An item of unknown kind is corruption, not skipped.
    v.exec(&format!(
        "UPDATE {} SET kind = 9 WHERE seq = {end}",
        v.table("feed")
    ));
    let err = b.changes(0, 10).unwrap_err();
    assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
}

/// A reader follows `changes` in small pages while another host commits
/// creates and renames (each commit from its own origin, so commit
/// boundaries show in the feed). Every answer must be whole on its own
/// (the entry's child read in the same snapshot as the entry), end at a
/// commit boundary, and the pages must add up to the final state.
fn changes_are_consistent_under_concurrent_commits(v: &Volume) {
    let b: Arc<dyn Backend> = v.init_open().into();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (b, done) = (v.open(), done.clone());
        thread::spawn(move || {
            for i in 1..=60u64 {
                let f = file(3, i);
                let origin = i as u32;
                b.commit(origin, &create(&f, ObjectId::ROOT, &format!("f{i}")))
                    .unwrap();
                if i % 3 == 0 {
                    // Rename an earlier file; its inode changes in the same commit.
                    let mut moved = b.inode(&file(3, i - 1).id).unwrap().unwrap();
                    let base = moved.version;
                    moved.ctime_ns = i as i64;
                    let ops = [
                        unlink(ObjectId::ROOT, &format!("f{}", i - 1), 1),
                        link(ObjectId::ROOT, &format!("r{}", i - 1), moved.id, None),
                        put(moved, Some(base)),
                    ];
                    b.commit(1000 + origin, &ops).unwrap();
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let (mut after, mut model, mut answers) = (0, Model::default(), 0);
    loop {
        let finished = done.load(Ordering::SeqCst);
        let c = b.changes(after, 2).unwrap();
        assert_answer_whole(&c);
        if c.seq > after {
            // The next item, if any, is of another commit (another origin).
            let around = b.feed(c.seq - 1, 2).unwrap();
            if let [last, next] = &around[..] {
                assert_ne!(last.origin, next.origin, "answer cut a commit: {c:?}");
            }
        }
        model.apply(&c);
        after = c.seq;
        answers += 1;
        if finished && !c.more {
            break;
        }
    }
    writer.join().unwrap();
    assert_eq!(model, Model::of_snapshot(&*b));
    assert!(answers > 20, "{answers}");
}

fn snapshot_each_streams_in_order_and_stops_on_sink_error(v: &Volume) {
    let b = v.init_open();
    let hash = ChunkHash::of(b"x");
    // Directories with files; ids interleaved so the order is the backend's.
    let mut ops = vec![];
    for d in 0..5u64 {
        let dir_inode = dir(2, 100 - d);
        ops.extend(create(&dir_inode, ObjectId::ROOT, &format!("d{d}")));
        for f in 0..40u64 {
            let mut inode = file(1 + (f % 3) as u32, d * 100 + f);
            inode.chunks = vec![(hash, 1); (f % 3) as usize];
            inode.size = f % 3;
            ops.extend(create(&inode, dir_inode.id, &format!("{}", 40 - f)));
        }
    }
    b.commit(1, &ops).unwrap();
    let seq = last_seq(&*b);
    let (mut inodes, mut entries) = (vec![], vec![]);
    let got = b
        .snapshot_each(&mut |item| {
            match item {
                SnapshotItem::Inode(i) => {
                    assert!(entries.is_empty(), "an inode after an entry");
                    inodes.push(i);
                }
                SnapshotItem::Entry(e) => entries.push(e),
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(got, seq);
    assert_eq!((inodes.len(), entries.len()), (1 + 5 + 200, 205));
    assert!(
        inodes.windows(2).all(|w| w[0].id < w[1].id),
        "ordered by id"
    );
    assert!(
        entries
            .windows(2)
            .all(|w| (w[0].parent, &w[0].name) < (w[1].parent, &w[1].name)),
        "ordered by parent, name"
    );
    for inode in &inodes {
        assert_eq!(Some(inode), b.inode(&inode.id).unwrap().as_ref());
    }
    assert_eq!(b.snapshot().unwrap(), (seq, inodes, entries));

    // The sink's error ends the stream and comes back as it was.
    let mut calls = 0;
    let err = b
        .snapshot_each(&mut |_| {
            calls += 1;
            match calls {
                10 => Err(BackendError::Invalid {
                    detail: "sink is full".into(),
                }),
                _ => Ok(()),
            }
        })
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Invalid { detail } if detail == "sink is full"),
        "{err}"
    );
    assert_eq!(calls, 10, "no item after the error");
    // And the backend is fine afterwards (no transaction left open).
    let f = file(9, 1);
    assert_eq!(
        b.commit(9, &create(&f, ObjectId::ROOT, "after")).unwrap(),
        [applied(1), applied(1)]
    );
    assert_eq!(b.snapshot().unwrap().1.len(), 207);
}

/// Another host's commit wakes a waiter promptly: LISTEN/NOTIFY on
/// PostgreSQL, the change signal on `dir:`. The fallback polls (500 ms on
/// `dir:`) would not: over several rounds their median wake-up would be
/// far above the bound.
fn wait_feed_wakes_promptly_on_another_objects_commit(v: &Volume) {
    const ROUNDS: usize = 8;
    let waiter = v.init_open();
    let writer = v.open();
    let (committed_tx, committed) = mpsc::channel::<Instant>();
    let start = last_seq(&*waiter);
    let committer = thread::spawn(move || {
        for i in 0..ROUNDS as u64 {
            // Uneven gaps, so a poll cannot happen to line up.
            thread::sleep(Duration::from_millis(120 + 37 * i));
            let f = file(4, i + 1);
            writer
                .commit(4, &create(&f, ObjectId::ROOT, &format!("w{i}")))
                .unwrap();
            committed_tx.send(Instant::now()).unwrap();
        }
    });
    // A wake-up that finds several new commits counts from the oldest.
    let (mut after, mut seen, mut latencies) = (start, 0, vec![]);
    while seen < ROUNDS {
        assert!(waiter.wait_feed(after, Duration::from_secs(20)).unwrap());
        let woke = Instant::now();
        let items = waiter.feed(start, 100).unwrap();
        after = items.last().unwrap().seq;
        let visible = items.len() / 2;
        let oldest = committed.recv_timeout(Duration::from_secs(20)).unwrap();
        for _ in seen + 1..visible {
            committed.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        latencies.push(woke.saturating_duration_since(oldest));
        seen = visible;
    }
    committer.join().unwrap();
    latencies.sort();
    let kind = v.url.split(':').next().unwrap();
    eprintln!("{kind}: wait_feed wake-ups after a commit: {latencies:?}");
    let median = latencies[latencies.len() / 2];
    assert!(median < Duration::from_millis(100), "{latencies:?}");
}

fn location_parses_opens_and_inits(v: &Volume) {
    let location: Location = v.url.parse().unwrap();
    let shown = location.to_string();
    if let Some(password) = v.password() {
        assert!(!shown.contains(&password), "{shown}");
        assert!(!format!("{location:?}").contains(&password));
        assert!(shown.contains("***"), "{shown}");
    } else {
        assert_eq!(shown, v.url, "a dir: location shows as given");
    }
    let err = location.open(TIMEOUT).unwrap_err();
    assert!(matches!(err, BackendError::NotInitialized { .. }), "{err}");
    let info = location.init("by location").unwrap();
    let b = location.open(TIMEOUT).unwrap();
    assert_eq!(b.info().unwrap(), info);
    // The free functions are the same thing.
    assert_eq!(
        ferry_backend::open(&v.url, TIMEOUT)
            .unwrap()
            .info()
            .unwrap(),
        info
    );
    assert!(matches!(
        ferry_backend::init(&v.url, "again").unwrap_err(),
        BackendError::AlreadyInitialized { .. }
    ));
}
