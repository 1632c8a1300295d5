//! The checker's own checks, run before any trial: a checker that cannot
//! fail proves nothing. On plain directories (no mount), each of them
//! changes one thing in a copy of a small tree and asks the comparison to
//! notice it, under the aspect it belongs to; the model must leave out
//! what an operation in flight touched and nothing else; and a journal
//! must read back as it was written.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{symlink, FileExt};
use std::path::Path;

use super::journal::{self, Journal, Record, Token};
use super::model;
use crate::support::fsimage::{diff, uncovered, Compare, Difference, Image};
use crate::support::{sys, TempDir};

/// A tree with one of everything compared: a sparse file with a hard link,
/// a directory with an xattr and an odd mode, a symlink owned by someone
/// else, and fixed mtimes everywhere (set last, children first).
fn build(root: &Path) -> io::Result<()> {
    fs::create_dir(root.join("d"))?;
    let f = File::create(root.join("f"))?;
    f.write_all_at(&[7u8; 100_000], 0)?;
    f.write_all_at(b"tail", 3 << 20)?;
    fs::hard_link(root.join("f"), root.join("d/h"))?;
    fs::write(root.join("d/e"), b"e")?;
    sys::setxattr(&root.join("d"), "user.x", b"1", 0)?;
    sys::chmod(&root.join("d"), 0o750)?;
    symlink("f", root.join("l"))?;
    sys::lchown(&root.join("l"), Some(1), Some(1))?;
    for (i, p) in ["d/e", "d/h", "l", "d"].iter().enumerate() {
        let t = sys::ts(1_500_000_000 + i as i64, 123);
        sys::utimensat(&root.join(p), Some([t, t]), libc::AT_SYMLINK_NOFOLLOW)?;
    }
    Ok(())
}

/// One change, the path it shows at and the aspect it must show under.
type Tamper = (&'static str, &'static str, fn(&Path) -> io::Result<()>);

const TAMPERS: [Tamper; 11] = [
    ("f", "content", |r| {
        File::options()
            .write(true)
            .open(r.join("f"))?
            .write_all_at(b"x", 70_000)
    }),
    ("d/e", "size", |r| sys::truncate(&r.join("d/e"), 2)),
    ("d", "mode", |r| sys::chmod(&r.join("d"), 0o700)),
    ("l", "owner", |r| sys::lchown(&r.join("l"), Some(2), None)),
    ("d", "mtime", |r| {
        let t = sys::ts(1_600_000_000, 0);
        sys::utimensat(&r.join("d"), Some([t, t]), 0)
    }),
    ("d", "xattrs", |r| {
        sys::setxattr(&r.join("d"), "user.x", b"2", 0)
    }),
    ("f", "hard links", |r| {
        fs::remove_file(r.join("d/h"))?;
        fs::copy(r.join("f"), r.join("d/h")).map(drop)
    }),
    ("f", "holes", |r| {
        File::options()
            .write(true)
            .open(r.join("f"))?
            .write_all_at(&[0u8; 4096], 1 << 20)
    }),
    ("l", "target", |r| {
        fs::remove_file(r.join("l"))?;
        symlink("g", r.join("l"))
    }),
    ("d/e", "missing", |r| fs::remove_file(r.join("d/e"))),
    ("d/e", "type", |r| {
        fs::remove_file(r.join("d/e"))?;
        fs::create_dir(r.join("d/e"))
    }),
];

fn full(a: &Image, b: &Image) -> Vec<Difference> {
    let cmp = Compare {
        mtimes: true,
        holes: true,
        ignore: &|_| false,
    };
    diff(a, b, &cmp, ("a", "b"))
}

fn capture(root: &Path) -> Result<Image, String> {
    Image::capture(root).map_err(|e| e.to_string())
}

