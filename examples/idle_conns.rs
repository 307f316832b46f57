//! Holds many idle DoH connections open against a server, for the
//! benchmark "cache hits with 10,000 idle connections open": each
//! connection comes from its own loopback address (127.20.0.1 onwards, 250
//! per /24 and 1,250 per /16, under every per-address, per-prefix and
//! per-network cap), sends one query, then one more every `--every`
//! seconds (under the idle timeout), and otherwise says nothing. Prints
//! `ready N` once N connections are open, then holds them until killed.
//!
//!     cargo run --release --example idle_conns -- --addr 127.0.0.1:8443 \
//!         --conns 10000 --every 20 [--ca ca.pem | --insecure]

#[path = "common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The source address of connection `i`.
fn source(i: u32) -> IpAddr {
    let net = 20 + i / 1250;
    let within = i % 1250;
    IpAddr::V4(Ipv4Addr::new(
        127,
        net as u8,
        (within / 250) as u8,
        (within % 250 + 1) as u8,
    ))
}

#[tokio::main]
async fn main() -> Result<(), common::Error> {
    let addr: SocketAddr = common::arg("--addr", "127.0.0.1:8443").parse()?;
    let conns: u32 = common::arg("--conns", "10000").parse()?;
    let every: u64 = common::arg("--every", "20").parse()?;
    let first: u32 = common::arg("--first", "1").parse()?;
    let ca = common::arg("--ca", "");
    let tls = common::tls((!common::flag("--insecure") && !ca.is_empty()).then_some(ca.as_str()))?;
    let path = common::dns_path("/dns-query", "www.example.test", 1);

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(1024);
    for i in 0..conns {
        let (tls, path, ready) = (tls.clone(), path.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let Ok(mut conn) = common::connect(&tls, addr, Some(source(i))).await else {
                let _ = ready.send(false).await;
                return;
            };
            let mut ok = true;
            for _ in 0..first.max(1) {
                ok &= matches!(common::get(&mut conn, &path, &[]).await, Ok((200, _)));
            }
            let _ = ready.send(ok).await;
            if !ok {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_secs(every)).await;
                if common::get(&mut conn, &path, &[]).await.is_err() {
                    return;
                }
            }
        });
        // Pace the handshakes a little: a burst of 10,000 would only
        // measure the accept queue.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(ready_tx);
    let (mut ok, mut failed) = (0u32, 0u32);
    while ok + failed < conns {
        match ready_rx.recv().await {
            Some(true) => ok += 1,
            Some(false) => failed += 1,
            None => break,
        }
    }
    println!("ready {ok} (failed {failed})");
    std::future::pending::<()>().await;
    Ok(())
}
