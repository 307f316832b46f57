//! The proxy's own policy under attack, each attack run against the proxy
//! while a legitimate client on another address is measured: the
//! legitimate client keeps being served, and the defence fires (a metric
//! moves, the attacker is refused or banned).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::common::*;

/// A legitimate request from `source` on a fresh connection: its status
/// and how long it took.
async fn legit(p: &doh_proxy::app::Running, source: &str, name: &str) -> (u16, Duration) {
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        send_from(p, Proto::H2, source, get(&ok_path(name))),
    )
    .await;
    let status = match r {
        Ok(Ok(r)) => r.status,
        _ => 0,
    };
    (status, t.elapsed())
}

/// Unique names whose answers are 12 KB (cached) and 60 KB (served, never
/// cached) against a 32 MiB cache: the cache holds its bound in bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_cannot_grow_the_cache_past_its_bytes() {
    let _heavy = heavy().await;
    let up = MockUpstream::start().await;
    let p = Arc::new(
        proxy(&[up.addr], |c| {
            c.cache_memory = "32MiB".parse().unwrap();
            c.min_ttl = 1800;
            c.per_ip_qps = 1_000_000;
            c.per_ip_burst = 1_000_000;
            c.per_prefix_qps = 1_000_000;
            c.upstream_qps = 100_000;
        })
        .await,
    );
    let rss_before = rss_bytes();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&p, Proto::H2, Some("127.0.50.1".parse().unwrap()))
                .await
                .unwrap();
            let mut sizes = (0usize, 0usize);
            for i in 0..375 {
                let r = c
                    .send(get(&ok_path(&format!("mid{w}-{i}.example.test"))))
                    .await
                    .unwrap();
                assert_eq!(r.status, 200);
                sizes.0 = sizes.0.max(r.body.len());
                let r = c
                    .send(get(&ok_path(&format!("big{w}-{i}.example.test"))))
                    .await
                    .unwrap();
                assert_eq!(r.status, 200);
                sizes.1 = sizes.1.max(r.body.len());
            }
            sizes
        }));
    }
    for t in tasks {
        let (mid, big) = t.await.unwrap();
        assert!(mid > 11_000 && big > 59_000, "{mid} {big}");
    }
    // A scrape frees what the cache evicted, once no thread can still be
    // reading it (a worker thread pinned a moment may hold that back).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut bytes = metric(&p, "doh_cache_bytes").await;
    while bytes > (32 << 20) as f64 && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
        bytes = metric(&p, "doh_cache_bytes").await;
    }
    let entries = metric(&p, "doh_cache_entries").await;
    assert!(bytes <= (32 << 20) as f64, "{bytes} bytes cached");
    assert!(bytes >= (24 << 20) as f64, "the cache is used: {bytes}");
    assert!(
        entries < 3000.0,
        "{entries} entries: 60 KB answers are never cached"
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 160 << 20, "RSS grew by {} MiB", grown >> 20);
    // The 60 KB answers came over TCP: over UDP they exceed what we
    // advertise and were dropped.
    assert!(up.tcp_queries.load(std::sync::atomic::Ordering::SeqCst) >= 3000);
    assert_eq!(legit(&p, "127.0.51.1", "www.example.test").await.0, 200);
}

