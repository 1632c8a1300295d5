//! Agent mode: a thread inside the target serves memory operations.
//!
//! [`start`] binds a unix stream socket at the abstract address
//! `\0ferry-remote-agent-<pid>` and serves each connection on its own thread,
//! so a slow client never delays another. A request is one [`Op`] encoded as a
//! system call number and six arguments (64 bytes: magic, number, the
//! client's CPU, arguments; the file to map, if any, attached by
//! `SCM_RIGHTS`); the reply is the result or `-errno` (16 bytes). The agent runs the call in its own thread, which is in the
//! target's address space; the requester blocks in `read` until the reply.
//!
//! Only `mmap`, `munmap`, `mprotect` and `madvise` are served, and only to a
//! peer whose `SO_PEERCRED` uid is the agent's effective uid or root: the
//! same people who could have injected the call with ptrace.
//!
//! # Why the abstract namespace
//!
//! - Nothing to clean up: the name disappears with the last descriptor, so a
//!   crashed target leaves no stale socket file for its recycled pid.
//! - Nothing to create: no runtime directory whose owner and mode must be
//!   right before the constructor of an LD_PRELOADed library can bind.
//! - The name follows from the pid alone, so a client needs no other
//!   knowledge of the target.
//!
//! Abstract names have no file permissions, which is why the credential check
//! is done on every connection. They are scoped to a network namespace, and
//! the pid in the name is the one the agent sees, so a client in another
//! network or pid namespace finds no agent and falls back to injection.
//! [`Client::connect`] also asks the agent for its pid (a ping), which both
//! proves the agent is alive and surfaces a refusal before the first request.
//!
//! [`Op`]: crate::Op

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::thread;

use crate::error::{Error, Result};
use crate::sys::{self, Pid};

/// Marks a well-formed message (`FRY1`).
const MAGIC: u32 = 0x4652_5931;
/// The request number of the liveness ping; the agent answers with its pid.
const PING: u32 = u32::MAX;
const REQUEST_LEN: usize = 64;
const REPLY_LEN: usize = 16;
/// The system calls an agent serves.
const SERVED: [i64; 4] = [
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
];

/// The abstract socket name of the agent of process `pid` (without the leading NUL).
pub fn socket_name(pid: Pid) -> String {
    format!("ferry-remote-agent-{pid}")
}

/// A running agent; it serves until the process exits.
#[derive(Debug)]
pub struct Agent {
    name: String,
}

