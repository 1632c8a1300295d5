//! The conformance suite: every property is one generic function over a
//! [`Volume`], and `conformance!` runs each against both implementations
//! (`dir::NAME` and `pg::NAME`). The PostgreSQL cases share one throwaway
//! cluster per test binary ([`PgServer::shared`]), one database per test.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use ferry_backend::{
    Backend, BackendError, ChunkHash, Entry, FeedChange, InodeState, ObjectId, Op, Outcome,
    MAX_CHUNK, SCHEMA_VERSION,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A not-yet-initialized volume location of one implementation, plus the
/// backdoors tests need to damage it.
struct Volume {
    url: String,
    kind: Kind,
    /// Keeps a dir volume's temp directory alive.
    _tmp: Option<tempfile::TempDir>,
}

enum Kind {
    Dir(std::path::PathBuf),
    Pg { db: String },
}

impl Volume {
    fn dir(_name: &str) -> Volume {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("volume");
        Volume {
            url: format!("dir:{}", path.display()),
            kind: Kind::Dir(path),
            _tmp: Some(tmp),
        }
    }

    fn pg(name: &str) -> Volume {
        let db = format!("t_{name}");
        Volume {
            url: PgServer::shared().create_database(&db),
            kind: Kind::Pg { db },
            _tmp: None,
        }
    }

    /// Another fresh location of the same implementation.
    fn sibling(&self, name: &str) -> Volume {
        match &self.kind {
            Kind::Dir(_) => Volume::dir(name),
            Kind::Pg { db } => Volume::pg(&format!("{db}_{name}")),
        }
    }

    /// Initializes the volume and opens it.
    fn init_open(&self) -> Box<dyn Backend> {
        ferry_backend::init(&self.url, "test").unwrap();
        self.open()
    }

    fn open(&self) -> Box<dyn Backend> {
        ferry_backend::open(&self.url, TIMEOUT).unwrap()
    }

    /// Table name as this implementation spells it.
    fn table(&self, name: &str) -> String {
        match self.kind {
            Kind::Dir(_) => name.to_owned(),
            Kind::Pg { .. } => format!("ferry_{name}"),
        }
    }

    /// A blob literal from hex.
    fn blob(&self, hex: &str) -> String {
        match self.kind {
            Kind::Dir(_) => format!("X'{hex}'"),
            Kind::Pg { .. } => format!("'\\x{hex}'::bytea"),
        }
    }

