//! Invariant I4, "no mix-ups", and the checks that find damage, each
//! against real mounts and real `dir:` backends.
//!
//! The bugs, and what fixed them:
//! - A store restored from volume b, mounted with the backend of volume c,
//!   shipped b's files into c. Stores are now bound to a volume id at their
//!   first contact with a backend, and any other volume is refused.
//! - A store rolled back (a backup, a VM snapshot) handed out `host:counter`
//!   ids again that the backend already held for other files. The backend
//!   now says how far it has seen each host; a store behind that is refused.
//! - `ferry mount /x/a-b` and `ferry mount /x/a/b` shared the default store
//!   `x-a-b`. Default names now escape `-`, so each path has its own; an
//!   old-name store is moved when it is unambiguously the mountpoint's, and
//!   otherwise the mount says how to move it.
//! - Bytes rotting in a store's data file were served, and `ferry fsck` said
//!   ok. `ferry fsck --verify` rehashes clean files against their chunks.
//! - Nothing checked a backend's own invariants: `ferry fsck --backend`.

mod support;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ferry_backend::{Entry, InodeState};
use support::cli::{dir_backend, ferry, status, sync};
use support::{is_mounted, run_bounded, skip_unless_ferry, sys, Mount, Rng, TempDir};

/// Runs `ferry ARGS` with extra environment, bounded; returns its output.
fn ferry_env(args: &[&OsStr], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(support::ferry_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("ferry {args:?}: {e}"))
}

/// Runs `ferry ARGS` with extra environment, which must fail with a
/// one-line reason on stderr; returns that line.
fn ferry_refuses(args: &[&OsStr], env: &[(&str, &Path)]) -> String {
    let out = ferry_env(args, env);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(
        !out.status.success(),
        "ferry {args:?} succeeded: {}",
        support::describe(&Ok(out))
    );
    assert_eq!(
        err.lines().count(),
        1,
        "the reason must be one line: {err:?}"
    );
    err
}

/// Asserts `ferry mount --foreground` of `store` with `backend` on `mnt` is
/// refused; returns the reason.
fn mount_refused(store: &Path, backend: &str, mnt: &Path) -> String {
    let err = ferry_refuses(
        &[
            "mount".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            "--backend".as_ref(),
            backend.as_ref(),
            "--foreground".as_ref(),
            mnt.as_os_str(),
        ],
        &[],
    );
    assert!(!is_mounted(mnt), "{} was mounted anyway", mnt.display());
    err
}

/// A volume mounted with `ferry mount` (daemonized, as a user runs it);
/// unmounted on drop, by force if need be.
struct CliMount {
    mnt: PathBuf,
}

