//! The proxy against a loopback echo server: delay added, bytes kept in
//! order, throughput not capped by the delay, and the partition switch.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use ferry_netem::{Config, Proxy};

const DELAY: Duration = Duration::from_millis(25);

/// An echo server on loopback that serves connections until the test ends.
fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut &c);
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn proxy() -> Proxy {
    Proxy::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        target: echo_server(),
        delay: DELAY,
        listen_netns: None,
    })
    .unwrap()
}

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn round_trip_takes_twice_the_delay() {
    let p = proxy();
    let mut s = connect(&p);
    for _ in 0..3 {
        let t = Instant::now();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let rtt = t.elapsed();
        assert!(
            rtt >= 2 * DELAY && rtt < 2 * DELAY + Duration::from_millis(200),
            "rtt {rtt:?}"
        );
    }
}

#[test]
fn bulk_transfer_keeps_order_and_is_not_capped_by_the_delay() {
    let p = proxy();
    let s = connect(&p);
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let t = Instant::now();
    let writer = {
        let (mut s, data) = (s.try_clone().unwrap(), data.clone());
        thread::spawn(move || {
            s.write_all(&data).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    (&s).read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "echoed bytes differ ({} bytes)", back.len());
    // A sleep per 64 KiB read would need 512 × 50 ms = 25 s.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn partition_cuts_live_and_new_connections_until_restored() {
    let p = proxy();
    let mut s = connect(&p);
    s.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).unwrap();
    p.set_partitioned(true);
    // The live connection ends (EOF or reset), promptly.
    let t = Instant::now();
    assert!(!matches!(s.read(&mut one), Ok(1)));
    assert!(t.elapsed() < Duration::from_secs(2));
    // New ones are closed without forwarding anything.
    let mut n = connect(&p);
    let _ = n.write_all(b"y");
    assert!(!matches!(n.read(&mut one), Ok(1)));
    // Its threads wind down by themselves, promptly.
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.live_connections() > 0 {
        assert!(Instant::now() < deadline, "connections still live");
        thread::sleep(Duration::from_millis(10));
    }

    p.set_partitioned(false);
    let mut r = connect(&p);
    r.write_all(b"z").unwrap();
    r.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"z");
}
