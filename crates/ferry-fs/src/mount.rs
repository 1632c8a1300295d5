//! Mounting and unmounting a volume: option parsing, preflight checks that
//! turn the common failures into one clear sentence, and the FUSE session.
//!
//! ferry always asks the kernel for `default_permissions`: the kernel then
//! enforces mode bits, ownership rules for chmod/chown/utimes, and sticky
//! directories with its cached attributes, which is both faster than a round
//! trip per check and exactly the kernel's own semantics.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

use crate::binding::{self, BindingError};
use crate::cache::Evictor;
use crate::control;
use crate::error::StoreError;
use crate::fuse::FerryFs;
use crate::replicate::{self, Replication};
use crate::store::{Queries, Store};
use crate::vfs::Vfs;

/// How to mount a volume.
#[derive(Clone, Debug)]
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
    /// Pass open files through to their data files when the kernel and
    /// privileges allow (`-o passthrough`, the default, or `nopassthrough`).
    pub passthrough: bool,
    /// The shared backend to replicate to (`dir:PATH`, `postgres://…`);
    /// `None` keeps the volume local.
    pub backend: Option<String>,
    /// Replication backlog, in bytes, above which writers slow down.
    pub max_backlog: u64,
    /// Bytes of file contents to keep cached when there is a backend
    /// (0: no limit); clean files beyond it are evicted.
    pub cache_size: u64,
    /// Which contents to fetch in the background when there is a backend.
    pub prefetch: replicate::Prefetch,
    /// Largest file [`replicate::Prefetch::Small`] fetches, in bytes.
    pub prefetch_max_file: u64,
}

impl MountConfig {
    /// A config with the defaults: private, read-write, four request threads
    /// (two per core here; more only queue on the store's one connection).
    pub fn new(store: PathBuf, mountpoint: PathBuf) -> MountConfig {
        MountConfig {
            store,
            mountpoint,
            allow_other: false,
            read_only: false,
            threads: 4,
            passthrough: true,
            backend: None,
            max_backlog: 1 << 30,
            cache_size: 0,
            prefetch: replicate::Prefetch::default(),
            prefetch_max_file: 1 << 20,
        }
    }

    /// Applies a comma-separated `-o` list. Standard options that only
    /// mount(8) or fstab care about (`defaults`, `_netdev`, `nofail`, …) are
    /// accepted and ignored; anything unknown is an error, not a surprise.
    pub fn apply_options(&mut self, opts: &str) -> Result<(), MountError> {
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match opt {
                "allow_other" => self.allow_other = true,
                "ro" => self.read_only = true,
                "rw" => self.read_only = false,
                "passthrough" => self.passthrough = true,
                "nopassthrough" => self.passthrough = false,
                // Always on (module docs); accepted for fstab lines that say it.
                "default_permissions" => {}
                "defaults" | "_netdev" | "nofail" | "auto" | "noauto" | "user" | "nouser"
                | "users" | "dev" | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "async"
                | "atime" | "noatime" | "relatime" => {}
                _ => match opt.split_once('=') {
                    Some(("threads", n)) => {
                        self.threads = n
                            .parse()
                            .ok()
                            .filter(|&n| (1..=64).contains(&n))
                            .ok_or_else(|| MountError::BadOption(opt.to_string()))?;
                    }
                    Some(("x-systemd.automount" | "x-systemd.requires" | "comment", _)) => {}
                    _ => return Err(MountError::BadOption(opt.to_string())),
                },
            }
        }
        Ok(())
    }
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
    /// `/dev/fuse` is missing.
    NoFuse,
    /// `/dev/fuse` exists but this user may not open it.
    FuseAccess(io::Error),
    /// An unknown `-o` option.
    BadOption(String),
    /// The store refused to open.
    Store(StoreError),
    /// The kernel refused the mount.
    Mount(PathBuf, io::Error),
    /// A new host could not restore the volume from its backend.
    Backend(String),
    /// The store is not the backend volume's (see [`crate::binding`]).
    Binding(BindingError),
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
            MountError::NoFuse => write!(
                f,
                "/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3"
            ),
            MountError::FuseAccess(e) => write!(
                f,
                "cannot open /dev/fuse ({e}): it must be mode 0666, as the fuse3 package sets it"
            ),
            MountError::BadOption(o) => write!(f, "unknown mount option {o:?}"),
            MountError::Store(e) => e.fmt(f),
            MountError::Mount(p, e) => write!(f, "mounting {}: {e}", p.display()),
            MountError::Backend(e) => {
                write!(f, "cannot restore the volume into the empty store: {e}")
            }
            MountError::Binding(e) => e.fmt(f),
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

