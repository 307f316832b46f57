//! Forwarding against a real UDP/TCP upstream: TC fallback, spoofed
//! answers, timeouts, failover, case preservation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    assert!(p.tls_addrs[0].is_ipv6());
    for proto in [Proto::H2, Proto::PlainH1] {
        let r = send(&p, proto, get(&get_path(&query("www.example.test", 28, 8)))).await;
        assert_eq!(r.status, 200, "{proto:?}");
        assert_eq!(r.dns().metadata.id, 8);
    }
    assert_eq!(up.count("www.example.test."), 1);
}
