//! The cache: hits, misses, stale answers, coalesced misses, its size.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;

use super::Counter;
use super::Reg;

pub struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub stale: Counter,
    pub coalesced: Counter,
    pub declined: Counter,
    pub entries: Gauge,
    pub bytes: Gauge,
    pub max_bytes: Gauge,
}

impl CacheMetrics {
    pub fn register(reg: &mut Reg<'_>) -> CacheMetrics {
        CacheMetrics {
            hits: reg.counter("doh_cache_hits", "Answers served from cache (fresh)"),
            misses: reg.counter("doh_cache_misses", "Queries not in cache"),
            stale: reg.counter(
                "doh_cache_stale",
                "Answers served stale (RFC 8767) because the upstream failed or its budget was spent",
            ),
            coalesced: reg.counter(
                "doh_coalesced",
                "Misses that waited for an identical query already in flight",
            ),
            declined: reg.counter(
                "doh_cache_declined",
                "Misses met by a full cache for a name not asked recently: their answer is served, not stored",
            ),
            entries: reg.gauge("doh_cache_entries", "Entries in the cache"),
            bytes: reg.add_unit(
                "doh_cache",
                "Memory held by cached answers (keys, messages and bookkeeping)",
                Unit::Bytes,
                Gauge::default(),
            ),
            max_bytes: reg.add_unit(
                "doh_cache_max",
                "The cache's bound, --cache-memory",
                Unit::Bytes,
                Gauge::default(),
            ),
        }
    }
}
