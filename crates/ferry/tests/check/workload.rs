//! The fs worker: a seeded random workload on its own subtree `w{id}` of
//! the mount (and, under a lock, renames in and out of the shared `x/`),
//! applied to the mount and then to a reference directory on the root file
//! system, and journaled.
//!
//! Operations are drawn from the reference's state, which is the mount's
//! state as long as the two agree, so most of them succeed; those that fail
//! must fail alike on both sides. A disagreement while the mount is alive
//! is journaled (`X`) and ends the worker; once the mount has gone (the
//! daemon was killed) the worker just stops, leaving its last operation in
//! flight.
//!
//! Two descriptors per worker stay open for its whole life (an `O_APPEND`
//! log and a file written with pwrite, like a database's; names that
//! nothing renames or removes, so their writes stay visible), two more are
//! opened and closed at random, and writes also go through `MAP_SHARED`
//! mappings, with and without msync. In [`STEADY`] phases a worker only
//! writes through those descriptors, as a log or database does for hours.
//!
//! Ownership keeps the reference exact: only this worker touches `w{id}`;
//! `x/` is touched by renames only, under an flock shared by all workers;
//! and an inode goes to `x/` only if nothing else of this worker can reach
//! it (one link, no open descriptor), so no two workers ever write one file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::journal::{Journal, Token};
use super::workers::{WorkerArgs, EXIT_DIVERGED};
use crate::support::fsimage::Kind;
use crate::support::{sys, Rng};

/// The shared directory, at the mount root.
pub const SHARED: &str = "x";
/// While a file of this name exists in the journal directory, fs workers
/// only write through their open descriptors: the log of changes goes
/// quiet, replication catches up and reads files still open for writing,
/// and the writes after that read are ones the daemon never hears of.
pub const STEADY: &str = "steady";
/// Pause before each operation in steady mode.
const STEADY_PACE: std::time::Duration = std::time::Duration::from_millis(1);
/// Names used at every level, for files and directories alike, so that
/// creates collide with what exists and type clashes come up.
const NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
/// Deepest directory level below `w{id}`.
const MAX_DEPTH: usize = 3;
/// Descriptors a worker may hold open; slots 0 and 1 never close.
const SLOTS: usize = 4;
/// Farthest offset a sparse write or extension reaches.
const FAR: u64 = 5 << 20;
const XATTRS: [&str; 3] = ["user.a", "user.b", "user.c"];
const OWNERS: [(u32, u32); 4] = [(0, 0), (1, 1), (65534, 65534), (1000, 1000)];
const FILE_MODES: [u32; 6] = [0o644, 0o600, 0o755, 0o700, 0o444, 0o640];
const DIR_MODES: [u32; 4] = [0o755, 0o700, 0o750, 0o1777];

/// Side 0 is the mount, side 1 the reference.
const MOUNT: usize = 0;
const REFERENCE: usize = 1;

/// Bytes to write, generated from a seed (so an op prints small).
#[derive(Clone, Copy)]
pub struct Data {
    len: usize,
    seed: u64,
}

impl Data {
    fn gen(rng: &mut Rng) -> Data {
        let max = match rng.below(100) {
            0..=59 => 4096,
            60..=89 => 64 << 10,
            90..=98 => 256 << 10,
            _ => 1536 << 10,
        };
        Data {
            len: rng.below(max + 1) as usize,
            seed: rng.next_u64(),
        }
    }

