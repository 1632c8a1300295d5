//! Shared fixtures for the ferry-fs test suites and the benchmark.
//!
//! The centre is [`Mount`]: a temp dir holding a store and a mount point, a
//! `ferry mount --foreground` daemon serving it, and a `Drop` that always
//! unmounts, kills and removes, even when the test panics. Every wait is
//! bounded.
//!
//! `FERRY_TEST_TARGET` picks what a [`Mount`] really is, so the whole suite
//! can be validated before ferry exists and compared against a peer:
//! - `ferry` (default): the real file system (`CARGO_BIN_EXE_ferry`);
//! - `raw`: a plain directory on the root file system (no daemon);
//! - `bindfs`: `bindfs -f` over a plain directory (libfuse passthrough).
//!
//! Tests that only mean something on ferry (fsck, crash, corrupt store) call
//! [`skip_unless_ferry`] and return early with a printed reason.
//!
//! Also here: thin syscall wrappers returning `io::Result` ([`sys`]), a
//! fork helper that runs a closure as another uid and reports its errno
//! ([`as_user`]), a seeded RNG ([`Rng`]) and bounded polling ([`poll_until`]).

// Each test binary uses a different subset of this module.
#![allow(dead_code)]

pub mod cli;
pub mod crates;
pub mod fsimage;
pub mod peers;
pub mod sys;
pub mod tree;
pub mod wan;

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

/// Unprivileged identities present on Debian, used for permission tests.
pub const NOBODY: (u32, u32) = (65534, 65534);
/// Second unprivileged identity (`daemon:daemon`), for "other user" checks.
pub const DAEMON: (u32, u32) = (1, 1);

/// How long a daemon may take to show up in `/proc/self/mountinfo`.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ferry umount` (or `umount`) may take before we force it.
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a [`Mount`] is backed by; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `ferry mount --foreground`.
    Ferry,
    /// A plain directory on the root file system; no daemon.
    Raw,
    /// `bindfs -f` over a plain directory.
    Bindfs,
}

impl Target {
    /// The target chosen by `FERRY_TEST_TARGET` (default `ferry`).
    pub fn from_env() -> Target {
        match std::env::var("FERRY_TEST_TARGET").as_deref() {
            Ok("raw") => Target::Raw,
            Ok("bindfs") => Target::Bindfs,
            Ok("ferry") | Err(_) => Target::Ferry,
            Ok(other) => panic!("FERRY_TEST_TARGET={other}: expected ferry, raw or bindfs"),
        }
    }

    /// Lower-case name, as used in env vars and reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Ferry => "ferry",
            Target::Raw => "raw",
            Target::Bindfs => "bindfs",
        }
    }
}

/// Returns true (and prints why) when the test needs ferry itself, so the
/// caller returns early: `if skip_unless_ferry("fsck") { return; }`.
pub fn skip_unless_ferry(what: &str) -> bool {
    let target = Target::from_env();
    if target == Target::Ferry {
        return false;
    }
    eprintln!("SKIP ({} target): {what} is ferry-specific", target.name());
    true
}

/// Path of the `ferry` binary: `FERRY_BIN` if set (e.g. a release build,
/// or a stand-in to self-test this harness), else the one cargo built for
/// this test run.
pub fn ferry_bin() -> String {
    std::env::var("FERRY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferry").to_string())
}

/// Sets a known umask once per process, so expected modes are stable
/// (the umask is process-wide; every test wants the same one).
pub fn init_process() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: umask has no memory-safety preconditions.
        unsafe { libc::umask(0o022) };
    });
}

