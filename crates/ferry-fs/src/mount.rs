//! Mounting and unmounting a volume: option parsing, preflight checks that
//! turn the common failures into one clear sentence, the mount table, and
//! the FUSE session.
//!
//! ferry always asks the kernel for `default_permissions`: the kernel then
//! enforces mode bits, ownership rules for chmod/chown/utimes, and sticky
//! directories with its cached attributes, which is both faster than a round
//! trip per check and exactly the kernel's own semantics.
//!
//! Every setting of a mount has an `-o` spelling ([`MountConfig::apply_options`]),
//! so one fstab line describes a replicated mount completely, and the kernel
//! lists every ferry mount with type `fuse.ferry` and its store as source:
//! that is how `ferry umount` and `ferry status` find ferry mounts and refuse
//! anything else.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_backend::Location;
use fuser::{Config, IoUringConfig, MountOption, Session, SessionACL, SessionUnmounter, Transport};
use tracing::{info, warn};

use crate::binding::{self, BindingError, Bound};
use crate::cache::Evictor;
use crate::control;
use crate::error::StoreError;
use crate::fuse::{FerryFs, NotifierSlot};
use crate::ids::Seq;
use crate::replicate::{self, Replication};
use crate::store::{Queries, Store};
use crate::vfs::Vfs;

/// The file system type the kernel lists ferry mounts under.
pub const FSTYPE: &str = "fuse.ferry";

/// How to mount a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountConfig {
    /// The local store directory.
    pub store: PathBuf,
    /// Where to mount it.
    pub mountpoint: PathBuf,
    /// Let other users in (`allow_other`).
    pub allow_other: bool,
    /// Mount read-only (`ro`).
    pub read_only: bool,
    /// FUSE request threads, each with its own cloned `/dev/fuse` fd.
    pub threads: usize,
    /// Serve requests over io_uring (`-o io_uring`): a ring per CPU, its
    /// thread pinned to that CPU, so a request is answered on the CPU that
    /// made it (2–3× on small-file metadata on a loaded VM, see
    /// docs/benchmarks.md). Needs Linux 6.14+ with
    /// `/sys/module/fuse/parameters/enable_uring` = Y; without, the mount
    /// serves through `/dev/fuse` and says so in its log. Off by default
    /// while it is new.
    pub io_uring: bool,
    /// Pass open files through to their data files when the kernel and
    /// privileges allow (`-o passthrough`, the default, or `nopassthrough`).
    pub passthrough: bool,
    /// Ignore device files (`nodev`); only root mounts honour them anyway.
    pub nodev: bool,
    /// Ignore set-user/group-ID bits (`nosuid`); ditto.
    pub nosuid: bool,
    /// Refuse to execute files (`noexec`).
    pub noexec: bool,
    /// The shared backend to replicate to (`dir:PATH`, `postgres://…`);
    /// `None` keeps the volume local.
    pub backend: Option<Location>,
    /// Mount a store that belongs to a backend volume without its backend,
    /// on purpose (`nobackend`): its changes wait in the log.
    pub no_backend: bool,
    /// Replication backlog, in bytes, above which writers slow down.
    pub max_backlog: u64,
    /// Bytes of file contents to keep cached when there is a backend
    /// (0: no limit); clean files beyond it are evicted.
    pub cache_size: u64,
    /// Which contents to fetch in the background when there is a backend.
    pub prefetch: replicate::Prefetch,
    /// Largest file [`replicate::Prefetch::Small`] fetches, in bytes.
    pub prefetch_max_file: u64,
    /// Serve Prometheus metrics over HTTP at this address (`metrics=ADDR`).
    pub metrics: Option<SocketAddr>,
}

/// What `-o` accepts, for help texts and error messages.
pub const OPTIONS_HELP: &str = "allow_other, ro, rw, [no]passthrough, nodev, nosuid, noexec, \
threads=N (1-64), [no]io_uring, backend=URL, nobackend, max_backlog=SIZE, cache_size=SIZE, \
prefetch=none|small|all, prefetch_max_file=SIZE, metrics=ADDR:PORT; fstab's own \
(defaults, _netdev, nofail, noauto, user, x-*, comment=…) are accepted and ignored";

/// Most FUSE request threads a mount may ask for.
const MAX_THREADS: usize = 64;

impl MountConfig {
    /// A config with the defaults: private, read-write, two request threads:
    /// requests serialize on the store's one connection, so more threads
    /// only add wake-ups (fs_mark with four processes ran fastest with two,
    /// see docs/benchmarks.md), and requests that wait for the backend are
    /// served off them (see `fuse.rs`), so two cannot stall the mount.
    pub fn new(store: PathBuf, mountpoint: PathBuf) -> MountConfig {
        MountConfig {
            store,
            mountpoint,
            allow_other: false,
            read_only: false,
            threads: 2,
            io_uring: false,
            passthrough: true,
            nodev: false,
            nosuid: false,
            noexec: false,
            backend: None,
            no_backend: false,
            max_backlog: 1 << 30,
            cache_size: 0,
            prefetch: replicate::Prefetch::default(),
            prefetch_max_file: 1 << 20,
            metrics: None,
        }
    }

