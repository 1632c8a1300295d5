//! The CLI's parsers for numbers people type: durations, sizes, signals,
//! addresses. Each refuses bad input with a sentence that says what was
//! expected; none can panic or overflow, whatever it is given (the tests
//! below fuzz them, and tests/ops_cli.rs fuzzes the whole command line).

use std::time::Duration;

pub use ferry_fs::mount::parse_size;

/// Longest duration accepted: a century, far past any sensible timeout and
/// far below what the clock can add.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses a duration: a number of seconds (`600`, `0.5`), or a number with
/// a unit (`200ms`, `90s`, `10m`, `2h`, `1d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let unit_at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(unit_at);
    let scale = match unit.trim_start() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(not_a_duration(text)),
    };
    let valid = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !valid {
        return Err(not_a_duration(text));
    }
    let value: f64 = number.parse().map_err(|_| not_a_duration(text))?;
    let secs = value * scale;
    if !secs.is_finite() || secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("{s:?} is too long (at most 100 years)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn not_a_duration(text: &str) -> String {
    format!("not a duration: {text:?} (seconds, or a number with ms, s, m, h or d: 90, 500ms, 10m)")
}

/// Parses a size that must not be zero (a mapping's length).
pub fn parse_nonzero_size(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err("the size must not be zero".into()),
        n => Ok(n),
    }
}

/// Parses a signal by name (`KILL`, `SIGKILL`, `kill`) or number (`9`,
/// and the real-time signals `SIGRTMIN`..`SIGRTMAX` by number).
pub fn parse_signal(text: &str) -> Result<i32, String> {
    let s = text.trim();
    if let Ok(n) = s.parse::<i32>() {
        let max = libc::SIGRTMAX();
        return if (1..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("no signal has number {n} (1 to {max})"))
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("not a signal: {text:?} (a name like KILL or TERM, or a number)"))
}

/// Parses an address in a process: hexadecimal with `0x`, else decimal.
pub fn parse_addr(text: &str) -> Result<u64, String> {
    let s = text.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("not an address: {text:?} (hexadecimal with 0x, or decimal)"))
}

/// Parses a file mode creation mask: octal, at most 0777.
pub fn parse_umask(text: &str) -> Result<u32, String> {
    let s = text.trim();
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(mask) if mask <= 0o777 && !digits.is_empty() => Ok(mask),
        _ => Err(format!("not a umask: {text:?} (octal, 000 to 777)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_fs::mount::MountConfig;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        for bad in ["", "-1", "abc", "1x", ".", "1.2.3", "inf", "NaN", "1e3"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        let huge = parse_duration("18446744073709551615").unwrap_err();
        assert!(huge.contains("too long"), "{huge}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2 T"), Ok(2 << 40));
        assert!(parse_size("-5").unwrap_err().contains("negative"));
        assert!(parse_size("16E").is_err() && parse_size("99999999999999999999").is_err());
        assert!(parse_size("16384P").unwrap_err().contains("too large"));
        assert!(parse_nonzero_size("0").is_err());
    }

    #[test]
    fn signals_addresses_umasks() {
        assert_eq!(parse_signal("KILL"), Ok(libc::SIGKILL));
        assert_eq!(parse_signal("sigterm"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("9"), Ok(9));
        assert!(parse_signal("0").is_err() && parse_signal("BOGUS").is_err());
        assert_eq!(parse_addr("0x7f0000000000"), Ok(0x7f00_0000_0000));
        assert_eq!(parse_addr("4096"), Ok(4096));
        assert_eq!(parse_umask("022"), Ok(0o22));
        assert!(parse_umask("8").is_err() && parse_umask("1777").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// No input panics any parser.
        #[test]
        fn parsers_never_panic(s in "\\PC{0,24}") {
            let _ = parse_duration(&s);
            let _ = parse_size(&s);
            let _ = parse_signal(&s);
            let _ = parse_addr(&s);
            let _ = parse_umask(&s);
            let _ = MountConfig::new("/s".into(), "/m".into()).apply_options(&s);
        }

        /// Numbers with units, the shapes people type, never panic either,
        /// and a size that parses is its number times its unit.
        #[test]
        fn numeric_shapes(n in any::<u64>(), frac in "[0-9]{0,20}", unit in "(|K|M|G|T|P|E|k|KiB|ms|s|m|h|d|x)") {
            let with_frac = format!("{n}.{frac}{unit}");
            let _ = parse_duration(&with_frac);
            let _ = parse_size(&with_frac);
            let plain = format!("{n}{unit}");
            let shift = match unit.as_str() {
                "" => Some(0), "K" | "k" | "KiB" => Some(10), "M" => Some(20), "G" => Some(30),
                "T" => Some(40), "P" => Some(50), _ => None,
            };
            if let Some(shift) = shift {
                let want = u64::try_from(u128::from(n) << shift).ok();
                prop_assert_eq!(parse_size(&plain).ok(), want);
            }
        }

        /// What `ferry mount` hands its daemon reads back as the same
        /// settings.
        #[test]
        fn mount_options_round_trip(
            flags in any::<[bool; 8]>(),
            threads in 1usize..=64,
            sizes in any::<[u64; 3]>(),
            prefetch in 0..3u8,
            metrics in proptest::option::of(1u16..),
        ) {
            let mut cfg = MountConfig::new("/s".into(), "/m".into());
            [cfg.allow_other, cfg.read_only, cfg.passthrough, cfg.nodev, cfg.nosuid, cfg.noexec,
             cfg.no_backend, cfg.io_uring] = flags;
            cfg.threads = threads;
            [cfg.max_backlog, cfg.cache_size, cfg.prefetch_max_file] = sizes;
            cfg.prefetch = ["none", "small", "all"][usize::from(prefetch)].parse().unwrap();
            cfg.metrics = metrics.map(|port| ([127, 0, 0, 1], port).into());
            let mut back = MountConfig::new("/s".into(), "/m".into());
            back.apply_options(&cfg.options_without_backend()).unwrap();
            prop_assert_eq!(back, cfg);
        }
    }
}
