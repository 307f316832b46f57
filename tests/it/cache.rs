//! The cache that spares the upstream: coalescing, TTL floor, negative
//! caching, serve-stale, bounded size. The upstream counts every query.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use doh_proxy::cache::{Cache, Entry, TtlPolicy};
use doh_proxy::dns::Key;
use hickory_proto::op::ResponseCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_misses_one_upstream_query() {
    let up = MockUpstream::start().await;
    let p = Arc::new(proxy(&[up.addr], |c| c.per_ip_burst = 1000).await);
    let mut tasks = Vec::new();
    for conn in 0..4 {
        let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
        let c2 = match &c {
            Client::H2(s) => s.clone(),
            _ => unreachable!(),
        };
        for i in 0..50u16 {
            let mut s = Client::H2(c2.clone());
            let id = conn * 50 + i;
            tasks.push(tokio::spawn(async move {
                s.send(get(&get_path(&query("slow.example.test", 1, id))))
                    .await
                    .map(|r| (id, r))
            }));
        }
        // keep the first handle alive
        tasks.push(tokio::spawn(async move {
            c.send(get(&get_path(&query("slow.example.test", 1, 9999))))
                .await
                .map(|r| (9999, r))
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (id, r) = t.await.unwrap().unwrap();
        assert_eq!(r.status, 200);
        let m = r.dns();
        assert_eq!(m.metadata.id, id);
        assert_eq!(m.answers[0].data.to_string(), "192.0.2.7");
        ok += 1;
    }
    assert_eq!(ok, 204);
    // One resolution: the query, and at most one retransmission while it
    // waited (the mock answers after 300 ms).
    assert!(
        up.count("slow.example.test.") <= 2,
        "{}",
        up.count("slow.example.test.")
    );
    assert!(metric(&p, "doh_coalesced_total").await >= 150.0);
}

#[tokio::test]
async fn ttl_floor_keeps_answers_cached() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.min_ttl = 1800).await;
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("short.example.test", 1, 1))),
    )
    .await;
    let ttl = r.dns().answers[0].ttl;
    assert!(ttl >= 1790, "served TTL {ttl}");
    assert_eq!(r.max_age(), ttl);
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("long.example.test", 1, 1))),
    )
    .await;
    let long_before = r.dns().answers[0].ttl;
    assert_eq!(long_before, 3600);
    p.app.clock.advance(Duration::from_secs(6));
    let r = send(
        &p,
        Proto::H1,
        get(&get_path(&query("short.example.test", 1, 2))),
    )
    .await;
    let later = r.dns().answers[0].ttl;
    assert_eq!(
        up.count("short.example.test."),
        1,
        "still from cache 6 s later"
    );
    // SPEC: served TTLs never go below the floor.
    assert!((1790..=1800).contains(&later), "served TTL {later}");
    let r = send(
        &p,
        Proto::H1,
        get(&get_path(&query("long.example.test", 1, 2))),
    )
    .await;
    let long_after = r.dns().answers[0].ttl;
    assert!(
        long_after < long_before && long_after >= 3590,
        "{long_before} -> {long_after}"
    );
    assert_eq!(r.max_age(), long_after);
}

#[tokio::test]
async fn ttl_ceiling() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.max_ttl = 60).await;
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("long.example.test", 1, 1))),
    )
    .await;
    assert_eq!(r.dns().answers[0].ttl, 60);
    assert_eq!(r.max_age(), 60);
}

#[tokio::test]
async fn negative_answers_are_cached_per_rfc2308() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    for id in 0..3 {
        let r = send(
            &p,
            Proto::H2,
            get(&get_path(&query("nx.example.test", 1, id))),
        )
        .await;
        let m = r.dns();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.authorities[0].ttl <= 5, "SOA TTL is the negative TTL");
        assert!(r.max_age() <= 5);
    }
    assert_eq!(up.count("nx.example.test."), 1);
    for id in 0..3 {
        let r = send(
            &p,
            Proto::H2,
            get(&get_path(&query("nodata.example.test", 28, id))),
        )
        .await;
        assert_eq!(r.dns().metadata.response_code, ResponseCode::NoError);
    }
    assert_eq!(up.count("nodata.example.test."), 1, "NODATA cached too");
}

#[tokio::test]
async fn upstream_down_serves_stale_and_servfail_for_the_rest() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.upstream_timeout = 500).await;
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("short.example.test", 1, 1))),
    )
    .await;
    assert_eq!(r.dns().answers[0].ttl, 5);
    up.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    p.app.clock.advance(Duration::from_millis(5200));
    let before = up.total.load(std::sync::atomic::Ordering::SeqCst);
    let timeouts = format!(
        "doh_upstream_queries_total{{upstream=\"{}\",result=\"timeout\"}}",
        up.addr
    );
    let tries_before = metric(&p, &timeouts).await;
    for id in 0..10 {
        let t = std::time::Instant::now();
        let r = send(
            &p,
            Proto::H2,
            get(&get_path(&query("short.example.test", 1, id))),
        )
        .await;
        assert!(t.elapsed() < Duration::from_millis(900));
        let m = r.dns();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers[0].data.to_string(), "192.0.2.5");
        assert_eq!(m.answers[0].ttl, 30, "stale answers carry TTL 30");
    }
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("uncached.example.test", 1, 1))),
    )
    .await;
    assert_eq!(r.dns().metadata.response_code, ResponseCode::ServFail);
    assert!(metric(&p, "doh_cache_stale_total").await >= 9.0);
    // Paused, the mock counts nothing; the proxy tried the stale name once.
    assert_eq!(up.total.load(std::sync::atomic::Ordering::SeqCst), before);
    let tries = metric(&p, &timeouts).await - tries_before;
    // One refresh of the stale entry, two attempts for the uncached name,
    // and possibly health probes: never one per request.
    assert!(tries <= 6.0, "{tries} upstream attempts for 11 requests");
}

