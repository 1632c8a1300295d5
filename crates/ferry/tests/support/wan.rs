//! A slow link for replication tests and the WAN benchmark: a network
//! namespace joined to the host by a veth pair, and `ferry-netem` delay
//! proxies listening inside it.
//!
//! ```text
//!  host netns                               namespace ferry-PID-N
//!  ferry ── 10.213.X.1 ══ veth ══ 10.213.X.2 ── ferry-netem proxy (+delay each way)
//!  server on 127.0.0.1:P  <──────── connects from the host's loopback ─┘
//! ```
//!
//! The proxy's listening socket lives in the namespace (bound from a thread
//! that `setns`'d into it), its connections to the server are made from the
//! host's loopback. So a client reaches the server only across the veth,
//! which [`Wan::partition`] takes down, and no traffic leaves loopback or
//! the namespace this module made. PostgreSQL and sshd stay where they are
//! (127.0.0.1), unchanged.
//!
//! Everything is undone in `Drop`, also while a test panics: proxies stop
//! (joining their threads), then the namespace and the veth are deleted.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferry_netem::{Config, Proxy};

use super::{describe, run_bounded};

/// Bound on one `ip` command.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip ARGS`, bounded; panics with its output on failure.
fn ip(args: &[&str]) {
    let r = run_bounded(Command::new("ip").args(args), IP_TIMEOUT);
    assert!(
        matches!(&r, Ok(o) if o.status.success()),
        "ip {}: {}",
        args.join(" "),
        describe(&r)
    );
}

/// `ip -o -4 addr` of the host, to avoid subnets already in use.
fn host_addresses() -> String {
    run_bounded(Command::new("ip").args(["-o", "-4", "addr"]), IP_TIMEOUT)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A network namespace with a veth pair on a private /30 (10.213.0.0/16).
pub struct NetNs {
    name: String,
    host_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

impl NetNs {
    /// Creates `ferry-PID-N` and its link, both up. Names and subnet are
    /// unique per process and call, so parallel tests never share one.
    pub fn new() -> NetNs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let used = host_addresses();
        // 16,384 /30s in 10.213.0.0/16; start from one derived from pid and
        // n, skip any a concurrent run already has.
        let start = pid.wrapping_mul(31).wrapping_add(n * 7);
        let (host_ip, ns_ip) = (0..64)
            .map(|i| (start.wrapping_add(i) % 16_384) * 4)
            .map(|base| {
                let a = [10, 213, (base >> 8) as u8, base as u8];
                (
                    Ipv4Addr::new(a[0], a[1], a[2], a[3] + 1),
                    Ipv4Addr::new(a[0], a[1], a[2], a[3] + 2),
                )
            })
            .find(|(h, s)| !used.contains(&format!("{h}/")) && !used.contains(&format!("{s}/")))
            .expect("no free /30 in 10.213.0.0/16");
        // The struct exists before the first `ip` command: a failure at any
        // step still runs Drop, which removes whatever was made.
        let ns = NetNs {
            name: format!("ferry-{pid}-{n}"),
            host_if: format!("fw{pid}h{n}"),
            host_ip,
            ns_ip,
        };
        let ns_if = format!("fw{pid}n{n}");
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            &ns.name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec NAME …`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace's end of the veth.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// The host's end of the veth.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// `ip link set … up|down` on the host's end of the veth.
    pub fn set_link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the
        // host's; the explicit delete covers a namespace that never got one.
        let _ = run_bounded(
            Command::new("ip").args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        );
        let _ = run_bounded(
            Command::new("ip").args(["link", "del", &self.host_if]),
            IP_TIMEOUT,
        );
    }
}

/// A namespace and the delay proxies that make servers reachable through it.
/// Field order is drop order: proxies stop before their namespace goes.
pub struct Wan {
    proxies: Vec<Proxy>,
    ns: NetNs,
    one_way: Duration,
}

impl Wan {
    /// A new namespace whose proxies add `one_way` in each direction.
    pub fn new(one_way: Duration) -> Wan {
        Wan {
            proxies: Vec::new(),
            ns: NetNs::new(),
            one_way,
        }
    }

    /// The namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// Starts a proxy in the namespace forwarding to `target` (a server on
    /// the host's loopback); returns the address clients use instead.
    pub fn expose(&mut self, target: SocketAddr) -> SocketAddr {
        let proxy = Proxy::start(Config {
            listen: SocketAddr::new(self.ns.ns_ip().into(), 0),
            target,
            delay: self.one_way,
            listen_netns: Some(self.ns.path()),
        })
        .unwrap_or_else(|e| panic!("delay proxy in {}: {e}", self.ns.name()));
        let addr = proxy.addr();
        self.proxies.push(proxy);
        addr
    }

    /// Cuts the link: the proxies drop their live connections (so no client
    /// waits out a TCP timeout on a half-dead one), then the veth goes down,
    /// so new connections fail too.
    pub fn partition(&self) {
        for p in &self.proxies {
            p.set_partitioned(true);
        }
        self.ns.set_link(false);
    }

    /// Restores the link cut by [`Wan::partition`].
    pub fn heal(&self) {
        self.ns.set_link(true);
        for p in &self.proxies {
            p.set_partitioned(false);
        }
    }
}

/// Byte range of `host:port` in `scheme://user:pw@host:port/db`.
fn authority(url: &str) -> std::ops::Range<usize> {
    let at = url.rfind('@').expect("URL has user@host") + 1;
    at..at + url[at..].find('/').unwrap_or(url.len() - at)
}

/// `url` (`scheme://user:pw@127.0.0.1:PORT/db`) with its host and port
/// replaced by `via`: how a client reaches that server through a [`Wan`].
pub fn url_via(url: &str, via: SocketAddr) -> String {
    let r = authority(url);
    format!("{}{via}{}", &url[..r.start], &url[r.end..])
}

/// The `host:port` such a URL points at.
pub fn url_addr(url: &str) -> SocketAddr {
    url[authority(url)]
        .parse()
        .unwrap_or_else(|e| panic!("host:port of {url}: {e}"))
}
