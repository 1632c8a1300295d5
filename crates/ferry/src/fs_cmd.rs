//! `ferry` subcommands for ferry-fs: mount, umount, fsck.
//!
//! `ferry mount` without `--foreground` behaves like sshfs: it starts the
//! daemon (this binary again, in the foreground mode, in its own session),
//! waits until the kernel has the mount, and returns. The daemon reports
//! "ready" or its one-line error on its stdout, which is a pipe to the
//! parent, so the parent can exit with the daemon's own words.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_fs::control;
use ferry_fs::mount::{self, MountConfig};

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Mount a ferry volume; returns once the mount is live.
    Mount(MountArgs),
    /// Flush and unmount a ferry volume, and wait for its daemon to finish.
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Give up waiting for the daemon after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Create a volume at a backend: `dir:PATH` or `postgres://…`.
    Init {
        /// Where: `dir:PATH` (embedded, no server) or `postgres://user@host/db`.
        backend: String,
        /// The volume's name.
        #[arg(long, default_value = "ferry")]
        name: String,
    },
    /// Show replication state: pending changes, last contact, errors, conflicts.
    Status {
        /// A ferry mountpoint [default: every ferry mount].
        mountpoint: Option<PathBuf>,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Wait until everything written before this call is committed at the backend.
    Sync {
        /// The ferry mountpoint.
        mountpoint: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Check offline that a store is intact and its change log matches it,
    /// or that a backend volume is whole.
    #[command(group = clap::ArgGroup::new("what").required(true).multiple(true))]
    Fsck {
        /// The store directory (the daemon must not be running on it).
        #[arg(long, group = "what")]
        store: Option<PathBuf>,
        /// Also rehash the store's cached files that were shipped and not
        /// changed since, against their chunk lists.
        #[arg(long, requires = "store")]
        verify: bool,
        /// Check the invariants of the volume at this backend.
        #[arg(long, group = "what")]
        backend: Option<String>,
    },
}

/// Arguments of `ferry mount`.
#[derive(clap::Args)]
pub struct MountArgs {
    /// Local store directory [default: $XDG_DATA_HOME/ferry/NAME or
    /// ~/.local/share/ferry/NAME, NAME being the mountpoint's path with `/`
    /// as `-`, and `-` and `%` in it as `%2D` and `%25`].
    #[arg(long)]
    store: Option<PathBuf>,
    /// Mount options: allow_other, default_permissions, ro, rw, threads=N,
    /// plus fstab's usual ones (ignored).
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Stay in the foreground and serve until unmounted.
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Replicate to this backend (`dir:PATH` or `postgres://…`, made by
    /// `ferry init`); without it the volume stays local.
    #[arg(long)]
    backend: Option<String>,
    /// Pending bytes above which writers slow down (suffixes K, M, G).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    max_backlog: u64,
    /// With a backend: bytes of file contents kept cached locally; clean
    /// files beyond it are evicted, least recently used first (0: no limit).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    cache_size: u64,
    /// Where to mount.
    mountpoint: PathBuf,
}

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Mount(args) => mount_cmd(args),
        Command::Umount {
            mountpoint,
            timeout,
        } => umount_cmd(&mountpoint, Duration::from_secs(timeout)),
        Command::Init { backend, name } => {
            let info = ferry_backend::init(&backend, &name)?;
            println!(
                "created volume {:?} ({}) at {}",
                info.name,
                info.volume_id,
                ferry_backend::redact(&backend)
            );
            Ok(())
        }
        Command::Status { mountpoint, json } => status_cmd(mountpoint.as_deref(), json),
        Command::Sync {
            mountpoint,
            timeout,
        } => sync_cmd(&mountpoint, Duration::from_secs(timeout)),
        Command::Fsck {
            store,
            verify,
            backend,
        } => {
            if let Some(store) = &store {
                fsck_store(store, verify)?;
            }
            if let Some(url) = &backend {
                fsck_backend(url)?;
            }
            Ok(())
        }
    }
}

fn fsck_store(store: &Path, verify: bool) -> anyhow::Result<()> {
    let report = ferry_fs::fsck::check(store)?;
    println!(
        "{}: ok: {} inodes, {} entries, {} log records, {} stray data files",
        store.display(),
        report.inodes,
        report.entries,
        report.records,
        report.stray_data_files
    );
    if !verify {
        return Ok(());
    }
    let v = ferry_fs::fsck::verify(store)?;
    for damage in &v.damaged {
        println!("{}: damaged: {damage}", store.display());
    }
    let summary = format!(
        "{} files ({} bytes) rehashed, {} skipped (changed since shipped, never shipped, or empty)",
        v.files, v.bytes, v.skipped
    );
    if v.damaged.is_empty() {
        println!("{}: contents ok: {summary}", store.display());
        Ok(())
    } else {
        bail!(
            "store {} is damaged in {} places: {summary}",
            store.display(),
            v.damaged.len()
        )
    }
}

