//! Command line (and environment) of `fs_check`.
//!
//! `cargo test` hands a harness=false test its own arguments after `--`,
//! and, in a workspace run, whatever libtest arguments and name filters
//! were given for all tests; those are accepted and treated as libtest
//! would (a filter that does not match [`TEST_NAME`] runs nothing).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::workers::WorkerArgs;

/// The one "test" this binary has, for `--list` and name filters.
pub const TEST_NAME: &str = "model_check";

/// Which backends trials use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backends {
    Dir,
    Postgres,
    /// Alternate per trial, `dir:` first.
    Both,
}

/// Which trial variants run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hosts {
    /// One host: workload, stop-and-sync, kill -9, remount, model check.
    One,
    /// Two hosts on one backend: I3 (and convergence, with `--converge`).
    Two,
    /// Every fifth trial is a two-host one.
    Mixed,
}

/// Options of a checking run.
#[derive(Clone, Debug)]
pub struct Options {
    pub trials: u64,
    pub seed: u64,
    pub backends: Backends,
    pub hosts: Hosts,
    /// No new trial starts after this much time (zero: no limit).
    pub budget: Duration,
    /// Print every difference, not the first ten.
    pub verbose: bool,
    /// Two-host trials also check convergence (see `trial::Trial`).
    pub converge: bool,
}

/// What this process is to do.
pub enum Invocation {
    Check(Options),
    Worker(WorkerArgs),
    /// `--list`: name the test.
    List,
    /// Nothing (a name filter that excludes us, or `--ignored`).
    Nothing,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A seed in decimal or `0x` hex.
fn parse_u64(what: &str, v: &str) -> Result<u64, String> {
    let r = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    r.map_err(|_| format!("{what} {v:?}: not a number"))
}

fn parse_backends(v: &str) -> Result<Backends, String> {
    match v {
        "dir" => Ok(Backends::Dir),
        "postgres" | "pg" => Ok(Backends::Postgres),
        "both" => Ok(Backends::Both),
        _ => Err(format!("--backend {v:?}: expected dir, postgres or both")),
    }
}

fn parse_hosts(v: &str) -> Result<Hosts, String> {
    match v {
        "1" => Ok(Hosts::One),
        "2" => Ok(Hosts::Two),
        "mixed" => Ok(Hosts::Mixed),
        _ => Err(format!("--hosts {v:?}: expected 1, 2 or mixed")),
    }
}

/// Parses `args` (without the program name), with `FERRY_CHECK_*`
/// environment variables as defaults.
pub fn parse(args: &[String]) -> Result<Invocation, String> {
    let mut opts = Options {
        trials: env("FERRY_CHECK_TRIALS")
            .map_or(Ok(10), |v| parse_u64("FERRY_CHECK_TRIALS", &v))?,
        seed: match env("FERRY_CHECK_SEED") {
            Some(v) => parse_u64("FERRY_CHECK_SEED", &v)?,
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        },
        backends: env("FERRY_CHECK_BACKEND").map_or(Ok(Backends::Both), |v| parse_backends(&v))?,
        hosts: env("FERRY_CHECK_HOSTS").map_or(Ok(Hosts::Mixed), |v| parse_hosts(&v))?,
        budget: Duration::from_secs(
            env("FERRY_CHECK_BUDGET").map_or(Ok(170), |v| parse_u64("FERRY_CHECK_BUDGET", &v))?,
        ),
        verbose: env("FERRY_CHECK_VERBOSE").is_some(),
        converge: env("FERRY_CHECK_CONVERGE").is_some(),
    };
    let mut worker: Option<WorkerArgs> = None;
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // `--flag=value` and `--flag value` alike.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--trials" => opts.trials = parse_u64(flag, &value()?)?,
            "--seed" => {
                let v = parse_u64(flag, &value()?)?;
                opts.seed = v;
                if let Some(w) = worker.as_mut() {
                    w.seed = v;
                }
            }
            "--backend" => opts.backends = parse_backends(&value()?)?,
            "--hosts" => opts.hosts = parse_hosts(&value()?)?,
            "--budget" => opts.budget = Duration::from_secs(parse_u64(flag, &value()?)?),
            "--verbose" | "-v" => opts.verbose = true,
            "--converge" => opts.converge = true,
            "--worker" => {
                worker = Some(WorkerArgs {
                    kind: value()?,
                    id: 0,
                    seed: opts.seed,
                    mount: PathBuf::new(),
                    reference: PathBuf::new(),
                    journals: PathBuf::new(),
                    limit: Duration::from_secs(60),
                })
            }
            "--id" | "--mount" | "--reference" | "--journals" | "--limit" => {
                let v = value()?;
                let w = worker
                    .as_mut()
                    .ok_or_else(|| format!("{flag} is a worker option (after --worker)"))?;
                match flag {
                    "--id" => w.id = parse_u64(flag, &v)? as usize,
                    "--mount" => w.mount = v.into(),
                    "--reference" => w.reference = v.into(),
                    "--journals" => w.journals = v.into(),
                    _ => w.limit = Duration::from_secs(parse_u64(flag, &v)?),
                }
            }
            "--list" => return Ok(Invocation::List),
            "--ignored" => return Ok(Invocation::Nothing),
            // libtest flags that mean nothing here.
            "--nocapture" | "--show-output" | "--quiet" | "-q" | "--exact"
            | "--include-ignored" => {}
            "--test-threads" | "--color" | "--format" | "-Z" | "--skip" => {
                value()?;
            }
            f if f.starts_with('-') => return Err(format!("unknown option {f}")),
            filter => filters.push(filter.to_string()),
        }
    }
    if let Some(w) = worker {
        return Ok(Invocation::Worker(w));
    }
    if !filters.is_empty() && !filters.iter().any(|f| TEST_NAME.contains(f.as_str())) {
        return Ok(Invocation::Nothing);
    }
    Ok(Invocation::Check(opts))
}
