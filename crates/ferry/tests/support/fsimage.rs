//! An image of a tree: everything the replication invariants promise to
//! keep, captured once, compared with exclusions.
//!
//! [`super::tree`] compares what the POSIX suites need. The replication
//! checks need more: mtimes (of directories and symlinks too), owners, data
//! extents (holes), and a comparison that can leave out the paths an
//! interrupted operation may or may not have changed. Contents are kept as
//! 64 KiB block checksums, so a difference names the first differing block
//! and an image of a tree of sparse files stays small. A capture that cannot
//! read something (EIO from a volume whose backend lost a chunk) returns the
//! error with its path: for a restore that error is the finding.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{fnv64, sys};

/// Bytes per content checksum.
pub const BLOCK: usize = 64 << 10;
/// Deepest path a capture follows: deeper is a directory cycle the kernel
/// did not catch, reported rather than walked forever.
pub const MAX_DEPTH: usize = 64;

/// File type, as far as the comparison cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Other,
}

/// One path of an image.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// `st_mode`, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Directories: not compared (their size is the file system's business).
    pub size: u64,
    pub nlink: u64,
    pub mtime_ns: i64,
    /// Groups hard links within one image; never compared across images.
    pub ino: u64,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Regular files: FNV-1a of each [`BLOCK`] of the contents.
    pub blocks: Vec<u64>,
    /// Regular files: the data ranges `[start, end)` per SEEK_DATA/SEEK_HOLE.
    pub extents: Vec<(u64, u64)>,
    /// `user.*` xattrs, sorted by name (not for symlinks).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A captured tree: nodes by path relative to the root.
pub struct Image {
    pub nodes: BTreeMap<String, Node>,
}

/// Why a capture failed: the path, the call and the error.
#[derive(Debug)]
pub struct CaptureError {
    pub path: PathBuf,
    pub call: &'static str,
    pub error: io::Error,
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.call, self.path.display(), self.error)
    }
}

/// Attaches the path and call to an io error.
fn at<T>(path: &Path, call: &'static str, r: io::Result<T>) -> Result<T, CaptureError> {
    r.map_err(|error| CaptureError {
        path: path.to_path_buf(),
        call,
        error,
    })
}

/// The data ranges of an open file of `size` bytes, by SEEK_DATA/SEEK_HOLE
/// (bounded: one range per block at most).
fn extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let start = match sys::lseek(file, off as i64, libc::SEEK_DATA) {
            Ok(s) => s as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        let end = sys::lseek(file, start as i64, libc::SEEK_HOLE)? as u64;
        if end <= start {
            return Err(io::Error::other(format!(
                "SEEK_HOLE from {start} returned {end}"
            )));
        }
        out.push((start, end));
        off = end;
    }
    Ok(out)
}

/// Checksums of each [`BLOCK`] of the file, read to its end.
fn block_sums(file: &mut File) -> io::Result<Vec<u64>> {
    let mut sums = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let mut n = 0;
        while n < BLOCK {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            return Ok(sums);
        }
        sums.push(fnv64(&buf[..n]));
        if n < BLOCK {
            return Ok(sums);
        }
    }
}

fn kind_of(t: fs::FileType) -> Kind {
    if t.is_file() {
        Kind::File
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else if t.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Other
    }
}