fn fsck_backend(url: &str) -> anyhow::Result<()> {
    let shown = ferry_backend::redact(url);
    let backend = ferry_backend::open(url, ferry_fs::replicate::CONNECT_TIMEOUT)?;
    let violations = ferry_backend::check(&*backend)?;
    for v in &violations {
        println!("{shown}: violation: {v}");
    }
    if violations.is_empty() {
        println!("{shown}: ok: the volume is whole");
        Ok(())
    } else {
        bail!("backend {shown} has {} violations", violations.len())
    }
}

/// Rewrites a `mount.fuse.ferry SOURCE MOUNTPOINT [-o OPTS]` invocation —
/// how mount(8) and /etc/fstab call a `fuse.ferry` file system — into
/// `ferry mount --store SOURCE [-o OPTS] MOUNTPOINT`. Other argv pass through.
pub fn mount_helper_argv(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let args: Vec<OsString> = args.collect();
    let invoked_as = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if !matches!(invoked_as, "mount.fuse.ferry" | "mount.ferry") {
        return args;
    }
    let mut out: Vec<OsString> = vec!["ferry".into(), "mount".into()];
    let mut positional = Vec::new();
    let mut rest = args.into_iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.to_str() {
            Some("-o") => {
                out.push("-o".into());
                out.extend(rest.next());
            }
            // mount(8) passes -n (no mtab), -s (sloppy), -v (verbose): none
            // change what ferry does.
            Some("-n" | "-s" | "-v" | "-f") => {}
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    if let Some(source) = positional.next() {
        out.push("--store".into());
        out.push(source);
    }
    out.extend(positional);
    out
}

/// Where default stores live: `$XDG_DATA_HOME/ferry`, or
/// `~/.local/share/ferry`.
fn data_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_DATA_HOME nor HOME is set")?,
        )
        .join(".local/share"),
    };
    Ok(base.join("ferry"))
}

fn mount_cmd(args: MountArgs) -> anyhow::Result<()> {
    let store = match args.store {
        Some(s) => s,
        None => {
            let chosen = mount::default_store(&data_dir()?, &args.mountpoint)?;
            if let Some(old) = &chosen.moved_from {
                eprintln!(
                    "ferry: moved store {} to {}, its name now that no two mountpoints share one",
                    old.display(),
                    chosen.path.display()
                );
            }
            chosen.path
        }
    };
    let mut cfg = MountConfig::new(store, args.mountpoint.clone());
    cfg.backend = args.backend.clone();
    cfg.max_backlog = args.max_backlog;
    cfg.cache_size = args.cache_size;
    for opts in &args.options {
        cfg.apply_options(opts)?;
    }
    if args.foreground {
        serve(&cfg)
    } else {
        // Fail fast, in the caller's terminal, on what can be seen from here.
        mount::preflight(&cfg.mountpoint)?;
        start_daemon(&cfg, &args.options)
    }
}

/// Re-executes this binary as the daemon and waits for its verdict.
fn start_daemon(cfg: &MountConfig, options: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.store)
        .with_context(|| format!("creating store {}", cfg.store.display()))?;
    let log_path = cfg.store.join("ferry.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("mount")
        .arg("--foreground")
        .arg("--store")
        .arg(&cfg.store)
        .arg("--max-backlog")
        .arg(cfg.max_backlog.to_string())
        .arg("--cache-size")
        .arg(cfg.cache_size.to_string());
    if let Some(b) = &cfg.backend {
        cmd.arg("--backend").arg(b);
    }
    for o in options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(&cfg.mountpoint)
        .env("FERRY_DAEMON", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut child = cmd.spawn().context("starting the ferry daemon")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    // Bounded: the daemon answers or exits (EOF) once the mount is settled.
    BufReader::new(stdout).read_line(&mut line)?;
    match line.trim_end() {
        "ready" => Ok(()),
        "" => {
            let status = child.wait()?;
            bail!(
                "the ferry daemon exited ({status}) before mounting; see {}",
                log_path.display()
            )
        }
        err => {
            let _ = child.wait();
            bail!("{}", err.strip_prefix("error: ").unwrap_or(err))
        }
    }
}

/// The daemon: mounts, reports, serves until unmounted or signalled.
fn serve(cfg: &MountConfig) -> anyhow::Result<()> {
    let daemon = std::env::var_os("FERRY_DAEMON").is_some();
    if daemon {
        // Leave the caller's session, so its hangup does not reach us.
        let _ = nix::unistd::setsid();
    }
    // Block the stop signals in every thread fuser will start; one thread
    // waits for them and unmounts, which ends the session cleanly.
    let signals = stop_signals();
    signals.thread_block()?;
    let mut mounted = match mount::mount(cfg) {
        Ok(m) => m,
        Err(e) => {
            if daemon {
                println!("error: {e}");
            }
            return Err(e.into());
        }
    };
    let mut unmounter = mounted.unmounter();
    std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!("{sig}: unmounting");
                if let Err(e) = unmounter.unmount() {
                    tracing::error!("unmount on {sig}: {e}");
                }
            }
        })?;
    if daemon {
        let mut out = std::io::stdout();
        writeln!(out, "ready")?;
        out.flush()?;
        // The parent has its answer; later output belongs in the log.
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        nix::unistd::dup2_stdout(&null)?;
    }
    mounted.run().context("serving the mount")
}

fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

fn umount_cmd(mountpoint: &Path, timeout: Duration) -> anyhow::Result<()> {
    let Some(source) = mount::mounted_source(mountpoint) else {
        bail!("{} is not mounted", mountpoint.display());
    };
    mount::unmount(mountpoint).with_context(|| format!("unmounting {}", mountpoint.display()))?;
    // The daemon holds the store's lock until it has closed the store; once
    // the lock is free, the volume is fully at rest and may be mounted again.
    let lock = Path::new(&source).join("lock");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match std::fs::File::open(&lock) {
            Ok(f) => {
                if nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_ok() {
                    return Ok(());
                }
            }
            // Not a ferry store we can see: nothing to wait for.
            Err(_) => return Ok(()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "unmounted {}, but its daemon did not finish within {}s",
        mountpoint.display(),
        timeout.as_secs()
    )
}

/// Parses a byte count with an optional K, M, G or T suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// The store behind a ferry mountpoint.
fn store_of(mountpoint: &Path) -> anyhow::Result<PathBuf> {
    mount::mounted_source(mountpoint)
        .map(PathBuf::from)
        .filter(|s| control::socket_path(s).exists())
        .with_context(|| format!("{} is not a ferry mount", mountpoint.display()))
}

fn status_cmd(mountpoint: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let stores = match mountpoint {
        Some(m) => vec![store_of(m)?],
        None => mount::ferry_stores(),
    };
    if stores.is_empty() {
        bail!("no ferry volume is mounted");
    }
    for store in stores {
        let report = control::request(&store, "status")
            .with_context(|| format!("asking the daemon of {}", store.display()))?
            .next()
            .context("the daemon closed the connection")??;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_status(&report);
        }
    }
    Ok(())
}

fn print_status(r: &control::Report) {
    let s = &r.status;
    println!("store:    {}", r.store);
    if r.local_only {
        println!("backend:  none (local only)");
        return;
    }
    println!("backend:  {}", s.backend);
    let age = s
        .oldest_pending_age_s
        .map_or(String::new(), |a| format!(", oldest {a:.1}s old"));
    println!(
        "pending:  {} changes, {} bytes{age}",
        s.pending_ops, s.pending_bytes
    );
    let contact = s.last_contact.map_or("never".to_string(), |t| {
        let ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
            - t;
        format!("{ago:.1}s ago")
    });
    println!("contact:  {contact}");
    println!(
        "errors:   {}{}",
        s.errors,
        s.last_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (last: {e})"))
    );
    println!("conflicts: {}", s.conflicts);
}

fn sync_cmd(mountpoint: &Path, timeout: Duration) -> anyhow::Result<()> {
    let store = store_of(mountpoint)?;
    let deadline = Instant::now() + timeout;
    // Dirty pages the kernel still holds for the mount (its writeback
    // cache, when files are not passed through) reach the daemon first, so
    // the sync covers them too.
    let root = std::fs::File::open(mountpoint)
        .with_context(|| format!("opening {}", mountpoint.display()))?;
    nix::unistd::syncfs(&root).with_context(|| format!("syncfs {}", mountpoint.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let store = store.clone();
        // The reader thread ends when the daemon finishes or the socket
        // closes; we stop listening at the deadline either way.
        std::thread::spawn(move || match control::request(&store, "sync") {
            Ok(lines) => {
                for line in lines {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        });
    }
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} syncing {pos}/{len} changes {msg}")
                .expect("static template"),
        );
        bar
    });
    let mut start: Option<u64> = None;
    let mut last_error = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let report = match rx.recv_timeout(left) {
            Ok(r) => r.context("talking to the daemon")?,
            Err(_) => bail!(
                "sync: not everything is at the backend after {}s{}",
                timeout.as_secs(),
                last_error.map_or(String::new(), |e| format!(" (last error: {e})"))
            ),
        };
        last_error.clone_from(&report.status.last_error);
        if report.local_only {
            return Ok(());
        }
        let target = report.target_seq.unwrap_or(report.status.head_seq);
        let first = *start.get_or_insert(report.status.shipped_seq);
        if let Some(bar) = &bar {
            bar.set_length(target.saturating_sub(first));
            bar.set_position(report.status.shipped_seq.min(target).saturating_sub(first));
            bar.set_message(report.status.last_error.clone().unwrap_or_default());
        }
        if report.done {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            // Held back, so not at the backend: a restore would differ.
            let held = report.status.conflicts;
            if held > 0 {
                bail!(
                    "sync: {held} change(s) are held back by conflicts and are not at the \
                     backend; see `ferry status`"
                );
            }
            return Ok(());
        }
    }
}