    /// Applies a comma-separated `-o` list. A value may be put in double
    /// quotes to hold commas (`backend="postgres://h1,h2/db"`), as
    /// libmount allows in fstab. Options that only mount(8), fstab or
    /// systemd care about (`defaults`, `_netdev`, `nofail`, `x-*`, …) are
    /// accepted and ignored; anything unknown is an error, and so is a known
    /// option with a bad or missing value — each with its own message.
    pub fn apply_options(&mut self, opts: &str) -> Result<(), MountError> {
        for opt in split_options(opts)? {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(unquote(v))),
                None => (opt.as_str(), None),
            };
            self.apply(key, value).map_err(|why| match why {
                OptionProblem::Unknown => MountError::BadOption(opt.clone()),
                OptionProblem::Value(why) => MountError::BadValue {
                    option: opt.clone(),
                    why,
                },
            })?;
        }
        if self.backend.is_some() && self.no_backend {
            return Err(MountError::BadValue {
                option: "nobackend".into(),
                why: "contradicts the backend given too".into(),
            });
        }
        Ok(())
    }

    fn apply(&mut self, key: &str, raw: Option<String>) -> Result<(), OptionProblem> {
        if let Some((field, to)) = self.flag(key) {
            return match raw {
                None => {
                    *field = to;
                    Ok(())
                }
                Some(_) => Err(OptionProblem::Value(format!("{key} takes no value"))),
            };
        }
        let need = || {
            raw.clone()
                .ok_or_else(|| OptionProblem::Value(format!("needs a value ({key}=…)")))
        };
        let size = || need().and_then(|v| parse_size(&v).map_err(OptionProblem::Value));
        match key {
            "threads" => self.threads = parse_threads(&need()?).map_err(OptionProblem::Value)?,
            "backend" => {
                self.backend = Some(parse_backend_url(&need()?).map_err(OptionProblem::Value)?);
            }
            "max_backlog" => self.max_backlog = size()?,
            "cache_size" => self.cache_size = size()?,
            "prefetch" => self.prefetch = need()?.parse().map_err(OptionProblem::Value)?,
            "prefetch_max_file" => self.prefetch_max_file = size()?,
            "metrics" => {
                self.metrics = Some(parse_listen_addr(&need()?).map_err(OptionProblem::Value)?)
            }
            // Always on (module docs); accepted for fstab lines that say it.
            "default_permissions" if raw.is_none() => {}
            "default_permissions" => {
                return Err(OptionProblem::Value(format!("{key} takes no value")))
            }
            _ if ignored_option(key) => {}
            _ => return Err(OptionProblem::Unknown),
        }
        Ok(())
    }

    /// The boolean field an option without a value sets, and to what.
    fn flag(&mut self, key: &str) -> Option<(&mut bool, bool)> {
        Some(match key {
            "allow_other" => (&mut self.allow_other, true),
            "ro" => (&mut self.read_only, true),
            "rw" => (&mut self.read_only, false),
            "passthrough" => (&mut self.passthrough, true),
            "nopassthrough" => (&mut self.passthrough, false),
            "io_uring" => (&mut self.io_uring, true),
            "noio_uring" => (&mut self.io_uring, false),
            "nodev" => (&mut self.nodev, true),
            "dev" => (&mut self.nodev, false),
            "nosuid" => (&mut self.nosuid, true),
            "suid" => (&mut self.nosuid, false),
            "noexec" => (&mut self.noexec, true),
            "exec" => (&mut self.noexec, false),
            "nobackend" => (&mut self.no_backend, true),
            _ => return None,
        })
    }

    /// Every setting but the store, the mountpoint and the backend (whose
    /// URL may hold a password) as one `-o` list, which
    /// [`MountConfig::apply_options`] reads back into the same settings:
    /// how `ferry mount` hands its settings to the daemon it starts.
    pub fn options_without_backend(&self) -> String {
        let mut out = Vec::new();
        for (on, name) in [
            (self.allow_other, "allow_other"),
            (self.read_only, "ro"),
            (!self.passthrough, "nopassthrough"),
            (self.io_uring, "io_uring"),
            (self.nodev, "nodev"),
            (self.nosuid, "nosuid"),
            (self.noexec, "noexec"),
            (self.no_backend, "nobackend"),
        ] {
            if on {
                out.push(name.to_string());
            }
        }
        let prefetch = match self.prefetch {
            replicate::Prefetch::None => "none",
            replicate::Prefetch::Small => "small",
            replicate::Prefetch::All => "all",
        };
        out.push(format!("threads={}", self.threads));
        out.push(format!("max_backlog={}", self.max_backlog));
        out.push(format!("cache_size={}", self.cache_size));
        out.push(format!("prefetch={prefetch}"));
        out.push(format!("prefetch_max_file={}", self.prefetch_max_file));
        if let Some(addr) = self.metrics {
            out.push(format!("metrics={addr}"));
        }
        out.join(",")
    }
}