/// Incident 5, distributed: connections that only ever send PINGs fill the
/// table; they are closed at the first-request deadline, and before that
/// the idlest gives way to a new client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_only_connections_do_not_hold_the_table() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.max_conns = 120;
        c.idle_timeout = 8;
    })
    .await;
    let addr = p.addrs(Kind::Https)[0];
    let mut attackers = Vec::new();
    for i in 0..120 {
        // 12 addresses in 3 /24s, under every per-address and prefix cap.
        let src = format!("127.0.{}.{}", 60 + i % 3, 1 + i % 12);
        let s = h2_started(addr, &src).await.unwrap();
        attackers.push(s);
    }
    assert_eq!(p.app.guard.open_connections(), 120);
    let pinger = tokio::spawn(async move {
        let mut closed_at = Vec::new();
        let start = Instant::now();
        // A PING from each every half second, for ten seconds.
        let mut every = tokio::time::interval(Duration::from_millis(500));
        for _ in 0..20 {
            every.tick().await;
            for s in attackers.iter_mut() {
                let _ = s.write_all(&ping()).await;
            }
        }
        every.tick().await;
        for s in attackers.iter_mut() {
            if closed(s, Duration::from_millis(10)).await {
                closed_at.push(start.elapsed());
            }
        }
        closed_at.len()
    });
    // The table is full: a new client is served at once, the idlest
    // attacker giving way.
    let (status, took) = legit(&p, "127.1.0.1", "www.example.test").await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(metric(&p, "doh_connections_evicted_total").await >= 1.0);
    // Within the first-request deadline (5 s) every PING-only connection
    // is gone, PINGs notwithstanding.
    assert_eq!(pinger.await.unwrap(), 120);
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"first_request_timeout\"}"
        )
        .await
            >= 100.0
    );
    assert_eq!(legit(&p, "127.1.0.2", "www.example.test").await.0, 200);
}

/// A client that asked once, then keeps its connection with PINGs, is
/// closed after the idle timeout.
#[tokio::test]
async fn pings_after_a_request_do_not_keep_a_connection() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.idle_timeout = 2).await;
    let mut s = h2_started(p.addrs(Kind::Https)[0], "127.0.62.1")
        .await
        .unwrap();
    s.write_all(&get_headers(1, &ok_path("www.example.test")))
        .await
        .unwrap();
    let t = Instant::now();
    let mut is_closed = false;
    while t.elapsed() < Duration::from_secs(6) {
        let _ = s.write_all(&ping()).await;
        if closed(&mut s, Duration::from_millis(300)).await {
            is_closed = true;
            break;
        }
    }
    assert!(is_closed, "closed despite PINGs");
    assert!(
        t.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
}

/// One byte at a time: the h2 preface after TLS, the plain listener's
/// version detection, HTTP/1.1 headers. Each is closed at the
/// first-request deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drips_are_closed_at_the_first_request_deadline() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.handshake_timeout = 2).await;
    let tls = p.addrs(Kind::Https)[0];
    let plain = p.addrs(Kind::Http)[0];
    let drip = |bytes: &'static [u8]| {
        move |mut s: Box<dyn AsyncRw>| async move {
            let t = Instant::now();
            for b in bytes.iter().cycle() {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                if closed(&mut s, Duration::from_millis(250)).await {
                    return t.elapsed();
                }
                if t.elapsed() > Duration::from_secs(8) {
                    break;
                }
            }
            t.elapsed()
        }
    };
    let h2_over_tls: Box<dyn AsyncRw> = Box::new(h2_tls(tls, "127.0.63.1").await.unwrap());
    let plain_detect: Box<dyn AsyncRw> = Box::new(
        tcp_from(Some("127.0.63.2".parse().unwrap()), plain)
            .await
            .unwrap(),
    );
    let h1_headers: Box<dyn AsyncRw> = Box::new(
        tcp_from(Some("127.0.63.3".parse().unwrap()), plain)
            .await
            .unwrap(),
    );
    let a = tokio::spawn(drip(PREFACE)(h2_over_tls));
    let b = tokio::spawn(drip(PREFACE)(plain_detect));
    let c = tokio::spawn(drip(b"GET /dns-query?dns=AAAA HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")(h1_headers));
    let (status, took) = legit(&p, "127.0.64.1", "www.example.test").await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(2), "{took:?}");
    for (what, t) in [
        ("h2 preface", a),
        ("version detection", b),
        ("h1 headers", c),
    ] {
        let took = t.await.unwrap();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
            "{what}: closed after {took:?}"
        );
    }
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"first_request_timeout\"}"
        )
        .await
            >= 2.0
    );
}

trait AsyncRw: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncRw for T {}

