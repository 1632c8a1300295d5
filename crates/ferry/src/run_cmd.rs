//! `ferry run` and `ferry context`: a process's file-system context.
//!
//! `ferry run [--durability …] [--reads …] [--timeout S] -- CMD ARGS…` sets
//! its own context on each ferry mount, then execs CMD: exec keeps the pid
//! and the start time, so CMD *is* the process the daemons know, and every
//! process it forks inherits the context as it stands at that fork (see
//! `ferry_fs::context`). The context is set with an ioctl on the mount's
//! root, which needs no write permission and tells the daemon who asks.
//!
//! `ferry context` prints the caller's effective context on each mount; run
//! under `ferry run` (or by anything it started) it shows what was
//! inherited.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ferry_fs::context::{
    Context, ContextUpdate, Durability, RawContext, Reads, FERRY_IOC_GET_CONTEXT,
    FERRY_IOC_SET_CONTEXT, MAX_TIMEOUT,
};
use ferry_fs::mount::{self, MountEntry};
use serde_json::json;

use crate::parse::parse_duration;

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Run a command with a file-system context on ferry mounts; the
    /// processes it starts inherit it.
    ///
    /// The context is set on every ferry mount this user may see (root:
    /// all), or only on the `--mount`s given; dead mounts are skipped
    /// unless named. A knob left out keeps the value inherited from the
    /// caller (or the mount's default: local, cached, 30 s). Exits 127 if
    /// the command is not found, 126 if it cannot be run.
    Run(RunArgs),
    /// Print this process's effective file-system context on each ferry
    /// mount (or on the `--mount`s given).
    Context {
        /// A ferry mount (or a path inside one) to ask; repeatable
        /// [default: every ferry mount this user may see].
        #[arg(long = "mount", value_name = "DIR")]
        mounts: Vec<PathBuf>,
        /// Print one JSON object per mount.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `ferry run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// `local`: fsync and close return once the change is on local disk;
    /// `remote`: once the file is committed at the backend.
    #[arg(long, value_parser = |s: &str| s.parse::<Durability>())]
    durability: Option<Durability>,
    /// `cached`: open uses what this host has; `fresh`: open first gets
    /// the newest version from the backend.
    #[arg(long, value_parser = |s: &str| s.parse::<Reads>())]
    reads: Option<Reads>,
    /// How long a `remote` fsync or close may wait for the backend before
    /// it fails with EIO (seconds, or with a unit: 500ms, 2m; at most 1d).
    #[arg(long, value_parser = parse_timeout, allow_hyphen_values = true)]
    timeout: Option<Duration>,
    /// A ferry mount (or a path inside one) to set the context on;
    /// repeatable [default: every ferry mount this user may see].
    #[arg(long = "mount", value_name = "DIR")]
    mounts: Vec<PathBuf>,
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

/// A timeout: a duration above zero and at most [`MAX_TIMEOUT`].
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let t = parse_duration(text)?;
    if t < Duration::from_millis(1) {
        return Err("the timeout must be at least 1ms".into());
    }
    if t > MAX_TIMEOUT {
        return Err(format!(
            "{text:?} is too long (at most {} s)",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(t)
}

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run_with_context(args),
        Command::Context { mounts, json } => show(&mounts, json),
    }
}

fn run_with_context(args: RunArgs) -> anyhow::Result<()> {
    let update = ContextUpdate {
        durability: args.durability,
        reads: args.reads,
        timeout: args.timeout,
    };
    // Every mount is checked and opened before any is set, so a bad one
    // changes nothing.
    let roots = open_roots(&args.mounts)?;
    let mut raw = RawContext::from_update(&update);
    for (m, root) in &roots {
        ioctl(root, FERRY_IOC_SET_CONTEXT, &mut raw).map_err(|e| refused(m, e))?;
    }
    let err = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .exec();
    eprintln!("ferry: {}: {err}", args.command[0].to_string_lossy());
    let code = if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    std::process::exit(code);
}

fn show(paths: &[PathBuf], as_json: bool) -> anyhow::Result<()> {
    for (m, root) in open_roots(paths)? {
        let mut raw = RawContext::default();
        ioctl(&root, FERRY_IOC_GET_CONTEXT, &mut raw).map_err(|e| refused(&m, e))?;
        let ctx: Context = raw.context().with_context(|| {
            format!(
                "the daemon of {} answered a context this ferry cannot read",
                m.mountpoint.display()
            )
        })?;
        if as_json {
            let mut v = serde_json::to_value(ctx)?;
            v["mount"] = json!(m.mountpoint.display().to_string());
            println!("{v}");
        } else {
            println!("{}: {ctx}", m.mountpoint.display());
        }
    }
    Ok(())
}

/// The mounts to act on, each with its root opened: the named ones (each
/// must be a live ferry mount), or every live ferry mount this user may
/// see.
fn open_roots(paths: &[PathBuf]) -> anyhow::Result<Vec<(MountEntry, File)>> {
    let mounts = if paths.is_empty() {
        let me = nix::unistd::getuid().as_raw();
        let visible: Vec<MountEntry> = mount::ferry_mounts()
            .into_iter()
            .filter(|m| me == 0 || m.owner == Some(me))
            .collect();
        if visible.is_empty() {
            bail!("no ferry volume is mounted");
        }
        let live: Vec<MountEntry> = visible
            .into_iter()
            .filter(|m| !mount::is_dead(&m.mountpoint))
            .collect();
        if live.is_empty() {
            bail!("every ferry mount is dead (its daemon gone); clear them with `ferry umount`");
        }
        live
    } else {
        let mut named = Vec::new();
        for path in paths {
            let m = crate::status::mount_of(path)?;
            if mount::is_dead(&m.mountpoint) {
                bail!(
                    "{} is a dead ferry mount (its daemon is gone); clear it with `ferry umount {}`",
                    m.mountpoint.display(),
                    m.mountpoint.display()
                );
            }
            if !named.contains(&m) {
                named.push(m);
            }
        }
        named
    };
    mounts
        .into_iter()
        .map(|m| {
            let root = File::open(&m.mountpoint)
                .with_context(|| format!("opening {}", m.mountpoint.display()))?;
            Ok((m, root))
        })
        .collect()
}

/// The one line for a daemon that refused an ioctl.
fn refused(m: &MountEntry, e: io::Error) -> anyhow::Error {
    let mnt = m.mountpoint.display();
    match e.raw_os_error() {
        Some(libc::ENOTTY) => anyhow::anyhow!(
            "the daemon of {mnt} does not know process contexts (an older ferry?); remount it"
        ),
        Some(libc::EINVAL) => anyhow::anyhow!(
            "the daemon of {mnt} refused the context as invalid (a different ferry version?)"
        ),
        Some(libc::ESRCH) => anyhow::anyhow!(
            "the daemon of {mnt} cannot see this process (is it in another pid namespace?)"
        ),
        _ => anyhow::Error::new(e).context(format!("the context on {mnt}")),
    }
}

/// One context ioctl on an open file of a ferry mount.
fn ioctl(file: &File, cmd: u32, arg: &mut RawContext) -> io::Result<()> {
    // SAFETY: `cmd` is one of the two context ioctls, whose encoded size is
    // that of RawContext; `arg` points to one, which the kernel copies in
    // (set) or fills (get) and does not keep.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            cmd as libc::Ioctl,
            std::ptr::from_mut(arg),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(parse_timeout("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_timeout("1d").unwrap(), MAX_TIMEOUT);
        assert_eq!(
            parse_timeout("0").unwrap_err(),
            "the timeout must be at least 1ms"
        );
        assert_eq!(
            parse_timeout("2d").unwrap_err(),
            "\"2d\" is too long (at most 86400 s)"
        );
        assert!(parse_timeout("soon")
            .unwrap_err()
            .starts_with("not a duration"));
    }
}
