//! Test support: a throwaway PostgreSQL cluster (feature `testing`).
//!
//! [`PgServer`] drives `scripts/pg-test-server.sh` (the one place that knows
//! how to initdb/start/stop a cluster) with a timeout on every step, and
//! removes the cluster when dropped. Because a test binary never drops its
//! statics, each server also starts a watchdog (`pg-test-server.sh watch`)
//! that removes the cluster once the test process has exited, so a shared
//! [`PgServer::shared`] cluster does not outlive `cargo test`.
//!
//! Missing PostgreSQL binaries make [`PgServer::start`] panic with the
//! install command; tests fail rather than silently skip.
//!
//! ```no_run
//! use ferry_backend::testing::PgServer;
//! let pg = PgServer::shared();
//! let url = pg.create_database("my_test"); // postgres://ferry:…@127.0.0.1:PORT/my_test
//! ferry_backend::init(&url, "vol").unwrap();
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Upper bound for one script step (initdb, pg_ctl start -t 30, stop -t 30).
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// A PostgreSQL cluster in a temp directory, listening on 127.0.0.1.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    url: String,
    watchdog: Child,
}

impl PgServer {
    /// Path of the script, found from this crate's source tree.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-server.sh")
    }

    /// Creates and starts a new cluster (panics with the reason on failure).
    pub fn start() -> PgServer {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        // The watchdog first: even if `start` fails half-way, the directory goes.
        let watchdog = Command::new(Self::script())
            .arg("watch")
            .arg(std::process::id().to_string())
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning pg-test-server.sh watch");
        let url = run_script(&["start".as_ref(), dir.as_os_str()]);
        PgServer { dir, url, watchdog }
    }

    /// One cluster per test binary, started on first use.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(PgServer::start)
    }

    /// Superuser URL (database `postgres`), with the password in it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The cluster's password (also inside [`PgServer::url`]).
    pub fn password(&self) -> String {
        std::fs::read_to_string(self.dir.join("password")).expect("reading cluster password")
    }

    /// (Re)creates an empty database `name` and returns its URL; tests use
    /// one database each so they can share a cluster.
    pub fn create_database(&self, name: &str) -> String {
        run_script(&["createdb".as_ref(), self.dir.as_os_str(), name.as_ref()])
    }

    /// Runs `sql` in database `db` with psql (for tests that tamper with
    /// stored data); returns psql's unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        run_script(&[
            "psql".as_ref(),
            self.dir.as_os_str(),
            db.as_ref(),
            sql.as_ref(),
        ])
    }

    /// Fast shutdown (`pg_ctl stop -m fast`): clients see their connections
    /// dropped and new ones refused. Data is kept for [`PgServer::restart`].
    pub fn stop(&self) {
        run_script(&["stop".as_ref(), self.dir.as_os_str()]);
    }

    /// Starts a stopped cluster again, on the same port.
    pub fn restart(&self) {
        run_script(&["start".as_ref(), self.dir.as_os_str()]);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("remove")
            .arg(&self.dir)
            .status();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// Runs one script step with a timeout; returns its trimmed stdout.
fn run_script(args: &[&std::ffi::OsStr]) -> String {
    let mut child = Command::new(PgServer::script())
        .args(args)
        .env("FERRY_PG_NO_INSTALL", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning scripts/pg-test-server.sh");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while child
        .try_wait()
        .expect("waiting for pg-test-server.sh")
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pg-test-server.sh {args:?} timed out after {STEP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child
        .wait_with_output()
        .expect("reading pg-test-server.sh output");
    assert!(
        out.status.success(),
        "pg-test-server.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
