//! Where log lines go and which are written.
//!
//! Everything logs to stderr: for a daemon started by `ferry mount` that is
//! `STORE/ferry.log`, so lines are plain text (colour codes only on a
//! terminal) or, with `--log-format json`, one JSON object a line. A daemon
//! logs its lifecycle at info (mount, backend contact, restore, unmount);
//! other commands only warnings. `FERRY_LOG` overrides the level, and a
//! filter that does not parse is refused rather than silently ignored.

use std::io::IsTerminal;

use anyhow::{anyhow, bail};
use tracing_subscriber::EnvFilter;

/// The format of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text, one line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What a daemon logs unless `FERRY_LOG` says otherwise. fuser warns that
/// its own unmount on exit failed whenever `ferry umount` already unmounted:
/// expected, so hidden.
const DAEMON_DEFAULT: &str =
    "warn,ferry=info,ferry_fs=info,ferry_backend=info,fuser::session=error";
/// What other commands log.
const COMMAND_DEFAULT: &str = "warn,fuser::session=error";

/// The levels a bare `FERRY_LOG` word may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The help text's paragraph on logs.
pub const HELP: &str = "\
Logs: a daemon started by `ferry mount` writes its log to STORE/ferry.log (plain text, or JSON \
lines with --log-format json); it logs its mount, backend contact, restore and unmount at info. \
FERRY_LOG sets the levels, as a level or a list of MODULE=LEVEL: FERRY_LOG=debug, \
FERRY_LOG=info,ferry_fs=trace. A FERRY_LOG that does not parse is refused.";

/// Installs the global subscriber; `daemon` picks the default level.
pub fn init(format: LogFormat, daemon: bool) -> anyhow::Result<()> {
    let filter = match std::env::var("FERRY_LOG") {
        Ok(spec) => parse_filter(&spec).map_err(|why| anyhow!("FERRY_LOG={spec:?}: {why}"))?,
        Err(std::env::VarError::NotPresent) => EnvFilter::new(if daemon {
            DAEMON_DEFAULT
        } else {
            COMMAND_DEFAULT
        }),
        Err(std::env::VarError::NotUnicode(_)) => bail!("FERRY_LOG is not valid UTF-8"),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A daemon's stderr is its log, in the store: on a full disk a
        // failed log write must not become a panic (tracing would report it
        // with eprintln!, which panics when stderr fails too) and kill the
        // daemon in the middle of a request.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.with_env_filter(filter).init(),
        LogFormat::Json => builder.json().with_env_filter(filter).init(),
    }
    Ok(())
}

/// Parses a `FERRY_LOG` value. `tracing` would read a misspelt level
/// (`FERRY_LOG=degub`) as the name of a module to log everything of, and so
/// log nothing more: a bare word must be a level.
pub fn parse_filter(spec: &str) -> Result<EnvFilter, String> {
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level ({}); to set a module's level write \
                 MODULE=LEVEL, e.g. ferry_fs=debug",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::builder().parse(spec).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for good in [
            "debug",
            "INFO",
            "warn,ferry_fs=trace",
            "ferry_fs::vfs=debug",
            "",
        ] {
            assert!(parse_filter(good).is_ok(), "{good:?} refused");
        }
        for bad in ["bogus", "degub", "ferry_fs=loud", "info,nonsense"] {
            assert!(parse_filter(bad).is_err(), "{bad:?} accepted");
        }
    }
}
