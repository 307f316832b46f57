//! Tests that hold the patched HTTP/2 stack (`patches/README.md`) to what
//! each change promised: the published crate's behaviour, for less work.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// hyper (patched to look for connection-specific headers in one pass,
/// `patches/README.md`) still strips them from a response before the
/// HTTP/2 layer sees it, `Connection`'s named headers with them, and
/// leaves the rest.
#[tokio::test]
async fn hyper_still_strips_connection_headers_from_http2_responses() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let service = hyper::service::service_fn(|_req| async {
        let resp = http::Response::builder()
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("content-type", "application/dns-message")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
            .unwrap();
        Ok::<_, std::convert::Infallible>(resp)
    });
    let serve = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(server_io), service);
    tokio::spawn(serve);
    let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://x.test/").body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.expect("a response, not a reset");
    assert_eq!(resp.status(), 200);
    let names: Vec<_> = resp
        .headers()
        .keys()
        .map(|n| n.as_str().to_string())
        .collect();
    assert!(resp.headers().contains_key("content-type"), "{names:?}");
    for gone in ["connection", "x-hop", "keep-alive", "te"] {
        assert!(!resp.headers().contains_key(gone), "{gone} in {names:?}");
    }
}

/// The HTTP/2 layer (patched to check a response's header names in one
/// pass, `patches/README.md`) still refuses every connection-specific
/// header RFC 9113 forbids, and `te` other than `trailers`, and lets
/// everything else through.
#[tokio::test]
async fn http2_still_refuses_connection_specific_headers() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let client = tokio::spawn(async move {
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut statuses = Vec::new();
        for _ in 0..9 {
            let req = http::Request::get("https://x.test/").body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            statuses.push(resp.await.map(|r| r.status().as_u16()).ok());
        }
        statuses
    });
    let mut server = h2::server::handshake(server_io).await.unwrap();
    let cases: [(&str, &str, bool); 9] = [
        ("connection", "close", false),
        ("transfer-encoding", "chunked", false),
        ("upgrade", "h2c", false),
        ("keep-alive", "timeout=5", false),
        ("proxy-connection", "keep-alive", false),
        ("te", "gzip", false),
        ("te", "trailers", true),
        ("content-type", "application/dns-message", true),
        ("x-keep-alive", "1", true),
    ];
    let server_side = async {
        for (name, value, allowed) in cases {
            let (_req, mut respond) = server.accept().await.unwrap().unwrap();
            let resp = http::Response::builder()
                .header(name, value)
                .body(())
                .unwrap();
            let sent = respond.send_response(resp, true);
            assert_eq!(sent.is_ok(), allowed, "{name}: {value}");
            if !allowed {
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
            }
        }
        // Drive the connection until the client has everything.
        while server.accept().await.is_some() {}
    };
    let (_, statuses) = tokio::join!(server_side, client);
    let statuses = statuses.unwrap();
    assert_eq!(statuses.iter().filter(|s| s.is_some()).count(), 3);
}

/// An HTTP/2 connection's byte stream that counts the reads asked of
/// it.
struct CountedReads<T> {
    io: T,
    reads: Arc<AtomicUsize>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedReads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedReads<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A burst of requests read in one go is handed out without reading
/// the socket again before each (h2 patched, `patches/README.md`), and
/// the connection still advances once they are taken: a PING sent
/// behind them is acknowledged while the server waits for more.
#[tokio::test]
async fn a_burst_of_requests_is_accepted_without_reading_again_for_each() {
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    let mut burst = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    burst.extend(frame(4, 0, 0, &[]));
    for i in 0..10u32 {
        // GET https … / from the static table; END_STREAM, END_HEADERS.
        burst.extend(frame(1, 0x5, 2 * i + 1, &[0x82, 0x87, 0x84]));
    }
    burst.extend(frame(6, 0, 0, b"12345678"));
    let (mut client, server_io) = tokio::io::duplex(1 << 16);
    client.write_all(&burst).await.unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let io = CountedReads {
        io: server_io,
        reads: reads.clone(),
    };
    let mut server = h2::server::handshake(io).await.unwrap();
    let before = reads.load(Ordering::Relaxed);
    for _ in 0..10 {
        let (req, _respond) = server.accept().await.unwrap().unwrap();
        assert_eq!(req.uri().path(), "/");
    }
    let during = reads.load(Ordering::Relaxed) - before;
    assert!(
        during <= 3,
        "{during} reads to accept 10 requests read at once"
    );
    let serve = tokio::spawn(async move { while server.accept().await.is_some() {} });
    // Frames from the server until the PING's acknowledgement.
    let pong = async {
        loop {
            let mut head = [0u8; 9];
            client.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            client.read_exact(&mut payload).await.unwrap();
            if head[3] == 6 && head[4] & 1 == 1 {
                return payload;
            }
        }
    };
    let payload = tokio::time::timeout(std::time::Duration::from_secs(30), pong)
        .await
        .expect("the PING acknowledged");
    assert_eq!(payload, b"12345678");
    serve.abort();
}
