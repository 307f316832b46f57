//! Hostile input never crashes or stalls the server: junk on the TLS port,
//! plain HTTP on the TLS port, huge header blocks, header blocks split over
//! CONTINUATION frames, huge bodies, huge URIs, and clients that connect
//! and say nothing.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn still_serving(p: &doh_proxy::app::Running) {
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        send(
            p,
            Proto::H2,
            get(&get_path(&query("www.example.test", 1, 1))),
        ),
    )
    .await
    .expect("answered promptly");
    assert_eq!(r.status, 200);
}

/// Writes `bytes` and reads whatever comes back until the server closes.
async fn poke(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn junk_and_plain_http_on_the_tls_port() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    poke(p.addrs(Kind::Https)[0], &junk).await;
    poke(
        p.addrs(Kind::Https)[0],
        b"GET /dns-query?dns=AAAA HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    poke(p.addrs(Kind::Https)[0], &[0x16, 0x03, 0x01, 0xff, 0xff]).await;
    still_serving(&p).await;
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"handshake_failed\"}"
        )
        .await
            >= 2.0
    );
}

#[tokio::test]
async fn huge_header_block_body_and_uri() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 10_000).await;
    let http = p.addrs(Kind::Http)[0];
    // 256 KB of headers: refused with 431 or the connection is closed.
    let mut req = b"GET /dns-query?dns=AAAA HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..256 {
        req.extend_from_slice(format!("X-H{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let out = poke(http, &req).await;
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out[..out.len().min(40)])
    );
    // 70 KB POST: 413.
    let mut post = b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dns-message\r\nContent-Length: 70000\r\n\r\n".to_vec();
    post.extend(std::iter::repeat_n(0u8, 70_000));
    let out = poke(http, &post).await;
    assert!(
        out.starts_with(b"HTTP/1.1 413"),
        "{:?}",
        String::from_utf8_lossy(&out[..out.len().min(40)])
    );
    // 70 KB POST without a length (chunked): 413 too.
    let mut chunked = b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dns-message\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..7 {
        chunked.extend_from_slice(b"2710\r\n");
        chunked.extend(std::iter::repeat_n(0u8, 10_000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let out = poke(http, &chunked).await;
    assert!(
        out.starts_with(b"HTTP/1.1 413"),
        "{:?}",
        String::from_utf8_lossy(&out[..out.len().min(40)])
    );
    // 20 KB URI: 414.
    let uri = format!(
        "GET /dns-query?dns={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "A".repeat(20_000)
    );
    let out = poke(http, uri.as_bytes()).await;
    assert!(
        out.starts_with(b"HTTP/1.1 414"),
        "{:?}",
        String::from_utf8_lossy(&out[..out.len().min(40)])
    );
    still_serving(&p).await;
}

#[tokio::test]
async fn silent_clients_delay_nobody_and_time_out() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.handshake_timeout = 1).await;
    // Twenty connections that never send a ClientHello, from other addresses.
    let mut silent = Vec::new();
    for i in 0..20 {
        silent.push(
            tcp_from(
                Some(format!("127.0.3.{}", i + 1).parse().unwrap()),
                p.addrs(Kind::Https)[0],
            )
            .await
            .unwrap(),
        );
    }
    let t = Instant::now();
    still_serving(&p).await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // After the handshake timeout they are closed.
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(3), silent[0].read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "closed by the server: {r:?}"
    );
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"handshake_timeout\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn idle_keepalive_connections_are_closed() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.idle_timeout = 1).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(&p, proto, None).await.unwrap();
        assert_eq!(
            c.send(get(&get_path(&query("www.example.test", 1, 1))))
                .await
                .unwrap()
                .status,
            200
        );
        wait_for(
            "the idle connection closed",
            async || p.app.guard.open_connections() == 0,
            Duration::from_secs(10),
        )
        .await;
        assert!(
            c.send(get(&get_path(&query("www.example.test", 1, 2))))
                .await
                .is_err(),
            "{proto:?} idle connection closed"
        );
    }
    assert_eq!(p.app.guard.open_connections(), 0);
}

#[tokio::test]
async fn graceful_stop_finishes_in_flight_requests() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
    let pending = tokio::spawn(async move {
        c.send(get(&get_path(&query("slow.example.test", 1, 1))))
            .await
    });
    wait_for(
        "the request in flight upstream",
        async || up.count("slow.example.test.") == 1,
        Duration::from_secs(5),
    )
    .await;
    let addr = p.addrs(Kind::Https)[0];
    p.stop().await;
    let r = pending.await.unwrap().expect("in-flight request completed");
    assert_eq!(r.status, 200);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

/// A header block split over CONTINUATION frames is put back together and
/// answered; one that never ends costs the client its connection.
#[tokio::test]
async fn header_blocks_split_over_continuation_frames() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let addr = p.addrs(Kind::Https)[0];
    let mut s = h2_started(addr, "127.0.63.1").await.unwrap();
    let block = get_block(&ok_path("www.example.test"));
    let (a, rest) = block.split_at(3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut w = frame(1, 0x01, 1, a); // END_STREAM, the block goes on
    w.extend(frame(9, 0, 1, b));
    w.extend(frame(9, 0x04, 1, c)); // END_HEADERS
    s.write_all(&w).await.unwrap();
    assert_eq!(first_status(&mut s, 1).await, Some(200));
    // Then the same connection: a block that keeps going.
    let _ = s.write_all(&frame(1, 0x01, 3, a)).await;
    for _ in 0..2000 {
        if s.write_all(&frame(9, 0, 3, &[0; 16])).await.is_err() {
            break;
        }
    }
    assert!(
        closed(&mut s, Duration::from_secs(10)).await,
        "an endless header block kept its connection"
    );
    still_serving(&p).await;
}
