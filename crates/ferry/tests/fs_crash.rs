//! Crash tests: kill -9 the daemon at a random point while a writer process
//! creates, appends, renames and fsyncs files; remount; every byte the
//! writer saw fsync'd must be there; then `ferry fsck --store` must find the
//! change log consistent with the store.
//!
//! The writer records each durable state as `name len fnv64` in a log file
//! OUTSIDE the mount, written and fsync'd only after the file's fsync and
//! its directory's fsync returned. So the log is a lower bound of what
//! ferry promised, and the check is exact for that prefix of each file.
//!
//! `cargo test -p ferry --test fs_crash` runs 10 trials;
//! `FERRY_CRASH_TRIALS=50` for a local run, `FERRY_CRASH_SEED` to replay.
//! Skipped on `raw` (nothing to crash); on `bindfs` it runs without fsck.

mod support;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use support::{fnv64, Forked, Mount, Rng, Target};

/// Longest a writer may run before the kill (it is killed much sooner).
const WRITER_LIMIT: Duration = Duration::from_secs(20);

/// fsyncs a directory, so that entries created in it are durable too.
fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The writer: runs until killed (or an error, e.g. ENOTCONN after the
/// daemon dies). Only appends to files it has fsync'd, so their recorded
/// prefixes can never legitimately change.
fn writer(mnt: &Path, log_path: &Path, seed: u64) -> io::Result<()> {
    let mut rng = Rng::new(seed);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut synced: Vec<(String, Vec<u8>)> = Vec::new();
    let mut unsynced: Vec<String> = Vec::new();
    fs::create_dir(mnt.join("sub"))?;
    fsync_dir(mnt)?;
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < WRITER_LIMIT {
        i += 1;
        match rng.below(100) {
            // A new file, written in chunks, fsync'd half the time.
            0..=54 => {
                let dir = if rng.chance(30) { "sub/" } else { "" };
                let name = format!("{dir}f{i}");
                let mut f = File::create(mnt.join(&name))?;
                let mut content = Vec::new();
                for _ in 0..1 + rng.below(6) {
                    let len = 1 + rng.below(96 * 1024) as usize;
                    let chunk = rng.bytes(len);
                    f.write_all(&chunk)?;
                    content.extend_from_slice(&chunk);
                }
                if rng.chance(50) {
                    f.sync_all()?;
                    fsync_dir(mnt.join(&name).parent().unwrap())?;
                    writeln!(log, "{name} {} {:016x}", content.len(), fnv64(&content))?;
                    log.sync_all()?;
                    synced.push((name, content));
                } else {
                    unsynced.push(name);
                }
            }
            // Append to a durable file; fsync most of the time.
            55..=79 if !synced.is_empty() => {
                let k = rng.below(synced.len() as u64) as usize;
                let (name, content) = &mut synced[k];
                let len = 1 + rng.below(32 * 1024) as usize;
                let chunk = rng.bytes(len);
                let mut f = OpenOptions::new().append(true).open(mnt.join(&*name))?;
                f.write_all(&chunk)?;
                content.extend_from_slice(&chunk);
                if rng.chance(70) {
                    f.sync_all()?;
                    writeln!(log, "{name} {} {:016x}", content.len(), fnv64(content))?;
                    log.sync_all()?;
                }
            }
            // Metadata churn on files nobody relies on.
            80..=89 if !unsynced.is_empty() => {
                let k = rng.below(unsynced.len() as u64) as usize;
                let to = format!("sub/r{i}");
                fs::rename(mnt.join(&unsynced[k]), mnt.join(&to))?;
                unsynced[k] = to;
            }
            90..=94 if !unsynced.is_empty() => {
                let name = unsynced.swap_remove(rng.below(unsynced.len() as u64) as usize);
                fs::remove_file(mnt.join(name))?;
            }
            _ => {
                fs::create_dir(mnt.join(format!("sub/d{i}")))?;
            }
        }
    }
    Ok(())
}

/// Last durable (len, checksum) per file, from complete log lines only.
fn read_log(path: &Path) -> HashMap<String, (usize, String)> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut last = HashMap::new();
    for line in complete.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts.len(), 3, "bad log line {line:?}");
        last.insert(
            parts[0].to_string(),
            (parts[1].parse().unwrap(), parts[2].to_string()),
        );
    }
    last
}

