//! FUSE over io_uring (`-o io_uring`, issue 12): the mount really serves
//! through the rings (the daemon's log and its threads say so), does real
//! work correctly on them (random operations against a reference directory,
//! byte for byte, through passthrough and through the rings' payload
//! buffers; concurrent writers on both CPUs, threads and processes; large
//! files), unmounts in bounded time idle and busy, and falls back to
//! `/dev/fuse` when the kernel does not offer the rings.
//!
//! The kernel offers FUSE over io_uring only with the `fuse` module's
//! `enable_uring` parameter set (Linux 6.14+, root). Each test sets it as it
//! needs and puts the old value back when it ends, also on failure; the
//! tests of this file take turns, since the parameter is global. Without the
//! parameter (an older kernel) every test here skips with a printed reason.
//!
//! `cargo test --release -p ferry --test fs_uring` (about 20 s).

mod support;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use support::tree::{describe_meta, digest, tree_diff};
use support::{errno, sys, Forked, Mount, Rng, TempDir, DEFAULT_OPTIONS};

/// The `fuse` module parameter that makes the kernel offer the rings.
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// What the daemon's mount line says when the rings serve.
const RING_LOG: &str = "transport io_uring";

/// Turns for the tests of this file: `enable_uring` is one global value.
static TURN: Mutex<()> = Mutex::new(());

/// `enable_uring` held at a value for one test; the old value is put back
/// on drop (declare it before the mount, so the mount goes first).
struct UringParam {
    old: String,
    _turn: MutexGuard<'static, ()>,
}

impl UringParam {
    /// Takes this file's turn and sets the parameter; `None` (with the
    /// reason printed) when the test cannot run here.
    fn set(on: bool) -> Option<UringParam> {
        if support::skip_unless_ferry("FUSE over io_uring") {
            return None;
        }
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let old = match fs::read_to_string(ENABLE_URING) {
            Ok(v) => v.trim().to_string(),
            Err(e) => {
                eprintln!("SKIP: {ENABLE_URING}: {e} (a kernel without FUSE over io_uring)");
                return None;
            }
        };
        let param = UringParam { old, _turn: turn };
        param.write(on);
        Some(param)
    }

    fn write(&self, on: bool) {
        fs::write(ENABLE_URING, if on { "Y" } else { "N" })
            .unwrap_or_else(|e| panic!("setting {ENABLE_URING}: {e}"));
    }
}

impl Drop for UringParam {
    fn drop(&mut self) {
        if let Err(e) = fs::write(ENABLE_URING, &self.old) {
            eprintln!("putting {ENABLE_URING} back to {}: {e}", self.old);
        }
    }
}

/// The daemon's log once it has logged its mount line `count` times (it
/// does so just after the mount appears), or after 5 s.
fn mount_log(mount: &Mount, count: usize) -> String {
    support::poll_until(Duration::from_secs(5), || {
        mount.daemon_log().matches("transport ").count() >= count
    });
    mount.daemon_log()
}

/// A ferry mount with `-o io_uring` (plus `extra`), checked to be served by
/// the rings.
fn ring_mount(extra: &str) -> Mount {
    mount_saying(&format!(",io_uring{extra}"), RING_LOG)
}

/// A ferry mount with the default options plus `options`, whose log says
/// `says` of how it serves the kernel.
fn mount_saying(options: &str, says: &str) -> Mount {
    let mount = Mount::with(
        support::Target::Ferry,
        &format!("{DEFAULT_OPTIONS}{options}"),
    );
    let log = mount_log(&mount, 1);
    assert!(
        log.contains(says),
        "{options:?}: the log does not say {says:?}:\n{log}"
    );
    mount
}

/// The pid of the daemon serving `mnt` (its command line names it).
fn daemon_pid(mnt: &Path) -> u32 {
    let mnt = mnt.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.contains(&b"mount".as_slice()) && args.contains(&mnt)
        })
        .unwrap_or_else(|| panic!("no daemon serving {}", String::from_utf8_lossy(mnt)))
}

