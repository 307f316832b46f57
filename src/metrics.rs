//! Prometheus metrics, with the names SPEC fixes.
//!
//! Counters on the request path are resolved to handles once, at start, so
//! counting costs one atomic add and no allocation or map lookup. What
//! `--dry-run` only counted carries the extra label `dry_run="true"` under
//! the same family names.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::reject::{Outcome, Reject};

type Labels = Vec<(&'static str, String)>;

/// Why a connection was closed at accept or before its first request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnReject {
    /// The address or its prefix is banned.
    Banned,
    /// Inside a static `--deny` range.
    Denied,
    PerIp,
    PerPrefix,
    Global,
    HandshakeTimeout,
    HandshakeFailed,
    /// A trusted proxy sent no valid PROXY header in time.
    ProxyHeader,
}

impl ConnReject {
    pub const ALL: [ConnReject; 8] = [
        ConnReject::Banned,
        ConnReject::Denied,
        ConnReject::PerIp,
        ConnReject::PerPrefix,
        ConnReject::Global,
        ConnReject::HandshakeTimeout,
        ConnReject::HandshakeFailed,
        ConnReject::ProxyHeader,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ConnReject::Banned => "banned",
            ConnReject::Denied => "denied",
            ConnReject::PerIp => "per_ip",
            ConnReject::PerPrefix => "per_prefix",
            ConnReject::Global => "global",
            ConnReject::HandshakeTimeout => "handshake_timeout",
            ConnReject::HandshakeFailed => "handshake_failed",
            ConnReject::ProxyHeader => "proxy_header",
        }
    }

    /// Whether this is a mitigation that `--dry-run` would only count.
    pub fn is_mitigation(self) -> bool {
        matches!(
            self,
            ConnReject::Banned | ConnReject::PerIp | ConnReject::PerPrefix | ConnReject::Global
        )
    }
}

/// What happened to one query sent to one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    Ok,
    Servfail,
    Timeout,
    Error,
    /// An answer that did not match (wrong ID or question) and was dropped.
    Dropped,
}

impl UpstreamResult {
    const ALL: [UpstreamResult; 5] = [
        UpstreamResult::Ok,
        UpstreamResult::Servfail,
        UpstreamResult::Timeout,
        UpstreamResult::Error,
        UpstreamResult::Dropped,
    ];
    fn label(self) -> &'static str {
        match self {
            UpstreamResult::Ok => "ok",
            UpstreamResult::Servfail => "servfail",
            UpstreamResult::Timeout => "timeout",
            UpstreamResult::Error => "error",
            UpstreamResult::Dropped => "dropped",
        }
    }
}

struct UpstreamHandles {
    results: Vec<Counter>,
    duration: Histogram,
}

/// A pair of handles: enforced, and only counted under `--dry-run`.
type Pair = [Counter; 2];

pub struct Metrics {
    registry: Registry,
    requests: Vec<Pair>,
    rejects: Vec<Pair>,
    conn_rejects: Vec<Pair>,
    /// Indexed by whether the ban is on a prefix.
    bans: [Pair; 2],
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_stale: Counter,
    pub coalesced: Counter,
    pub upstream_budget_exhausted: Counter,
    pub cache_entries: Gauge,
    pub unique_clients: Gauge,
    pub bans_active: Gauge,
    pub connections_open: Gauge,
    upstreams: Vec<UpstreamHandles>,
}

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

