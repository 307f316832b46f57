//! systemd: sockets handed over with `LISTEN_FDS` (socket activation) and
//! service state reported to `NOTIFY_SOCKET` (`Type=notify`).
//!
//! Sockets are told apart by their `FileDescriptorName=`: `https`, `http`,
//! `dot` (TCP), `h3` and `doq` (UDP); an unnamed one is taken as `https`. The
//! sockets of a kind, when any were passed, replace the configured
//! addresses of that kind.

use std::collections::BTreeMap;

use super::listener::{Kind, Socket};

/// Sockets inherited from the service manager, by kind.
#[derive(Debug, Default)]
pub struct Inherited(pub BTreeMap<Kind, Vec<Socket>>);

impl Inherited {
    /// Takes the sockets passed with `LISTEN_FDS` (for this process only:
    /// `LISTEN_PID` is checked). Call before any thread starts: the
    /// variables are removed from the environment.
    pub fn from_env() -> Inherited {
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut out = Inherited::default();
        for i in 0..fds.len() {
            let name = names.get(i).map(String::as_str).unwrap_or("https");
            let kind = Kind::from_fd_name(name).unwrap_or(Kind::Https);
            let taken = if kind.udp() {
                fds.take_udp_socket(i).map(|s| s.map(Socket::Udp))
            } else {
                fds.take_tcp_listener(i).map(|s| s.map(Socket::Tcp))
            };
            match taken {
                Ok(Some(s)) => out.0.entry(kind).or_default().push(s),
                Ok(None) => {}
                Err(e) => eprintln!("doh-proxy: inherited socket {i} ({name}) is not usable: {e}"),
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0.values().all(Vec::is_empty)
    }
}

/// Tells the service manager about the service's state; a no-op without
/// `NOTIFY_SOCKET`.
pub fn notify(state: State) {
    use sd_notify::NotifyState;
    let r = match state {
        State::Ready => sd_notify::notify(&[NotifyState::Ready]),
        State::Reloading => sd_notify::notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
        ]),
        State::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// A service state for [`notify`].
#[derive(Debug, Clone, Copy)]
pub enum State {
    Ready,
    Reloading,
    Stopping,
}