    /// What a log line or a database page write is: a few KiB, now and
    /// then more.
    fn record(rng: &mut Rng) -> Data {
        let max = if rng.chance(90) { 8 << 10 } else { 64 << 10 };
        Data {
            len: rng.below(max + 1) as usize,
            seed: rng.next_u64(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        Rng::new(self.seed).bytes(self.len)
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.len)
    }
}

/// One operation; paths are relative to the root of either side.
#[derive(Debug)]
pub enum Op {
    Create {
        path: String,
        data: Data,
    },
    Pwrite {
        path: String,
        off: u64,
        data: Data,
    },
    Append {
        path: String,
        data: Data,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Mmap {
        path: String,
        at: u64,
        data: Data,
        msync: bool,
    },
    /// Write a temp file, fsync it, rename it over `path`, fsync the dir.
    Save {
        tmp: String,
        path: String,
        data: Data,
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
    Mkfifo {
        path: String,
    },
    Setxattr {
        path: String,
        name: &'static str,
        data: Data,
    },
    Removexattr {
        path: String,
        name: &'static str,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        owner: (u32, u32),
    },
    Utimens {
        path: String,
        atime: (i64, i64),
        mtime: (i64, i64),
    },
    Fsync {
        path: String,
    },
    /// Opens a long-lived descriptor (created if missing).
    Open {
        slot: usize,
        path: String,
        append: bool,
    },
    /// `pwrite` at `off`, or `write` at the descriptor's position (`None`).
    Write {
        slot: usize,
        off: Option<u64>,
        data: Data,
    },
    Ftruncate {
        slot: usize,
        len: u64,
    },
    MmapFd {
        slot: usize,
        at: u64,
        data: Data,
        msync: bool,
    },
    FsyncFd {
        slot: usize,
    },
    Close {
        slot: usize,
    },
}

/// A long-lived descriptor, open on both sides (each side's is taken out
/// when that side closes it).
struct Handle {
    files: [Option<File>; 2],
    /// The reference inode, which names the file in the journal wherever
    /// it has been renamed to.
    ref_ino: u64,
}

/// One entry of the reference, as the generator sees it.
struct Entry {
    path: String,
    kind: Kind,
    size: u64,
    nlink: u64,
    ino: u64,
    depth: usize,
}

/// The reference's state of the subtrees a worker may touch.
struct View {
    entries: Vec<Entry>,
}

impl View {
    /// Walks `tops` (and includes them) under the reference root.
    fn scan(root: &Path, tops: &[&str]) -> io::Result<View> {
        let mut entries = Vec::new();
        let mut stack: Vec<(String, usize)> = tops.iter().map(|t| (t.to_string(), 0)).collect();
        while let Some((path, depth)) = stack.pop() {
            let m = fs::symlink_metadata(root.join(&path))?;
            let t = m.file_type();
            let kind = if t.is_file() {
                Kind::File
            } else if t.is_dir() {
                Kind::Dir
            } else if t.is_symlink() {
                Kind::Symlink
            } else {
                Kind::Fifo
            };
            if kind == Kind::Dir {
                for e in fs::read_dir(root.join(&path))? {
                    let name = e?.file_name().to_string_lossy().into_owned();
                    stack.push((format!("{path}/{name}"), depth + 1));
                }
            }
            entries.push(Entry {
                path,
                kind,
                size: m.len(),
                nlink: m.nlink(),
                ino: m.ino(),
                depth,
            });
        }
        // Walk order depends on readdir; choices must not.
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(View { entries })
    }

    /// Entries below `top` (not `top` itself) for which `f` holds.
    fn pick<'a>(
        &'a self,
        rng: &mut Rng,
        top: &str,
        f: impl Fn(&Entry) -> bool,
    ) -> Option<&'a Entry> {
        let prefix = format!("{top}/");
        let found: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.path.starts_with(&prefix) && f(e))
            .collect();
        (!found.is_empty()).then(|| found[rng.below(found.len() as u64) as usize])
    }

    /// A directory in `top` (itself included) at most `depth` deep.
    fn dir(&self, rng: &mut Rng, top: &str, depth: usize) -> String {
        let prefix = format!("{top}/");
        let dirs: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| {
                (e.path == top || e.path.starts_with(&prefix))
                    && e.kind == Kind::Dir
                    && e.depth <= depth
            })
            .collect();
        match dirs.len() {
            0 => top.to_string(),
            n => dirs[rng.below(n as u64) as usize].path.clone(),
        }
    }

    /// A name in a directory of `top` (new or not).
    fn name(&self, rng: &mut Rng, top: &str, depth: usize) -> String {
        format!("{}/{}", self.dir(rng, top, depth), rng.pick(&NAMES))
    }

    /// True if moving `path` to the shared area gives another worker
    /// nothing this worker still reaches: every file below it (or it) has
    /// one link and no open descriptor.
    fn exportable(&self, path: &str, open: &[u64]) -> bool {
        let prefix = format!("{path}/");
        self.entries
            .iter()
            .filter(|e| e.path == path || e.path.starts_with(&prefix))
            .all(|e| e.kind != Kind::File || (e.nlink == 1 && !open.contains(&e.ino)))
    }
}

