//! Measures the memory one cached answer costs: fills a cache with N
//! typical answers (one A record, EDNS) and reports the growth of the
//! process's resident set per entry.
//!
//!     cargo run --release --example cache_memory -- 1000000

use doh_proxy::cache::{Cache, Entry, TtlPolicy};
use doh_proxy::dns::{self, Key};
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};

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
    let mut m = Message::from_vec(&dns::upstream_query(0, key)).expect("our query decodes");
    m.metadata.message_type = MessageType::Response;
    let name = m.queries[0].name().clone();
    m.add_answer(Record::from_rdata(
        name,
        3600,
        RData::A(A::new(192, 0, 2, 1)),
    ));
    let a = m.to_vec().expect("encodes");
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
    let cache = Cache::with_entries(n, policy);
    let before = rss_bytes();
    for i in 0..n {
        let key = Key::new(&format!("host-{i}.example.test"), 1, true).expect("valid name");
        let (wire, info) = answer(&key);
        cache.store(
            key,
            Entry::from_answer(wire, &info, &policy, tokio::time::Instant::now()),
        );
    }
    cache.sync();
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / cache.len().max(1) as f64;
    println!(
        "doh_cache_bytes says {:.0} bytes per entry",
        cache.bytes() as f64 / cache.len().max(1) as f64
    );
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
