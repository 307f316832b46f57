//! Abuse protection against real connections from many 127.x.y.z source
//! addresses: allowlist, penalty box, connection caps, trusted
//! proxies, the upstream budget, dry run, and a replay of incident 1.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn allowlisted_flooder_is_never_limited_nor_banned() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_ip_qps = 1;
        c.per_ip_burst = 1;
        c.ban_after = 2;
        c.allow = vec!["127.0.12.0/24".parse().unwrap()];
    })
    .await;
    let mut c = Client::connect(&p, Proto::H2, Some("127.0.12.1".parse().unwrap()))
        .await
        .unwrap();
    for _ in 0..50 {
        assert_eq!(
            c.send(get(&ok_path("www.example.test")))
                .await
                .unwrap()
                .status,
            200
        );
        assert_eq!(c.send(get("/dns-query?ct=x")).await.unwrap().status, 400);
    }
    assert_eq!(admin(&p, "GET", "/bans", None).await.body, "[]");
}

#[tokio::test]
async fn garbage_gets_a_client_banned_and_the_ban_lifts_by_itself() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.ban_after = 5;
        c.ban_secs = 2;
    })
    .await;
    let src = Some("127.0.13.1".parse().unwrap());
    let mut c = Client::connect(&p, Proto::H1, src).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        match c
            .send(get("/dns-query?ct=application/dns-udpwireformat&dns=AAAA"))
            .await
        {
            Ok(r) => statuses.push(r.status),
            Err(_) => break,
        }
    }
    assert_eq!(statuses, vec![400; 5]);
    // Banned: the open connection is closed, a new one is refused at accept.
    let after = c.send(get(&ok_path("www.example.test"))).await;
    assert!(
        after.as_ref().map_or(true, |r| r.status == 403),
        "{after:?}"
    );
    assert!(
        Client::connect(&p, Proto::H2, src).await.is_err(),
        "closed before the TLS handshake"
    );
    assert!(metric(&p, "doh_connections_rejected_total{reason=\"banned\"}").await >= 1.0);
    assert_eq!(metric(&p, "doh_bans_active").await, 1.0);
    // A neighbour is still served.
    let r = send_from(
        &p,
        Proto::H2,
        "127.0.13.2",
        get(&ok_path("www.example.test")),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    wait_for(
        "the ban expired",
        async || metric(&p, "doh_bans_active").await == 0.0,
        Duration::from_secs(10),
    )
    .await;
    let mut c = Client::connect(&p, Proto::H2, src)
        .await
        .expect("ban lifted");
    assert_eq!(
        c.send(get(&ok_path("www.example.test")))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(metric(&p, "doh_bans_active").await, 0.0);
}

#[tokio::test]
async fn connections_from_one_address_are_capped_and_idle_ones_closed() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.handshake_timeout = 2).await;
    let mut conns = Vec::new();
    for _ in 0..60 {
        conns.push(
            tcp_from(Some("127.0.14.1".parse().unwrap()), p.addrs(Kind::Https)[0])
                .await
                .unwrap(),
        );
    }
    wait_for(
        "28 refused at accept",
        async || metric(&p, "doh_connections_rejected_total{reason=\"per_ip\"}").await == 28.0,
        Duration::from_secs(5),
    )
    .await;
    let mut closed = 0;
    for c in conns.iter_mut() {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) | Ok(Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), c.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 28, "32 of 60 kept");
    assert_eq!(
        metric(&p, "doh_connections_rejected_total{reason=\"per_ip\"}").await,
        28.0
    );
    let r = send_from(
        &p,
        Proto::H2,
        "127.0.14.2",
        get(&ok_path("www.example.test")),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "another address is served");
    // The 32 that said nothing are closed after the handshake timeout.
    wait_for(
        "the silent connections closed",
        async || p.app.guard.open_connections() == 0,
        Duration::from_secs(10),
    )
    .await;
    let mut still_open = 0;
    for c in conns.iter_mut() {
        let mut b = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(20), c.read(&mut b))
            .await
            .is_err()
        {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0);
    assert_eq!(p.app.guard.open_connections(), 0);
}