fn text<T>(r: io::Result<T>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// A fresh copy of the tree with `tamper` applied, captured.
fn tampered(tamper: fn(&Path) -> io::Result<()>) -> Result<Image, String> {
    let dir = TempDir::new("ferry-check-self");
    build(dir.path()).map_err(|e| format!("build: {e}"))?;
    tamper(dir.path()).map_err(|e| format!("tamper: {e}"))?;
    capture(dir.path())
}

fn record(tokens: Vec<Token>) -> Record {
    Record {
        n: 1,
        tokens,
        what: "self-test".into(),
    }
}

/// Runs every self-check; `Err` names the first that failed.
pub fn run() -> Result<usize, String> {
    let dir = TempDir::new("ferry-check-self");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for root in [&a, &b] {
        text(fs::create_dir(root))?;
        build(root).map_err(|e| format!("build: {e}"))?;
    }
    let (ia, ib) = (capture(&a)?, capture(&b)?);
    let same = full(&ia, &ib);
    if !same.is_empty() {
        return Err(format!("identical trees differ: {}", same[0]));
    }
    let mut checks = 1;
    for (path, aspect, tamper) in TAMPERS {
        let d = full(&ia, &tampered(tamper)?);
        if !d.iter().any(|d| d.path == path && d.aspect == aspect) {
            return Err(format!("{aspect} of {path} changed, not seen: {d:?}"));
        }
        checks += 1;
    }

    // A copy may have more holes than the original, not fewer.
    let hole_cases = [
        uncovered(&[(0, 10)], &[(0, 5), (5, 12)]).is_none(),
        uncovered(&[(0, 4), (8, 10)], &[(0, 10)]).is_none(),
        uncovered(&[(0, 10)], &[(0, 4), (6, 10)]) == Some((4, 6)),
        uncovered(&[(2, 3)], &[]) == Some((2, 3)),
    ];
    if let Some(i) = hole_cases.iter().position(|ok| !ok) {
        return Err(format!("uncovered(), case {i}"));
    }
    checks += hole_cases.len();

    // The model leaves out exactly what an operation in flight touched.
    let content = tampered(TAMPERS[0].2)?;
    let by_path = model::check(&ia, &content, &[record(vec![Token::Path("f".into())])]);
    let by_ino = model::check(
        &ia,
        &content,
        &[record(vec![Token::Ino(ia.nodes["f"].ino)])],
    );
    let elsewhere = model::check(&ia, &content, &[record(vec![Token::Path("d/e".into())])]);
    let renamed = tampered(|r| fs::rename(r.join("d"), r.join("d2")))?;
    let dir_rename = model::check(
        &ia,
        &renamed,
        &[record(vec![
            Token::Path("d".into()),
            Token::Path("d2".into()),
        ])],
    );
    for (what, d, want_empty) in [
        ("a write in flight on the path", &by_path, true),
        ("a write in flight through a descriptor", &by_ino, true),
        ("a directory rename in flight", &dir_rename, true),
        ("an op in flight elsewhere", &elsewhere, false),
    ] {
        if d.is_empty() != want_empty {
            return Err(format!("model, {what}: {d:?}"));
        }
        checks += 1;
    }

    // A journal reads back as written, in flight and disagreements apart.
    let path = dir.path().join("j.log");
    let mut j = Journal::open(&path).map_err(|e| e.to_string())?;
    let rows = Token::Rows {
        db: "t.db".into(),
        lo: 3,
        hi: 9,
    };
    let n1 = text(j.begin(&[Token::Path("w0/a".into()), Token::Ino(42)], "one | two"))?;
    text(j.done(n1))?;
    let n2 = text(j.begin(std::slice::from_ref(&rows), "rows"))?;
    text(j.diverged(n2, "mount: ok; reference: EEXIST"))?;
    text(j.begin(&[], "last"))?;
    let log = journal::read(&path)?;
    let ok = log.done.len() == 1
        && log.done[0].tokens == [Token::Path("w0/a".into()), Token::Ino(42)]
        && log.done[0].what == "one | two"
        && log.diverged.len() == 1
        && log.diverged[0].0.tokens == [rows]
        && log.in_flight.len() == 1
        && log.in_flight[0].what == "last";
    if !ok {
        return Err(format!("journal read back as {log:?}"));
    }
    Ok(checks + 1)
}
