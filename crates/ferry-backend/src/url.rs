//! Backend locations: parsing `dir:PATH` / `postgres://…` and redacting
//! credentials before a location is shown anywhere.

use std::path::PathBuf;

use crate::BackendError;

/// A parsed backend location.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// `dir:PATH`.
    Dir(PathBuf),
    /// `postgres://…` or `postgresql://…`, kept verbatim for tokio-postgres.
    Postgres(String),
}

impl Location {
    /// Parses a backend URL, rejecting unknown schemes with a redacted message.
    pub(crate) fn parse(url: &str) -> Result<Location, BackendError> {
        if let Some(path) = url.strip_prefix("dir:") {
            if path.is_empty() {
                return Err(BackendError::Invalid {
                    detail: "dir: URL needs a path, e.g. dir:/srv/ferry".into(),
                });
            }
            Ok(Location::Dir(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Location::Postgres(url.to_owned()))
        } else {
            Err(BackendError::Invalid {
                detail: format!(
                    "unsupported backend URL {:?}: expected dir:PATH or postgres://…",
                    redact(url)
                ),
            })
        }
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
        let err = Location::parse("mysql://u:topsecret@h/db").err().unwrap();
        assert!(!err.to_string().contains("topsecret"), "{err}");
        assert!(matches!(
            Location::parse("dir:/x").unwrap(),
            Location::Dir(p) if p == std::path::Path::new("/x")
        ));
    }
}
