//! The `ferry` commands replication tests run against a [`Mount`], each
//! bounded, panicking with stderr on failure.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::tree::tree_diff;
use super::{ferry_bin, run_bounded, Mount, TempDir};

/// Runs `ferry ARGS`, bounded by `timeout`; returns stdout.
pub fn ferry_within(args: &[&str], timeout: Duration) -> String {
    let out = run_bounded(Command::new(ferry_bin()).args(args), timeout)
        .unwrap_or_else(|e| panic!("ferry {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ferry ARGS`, bounded by two minutes; returns stdout.
pub fn ferry(args: &[&str]) -> String {
    ferry_within(args, Duration::from_secs(120))
}

/// `ferry init URL --name test`.
pub fn init(url: &str) {
    ferry(&["init", url, "--name", "test"]);
}

/// An initialised `dir:` backend volume in a temp dir, removed with the
/// returned guard: `(guard, volume path, URL)`.
pub fn dir_backend() -> (TempDir, PathBuf, String) {
    let dir = TempDir::new("ferry-backend");
    let vol = dir.path().join("vol");
    let url = format!("dir:{}", vol.display());
    init(&url);
    (dir, vol, url)
}

/// `ferry sync` with a timeout of `secs` (the command gets a little more).
pub fn sync_within(m: &Mount, secs: u64) {
    let mnt = m.path().to_str().unwrap();
    ferry_within(
        &["sync", mnt, "--timeout", &secs.to_string()],
        Duration::from_secs(secs + 30),
    );
}

/// `ferry sync` with a 90 s timeout.
pub fn sync(m: &Mount) {
    sync_within(m, 90);
}

/// The daemon's status as JSON.
pub fn status(m: &Mount) -> serde_json::Value {
    let out = ferry(&["status", "--json", m.path().to_str().unwrap()]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status {out:?}: {e}"))
}

/// Asserts a new host sees exactly `m`'s tree, and that its restored store
/// passes `ferry fsck`.
pub fn assert_restores_identically(backend: &str, m: &Mount) {
    let mut fresh = Mount::with_backend(backend);
    let diffs = tree_diff(m.path(), fresh.path());
    assert!(
        diffs.is_empty(),
        "restored tree differs:\n{}",
        diffs.join("\n")
    );
    fresh.unmount();
    ferry(&["fsck", "--store", fresh.store().to_str().unwrap()]);
}
