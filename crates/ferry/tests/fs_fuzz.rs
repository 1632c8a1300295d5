//! Differential fuzzer: the same random operation sequence runs on the
//! mount and on a reference directory on the root file system (ext4); every
//! result (value or errno) must match, and so must the whole trees (names,
//! types, modes, sizes, link counts, hard-link groups, bytes, symlink
//! targets, user xattrs), checked every `COMPARE_EVERY` ops, at the end, and
//! (on ferry) again after an unmount and remount; every `REMOUNT_EVERY` ops
//! the daemon is restarted mid-sequence (all descriptors closed first).
//!
//! Deterministic given the seed: operations are drawn from the seed alone,
//! never from results, so a printed seed and op count replay a failure.
//!
//! CI: `cargo test -p ferry --test fs_fuzz` (seed 1, 4,000 ops).
//! Long local run: `FERRY_FUZZ_OPS=100000 FERRY_FUZZ_SEED=$RANDOM cargo test
//! -p ferry --release --test fs_fuzz -- --nocapture`.

mod support;

use std::collections::BTreeMap;

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use support::tree::{describe_meta, digest, tree_diff, user_names};
use support::{errno, sys, Mount, Rng, TempDir};

/// Open descriptors each side keeps; slots are shared by index.
const SLOTS: usize = 4;
/// How often the whole trees are compared.
const COMPARE_EVERY: usize = 250;
/// How often (ferry only) all fds are closed and the daemon restarted.
const REMOUNT_EVERY: usize = 1000;
/// How many ops of history a failure report shows.
const TAIL: usize = 400;

