//! ferry as an operator's tool (issue 11): each test is one thing a person
//! running ferry on real machines reaches for, done black-box through the
//! `ferry` binary against real FUSE mounts, a real `dir:` backend and real
//! processes, as root.
//!
//! - mounting: a dead mount is named and cleared, a busy one gets a hint
//!   and `-l`, non-ferry mounts are refused, an fstab line through the
//!   installed `mount.fuse.ferry` replicates, a store bound to a backend is
//!   not silently mounted local, option values get their own messages;
//! - watching: `ferry status` over ten mounts with two dead, and as
//!   another user; `ferry sync` progress in bytes, its summary and its
//!   reason on timeout; Prometheus metrics; plain and JSON logs;
//! - errors: no input panics the CLI (fuzzed), permission problems and
//!   SQLite errors said once and for what they are, `ferry init` and
//!   `ferry sync` edge cases;
//! - spawn and remote: no `--` needed, signal names, `--uid` without
//!   `--gid`, the spawn server's socket, `map --fd-from` past the file's
//!   end, `unmap` of code, `maps` header and JSON, the agent's path;
//! - man pages and completions.
//!
//! Every mount is unmounted and every process killed by a guard, on every
//! path; every wait is bounded.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use support::cli::{dir_backend, status, sync};
use support::{
    ferry_bin, is_mounted, poll_until, run_bounded, wait_bounded, Mount, Rng, TempDir, NOBODY,
    UNMOUNT_TIMEOUT,
};

