//! Backend locations: parsing `dir:/PATH` / `postgres://…` once, into a
//! [`Location`] that opens or creates the volume, and redacting
//! credentials before a location is shown anywhere.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::{dir, postgres, Backend, BackendError, VolumeInfo};

/// A parsed backend URL: where a volume lives.
///
/// Parse it once, where the URL comes in (a command line: it implements
/// [`FromStr`], so a bad URL fails when the arguments are parsed), then
/// [`Location::open`] it as often as needed. [`fmt::Display`] and
/// [`fmt::Debug`] hide passwords ([`redact`]), so a location may be logged
/// and put in errors; only the variant's field holds the URL verbatim.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// `dir:/PATH`: the embedded backend, a directory. Always absolute, so
    /// the same location means the same directory whatever the working
    /// directory of the process that opens it (a daemon runs from `/`).
    Dir(PathBuf),
    /// `postgres://…` or `postgresql://…`, kept verbatim for
    /// tokio-postgres, password included.
    Postgres(String),
}

/// Connect timeout for [`Location::init`], which runs once from the CLI.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

impl Location {
    /// Opens the volume here. `connect_timeout` bounds connecting (and, for
    /// postgres, reconnecting later). The volume must exist
    /// ([`BackendError::NotInitialized`]) and have the supported schema
    /// version ([`BackendError::SchemaVersion`]).
    pub fn open(&self, connect_timeout: Duration) -> Result<Box<dyn Backend>, BackendError> {
        Ok(match self {
            Location::Dir(path) => Box::new(dir::DirBackend::open(path)?),
            Location::Postgres(url) => Box::new(postgres::PgBackend::open(url, connect_timeout)?),
        })
    }

    /// Creates a volume here (what `ferry init` runs): the schema, then the
    /// root directory (mode `0o40755`, owned by root).
    ///
    /// Refuses an existing volume with [`BackendError::AlreadyInitialized`];
    /// an existing volume of an older schema version is migrated instead.
    pub fn init(&self, volume_name: &str) -> Result<VolumeInfo, BackendError> {
        match self {
            Location::Dir(path) => dir::init(path, volume_name),
            Location::Postgres(url) => postgres::init(url, volume_name, INIT_TIMEOUT),
        }
    }

    /// The URL verbatim, password included: parsing it gives this location
    /// again, so it is what to hand another process. Not for showing:
    /// [`fmt::Display`] is, and [`redact`] of this is what a store
    /// remembers.
    pub fn url(&self) -> String {
        match self {
            Location::Dir(path) => format!("dir:{}", path.display()),
            Location::Postgres(url) => url.clone(),
        }
    }
}

impl FromStr for Location {
    type Err = BackendError;

    /// Accepts `dir:/ABSOLUTE/PATH`, `postgres://…` and `postgresql://…`;
    /// anything else is [`BackendError::Invalid`] with a one-line reason
    /// that shows the URL redacted.
    fn from_str(url: &str) -> Result<Location, BackendError> {
        let invalid = |detail: String| Err(BackendError::Invalid { detail });
        if let Some(path) = url.strip_prefix("dir:") {
            let path = PathBuf::from(path);
            if path.as_os_str().is_empty() {
                return invalid("dir: URL needs a path, e.g. dir:/srv/ferry".into());
            }
            if !path.is_absolute() {
                let hint = std::path::absolute(&path)
                    .map(|p| format!(" (dir:{})", p.display()))
                    .unwrap_or_default();
                return invalid(format!(
                    "{url}: the path of a dir: URL must be absolute; give an absolute path{hint}"
                ));
            }
            Ok(Location::Dir(path))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Location::Postgres(url.to_owned()))
        } else {
            invalid(format!(
                "unsupported backend URL {:?}: expected dir:/PATH or postgres://…",
                redact(url)
            ))
        }
    }
}

impl fmt::Display for Location {
    /// The URL, password redacted: `dir:/srv/vol`, `postgres://u:***@h/db`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Dir(path) => write!(f, "dir:{}", path.display()),
            Location::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Location({:?})", self.to_string())
    }
}

