//! PostgreSQL-only behavior: surviving a server outage with the same
//! backend object, and never showing the password.

use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use ferry_backend::{Backend, BackendError, InodeState, ObjectId, Op, Outcome};

/// Creates file `f{counter}` in the root; outcomes of the inode and the name.
fn put_new(b: &dyn Backend, counter: u64) -> Result<Vec<Outcome>, BackendError> {
    let id = ObjectId { host: 5, counter };
    let state = InodeState::new(id, 0o100600);
    let name = Op::PutEntry {
        parent: ObjectId::ROOT,
        name: format!("f{counter}").into_bytes(),
        child: id,
        base: None,
    };
    b.commit(5, &[Op::PutInode { state, base: None }, name])
}

/// Asserts `r` failed transiently, within `limit` of `t0`.
fn assert_transient<T: std::fmt::Debug>(
    what: &str,
    t0: Instant,
    limit: Duration,
    r: Result<T, BackendError>,
) {
    let err = r.expect_err(what);
    assert!(err.is_transient(), "{what}: {err}");
    assert!(t0.elapsed() < limit, "{what}: took {:?}", t0.elapsed());
}

#[test]
fn outage_fails_transiently_and_same_object_recovers() {
    // Own cluster: stopping the shared one would break concurrent tests.
    let pg = PgServer::start();
    let url = pg.create_database("outage");
    ferry_backend::init(&url, "outage").unwrap();
    let connect_timeout = Duration::from_secs(2);
    let b = ferry_backend::open(&url, connect_timeout).unwrap();
    assert_eq!(
        put_new(&*b, 1).unwrap(),
        vec![Outcome::Applied { version: 1 }; 2]
    );
    assert!(
        b.wait_feed(0, Duration::ZERO).unwrap(),
        "LISTEN connection established"
    );
    let seq = b.feed(0, 100).unwrap().last().unwrap().seq;

    pg.stop();
    let limit = connect_timeout + Duration::from_secs(3);
    let t0 = Instant::now();
    assert_transient("info", t0, limit, b.info());
    let t0 = Instant::now();
    assert_transient("commit", t0, limit, put_new(&*b, 2));
    let t0 = Instant::now();
    assert_transient(
        "wait_feed",
        t0,
        limit,
        b.wait_feed(seq, Duration::from_secs(1)),
    );
    let t0 = Instant::now();
    assert_transient(
        "open",
        t0,
        limit,
        ferry_backend::open(&url, connect_timeout),
    );

    pg.restart();
    assert_eq!(b.info().unwrap().name, "outage", "same object reconnects");
    assert_eq!(
        put_new(&*b, 2).unwrap(),
        vec![Outcome::Applied { version: 1 }; 2]
    );
    assert_eq!(
        b.inode(&ObjectId {
            host: 5,
            counter: 1
        })
        .unwrap()
        .unwrap()
        .version,
        1,
        "data survived"
    );
    // The LISTEN connection is re-established too: a commit from another
    // object wakes a waiter on this one.
    let seq = b.feed(0, 100).unwrap().last().unwrap().seq;
    let other = ferry_backend::open(&url, connect_timeout).unwrap();
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        put_new(&*other, 3).unwrap();
    });
    let t0 = Instant::now();
    assert!(b.wait_feed(seq, Duration::from_secs(20)).unwrap());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "woke late: {:?}",
        t0.elapsed()
    );
    committer.join().unwrap();

    // A restart nobody noticed (no call during the outage): the pooled
    // connections are dead, and the next call must still succeed.
    pg.stop();
    pg.restart();
    assert_eq!(
        put_new(&*b, 4).unwrap(),
        vec![Outcome::Applied { version: 1 }; 2]
    );
    assert_eq!(b.info().unwrap().name, "outage");
    assert!(b.wait_feed(0, Duration::ZERO).unwrap());
}

#[test]
fn wrong_password_is_auth_error_without_the_password() {
    let pg = PgServer::shared();
    let url = pg.create_database("auth");
    ferry_backend::init(&url, "auth").unwrap();
    let password = pg.password();
    assert!(
        url.contains(&password),
        "test premise: the URL carries the password"
    );

    let wrong = url.replace(&password, "Wr0ngPassw0rd");
    let err = ferry_backend::open(&wrong, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, BackendError::Auth { .. }), "{err}");
    assert!(!err.is_transient());
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("Wr0ngPassw0rd"), "{text}");
        assert!(!text.contains(&password), "{text}");
        assert!(text.contains("***"), "location shown redacted: {text}");
    }
    let err = ferry_backend::init(&wrong, "x").unwrap_err();
    assert!(matches!(err, BackendError::Auth { .. }), "{err}");
}

#[test]
fn debug_and_errors_never_show_the_password() {
    let pg = PgServer::shared();
    let url = pg.create_database("secrets");
    let password = pg.password();
    let err = ferry_backend::open(&url, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, BackendError::NotInitialized { .. }), "{err}");
    let again = {
        ferry_backend::init(&url, "secrets").unwrap();
        ferry_backend::init(&url, "secrets").unwrap_err()
    };
    let b = ferry_backend::open(&url, Duration::from_secs(5)).unwrap();
    // Same credentials, a port nobody listens on.
    let at = url.find('@').unwrap();
    let path = at + url[at..].find('/').unwrap();
    let refused = format!("{}127.0.0.1:1{}", &url[..=at], &url[path..]);
    let unreachable = ferry_backend::open(&refused, Duration::from_secs(2)).unwrap_err();
    assert!(unreachable.is_transient(), "{unreachable}");
    for text in [
        err.to_string(),
        again.to_string(),
        format!("{again:?}"),
        format!("{b:?}"),
        unreachable.to_string(),
        format!("{unreachable:?}"),
    ] {
        assert!(!text.contains(&password), "{text}");
    }
    assert!(format!("{b:?}").contains("ferry:***@127.0.0.1"), "{b:?}");

    // A malformed URL is reported without its password.
    let err = ferry_backend::open(
        "postgres://u:S3cretPw@h:notaport/db",
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("S3cretPw"), "{err}");
}
