//! Listeners and their lifecycle: binding, serving, background work and a
//! tracked shutdown.
//!
//! Every task — accept loops, connections, housekeeping, the refreshes
//! requests start — is spawned on a [`TaskTracker`]; [`Running::stop`]
//! cancels one token, lets in-flight requests finish within a bound, and
//! waits for the tracker to empty.
//!
//! - [`tcp`]: the HTTPS and plain-HTTP listeners (accept, admission,
//!   PROXY header, TLS).
//! - [`dot`]: DNS over TLS.
//! - `quic`: the QUIC listeners' accept loop, admission and handshake;
//!   `h3`: DoH over HTTP/3 and `doq`: DNS over QUIC on its connections
//!   (with the `h3` feature).
//! - [`http`]: HTTP/1.1 and HTTP/2 with hyper.
//! - [`io`]: write batching on the client's TCP stream.
//! - [`message`]: one DNS message (DNS over TLS and over QUIC): admit,
//!   parse, answer or refuse.
//! - [`watchdog`]: the request-driven clock that closes slow and idle
//!   connections, shared by every transport.
//! - [`workers`]: the threads TCP connections are accepted and served on.

#[cfg(feature = "h3")]
pub mod amplification;
pub mod certs;
#[cfg(feature = "h3")]
pub mod doq;
pub mod dot;
#[cfg(feature = "h3")]
pub mod h3;
pub mod handshake;
pub mod http;
pub mod io;
pub mod message;
#[cfg(feature = "h3")]
pub mod quic;
pub mod systemd;
pub mod tcp;
pub mod watchdog;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pipeline::App;
use crate::{admin, tls};

/// How long shutdown waits for tasks once connections were asked to close.
const STOP_GRACE: Duration = Duration::from_secs(7);
/// How often the upstreams are probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);

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
    pub tls_listen: Vec<SocketAddr>,
    pub http_listen: Vec<SocketAddr>,
    pub dot_listen: Vec<SocketAddr>,
    pub h3_listen: Vec<SocketAddr>,
    pub doq_listen: Vec<SocketAddr>,
    /// Unvalidated QUIC handshakes per second before Retry is required.
    pub h3_retry_threshold: u32,
    pub tls: TlsSource,
    /// Session tickets' lifetime; none: no tickets.
    pub ticket_lifetime: Option<Duration>,
    /// From accept to the first complete request.
    pub handshake_timeout: Duration,
    /// With nothing in flight and nothing started.
    pub idle_timeout: Duration,
    /// With answers queued and none taken by the client.
    pub write_timeout: Duration,
    pub max_requests_per_conn: u64,
    pub proxy_protocol: bool,
}

/// A running proxy: its bound addresses and the means to stop it.
pub struct Running {
    pub tls_addrs: Vec<SocketAddr>,
    pub http_addrs: Vec<SocketAddr>,
    pub dot_addrs: Vec<SocketAddr>,
    pub h3_addrs: Vec<SocketAddr>,
    pub doq_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub app: Arc<App>,
    /// The certificate in service, when a TLS or QUIC listener runs.
    pub certs: Option<Arc<certs::Certs>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Ended (their threads stop) when the proxy is dropped.
    _workers: workers::Workers,
}

impl Running {
    /// Applies reloaded settings (SIGHUP): the certificate files are read
    /// again, and limits, ranges, trusted proxies, upstreams, timeouts and
    /// TTLs apply at once; the cache, bans, scores, unique-client sketches
    /// and open connections stay. Nothing changes when the new
    /// configuration or certificate fails to load.
    pub fn reload(&self, settings: Settings) -> Result<(), String> {
        let result = self.try_reload(&settings);
        self.app.metrics.reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
        }
        result
    }

    fn try_reload(&self, settings: &Settings) -> Result<(), String> {
        let source = &settings.server.tls;
        let prepared = match &self.certs {
            Some(c) => Some(c.prepare(source)?),
            None => None,
        };
        let restart = self.app.reload(settings)?;
        if let (Some(c), Some(p)) = (&self.certs, prepared) {
            c.commit(source, p);
        }
        if !restart.is_empty() {
            tracing::warn!(
                "changed but only applied at the next restart: {}",
                restart.join(", ")
            );
        }
        Ok(())
    }

    /// Stops accepting, asks every connection to close once its in-flight
    /// requests are done (a few seconds at most), waits for every task, and
    /// saves the state file.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.app.tasks.close();
        self.app.upstream.load().close();
        let all = async {
            self.tasks.wait().await;
            self.app.tasks.wait().await;
        };
        if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
            tracing::warn!("some connections did not finish in time");
        }
        if let Err(e) = self.app.guard.save_state() {
            tracing::error!(error = %e, "cannot write the state file");
        }
    }
}

