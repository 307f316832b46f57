//! The connections' protocols: TLS handshakes, protocol errors, failed
//! accepts, QUIC Initials not accepted.

use super::{of, one, Counter, Labels, Reg};
use crate::reject::ProtocolError;

/// How a TLS handshake ended, the `result` and `resumed` labels of
/// `doh_tls_handshakes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Completed with a certificate and a signature.
    Full,
    /// Completed by resuming a session (a ticket or the session cache).
    Resumed,
    Failed,
    Timeout,
}

impl Handshake {
    const ALL: [Handshake; 4] = [
        Handshake::Full,
        Handshake::Resumed,
        Handshake::Failed,
        Handshake::Timeout,
    ];
    fn labels(self) -> Labels {
        let (result, resumed) = match self {
            Handshake::Full => ("ok", "false"),
            Handshake::Resumed => ("ok", "true"),
            Handshake::Failed => ("failed", "false"),
            Handshake::Timeout => ("timeout", "false"),
        };
        vec![("result", result.into()), ("resumed", resumed.into())]
    }

    /// How a completed rustls handshake went.
    pub fn of(conn: &rustls::CommonState) -> Handshake {
        match conn.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => Handshake::Resumed,
            _ => Handshake::Full,
        }
    }
}

/// What a QUIC listener did with an Initial it did not accept, the
/// `action` of `doh_quic_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicRefusal {
    /// Banned or denied: no answer at all.
    Ignored,
    /// Unvalidated source over the handshake threshold: a stateless Retry.
    Retry,
    /// Over a connection cap: a CONNECTION_CLOSE.
    Refused,
}

impl QuicRefusal {
    const ALL: [QuicRefusal; 3] = [
        QuicRefusal::Ignored,
        QuicRefusal::Retry,
        QuicRefusal::Refused,
    ];
    fn label(self) -> &'static str {
        match self {
            QuicRefusal::Ignored => "ignored",
            QuicRefusal::Retry => "retry",
            QuicRefusal::Refused => "refused",
        }
    }
}

/// Why `accept()` failed, the `kind` of `doh_accept_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// EMFILE / ENFILE: out of file descriptors.
    NoFds,
    /// ENOBUFS / ENOMEM.
    NoMemory,
    Other,
}

impl AcceptError {
    const ALL: [AcceptError; 3] = [
        AcceptError::NoFds,
        AcceptError::NoMemory,
        AcceptError::Other,
    ];

    pub fn of(e: &std::io::Error) -> AcceptError {
        // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
        match e.raw_os_error() {
            Some(23 | 24) => AcceptError::NoFds,
            Some(12 | 105) => AcceptError::NoMemory,
            _ => AcceptError::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            AcceptError::NoFds => "no_fds",
            AcceptError::NoMemory => "no_memory",
            AcceptError::Other => "other",
        }
    }
}

pub struct WireMetrics {
    protocol_errors: Vec<Counter>,
    handshakes: Vec<Counter>,
    accept_errors: Vec<Counter>,
    quic_refusals: Vec<Counter>,
}

impl WireMetrics {
    pub fn register(reg: &mut Reg<'_>) -> WireMetrics {
        let proto = reg.counters(
            "doh_protocol_errors",
            "Connections closed for a protocol error, by kind",
        );
        let handshakes = reg.counters(
            "doh_tls_handshakes",
            "TLS handshakes by result, and whether they resumed a session",
        );
        let accept = reg.counters(
            "doh_accept_errors",
            "Failed accept() calls by kind (no_fds: out of file descriptors)",
        );
        let quic = reg.counters(
            "doh_quic_refused",
            "QUIC Initials not accepted: ignored (banned, denied), retry (address \
             validation asked), refused (over a cap)",
        );
        WireMetrics {
            protocol_errors: ProtocolError::ALL
                .iter()
                .map(|k| one(&proto, "kind", k.label()))
                .collect(),
            handshakes: Handshake::ALL
                .iter()
                .map(|h| handshakes.get_or_create(&h.labels()).clone())
                .collect(),
            accept_errors: AcceptError::ALL
                .iter()
                .map(|k| one(&accept, "kind", k.label()))
                .collect(),
            quic_refusals: QuicRefusal::ALL
                .iter()
                .map(|k| one(&quic, "action", k.label()))
                .collect(),
        }
    }

    pub fn protocol_error(&self, kind: ProtocolError) {
        self.protocol_errors[kind.index()].inc();
    }

    pub fn handshake(&self, result: Handshake) {
        if let Some(c) = of(&Handshake::ALL, &self.handshakes, result) {
            c.inc();
        }
    }

    pub fn accept_error(&self, kind: AcceptError) {
        if let Some(c) = of(&AcceptError::ALL, &self.accept_errors, kind) {
            c.inc();
        }
    }

    pub fn quic_refusal(&self, action: QuicRefusal) {
        if let Some(c) = of(&QuicRefusal::ALL, &self.quic_refusals, action) {
            c.inc();
        }
    }
}
