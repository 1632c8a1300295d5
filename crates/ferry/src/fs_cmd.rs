//! `ferry` subcommands for ferry-fs: mount, umount, init, status, sync, fsck.
//!
//! `ferry mount` without `--foreground` behaves like sshfs: it starts the
//! daemon (this binary again, in the foreground mode, in its own session),
//! waits until the kernel has the mount, and returns. The daemon reports
//! "ready" or its one-line error on its stdout, which is a pipe to the
//! parent, so the parent can exit with the daemon's own words. The parent
//! hands the daemon its settings as one `-o` list, and the backend URL,
//! which may hold a password, in the environment (readable by the user
//! alone), never on a command line every user can read.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_backend::Location;
use ferry_fs::mount::{self, MountConfig};
use ferry_fs::replicate::Prefetch;

use crate::logging::LogFormat;
use crate::parse::{parse_duration, parse_size};

/// Set in the environment of a daemon that `ferry mount` started.
const DAEMON_ENV: &str = "FERRY_DAEMON";
/// The backend URL `ferry mount` hands its daemon.
const DAEMON_BACKEND_ENV: &str = "FERRY_DAEMON_BACKEND";

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Mount a ferry volume; returns once the mount is live.
    #[command(after_help = MOUNT_HELP)]
    Mount(MountArgs),
    /// Flush and unmount a ferry volume, and wait for its daemon to finish.
    ///
    /// Also clears a dead ferry mount (its daemon killed), and refuses
    /// anything that is not a ferry mount.
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Detach now, even if busy; the daemon finishes once the last file
        /// in the mount is closed.
        #[arg(short = 'l', long)]
        lazy: bool,
        /// Give up waiting for the daemon after this long (seconds, or with
        /// a unit: 90s, 5m).
        #[arg(long, default_value = "60", value_parser = parse_duration, allow_hyphen_values = true)]
        timeout: Duration,
    },
    /// Create a volume at a backend: `dir:/PATH` or `postgres://…`.
    Init {
        /// Where: `dir:/PATH` (embedded, no server; an absolute path whose
        /// parent exists) or `postgres://user@host/db`.
        #[arg(value_parser = backend_url)]
        backend: Location,
        /// The volume's name.
        #[arg(long, default_value = "ferry")]
        name: String,
    },
    /// Show each mount's state: store, backend, pending changes and bytes,
    /// last contact, conflicts.
    ///
    /// Without a mountpoint: a table of every ferry mount this user may see
    /// (root: all), dead daemons marked as such. With mountpoints (or paths
    /// inside mounts): the details of each. Exits 1 if any could not be
    /// asked.
    Status {
        /// Ferry mountpoints, or paths inside them [default: every mount].
        mounts: Vec<PathBuf>,
        /// Print one JSON object per mount, errors included
        /// (`{"mount": …, "state": "dead", "error": …}`).
        #[arg(long)]
        json: bool,
        /// List the processes whose file-system context is not their
        /// mount's default (set by `ferry run` or inherited): pid, command,
        /// durability, reads, timeout; with --json one object per process.
        #[arg(long)]
        processes: bool,
    },
    /// Wait until everything written before this call is committed at the
    /// backend, showing bytes, rate and ETA.
    Sync {
        /// The ferry mountpoint, or any path inside it (the whole volume is
        /// synced).
        path: PathBuf,
        /// Give up after this long (seconds, or with a unit: 90s, 10m).
        #[arg(long, default_value = "600", value_parser = parse_duration, allow_hyphen_values = true)]
        timeout: Duration,
        /// When stderr is not a terminal, print progress this often.
        #[arg(long, default_value = "5", value_parser = parse_duration, allow_hyphen_values = true)]
        interval: Duration,
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
        #[arg(long, group = "what", value_parser = backend_url)]
        backend: Option<Location>,
    },
}

impl Command {
    /// Whether this command runs a daemon (it then logs more by default).
    pub fn serves(&self) -> bool {
        matches!(self, Command::Mount(args) if args.foreground)
    }
}

const MOUNT_HELP: &str = "\
Every flag has an -o spelling, so one fstab line describes a mount (see `ferry install-helper`):
  /var/lib/ferry/vol /mnt/vol fuse.ferry backend=postgres://ferry@db/vol,cache_size=20G,_netdev 0 0
A store that belongs to a backend volume is refused without --backend (or -o nobackend).";

