//! `dir:` volumes opened by several processes at once (several local
//! daemons): SQLite's file locks must serialize their commits with no lost
//! update, and `wait_feed` must see another process's commit.
//!
//! The test re-runs its own binary as the other processes (same test name,
//! with `FERRY_CHILD_URL` set).

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_backend::{InodeState, ObjectId, Op, Outcome};

const CHILDREN: usize = 3;
const INCREMENTS: u64 = 200;
const COUNTER: ObjectId = ObjectId {
    host: 1,
    counter: 1,
};

/// What each process does: version-checked read-modify-write increments.
fn increment(url: &str, origin: u32) {
    let b = ferry_backend::open(url, Duration::from_secs(5)).unwrap();
    for _ in 0..INCREMENTS {
        loop {
            let mut cur = b.inode(&COUNTER).unwrap().unwrap();
            let base = cur.version;
            cur.size += 1;
            if let [Outcome::Applied { .. }] = b
                .commit(
                    origin,
                    &[Op::PutInode {
                        state: cur,
                        base: Some(base),
                    }],
                )
                .unwrap()[..]
            {
                break;
            }
        }
    }
}

#[test]
fn processes_share_a_dir_volume() {
    if let Ok(url) = std::env::var("FERRY_CHILD_URL") {
        increment(&url, std::process::id());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("dir:{}", tmp.path().join("v").display());
    ferry_backend::init(&url, "shared").unwrap();
    let b = ferry_backend::open(&url, Duration::from_secs(5)).unwrap();
    let state = InodeState::new(COUNTER, 0o100644);
    let name = Op::PutEntry {
        parent: ObjectId::ROOT,
        name: b"counter".to_vec(),
        child: COUNTER,
        base: None,
    };
    let created = b
        .commit(1, &[Op::PutInode { state, base: None }, name])
        .unwrap();
    assert!(created.iter().all(|o| matches!(o, Outcome::Applied { .. })));
    let seq = b.feed(0, 100).unwrap().last().unwrap().seq;

    let children: Vec<_> = (0..CHILDREN)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "processes_share_a_dir_volume",
                    "--test-threads=1",
                ])
                .env("FERRY_CHILD_URL", &url)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Another process's commit wakes this one.
    let t0 = Instant::now();
    assert!(b.wait_feed(seq, Duration::from_secs(30)).unwrap());
    assert!(t0.elapsed() < Duration::from_secs(30));
    increment(&url, 1);
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let end = b.inode(&COUNTER).unwrap().unwrap();
    assert_eq!(
        end.size,
        (CHILDREN as u64 + 1) * INCREMENTS,
        "no lost update across processes"
    );
    assert_eq!(end.version, 1 + (CHILDREN as u64 + 1) * INCREMENTS);
}
