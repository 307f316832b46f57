//! The kinds of listener, one variant each. Everything that tells one kind
//! from another — its configuration key, its systemd name, TCP or UDP, its
//! ALPN, how its sockets are served — is an exhaustive `match` here, so a
//! new transport is its own file beside this one plus one [`Kind`], and the
//! compiler points at whatever the new variant leaves out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::certs::Certs;
use super::{dot, tcp, workers::Workers};
use crate::pipeline::App;
use crate::tickets::Tickets;
use crate::tls::{self, Alpn};

/// A kind of listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// DoH over TLS: HTTP/2 and HTTP/1.1 (`--listen`).
    Https,
    /// DoH in the clear behind a reverse proxy: HTTP/1.1 and h2c.
    Http,
    /// DNS over TLS (RFC 7858).
    Dot,
    /// DoH over HTTP/3 (RFC 9114).
    H3,
    /// DNS over QUIC (RFC 9250).
    Doq,
}

/// The addresses of each kind of listener.
pub type Addrs = BTreeMap<Kind, Vec<SocketAddr>>;

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Https, Kind::Http, Kind::Dot, Kind::H3, Kind::Doq];

    /// Its configuration key (the flag with dashes).
    pub fn key(self) -> &'static str {
        match self {
            Kind::Https => "listen",
            Kind::Http => "listen_http",
            Kind::Dot => "listen_dot",
            Kind::H3 => "listen_h3",
            Kind::Doq => "listen_doq",
        }
    }

    /// Its systemd `FileDescriptorName=`.
    pub fn fd_name(self) -> &'static str {
        match self {
            Kind::Https => "https",
            Kind::Http => "http",
            Kind::Dot => "dot",
            Kind::H3 => "h3",
            Kind::Doq => "doq",
        }
    }

    pub fn from_fd_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.fd_name() == name)
    }

    /// A QUIC listener (UDP) rather than a TCP one.
    pub fn udp(self) -> bool {
        match self {
            Kind::Https | Kind::Http | Kind::Dot => false,
            Kind::H3 | Kind::Doq => true,
        }
    }

    /// The ALPN its TLS offers; `None` in the clear.
    fn alpn(self, acme: bool) -> Option<Alpn> {
        match self {
            Kind::Https if acme => Some(Alpn::HttpsAcme),
            Kind::Https => Some(Alpn::Https),
            Kind::Http => None,
            Kind::Dot => Some(Alpn::Dot),
            Kind::H3 => Some(Alpn::H3),
            Kind::Doq => Some(Alpn::Doq),
        }
    }

    /// What it serves, for the start-up log.
    pub fn serving(self) -> &'static str {
        match self {
            Kind::Https => "DoH over TLS",
            Kind::Http => "DoH over plain HTTP",
            Kind::Dot => "DNS over TLS",
            Kind::H3 => "DoH over HTTP/3 (UDP)",
            Kind::Doq => "DNS over QUIC (UDP)",
        }
    }
}

/// A listening socket, bound here or passed by the service manager.
#[derive(Debug)]
pub enum Socket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Socket {
    fn tcp(self, kind: Kind) -> anyhow::Result<std::net::TcpListener> {
        match self {
            Socket::Tcp(l) => Ok(l),
            Socket::Udp(_) => anyhow::bail!("{}: a UDP socket where TCP is needed", kind.fd_name()),
        }
    }

    #[cfg_attr(not(feature = "h3"), allow(dead_code))]
    fn udp(self, kind: Kind) -> anyhow::Result<std::net::UdpSocket> {
        match self {
            Socket::Udp(s) => Ok(s),
            Socket::Tcp(_) => anyhow::bail!("{}: a TCP socket where UDP is needed", kind.fd_name()),
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Socket::Tcp(l) => l.local_addr(),
            Socket::Udp(s) => s.local_addr(),
        }
    }
}

/// The listening sockets, bound but not yet served.
pub struct Bound {
    sockets: Vec<(Kind, Socket)>,
}

/// What serving the listeners needs.
pub struct Serving<'a> {
    pub app: &'a Arc<App>,
    /// The certificate in service (every kind but plain HTTP needs it).
    pub certs: Option<&'a Arc<Certs>>,
    pub tickets: Option<Arc<Tickets>>,
    /// Certificates come from ACME: the HTTPS listeners answer its
    /// TLS-ALPN-01 challenges.
    pub acme: bool,
    /// Unvalidated QUIC handshakes per second before Retry is required.
    pub retry_threshold: u32,
    pub workers: &'a Workers,
    pub tasks: &'a TaskTracker,
    pub shutdown: &'a CancellationToken,
}