/// What one `ferry` run did.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn from(out: Output) -> Ran {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts exit status `code`; returns self for more checks.
    fn code(self, code: i32, what: &str) -> Ran {
        assert_eq!(
            self.code, code,
            "{what}: exit {}; stdout {:?}; stderr {:?}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// Runs `cmd` bounded by a minute.
fn bounded(cmd: &mut Command) -> Ran {
    Ran::from(run_bounded(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{cmd:?}: {e}")))
}

/// `ferry ARGS`, whatever its exit status.
fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Ran {
    bounded(Command::new(ferry_bin()).args(args))
}

/// `ferry ARGS` as `(uid, gid)`.
fn run_as<S: AsRef<std::ffi::OsStr>>(cred: (u32, u32), args: &[S]) -> Ran {
    bounded(
        Command::new(ferry_bin())
            .args(args)
            .uid(cred.0)
            .gid(cred.1)
            .env("HOME", "/tmp"),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The pid of the daemon serving `store`, from the process table.
fn daemon_pid(store: &Path) -> Option<i32> {
    let want = store.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serves = args.contains(&&b"--foreground"[..])
            && args.windows(2).any(|w| w[0] == b"--store" && w[1] == want);
        serves.then_some(pid)
    })
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Whether the mount at `mnt` answers ENOTCONN: its daemon is gone.
fn reads_dead(mnt: &Path) -> bool {
    fs::metadata(mnt).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: sending a signal to a process we started.
    unsafe { libc::kill(pid, sig) };
}

/// A volume mounted the way a person does it, `ferry mount` (daemonized),
/// in a temp dir of its own; on drop it is unmounted (lazily if need be)
/// and its daemon killed, whatever state the test left it in.
struct Daemonized {
    _dir: TempDir,
    store: PathBuf,
    mnt: PathBuf,
}

impl Daemonized {
    /// `ferry mount --store STORE ARGS MNT`, which must succeed.
    fn mount(args: &[&str]) -> Daemonized {
        let dir = TempDir::new("ferry-ops");
        let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
        fs::create_dir(&mnt).unwrap();
        let d = Daemonized {
            _dir: dir,
            store,
            mnt,
        };
        d.start(args);
        d
    }

    fn start(&self, args: &[&str]) {
        let mut all = vec!["mount", "--store", s(&self.store)];
        all.extend_from_slice(args);
        all.push(s(&self.mnt));
        run(&all).code(0, "ferry mount");
        assert!(is_mounted(&self.mnt), "{} not mounted", self.mnt.display());
    }

    fn mnt(&self) -> &str {
        s(&self.mnt)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.store.join("ferry.log")).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        daemon_pid(&self.store).expect("the daemon runs")
    }

    /// kill -9 of the daemon; the mount stays, dead. Waits for the mount to
    /// read as dead, not only for the process to be a zombie: its leader
    /// thread turns zombie before the last thread closes the FUSE device.
    fn crash(&self) {
        let pid = self.pid();
        kill(pid, libc::SIGKILL);
        assert!(
            poll_until(Duration::from_secs(10), || gone(pid)
                && reads_dead(&self.mnt)),
            "daemon {pid} survived, or its mount still answers"
        );
    }
}

impl Drop for Daemonized {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = run_bounded(
                Command::new(ferry_bin()).arg("umount").arg(&self.mnt),
                UNMOUNT_TIMEOUT,
            );
        }
        if is_mounted(&self.mnt) {
            let _ = run_bounded(
                Command::new("umount").arg("-l").arg(&self.mnt),
                UNMOUNT_TIMEOUT,
            );
        }
        if let Some(pid) = daemon_pid(&self.store) {
            kill(pid, libc::SIGKILL);
        }
    }
}

/// A child process killed and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = wait_bounded(&mut self.0, Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------- mounting

/// Item 1: kill -9 leaves a dead mount; ferry names it and clears it.
#[test]
fn dead_mount_is_named_and_cleared() {
    let m = Daemonized::mount(&[]);
    fs::write(m.mnt.join("kept"), b"written before the crash").unwrap();
    m.crash();

    let st = run(&["status", m.mnt()]).code(1, "status of a dead mount");
    assert!(st.stdout.contains("state:     dead"), "{}", st.stdout);
    assert!(
        st.stdout.contains(&format!("`ferry umount {}`", m.mnt())),
        "{}",
        st.stdout
    );
    let sync = run(&["sync", m.mnt()]).code(1, "sync of a dead mount");
    assert!(
        sync.stderr.contains("is a dead ferry mount"),
        "{}",
        sync.stderr
    );
    let mount = run(&["mount", "--store", s(&m.store), m.mnt()]).code(1, "mount on a dead mount");
    assert_eq!(
        mount.stderr.trim(),
        format!(
            "ferry: {0} is a dead ferry mount (its daemon is gone): clear it with `ferry umount \
             {0}`, then mount again",
            m.mnt()
        )
    );
    let umount = run(&["umount", m.mnt()]).code(0, "umount of a dead mount");
    assert!(
        umount.stdout.contains("cleared the dead ferry mount"),
        "{}",
        umount.stdout
    );
    assert!(!is_mounted(&m.mnt));

    m.start(&[]);
    assert_eq!(
        fs::read(m.mnt.join("kept")).unwrap(),
        b"written before the crash"
    );
}

/// Item 1: a busy mount gets a hint; `ferry umount -l` detaches it, and
/// the daemon ends once the last file is closed.
#[test]
fn busy_mount_hints_lazy_and_lazy_detaches() {
    let m = Daemonized::mount(&[]);
    fs::write(m.mnt.join("held"), b"still readable").unwrap();
    let mut held = fs::File::open(m.mnt.join("held")).unwrap();
    let pid = m.pid();

    let busy = run(&["umount", m.mnt()]).code(1, "umount of a busy mount");
    assert!(busy.stderr.contains("is busy"), "{}", busy.stderr);
    assert!(
        busy.stderr
            .contains(&format!("ferry umount -l {}", m.mnt())),
        "{}",
        busy.stderr
    );
    assert!(is_mounted(&m.mnt));

    let lazy = run(&["umount", "-l", m.mnt()]).code(0, "umount -l");
    assert!(lazy.stdout.contains("detached"), "{}", lazy.stdout);
    assert!(!is_mounted(&m.mnt));
    let mut text = String::new();
    held.read_to_string(&mut text).unwrap();
    assert_eq!(text, "still readable");
    assert!(!gone(pid), "the daemon must serve the open file");
    drop(held);
    assert!(
        poll_until(Duration::from_secs(10), || gone(pid)),
        "daemon {pid} did not finish"
    );
}

/// Item 2: `ferry umount` refuses what is not a ferry mount.
#[test]
fn umount_refuses_what_is_not_ferry() {
    let dir = TempDir::new("ferry-ops");
    let tmpfs = dir.path().join("tmpfs");
    fs::create_dir(&tmpfs).unwrap();
    bounded(Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", s(&tmpfs)]))
        .code(0, "mount tmpfs");
    let refused = run(&["umount", s(&tmpfs)]).code(1, "ferry umount of a tmpfs");
    assert_eq!(
        refused.stderr.trim(),
        format!(
            "ferry: {} is not a ferry mount (it is a tmpfs mount of tmpfs); refusing to unmount it",
            s(&tmpfs)
        )
    );
    assert!(is_mounted(&tmpfs), "the tmpfs was unmounted");
    bounded(Command::new("umount").arg(&tmpfs)).code(0, "umount tmpfs");

    let plain = run(&["umount", s(dir.path())]).code(1, "ferry umount of a plain dir");
    assert!(plain.stderr.contains("is not mounted"), "{}", plain.stderr);
    let m = Daemonized::mount(&[]);
    fs::create_dir(m.mnt.join("sub")).unwrap();
    let inside = run(&["umount", s(&m.mnt.join("sub"))]).code(1, "ferry umount of a subdir");
    assert!(
        inside.stderr.contains("is inside the ferry mount"),
        "{}",
        inside.stderr
    );
    assert!(is_mounted(&m.mnt));
}

/// The `fuse.ferry` line of the mount table at `mnt`: (type, source).
fn mount_table_entry(mnt: &Path) -> (String, String) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(s(mnt)))
        .unwrap_or_else(|| panic!("{} not in mountinfo", mnt.display()));
    let (_, rest) = line.split_once(" - ").unwrap();
    let mut fields = rest.split(' ');
    (fields.next().unwrap().into(), fields.next().unwrap().into())
}

/// Item 3 and 12: `ferry install-helper` installs mount.fuse.ferry, man
/// pages and completions; one fstab-style option list, run through the
/// helper exactly as mount(8) runs it, mounts a replicated volume of type
/// fuse.ferry (as root too), without the backend on any command line.
#[test]
fn fstab_line_through_installed_helper_replicates() {
    let (_backend, vol, url) = dir_backend();
    let root = TempDir::new("ferry-ops");
    let dest = root.path().join("dest");
    let installed = run(&["install-helper", "--destdir", s(&dest)]).code(0, "install-helper");
    let helper = dest.join("sbin/mount.fuse.ferry");
    assert_eq!(
        fs::read_link(&helper).unwrap(),
        fs::canonicalize(ferry_bin()).unwrap(),
        "{}",
        installed.stdout
    );
    let share = dest.join("usr/local/share");
    for page in [
        "man/man1/ferry.1",
        "man/man1/ferry-mount.1",
        "man/man1/ferry-status.1",
    ] {
        let text = fs::read_to_string(share.join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text:.80}"
        );
    }
    for (file, mark) in [
        ("bash-completion/completions/ferry", "complete -F"),
        ("zsh/site-functions/_ferry", "#compdef ferry"),
        ("fish/vendor_completions.d/ferry.fish", "complete -c ferry"),
    ] {
        let text = fs::read_to_string(share.join(file)).unwrap();
        assert!(
            text.contains(mark) && text.contains("install-helper"),
            "{file}"
        );
    }

    let (store, mnt) = (root.path().join("store"), root.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let options = format!(
        "rw,backend={url},cache_size=20G,max_backlog=512M,prefetch=none,prefetch_max_file=64K,\
         _netdev,nofail,x-systemd.automount,x-systemd.requires=network-online.target,allow_other"
    );
    let guard = Daemonized {
        _dir: root,
        store: store.clone(),
        mnt: mnt.clone(),
    };
    bounded(Command::new(&helper).args([s(&store), s(&mnt), "-o", &options]))
        .code(0, "mount.fuse.ferry");
    assert_eq!(
        mount_table_entry(&mnt),
        ("fuse.ferry".into(), s(&store).into())
    );
    let cmdline = fs::read(format!("/proc/{}/cmdline", guard.pid())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(s(&vol)),
        "the backend URL is on the daemon's command line"
    );

    fs::write(mnt.join("from-fstab"), b"replicated").unwrap();
    let st = run(&["status", "--json", s(&mnt)]).code(0, "status");
    let st: serde_json::Value = serde_json::from_str(st.stdout.trim()).unwrap();
    assert_eq!(st["backend"], url.as_str());
    assert_eq!(st["state"], "live");
    run(&["sync", s(&mnt), "--timeout", "60"]).code(0, "sync");
    let fresh = Mount::with_backend(&url);
    assert_eq!(fs::read(fresh.join("from-fstab")).unwrap(), b"replicated");
}

/// Item 3: a store that belongs to a backend volume is not mounted
/// local-only by accident; `-o nobackend` does it on purpose, loudly.
#[test]
fn bound_store_refused_without_backend() {
    let (_backend, vol, url) = dir_backend();
    let mut m = Mount::with_backend(&url);
    fs::write(m.join("shared"), b"at the backend").unwrap();
    sync(&m);
    m.unmount();

    let refused =
        run(&["mount", "--store", s(m.store()), s(m.path())]).code(1, "mount without backend");
    let err = refused.stderr.trim();
    assert!(err.contains("belongs to volume test"), "{err}");
    assert!(err.contains(&format!("at dir:{}", vol.display())), "{err}");
    assert!(err.contains("-o nobackend"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!is_mounted(m.path()));

    let local = Daemonized {
        _dir: TempDir::new("ferry-ops"),
        store: m.store().to_path_buf(),
        mnt: m.path().to_path_buf(),
    };
    run(&[
        "mount",
        "--store",
        s(m.store()),
        "-o",
        "nobackend",
        s(m.path()),
    ])
    .code(0, "nobackend");
    assert_eq!(fs::read(m.join("shared")).unwrap(), b"at the backend");
    assert!(
        local.log().contains("mounted without its backend"),
        "{}",
        local.log()
    );
    let st = run(&["status", "--json", s(m.path())]).code(0, "status");
    assert!(st.stdout.contains("\"state\":\"local\""), "{}", st.stdout);
}

/// Item 4: a known option with a bad value, an unknown option and a
/// negative size each get their own precise message; fstab's and
/// systemd's options (with or without a value) are accepted.
#[test]
fn option_values_and_unknown_options_have_precise_messages() {
    let dir = TempDir::new("ferry-ops");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let cases: [(&str, &str); 10] = [
        (
            "threads=abc",
            "mount option threads=abc: threads is a number from 1 to 64, not \"abc\"",
        ),
        (
            "threads=0",
            "mount option threads=0: threads must be 1 to 64, not 0",
        ),
        (
            "threads=99999",
            "mount option threads=99999: threads must be 1 to 64, not 99999",
        ),
        (
            "cache_size=lots",
            "mount option cache_size=lots: not a size: \"lots\"",
        ),
        ("ro=yes", "mount option ro=yes: ro takes no value"),
        ("backend", "mount option backend: needs a value (backend=…)"),
        ("backend=dir:relative", "must be absolute"),
        (
            "metrics=anywhere",
            "mount option metrics=anywhere: not an address to listen on",
        ),
        ("prefetch=most", "prefetch must be none, small or all"),
        (
            "bogus",
            "unknown mount option \"bogus\"; known: allow_other",
        ),
    ];
    for (option, said) in cases {
        let out = run(&["mount", "-o", option, s(&mnt)]).code(1, option);
        assert!(
            out.stderr.starts_with("ferry: "),
            "{option}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(said), "{option}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{option}: {}",
            out.stderr
        );
    }
    let negative = run(&["mount", "--max-backlog", "-5", s(&mnt)]).code(2, "--max-backlog -5");
    assert!(
        negative.stderr.contains("a size cannot be negative"),
        "{}",
        negative.stderr
    );
    assert!(!negative.stderr.contains("-- -5"), "{}", negative.stderr);

    let m = Daemonized::mount(&[
        "-o",
        "defaults,x-systemd.automount,x-systemd.idle-timeout=60,_netdev,nofail,comment=x,noatime",
        "-o",
        "threads=8,nosuid,nodev",
    ]);
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(m.mnt()))
        .unwrap();
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
}

// ---------------------------------------------------------------- watching

/// Item 5 ("done when"): ten mounts, two of them dead: ten correct rows,
/// in text and JSON, and an exit status that says something is wrong.
#[test]
fn status_ten_mounts_two_dead() {
    let (_backend, _vol, url) = dir_backend();
    let mounts: Vec<Daemonized> = (0..10)
        .map(|i| {
            if i % 3 == 0 {
                Daemonized::mount(&["--backend", &url])
            } else {
                Daemonized::mount(&[])
            }
        })
        .collect();
    let dead = [3usize, 7];
    for &i in &dead {
        mounts[i].crash();
    }
    let ours = |line: &str| {
        mounts
            .iter()
            .position(|m| line.starts_with(&format!("{} ", m.mnt())))
    };

    let table = run(&["status"]).code(1, "status with dead mounts");
    assert!(table.stdout.starts_with("MOUNT "), "{}", table.stdout);
    let rows: Vec<(usize, &str)> = table
        .stdout
        .lines()
        .filter_map(|l| Some((ours(l)?, l)))
        .collect();
    assert_eq!(rows.len(), 10, "{}", table.stdout);
    for (i, row) in rows {
        let m = &mounts[i];
        let state = row.split_whitespace().nth(1).unwrap();
        let want = match i {
            _ if dead.contains(&i) => "dead",
            _ if i % 3 == 0 => "live",
            _ => "local",
        };
        assert_eq!(state, want, "{row}");
        assert!(row.contains(s(&m.store)), "{row}");
        if want == "live" {
            assert!(row.contains(&url) && row.contains("0 (0 B)"), "{row}");
        }
        if want == "dead" {
            assert!(row.contains(&format!("ferry umount {}", m.mnt())), "{row}");
        }
    }
    assert!(
        table.stderr.contains("mounts could not be asked"),
        "{}",
        table.stderr
    );

    let json = run(&["status", "--json"]).code(1, "status --json");
    let objects: Vec<serde_json::Value> = json
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .filter(|v: &serde_json::Value| mounts.iter().any(|m| v["mount"] == m.mnt()))
        .collect();
    assert_eq!(objects.len(), 10, "{}", json.stdout);
    for v in &objects {
        let i = mounts.iter().position(|m| v["mount"] == m.mnt()).unwrap();
        assert_eq!(v["store"], s(&mounts[i].store), "{v}");
        if dead.contains(&i) {
            assert_eq!(v["state"], "dead", "{v}");
            assert!(v["error"].as_str().unwrap().contains("ferry umount"), "{v}");
        } else {
            assert!(v["pending_ops"].is_u64() && v["error"].is_null(), "{v}");
        }
    }

    let details = run(&["status", mounts[0].mnt(), mounts[3].mnt()]).code(1, "two mounts");
    assert!(
        details.stdout.contains("state:     live"),
        "{}",
        details.stdout
    );
    assert!(
        details.stdout.contains("state:     dead"),
        "{}",
        details.stdout
    );
    assert!(
        details.stdout.contains(&format!("backend:   {url}")),
        "{}",
        details.stdout
    );
    assert!(
        details
            .stdout
            .contains("serving:   transport /dev/fuse, 2 threads, passthrough"),
        "how the live mount serves the kernel: {}",
        details.stdout
    );
}

/// Item 5: a user sees only their own mounts; root's are not listed, and
/// asking for one by name says why it cannot be asked.
#[test]
fn status_as_another_user_lists_only_theirs() {
    let m = Mount::new();
    let none = run_as(NOBODY, &["status"]).code(0, "status as nobody");
    assert!(!none.stdout.contains(s(m.path())), "{}", none.stdout);
    let named = run_as(NOBODY, &["status", "--json", s(m.path())]).code(1, "named");
    let v: serde_json::Value = serde_json::from_str(named.stdout.trim()).unwrap();
    assert_eq!(v["mount"], s(m.path()));
    assert!(
        v["error"].as_str().unwrap().contains("ermission denied"),
        "{v}"
    );
}

/// A pseudo-terminal: (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the given ints; the other
    // arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened and are ours alone.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Item 6: progress in bytes: lines every --interval without a terminal,
/// an indicatif bar with rate and ETA on one, and a closing summary.
#[test]
fn sync_shows_bytes_and_summary() {
    let (_backend, _vol, url) = dir_backend();
    let m = Mount::with_backend(&url);
    // Held open, so the shipper waits for the sync to ask.
    let mut open = fs::File::create(m.join("big")).unwrap();
    open.write_all(&Rng::new(6).bytes(96 << 20)).unwrap();
    let out = run(&["sync", s(m.path()), "--interval", "50ms"]).code(0, "sync");
    let first = out.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("ferry: sync {}: ", s(m.path()))) && first.ends_with("to ship"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.lines().any(|l| l.contains(" shipped, ")),
        "{}",
        out.stderr
    );
    let summary = out.stdout.trim();
    assert!(
        summary.starts_with(&format!("synced {}: ", s(m.path()))),
        "{summary}"
    );
    let mut amount = summary.split(", ").nth(1).unwrap_or_default().split(' ');
    let uploaded: f64 = amount.next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
    assert_eq!(amount.next(), Some("MiB"), "{summary}");
    assert!(uploaded >= 64.0, "{summary}");
    drop(open);
    let again = run(&["sync", s(m.path())]).code(0, "second sync");
    assert!(
        again
            .stdout
            .starts_with(&format!("synced {}: ", s(m.path()))),
        "{}",
        again.stdout
    );

    // On a terminal: a bar with bytes, rate and ETA.
    let mut open = fs::File::create(m.join("big2")).unwrap();
    open.write_all(&Rng::new(7).bytes(64 << 20)).unwrap();
    let (master, slave) = pty();
    let mut child = Killed(
        Command::new(ferry_bin())
            .args(["sync", s(m.path())])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap(),
    );
    let reader = std::thread::spawn(move || {
        let mut screen = Vec::new();
        // EIO once the child's end closes.
        let _ = fs::File::from(master).read_to_end(&mut screen);
        String::from_utf8_lossy(&screen).into_owned()
    });
    let status = wait_bounded(&mut child.0, Duration::from_secs(60)).expect("sync on a tty ends");
    assert!(status.success());
    drop(child);
    let screen = reader.join().unwrap();
    assert!(
        screen.contains("ETA") && screen.contains("MiB"),
        "{screen:?}"
    );
}