impl Agent {
    /// The abstract socket name it listens on (without the leading NUL).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Starts the agent thread of this process.
///
/// The thread is detached and lives as long as the process: the agent has no
/// owner to stop it when it is preloaded, and a half-stopped agent would only
/// turn requests into errors. Starting twice fails with `EADDRINUSE`.
pub fn start() -> Result<Agent> {
    let pid = std::process::id() as Pid;
    let name = socket_name(pid);
    let agent_err = |op| move |source| Error::Agent { pid, op, source };
    let addr = SocketAddr::from_abstract_name(&name).map_err(agent_err("socket name"))?;
    let listener = UnixListener::bind_addr(&addr).map_err(agent_err("bind"))?;
    thread::Builder::new()
        .name("ferry-agent".into())
        .spawn(move || accept_loop(listener))
        .map_err(agent_err("spawn thread"))?;
    Ok(Agent { name })
}

fn accept_loop(listener: UnixListener) {
    // A failed accept (EMFILE, ECONNABORTED) concerns one client; keep serving the rest.
    for stream in listener.incoming().flatten() {
        let _ = thread::Builder::new()
            .name("ferry-agent-conn".into())
            .spawn(move || serve(stream));
    }
}

/// One decoded request.
struct Request {
    nr: u32,
    /// The CPU the client sent it from, or `u32::MAX`.
    cpu: u32,
    args: [u64; 6],
    fd: Option<std::os::fd::OwnedFd>,
}

/// Serves one connection until the client hangs up.
///
/// The serving thread moves to the CPU its client sends from. The client
/// sleeps in `read` while we work, so that CPU is free, and both wakeups
/// (request, reply) then stay on one CPU: on this machine's VMs, waking a
/// thread on an idle second CPU costs about 40 µs, ten times the rest of the
/// round trip. Failure to pin (a cpuset without that CPU) only costs speed.
fn serve(mut stream: UnixStream) {
    let allowed = sys::peer_credentials(stream.as_fd())
        .map(|cred| cred.uid == 0 || cred.uid == sys::geteuid())
        .unwrap_or(false);
    let mut pinned = u32::MAX;
    loop {
        let Ok(Request {
            nr,
            cpu,
            mut args,
            fd,
        }) = read_request(&mut stream)
        else {
            return;
        };
        if allowed && cpu != pinned && cpu != u32::MAX && sys::pin_to_cpu(cpu).is_ok() {
            pinned = cpu;
        }
        let result = if !allowed {
            -i64::from(libc::EPERM)
        } else if nr == PING {
            i64::from(std::process::id())
        } else if SERVED.contains(&i64::from(nr)) {
            if let Some(fd) = &fd {
                args[4] = fd.as_raw_fd() as u64;
            }
            match sys::memory_syscall(i64::from(nr), args) {
                Ok(v) => v as i64,
                Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        } else {
            -i64::from(libc::ENOSYS)
        };
        drop(fd); // a mapping holds its own reference to the file
        if write_reply(&mut stream, result).is_err() || !allowed {
            return;
        }
    }
}

fn read_request(stream: &mut UnixStream) -> io::Result<Request> {
    let mut buf = [0u8; REQUEST_LEN];
    let (n, fd) = sys::recv_with_fd(stream.as_fd(), &mut buf)?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    stream.read_exact(&mut buf[n..])?; // a stream may split the message; the fd rides the first part
    let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    if word(0) != MAGIC {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let mut args = [0u64; 6];
    for (i, arg) in args.iter_mut().enumerate() {
        *arg = u64::from_le_bytes(buf[16 + 8 * i..24 + 8 * i].try_into().unwrap());
    }
    Ok(Request {
        nr: word(4),
        cpu: word(8),
        args,
        fd,
    })
}

fn write_reply(stream: &mut UnixStream, result: i64) -> io::Result<()> {
    let mut buf = [0u8; REPLY_LEN];
    buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..].copy_from_slice(&result.to_le_bytes());
    stream.write_all(&buf)
}

/// A connection to the agent of one process.
#[derive(Debug)]
pub struct Client {
    pid: Pid,
    stream: UnixStream,
}

impl Client {
    /// Connects to the agent of `pid` and checks that it serves us.
    pub fn connect(pid: Pid) -> Result<Client> {
        let err = |op| move |source| Error::Agent { pid, op, source };
        let addr = SocketAddr::from_abstract_name(socket_name(pid)).map_err(err("socket name"))?;
        let stream = UnixStream::connect_addr(&addr).map_err(err("connect"))?;
        // The name holds the pid as the *agent* sees it. A process in another
        // pid namespace (sharing our network namespace) can own the same
        // name, so check who listens: the kernel translates the peer's pid
        // into our namespace.
        let owner = sys::peer_credentials(stream.as_fd())
            .map_err(err("SO_PEERCRED"))?
            .pid;
        if owner != pid {
            let msg =
                format!("the socket for {pid} belongs to process {owner} (another pid namespace)");
            return Err(err("connect")(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                msg,
            )));
        }
        let mut client = Client { pid, stream };
        client.request(PING, [0; 6], None)?;
        Ok(client)
    }

    /// The target process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sends system call `nr` (one the agent serves) and waits for its result.
    pub fn call(&mut self, nr: i64, args: [u64; 6], fd: Option<BorrowedFd<'_>>) -> Result<u64> {
        let served = u32::try_from(nr)
            .ok()
            .filter(|nr| SERVED.contains(&i64::from(*nr)));
        let nr32 = served.ok_or(Error::RemoteSyscall {
            pid: self.pid,
            nr,
            errno: libc::ENOSYS,
        })?;
        self.request(nr32, args, fd)
    }

    fn request(&mut self, nr: u32, args: [u64; 6], fd: Option<BorrowedFd<'_>>) -> Result<u64> {
        let pid = self.pid;
        let err = |op| move |source| Error::Agent { pid, op, source };
        let mut buf = [0u8; REQUEST_LEN];
        buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[4..8].copy_from_slice(&nr.to_le_bytes());
        let cpu = sys::current_cpu().unwrap_or(u32::MAX);
        buf[8..12].copy_from_slice(&cpu.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            buf[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        let sent = sys::send_with_fd(self.stream.as_fd(), &buf, fd).map_err(err("send"))?;
        self.stream.write_all(&buf[sent..]).map_err(err("send"))?;
        let mut reply = [0u8; REPLY_LEN];
        self.stream.read_exact(&mut reply).map_err(err("receive"))?;
        if reply[..4] != MAGIC.to_le_bytes() {
            return Err(err("receive")(io::ErrorKind::InvalidData.into()));
        }
        let result = i64::from_le_bytes(reply[8..].try_into().unwrap());
        match result {
            r if r == -i64::from(libc::EPERM) && nr == PING => Err(Error::AgentRefused { pid }),
            -4095..=-1 => Err(Error::remote(pid, i64::from(nr), -result as i32)),
            _ => Ok(result as u64),
        }
    }
}
