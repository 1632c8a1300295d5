//! `ferry`: one command line over ferry-fs, ferry-spawn and ferry-remote.
//!
//! Each family of subcommands lives in its own module and is flattened into
//! one clap enum here, so `main` only parses, dispatches and reports errors.

mod fs_cmd;
mod remote_cmd;
mod spawn_cmd;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Local-first file system, fast process spawning, remote memory mapping"
)]
struct Cli {
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
}

fn main() {
    // A re-executed spawn server serves and exits here, before any thread exists.
    ferry_spawn::server::main_if_server();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                // fuser warns that its own unmount on exit failed whenever
                // `ferry umount` already unmounted: expected, so hidden.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,fuser::session=error")
                }),
        )
        .with_writer(std::io::stderr)
        // A daemon's stderr is its log, in the store: on a full disk a
        // failed log write must not become a panic (tracing would report it
        // with eprintln!, which panics when stderr fails too) and kill the
        // daemon in the middle of a request.
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse_from(fs_cmd::mount_helper_argv(std::env::args_os()));
    let result = match cli.command {
        Command::Fs(c) => fs_cmd::run(c),
        Command::Spawn(c) => spawn_cmd::run(c),
        Command::Remote(c) => remote_cmd::run(c),
    };
    if let Err(err) = result {
        // One line, the whole cause chain: "ferry: mount: /mnt/x: no such directory".
        eprintln!("ferry: {err:#}");
        std::process::exit(1);
    }
}