/// Binds every listener and starts serving. Fails if a listener cannot be
/// bound or the TLS identity cannot be loaded.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    start_with(settings, systemd::Inherited::default()).await
}

/// As [`start`], serving on the sockets the service manager passed where
/// it passed some (they replace the configured addresses of their kind).
pub async fn start_with(
    settings: Settings,
    inherited: systemd::Inherited,
) -> anyhow::Result<Running> {
    raise_nofile();
    let metrics = Arc::new(Metrics::new());
    let app = Arc::new(App::new(&settings, metrics)?);
    let tickets = app.tickets.clone();
    let s = &settings.server;
    let needs_cert = !(s.tls_listen.is_empty()
        && s.dot_listen.is_empty()
        && s.h3_listen.is_empty()
        && s.doq_listen.is_empty()
        && inherited.https.is_empty()
        && inherited.dot.is_empty()
        && inherited.h3.is_empty()
        && inherited.doq.is_empty());
    let certs = if needs_cert {
        Some(certs::Certs::load(&s.tls)?)
    } else {
        None
    };
    let https_alpn = if s.tls == TlsSource::Acme {
        tls::Alpn::HttpsAcme
    } else {
        tls::Alpn::Https
    };
    let acceptor = |alpn| -> anyhow::Result<TlsAcceptor> {
        let store = certs
            .as_ref()
            .map(|c| c.store.clone())
            .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
        Ok(TlsAcceptor::from(tls::server_config(
            store,
            alpn,
            tickets.clone(),
        )?))
    };
    let bind_all = |addrs: &[SocketAddr],
                    passed: Vec<std::net::TcpListener>|
     -> anyhow::Result<Vec<std::net::TcpListener>> {
        if passed.is_empty() {
            return addrs.iter().map(|a| tcp::bind(*a)).collect();
        }
        passed
            .into_iter()
            .map(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect()
    };
    let tls_listeners = bind_all(&s.tls_listen, inherited.https)?;
    let http_listeners = bind_all(&s.http_listen, inherited.http)?;
    let dot_listeners = bind_all(&s.dot_listen, inherited.dot)?;
    // QUIC endpoints of one kind: the configured addresses, or the
    // sockets of that kind the service manager passed.
    #[cfg(feature = "h3")]
    let quic_endpoints = |listen: &[SocketAddr],
                          passed: Vec<std::net::UdpSocket>,
                          alpn: tls::Alpn,
                          uni_streams: u32|
     -> anyhow::Result<Vec<_>> {
        let store = certs.as_ref().map(|c| c.store.clone());
        let sources: Vec<quic::UdpSource> = if passed.is_empty() {
            listen.iter().map(|a| quic::UdpSource::Bind(*a)).collect()
        } else {
            passed.into_iter().map(quic::UdpSource::Socket).collect()
        };
        sources
            .into_iter()
            .map(|src| {
                let store = store
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
                let tls = tls::server_config(store, alpn, tickets.clone())?;
                quic::endpoint(src, tls, s.idle_timeout, uni_streams)
            })
            .collect()
    };
    #[cfg(feature = "h3")]
    let h3_endpoints = quic_endpoints(&s.h3_listen, inherited.h3, tls::Alpn::H3, h3::UNI_STREAMS)?;
    #[cfg(feature = "h3")]
    let doq_endpoints = quic_endpoints(&s.doq_listen, inherited.doq, tls::Alpn::Doq, 0)?;
    let admin_listener = tokio::net::TcpListener::from_std(tcp::bind(settings.admin.listen)?)?;
    let addrs = |ls: &[std::net::TcpListener]| -> Vec<SocketAddr> {
        ls.iter().filter_map(|l| l.local_addr().ok()).collect()
    };
    let tls_addrs = addrs(&tls_listeners);
    let http_addrs = addrs(&http_listeners);
    let dot_addrs = addrs(&dot_listeners);
    #[cfg(feature = "h3")]
    let h3_addrs: Vec<SocketAddr> = h3_endpoints
        .iter()
        .filter_map(|(e, _)| e.local_addr().ok())
        .collect();
    #[cfg(not(feature = "h3"))]
    let h3_addrs: Vec<SocketAddr> = Vec::new();
    #[cfg(feature = "h3")]
    let doq_addrs: Vec<SocketAddr> = doq_endpoints
        .iter()
        .filter_map(|(e, _)| e.local_addr().ok())
        .collect();
    #[cfg(not(feature = "h3"))]
    let doq_addrs: Vec<SocketAddr> = Vec::new();

    app.guard.restore_state();
    // The ban file's rule names the bound ports (port 0 in the
    // configuration becomes the one the kernel chose).
    app.guard.set_ports(
        tls_addrs
            .iter()
            .chain(&http_addrs)
            .chain(&dot_addrs)
            .map(|a| a.port())
            .collect(),
        h3_addrs
            .iter()
            .chain(&doq_addrs)
            .map(|a| a.port())
            .collect(),
    );
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Clients learn of HTTP/3 from the HTTPS answers.
    let mut alt_svc = ::http::HeaderMap::new();
    if let Some(a) = h3_addrs.first() {
        if let Ok(v) = ::http::HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", a.port())) {
            alt_svc.insert(::http::header::ALT_SVC, v);
        }
    }
    let alt_svc = Arc::new(alt_svc);
    if let Some(c) = &certs {
        app.metrics.tls_cert_expiry.set(c.store.expires_in());
        tasks.spawn(certs::watch(
            c.clone(),
            app.metrics.clone(),
            shutdown.clone(),
        ));
        if let Some(acme) = &settings.acme {
            tasks.spawn(crate::acme::run(
                acme.clone(),
                c.store.clone(),
                app.metrics.clone(),
                shutdown.clone(),
            ));
        }
    }
    let workers = workers::Workers::per_core()?;
    let running = Running {
        certs: certs.clone(),
        admin_addr: admin_listener.local_addr()?,
        tls_addrs,
        http_addrs,
        dot_addrs,
        h3_addrs,
        doq_addrs,
        app: app.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        _workers: workers,
    };
    let workers = &running._workers;
    let listener = |tls: Option<TlsAcceptor>, extra: Arc<::http::HeaderMap>| tcp::Listener {
        app: app.clone(),
        tls,
        extra_headers: extra,
    };
    for l in tls_listeners {
        let https = listener(Some(acceptor(https_alpn)?), alt_svc.clone());
        workers.accept_on(l, &tasks, |l| {
            https.clone().run(l, tasks.clone(), shutdown.clone())
        })?;
    }
    for l in http_listeners {
        let plain = listener(None, Arc::new(::http::HeaderMap::new()));
        workers.accept_on(l, &tasks, |l| {
            plain.clone().run(l, tasks.clone(), shutdown.clone())
        })?;
    }
    for l in dot_listeners {
        let dot = dot::DotListener {
            app: app.clone(),
            tls: acceptor(tls::Alpn::Dot)?,
        };
        workers.accept_on(l, &tasks, |l| {
            dot.clone().run(l, tasks.clone(), shutdown.clone())
        })?;
    }
    #[cfg(feature = "h3")]
    {
        let threshold = s.h3_retry_threshold;
        let h3 = Arc::new(h3::H3);
        quic::spawn(h3_endpoints, &app, threshold, h3, &tasks, &shutdown);
        let doq = Arc::new(doq::Doq);
        quic::spawn(doq_endpoints, &app, threshold, doq, &tasks, &shutdown);
    }
    tasks.spawn(admin::serve(
        app.clone(),
        settings.admin.clone(),
        admin_listener,
        shutdown.clone(),
    ));
    tasks.spawn(every(Duration::from_secs(1), shutdown.clone(), {
        let app = app.clone();
        move || {
            app.guard.tick();
            std::future::ready(())
        }
    }));
    tasks.spawn(every(PROBE_EVERY, shutdown.clone(), {
        let app = app.clone();
        move || {
            let app = app.clone();
            async move { app.upstream.load_full().probe().await }
        }
    }));
    tasks.spawn(summary(app.clone(), shutdown.clone()));
    if let Some(f) = &app.fleet {
        f.start(&tasks, shutdown.clone());
    }
    if app.odoh.is_some() || app.tickets.is_some() {
        // The ODoH key and the TLS ticket keys: shared through Redis when
        // it is there (tickets by the fleet's ticker), rotated here when
        // it is not.
        tasks.spawn(every(Duration::from_millis(250), shutdown.clone(), {
            let app = app.clone();
            move || {
                let app = app.clone();
                async move {
                    let fleet = app.fleet.as_ref().filter(|f| f.is_up());
                    if let (Some(odoh), Some(f)) = (&app.odoh, fleet) {
                        f.sync_odoh(odoh, odoh.lifetime()).await;
                    } else if let Some(odoh) = &app.odoh {
                        if let Err(e) = odoh.rotate_if_due() {
                            tracing::error!("cannot rotate the ODoH key: {e}");
                        }
                    }
                    if let (Some(t), None) = (&app.tickets, fleet) {
                        t.rotate_if_due();
                    }
                }
            }
        }));
    }
    for a in &running.tls_addrs {
        tracing::info!(listen = %a, "serving DoH over TLS");
    }
    for a in &running.http_addrs {
        tracing::info!(listen = %a, "serving DoH over plain HTTP");
    }
    for a in &running.dot_addrs {
        tracing::info!(listen = %a, "serving DNS over TLS");
    }
    for a in &running.h3_addrs {
        tracing::info!(listen = %a, "serving DoH over HTTP/3 (UDP)");
    }
    for a in &running.doq_addrs {
        tracing::info!(listen = %a, "serving DNS over QUIC (UDP)");
    }
    tracing::info!(listen = %running.admin_addr, "admin listener (/metrics, /healthz, /bans)");
    Ok(running)
}

