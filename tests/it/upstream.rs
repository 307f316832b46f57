//! Forwarding against a real UDP/TCP upstream: TC fallback, spoofed
//! answers, timeouts, failover, case preservation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::common::*;
use hickory_proto::op::ResponseCode;

#[tokio::test]
async fn truncated_answer_is_retried_over_tcp() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("tc.example.test", 1, 9))),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = r.dns();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers[0].data.to_string(), "192.0.2.1");
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn spoofed_answer_with_wrong_id_is_ignored() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let r = send(
        &p,
        Proto::H1,
        get(&get_path(&query("spoof.example.test", 1, 3))),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.dns().answers[0].data.to_string(),
        "192.0.2.1",
        "not the poisoned 192.0.2.66"
    );
    assert_eq!(
        metric(
            &p,
            &format!(
                "doh_upstream_queries_total{{upstream=\"{}\",result=\"dropped\"}}",
                up.addr
            )
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn upstream_timeout_gives_servfail_within_the_timeout() {
    let up = MockUpstream::start().await;
    up.paused.store(true, Ordering::SeqCst);
    let p = proxy(&[up.addr], |c| c.upstream_timeout = 600).await;
    let t = Instant::now();
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("www.example.test", 1, 4))),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.dns().metadata.response_code, ResponseCode::ServFail);
    assert_eq!(r.dns().metadata.id, 4);
    assert!(r.max_age() <= 2, "short max-age for failures");
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[tokio::test]
async fn failover_to_the_second_upstream() {
    // A UDP socket that never answers: the first upstream times out.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let up = MockUpstream::start().await;
    let p = proxy(&[silent.local_addr().unwrap(), up.addr], |c| {
        c.upstream_timeout = 1000
    })
    .await;
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("www.example.test", 1, 5))),
    )
    .await;
    assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.1");
    assert_eq!(up.count("www.example.test."), 1);
    // SERVFAIL from one upstream also moves on to the next.
    let failing = MockUpstream::start().await;
    let p2 = proxy(&[failing.addr, up.addr], |_| {}).await;
    let r = send(
        &p2,
        Proto::H2,
        get(&get_path(&query("fail.example.test", 1, 6))),
    )
    .await;
    assert_eq!(
        r.dns().metadata.response_code,
        ResponseCode::ServFail,
        "both say SERVFAIL"
    );
    assert_eq!(failing.count("fail.example.test."), 1);
    assert_eq!(up.count("fail.example.test."), 1);
}

#[tokio::test]
async fn answer_carries_the_clients_id_and_case() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let q = query("WwW.ExAmPlE.TeSt", 1, 0x1111);
    let r = send(&p, Proto::H2, get(&get_path(&q))).await;
    assert_eq!(&r.body[..2], &[0x11, 0x11]);
    assert_eq!(
        &r.body[12..12 + 18],
        &q[12..12 + 18],
        "question bytes as sent"
    );
    // A second client, other case, other ID, served from cache.
    let q2 = query("www.EXAMPLE.test", 1, 0x2222);
    let r2 = send(&p, Proto::H1, get(&get_path(&q2))).await;
    assert_eq!(&r2.body[..2], &[0x22, 0x22]);
    assert_eq!(&r2.body[12..12 + 18], &q2[12..12 + 18]);
    assert_eq!(
        up.count("www.example.test."),
        1,
        "mixed case hits the one entry"
    );
}

#[tokio::test]
async fn ipv6_listeners_and_upstream() {
    let up = MockUpstream::start_on("::1").await;
    let p = proxy(&[up.addr], |c| {
        c.listen = vec!["[::1]:0".parse().unwrap()];
        c.listen_http = vec!["[::1]:0".parse().unwrap()];
    })
    .await;
    assert!(p.addrs(Kind::Https)[0].is_ipv6());
    for proto in [Proto::H2, Proto::PlainH1] {
        let r = send(&p, proto, get(&get_path(&query("www.example.test", 28, 8)))).await;
        assert_eq!(r.status, 200, "{proto:?}");
        assert_eq!(r.dns().metadata.id, 8);
    }
    assert_eq!(up.count("www.example.test."), 1);
}

