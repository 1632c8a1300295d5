//! `ferry` subcommands for ferry-remote: map, unmap, maps.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry_remote::{maps, parse_prot, Mmap, Mode, Options, Remote};
use indicatif::HumanBytes;

use crate::parse::{parse_addr, parse_nonzero_size};

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Map memory into a running process and print its address there.
    ///
    /// Uses the process's agent if it runs one (a program started with
    /// `LD_PRELOAD=$(ferry agent-path)`), else injects the mmap with ptrace.
    ///
    /// With --share, prints the target's address and ours, then keeps the
    /// region mapped here until stdin reaches EOF (or ferry is killed). When
    /// ferry exits, only its own side goes away: the target keeps its
    /// mapping, and the memory lives on for as long as the target maps it.
    Map(MapArgs),
    /// Unmap memory from a running process.
    Unmap(UnmapArgs),
    /// List a running process's mappings.
    Maps {
        /// The process.
        #[arg(long)]
        pid: i32,
        /// Print a JSON array (addresses as "0x…" strings).
        #[arg(long)]
        json: bool,
    },
}

/// How to reach the target.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Via {
    /// The agent if one answers, else injection.
    Auto,
    /// The agent only.
    Agent,
    /// Injection only.
    Inject,
}

/// Arguments of `ferry map`.
#[derive(clap::Args)]
pub struct MapArgs {
    /// The target process.
    #[arg(long)]
    pid: i32,
    /// Length, in bytes or with a K, M or G suffix (powers of 1024); with
    /// --fd-from it defaults to the file's size, and may not go past its
    /// last page (the target would die of SIGBUS touching it).
    #[arg(long, value_parser = parse_nonzero_size, required_unless_present = "fd_from")]
    len: Option<u64>,
    /// Protection: any of r, w, x, or "none".
    #[arg(long, default_value = "rw", value_parser = parse_prot_arg)]
    prot: i32,
    /// Map this file (MAP_SHARED: writes reach the file) instead of anonymous memory.
    #[arg(long, conflicts_with = "share")]
    fd_from: Option<PathBuf>,
    /// Map fresh shared memory in both the target and this process.
    #[arg(long)]
    share: bool,
    /// Map exactly here, failing rather than replacing an existing mapping.
    #[arg(long, value_parser = parse_addr)]
    addr: Option<u64>,
    /// How to reach the target.
    #[arg(long, value_enum, default_value = "auto")]
    via: Via,
    /// Inject even though the target runs under seccomp filters.
    #[arg(long)]
    allow_seccomp: bool,
}

/// Arguments of `ferry unmap`.
#[derive(clap::Args)]
pub struct UnmapArgs {
    /// The target process.
    #[arg(long)]
    pid: i32,
    /// Start address.
    #[arg(long, value_parser = parse_addr)]
    addr: u64,
    /// Length, in bytes or with a K, M or G suffix.
    #[arg(long, value_parser = parse_nonzero_size)]
    len: u64,
    /// How to reach the target.
    #[arg(long, value_enum, default_value = "auto")]
    via: Via,
    /// Unmap even file-backed executable code (the target then crashes as
    /// soon as it runs it).
    #[arg(long)]
    force: bool,
}

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Map(args) => map(args),
        Command::Unmap(args) => unmap(&args),
        Command::Maps { pid, json } => {
            let mappings =
                maps::read(pid).with_context(|| format!("read the maps of process {pid}"))?;
            if json {
                println!("{}", maps_json(&mappings));
            } else {
                // The rows are Mapping's Display: START-END PERM KiB PATH.
                println!("{:<25} {:<4} {:>8} PATH", "START-END", "PERM", "KiB");
                for m in &mappings {
                    println!("{m}");
                }
            }
            Ok(())
        }
    }
}

fn maps_json(mappings: &[maps::Mapping]) -> serde_json::Value {
    mappings
        .iter()
        .map(|m| {
            serde_json::json!({
                "start": format!("{:#x}", m.start),
                "end": format!("{:#x}", m.end),
                "size": m.end - m.start,
                "perms": m.perms,
                "offset": m.offset,
                "path": m.path,
            })
        })
        .collect()
}

/// Whether a mapping holds a file's executable code: unmapping it kills
/// the target the next time it runs that code (its libc, say).
fn is_file_code(m: &maps::Mapping) -> bool {
    m.perms.contains('x') && m.path.starts_with('/')
}

