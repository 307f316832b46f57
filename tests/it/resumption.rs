//! TLS resumption: stateless tickets, counted, shared by a fleet.

use std::net::IpAddr;

use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// One connection to `p`'s TLS listener with `connector` (whose session
/// store remembers tickets between calls), one request over HTTP/1.1 so
/// that the tickets sent after the handshake are read; how it went.
pub async fn handshake(
    p: &doh_proxy::app::Running,
    connector: &tokio_rustls::TlsConnector,
    src: &str,
) -> HandshakeKind {
    let src: IpAddr = src.parse().unwrap();
    let tcp = tcp_from(Some(src), p.addrs(Kind::Https)[0]).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nhost: localhost\r\naccept: application/dns-message\r\nconnection: close\r\n\r\n",
        ok_path("www.example.test")
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    kind
}

async fn handshakes(p: &doh_proxy::app::Running, resumed: bool) -> f64 {
    let resumed = if resumed { "true" } else { "false" };
    metric(
        p,
        &format!("doh_tls_handshakes_total{{result=\"ok\",resumed=\"{resumed}\"}}"),
    )
    .await
}

#[tokio::test]
async fn a_returning_client_resumes_with_a_ticket() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let client = tls_connector(b"http/1.1");
    assert_eq!(
        handshake(&p, &client, "127.0.110.1").await,
        HandshakeKind::Full
    );
    assert_eq!(
        handshake(&p, &client, "127.0.110.1").await,
        HandshakeKind::Resumed
    );
    // From another address too: the ticket is not tied to one.
    assert_eq!(
        handshake(&p, &client, "127.0.110.2").await,
        HandshakeKind::Resumed
    );
    // Another client (no ticket): full.
    assert_eq!(
        handshake(&p, &tls_connector(b"http/1.1"), "127.0.110.3").await,
        HandshakeKind::Full
    );
    assert_eq!(handshakes(&p, false).await, 2.0);
    assert_eq!(handshakes(&p, true).await, 2.0);
}

#[tokio::test]
async fn tickets_die_with_the_process_without_redis() {
    let up = MockUpstream::start().await;
    let client = tls_connector(b"http/1.1");
    let a = proxy(&[up.addr], |_| {}).await;
    assert_eq!(
        handshake(&a, &client, "127.0.110.4").await,
        HandshakeKind::Full
    );
    // Another instance (or this one restarted) has other keys: a full
    // handshake, not an error.
    let b = proxy(&[up.addr], |_| {}).await;
    assert_eq!(
        handshake(&b, &client, "127.0.110.4").await,
        HandshakeKind::Full
    );
}

#[tokio::test]
async fn without_tickets_the_session_cache_resumes() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.tls_ticket_lifetime = 0).await;
    let client = tls_connector(b"http/1.1");
    assert_eq!(
        handshake(&p, &client, "127.0.110.5").await,
        HandshakeKind::Full
    );
    assert_eq!(
        handshake(&p, &client, "127.0.110.5").await,
        HandshakeKind::Resumed
    );
}
