//! The HTTP/3 and DNS-over-TLS listeners under the same guard as HTTPS:
//! budgets, bans, Alt-Svc, pipelining, malformed messages, idle floods,
//! and a spoofed-source QUIC Initial flood that must not be amplified.

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdp};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// A DoT connection with the test CA from `source`.
async fn dot_connect(
    p: &doh_proxy::app::Running,
    source: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tcp_from(Some(source.parse().unwrap()), p.addrs(Kind::Dot)[0]).await?;
    tls_connector(b"dot")
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

async fn dot_send<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> std::io::Result<()> {
    let mut f = (msg.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(msg);
    s.write_all(&f).await
}

async fn dot_recv<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Message> {
    let len = s.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Message::from_vec(&buf).map_err(std::io::Error::other)
}

#[tokio::test]
async fn h3_answers_and_its_budget_and_alt_svc() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_ip_qps = 1;
        c.per_ip_burst = 3;
    })
    .await;
    let mut c = Client::connect(&p, Proto::H3, Some("127.0.80.1".parse().unwrap()))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = c
            .send(get(&get_path(&query("www.example.test", 1, i))))
            .await
            .unwrap();
        if r.status == 200 {
            assert_eq!(r.dns().metadata.id, i);
        } else {
            assert!(r.header("retry-after").is_some());
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429, 429, 429]);
    assert_eq!(
        metric(
            &p,
            "doh_requests_total{outcome=\"answered\",transport=\"h3\"}"
        )
        .await,
        3.0
    );
    assert_eq!(
        metric(
            &p,
            "doh_requests_total{outcome=\"rate_limited\",transport=\"h3\"}"
        )
        .await,
        3.0
    );
    // HTTPS answers tell clients where HTTP/3 is.
    let r = send_from(
        &p,
        Proto::H2,
        "127.0.80.2",
        get(&ok_path("www.example.test")),
    )
    .await
    .unwrap();
    let alt = format!("h3=\":{}\"; ma=86400", p.addrs(Kind::H3)[0].port());
    assert_eq!(r.header("alt-svc"), Some(alt.as_str()));
    let r = send_from(&p, Proto::H1, "127.0.80.2", get("/nowhere"))
        .await
        .unwrap();
    assert_eq!(r.header("alt-svc"), Some(alt.as_str()), "refusals too");
}

#[tokio::test]
async fn a_banned_address_gets_no_quic_handshake() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 3).await;
    let src = "127.0.81.1";
    let mut c = Client::connect(&p, Proto::H3, Some(src.parse().unwrap()))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(c.send(get("/dns-query?ct=x")).await.unwrap().status, 400);
    }
    // Banned: the open connection is told 403 and closed; a new one gets
    // no handshake at all.
    if let Ok(r) = c.send(get(&ok_path("www.example.test"))).await {
        assert_eq!(r.status, 403);
    }
    let t = Instant::now();
    assert!(
        H3Client::connect(p.addrs(Kind::H3)[0], src.parse().unwrap())
            .await
            .is_err()
    );
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "no answer at all, the client times out"
    );
    assert!(metric(&p, "doh_quic_refused_total{action=\"ignored\"}").await >= 1.0);
    // Its neighbour is served.
    let r = send_from(
        &p,
        Proto::H3,
        "127.0.81.2",
        get(&ok_path("www.example.test")),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

/// QUIC Initials crafted with quinn-proto, sent from many spoofed loopback
/// sources that never answer: each source gets a Retry or nothing, and
/// never more than three times the bytes it sent; a real client is served
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_initial_floods_are_not_amplified() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.h3_retry_threshold = 20).await;
    let server = p.addrs(Kind::H3)[0];
    let sources: Vec<IpAddr> = (0..300u32)
        .map(|i| IpAddr::from([127, 90 + (i / 250) as u8, (i % 250) as u8, 7]))
        .collect();
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = flooding.clone();
    let flood = tokio::task::spawn_blocking(move || {
        let crypto =
            Arc::new(quinn_proto::crypto::rustls::QuicClientConfig::try_from(quic_tls()).unwrap());
        let mut endpoint = quinn_proto::Endpoint::new(Default::default(), None, false, None);
        let mut sockets = Vec::new();
        let mut sent = Vec::new();
        for src in &sources {
            let sock = StdUdp::bind(SocketAddr::new(*src, 0)).unwrap();
            sock.set_nonblocking(true).unwrap();
            let (_, mut conn) = endpoint
                .connect(
                    std::time::Instant::now(),
                    quinn_proto::ClientConfig::new(crypto.clone()),
                    server,
                    "localhost",
                )
                .unwrap();
            let mut buf = Vec::new();
            let mut bytes = 0;
            while let Some(t) = conn.poll_transmit(std::time::Instant::now(), 1, &mut buf) {
                sock.send_to(&buf[..t.size], server).unwrap();
                bytes += t.size;
                buf.clear();
            }
            sent.push(bytes);
            sockets.push(sock);
        }
        flag.store(true, Ordering::SeqCst);
        // Collect whatever comes back for 3 s (handshake retransmissions
        // included).
        let mut got = vec![0usize; sockets.len()];
        let mut retries = 0;
        let until = std::time::Instant::now() + Duration::from_secs(3);
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < until {
            for (i, s) in sockets.iter().enumerate() {
                while let Ok(n) = s.recv(&mut buf) {
                    got[i] += n;
                    // A long-header packet of type Retry (0b11).
                    if buf[0] & 0xF0 == 0xF0 {
                        retries += 1;
                    }
                }
            }
            std::thread::sleep(POLL);
        }
        (sent, got, retries)
    });
    // A real client, once every Initial is out.
    wait_for(
        "the flood sent",
        async || flooding.load(Ordering::SeqCst),
        Duration::from_secs(10),
    )
    .await;
    let t = Instant::now();
    let r = send_from(
        &p,
        Proto::H3,
        "127.0.82.1",
        get(&ok_path("www.example.test")),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let (sent, got, retries) = flood.await.unwrap();
    for (i, (s, g)) in sent.iter().zip(&got).enumerate() {
        assert!(*s >= 1200, "source {i} sent a padded Initial ({s} bytes)");
        assert!(g <= &(3 * s), "source {i}: {g} bytes back for {s} sent");
    }
    assert!(
        retries >= 200,
        "{retries} Retries: most sources had to prove their address"
    );
    assert!(metric(&p, "doh_quic_refused_total{action=\"retry\"}").await >= 200.0);
    assert_eq!(
        metric(&p, "doh_bans_active").await,
        0.0,
        "spoofed sources are never scored"
    );
}