    /// Runs SQL directly in the volume's database, behind the backend's back.
    fn exec(&self, sql: &str) {
        match &self.kind {
            Kind::Dir(path) => {
                let conn = rusqlite::Connection::open(path.join("ferry.db")).unwrap();
                conn.busy_timeout(TIMEOUT).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Kind::Pg { db } => {
                PgServer::shared().psql(db, sql);
            }
        }
    }

    fn set_schema_version(&self, version: u32) {
        match self.kind {
            Kind::Dir(_) => self.exec(&format!("PRAGMA user_version = {version}")),
            Kind::Pg { .. } => self.exec(&format!(
                "UPDATE ferry_volume SET schema_version = {version}"
            )),
        }
    }

    /// Truncates the stored copy of a chunk to its first 3 bytes.
    fn truncate_chunk(&self, hash: &ChunkHash) {
        match &self.kind {
            Kind::Dir(path) => {
                let hex = hash.to_hex();
                let file = path.join("chunks").join(&hex[..2]).join(&hex[2..]);
                let data = std::fs::read(&file).unwrap();
                std::fs::write(&file, &data[..3]).unwrap();
            }
            Kind::Pg { .. } => self.exec(&format!(
                "UPDATE ferry_chunks SET data = substring(data from 1 for 3) WHERE hash = {}",
                self.blob(&hash.to_hex())
            )),
        }
    }

    /// Replaces the stored chunk with different bytes of the same length.
    fn flip_chunk(&self, hash: &ChunkHash, len: usize) {
        let other = "ab".repeat(len);
        match &self.kind {
            Kind::Dir(path) => {
                let hex = hash.to_hex();
                let file = path.join("chunks").join(&hex[..2]).join(&hex[2..]);
                std::fs::write(&file, vec![0xab; len]).unwrap();
            }
            Kind::Pg { .. } => self.exec(&format!(
                "UPDATE ferry_chunks SET data = {} WHERE hash = {}",
                self.blob(&other),
                self.blob(&hash.to_hex())
            )),
        }
    }
}

/// Generates `dir::NAME` and `pg::NAME` tests for each property `NAME`.
macro_rules! conformance {
    ($($prop:ident),* $(,)?) => {
        mod dir {
            $( #[test] fn $prop() { super::$prop(&super::Volume::dir(stringify!($prop))) } )*
        }
        mod pg {
            $( #[test] fn $prop() { super::$prop(&super::Volume::pg(stringify!($prop))) } )*
        }
    };
}

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
);

fn file(host: u32, counter: u64) -> InodeState {
    let mut inode = InodeState::new(ObjectId { host, counter }, 0o100644);
    inode.uid = 1000;
    inode.gid = 100;
    inode.mtime_ns = 1_700_000_000_123_456_789;
    inode.xattrs = vec![(b"user.k".to_vec(), b"v\0binary".to_vec())];
    inode
}

fn put(state: InodeState, base: Option<u64>) -> Op {
    Op::PutInode { state, base }
}

fn applied(version: u64) -> Outcome {
    Outcome::Applied { version }
}

fn conflict(current: Option<u64>) -> Outcome {
    Outcome::Conflict { current }
}

fn last_seq(b: &dyn Backend) -> u64 {
    b.snapshot().unwrap().0
}

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
        b.commit(1, &[put(f.clone(), None)]).unwrap(),
        vec![applied(1)]
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
    b.commit(1, &[put(f.clone(), None)]).unwrap();
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
    b.commit(1, &[put(f.clone(), None), put(f.clone(), Some(1))])
        .unwrap();
    let del = |base| Op::DeleteInode { id: f.id, base };
    assert_eq!(b.commit(2, &[del(1)]).unwrap(), vec![conflict(Some(2))]);
    assert!(b.inode(&f.id).unwrap().is_some());
    assert_eq!(b.commit(2, &[del(2)]).unwrap(), vec![applied(3)]);
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
    b.commit(1, &[put(f.clone(), None)]).unwrap();
    b.commit(1, &[Op::DeleteInode { id: f.id, base: 1 }])
        .unwrap();
    // Re-created: the version continues past the tombstone's (2) ...
    assert_eq!(
        b.commit(1, &[put(f.clone(), None)]).unwrap(),
        vec![applied(3)]
    );
    // ... so a host still holding base 1 from the first life conflicts.
    assert_eq!(
        b.commit(2, &[put(f.clone(), Some(1))]).unwrap(),
        vec![conflict(Some(3))]
    );

    let name = b"n".to_vec();
    let entry = |base| Op::PutEntry {
        parent: ObjectId::ROOT,
        name: name.clone(),
        child: f.id,
        base,
    };
    b.commit(1, &[entry(None)]).unwrap();
    b.commit(
        1,
        &[Op::DeleteEntry {
            parent: ObjectId::ROOT,
            name: name.clone(),
            base: 1,
        }],
    )
    .unwrap();
    assert_eq!(b.commit(1, &[entry(None)]).unwrap(), vec![applied(3)]);
    assert_eq!(
        b.commit(2, &[entry(Some(1))]).unwrap(),
        vec![conflict(Some(3))]
    );
}

fn batch_reports_per_op_outcomes(v: &Volume) {
    let b = v.init_open();
    let (a, c) = (file(1, 1), file(1, 2));
    b.commit(1, &[put(a.clone(), None)]).unwrap();
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
    b.commit(
        2,
        &[
            put(x.clone(), None),
            put(y.clone(), None),
            put(dir.clone(), None),
        ],
    )
    .unwrap();
    let e = |name: &[u8], child, base| Op::PutEntry {
        parent: dir.id,
        name: name.to_vec(),
        child,
        base,
    };
    let names: [&[u8]; 3] = [b"b", b"a", b"\xff\x00bytes"];
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
                version: 2
            },
            Entry {
                parent: dir.id,
                name: b"\xff\x00bytes".to_vec(),
                child: x.id,
                version: 1
            },
        ]
    );
    assert!(
        b.entries(&ObjectId::ROOT).unwrap().is_empty(),
        "entries are per parent"
    );
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
        b.commit(origin, &[put(f.clone(), None)]).unwrap();
        expect.push((origin, FeedChange::Inode(f.id)));
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
            writer
                .commit(9, &[put(file(9, after + 100), None)])
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
        assert_eq!(b.feed(after, 10).unwrap().len(), 1, "{label}");
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
    shared.commit(1, &[put(counter.clone(), None)]).unwrap();
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
    b.commit(4, &[put(f.clone(), None)]).unwrap();
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
    b.commit(6, &[put(f.clone(), None)]).unwrap();
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
