//! Prometheus metrics, with the names SPEC fixes.
//!
//! Counters on the request path are resolved to handles once, at start, so
//! counting costs one atomic add and no allocation or map lookup; the
//! handle of a reason is found by its `index()`, which the refusal tables
//! of [`crate::reject`] make cover every reason. What `--dry-run` only
//! counted carries the extra label `dry_run="true"` under the same names.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::reject::{ConnReject, Outcome, ProtocolError, Reject, Transport};

type Labels = Vec<(&'static str, String)>;

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

/// The per-upstream families, from which each upstream's handles are made.
struct UpstreamFamilies {
    queries: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    hedges: Family<Labels, Counter>,
    hedges_won: Family<Labels, Counter>,
    connections: Family<Labels, Counter>,
    rtt: Family<Labels, Gauge<f64, AtomicU64>>,
    up: Family<Labels, Gauge>,
}

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

/// How an Oblivious DoH request ended, the `result` of
/// `doh_odoh_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OdohResult {
    Ok,
    UnknownKey,
    Malformed,
    /// Opened, then refused like a plain query (validation, budget).
    Rejected,
    /// A fetch of `/.well-known/odohconfigs`.
    Configs,
}

impl OdohResult {
    const ALL: [OdohResult; 5] = [
        OdohResult::Ok,
        OdohResult::UnknownKey,
        OdohResult::Malformed,
        OdohResult::Rejected,
        OdohResult::Configs,
    ];
    fn label(self) -> &'static str {
        match self {
            OdohResult::Ok => "ok",
            OdohResult::UnknownKey => "unknown_key",
            OdohResult::Malformed => "malformed",
            OdohResult::Rejected => "rejected",
            OdohResult::Configs => "configs",
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

/// A pair of handles: enforced, and only counted under `--dry-run`.
type Pair = [Counter; 2];

pub struct Metrics {
    registry: Registry,
    /// Indexed by outcome, then transport.
    requests: Vec<Vec<Pair>>,
    rejects: Vec<Pair>,
    conn_rejects: Vec<Pair>,
    protocol_errors: Vec<Counter>,
    handshakes: Vec<Counter>,
    accept_errors: Vec<Counter>,
    quic_refusals: Vec<Counter>,
    /// Indexed by whether the ban is on a prefix.
    bans: [Pair; 2],
    /// Indexed by client class (0 new, 1 known).
    upstream_budget_refused: [Pair; 2],
    /// Known clients (`--known-after-secs`).
    pub known_clients: Gauge,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_stale: Counter,
    pub coalesced: Counter,
    pub upstream_budget_exhausted: Counter,
    pub forwarded_missing: Counter,
    pub connections_evicted: Counter,
    pub cache_entries: Gauge,
    pub cache_bytes: Gauge,
    pub cache_max_bytes: Gauge,
    pub connections_max: Gauge,
    pub unique_clients: Gauge,
    pub unique_clients_local: Gauge,
    pub redis_up: Gauge,
    pub bans_active: Gauge,
    pub connections_open: Gauge,
    /// Indexed by success (0 ok, 1 error).
    reloads: [Counter; 2],
    /// Indexed by success (0 ok, 1 error).
    acme_orders: [Counter; 2],
    odoh: Vec<Counter>,
    pub tls_cert_expiry: Gauge,
    upstream_families: UpstreamFamilies,
    upstreams: std::sync::Mutex<Vec<UpstreamMetrics>>,
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

fn one(family: &Family<Labels, Counter>, key: &'static str, value: &str) -> Counter {
    family
        .get_or_create(&vec![(key, value.to_string())])
        .clone()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests_f = Family::<Labels, Counter>::default();
        let rejects_f = Family::<Labels, Counter>::default();
        let conn_f = Family::<Labels, Counter>::default();
        let proto_f = Family::<Labels, Counter>::default();
        let handshake_f = Family::<Labels, Counter>::default();
        let accept_f = Family::<Labels, Counter>::default();
        let quic_f = Family::<Labels, Counter>::default();
        let reloads_f = Family::<Labels, Counter>::default();
        let acme_f = Family::<Labels, Counter>::default();
        let odoh_f = Family::<Labels, Counter>::default();
        let bans_f = Family::<Labels, Counter>::default();
        let budget_refused_f = Family::<Labels, Counter>::default();
        let fams = UpstreamFamilies {
            queries: Family::default(),
            duration: Family::<Labels, Histogram>::new_with_constructor(
                (|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))) as fn() -> Histogram,
            ),
            hedges: Family::default(),
            hedges_won: Family::default(),
            connections: Family::default(),
            rtt: Family::default(),
            up: Family::default(),
        };
        let m = Metrics {
            requests: Outcome::ALL
                .iter()
                .map(|o| {
                    Transport::ALL
                        .iter()
                        .map(|t| {
                            pair(
                                &requests_f,
                                &[("outcome", o.label()), ("transport", t.label())],
                            )
                        })
                        .collect()
                })
                .collect(),
            rejects: Reject::ALL
                .iter()
                .map(|r| pair(&rejects_f, &[("reason", r.label())]))
                .collect(),
            conn_rejects: ConnReject::ALL
                .iter()
                .map(|r| pair(&conn_f, &[("reason", r.label())]))
                .collect(),
            protocol_errors: ProtocolError::ALL
                .iter()
                .map(|k| one(&proto_f, "kind", k.label()))
                .collect(),
            handshakes: Handshake::ALL
                .iter()
                .map(|h| handshake_f.get_or_create(&h.labels()).clone())
                .collect(),
            accept_errors: AcceptError::ALL
                .iter()
                .map(|k| one(&accept_f, "kind", k.label()))
                .collect(),
            quic_refusals: QuicRefusal::ALL
                .iter()
                .map(|k| one(&quic_f, "action", k.label()))
                .collect(),
            upstream_budget_refused: [
                pair(&budget_refused_f, &[("client", "new")]),
                pair(&budget_refused_f, &[("client", "known")]),
            ],
            known_clients: Gauge::default(),
            bans: [
                pair(&bans_f, &[("kind", "address")]),
                pair(&bans_f, &[("kind", "prefix")]),
            ],
            reloads: [
                one(&reloads_f, "result", "ok"),
                one(&reloads_f, "result", "error"),
            ],
            tls_cert_expiry: Gauge::default(),
            acme_orders: [
                one(&acme_f, "result", "ok"),
                one(&acme_f, "result", "error"),
            ],
            odoh: OdohResult::ALL
                .iter()
                .map(|r| one(&odoh_f, "result", r.label()))
                .collect(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_stale: Counter::default(),
            coalesced: Counter::default(),
            upstream_budget_exhausted: Counter::default(),
            forwarded_missing: Counter::default(),
            connections_evicted: Counter::default(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            connections_max: Gauge::default(),
            unique_clients: Gauge::default(),
            unique_clients_local: Gauge::default(),
            redis_up: Gauge::default(),
            bans_active: Gauge::default(),
            connections_open: Gauge::default(),
            upstream_families: UpstreamFamilies {
                queries: fams.queries.clone(),
                duration: fams.duration.clone(),
                hedges: fams.hedges.clone(),
                hedges_won: fams.hedges_won.clone(),
                connections: fams.connections.clone(),
                rtt: fams.rtt.clone(),
                up: fams.up.clone(),
            },
            upstreams: std::sync::Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        registry.register(
            "doh_requests",
            "Requests by outcome (answered, rejected, rate_limited, banned, overloaded, \
             undelivered) and transport (h1, h2, h3, dot)",
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
        registry.register_with_unit(
            "doh_cache",
            "Memory held by cached answers (keys, messages and bookkeeping)",
            Unit::Bytes,
            m.cache_bytes.clone(),
        );
        registry.register_with_unit(
            "doh_cache_max",
            "The cache's bound, --cache-memory",
            Unit::Bytes,
            m.cache_max_bytes.clone(),
        );
        registry.register(
            "doh_upstream_queries",
            "Queries sent upstream by upstream and result (ok, servfail, timeout, error, \
             abandoned when another attempt won; dropped counts answers that did not match)",
            fams.queries,
        );
        registry.register_with_unit(
            "doh_upstream_duration",
            "Time to an accepted upstream answer",
            Unit::Seconds,
            fams.duration,
        );
        registry.register(
            "doh_upstream_hedges",
            "Attempts sent while an earlier one was still waiting",
            fams.hedges,
        );
        registry.register(
            "doh_upstream_hedges_won",
            "Hedged attempts whose answer came first",
            fams.hedges_won,
        );
        registry.register(
            "doh_upstream_connections",
            "Connections opened to stream upstreams (TCP, TLS, HTTPS)",
            fams.connections,
        );
        registry.register_with_unit(
            "doh_upstream_rtt",
            "Smoothed round-trip time of each upstream",
            Unit::Seconds,
            fams.rtt,
        );
        registry.register(
            "doh_upstream_up",
            "Whether the proxy's own probes find the upstream up",
            fams.up,
        );
        registry.register(
            "doh_forwarded_missing",
            "Requests from a --trusted-proxy without the --forwarded-header, counted as the unknown client",
            m.forwarded_missing.clone(),
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
        registry.register(
            "doh_unique_clients_local",
            "Estimated distinct client addresses over a rolling 24 h, this instance only",
            m.unique_clients_local.clone(),
        );
        registry.register(
            "doh_redis_up",
            "Whether the shared state in Redis (--redis) is reachable",
            m.redis_up.clone(),
        );
        registry.register("doh_bans_active", "Bans in force", m.bans_active.clone());
        registry.register(
            "doh_upstream_budget_refused",
            "Misses refused because the upstream budget was spent, by client (known or new)",
            budget_refused_f,
        );
        registry.register(
            "doh_known_clients",
            "Clients known (answered again --known-after-secs after their first answer)",
            m.known_clients.clone(),
        );
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
            "doh_connections_max",
            "Client connections allowed in all, --max-conns",
            m.connections_max.clone(),
        );
        registry.register(
            "doh_connections_rejected",
            "Connections closed at accept or before their first request, by reason",
            conn_f,
        );
        registry.register(
            "doh_connections_evicted",
            "Idle connections closed to make room for a new one at --max-conns",
            m.connections_evicted.clone(),
        );
        registry.register(
            "doh_protocol_errors",
            "Connections closed for a protocol error, by kind",
            proto_f,
        );
        registry.register(
            "doh_tls_handshakes",
            "TLS handshakes by result, and whether they resumed a session",
            handshake_f,
        );
        registry.register(
            "doh_reloads",
            "Configuration and certificate reloads (SIGHUP, certificate files changed)",
            reloads_f,
        );
        registry.register(
            "doh_odoh_requests",
            "Oblivious DoH requests by result (ok, unknown_key, malformed, rejected: refused \
             once opened, configs: fetches of the configs)",
            odoh_f,
        );
        registry.register(
            "doh_acme_orders",
            "ACME certificate orders by result",
            acme_f,
        );
        registry.register_with_unit(
            "doh_tls_cert_expiry",
            "Seconds until the earliest notAfter among served certificates",
            Unit::Seconds,
            m.tls_cert_expiry.clone(),
        );
        registry.register(
            "doh_quic_refused",
            "QUIC Initials not accepted: ignored (banned, denied), retry (address \
             validation asked), refused (over a cap)",
            quic_f,
        );
        registry.register(
            "doh_accept_errors",
            "Failed accept() calls by kind (no_fds: out of file descriptors)",
            accept_f,
        );
        Metrics { registry, ..m }
    }

    pub fn request(&self, outcome: Outcome, transport: Transport, dry_run: bool) {
        self.requests[outcome.index()][transport.index()][dry_run as usize].inc();
    }

    pub fn reject(&self, reason: Reject, dry_run: bool) {
        self.rejects[reason.index()][dry_run as usize].inc();
    }

    pub fn conn_rejected(&self, reason: ConnReject, dry_run: bool) {
        self.conn_rejects[reason.index()][dry_run as usize].inc();
    }

    pub fn protocol_error(&self, kind: ProtocolError) {
        self.protocol_errors[kind.index()].inc();
    }

    pub fn handshake(&self, result: Handshake) {
        let i = Handshake::ALL.iter().position(|h| *h == result);
        if let Some(c) = i.and_then(|i| self.handshakes.get(i)) {
            c.inc();
        }
    }

    pub fn accept_error(&self, kind: AcceptError) {
        let i = AcceptError::ALL.iter().position(|k| *k == kind);
        if let Some(c) = i.and_then(|i| self.accept_errors.get(i)) {
            c.inc();
        }
    }

    pub fn reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
    }

    pub fn odoh(&self, r: OdohResult) {
        if let Some(c) = self.odoh.get(r as usize) {
            c.inc();
        }
    }

    pub fn acme(&self, ok: bool) {
        self.acme_orders[usize::from(!ok)].inc();
    }

    pub fn quic_refusal(&self, action: QuicRefusal) {
        let i = QuicRefusal::ALL.iter().position(|k| *k == action);
        if let Some(c) = i.and_then(|i| self.quic_refusals.get(i)) {
            c.inc();
        }
    }

    /// A miss refused for the upstream budget (`dry_run`: one the known
    /// clients' share would have refused).
    pub fn upstream_budget_refused(&self, known: bool, dry_run: bool) {
        self.upstream_budget_refused[known as usize][dry_run as usize].inc();
    }

    pub fn ban(&self, prefix: bool, dry_run: bool) {
        self.bans[prefix as usize][dry_run as usize].inc();
    }

    /// The handles of the upstream labelled `label` (created on first use,
    /// so that reloaded upstreams get theirs).
    pub fn upstream_handles(&self, label: &str) -> UpstreamMetrics {
        let f = &self.upstream_families;
        let l = || vec![("upstream", label.to_string())];
        let h = UpstreamMetrics {
            results: UpstreamResult::ALL
                .iter()
                .map(|r| {
                    let mut labels = l();
                    labels.push(("result", r.label().to_string()));
                    f.queries.get_or_create(&labels).clone()
                })
                .collect(),
            duration: f.duration.get_or_create(&l()).clone(),
            hedges: f.hedges.get_or_create(&l()).clone(),
            hedges_won: f.hedges_won.get_or_create(&l()).clone(),
            connections: f.connections.get_or_create(&l()).clone(),
            rtt: f.rtt.get_or_create(&l()).clone(),
            up: f.up.get_or_create(&l()).clone(),
        };
        if let Ok(mut all) = self.upstreams.lock() {
            all.push(h.clone());
        }
        h
    }

    /// Requests with `outcome` over every transport, enforced only.
    pub fn requests_by_outcome(&self, outcome: Outcome) -> u64 {
        self.requests[outcome.index()]
            .iter()
            .map(|p| p[0].get())
            .sum()
    }

    pub fn rejects_by_reason(&self) -> Vec<(&'static str, u64)> {
        Reject::ALL
            .iter()
            .map(|r| (r.label(), self.rejects[r.index()][0].get()))
            .collect()
    }

    /// Queries sent upstream in all.
    pub fn upstream_sent(&self) -> u64 {
        self.upstreams
            .lock()
            .map(|all| all.iter().map(|h| h.sent()).sum())
            .unwrap_or(0)
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
        let m = Metrics::new();
        let up = m.upstream_handles("127.0.0.1:53");
        m.request(Outcome::Answered, Transport::H2, false);
        m.request(Outcome::RateLimited, Transport::H1, true);
        m.reject(Reject::ObsoleteDraft, false);
        up.result(UpstreamResult::Ok, Some(Duration::from_millis(3)));
        m.protocol_error(ProtocolError::H2Calm);
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
