//! A real source tree for tests and benchmarks that copy "a real tree":
//! crates this workspace depends on, unpacked from cargo's download cache.
//!
//! The choice is deterministic: the crates in [`TREE_CRATES`] at the
//! newest version the workspace's `Cargo.lock` names, so every machine that
//! has built the workspace has them, and a given lock file always gives the
//! same tree (one copy: 2,178 files, 21.8 MB of Rust source).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{describe, run_bounded};

/// Seven crates of plain Rust source, big and varied (many small files,
/// some large generated ones, deep directories).
pub const TREE_CRATES: [&str; 7] = [
    "futures-util",
    "libc",
    "regex-automata",
    "rustix",
    "syn",
    "tokio",
    "zerocopy",
];

/// `NAME-VERSION` of `name` in the workspace lock file (the newest, since
/// the lock lists versions in ascending order).
fn locked(name: &str) -> String {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    let text = fs::read_to_string(&lock).unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
    let mut lines = text.lines();
    let mut found = None;
    while let Some(line) = lines.next() {
        if line == format!("name = \"{name}\"") {
            let version = lines.next().and_then(|v| v.strip_prefix("version = \""));
            found = version.map(|v| format!("{name}-{}", v.trim_end_matches('"')));
        }
    }
    found.unwrap_or_else(|| panic!("{name} is not in {}", lock.display()))
}

/// The downloaded `.crate` (a .tar.gz) of `NAME-VERSION`.
fn cached(name_version: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    let cache = home.join("registry/cache");
    fs::read_dir(&cache)
        .unwrap_or_else(|e| panic!("{}: {e}", cache.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(format!("{name_version}.crate")))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name_version}.crate not in {}", cache.display()))
}

/// Unpacks `copies` copies of the tree into `dest/copy-I/`; returns the
/// number of regular files written.
pub fn unpack(dest: &Path, copies: usize) -> usize {
    let tarballs: Vec<PathBuf> = TREE_CRATES.iter().map(|c| cached(&locked(c))).collect();
    for i in 0..copies {
        let dir = dest.join(format!("copy-{i}"));
        fs::create_dir_all(&dir).unwrap();
        for t in &tarballs {
            let r = run_bounded(
                Command::new("tar").arg("xzf").arg(t).arg("-C").arg(&dir),
                Duration::from_secs(120),
            );
            assert!(
                matches!(&r, Ok(o) if o.status.success()),
                "unpacking {}: {}",
                t.display(),
                describe(&r)
            );
        }
    }
    count_files(dest)
}

/// Regular files under `dir` (symlinks not followed).
pub fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                n += 1;
            }
        }
    }
    n
}
