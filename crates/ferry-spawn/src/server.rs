//! The spawn server: a small helper process that clones on our behalf.
//!
//! [`Server::start`] re-executes the current binary (`/proc/self/exe`) with
//! a marker in its environment; the binary's `main` calls
//! [`main_if_server`] first thing, which sees the marker and serves instead
//! of running the program. The fresh image is small and has few threads,
//! so its clones stay cheap and never share the caller's address space.
//!
//! Requests travel over a `SOCK_SEQPACKET` socketpair, one message each: a
//! prepared spawn (strings, options, fd map), its fds attached by
//! `SCM_RIGHTS`, and first among them a fresh socket for the reply, so
//! concurrent callers never see each other's answers. The server clones
//! with `CLONE_PARENT`: the new process is the *caller's* child, which can
//! `waitid` on the pidfd it gets back. Several worker threads take
//! requests off the one socket. When the caller's end closes, they exit.
//!
//! [`serve_path`] and [`Server::connect`] are the same over a socket path,
//! for a server run by someone else; its children are then its own.

use std::env;
use std::ffi::{CString, OsString};
use std::io;
use std::iter;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::child::{self, Prepared, Spawned};
use crate::command::{Command, Stdio};
use crate::process::{Child, Fault};
use crate::{sys, wire};

/// Environment variable that turns a process into a spawn server; its
/// value is the number of the fd holding the server's socket.
const MARKER: &str = "FERRY_SPAWN_SERVER_FD";

/// The fd number the server's socket gets in the server.
const SERVER_FD: RawFd = 3;

/// Worker threads in the server; each blocks only while its child execs.
const WORKERS: usize = 4;

/// Largest request (mostly the environment). A `SOCK_SEQPACKET` message
/// must also fit the socket's send buffer (`net.core.wmem_default`).
const MAX_REQUEST: usize = 256 * 1024;

/// A handle on a spawn server. Cheap to share between threads; every
/// [`Command::spawn_via`] is one independent request.
///
/// If the server dies, the spawn in flight fails with
/// [`SpawnError::Server`](crate::SpawnError::Server) and the next one
/// starts a new server (or reconnects, for [`Server::connect`]).
#[derive(Debug)]
pub struct Server {
    origin: Origin,
    conn: Mutex<Option<Conn>>,
}

/// Where a server comes from, and so how to get a new one.
#[derive(Debug)]
enum Origin {
    /// We start it: `program args...` with the marker.
    Launch {
        program: PathBuf,
        args: Vec<OsString>,
    },
    /// Someone else runs it on a socket path (`serve_path`).
    Path(CString),
}

/// A server's socket, and the server process if it is our child.
#[derive(Debug)]
struct Conn {
    sock: Arc<OwnedFd>,
    process: Option<Child>,
}

impl Server {
    /// Starts a server by re-executing this binary, whose `main` must call
    /// [`main_if_server`] first.
    pub fn start() -> io::Result<Server> {
        Server::start_program("/proc/self/exe", [] as [&str; 0])
    }

    /// Starts a server from `program` with `args` (after `argv[0]`, which
    /// is `ferry-spawn-server` so it stands out in `ps`), for binaries
    /// other than this one that call [`main_if_server`] first.
    pub fn start_program<I, S>(program: impl Into<PathBuf>, args: I) -> io::Result<Server>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args = args.into_iter().map(Into::into).collect();
        Server::open(Origin::Launch {
            program: program.into(),
            args,
        })
    }

    /// Connects to a server listening on `path` ([`serve_path`], or
    /// `ferry spawn-server --socket PATH`). Its children are its own, not
    /// ours: `wait` then reads their exit status from the pidfd once the
    /// server has reaped them, which needs Linux 6.15.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Server> {
        let path = CString::new(path.as_ref().as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Server::open(Origin::Path(path))
    }

    fn open(origin: Origin) -> io::Result<Server> {
        let server = Server {
            origin,
            conn: Mutex::new(None),
        };
        server.connection()?;
        Ok(server)
    }

    /// The server's pid, if we started it and it is running.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref()?.process.as_ref().map(Child::id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The socket of a live server, starting (or connecting to) one if
    /// there is none or the one we started has exited.
    fn connection(&self) -> io::Result<Arc<OwnedFd>> {
        let mut conn = self.lock();
        if let Some(c) = conn.as_mut() {
            let exited = match c.process.as_mut() {
                Some(process) => process.try_wait()?.is_some(),
                None => false,
            };
            if !exited {
                return Ok(Arc::clone(&c.sock));
            }
        }
        let new = match &self.origin {
            Origin::Launch { program, args } => {
                let (ours, theirs) = sys::socketpair()?;
                let process = Command::new(program)
                    .arg0("ferry-spawn-server")
                    .args(args)
                    .env_clear()
                    .env(MARKER, SERVER_FD.to_string())
                    .fd(SERVER_FD, theirs)
                    .stdin(Stdio::Null)
                    .close_other_fds(true)
                    .spawn()?;
                Conn {
                    sock: Arc::new(ours),
                    process: Some(process),
                }
            }
            Origin::Path(path) => Conn {
                sock: Arc::new(sys::connect(path)?),
                process: None,
            },
        };
        let sock = Arc::clone(&new.sock);
        *conn = Some(new);
        Ok(sock)
    }

    /// Drops the server behind `sock` after it failed us (reaping it if it
    /// is ours), so the next request starts or connects anew.
    fn forget(&self, sock: &Arc<OwnedFd>) {
        let mut conn = self.lock();
        if conn.as_ref().is_some_and(|c| Arc::ptr_eq(&c.sock, sock)) {
            if let Some(mut process) = conn.take().and_then(|c| c.process) {
                // It is dead or broken; kill it in case it is only broken.
                let _ = process.kill();
                let _ = process.wait();
            }
        }
    }

    /// Sends one spawn request and waits for its answer.
    pub(crate) fn spawn(&self, prepared: &Prepared) -> Result<Spawned, Fault> {
        let sock = self.connection().map_err(Fault::Server)?;
        let (reply, theirs) = sys::socketpair().map_err(Fault::Server)?;
        let request = wire::encode_request(prepared);
        let fds: Vec<RawFd> = iter::once(theirs.as_raw_fd()).chain(request.fds).collect();
        if let Err(err) = sys::send_with_fds(sock.as_fd(), &request.bytes, &fds) {
            if matches!(
                err.raw_os_error(),
                Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
            ) {
                self.forget(&sock);
            }
            return Err(Fault::Server(err));
        }
        // Only the server holds the other end now: if it dies, we read EOF.
        drop(theirs);
        let mut buf = [0u8; 64];
        let (len, fds) = sys::recv_with_fds(reply.as_fd(), &mut buf).map_err(Fault::Server)?;
        if len == 0 {
            self.forget(&sock);
            return Err(Fault::Server(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the spawn server exited before answering",
            )));
        }
        wire::decode_reply(&buf[..len], fds).map_err(Fault::Server)?
    }
}