impl Metrics {
    /// Registers every family; `upstreams` are the labels of the upstreams.
    pub fn new(upstreams: &[String]) -> Metrics {
        let mut registry = Registry::default();
        let requests_f = Family::<Labels, Counter>::default();
        let rejects_f = Family::<Labels, Counter>::default();
        let conn_f = Family::<Labels, Counter>::default();
        let bans_f = Family::<Labels, Counter>::default();
        let upstream_f = Family::<Labels, Counter>::default();
        let duration_f = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))) as fn() -> Histogram,
        );
        let m = Metrics {
            requests: Outcome::ALL
                .iter()
                .map(|o| pair(&requests_f, &[("outcome", o.label())]))
                .collect(),
            rejects: Reject::ALL
                .iter()
                .map(|r| pair(&rejects_f, &[("reason", r.label())]))
                .collect(),
            conn_rejects: ConnReject::ALL
                .iter()
                .map(|r| pair(&conn_f, &[("reason", r.label())]))
                .collect(),
            bans: [
                pair(&bans_f, &[("kind", "address")]),
                pair(&bans_f, &[("kind", "prefix")]),
            ],
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_stale: Counter::default(),
            coalesced: Counter::default(),
            upstream_budget_exhausted: Counter::default(),
            cache_entries: Gauge::default(),
            unique_clients: Gauge::default(),
            bans_active: Gauge::default(),
            connections_open: Gauge::default(),
            upstreams: upstreams
                .iter()
                .map(|u| UpstreamHandles {
                    results: UpstreamResult::ALL
                        .iter()
                        .map(|r| {
                            upstream_f
                                .get_or_create(&vec![
                                    ("upstream", u.clone()),
                                    ("result", r.label().to_string()),
                                ])
                                .clone()
                        })
                        .collect(),
                    duration: duration_f
                        .get_or_create(&vec![("upstream", u.clone())])
                        .clone(),
                })
                .collect(),
            registry: Registry::default(),
        };
        registry.register(
            "doh_requests",
            "Requests by outcome (answered, rejected, rate_limited, banned, overloaded)",
            requests_f,
        );
        registry.register("doh_rejects", "Rejected requests by reason", rejects_f);
        registry.register(
            "doh_cache_hits",
            "Answers served from cache (fresh)",
            m.cache_hits.clone(),
        );
        registry.register(
            "doh_cache_misses",
            "Queries not in cache",
            m.cache_misses.clone(),
        );
        registry.register(
            "doh_cache_stale",
            "Answers served stale (RFC 8767) because the upstream failed or its budget was spent",
            m.cache_stale.clone(),
        );
        registry.register(
            "doh_coalesced",
            "Misses that waited for an identical query already in flight",
            m.coalesced.clone(),
        );
        registry.register(
            "doh_cache_entries",
            "Entries in the cache",
            m.cache_entries.clone(),
        );
        registry.register(
            "doh_upstream_queries",
            "Queries sent upstream by upstream and result",
            upstream_f,
        );
        registry.register_with_unit(
            "doh_upstream_duration",
            "Time to an accepted upstream answer",
            Unit::Seconds,
            duration_f,
        );
        registry.register(
            "doh_upstream_budget_exhausted",
            "Upstream queries not sent because --upstream-qps was spent",
            m.upstream_budget_exhausted.clone(),
        );
        registry.register(
            "doh_unique_clients",
            "Estimated distinct client addresses over a rolling 24 h",
            m.unique_clients.clone(),
        );
        registry.register("doh_bans_active", "Bans in force", m.bans_active.clone());
        registry.register(
            "doh_bans",
            "Bans issued, by kind (address or prefix)",
            bans_f,
        );
        registry.register(
            "doh_connections_open",
            "Client connections open",
            m.connections_open.clone(),
        );
        registry.register(
            "doh_connections_rejected",
            "Connections closed at accept or handshake, by reason",
            conn_f,
        );
        Metrics { registry, ..m }
    }

    pub fn request(&self, outcome: Outcome, dry_run: bool) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[i][dry_run as usize].inc();
    }

    pub fn reject(&self, reason: Reject, dry_run: bool) {
        if let Some(i) = Reject::ALL.iter().position(|r| *r == reason) {
            self.rejects[i][dry_run as usize].inc();
        }
    }

    pub fn conn_rejected(&self, reason: ConnReject, dry_run: bool) {
        let i = ConnReject::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.conn_rejects[i][dry_run as usize].inc();
    }

    pub fn ban(&self, prefix: bool, dry_run: bool) {
        self.bans[prefix as usize][dry_run as usize].inc();
    }

    pub fn upstream(&self, server: usize, result: UpstreamResult, took: Option<Duration>) {
        let Some(h) = self.upstreams.get(server) else {
            return;
        };
        let i = UpstreamResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        h.results[i].inc();
        if let Some(t) = took {
            h.duration.observe(t.as_secs_f64());
        }
    }

    /// Values for the periodic summary line.
    pub fn requests_by_outcome(&self, outcome: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[i][0].get()
    }

    pub fn rejects_by_reason(&self) -> Vec<(&'static str, u64)> {
        Reject::ALL
            .iter()
            .zip(&self.rejects)
            .map(|(r, c)| (r.label(), c[0].get()))
            .collect()
    }

    pub fn upstream_sent(&self) -> u64 {
        self.upstreams
            .iter()
            .flat_map(|h| h.results.iter())
            .map(|c| c.get())
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_families_are_exposed() {
        let m = Metrics::new(&["127.0.0.1:53".into()]);
        m.request(Outcome::Answered, false);
        m.request(Outcome::RateLimited, true);
        m.reject(Reject::ObsoleteDraft, false);
        m.upstream(0, UpstreamResult::Ok, Some(Duration::from_millis(3)));
        let text = m.encode();
        for name in [
            "doh_requests_total{outcome=\"answered\"} 1",
            "doh_requests_total{outcome=\"rate_limited\",dry_run=\"true\"} 1",
            "doh_rejects_total{reason=\"obsolete_draft\"} 1",
            "doh_cache_hits_total 0",
            "doh_cache_misses_total 0",
            "doh_cache_entries 0",
            "doh_upstream_queries_total{upstream=\"127.0.0.1:53\",result=\"ok\"} 1",
            "doh_upstream_duration_seconds_bucket",
            "doh_unique_clients 0",
            "doh_bans_active 0",
            "doh_bans_total{kind=\"address\"} 0",
            "doh_connections_open 0",
            "doh_connections_rejected_total{reason=\"per_ip\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