/// Names of the long-lived files (directly in `w{id}`, which never moves).
const LIVE: [&str; 2] = ["live-log", "live-data"];

fn is_live(e: &Entry) -> bool {
    e.path
        .rsplit_once('/')
        .is_some_and(|(_, name)| LIVE.contains(&name))
}

fn is_file(e: &Entry) -> bool {
    e.kind == Kind::File
}

fn not_symlink(e: &Entry) -> bool {
    e.kind == Kind::File || e.kind == Kind::Dir
}

fn time(rng: &mut Rng) -> (i64, i64) {
    (
        1_000_000_000 + rng.below(1_000_000_000) as i64,
        rng.below(1_000_000_000) as i64,
    )
}

/// An offset for a write into a file of `size` bytes: mostly inside or
/// just past it, sometimes far beyond (a hole).
fn offset(rng: &mut Rng, size: u64) -> u64 {
    match rng.below(100) {
        0..=69 => rng.below(size + 4097),
        70..=94 => rng.below(256 << 10),
        _ => rng.below(FAR),
    }
}

/// A length to truncate a file of `size` bytes to.
fn length(rng: &mut Rng, size: u64) -> u64 {
    match rng.below(100) {
        0..=49 => rng.below(size + 1),
        50..=94 => size + rng.below(256 << 10),
        _ => rng.below(FAR),
    }
}