/// A temp directory `$TMPDIR/ferry-test-XXXXXX` (`/tmp` without `TMPDIR`),
/// mode 0755 so that unprivileged uids can traverse it (permission tests
/// and allow_other). Removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh temp dir under `$TMPDIR` or /tmp (every component
    /// must be o+x). A benchmark points `TMPDIR` away from a file system
    /// area that years of test churn made slow to allocate in.
    pub fn new(prefix: &str) -> TempDir {
        let root = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        let template = format!("{root}/{prefix}-XXXXXX\0");
        let mut buf = template.into_bytes();
        // SAFETY: buf is a writable NUL-terminated template ending in XXXXXX.
        let ret = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
        assert!(!ret.is_null(), "mkdtemp: {}", io::Error::last_os_error());
        buf.pop();
        let path = PathBuf::from(String::from_utf8(buf).expect("ascii template"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Never descend into a live mount: a hung FUSE daemon would hang us.
        for mnt in mounts_under(&self.path) {
            let _ = run_bounded(Command::new("umount").arg("-l").arg(&mnt), UNMOUNT_TIMEOUT);
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A file system under test, mounted at [`Mount::path`]; see the module doc.
pub struct Mount {
    target: Target,
    options: String,
    /// Extra daemon arguments (`--backend URL`).
    args: Vec<String>,
    dir: TempDir,
    store: PathBuf,
    mnt: PathBuf,
    daemon: Option<Child>,
    /// The daemon's stderr goes to a file, not a pipe, so a chatty daemon can
    /// never block on a full pipe, and we can show it on failure.
    log: PathBuf,
}

/// The options every test uses unless it asks otherwise: unprivileged uids
/// can reach the mount, and the kernel checks permissions.
pub const DEFAULT_OPTIONS: &str = "allow_other,default_permissions";

impl Mount {
    /// Mounts the target from `FERRY_TEST_TARGET` with [`DEFAULT_OPTIONS`].
    pub fn new() -> Mount {
        Mount::with(Target::from_env(), DEFAULT_OPTIONS)
    }

    /// Mounts ferry on a fresh store that replicates to `backend`.
    pub fn with_backend(backend: &str) -> Mount {
        Mount::with_args(&["--backend", backend])
    }

    /// Mounts ferry on a fresh store with extra `ferry mount` arguments.
    pub fn with_args(args: &[&str]) -> Mount {
        Mount::build(Target::Ferry, DEFAULT_OPTIONS, args)
    }

    /// Mounts `target` with `-o options`; panics (showing the daemon's
    /// stderr) if it is not mounted within [`MOUNT_TIMEOUT`].
    pub fn with(target: Target, options: &str) -> Mount {
        Mount::build(target, options, &[])
    }

    fn build(target: Target, options: &str, args: &[&str]) -> Mount {
        init_process();
        let dir = TempDir::new("ferry-test");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        for d in [&store, &mnt] {
            fs::create_dir(d).expect("create store/mnt");
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let log = dir.path().join("daemon.log");
        let mut m = Mount {
            target,
            options: options.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            dir,
            store,
            mnt,
            daemon: None,
            log,
        };
        m.start();
        m
    }

    /// Where the file system is mounted (for `raw`, the plain directory).
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `path().join(rel)`, for brevity in tests.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The store directory passed to `ferry mount --store`.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// The scratch dir holding store, mount point and daemon log; tests may
    /// put reference files here (outside the mount, same lifetime).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// What this mount is backed by.
    pub fn target(&self) -> Target {
        self.target
    }

    /// True when there is no daemon (plain directory).
    pub fn is_raw(&self) -> bool {
        self.target == Target::Raw
    }

    /// The daemon's stderr so far (for failure messages).
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The command line that serves this mount in the foreground.
    fn daemon_command(&self) -> Command {
        match self.target {
            Target::Ferry => {
                let mut c = Command::new(ferry_bin());
                c.arg("mount")
                    .arg("--store")
                    .arg(&self.store)
                    .arg("-o")
                    .arg(&self.options)
                    .args(&self.args)
                    .arg("--foreground")
                    .arg(&self.mnt);
                c
            }
            Target::Bindfs => {
                let mut c = Command::new("bindfs");
                // bindfs has its own permission options; pass only what it knows.
                c.arg("-f")
                    .arg("-o")
                    .arg(&self.options)
                    .arg(&self.store)
                    .arg(&self.mnt);
                c
            }
            Target::Raw => unreachable!("raw has no daemon"),
        }
    }

    /// Starts a daemon on the store and waits until the mount is live.
    fn start(&mut self) {
        if self.is_raw() {
            return;
        }
        assert!(
            !is_mounted(&self.mnt),
            "{} is already mounted",
            self.mnt.display()
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let child = self
            .daemon_command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} daemon: {e}", self.target.name()));
        self.daemon = Some(child);
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if is_mounted(&self.mnt) {
                return;
            }
            let exited = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.daemon = None;
                panic!(
                    "{} daemon exited ({status}) before mounting {}; stderr:\n{}",
                    self.target.name(),
                    self.mnt.display(),
                    self.daemon_log()
                );
            }
            if Instant::now() > deadline {
                self.force_unmount();
                panic!(
                    "{} not mounted at {} after {MOUNT_TIMEOUT:?}; daemon stderr:\n{}",
                    self.target.name(),
                    self.mnt.display(),
                    self.daemon_log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the daemon (a crash), then lazily detaches the dead mount.
    /// No-op on `raw`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // Read before the kill: asking the mount itself could hang now.
            let connection = fuse_connection(&self.mnt);
            let _ = child.kill();
            if wait_bounded(&mut child, Duration::from_secs(2)).is_none() {
                // A thread of the killed daemon can be stuck in the kernel
                // (a cache notification waiting on a directory lock whose
                // holder waits on this very connection): only aborting the
                // connection lets the process, and its store lock, go.
                if let Some(id) = connection {
                    let connections = Path::new("/sys/fs/fuse/connections");
                    if !connections.join(id.to_string()).exists() {
                        // fusectl is not mounted on every machine.
                        let _ = run_bounded(
                            Command::new("mount")
                                .args(["-t", "fusectl", "fusectl"])
                                .arg(connections),
                            UNMOUNT_TIMEOUT,
                        );
                    }
                    let _ = fs::write(connections.join(format!("{id}/abort")), "1");
                }
                let _ = wait_bounded(&mut child, UNMOUNT_TIMEOUT);
            }
        }
        if !self.is_raw() {
            let _ = run_bounded(
                Command::new("umount").arg("-l").arg(&self.mnt),
                UNMOUNT_TIMEOUT,
            );
        }
    }

    /// Starts a new daemon on the same store (after [`Mount::kill9`] or
    /// [`Mount::unmount`]). No-op on `raw`.
    pub fn remount(&mut self) {
        self.start();
    }

    /// Like [`Mount::remount`], but with new `-o` options (e.g. adding `ro`).
    pub fn remount_with(&mut self, options: &str) {
        self.options = options.to_string();
        self.start();
    }

    /// Clean unmount: `ferry umount` (or `umount` for bindfs) and wait for
    /// the daemon to exit; on timeout or failure, forces it and panics, since
    /// a clean unmount is part of the contract. No-op on `raw`.
    pub fn unmount(&mut self) {
        if self.is_raw() {
            return;
        }
        let result = run_bounded(&mut self.umount_command(), UNMOUNT_TIMEOUT);
        let daemon_exit = self
            .daemon
            .as_mut()
            .map(|c| wait_bounded(c, UNMOUNT_TIMEOUT));
        let clean = matches!(&result, Ok(o) if o.status.success())
            && matches!(daemon_exit, None | Some(Some(_)))
            && !is_mounted(&self.mnt);
        if !clean {
            self.force_unmount();
            panic!(
                "unmount of {} failed: {}; daemon stderr:\n{}",
                self.mnt.display(),
                describe(&result),
                self.daemon_log()
            );
        }
        self.daemon = None;
    }

    /// The clean-unmount command: `ferry umount MNT`, or `umount MNT` for
    /// a peer file system.
    fn umount_command(&self) -> Command {
        let mut c = match self.target {
            Target::Ferry => {
                let mut c = Command::new(ferry_bin());
                c.arg("umount");
                c
            }
            _ => Command::new("umount"),
        };
        c.arg(&self.mnt);
        c
    }

    /// Best effort, never blocks unboundedly: lazy unmount and SIGKILL.
    fn force_unmount(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = run_bounded(
                Command::new("umount").arg("-l").arg(&self.mnt),
                UNMOUNT_TIMEOUT,
            );
        }
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = wait_bounded(&mut child, UNMOUNT_TIMEOUT);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.is_raw() {
            return;
        }
        // A clean unmount first (flushes), unless we are unwinding: then we
        // only want everything gone, quickly. TempDir then removes the files.
        if !thread::panicking() && self.daemon.is_some() {
            let _ = run_bounded(&mut self.umount_command(), UNMOUNT_TIMEOUT);
            if let Some(child) = self.daemon.as_mut() {
                let _ = wait_bounded(child, UNMOUNT_TIMEOUT);
            }
        }
        self.force_unmount();
    }
}

/// True if `path` is a mount point in this mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    mounts_under(path).iter().any(|m| m == path)
}

/// The FUSE connection number (its device number, under
/// /sys/fs/fuse/connections) of the mount at `path`, from
/// /proc/self/mountinfo, which costs the mount nothing.
fn fuse_connection(path: &Path) -> Option<u32> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let at = PathBuf::from(unescape_mountinfo(fields.get(4)?));
        let (major, minor) = fields.get(2)?.split_once(':')?;
        (at == path && major == "0").then(|| minor.parse().ok())?
    })
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// Waits for `child` at most `timeout`; `None` if it is still running.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

/// Runs `cmd` to completion with captured output, killing it after
/// `timeout` (then the error kind is `TimedOut`).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drain both pipes in threads so a large output cannot stall the child.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_bounded(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} still running after {timeout:?}"),
            ));
        }
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// One-line description of a command result, for assertion messages.
pub fn describe(r: &io::Result<Output>) -> String {
    match r {
        Ok(o) => format!(
            "{}; stdout: {:?}; stderr: {:?}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("error: {e}"),
    }
}

/// Polls `cond` every few ms until it holds or `timeout` passes; returns
/// whether it held. The only kind of waiting tests may do.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Waits (bounded, 2 s) until the kernel's coarse clock is past `(sec,
/// nsec)`, so that the next timestamp the kernel stamps is strictly later.
/// Used before an operation whose ctime/mtime update we check.
pub fn clock_past(sec: i64, nsec: i64) {
    let passed = poll_until(Duration::from_secs(2), || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        (ts.tv_sec, ts.tv_nsec) > (sec, nsec)
    });
    assert!(passed, "coarse clock did not pass {sec}.{nsec:09}");
}

