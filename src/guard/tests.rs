use super::*;
use crate::net::UNKNOWN_CLIENT;
use std::time::Duration;

fn guard(change: impl FnOnce(&mut GuardSettings)) -> Arc<Guard> {
    let s = GuardSettings::for_tests(change);
    Arc::new(Guard::new(s, Arc::new(Metrics::new())))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn connection_caps_per_ip_and_release() {
    let g = guard(|s| s.max_conns_per_ip = 2);
    let a = g.admit(ip("127.0.0.2")).unwrap();
    let _b = g.admit(ip("127.0.0.2")).unwrap();
    assert_eq!(g.admit(ip("127.0.0.2")).err(), Some(ConnReject::PerIp));
    assert!(g.admit(ip("127.0.1.2")).is_ok());
    drop(a);
    assert!(g.admit(ip("127.0.0.2")).is_ok());
}

#[test]
fn prefix_cap_is_eight_times_the_address_cap() {
    let g = guard(|s| s.max_conns_per_ip = 1);
    let held: Vec<_> = (1..=8)
        .map(|i| g.admit(ip(&format!("127.0.5.{i}"))).unwrap())
        .collect();
    assert_eq!(g.admit(ip("127.0.5.9")).err(), Some(ConnReject::PerPrefix));
    drop(held);
    assert!(g.admit(ip("127.0.5.9")).is_ok());
}

#[test]
fn allowlist_is_never_capped_limited_or_banned() {
    let g = guard(|s| {
        (
            s.max_conns_per_ip,
            s.per_ip_qps,
            s.per_ip_burst,
            s.ban_after,
        ) = (1, 1, 1, 2);
        s.allow = vec!["127.0.0.9/32".parse().unwrap()];
    });
    let _held: Vec<_> = (0..5).map(|_| g.admit(ip("127.0.0.9")).unwrap()).collect();
    for _ in 0..50 {
        assert_eq!(g.check_budget(ip("127.0.0.9")), Budget::Ok);
        g.penalize(ip("127.0.0.9"), Reject::ObsoleteDraft);
    }
    assert!(g.bans().is_empty());
    g.ban(IpNet::from(ip("127.0.0.9")), "manual");
    g.ban("127.0.0.0/24".parse().unwrap(), "prefix");
    assert!(g.bans().is_empty(), "no ban covers an allowlisted range");
    assert!(g.admit(ip("127.0.0.9")).is_ok());
    assert_eq!(g.banned(ip("127.0.0.9")), Verdict::Pass);
}

#[test]
fn budget_then_429() {
    let g = guard(|s| (s.per_ip_qps, s.per_ip_burst) = (1, 3));
    for _ in 0..3 {
        assert_eq!(g.check_budget(ip("127.0.0.3")), Budget::Ok);
    }
    assert!(matches!(g.check_budget(ip("127.0.0.3")), Budget::Over(s) if s >= 1));
    assert_eq!(g.check_budget(ip("127.0.0.4")), Budget::Ok);
}

#[tokio::test(start_paused = true)]
async fn penalty_box_bans_then_expires() {
    let g = guard(|s| (s.ban_after, s.ban_secs) = (3, 1));
    for _ in 0..2 {
        g.penalize(ip("127.0.0.5"), Reject::ObsoleteDraft);
    }
    g.penalize(ip("127.0.0.5"), Reject::UpstreamBudget); // not scored
    assert!(g.admit(ip("127.0.0.5")).is_ok());
    g.penalize(ip("127.0.0.5"), Reject::NotFound);
    assert_eq!(g.admit(ip("127.0.0.5")).err(), Some(ConnReject::Banned));
    assert_eq!(g.banned(ip("127.0.0.5")), Verdict::Refuse);
    assert_eq!(g.bans()[0].target, "127.0.0.5/32");
    assert_eq!(g.bans()[0].reason, "not_found");
    tokio::time::advance(Duration::from_millis(1100)).await;
    g.tick();
    assert!(g.admit(ip("127.0.0.5")).is_ok());
    assert!(g.bans().is_empty());
}

#[tokio::test(start_paused = true)]
async fn repeat_offenders_get_longer_bans() {
    let g = guard(|s| (s.ban_after, s.ban_secs) = (1, 10));
    g.penalize(ip("127.0.0.6"), Reject::BadBase64);
    let first = g.bans()[0].remaining_secs;
    assert!(g.unban("127.0.0.6/32".parse().unwrap()));
    g.penalize(ip("127.0.0.6"), Reject::BadBase64);
    let second = g.bans()[0].remaining_secs;
    assert!(first <= 10 && second >= 19, "{first} {second}");
}

#[test]
fn eight_banned_hosts_ban_their_prefix() {
    let g = guard(|s| s.ban_after = 1);
    for i in 1..=8 {
        g.penalize(ip(&format!("127.9.9.{i}")), Reject::ObsoleteDraft);
    }
    assert!(g.bans().iter().any(|b| b.target == "127.9.9.0/24"));
    assert_eq!(g.admit(ip("127.9.9.200")).err(), Some(ConnReject::Banned));
    assert!(g.admit(ip("127.9.8.1")).is_ok());
}

#[test]
fn connection_rate_refusals_score() {
    let g = guard(|s| (s.per_ip_conn_rate, s.ban_after) = (1, 3));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match g.admit(ip("127.0.7.1")) {
            Ok(t) => held.push(t),
            Err(ConnReject::ConnRate) => refused += 1,
            Err(ConnReject::Banned) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(held.len(), 5, "burst of 5 s at 1/s");
    assert_eq!(refused, 3);
    assert_eq!(g.bans()[0].reason, "conn_rate");
}

#[test]
fn dry_run_enforces_nothing() {
    let g = guard(|s| {
        s.dry_run = true;
        (
            s.max_conns_per_ip,
            s.per_ip_qps,
            s.per_ip_burst,
            s.ban_after,
        ) = (1, 1, 1, 1);
    });
    let _a = g.admit(ip("127.0.0.7")).unwrap();
    assert!(g.admit(ip("127.0.0.7")).is_ok());
    assert_eq!(g.check_budget(ip("127.0.0.7")), Budget::Ok);
    assert_eq!(g.check_budget(ip("127.0.0.7")), Budget::DryRun);
    g.penalize(ip("127.0.0.7"), Reject::ObsoleteDraft);
    assert!(g.bans().is_empty());
    let text = g.metrics.encode();
    assert!(
        text.contains("doh_bans_total{kind=\"address\",dry_run=\"true\"} 1"),
        "{text}"
    );
    assert!(text.contains("doh_connections_rejected_total{reason=\"per_ip\",dry_run=\"true\"} 1"));
}

#[test]
fn forwarded_for_only_from_trusted_peers() {
    let g = guard(|s| {
        s.trusted = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ]
    });
    let mut h = HeaderMap::new();
    h.insert("x-forwarded-for", "203.0.113.7, 10.1.1.1".parse().unwrap());
    assert_eq!(g.client_of(ip("127.0.0.1"), None, &h), ip("203.0.113.7"));
    assert_eq!(g.client_of(ip("127.0.0.2"), None, &h), ip("127.0.0.2"));
    let mut junk = HeaderMap::new();
    junk.insert("x-forwarded-for", "nonsense".parse().unwrap());
    assert_eq!(g.client_of(ip("127.0.0.1"), None, &junk), UNKNOWN_CLIENT);
    // A PROXY header alone names the client; forwarding headers are ignored.
    assert_eq!(
        g.client_of(ip("127.0.0.1"), Some(Some(ip("198.51.100.9"))), &h),
        ip("198.51.100.9")
    );
    assert_eq!(g.client_of(ip("127.0.0.1"), Some(None), &h), UNKNOWN_CLIENT);
}

#[test]
fn the_unknown_key_is_limited_like_any_client() {
    let g = guard(|s| {
        s.trusted = vec!["127.0.0.1/32".parse().unwrap()];
        (s.per_ip_qps, s.per_ip_burst, s.ban_after) = (1, 2, 3);
    });
    assert_eq!(g.check_budget(UNKNOWN_CLIENT), Budget::Ok);
    assert_eq!(g.check_budget(UNKNOWN_CLIENT), Budget::Ok);
    assert!(matches!(g.check_budget(UNKNOWN_CLIENT), Budget::Over(_)));
    for _ in 0..3 {
        g.penalize(UNKNOWN_CLIENT, Reject::BadBase64);
    }
    assert_eq!(g.banned(UNKNOWN_CLIENT), Verdict::Refuse);
    assert_eq!(g.bans()[0].target, "unknown");
    assert!(g.bans.for_firewall().is_empty(), "not for the firewall");
}

#[test]
fn limiter_state_stays_bounded() {
    let g = guard(|_| {});
    for i in 0..200_000u32 {
        let a = IpAddr::V4(std::net::Ipv4Addr::from(0x7F00_0000 | i));
        g.check_budget(a);
    }
    assert!(g.tracked_clients() >= 200_000);
    std::thread::sleep(Duration::from_millis(100));
    g.tick();
    // What remains are the ~800 /24 prefixes, whose buckets refill slower.
    assert!(g.tracked_clients() < 1000, "{}", g.tracked_clients());
}