/// Draws the next operation on this worker's own subtree.
fn gen_own(rng: &mut Rng, me: &str, v: &View, handles: &[Option<Handle>]) -> Option<Op> {
    let open: Vec<usize> = (0..SLOTS).filter(|&s| handles[s].is_some()).collect();
    let any_slot = |rng: &mut Rng| (!open.is_empty()).then(|| *rng.pick(&open));
    let file = |rng: &mut Rng| v.pick(rng, me, is_file).map(|e| (e.path.clone(), e.size));
    let any = |rng: &mut Rng| v.pick(rng, me, |_| true).map(|e| e.path.clone());
    // What may be renamed, replaced or removed: not the long-lived files,
    // whose writes must stay visible.
    let movable = |rng: &mut Rng| v.pick(rng, me, |e| !is_live(e)).map(|e| e.path.clone());
    let name = |rng: &mut Rng| v.name(rng, me, MAX_DEPTH);
    Some(match rng.below(1000) {
        0..=89 => Op::Create {
            path: name(rng),
            data: Data::gen(rng),
        },
        90..=169 => {
            let (path, size) = file(rng)?;
            Op::Pwrite {
                path,
                off: offset(rng, size),
                data: Data::gen(rng),
            }
        }
        170..=219 => Op::Append {
            path: file(rng)?.0,
            data: Data::gen(rng),
        },
        220..=269 => {
            let (path, size) = file(rng)?;
            Op::Truncate {
                path,
                len: length(rng, size),
            }
        }
        270..=309 => Op::Mmap {
            path: file(rng)?.0,
            at: rng.next_u64(),
            data: Data::gen(rng),
            msync: rng.chance(50),
        },
        310..=349 => {
            let path = v
                .pick(rng, me, |e| is_file(e) && !is_live(e))
                .map_or_else(|| name(rng), |e| e.path.clone());
            let dir = path.rsplit_once('/').map_or(me, |(d, _)| d);
            Op::Save {
                tmp: format!("{dir}/.tmp"),
                path,
                data: Data::gen(rng),
            }
        }
        350..=439 => {
            let from = movable(rng)?;
            let flags = match rng.below(10) {
                0 => libc::RENAME_NOREPLACE,
                1 => libc::RENAME_EXCHANGE,
                _ => 0,
            };
            // Over an existing entry half the time.
            let to = if rng.chance(50) {
                movable(rng)?
            } else {
                name(rng)
            };
            Op::Rename { from, to, flags }
        }
        440..=479 => Op::Link {
            from: file(rng)?.0,
            to: name(rng),
        },
        480..=529 => Op::Unlink {
            path: v
                .pick(rng, me, |e| e.kind != Kind::Dir && !is_live(e))?
                .path
                .clone(),
        },
        530..=579 => Op::Mkdir {
            path: v.name(rng, me, MAX_DEPTH - 1),
            mode: *rng.pick(&DIR_MODES),
        },
        580..=609 => Op::Rmdir {
            path: v.pick(rng, me, |e| e.kind == Kind::Dir)?.path.clone(),
        },
        610..=639 => Op::Symlink {
            target: rng
                .pick(&["a", "../b/c", "/nonexistent/x", "g/h", ""])
                .to_string(),
            path: name(rng),
        },
        640..=644 => Op::Mkfifo { path: name(rng) },
        645..=684 => {
            let path = v.pick(rng, me, not_symlink)?.path.clone();
            let name = *rng.pick(&XATTRS);
            // Small enough that three fit in one ext4 xattr block.
            let max = if rng.chance(90) { 200 } else { 1000 };
            let data = Data {
                len: rng.below(max) as usize,
                seed: rng.next_u64(),
            };
            Op::Setxattr { path, name, data }
        }
        685..=704 => {
            let path = v.pick(rng, me, not_symlink)?.path.clone();
            let name = *rng.pick(&XATTRS);
            Op::Removexattr { path, name }
        }
        705..=734 => {
            let e = v.pick(rng, me, not_symlink)?;
            let modes: &[u32] = if e.kind == Kind::Dir {
                &DIR_MODES
            } else {
                &FILE_MODES
            };
            Op::Chmod {
                path: e.path.clone(),
                mode: *rng.pick(modes),
            }
        }
        735..=754 => Op::Chown {
            path: any(rng)?,
            owner: *rng.pick(&OWNERS),
        },
        755..=794 => Op::Utimens {
            path: any(rng)?,
            atime: if rng.chance(10) {
                (0, libc::UTIME_OMIT)
            } else {
                time(rng)
            },
            mtime: time(rng),
        },
        795..=814 => Op::Fsync {
            path: v.pick(rng, me, not_symlink)?.path.clone(),
        },
        815..=834 => {
            let slot = 2 + rng.below((SLOTS - 2) as u64) as usize;
            if handles[slot].is_some() {
                Op::Close { slot }
            } else {
                Op::Open {
                    slot,
                    path: file(rng)?.0,
                    append: rng.chance(30),
                }
            }
        }
        915..=929 => {
            let slot = any_slot(rng)?;
            Op::Ftruncate {
                slot,
                len: length(rng, 64 << 10),
            }
        }
        _ => return gen_descriptor(rng, handles),
    })
}

/// Draws a write through a long-lived descriptor: what a log or a
/// database does all day, and what the daemon never sees under
/// passthrough (no log record, no request).
fn gen_descriptor(rng: &mut Rng, handles: &[Option<Handle>]) -> Option<Op> {
    let open: Vec<usize> = (0..SLOTS).filter(|&s| handles[s].is_some()).collect();
    if open.is_empty() {
        return None;
    }
    let slot = *rng.pick(&open);
    Some(match rng.below(10) {
        0..=5 => Op::Write {
            slot,
            off: rng.chance(60).then(|| offset(rng, 64 << 10)),
            data: Data::record(rng),
        },
        6..=8 => Op::MmapFd {
            slot,
            at: rng.next_u64(),
            data: Data::record(rng),
            msync: rng.chance(50),
        },
        _ => Op::FsyncFd { slot },
    })
}

