//! Whole-tree comparison: names, types, modes, sizes, link counts and
//! hard-link groups, contents byte for byte, and `user.*` xattrs.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::sys;

/// Content summary: length and checksum (full bytes are compared in trees).
pub fn digest(data: &[u8]) -> String {
    format!("{} bytes fnv {:016x}", data.len(), super::fnv64(data))
}

/// Sorted `user.*` names (other namespaces are the file system's business).
pub fn user_names(mut names: Vec<String>) -> Vec<String> {
    names.retain(|n| n.starts_with("user."));
    names.sort();
    names
}

/// Type, mode, size (not for directories: their size is fs-specific) and
/// link count.
pub fn describe_meta(m: &fs::Metadata) -> String {
    let size = if m.is_dir() {
        "-".to_string()
    } else {
        m.len().to_string()
    };
    format!(
        "mode {:o} size {size} nlink {} uid {} gid {}",
        m.mode(),
        m.nlink(),
        m.uid(),
        m.gid()
    )
}

/// Everything a tree is compared on, one entry per path.
#[derive(PartialEq, Eq)]
pub struct Entry {
    meta: String,
    content: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x: Vec<_> = self
            .xattrs
            .iter()
            .map(|(n, v)| format!("{n}={}", digest(v)))
            .collect();
        write!(f, "{} [{}] xattrs {x:?}", self.meta, digest(&self.content))
    }
}

/// Snapshot of a tree: entries by relative path, plus the hard-link groups
/// (paths sharing an inode) so the link structure is compared too.
pub fn snapshot(root: &Path) -> (BTreeMap<String, Entry>, Vec<Vec<String>>) {
    let mut entries = BTreeMap::new();
    let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let path = root.join(&rel);
            let m = fs::symlink_metadata(&path).unwrap();
            let content = if m.is_file() {
                fs::read(&path).unwrap()
            } else if m.file_type().is_symlink() {
                fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                if m.is_dir() {
                    stack.push(rel.clone());
                }
                Vec::new()
            };
            let xattrs = if m.file_type().is_symlink() {
                Vec::new()
            } else {
                user_names(sys::listxattr(&path, 65536).unwrap())
                    .into_iter()
                    .map(|n| {
                        let v = sys::getxattr(&path, &n, 65536).unwrap();
                        (n, v)
                    })
                    .collect()
            };
            if !m.is_dir() {
                groups.entry(m.ino()).or_default().push(rel.clone());
            }
            entries.insert(
                rel,
                Entry {
                    meta: describe_meta(&m),
                    content,
                    xattrs,
                },
            );
        }
    }
    let mut groups: Vec<Vec<String>> = groups.into_values().filter(|g| g.len() > 1).collect();
    groups.iter_mut().for_each(|g| g.sort());
    groups.sort();
    (entries, groups)
}

/// Compares two trees; returns a readable list of differences.
pub fn tree_diff(a: &Path, b: &Path) -> Vec<String> {
    let ((ea, ga), (eb, gb)) = (snapshot(a), snapshot(b));
    let mut diffs = Vec::new();
    for (k, va) in &ea {
        match eb.get(k) {
            None => diffs.push(format!("{k}: only in {}: {va:?}", a.display())),
            Some(vb) if vb != va => diffs.push(format!("{k}: {va:?} vs {vb:?}")),
            _ => {}
        }
    }
    for (k, vb) in &eb {
        if !ea.contains_key(k) {
            diffs.push(format!("{k}: only in {}: {vb:?}", b.display()));
        }
    }
    if ga != gb {
        diffs.push(format!("hard-link groups: {ga:?} vs {gb:?}"));
    }
    diffs
}
