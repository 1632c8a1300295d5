//! `ferry` subcommands for ferry-remote: map, unmap, maps.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_remote::{maps, parse_prot, Mmap, Mode, Options, Remote};

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Map memory into a running process and print its address there.
    ///
    /// Uses the process's agent if it runs one (see ferry-remote-agent),
    /// else injects the mmap with ptrace.
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
    /// Length, in bytes or with a K, M or G suffix (powers of 1024).
    #[arg(long, value_parser = parse_size)]
    len: u64,
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
    #[arg(long, value_parser = parse_size)]
    len: u64,
    /// How to reach the target.
    #[arg(long, value_enum, default_value = "auto")]
    via: Via,
}

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Map(args) => map(args),
        Command::Unmap(args) => {
            let mut remote = reach(args.pid, args.via, false)?;
            remote.munmap(args.addr, args.len).with_context(|| {
                format!(
                    "unmap {:#x}+{} in process {}",
                    args.addr, args.len, args.pid
                )
            })
        }
        Command::Maps { pid } => {
            for m in maps::read(pid).with_context(|| format!("read the maps of process {pid}"))? {
                println!("{m}");
            }
            Ok(())
        }
    }
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
    let mut remote = reach(args.pid, args.via, args.allow_seccomp)?;
    let what = format!("map {} bytes into process {}", args.len, args.pid);
    if args.share {
        let region = remote.share(args.len, args.prot, args.addr).context(what)?;
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
    let request = Mmap {
        addr: args.addr,
        len: args.len,
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

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Agent => "the agent",
        Mode::Injection => "injection",
    }
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    let trimmed = text.trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match trimmed.chars().last() {
        Some('K' | 'k') => (&trimmed[..trimmed.len() - 1], 10),
        Some('M' | 'm') => (&trimmed[..trimmed.len() - 1], 20),
        Some('G' | 'g') => (&trimmed[..trimmed.len() - 1], 30),
        _ => (trimmed, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{text:?} is not a size"))?;
    if n == 0 {
        bail!("size must not be zero");
    }
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .with_context(|| format!("{text:?} is too large"))
}

fn parse_addr(text: &str) -> anyhow::Result<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .with_context(|| format!("{text:?} is not an address"))
}

fn parse_prot_arg(text: &str) -> anyhow::Result<i32> {
    parse_prot(text).with_context(|| format!("{text:?} is not a protection (use r, w, x or none)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_addresses() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("0").is_err() && parse_size("x").is_err());
        assert!(parse_size("99999999999999G").is_err());
        assert_eq!(parse_addr("0x7f0000000000").unwrap(), 0x7f00_0000_0000);
        assert_eq!(parse_addr("4096").unwrap(), 4096);
    }
}
