//! Replication over a slow link: PostgreSQL 50 ms RTT away, through a
//! network namespace and the `ferry-netem` delay proxy (support/wan.rs; the
//! kernel has no sch_netem).
//!
//! The promise under test: writes finish at local speed whatever the
//! network does, and the backlog converges once the link allows, with no
//! remount. Checks end with a fresh host (an empty store on the same
//! database, reached directly so the check does not take minutes of
//! per-chunk round trips) seeing the writer's tree exactly.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use support::cli::{assert_restores_identically, init, status, sync_within};
use support::wan::{url_addr, url_via, Wan};
use support::{
    crates, describe, poll_until, run_bounded, skip_unless_ferry, Mount, Target, TempDir,
    DEFAULT_OPTIONS,
};

/// Added in each direction: 50 ms round trips.
const ONE_WAY: Duration = Duration::from_millis(25);
/// Copies of the real tree (support/crates.rs) the copy test writes.
const COPIES: usize = 2;
/// How long the backlog may take to drain at 50 ms RTT before the test fails.
const DRAIN_TIMEOUT_S: u64 = 150;

/// Held by each test for its whole run: the timing comparisons mean
/// something only if the other test is not copying at the same moment.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `cp -a SRC DEST` (bounded); returns how long it took to return.
fn timed_copy(src: &Path, dest: &Path) -> Duration {
    let start = Instant::now();
    let r = run_bounded(
        Command::new("cp").arg("-a").arg(src).arg(dest),
        Duration::from_secs(300),
    );
    let took = start.elapsed();
    assert!(
        matches!(&r, Ok(o) if o.status.success()),
        "cp -a {} {}: {}",
        src.display(),
        dest.display(),
        describe(&r)
    );
    took
}

/// A database of the shared cluster, and the URL that reaches it through a
/// new slow link (which must outlive every mount using it).
fn slow_database(pg: &PgServer, name: &str) -> (String, String, Wan) {
    let direct = pg.create_database(name);
    let mut wan = Wan::new(ONE_WAY);
    let slow = url_via(&direct, wan.expose(url_addr(&direct)));
    init(&slow);
    (direct, slow, wan)
}

/// The "local speed" bound: a copy may take 1.5× the reference, plus 2 s
/// for the noise of a shared 2-core machine.
fn assert_local_speed(what: &str, took: Duration, reference: Duration) {
    let bound = reference.mul_f64(1.5) + Duration::from_secs(2);
    assert!(
        took <= bound,
        "{what} took {took:?}, more than {bound:?} (1.5 × {reference:?} + 2 s): writes waited on the network"
    );
}

#[test]
fn real_tree_copies_at_local_speed_and_drains_at_50ms_rtt() {
    if skip_unless_ferry("replication over a slow link") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let stage = TempDir::new("ferry-wan-tree");
    let files = crates::unpack(stage.path(), COPIES);
    assert!(files >= 3000, "only {files} files in the tree");
    let tree = stage.path();

    let mut local = Mount::with(Target::Ferry, DEFAULT_OPTIONS);
    let reference = timed_copy(tree, &local.join("tree"));
    local.unmount();

    let pg = PgServer::shared();
    let (direct, slow, _wan) = slow_database(pg, "ferry_wan_copy");
    let a = Mount::with_backend(&slow);
    let took = timed_copy(tree, &a.join("tree"));
    let start = Instant::now();
    sync_within(&a, DRAIN_TIMEOUT_S);
    let drained = start.elapsed();
    eprintln!(
        "{files} files: cp -a {reference:.2?} with no backend, {took:.2?} at 50 ms RTT; drained {drained:.2?} after cp returned"
    );
    assert_local_speed("cp -a at 50 ms RTT", took, reference);
    let s = status(&a);
    assert_eq!(s["pending_ops"], 0, "{s}");
    assert_restores_identically(&direct, &a);
}

#[test]
fn partition_while_writing_then_converges_without_remount() {
    if skip_unless_ferry("replication over a slow link") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let stage = TempDir::new("ferry-wan-tree");
    crates::unpack(stage.path(), 1);
    let tree = stage.path().join("copy-0");
    let pg = PgServer::shared();
    let (direct, slow, wan) = slow_database(pg, "ferry_wan_partition");
    let a = Mount::with_backend(&slow);

    let connected = timed_copy(&tree, &a.join("connected"));
    sync_within(&a, DRAIN_TIMEOUT_S);

    wan.partition();
    let cut = timed_copy(&tree, &a.join("partitioned"));
    assert_local_speed("cp -a while partitioned", cut, connected);
    // The shipper notices and says so, with the work still pending.
    let mut last = serde_json::Value::Null;
    let noticed = poll_until(Duration::from_secs(30), || {
        last = status(&a);
        !last["last_error"].is_null() && last["pending_ops"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        noticed,
        "no error with pending ops while partitioned: {last}"
    );
    eprintln!("cp -a of one copy: {connected:.2?} connected, {cut:.2?} partitioned");

    // Restored: converges with no remount.
    wan.heal();
    sync_within(&a, DRAIN_TIMEOUT_S);
    let s = status(&a);
    assert_eq!(s["pending_ops"], 0, "{s}");
    assert!(s["last_error"].is_null(), "{s}");
    assert_restores_identically(&direct, &a);
}
