//! `dir:` volumes opened by several processes at once (several local
//! daemons): SQLite's file locks must serialize their commits with no lost
//! update, and `wait_feed` must see another process's commit, promptly
//! (the change signal), or by polling when the signal is gone.
//!
//! The tests re-run their own binary as the other processes (same test
//! name, with `FERRY_CHILD_URL` set).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_backend::{Backend, InodeState, ObjectId, Op, Outcome};

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

/// Commits `ROUNDS` creates with uneven gaps; after each, prints the time
/// (ns since the epoch, one line) for the waiting process to compare.
const ROUNDS: u64 = 6;

fn commit_and_report(url: &str) {
    let b = ferry_backend::open(url, Duration::from_secs(5)).unwrap();
    for i in 1..=ROUNDS {
        std::thread::sleep(Duration::from_millis(100 + 43 * i));
        create(&*b, i);
        println!("{}", now_ns());
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Creates file `f{counter}` (inode 9:counter) in the root.
fn create(b: &dyn Backend, counter: u64) {
    let id = ObjectId { host: 9, counter };
    let ops = [
        Op::PutInode {
            state: InodeState::new(id, 0o100644),
            base: None,
        },
        Op::PutEntry {
            parent: ObjectId::ROOT,
            name: format!("f{counter}").into_bytes(),
            child: id,
            base: None,
        },
    ];
    let outcomes = b.commit(9, &ops).unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Outcome::Applied { .. })));
}

/// The wake-ups of a waiter in this process after another process's
/// commits (sorted), each measured from when the committer saw its commit
/// return. A wake-up that finds several new commits counts from the
/// oldest.
fn wake_ups_after_child_commits(test: &str, url: &str, b: &dyn Backend) -> Vec<Duration> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("FERRY_CHILD_URL", url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The test harness prints its own text too, also on the line of the
    // first number: a number is the last word of a line.
    let mut reports = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap())
        .filter_map(|l| l.split_whitespace().last()?.parse::<u128>().ok());
    let start = b.feed(0, 1000).unwrap().last().unwrap().seq;
    let (mut after, mut seen, mut wake_ups) = (start, 0, vec![]);
    while seen < ROUNDS as usize {
        assert!(b.wait_feed(after, Duration::from_secs(20)).unwrap());
        let woke = now_ns();
        let items = b.feed(start, 1000).unwrap();
        after = items.last().unwrap().seq;
        let visible = items.len() / 2;
        let committed: Vec<u128> = reports.by_ref().take(visible - seen).collect();
        assert_eq!(
            committed.len(),
            visible - seen,
            "the child reports each commit"
        );
        wake_ups.push(Duration::from_nanos(
            woke.saturating_sub(committed[0]) as u64
        ));
        seen = visible;
    }
    assert!(child.wait().unwrap().success());
    wake_ups.sort();
    eprintln!("{test}: wake-ups after another process's commit: {wake_ups:?}");
    wake_ups
}

#[test]
fn another_process_commit_wakes_a_waiter_promptly() {
    if let Ok(url) = std::env::var("FERRY_CHILD_URL") {
        return commit_and_report(&url);
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("dir:{}", tmp.path().join("v").display());
    ferry_backend::init(&url, "signal").unwrap();
    let b = ferry_backend::open(&url, Duration::from_secs(5)).unwrap();
    let wake_ups =
        wake_ups_after_child_commits("another_process_commit_wakes_a_waiter_promptly", &url, &*b);
    // The fallback poll (500 ms) would put the median far above this.
    assert!(
        wake_ups[wake_ups.len() / 2] < Duration::from_millis(100),
        "{wake_ups:?}"
    );
    // Nothing happening: the wait ends at its timeout, not before or long after.
    let after = b.feed(0, 1000).unwrap().last().unwrap().seq;
    let t0 = Instant::now();
    assert!(!b.wait_feed(after, Duration::from_millis(700)).unwrap());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
}

/// When no process can write the change signal (here a directory has taken
/// its name), waiters are woken by the fallback poll: later, but surely.
#[test]
fn waiters_poll_without_the_signal() {
    if let Ok(url) = std::env::var("FERRY_CHILD_URL") {
        return commit_and_report(&url);
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("v");
    let url = format!("dir:{}", path.display());
    ferry_backend::init(&url, "no signal").unwrap();
    std::fs::remove_file(path.join("feed-signal")).unwrap();
    std::fs::create_dir(path.join("feed-signal")).unwrap();
    let b = ferry_backend::open(&url, Duration::from_secs(5)).unwrap();
    let wake_ups = wake_ups_after_child_commits("waiters_poll_without_the_signal", &url, &*b);
    assert!(
        wake_ups[wake_ups.len() - 1] < Duration::from_secs(1),
        "{wake_ups:?}"
    );
}
