//! The daemon's control socket, `STORE/control.sock`: how `ferry status`
//! and `ferry sync` reach a running daemon, whose store nobody else may open.
//!
//! The protocol is one request line (`status` or `sync`) answered by JSON
//! lines: `status` gets one [`Report`]; `sync` gets a report every 200 ms
//! until everything logged before the request is committed at the backend,
//! then a last one with `done: true`. The client bounds the wait.
//!
//! `sync` is where invariant I1 is kept (see [`crate::replicate`]): files
//! open for writing are logged first, so their current bytes are waited
//! for too, and it is done only once this daemon run has checked the
//! backend is the store's volume. Conflicts kept along the way are in the
//! report; a client must not call a sync with conflicts a success.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::replicate::{Shared, Status};
use crate::store::Queries;
use crate::vfs::Vfs;

/// What one answer line carries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The store directory.
    pub store: String,
    /// Whether the volume has no backend (nothing is ever pending).
    pub local_only: bool,
    /// The replicator's view.
    #[serde(flatten)]
    pub status: Status,
    /// For `sync`: the record it waits for.
    pub target_seq: Option<u64>,
    /// For `sync`: the last line, everything up to `target_seq` is committed.
    pub done: bool,
}

/// The socket path of a store.
pub fn socket_path(store: &Path) -> PathBuf {
    store.join("control.sock")
}

/// Serves the control socket of `vfs`'s store on a thread, for the life of
/// the daemon.
pub fn serve(vfs: Arc<Vfs>, replication: Option<Arc<Shared>>) -> std::io::Result<()> {
    let path = socket_path(vfs.store().dir());
    // A socket file left by a killed daemon: the store lock proves no live
    // daemon owns it, so it is safe to replace.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new()
        .name("ferry-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (vfs, replication) = (vfs.clone(), replication.clone());
                let spawned = std::thread::Builder::new()
                    .name("ferry-control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &vfs, replication.as_deref()) {
                            warn!("control request: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("control: {e}");
                }
            }
        })?;
    Ok(())
}

fn report(vfs: &Vfs, replication: Option<&Shared>) -> Report {
    let status = match replication {
        Some(r) => r.status(vfs.store()),
        None => {
            let head = vfs.store().read(|r| r.log_head()).unwrap_or(0);
            Status {
                shipped_seq: head,
                head_seq: head,
                ..Status::default()
            }
        }
    };
    Report {
        store: vfs.store().dir().display().to_string(),
        local_only: replication.is_none(),
        status,
        ..Report::default()
    }
}

fn answer(conn: UnixStream, vfs: &Vfs, replication: Option<&Shared>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut out = &conn;
    let send = |out: &mut &UnixStream, r: &Report| -> std::io::Result<()> {
        let mut json = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        json.push(b'\n');
        out.write_all(&json)
    };
    match line.trim() {
        "status" => send(&mut out, &report(vfs, replication)),
        "sync" => {
            let _urgent = replication.map(Shared::urgent);
            vfs.log_open_writers()
                .map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
            // Everything logged so far is durable locally first.
            vfs.store().sync()?;
            let target = vfs
                .store()
                .read(|r| r.log_head())
                .map_err(std::io::Error::other)?;
            // Bounded by the client: when it gives up and closes, the
            // next write fails and this loop ends.
            loop {
                let mut r = report(vfs, replication);
                r.target_seq = Some(target);
                r.done = r.local_only || (r.status.verified && r.status.shipped_seq >= target);
                send(&mut out, &r)?;
                if r.done {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        other => Err(std::io::Error::other(format!("unknown request {other:?}"))),
    }
}

/// Client side: sends `request` to the daemon of `store` and returns the
/// answer lines as they come.
pub fn request(
    store: &Path,
    request: &str,
) -> std::io::Result<impl Iterator<Item = std::io::Result<Report>>> {
    let conn = UnixStream::connect(socket_path(store))?;
    (&conn).write_all(format!("{request}\n").as_bytes())?;
    Ok(BufReader::new(conn)
        .lines()
        .map(|line| serde_json::from_str(&line?).map_err(std::io::Error::other)))
}