/// Arguments of `ferry mount`. Each setting flag overrides the same
/// setting in `-o`.
#[derive(clap::Args)]
pub struct MountArgs {
    /// Local store directory [default: $XDG_DATA_HOME/ferry/NAME or
    /// ~/.local/share/ferry/NAME, NAME being the mountpoint's path with `/`
    /// as `-`, and `-` and `%` in it as `%2D` and `%25`].
    #[arg(long)]
    store: Option<PathBuf>,
    /// Mount options, comma-separated: allow_other, ro, rw, [no]passthrough,
    /// nodev, nosuid, noexec, threads=N (1-64), [no]io_uring, backend=URL, nobackend,
    /// max_backlog=SIZE, cache_size=SIZE, prefetch=none|small|all,
    /// prefetch_max_file=SIZE, metrics=ADDR:PORT; fstab's own (defaults,
    /// _netdev, nofail, x-*, …) are ignored.
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Stay in the foreground and serve until unmounted.
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Replicate to this backend (`dir:/PATH` or `postgres://…`, made by
    /// `ferry init`); without it the volume stays local [-o backend=URL].
    #[arg(long, value_parser = backend_url)]
    backend: Option<Location>,
    /// Mount a store that belongs to a backend volume without replicating;
    /// its changes wait in its log [-o nobackend].
    #[arg(long)]
    no_backend: bool,
    /// Pending bytes above which writers slow down (K, M, G, T suffixes)
    /// [default: 1G] [-o max_backlog=SIZE].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    max_backlog: Option<u64>,
    /// With a backend: bytes of file contents kept cached locally; clean
    /// files beyond it are evicted, least recently used first (0: no
    /// limit) [default: 0] [-o cache_size=SIZE].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    cache_size: Option<u64>,
    /// With a backend: which contents to fetch in the background, `none`,
    /// `small` (files up to --prefetch-max-file) or `all` [default: small]
    /// [-o prefetch=…].
    #[arg(long, value_parser = |s: &str| s.parse::<Prefetch>())]
    prefetch: Option<Prefetch>,
    /// Largest file `--prefetch small` fetches [default: 1M]
    /// [-o prefetch_max_file=SIZE].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    prefetch_max_file: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT or
    /// localhost:PORT) [-o metrics=ADDR].
    #[arg(long, value_name = "ADDR", value_parser = mount::parse_listen_addr)]
    metrics: Option<SocketAddr>,
    /// Where to mount.
    mountpoint: PathBuf,
}

/// A backend URL, parsed once, here (clap's value parser): a bad one fails
/// with the arguments.
fn backend_url(url: &str) -> Result<Location, String> {
    mount::parse_backend_url(url)
}

/// Runs one subcommand.
pub fn run(command: Command, log_format: LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Mount(args) => mount_cmd(args, log_format),
        Command::Umount {
            mountpoint,
            lazy,
            timeout,
        } => umount_cmd(&mountpoint, lazy, timeout),
        Command::Init { backend, name } => init_cmd(&backend, &name),
        Command::Status {
            mounts,
            json,
            processes: false,
        } => crate::status::run(&mounts, json),
        Command::Status {
            mounts,
            json,
            processes: true,
        } => crate::status::run_processes(&mounts, json),
        Command::Sync {
            path,
            timeout,
            interval,
        } => crate::sync::run(&path, timeout, interval),
        Command::Fsck {
            store,
            verify,
            backend,
        } => {
            if let Some(store) = &store {
                fsck_store(store, verify)?;
            }
            if let Some(location) = &backend {
                fsck_backend(location)?;
            }
            Ok(())
        }
    }
}

fn init_cmd(location: &Location, name: &str) -> anyhow::Result<()> {
    // A dir: volume gets its own new directory, never missing parents: a
    // typo must not leave a tree of directories somewhere unexpected.
    let new_dir = match location {
        Location::Dir(dir) if !dir.try_exists().unwrap_or(true) => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                bail!(
                    "{} does not exist: create it first (ferry init creates only the volume's \
                     own directory, {})",
                    parent.display(),
                    dir.display()
                );
            }
            Some(dir)
        }
        _ => None,
    };
    let info = location.init(name)?;
    println!(
        "created volume {:?} ({}) at {}{}",
        info.name,
        info.volume_id,
        location,
        new_dir.map_or(String::new(), |d| format!(
            " (in the new directory {})",
            d.display()
        ))
    );
    Ok(())
}

