//! Known clients first (incident 1): regular clients keep their answers
//! while a crowd of new addresses spends the upstream budget; what makes a
//! client known, what makes it unknown again, and where known clients are
//! kept (the state file, the fleet's Redis is in `fleet.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use doh_proxy::app::Running;

use crate::common::*;

/// Regular clients: 127.0.40.1–10.
fn regular(i: usize) -> String {
    format!("127.0.40.{}", i + 1)
}

/// What `GET /known/ADDR` says.
async fn known(p: &Running, addr: &str) -> serde_json::Value {
    let r = admin(p, "GET", &format!("/known/{addr}"), None).await;
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

async fn is_known(p: &Running, addr: &str) -> bool {
    known(p, addr).await["known"] == true
}

/// One GET from `source` on a fresh plain HTTP/2 connection; its status.
async fn ask(p: &Running, source: &str, name: &str) -> u16 {
    match send_from(p, Proto::PlainH2, source, get(&ok_path(name))).await {
        Ok(r) => r.status,
        Err(_) => 0,
    }
}

/// The first `n` regular clients become known: each is answered, then
/// answered again until it is known (`--known-after-secs` later).
async fn make_known(p: &Running, n: usize) {
    wait_for(
        "the regular clients known",
        async || {
            let mut all = true;
            for i in 0..n {
                assert_eq!(ask(p, &regular(i), "www.example.test").await, 200);
                all &= is_known(p, &regular(i)).await;
            }
            all
        },
        Duration::from_secs(20),
    )
    .await;
}

fn budget_config(c: &mut doh_proxy::config::Config, share: u8) {
    c.upstream_qps = 20;
    c.known_after_secs = 3;
    c.known_share = share;
    // Budgets per client out of the way: the upstream budget is the subject.
    c.per_ip_qps = 10_000;
    c.per_ip_burst = 10_000;
    c.per_prefix_qps = 10_000;
}

/// Incident 1 replayed: 10 known clients each ask 5 new names (one every
/// 1.25 s each: 8 a second in all, within their share of 10) while 300 new addresses ask unique names far past
/// `--upstream-qps 20`. Returns the share of the known clients' names
/// answered, and checks the upstream never saw more than the budget.
async fn through_a_crowd(share: u8, redis: Option<String>) -> f64 {
    let _heavy = heavy().await;
    let up = MockUpstream::start().await;
    let fleet = redis.is_some();
    let p = Arc::new(
        proxy(&[up.addr], |c| {
            budget_config(c, share);
            c.redis = redis;
        })
        .await,
    );
    if fleet {
        wait_for(
            "redis up",
            async || metric(&p, "doh_redis_up").await == 1.0,
            Duration::from_secs(5),
        )
        .await;
    }
    make_known(&p, 10).await;
    // The crowd must not become known within the test: from now on a new
    // client needs a day (the default), as in the incident.
    let mut g = (*p.app.guard.settings()).clone();
    g.known_after_secs = 86_400;
    p.app.guard.reconfigure(g);
    let start = Instant::now();
    let before = up.total.load(Ordering::SeqCst);
    let crowd_for = Duration::from_secs(8);
    let mut crowd = Vec::new();
    for a in 0..300 {
        let p = p.clone();
        crowd.push(tokio::spawn(async move {
            let source = format!("127.41.{}.{}", a / 200, a % 200 + 1);
            let Ok(mut c) =
                Client::connect(&p, Proto::PlainH2, Some(source.parse().unwrap())).await
            else {
                return (0, 0);
            };
            let (mut ok, mut asked) = (0, 0);
            let mut i = 0;
            // A query every 150 ms from each address.
            let mut every = tokio::time::interval(Duration::from_millis(150));
            while start.elapsed() < crowd_for {
                every.tick().await;
                let name = format!("c{a}-{i}.crowd.test");
                i += 1;
                if let Ok(r) = c.send(get(&ok_path(&name))).await {
                    asked += 1;
                    ok += usize::from(r.status == 200);
                }
            }
            (ok, asked)
        }));
    }
    // Once the crowd has spent the budget, the regular clients ask their
    // names.
    wait_for(
        "the crowd past the budget",
        async || metric(&p, "doh_upstream_budget_refused_total{client=\"new\"}").await > 0.0,
        Duration::from_secs(5),
    )
    .await;
    let mut regulars = Vec::new();
    for i in 0..10 {
        let p = p.clone();
        regulars.push(tokio::spawn(async move {
            let mut ok = 0;
            // A name every 1.25 s from each regular client.
            let mut every = tokio::time::interval(Duration::from_millis(1250));
            for n in 0..5 {
                every.tick().await;
                ok += usize::from(
                    ask(&p, &regular(i), &format!("r{i}-{n}.regular.test")).await == 200,
                );
            }
            every.tick().await;
            ok
        }));
    }
    let mut regular_ok = 0;
    for r in regulars {
        regular_ok += r.await.unwrap();
    }
    let (mut crowd_ok, mut crowd_asked) = (0, 0);
    for c in crowd {
        let (ok, asked) = c.await.unwrap();
        crowd_ok += ok;
        crowd_asked += asked;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = up.total.load(Ordering::SeqCst) - before;
    // The budget, its one-second burst (in a fleet: the second under way
    // and one lease), and the health probes.
    let allowed = 20.0 * (elapsed + 1.0) + 4.0 + if fleet { 2.0 } else { 0.0 };
    assert!(
        sent as f64 <= allowed,
        "{sent} upstream queries in {elapsed:.1} s"
    );
    assert!(crowd_asked > 2_000, "a crowd: {crowd_asked} asked");
    let crowd_share = crowd_ok as f64 / crowd_asked as f64;
    assert!(
        crowd_share < 0.3,
        "the crowd is past the budget: {crowd_share}"
    );
    eprintln!(
        "share {share}%: known clients {regular_ok}/50 answered, the crowd {crowd_ok}/{crowd_asked}, upstream {sent} in {elapsed:.1} s"
    );
    let refused_known = metric(&p, "doh_upstream_budget_refused_total{client=\"known\"}").await;
    let refused_new = metric(&p, "doh_upstream_budget_refused_total{client=\"new\"}").await;
    assert!(refused_new > 1_000.0, "{refused_new}");
    assert_eq!(
        refused_known as usize,
        50 - regular_ok,
        "every refused known miss counted as known"
    );
    regular_ok as f64 / 50.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_clients_keep_their_answers_through_a_crowd() {
    let got = through_a_crowd(50, None).await;
    assert!(got >= 0.9, "known clients got {:.0} %", got * 100.0);
}

/// The same with the budget leased from Redis (`--redis`): the share is
/// part of the fleet's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_known_clients_keep_their_share_of_its_budget() {
    let redis = Redis::start().await;
    let got = through_a_crowd(50, Some(redis.url())).await;
    assert!(got >= 0.9, "known clients got {:.0} %", got * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_share_known_clients_go_down_with_the_crowd() {
    let got = through_a_crowd(0, None).await;
    assert!(got < 0.5, "known clients got {:.0} %", got * 100.0);
}

/// Asked once and never again: remembered, never known, while a client
/// answered again past `--known-after-secs` is. A ban makes a known
/// client unknown; lifting the ban does not make it known again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_after_the_delay_unknown_once_banned() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        budget_config(c, 50);
        c.ban_after = 3;
    })
    .await;
    let once = "127.0.42.1";
    assert_eq!(ask(&p, once, "www.example.test").await, 200);
    let first = known(&p, once).await;
    assert_eq!(first["remembered"], true);
    assert_eq!(first["known"], false);
    make_known(&p, 2).await;
    // Three seconds and more have passed: the once-only client is not known.
    assert!(!is_known(&p, once).await);
    assert_eq!(known(&p, "127.0.42.99").await["remembered"], false);
    wait_for(
        "doh_known_clients 2",
        async || metric(&p, "doh_known_clients").await == 2.0,
        Duration::from_secs(5),
    )
    .await;
    // Banned for malformed requests: unknown at once.
    let target = regular(0);
    for _ in 0..3 {
        let _ = send_from(&p, Proto::PlainH2, &target, get("/dns-query?ct=x")).await;
    }
    wait_for(
        "banned",
        async || !p.app.guard.bans().is_empty(),
        Duration::from_secs(5),
    )
    .await;
    assert!(!is_known(&p, &target).await, "a ban makes it unknown");
    assert!(is_known(&p, &regular(1)).await, "the other one stays");
    let r = admin(&p, "DELETE", &format!("/bans/{target}"), None).await;
    assert_eq!(r.status, 200);
    assert!(
        !is_known(&p, &target).await,
        "lifting the ban does not make it known"
    );
    assert_eq!(ask(&p, &target, "www.example.test").await, 200);
    assert!(!is_known(&p, &target).await, "it starts over");
    // Bad addresses are refused, not looked up.
    assert_eq!(admin(&p, "GET", "/known/nope", None).await.status, 400);
    assert_eq!(
        admin(&p, "POST", "/known/127.0.0.1", None).await.status,
        405
    );
}

/// Known clients are written beside `--state-file` and read back by the
/// next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_clients_survive_a_restart() {
    let up = MockUpstream::start().await;
    let dir = scratch("known-restart");
    let state = dir.join("state.json");
    let p = proxy(&[up.addr], |c| {
        budget_config(c, 50);
        c.state_file = Some(state.clone());
    })
    .await;
    make_known(&p, 3).await;
    let once = "127.0.42.7";
    assert_eq!(ask(&p, once, "www.example.test").await, 200);
    p.stop().await;
    let q = proxy(&[up.addr], |c| {
        budget_config(c, 50);
        c.state_file = Some(state.clone());
    })
    .await;
    for i in 0..3 {
        assert!(
            is_known(&q, &regular(i)).await,
            "{} known again",
            regular(i)
        );
    }
    assert!(!is_known(&q, once).await, "only known clients are kept");
    wait_for(
        "doh_known_clients 3",
        async || metric(&q, "doh_known_clients").await == 3.0,
        Duration::from_secs(5),
    )
    .await;
}
