//! Regression tests for replication that lied: acknowledged writes missing
//! at the backend while `ferry sync` said all was well, and the store
//! faults around it. Each test is one failure found black-box, named after
//! it; each failed on the code before its fix.
//!
//! - a write after the shipper read the file, then kill -9: the write was
//!   never logged (passthrough writes bypass the daemon; the close that
//!   would log them was still queued) — fixed by a durable "shipped while
//!   open" mark, relogged at the next start;
//! - `ferry sync` with a file still open: sync waited only for records,
//!   and later passthrough writes had none — sync now logs open writers;
//! - a full store: EIO instead of ENOSPC, and unlink could not free space
//!   — now ENOSPC, with a reserve that unlink gives up;
//! - a WAL left behind by every clean unmount, and a damaged WAL replayed
//!   silently to an older store — now checkpointed and checked;
//! - a 1 TiB sparse file keeping the shipper busy for minutes, and holes
//!   arriving dense on a new host — holes are now shipped as holes;
//! - directory mtimes never replicated after the first shipment;
//! - `ferry status` saying "contact: never" right after a sync.

mod support;

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::cli::{assert_restores_identically, dir_backend, status, sync};
use support::{poll_until, run_bounded, skip_unless_ferry, sys, Mount, Rng, TempDir};

/// Waits until the shipper has committed everything logged so far without
/// a sync (which would log open writers itself): the state the failures
/// were found in, "wait until the replicator ships it".
fn wait_shipped(m: &Mount) {
    let shipped = poll_until(Duration::from_secs(30), || {
        let s = status(m);
        s["pending_ops"] == 0 && s["head_seq"].as_u64() == s["shipped_seq"].as_u64()
    });
    assert!(shipped, "nothing shipped in 30 s: {}", status(m));
}

/// What a fresh host restored from `url` has at `rel`.
fn restored(url: &str, rel: &str) -> Vec<u8> {
    let fresh = Mount::with_backend(url);
    fs::read(fresh.join(rel)).unwrap_or_else(|e| panic!("restored {rel}: {e}"))
}

/// Item 1, three ways: a write after the file was shipped, then the
/// daemon killed right after close (or after fsync, or on an overwrite).
#[test]
fn writes_after_a_shipment_survive_kill_9() {
    if skip_unless_ferry("replication") {
        return;
    }
    for (name, fsync, overwrite) in [
        ("close", false, false),
        ("fsync", true, false),
        ("overwrite", false, true),
    ] {
        let (_guard, _, url) = dir_backend();
        let mut a = Mount::with_backend(&url);
        let path = a.join("f");
        if overwrite {
            fs::write(&path, vec![b'o'; 5000]).unwrap();
            wait_shipped(&a);
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        wait_shipped(&a); // shipped while open, empty
        f.write_all(&[b'x'; 100]).unwrap();
        if fsync {
            f.sync_all().unwrap();
        }
        drop(f);
        a.kill9();
        a.remount();
        sync(&a);
        assert_eq!(fs::read(&path).unwrap(), vec![b'x'; 100], "{name}: local");
        assert_eq!(restored(&url, "f"), vec![b'x'; 100], "{name}: restored");
    }
}

/// Item 2: O_APPEND writer that stays open across a shipment; sync must
/// include what it wrote after, while it is still open.
#[test]
fn sync_includes_files_still_open_for_writing() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_guard, _, url) = dir_backend();
    let a = Mount::with_backend(&url);
    let mut log = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(a.join("app.log"))
        .unwrap();
    log.write_all(b"first half\n").unwrap();
    wait_shipped(&a);
    log.write_all(b"second half\n").unwrap();
    log.sync_all().unwrap();
    sync(&a);
    assert_eq!(restored(&url, "app.log"), b"first half\nsecond half\n");
    // A write through a shared mapping, still mapped and open: the same.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("mapped"))
        .unwrap();
    f.set_len(8192).unwrap();
    wait_shipped(&a);
    let map = Mapping::shared(&f, 8192);
    map.write(4096, b"through the map");
    sync(&a);
    let got = restored(&url, "mapped");
    assert_eq!(&got[4096..4096 + 15], b"through the map");
    drop(map);
    drop(log);
}

