//! `ferry` subcommands for ferry-spawn.

/// Subcommands of this family.
#[derive(clap::Subcommand)]
pub enum Command {}

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {}
}
