//! `ferry`: one command line over ferry-fs, ferry-spawn and ferry-remote.
//!
//! Each family of subcommands lives in its own module and is flattened into
//! one clap enum here, so `main` only parses, sets up logging, dispatches
//! and reports errors: one line, exit status 1 (2 for a bad command line).

mod fs_cmd;
mod logging;
mod parse;
mod remote_cmd;
mod run_cmd;
mod setup_cmd;
mod spawn_cmd;
mod status;
mod sync;

use clap::Parser;

/// The whole command line.
#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Local-first file system, fast process spawning, remote memory mapping",
    after_help = logging::HELP
)]
pub struct Cli {
    /// How log lines are written.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = logging::LogFormat::Text,
        env = "FERRY_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    #[command(flatten)]
    Fs(fs_cmd::Command),
    #[command(flatten)]
    Spawn(spawn_cmd::Command),
    #[command(flatten)]
    Remote(remote_cmd::Command),
    #[command(flatten)]
    Setup(setup_cmd::Command),
    #[command(flatten)]
    Run(run_cmd::Command),
}

fn main() {
    // A re-executed spawn server serves and exits here, before any thread exists.
    ferry_spawn::server::main_if_server();
    let cli = Cli::parse_from(fs_cmd::mount_helper_argv(std::env::args_os()));
    let daemon = matches!(&cli.command, Command::Fs(c) if c.serves());
    if let Err(err) = logging::init(cli.log_format, daemon) {
        eprintln!("ferry: {err}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Fs(c) => fs_cmd::run(c, cli.log_format),
        Command::Spawn(c) => spawn_cmd::run(c),
        Command::Remote(c) => remote_cmd::run(c),
        Command::Setup(c) => setup_cmd::run(c),
        Command::Run(c) => run_cmd::run(c),
    };
    if let Err(err) = result {
        eprintln!("ferry: {}", one_line(&err));
        std::process::exit(1);
    }
}

/// The error and its causes on one line ("mount: /mnt/x: no such
/// directory"), each said once. Many errors include their cause's words in
/// their own, and a chain printed naively repeats them (SQLite's errors
/// thrice): once an error has said its cause, it speaks for the causes
/// below that too, which are the same failure in lower-level words.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            break;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_said_once() {
        let sqlite = rusqlite_like_chain();
        assert_eq!(
            one_line(&sqlite),
            "/s/meta.db: unable to open database file"
        );
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let err = anyhow::Error::new(io)
            .context("/s/meta.db: Permission denied (os error 13)")
            .context("opening the store");
        assert_eq!(
            one_line(&err),
            "opening the store: /s/meta.db: Permission denied (os error 13)"
        );
    }

    /// An error that says its cause, whose own cause says it again in
    /// other words (as rusqlite's do).
    fn rusqlite_like_chain() -> anyhow::Error {
        #[derive(Debug)]
        struct Low;
        impl std::fmt::Display for Low {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Error code 14: Unable to open the database file")
            }
        }
        impl std::error::Error for Low {}
        #[derive(Debug)]
        struct Mid(Low);
        impl std::fmt::Display for Mid {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("unable to open database file")
            }
        }
        impl std::error::Error for Mid {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let mid = Mid(Low);
        let top = format!("/s/meta.db: {mid}");
        anyhow::Error::new(mid).context(top)
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
