//! The guard: connections open, refused and evicted, bans, known clients.

use prometheus_client::metrics::gauge::Gauge;

use super::{pair, Counter, Pair, Reg};
use crate::reject::ConnReject;

pub struct GuardMetrics {
    conn_rejects: Vec<Pair>,
    pub connections_open: Gauge,
    pub connections_max: Gauge,
    pub connections_evicted: Counter,
    /// Indexed by whether the ban is on a prefix.
    bans: [Pair; 2],
    pub bans_active: Gauge,
    /// Known clients (`--known-after-secs`).
    pub known_clients: Gauge,
}

impl GuardMetrics {
    pub fn register(reg: &mut Reg<'_>) -> GuardMetrics {
        let conn = reg.counters(
            "doh_connections_rejected",
            "Connections closed at accept or before their first request, by reason",
        );
        let bans = reg.counters("doh_bans", "Bans issued, by kind (address or prefix)");
        GuardMetrics {
            conn_rejects: ConnReject::ALL
                .iter()
                .map(|r| pair(&conn, &[("reason", r.label())]))
                .collect(),
            connections_open: reg.gauge("doh_connections_open", "Client connections open"),
            connections_max: reg.gauge(
                "doh_connections_max",
                "Client connections allowed in all, --max-conns",
            ),
            connections_evicted: reg.counter(
                "doh_connections_evicted",
                "Idle connections closed to make room for a new one at --max-conns",
            ),
            bans: [
                pair(&bans, &[("kind", "address")]),
                pair(&bans, &[("kind", "prefix")]),
            ],
            bans_active: reg.gauge("doh_bans_active", "Bans in force"),
            known_clients: reg.gauge(
                "doh_known_clients",
                "Clients known (answered again --known-after-secs after their first answer)",
            ),
        }
    }

    pub fn conn_rejected(&self, reason: ConnReject, dry_run: bool) {
        self.conn_rejects[reason.index()][dry_run as usize].inc();
    }

    pub fn ban(&self, prefix: bool, dry_run: bool) {
        self.bans[prefix as usize][dry_run as usize].inc();
    }
}
