//! PostgreSQL behind the delay proxy (ferry-netem, 10 ms each way): the
//! calls a replicator repeats cost one round trip however much they carry,
//! and calls from several threads on one backend object run at the same
//! time instead of queueing. Times are printed in round trips.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use ferry_backend::{Backend, ChunkHash, InodeState, ObjectId, Op};
use ferry_netem::{Config, Proxy};

const DELAY: Duration = Duration::from_millis(10);
const RTT: Duration = Duration::from_millis(20);

/// The database `name` on the shared cluster, initialized, reached
/// directly and through a delay proxy (kept alive by the caller).
fn slow_volume(name: &str) -> (Box<dyn Backend>, Box<dyn Backend>, Proxy) {
    let url = PgServer::shared().create_database(name);
    ferry_backend::init(&url, name).unwrap();
    // postgres://user:password@HOST:PORT/db
    let at = url.rfind('@').unwrap() + 1;
    let end = at + url[at..].find('/').unwrap();
    let proxy = Proxy::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        target: url[at..end].parse().unwrap(),
        delay: DELAY,
        listen_netns: None,
    })
    .unwrap();
    let slow_url = format!("{}{}{}", &url[..at], proxy.addr(), &url[end..]);
    let fast = ferry_backend::open(&url, Duration::from_secs(5)).unwrap();
    let slow = ferry_backend::open(&slow_url, Duration::from_secs(5)).unwrap();
    (fast, slow, proxy)
}

/// The fastest of three runs of `f`, in round trips.
fn round_trips(mut f: impl FnMut()) -> f64 {
    let best = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .min()
        .unwrap();
    best.as_secs_f64() / RTT.as_secs_f64()
}

fn chunks(n: u8) -> Vec<(ChunkHash, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let data = vec![i; 16 << 10];
            (ChunkHash::of(&data), data)
        })
        .collect()
}

#[test]
fn repeated_calls_take_one_round_trip() {
    let (fast, slow, _proxy) = slow_volume("latency_calls");
    let stored = chunks(64);
    for (h, d) in &stored {
        fast.put_chunk(h, d).unwrap();
    }
    let files: Vec<Op> = (1..=50u64)
        .flat_map(|i| {
            let id = ObjectId {
                host: 1,
                counter: i,
            };
            [
                Op::PutInode {
                    state: InodeState::new(id, 0o100644),
                    base: None,
                },
                Op::PutEntry {
                    parent: ObjectId::ROOT,
                    name: format!("f{i}").into_bytes(),
                    child: id,
                    base: None,
                },
            ]
        })
        .collect();
    fast.commit(1, &files).unwrap();
    slow.info().unwrap(); // connects (several round trips)

    let hashes: Vec<ChunkHash> = stored.iter().map(|(h, _)| *h).collect();
    let one_by_one = round_trips(|| {
        for h in &hashes[..16] {
            slow.get_chunk(h).unwrap();
        }
    });
    let batched = round_trips(|| assert_eq!(slow.get_chunks(&hashes).unwrap().len(), 64));
    let changes = round_trips(|| assert_eq!(slow.changes(0, 1000).unwrap().inodes.len(), 51));
    let inode = round_trips(|| {
        slow.inode(&ObjectId::ROOT).unwrap().unwrap();
    });
    let ship = round_trips(|| ship_one_file(&*slow));
    eprintln!(
        "round trips: 16 × get_chunk {one_by_one:.1}, get_chunks of 64 (1 MiB) {batched:.1}, \
         changes of 101 items {changes:.1}, inode {inode:.1}, shipping one small file {ship:.1}"
    );
    assert!(one_by_one >= 16.0, "{one_by_one}");
    assert!(batched < 1.8, "get_chunks: {batched} round trips");
    assert!(changes < 1.8, "changes: {changes} round trips");
    assert!(inode < 1.8, "inode: {inode} round trips");
    // BEGIN, lock, one I3 check, base checks, writes, feed, COMMIT; plus
    // missing_chunks, put_chunks and set_shipped around it.
    assert!(ship < 11.8, "shipping one file: {ship} round trips");
}

/// What a replicator sends to ship one new small file: which chunk is
/// missing, its upload, the commit of its inode and name, the shipped mark.
/// Each call makes a new file, so every run does the full work.
fn ship_one_file(backend: &dyn Backend) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let data = n.to_le_bytes().repeat(512);
    let hash = ChunkHash::of(&data);
    assert_eq!(backend.missing_chunks(&[hash]).unwrap(), [hash]);
    backend.put_chunks(&[(hash, &data[..])]).unwrap();
    let id = ObjectId {
        host: 1,
        counter: n,
    };
    let mut state = InodeState::new(id, 0o100644);
    state.size = data.len() as u64;
    state.chunks = vec![(hash, data.len() as u32)];
    let outcomes = backend
        .commit(
            1,
            &[
                Op::PutInode { state, base: None },
                Op::PutEntry {
                    parent: ObjectId::ROOT,
                    name: format!("shipped{n}").into_bytes(),
                    child: id,
                    base: None,
                },
            ],
        )
        .unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ferry_backend::Outcome::Applied { .. })),
        "{outcomes:?}"
    );
    backend.set_shipped(1, n).unwrap();
}

#[test]
fn threads_sharing_one_backend_do_not_queue() {
    const THREADS: usize = 8;
    const CALLS: usize = 8;
    let (fast, slow, _proxy) = slow_volume("latency_threads");
    let stored = chunks(THREADS as u8);
    for (h, d) in &stored {
        fast.put_chunk(h, d).unwrap();
    }
    let slow: Arc<dyn Backend> = slow.into();
    let run = || {
        let barrier = Arc::new(Barrier::new(THREADS));
        let t0 = Instant::now();
        let threads: Vec<_> = stored
            .iter()
            .map(|(hash, data)| {
                let (slow, barrier, hash, data) =
                    (slow.clone(), barrier.clone(), *hash, data.clone());
                thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..CALLS {
                        assert_eq!(
                            slow.get_chunks(&[hash]).unwrap(),
                            std::slice::from_ref(&data)
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        t0.elapsed().as_secs_f64() / RTT.as_secs_f64()
    };
    // The first run also connects a connection per thread.
    let first = run();
    let second = run();
    eprintln!(
        "{THREADS} threads × {CALLS} get_chunks on one backend object: {first:.1} round trips \
         (connecting), then {second:.1}; in series it would be {}",
        THREADS * CALLS
    );
    assert!(
        second < (CALLS * 2) as f64,
        "{second} round trips: the calls queued"
    );
}
