//! One API over both modes: [`Remote`] talks to the agent if one answers and
//! injects otherwise.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use crate::agent;
use crate::error::{Error, Result};
use crate::op::{Mmap, Op};
use crate::stop::{Options, Target};
use crate::sys::{self, Pid};

/// How a [`Remote`] reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Requests go over the agent's socket; no ptrace involved.
    Agent,
    /// Each operation stops a thread, injects system calls, and resumes it.
    Injection,
}

/// A process whose address space we act on.
#[derive(Debug)]
pub struct Remote {
    pid: Pid,
    via: Via,
    last_stop: Duration,
}

#[derive(Debug)]
enum Via {
    Agent(agent::Client),
    Injection(Target),
}

/// A region mapped shared in both this process and the target.
///
/// Dropping it unmaps our side only; the target keeps its mapping, and with
/// it the memory, until it unmaps it or exits.
#[derive(Debug)]
pub struct SharedRegion {
    memfd: OwnedFd,
    local_addr: usize,
    remote_addr: u64,
    len: u64,
}

impl SharedRegion {
    /// Where the region is mapped in this process.
    pub fn local_addr(&self) -> usize {
        self.local_addr
    }

    /// Where the region is mapped in the target.
    pub fn remote_addr(&self) -> u64 {
        self.remote_addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it has zero length (never, for a region [`Remote::share`] made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd behind it, for `pread`/`pwrite` without touching raw pointers.
    pub fn memfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.memfd.as_fd()
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // The mapping is ours, created by mmap_shared, and no reference into it escapes.
        let _ = sys::munmap(self.local_addr, self.len as usize);
    }
}

impl Remote {
    /// Reaches `pid` through its agent if one answers, else by injection.
    pub fn connect(pid: Pid, options: &Options) -> Result<Remote> {
        match Remote::agent(pid) {
            Ok(remote) => Ok(remote),
            // An agent that refuses us is an answer, not an absence.
            Err(e @ Error::AgentRefused { .. }) => Err(e),
            Err(_) => Remote::injection(pid, options),
        }
    }

    /// Reaches `pid` through its agent only.
    pub fn agent(pid: Pid) -> Result<Remote> {
        let client = agent::Client::connect(pid)?;
        Ok(Remote {
            pid,
            via: Via::Agent(client),
            last_stop: Duration::ZERO,
        })
    }

    /// Reaches `pid` by injection only.
    pub fn injection(pid: Pid, options: &Options) -> Result<Remote> {
        let target = Target::open(pid, options)?;
        Ok(Remote {
            pid,
            via: Via::Injection(target),
            last_stop: Duration::ZERO,
        })
    }

    /// The target process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Which mode this handle uses.
    pub fn mode(&self) -> Mode {
        match self.via {
            Via::Agent(_) => Mode::Agent,
            Via::Injection(_) => Mode::Injection,
        }
    }

    /// How long the target thread was stopped by the last injected operation
    /// (zero in agent mode, where nothing stops).
    pub fn last_stop(&self) -> Duration {
        self.last_stop
    }

    /// Performs one operation in the target and returns the system call's result.
    pub fn run(&mut self, op: &Op<'_>) -> Result<u64> {
        match &mut self.via {
            Via::Agent(client) => {
                let (nr, args) = op.syscall(op.fd().map(|_| -1));
                client.call(nr, args, op.fd())
            }
            Via::Injection(target) => {
                let mut stopped = target.seize()?;
                let remote_fd = op.fd().map(|fd| stopped.import_fd(fd)).transpose()?;
                let (nr, args) = op.syscall(remote_fd.map(|fd| fd.0));
                let result = stopped.syscall(nr, args);
                if let Some(fd) = remote_fd {
                    stopped.close(fd)?;
                }
                self.last_stop = stopped.resume()?;
                result
            }
        }
    }

    /// `mmap` in the target; returns the address.
    pub fn mmap(&mut self, request: &Mmap<'_>) -> Result<u64> {
        self.run(&Op::Mmap(*request))
    }

    /// `munmap` in the target.
    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<()> {
        self.run(&Op::Munmap { addr, len }).map(drop)
    }

    /// `mprotect` in the target.
    pub fn mprotect(&mut self, addr: u64, len: u64, prot: i32) -> Result<()> {
        self.run(&Op::Mprotect { addr, len, prot }).map(drop)
    }

    /// `madvise` in the target.
    pub fn madvise(&mut self, addr: u64, len: u64, advice: i32) -> Result<()> {
        self.run(&Op::Madvise { addr, len, advice }).map(drop)
    }

    /// Any system call in the target's context (injection mode only).
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<u64> {
        match &mut self.via {
            Via::Agent(client) => client.call(nr, args, None),
            Via::Injection(target) => {
                let mut stopped = target.seize()?;
                let result = stopped.syscall(nr, args);
                self.last_stop = stopped.resume()?;
                result
            }
        }
    }

    /// Maps `len` bytes of fresh shared memory in both processes.
    ///
    /// With the agent, we create the memfd and send it. By injection, the
    /// *target* creates it and we take a duplicate with `pidfd_getfd`: that
    /// needs only the ptrace rights we already hold, whereas pushing our fd
    /// into the target would need the target to have rights over us (a
    /// user's process over a root `ferry`, typically, does not).
    pub fn share(&mut self, len: u64, prot: i32, addr: Option<u64>) -> Result<SharedRegion> {
        const NAME: &CStr = c"ferry-share";
        let shared = Mmap {
            addr,
            len,
            prot,
            flags: libc::MAP_SHARED,
            fd: None,
            offset: 0,
        };
        let (memfd, remote_addr) = match &mut self.via {
            Via::Agent(client) => {
                let memfd = sys::memfd_create(NAME).map_err(Error::local("memfd_create"))?;
                std::fs::File::from(memfd.try_clone().map_err(Error::local("dup memfd"))?)
                    .set_len(len)
                    .map_err(Error::local("size the memfd"))?;
                let (nr, args) = Op::Mmap(shared).syscall(Some(-1));
                let remote_addr = client.call(nr, args, Some(memfd.as_fd()))?;
                (memfd, remote_addr)
            }
            Via::Injection(target) => {
                let mut stopped = target.seize()?;
                let fd = stopped.create_memfd(NAME, len)?;
                let (nr, args) = Op::Mmap(shared).syscall(Some(fd.0));
                let mapped = stopped
                    .syscall(nr, args)
                    .and_then(|addr| Ok((stopped.export_fd(fd)?, addr)));
                let closed = stopped.close(fd);
                if let (Ok((_, addr)), Err(_)) = (&mapped, &closed) {
                    let _ = stopped.syscall(libc::SYS_munmap, [*addr, len, 0, 0, 0, 0]);
                }
                closed?;
                self.last_stop = stopped.resume()?;
                mapped?
            }
        };
        let local_addr = match sys::mmap_shared(memfd.as_fd(), len as usize, prot) {
            Ok(addr) => addr,
            Err(source) => {
                let _ = self.munmap(remote_addr, len);
                return Err(Error::Local {
                    op: "mmap the shared region here",
                    source,
                });
            }
        };
        Ok(SharedRegion {
            memfd,
            local_addr,
            remote_addr,
            len,
        })
    }
}