/// One operation, with every argument drawn up front.
#[derive(Clone, Debug)]
enum Op {
    Open {
        path: String,
        flags: i32,
        mode: u32,
        slot: usize,
    },
    Close {
        slot: usize,
    },
    Write {
        slot: usize,
        len: usize,
        seed: u64,
    },
    Pwrite {
        slot: usize,
        off: i64,
        len: usize,
        seed: u64,
    },
    Read {
        slot: usize,
        len: usize,
    },
    Pread {
        slot: usize,
        off: i64,
        len: usize,
    },
    Seek {
        slot: usize,
        off: i64,
        end: bool,
    },
    Ftruncate {
        slot: usize,
        len: i64,
    },
    Fsync {
        slot: usize,
    },
    MmapWrite {
        slot: usize,
        off: u64,
        len: usize,
        seed: u64,
    },
    Fallocate {
        slot: usize,
        mode: i32,
        off: i64,
        len: i64,
    },
    Truncate {
        path: String,
        len: i64,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Readlink {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Setxattr {
        path: String,
        name: String,
        len: usize,
        seed: u64,
        flags: i32,
    },
    Getxattr {
        path: String,
        name: String,
    },
    Removexattr {
        path: String,
        name: String,
    },
    Listxattr {
        path: String,
    },
    Stat {
        path: String,
    },
    Readdir {
        path: String,
    },
}

/// What an op returned, in a form both sides produce identically.
type Outcome = Result<String, i32>;

/// Last components for directories and for files overlap only partly, so
/// most creates succeed while type clashes (EISDIR, ENOTDIR, EEXIST) still
/// come up.
const DIR_NAMES: [&str; 3] = ["a", "b", "c"];
const FILE_NAMES: [&str; 4] = ["c", "d", "e", "f"];

/// A path of 1–3 components: intermediate ones are directory names.
fn gen_path_ending(rng: &mut Rng, last: &[&str]) -> String {
    let depth = match rng.below(100) {
        0..=59 => 1,
        60..=89 => 2,
        _ => 3,
    };
    let mut parts: Vec<&str> = (1..depth).map(|_| *rng.pick(&DIR_NAMES)).collect();
    parts.push(*rng.pick(last));
    parts.join("/")
}

/// A path whose last component may name a file or a directory.
fn gen_path(rng: &mut Rng) -> String {
    if rng.chance(50) {
        gen_path_ending(rng, &DIR_NAMES)
    } else {
        gen_path_ending(rng, &FILE_NAMES)
    }
}

/// A path that names a file more often than not.
fn gen_file(rng: &mut Rng) -> String {
    if rng.chance(85) {
        gen_path_ending(rng, &FILE_NAMES)
    } else {
        gen_path_ending(rng, &DIR_NAMES)
    }
}

/// A path that names a directory more often than not.
fn gen_dir(rng: &mut Rng) -> String {
    if rng.chance(85) {
        gen_path_ending(rng, &DIR_NAMES)
    } else {
        gen_path_ending(rng, &FILE_NAMES)
    }
}

fn gen_offset(rng: &mut Rng) -> i64 {
    match rng.below(6) {
        0 => 0,
        1 => rng.below(20_000) as i64,
        2 => *rng.pick(&[4095, 4096, 4097, 65535, 65536, 131_072]),
        3 => (1 << 20) + rng.below(100_000) as i64,
        4 => rng.below(2 << 20) as i64,
        _ => rng.below(300) as i64,
    }
}

fn gen_len(rng: &mut Rng) -> usize {
    match rng.below(4) {
        0 => rng.below(16) as usize,
        1 => rng.below(4097) as usize,
        2 => rng.below(70_000) as usize,
        _ => rng.below(512) as usize,
    }
}

fn gen_op(rng: &mut Rng) -> Op {
    let slot = rng.below(SLOTS as u64) as usize;
    match rng.below(100) {
        0..=15 => {
            let mut flags = *rng.pick(&[
                libc::O_RDONLY,
                libc::O_WRONLY,
                libc::O_RDWR,
                libc::O_RDWR,
                libc::O_RDWR,
            ]);
            for (pct, f) in [
                (85, libc::O_CREAT),
                (10, libc::O_EXCL),
                (12, libc::O_TRUNC),
                (15, libc::O_APPEND),
            ] {
                if rng.chance(pct) {
                    flags |= f;
                }
            }
            if rng.chance(4) {
                flags |= libc::O_DIRECTORY;
            }
            let mode = *rng.pick(&[0o644, 0o600, 0o755, 0o444]);
            Op::Open {
                path: gen_file(rng),
                flags,
                mode,
                slot,
            }
        }
        16..=17 => Op::Close { slot },
        18..=24 => Op::Write {
            slot,
            len: gen_len(rng),
            seed: rng.next_u64(),
        },
        25..=31 => Op::Pwrite {
            slot,
            off: gen_offset(rng),
            len: gen_len(rng),
            seed: rng.next_u64(),
        },
        32..=34 => Op::Read {
            slot,
            len: gen_len(rng),
        },
        35..=37 => Op::Pread {
            slot,
            off: gen_offset(rng),
            len: gen_len(rng),
        },
        38..=39 => Op::Seek {
            slot,
            off: gen_offset(rng),
            end: rng.chance(30),
        },
        40..=42 => Op::Ftruncate {
            slot,
            len: gen_offset(rng),
        },
        43..=44 => Op::Fsync { slot },
        45..=47 => Op::MmapWrite {
            slot,
            off: rng.next_u64(),
            len: gen_len(rng),
            seed: rng.next_u64(),
        },
        48..=49 => {
            let mode = *rng.pick(&[
                0,
                libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ]);
            Op::Fallocate {
                slot,
                mode,
                off: gen_offset(rng),
                len: 1 + rng.below(65_536) as i64,
            }
        }
        50..=51 => Op::Truncate {
            path: gen_file(rng),
            len: gen_offset(rng),
        },
        52..=58 => {
            let flags = match rng.below(10) {
                0 => libc::RENAME_NOREPLACE,
                1 => libc::RENAME_EXCHANGE,
                _ => 0,
            };
            // Mostly file onto file or dir onto dir, so the namespace does
            // not fill up with directories under file names.
            let pick: fn(&mut Rng) -> String = match rng.below(10) {
                0..=5 => gen_file,
                6..=8 => gen_dir,
                _ => gen_path,
            };
            Op::Rename {
                from: pick(rng),
                to: pick(rng),
                flags,
            }
        }
        59..=61 => Op::Link {
            from: gen_file(rng),
            to: gen_file(rng),
        },
        62..=66 => Op::Unlink {
            path: gen_file(rng),
        },
        67..=72 => Op::Mkdir {
            path: gen_dir(rng),
            mode: *rng.pick(&[0o755, 0o700, 0o777]),
        },
        73..=75 => Op::Rmdir { path: gen_dir(rng) },
        76..=78 => {
            // Relative targets without "..": they can never leave the root.
            let target = rng.pick(&["a", "c", "d", "a/d", "b/e", "zz"]).to_string();
            Op::Symlink {
                target,
                path: gen_file(rng),
            }
        }
        79 => Op::Readlink {
            path: gen_path(rng),
        },
        80..=82 => {
            let mode = *rng.pick(&[0o644, 0o600, 0o755, 0o700, 0o444, 0o4755, 0o2755, 0o1777]);
            Op::Chmod {
                path: gen_path(rng),
                mode,
            }
        }
        83..=86 => Op::Setxattr {
            path: gen_path(rng),
            name: rng.pick(&["user.a", "user.b", "user.c"]).to_string(),
            len: rng.below(200) as usize,
            seed: rng.next_u64(),
            flags: *rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]),
        },
        87..=88 => Op::Getxattr {
            path: gen_path(rng),
            name: rng.pick(&["user.a", "user.b"]).to_string(),
        },
        89 => Op::Removexattr {
            path: gen_path(rng),
            name: rng.pick(&["user.a", "user.b"]).to_string(),
        },
        90 => Op::Listxattr {
            path: gen_path(rng),
        },
        91..=95 => Op::Stat {
            path: gen_path(rng),
        },
        _ => Op::Readdir {
            path: rng.pick(&[".", "a", "b", "a/b", "c"]).to_string(),
        },
    }
}

