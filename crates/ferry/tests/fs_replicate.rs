//! Replication against real backends: the embedded `dir:` backend and a real
//! PostgreSQL cluster (started by `ferry_backend::testing::PgServer`).
//!
//! Every check ends the same way: a fresh store mounted on the backend (a
//! new host) must show a tree identical, byte for byte, to the writer's.

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use support::cli::{assert_restores_identically, dir_backend, ferry, init, status, sync};
use support::{skip_unless_ferry, sys, Mount, Rng};

/// A small but varied tree: nested dirs, empty/small/multi-chunk/sparse
/// files, a symlink, hard links, xattrs, odd modes, a fifo.
fn populate(root: &Path, rng: &mut Rng) {
    fs::create_dir_all(root.join("src/deep/er")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("src/small.txt"), b"hello, ferry\n").unwrap();
    // Three chunks (4 MiB each at most), the last one short.
    fs::write(root.join("src/deep/big.bin"), rng.bytes(9 << 20)).unwrap();
    let sparse = sys::open(&root.join("sparse"), libc::O_CREAT | libc::O_WRONLY, 0o640).unwrap();
    sys::pwrite(&sparse, b"tail", 5 << 20).unwrap();
    drop(sparse);
    symlink("src/small.txt", root.join("link")).unwrap();
    fs::hard_link(root.join("src/small.txt"), root.join("src/deep/er/hard")).unwrap();
    sys::setxattr(&root.join("src/small.txt"), "user.note", b"kept", 0).unwrap();
    sys::chmod(&root.join("src/deep"), 0o750).unwrap();
    sys::mkfifo(&root.join("fifo"), 0o600).unwrap();
    for i in 0..40 {
        fs::write(root.join(format!("src/f{i}")), rng.bytes(i * 997)).unwrap();
    }
}

#[test]
fn dir_round_trip_and_later_changes() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_backend, _, url) = dir_backend();
    let a = Mount::with_backend(&url);
    populate(a.path(), &mut Rng::new(7));
    sync(&a);
    assert_restores_identically(&url, &a);

    // Renames, deletes, overwrites and a create-then-delete.
    fs::rename(a.join("src/f1"), a.join("moved")).unwrap();
    fs::remove_file(a.join("src/f2")).unwrap();
    fs::write(a.join("src/f3"), b"rewritten").unwrap();
    fs::write(a.join("ephemeral"), b"x").unwrap();
    fs::remove_file(a.join("ephemeral")).unwrap();
    fs::rename(a.join("src/deep"), a.join("deep")).unwrap();
    sync(&a);
    let s = status(&a);
    assert_eq!(s["pending_ops"], 0, "{s}");
    assert_eq!(s["conflicts"], 0, "{s}");
    assert_restores_identically(&url, &a);

    // A name deleted at the backend and then made again, as a file and
    // as a directory: the backend's tombstones must not turn it into a conflict.
    fs::remove_file(a.join("moved")).unwrap();
    fs::remove_dir_all(a.join("deep")).unwrap();
    sync(&a);
    fs::write(a.join("moved"), b"again").unwrap();
    fs::create_dir(a.join("deep")).unwrap();
    fs::write(a.join("deep/big.bin"), b"small now").unwrap();
    sync(&a);
    assert_eq!(status(&a)["conflicts"], 0);
    assert_restores_identically(&url, &a);
}

#[test]
fn unchanged_chunks_are_never_uploaded_twice() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_backend, _, url) = dir_backend();
    let a = Mount::with_backend(&url);
    let data = Rng::new(3).bytes(6 << 20);
    fs::write(a.join("one"), &data).unwrap();
    sync(&a);
    let before = status(&a)["bytes_uploaded"].as_u64().unwrap();
    // At least every byte once (more only if the shipper caught the file
    // half-written, which it then ships again as it ends).
    assert!(
        before >= data.len() as u64,
        "uploaded {before} of {} bytes",
        data.len()
    );
    // Same bytes under other names, and the file rewritten in place with
    // identical contents: nothing new to upload.
    fs::write(a.join("two"), &data).unwrap();
    fs::copy(a.join("one"), a.join("three")).unwrap();
    fs::write(a.join("one"), &data).unwrap();
    sync(&a);
    assert_eq!(status(&a)["bytes_uploaded"].as_u64().unwrap(), before);
    // Many writes to one file before it ships upload it once.
    let f = sys::open(&a.join("busy"), libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap();
    for i in 0..200 {
        sys::pwrite(&f, &[i as u8; 4096], i * 4096).unwrap();
    }
    drop(f);
    sync(&a);
    let after = status(&a)["bytes_uploaded"].as_u64().unwrap();
    assert!(
        after - before <= 200 * 4096,
        "busy file uploaded {} bytes for 800 KiB",
        after - before
    );
    assert_restores_identically(&url, &a);
}

