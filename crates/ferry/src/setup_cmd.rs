//! `ferry` subcommands that set ferry up on a machine: the mount helper,
//! man pages and shell completions (both generated from the clap
//! definitions, so they never drift from the real options), and where the
//! LD_PRELOAD agent library is.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::CommandFactory;
use clap_complete::Shell;

/// The agent library's file name (ferry-remote-agent's cdylib).
const AGENT_LIB: &str = "libferry_remote_agent.so";

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Print a shell completion script: `ferry completions bash >
    /// /usr/share/bash-completion/completions/ferry`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the ferry(1) man page, or write one page per command into a
    /// directory.
    Man {
        /// Write ferry.1 and ferry-COMMAND.1 here instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Install what makes ferry a system file system: the mount.fuse.ferry
    /// helper (so `mount -t fuse.ferry` and fstab work), man pages, shell
    /// completions and the agent library if it was built.
    #[command(after_help = "Installs, under --destdir (default /):\n  \
        SBIN/mount.fuse.ferry -> this ferry binary\n  \
        PREFIX/share/man/man1/ferry*.1\n  \
        PREFIX/share/bash-completion/completions/ferry\n  \
        PREFIX/share/zsh/site-functions/_ferry\n  \
        PREFIX/share/fish/vendor_completions.d/ferry.fish\n  \
        PREFIX/lib/ferry/libferry_remote_agent.so (when built next to ferry)")]
    InstallHelper {
        /// Root to install under (for packaging).
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
        /// Where mount(8) looks for helpers.
        #[arg(long, default_value = "/sbin")]
        sbin: PathBuf,
        /// Prefix of the man pages, completions and library.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Print the path of the LD_PRELOAD agent library
    /// (`LD_PRELOAD=$(ferry agent-path) PROGRAM` lets `ferry map` use the
    /// agent instead of ptrace).
    AgentPath,
}

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut crate::Cli::command(), "ferry", &mut out);
            out.flush()?;
            Ok(())
        }
        Command::Man { dir: None } => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(crate::Cli::command()).render(&mut out)?;
            out.flush()?;
            Ok(())
        }
        Command::Man { dir: Some(dir) } => {
            for page in write_man_pages(&dir)? {
                println!("{}", page.display());
            }
            Ok(())
        }
        Command::InstallHelper {
            destdir,
            sbin,
            prefix,
        } => install(&destdir, &sbin, &prefix),
        Command::AgentPath => {
            println!("{}", agent_library()?.display());
            Ok(())
        }
    }
}

/// `root` + `path`, `path` taken as relative to `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn install(destdir: &Path, sbin: &Path, prefix: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("finding this ferry binary")?;
    let helper = under(destdir, &sbin.join("mount.fuse.ferry"));
    replace_with_symlink(&exe, &helper)?;
    println!("{} -> {}", helper.display(), exe.display());
    let share = under(destdir, &prefix.join("share"));
    for page in write_man_pages(&share.join("man/man1"))? {
        println!("{}", page.display());
    }
    for (shell, path) in [
        (Shell::Bash, "bash-completion/completions/ferry"),
        (Shell::Zsh, "zsh/site-functions/_ferry"),
        (Shell::Fish, "fish/vendor_completions.d/ferry.fish"),
    ] {
        let path = share.join(path);
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut crate::Cli::command(), "ferry", &mut script);
        write_file(&path, &script)?;
        println!("{}", path.display());
    }
    match agent_library() {
        Ok(lib) => {
            let dest = under(destdir, &prefix.join("lib/ferry")).join(AGENT_LIB);
            write_file(
                &dest,
                &std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?,
            )?;
            println!("{}", dest.display());
        }
        Err(why) => eprintln!("ferry: note: {why:#}; the agent library is not installed"),
    }
    Ok(())
}

/// Points `link` at `target`, replacing whatever link or file was there
/// (atomically: a new link renamed over the old).
fn replace_with_symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    let dir = link.parent().context("the helper path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".mount.fuse.ferry.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::rename(&tmp, link).with_context(|| format!("installing {}", link.display()))
}

fn write_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Writes ferry.1 and a page per subcommand into `dir`; returns their paths.
fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let root = crate::Cli::command();
    let mut pages = Vec::new();
    let mut render = |cmd: clap::Command, name: &str| -> anyhow::Result<()> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        write_file(&path, &page)?;
        pages.push(path);
        Ok(())
    };
    for sub in root.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("ferry-{}", sub.get_name());
        render(sub.clone().name(name.clone()), &name)?;
    }
    render(root, "ferry")?;
    Ok(pages)
}

/// The agent library: next to this binary (where `cargo build --release
/// --workspace` puts both), or where `ferry install-helper` puts it with the
/// default prefix or the binary's own.
fn agent_library() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("finding this ferry binary")?;
    let beside = exe.parent().map(|d| d.join(AGENT_LIB));
    // Installed as PREFIX/bin/ferry: PREFIX/lib/ferry.
    let installed = exe
        .parent()
        .filter(|d| d.file_name() == Some(OsStr::new("bin")))
        .and_then(Path::parent)
        .map(|prefix| prefix.join("lib/ferry").join(AGENT_LIB));
    for candidate in [
        beside,
        installed,
        Some(Path::new("/usr/local/lib/ferry").join(AGENT_LIB)),
    ]
    .into_iter()
    .flatten()
    {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{AGENT_LIB} is not next to {} nor installed: build it with `cargo build --release -p \
         ferry-remote-agent` (it lands in target/release/), then `ferry install-helper` installs it",
        exe.display()
    )
}