/// A proxy with a cache of 50 entries, its client budgets out of the way.
async fn small_cache_proxy(up: &MockUpstream) -> Running {
    proxy(&[up.addr], |c| {
        c.cache_size = 50;
        c.per_ip_burst = 10_000;
        c.per_ip_qps = 10_000;
        c.per_prefix_qps = 10_000;
    })
    .await
}

#[tokio::test]
async fn cache_size_bounds_the_cache_through_the_proxy() {
    let up = MockUpstream::start().await;
    let p = small_cache_proxy(&up).await;
    let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
    for i in 0..500 {
        let r = c
            .send(get(&get_path(&query(&format!("n{i}.example.test"), 1, 1))))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    p.app.cache.sync();
    assert!(p.app.cache.len() <= 50, "{}", p.app.cache.len());
}

/// Once the cache is full, a name asked for the first time is answered
/// but not kept (a flood of names asked once each would only churn it);
/// asked again, it is kept like any other.
#[tokio::test]
async fn a_full_cache_keeps_a_new_name_from_its_second_query() {
    let up = MockUpstream::start().await;
    let p = small_cache_proxy(&up).await;
    let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
    let mut ask = async |name: &str| {
        let r = c.send(get(&get_path(&query(name, 1, 1)))).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.dns().answers.len(), 1);
    };
    for i in 0..60 {
        ask(&format!("fill{i}.example.test")).await;
    }
    p.app.cache.sync();
    assert!(p.app.cache.len() >= 49, "{}", p.app.cache.len());
    let declined = metric(&p, "doh_cache_declined_total").await;
    for _ in 0..3 {
        ask("twice.example.test").await;
    }
    assert_eq!(
        up.count("twice.example.test."),
        2,
        "kept from the second query on, not the first"
    );
    assert_eq!(metric(&p, "doh_cache_declined_total").await - declined, 1.0);
}

#[test]
fn a_million_names_stay_within_cache_size() {
    let policy = TtlPolicy {
        min_ttl: 1800,
        max_ttl: 86400,
        err_ttl: 2,
        stale_secs: 86400,
    };
    let cache = Cache::with_entries(10_000, policy);
    for i in 0..1_000_000u32 {
        let key = Key::new(&format!("n{i}.example.test"), 1, true).unwrap();
        cache.store(
            key.clone(),
            Entry::failure(&key, &policy, tokio::time::Instant::now()),
        );
        if i % 100_000 == 0 {
            cache.sync();
            assert!(cache.len() <= 10_000);
        }
    }
    cache.sync();
    assert!(cache.len() <= 10_000, "{}", cache.len());
}

#[tokio::test]
async fn spent_upstream_budget_serves_stale_then_503() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.upstream_qps = 1).await;
    // Let the start-up health probe spend its token and the bucket refill.
    probed(&p).await;
    p.app.clock.advance(Duration::from_millis(1100));
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("short.example.test", 1, 1))),
    )
    .await;
    assert_eq!(r.dns().answers[0].ttl, 5);
    p.app.clock.advance(Duration::from_millis(5100));
    // Spend the budget on a new name, then ask for the expired one at once.
    let _ = send(
        &p,
        Proto::H2,
        get(&get_path(&query("spend.example.test", 1, 2))),
    )
    .await;
    let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
    let mut stale = 0;
    let mut refused = 0;
    for i in 0..5 {
        let r = c
            .send(get(&get_path(&query("short.example.test", 1, i))))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "a stale answer rather than 503");
        if r.dns().answers[0].ttl == 30 {
            stale += 1;
        }
        let r = c
            .send(get(&get_path(&query(
                &format!("new{i}.example.test"),
                1,
                i,
            ))))
            .await
            .unwrap();
        if r.status == 503 {
            assert!(r.header("retry-after").is_some());
            refused += 1;
        }
    }
    assert!(stale >= 4, "{stale} stale answers");
    assert!(
        refused >= 4,
        "{refused} of 5 uncached names refused with 503"
    );
    assert!(metric(&p, "doh_upstream_budget_exhausted_total").await >= 4.0);
}

#[tokio::test]
async fn popular_entries_are_prefetched_before_they_expire() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.min_ttl = 10;
        c.max_ttl = 10;
    })
    .await;
    let ask = || send(&p, Proto::H2, get(&ok_path("www.example.test")));
    assert_eq!(ask().await.status, 200); // miss
    assert_eq!(ask().await.status, 200); // hit
    p.app.clock.advance(Duration::from_millis(9200));
    // A hit in the last tenth of the lifetime refreshes in the background.
    assert_eq!(
        ask().await.dns().answers[0].ttl,
        10,
        "never below the floor"
    );
    wait_for(
        "refreshed ahead of expiry",
        async || up.count("www.example.test.") == 2,
        Duration::from_secs(5),
    )
    .await;
    // Past the first entry's expiry, the refreshed one answers: no miss.
    p.app.clock.advance(Duration::from_millis(1200));
    assert_eq!(ask().await.status, 200);
    assert_eq!(metric(&p, "doh_cache_misses_total").await, 1.0);
    assert_eq!(metric(&p, "doh_cache_stale_total").await, 0.0);
    assert_eq!(up.count("www.example.test."), 2);
}
