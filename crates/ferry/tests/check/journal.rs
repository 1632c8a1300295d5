//! The journal each worker keeps outside the mount: what it began and what
//! the mount (and the reference) acknowledged.
//!
//! A worker appends `B n TOKENS | WHAT` before an operation and `D n` once
//! both the mount and the reference returned; `X n WHY` records a result
//! the two disagreed on. Each record is one `write` to an `O_APPEND` file,
//! so a worker killed at any moment leaves whole records behind, and at
//! most one operation begun and not done: the one in flight.
//!
//! The tokens say what an operation may change, for the checker to leave
//! out while it is in flight: `p:PATH` (relative to the mount root),
//! `i:INO` (a reference inode, for writes through a descriptor) and
//! `r:DB:LO:HI` (rows inserted by one SQLite transaction).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Something an operation may change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    Path(String),
    Ino(u64),
    Rows { db: String, lo: u64, hi: u64 },
}

impl Token {
    fn encode(&self) -> String {
        match self {
            Token::Path(p) => format!("p:{p}"),
            Token::Ino(i) => format!("i:{i}"),
            Token::Rows { db, lo, hi } => format!("r:{db}:{lo}:{hi}"),
        }
    }

    fn decode(s: &str) -> Option<Token> {
        let (tag, rest) = s.split_once(':')?;
        match tag {
            "p" => Some(Token::Path(rest.to_string())),
            "i" => rest.parse().ok().map(Token::Ino),
            "r" => {
                let mut it = rest.split(':');
                let (db, lo, hi) = (it.next()?, it.next()?, it.next()?);
                Some(Token::Rows {
                    db: db.to_string(),
                    lo: lo.parse().ok()?,
                    hi: hi.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// The writing end, in a worker.
pub struct Journal {
    file: File,
    next: u64,
}

impl Journal {
    /// Opens (creates) the journal at `path` for appending.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal { file, next: 0 })
    }

    /// Records that operation `what`, which may change `tokens`, begins;
    /// returns its number.
    pub fn begin(&mut self, tokens: &[Token], what: &str) -> io::Result<u64> {
        self.next += 1;
        let tokens: Vec<String> = tokens.iter().map(Token::encode).collect();
        let what = what.replace('\n', " ");
        self.record(&format!("B {} {} | {what}\n", self.next, tokens.join(" ")))?;
        Ok(self.next)
    }

    /// Records that operation `n` was acknowledged.
    pub fn done(&mut self, n: u64) -> io::Result<()> {
        self.record(&format!("D {n}\n"))
    }

    /// Records that the mount and the reference disagreed on operation `n`.
    pub fn diverged(&mut self, n: u64, why: &str) -> io::Result<()> {
        self.record(&format!("X {n} {}\n", why.replace('\n', " ")))
    }

    /// One record, one `write`.
    fn record(&mut self, line: &str) -> io::Result<()> {
        let n = self.file.write(line.as_bytes())?;
        if n != line.len() {
            return Err(io::Error::other(format!("short journal write: {n} bytes")));
        }
        Ok(())
    }
}

/// One begun operation.
#[derive(Clone, Debug)]
pub struct Record {
    pub n: u64,
    pub tokens: Vec<Token>,
    pub what: String,
}

/// A journal as read back by the checker.
#[derive(Clone, Debug, Default)]
pub struct Log {
    /// Acknowledged operations, in order.
    pub done: Vec<Record>,
    /// Begun and not acknowledged (at most one per worker).
    pub in_flight: Vec<Record>,
    /// Operations the mount and the reference disagreed on.
    pub diverged: Vec<(Record, String)>,
}

/// Reads the journal at `path` (whole lines only).
pub fn read(path: &Path) -> Result<Log, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |line: &str| format!("{}: bad record {line:?}", path.display());
    let mut begun: BTreeMap<u64, Record> = BTreeMap::new();
    let mut log = Log::default();
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let line = line.trim_end_matches('\n');
        let (kind, rest) = line.split_once(' ').ok_or_else(|| bad(line))?;
        let (n, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let n: u64 = n.parse().map_err(|_| bad(line))?;
        match kind {
            "B" => {
                let (tokens, what) = rest.split_once(" | ").ok_or_else(|| bad(line))?;
                let tokens = tokens
                    .split(' ')
                    .filter(|t| !t.is_empty())
                    .map(|t| Token::decode(t).ok_or_else(|| bad(line)))
                    .collect::<Result<_, _>>()?;
                let what = what.to_string();
                begun.insert(n, Record { n, tokens, what });
            }
            "D" => log.done.push(begun.remove(&n).ok_or_else(|| bad(line))?),
            "X" => {
                let rec = begun.remove(&n).ok_or_else(|| bad(line))?;
                log.diverged.push((rec, rest.to_string()));
            }
            _ => return Err(bad(line)),
        }
    }
    log.in_flight = begun.into_values().collect();
    Ok(log)
}
