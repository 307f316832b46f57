//! What happened to requests: outcomes by transport, refusals by reason,
//! Oblivious DoH, the clients seen.

use prometheus_client::metrics::gauge::Gauge;

use super::{one, pair, Counter, Pair, Reg};
use crate::reject::{Outcome, Reject, Transport};

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

pub struct RequestMetrics {
    /// Indexed by outcome, then transport.
    requests: Vec<Vec<Pair>>,
    rejects: Vec<Pair>,
    odoh: Vec<Counter>,
    pub forwarded_missing: Counter,
    pub unique_clients: Gauge,
    pub unique_clients_local: Gauge,
}

impl RequestMetrics {
    pub fn register(reg: &mut Reg<'_>) -> RequestMetrics {
        let requests = reg.counters(
            "doh_requests",
            "Requests by outcome (answered, rejected, rate_limited, banned, overloaded, \
             undelivered) and transport (h1, h2, h3, dot, doq)",
        );
        let rejects = reg.counters("doh_rejects", "Rejected requests by reason");
        let odoh = reg.counters(
            "doh_odoh_requests",
            "Oblivious DoH requests by result (ok, unknown_key, malformed, rejected: refused \
             once opened, configs: fetches of the configs)",
        );
        RequestMetrics {
            requests: Outcome::ALL
                .iter()
                .map(|o| {
                    Transport::ALL
                        .iter()
                        .map(|t| pair(&requests, &[("outcome", o.label()), ("transport", t.label())]))
                        .collect()
                })
                .collect(),
            rejects: Reject::ALL
                .iter()
                .map(|r| pair(&rejects, &[("reason", r.label())]))
                .collect(),
            odoh: OdohResult::ALL
                .iter()
                .map(|r| one(&odoh, "result", r.label()))
                .collect(),
            forwarded_missing: reg.counter(
                "doh_forwarded_missing",
                "Requests from a --trusted-proxy without the --forwarded-header, counted as the unknown client",
            ),
            unique_clients: reg.gauge(
                "doh_unique_clients",
                "Estimated distinct client addresses over a rolling 24 h",
            ),
            unique_clients_local: reg.gauge(
                "doh_unique_clients_local",
                "Estimated distinct client addresses over a rolling 24 h, this instance only",
            ),
        }
    }

    /// A request ended with `outcome` (`dry_run`: what was only counted).
    pub fn count(&self, outcome: Outcome, transport: Transport, dry_run: bool) {
        self.requests[outcome.index()][transport.index()][dry_run as usize].inc();
    }

    pub fn reject(&self, reason: Reject, dry_run: bool) {
        self.rejects[reason.index()][dry_run as usize].inc();
    }

    pub fn odoh(&self, r: OdohResult) {
        if let Some(c) = self.odoh.get(r as usize) {
            c.inc();
        }
    }

    /// Requests with `outcome` over every transport, enforced only.
    pub fn by_outcome(&self, outcome: Outcome) -> u64 {
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
}