/// One of the two trees under test, with its open descriptors.
struct Side {
    root: PathBuf,
    fds: Vec<Option<File>>,
}

/// A file descriptor or an invalid one, so a closed slot gives EBADF on
/// both sides through the real syscall.
struct Slot(i32);
impl std::os::fd::AsRawFd for Slot {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

impl Side {
    fn new(root: &Path) -> Side {
        Side {
            root: root.to_path_buf(),
            fds: (0..SLOTS).map(|_| None).collect(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn fd(&self, slot: usize) -> Slot {
        use std::os::fd::AsRawFd;
        Slot(self.fds[slot].as_ref().map_or(-1, |f| f.as_raw_fd()))
    }

    fn file(&mut self, slot: usize) -> Result<&mut File, i32> {
        self.fds[slot].as_mut().ok_or(libc::EBADF)
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        let unit =
            |r: std::io::Result<()>| r.map(|()| String::new()).map_err(|e| errno::<()>(Err(e)));
        let err = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
        match op {
            Op::Open {
                path,
                flags,
                mode,
                slot,
            } => {
                self.fds[*slot] = None;
                let f = sys::open(&self.p(path), *flags, *mode).map_err(err)?;
                self.fds[*slot] = Some(f);
                Ok(String::new())
            }
            Op::Close { slot } => self.fds[*slot]
                .take()
                .map(|_| String::new())
                .ok_or(libc::EBADF),
            Op::Write { slot, len, seed } => {
                let data = Rng::new(*seed).bytes(*len);
                let n = self.file(*slot)?.write(&data).map_err(err)?;
                Ok(n.to_string())
            }
            Op::Pwrite {
                slot,
                off,
                len,
                seed,
            } => {
                let data = Rng::new(*seed).bytes(*len);
                sys::pwrite(&self.fd(*slot), &data, *off)
                    .map(|n| n.to_string())
                    .map_err(err)
            }
            Op::Read { slot, len } => {
                let mut buf = vec![0; *len];
                let f = self.file(*slot)?;
                let n = f.read(&mut buf).map_err(err)?;
                Ok(digest(&buf[..n]))
            }
            Op::Pread { slot, off, len } => sys::pread(&self.fd(*slot), *len, *off)
                .map(|d| digest(&d))
                .map_err(err),
            Op::Seek { slot, off, end } => {
                // A directory's offsets are cookies each file system picks
                // (ext4's end is a hash-space sentinel): nothing to compare.
                if self.file(*slot)?.metadata().map_err(err)?.is_dir() {
                    return Ok("directory".into());
                }
                let to = if *end {
                    SeekFrom::End(-(*off % 5000))
                } else {
                    SeekFrom::Start(*off as u64)
                };
                self.file(*slot)?
                    .seek(to)
                    .map(|p| p.to_string())
                    .map_err(err)
            }
            Op::Ftruncate { slot, len } => unit(sys::ftruncate(&self.fd(*slot), *len)),
            Op::Fsync { slot } => unit(self.file(*slot)?.sync_all()),
            Op::MmapWrite {
                slot,
                off,
                len,
                seed,
            } => {
                let size = self.file(*slot)?.metadata().map_err(err)?.len();
                if size == 0 || *len == 0 {
                    return Ok(format!("size {size}"));
                }
                // Stay inside the file: touching a page past EOF is SIGBUS.
                let start = off % size;
                let len = (*len as u64).min(size - start);
                let map_off = start & !4095;
                let mut map = sys::Mapping::shared(
                    &self.fd(*slot),
                    (start + len - map_off) as usize,
                    map_off as i64,
                )
                .map_err(err)?;
                let at = (start - map_off) as usize;
                map.bytes()[at..at + len as usize]
                    .copy_from_slice(&Rng::new(*seed).bytes(len as usize));
                map.sync().map_err(err)?;
                Ok(format!("size {size}"))
            }
            Op::Fallocate {
                slot,
                mode,
                off,
                len,
            } => unit(sys::fallocate(&self.fd(*slot), *mode, *off, *len)),
            Op::Truncate { path, len } => unit(sys::truncate(&self.p(path), *len)),
            Op::Rename { from, to, flags } => {
                unit(sys::renameat2(&self.p(from), &self.p(to), *flags))
            }
            Op::Link { from, to } => unit(fs::hard_link(self.p(from), self.p(to))),
            Op::Unlink { path } => unit(fs::remove_file(self.p(path))),
            Op::Mkdir { path, mode } => unit(sys::mkdir(&self.p(path), *mode)),
            Op::Rmdir { path } => unit(fs::remove_dir(self.p(path))),
            Op::Symlink { target, path } => unit(symlink(target, self.p(path))),
            Op::Readlink { path } => fs::read_link(self.p(path))
                .map(|t| t.display().to_string())
                .map_err(err),
            Op::Chmod { path, mode } => unit(sys::chmod(&self.p(path), *mode)),
            Op::Setxattr {
                path,
                name,
                len,
                seed,
                flags,
            } => unit(sys::setxattr(
                &self.p(path),
                name,
                &Rng::new(*seed).bytes(*len),
                *flags,
            )),
            Op::Getxattr { path, name } => sys::getxattr(&self.p(path), name, 1024)
                .map(|v| digest(&v))
                .map_err(err),
            Op::Removexattr { path, name } => unit(sys::removexattr(&self.p(path), name)),
            Op::Listxattr { path } => sys::listxattr(&self.p(path), 4096)
                .map(|n| user_names(n).join(","))
                .map_err(err),
            Op::Stat { path } => fs::symlink_metadata(self.p(path))
                .map(|m| describe_meta(&m))
                .map_err(err),
            Op::Readdir { path } => {
                let mut names: Vec<String> = fs::read_dir(self.p(path))
                    .map_err(err)?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(err)?;
                names.sort();
                Ok(names.join(","))
            }
        }
    }
}

/// Panics with everything needed to replay: seed, op index, the ops before.
fn fail(seed: u64, index: usize, ops: &[Op], what: String) -> ! {
    let from = ops.len().saturating_sub(TAIL);
    let tail: Vec<String> = ops[from..]
        .iter()
        .enumerate()
        .map(|(i, op)| format!("  #{}: {op:?}", from + i))
        .collect();
    panic!(
        "fuzz mismatch at op #{index} (seed {seed}): {what}\nlast {} ops:\n{}\nreplay: FERRY_FUZZ_SEED={seed} FERRY_FUZZ_OPS={}",
        tail.len(),
        tail.join("\n"),
        index + 1
    );
}

fn run(seed: u64, count: usize, options: &str) {
    let mut mount = Mount::with(support::Target::from_env(), options);
    let reference = TempDir::new("ferry-fuzz-ref");
    let mut rng = Rng::new(seed);
    let (mut a, mut b) = (Side::new(mount.path()), Side::new(reference.path()));
    let mut ops = Vec::with_capacity(count);
    // Successes per op kind: a run where nearly everything fails is no test.
    let mut ok: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    eprintln!(
        "fuzz: seed {seed}, {count} ops, target {}",
        mount.target().name()
    );
    for i in 0..count {
        let op = gen_op(&mut rng);
        ops.push(op.clone());
        let (ra, rb) = (a.apply(&op), b.apply(&op));
        if ra != rb {
            fail(
                seed,
                i,
                &ops,
                format!("mount gave {ra:?}, reference gave {rb:?}"),
            );
        }
        let kind = format!("{op:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or("")
            .to_string();
        let e = ok.entry(kind).or_default();
        e.0 += ra.is_ok() as u32;
        e.1 += 1;
        // Now and then (at fixed indices, so replay stays exact): close all
        // descriptors on both sides and restart the daemon, so later ops
        // run against what ferry persisted rather than what it cached.
        if (i + 1) % REMOUNT_EVERY == 0 && !mount.is_raw() && i + 1 < count {
            a.fds.iter_mut().for_each(|f| *f = None);
            b.fds.iter_mut().for_each(|f| *f = None);
            mount.unmount();
            mount.remount();
        }
        if (i + 1) % COMPARE_EVERY == 0 || i + 1 == count {
            let diffs = tree_diff(mount.path(), reference.path());
            if !diffs.is_empty() {
                fail(
                    seed,
                    i,
                    &ops,
                    format!("trees differ:\n{}", diffs.join("\n")),
                );
            }
        }
    }
    let stats: Vec<String> = ok
        .iter()
        .map(|(k, (n, t))| format!("{k} {n}/{t}"))
        .collect();
    eprintln!("fuzz: succeeded/attempted: {}", stats.join(", "));
    let total_ok: u32 = ok.values().map(|v| v.0).sum();
    assert!(
        total_ok as usize * 4 > count,
        "under 25% of ops succeeded: the generator needs tuning"
    );
    // What was there must still be there after a clean unmount and remount.
    drop((a, b));
    if !mount.is_raw() {
        mount.unmount();
        mount.remount();
        let diffs = tree_diff(mount.path(), reference.path());
        if !diffs.is_empty() {
            fail(
                seed,
                count,
                &ops,
                format!("trees differ after remount:\n{}", diffs.join("\n")),
            );
        }
    }
}

#[test]
fn random_ops_match_reference_dir() {
    let seed = support::env_u64("FERRY_FUZZ_SEED", 1);
    let count = support::env_u64("FERRY_FUZZ_OPS", 4000) as usize;
    run(seed, count, support::DEFAULT_OPTIONS);
}

/// The same through the writeback cache, the path an unprivileged daemon
/// takes (CI runs as root, where open files are passed through instead).
#[test]
fn random_ops_match_reference_dir_through_the_writeback_cache() {
    let seed = support::env_u64("FERRY_FUZZ_SEED", 2);
    let count = support::env_u64("FERRY_FUZZ_OPS", 4000) as usize;
    run(
        seed,
        count,
        &format!("{},nopassthrough", support::DEFAULT_OPTIONS),
    );
}

/// The generator must depend only on the seed, or printed seeds replay
/// nothing.
#[test]
fn generator_is_deterministic() {
    let draw = |seed| {
        let mut rng = Rng::new(seed);
        (0..500)
            .map(|_| format!("{:?}", gen_op(&mut rng)))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
}

/// The tree comparison must notice each kind of difference it claims to
/// check, or a silent bug would pass the fuzzer's periodic compares.
#[test]
fn tree_diff_sees_every_kind_of_difference() {
    type Tweak = fn(&Path);
    let base = |d: &Path| {
        fs::create_dir(d.join("dir")).unwrap();
        fs::write(d.join("dir/f"), b"content").unwrap();
        fs::hard_link(d.join("dir/f"), d.join("g")).unwrap();
        symlink("dir/f", d.join("l")).unwrap();
        sys::setxattr(&d.join("dir/f"), "user.k", b"v", 0).unwrap();
    };
    let tweaks: [(&str, Tweak); 7] = [
        ("byte", |d| fs::write(d.join("dir/f"), b"contenT").unwrap()),
        ("mode", |d| sys::chmod(&d.join("dir"), 0o700).unwrap()),
        ("xattr", |d| {
            sys::setxattr(&d.join("g"), "user.k", b"w", 0).unwrap()
        }),
        ("symlink target", |d| {
            fs::remove_file(d.join("l")).unwrap();
            symlink("dir/g", d.join("l")).unwrap();
        }),
        ("extra name", |d| fs::write(d.join("dir/new"), b"").unwrap()),
        ("link group", |d| {
            fs::remove_file(d.join("g")).unwrap();
            fs::write(d.join("g"), b"content").unwrap();
            sys::setxattr(&d.join("g"), "user.k", b"v", 0).unwrap();
        }),
        ("type", |d| {
            fs::remove_file(d.join("l")).unwrap();
            fs::write(d.join("l"), b"dir/f").unwrap();
        }),
    ];
    for (what, tweak) in tweaks {
        let (a, b) = (TempDir::new("ferry-fuzz-a"), TempDir::new("ferry-fuzz-b"));
        base(a.path());
        base(b.path());
        assert!(
            tree_diff(a.path(), b.path()).is_empty(),
            "identical trees differ"
        );
        tweak(b.path());
        assert!(
            !tree_diff(a.path(), b.path()).is_empty(),
            "{what} difference not seen"
        );
    }
}