/// A MAP_SHARED mapping of a whole file, unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn shared(f: &fs::File, len: usize) -> Mapping {
        // SAFETY: a fresh shared mapping of an open file; nothing else
        // refers to the address range it returns.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            addr: addr.cast(),
            len,
        }
    }

    fn write(&self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len);
        // SAFETY: in bounds of the live mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(at), data.len()) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `shared` mapped, once.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Item 13: directory mtimes travel with the entries that change them.
#[test]
fn directory_mtimes_replicate() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_guard, _, url) = dir_backend();
    let a = Mount::with_backend(&url);
    fs::create_dir_all(a.join("d/sub")).unwrap();
    fs::write(a.join("d/one"), b"1").unwrap();
    sync(&a);
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(a.join("d/two"), b"2").unwrap();
    fs::remove_file(a.join("d/one")).unwrap();
    fs::rename(a.join("d/sub"), a.join("sub2")).unwrap();
    sync(&a);
    let fresh = Mount::with_backend(&url);
    for dir in ["", "d", "sub2"] {
        let (mine, theirs) = (
            fs::metadata(a.join(dir)).unwrap(),
            fs::metadata(fresh.join(dir)).unwrap(),
        );
        assert_eq!(
            (mine.mtime(), mine.mtime_nsec()),
            (theirs.mtime(), theirs.mtime_nsec()),
            "mtime of /{dir}"
        );
    }
}

/// Items 8 and 14: a 1 TiB sparse file ships at once, costs no backlog,
/// and a 20 MiB file of one written block arrives as one block.
#[test]
fn holes_ship_as_holes() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_guard, _, url) = dir_backend();
    let a = Mount::with_backend(&url);
    let huge = fs::File::create(a.join("huge")).unwrap();
    huge.set_len(1 << 40).unwrap();
    drop(huge);
    let sparse = sys::open(&a.join("sparse"), libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap();
    sys::pwrite(&sparse, &[7u8; 4096], (20 << 20) - 4096).unwrap();
    drop(sparse);
    let s = status(&a);
    assert!(
        s["pending_bytes"].as_u64().unwrap() < 1 << 20,
        "backlog counts holes: {s}"
    );
    support::cli::sync_within(&a, 20);
    let fresh = Mount::with_backend(&url);
    assert_eq!(fs::metadata(fresh.join("huge")).unwrap().len(), 1 << 40);
    let data = fs::read(fresh.join("sparse")).unwrap();
    assert_eq!(data.len(), 20 << 20);
    assert!(data[..(20 << 20) - 4096].iter().all(|&b| b == 0));
    assert!(data[(20 << 20) - 4096..].iter().all(|&b| b == 7));
    let blocks = fs::metadata(fresh.join("sparse")).unwrap().blocks();
    assert!(blocks * 512 <= 64 << 10, "restored dense: {blocks} blocks");
    // (The whole-tree comparison reads every file: not a terabyte of zeros.)
    fs::remove_file(a.join("huge")).unwrap();
    sync(&a);
    assert_restores_identically(&url, &a);
}

/// Item 12: right after a sync, the status has a last contact.
#[test]
fn status_shows_contact_after_a_sync() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_guard, _, url) = dir_backend();
    let mut a = Mount::with_backend(&url);
    fs::write(a.join("f"), b"x").unwrap();
    sync(&a);
    a.unmount();
    a.remount();
    sync(&a);
    let s = status(&a);
    assert!(s["last_contact"].is_number(), "{s}");
    assert_eq!(s["verified"], true, "{s}");
}

/// Item 5: a clean unmount leaves no WAL behind; a WAL damaged in the
/// middle is refused with one line instead of replayed to an older store.
#[test]
fn the_wal_is_checkpointed_and_checked() {
    if skip_unless_ferry("store") {
        return;
    }
    let mut m = Mount::new();
    for i in 0..200 {
        fs::write(m.join(&format!("f{i}")), b"x").unwrap();
    }
    m.unmount();
    let wal = m.store().join("meta.db-wal");
    assert_eq!(fs::metadata(&wal).map_or(0, |w| w.len()), 0, "WAL left");
    m.remount();
    // Enough writes for batches to commit to the WAL (see the journal's
    // BATCH_RECORDS); what follows the last batch is in the journal.
    for i in 200..1400 {
        fs::write(m.join(&format!("f{i}")), b"x").unwrap();
    }
    m.kill9();
    let mut bytes = fs::read(&wal).unwrap();
    let frame = 24 + 4096;
    assert!(bytes.len() > 32 + 4 * frame, "WAL of {} bytes", bytes.len());
    for b in &mut bytes[32 + frame + 24 + 64..][..4] {
        *b ^= 0x5a;
    }
    fs::write(&wal, &bytes).unwrap();
    refused_in_one_line(&m, "write-ahead log is damaged");
}