/// Why one `-o` option was refused.
enum OptionProblem {
    Unknown,
    Value(String),
}

/// Options that belong to mount(8), fstab or systemd, not to ferry. The
/// access-time ones are the kernel's business: ferry keeps what it is told.
fn ignored_option(key: &str) -> bool {
    matches!(
        key,
        "defaults"
            | "_netdev"
            | "nofail"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "async"
            | "atime"
            | "noatime"
            | "relatime"
            | "strictatime"
            | "nodiratime"
            | "comment"
    ) || key.starts_with("x-")
}

/// Splits an `-o` list at commas outside double quotes; empty items are
/// dropped.
fn split_options(opts: &str) -> Result<Vec<String>, MountError> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in opts.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if quoted {
        return Err(MountError::BadValue {
            option: opts.to_string(),
            why: "a double quote is not closed".into(),
        });
    }
    out.push(current);
    Ok(out
        .into_iter()
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect())
}

/// A value without the double quotes around it, if it has them.
fn unquote(v: &str) -> String {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
        .to_string()
}

/// Parses `threads=N`.
fn parse_threads(v: &str) -> Result<usize, String> {
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| format!("threads is a number from 1 to {MAX_THREADS}, not {v:?}"))?;
    if (1..=MAX_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("threads must be 1 to {MAX_THREADS}, not {n}"))
    }
}

/// Parses a byte count: digits, optionally with a fraction, and an optional
/// K, M, G, T or P suffix (powers of 1024; `KiB`, `KB` and `k` mean the
/// same). Every refusal says what was wrong; nothing overflows.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("a size may not be empty (e.g. 512M, 20G)".into());
    }
    if text.starts_with('-') {
        return Err(format!("a size cannot be negative: {text:?}"));
    }
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let shift = match suffix.trim_start().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => {
            return Err(format!(
                "not a size: {text:?} (a number with an optional K, M, G, T or P suffix: 512M, 20G)"
            ))
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits_ok(whole) || !digits_ok(fraction) {
        return Err(format!(
            "not a size: {text:?} (a number with an optional K, M, G, T or P suffix: 512M, 20G)"
        ));
    }
    let too_large = || format!("size too large: {text:?} (at most 16 EiB - 1)");
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    // A fraction counts to the byte; digits beyond 2^-50 cannot matter.
    let fraction = &fraction[..fraction.len().min(18)];
    let scaled_fraction = if fraction.is_empty() {
        0
    } else {
        let num: u128 = fraction.parse().map_err(|_| too_large())?;
        (num << shift) / 10u128.pow(fraction.len() as u32)
    };
    let value = whole
        .checked_shl(shift)
        .filter(|v| v >> shift == whole)
        .and_then(|v| v.checked_add(scaled_fraction))
        .ok_or_else(too_large)?;
    u64::try_from(value).map_err(|_| too_large())
}

/// Parses the address a metrics endpoint listens on: `IP:PORT`
/// (`[::1]:PORT` for IPv6) or `localhost:PORT`. Names are not resolved:
/// the address must not depend on a name server.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.strip_prefix("localhost:").map(str::parse::<u16>) {
        Some(Ok(port)) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        _ => Err(format!(
            "not an address to listen on: {s:?} (IP:PORT or localhost:PORT, e.g. 127.0.0.1:9464)"
        )),
    }
}

/// Parses a backend URL without contacting it (see
/// [`ferry_backend::Location`]: `dir:` with an absolute path, or
/// `postgres://`). The message never shows a password.
pub fn parse_backend_url(url: &str) -> Result<Location, String> {
    url.parse::<Location>().map_err(|e| e.to_string())
}