/// Wrong paths and methods spend the budget and score like any junk.
#[tokio::test]
async fn wrong_paths_are_limited_and_banned() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let mut c = Client::connect(&p, Proto::H2, Some("127.0.65.1".parse().unwrap()))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..400 {
        let path = if i % 2 == 0 { "/wp-login.php" } else { "/" };
        match c.send(get(path)).await {
            Ok(r) => statuses.push(r.status),
            Err(_) => break,
        }
    }
    assert!(
        statuses.len() < 400,
        "the connection was closed: {} requests",
        statuses.len()
    );
    assert!(statuses.contains(&404));
    assert!(metric(&p, "doh_bans_total{kind=\"address\"}").await >= 1.0);
    assert!(
        Client::connect(&p, Proto::H2, Some("127.0.65.1".parse().unwrap()))
            .await
            .is_err(),
        "banned: refused at accept"
    );
    assert_eq!(legit(&p, "127.0.65.2", "www.example.test").await.0, 200);
}

/// A burst of full TLS handshakes from one address: most are refused at
/// accept, before any TLS work; the address ends up banned; its neighbour
/// is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_bursts_are_refused_at_accept() {
    let up = MockUpstream::start().await;
    let p = Arc::new(
        proxy(&[up.addr], |c| {
            c.per_ip_conn_rate = 10;
            c.per_prefix_conn_rate = 100;
        })
        .await,
    );
    let addr = p.addrs(Kind::Https)[0];
    let mut handshakes = 0;
    for _ in 0..300 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), h2_tls(addr, "127.0.66.1")).await
        {
            handshakes += 1;
            drop(s);
        }
    }
    assert!(
        handshakes <= 60,
        "{handshakes} of 300 completed a handshake"
    );
    assert!(metric(&p, "doh_connections_rejected_total{reason=\"conn_rate\"}").await >= 20.0);
    assert!(metric(&p, "doh_bans_total{kind=\"address\"}").await >= 1.0);
    let (status, took) = legit(&p, "127.0.67.1", "www.example.test").await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// HTTP/2 protocol errors and HTTP/1.1 parse errors score: enough of them
/// and the address is banned.
#[tokio::test]
async fn protocol_errors_score() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 5).await;
    for _ in 0..3 {
        let mut s = h2_started(p.addrs(Kind::Https)[0], "127.0.68.1")
            .await
            .unwrap();
        // DATA on stream 0 is a connection error (PROTOCOL_ERROR).
        s.write_all(&frame(0, 0, 0, b"x")).await.unwrap();
        assert!(closed(&mut s, Duration::from_secs(3)).await);
    }
    for _ in 0..2 {
        let mut s = tcp_from(Some("127.0.68.1".parse().unwrap()), p.addrs(Kind::Http)[0])
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost x\r\n\0\0\r\n\r\n")
            .await
            .unwrap();
        assert!(closed(&mut s, Duration::from_secs(3)).await);
    }
    wait_for(
        "the protocol errors counted",
        async || metric(&p, "doh_protocol_errors_total{kind=\"h2_protocol\"}").await == 3.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        metric(&p, "doh_protocol_errors_total{kind=\"h1_parse\"}").await,
        2.0
    );
    let bans = String::from_utf8_lossy(&admin(&p, "GET", "/bans", None).await.body).to_string();
    assert!(bans.contains("127.0.68.1/32"), "{bans}");
}