impl CliMount {
    /// `ferry mount ARGS MNT` with extra environment; returns the mount and
    /// what ferry printed on stderr.
    fn start(args: &[&OsStr], mnt: &Path, env: &[(&str, &Path)]) -> (CliMount, String) {
        let mut all: Vec<&OsStr> = vec!["mount".as_ref()];
        all.extend_from_slice(args);
        all.push(mnt.as_os_str());
        let out = ferry_env(&all, env);
        let guard = CliMount {
            mnt: mnt.to_path_buf(),
        };
        assert!(
            out.status.success() && is_mounted(mnt),
            "ferry {all:?}: {}",
            support::describe(&Ok(out))
        );
        (guard, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn join(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn sync(&self) {
        ferry(&["sync", self.mnt.to_str().unwrap(), "--timeout", "60"]);
    }
}

impl Drop for CliMount {
    fn drop(&mut self) {
        if !is_mounted(&self.mnt) {
            return;
        }
        let _ = run_bounded(
            Command::new(support::ferry_bin())
                .arg("umount")
                .arg(&self.mnt),
            support::UNMOUNT_TIMEOUT,
        );
        if is_mounted(&self.mnt) {
            let _ = run_bounded(
                Command::new("umount").arg("-l").arg(&self.mnt),
                support::UNMOUNT_TIMEOUT,
            );
        }
    }
}

/// Everything a `dir:` volume holds, in a stable order: inodes, entries and
/// the length of its change feed.
fn backend_state(url: &str) -> (Vec<InodeState>, Vec<Entry>, usize) {
    let backend = ferry_backend::open(url, Duration::from_secs(5)).unwrap();
    let (_, mut inodes, mut entries) = backend.snapshot().unwrap();
    inodes.sort_by_key(|i| i.id);
    entries.sort_by(|a, b| (a.parent, &a.name).cmp(&(b.parent, &b.name)));
    let feed = backend.feed(0, usize::MAX).unwrap().len();
    (inodes, entries, feed)
}

/// Names in the backend's root directory.
fn root_names(url: &str) -> Vec<String> {
    let (_, entries, _) = backend_state(url);
    entries
        .iter()
        .filter(|e| e.parent == ferry_backend::ObjectId::ROOT)
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect()
}

/// Runs `sql` on the SQLite database `db`, the way a person would edit it
/// by hand (no daemon has it open).
fn sqlite(db: &Path, sql: &str) {
    rusqlite::Connection::open(db)
        .and_then(|c| c.execute_batch(sql))
        .unwrap_or_else(|e| panic!("{}: {sql}: {e}", db.display()));
}

fn mkdirs(paths: &[&Path]) {
    for p in paths {
        fs::create_dir_all(p).unwrap();
    }
}

#[test]
fn a_store_serves_only_its_own_volume() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_b_dir, _, b) = dir_backend();
    let (_c_dir, _, c) = dir_backend();
    let writer = Mount::with_backend(&b);
    fs::write(writer.join("of-b"), b"volume b").unwrap();
    sync(&writer);

    // A new host restores b: its store is b's from then on.
    let mut restored = Mount::with_backend(&b);
    assert_eq!(fs::read(restored.join("of-b")).unwrap(), b"volume b");
    restored.unmount();
    let c_before = backend_state(&c);
    let err = mount_refused(restored.store(), &c, restored.path());
    assert!(
        err.contains("belongs to volume") && err.contains("refusing it"),
        "{err}"
    );
    assert_eq!(backend_state(&c), c_before, "something of b reached c");
    // Nor if the store was made before stores were bound: c lacks what it
    // restored.
    sqlite(
        &restored.store().join("meta.db"),
        "DELETE FROM meta WHERE key IN ('volume_id', 'volume_name')",
    );
    let err = mount_refused(restored.store(), &c, restored.path());
    assert!(
        err.contains("replicated before ferry recorded volumes"),
        "{err}"
    );
    assert_eq!(backend_state(&c), c_before, "something of b reached c");

    // A local-only store joins the first volume it is mounted with.
    let dir = TempDir::new("ferry-test");
    let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
    mkdirs(&[&mnt]);
    let (local, _) = CliMount::start(&["--store".as_ref(), store.as_os_str()], &mnt, &[]);
    fs::write(local.join("mine"), b"local first").unwrap();
    drop(local);
    let with_c = [
        "--store".as_ref(),
        store.as_os_str(),
        "--backend".as_ref(),
        c.as_ref(),
    ];
    let (on_c, _) = CliMount::start(&with_c, &mnt, &[]);
    fs::write(on_c.join("later"), b"then shared").unwrap();
    on_c.sync();
    drop(on_c);
    let mut names = root_names(&c);
    names.sort();
    assert_eq!(names, ["later", "mine"]);
    let b_before = backend_state(&b);
    let err = mount_refused(&store, &b, &mnt);
    assert!(err.contains("belongs to volume"), "{err}");
    assert_eq!(backend_state(&b), b_before, "something of c reached b");
    // Its own volume still takes it.
    let (again, _) = CliMount::start(&with_c, &mnt, &[]);
    assert_eq!(fs::read(again.join("mine")).unwrap(), b"local first");
}

#[test]
fn a_rolled_back_store_is_refused() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (_dir, vol, url) = dir_backend();
    let mut m = Mount::with_backend(&url);
    fs::write(m.join("old"), b"before the snapshot").unwrap();
    sync(&m);
    m.unmount();
    let snapshot = m.scratch().join("snapshot");
    let cp = |from: &Path, to: &Path| {
        let out = run_bounded(
            Command::new("cp").arg("-a").arg(from).arg(to),
            Duration::from_secs(60),
        );
        assert!(
            matches!(&out, Ok(o) if o.status.success()),
            "{}",
            support::describe(&out)
        );
    };
    cp(m.store(), &snapshot);

    // Life goes on after the snapshot: new files, so new ids, shipped.
    m.remount();
    for i in 0..5 {
        fs::write(
            m.join(&format!("new{i}")),
            format!("after the snapshot {i}"),
        )
        .unwrap();
    }
    sync(&m);
    m.unmount();
    let before = backend_state(&url);