/// Item 6: a sync that times out says why, from the daemon's status.
#[test]
fn sync_timeout_says_why() {
    let (_backend, vol, url) = dir_backend();
    let mut m = Mount::with_backend(&url);
    m.unmount();
    fs::remove_dir_all(&vol).unwrap();
    m.remount();
    fs::write(m.join("unshippable"), b"no volume to ship to").unwrap();
    let started = Instant::now();
    let out = run(&["sync", s(m.path()), "--timeout", "3"]).code(1, "sync to a missing volume");
    assert!(started.elapsed() < Duration::from_secs(20));
    let err = out.stderr.lines().last().unwrap_or_default();
    assert!(
        err.contains(
            "not everything is at the backend after 3 seconds: 1 change (20 B) still pending"
        ),
        "{err}"
    );
    assert!(
        err.contains("the last attempt failed: no ferry volume at"),
        "{err}"
    );
}

/// Items 6 and 10: a path inside a mount syncs its volume; a local-only
/// mount says it has no backend; a path outside says so.
#[test]
fn sync_inside_mount_local_only_and_outside() {
    let (_backend, _vol, url) = dir_backend();
    let m = Mount::with_backend(&url);
    fs::create_dir(m.join("d")).unwrap();
    fs::write(m.join("d/f"), b"inside").unwrap();
    let out = run(&["sync", s(&m.join("d/f"))]).code(0, "sync of a file");
    assert!(
        out.stdout.starts_with(&format!("synced {}: ", s(m.path()))),
        "{}",
        out.stdout
    );
    assert_eq!(status(&m)["pending_ops"], 0);

    let local = Mount::new();
    let out = run(&["sync", s(local.path())]).code(1, "sync of a local mount");
    assert_eq!(
        out.stderr.trim(),
        format!(
            "ferry: {} has no backend (it is mounted local only): there is nothing to sync to; \
             mount it with --backend URL to replicate it",
            s(local.path())
        )
    );
    let outside = TempDir::new("ferry-ops");
    let out = run(&["sync", s(outside.path())]).code(1, "sync outside");
    assert!(
        out.stderr.contains("is not in a ferry mount"),
        "{}",
        out.stderr
    );
}

