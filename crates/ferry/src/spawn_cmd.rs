//! `ferry` subcommands for ferry-spawn.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_spawn::{Resource, Server};

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
        /// (`Server::connect`); children are this server's own.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Run a command with ferry-spawn options and exit with its status.
    Spawn(SpawnArgs),
}

/// Options of `ferry spawn`.
#[derive(clap::Args)]
pub struct SpawnArgs {
    /// User id for the command.
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
    #[arg(long, value_parser = |s: &str| u32::from_str_radix(s, 8))]
    umask: Option<u32>,
    /// Resource limit, NAME=SOFT[:HARD] with NAME one of nofile, nproc,
    /// core, as, cpu, fsize, stack, memlock (repeatable).
    #[arg(long)]
    rlimit: Vec<String>,
    /// Signal number sent to the command when ferry exits.
    #[arg(long)]
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
    /// The command and its arguments.
    #[arg(required = true, last = true)]
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
        } => ferry_spawn::server::serve_path(&path)
            .with_context(|| format!("spawn server on {}", path.display())),
        Command::SpawnServer { .. } => bail!("spawn-server needs --fd or --socket"),
        Command::Spawn(args) => spawn(args),
    }
}

fn spawn(args: SpawnArgs) -> anyhow::Result<()> {
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
