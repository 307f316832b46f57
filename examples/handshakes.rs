//! Many clients, one request each, twice: the first pass makes full TLS
//! handshakes, the second tries to resume with what each client kept
//! (its own session store, as a browser or a stub resolver would). Prints
//! for each pass the handshakes per second, how many resumed and, with
//! `--server-pid`, the server's CPU time per handshake, from /proc.
//!
//! ```text
//! cargo run --release --example handshakes -- --addr 127.0.0.1:8443 \
//!     --ca /tmp/doh-peers/tls/ca.pem --clients 20000 --server-pid PID
//! ```
//!
//! Loopback only: `--addr` must be a 127.0.0.0/8 or ::1 address.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    ca: String,
    clients: usize,
    concurrency: usize,
    server_pid: Option<u32>,
    name: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        addr: "127.0.0.1:8443".parse().map_err(|e| format!("{e}"))?,
        ca: String::new(),
        clients: 2000,
        concurrency: 50,
        server_pid: None,
        name: "localhost".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => a.addr = v.parse().map_err(|e| format!("--addr: {e}"))?,
            "--ca" => a.ca = v,
            "--clients" => a.clients = v.parse().map_err(|e| format!("--clients: {e}"))?,
            "--concurrency" => {
                a.concurrency = v.parse().map_err(|e| format!("--concurrency: {e}"))?
            }
            "--server-pid" => {
                a.server_pid = Some(v.parse().map_err(|e| format!("--server-pid: {e}"))?)
            }
            "--name" => a.name = v,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if !a.addr.ip().is_loopback() {
        return Err("--addr must be a loopback address".into());
    }
    if a.ca.is_empty() {
        return Err("--ca PEM is required".into());
    }
    Ok(a)
}

/// The server's user + system CPU time, in seconds.
fn cpu(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

async fn one(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> Result<bool, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // One request, so that the tickets sent after the handshake are read.
    // A query for www.example.test, type A.
    tls.write_all(
        b"GET /dns-query?dns=AAABAAABAAAAAAAAA3d3dwdleGFtcGxlBHRlc3QAAAEAAQ HTTP/1.1\r\n\
          host: localhost\r\naccept: application/dns-message\r\nconnection: close\r\n\r\n",
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "answer: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        ));
    }
    Ok(resumed)
}

#[tokio::main]
async fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("handshakes: {e}");
            std::process::exit(2);
        }
    };
    let pem = std::fs::read(&a.ca).unwrap_or_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
        let _ = roots.add(c);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(versions) =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
    else {
        eprintln!("handshakes: no TLS versions");
        std::process::exit(2);
    };
    let mut base = versions.with_root_certificates(roots).with_no_client_auth();
    base.alpn_protocols = vec![b"http/1.1".to_vec()];
    // One session store per client.
    let clients: Vec<Arc<rustls::ClientConfig>> = (0..a.clients)
        .map(|_| {
            let mut c = base.clone();
            c.resumption = rustls::client::Resumption::in_memory_sessions(4);
            Arc::new(c)
        })
        .collect();
    let Ok(name) = ServerName::try_from(a.name.clone()) else {
        eprintln!("handshakes: bad --name");
        std::process::exit(2);
    };
    println!("| pass | clients | handshakes/s | resumed | failed | server CPU ms / handshake |");
    println!("|---|---:|---:|---:|---:|---:|");
    for pass in ["first", "return"] {
        let next = Arc::new(AtomicUsize::new(0));
        let resumed = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let c0 = cpu(a.server_pid);
        let t = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..a.concurrency.max(1) {
            let (next, resumed, failed) = (next.clone(), resumed.clone(), failed.clone());
            let (clients, name) = (clients.clone(), name.clone());
            let addr = a.addr;
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(cfg) = clients.get(i) else { return };
                    match one(cfg.clone(), addr, name.clone()).await {
                        Ok(true) => {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("handshakes: {e}");
                            }
                        }
                    }
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
        let secs = t.elapsed().as_secs_f64();
        let per = match (c0, cpu(a.server_pid)) {
            (Some(x), Some(y)) => format!("{:.3}", (y - x) * 1000.0 / a.clients.max(1) as f64),
            _ => "-".into(),
        };
        println!(
            "| {pass} | {} | {:.0} | {} | {} | {per} |",
            a.clients,
            a.clients as f64 / secs,
            resumed.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
    }
}