/// Runs `f` in a forked child as `(uid, gid)` (supplementary groups: just
/// `gid`), or with unchanged credentials for `None`; returns `Ok(())` or the
/// errno the child reported. The child is bounded to 30 s.
pub fn as_user(cred: Option<(u32, u32)>, f: impl FnOnce() -> io::Result<()>) -> Result<(), i32> {
    Forked::spawn(cred, f)
        .wait(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("child running as {cred:?} did not finish in 30 s"))
}

/// Makes this process `cred` (uid, gid) with the supplementary `groups`,
/// for good: for a forked child (see [`Forked`]).
pub fn drop_to(cred: (u32, u32), groups: &[u32]) -> io::Result<()> {
    // SAFETY: plain credential syscalls with a live array of `groups.len()`
    // gids.
    let failed = unsafe {
        libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setgid(cred.1) != 0
            || libc::setuid(cred.0) != 0
    };
    match failed {
        true => Err(io::Error::last_os_error()),
        false => Ok(()),
    }
}

/// A forked child process running a closure, which reports `Ok` or an errno
/// over a CLOEXEC pipe. Killed and reaped on drop.
///
/// Forking a multi-threaded test process is fine here: the child calls only
/// syscalls plus glibc's malloc (fork-safe), never prints, and always
/// `_exit`s without unwinding into the test harness.
pub struct Forked {
    pid: i32,
    pipe: i32,
}

