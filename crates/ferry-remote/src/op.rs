//! The memory operations both modes perform, as system calls.
//!
//! An [`Op`] becomes one system call number plus six arguments
//! ([`Op::syscall`]); injection runs that in the stopped thread, and the agent
//! runs it in its own thread after receiving it over the socket. Only the fd of
//! a file mapping differs between the two: it must first be made a descriptor
//! of the target, by `pidfd_getfd` or by `SCM_RIGHTS`.

use std::os::fd::BorrowedFd;

/// A mapping request, as for `mmap(2)`.
#[derive(Clone, Copy, Debug)]
pub struct Mmap<'fd> {
    /// Where to map. `Some` adds `MAP_FIXED_NOREPLACE`, so an occupied range
    /// fails with `EEXIST` instead of silently replacing what is there.
    pub addr: Option<u64>,
    /// Length in bytes.
    pub len: u64,
    /// `PROT_*` bits.
    pub prot: i32,
    /// `MAP_*` flags; `MAP_ANONYMOUS` is added when `fd` is `None`.
    pub flags: i32,
    /// The file to map, as a descriptor of *this* process.
    pub fd: Option<BorrowedFd<'fd>>,
    /// Offset into the file.
    pub offset: u64,
}

impl Mmap<'_> {
    /// A private anonymous mapping of `len` bytes with protection `prot`.
    pub fn anonymous(len: u64, prot: i32) -> Mmap<'static> {
        Mmap {
            addr: None,
            len,
            prot,
            flags: libc::MAP_PRIVATE,
            fd: None,
            offset: 0,
        }
    }
}

/// One operation on the target's address space.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Op<'fd> {
    /// `mmap(2)`; returns the address.
    Mmap(Mmap<'fd>),
    /// `munmap(2)`.
    Munmap {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `mprotect(2)`.
    Mprotect {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// New `PROT_*` bits.
        prot: i32,
    },
    /// `madvise(2)`.
    Madvise {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// `MADV_*` advice.
        advice: i32,
    },
}

impl<'fd> Op<'fd> {
    /// The descriptor the target must hold for this operation, if any.
    pub fn fd(&self) -> Option<BorrowedFd<'fd>> {
        match self {
            Op::Mmap(m) => m.fd,
            _ => None,
        }
    }

    /// The system call and arguments, given the fd number as the target knows it.
    pub fn syscall(&self, target_fd: Option<i32>) -> (i64, [u64; 6]) {
        match *self {
            Op::Mmap(m) => {
                let mut flags = m.flags;
                if m.addr.is_some() {
                    flags |= libc::MAP_FIXED_NOREPLACE;
                }
                let fd = match target_fd {
                    Some(fd) => fd as u64,
                    None => {
                        flags |= libc::MAP_ANONYMOUS;
                        u64::MAX // -1
                    }
                };
                let args = [
                    m.addr.unwrap_or(0),
                    m.len,
                    m.prot as u64,
                    flags as u64,
                    fd,
                    m.offset,
                ];
                (libc::SYS_mmap, args)
            }
            Op::Munmap { addr, len } => (libc::SYS_munmap, [addr, len, 0, 0, 0, 0]),
            Op::Mprotect { addr, len, prot } => {
                (libc::SYS_mprotect, [addr, len, prot as u64, 0, 0, 0])
            }
            Op::Madvise { addr, len, advice } => {
                (libc::SYS_madvise, [addr, len, advice as u64, 0, 0, 0])
            }
        }
    }
}

/// Parses a protection such as `rw`, `r-x`, `rwx` or `none` into `PROT_*` bits.
pub fn parse_prot(text: &str) -> Option<i32> {
    if text == "none" || text == "---" {
        return Some(libc::PROT_NONE);
    }
    text.chars().try_fold(libc::PROT_NONE, |prot, c| match c {
        'r' => Some(prot | libc::PROT_READ),
        'w' => Some(prot | libc::PROT_WRITE),
        'x' => Some(prot | libc::PROT_EXEC),
        '-' => Some(prot),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmap_becomes_the_right_syscall() {
        let (nr, args) = Op::Mmap(Mmap::anonymous(4096, libc::PROT_READ)).syscall(None);
        assert_eq!(nr, libc::SYS_mmap);
        assert_eq!(args[3] as i32, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
        assert_eq!(args[4], u64::MAX);
        let fixed = Mmap {
            addr: Some(0x7000_0000),
            flags: libc::MAP_SHARED,
            ..Mmap::anonymous(8192, 3)
        };
        let (_, args) = Op::Mmap(fixed).syscall(Some(7));
        assert_eq!(args[0], 0x7000_0000);
        assert_eq!(args[3] as i32, libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE);
        assert_eq!(args[4], 7);
    }

    #[test]
    fn prot_strings() {
        assert_eq!(parse_prot("rw"), Some(libc::PROT_READ | libc::PROT_WRITE));
        assert_eq!(parse_prot("r-x"), Some(libc::PROT_READ | libc::PROT_EXEC));
        assert_eq!(parse_prot("none"), Some(libc::PROT_NONE));
        assert_eq!(parse_prot("rq"), None);
    }
}
