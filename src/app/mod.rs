//! The composition root: the one place that knows every component. It
//! builds the [`App`] the request pipeline runs on from the validated
//! [`Settings`], binds and serves the listeners, starts the background
//! services, applies a reload and stops the whole with a tracked shutdown.
//!
//! Every task — accept loops, connections, background services, the
//! refreshes requests start — is spawned on a [`TaskTracker`];
//! [`Running::stop`] cancels one token, lets in-flight requests finish
//! within a bound, and waits for the trackers to empty.

mod nofile;
mod services;

pub use nofile::{nofile_limit, raise_nofile};

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::AcmeSettings;
use crate::admin::{self, AdminSettings};
use crate::cache::{Cache, CacheSettings, Inflight};
use crate::clock::Clock;
use crate::doh::Limits;
use crate::fleet::{Fleet, FleetSettings};
use crate::guard::{Guard, GuardSettings};
use crate::hll::UniqueClients;
use crate::metrics::Metrics;
use crate::odoh::{Odoh, OdohSettings};
use crate::pipeline::{App, Padding};
use crate::server::listener::{Addrs, Bound, Kind, Serving};
use crate::server::systemd::Inherited;
use crate::server::{certs, tcp, workers, ServerSettings, TlsSource};
use crate::tickets::Tickets;
use crate::upstream::{LocalBudget, Spend, Upstream, UpstreamSettings};

/// How long shutdown waits for tasks once connections were asked to close.
const STOP_GRACE: Duration = Duration::from_secs(7);

/// The validated configuration, one part per component. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub doh: Limits,
    pub cache: CacheSettings,
    pub upstream: UpstreamSettings,
    pub guard: GuardSettings,
    pub admin: AdminSettings,
    /// Certificates from an ACME CA, when `--acme-domain` is given.
    pub acme: Option<AcmeSettings>,
    pub padding: Padding,
    pub odoh: OdohSettings,
    /// State shared with other instances through Redis (`--redis`).
    pub fleet: Option<FleetSettings>,
    /// `-v`: 1 logs a line per request, 2 and more debug.
    pub verbose: u8,
    pub log_format: LogFormat,
}

