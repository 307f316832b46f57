//! Measures what the guard's state costs per tracked client and per ban:
//! feeds N distinct addresses through the client budget (and the penalty
//! box), then bans M addresses, reading the resident set in between.
//!
//!     cargo run --release --example guard_memory -- 1000000

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use doh_proxy::config::Config;
use doh_proxy::guard::Guard;
use doh_proxy::metrics::Metrics;
use doh_proxy::reject::Reject;

fn rss() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let cfg = Config {
        upstream: vec!["127.0.0.1:53".parse().expect("an address")],
        ban_after: 1_000_000,
        ..Config::default()
    };
    let (settings, _) = cfg.settings().expect("a valid configuration");
    let guard = Guard::new(settings.guard, Arc::new(Metrics::new()));
    // IPv6 /64s spread over many /56 prefixes: the worst case for the
    // prefix limiter too.
    let addr = |i: u32| {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            (i >> 16) as u16,
            (i & 0xffff) as u16,
            0,
            0,
            0,
            1,
        ))
    };

    let base = rss();
    for i in 0..n {
        guard.check_budget(addr(i));
    }
    let tracked = guard.tracked_clients();
    let after_budget = rss();
    println!(
        "budgets: {n} distinct addresses, {tracked} limiter keys, {:.0} bytes per key",
        (after_budget - base) / tracked.max(1) as f64
    );

    let before = rss();
    for i in 0..n {
        guard.penalize(addr(i), Reject::ObsoleteDraft);
    }
    let after_scores = rss();
    println!(
        "penalty scores: {:.0} bytes per scored client",
        (after_scores - before) / n as f64
    );

    let bans = (n / 5).min(200_000);
    let before = rss();
    for i in 0..bans {
        guard.ban(
            ipnet::IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i * 256))),
            "measure",
        );
    }
    let after_bans = rss();
    println!(
        "bans: {} active, {:.0} bytes per ban",
        guard.bans().len(),
        (after_bans - before) / bans as f64
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    guard.tick();
    println!(
        "after one prune (keys whose bucket refilled are forgotten): {} limiter keys",
        guard.tracked_clients()
    );
}