impl Drop for Server {
    /// Closing our end makes a server we started exit; then we reap it.
    fn drop(&mut self) {
        if let Some(conn) = self.lock().take() {
            drop(conn.sock);
            if let Some(mut process) = conn.process {
                let _ = process.wait();
            }
        }
    }
}

/// Runs the spawn server and exits if this process was started as one;
/// returns at once otherwise. Call it first thing in `main`, before any
/// thread exists, in every binary that uses [`Server::start`].
pub fn main_if_server() {
    let Some(fd) = env::var_os(MARKER) else {
        return;
    };
    let code = match fd.to_str().and_then(|fd| fd.parse().ok()).map(serve_fd) {
        Some(Ok(())) => 0,
        Some(Err(err)) => {
            eprintln!("ferry-spawn server: {err}");
            1
        }
        None => {
            eprintln!("ferry-spawn server: {MARKER} is not an fd number");
            2
        }
    };
    std::process::exit(code);
}

/// Serves spawn requests on the inherited socket `fd` until every client
/// end is closed. Children are made children of this process's parent.
pub fn serve_fd(fd: RawFd) -> io::Result<()> {
    serve(sys::inherited_fd(fd)?, true)
}

/// Serves spawn requests from every client that connects to the socket
/// it creates at `path`, for [`Server::connect`]. The children are this
/// server's own; a thread reaps them, after which the kernel keeps their
/// exit status for the clients' pidfds. Runs until killed.
pub fn serve_path(path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let listener = sys::listen(&path)?;
    thread::spawn(|| loop {
        match sys::reap_any() {
            Ok(true) => {}
            // No children yet (or a transient error): look again shortly.
            _ => thread::sleep(Duration::from_millis(20)),
        }
    });
    loop {
        match sys::accept(listener.as_fd()) {
            Ok(conn) => {
                thread::spawn(move || serve(conn, false));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Runs the worker threads on one socket until its client ends close.
/// `as_sibling`: clone with `CLONE_PARENT`, giving children to our parent.
fn serve(sock: OwnedFd, as_sibling: bool) -> io::Result<()> {
    let sock = Arc::new(sock);
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let sock = Arc::clone(&sock);
            thread::spawn(move || worker(&sock, as_sibling))
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| io::Error::other("spawn server worker panicked"))??;
    }
    Ok(())
}

/// One worker: take a request, clone, answer on the request's own socket.
fn worker(sock: &OwnedFd, as_sibling: bool) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let (len, mut fds) = sys::recv_with_fds(sock.as_fd(), &mut buf)?;
        if len == 0 {
            return Ok(()); // Every client end is closed.
        }
        if fds.is_empty() {
            continue; // No reply socket: nobody to answer.
        }
        let reply = fds.remove(0);
        let outcome = wire::decode_request(&buf[..len], fds)
            .and_then(|prepared| child::spawn(&prepared, as_sibling));
        let answer = wire::encode_reply(&outcome);
        // A client that gave up is not our problem; its child is its own.
        let _ = sys::send_with_fds(reply.as_fd(), &answer.bytes, &answer.fds);
    }
}