/// Voluntary context switches of the daemon's ring threads and of its
/// `/dev/fuse` threads: each request a thread waits for is one.
fn switches(pid: u32) -> (u64, u64) {
    let (mut ring, mut dev) = (0, 0);
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("daemon tasks") {
        let task = task.expect("task").path();
        let comm = fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = fs::read_to_string(task.join("status")).unwrap_or_default();
        let n: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        match comm.trim() {
            c if c.starts_with("fuser-ring-") => ring += n,
            c if c.starts_with("fuser-") => dev += n,
            _ => {}
        }
    }
    (ring, dev)
}

/// Asserts that requests reach the daemon through its rings: 400
/// `getxattr` round trips (nothing caches a missing xattr) wake the ring
/// threads, not the `/dev/fuse` ones.
fn assert_ring_serves(mount: &Mount) {
    let pid = daemon_pid(mount.path());
    let probe = mount.join("probe");
    fs::write(&probe, b"x").expect("write probe");
    let before = switches(pid);
    for _ in 0..400 {
        assert_eq!(errno(sys::getxattr(&probe, "user.none", 64)), libc::ENODATA);
    }
    let after = switches(pid);
    let (ring, dev) = (after.0 - before.0, after.1 - before.1);
    assert!(
        ring >= 200 && dev < 50,
        "400 round trips woke the ring threads {ring} times and the /dev/fuse threads {dev} times"
    );
    fs::remove_file(&probe).expect("remove probe");
}

/// Pins the calling thread to `cpu`, so requests come from that CPU's ring.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
    // sched_setaffinity only read and write that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------------------
// Differential random operations.

/// Names the operations draw from: few, so they collide often.
const NAMES: &[&str] = &[
    "a", "b", "c", "d0/a", "d0/b", "d1/a", "d0/e/a", "d0", "d1", "d0/e",
];

/// The directories among them, so `mkdir` succeeds often enough.
const DIRS: &[&str] = &["d0", "d1", "d0/e"];

/// One operation, every argument drawn up front from the seed.
#[derive(Clone, Debug)]
enum Op {
    Write {
        path: &'static str,
        len: usize,
        seed: u64,
        append: bool,
    },
    Pwrite {
        path: &'static str,
        off: u64,
        len: usize,
        seed: u64,
    },
    Read {
        path: &'static str,
    },
    Truncate {
        path: &'static str,
        len: i64,
    },
    Rename {
        from: &'static str,
        to: &'static str,
    },
    Unlink {
        path: &'static str,
    },
    Mkdir {
        path: &'static str,
    },
    Rmdir {
        path: &'static str,
    },
    Symlink {
        path: &'static str,
        target: &'static str,
    },
    Link {
        from: &'static str,
        to: &'static str,
    },
    SetXattr {
        path: &'static str,
        seed: u64,
    },
    Chmod {
        path: &'static str,
        mode: u32,
    },
    Stat {
        path: &'static str,
    },
    List {
        path: &'static str,
    },
}

fn gen_op(rng: &mut Rng) -> Op {
    let path = *rng.pick(NAMES);
    let other = *rng.pick(NAMES);
    // Mostly small, sometimes past one FUSE request's 128 KiB.
    let len = match rng.below(10) {
        0 => 300_000 + rng.below(200_000) as usize,
        1..=3 => rng.below(20_000) as usize,
        _ => rng.below(600) as usize,
    };
    let seed = rng.next_u64();
    match rng.below(20) {
        0..=3 => Op::Write {
            path,
            len,
            seed,
            append: rng.chance(30),
        },
        4 | 5 => Op::Pwrite {
            path,
            off: rng.below(400_000),
            len,
            seed,
        },
        6 | 7 => Op::Read { path },
        8 => Op::Truncate {
            path,
            len: rng.below(300_000) as i64,
        },
        9 | 10 => Op::Rename {
            from: path,
            to: other,
        },
        11 => Op::Unlink { path },
        12 => Op::Mkdir {
            path: DIRS[rng.below(DIRS.len() as u64) as usize],
        },
        13 => Op::Rmdir { path },
        14 => Op::Symlink {
            path,
            target: other,
        },
        15 => Op::Link {
            from: path,
            to: other,
        },
        16 => Op::SetXattr { path, seed },
        17 => Op::Chmod {
            path,
            mode: 0o600 | (rng.below(0o200) as u32),
        },
        18 => Op::Stat { path },
        _ => Op::List { path },
    }
}