/// Why a mount failed, in words a person can act on.
#[derive(Debug)]
#[non_exhaustive]
pub enum MountError {
    /// The mountpoint does not exist.
    NoMountpoint(PathBuf),
    /// The mountpoint is not a directory.
    NotADirectory(PathBuf),
    /// Something is already mounted there.
    AlreadyMounted(PathBuf),
    /// A FUSE mount whose daemon is gone is still there.
    DeadMount {
        /// The mountpoint.
        path: PathBuf,
        /// Whether it is a ferry mount (else some other FUSE file system's).
        ferry: bool,
    },
    /// `/dev/fuse` is missing.
    NoFuse,
    /// `/dev/fuse` exists but this user may not open it.
    FuseAccess(io::Error),
    /// An unknown `-o` option.
    BadOption(String),
    /// A known option with a bad or missing value, or options that
    /// contradict each other.
    BadValue {
        /// The option as given.
        option: String,
        /// What is wrong with it.
        why: String,
    },
    /// The store directory exists but this user may not use it.
    StoreAccess(PathBuf, io::Error),
    /// The store refused to open.
    Store(StoreError),
    /// The kernel refused the mount.
    Mount(PathBuf, io::Error),
    /// A new host could not restore the volume from its backend.
    Backend(String),
    /// The store is not the backend volume's (see [`crate::binding`]).
    Binding(BindingError),
    /// The store belongs to a backend volume, and no backend was given.
    Unbacked {
        /// The store directory.
        store: PathBuf,
        /// The volume it belongs to.
        bound: Bound,
    },
    /// The metrics endpoint could not listen.
    Metrics(SocketAddr, io::Error),
    /// The mountpoint has no default store yet, but an older ferry's store
    /// under the name it shared with other mountpoints may be its own.
    LegacyStore {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The store under the old name.
        old: PathBuf,
        /// The mountpoint's default store now.
        new: PathBuf,
    },
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::NoMountpoint(p) => write!(f, "mountpoint {} does not exist", p.display()),
            MountError::NotADirectory(p) => {
                write!(f, "mountpoint {} is not a directory", p.display())
            }
            MountError::AlreadyMounted(p) => write!(f, "{} is already mounted", p.display()),
            MountError::DeadMount { path, ferry: true } => write!(
                f,
                "{} is a dead ferry mount (its daemon is gone): clear it with `ferry umount {}`, \
                 then mount again",
                path.display(),
                shell_quote(path)
            ),
            MountError::DeadMount { path, ferry: false } => write!(
                f,
                "{} is a dead FUSE mount of another file system: clear it with `umount {}` \
                 (or `fusermount3 -u {}`)",
                path.display(),
                shell_quote(path),
                shell_quote(path)
            ),
            MountError::NoFuse => write!(
                f,
                "/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3"
            ),
            MountError::FuseAccess(e) => write!(
                f,
                "cannot open /dev/fuse ({e}): it must be mode 0666, as the fuse3 package sets it"
            ),
            MountError::BadOption(o) => {
                write!(f, "unknown mount option {o:?}; known: {OPTIONS_HELP}")
            }
            MountError::BadValue { option, why } => write!(f, "mount option {option}: {why}"),
            MountError::StoreAccess(p, e) => write!(
                f,
                "cannot use store {}: {} (the daemon needs to read, write and enter it)",
                p.display(),
                io_words(e)
            ),
            MountError::Store(e) => e.fmt(f),
            MountError::Mount(p, e) => write!(f, "mounting {}: {e}", p.display()),
            MountError::Backend(e) => {
                write!(f, "cannot restore the volume into the empty store: {e}")
            }
            MountError::Binding(e) => e.fmt(f),
            MountError::Unbacked { store, bound } => {
                let at = bound
                    .backend
                    .as_deref()
                    .map_or(String::new(), |b| format!(" at {b}"));
                write!(
                    f,
                    "store {} belongs to volume {}{at}, and no backend was given: mount it with \
                     --backend URL (-o backend=URL in fstab), or add -o nobackend to mount it \
                     without replicating (its changes then wait in its log)",
                    store.display(),
                    bound.describe()
                )
            }
            MountError::Metrics(addr, e) => {
                write!(f, "cannot serve metrics on {addr}: {}", io_words(e))
            }
            MountError::LegacyStore {
                mountpoint,
                old,
                new,
            } => write!(
                f,
                "{} has no store yet, but {} may be its store from an older ferry, whose default \
                 store names several mountpoints shared: if it is, run mv {} {}; if not, pass \
                 --store {}",
                mountpoint.display(),
                old.display(),
                shell_quote(old),
                shell_quote(new),
                shell_quote(new)
            ),
        }
    }
}

impl std::error::Error for MountError {}

impl From<StoreError> for MountError {
    fn from(e: StoreError) -> MountError {
        MountError::Store(e)
    }
}

/// An OS error in words, without Rust's "(os error N)" tail.
fn io_words(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_lowercase(),
        None => e.to_string(),
    }
}

/// Checks what can be checked before touching the store or the kernel.
pub fn preflight(mountpoint: &Path) -> Result<(), MountError> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::NoMountpoint(mountpoint.to_path_buf()))
        }
        // ENOTCONN: a dead FUSE mount is still a mount.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let ferry = mount_at(mountpoint).is_some_and(|m| m.is_ferry());
            return Err(MountError::DeadMount {
                path: mountpoint.to_path_buf(),
                ferry,
            });
        }
        Err(e) => return Err(MountError::Mount(mountpoint.to_path_buf(), e)),
        Ok(m) if !m.is_dir() => return Err(MountError::NotADirectory(mountpoint.to_path_buf())),
        Ok(_) => {}
    }
    if let Some(m) = mount_at(mountpoint) {
        return Err(if is_dead(&m.mountpoint) {
            MountError::DeadMount {
                path: mountpoint.to_path_buf(),
                ferry: m.is_ferry(),
            }
        } else {
            MountError::AlreadyMounted(mountpoint.to_path_buf())
        });
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(MountError::NoFuse),
        Err(e) => Err(MountError::FuseAccess(e)),
    }
}

