//! A burst of unique names against a running doh-proxy: the upstream budget
//! holds whatever the number of clients, and names already cached (even
//! expired) are still answered, stale, while it is spent.
//!
//!     doh-proxy -u 127.0.0.1:5300 --upstream-qps 50 &
//!     cargo run --release --example unique_burst -- --addr 127.0.0.1:8443 \
//!         --metrics http://127.0.0.1:9153/metrics --budget 50 [--ca ca.pem | --insecure]
//!
//! Uses `short.example.test` (TTL 5) from the test zone as the cached name.

#[path = "common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;

#[tokio::main]
async fn main() -> Result<(), common::Error> {
    let addr: SocketAddr = common::arg("--addr", "127.0.0.1:8443").parse()?;
    let metrics = common::arg("--metrics", "http://127.0.0.1:9153/metrics");
    let budget: f64 = common::arg("--budget", "50").parse()?;
    let secs: u64 = common::arg("--secs", "8").parse()?;
    let ca = common::arg("--ca", "");
    let tls = common::tls((!common::flag("--insecure") && !ca.is_empty()).then_some(ca.as_str()))?;

    let mut probe = common::connect(&tls, addr, None).await?;
    let cached = common::dns_path("/dns-query", "short.example.test", 1);
    let (s, _) = common::get(&mut probe, &cached, &[]).await?;
    println!("cached short.example.test (TTL 5): HTTP {s}");

    let up_before = common::metric_sum(&metrics, "doh_upstream_queries_total", "").await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..40u8 {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let src: IpAddr = format!("127.0.{}.{}", 100 + c / 10, 1 + c % 10).parse()?;
            let mut conn = common::connect(&tls, addr, Some(src)).await?;
            let mut codes = [0u32; 6];
            let mut i = 0;
            // 15 unique names a second each: within a client's own budget,
            // far beyond the upstream's with 40 of them.
            let mut tick = tokio::time::interval(Duration::from_millis(66));
            while start.elapsed() < Duration::from_secs(secs) {
                tick.tick().await;
                let p = common::dns_path("/dns-query", &format!("burst-{c}-{i}.example.test"), 1);
                let (s, _) = common::get(&mut conn, &p, &[]).await?;
                codes[(s / 100) as usize] += 1;
                i += 1;
            }
            Ok::<_, common::Error>(codes)
        }));
    }
    // Past the cached name's TTL, while the budget is spent, it must come back stale.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (s, body) = common::get(&mut probe, &cached, &[]).await?;
    let stale_ttl = Message::from_vec(&body)
        .ok()
        .and_then(|m| m.answers.first().map(|r| r.ttl));
    let mut codes = [0u32; 6];
    for t in tasks {
        for (a, b) in codes.iter_mut().zip(t.await??) {
            *a += b;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let up = common::metric_sum(&metrics, "doh_upstream_queries_total", "").await? - up_before;
    let stale = common::metric_sum(&metrics, "doh_cache_stale_total", "").await?;
    println!(
        "unique-name burst: 40 clients for {elapsed:.1} s: {} answered, {} 503, {} 429",
        codes[2], codes[5], codes[4]
    );
    println!(
        "  upstream: {up} queries, {:.1}/s (budget {budget}/s)",
        up / elapsed
    );
    let how = match stale_ttl {
        Some(30) => "served stale, TTL 30",
        Some(_) => "refreshed within the budget",
        None => "no answer record",
    };
    println!("  cached name after its TTL: HTTP {s}, {how} (stale answers so far: {stale})");
    let good = up / elapsed <= budget * 1.3 && s == 200;
    println!(
        "verdict: {}",
        if good {
            "HELD (upstream within budget, cached names still answered)"
        } else {
            "DEGRADED"
        }
    );
    std::process::exit(if good { 0 } else { 1 });
}