/// A result both sides must agree on: a value, or an errno.
type Outcome = Result<String, i32>;

fn apply(root: &Path, op: &Op) -> Outcome {
    let p = |rel: &str| root.join(rel);
    let err = |e: io::Error| e.raw_os_error().unwrap_or(-1);
    let done = |r: io::Result<()>| r.map(|()| String::new()).map_err(err);
    match op {
        Op::Write {
            path,
            len,
            seed,
            append,
        } => {
            let mode = if *append {
                libc::O_APPEND
            } else {
                libc::O_TRUNC
            };
            let mut f =
                sys::open(&p(path), libc::O_CREAT | libc::O_WRONLY | mode, 0o644).map_err(err)?;
            f.write_all(&Rng::new(*seed).bytes(*len)).map_err(err)?;
            Ok(String::new())
        }
        Op::Pwrite {
            path,
            off,
            len,
            seed,
        } => {
            let f = sys::open(&p(path), libc::O_WRONLY, 0).map_err(err)?;
            let data = Rng::new(*seed).bytes(*len);
            sys::pwrite(&f, &data, *off as i64)
                .map(|n| n.to_string())
                .map_err(err)
        }
        Op::Read { path } => {
            let mut data = Vec::new();
            File::open(p(path))
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(err)?;
            Ok(digest(&data))
        }
        Op::Truncate { path, len } => done(sys::truncate(&p(path), *len)),
        Op::Rename { from, to } => done(fs::rename(p(from), p(to))),
        Op::Unlink { path } => done(fs::remove_file(p(path))),
        Op::Mkdir { path } => done(sys::mkdir(&p(path), 0o755)),
        Op::Rmdir { path } => done(fs::remove_dir(p(path))),
        Op::Symlink { path, target } => done(symlink(target, p(path))),
        Op::Link { from, to } => done(fs::hard_link(p(from), p(to))),
        Op::SetXattr { path, seed } => {
            let value = Rng::new(*seed).bytes(*seed as usize % 300);
            done(sys::setxattr(&p(path), "user.t", &value, 0))
        }
        Op::Chmod { path, mode } => done(sys::chmod(&p(path), *mode)),
        Op::Stat { path } => fs::symlink_metadata(p(path))
            .map(|m| describe_meta(&m))
            .map_err(err),
        Op::List { path } => {
            let mut names: Vec<String> = fs::read_dir(p(path))
                .map_err(err)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<_>>()
                .map_err(err)?;
            names.sort();
            Ok(names.join(","))
        }
    }
}