/// Asserts that `ferry mount` of `m`'s store (its daemon dead) fails and
/// says why in one line, naming `why`.
fn refused_in_one_line(m: &Mount, why: &str) {
    let out = run_bounded(
        Command::new(support::ferry_bin())
            .arg("mount")
            .arg("--store")
            .arg(m.store())
            .arg(m.path()),
        Duration::from_secs(30),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "damaged store mounted");
    assert!(err.contains(why), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The journal holds the writes since the last batch commit: after a
/// crash they are replayed, every one; a record damaged where later ones
/// say it was synced is refused in one line, never half replayed.
#[test]
fn the_journal_is_replayed_and_checked() {
    if skip_unless_ferry("store") {
        return;
    }
    let mut m = Mount::new();
    for i in 0..100 {
        fs::write(m.join(&format!("f{i}")), format!("{i}")).unwrap();
    }
    // An fsync syncs the journal; the records after it say so.
    fs::File::open(m.join("f0")).unwrap().sync_all().unwrap();
    for i in 100..105 {
        fs::write(m.join(&format!("f{i}")), format!("{i}")).unwrap();
    }
    m.kill9();
    // The records (magic, length, epoch, sequence number, synced through,
    // digest: 48 bytes; then the statements) and what the store holds.
    let journal = m.store().join("journal");
    let whole = fs::read(&journal).unwrap();
    let field = |at: usize, n: usize| {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&whole[at..at + n]);
        u64::from_le_bytes(b)
    };
    let mut records = Vec::new(); // (offset, sequence number, synced through)
    let mut at = 0;
    while field(at, 4) == 0x464a_524e && field(at + 8, 8) == field(8, 8) {
        records.push((at, field(at + 16, 8), field(at + 24, 8)));
        at += 48 + field(at + 4, 4) as usize;
    }
    let applied: u64 = rusqlite::Connection::open(m.store().join("meta.db"))
        .and_then(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE key='journal_applied'",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .unwrap() as u64;
    let synced = records.iter().map(|r| r.2).max().unwrap_or(0);
    let &(target, _, _) = records
        .iter()
        .find(|r| r.1 > applied && r.1 <= synced)
        .unwrap_or_else(|| panic!("no synced record after {applied} in {records:?}"));
    let mut damaged = whole.clone();
    damaged[target + 48 + 2] ^= 0x5a;
    fs::write(&journal, &damaged).unwrap();
    refused_in_one_line(&m, "journal is damaged");
    // Whole again, it replays: every file, byte for byte.
    fs::write(&journal, &whole).unwrap();
    m.remount();
    for i in 0..105 {
        assert_eq!(
            fs::read_to_string(m.join(&format!("f{i}"))).unwrap(),
            format!("{i}")
        );
    }
}

/// A store on a 64 MiB tmpfs, mounted as a user would (a daemon, whose
/// log is in the store, on the full file system too); unmounted, its daemon
/// killed and the tmpfs removed on drop, whatever happens.
struct FullStore {
    dir: TempDir,
}

impl FullStore {
    fn new() -> FullStore {
        support::init_process();
        let full = FullStore {
            dir: TempDir::new("ferry-full"),
        };
        fs::create_dir(full.st()).unwrap();
        fs::create_dir(full.mnt()).unwrap();
        let bounded = Duration::from_secs(30);
        let tmpfs = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(full.st())
            .output()
            .unwrap();
        assert!(tmpfs.status.success(), "tmpfs: {tmpfs:?}");
        let mounted = run_bounded(
            Command::new(support::ferry_bin())
                .arg("mount")
                .arg("--store")
                .arg(full.st().join("s"))
                .arg(full.mnt()),
            bounded,
        )
        .unwrap();
        assert!(mounted.status.success(), "ferry mount: {mounted:?}");
        full
    }

    fn st(&self) -> std::path::PathBuf {
        self.dir.path().join("st")
    }

    fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for FullStore {
    fn drop(&mut self) {
        let bounded = Duration::from_secs(10);
        let _ = run_bounded(Command::new("umount").arg("-l").arg(self.mnt()), bounded);
        // The daemon is ours alone: its command line names this store.
        let store = self.st().join("s");
        let _ = run_bounded(
            Command::new("pkill").arg("-9").arg("-f").arg(&store),
            bounded,
        );
        let _ = run_bounded(Command::new("umount").arg("-l").arg(self.st()), bounded);
    }
}

/// Item 4: a full store answers ENOSPC, and unlink frees space through
/// the mount; the volume stays usable after.
#[test]
fn a_full_store_says_enospc_and_unlink_frees_it() {
    if skip_unless_ferry("store") {
        return;
    }
    let full = FullStore::new();
    let mnt = full.mnt();
    let mut big = fs::File::create(mnt.join("big")).unwrap();
    let chunk = Rng::new(4).bytes(1 << 20);
    let mut filled = false;
    for _ in 0..128 {
        if let Err(e) = big.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            filled = true;
            break;
        }
    }
    assert!(filled, "64 MiB tmpfs never filled");
    drop(big);
    // Fill what the reserve left, if anything.
    let mut more = Vec::new();
    for i in 0..10_000 {
        match fs::write(mnt.join(format!("small{i}")), [1u8; 4096]) {
            Ok(()) => more.push(i),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "create {i}: {e}");
                break;
            }
        }
    }
    for r in [
        fs::create_dir(mnt.join("d")),
        fs::write(mnt.join("new"), b"x").map(drop),
    ] {
        if let Err(e) = r {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        }
    }
    fs::remove_file(mnt.join("big")).expect("unlink on a full store");
    fs::write(mnt.join("after"), b"room again").unwrap();
    assert_eq!(fs::read(mnt.join("after")).unwrap(), b"room again");
    for i in more {
        fs::remove_file(mnt.join(format!("small{i}"))).unwrap();
    }
    assert!(support::is_mounted(&mnt), "the daemon died");
}

