//! Measures the memory one cached answer costs: fills a cache with N
//! typical answers (one A record, EDNS) and reports the growth of the
//! process's resident set per entry.
//!
//!     cargo run --release --example cache_memory -- 1000000

use std::sync::Arc;

use doh_proxy::cache::{Cache, Entry, TtlPolicy};
use doh_proxy::dns::{self, Key};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// An answer for `key` with one A record, as an upstream sends it.
fn answer(key: &Key) -> (Vec<u8>, dns::AnswerInfo) {
    let mut a = dns::upstream_query(0, key);
    a[2] |= 0x80;
    a[7] = 1;
    let opt_at = a.len() - 11;
    let rr = [0xC0, 12, 0, 1, 0, 1, 0, 0, 0x0E, 0x10, 0, 4, 192, 0, 2, 1];
    a.splice(opt_at..opt_at, rr);
    let info = dns::check_answer(&a, 0, key).expect("a valid answer");
    (a, info)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let policy = TtlPolicy {
        min_ttl: 1800,
        max_ttl: 86400,
        err_ttl: 2,
        stale_secs: 86400,
    };
    let cache = Cache::new(n, policy);
    let before = rss_bytes();
    for i in 0..n {
        let key = Key::new(&format!("host-{i}.example.test"), 1, true).expect("valid name");
        let (wire, info) = answer(&key);
        cache.store(key, Arc::new(Entry::from_answer(wire, &info, &policy)));
    }
    cache.sync();
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / cache.len().max(1) as f64;
    println!(
        "{} entries, RSS +{:.1} MiB, {:.0} bytes per entry (name of 27 bytes, answer of {} bytes)",
        cache.len(),
        (after - before) as f64 / 1048576.0,
        per,
        answer(&Key::new("host-0.example.test", 1, true).expect("valid"))
            .0
            .len()
    );
}