/// Runs `count` random operations on a ring mount (`-o io_uring` plus
/// `extra`) and on a directory of the root file system: every result must
/// match, and so must the trees, every 200 operations, at the end and after
/// an unmount and remount.
fn differential(extra: &str, seed: u64, count: usize) {
    let Some(_param) = UringParam::set(true) else {
        return;
    };
    let mut mount = ring_mount(extra);
    assert_ring_serves(&mount);
    let reference = TempDir::new("ferry-uring-ref");
    let mut rng = Rng::new(seed);
    let mut history = Vec::new();
    let mut succeeded = 0;
    for i in 0..count {
        let op = gen_op(&mut rng);
        let (got, want) = (apply(mount.path(), &op), apply(reference.path(), &op));
        history.push(format!("{i}: {op:?} -> {want:?}"));
        let tail = || history[history.len().saturating_sub(30)..].join("\n");
        assert_eq!(
            got,
            want,
            "seed {seed}, op {i} {op:?}; last ops:\n{}",
            tail()
        );
        succeeded += usize::from(got.is_ok());
        if (i + 1) % 200 == 0 || i + 1 == count {
            let diffs = tree_diff(mount.path(), reference.path());
            assert!(
                diffs.is_empty(),
                "seed {seed}, after op {i}:\n{}\n{}",
                diffs.join("\n"),
                tail()
            );
        }
    }
    assert!(
        succeeded * 4 > count,
        "only {succeeded} of {count} operations succeeded"
    );
    mount.unmount();
    mount.remount();
    let log = mount_log(&mount, 2);
    assert_eq!(log.matches(RING_LOG).count(), 2, "{log}");
    let diffs = tree_diff(mount.path(), reference.path());
    assert!(
        diffs.is_empty(),
        "seed {seed}, after remount:\n{}",
        diffs.join("\n")
    );
}

/// Passthrough on (the default as root): metadata through the rings, file
/// data straight to the data files.
#[test]
fn random_ops_match_a_reference_dir() {
    differential("", support::env_u64("FERRY_URING_SEED", 1), 1500);
}

/// Passthrough off: reads and writes (up to 1 MiB each) travel through the
/// rings' payload buffers too.
#[test]
fn random_ops_match_a_reference_dir_without_passthrough() {
    differential(
        ",nopassthrough",
        support::env_u64("FERRY_URING_SEED", 2),
        1500,
    );
}

// ---------------------------------------------------------------------------
// Concurrency, large files, unmount, fallback.

/// What writer `w` puts in its file `i`: distinct bytes per writer and file.
fn content(w: u64, i: u64) -> Vec<u8> {
    Rng::new(w << 32 | i).bytes(1 + (w * 7919 + i * 104_729) as usize % 20_000)
}

/// Writer `w`'s work: files of its own in `dir`, each written, renamed into
/// `shared` and read back, plus a log it appends a record to per file.
fn write_files(w: u64, dir: &Path, shared: &Path, files: u64) -> io::Result<()> {
    let own = dir.join(format!("w{w}"));
    fs::create_dir(&own)?;
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(own.join("log"))?;
    for i in 0..files {
        let tmp = own.join(format!("tmp{i}"));
        fs::write(&tmp, content(w, i))?;
        let name = shared.join(format!("w{w}-{i}"));
        fs::rename(&tmp, &name)?;
        if fs::read(&name)? != content(w, i) {
            return Err(io::Error::from_raw_os_error(libc::EBADMSG));
        }
        log.write_all(format!("{w} {i}\n").as_bytes())?;
    }
    Ok(())
}

