//! Replays incident 5 against a running doh-proxy: hundreds of connections
//! held open, doing nothing, from two hosts and their neighbours in one /16
//! (127.93.x.y), while another client keeps resolving. Prints the other
//! client's latency before and during the attack, how many connections the
//! caps refused, and that the rest are closed after the handshake timeout.
//!
//!     doh-proxy -u 127.0.0.1:5300 &        # TLS on 127.0.0.1:8443
//!     cargo run --release --example incident5 -- --addr 127.0.0.1:8443 \
//!         --metrics http://127.0.0.1:9153/metrics --conns 600 [--ca ca.pem | --insecure]

#[path = "common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

async fn probe(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<f64>, common::Error> {
    let mut conn = common::connect(tls, addr, None).await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let (status, _) = common::get(
            &mut conn,
            &common::dns_path("/dns-query", "www.example.test", 1),
            &[],
        )
        .await?;
        if status != 200 {
            return Err(format!("probe {i}: HTTP {status}").into());
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

#[tokio::main]
async fn main() -> Result<(), common::Error> {
    let addr: SocketAddr = common::arg("--addr", "127.0.0.1:8443").parse()?;
    let metrics = common::arg("--metrics", "http://127.0.0.1:9153/metrics");
    let conns: u32 = common::arg("--conns", "600").parse()?;
    let ca = common::arg("--ca", "");
    let tls = common::tls((!common::flag("--insecure") && !ca.is_empty()).then_some(ca.as_str()))?;

    let before = probe(&tls, addr, 50).await?;
    let refused_before = common::metric_sum(&metrics, "doh_connections_rejected_total", "").await?;

    // As in the incident: two hosts holding most connections, and the rest
    // from their neighbours in the same /16.
    let mut held = Vec::new();
    let mut failed = 0;
    for i in 0..conns {
        let src = if i % 2 == 0 {
            IpAddr::V4(Ipv4Addr::new(127, 93, 0, 1 + (i % 4 == 0) as u8))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                127,
                93,
                1 + (i / 500) as u8,
                (1 + (i / 2) % 250) as u8,
            ))
        };
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(src, 0))?;
        match tokio::time::timeout(Duration::from_secs(1), sock.connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => failed += 1,
        }
    }
    let during = probe(&tls, addr, 50).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused =
        common::metric_sum(&metrics, "doh_connections_rejected_total", "").await? - refused_before;
    let open = common::metric_sum(&metrics, "doh_connections_open", "").await?;

    // Held connections that never start TLS are closed after the handshake
    // timeout (5 s by default).
    let wait: u64 = common::arg("--wait", "6").parse()?;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let mut closed = 0;
    for s in &held {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => closed += 1,
        }
    }
    println!("incident 5 replay: {conns} idle connections from 127.93.0.0/16 ({failed} not even accepted)");
    println!(
        "  other client before: p50 {:.2} ms, p99 {:.2} ms",
        common::percentile(&before, 0.5),
        common::percentile(&before, 0.99)
    );
    println!(
        "  other client during: p50 {:.2} ms, p99 {:.2} ms",
        common::percentile(&during, 0.5),
        common::percentile(&during, 0.99)
    );
    println!("  refused at accept: {refused}, open at the proxy while held: {open}");
    println!(
        "  closed by the proxy {wait} s later: {closed} of {}",
        held.len()
    );
    let good = common::percentile(&during, 0.99)
        < 10.0 * common::percentile(&before, 0.99).max(1.0)
        && refused > 0.0
        && closed == held.len();
    println!(
        "verdict: {}",
        if good {
            "HELD (caps refused the flood, others unaffected)"
        } else {
            "DEGRADED"
        }
    );
    drop(held);
    std::process::exit(if good { 0 } else { 1 });
}