#[tokio::test]
async fn dot_pipelines_and_answers_out_of_order() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let mut s = dot_connect(&p, "127.0.83.1").await.unwrap();
    // The slow name first: later ones overtake it.
    dot_send(&mut s, &query("slow.example.test", 1, 100))
        .await
        .unwrap();
    for i in 1..8u16 {
        dot_send(&mut s, &query(&format!("p{i}.example.test"), 1, 100 + i))
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..8 {
        let m = dot_recv(&mut s).await.unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let name = m.queries[0].name().to_string();
        let want = if m.metadata.id == 100 {
            "slow.example.test.".to_string()
        } else {
            format!("p{}.example.test.", m.metadata.id - 100)
        };
        assert_eq!(name, want);
        ids.push(m.metadata.id);
    }
    assert_eq!(ids.len(), 8);
    assert_eq!(*ids.last().unwrap(), 100, "the slow one came last: {ids:?}");
    assert_eq!(
        metric(
            &p,
            "doh_requests_total{outcome=\"answered\",transport=\"dot\"}"
        )
        .await,
        8.0
    );
}

#[tokio::test]
async fn dot_flood_is_refused_and_garbage_closes() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_ip_qps = 1;
        c.per_ip_burst = 5;
        c.ban_after = 1000;
    })
    .await;
    let mut s = dot_connect(&p, "127.0.84.1").await.unwrap();
    for i in 0..20u16 {
        dot_send(&mut s, &query("www.example.test", 1, i))
            .await
            .unwrap();
    }
    let mut refused = 0;
    for _ in 0..20 {
        let m = dot_recv(&mut s).await.unwrap();
        if m.metadata.response_code == ResponseCode::Refused {
            refused += 1;
        }
    }
    assert_eq!(refused, 15);
    // The neighbour is served.
    let mut n = dot_connect(&p, "127.0.84.2").await.unwrap();
    dot_send(&mut n, &query("www.example.test", 1, 9))
        .await
        .unwrap();
    assert_eq!(
        dot_recv(&mut n).await.unwrap().metadata.response_code,
        ResponseCode::NoError
    );
    // A length-prefixed message that is not a query: FORMERR, then closed.
    let mut g = dot_connect(&p, "127.0.84.3").await.unwrap();
    dot_send(&mut g, b"\x12\x34 this is not DNS at all")
        .await
        .unwrap();
    let m = dot_recv(&mut g).await.unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), g.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed: {closed:?}"
    );
    assert_eq!(
        metric(&p, "doh_protocol_errors_total{kind=\"dot_malformed\"}").await,
        1.0
    );
    // Still up.
    dot_send(&mut n, &query("www.example.test", 1, 10))
        .await
        .unwrap();
    assert_eq!(dot_recv(&mut n).await.unwrap().metadata.id, 10);
}

/// A thousand DoT connections from one /16, idle after their handshake,
/// do not delay another client; they are closed at the first-request
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_dot_connections_delay_nobody() {
    // Tens of MiB of connections: not beside a test measuring memory.
    let _heavy = heavy().await;
    let up = MockUpstream::start().await;
    let p = Arc::new(proxy(&[up.addr], |c| c.handshake_timeout = 4).await);
    let mut held = Vec::new();
    for i in 0..1000u32 {
        let src = format!("127.77.{}.{}", i / 25, 1 + i % 25);
        if let Ok(s) = dot_connect(&p, &src).await {
            held.push(s);
        }
    }
    assert!(held.len() >= 990, "{} connected", held.len());
    let mut lat = Vec::new();
    for i in 0..10u16 {
        let t = Instant::now();
        let mut n = dot_connect(&p, "127.78.0.1").await.unwrap();
        dot_send(&mut n, &query("www.example.test", 1, i))
            .await
            .unwrap();
        assert_eq!(dot_recv(&mut n).await.unwrap().metadata.id, i);
        lat.push(t.elapsed());
    }
    lat.sort();
    assert!(lat[9] < Duration::from_millis(500), "{lat:?}");
    wait_for(
        "the held connections closed at the deadline",
        async || p.app.guard.open_connections() < 10,
        Duration::from_secs(15),
    )
    .await;
    let mut closed = 0;
    for s in held.iter_mut() {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) | Ok(Err(_)) =
            tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 990, "{closed} closed at the deadline");
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"first_request_timeout\"}"
        )
        .await
            >= 990.0
    );
    let _ = up.total.load(Ordering::SeqCst);
}