/// Checks what can be checked before touching the store or the kernel.
pub fn preflight(mountpoint: &Path) -> Result<(), MountError> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::NoMountpoint(mountpoint.to_path_buf()))
        }
        // ENOTCONN: a dead FUSE mount is still a mount.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::AlreadyMounted(mountpoint.to_path_buf()))
        }
        Err(e) => return Err(MountError::Mount(mountpoint.to_path_buf(), e)),
        Ok(m) if !m.is_dir() => return Err(MountError::NotADirectory(mountpoint.to_path_buf())),
        Ok(_) => {}
    }
    if mounted_source(mountpoint).is_some() {
        return Err(MountError::AlreadyMounted(mountpoint.to_path_buf()));
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

/// The source (for ferry: the store) of the mount at `mountpoint`, if any,
/// read from `/proc/self/mountinfo`.
pub fn mounted_source(mountpoint: &Path) -> Option<String> {
    let target = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        // Fields: id parent dev root MOUNTPOINT opts ... - fstype SOURCE superopts
        let mut fields = line.split(' ');
        let point = unescape(fields.nth(4)?);
        let (_, rest) = line.split_once(" - ")?;
        let source = unescape(rest.split(' ').nth(1)?);
        (Path::new(&point) == target).then_some(source)
    })
}

/// The stores of every ferry volume mounted in this mount namespace.
pub fn ferry_stores() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(" - ")?;
            let mut fields = rest.split(' ');
            let fstype = fields.next()?;
            let source = PathBuf::from(unescape(fields.next()?));
            (fstype.starts_with("fuse") && control::socket_path(&source).exists()).then_some(source)
        })
        .collect()
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
    /// Stopped (and joined) once the session ends.
    replication: Option<Replication>,
    evictor: Option<Evictor>,
}

impl Mounted {
    /// Serves requests until the volume is unmounted, then stops
    /// replication; what it had not shipped ships at the next mount.
    pub fn run(self) -> io::Result<()> {
        let result = self.session.run();
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
    preflight(&cfg.mountpoint)?;
    let store = Store::open(&cfg.store)?;
    let db = |e| {
        MountError::Store(StoreError::Db {
            path: cfg.store.clone(),
            source: e,
        })
    };
    if let Some(url) = &cfg.backend {
        let fresh = store
            .read(|r| Ok::<_, rusqlite::Error>(r.log_head()? == 0 && r.inode_count()? == 1))
            .map_err(db)?;
        if fresh {
            // A new host: show the volume's whole namespace from the start.
            // This one time the backend must answer; afterwards it never has
            // to. The store is bound to the volume before it holds any of it.
            let backend = ferry_backend::open(url, replicate::CONNECT_TIMEOUT)
                .map_err(|e| MountError::Backend(e.to_string()))?;
            binding::verify(&store, &*backend, url).map_err(MountError::Binding)?;
            replicate::restore(&store, &*backend)
                .map_err(|e| MountError::Backend(e.to_string()))?;
        } else {
            // Offline, the replicator checks once the backend answers.
            binding::verify_within(&store, url, BINDING_CHECK).map_err(MountError::Binding)?;
        }
    }
    let vfs = Arc::new(Vfs::new(store, cfg.read_only)?);
    let replication = match &cfg.backend {
        Some(url) if !cfg.read_only => Some(
            Replication::start(
                vfs.clone(),
                replicate::Config {
                    url: url.clone(),
                    max_backlog: cfg.max_backlog,
                    prefetch: cfg.prefetch,
                    prefetch_max_file: cfg.prefetch_max_file,
                },
            )
            .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?,
        ),
        _ => None,
    };
    let evictor = match (&replication, cfg.cache_size) {
        (Some(_), limit) if limit > 0 => Some(
            Evictor::start(vfs.clone(), limit)
                .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?,
        ),
        _ => None,
    };
    control::serve(vfs.clone(), replication.as_ref().map(|r| r.shared().clone()))
        .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?;
    let store_name = std::fs::canonicalize(&cfg.store).unwrap_or_else(|_| cfg.store.clone());
    let mut options = vec![
        MountOption::FSName(store_name.to_string_lossy().into_owned()),
        MountOption::Subtype("ferry".into()),
        MountOption::DefaultPermissions,
        if cfg.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // Device nodes and set-user-ID files are only honoured when root mounts,
    // as on any local file system.
    if nix::unistd::geteuid().is_root() {
        options.extend([MountOption::Dev, MountOption::Suid]);
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads);
    config.clone_fd = true;
    // Passthrough registers files with the kernel, which takes CAP_SYS_ADMIN.
    let passthrough = cfg.passthrough && nix::unistd::geteuid().is_root();
    let fs = FerryFs::new(vfs, passthrough);
    let session = Session::new(fs, &cfg.mountpoint, &config)
        .map_err(|e| MountError::Mount(cfg.mountpoint.clone(), e))?;
    if let Some(r) = &replication {
        r.set_notifier(session.notifier());
    }
    Ok(Mounted {
        session,
        replication,
        evictor,
    })
}

/// Flushes and unmounts the ferry volume at `mountpoint`.
///
/// `syncfs` first pushes the kernel's dirty pages to the daemon, so the
/// unmount itself has nothing left to lose. Root unmounts directly; other
/// users go through `fusermount3`, which checks they own the mount.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(mountpoint)?;
    if let Err(e) = nix::unistd::syncfs(&dir) {
        // An earlier write-back failed (say, a write past the store's
        // largest file size); the unmount must still happen.
        tracing::warn!("flushing {}: {e}", mountpoint.display());
    }
    drop(dir);
    if nix::unistd::geteuid().is_root() {
        nix::mount::umount(mountpoint).map_err(io::Error::from)
    } else {
        let status = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(mountpoint)
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "fusermount3 -u failed ({status})"
            )))
        }
    }
}