/// Output format of the logs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Builds every component and the [`App`] that strings them together.
/// Fails when an upstream or the fleet's link cannot be set up.
pub fn build(s: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<App> {
    let tasks = TaskTracker::new();
    let clock = Clock::default();
    let guard = Arc::new(Guard::new(s.guard.clone(), metrics.clone()));
    let unique = Arc::new(UniqueClients::default());
    let tickets = s.server.ticket_lifetime.map(Tickets::new);
    let fleet = match &s.fleet {
        Some(f) => Some(
            Fleet::new(
                f,
                &s.upstream,
                guard.clone(),
                unique.clone(),
                tickets.clone(),
                metrics.clone(),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let budget: Arc<dyn Spend> = match &fleet {
        Some(f) => f.clone(),
        None => Arc::new(LocalBudget::of(&s.upstream, &metrics, clock.clone())),
    };
    let upstream = Upstream::new(&s.upstream, budget.clone(), metrics.clone(), tasks.clone())
        .map_err(anyhow::Error::msg)?;
    metrics
        .cache
        .max_bytes
        .set(i64::try_from(s.cache.max_bytes).unwrap_or(i64::MAX));
    metrics
        .guard
        .connections_max
        .set(i64::from(s.guard.max_conns));
    let odoh = if s.odoh.enabled {
        Some(Odoh::new(s.odoh.rotate).map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    Ok(App {
        odoh,
        limits: ArcSwap::from_pointee(s.doh.clone()),
        padding: ArcSwap::from_pointee(s.padding),
        verbose: AtomicU8::new(s.verbose),
        conn: ArcSwap::from_pointee(s.server.conn.clone()),
        guard,
        fleet,
        budget: ArcSwap::from_pointee(budget),
        cache: Cache::new(&s.cache, clock.clone()),
        clock,
        inflight: Inflight::default(),
        upstream: ArcSwap::from_pointee(upstream),
        upstream_settings: ArcSwap::from_pointee(s.upstream.clone()),
        metrics,
        unique,
        tickets,
        tasks,
    })
}

/// A running proxy: its bound addresses and the means to stop it.
pub struct Running {
    /// The bound addresses of each kind of listener ([`Running::addrs`]).
    addrs: Addrs,
    pub admin_addr: std::net::SocketAddr,
    pub app: Arc<App>,
    /// The certificate in service, when a TLS or QUIC listener runs.
    pub certs: Option<Arc<certs::Certs>>,
    /// The listener addresses of the start: listeners are not rebound.
    listen: Addrs,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The threads TCP connections are served on; ended (their threads
    /// stop) when the proxy is dropped.
    workers: workers::Workers,
}

impl Running {
    /// The bound addresses of one kind of listener.
    pub fn addrs(&self, kind: Kind) -> &[std::net::SocketAddr] {
        self.addrs.get(&kind).map_or(&[], Vec::as_slice)
    }

    /// Applies reloaded settings (SIGHUP): the certificate files are read
    /// again, and limits, ranges, trusted proxies, upstreams, timeouts and
    /// TTLs apply at once; the cache, bans, scores, unique-client sketches
    /// and open connections stay. Nothing changes when the new
    /// configuration or certificate fails to load.
    pub fn reload(&self, settings: Settings) -> Result<(), String> {
        let result = self.try_reload(&settings);
        self.app.metrics.ops.reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
        }
        result
    }

    fn try_reload(&self, s: &Settings) -> Result<(), String> {
        let source = &s.server.tls;
        let prepared = match &self.certs {
            Some(c) => Some(c.prepare(source)?),
            None => None,
        };
        let app = &self.app;
        app.reload_upstream(&s.upstream)?;
        app.limits.store(Arc::new(s.doh.clone()));
        app.padding.store(Arc::new(s.padding));
        app.verbose.store(s.verbose, Ordering::Relaxed);
        app.conn.store(Arc::new(s.server.conn.clone()));
        app.cache.set_policy(s.cache.policy);
        app.guard.reconfigure(s.guard.clone());
        app.metrics
            .guard
            .connections_max
            .set(i64::from(s.guard.max_conns));
        if let (Some(c), Some(p)) = (&self.certs, prepared) {
            c.commit(source, p);
        }
        let mut restart: Vec<&str> = Kind::ALL
            .into_iter()
            .filter(|k| self.listen.get(k) != s.server.listen.get(k))
            .map(Kind::key)
            .collect();
        if !app.cache.same_bounds(&s.cache) {
            restart.push("cache_size and cache_memory");
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
    start_with(settings, Inherited::default()).await
}

/// As [`start`], serving on the sockets the service manager passed where
/// it passed some (they replace the configured addresses of their kind).
pub async fn start_with(settings: Settings, inherited: Inherited) -> anyhow::Result<Running> {
    raise_nofile();
    let metrics = Arc::new(Metrics::new());
    let app = Arc::new(build(&settings, metrics)?);
    let s = &settings.server;
    let bound = Bound::new(&s.listen, inherited.0)?;
    let certs = if bound.needs_cert() {
        Some(certs::Certs::load(&s.tls)?)
    } else {
        None
    };
    let admin_listener = tokio::net::TcpListener::from_std(tcp::bind(settings.admin.listen)?)?;
    let addrs = bound.addrs();

    app.guard.restore_state();
    // The ban file's rule names the bound ports (port 0 in the
    // configuration becomes the one the kernel chose).
    let ports = |udp: bool| -> Vec<u16> {
        addrs
            .iter()
            .filter(|(k, _)| k.udp() == udp)
            .flat_map(|(_, a)| a.iter().map(|a| a.port()))
            .collect()
    };
    app.guard.set_ports(ports(false), ports(true));
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let running = Running {
        certs: certs.clone(),
        admin_addr: admin_listener.local_addr()?,
        addrs,
        listen: s.listen.clone(),
        app: app.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        workers: workers::Workers::per_core()?,
    };
    bound.serve(&Serving {
        app: &app,
        certs: certs.as_ref(),
        tickets: app.tickets.clone(),
        acme: s.tls == TlsSource::Acme,
        retry_threshold: s.h3_retry_threshold,
        workers: &running.workers,
        tasks: &tasks,
        shutdown: &shutdown,
    })?;
    let services = services::Services::new(&tasks, &shutdown);
    services.spawn(
        "admin listener",
        admin::serve(
            app.clone(),
            settings.admin.clone(),
            admin_listener,
            tasks.clone(),
            shutdown.clone(),
        ),
    );
    services.start(&app, certs.as_ref(), settings.acme.as_ref());
    for (kind, addrs) in &running.addrs {
        for a in addrs {
            tracing::info!(listen = %a, "serving {}", kind.serving());
        }
    }
    tracing::info!(listen = %running.admin_addr, "admin listener (/metrics, /healthz, /bans)");
    Ok(running)
}
