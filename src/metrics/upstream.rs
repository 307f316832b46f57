//! The upstreams: queries by upstream and result, latency, hedges,
//! connections, health, and the upstream budget.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Unit;

use super::{pair, Counter, Labels, Pair, Reg};

/// What happened to one query sent to one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    Ok,
    /// SERVFAIL or REFUSED.
    Servfail,
    /// No answer by the deadline.
    Timeout,
    Error,
    /// An answer that did not match (wrong ID or question, too large) and
    /// was dropped (counted per answer, beside the query's own result).
    Dropped,
    /// Still unanswered when another attempt's answer won.
    Abandoned,
}

impl UpstreamResult {
    const ALL: [UpstreamResult; 6] = [
        UpstreamResult::Ok,
        UpstreamResult::Servfail,
        UpstreamResult::Timeout,
        UpstreamResult::Error,
        UpstreamResult::Dropped,
        UpstreamResult::Abandoned,
    ];
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            UpstreamResult::Ok => "ok",
            UpstreamResult::Servfail => "servfail",
            UpstreamResult::Timeout => "timeout",
            UpstreamResult::Error => "error",
            UpstreamResult::Dropped => "dropped",
            UpstreamResult::Abandoned => "abandoned",
        }
    }
}

/// The metric handles of one upstream, resolved once.
#[derive(Clone)]
pub struct UpstreamMetrics {
    results: Vec<Counter>,
    duration: Histogram,
    /// Attempts sent while another was still waiting.
    pub hedges: Counter,
    /// Hedged attempts whose answer won.
    pub hedges_won: Counter,
    /// Stream connections opened (TCP, TLS, HTTPS).
    pub connections: Counter,
    rtt: Gauge<f64, AtomicU64>,
    pub up: Gauge,
}

impl UpstreamMetrics {
    pub fn result(&self, r: UpstreamResult, took: Option<Duration>) {
        if let Some(c) = self.results.get(r.index()) {
            c.inc();
        }
        if let Some(t) = took {
            self.duration.observe(t.as_secs_f64());
        }
    }

    pub fn dropped(&self) {
        self.result(UpstreamResult::Dropped, None);
    }

    pub fn set_rtt(&self, srtt: Option<Duration>) {
        if let Some(d) = srtt {
            self.rtt.set(d.as_secs_f64());
        }
    }

    fn sent(&self) -> u64 {
        [
            UpstreamResult::Ok,
            UpstreamResult::Servfail,
            UpstreamResult::Timeout,
            UpstreamResult::Error,
            UpstreamResult::Abandoned,
        ]
        .iter()
        .map(|r| self.results[r.index()].get())
        .sum()
    }
}

/// The per-upstream families, from which each upstream's handles are
/// made, and the upstream budget's counters.
pub struct UpstreamRegistry {
    queries: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    hedges: Family<Labels, Counter>,
    hedges_won: Family<Labels, Counter>,
    connections: Family<Labels, Counter>,
    rtt: Family<Labels, Gauge<f64, AtomicU64>>,
    up: Family<Labels, Gauge>,
    upstreams: Mutex<Vec<UpstreamMetrics>>,
    pub budget_exhausted: Counter,
    /// Indexed by client class (0 new, 1 known).
    budget_refused: [Pair; 2],
}

impl UpstreamRegistry {
    pub fn register(reg: &mut Reg<'_>) -> UpstreamRegistry {
        let budget_refused = reg.counters(
            "doh_upstream_budget_refused",
            "Misses refused because the upstream budget was spent, by client (known or new)",
        );
        UpstreamRegistry {
            queries: reg.counters(
                "doh_upstream_queries",
                "Queries sent upstream by upstream and result (ok, servfail, timeout, error, \
                 abandoned when another attempt won; dropped counts answers that did not match)",
            ),
            duration: reg.add_unit(
                "doh_upstream_duration",
                "Time to an accepted upstream answer",
                Unit::Seconds,
                Family::new_with_constructor(
                    (|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))) as fn() -> Histogram,
                ),
            ),
            hedges: reg.counters(
                "doh_upstream_hedges",
                "Attempts sent while an earlier one was still waiting",
            ),
            hedges_won: reg.counters(
                "doh_upstream_hedges_won",
                "Hedged attempts whose answer came first",
            ),
            connections: reg.counters(
                "doh_upstream_connections",
                "Connections opened to stream upstreams (TCP, TLS, HTTPS)",
            ),
            rtt: reg.add_unit(
                "doh_upstream_rtt",
                "Smoothed round-trip time of each upstream",
                Unit::Seconds,
                Family::default(),
            ),
            up: reg.add(
                "doh_upstream_up",
                "Whether the proxy's own probes find the upstream up",
                Family::default(),
            ),
            upstreams: Mutex::new(Vec::new()),
            budget_exhausted: reg.counter(
                "doh_upstream_budget_exhausted",
                "Upstream queries not sent because --upstream-qps was spent",
            ),
            budget_refused: [
                pair(&budget_refused, &[("client", "new")]),
                pair(&budget_refused, &[("client", "known")]),
            ],
        }
    }

    /// The handles of the upstream labelled `label` (created on first use,
    /// so that reloaded upstreams get theirs).
    pub fn handles(&self, label: &str) -> UpstreamMetrics {
        let l = || vec![("upstream", label.to_string())];
        let h = UpstreamMetrics {
            results: UpstreamResult::ALL
                .iter()
                .map(|r| {
                    let mut labels = l();
                    labels.push(("result", r.label().to_string()));
                    self.queries.get_or_create(&labels).clone()
                })
                .collect(),
            duration: self.duration.get_or_create(&l()).clone(),
            hedges: self.hedges.get_or_create(&l()).clone(),
            hedges_won: self.hedges_won.get_or_create(&l()).clone(),
            connections: self.connections.get_or_create(&l()).clone(),
            rtt: self.rtt.get_or_create(&l()).clone(),
            up: self.up.get_or_create(&l()).clone(),
        };
        if let Ok(mut all) = self.upstreams.lock() {
            all.push(h.clone());
        }
        h
    }

    /// Queries sent upstream in all.
    pub fn sent(&self) -> u64 {
        self.upstreams
            .lock()
            .map(|all| all.iter().map(|h| h.sent()).sum())
            .unwrap_or(0)
    }

    /// A miss refused for the upstream budget (`dry_run`: one the known
    /// clients' share would have refused).
    pub fn budget_refused(&self, known: bool, dry_run: bool) {
        self.budget_refused[known as usize][dry_run as usize].inc();
    }
}