/// One node. Files are read first and stat'ed after, through the same
/// descriptor: the attributes are the ones a reader sees once the contents
/// are local (a restore fetches them on open).
fn capture_node(path: &Path) -> Result<Node, CaptureError> {
    let lmeta = at(path, "lstat", fs::symlink_metadata(path))?;
    let kind = kind_of(lmeta.file_type());
    let (mut target, mut blocks, mut exts) = (Vec::new(), Vec::new(), Vec::new());
    let meta = match kind {
        Kind::File => {
            let mut file = at(path, "open", File::open(path))?;
            blocks = at(path, "read", block_sums(&mut file))?;
            // After reading: lseek moves the file position.
            exts = at(path, "lseek", extents(&file, lmeta.len()))?;
            at(path, "fstat", file.metadata())?
        }
        Kind::Symlink => {
            target = at(path, "readlink", fs::read_link(path))?
                .into_os_string()
                .into_encoded_bytes();
            lmeta
        }
        _ => lmeta,
    };
    let mut xattrs = Vec::new();
    if kind != Kind::Symlink {
        let mut names = at(path, "listxattr", sys::listxattr(path, 65536))?;
        names.retain(|n| n.starts_with("user."));
        names.sort();
        for n in names {
            let v = at(path, "getxattr", sys::getxattr(path, &n, 65536))?;
            xattrs.push((n, v));
        }
    }
    Ok(Node {
        kind,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        size: if kind == Kind::Dir { 0 } else { meta.len() },
        nlink: meta.nlink(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ino: meta.ino(),
        target,
        blocks,
        extents: exts,
        xattrs,
    })
}

impl Image {
    /// Captures the tree under `root` (not the root itself).
    pub fn capture(root: &Path) -> Result<Image, CaptureError> {
        let mut nodes = BTreeMap::new();
        let mut stack = vec![(String::new(), 0)];
        while let Some((rel, depth)) = stack.pop() {
            let dir = root.join(&rel);
            if depth > MAX_DEPTH {
                let error = io::Error::other(format!("deeper than {MAX_DEPTH}: a cycle?"));
                return Err(CaptureError {
                    path: dir,
                    call: "readdir",
                    error,
                });
            }
            for e in at(&dir, "readdir", fs::read_dir(&dir))? {
                let name = at(&dir, "readdir", e)?.file_name();
                let name = name.to_string_lossy();
                let rel = if rel.is_empty() {
                    name.into_owned()
                } else {
                    format!("{rel}/{name}")
                };
                let node = capture_node(&root.join(&rel))?;
                if node.kind == Kind::Dir {
                    stack.push((rel.clone(), depth + 1));
                }
                nodes.insert(rel, node);
            }
        }
        Ok(Image { nodes })
    }

    /// Paths of non-directories sharing an inode, by inode.
    pub fn link_groups(&self) -> BTreeMap<u64, Vec<String>> {
        let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (path, n) in &self.nodes {
            if n.kind != Kind::Dir {
                groups.entry(n.ino).or_default().push(path.clone());
            }
        }
        groups
    }

    /// `path` and everything below it.
    pub fn subtree<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        let prefix = format!("{path}/");
        self.nodes
            .range::<str, _>((Bound::Included(path), Bound::Unbounded))
            .take_while(move |(p, _)| *p == path || p.starts_with(&prefix))
            .map(|(p, _)| p)
    }
}

/// What a comparison looks at.
pub struct Compare<'a> {
    /// Compare mtimes (a differential reference has its own).
    pub mtimes: bool,
    /// Require every hole of the left side to be a hole on the right too
    /// (the right may have more: a copy that skips zero runs keeps every
    /// hole and makes new ones, and no reader can tell). Off for a
    /// reference on another file system, which allocates on its own terms.
    pub holes: bool,
    /// Paths left out entirely (both their presence and their attributes).
    pub ignore: &'a dyn Fn(&str) -> bool,
}

/// The first part of an extent in `inner` that no extent of `outer`
/// covers (both sorted and disjoint, as SEEK_DATA reports them).
pub fn uncovered(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> Option<(u64, u64)> {
    let mut j = 0;
    for &(start, end) in inner {
        let mut at = start;
        while at < end {
            while j < outer.len() && outer[j].1 <= at {
                j += 1;
            }
            match outer.get(j) {
                Some(&(s, e)) if s <= at => at = e.min(end),
                Some(&(s, _)) => return Some((at, s.min(end))),
                None => return Some((at, end)),
            }
        }
    }
    None
}

/// One difference: the path, the aspect and both sides.
#[derive(Clone, Debug)]
pub struct Difference {
    pub path: String,
    pub aspect: &'static str,
    pub detail: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.path, self.aspect, self.detail)
    }
}

fn kind_name(n: &Node) -> String {
    format!("{:?} mode {:o} size {}", n.kind, n.mode, n.size)
}

