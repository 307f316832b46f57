//! DNS over QUIC (RFC 9250) with a quinn client: answers on streams of
//! one connection with ID 0, the budget's REFUSED, bans at the first
//! packet, protocol errors, another ALPN, streams never finished, Retry
//! above the threshold, and the socket passed by systemd.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};

use crate::common::*;

/// A QUIC client on `source` trusting the test CA, offering `alpn`.
fn client(source: &str, alpn: &[u8]) -> quinn::Endpoint {
    let mut tls = quic_tls();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let source: IpAddr = source.parse().unwrap();
    let mut ep = quinn::Endpoint::client(SocketAddr::new(source, 0)).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

async fn connect_to(
    addr: SocketAddr,
    source: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let ep = client(source, b"doq");
    let connecting = ep.connect(addr, "localhost").map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(3), connecting).await {
        Ok(Ok(c)) => Ok((ep, c)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

async fn connect(
    p: &doh_proxy::app::Running,
    source: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    connect_to(p.addrs(Kind::Doq)[0], source)
        .await
        .expect("DoQ handshake")
}

/// Sends `bytes` on a new stream, finishes it, reads the whole reply.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(70_000))
        .await
        .map_err(|_| "no reply".to_string())?
        .map_err(|e| e.to_string())
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut f = (msg.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(msg);
    f
}

/// One query (ID 0) on its own stream; the answer.
async fn ask(conn: &quinn::Connection, name: &str) -> Result<Message, String> {
    let reply = exchange(conn, &framed(&query(name, 1, 0))).await?;
    let len = usize::from(u16::from_be_bytes([reply[0], reply[1]]));
    assert_eq!(len, reply.len() - 2, "one framed answer");
    Message::from_vec(&reply[2..]).map_err(|e| e.to_string())
}

/// The application error code the server closed `conn` with.
async fn closed_with(conn: &quinn::Connection) -> Option<u64> {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_streams_of_one_connection_with_id_0() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let (_ep, conn) = connect(&p, "127.0.0.1").await;
    let names = [
        "www.example.test",
        "nx1.example.test",
        "multi.example.test",
        "a.example.test",
    ];
    let answers = futures_util::future::join_all(names.iter().map(|n| ask(&conn, n))).await;
    for (name, a) in names.iter().zip(answers) {
        let m = a.unwrap();
        assert_eq!(m.metadata.id, 0, "ID 0 in the answer");
        assert_eq!(m.queries[0].name().to_ascii(), format!("{name}."));
        let want = if name.starts_with("nx") {
            ResponseCode::NXDomain
        } else {
            ResponseCode::NoError
        };
        assert_eq!(m.metadata.response_code, want, "{name}");
    }
    // Again on the same connection: from the cache.
    assert_eq!(ask(&conn, "www.example.test").await.unwrap().metadata.id, 0);
    // A padded query gets a padded answer (RFC 9250 §5.4, RFC 8467).
    let reply = exchange(
        &conn,
        &framed(&query_with_opt("pad.example.test", 0, 4096, true)),
    )
    .await
    .unwrap();
    assert_eq!((reply.len() - 2) % 468, 0, "{} bytes", reply.len() - 2);
    assert_eq!(up.count("www.example.test."), 1);
    assert_eq!(
        metric(
            &p,
            "doh_requests_total{outcome=\"answered\",transport=\"doq\"}"
        )
        .await,
        6.0
    );
    assert!(
        metric(
            &p,
            "doh_tls_handshakes_total{result=\"ok\",resumed=\"false\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_refused_and_malformed_formerr() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_ip_qps = 1;
        c.per_ip_burst = 2;
    })
    .await;
    let (_ep, conn) = connect(&p, "127.0.70.1").await;
    let mut codes = Vec::new();
    for i in 0..4 {
        codes.push(
            ask(&conn, &format!("b{i}.example.test"))
                .await
                .unwrap()
                .metadata
                .response_code,
        );
    }
    assert_eq!(&codes[..2], &[ResponseCode::NoError, ResponseCode::NoError]);
    assert!(
        codes[2..].iter().all(|c| *c == ResponseCode::Refused),
        "{codes:?}"
    );
    // A framed message with ID 0 that is not a query: FORMERR, and the
    // connection goes on.
    let (_ep2, conn2) = connect(&p, "127.0.70.2").await;
    let mut bad = query("www.example.test", 1, 0);
    bad[2] |= 0x80; // QR: a response, not a query
    let reply = exchange(&conn2, &framed(&bad)).await.unwrap();
    let m = Message::from_vec(&reply[2..]).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(
        ask(&conn2, "www.example.test")
            .await
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::NoError
    );
}

/// A wrong length, a non-zero ID: the connection is closed with
/// DOQ_PROTOCOL_ERROR, the client scored; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_close_the_connection_only() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 3).await;
    let (_ep0, good) = connect(&p, "127.0.71.9").await;
    let q = query("www.example.test", 1, 0);
    let mut short = framed(&q);
    short.truncate(short.len() - 3);
    let nonzero = framed(&query("www.example.test", 1, 7));
    for (i, bytes) in [short, nonzero, b"garbage".to_vec()]
        .into_iter()
        .enumerate()
    {
        let (_ep, conn) = connect(&p, "127.0.71.1").await;
        let _ = exchange(&conn, &bytes).await;
        assert_eq!(
            closed_with(&conn).await,
            Some(0x2),
            "case {i}: DOQ_PROTOCOL_ERROR"
        );
        assert_eq!(
            ask(&good, "www.example.test")
                .await
                .unwrap()
                .metadata
                .response_code,
            ResponseCode::NoError
        );
    }
    assert_eq!(
        metric(&p, "doh_protocol_errors_total{kind=\"doq_protocol\"}").await,
        3.0
    );
    // Three protocol errors: banned, refused at the first packet (no
    // answer at all).
    wait_for(
        "banned",
        async || !p.app.guard.bans().is_empty(),
        Duration::from_secs(5),
    )
    .await;
    assert!(connect_to(p.addrs(Kind::Doq)[0], "127.0.71.1")
        .await
        .is_err());
    assert!(metric(&p, "doh_quic_refused_total{action=\"ignored\"}").await >= 1.0);
    let (_ep3, other) = connect(&p, "127.0.71.2").await;
    assert!(ask(&other, "www.example.test").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_alpn_is_refused() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let ep = client("127.0.72.1", b"h3");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect(p.addrs(Kind::Doq)[0], "localhost").unwrap(),
    )
    .await;
    assert!(matches!(r, Ok(Err(_))), "the handshake fails");
    // And DoQ on the HTTP/3 port likewise.
    let ep = client("127.0.72.1", b"doq");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect(p.addrs(Kind::H3)[0], "localhost").unwrap(),
    )
    .await;
    assert!(matches!(r, Ok(Err(_))), "the handshake fails");
}

/// Streams opened and never finished: the connection is closed at the
/// first-request deadline (nothing complete came), then one that sent a
/// query at the idle deadline; an unfinished stream is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_streams_do_not_hold_the_connection() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.handshake_timeout = 2;
        c.idle_timeout = 3;
    })
    .await;
    let (_ep, conn) = connect(&p, "127.0.73.1").await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 40, 0, 0]).await.unwrap();
        held.push((send, recv));
    }
    let t = Instant::now();
    assert_eq!(closed_with(&conn).await, Some(0), "closed, DOQ_NO_ERROR");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let (_ep, conn) = connect(&p, "127.0.73.2").await;
    assert!(ask(&conn, "www.example.test").await.is_ok());
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 40]).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(100)).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "the unfinished stream is reset: {r:?}"
    );
    assert_eq!(closed_with(&conn).await, Some(0), "idle: closed");
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"first_request_timeout\"}"
        )
        .await
            >= 1.0
    );
}