#[tokio::test]
async fn forwarded_for_only_counts_from_trusted_proxies() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
        c.ban_after = 3;
    })
    .await;
    let garbage = "/dns-query?body=AAAA";
    let mut via_proxy = Client::connect(&p, Proto::PlainH1, Some("127.0.0.1".parse().unwrap()))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            via_proxy
                .send(get_xff(garbage, "198.51.100.1"))
                .await
                .unwrap()
                .status,
            400
        );
    }
    let r = via_proxy
        .send(get_xff(&ok_path("www.example.test"), "198.51.100.1"))
        .await
        .unwrap();
    assert_eq!(r.status, 403, "the client behind the proxy is banned");
    let r = via_proxy
        .send(get_xff(
            &ok_path("www.example.test"),
            "198.51.100.2, 127.0.0.1",
        ))
        .await
        .unwrap();
    assert_eq!(
        r.status, 200,
        "another client behind the same proxy is not, and the proxy is not"
    );
    // From an untrusted peer the header is ignored: the peer itself is scored.
    let mut direct = Client::connect(&p, Proto::PlainH1, Some("127.0.15.1".parse().unwrap()))
        .await
        .unwrap();
    for _ in 0..3 {
        let _ = direct.send(get_xff(garbage, "198.51.100.3")).await;
    }
    let bans = String::from_utf8_lossy(&admin(&p, "GET", "/bans", None).await.body).to_string();
    assert!(bans.contains("198.51.100.1/32"), "{bans}");
    assert!(bans.contains("127.0.15.1/32"), "{bans}");
    assert!(!bans.contains("198.51.100.3"), "{bans}");
    assert!(!bans.contains("\"127.0.0.1/32\""), "{bans}");
}

#[tokio::test]
async fn proxy_protocol_names_the_client() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
        c.proxy_protocol = true;
        c.ban_after = 2;
        c.max_conns_per_ip = 2;
    })
    .await;
    let connect = |client: &'static str| {
        let addr = p.addrs(Kind::Https)[0];
        async move {
            let mut tcp = tcp_from(Some("127.0.0.1".parse().unwrap()), addr)
                .await
                .unwrap();
            tcp.write_all(format!("PROXY TCP4 {client} 127.0.0.1 4000 443\r\n").as_bytes())
                .await
                .unwrap();
            Client::over_tls(tcp, true).await
        }
    };
    let mut c = connect("198.51.100.20").await.unwrap();
    assert_eq!(
        c.send(get(&ok_path("www.example.test")))
            .await
            .unwrap()
            .status,
        200
    );
    for _ in 0..2 {
        assert_eq!(
            c.send(get("/dns-query?random_padding=x"))
                .await
                .unwrap()
                .status,
            400
        );
    }
    let bans = String::from_utf8_lossy(&admin(&p, "GET", "/bans", None).await.body).to_string();
    assert!(bans.contains("198.51.100.20/32"), "{bans}");
    assert!(
        connect("198.51.100.20").await.is_err(),
        "banned client closed after its PROXY header"
    );
    assert!(connect("198.51.100.21").await.is_ok());
    // The named client meets its own connection cap (2 here).
    let a = connect("198.51.100.30").await.unwrap();
    let b = connect("198.51.100.30").await.unwrap();
    assert!(
        connect("198.51.100.30").await.is_err(),
        "third connection of one client refused"
    );
    drop((a, b));
    // Without a PROXY header, a trusted peer's connection is dropped.
    assert!(
        Client::connect(&p, Proto::H2, Some("127.0.0.1".parse().unwrap()))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_budget_holds_whatever_the_number_of_clients() {
    let up = MockUpstream::start().await;
    let p = std::sync::Arc::new(
        proxy(&[up.addr], |c| {
            c.upstream_qps = 20;
            c.per_ip_qps = 10_000;
            c.per_ip_burst = 10_000;
            c.per_prefix_qps = 10_000;
        })
        .await,
    );
    probed(&p).await;
    let before = up.total.load(Ordering::SeqCst);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..40 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(
                &p,
                Proto::H2,
                Some(format!("127.0.30.{}", a + 1).parse().unwrap()),
            )
            .await
            .unwrap();
            let mut statuses = Vec::new();
            let mut i = 0;
            while start.elapsed() < Duration::from_secs(2) {
                let r = c
                    .send(get(&ok_path(&format!("u{a}-{i}.example.test"))))
                    .await
                    .unwrap();
                statuses.push(r.status);
                i += 1;
            }
            statuses
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = up.total.load(Ordering::SeqCst) - before;
    // Burst of one second's worth, then 20 a second (health probes included).
    let allowed = 20.0 * (elapsed + 1.0) + 2.0;
    assert!(
        (sent as f64) <= allowed,
        "{sent} upstream queries in {elapsed:.1} s"
    );
    assert!(
        all.iter().filter(|s| **s == 503).count() > all.len() / 2,
        "most unique names get 503"
    );
    assert!(all.contains(&200));
    assert!(metric(&p, "doh_requests_total{outcome=\"overloaded\"}").await > 0.0);
}

#[tokio::test]
async fn dry_run_enforces_nothing_and_counts_everything() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.dry_run = true;
        c.per_ip_qps = 1;
        c.per_ip_burst = 1;
        c.ban_after = 2;
        c.max_conns_per_ip = 1;
    })
    .await;
    let src = Some("127.0.16.1".parse().unwrap());
    let mut a = Client::connect(&p, Proto::H2, src).await.unwrap();
    let mut b = Client::connect(&p, Proto::H2, src)
        .await
        .expect("not capped");
    for _ in 0..10 {
        assert_eq!(
            a.send(get(&ok_path("www.example.test")))
                .await
                .unwrap()
                .status,
            200
        );
        assert_eq!(b.send(get("/dns-query?ct=x")).await.unwrap().status, 400);
    }
    assert_eq!(
        a.send(get(&ok_path("www.example.test")))
            .await
            .unwrap()
            .status,
        200,
        "not banned"
    );
    assert_eq!(admin(&p, "GET", "/bans", None).await.body, "[]");
    assert!(
        metric(
            &p,
            "doh_requests_total{outcome=\"rate_limited\",dry_run=\"true\"}"
        )
        .await
            >= 5.0
    );
    assert!(metric(&p, "doh_bans_total{kind=\"address\",dry_run=\"true\"}").await >= 1.0);
    assert!(
        metric(
            &p,
            "doh_connections_rejected_total{reason=\"per_ip\",dry_run=\"true\"}"
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric(&p, "doh_requests_total{outcome=\"rate_limited\"}").await,
        0.0
    );
}

