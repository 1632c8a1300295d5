//! The spawn server, from a binary that starts it the intended way: `main`
//! calls `main_if_server()` first, then `Server::start()` re-executes it.
//! (`harness = false`: libtest's own main could not make that call.)

mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{field, sh, stdout};
use ferry_spawn::{Command, Resource, Server, SpawnError, Stdio, Step};

/// Spawns through the server with stdout piped; returns status and stdout.
fn via(server: &Server, cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let child = cmd
        .stdout(Stdio::Piped)
        .spawn_via(server)
        .expect("spawn_via");
    let out = child.wait_with_output().expect("wait");
    (out.status, String::from_utf8(out.stdout).unwrap())
}

fn options_apply_and_the_child_is_ours(server: &Server) {
    let (status, out) = via(
        server,
        sh("cat /proc/self/status; echo; cat /proc/$$/stat; pwd")
            .uid(65534)
            .gid(65534)
            .setsid(true)
            .rlimit(Resource::Nofile, 77, 77)
            .current_dir("/usr")
            .env("X", "1"),
    );
    assert!(status.success());
    assert_eq!(field(&out, "Uid"), "65534 65534 65534 65534");
    assert!(out.ends_with("/usr\n"));
    let stat_line = out.lines().find(|l| l.contains(") ")).unwrap();
    let stat = common::stat_fields(stat_line);
    assert_eq!(
        stat[1],
        std::process::id() as i64,
        "parent is us, not the server"
    );
    assert_eq!(stat[2], stat[3], "session leader");
}

fn stdio_is_ours_not_the_servers(server: &Server) {
    let mut child = Command::new("cat")
        .stdin(Stdio::Piped)
        .stdout(Stdio::Piped)
        .spawn_via(server)
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"via server").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"via server");
}