/// Whether the FUSE mount at `mountpoint` is dead: its daemon is gone, so
/// the kernel answers ENOTCONN. `statfs` is asked because the kernel always
/// passes it to the daemon, where a `stat` may be answered from its cache.
pub fn is_dead(mountpoint: &Path) -> bool {
    matches!(
        nix::sys::statvfs::statvfs(mountpoint),
        Err(nix::errno::Errno::ENOTCONN)
    )
}

/// Checks that this user may use the store directory `dir` (read, write
/// and enter it), if it exists, so that a permission problem is reported as
/// one instead of as "not a ferry store" (the store's own checks cannot
/// tell a missing database from one they may not see).
pub fn check_store_access(dir: &Path) -> Result<(), MountError> {
    use nix::unistd::AccessFlags;
    let denied = |e: io::Error| MountError::StoreAccess(dir.to_path_buf(), e);
    match dir.try_exists() {
        Ok(false) => return Ok(()),
        Ok(true) => {}
        Err(e) => return Err(denied(e)),
    }
    nix::unistd::access(
        dir,
        AccessFlags::R_OK | AccessFlags::W_OK | AccessFlags::X_OK,
    )
    .map_err(|e| denied(e.into()))?;
    for file in ["meta.db", "journal", "lock"] {
        let path = dir.join(file);
        if path.try_exists().map_err(denied)? {
            nix::unistd::access(&path, AccessFlags::R_OK | AccessFlags::W_OK)
                .map_err(|e| MountError::StoreAccess(path.clone(), e.into()))?;
        }
    }
    Ok(())
}

/// One mount of the mount table (`/proc/self/mountinfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Its source; for ferry, the store directory.
    pub source: String,
    /// The file system type (`fuse.ferry`, `tmpfs`, …).
    pub fstype: String,
    /// For FUSE mounts, the uid that mounted it (`user_id=`).
    pub owner: Option<u32>,
}

impl MountEntry {
    /// Whether this is a ferry mount: type `fuse.ferry`, or (mounted by an
    /// older ferry, which set no subtype as root) a plain `fuse` mount whose
    /// source is a ferry store.
    pub fn is_ferry(&self) -> bool {
        self.fstype == FSTYPE
            || (self.fstype == "fuse" && Path::new(&self.source).join("meta.db").exists())
    }

    /// The store directory of a ferry mount.
    pub fn store(&self) -> PathBuf {
        PathBuf::from(&self.source)
    }

    fn parse(line: &str) -> Option<MountEntry> {
        // Fields: id parent dev root MOUNTPOINT opts ... - fstype SOURCE superopts
        let point = unescape(line.split(' ').nth(4)?);
        let (_, rest) = line.split_once(" - ")?;
        let mut fields = rest.split(' ');
        let fstype = fields.next()?.to_string();
        let source = unescape(fields.next()?);
        let owner = fields
            .next()
            .unwrap_or("")
            .split(',')
            .find_map(|o| o.strip_prefix("user_id=")?.parse().ok());
        Some(MountEntry {
            mountpoint: PathBuf::from(point),
            source,
            fstype,
            owner,
        })
    }
}

/// The mount table of this mount namespace, in mount order.
pub fn mount_table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(MountEntry::parse)
        .collect()
}

/// `path` made absolute with its symbolic links resolved as far as they can
/// be: a dead mount cannot be resolved itself (ENOTCONN), so its parent is,
/// and its name is kept.
pub fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(absolute.clone()),
        _ => absolute,
    }
}

/// The mount whose mountpoint is `path` (the top one, if several are
/// stacked there).
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let target = resolve(path);
    mount_table()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == target)
}

/// The ferry mount that `path` is in or at: the deepest mountpoint above
/// it, if that is a ferry mount.
pub fn ferry_mount_containing(path: &Path) -> Option<MountEntry> {
    let target = resolve(path);
    // Of mounts stacked on one mountpoint, the last (top) one wins a tie.
    mount_table()
        .into_iter()
        .filter(|m| target.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.components().count())
        .filter(MountEntry::is_ferry)
}

