//! Several instances sharing bans, the upstream budget and unique-client
//! counts through a real redis-server on loopback; Redis killed, restarted
//! and slowed down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_instance_is_enforced_by_the_other() {
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let (a, b) = pair(up.addr, &redis, |c| c.ban_after = 3).await;
    let src = "127.0.95.1";
    for _ in 0..3 {
        let _ = send_from(&a, Proto::H2, src, get("/dns-query?ct=x")).await;
    }
    let t = Instant::now();
    wait_for(
        "banned on B",
        async || {
            send_from(&b, Proto::H2, src, get(&ok_path("www.example.test")))
                .await
                .is_err()
        },
        Duration::from_secs(2),
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(2));
    let bans = String::from_utf8_lossy(&admin(&b, "GET", "/bans", None).await.body).to_string();
    assert!(
        bans.contains("127.0.95.1/32") && bans.contains("obsolete_draft"),
        "{bans}"
    );
    // Lifted on B: lifted on A.
    assert_eq!(
        admin(&b, "DELETE", "/bans/127.0.95.1", None).await.status,
        200
    );
    wait_for(
        "lifted on A",
        async || {
            send_from(&a, Proto::H2, src, get(&ok_path("www.example.test")))
                .await
                .is_ok_and(|r| r.status == 200)
        },
        Duration::from_secs(2),
    )
    .await;
    // A neighbour was never affected.
    assert_eq!(
        send_from(
            &b,
            Proto::H2,
            "127.0.95.2",
            get(&ok_path("www.example.test"))
        )
        .await
        .unwrap()
        .status,
        200
    );
}

