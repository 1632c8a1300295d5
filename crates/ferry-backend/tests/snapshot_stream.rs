//! A large namespace on both backends: `snapshot_each` streams it in order
//! and in bounded memory, and `changes` at the end of a long feed costs what
//! it costs at its start.
//!
//! 50,000 files by default; `FERRY_SNAPSHOT_FILES` sets another count (the
//! figures for a million are in the crate's report). The volume is filled
//! with SQL behind the backend's back: committing it op by op would take
//! most of the test's time and is not what is tested here. One test, so
//! the process's peak memory is this test's.

use std::time::{Duration, Instant};

use ferry_backend::{Backend, ObjectId, SnapshotItem};

mod support;
use support::Volume;

/// Files per directory.
const FAN_OUT: u64 = 1000;

#[test]
fn large_volume_streams_in_order_in_bounded_memory() {
    let files: u64 = std::env::var("FERRY_SNAPSHOT_FILES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50_000);
    for v in [Volume::dir("stream"), Volume::pg("stream")] {
        let b = v.init_open();
        fill(&v, files);
        stream_and_measure(&v, &*b, files);
        changes_cost_the_same_at_both_ends(&v, &*b, files);
    }
}

/// Adds `files` files (host 3) in directories of [`FAN_OUT`] (host 2) under
/// the root, each file with two chunks, and one feed item per file, each
/// its own commit.
fn fill(v: &Volume, files: u64) {
    let dirs = files.div_ceil(FAN_OUT);
    let series = |n: u64| {
        format!("WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {n})")
    };
    let inodes = |host: u32, n: u64, mode: u32, size: u64| {
        format!(
            "{} INSERT INTO {} (host, counter, version, deleted, mode, uid, gid, rdev, size,
                atime_ns, mtime_ns, ctime_ns, target, xattrs, origin)
             SELECT {host}, n, 1, false, {mode}, 0, 0, 0, {size}, n, n, n, NULL, {}, {host} FROM s;",
            series(n),
            v.table("inodes"),
            v.blob(""),
        )
    };
    let entries = |prefix: &str, n: u64, parent: &str, host: u32| {
        format!(
            "{} INSERT INTO {} (parent_host, parent_counter, name, child_host, child_counter,
                version, deleted, origin)
             SELECT {parent}, {}, {host}, n, 1, false, {host} FROM s;",
            series(n),
            v.table("entries"),
            v.text_blob(&format!("'{prefix}' || n")),
        )
    };
    let chunks = (0..2)
        .map(|idx| {
            format!(
                "{} INSERT INTO {} (host, counter, idx, hash, len) SELECT 3, n, {idx}, {}, 1 FROM s;",
                series(files),
                v.table("inode_chunks"),
                v.blob(&"ab".repeat(32)),
            )
        })
        .collect::<String>();
    let feed = format!(
        "{} INSERT INTO {} (origin, kind, host, counter, name, txn) SELECT 3, 0, 3, n, NULL, n FROM s;",
        series(files),
        v.table("feed"),
    );
    let t0 = Instant::now();
    v.exec(
        &[
            inodes(2, dirs, 0o40755, 0),
            inodes(3, files, 0o100644, 2),
            entries("d", dirs, "0, 1", 2),
            entries("f", files, &format!("2, (n - 1) / {FAN_OUT} + 1"), 3),
            chunks,
            feed,
        ]
        .concat(),
    );
    eprintln!("{}: filled {files} files in {:?}", kind(v), t0.elapsed());
}

fn stream_and_measure(v: &Volume, b: &dyn Backend, files: u64) {
    let dirs = files.div_ceil(FAN_OUT);
    let before = memory_kib("VmRSS");
    reset_peak_memory();
    let t0 = Instant::now();
    let (mut inodes, mut entries) = (0u64, 0u64);
    let mut last_id: Option<ObjectId> = None;
    let mut last_entry: Option<(ObjectId, Vec<u8>)> = None;
    let seq = b
        .snapshot_each(&mut |item| {
            match item {
                SnapshotItem::Inode(inode) => {
                    assert_eq!(entries, 0, "inode {} after an entry", inode.id);
                    assert!(last_id < Some(inode.id), "{:?} then {}", last_id, inode.id);
                    if inode.id.host == 3 {
                        assert_eq!(inode.chunks.len(), 2, "{}", inode.id);
                    }
                    last_id = Some(inode.id);
                    inodes += 1;
                }
                SnapshotItem::Entry(entry) => {
                    let key = (entry.parent, entry.name);
                    assert!(
                        last_entry.as_ref() < Some(&key),
                        "{last_entry:?} then {key:?}"
                    );
                    last_entry = Some(key);
                    entries += 1;
                }
            }
            Ok(())
        })
        .unwrap();
    let took = t0.elapsed();
    let peak = memory_kib("VmHWM").saturating_sub(before);
    assert_eq!((inodes, entries), (1 + dirs + files, dirs + files));
    assert_eq!(seq, 1 + files, "the root's item, then one per file");

    // For comparison: the same namespace collected in memory.
    reset_peak_memory();
    let before_all = memory_kib("VmRSS");
    let t0 = Instant::now();
    let all = b.snapshot().unwrap();
    let took_all = t0.elapsed();
    let peak_all = memory_kib("VmHWM").saturating_sub(before_all);
    assert_eq!(all.1.len() as u64, inodes);
    drop(all);
    eprintln!(
        "{}: {files} files: snapshot_each {took:?}, peak +{} MiB; snapshot (collected) {took_all:?}, peak +{} MiB",
        kind(v),
        peak / 1024,
        peak_all / 1024
    );
    // A page of rows at a time: a few MiB whatever the volume's size.
    assert!(peak < 8 * 1024, "streaming peaked at +{peak} KiB");
}

/// `changes` reads only what it covers: one item near the end of a long
/// feed costs about what one at its start costs.
fn changes_cost_the_same_at_both_ends(v: &Volume, b: &dyn Backend, files: u64) {
    let time = |after: u64| {
        let t0 = Instant::now();
        let c = b.changes(after, 100).unwrap();
        assert_eq!(c.inodes.len(), 100.min((1 + files - after) as usize));
        t0.elapsed()
    };
    let (start, end) = (time(0).min(time(0)), time(files - 99).min(time(files - 99)));
    eprintln!(
        "{}: changes(limit 100) at the feed's start {start:?}, at its end {end:?}",
        kind(v)
    );
    assert!(
        end < start * 5 + Duration::from_millis(20),
        "{start:?} vs {end:?}"
    );
}

fn kind(v: &Volume) -> &str {
    v.url.split(':').next().unwrap()
}

/// A field of /proc/self/status, in KiB.
fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets VmHWM to the current RSS (Linux: "5" to clear_refs).
fn reset_peak_memory() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}
