//! Credentials that are not in the URL: `PGPASSFILE` and `PGPASSWORD`,
//! which tokio-postgres ignores and the backend reads itself.
//!
//! A test binary of its own with a single test, because it changes the
//! process environment.

use std::time::Duration;

use ferry_backend::testing::PgServer;
use ferry_backend::BackendError;

#[test]
fn password_from_pgpassfile_then_pgpassword() {
    let pg = PgServer::shared();
    let password = pg.password();
    let url = pg.create_database("env_creds");
    ferry_backend::init(&url, "env").unwrap();
    let bare = url.replace(&format!(":{password}@"), "@");
    assert!(!bare.contains(&password), "test premise: {bare}");
    let open = || ferry_backend::open(&bare, Duration::from_secs(5));

    let err = open().unwrap_err();
    assert!(
        matches!(err, BackendError::Auth { .. }),
        "no password anywhere: {err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!("# test\nother:*:*:*:nope\n127.0.0.1:*:env_creds:ferry:{password}\n"),
    )
    .unwrap();
    std::env::set_var("PGPASSFILE", &passfile);
    assert_eq!(open().unwrap().info().unwrap().name, "env");
    std::env::remove_var("PGPASSFILE");

    std::env::set_var("PGPASSWORD", &password);
    assert_eq!(open().unwrap().info().unwrap().name, "env");
    std::env::remove_var("PGPASSWORD");
}