/// Draws a rename between this worker's subtree and the shared area, or
/// within the shared area (the caller holds the shared lock).
fn gen_shared(rng: &mut Rng, me: &str, v: &View, open: &[u64]) -> Option<Op> {
    let (from, to) = match rng.below(3) {
        0 => (
            v.pick(rng, me, |e| v.exportable(&e.path, open))?
                .path
                .clone(),
            format!("{SHARED}/{}", rng.pick(&NAMES)),
        ),
        1 => (
            v.pick(rng, SHARED, |e| e.depth == 1)?.path.clone(),
            // Near the top, so imported trees do not nest ever deeper.
            v.name(rng, me, 1),
        ),
        _ => (
            v.pick(rng, SHARED, |e| e.depth == 1)?.path.clone(),
            format!("{SHARED}/{}", rng.pick(&NAMES)),
        ),
    };
    Some(Op::Rename { from, to, flags: 0 })
}

impl Op {
    /// What the op may change, for the journal.
    fn tokens(&self, handles: &[Option<Handle>]) -> Vec<Token> {
        let p = |s: &String| Token::Path(s.clone());
        // Ops on a slot are drawn only for open slots.
        let ino = |slot: &usize| -> Vec<Token> {
            handles[*slot]
                .iter()
                .map(|h| Token::Ino(h.ref_ino))
                .collect()
        };
        match self {
            Op::Save { tmp, path, .. } => vec![p(tmp), p(path)],
            Op::Rename { from, to, .. } | Op::Link { from, to } => vec![p(from), p(to)],
            Op::Create { path, .. }
            | Op::Pwrite { path, .. }
            | Op::Append { path, .. }
            | Op::Truncate { path, .. }
            | Op::Mmap { path, .. }
            | Op::Unlink { path }
            | Op::Mkdir { path, .. }
            | Op::Rmdir { path }
            | Op::Symlink { path, .. }
            | Op::Mkfifo { path }
            | Op::Setxattr { path, .. }
            | Op::Removexattr { path, .. }
            | Op::Chmod { path, .. }
            | Op::Chown { path, .. }
            | Op::Utimens { path, .. }
            | Op::Fsync { path }
            | Op::Open { path, .. } => vec![p(path)],
            Op::Write { slot, .. }
            | Op::Ftruncate { slot, .. }
            | Op::MmapFd { slot, .. }
            | Op::FsyncFd { slot }
            | Op::Close { slot } => ino(slot),
        }
    }
}

/// Writes `data` into `file` through a shared mapping, at `at` modulo the
/// file's size (clipped to it: beyond EOF a mapping faults), then
/// optionally msyncs. Nothing for an empty file.
fn mmap_write(file: &File, at: u64, data: &Data, msync: bool) -> io::Result<()> {
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(());
    }
    let off = at % size;
    let bytes = data.bytes();
    let n = bytes.len().min((size - off) as usize);
    let mut map = sys::Mapping::shared(file, size as usize, 0)?;
    map.bytes()[off as usize..off as usize + n].copy_from_slice(&bytes[..n]);
    if msync {
        map.sync()?;
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(path)
}