/// Returns `url` with every password replaced by `***`, for display and logs.
///
/// Handles the password in the user-info part (`postgres://user:PW@host`)
/// and `password=PW` parameters (in a URL query or a key=value string). The
/// user name, host and database stay visible because they are what a person
/// needs to diagnose a connection problem.
pub fn redact(url: &str) -> String {
    let mut out = redact_userinfo(url);
    out = redact_param(&out);
    out
}

/// `scheme://user:PW@rest` → `scheme://user:***@rest`.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    // The last '@' ends the user info: a password may itself contain '@'
    // when the URL was written carelessly, and all of it must be hidden.
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..authority_start],
        &userinfo[..colon],
        &url[authority_start + at..]
    )
}

/// `…password=PW&…` / `… password=PW …` → `password=***`.
fn redact_param(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(pos) = rest.to_ascii_lowercase().find("password=") {
        let value_start = pos + "password=".len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        let value = &rest[value_start..];
        let value_len = value.find(['&', ' ', '#']).unwrap_or(value.len());
        rest = &value[value_len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_password() {
        assert_eq!(
            redact("postgres://alice:s3cr3t@db.example:5432/ferry"),
            "postgres://alice:***@db.example:5432/ferry"
        );
        assert_eq!(
            redact("postgresql://alice:p@ss@db/ferry"),
            "postgresql://alice:***@db/ferry"
        );
    }

    #[test]
    fn redacts_query_and_keyword_passwords() {
        assert_eq!(
            redact("postgres://alice@db/ferry?sslmode=disable&password=hunter2&x=1"),
            "postgres://alice@db/ferry?sslmode=disable&password=***&x=1"
        );
        assert_eq!(
            redact("host=db user=alice PASSWORD=hunter2 dbname=f"),
            "host=db user=alice PASSWORD=*** dbname=f"
        );
    }

    #[test]
    fn leaves_urls_without_password_alone() {
        for url in [
            "postgres://alice@db/ferry",
            "dir:/srv/ferry",
            "postgres://db",
        ] {
            assert_eq!(redact(url), url);
        }
    }

    #[test]
    fn parse_rejects_unknown_scheme_without_leaking() {
        let err = "mysql://u:topsecret@h/db".parse::<Location>().unwrap_err();
        assert!(matches!(err, BackendError::Invalid { .. }), "{err}");
        assert!(!err.to_string().contains("topsecret"), "{err}");
        assert!(matches!(
            "dir:/x".parse::<Location>().unwrap(),
            Location::Dir(p) if p == std::path::Path::new("/x")
        ));
        assert!(matches!(
            "postgresql://db/f".parse::<Location>().unwrap(),
            Location::Postgres(u) if u == "postgresql://db/f"
        ));
    }

    #[test]
    fn dir_paths_must_be_absolute() {
        for bad in ["dir:", "dir:vol", "dir:./vol", "dir:../x/vol"] {
            let err = bad.parse::<Location>().unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, BackendError::Invalid { .. }), "{text}");
            assert!(!text.contains('\n'), "one line: {text}");
            if bad != "dir:" {
                assert!(text.contains("absolute path"), "{text}");
            }
        }
    }

    #[test]
    fn display_and_debug_redact_and_display_parses_back() {
        let pg: Location = "postgres://alice:s3cr3t@db:5432/f?password=again"
            .parse()
            .unwrap();
        for text in [pg.to_string(), format!("{pg:?}")] {
            assert!(
                !text.contains("s3cr3t") && !text.contains("again"),
                "{text}"
            );
            assert!(text.contains("postgres://alice:***@db:5432/f"), "{text}");
        }
        let dir: Location = "dir:/srv/ferry vol".parse().unwrap();
        assert_eq!(dir.to_string(), "dir:/srv/ferry vol");
        assert_eq!(dir.to_string().parse::<Location>().unwrap(), dir);
        assert_eq!(format!("{dir:?}"), "Location(\"dir:/srv/ferry vol\")");
    }
}