    // The snapshot comes back: its next file would reuse an id of "new0".
    fs::remove_dir_all(m.store()).unwrap();
    cp(&snapshot, m.store());
    let err = mount_refused(m.store(), &url, m.path());
    assert!(
        err.contains("rolled back or lost commits") && err.contains("refusing it"),
        "{err}"
    );
    assert_eq!(backend_state(&url), before, "the backend changed");

    // Mounted while the backend is away, it works locally; once the backend
    // is back, replication refuses it before shipping anything, even though
    // by then it has made more files (ids) than the backend has seen.
    let away = vol.with_file_name("away");
    fs::rename(&vol, &away).unwrap();
    m.remount();
    for i in 0..12 {
        fs::write(m.join(&format!("offline{i}")), b"reuses an id").unwrap();
    }
    fs::rename(&away, &vol).unwrap();
    let refused = support::poll_until(Duration::from_secs(30), || {
        status(&m)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("rolled back or lost commits"))
    });
    assert!(refused, "replication did not refuse: {}", status(&m));
    assert_eq!(backend_state(&url), before, "the backend changed");
}

#[test]
fn default_store_names_are_one_per_mountpoint() {
    use ferry_fs::mount::store_name;
    let names: Vec<_> = [
        "/x/a-b", "/x/a/b", "/x-a/b", "/x-a-b", "/x/a%2Db", "/", "/root", "/-", "/%", "/a b",
    ]
    .iter()
    .map(|p| store_name(Path::new(p)))
    .collect();
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            assert_ne!(a, b, "two mountpoints share a default store name");
        }
    }
    // Paths without '-' or '%' keep the names older versions gave them.
    assert_eq!(store_name(Path::new("/mnt/vol")), "mnt-vol");
    assert_eq!(store_name(Path::new("/x/a-b")), "x-a%2Db");
    if skip_unless_ferry("default stores") {
        return;
    }

    // Two real mounts: each sees only its own files.
    let dir = TempDir::new("ferry-test");
    let data = dir.path().join("data");
    let (dash, slash) = (dir.path().join("x/a-b"), dir.path().join("x/a/b"));
    mkdirs(&[&dash, &slash]);
    let env = [("XDG_DATA_HOME", data.as_path())];
    let (one, _) = CliMount::start(&[], &dash, &env);
    let (two, _) = CliMount::start(&[], &slash, &env);
    fs::write(one.join("in-dash"), b"1").unwrap();
    fs::write(two.join("in-slash"), b"2").unwrap();
    let list = |m: &CliMount| -> Vec<String> {
        fs::read_dir(&m.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(list(&one), ["in-dash"]);
    assert_eq!(list(&two), ["in-slash"]);
    assert_eq!(fs::read_dir(data.join("ferry")).unwrap().count(), 2);
}

#[test]
fn an_old_default_store_is_moved_or_named() {
    if skip_unless_ferry("default stores") {
        return;
    }
    let dir = TempDir::new("ferry-test");
    let data = dir.path().join("data");
    let env = [("XDG_DATA_HOME", data.as_path())];
    // What older versions named a mountpoint's store.
    let old_store = |mnt: &Path| {
        let name = mnt.to_str().unwrap().trim_matches('/').replace('/', "-");
        data.join("ferry").join(name)
    };
    let make_old = |mnt: &Path, file: &str| {
        let store = old_store(mnt);
        let (m, _) = CliMount::start(&["--store".as_ref(), store.as_os_str()], mnt, &[]);
        fs::write(m.join(file), b"kept").unwrap();
    };

    // Only this mountpoint can have made the old name: the store moves.
    let solo = dir.path().join("y/solo-dir");
    mkdirs(&[&solo]);
    make_old(&solo, "from-before");
    let (m, said) = CliMount::start(&[], &solo, &env);
    assert_eq!(fs::read(m.join("from-before")).unwrap(), b"kept");
    assert!(said.contains("moved store"), "{said:?}");
    assert!(!old_store(&solo).exists());
    drop(m);

    // Two existing paths share the old name: ferry says how to move it.
    let (dash, slash) = (dir.path().join("z/a-b"), dir.path().join("z/a/b"));
    mkdirs(&[&dash, &slash]);
    make_old(&dash, "whose");
    let err = ferry_refuses(&["mount".as_ref(), dash.as_os_str()], &env);
    assert!(!is_mounted(&dash));
    assert!(
        err.contains("mv ") && err.contains(old_store(&dash).to_str().unwrap()),
        "{err}"
    );
    assert!(
        old_store(&dash).join("meta.db").exists(),
        "the old store was touched"
    );
}

/// The data file of `len` bytes in an unmounted store.
fn data_file_of_size(store: &Path, len: u64) -> PathBuf {
    fs::read_dir(store.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::metadata(p).unwrap().len() == len)
        .unwrap_or_else(|| panic!("no data file of {len} bytes"))
}

#[test]
fn fsck_verify_finds_rotten_bytes() {
    if skip_unless_ferry("ferry fsck --verify") {
        return;
    }
    let (_dir, _, url) = dir_backend();
    let mut m = Mount::with_backend(&url);
    fs::create_dir(m.join("d")).unwrap();
    fs::write(m.join("d/big"), Rng::new(1).bytes(9 << 20)).unwrap();
    fs::write(m.join("small"), b"small and fine").unwrap();
    // Data, a hole of almost 6 MiB, data: its list has a hole entry.
    let sparse = sys::open(&m.join("sparse"), libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap();
    sys::pwrite(&sparse, b"head", 0).unwrap();
    sys::pwrite(&sparse, b"tail", 6 << 20).unwrap();
    drop(sparse);
    sync(&m);
    m.unmount();
    // Mounted without its backend (on purpose: `nobackend`), a new file
    // stays pending: it has no chunk list to compare with.
    let store_arg = [
        "--store".as_ref(),
        m.store().as_os_str(),
        "-o".as_ref(),
        "nobackend".as_ref(),
    ];
    let (local, _) = CliMount::start(&store_arg, m.path(), &[]);
    fs::write(local.join("unshipped"), b"written after the sync").unwrap();
    drop(local);
    let store = m.store().to_str().unwrap();
    let clean = ferry(&["fsck", "--store", store, "--verify"]);
    assert!(
        clean.contains("contents ok: 3 files") && clean.contains("1 skipped"),
        "{clean}"
    );

    // Seven bytes rot in the second chunk of d/big, and seven in the hole.
    for (len, at) in [(9 << 20, (5 << 20) + 3), ((6 << 20) + 4, 3 << 20)] {
        let f = sys::open(&data_file_of_size(m.store(), len), libc::O_WRONLY, 0).unwrap();
        sys::pwrite(&f, b"rotten!", at).unwrap();
    }
    let out = ferry_env(
        &[
            "fsck".as_ref(),
            "--store".as_ref(),
            store.as_ref(),
            "--verify".as_ref(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "fsck --verify passed rotten bytes: {stdout}"
    );
    let mut damaged: Vec<&str> = stdout.lines().filter(|l| l.contains("damaged:")).collect();
    damaged.sort_by_key(|l| l.contains("/sparse"));
    assert_eq!(damaged.len(), 2, "{stdout}");
    assert!(
        damaged[0].contains("(/d/big): chunk 1 of 3 (bytes 4194304..8388608) does not match"),
        "{}",
        damaged[0]
    );
    assert!(
        damaged[1].contains("(/sparse): chunk 1 of 3") && damaged[1].contains("is a hole but"),
        "{}",
        damaged[1]
    );
    // Without --verify only the structure is checked, as before.
    ferry(&["fsck", "--store", store]);
}

#[test]
fn fsck_backend_reports_violations() {
    if skip_unless_ferry("ferry fsck --backend") {
        return;
    }
    let (_dir, vol, url) = dir_backend();
    let m = Mount::with_backend(&url);
    fs::create_dir(m.join("d")).unwrap();
    fs::write(m.join("d/f"), b"whole").unwrap();
    sync(&m);
    drop(m);
    let ok = ferry(&["fsck", "--backend", &url]);
    assert!(ok.contains("ok"), "{ok}");

    // By hand, an entry naming an inode that does not exist.
    sqlite(
        &vol.join("ferry.db"),
        "INSERT INTO entries(parent_host, parent_counter, name, child_host, child_counter, \
         version, deleted) VALUES (0, 1, CAST('dangling' AS BLOB), 4242, 99, 1, 0)",
    );
    let out = ferry_env(&["fsck".as_ref(), "--backend".as_ref(), url.as_ref()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        support::describe(&Ok(out.clone()))
    );
    let violations: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("violation:"))
        .collect();
    assert_eq!(violations.len(), 1, "{stdout}");
    assert!(violations[0].contains("4242:99"), "{}", violations[0]);
}