/// Every ferry mount in this mount namespace, one per mountpoint.
pub fn ferry_mounts() -> Vec<MountEntry> {
    let mut mounts: Vec<MountEntry> = Vec::new();
    for m in mount_table() {
        // A mount on top of another hides it: keep the top one.
        mounts.retain(|old| old.mountpoint != m.mountpoint);
        mounts.push(m);
    }
    mounts.retain(MountEntry::is_ferry);
    mounts
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The store `ferry mount` uses when none is given: `data_dir/NAME`, where
/// `data_dir` is `$XDG_DATA_HOME/ferry` and NAME is [`store_name`] of the
/// mountpoint's canonical path.
///
/// Older ferry versions named it by replacing `/` with `-`, so `/x/a-b` and
/// `/x/a/b` shared a store. When the new name has no store yet but the old
/// name has one, the store is moved to the new name if this mountpoint is
/// the only existing path the old name can stand for and no daemon holds it;
/// otherwise the mount is refused with the command to move it
/// ([`MountError::LegacyStore`]), never silently started on an empty store.
pub fn default_store(data_dir: &Path, mountpoint: &Path) -> Result<DefaultStore, MountError> {
    let canonical = match std::fs::canonicalize(mountpoint) {
        Ok(p) => p,
        Err(e) => {
            // Say why in preflight's words (missing, dead mount, …).
            preflight(mountpoint)?;
            return Err(MountError::Mount(mountpoint.to_path_buf(), e));
        }
    };
    let path = data_dir.join(store_name(&canonical));
    let fresh = DefaultStore {
        path: path.clone(),
        moved_from: None,
    };
    if path.symlink_metadata().is_ok() {
        return Ok(fresh);
    }
    // The old name came from the path as typed, made absolute.
    let typed = std::path::absolute(mountpoint)
        .map_err(|e| MountError::Mount(mountpoint.to_path_buf(), e))?;
    let typed = typed.to_string_lossy();
    let old_name = legacy_store_name(&typed);
    let old = data_dir.join(&old_name);
    if old == path || !old.join("meta.db").exists() {
        return Ok(fresh);
    }
    let refuse = || MountError::LegacyStore {
        mountpoint: mountpoint.to_path_buf(),
        old: old.clone(),
        new: path.clone(),
    };
    if !sole_claimant(&typed, &old_name) {
        return Err(refuse());
    }
    // Moving a store under a running daemon would pull it from under it.
    let lock = std::fs::File::open(old.join("lock")).map_err(|_| refuse())?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| refuse())?;
    std::fs::rename(&old, &path).map_err(|e| MountError::Mount(old.clone(), e))?;
    Ok(DefaultStore {
        path,
        moved_from: Some(old),
    })
}

/// What [`default_store`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultStore {
    /// The store directory.
    pub path: PathBuf,
    /// Where the store was before [`default_store`] moved it from its old
    /// name, if it did.
    pub moved_from: Option<PathBuf>,
}

/// The default store's name for an absolute, canonical `mountpoint`: its
/// components joined by `-`, with `-` and `%` inside a component written
/// `%2D` and `%25`; the root is `-`. One name per path and one path per
/// name (split at `-`, then undo the escapes), so two mountpoints never
/// share a default store; a path without `-` or `%` keeps its old name.
pub fn store_name(mountpoint: &Path) -> OsString {
    let mut name = Vec::new();
    for part in mountpoint
        .components()
        .filter(|c| !matches!(c, Component::RootDir))
    {
        if !name.is_empty() {
            name.push(b'-');
        }
        for &b in part.as_os_str().as_bytes() {
            match b {
                b'-' | b'%' => write!(name, "%{b:02X}").expect("writing to a Vec"),
                _ => name.push(b),
            }
        }
    }
    if name.is_empty() {
        name.push(b'-');
    }
    OsString::from_vec(name)
}

/// The name older versions gave the default store of `typed` (an absolute
/// path as the user typed it).
fn legacy_store_name(typed: &str) -> String {
    let name = typed.trim_matches('/').replace('/', "-");
    if name.is_empty() {
        "root".into()
    } else {
        name
    }
}

/// Whether `typed` is the only existing path that the old store name
/// `old_name` can have been made from (each `-` was a `/` or a `-`).
fn sole_claimant(typed: &str, old_name: &str) -> bool {
    /// Names with more dashes than this are not searched, just refused.
    const MAX_DASHES: usize = 12;
    let ours = format!("/{}", typed.trim_matches('/'));
    let parts: Vec<&str> = old_name.split('-').collect();
    let dashes = parts.len() - 1;
    // "root" also stood for "/", and lossy names for many byte strings.
    if old_name == "root" || old_name.contains('\u{FFFD}') || dashes > MAX_DASHES {
        return false;
    }
    (0..1u32 << dashes).all(|mask| {
        let mut candidate = format!("/{}", parts[0]);
        for (i, part) in parts[1..].iter().enumerate() {
            candidate.push(if mask & (1 << i) != 0 { '/' } else { '-' });
            candidate.push_str(part);
        }
        candidate == ours
            || matches!(Path::new(&candidate).symlink_metadata(),
                        Err(e) if e.kind() == io::ErrorKind::NotFound)
    })
}