/// `close(2)` with its result (a FUSE close reports a failed flush).
fn close(file: File) -> io::Result<()> {
    // SAFETY: into_raw_fd hands us sole ownership of the descriptor.
    match unsafe { libc::close(file.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The descriptor in `slot` on side `side`.
fn descriptor(handles: &[Option<Handle>], slot: usize, side: usize) -> io::Result<&File> {
    handles[slot]
        .as_ref()
        .and_then(|h| h.files[side].as_ref())
        .ok_or_else(|| io::Error::other("no descriptor in slot"))
}

/// Applies `op` to side `side`, rooted at `root`.
fn apply(op: &Op, root: &Path, side: usize, handles: &mut [Option<Handle>]) -> io::Result<()> {
    let at = |p: &String| -> PathBuf { root.join(p) };
    let fd = |handles, slot: &usize| descriptor(handles, *slot, side);
    let write_new = |path: &Path, data: &Data, sync: bool| -> io::Result<()> {
        let mut f = sys::open(path, libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY, 0o644)?;
        f.write_all(&data.bytes())?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    };
    match op {
        Op::Create { path, data } => {
            let mut f = sys::open(
                &at(path),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o644,
            )?;
            f.write_all(&data.bytes())?;
        }
        Op::Pwrite { path, off, data } => {
            let f = OpenOptions::new().write(true).open(at(path))?;
            std::os::unix::fs::FileExt::write_all_at(&f, &data.bytes(), *off)?;
        }
        Op::Append { path, data } => {
            OpenOptions::new()
                .append(true)
                .open(at(path))?
                .write_all(&data.bytes())?;
        }
        Op::Truncate { path, len } => sys::truncate(&at(path), *len as i64)?,
        Op::Mmap {
            path,
            at: off,
            data,
            msync,
        } => {
            let f = OpenOptions::new().read(true).write(true).open(at(path))?;
            mmap_write(&f, *off, data, *msync)?;
        }
        Op::Save { tmp, path, data } => {
            write_new(&at(tmp), data, true)?;
            fs::rename(at(tmp), at(path))?;
            fsync_dir(parent(&at(path)))?;
        }
        Op::Rename { from, to, flags } => sys::renameat2(&at(from), &at(to), *flags)?,
        Op::Link { from, to } => fs::hard_link(at(from), at(to))?,
        Op::Unlink { path } => fs::remove_file(at(path))?,
        Op::Mkdir { path, mode } => sys::mkdir(&at(path), *mode)?,
        Op::Rmdir { path } => fs::remove_dir(at(path))?,
        Op::Symlink { target, path } => symlink(target, at(path))?,
        Op::Mkfifo { path } => sys::mkfifo(&at(path), 0o644)?,
        Op::Setxattr { path, name, data } => sys::setxattr(&at(path), name, &data.bytes(), 0)?,
        Op::Removexattr { path, name } => sys::removexattr(&at(path), name)?,
        Op::Chmod { path, mode } => sys::chmod(&at(path), *mode)?,
        Op::Chown { path, owner } => sys::lchown(&at(path), Some(owner.0), Some(owner.1))?,
        Op::Utimens { path, atime, mtime } => sys::utimensat(
            &at(path),
            Some([sys::ts(atime.0, atime.1), sys::ts(mtime.0, mtime.1)]),
            libc::AT_SYMLINK_NOFOLLOW,
        )?,
        Op::Fsync { path } => File::open(at(path))?.sync_all()?,
        Op::Open { slot, path, append } => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .append(*append)
                .create(true)
                .mode(0o644)
                .open(at(path))?;
            let ino = f.metadata()?.ino();
            let h = handles[*slot].get_or_insert_with(|| Handle {
                files: [None, None],
                ref_ino: 0,
            });
            if side == REFERENCE {
                h.ref_ino = ino;
            }
            h.files[side] = Some(f);
        }
        Op::Write { slot, off, data } => {
            let mut f: &File = fd(handles, slot)?;
            match off {
                Some(off) => std::os::unix::fs::FileExt::write_all_at(f, &data.bytes(), *off)?,
                None => f.write_all(&data.bytes())?,
            }
        }
        Op::Ftruncate { slot, len } => sys::ftruncate(fd(handles, slot)?, *len as i64)?,
        Op::MmapFd {
            slot,
            at: off,
            data,
            msync,
        } => mmap_write(fd(handles, slot)?, *off, data, *msync)?,
        Op::FsyncFd { slot } => fd(handles, slot)?.sync_all()?,
        Op::Close { slot } => {
            let h = handles[*slot].as_mut();
            let f = h.and_then(|h| h.files[side].take());
            close(f.ok_or_else(|| io::Error::other("no descriptor in slot"))?)?;
            if handles[*slot]
                .as_ref()
                .is_some_and(|h| h.files.iter().all(Option::is_none))
            {
                handles[*slot] = None;
            }
        }
    }
    Ok(())
}

/// True while `mnt` is a live FUSE mount: a dead daemon answers ENOTCONN,
/// and once lazily unmounted the path is the plain directory again.
pub fn mount_alive(mnt: &Path) -> bool {
    const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;
    sys::statfs(mnt).is_ok_and(|s| s.f_type as u64 == FUSE_SUPER_MAGIC)
}

/// An flock held while the shared area is read and changed.
struct SharedLock(File);

impl SharedLock {
    fn take(path: &Path) -> io::Result<SharedLock> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        sys::flock(&f, libc::LOCK_EX)?;
        Ok(SharedLock(f))
    }
}

impl Drop for SharedLock {
    fn drop(&mut self) {
        let _ = sys::flock(&self.0, libc::LOCK_UN);
    }
}

/// Compares the results of both sides: `None` if they agree.
fn disagreement<T>(m: &io::Result<T>, r: &io::Result<T>) -> Option<String> {
    let show = |x: &io::Result<T>| match x {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    match (m, r) {
        (Ok(_), Ok(_)) => None,
        (Err(a), Err(b)) if a.raw_os_error().is_some() && a.raw_os_error() == b.raw_os_error() => {
            None
        }
        _ => Some(format!("mount: {}; reference: {}", show(m), show(r))),
    }
}

/// The worker's main loop; returns the process exit code.
pub fn run(args: &WorkerArgs) -> i32 {
    match work(args) {
        Ok(code) => code,
        Err(e) => {
            // A journal or reference failure is the checker's own; a
            // failure on the mount's side is handled in `work`.
            eprintln!("fs worker {}: {e}", args.id);
            1
        }
    }
}

fn work(args: &WorkerArgs) -> io::Result<i32> {
    let me = format!("w{}", args.id);
    let roots = [args.mount.as_path(), args.reference.as_path()];
    let mut journal = Journal::open(&args.journal())?;
    let lock_path = args.journals.join("shared.lock");
    let steady_path = args.journals.join(STEADY);
    let mut rng = Rng::new(args.seed);
    let mut handles: Vec<Option<Handle>> = (0..SLOTS).map(|_| None).collect();
    // The long-lived writers, opened first and never closed.
    let mut script = vec![
        Op::Open {
            slot: 1,
            path: format!("{me}/{}", LIVE[1]),
            append: false,
        },
        Op::Open {
            slot: 0,
            path: format!("{me}/{}", LIVE[0]),
            append: true,
        },
    ];
    let started = Instant::now();
    while started.elapsed() < args.limit {
        let steady = script.is_empty() && steady_path.exists();
        let shared = script.is_empty() && !steady && rng.chance(4);
        let _lock = shared.then(|| SharedLock::take(&lock_path)).transpose()?;
        let op = match script.pop() {
            Some(op) => op,
            None if steady => {
                // At a writer's pace, not a benchmark's.
                std::thread::sleep(STEADY_PACE);
                match gen_descriptor(&mut rng, &handles) {
                    Some(op) => op,
                    None => continue,
                }
            }
            None if shared => {
                let view = View::scan(roots[REFERENCE], &[me.as_str(), SHARED])?;
                let open: Vec<u64> = handles.iter().flatten().map(|h| h.ref_ino).collect();
                match gen_shared(&mut rng, &me, &view, &open) {
                    Some(op) => op,
                    None => continue,
                }
            }
            None => {
                let view = View::scan(roots[REFERENCE], &[me.as_str()])?;
                match gen_own(&mut rng, &me, &view, &handles) {
                    Some(op) => op,
                    None => continue,
                }
            }
        };
        let n = journal.begin(&op.tokens(&handles), &format!("{op:?}"))?;
        let on_mount = apply(&op, roots[MOUNT], MOUNT, &mut handles);
        if on_mount.is_err() && !mount_alive(roots[MOUNT]) {
            return Ok(0);
        }
        let on_ref = apply(&op, roots[REFERENCE], REFERENCE, &mut handles);
        if let Some(why) = disagreement(&on_mount, &on_ref) {
            if !mount_alive(roots[MOUNT]) {
                return Ok(0);
            }
            journal.diverged(n, &why)?;
            return Ok(EXIT_DIVERGED);
        }
        journal.done(n)?;
    }
    Ok(0)
}