/// Four threads and two processes, spread over the CPUs (so over both
/// rings), create, rename, append and read back at once; afterwards every
/// byte is where it belongs.
#[test]
fn concurrent_writers_on_every_ring() {
    let Some(_param) = UringParam::set(true) else {
        return;
    };
    let mount = ring_mount("");
    const FILES: u64 = 150;
    let shared = mount.join("shared");
    fs::create_dir(&shared).expect("mkdir shared");
    let root = mount.path().to_path_buf();
    let threads: Vec<_> = (0..4u64)
        .map(|w| {
            let (root, shared) = (root.clone(), shared.clone());
            thread::spawn(move || {
                pin(w as usize % cpus());
                write_files(w, &root, &shared, FILES)
            })
        })
        .collect();
    let processes: Vec<Forked> = (4..6u64)
        .map(|w| {
            let (root, shared) = (root.clone(), shared.clone());
            Forked::spawn(None, move || {
                pin(w as usize % cpus());
                write_files(w, &root, &shared, FILES)
            })
        })
        .collect();
    for (w, t) in threads.into_iter().enumerate() {
        t.join()
            .expect("writer panicked")
            .unwrap_or_else(|e| panic!("writer {w}: {e}"));
    }
    for (w, p) in processes.into_iter().enumerate() {
        let result = p
            .wait(Duration::from_secs(60))
            .expect("writer process hung");
        assert_eq!(result, Ok(()), "writer process {}", w + 4);
    }
    let mut names: Vec<String> = fs::read_dir(&shared)
        .expect("list shared")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..6)
        .flat_map(|w| (0..FILES).map(move |i| format!("w{w}-{i}")))
        .collect();
    want.sort();
    assert_eq!(names, want);
    for w in 0..6 {
        for i in 0..FILES {
            let got = fs::read(shared.join(format!("w{w}-{i}"))).expect("read");
            assert!(
                got == content(w, i),
                "w{w}-{i}: {} vs {}",
                digest(&got),
                digest(&content(w, i))
            );
        }
        let log = fs::read_to_string(mount.join(&format!("w{w}/log"))).expect("read log");
        let want: String = (0..FILES).map(|i| format!("{w} {i}\n")).collect();
        assert_eq!(log, want, "log of writer {w}");
        assert!(
            fs::read_dir(mount.join(&format!("w{w}")))
                .expect("list")
                .count()
                == 1
        );
    }
}

/// A 64 MiB file written and read back through passthrough, with random
/// reads at random offsets, and 16 MiB through the rings' payload buffers
/// (without passthrough); both byte for byte, also after a remount.
#[test]
fn large_files_with_and_without_passthrough() {
    let Some(_param) = UringParam::set(true) else {
        return;
    };
    for (extra, mib) in [("", 64u64), (",nopassthrough", 16)] {
        let mut mount = ring_mount(extra);
        let log = mount_log(&mount, 1);
        assert_eq!(log.contains("passthrough)"), extra.is_empty(), "{log}");
        let chunk = |i: u64| Rng::new(1000 + i).bytes(1 << 20);
        let path = mount.join("big");
        let mut f = File::create(&path).expect("create big");
        for i in 0..mib {
            f.write_all(&chunk(i)).expect("write big");
        }
        f.sync_all().expect("fsync big");
        drop(f);
        // Uncached 4 KiB reads: through passthrough none reaches the
        // daemon; without, each is a READ through the rings.
        let pid = daemon_pid(mount.path());
        let f = File::open(&path).expect("open big");
        let before = switches(pid).0;
        for k in 0..300u64 {
            // SAFETY: advice on our own open descriptor; no memory involved.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            let off = (k * 7919 % (mib << 8)) << 12;
            let got = sys::pread(&f, 4096, off as i64).expect("pread 4 KiB");
            let at = (off & 0xfffff) as usize;
            assert!(got == chunk(off >> 20)[at..at + 4096], "4 KiB at {off}");
        }
        let woke = switches(pid).0 - before;
        if extra.is_empty() {
            assert!(woke < 60, "passthrough reads woke the rings {woke} times");
        } else {
            assert!(
                woke >= 150,
                "300 uncached reads woke the rings {woke} times"
            );
        }
        drop(f);
        let check = |path: &Path| {
            let mut f = File::open(path).expect("open big");
            let mut buf = vec![0; 1 << 20];
            for i in 0..mib {
                f.read_exact(&mut buf).expect("read big");
                assert!(buf == chunk(i), "MiB {i} differs");
            }
            assert_eq!(f.read(&mut buf).expect("read at end"), 0);
            let mut rng = Rng::new(mib);
            for _ in 0..200 {
                let off = rng.below(mib << 20);
                let len = (rng.below(300_000) as usize).min(((mib << 20) - off) as usize);
                let got = sys::pread(&f, len, off as i64).expect("pread big");
                let (i, at) = (off >> 20, (off & 0xfffff) as usize);
                let mut want = chunk(i)[at..].to_vec();
                want.extend(chunk(i + 1));
                assert!(got == want[..len], "pread {len} at {off}");
            }
        };
        check(&path);
        mount.unmount();
        mount.remount();
        check(&path);
        assert_eq!(fs::metadata(&path).expect("stat big").size(), mib << 20);
    }
}