/// `p` as a shell word: as is when it has nothing a shell would read,
/// else in single quotes.
fn shell_quote(p: &Path) -> String {
    let s = p.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-%+,=@~:".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A live mount: the kernel has answered INIT, so the mountpoint works.
pub struct Mounted {
    session: Session<FerryFs>,
    mountpoint: PathBuf,
    /// Stopped (and joined) once the session ends.
    replication: Option<Replication>,
    evictor: Option<Evictor>,
}

impl Mounted {
    /// Serves requests until the volume is unmounted, then stops
    /// replication; what it had not shipped ships at the next mount.
    pub fn run(self) -> io::Result<()> {
        let result = self.session.run();
        // Said before the store closes: `ferry umount` returns once it has.
        match &result {
            Ok(()) => info!("unmounted {}", self.mountpoint.display()),
            Err(e) => warn!("serving {} ended: {e}", self.mountpoint.display()),
        }
        drop(self.evictor);
        drop(self.replication);
        result
    }

    /// A handle that unmounts from another thread (a signal handler thread).
    pub fn unmounter(&mut self) -> SessionUnmounter {
        self.session.unmount_callable()
    }
}

/// How long a mount waits for the backend to confirm that the store is its
/// volume's before mounting without that answer.
const BINDING_CHECK: Duration = Duration::from_millis(1500);

/// Opens the store and mounts it; returns once the mount is live.
pub fn mount(cfg: &MountConfig) -> Result<Mounted, MountError> {
    check_store_access(&cfg.store)?;
    preflight(&cfg.mountpoint)?;
    // Taken before anything else, so a port in use fails the mount early.
    let metrics_listener = cfg
        .metrics
        .map(|addr| TcpListener::bind(addr).map_err(|e| MountError::Metrics(addr, e)))
        .transpose()?;
    let store = Store::open(&cfg.store)?;
    let db = |e| {
        MountError::Store(StoreError::Db {
            path: cfg.store.clone(),
            source: e,
        })
    };
    match &cfg.backend {
        Some(location) => {
            let fresh = store
                .read(|r| {
                    Ok::<_, rusqlite::Error>(r.log_head()? == Seq(0) && r.inode_count()? == 1)
                })
                .map_err(db)?;
            let shown = ferry_backend::redact(&location.url());
            if fresh {
                // A new host: show the volume's whole namespace from the start.
                // This one time the backend must answer; afterwards it never has
                // to. The store is bound to the volume before it holds any of it.
                let started = Instant::now();
                let backend = location
                    .open(replicate::CONNECT_TIMEOUT)
                    .map_err(|e| MountError::Backend(e.to_string()))?;
                binding::verify(&store, &*backend, location).map_err(MountError::Binding)?;
                let restored = replicate::restore(&store, &*backend)
                    .map_err(|e| MountError::Backend(e.to_string()))?;
                info!(
                    "restored {restored} objects from {shown} into {} in {:.1}s",
                    cfg.store.display(),
                    started.elapsed().as_secs_f64()
                );
            } else if binding::verify_within(&store, location, BINDING_CHECK)
                .map_err(MountError::Binding)?
            {
                info!(
                    "{shown} answered: store {} is its volume's",
                    cfg.store.display()
                );
            }
        }
        None => {
            let bound = binding::bound(&store).map_err(MountError::Binding)?;
            match bound {
                Some(bound) if !cfg.no_backend => {
                    return Err(MountError::Unbacked {
                        store: cfg.store.clone(),
                        bound,
                    })
                }
                Some(bound) => warn!(
                    "store {} belongs to volume {} but is mounted without its backend \
                     (nobackend): nothing replicates until it is mounted with one",
                    cfg.store.display(),
                    bound.describe()
                ),
                None => {}
            }
        }
    }
    let vfs = Arc::new(Vfs::new(store, cfg.read_only)?);
    let notifier = NotifierSlot::default();
    let replication = match &cfg.backend {
        Some(location) if !cfg.read_only => Some(
            Replication::start(
                vfs.clone(),
                replicate::Config {
                    location: location.clone(),
                    max_backlog: cfg.max_backlog,
                    prefetch: cfg.prefetch,
                    prefetch_max_file: cfg.prefetch_max_file,
                },
                notifier.clone(),
            )
            .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?,
        ),
        _ => None,
    };
    let metrics = metrics_listener.as_ref().map(|_| control::registry());
    let evictor = match (&replication, cfg.cache_size) {
        (Some(_), limit) if limit > 0 => Some(
            Evictor::start(vfs.clone(), limit, metrics.as_ref())
                .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?,
        ),
        _ => None,
    };
    let shared = replication.as_ref().map(|r| r.shared().clone());
    let daemon = Arc::new(control::Daemon {
        vfs: vfs.clone(),
        replication: shared.clone(),
        serving: OnceLock::new(),
    });
    control::serve(daemon.clone()).map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?;
    let mut config = Config::default();
    config.mount_options = kernel_options(cfg);
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads);
    config.clone_fd = true;
    config.io_uring = cfg.io_uring.then(IoUringConfig::default);
    // Passthrough registers files with the kernel, which takes CAP_SYS_ADMIN.
    let passthrough = cfg.passthrough && nix::unistd::geteuid().is_root();
    let mut fs = FerryFs::new(vfs.clone(), passthrough, notifier.clone());
    if let Some(registry) = &metrics {
        fs = fs
            .with_metrics(registry, shared.is_some())
            .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), io::Error::other(e)))?;
    }
    let session = Session::new(fs, &cfg.mountpoint, &config)
        .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?;
    let _ = notifier.set(session.notifier());
    if let (Some(listener), Some(registry)) = (metrics_listener, metrics) {
        let addr = listener.local_addr().ok();
        control::serve_metrics(listener, registry, vfs, shared)
            .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?;
        if let Some(addr) = addr {
            info!("metrics at http://{addr}/metrics");
        }
    }
    let serving = format!(
        "{}{}{}",
        describe_transport(session.transport(), cfg),
        if passthrough { ", passthrough" } else { "" },
        if cfg.read_only { ", read-only" } else { "" },
    );
    info!(
        "mounted {} at {} ({}; {serving})",
        cfg.store.display(),
        cfg.mountpoint.display(),
        match &cfg.backend {
            Some(location) => format!("replicating to {}", ferry_backend::redact(&location.url())),
            None => "local only".into(),
        },
    );
    let _ = daemon.serving.set(serving);
    Ok(Mounted {
        session,
        mountpoint: cfg.mountpoint.clone(),
        replication,
        evictor,
    })
}

