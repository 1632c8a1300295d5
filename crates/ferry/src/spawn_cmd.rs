//! `ferry` subcommands for ferry-spawn.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context};
use ferry_spawn::{Resource, Server};

use crate::parse::{parse_signal, parse_umask};

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Serve spawn requests, on an inherited socket or on a socket path.
    SpawnServer {
        /// Number of an inherited SOCK_SEQPACKET socket (one end of a
        /// socketpair); children become children of this server's parent.
        #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
        fd: Option<i32>,
        /// Path of a socket to create and serve any number of clients on
        /// (`Server::connect`); children are this server's own. A socket
        /// left there by a server that died is replaced; the server removes
        /// its socket when stopped by SIGTERM, SIGINT or SIGHUP.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Run a command with ferry-spawn options and exit with its status.
    Spawn(SpawnArgs),
}

/// Options of `ferry spawn`.
#[derive(clap::Args)]
pub struct SpawnArgs {
    /// User id for the command (with --gid: a uid alone would leave the
    /// command in group 0).
    #[arg(long)]
    uid: Option<u32>,
    /// Group id for the command.
    #[arg(long)]
    gid: Option<u32>,
    /// Supplementary groups, comma-separated.
    #[arg(long, value_delimiter = ',')]
    groups: Option<Vec<u32>>,
    /// Start a new session.
    #[arg(long)]
    setsid: bool,
    /// Working directory.
    #[arg(long)]
    chdir: Option<PathBuf>,
    /// Root directory.
    #[arg(long)]
    chroot: Option<PathBuf>,
    /// File mode creation mask, octal.
    #[arg(long, value_parser = parse_umask)]
    umask: Option<u32>,
    /// Resource limit, NAME=SOFT[:HARD] with NAME one of nofile, nproc,
    /// core, as, cpu, fsize, stack, memlock (repeatable).
    #[arg(long)]
    rlimit: Vec<String>,
    /// Signal sent to the command when ferry exits: a name (KILL, TERM)
    /// or a number.
    #[arg(long, value_parser = parse_signal)]
    pdeathsig: Option<i32>,
    /// Set no_new_privs.
    #[arg(long)]
    no_new_privs: bool,
    /// Close every fd but 0, 1 and 2.
    #[arg(long)]
    close_fds: bool,
    /// Spawn through a freshly started spawn server.
    #[arg(long)]
    via_server: bool,
    /// The command and its arguments (`--` before it is optional; it is
    /// needed only when the command's name starts with `-`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<OsString>,
}

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::SpawnServer { fd: Some(fd), .. } => {
            ferry_spawn::server::serve_fd(fd).context("spawn server")
        }
        Command::SpawnServer {
            socket: Some(path), ..
        } => serve_socket(&path),
        Command::SpawnServer { .. } => bail!("spawn-server needs --fd or --socket"),
        Command::Spawn(args) => spawn(args),
    }
}

/// Serves on a socket path: a stale socket of a dead server is replaced,
/// a live server's is left alone, and the socket is removed again when
/// this server is stopped.
fn serve_socket(path: &Path) -> anyhow::Result<()> {
    clear_stale_socket(path)?;
    remove_socket_on_signal(path)?;
    let result = ferry_spawn::server::serve_path(path)
        .with_context(|| format!("spawn server on {}", path.display()));
    let _ = std::fs::remove_file(path);
    result
}

fn clear_stale_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
        Ok(m) if !m.file_type().is_socket() => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Ok(_) => match Server::connect(path) {
            Ok(_) => bail!("a spawn server already listens on {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))
            }
            Err(e) => Err(e).with_context(|| {
                format!(
                    "checking whether a spawn server listens on {}",
                    path.display()
                )
            }),
        },
    }
}

/// The socket the stop-signal handler removes.
static SOCKET: OnceLock<CString> = OnceLock::new();

/// Removes the socket and dies of the same signal: what SIGTERM, SIGINT and
/// SIGHUP do to a spawn server. Only async-signal-safe calls.
extern "C" fn remove_socket_and_die(sig: libc::c_int) {
    if let Some(path) = SOCKET.get() {
        // SAFETY: a valid NUL-terminated path that lives forever.
        unsafe { libc::unlink(path.as_ptr()) };
    }
    // SAFETY: restoring the default action and re-raising are
    // async-signal-safe and take no pointers.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn remove_socket_on_signal(path: &Path) -> anyhow::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    if SOCKET.set(c_path).is_err() {
        bail!("the spawn server's socket is already set");
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only makes
        // async-signal-safe calls; sigemptyset initialises its mask.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = remove_socket_and_die as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing signal handlers");
        }
    }
    Ok(())
}

fn spawn(args: SpawnArgs) -> anyhow::Result<()> {
    if let (Some(uid), None) = (args.uid, args.gid) {
        bail!(
            "--uid {uid} needs --gid too: without it the command would keep group id 0 (root's \
             group)"
        );
    }
    let mut cmd = ferry_spawn::Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .setsid(args.setsid)
        .no_new_privs(args.no_new_privs)
        .close_other_fds(args.close_fds);
    if let Some(uid) = args.uid {
        cmd.uid(uid);
    }
    if let Some(gid) = args.gid {
        cmd.gid(gid);
    }
    if let Some(groups) = &args.groups {
        cmd.groups(groups);
    }
    if let Some(dir) = &args.chdir {
        cmd.current_dir(dir);
    }
    if let Some(dir) = &args.chroot {
        cmd.chroot(dir);
    }
    if let Some(mask) = args.umask {
        cmd.umask(mask);
    }
    if let Some(sig) = args.pdeathsig {
        cmd.parent_death_signal(sig);
    }
    for limit in &args.rlimit {
        let (resource, soft, hard) = parse_rlimit(limit)?;
        cmd.rlimit(resource, soft, hard);
    }
    let mut child = if args.via_server {
        // This binary calls main_if_server() first, so it can serve itself.
        let server = Server::start().context("start spawn server")?;
        cmd.spawn_via(&server)?
    } else {
        cmd.spawn()?
    };
    let status = child.wait().context("wait")?;
    std::process::exit(
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
    );
}

/// Parses `NAME=SOFT[:HARD]`; `unlimited` is accepted for either value.
fn parse_rlimit(spec: &str) -> anyhow::Result<(Resource, u64, u64)> {
    let Some((name, values)) = spec.split_once('=') else {
        bail!("--rlimit {spec}: expected NAME=SOFT[:HARD]")
    };
    let resource = match name {
        "nofile" => Resource::Nofile,
        "nproc" => Resource::Nproc,
        "core" => Resource::Core,
        "as" => Resource::As,
        "cpu" => Resource::Cpu,
        "fsize" => Resource::Fsize,
        "stack" => Resource::Stack,
        "memlock" => Resource::Memlock,
        _ => bail!("--rlimit {spec}: unknown resource {name}"),
    };
    let value = |v: &str| -> anyhow::Result<u64> {
        if v == "unlimited" {
            Ok(u64::MAX)
        } else {
            v.parse()
                .with_context(|| format!("--rlimit {spec}: bad value {v}"))
        }
    };
    let (soft, hard) = values.split_once(':').unwrap_or((values, values));
    Ok((resource, value(soft)?, value(hard)?))
}
