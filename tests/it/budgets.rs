//! Request budgets against real connections from 127.x.y.z source
//! addresses: per address, shared by all of a client's connections, per
//! prefix, and per forwarded client behind a trusted proxy.

use std::time::Instant;

use crate::common::*;

#[tokio::test]
async fn flooder_gets_429_while_its_neighbour_is_served() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_ip_qps = 5;
        c.per_ip_burst = 10;
        c.ban_after = 10_000;
    })
    .await;
    let mut flooder = Client::connect(&p, Proto::H2, Some("127.0.10.1".parse().unwrap()))
        .await
        .unwrap();
    let mut limited = 0;
    for _ in 0..40 {
        let r = flooder
            .send(get(&ok_path("www.example.test")))
            .await
            .unwrap();
        if r.status == 429 {
            limited += 1;
            let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!(after >= 1);
        }
    }
    assert!(limited >= 25, "{limited} of 40 limited");
    for neighbour in ["127.0.10.2", "127.0.11.1"] {
        let r = send_from(&p, Proto::H2, neighbour, get(&ok_path("www.example.test")))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{neighbour}");
    }
    assert_eq!(
        metric(&p, "doh_requests_total{outcome=\"rate_limited\"}").await,
        limited as f64
    );
}

/// A client's budget is one, however many connections it spreads its
/// requests over (each connection holds its client's bucket from one
/// request to the next: the same bucket); behind a trusted proxy, each
/// client a connection forwards spends its own.
#[tokio::test]
async fn a_budget_is_the_clients_not_its_connections() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_ip_qps = 1;
        c.per_ip_burst = 6;
        c.ban_after = 10_000;
        c.trusted_proxy = vec!["127.0.16.1".parse().unwrap()];
    })
    .await;
    let from = Some("127.0.16.9".parse().unwrap());
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(Client::connect(&p, Proto::H2, from).await.unwrap());
    }
    let started = Instant::now();
    let mut served = 0;
    for i in 0..18 {
        let r = conns[i % 3]
            .send(get(&ok_path("www.example.test")))
            .await
            .unwrap();
        if r.status == 200 {
            served += 1;
        } else {
            assert_eq!(r.status, 429);
        }
    }
    // The burst, and one a second since: 18 (six a connection) if each
    // connection had a budget of its own.
    let most = 6 + started.elapsed().as_secs() + 1;
    assert!(
        (6..=most).contains(&served),
        "{served} of 18 served, at most {most} expected"
    );

    let mut via = Client::connect(&p, Proto::H2, Some("127.0.16.1".parse().unwrap()))
        .await
        .unwrap();
    let mut limited = false;
    for _ in 0..12 {
        let r = via
            .send(get_xff(&ok_path("www.example.test"), "198.51.100.7"))
            .await
            .unwrap();
        if r.status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "a forwarded client has a budget");
    for other in ["198.51.100.8", "198.51.100.7, 198.51.100.9"] {
        let r = via
            .send(get_xff(&ok_path("www.example.test"), other))
            .await
            .unwrap();
        assert_eq!(
            r.status, 200,
            "{other}: its own budget, on the same connection"
        );
    }
}

#[tokio::test]
async fn prefix_budget_holds_many_addresses_of_one_prefix() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_prefix_qps = 4; // burst 20 for the /24
        c.ban_after = 10_000;
    })
    .await;
    let mut statuses = Vec::new();
    for i in 1..=40 {
        let r = send_from(
            &p,
            Proto::H1,
            &format!("127.0.20.{i}"),
            get(&ok_path("www.example.test")),
        )
        .await
        .unwrap();
        statuses.push(r.status);
    }
    assert!(
        statuses.iter().filter(|s| **s == 429).count() >= 15,
        "{statuses:?}"
    );
    let r = send_from(
        &p,
        Proto::H1,
        "127.0.21.1",
        get(&ok_path("www.example.test")),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "another prefix is served");
}