/// More unvalidated handshakes a second than `--h3-retry-threshold`: the
/// rest must answer a Retry first; every client still gets served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_handshakes_gets_retry() {
    let up = MockUpstream::start().await;
    let p = Arc::new(proxy(&[up.addr], |c| c.h3_retry_threshold = 5).await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let (_ep, conn) = connect(&p, &format!("127.0.74.{}", i + 1)).await;
            ask(&conn, "www.example.test").await.is_ok()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    let retries = metric(&p, "doh_quic_refused_total{action=\"retry\"}").await;
    assert!(retries >= 10.0, "{retries} retries");
}

/// The service manager passes a UDP socket named `doq`
/// (`FileDescriptorName=doq`): DNS over QUIC is served on it, with no
/// listener configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_passes_a_doq_socket() {
    need("systemd-socket-activate", "systemd");
    let up = MockUpstream::start().await;
    let dir = scratch("doq-systemd");
    let p = pki();
    let file = dir.join("doh-proxy.toml");
    std::fs::write(
        &file,
        format!(
            "upstream = [\"{}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\nlisten = []\n",
            up.addr,
            p.cert.display(),
            p.key.display()
        ),
    )
    .unwrap();
    let port = free_port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = std::process::Command::new("systemd-socket-activate")
        .args(["-d", "-l", &format!("127.0.0.1:{port}"), "--fdname=doq"])
        .arg(env!("CARGO_BIN_EXE_doh-proxy"))
        .args(["-c", file.to_str().unwrap()])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .current_dir(&dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Kill)
        .expect("systemd-socket-activate (Debian package systemd)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // The first datagram starts the proxy on the passed socket; the
    // client's handshake waits for it (retransmitting).
    let mut conn = None;
    wait_for(
        "a DoQ handshake on the passed socket",
        async || {
            conn = connect_to(addr, "127.0.75.1").await.ok();
            conn.is_some()
        },
        Duration::from_secs(20),
    )
    .await;
    let (_ep, conn) = conn.unwrap();
    let m = ask(&conn, "www.example.test").await.unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
}
