//! netem in user space: a TCP proxy that delays each direction by a fixed
//! one-way delay, for tests and benchmarks on kernels without `sch_netem`.
//!
//! [`Proxy`] listens on one address and forwards every connection to a
//! target. Each direction of a connection is a reader thread and a writer
//! thread joined by a bounded queue of timestamped chunks: the reader stamps
//! every chunk it reads with `now + delay`, the writer releases it when it is
//! due. Many chunks are in flight at once, so the delay does not cap
//! throughput (a sleep per read would: one buffer per delay), and byte order
//! is kept because each direction is one FIFO.
//!
//! [`Proxy::set_partitioned`] is the partition switch: while on, every live
//! connection is shut down and new ones are closed as soon as they are
//! accepted; off again, forwarding resumes for new connections. Dropping the
//! proxy stops the listener and every connection and joins all threads, so
//! nothing outlives the test that made it.
//!
//! The listening socket can be created inside a network namespace (see
//! [`Config::listen_netns`]) while connections to the target are made from
//! the caller's namespace: clients then reach the proxy only over the veth
//! link into that namespace, and the target stays on loopback.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Bytes read at once; also the most one queued chunk holds.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction: 64 MiB in flight, far above what a 2-core
/// test machine moves in one delay period, so the queue never throttles.
const QUEUE: usize = 1024;

/// What a [`Proxy`] does.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen (port 0 picks a free one; see [`Proxy::addr`]).
    pub listen: SocketAddr,
    /// Where every accepted connection is forwarded.
    pub target: SocketAddr,
    /// One-way delay added to each direction (RTT grows by twice this).
    pub delay: Duration,
    /// A network namespace file (e.g. `/run/netns/NAME`) to create the
    /// listening socket in; `None` for the caller's namespace.
    pub listen_netns: Option<PathBuf>,
}

/// Connections currently forwarded, so the partition switch and `Drop` can
/// shut them down.
#[derive(Default)]
struct Live {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Live {
    fn shutdown_all(&self) {
        for (a, b) in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

/// A running delay proxy; see the crate doc.
pub struct Proxy {
    addr: SocketAddr,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    partitioned: Arc<AtomicBool>,
    live: Arc<Live>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Binds the listener (in `cfg.listen_netns` if set) and starts
    /// accepting.
    pub fn start(cfg: Config) -> io::Result<Proxy> {
        let listener = match &cfg.listen_netns {
            None => TcpListener::bind(cfg.listen)?,
            Some(ns) => bind_in_netns(cfg.listen, ns.clone())?,
        };
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let partitioned = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Live::default());
        let acceptor = {
            let (listener, stop, partitioned, live) = (
                listener.try_clone()?,
                stop.clone(),
                partitioned.clone(),
                live.clone(),
            );
            thread::Builder::new()
                .name("netem-accept".into())
                .spawn(move || accept_loop(listener, cfg, stop, partitioned, live))?
        };
        Ok(Proxy {
            addr,
            listener,
            stop,
            partitioned,
            live,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The partition switch: `true` shuts down every live connection and
    /// refuses new ones (accepted, then closed at once); `false` resumes.
    pub fn set_partitioned(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
        if on {
            self.live.shutdown_all();
        }
    }

    /// Connections being forwarded right now.
    pub fn live_connections(&self) -> usize {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux, shutting down a listening socket wakes a blocked accept().
        // SAFETY: shutdown(2) on a socket we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        self.live.shutdown_all();
        let threads =
            std::mem::take(&mut *self.live.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Binds in the namespace `ns` from a short-lived thread: a network
/// namespace is per thread, so the caller's threads never leave theirs, and
/// the socket stays in `ns` for its whole life.
fn bind_in_netns(addr: SocketAddr, ns: PathBuf) -> io::Result<TcpListener> {
    thread::spawn(move || {
        let file = std::fs::File::open(&ns)?;
        // SAFETY: setns(2) on a valid namespace fd, affecting this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        TcpListener::bind(addr)
    })
    .join()
    .map_err(|_| io::Error::other("bind thread panicked"))?
}

fn accept_loop(
    listener: TcpListener,
    cfg: Config,
    stop: Arc<AtomicBool>,
    partitioned: Arc<AtomicBool>,
    live: Arc<Live>,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if partitioned.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        // A target that refuses is the client's problem, as without a proxy.
        let Ok(server) = TcpStream::connect(cfg.target) else {
            continue;
        };
        if let Err(e) = forward(client, server, cfg.delay, &live) {
            eprintln!("ferry-netem: connection setup: {e}");
        }
    }
}

/// Starts the four threads of one connection and registers it.
fn forward(
    client: TcpStream,
    server: TcpStream,
    delay: Duration,
    live: &Arc<Live>,
) -> io::Result<()> {
    // The proxy must add only `delay`: Nagle would hold small writes back.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let id = live.next.fetch_add(1, Ordering::Relaxed);
    live.conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, (client.try_clone()?, server.try_clone()?));
    // Directions still running; the last one to end unregisters the connection.
    let open = Arc::new(AtomicUsize::new(2));
    let mut threads = Vec::with_capacity(4);
    for (from, to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
        let (tx, rx) = sync_channel(QUEUE);
        threads.push(
            thread::Builder::new()
                .name("netem-read".into())
                .spawn(move || read_side(from, tx, delay))?,
        );
        let (live, open) = (live.clone(), open.clone());
        threads.push(
            thread::Builder::new()
                .name("netem-write".into())
                .spawn(move || {
                    let clean = write_side(rx, &to);
                    let mut conns = live.conns.lock().unwrap_or_else(|p| p.into_inner());
                    if !clean || open.fetch_sub(1, Ordering::SeqCst) == 1 {
                        // A failed write aborts both directions, as a reset would.
                        if let Some((a, b)) = conns.remove(&id) {
                            let _ = a.shutdown(Shutdown::Both);
                            let _ = b.shutdown(Shutdown::Both);
                        }
                    }
                })?,
        );
    }
    let mut all = live.threads.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|t| !t.is_finished());
    all.extend(threads);
    Ok(())
}

/// A chunk and the moment it may be delivered.
type Timed = (Instant, Vec<u8>);

fn read_side(mut from: TcpStream, tx: SyncSender<Timed>, delay: Duration) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Delivers each chunk when due; returns false if the peer failed.
fn write_side(rx: Receiver<Timed>, mut to: &TcpStream) -> bool {
    for (due, data) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if to.write_all(&data).is_err() {
            return false;
        }
    }
    // The reader saw EOF and everything before it is delivered: pass the
    // half-close on, keeping the other direction open.
    to.shutdown(Shutdown::Write).is_ok()
}
