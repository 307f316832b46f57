//! The transports: listeners, connections and the protocols on them. Each
//! hands requests to the [`crate::pipeline`] and writes its answers out.
//!
//! - [`listener`]: the kinds of listener, binding and serving them (a new
//!   transport is a file here plus one [`listener::Kind`]).
//! - [`tcp`]: the HTTPS and plain-HTTP listeners (accept, admission,
//!   PROXY header, TLS).
//! - [`dot`]: DNS over TLS.
//! - `quic`: the QUIC listeners' accept loop, admission and handshake;
//!   `h3`: DoH over HTTP/3 and `doq`: DNS over QUIC on its connections
//!   (with the `h3` feature).
//! - [`http`]: HTTP/1.1 and HTTP/2 with hyper; [`streams`]: an HTTP/2
//!   connection's streams run in its own task.
//! - [`io`]: write batching on the client's TCP stream.
//! - [`message`]: one DNS message (DNS over TLS and over QUIC): admit,
//!   parse, answer or refuse.
//! - [`watchdog`]: the request-driven clock that closes slow and idle
//!   connections, shared by every transport.
//! - [`workers`]: the threads TCP connections are accepted and served on.
//! - [`certs`]: the certificate in service, reloaded when its files change.

#[cfg(feature = "h3")]
pub(crate) mod amplification;
pub(crate) mod certs;
#[cfg(feature = "h3")]
pub(crate) mod doq;
pub(crate) mod dot;
#[cfg(feature = "h3")]
pub(crate) mod h3;
pub(crate) mod handshake;
pub(crate) mod http;
pub(crate) mod io;
pub mod listener;
pub(crate) mod message;
#[cfg(test)]
mod patched_tests;
#[cfg(feature = "h3")]
pub(crate) mod quic;
pub(crate) mod streams;
pub mod systemd;
pub(crate) mod tcp;
pub(crate) mod watchdog;
pub(crate) mod workers;

use std::path::PathBuf;
use std::time::Duration;

use crate::pipeline::ConnLimits;

/// Where the TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// A self-signed certificate for `localhost`, generated at start.
    SelfSigned,
    /// Obtained and renewed with ACME (a self-signed one until then).
    Acme,
}

/// What the listeners run with.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// The addresses of each kind of listener.
    pub listen: listener::Addrs,
    /// Unvalidated QUIC handshakes per second before Retry is required.
    pub h3_retry_threshold: u32,
    pub tls: TlsSource,
    /// Session tickets' lifetime; none: no tickets.
    pub ticket_lifetime: Option<Duration>,
    pub conn: ConnLimits,
}
