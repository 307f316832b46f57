//! Prometheus metrics, with the names SPEC fixes.
//!
//! Each component's metrics are one struct in a file of their own
//! ([`requests`], [`cache`], [`upstream`], [`guard`], [`wire`], [`ops`]),
//! whose `register` creates every metric and registers it in the same
//! statement ([`Reg`]): a metric cannot be held without being exposed.
//! [`Metrics`] is their sum and the registry they are exposed from.
//!
//! Counters on the request path are resolved to handles once, at start, so
//! counting costs one atomic add, on a cache line of the counting thread's
//! own ([`spread`]), and no allocation or map lookup; the
//! handle of a reason is found by its `index()`, which the refusal tables
//! of [`crate::reject`] make cover every reason. What `--dry-run` only
//! counted carries the extra label `dry_run="true"` under the same names.

mod cache;
mod guard;
mod ops;
mod requests;
mod spread;
mod upstream;
mod wire;

pub use cache::CacheMetrics;
pub use guard::GuardMetrics;
pub use ops::OpsMetrics;
pub use requests::{OdohResult, RequestMetrics};
pub use spread::count_on;
pub use upstream::{UpstreamMetrics, UpstreamRegistry, UpstreamResult};
pub use wire::{AcceptError, Handshake, QuicRefusal, WireMetrics};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry, Unit};

type Labels = Vec<(&'static str, String)>;

/// Every counter, spread over a line per worker thread ([`spread`]).
pub type Counter = prometheus_client::metrics::counter::Counter<u64, spread::Spread>;

/// A pair of handles: enforced, and only counted under `--dry-run`.
type Pair = [Counter; 2];

/// Every metric of the proxy, by component, and the registry that exposes
/// them.
pub struct Metrics {
    registry: Registry,
    pub requests: RequestMetrics,
    pub cache: CacheMetrics,
    pub upstream: UpstreamRegistry,
    pub guard: GuardMetrics,
    pub wire: WireMetrics,
    pub ops: OpsMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every component registers its own metrics.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let mut reg = Reg(&mut registry);
        let requests = RequestMetrics::register(&mut reg);
        let cache = CacheMetrics::register(&mut reg);
        let upstream = UpstreamRegistry::register(&mut reg);
        let guard = GuardMetrics::register(&mut reg);
        let wire = WireMetrics::register(&mut reg);
        let ops = OpsMetrics::register(&mut reg);
        Metrics {
            registry,
            requests,
            cache,
            upstream,
            guard,
            wire,
            ops,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Registers a metric and hands it back, in one statement.
pub struct Reg<'a>(&'a mut Registry);

impl Reg<'_> {
    pub fn add<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }

    pub fn add_unit<M: Metric + Clone>(
        &mut self,
        name: &str,
        help: &str,
        unit: Unit,
        metric: M,
    ) -> M {
        self.0.register_with_unit(name, help, unit, metric.clone());
        metric
    }

    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        self.add(name, help, Counter::default())
    }

    pub fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        self.add(name, help, Gauge::default())
    }

    /// A family of counters, from which labelled handles are taken.
    pub fn counters(&mut self, name: &str, help: &str) -> Family<Labels, Counter> {
        self.add(name, help, Family::default())
    }
}

/// The enforced and the dry-run handle of `labels` in `family`.
fn pair(family: &Family<Labels, Counter>, labels: &[(&'static str, &str)]) -> Pair {
    let base: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let mut dry = base.clone();
    dry.push(("dry_run", "true".into()));
    // One statement each: the family's read guard must be gone before the
    // next get_or_create takes its write lock.
    let enforced = family.get_or_create(&base).clone();
    let dry_run = family.get_or_create(&dry).clone();
    [enforced, dry_run]
}

/// The handle of one label value in `family`.
fn one(family: &Family<Labels, Counter>, key: &'static str, value: &str) -> Counter {
    family
        .get_or_create(&vec![(key, value.to_string())])
        .clone()
}

/// The handle of `item` in `handles` made in the order of `all`.
fn of<T: PartialEq>(all: &[T], handles: &[Counter], item: T) -> Option<Counter> {
    let i = all.iter().position(|x| *x == item)?;
    handles.get(i).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reject::{Outcome, ProtocolError, Reject, Transport};
    use std::time::Duration;

    #[test]
    fn spec_families_are_exposed() {
        let m = Metrics::new();
        let up = m.upstream.handles("127.0.0.1:53");
        m.requests.count(Outcome::Answered, Transport::H2, false);
        m.requests.count(Outcome::RateLimited, Transport::H1, true);
        m.requests.reject(Reject::ObsoleteDraft, false);
        up.result(UpstreamResult::Ok, Some(Duration::from_millis(3)));
        m.wire.protocol_error(ProtocolError::H2Calm);
        let text = m.encode();
        for name in [
            "doh_requests_total{outcome=\"answered\",transport=\"h2\"} 1",
            "doh_requests_total{outcome=\"rate_limited\",transport=\"h1\",dry_run=\"true\"} 1",
            "doh_requests_total{outcome=\"undelivered\",transport=\"h2\"} 0",
            "doh_rejects_total{reason=\"obsolete_draft\"} 1",
            "doh_cache_hits_total 0",
            "doh_cache_misses_total 0",
            "doh_cache_entries 0",
            "doh_cache_bytes 0",
            "doh_upstream_queries_total{upstream=\"127.0.0.1:53\",result=\"ok\"} 1",
            "doh_upstream_duration_seconds_bucket",
            "doh_unique_clients 0",
            "doh_bans_active 0",
            "doh_bans_total{kind=\"address\"} 0",
            "doh_connections_open 0",
            "doh_connections_rejected_total{reason=\"per_ip\"} 0",
            "doh_connections_rejected_total{reason=\"conn_rate\"} 0",
            "doh_connections_evicted_total 0",
            "doh_protocol_errors_total{kind=\"h2_enhance_your_calm\"} 1",
            "doh_tls_handshakes_total{result=\"ok\",resumed=\"true\"} 0",
            "doh_accept_errors_total{kind=\"no_fds\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
