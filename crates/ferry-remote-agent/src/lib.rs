//! `libferry_remote_agent.so`: preload it and the program hosts a ferry-remote agent.
//!
//! ```text
//! LD_PRELOAD=target/release/libferry_remote_agent.so some-program &
//! ferry map --pid $! --len 1M     # served by the agent, no ptrace
//! ```
//!
//! A constructor in `.init_array` runs when the dynamic loader maps the
//! library, before the program's `main`, and calls
//! [`ferry_remote::agent::start`], which binds `\0ferry-remote-agent-<pid>`
//! and serves from its own thread. Failure to start (the name taken, no
//! threads allowed) is reported on stderr once and otherwise ignored: the
//! host program must run exactly as it would without the agent.
//!
//! Children inherit `LD_PRELOAD` and so start their own agents after `exec`;
//! a `fork` without `exec` copies only the listening socket, not the serving
//! thread, and the child answers to no name (its pid differs). Programs that
//! close every descriptor at startup close the listener too, and setuid
//! programs ignore `LD_PRELOAD`; use injection for those.
#![deny(missing_docs)]
#![deny(unsafe_code)]

extern "C" fn start_agent() {
    if let Err(e) = ferry_remote::agent::start() {
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        eprintln!("ferry-remote-agent: not started: {e}{cause}");
    }
}

/// The loader calls every pointer in `.init_array` when it maps this library.
// SAFETY: `.init_array` holds `extern "C" fn()` pointers that the loader calls
// once, single-threaded, before main; start_agent has exactly that type.
#[allow(unsafe_code)]
#[used]
#[link_section = ".init_array"]
static START_AGENT: extern "C" fn() = start_agent;
