//! The background services: each has a name and one shape — a future
//! spawned on the proxy's task tracker that returns at shutdown — so that
//! stopping the proxy waits for every one of them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::{self, AcmeSettings};
use crate::pipeline::App;
use crate::reject::Outcome;
use crate::server::certs::{self, Certs};

/// How often the upstreams are probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How often the ODoH and ticket keys are checked for rotation.
const ROTATE_EVERY: Duration = Duration::from_millis(250);
/// How often the summary line is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Starts named services on a tracker, stopped by one token.
pub struct Services {
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Services {
    pub fn new(tasks: &TaskTracker, shutdown: &CancellationToken) -> Services {
        Services {
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        }
    }

    /// Runs `service` until it returns (it must at shutdown).
    pub fn spawn<F>(&self, name: &'static str, service: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tracing::debug!(service = name, "started");
        self.tasks.spawn(async move {
            service.await;
            tracing::debug!(service = name, "stopped");
        });
    }

    /// Runs `work` every `period` until shutdown.
    pub fn every<F, Fut>(&self, name: &'static str, period: Duration, work: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, every(period, self.shutdown.clone(), work));
    }

    /// Every service the proxy runs beside its listeners.
    pub fn start(&self, app: &Arc<App>, certs: Option<&Arc<Certs>>, acme: Option<&AcmeSettings>) {
        let shutdown = &self.shutdown;
        if let Some(c) = certs {
            app.metrics.ops.tls_cert_expiry.set(c.store.expires_in());
            self.spawn(
                "certificate watch",
                certs::watch(c.clone(), app.metrics.clone(), shutdown.clone()),
            );
            if let Some(acme) = acme {
                self.spawn(
                    "acme",
                    acme::run(
                        acme.clone(),
                        c.store.clone(),
                        app.metrics.clone(),
                        shutdown.clone(),
                    ),
                );
            }
        }
        let a = app.clone();
        self.every("guard tick", Duration::from_secs(1), move || {
            a.guard.tick();
            std::future::ready(())
        });
        let a = app.clone();
        self.every("upstream probes", PROBE_EVERY, move || {
            let a = a.clone();
            async move { a.upstream.load_full().probe().await }
        });
        self.spawn("summary", summary(app.clone(), shutdown.clone()));
        if let Some(f) = &app.fleet {
            for (name, service) in f.services(shutdown) {
                self.spawn(name, service);
            }
        }
        if app.odoh.is_some() || app.tickets.is_some() {
            let a = app.clone();
            self.every("key rotation", ROTATE_EVERY, move || rotate(a.clone()));
        }
    }
}

/// Runs `work` every `period` until shutdown.
async fn every<F, Fut>(period: Duration, shutdown: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
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

/// The ODoH key and the TLS ticket keys: shared through Redis when it is
/// there (tickets by the fleet's ticker), rotated here when it is not.
async fn rotate(app: Arc<App>) {
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

/// One line a minute that tells an operator what is going on.
async fn summary(app: Arc<App>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SUMMARY_EVERY);
    tick.tick().await;
    let mut last_upstream = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let metrics = &app.metrics;
        let mut rejects = metrics.requests.rejects_by_reason();
        rejects.sort_by_key(|r| std::cmp::Reverse(r.1));
        let top: Vec<String> = rejects
            .iter()
            .filter(|r| r.1 > 0)
            .take(3)
            .map(|(l, n)| format!("{l}={n}"))
            .collect();
        let hits = metrics.cache.hits.get();
        let misses = metrics.cache.misses.get();
        let sent = metrics.upstream.sent();
        let qps = sent.saturating_sub(last_upstream) as f64 / SUMMARY_EVERY.as_secs_f64();
        last_upstream = sent;
        tracing::info!(
            requests = Outcome::ALL.iter().map(|o| metrics.requests.by_outcome(*o)).sum::<u64>(),
            answered = metrics.requests.by_outcome(Outcome::Answered),
            rejected = metrics.requests.by_outcome(Outcome::Rejected),
            rate_limited = metrics.requests.by_outcome(Outcome::RateLimited),
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