impl Bound {
    /// Binds the configured addresses of each kind, or takes the sockets
    /// the service manager passed for it (they replace that kind's
    /// addresses).
    pub fn new(listen: &Addrs, mut passed: BTreeMap<Kind, Vec<Socket>>) -> anyhow::Result<Bound> {
        let mut sockets = Vec::new();
        for kind in Kind::ALL {
            let passed = passed.remove(&kind).unwrap_or_default();
            if !passed.is_empty() {
                for s in passed {
                    if let Socket::Tcp(l) = &s {
                        l.set_nonblocking(true)?;
                    }
                    sockets.push((kind, s));
                }
                continue;
            }
            for addr in listen.get(&kind).into_iter().flatten() {
                let socket = if kind.udp() {
                    Socket::Udp(
                        std::net::UdpSocket::bind(addr)
                            .map_err(|e| anyhow::anyhow!("cannot bind {addr}/udp: {e}"))?,
                    )
                } else {
                    Socket::Tcp(tcp::bind(*addr)?)
                };
                sockets.push((kind, socket));
            }
        }
        Ok(Bound { sockets })
    }

    /// The bound addresses of each kind (port 0 made the kernel's choice).
    pub fn addrs(&self) -> Addrs {
        let mut out = Addrs::new();
        for (kind, s) in &self.sockets {
            if let Ok(a) = s.local_addr() {
                out.entry(*kind).or_default().push(a);
            }
        }
        out
    }

    /// Whether a listener needs a certificate.
    pub fn needs_cert(&self) -> bool {
        self.sockets.iter().any(|(k, _)| k.alpn(false).is_some())
    }

    /// Serves every socket until shutdown. HTTPS answers advertise the
    /// first HTTP/3 listener (`Alt-Svc`).
    pub fn serve(self, s: &Serving<'_>) -> anyhow::Result<()> {
        let mut alt_svc = ::http::HeaderMap::new();
        if let Some(a) = self.addrs().get(&Kind::H3).and_then(|a| a.first()) {
            let v = format!("h3=\":{}\"; ma=86400", a.port());
            if let Ok(v) = ::http::HeaderValue::from_str(&v) {
                alt_svc.insert(::http::header::ALT_SVC, v);
            }
        }
        let alt_svc = Arc::new(alt_svc);
        for (kind, socket) in self.sockets {
            let tls = match kind.alpn(s.acme) {
                Some(alpn) => {
                    let store = s
                        .certs
                        .map(|c| c.store.clone())
                        .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
                    Some(tls::server_config(store, alpn, s.tickets.clone())?)
                }
                None => None,
            };
            match kind {
                Kind::Https | Kind::Http => {
                    let listener = tcp::Listener {
                        app: s.app.clone(),
                        tls: tls.map(TlsAcceptor::from),
                        extra_headers: if kind == Kind::Https {
                            alt_svc.clone()
                        } else {
                            Arc::new(::http::HeaderMap::new())
                        },
                    };
                    s.workers.accept_on(socket.tcp(kind)?, s.tasks, |l| {
                        listener.clone().run(l, s.tasks.clone(), s.shutdown.clone())
                    })?;
                }
                Kind::Dot => {
                    let listener = dot::DotListener {
                        app: s.app.clone(),
                        tls: TlsAcceptor::from(certified(tls)?),
                    };
                    s.workers.accept_on(socket.tcp(kind)?, s.tasks, |l| {
                        listener.clone().run(l, s.tasks.clone(), s.shutdown.clone())
                    })?;
                }
                #[cfg(feature = "h3")]
                Kind::H3 => quic(s, socket.udp(kind)?, certified(tls)?, super::h3::H3)?,
                #[cfg(feature = "h3")]
                Kind::Doq => quic(s, socket.udp(kind)?, certified(tls)?, super::doq::Doq)?,
                #[cfg(not(feature = "h3"))]
                Kind::H3 | Kind::Doq => {
                    anyhow::bail!("{} needs a build with the `h3` feature", kind.key())
                }
            }
        }
        Ok(())
    }
}

fn certified<T>(tls: Option<T>) -> anyhow::Result<T> {
    tls.ok_or_else(|| anyhow::anyhow!("no certificate"))
}

/// Serves a QUIC transport on `socket`.
#[cfg(feature = "h3")]
fn quic<S: super::quic::QuicService>(
    s: &Serving<'_>,
    socket: std::net::UdpSocket,
    tls: Arc<rustls::ServerConfig>,
    service: S,
) -> anyhow::Result<()> {
    let idle = s.app.conn.load().idle_timeout;
    let endpoint = super::quic::endpoint(socket, tls, idle, S::UNI_STREAMS)?;
    super::quic::spawn(
        endpoint,
        s.app,
        s.retry_threshold,
        Arc::new(service),
        s.tasks,
        s.shutdown,
    );
    Ok(())
}