/// How requests reach the daemon, for the mount's log line and `ferry
/// status`. Tests and benchmarks read it to know which transport they
/// measured.
fn describe_transport(transport: Transport, cfg: &MountConfig) -> String {
    match transport {
        Transport::IoUring {
            queues,
            queue_depth,
        } => format!(
            "transport io_uring: {queues} rings of {queue_depth}, {} threads for FORGET",
            cfg.threads
        ),
        _ if cfg.io_uring => format!(
            "transport /dev/fuse (io_uring asked for, not offered by the kernel), {} threads",
            cfg.threads
        ),
        _ => format!("transport /dev/fuse, {} threads", cfg.threads),
    }
}

/// The options handed to the kernel. The type is `fuse.ferry` for every
/// mount: fusermount3 sets the subtype for users, and root, which mounts
/// directly, passes it to the kernel itself.
fn kernel_options(cfg: &MountConfig) -> Vec<MountOption> {
    let root = nix::unistd::geteuid().is_root();
    let store_name = std::fs::canonicalize(&cfg.store).unwrap_or_else(|_| cfg.store.clone());
    let subtype = FSTYPE.trim_start_matches("fuse.");
    let mut options = vec![
        MountOption::FSName(store_name.to_string_lossy().into_owned()),
        if root {
            MountOption::CUSTOM(format!("subtype={subtype}"))
        } else {
            MountOption::Subtype(subtype.into())
        },
        MountOption::DefaultPermissions,
        if cfg.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // Device nodes and set-user-ID files are only honoured when root mounts,
    // as on any local file system, and not even then when asked not to.
    if root && !cfg.nodev {
        options.push(MountOption::Dev);
    }
    if root && !cfg.nosuid {
        options.push(MountOption::Suid);
    }
    if cfg.noexec {
        options.push(MountOption::NoExec);
    }
    options
}

/// Flushes and unmounts the mount at `mountpoint`; `lazy` detaches it at
/// once and lets the kernel finish when the last file in it is closed.
///
/// `syncfs` first pushes the kernel's dirty pages to the daemon, so the
/// unmount itself has nothing left to lose; a dead mount (its daemon gone)
/// cannot even be opened, and has nothing to flush. Root unmounts directly;
/// other users go through `fusermount3`, which checks they own the mount.
/// A busy mount fails with `EBUSY`.
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    if let Ok(dir) = std::fs::File::open(mountpoint) {
        if let Err(e) = nix::unistd::syncfs(&dir) {
            // An earlier write-back failed (say, a write past the store's
            // largest file size); the unmount must still happen.
            warn!("flushing {}: {e}", mountpoint.display());
        }
    }
    if nix::unistd::geteuid().is_root() {
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        return nix::mount::umount2(mountpoint, flags).map_err(io::Error::from);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg(if lazy { "-uz" } else { "-u" }).arg(mountpoint);
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if said.contains("busy") {
        Err(io::Error::from_raw_os_error(libc::EBUSY))
    } else {
        Err(io::Error::other(format!("fusermount3 -u failed: {said}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_lines() {
        let user = MountEntry::parse(
            "52 27 0:45 / /home/u/vol rw,nosuid,nodev,relatime shared:1 - fuse.ferry \
             /home/u/.local/share/ferry/home-u-vol rw,user_id=1000,group_id=1000",
        )
        .unwrap();
        assert_eq!(user.mountpoint, Path::new("/home/u/vol"));
        assert_eq!(user.owner, Some(1000));
        assert!(user.is_ferry());
        let spaced = MountEntry::parse("1 2 0:3 / /mnt/a\\040b rw - tmpfs tmp rw").unwrap();
        assert_eq!(spaced.mountpoint, Path::new("/mnt/a b"));
        assert_eq!((spaced.owner, spaced.is_ferry()), (None, false));
        assert!(MountEntry::parse("garbage").is_none());
    }
}