/// Item 3: SQLite in rollback-journal mode (synchronous=FULL), four
/// writers, kill -9 of the daemon, remount, sync: the restored database
/// has every committed row.
#[test]
fn sqlite_rollback_journal_survives_kill_9() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_guard, _, url) = dir_backend();
    let mut a = Mount::with_backend(&url);
    let db = a.join("app.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;
             CREATE TABLE t(writer INTEGER, n INTEGER, pad BLOB);",
        )
        .unwrap();
    }
    let committed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (db, committed, stop) = (db.clone(), committed.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = rusqlite::Connection::open(&db).unwrap();
                c.busy_timeout(Duration::from_secs(10)).unwrap();
                c.execute_batch("PRAGMA synchronous=FULL;").unwrap();
                for n in 0..1_000_000 {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let pad = vec![w as u8; 300];
                    let insert = "INSERT INTO t VALUES (?1, ?2, ?3)";
                    // Rollback-journal writers can be told "busy" at once
                    // (a lock upgrade that would deadlock): try again.
                    let done =
                        (0..1000).any(|_| match c.execute(insert, rusqlite::params![w, n, &pad]) {
                            Ok(_) => true,
                            Err(e)
                                if e.sqlite_error_code()
                                    == Some(rusqlite::ErrorCode::DatabaseBusy) =>
                            {
                                std::thread::sleep(Duration::from_millis(1));
                                false
                            }
                            Err(e) => panic!("insert: {e}"),
                        });
                    assert!(done, "busy for 1000 tries");
                    committed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                // Still open at the kill, as a database's writers are.
                c
            })
        })
        .collect();
    // Until the shipper has read the database while it is open (its
    // batches fill up with the journals' records), then a while more.
    let read_mid_run = poll_until(Duration::from_secs(40), || {
        status(&a)["bytes_uploaded"].as_u64() > Some(0)
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let open: Vec<rusqlite::Connection> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let acked = committed.load(std::sync::atomic::Ordering::SeqCst);
    assert!(read_mid_run, "the database never shipped while open");
    assert!(acked > 100, "only {acked} rows committed");
    a.kill9();
    drop(open);
    a.remount();
    sync(&a);
    let count = |path: &Path| -> u64 {
        // Read-write: a hot journal is rolled back, as any reader would.
        let c = rusqlite::Connection::open(path).unwrap();
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count(&db), acked, "local");
    let fresh = Mount::with_backend(&url);
    assert_eq!(count(&fresh.join("app.db")), acked, "restored");
}
