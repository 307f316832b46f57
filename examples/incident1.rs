//! Replays incident 1 against a running doh-proxy: thousands of client
//! addresses, each sending a little garbage (obsolete drafts, JSON API,
//! malformed base64) through a trusted reverse proxy, while legitimate
//! clients keep resolving. Prints a verdict.
//!
//! Start the proxy with a plain listener that trusts 127.0.0.1, e.g.
//!     doh-proxy --listen-http 127.0.0.1:8080 --trusted-proxy 127.0.0.1 -u 127.0.0.1:5300
//! then
//!     cargo run --release --example incident1 -- --url http://127.0.0.1:8080/dns-query \
//!         --metrics http://127.0.0.1:9153/metrics --clients 20000

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> Result<(), common::Error> {
    let url: http::Uri = common::arg("--url", "http://127.0.0.1:8080/dns-query").parse()?;
    let metrics = common::arg("--metrics", "http://127.0.0.1:9153/metrics");
    let clients: u32 = common::arg("--clients", "20000").parse()?;
    let legit_names = [
        "example.test",
        "www.example.test",
        "multi.example.test",
        "txt.example.test",
    ];
    let host = url.authority().ok_or("URL needs host:port")?.to_string();
    let path = url.path().to_string();
    let pid = common::find_pid();
    let rss_before = common::rss_mib(pid);
    let up_before = common::metric_sum(&metrics, "doh_upstream_queries_total", "").await?;
    let start = Instant::now();

    let mut attackers = Vec::new();
    for w in 0..8u32 {
        let (host, path) = (host.clone(), path.clone());
        attackers.push(tokio::spawn(async move {
            let mut c = common::h2c(&host).await?;
            let mut sent = 0u32;
            for i in (w..clients).step_by(8) {
                let client = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
                let q = match i % 4 {
                    0 => format!("{path}?ct=application/dns-udpwireformat&dns=AAABAAABAAAAAAAAB2V4YW1wbGUEdGVzdAAAAQAB"),
                    1 => format!("{path}?name=example.test&type=A"),
                    2 => format!("{path}?dns=!!not-base64!!"),
                    _ => format!("{path}?dns=AAAB&random_padding=xyz"),
                };
                common::get_as(&mut c, &host, &q, &client).await?;
                sent += 1;
            }
            Ok::<u32, common::Error>(sent)
        }));
    }
    let legit = {
        let (host, path) = (host.clone(), path.clone());
        tokio::spawn(async move {
            let mut c = common::h2c(&host).await?;
            let (mut ok, mut total) = (0u32, 0u32);
            let mut lat = Vec::new();
            for i in 0..200 {
                let t = Instant::now();
                let p = common::dns_path(&path, legit_names[i % legit_names.len()], 1);
                let client = format!("203.0.113.{}", 1 + i % 20);
                let s = common::get_as(&mut c, &host, &p, &client).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                total += 1;
                ok += (s == 200) as u32;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, common::Error>((ok, total, lat))
        })
    };
    let mut garbage = 0;
    for a in attackers {
        garbage += a.await??;
    }
    let (ok, total, mut lat) = legit.await??;
    lat.sort_by(f64::total_cmp);
    let secs = start.elapsed().as_secs_f64();
    let up = common::metric_sum(&metrics, "doh_upstream_queries_total", "").await? - up_before;
    let bans = common::metric_sum(&metrics, "doh_bans_active", "").await?;
    let rss_after = common::rss_mib(pid);
    println!(
        "incident 1 replay: {clients} client addresses, {garbage} garbage requests in {secs:.1} s"
    );
    println!(
        "  legitimate: {ok}/{total} answered ({:.1} %), p50 {:.1} ms, p99 {:.1} ms",
        100.0 * ok as f64 / total as f64,
        common::percentile(&lat, 0.5),
        common::percentile(&lat, 0.99)
    );
    println!(
        "  upstream: {up} queries ({:.1}/s) for the whole replay",
        up / secs
    );
    println!("  active bans: {bans}");
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        println!("  proxy RSS: {a:.1} MiB -> {b:.1} MiB");
    }
    let good = ok == total && up / secs < 50.0;
    println!(
        "verdict: {}",
        if good {
            "HELD (every legitimate query answered, upstream spared)"
        } else {
            "DEGRADED"
        }
    );
    std::process::exit(if good { 0 } else { 1 });
}