/// Seconds left on the ban of `target` as `p` lists it.
async fn ban_left(p: &doh_proxy::app::Running, target: &str) -> Option<u64> {
    let body = admin(p, "GET", "/bans", None).await.body;
    let bans: serde_json::Value = serde_json::from_slice(&body).unwrap();
    bans.as_array()?
        .iter()
        .find(|b| b["target"] == target)
        .and_then(|b| b["remaining_secs"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_offences_escalate_across_instances() {
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let tweak = |c: &mut doh_proxy::config::Config| {
        c.ban_after = 3;
        c.ban_secs = 100;
    };
    let (a, b) = pair(up.addr, &redis, tweak).await;
    let garbage = async |p: &doh_proxy::app::Running, src: &str| {
        for _ in 0..3 {
            let _ = send_from(p, Proto::H2, src, get("/dns-query?ct=x")).await;
        }
    };
    // A first offence on A: the base duration.
    garbage(&a, "127.0.96.1").await;
    let first = ban_left(&a, "127.0.96.1/32").await.unwrap();
    assert!((90..=100).contains(&first), "{first}");
    wait_for(
        "seen by B",
        async || ban_left(&b, "127.0.96.1/32").await.is_some(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        admin(&a, "DELETE", "/bans/127.0.96.1", None).await.status,
        200
    );
    wait_for(
        "lifted on B",
        async || ban_left(&b, "127.0.96.1/32").await.is_none(),
        Duration::from_secs(2),
    )
    .await;
    // The second, on B: twice as long, as it would be on A.
    garbage(&b, "127.0.96.1").await;
    let second = ban_left(&b, "127.0.96.1/32").await.unwrap();
    assert!((190..=200).contains(&second), "{second}");
    // An instance started after the ban is lifted still has the count.
    assert_eq!(
        admin(&b, "DELETE", "/bans/127.0.96.1", None).await.status,
        200
    );
    wait_for(
        "lifted on A",
        async || ban_left(&a, "127.0.96.1/32").await.is_none(),
        Duration::from_secs(2),
    )
    .await;
    let c = instance(up.addr, &redis.url(), tweak).await;
    wait_for(
        "C connected",
        async || metric(&c, "doh_redis_up").await == 1.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(ban_left(&c, "127.0.96.1/32").await, None);
    garbage(&c, "127.0.96.1").await;
    let third = ban_left(&c, "127.0.96.1/32").await.unwrap();
    assert!((390..=400).contains(&third), "{third}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_budget_is_one_for_the_fleet() {
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let tweak = |c: &mut doh_proxy::config::Config| {
        c.upstream_qps = 40;
        c.per_ip_qps = 1_000_000;
        c.per_ip_burst = 1_000_000;
        c.per_prefix_qps = 1_000_000;
    };
    let (a, b) = pair(up.addr, &redis, tweak).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let p = if w % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(
                &p,
                Proto::H2,
                Some(format!("127.0.97.{}", w + 1).parse().unwrap()),
            )
            .await
            .unwrap();
            let mut i = 0;
            while start.elapsed() < Duration::from_secs(4) {
                let _ = c
                    .send(get(&ok_path(&format!("fleet{w}-{i}.example.test"))))
                    .await;
                i += 1;
            }
            (w, i)
        }));
    }
    let mut tried = Vec::new();
    for t in tasks {
        tried.push(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let sent: f64 = tried
        .iter()
        .map(|(w, n)| {
            (0..*n)
                .map(|i| up.count(&format!("fleet{w}-{i}.example.test.")) as f64)
                .sum::<f64>()
        })
        .sum();
    // 40 a second for the fleet, plus at most one lease batch (2) per
    // instance at each second's turn; not 80 a second.
    let bound = 40.0 * (secs + 1.0) + 2.0 * 2.0 * (secs + 1.0);
    assert!(
        sent <= bound,
        "{sent} queries upstream in {secs:.1} s (bound {bound})"
    );
    assert!(sent >= 40.0 * (secs - 1.0), "the budget is used: {sent}");
    assert!(sent < 80.0 * secs * 0.75, "not two budgets: {sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_clients_are_counted_for_the_fleet() {
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let (a, b) = pair(up.addr, &redis, |_| {}).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..125u32 {
                let n = w * 125 + i;
                let src = format!("127.98.{}.{}", n / 250, 1 + n % 250);
                let p = if n % 2 == 0 { &a } else { &b };
                let r = send_from(p, Proto::PlainH1, &src, get(&ok_path("www.example.test")))
                    .await
                    .unwrap();
                assert_eq!(r.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for p in [&a, &b] {
        let local = metric(p, "doh_unique_clients_local").await;
        assert!(
            (480.0..=520.0).contains(&local),
            "each instance saw about half: {local}"
        );
    }
    wait_for(
        "both report the fleet's 1,000 within 3 %",
        async || {
            let (x, y) = (
                metric(&a, "doh_unique_clients").await,
                metric(&b, "doh_unique_clients").await,
            );
            (970.0..=1030.0).contains(&x) && (970.0..=1030.0).contains(&y)
        },
        Duration::from_secs(15),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_and_back() {
    let mut redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let (a, b) = pair(up.addr, &redis, |c| c.ban_after = 3).await;
    assert_eq!(
        send_from(
            &a,
            Proto::H2,
            "127.0.99.1",
            get(&ok_path("cached.example.test"))
        )
        .await
        .unwrap()
        .status,
        200
    );
    redis.kill();
    // Both keep answering, cached and uncached names.
    for (i, p) in [&a, &b].into_iter().enumerate() {
        let r = send_from(
            p,
            Proto::H2,
            "127.0.99.1",
            get(&ok_path("cached.example.test")),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        let r = send_from(
            p,
            Proto::H2,
            "127.0.99.1",
            get(&ok_path(&format!("new{i}.example.test"))),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.1");
    }
    wait_for(
        "redis down on both",
        async || metric(&a, "doh_redis_up").await == 0.0 && metric(&b, "doh_redis_up").await == 0.0,
        Duration::from_secs(5),
    )
    .await;
    // A ban made while Redis is down...
    for _ in 0..3 {
        let _ = send_from(&a, Proto::H2, "127.0.99.2", get("/dns-query?ct=x")).await;
    }
    assert!(send_from(
        &a,
        Proto::H2,
        "127.0.99.2",
        get(&ok_path("www.example.test"))
    )
    .await
    .is_err());
    assert!(
        send_from(
            &b,
            Proto::H2,
            "127.0.99.2",
            get(&ok_path("www.example.test"))
        )
        .await
        .is_ok(),
        "not shared yet"
    );
    redis.restart().await;
    wait_for(
        "redis up again",
        async || metric(&a, "doh_redis_up").await == 1.0 && metric(&b, "doh_redis_up").await == 1.0,
        Duration::from_secs(10),
    )
    .await;
    // ...is shared once it is back.
    wait_for(
        "shared after reconnection",
        async || {
            send_from(
                &b,
                Proto::H2,
                "127.0.99.2",
                get(&ok_path("www.example.test")),
            )
            .await
            .is_err()
        },
        Duration::from_secs(5),
    )
    .await;
}

/// A TCP relay to Redis that holds every reply for `delay`.
async fn slow_relay(to: u16, delay: Duration) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok(n) = sr.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// 100 queries to `p` from `src`, half hits, half misses (which spend the
/// upstream budget, leased from Redis): how many were answered.
async fn answered(p: &doh_proxy::app::Running, src: &str, tag: &str) -> usize {
    let mut c = Client::connect(p, Proto::H2, Some(src.parse().unwrap()))
        .await
        .unwrap();
    let mut ok = 0;
    for i in 0..100 {
        let name = if i % 2 == 0 {
            "www.example.test".to_string()
        } else {
            format!("{tag}-{i}.example.test")
        };
        let r = c.send(get(&ok_path(&name))).await.unwrap();
        ok += usize::from(r.status == 200);
    }
    ok
}

/// Redis slow (30 ms a reply: leases are late) or slower than the command
/// timeout (500 ms: Redis counts as down): every client is answered, and
/// the link's state is what it is. What a slow Redis costs a request in
/// latency is measured by `benches/slow_redis.sh`, side by side with an
/// instance on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_does_not_stop_clients() {
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    for (delay, up_after) in [(30, 1.0), (500, 0.0)] {
        let relay = slow_relay(redis.port, Duration::from_millis(delay)).await;
        let slow = instance(up.addr, &format!("redis://127.0.0.1:{relay}/0"), |_| {}).await;
        wait_for(
            "the link's state known",
            async || metric(&slow, "doh_redis_up").await == up_after,
            Duration::from_secs(10),
        )
        .await;
        let src = format!("127.0.100.{}", delay % 250);
        let ok = answered(&slow, &src, &format!("d{delay}")).await;
        assert_eq!(ok, 100, "{delay} ms");
        assert_eq!(metric(&slow, "doh_redis_up").await, up_after, "{delay} ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_odoh_key_for_the_fleet() {
    use crate::privacy::{fetch_configs, oblivious};
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let (a, b) = pair(up.addr, &redis, |c| {
        c.odoh = true;
        c.odoh_rotate_secs = 3;
    })
    .await;
    let same = async || {
        let (x, _) = fetch_configs(&a).await;
        let (y, _) = fetch_configs(&b).await;
        odoh_rs::compose(&x).unwrap() == odoh_rs::compose(&y).unwrap()
    };
    wait_for("one key", same, Duration::from_secs(2)).await;
    let (first, _) = fetch_configs(&a).await;
    // Sealed for A, opened by B.
    let m = oblivious(&b, &first, query("www.example.test", 1, 9))
        .await
        .unwrap();
    assert_eq!(m.answers[0].data.to_string(), "192.0.2.1");
    // Rotated by one instance, followed by the other.
    wait_for(
        "rotated",
        async || {
            odoh_rs::compose(&fetch_configs(&b).await.0).unwrap()
                != odoh_rs::compose(&first).unwrap()
        },
        Duration::from_secs(6),
    )
    .await;
    wait_for("one key again", same, Duration::from_secs(2)).await;
    let (second, _) = fetch_configs(&b).await;
    assert!(oblivious(&a, &second, query("www.example.test", 1, 10))
        .await
        .is_ok());
    assert!(oblivious(&b, &second, query("www.example.test", 1, 11))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_any_instance() {
    use crate::resumption::handshake;
    use rustls::HandshakeKind;
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let (a, b) = pair(up.addr, &redis, |_| {}).await;
    let client = tls_connector(b"http/1.1");
    assert_eq!(
        handshake(&a, &client, "127.0.111.1").await,
        HandshakeKind::Full
    );
    assert_eq!(
        handshake(&b, &client, "127.0.111.1").await,
        HandshakeKind::Resumed
    );
    // An instance started later (a restart) too.
    let c = instance(up.addr, &redis.url(), |_| {}).await;
    wait_for(
        "C connected",
        async || metric(&c, "doh_redis_up").await == 1.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        handshake(&c, &client, "127.0.111.1").await,
        HandshakeKind::Resumed
    );
}

/// A client known to one instance is known to the other (through the
/// sorted set `known`); banned on one, it is unknown to both and leaves the
/// set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_clients_are_known_to_the_fleet() {
    let redis = Redis::start().await;
    let up = MockUpstream::start().await;
    let (a, b) = pair(up.addr, &redis, |c| {
        c.known_after_secs = 2;
        c.ban_after = 3;
    })
    .await;
    let known_on = async |p: &doh_proxy::app::Running, addr: &str| {
        let r = admin(p, "GET", &format!("/known/{addr}"), None).await;
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["known"] == true
    };
    let src = "127.0.96.1";
    wait_for(
        "known on A",
        async || {
            let r = send_from(&a, Proto::PlainH2, src, get(&ok_path("www.example.test"))).await;
            assert_eq!(r.unwrap().status, 200);
            known_on(&a, src).await
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(!known_on(&b, "127.0.96.2").await);
    wait_for(
        "known on B",
        async || known_on(&b, src).await,
        Duration::from_secs(10),
    )
    .await;
    // Banned on B: unknown on both, and out of the fleet's set.
    for _ in 0..3 {
        let _ = send_from(&b, Proto::PlainH2, src, get("/dns-query?ct=x")).await;
    }
    wait_for(
        "unknown on A",
        async || !known_on(&a, src).await,
        Duration::from_secs(5),
    )
    .await;
    assert!(!known_on(&b, src).await);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    wait_for(
        "out of the set",
        async || {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg("doh-proxy:known")
                .arg(src)
                .query_async(&mut conn)
                .await
                .unwrap();
            score.is_none()
        },
        Duration::from_secs(5),
    )
    .await;
}