impl Forked {
    /// Forks; the child drops to `cred` (if any), runs `f` and exits.
    pub fn spawn(cred: Option<(u32, u32)>, f: impl FnOnce() -> io::Result<()>) -> Forked {
        let mut fds = [0i32; 2];
        // Non-blocking: the parent reads only after reaping the child, and a
        // sibling fork from another test thread may hold a copy of the write
        // end, so a child that died silently must not leave us blocked.
        // SAFETY: fds is a valid array of two ints.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: see the type's doc; the child never returns from this block.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code: i32 = (|| {
                if let Some(cred) = cred {
                    if let Err(e) = drop_to(cred, &[cred.1]) {
                        return 1000 + e.raw_os_error().unwrap_or(0);
                    }
                }
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    Ok(Ok(())) => 0,
                    Ok(Err(e)) => e.raw_os_error().unwrap_or(-1),
                    Err(_) => -2,
                }
            })();
            let bytes = code.to_ne_bytes();
            // SAFETY: writes 4 bytes from a live buffer, then exits the child
            // without running the parent's atexit handlers or destructors.
            unsafe {
                libc::write(fds[1], bytes.as_ptr().cast(), 4);
                libc::_exit(0);
            }
        }
        // SAFETY: the write end belongs to us; the child has its own copy.
        unsafe { libc::close(fds[1]) };
        Forked { pid, pipe: fds[0] }
    }

    /// Waits at most `timeout` for the child's report; `None` (after
    /// killing it) on timeout. Panics if the closure panicked or the
    /// credential change failed.
    pub fn wait(mut self, timeout: Duration) -> Option<Result<(), i32>> {
        let mut status = 0;
        let reaped = poll_until(timeout, || {
            // SAFETY: waiting for our own child with a valid status pointer.
            unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) == self.pid }
        });
        if !reaped {
            return None; // Drop kills and reaps.
        }
        self.pid = 0;
        let mut buf = [0u8; 4];
        // SAFETY: reads at most 4 bytes into a live buffer.
        let n = unsafe { libc::read(self.pipe, buf.as_mut_ptr().cast(), 4) };
        assert_eq!(n, 4, "child died without reporting (status {status:#x})");
        Some(match i32::from_ne_bytes(buf) {
            0 => Ok(()),
            -2 => panic!("closure panicked in forked child"),
            c if c >= 1000 => panic!("dropping privileges failed: errno {}", c - 1000),
            c => Err(c),
        })
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        // SAFETY: killing and reaping our own child (if not reaped yet), and
        // closing our end of the pipe.
        unsafe {
            if self.pid > 0 {
                libc::kill(self.pid, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(self.pid, &mut status, 0);
            }
            libc::close(self.pipe);
        }
    }
}

/// The errno of a result, or 0 for success: `assert_eq!(errno(r), libc::EEXIST)`.
pub fn errno<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// SplitMix64: a tiny seeded generator, deterministic across platforms and
/// crate versions, so a printed seed always replays the same run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A random element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// A `u64` from env var `name`, or `default` when unset.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// FNV-1a 64: a checksum for recorded file contents (no extra crate).
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