fn exec_errors_come_back_typed(server: &Server) {
    match Command::new("/nonexistent/prog").spawn_via(server) {
        Err(SpawnError::Child {
            step: Step::Exec,
            errno: libc::ENOENT,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match Command::new("true")
        .current_dir("/nonexistent")
        .spawn_via(server)
    {
        Err(SpawnError::Child {
            step: Step::Chdir,
            errno: libc::ENOENT,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

fn kill_and_exit_status(server: &Server) {
    let mut child = Command::new("sleep").arg("30").spawn_via(server).unwrap();
    child.kill().unwrap();
    assert_eq!(common::wait(&mut child).signal(), Some(libc::SIGKILL));
    let mut child = sh("exit 5").spawn_via(server).unwrap();
    assert_eq!(common::wait(&mut child).code(), Some(5));
}

fn many_threads_at_once(server: &Arc<Server>) {
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let server = Arc::clone(server);
            thread::spawn(move || {
                for i in 0..40 {
                    let (status, out) = via(&server, sh("echo $N").env("N", format!("{t}.{i}")));
                    assert!(status.success());
                    assert_eq!(out, format!("{t}.{i}\n"), "replies are not mixed up");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    println!(
        "  320 spawns via the server from 8 threads in {:?}",
        started.elapsed()
    );
}

fn a_dead_server_fails_the_request_in_flight_then_restarts(server: &Server) {
    let old = server.pid().unwrap() as i32;
    // Freeze it so our request is queued, not served, then kill it.
    // SAFETY: signals a process we started.
    unsafe { libc::kill(old, libc::SIGSTOP) };
    let in_flight = thread::scope(|s| {
        let request = s.spawn(|| Command::new("true").spawn_via(server));
        thread::sleep(Duration::from_millis(100));
        // SAFETY: as above.
        unsafe { libc::kill(old, libc::SIGKILL) };
        request.join().unwrap()
    });
    match in_flight {
        Err(err @ SpawnError::Server { .. }) => println!("  in-flight request: {err}"),
        other => panic!("expected a server error, got {other:?}"),
    }
    let mut child = Command::new("true").spawn_via(server).expect("restarted");
    assert!(common::wait(&mut child).success());
    let new = server.pid().unwrap() as i32;
    assert_ne!(new, old);
    // The dead one was reaped: no zombie of it is left.
    assert!(!std::path::Path::new(&format!("/proc/{old}")).exists());
}

fn the_server_exits_with_its_handle() {
    let server = Server::start().unwrap();
    let pid = server.pid().unwrap();
    drop(server);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

fn the_server_stays_small() {
    let server = Server::start().unwrap();
    // One round trip, so the server is past its startup and serving.
    assert!(common::wait(&mut Command::new("true").spawn_via(&server).unwrap()).success());
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.pid().unwrap())).unwrap();
    let rss_kb: u64 = field(&status, "VmRSS")
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    println!("  server RSS: {rss_kb} kB");
    assert!(rss_kb < 16 * 1024);
    // Plain spawns from this process still work beside it.
    assert_eq!(stdout(sh("echo plain")), "plain\n");
}

/// A server on a socket path, run by someone else (here: this binary
/// started with `--serve-path PATH`), and clients that connect to it.
fn a_server_on_a_socket_path_serves_connecting_clients() {
    let path = std::env::temp_dir().join(format!("ferry-spawn-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut process = Command::new(std::env::current_exe().unwrap())
        .arg("--serve-path")
        .arg(&path)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + common::TIMEOUT;
    let server = loop {
        match Server::connect(&path) {
            Ok(server) => break server,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("connect: {e}"),
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The child is the server's: wait reads the status from the pidfd.
        let (status, out) = via(&server, sh("cat /proc/$$/stat; exit 6").uid(65534));
        assert_eq!(status.code(), Some(6));
        assert_eq!(
            common::stat_fields(&out)[1],
            process.id() as i64,
            "parent is the server"
        );
        let mut sleeper = Command::new("sleep").arg("30").spawn_via(&server).unwrap();
        sleeper.kill().unwrap();
        assert_eq!(common::wait(&mut sleeper).signal(), Some(libc::SIGKILL));
        // A second client on the same path.
        let other = Server::connect(&path).unwrap();
        assert_eq!(via(&other, &mut sh("echo second")).1, "second\n");
    }));
    process.kill().unwrap();
    common::wait(&mut process);
    std::fs::remove_file(&path).unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn main() {
    ferry_spawn::server::main_if_server();
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, path] = &args[..] {
        if flag == "--serve-path" {
            ferry_spawn::server::serve_path(path.as_ref()).expect("serve_path");
        }
    }

    let server = Arc::new(Server::start().expect("start server"));
    let tests: [(&str, &dyn Fn()); 10] = [
        ("options_apply_and_the_child_is_ours", &|| {
            options_apply_and_the_child_is_ours(&server)
        }),
        ("stdio_is_ours_not_the_servers", &|| {
            stdio_is_ours_not_the_servers(&server)
        }),
        ("exec_errors_come_back_typed", &|| {
            exec_errors_come_back_typed(&server)
        }),
        ("kill_and_exit_status", &|| kill_and_exit_status(&server)),
        ("many_threads_at_once", &|| many_threads_at_once(&server)),
        (
            "a_dead_server_fails_the_request_in_flight_then_restarts",
            &|| a_dead_server_fails_the_request_in_flight_then_restarts(&server),
        ),
        (
            "the_server_exits_with_its_handle",
            &the_server_exits_with_its_handle,
        ),
        ("the_server_stays_small", &the_server_stays_small),
        ("still_works_after_restart", &|| {
            options_apply_and_the_child_is_ours(&server)
        }),
        (
            "a_server_on_a_socket_path_serves_connecting_clients",
            &a_server_on_a_socket_path_serves_connecting_clients,
        ),
    ];
    println!("\nrunning {} tests", tests.len());
    let mut failed = 0;
    for (name, test) in tests {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(test));
        println!(
            "test {name} ... {}",
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        failed += usize::from(result.is_err());
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        tests.len() - failed
    );
    std::process::exit(i32::from(failed > 0));
}