/// A resolver that takes 1.5 s for a cold name: answered under the default
/// timeout, with at most one retransmission; 200 clients asking at once
/// make one resolution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_waited_for_not_turned_into_servfail() {
    let up = MockUpstream::start().await;
    let p = std::sync::Arc::new(
        proxy(&[up.addr], |c| {
            c.upstream_timeout = 2500;
            c.per_ip_burst = 1000;
        })
        .await,
    );
    let t = Instant::now();
    let r = send(&p, Proto::H2, get(&ok_path("slow15-a.example.test"))).await;
    assert_eq!(r.dns().metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.15");
    assert!(
        t.elapsed() >= Duration::from_millis(1500) && t.elapsed() < Duration::from_millis(2500)
    );
    assert!(
        up.count("slow15-a.example.test.") <= 2,
        "{}",
        up.count("slow15-a.example.test.")
    );
    let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u16 {
        let mut c = match &mut c {
            Client::H2(s) => Client::H2(s.clone()),
            _ => unreachable!(),
        };
        tasks.push(tokio::spawn(async move {
            c.send(get(&get_path(&query("slow15-b.example.test", 1, i))))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.15");
    }
    let n = up.count("slow15-b.example.test.");
    assert!((1..=2).contains(&n), "{n} upstream queries for 200 clients");
}

/// The first upstream never answers: the second answers within one hedge
/// interval, and once the probes mark the first down, queries go straight
/// to the second.
#[tokio::test]
async fn a_silent_first_upstream_costs_one_hedge_interval() {
    let silent = SilentUpstream::start().await;
    let up = MockUpstream::start().await;
    let p = proxy(&[silent.addr, up.addr], |c| {
        c.upstream_timeout = 2500;
        c.upstream_strategy = doh_proxy::config::Strategy::Ordered;
    })
    .await;
    let t = Instant::now();
    let r = send(&p, Proto::H2, get(&ok_path("first.example.test"))).await;
    assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.1");
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(silent.count("first.example.test."), 1);
    let hedges = format!("doh_upstream_hedges_won_total{{upstream=\"{}\"}}", up.addr);
    assert_eq!(metric(&p, &hedges).await, 1.0);
    // Three unanswered probes, one every 2 s.
    let down = format!("doh_upstream_up{{upstream=\"{}\"}}", silent.addr);
    wait_for(
        "the silent upstream marked down",
        async || metric(&p, &down).await == 0.0,
        Duration::from_secs(9),
    )
    .await;
    let up_value = metric(&p, &down).await;
    assert_eq!(up_value, 0.0, "the probes mark it down");
    let t = Instant::now();
    let r = send(&p, Proto::H2, get(&ok_path("later.example.test"))).await;
    assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.1");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        silent.count("later.example.test."),
        0,
        "straight to the second"
    );
    assert_eq!(admin(&p, "GET", "/healthz", None).await.status, 200);
}

/// An upstream that drops every other query, beside a good one: no client
/// ever sees SERVFAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_upstream_beside_a_good_one_costs_no_servfail() {
    let flapping = MockUpstream::start().await;
    flapping.flapping.store(true, Ordering::SeqCst);
    let good = MockUpstream::start().await;
    let p = proxy(&[flapping.addr, good.addr], |c| {
        c.upstream_timeout = 2500;
        c.upstream_strategy = doh_proxy::config::Strategy::Ordered;
        c.per_ip_burst = 1000;
    })
    .await;
    let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
    for i in 0..40 {
        let r = c
            .send(get(&ok_path(&format!("f{i}.example.test"))))
            .await
            .unwrap();
        assert_eq!(
            r.dns().metadata.response_code,
            ResponseCode::NoError,
            "query {i}"
        );
    }
    assert!(metric(&p, "doh_upstream_queries_total{result=\"servfail\"}").await == 0.0);
}

/// DNS over TLS upstream: pipelined on at most two connections, and a
/// connection that dies mid-stream loses no query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_upstream_pipelines_and_survives_a_broken_connection() {
    let dot = MockDot::start(Some(12)).await;
    let spec = format!("tls://{}#localhost", dot.addr);
    let ca = pki().ca.clone();
    let p = std::sync::Arc::new(
        proxy(&[], move |c| {
            c.upstream = vec![spec.parse().unwrap()];
            c.upstream_ca = vec![ca];
            c.upstream_timeout = 2500;
            c.per_ip_burst = 1000;
        })
        .await,
    );
    let mut tasks = Vec::new();
    for i in 0..30 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            send(&p, Proto::H2, get(&ok_path(&format!("t{i}.example.test")))).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.dns().metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.1");
    }
    // One connection, broken once (the 12th query), so one more.
    let conns = dot.connections.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&conns),
        "{conns} TLS connections for 30 misses"
    );
    let opened = metric(&p, "doh_upstream_connections_total").await;
    assert_eq!(opened, conns as f64);
    // Without a break: 30 more misses need no new connection.
    let before = dot.connections.load(Ordering::SeqCst);
    for i in 0..30 {
        let r = send(&p, Proto::H2, get(&ok_path(&format!("u{i}.example.test")))).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(dot.connections.load(Ordering::SeqCst), before);
}