/// `GET path` from `addr`: (status line, headers and body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    let (status, rest) = reply.split_once("\r\n").unwrap();
    (status.to_string(), rest.to_string())
}

/// The value of a sample in a Prometheus text exposition (`name` with its
/// labels, if any).
fn find_sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn sample(text: &str, name: &str) -> f64 {
    find_sample(text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// The address a mount started with `--metrics 127.0.0.1:0` listens on,
/// from its log.
fn metrics_addr(m: &Mount) -> String {
    let mut addr = String::new();
    assert!(
        poll_until(Duration::from_secs(10), || {
            let log = m.daemon_log();
            addr = log
                .split("metrics at http://")
                .nth(1)
                .and_then(|rest| rest.split("/metrics").next())
                .unwrap_or_default()
                .to_string();
            !addr.is_empty()
        }),
        "no metrics address in the log:\n{}",
        m.daemon_log()
    );
    addr
}

/// How many requests of `op` the mount served, from its metrics.
fn requests(addr: &str, op: &str) -> f64 {
    let name = format!("ferry_fuse_request_duration_seconds_count{{op=\"{op}\"}}");
    find_sample(&http_get(addr, "/metrics").1, &name).unwrap_or(0.0)
}

/// Small writes cost no FUSE request each. Without
/// FUSE_HANDLE_KILLPRIV_V2 the kernel asked for `security.capability`
/// before every write (2,000 round trips here, a 4 KiB `dd` 20× slower
/// than the disk); with it, only the first write after the attributes
/// were fetched asks.
#[test]
fn small_writes_cost_no_request_each() {
    let m = Mount::with_args(&["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    let path = m.join("log");
    let mut f = fs::File::create(&path).unwrap();
    let before = requests(&addr, "getxattr");
    let block = [0x5a_u8; 4096];
    for _ in 0..2000 {
        f.write_all(&block).unwrap();
    }
    drop(f);
    let asked = requests(&addr, "getxattr") - before;
    assert!(asked <= 2.0, "{asked} getxattr requests for 2,000 writes");
    let data = fs::read(&path).unwrap();
    assert_eq!(data.len(), 2000 * 4096);
    assert!(data.iter().all(|&b| b == 0x5a));
}

/// A name that is not there is looked up once, not at every miss (the
/// kernel keeps the daemon's negative entry), and a create replaces it:
/// the new file is there at once, under the same name and through a hard
/// link made afterwards.
#[test]
fn missing_names_are_asked_once_and_made_at_once() {
    let m = Mount::with_args(&["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    let path = m.join("absent");
    let before = requests(&addr, "lookup");
    for _ in 0..50 {
        let err = fs::metadata(&path).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }
    let asked = requests(&addr, "lookup") - before;
    assert!(
        asked <= 1.0,
        "{asked} lookups for 50 stats of a missing name"
    );
    fs::write(&path, b"here").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"here");
    assert!(fs::metadata(m.join("again")).is_err());
    fs::hard_link(&path, m.join("again")).unwrap();
    assert_eq!(fs::read(m.join("again")).unwrap(), b"here");
    fs::remove_file(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    fs::create_dir(&path).unwrap();
    assert!(fs::metadata(&path).unwrap().is_dir());
}

/// Item 7: Prometheus metrics on an opt-in address: replication numbers,
/// FUSE latencies per operation, cache hits, misses and evictions.
#[test]
fn metrics_endpoint() {
    let (_backend, _vol, url) = dir_backend();
    let m = Mount::with_args(&[
        "--backend",
        &url,
        "--metrics",
        "127.0.0.1:0",
        "-o",
        "cache_size=1M,prefetch=none",
    ]);
    let addr = metrics_addr(&m);
    let files: Vec<Vec<u8>> = (0..3).map(|i| Rng::new(i).bytes(1 << 20)).collect();
    for (i, data) in files.iter().enumerate() {
        fs::write(m.join(&format!("f{i}")), data).unwrap();
    }
    sync(&m);

    let (status_line, reply) = http_get(&addr, "/metrics");
    assert_eq!(status_line, "HTTP/1.1 200 OK");
    assert!(
        reply.contains("Content-Type: text/plain; version=0.0.4"),
        "{reply}"
    );
    assert_eq!(sample(&reply, "ferry_pending_changes"), 0.0);
    assert!(sample(&reply, "ferry_shipped_bytes_total") >= (3 << 20) as f64);
    assert_eq!(sample(&reply, "ferry_backend_verified"), 1.0);
    assert_eq!(sample(&reply, "ferry_replication_errors_total"), 0.0);
    assert_eq!(sample(&reply, "ferry_conflicts"), 0.0);
    assert!(sample(&reply, "ferry_last_contact_timestamp_seconds") > 1e9);
    assert!(
        reply.contains("ferry_fuse_request_duration_seconds_count{op=\"lookup\"}"),
        "{reply}"
    );
    assert!(
        reply.contains("ferry_fuse_request_duration_seconds_bucket{op=\"create\",le=\"0.00001\"}")
    );

    // Three clean MiB in a 1 MiB cache: evicted within a few passes.
    let mut text = String::new();
    assert!(
        poll_until(Duration::from_secs(20), || {
            text = http_get(&addr, "/metrics").1;
            sample(&text, "ferry_cache_evictions_total") >= 2.0
        }),
        "nothing evicted:\n{text}"
    );
    assert!(sample(&text, "ferry_cache_evicted_bytes_total") >= (2 << 20) as f64);
    assert_eq!(sample(&text, "ferry_cache_limit_bytes"), (1 << 20) as f64);
    let misses = sample(&text, "ferry_cache_misses_total");
    let hits = sample(&text, "ferry_cache_hits_total");
    for (i, data) in files.iter().enumerate() {
        assert_eq!(&fs::read(m.join(&format!("f{i}"))).unwrap(), data, "f{i}");
    }
    // The first open fetches (a miss, which may bring its neighbours along);
    // every open counts as one or the other.
    let text = http_get(&addr, "/metrics").1;
    let after = sample(&text, "ferry_cache_misses_total");
    assert!(after > misses, "{text}");
    let opens = sample(&text, "ferry_cache_hits_total") + after - hits - misses;
    assert_eq!(opens, 3.0, "{text}");

    assert_eq!(http_get(&addr, "/other").0, "HTTP/1.1 404 Not Found");

    // A port in use fails the mount, saying so.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = TempDir::new("ferry-ops");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = run(&[
        "mount",
        "--store",
        s(&dir.path().join("store")),
        "-o",
        &format!("metrics=127.0.0.1:{port}"),
        s(&mnt),
    ])
    .code(1, "metrics port in use");
    assert_eq!(
        out.stderr.trim(),
        format!("ferry: cannot serve metrics on 127.0.0.1:{port}: address already in use")
    );
    assert!(!is_mounted(&mnt));
}

/// Item 8: the log is plain text (no colour codes), has the lifecycle at
/// the default level (mount, restore, unmount), and is JSON on request.
#[test]
fn daemon_log_is_plain_with_lifecycle_or_json() {
    let (_backend, _vol, url) = dir_backend();
    let writer = Mount::with_backend(&url);
    fs::write(writer.join("f"), b"to restore").unwrap();
    sync(&writer);

    let plain = Daemonized::mount(&["--backend", &url]);
    run(&["umount", plain.mnt()]).code(0, "umount");
    let log = plain.log();
    assert!(!log.contains('\x1b'), "colour codes in the log:\n{log}");
    for event in [" INFO ", "restored ", "mounted ", "unmounted "] {
        assert!(log.contains(event), "no {event:?} in:\n{log}");
    }

    let json = Daemonized::mount(&["--backend", &url, "--log-format", "json"]);
    run(&["umount", json.mnt()]).code(0, "umount");
    let events: Vec<serde_json::Value> = json
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    assert!(events
        .iter()
        .any(|v| v["level"] == "INFO" && message(v).starts_with("restored ")));
    assert!(events.iter().any(|v| message(v).starts_with("mounted ")));
}

/// Item 8: a bad FERRY_LOG is refused, and the help says where logs are.
#[test]
fn bad_log_filter_refused_and_help_says_where_logs_are() {
    for bad in ["bogus", "ferry_fs=loud"] {
        let out = bounded(
            Command::new(ferry_bin())
                .env("FERRY_LOG", bad)
                .args(["status"]),
        );
        let out = out.code(2, bad);
        assert!(
            out.stderr
                .starts_with(&format!("ferry: FERRY_LOG={bad:?}: ")),
            "{}",
            out.stderr
        );
    }
    let out = bounded(
        Command::new(ferry_bin())
            .env("FERRY_LOG", "bogus")
            .args(["mount", "/x"]),
    );
    assert!(
        out.code == 2 && out.stderr.contains("is not a level"),
        "{}",
        out.stderr
    );
    let help = run(&["--help"]).code(0, "help");
    assert!(help.stdout.contains("FERRY_LOG") && help.stdout.contains("STORE/ferry.log"));
    assert!(help.stdout.contains("--log-format"), "{}", help.stdout);
    let mount_help = run(&["mount", "--help"]).code(0, "mount help");
    assert!(
        mount_help.stdout.contains("fuse.ferry backend="),
        "{}",
        mount_help.stdout
    );
}

// ---------------------------------------------------------------- errors

/// Runs `ferry ARGS` and checks it ended as a CLI should: 0, 1 or 2, and
/// never a panic.
fn no_panic(args: &[String]) -> Result<(), TestCaseError> {
    let out = run(args);
    prop_assert!(
        (0..=2).contains(&out.code) && !out.stderr.contains("panicked"),
        "ferry {args:?}: exit {}; {}",
        out.code,
        out.stderr
    );
    Ok(())
}

/// Strings shaped like what people type for numbers, sizes and durations,
/// and some that are anything at all.
fn numberish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{0,30}(\\.[0-9]{0,30})?(|ms|s|m|h|d|K|M|G|T|P|E|KiB|x|e9)",
        "\\PC{0,12}",
    ]
}

/// Item 9: no value of any numeric or size option panics ferry. `ferry
/// sync` runs against a real (local) mount, so a timeout gets as far as the
/// deadline arithmetic that panicked (`--timeout 18446744073709551615`);
/// the other commands aim at nothing that exists, so no value can act.
#[test]
fn cli_numbers_never_panic() {
    let m = Mount::new();
    let mnt = s(m.path()).to_string();
    let nowhere = "/nonexistent/ferry-ops-fuzz".to_string();
    let far = "999999999".to_string();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(48));
    let result = runner.run(&(numberish(), numberish()), |(a, b)| {
        let o = |text: &str| text.to_string();
        for args in [
            vec![o("sync"), o("--timeout"), a.clone(), mnt.clone()],
            vec![o("sync"), o("--interval"), b.clone(), mnt.clone()],
            vec![o("umount"), o("--timeout"), a.clone(), nowhere.clone()],
            vec![
                o("mount"),
                o("--max-backlog"),
                a.clone(),
                o("--cache-size"),
                b.clone(),
                nowhere.clone(),
            ],
            vec![
                o("mount"),
                o("-o"),
                format!("threads={a},prefetch_max_file={b}"),
                nowhere.clone(),
            ],
            vec![
                o("mount"),
                o("-o"),
                format!("max_backlog={a},metrics={b}"),
                nowhere.clone(),
            ],
            vec![
                o("map"),
                o("--pid"),
                far.clone(),
                o("--len"),
                a.clone(),
                o("--addr"),
                b.clone(),
            ],
            vec![
                o("unmap"),
                o("--pid"),
                far.clone(),
                o("--addr"),
                a.clone(),
                o("--len"),
                b.clone(),
            ],
            vec![
                o("spawn"),
                o("--umask"),
                a.clone(),
                o("--pdeathsig"),
                b.clone(),
                nowhere.clone(),
            ],
            vec![
                o("spawn"),
                o("--rlimit"),
                format!("nofile={a}:{b}"),
                nowhere.clone(),
            ],
        ] {
            no_panic(&args)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(is_mounted(m.path()), "a fuzzed command unmounted the mount");
}

/// Item 9: the reported panic itself.
#[test]
fn huge_timeout_is_an_error_not_a_panic() {
    let out = run(&["sync", "--timeout", "18446744073709551615", "/tmp"]).code(2, "huge timeout");
    assert!(out.stderr.contains("too long"), "{}", out.stderr);
}

/// Item 10: an unreadable store is reported as unreadable (not as "not a
/// ferry store"), once; an SQLite error is said once.
#[test]
fn unreadable_store_and_errors_said_once() {
    let mut m = Mount::new();
    m.unmount();
    let store = m.store();
    fs::set_permissions(store, fs::Permissions::from_mode(0o700)).unwrap();
    let want = format!(
        "ferry: cannot use store {}: permission denied (the daemon needs to read, write and enter it)",
        s(store)
    );
    let fsck = run_as(NOBODY, &["fsck", "--store", s(store)]).code(1, "fsck as nobody");
    assert_eq!(fsck.stderr.trim(), want);
    let dir = TempDir::new("ferry-ops");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let mount = run_as(NOBODY, &["mount", "--store", s(store), s(&mnt)]).code(1, "mount as nobody");
    assert!(
        !mount.stderr.contains("not a ferry store"),
        "{}",
        mount.stderr
    );
    assert_eq!(mount.stderr.trim(), want);

    // A database SQLite cannot open: its reason, once.
    let odd = dir.path().join("odd");
    fs::create_dir_all(odd.join("meta.db")).unwrap();
    let out = run(&["fsck", "--store", s(&odd)]).code(1, "fsck of an odd store");
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        err.matches("able to open").count(),
        1,
        "said more than once: {err}"
    );
}

/// Item 10: `ferry init` makes only the volume's own directory and refuses
/// relative paths at parse time.
#[test]
fn init_refuses_missing_parents_and_relative_paths() {
    let dir = TempDir::new("ferry-ops");
    let deep = dir.path().join("missing/vol");
    let out = run(&["init", &format!("dir:{}", s(&deep))]).code(1, "init under a missing dir");
    assert_eq!(
        out.stderr.trim(),
        format!(
            "ferry: {} does not exist: create it first (ferry init creates only the volume's \
             own directory, {})",
            s(&dir.path().join("missing")),
            s(&deep)
        )
    );
    assert!(!dir.path().join("missing").exists());
    let out = run(&["init", "dir:relative/vol"]).code(2, "init of a relative path");
    assert!(out.stderr.contains("must be absolute"), "{}", out.stderr);
    assert!(!Path::new("relative").exists());
    let vol = dir.path().join("vol");
    let out = run(&["init", &format!("dir:{}", s(&vol)), "--name", "v"]).code(0, "init");
    assert!(
        out.stdout
            .contains(&format!("in the new directory {}", s(&vol))),
        "{}",
        out.stdout
    );
}

// ---------------------------------------------------------------- spawn, remote

/// Item 11: `ferry spawn CMD` without `--`, signal names, and `--uid`
/// without `--gid` refused.
#[test]
fn spawn_without_dashes_signal_names_and_uid_needs_gid() {
    run(&["spawn", "true"]).code(0, "spawn true");
    run(&["spawn", "sh", "-c", "exit 3"]).code(3, "spawn sh -c");
    run(&["spawn", "--", "sh", "-c", "exit 4"]).code(4, "spawn -- sh -c");
    run(&["spawn", "--setsid", "--pdeathsig", "KILL", "true"]).code(0, "--pdeathsig KILL");
    run(&["spawn", "--pdeathsig", "sigterm", "true"]).code(0, "--pdeathsig sigterm");
    let bad = run(&["spawn", "--pdeathsig", "BOGUS", "true"]).code(2, "--pdeathsig BOGUS");
    assert!(bad.stderr.contains("not a signal"), "{}", bad.stderr);
    let alone = run(&["spawn", "--uid", "65534", "id", "-g"]).code(1, "--uid alone");
    assert_eq!(
        alone.stderr.trim(),
        "ferry: --uid 65534 needs --gid too: without it the command would keep group id 0 \
         (root's group)"
    );
    let both = run(&["spawn", "--uid", "65534", "--gid", "65534", "id", "-g"]).code(0, "both");
    assert_eq!(both.stdout.trim(), "65534");
}

/// Item 11: the spawn server removes its socket when stopped, replaces one
/// left by a killed server, and leaves a live one alone.
#[test]
fn spawn_server_socket_is_cleaned_up() {
    let dir = TempDir::new("ferry-ops");
    let sock = dir.path().join("spawn.sock");
    let server = || {
        Killed(
            Command::new(ferry_bin())
                .args(["spawn-server", "--socket", s(&sock)])
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    let mut first = server();
    // Listening, not just bound: a second server tells a live one from a
    // stale socket by connecting.
    let listening = || ferry_spawn::server::Server::connect(&sock).is_ok();
    assert!(poll_until(Duration::from_secs(10), listening), "no socket");
    let second = run(&["spawn-server", "--socket", s(&sock)]).code(1, "second server");
    assert!(
        second.stderr.contains("already listens"),
        "{}",
        second.stderr
    );
    kill(first.0.id() as i32, libc::SIGTERM);
    assert!(wait_bounded(&mut first.0, Duration::from_secs(10)).is_some());
    assert!(!sock.exists(), "SIGTERM left the socket behind");

    let mut crashed = server();
    assert!(poll_until(Duration::from_secs(10), listening));
    crashed.0.kill().unwrap();
    assert!(wait_bounded(&mut crashed.0, Duration::from_secs(10)).is_some());
    assert!(sock.exists(), "SIGKILL cannot clean up");
    let mut restarted = server();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        restarted.0.try_wait().unwrap().is_none(),
        "restart over a stale socket failed"
    );
    kill(restarted.0.id() as i32, libc::SIGINT);
    assert!(wait_bounded(&mut restarted.0, Duration::from_secs(10)).is_some());
    assert!(!sock.exists(), "SIGINT left the socket behind");

    fs::write(&sock, b"not a socket").unwrap();
    let out = run(&["spawn-server", "--socket", s(&sock)]).code(1, "a file in the way");
    assert!(out.stderr.contains("is not a socket"), "{}", out.stderr);
}

/// The first mapping of `pid` whose line satisfies `pick`: (start, end,
/// line).
fn mapping(pid: u32, pick: impl Fn(&str) -> bool) -> Option<(u64, u64, String)> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines().find(|l| pick(l)).map(|l| {
        let (start, end) = l.split(' ').next().unwrap().split_once('-').unwrap();
        (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
            l.to_string(),
        )
    })
}

/// Item 11: `map --fd-from` past the file's end is refused (and maps the
/// whole file without --len); `unmap` of the target's libc code is refused
/// without --force; `maps` has a header and JSON.
#[test]
fn remote_map_unmap_and_maps_guard_the_target() {
    let sleeper = Killed(Command::new("sleep").arg("60").spawn().unwrap());
    let pid = sleeper.0.id();
    let pid_s = pid.to_string();
    assert!(poll_until(Duration::from_secs(5), || mapping(pid, |l| l
        .contains("libc"))
    .is_some()));
    let dir = TempDir::new("ferry-ops");
    let file = dir.path().join("eight-k");
    fs::write(&file, vec![7u8; 8192]).unwrap();

    let past = run(&["map", "--pid", &pid_s, "--fd-from", s(&file), "--len", "1G"]).code(1, "1G");
    assert!(
        past.stderr.contains("--len 1.00 GiB goes past the end of")
            && past.stderr.contains("SIGBUS"),
        "{}",
        past.stderr
    );
    assert!(mapping(pid, |l| l.contains("eight-k")).is_none());
    let whole = run(&["map", "--pid", &pid_s, "--fd-from", s(&file), "--prot", "r"]).code(0, "map");
    let addr = u64::from_str_radix(whole.stdout.trim().trim_start_matches("0x"), 16).unwrap();
    let (start, end, line) = mapping(pid, |l| l.contains("eight-k")).expect("mapped");
    assert_eq!((start, end - start), (addr, 8192), "{line}");

    let (code, code_end, line) =
        mapping(pid, |l| l.contains("libc") && l.contains(" r-xp ")).expect("libc code");
    let refused = run(&[
        "unmap",
        "--pid",
        &pid_s,
        "--addr",
        &format!("{code:#x}"),
        "--len",
        &(code_end - code).to_string(),
    ])
    .code(1, "unmap libc");
    assert!(
        refused.stderr.contains("covers executable code of") && refused.stderr.contains("--force"),
        "{}",
        refused.stderr
    );
    assert!(mapping(pid, |l| l == line).is_some(), "libc was unmapped");
    assert!(!gone(pid as i32), "the target died");

    let maps = run(&["maps", "--pid", &pid_s]).code(0, "maps");
    let header = maps.stdout.lines().next().unwrap();
    assert!(
        header.starts_with("START-END") && header.ends_with("PATH"),
        "{header}"
    );
    let json = run(&["maps", "--pid", &pid_s, "--json"]).code(0, "maps --json");
    let list: Vec<serde_json::Value> = serde_json::from_str(&json.stdout).unwrap();
    let mine = list
        .iter()
        .find(|m| m["path"] == s(&file))
        .expect("the file's mapping");
    assert_eq!(mine["start"], format!("{addr:#x}"));
    assert_eq!(mine["size"], 8192);
    assert_eq!(mine["perms"], "r--s");
}

/// Item 11: ferry says where the LD_PRELOAD agent library is, or how to
/// build it.
#[test]
fn agent_path_says_where_the_agent_is() {
    let out = run(&["agent-path"]);
    if out.code == 0 {
        let path = PathBuf::from(out.stdout.trim());
        assert!(
            path.is_file() && path.ends_with("libferry_remote_agent.so"),
            "{path:?}"
        );
    } else {
        let out = out.code(1, "agent-path");
        assert!(
            out.stderr
                .contains("cargo build --release -p ferry-remote-agent"),
            "agent-path must say how to build the agent: {}",
            out.stderr
        );
    }
}

// ---------------------------------------------------------------- man, completions

/// Item 12: man pages and completions come from the clap definitions.
#[test]
fn man_pages_and_completions() {
    let man = run(&["man"]).code(0, "man");
    assert!(man.stdout.contains(".TH ferry 1"), "{:.200}", man.stdout);
    for sub in [
        "mount",
        "umount",
        "status",
        "sync",
        "install-helper",
        "completions",
    ] {
        // roff writes a hyphen as \-.
        let roff = sub.replace('-', "\\-");
        assert!(man.stdout.contains(&roff), "ferry.1 lacks {sub}");
    }
    let dir = TempDir::new("ferry-ops");
    let written = run(&["man", "--dir", s(dir.path())]).code(0, "man --dir");
    let mount_page = fs::read_to_string(dir.path().join("ferry-mount.1")).unwrap();
    assert!(mount_page.contains("max\\-backlog") && mount_page.contains("nobackend"));
    assert!(written.stdout.lines().count() >= 10, "{}", written.stdout);
    for (shell, mark) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ferry"),
        ("fish", "complete -c ferry"),
    ] {
        let script = run(&["completions", shell]).code(0, shell);
        assert!(
            script.stdout.contains(mark) && script.stdout.contains("umount"),
            "{shell}"
        );
    }
    run(&["completions", "tcsh"]).code(2, "an unknown shell");
}