/// Runs `ferry fsck --store` and asserts it is consistent.
fn fsck(store: &Path, trial: &str) {
    let out = support::run_bounded(
        std::process::Command::new(support::ferry_bin())
            .arg("fsck")
            .arg("--store")
            .arg(store),
        Duration::from_secs(120),
    );
    assert!(
        matches!(&out, Ok(o) if o.status.success()),
        "{trial}: fsck after crash: {}",
        support::describe(&out)
    );
}

/// One trial: write, kill -9 the daemon, remount, verify, unmount, fsck.
fn trial(n: u64, seed: u64) {
    let tag = format!("trial {n} (FERRY_CRASH_SEED={seed})");
    let mut m = Mount::new();
    let mnt: PathBuf = m.path().to_path_buf();
    let log = m.scratch().join("fsync.log");
    let mut rng = Rng::new(seed);
    let child = {
        let (mnt, log) = (mnt.clone(), log.clone());
        let wseed = rng.next_u64();
        Forked::spawn(None, move || writer(&mnt, &log, wseed))
    };
    // Let the writer make some durable progress, then crash at a random
    // moment (the sleep picks the crash point; it synchronises nothing).
    let progressed = support::poll_until(Duration::from_secs(10), || {
        fs::metadata(&log).is_ok_and(|m| m.len() > 0)
    });
    assert!(
        progressed,
        "{tag}: writer made no fsync'd progress in 10 s; daemon:\n{}",
        m.daemon_log()
    );
    thread::sleep(Duration::from_millis(rng.below(400)));
    m.kill9();
    drop(child); // SIGKILL + reap; it may be stuck in a dead mount's request.
    let durable = read_log(&log);
    m.remount();
    for (name, (len, sum)) in &durable {
        let data =
            fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{tag}: fsync'd {name} lost: {e}"));
        assert!(
            data.len() >= *len,
            "{tag}: {name} has {} bytes, {len} were fsync'd",
            data.len()
        );
        assert_eq!(
            format!("{:016x}", fnv64(&data[..*len])),
            *sum,
            "{tag}: {name}: fsync'd bytes differ"
        );
    }
    // The recovered file system takes new writes.
    fs::write(mnt.join("after-crash"), b"alive")
        .unwrap_or_else(|e| panic!("{tag}: write after remount: {e}"));
    assert_eq!(fs::read(mnt.join("after-crash")).unwrap(), b"alive");
    m.unmount();
    if m.target() == Target::Ferry {
        fsck(m.store(), &tag);
    }
    eprintln!("{tag}: {} fsync'd files verified", durable.len());
}

#[test]
fn fsynced_data_survives_kill9() {
    if Target::from_env() == Target::Raw {
        eprintln!("SKIP (raw target): no daemon to kill; crash tests need ferry (or bindfs)");
        return;
    }
    let trials = support::env_u64("FERRY_CRASH_TRIALS", 10);
    let mut seeds = Rng::new(support::env_u64("FERRY_CRASH_SEED", 0xC0FFEE));
    for n in 0..trials {
        // Each trial's seed is printed so it can be replayed alone (with
        // FERRY_CRASH_TRIALS=1 FERRY_CRASH_SEED=<it>).
        let seed = if trials == 1 {
            support::env_u64("FERRY_CRASH_SEED", 0xC0FFEE)
        } else {
            seeds.next_u64()
        };
        trial(n, seed);
    }
}

#[test]
fn clean_store_passes_fsck_and_survives_kill9_at_idle() {
    if support::skip_unless_ferry("fsck") {
        return;
    }
    let mut m = Mount::new();
    fs::write(m.join("f"), b"idle").unwrap();
    File::open(m.join("f")).unwrap().sync_all().unwrap();
    fsync_dir(m.path()).unwrap();
    m.kill9();
    m.remount();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"idle");
    m.unmount();
    fsck(m.store(), "idle kill");
}
