//! Operations: reloads, certificates (expiry, ACME orders), Redis.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;

use super::{one, Counter, Reg};

pub struct OpsMetrics {
    /// Indexed by success (0 ok, 1 error).
    reloads: [Counter; 2],
    /// Indexed by success (0 ok, 1 error).
    acme_orders: [Counter; 2],
    pub tls_cert_expiry: Gauge,
    pub redis_up: Gauge,
}

impl OpsMetrics {
    pub fn register(reg: &mut Reg<'_>) -> OpsMetrics {
        let reloads = reg.counters(
            "doh_reloads",
            "Configuration and certificate reloads (SIGHUP, certificate files changed)",
        );
        let acme = reg.counters("doh_acme_orders", "ACME certificate orders by result");
        OpsMetrics {
            reloads: [
                one(&reloads, "result", "ok"),
                one(&reloads, "result", "error"),
            ],
            acme_orders: [one(&acme, "result", "ok"), one(&acme, "result", "error")],
            tls_cert_expiry: reg.add_unit(
                "doh_tls_cert_expiry",
                "Seconds until the earliest notAfter among served certificates",
                Unit::Seconds,
                Gauge::default(),
            ),
            redis_up: reg.gauge(
                "doh_redis_up",
                "Whether the shared state in Redis (--redis) is reachable",
            ),
        }
    }

    pub fn reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
    }

    pub fn acme(&self, ok: bool) {
        self.acme_orders[usize::from(!ok)].inc();
    }
}