/// Incident 1: 20,000 client addresses, each sending a little garbage
/// through a trusted reverse proxy. A legitimate client is still served and
/// memory grows by less than 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_1_replay() {
    let _heavy = heavy().await;
    let up = MockUpstream::start().await;
    let p = std::sync::Arc::new(
        proxy(&[up.addr], |c| {
            c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
            c.ban_after = 3;
        })
        .await,
    );
    let rss_before = rss_bytes();
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&p, Proto::PlainH2, Some("127.0.0.1".parse().unwrap()))
                .await
                .unwrap();
            let mut rejected = 0;
            for i in 0..2500u32 {
                let n = w * 2500 + i;
                let client = format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255);
                let path = match i % 3 {
                    0 => "/dns-query?ct=application/dns-udpwireformat&dns=AAAA".to_string(),
                    1 => "/dns-query?name=example.test&type=A".to_string(),
                    _ => "/dns-query?dns=!!".to_string(),
                };
                // A few clients come back enough to be banned.
                let times = if i % 100 == 0 { 4 } else { 1 };
                for _ in 0..times {
                    let r = c.send(get_xff(&path, &client)).await.unwrap();
                    assert!(matches!(r.status, 400 | 403), "{}", r.status);
                    rejected += 1;
                }
            }
            rejected
        }));
    }
    let legit = {
        let p = p.clone();
        tokio::spawn(async move {
            let mut c = Client::connect(&p, Proto::PlainH2, Some("127.0.0.1".parse().unwrap()))
                .await
                .unwrap();
            let mut ok = 0;
            // A request every 20 ms.
            let mut every = tokio::time::interval(Duration::from_millis(20));
            for i in 0..50 {
                every.tick().await;
                let r = c
                    .send(get_xff(
                        &ok_path(&format!("legit{}.example.test", i % 5)),
                        "203.0.113.5",
                    ))
                    .await
                    .unwrap();
                ok += (r.status == 200) as u32;
            }
            ok
        })
    };
    let mut rejected = 0;
    for t in tasks {
        rejected += t.await.unwrap();
    }
    assert_eq!(
        legit.await.unwrap(),
        50,
        "the legitimate client got every answer"
    );
    assert!(rejected >= 20_000);
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "memory grew by {} MiB", grown >> 20);
    assert!(metric(&p, "doh_bans_active").await >= 200.0);
    assert_eq!(
        up.count("legit0.example.test."),
        1,
        "the upstream saw only the legitimate names"
    );
    assert!(metric(&p, "doh_unique_clients").await > 19_000.0);
}