/// Behind a trusted proxy, a hop that names no client is the shared key
/// `unknown`, with the normal per-client budget; never the proxy itself.
#[tokio::test]
async fn unparseable_forwarded_hops_share_one_limited_key() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
        c.per_ip_qps = 1;
        c.per_ip_burst = 3;
        c.ban_after = 1000;
    })
    .await;
    let mut c = Client::connect(&p, Proto::PlainH1, Some("127.0.0.1".parse().unwrap()))
        .await
        .unwrap();
    let forms = [
        ("x-forwarded-for", "garbage"),
        ("x-forwarded-for", ""),
        ("x-forwarded-for", "198.51.100.1,"),
        ("x-forwarded-for", "fe80::1%eth0"),
        ("x-forwarded-for", "unknown"),
    ];
    let mut statuses = Vec::new();
    for (h, v) in forms {
        let req = http::Request::get(ok_path("www.example.test"))
            .header(h, v)
            .body(Default::default())
            .unwrap();
        statuses.push(c.send(req).await.unwrap().status);
    }
    assert_eq!(&statuses[..3], &[200, 200, 200]);
    assert_eq!(&statuses[3..], &[429, 429], "{statuses:?}");
    // A real client behind the same proxy has its own budget.
    let r = c
        .send(get_xff(&ok_path("www.example.test"), "203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Only the chosen header counts: with `forwarded`, XFF is ignored.
    let p2 = proxy(&[up.addr], |c| {
        c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
        c.forwarded_header = doh_proxy::config::ForwardedHeader::Forwarded;
        c.per_ip_qps = 1;
        c.per_ip_burst = 2;
    })
    .await;
    let mut c = Client::connect(&p2, Proto::PlainH1, Some("127.0.0.1".parse().unwrap()))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..3 {
        let req = http::Request::get(ok_path("www.example.test"))
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .header("forwarded", "for=_hidden")
            .body(Default::default())
            .unwrap();
        statuses.push(c.send(req).await.unwrap().status);
    }
    assert_eq!(
        statuses,
        vec![200, 200, 429],
        "XFF did not spread the budget"
    );
}

/// A PROXY header alone names the client; UNKNOWN is the shared key.
#[tokio::test]
async fn proxy_unknown_is_the_shared_key() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
        c.proxy_protocol = true;
        c.per_ip_qps = 1;
        c.per_ip_burst = 2;
    })
    .await;
    let mut tcp = tcp_from(Some("127.0.0.1".parse().unwrap()), p.addrs(Kind::Http)[0])
        .await
        .unwrap();
    tcp.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for i in 0..3 {
        // A forwarding header on a PROXY connection is ignored.
        let req = http::Request::get(ok_path("www.example.test"))
            .header("host", "localhost")
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        statuses.push(send.send_request(req).await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429]);
}

/// An answer the client never opens its window for counts as undelivered.
#[tokio::test]
async fn a_closed_window_means_undelivered() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.idle_timeout = 1;
        c.write_timeout = 1;
    })
    .await;
    let mut s = h2_tls(p.addrs(Kind::Https)[0], "127.0.70.1").await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: no stream may send DATA.
    s.write_all(&settings(&[(4, 0)])).await.unwrap();
    s.write_all(&get_headers(1, &ok_path("www.example.test")))
        .await
        .unwrap();
    assert!(closed(&mut s, Duration::from_secs(5)).await);
    wait_for(
        "counted undelivered",
        async || metric(&p, "doh_requests_total{outcome=\"undelivered\"}").await == 1.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        metric(&p, "doh_requests_total{outcome=\"answered\"}").await,
        0.0
    );
}

/// HTTP/2 clients that open 100 streams each with a zero flow-control
/// window and never open it: every connection is closed at the write
/// deadline (not the idle timeout), scored, and a legitimate client is
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_windows_are_closed_at_the_write_deadline() {
    let _heavy = heavy().await;
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.write_timeout = 2;
        c.idle_timeout = 120;
    })
    .await;
    let (status, _) = legit(&p, "127.0.71.200", "mid.example.test").await;
    assert_eq!(status, 200);
    let t = Instant::now();
    let mut held = Vec::new();
    for i in 0..20u32 {
        let mut s = h2_tls(p.addrs(Kind::Https)[0], &format!("127.0.{}.1", 110 + i))
            .await
            .unwrap();
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&settings(&[(4, 0)])).await.unwrap();
        let mut frames = Vec::new();
        for stream in 0..100u32 {
            frames.extend(get_headers(2 * stream + 1, &ok_path("mid.example.test")));
        }
        s.write_all(&frames).await.unwrap();
        held.push(s);
    }
    let (status, _) = legit(&p, "127.0.71.200", "www.example.test").await;
    assert_eq!(status, 200, "the legitimate client during");
    for s in held.iter_mut() {
        assert!(closed(s, Duration::from_secs(60)).await);
    }
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"write_timeout\"}"
        )
        .await
            >= 20.0
    );
    assert!(metric(&p, "doh_requests_total{outcome=\"undelivered\"}").await >= 20.0 * 100.0 * 0.9);
}
