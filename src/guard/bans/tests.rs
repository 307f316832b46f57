use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn expire_in_order_and_counts_stay_right() {
    let b = Bans::new(100);
    let p = net("192.0.2.0/24");
    b.add(net("192.0.2.1/32"), "t", 10, Some(p));
    b.add(net("192.0.2.2/32"), "t", 20, Some(p));
    assert_eq!(b.hosts_in(&p), 2);
    assert!(b.covers("192.0.2.1".parse().unwrap()));
    assert!(!b.covers("192.0.2.3".parse().unwrap()));
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(b.expire(), vec![net("192.0.2.1/32")]);
    assert_eq!(b.hosts_in(&p), 1);
    assert!(!b.covers("192.0.2.1".parse().unwrap()));
    assert_eq!(b.views().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_cap_evicts_the_soonest_with_its_bookkeeping() {
    let b = Bans::new(3);
    let p = net("198.51.100.0/24");
    b.add(net("198.51.100.1/32"), "t", 5, Some(p));
    b.add(net("198.51.100.2/32"), "t", 50, Some(p));
    b.add(net("198.51.100.3/32"), "t", 60, Some(p));
    let added = b.add(net("203.0.113.9/32"), "t", 70, None);
    assert_eq!(added.evicted, Some(net("198.51.100.1/32")));
    assert_eq!(b.len(), 3);
    assert_eq!(b.hosts_in(&p), 2, "eviction keeps the per-prefix count");
}

#[tokio::test(start_paused = true)]
async fn eight_hosts_escalate_and_prefix_bans_cover() {
    let b = Bans::new(100);
    let p = net("203.0.113.0/24");
    let mut escalate = None;
    for i in 1..=8 {
        escalate = b
            .add(net(&format!("203.0.113.{i}/32")), "t", 60, Some(p))
            .escalate;
    }
    assert_eq!(escalate, Some(p));
    b.add(p, "prefix", 60, None);
    assert!(b.covers("203.0.113.200".parse().unwrap()));
    assert!(!b.covers("203.0.112.1".parse().unwrap()));
    assert!(b.remove(&p));
    assert!(!b.covers("203.0.113.200".parse().unwrap()));
}