/// A TLS upstream whose certificate does not carry the expected name is
/// refused: SERVFAIL, counted as errors, never an answer.
#[tokio::test]
async fn a_wrong_certificate_name_is_refused() {
    let dot = MockDot::start(None).await;
    let spec = format!("tls://{}#not-the-name.example", dot.addr);
    let ca = pki().ca.clone();
    let p = proxy(&[], move |c| {
        c.upstream = vec![spec.parse().unwrap()];
        c.upstream_ca = vec![ca];
        c.upstream_timeout = 800;
    })
    .await;
    let r = send(&p, Proto::H2, get(&ok_path("www.example.test"))).await;
    assert_eq!(r.dns().metadata.response_code, ResponseCode::ServFail);
    assert_eq!(dot.queries.load(Ordering::SeqCst), 0, "no query crossed");
    assert!(metric(&p, "doh_upstream_queries_total{result=\"error\"}").await >= 1.0);
}

/// DNS over HTTPS upstream: another doh-proxy instance.
#[tokio::test]
async fn doh_upstream_through_another_instance() {
    let up = MockUpstream::start().await;
    let back = proxy(&[up.addr], |_| {}).await;
    let spec = format!("https://{}/dns-query#localhost", back.addrs(Kind::Https)[0]);
    let ca = pki().ca.clone();
    let front = proxy(&[], move |c| {
        c.upstream = vec![spec.parse().unwrap()];
        c.upstream_ca = vec![ca];
    })
    .await;
    for i in 0..5 {
        let r = send(
            &front,
            Proto::H2,
            get(&ok_path(&format!("h{i}.example.test"))),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.1");
    }
    let r = send(&front, Proto::H1, get(&ok_path("nxthere.example.test"))).await;
    assert_eq!(r.dns().metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(metric(&front, "doh_upstream_connections_total").await, 1.0);
    assert_eq!(up.count("h3.example.test."), 1);
}

/// Clients asking for names whose servers never answer cannot make the
/// proxy look unhealthy: health follows the proxy's own probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_names_do_not_mark_the_upstream_down() {
    let up = MockUpstream::start().await;
    let p = Arc::new(
        proxy(&[up.addr], |c| {
            c.upstream_timeout = 500;
            c.per_ip_burst = 1000;
            c.per_ip_qps = 1000;
        })
        .await,
    );
    probed(&p).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..6 {
                let r = send_from(
                    &p,
                    Proto::H2,
                    &format!("127.0.69.{}", i + 1),
                    get(&ok_path(&format!("dead{i}-{round}.example.test"))),
                )
                .await
                .unwrap();
                assert_eq!(r.status, 200);
                assert_eq!(
                    r.dns().metadata.response_code,
                    hickory_proto::op::ResponseCode::ServFail
                );
            }
        }));
    }
    let mut probes = Vec::new();
    // /healthz every 200 ms for 3 s, while the dead names time out.
    let mut every = tokio::time::interval(Duration::from_millis(200));
    for _ in 0..15 {
        every.tick().await;
        probes.push(admin(&p, "GET", "/healthz", None).await.status);
    }
    for t in tasks {
        t.await.unwrap();
    }
    probes.push(admin(&p, "GET", "/healthz", None).await.status);
    assert!(probes.iter().all(|s| *s == 200), "{probes:?}");
}