/// The aspects in which two nodes differ, as (aspect, "left vs right").
fn node_diffs(a: &Node, b: &Node, cmp: &Compare<'_>) -> Vec<(&'static str, String)> {
    let mut d = Vec::new();
    let (mtimes, holes) = (cmp.mtimes, cmp.holes);
    let mut note = |aspect, differ: bool, show: &dyn Fn() -> String| {
        if differ {
            d.push((aspect, show()));
        }
    };
    note("type", a.kind != b.kind, &|| {
        format!("{:?} vs {:?}", a.kind, b.kind)
    });
    if a.kind != b.kind {
        return d;
    }
    note("mode", a.mode != b.mode, &|| {
        format!("{:o} vs {:o}", a.mode, b.mode)
    });
    note("owner", (a.uid, a.gid) != (b.uid, b.gid), &|| {
        format!("{}:{} vs {}:{}", a.uid, a.gid, b.uid, b.gid)
    });
    note("size", a.size != b.size, &|| {
        format!("{} vs {}", a.size, b.size)
    });
    note("nlink", a.nlink != b.nlink, &|| {
        format!("{} vs {}", a.nlink, b.nlink)
    });
    note("mtime", mtimes && a.mtime_ns != b.mtime_ns, &|| {
        format!(
            "{} vs {} ({:+} ns)",
            a.mtime_ns,
            b.mtime_ns,
            b.mtime_ns - a.mtime_ns
        )
    });
    note("target", a.target != b.target, &|| {
        format!(
            "{:?} vs {:?}",
            String::from_utf8_lossy(&a.target),
            String::from_utf8_lossy(&b.target)
        )
    });
    note("content", a.blocks != b.blocks, &|| {
        let first = a
            .blocks
            .iter()
            .zip(&b.blocks)
            .position(|(x, y)| x != y)
            .unwrap_or(a.blocks.len().min(b.blocks.len()));
        format!(
            "first differing byte in [{}, {}) ({} vs {} blocks of {BLOCK})",
            first * BLOCK,
            (first + 1) * BLOCK,
            a.blocks.len(),
            b.blocks.len()
        )
    });
    let filled = uncovered(&b.extents, &a.extents);
    note("holes", holes && filled.is_some(), &|| {
        let (s, e) = filled.unwrap_or_default();
        format!(
            "data in [{s}, {e}), a hole on the left; data {:?} vs {:?}",
            a.extents, b.extents
        )
    });
    note("xattrs", a.xattrs != b.xattrs, &|| {
        let show = |x: &[(String, Vec<u8>)]| -> Vec<String> {
            x.iter()
                .map(|(n, v)| format!("{n}=({} bytes fnv {:016x})", v.len(), fnv64(v)))
                .collect()
        };
        format!("{:?} vs {:?}", show(&a.xattrs), show(&b.xattrs))
    });
    d
}

/// Differences between `a` and `b` (each path's other hard-link names
/// included), sorted by path; `names` are the sides' names for messages.
pub fn diff(a: &Image, b: &Image, cmp: &Compare<'_>, names: (&str, &str)) -> Vec<Difference> {
    let siblings = |img: &Image| -> BTreeMap<String, BTreeSet<String>> {
        let mut out = BTreeMap::new();
        for group in img.link_groups().into_values() {
            for p in &group {
                let others = group
                    .iter()
                    .filter(|q| *q != p && !(cmp.ignore)(q))
                    .cloned()
                    .collect();
                out.insert(p.clone(), others);
            }
        }
        out
    };
    let (sa, sb) = (siblings(a), siblings(b));
    let mut out = Vec::new();
    let paths: BTreeSet<&String> = a.nodes.keys().chain(b.nodes.keys()).collect();
    for path in paths.into_iter().filter(|p| !(cmp.ignore)(p)) {
        let mut push = |aspect, detail| {
            out.push(Difference {
                path: path.clone(),
                aspect,
                detail,
            })
        };
        match (a.nodes.get(path), b.nodes.get(path)) {
            (Some(na), Some(nb)) => {
                for (aspect, detail) in node_diffs(na, nb, cmp) {
                    push(aspect, detail);
                }
                if na.kind != Kind::Dir && sa.get(path) != sb.get(path) {
                    push(
                        "hard links",
                        format!("other names {:?} vs {:?}", sa.get(path), sb.get(path)),
                    );
                }
            }
            (Some(na), None) => push("missing", format!("only in {}: {}", names.0, kind_name(na))),
            (None, Some(nb)) => push("missing", format!("only in {}: {}", names.1, kind_name(nb))),
            (None, None) => unreachable!("path from one of the images"),
        }
    }
    out
}
