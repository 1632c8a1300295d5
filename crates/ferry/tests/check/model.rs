//! I2 against the model: after kill -9 and remount, the mount must equal
//! the reference everywhere except where an operation in flight at the kill
//! may or may not have landed.
//!
//! The kill does not lose the kernel's page cache of the data files, and
//! every metadata operation commits before it returns, so every operation
//! a worker saw succeed must be there, not only fsync'd ones. What an
//! in-flight operation may have changed is left out: the paths it names,
//! everything below them, their parent directories (link counts), every
//! other name of the inodes involved (contents, link counts), and for a
//! write through a descriptor every name of that inode. Mtimes are not
//! compared (the reference has its own clock), nor holes (the mount's data
//! files may hold written zeros where ext4 has a hole: FUSE writes back
//! whole large folios); contents are, byte for byte, and I1 compares both.

use std::collections::BTreeSet;

use super::journal::{Record, Token};
use super::sqlite;
use crate::support::fsimage::{diff, Compare, Difference, Image, Kind};

/// Paths an in-flight operation may have changed, closed over hard links
/// in both images.
pub fn uncertain(reference: &Image, mount: &Image, in_flight: &[Record]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ref_groups = reference.link_groups();
    for t in in_flight.iter().flat_map(|r| &r.tokens) {
        match t {
            Token::Path(p) => {
                out.insert(p.clone());
                if let Some((parent, _)) = p.rsplit_once('/') {
                    out.insert(parent.to_string());
                }
                for img in [reference, mount] {
                    out.extend(img.subtree(p).cloned());
                }
            }
            Token::Ino(ino) => out.extend(ref_groups.get(ino).into_iter().flatten().cloned()),
            // Rows are the database check's business.
            Token::Rows { .. } => {}
        }
    }
    // Every other name of an inode with an uncertain name, on either side,
    // until nothing is added (each round adds at least one path or ends).
    let groups: Vec<Vec<String>> = [reference, mount]
        .iter()
        .flat_map(|img| img.link_groups().into_values())
        .filter(|g| g.len() > 1)
        .collect();
    loop {
        let before = out.len();
        for g in &groups {
            if g.iter().any(|p| out.contains(p)) {
                out.extend(g.iter().cloned());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// The differences between the remounted tree and the reference that no
/// in-flight operation explains (the databases are checked on their own).
pub fn check(reference: &Image, mount: &Image, in_flight: &[Record]) -> Vec<Difference> {
    let skip = uncertain(reference, mount, in_flight);
    let ignore = |p: &str| p == sqlite::DIR || p.starts_with("db/") || skip.contains(p);
    let cmp = Compare {
        mtimes: false,
        holes: false,
        ignore: &ignore,
    };
    diff(reference, mount, &cmp, ("the reference", "the mount"))
}

/// I3's own checks of a restored tree: no directory has two names, and
/// every link count matches the names the tree shows (a name hidden in an
/// unreachable directory, or a dangling one, breaks that).
pub fn structure(img: &Image) -> Vec<String> {
    let mut problems = Vec::new();
    let mut dirs: std::collections::BTreeMap<u64, Vec<&String>> = Default::default();
    let mut subdirs: std::collections::BTreeMap<&str, u64> = Default::default();
    for (path, n) in &img.nodes {
        if n.kind == Kind::Dir {
            dirs.entry(n.ino).or_default().push(path);
            let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
            *subdirs.entry(parent).or_default() += 1;
        }
    }
    for names in dirs.values().filter(|n| n.len() > 1) {
        problems.push(format!(
            "one directory has {} names: {names:?}",
            names.len()
        ));
    }
    for (ino, names) in img.link_groups() {
        let nlink = img.nodes[&names[0]].nlink;
        if nlink != names.len() as u64 {
            problems.push(format!(
                "inode {ino}: nlink {nlink}, but the tree shows {} name(s) {names:?}",
                names.len()
            ));
        }
    }
    for (path, n) in img.nodes.iter().filter(|(_, n)| n.kind == Kind::Dir) {
        let want = 2 + subdirs.get(path.as_str()).copied().unwrap_or(0);
        if n.nlink != want {
            problems.push(format!(
                "{path}: directory nlink {}, but it has {} subdirectories",
                n.nlink,
                want - 2
            ));
        }
    }
    problems
}