/// Runs `work` every `period` until shutdown.
async fn every<F, Fut>(period: Duration, shutdown: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = work() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One line a minute that tells an operator what is going on.
async fn summary(app: Arc<App>, shutdown: CancellationToken) {
    use crate::reject::Outcome;
    let every = Duration::from_secs(60);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last_upstream = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let m = &app.metrics;
        let mut rejects = m.rejects_by_reason();
        rejects.sort_by_key(|r| std::cmp::Reverse(r.1));
        let top: Vec<String> = rejects
            .iter()
            .filter(|r| r.1 > 0)
            .take(3)
            .map(|(l, n)| format!("{l}={n}"))
            .collect();
        let hits = m.cache_hits.get();
        let misses = m.cache_misses.get();
        let sent = m.upstream_sent();
        let qps = sent.saturating_sub(last_upstream) as f64 / every.as_secs_f64();
        last_upstream = sent;
        tracing::info!(
            requests = Outcome::ALL.iter().map(|o| m.requests_by_outcome(*o)).sum::<u64>(),
            answered = m.requests_by_outcome(Outcome::Answered),
            rejected = m.requests_by_outcome(Outcome::Rejected),
            rate_limited = m.requests_by_outcome(Outcome::RateLimited),
            top_rejects = %top.join(","),
            hit_ratio = format!("{:.3}", hits as f64 / (hits + misses).max(1) as f64),
            upstream_qps = format!("{qps:.1}"),
            unique_clients = app.unique.estimate(),
            bans_active = app.guard.bans().len(),
            connections = app.guard.open_connections(),
            cache_bytes = app.cache.bytes(),
            "summary"
        );
    }
}

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limit() -> Option<(u64, u64)> {
    let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    Some((l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX)))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the usual soft limit
/// of 1024 would make `--max-conns` unreachable (accept fails with EMFILE,
/// and upstream queries find no socket).
pub fn raise_nofile() {
    let Some((soft, hard)) = nofile_limit() else {
        return;
    };
    if soft >= hard {
        return;
    }
    // An unlimited hard limit is still bounded by the kernel's nr_open.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    let new = rustix::process::Rlimit {
        current: Some(target),
        maximum: Some(hard),
    };
    match rustix::process::setrlimit(rustix::process::Resource::Nofile, new) {
        Ok(()) => tracing::info!(from = soft, to = target, "raised the open file limit"),
        Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open file limit"),
    }
}
