//! Cache-hit load on one transport of a running doh-proxy, to compare
//! them side by side: DNS over QUIC (`doq`), DNS over TLS (`dot`) or DoH
//! over HTTP/2 (`doh`). `--conns` connections, each with `--inflight`
//! queries outstanding at all times, for `--secs` seconds, all for one
//! name (answered from the cache after the first). Prints queries/s and,
//! given the server's pid (or finding the only `doh-proxy`), its CPU time
//! per query.
//!
//!     cargo run --release --example dns_load -- --proto doq --addr 127.0.0.1:8873
//!
//! `benches/transports.sh` runs it against the three listeners of one
//! proxy in interleaved rounds.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// What every connection of a run shares.
#[derive(Clone)]
struct Run {
    addr: SocketAddr,
    ca: Option<String>,
    inflight: usize,
    until: Instant,
    name: String,
    done: Arc<AtomicU64>,
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut f = (msg.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(msg);
    f
}

async fn doq(run: Run) -> Result<(), common::Error> {
    let Run {
        addr,
        ca,
        inflight,
        until,
        name,
        done,
    } = run;
    let tls = common::client_config(ca.as_deref(), b"doq")?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = ep.connect(addr, "localhost")?.await?;
    let q = framed(&common::query(&name, 1, 0));
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (conn, q, done) = (conn.clone(), q.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&q).await?;
                send.finish()?;
                recv.read_to_end(65_537).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, common::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    conn.close(0u32.into(), b"");
    Ok(())
}

async fn dot(run: Run) -> Result<(), common::Error> {
    let Run {
        addr,
        ca,
        inflight,
        until,
        name,
        done,
    } = run;
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(common::client_config(ca.as_deref(), b"dot")?));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let places = Arc::new(Semaphore::new(inflight));
    let q = framed(&common::query(&name, 1, 1));
    let writer = {
        let places = places.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                places.acquire().await?.forget();
                w.write_all(&q).await?;
            }
            Ok::<_, common::Error>(w)
        })
    };
    loop {
        let len = r.read_u16().await?;
        let mut buf = vec![0u8; usize::from(len)];
        r.read_exact(&mut buf).await?;
        done.fetch_add(1, Ordering::Relaxed);
        places.add_permits(1);
        if writer.is_finished() && places.available_permits() == inflight {
            break;
        }
    }
    let _w = writer.await??;
    Ok(())
}

async fn doh(run: Run) -> Result<(), common::Error> {
    let Run {
        addr,
        ca,
        inflight,
        until,
        name,
        done,
    } = run;
    let tls = common::tls(ca.as_deref())?;
    let send = common::connect(&tls, addr, None).await?;
    let path = common::dns_path("/dns-query", &name, 1);
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (mut send, path, done) = (send.clone(), path.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                common::get(&mut send, &path, &[]).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, common::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), common::Error> {
    let proto = common::arg("--proto", "doq");
    let addr: SocketAddr = common::arg("--addr", "127.0.0.1:8873").parse()?;
    let conns: usize = common::arg("--conns", "10").parse()?;
    let inflight: usize = common::arg("--inflight", "10").parse()?;
    let secs: u64 = common::arg("--secs", "10").parse()?;
    let name = common::arg("--name", "www.example.test");
    let ca = Some(common::arg("--ca", "")).filter(|c| !c.is_empty());
    let pid = match common::arg("--pid", "") {
        p if p.is_empty() => common::find_pid(),
        p => Some(p.parse()?),
    };
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let cpu0 = common::cpu_secs(pid);
    let t = Instant::now();
    let mut tasks = Vec::new();
    let run = Run {
        addr,
        ca,
        inflight,
        until,
        name,
        done: done.clone(),
    };
    for _ in 0..conns {
        let run = run.clone();
        tasks.push(match proto.as_str() {
            "doq" => tokio::spawn(doq(run)),
            "dot" => tokio::spawn(dot(run)),
            "doh" => tokio::spawn(doh(run)),
            other => return Err(format!("--proto {other}: doq, dot or doh").into()),
        });
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed) as f64;
    let cpu = match (cpu0, common::cpu_secs(pid)) {
        (Some(a), Some(b)) => format!("{:.1} µs server CPU per query", (b - a) / n * 1e6),
        _ => "server CPU unknown (--pid)".into(),
    };
    println!(
        "{proto}: {n} queries in {elapsed:.1} s, {:.0}/s, {cpu}",
        n / elapsed
    );
    Ok(())
}