fn fsck_store(store: &Path, verify: bool) -> anyhow::Result<()> {
    mount::check_store_access(store)?;
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

fn fsck_backend(location: &Location) -> anyhow::Result<()> {
    let shown = ferry_backend::redact(&location.url());
    let backend = location.open(ferry_fs::replicate::CONNECT_TIMEOUT)?;
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

/// The settings of a mount: `-o` lists first, then the flags, which win.
fn config(args: MountArgs, store: PathBuf) -> anyhow::Result<MountConfig> {
    let mut cfg = MountConfig::new(store, args.mountpoint);
    for opts in &args.options {
        cfg.apply_options(opts)?;
    }
    if std::env::var_os(DAEMON_ENV).is_some() {
        if let Some(url) = std::env::var_os(DAEMON_BACKEND_ENV) {
            cfg.backend = Some(
                url.into_string()
                    .map_err(|_| anyhow::anyhow!("{DAEMON_BACKEND_ENV} is not valid UTF-8"))?
                    .parse()?,
            );
        }
    }
    if args.backend.is_some() {
        cfg.backend = args.backend;
    }
    cfg.no_backend |= args.no_backend;
    if cfg.backend.is_some() && cfg.no_backend {
        bail!("--no-backend (nobackend) contradicts the backend given");
    }
    cfg.max_backlog = args.max_backlog.unwrap_or(cfg.max_backlog);
    cfg.cache_size = args.cache_size.unwrap_or(cfg.cache_size);
    cfg.prefetch = args.prefetch.unwrap_or(cfg.prefetch);
    cfg.prefetch_max_file = args.prefetch_max_file.unwrap_or(cfg.prefetch_max_file);
    cfg.metrics = args.metrics.or(cfg.metrics);
    Ok(cfg)
}

fn mount_cmd(args: MountArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let foreground = args.foreground;
    let store = args.store.clone();
    // Options first: a typo in them is the first thing to hear about.
    let mut cfg = config(args, PathBuf::new())?;
    cfg.store = match store {
        Some(s) => s,
        None => {
            let chosen = mount::default_store(&data_dir()?, &cfg.mountpoint)?;
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
    if foreground {
        serve(&cfg)
    } else {
        // Fail fast, in the caller's terminal, on what can be seen from here.
        mount::check_store_access(&cfg.store)?;
        mount::preflight(&cfg.mountpoint)?;
        start_daemon(&cfg, log_format)
    }
}

/// Re-executes this binary as the daemon and waits for its verdict.
fn start_daemon(cfg: &MountConfig, log_format: LogFormat) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.store)
        .with_context(|| format!("creating store {}", cfg.store.display()))?;
    let log_path = cfg.store.join("ferry.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    let format = match log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    cmd.args(["--log-format", format, "mount", "--foreground", "--store"])
        .arg(&cfg.store)
        .arg("-o")
        .arg(cfg.options_without_backend())
        .arg(&cfg.mountpoint)
        .env(DAEMON_ENV, "1")
        .env_remove(DAEMON_BACKEND_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    if let Some(location) = &cfg.backend {
        cmd.env(DAEMON_BACKEND_ENV, location.url());
    }
    let mut child = cmd.spawn().context("starting the ferry daemon")?;
    let stdout = child.stdout.take().context("the daemon's stdout")?;
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
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
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

fn umount_cmd(path: &Path, lazy: bool, timeout: Duration) -> anyhow::Result<()> {
    let Some(entry) = mount::mount_at(path) else {
        if let Some(m) = mount::ferry_mount_containing(path) {
            bail!(
                "{} is not a mountpoint: it is inside the ferry mount {}",
                path.display(),
                m.mountpoint.display()
            );
        }
        bail!("{} is not mounted", path.display());
    };
    if !entry.is_ferry() {
        bail!(
            "{} is not a ferry mount (it is a {} mount of {}); refusing to unmount it",
            path.display(),
            entry.fstype,
            entry.source
        );
    }
    let point = &entry.mountpoint;
    let dead = mount::is_dead(point);
    match mount::unmount(point, lazy) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
            "{} is busy: a process has a file open or its working directory in it (`fuser -vm {}` \
             lists them); close them, or detach it now with `ferry umount -l {}`",
            point.display(),
            point.display(),
            point.display()
        ),
        result => result.with_context(|| format!("unmounting {}", point.display()))?,
    }
    if dead {
        println!(
            "cleared the dead ferry mount {} (its daemon was gone); `ferry mount` serves it again",
            point.display()
        );
        return Ok(());
    }
    if lazy {
        println!(
            "detached {}; its daemon finishes once the last file in it is closed",
            point.display()
        );
        return Ok(());
    }
    // The daemon holds the store's lock until it has closed the store; once
    // the lock is free, the volume is fully at rest and may be mounted again.
    let lock = entry.store().join("lock");
    let at_rest = wait_until(timeout, || match std::fs::File::open(&lock) {
        Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_ok(),
        // Not a ferry store we can see: nothing to wait for.
        Err(_) => true,
    });
    if at_rest {
        return Ok(());
    }
    bail!(
        "unmounted {}, but its daemon did not finish within {:?}",
        point.display(),
        timeout
    )
}

/// Polls `done` every 20 ms until it holds (true) or `timeout` has passed
/// (false; a timeout too large to add to now waits for good).
pub(crate) fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now().checked_add(timeout);
    loop {
        if done() {
            return true;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