#[test]
fn kill9_during_replication_loses_and_duplicates_nothing() {
    if skip_unless_ferry("replication") {
        return;
    }
    let trials: usize = std::env::var("FERRY_REPL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let (_backend, _, url) = dir_backend();
    let mut a = Mount::with_backend(&url);
    let mut rng = Rng::new(11);
    for trial in 0..trials {
        let dir = a.join(&format!("t{trial}"));
        fs::create_dir(&dir).unwrap();
        for i in 0..30 {
            let len = rng.below(300_000) as usize;
            fs::write(dir.join(format!("f{i}")), rng.bytes(len)).unwrap();
        }
        if trial > 0 {
            fs::remove_dir_all(a.join(&format!("t{}", trial - 1))).unwrap();
        }
        // Kill while the shipper is mid-batch, at a different point each time.
        std::thread::sleep(Duration::from_millis(rng.below(60)));
        a.kill9();
        a.remount();
    }
    sync(&a);
    let s = status(&a);
    assert_eq!(
        s["conflicts"], 0,
        "a lost acknowledgement became a conflict: {s}"
    );
    assert_restores_identically(&url, &a);
}

#[test]
fn clean_files_are_evicted_under_cache_size_and_fetched_back() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_backend, _, url) = dir_backend();
    let a = Mount::with_args(&["--backend", &url, "--cache-size", "1M"]);
    let mut rng = Rng::new(13);
    let files: Vec<Vec<u8>> = (0..10).map(|_| rng.bytes(512 << 10)).collect();
    for (i, data) in files.iter().enumerate() {
        fs::write(a.join(&format!("f{i}")), data).unwrap();
    }
    sync(&a);
    let cached = || -> u64 {
        fs::read_dir(a.store().join("data"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while cached() > 1 << 20 {
        assert!(Instant::now() < deadline, "still {} bytes cached", cached());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Sizes are still right without the bytes, and the bytes come back.
    for (i, data) in files.iter().enumerate() {
        let p = a.join(&format!("f{i}"));
        assert_eq!(fs::metadata(&p).unwrap().len(), data.len() as u64);
        assert_eq!(&fs::read(&p).unwrap(), data, "f{i} after eviction");
    }
}

#[test]
fn garbage_from_the_backend_is_an_error_not_corruption() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_backend, vol, url) = dir_backend();
    let a = Mount::with_backend(&url);
    fs::write(a.join("good"), b"fine").unwrap();
    fs::write(a.join("bad"), Rng::new(5).bytes(100_000)).unwrap();
    sync(&a);
    // Truncate the chunk of "bad" (the larger chunk file) in the backend.
    let mut chunks = Vec::new();
    let mut stack = vec![vol.join("chunks")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                chunks.push((fs::metadata(&p).unwrap().len(), p));
            }
        }
    }
    chunks.sort();
    let (_, victim) = chunks.last().expect("chunks exist").clone();
    let bytes = fs::read(&victim).unwrap();
    fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();

    let mut b = Mount::with_backend(&url);
    assert_eq!(fs::read(b.join("good")).unwrap(), b"fine");
    let err = fs::read(b.join("bad")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        b.daemon_log().contains("fetching inode"),
        "no log line for the bad chunk:\n{}",
        b.daemon_log()
    );
    // The failure left nothing behind: still uncached, still consistent.
    assert_eq!(fs::metadata(b.join("bad")).unwrap().len(), 100_000);
    b.unmount();
    ferry(&["fsck", "--store", b.store().to_str().unwrap()]);
}

#[test]
fn offline_mount_writes_locally_and_converges_when_the_backend_returns() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_backend, vol, url) = dir_backend();
    let hidden = vol.with_file_name("away");
    let mut a = Mount::with_backend(&url);
    fs::write(a.join("before"), b"1").unwrap();
    sync(&a);
    a.unmount();
    // The backend disappears; the volume must mount and work regardless.
    fs::rename(&vol, &hidden).unwrap();
    a.remount();
    fs::write(a.join("offline"), Rng::new(9).bytes(50_000)).unwrap();
    fs::create_dir(a.join("made-offline")).unwrap();
    fs::write(a.join("made-offline/deep"), Rng::new(10).bytes(50_000)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&a)["last_error"].is_null() {
        assert!(Instant::now() < deadline, "no error reported while offline");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(status(&a)["pending_ops"].as_u64().unwrap() > 0);
    // It comes back: replication resumes by itself, no remount.
    fs::rename(&hidden, &vol).unwrap();
    sync(&a);
    assert_restores_identically(&url, &a);

    // A host that never fetched a file (no prefetch, and nothing read in
    // its directory, which read-ahead would fetch) cannot read it while
    // offline: a prompt EIO, not a hang; what it has cached still reads.
    let b = Mount::with_args(&["--backend", &url, "--prefetch", "none"]);
    assert_eq!(fs::read(b.join("before")).unwrap(), b"1");
    fs::rename(&vol, &hidden).unwrap();
    let start = Instant::now();
    let err = fs::read(b.join("made-offline/deep")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(fs::read(b.join("before")).unwrap(), b"1");
    fs::rename(&hidden, &vol).unwrap();
}

#[test]
fn postgres_round_trip_and_outage() {
    if skip_unless_ferry("replication") {
        return;
    }
    let pg = PgServer::shared();
    let url = pg.create_database("ferry_fs_outage");
    init(&url);
    let a = Mount::with_backend(&url);
    populate(a.path(), &mut Rng::new(21));
    sync(&a);
    assert_restores_identically(&url, &a);

    // Outage: writes keep succeeding, at local speed, while the server is down.
    pg.stop();
    let start = Instant::now();
    for i in 0..200 {
        fs::write(a.join(&format!("during-outage-{i}")), format!("{i}")).unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "writes waited on the backend: {:?}",
        start.elapsed()
    );
    assert!(status(&a)["pending_ops"].as_u64().unwrap() > 0);
    pg.restart();
    // Converges with no remount.
    sync(&a);
    assert_restores_identically(&url, &a);
    // The password never shows in what ferry prints.
    let shown = ferry(&["status", a.path().to_str().unwrap()]);
    assert!(!shown.contains(&pg.password()), "password leaked: {shown}");
}