/// Unmounting an idle ring mount is as quick as a classic one; unmounting
/// (lazily) while four workers keep requests in flight ends the daemon in
/// bounded time once they let go, with every request answered.
#[test]
fn unmount_idle_and_busy_is_bounded() {
    let Some(_param) = UringParam::set(true) else {
        return;
    };
    let mut idle = ring_mount("");
    fs::write(idle.join("f"), b"data").expect("write");
    let started = Instant::now();
    idle.unmount();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle unmount took {:?}",
        started.elapsed()
    );

    let busy = ring_mount(",nopassthrough");
    let pid = daemon_pid(busy.path());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (dir, stop) = (busy.path().to_path_buf(), stop.clone());
            thread::spawn(move || -> io::Result<u64> {
                pin(w % cpus());
                // Descriptors keep the detached file system alive and busy.
                let dir = File::open(dir)?;
                let at =
                    |name: &str| PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()));
                let mut f = sys::open(&at(&format!("w{w}")), libc::O_CREAT | libc::O_RDWR, 0o644)?;
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) {
                    f.write_all(&[w as u8; 8192])?;
                    f.sync_data()?;
                    let name = at(&format!("t{w}-{rounds}"));
                    fs::write(&name, b"x")?;
                    fs::remove_file(&name)?;
                    assert_eq!(errno(sys::getxattr(&name, "user.none", 8)), libc::ENOENT);
                    rounds += 1;
                }
                Ok(rounds)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let detached = support::run_bounded(
        Command::new("umount").arg("-l").arg(busy.path()),
        support::UNMOUNT_TIMEOUT,
    );
    assert!(
        matches!(&detached, Ok(o) if o.status.success()),
        "umount -l: {}",
        support::describe(&detached)
    );
    // Requests keep flowing to the detached file system for a while.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for (w, t) in workers.into_iter().enumerate() {
        let rounds = t
            .join()
            .expect("worker panicked")
            .unwrap_or_else(|e| panic!("worker {w}: {e}"));
        assert!(rounds > 0, "worker {w} did nothing");
    }
    // Exited: a zombie until the mount's Drop reaps it.
    let exited = || match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    };
    let gone = support::poll_until(Duration::from_secs(10), exited);
    assert!(
        gone,
        "the daemon still runs 10 s after its mount was released:\n{}",
        busy.daemon_log()
    );
}

/// With `enable_uring` off, `-o io_uring` mounts anyway, through
/// `/dev/fuse`, and says so; and without `-o io_uring` a mount never uses
/// the rings, even when the kernel offers them.
#[test]
fn falls_back_to_dev_fuse_when_the_kernel_does_not_offer_it() {
    let Some(param) = UringParam::set(false) else {
        return;
    };
    for (options, offered, says) in [
        (
            ",io_uring",
            false,
            "transport /dev/fuse (io_uring asked for, not offered by the kernel)",
        ),
        ("", true, "transport /dev/fuse, 2 threads"),
    ] {
        param.write(offered);
        let mount = mount_saying(options, says);
        fs::write(mount.join("f"), b"through /dev/fuse").expect("write");
        assert_eq!(
            fs::read(mount.join("f")).expect("read"),
            b"through /dev/fuse"
        );
        fs::remove_file(mount.join("f")).expect("unlink");
        let pid = daemon_pid(mount.path());
        let (ring, dev) = switches(pid);
        assert_eq!(ring, 0, "ring threads ran");
        assert!(dev > 0, "no /dev/fuse thread served");
    }
}
