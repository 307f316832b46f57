use super::*;
fn settings(change: impl FnOnce(&mut GuardSettings)) -> GuardSettings {
    GuardSettings::for_tests(change)
}

fn limited(ip: &str) -> Candidate {
    Candidate {
        ip: ip.parse().unwrap(),
        rated: true,
        capped: true,
        global: true,
        exempt: false,
        known: false,
    }
}

fn admission(s: &GuardSettings) -> Arc<Admission> {
    Arc::new(Admission::new(s, Arc::new(Metrics::new())))
}

#[tokio::test(start_paused = true)]
async fn the_longest_idle_connection_gives_way() {
    let s = settings(|s| (s.max_conns, s.per_ip_conn_rate) = (3, 1000));
    let a = admission(&s);
    let t1 = a.admit(limited("192.0.2.1"), &s).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let t2 = a.admit(limited("192.0.2.2"), &s).unwrap();
    let (_, busy) = t2.conn().begin();
    let t3 = a.admit(limited("192.0.2.3"), &s).unwrap();
    // Full: the oldest idle one (t1) is closed, the busy one never.
    let t4 = a.admit(limited("198.51.100.1"), &s).unwrap();
    assert!(t1.conn().is_closing());
    assert!(!t2.conn().is_closing());
    assert_eq!(a.open(), 3);
    drop(t1);
    assert_eq!(a.open(), 3, "an evicted ticket is not uncounted twice");
    // t3 and t4 idle, t2 busy: t3 goes next (older).
    let _t5 = a.admit(limited("198.51.100.2"), &s).unwrap();
    assert!(t3.conn().is_closing() && !t4.conn().is_closing());
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn a_known_clients_connection_goes_last() {
    let s = settings(|s| (s.max_conns, s.per_ip_conn_rate) = (2, 1000));
    let a = admission(&s);
    let known = a
        .admit(
            Candidate {
                known: true,
                ..limited("192.0.2.1")
            },
            &s,
        )
        .unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    let new = a.admit(limited("192.0.2.2"), &s).unwrap();
    // The known client's connection is the idlest, but the new one goes.
    let _third = a.admit(limited("192.0.2.3"), &s).unwrap();
    assert!(new.conn().is_closing());
    assert!(!known.conn().is_closing());
    // The newest connection goes next, still before the known one.
    let third = _third;
    let _fourth = a.admit(limited("192.0.2.4"), &s).unwrap();
    assert!(third.conn().is_closing() && !known.conn().is_closing());
}

#[tokio::test(start_paused = true)]
async fn all_busy_means_refused() {
    let s = settings(|s| s.max_conns = 1);
    let a = admission(&s);
    let t1 = a.admit(limited("192.0.2.1"), &s).unwrap();
    let _busy = t1.conn().begin();
    assert_eq!(
        a.admit(limited("192.0.2.2"), &s).err(),
        Some(ConnReject::Global)
    );
}

#[tokio::test(start_paused = true)]
async fn wider_network_cap() {
    // max_conns 64: a /16 holds at most max(64/4, 8*2) = 16.
    let s = settings(|s| {
        (s.max_conns, s.max_conns_per_ip) = (64, 2);
        (s.per_ip_conn_rate, s.per_prefix_conn_rate) = (1000, 1000);
    });
    let a = admission(&s);
    let mut held = Vec::new();
    for i in 0..16 {
        held.push(a.admit(limited(&format!("10.9.{i}.1")), &s).unwrap());
    }
    assert_eq!(
        a.admit(limited("10.9.200.1"), &s).err(),
        Some(ConnReject::PerNetwork)
    );
    assert!(a.admit(limited("10.8.0.1"), &s).is_ok());
}

#[tokio::test(start_paused = true)]
async fn connection_rate_per_address() {
    let s = settings(|s| s.per_ip_conn_rate = 2);
    let a = admission(&s);
    let mut ok = 0;
    for _ in 0..30 {
        if a.admit(limited("192.0.2.9"), &s).is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "burst of 5 s at 2/s");
    assert!(a.admit(limited("192.0.2.10"), &s).is_ok());
}

#[tokio::test(start_paused = true)]
async fn watchdog_deadlines_follow_requests_only() {
    let c = Conn::detached("192.0.2.1".parse().unwrap());
    let first = Duration::from_secs(5);
    let idle = Duration::from_secs(30);
    let write = Duration::from_secs(10);
    let (at, why) = c.deadline(first, idle, write).unwrap();
    assert_eq!(why, Expiry::FirstRequest);
    assert_eq!(at, c.born + first);
    tokio::time::advance(Duration::from_secs(2)).await;
    let (_, req) = c.begin();
    assert!(c.deadline(first, idle, write).is_none(), "busy");
    tokio::time::advance(Duration::from_secs(3)).await;
    drop(req);
    let (at, why) = c.deadline(first, idle, write).unwrap();
    assert_eq!(why, Expiry::Idle);
    assert_eq!(at, c.born + Duration::from_secs(5) + idle);
}

#[tokio::test(start_paused = true)]
async fn unread_answers_are_not_busy() {
    let s = settings(|s| (s.max_conns, s.per_ip_conn_rate) = (2, 1000));
    let a = admission(&s);
    let (first, idle, write) = (
        Duration::from_secs(5),
        Duration::from_secs(30),
        Duration::from_secs(10),
    );
    let reader = a.admit(limited("192.0.2.1"), &s).unwrap();
    let stuck = a.admit(limited("192.0.2.2"), &s).unwrap();
    // The stuck client: a request in flight, ten answers it never takes.
    let c = stuck.conn();
    let (_, busy) = c.begin();
    let unread: Vec<_> = (0..10).map(|_| c.queued()).collect();
    let (at, why) = c.deadline(first, idle, write).unwrap();
    assert_eq!((at, why), (c.born + write, Expiry::Stuck));
    // The reader takes its answers as they come.
    tokio::time::advance(Duration::from_secs(3)).await;
    drop(reader.conn().begin());
    // At the cap the stuck one goes first, though a request is in flight.
    let _t3 = a.admit(limited("198.51.100.1"), &s).unwrap();
    assert!(stuck.conn().is_closing() && !reader.conn().is_closing());
    // Taking one answer is progress: the deadline moves.
    drop(unread);
    drop(busy);
    let (_, why) = c.deadline(first, idle, write).unwrap();
    assert_eq!(why, Expiry::Idle);
}