fn unmap(args: &UnmapArgs) -> anyhow::Result<()> {
    let end = args.addr.saturating_add(args.len);
    if !args.force {
        let mappings = maps::read(args.pid)
            .with_context(|| format!("read the maps of process {}", args.pid))?;
        if let Some(code) = mappings
            .iter()
            .find(|m| is_file_code(m) && m.start < end && args.addr < m.end)
        {
            bail!(
                "{:#x}+{} covers executable code of {} ({:#x}-{:#x}) in process {}: it would \
                 crash; pass --force to unmap it anyway",
                args.addr,
                args.len,
                code.path,
                code.start,
                code.end,
                args.pid
            );
        }
    }
    let mut remote = reach(args.pid, args.via, false)?;
    remote.munmap(args.addr, args.len).with_context(|| {
        format!(
            "unmap {:#x}+{} in process {}",
            args.addr, args.len, args.pid
        )
    })
}

fn reach(pid: i32, via: Via, allow_seccomp: bool) -> anyhow::Result<Remote> {
    let options = Options {
        allow_seccomp_filter: allow_seccomp,
        ..Options::default()
    };
    let remote = match via {
        Via::Auto => Remote::connect(pid, &options),
        Via::Agent => Remote::agent(pid),
        Via::Inject => Remote::injection(pid, &options),
    };
    Ok(remote?)
}

fn map(args: MapArgs) -> anyhow::Result<()> {
    let file = match &args.fd_from {
        Some(path) => Some(
            OpenOptions::new()
                .read(true)
                .write(args.prot & libc::PROT_WRITE != 0)
                .open(path)
                .with_context(|| format!("open {}", path.display()))?,
        ),
        None => None,
    };
    let len = match (&file, args.len) {
        (Some(f), len) => file_map_len(f, args.fd_from.as_deref().unwrap_or(Path::new("")), len)?,
        (None, Some(len)) => len,
        (None, None) => bail!("--len is needed unless --fd-from gives a file"),
    };
    let mut remote = reach(args.pid, args.via, args.allow_seccomp)?;
    let what = format!("map {len} bytes into process {}", args.pid);
    if args.share {
        let region = remote.share(len, args.prot, args.addr).context(what)?;
        println!("{:#x} {:#x}", region.remote_addr(), region.local_addr());
        eprintln!(
            "ferry: shared via {}; also at /proc/{}/fd/{}; holding until stdin closes",
            mode_name(remote.mode()),
            std::process::id(),
            region.memfd().as_raw_fd()
        );
        std::io::stdin()
            .read_to_end(&mut Vec::new())
            .context("wait for stdin to close")?;
        return Ok(());
    }
    let request = Mmap {
        addr: args.addr,
        len,
        prot: args.prot,
        flags: if file.is_some() {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        },
        fd: file.as_ref().map(|f| f.as_fd()),
        offset: 0,
    };
    let addr = remote.mmap(&request).context(what)?;
    println!("{addr:#x}");
    if remote.mode() == Mode::Injection {
        eprintln!(
            "ferry: mapped by injection; target stopped for {:?}",
            remote.last_stop()
        );
    }
    Ok(())
}

/// The length to map of `file`: its size by default; a length past the
/// page that holds its last byte is refused, since touching it would kill
/// the target with SIGBUS.
fn file_map_len(file: &std::fs::File, path: &Path, len: Option<u64>) -> anyhow::Result<u64> {
    let size = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096);
    let mappable = size.div_ceil(page).saturating_mul(page);
    match len {
        None if size == 0 => bail!("{} is empty: there is nothing to map", path.display()),
        None => Ok(size),
        Some(len) if len > mappable => bail!(
            "--len {} goes past the end of {} ({}): the target would die of SIGBUS touching \
             the rest; leave --len out to map the whole file",
            HumanBytes(len),
            path.display(),
            HumanBytes(size)
        ),
        Some(len) => Ok(len),
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Agent => "the agent",
        Mode::Injection => "injection",
    }
}

fn parse_prot_arg(text: &str) -> anyhow::Result<i32> {
    parse_prot(text).with_context(|| format!("{text:?} is not a protection (use r, w, x or none)"))
}
