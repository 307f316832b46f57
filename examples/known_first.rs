//! Replays incident 1 as the upstream budget sees it, against a running
//! doh-proxy: regular clients become known, then a crowd of new addresses
//! asks unique names far past `--upstream-qps` while each regular client
//! asks a few new names. Prints what share of their names each side got
//! and what reached the upstream. Clients are played through a trusted
//! reverse proxy (`X-Forwarded-For`), so any number of addresses fits on
//! one machine.
//!
//! Start the proxy with a plain listener that trusts 127.0.0.1 and a short
//! `--known-after-secs`, e.g.
//!     doh-proxy --listen-http 127.0.0.1:8080 --trusted-proxy 127.0.0.1 \
//!         -u 127.0.0.1:5300 --upstream-qps 20 --known-after-secs 20 \
//!         --per-ip-qps 1000 --per-prefix-qps 100000
//! then
//!     cargo run --release --example known_first -- --url http://127.0.0.1:8080/dns-query \
//!         --metrics http://127.0.0.1:9153/metrics --crowd 300 --known-after 20
//! (`--known-share 0` on the proxy shows the same replay without the
//! priority.) The crowd stays under `--known-after` seconds, as a crowd
//! arriving overnight is under a day old.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> Result<(), common::Error> {
    let url: http::Uri = common::arg("--url", "http://127.0.0.1:8080/dns-query").parse()?;
    let metrics = common::arg("--metrics", "http://127.0.0.1:9153/metrics");
    let crowd: u32 = common::arg("--crowd", "300").parse()?;
    let regulars: u32 = common::arg("--regulars", "10").parse()?;
    let after: u64 = common::arg("--known-after", "20").parse()?;
    let host = url.authority().ok_or("URL needs host:port")?.to_string();
    let path = url.path().to_string();
    let regular = |i: u32| format!("198.51.100.{}", i + 1);

    // Regular clients: answered, then answered again `after` seconds later.
    let mut c = common::h2c(&host).await?;
    let www = common::dns_path(&path, "www.example.test", 1);
    for round in 0..2 {
        if round == 1 {
            tokio::time::sleep(Duration::from_secs(after + 1)).await;
        }
        for i in 0..regulars {
            common::get_as(&mut c, &host, &www, &regular(i)).await?;
        }
    }
    // The gauge follows within a second.
    let mut known = 0.0;
    for _ in 0..50 {
        known = common::metric_sum(&metrics, "doh_known_clients", "").await?;
        if known >= f64::from(regulars) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{known} known clients");

    let up_before = common::metric_sum(&metrics, "doh_upstream_queries_total", "").await?;
    let start = Instant::now();
    // Under `after`: no member of the crowd can become known meanwhile.
    let crowd_for =
        Duration::from_secs(after.saturating_sub(1).max(1)).min(Duration::from_secs(60));
    let mut tasks = Vec::new();
    for w in 0..crowd {
        let (host, path) = (host.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = common::h2c(&host).await?;
            let client = format!("10.{}.{}.{}", (w >> 16) & 255, (w >> 8) & 255, w & 255);
            let (mut ok, mut n) = (0u32, 0u32);
            while start.elapsed() < crowd_for {
                let name = format!("c{w}-{n}.crowd.example.test");
                ok += u32::from(
                    common::get_as(&mut c, &host, &common::dns_path(&path, &name, 1), &client)
                        .await?
                        == 200,
                );
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, common::Error>((ok, n))
        }));
    }
    tokio::time::sleep(crowd_for / 4).await;
    let mut mine = Vec::new();
    for i in 0..regulars {
        let (host, path, client) = (host.clone(), path.clone(), regular(i));
        let gap = crowd_for / 2 / 5;
        mine.push(tokio::spawn(async move {
            let mut c = common::h2c(&host).await?;
            let mut ok = 0u32;
            for n in 0..5 {
                let name = format!("r{i}-{n}.regular.example.test");
                ok += u32::from(
                    common::get_as(&mut c, &host, &common::dns_path(&path, &name, 1), &client)
                        .await?
                        == 200,
                );
                tokio::time::sleep(gap).await;
            }
            Ok::<_, common::Error>(ok)
        }));
    }
    let mut regular_ok = 0;
    for t in mine {
        regular_ok += t.await??;
    }
    let (mut crowd_ok, mut crowd_n) = (0, 0);
    for t in tasks {
        let (ok, n) = t.await??;
        crowd_ok += ok;
        crowd_n += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let up = common::metric_sum(&metrics, "doh_upstream_queries_total", "").await? - up_before;
    let share = |a: u32, b: u32| 100.0 * f64::from(a) / f64::from(b.max(1));
    println!(
        "known clients: {regular_ok}/{} new names answered ({:.0} %)",
        regulars * 5,
        share(regular_ok, regulars * 5)
    );
    println!(
        "the crowd ({crowd} addresses): {crowd_ok}/{crowd_n} answered ({:.1} %)",
        share(crowd_ok, crowd_n)
    );
    println!("upstream: {up} queries in {secs:.1} s ({:.1}/s)", up / secs);
    Ok(())
}
