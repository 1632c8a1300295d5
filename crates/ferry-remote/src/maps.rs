//! The target's memory map, read from `/proc/PID/maps`.
//!
//! Used to find a `syscall` instruction to reuse, by `ferry maps`, and by
//! tests that check a mapping appeared with the right protection.

use std::fmt;
use std::fs;

use crate::error::{Error, Result};
use crate::sys::Pid;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Permissions as the kernel prints them, e.g. `rw-p` or `r-xs`.
    pub perms: String,
    /// Offset into the mapped file.
    pub offset: u64,
    /// Path, `[vdso]`-style pseudo name, or empty for anonymous memory.
    pub path: String,
}

impl Mapping {
    /// Whether `addr` falls inside this mapping.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// Parses one line; `None` for a line the kernel would never print.
    fn parse(line: &str) -> Option<Mapping> {
        // "start-end perms offset dev inode   path"; the path may contain spaces.
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?.to_owned();
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let _dev = fields.next()?;
        let _inode = fields.next()?;
        let path = fields.next().unwrap_or("").trim_start().to_owned();
        Some(Mapping {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            perms,
            offset,
            path,
        })
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:012x}-{:012x} {} {:8} {}",
            self.start,
            self.end,
            self.perms,
            (self.end - self.start) / 1024,
            self.path
        )?;
        Ok(())
    }
}

/// Reads the mappings of process `pid`.
pub fn read(pid: Pid) -> Result<Vec<Mapping>> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| Error::Memory {
        pid,
        addr: 0,
        source,
    })?;
    Ok(text.lines().filter_map(Mapping::parse).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_anonymous_file_and_pseudo_lines() {
        let m = Mapping::parse("7f0000000000-7f0000100000 rw-s 00000000 00:01 1234                       /memfd:ferry (deleted)").unwrap();
        assert_eq!(
            (m.start, m.end, m.perms.as_str()),
            (0x7f0000000000, 0x7f0000100000, "rw-s")
        );
        assert_eq!(m.path, "/memfd:ferry (deleted)");
        let v = Mapping::parse(
            "7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]",
        )
        .unwrap();
        assert_eq!(v.path, "[vdso]");
        let a = Mapping::parse("55550000-55551000 ---p 00001000 00:00 0 ").unwrap();
        assert_eq!((a.offset, a.path.as_str()), (0x1000, ""));
        assert!(Mapping::parse("garbage").is_none());
    }
}
