use super::*;
use std::sync::atomic::AtomicUsize;

fn policy(min: u32) -> TtlPolicy {
    TtlPolicy {
        min_ttl: min,
        max_ttl: 86400,
        err_ttl: 2,
        stale_secs: 86400,
    }
}

/// An answer for `key` with one A record of TTL `ttl`.
fn answer(key: &Key, ttl: u32) -> (Vec<u8>, AnswerInfo) {
    let a = dns::build::a_answer(key, ttl, 0);
    let info = dns::check_answer(&a, 0, key).unwrap();
    (a, info)
}

#[test]
fn ttl_floor_and_ceiling() {
    let key = Key::new("short.test", 1, false).unwrap();
    let (a, info) = answer(&key, 5);
    let e = Entry::from_answer(a, &info, &policy(1800), Instant::now());
    assert_eq!(e.lifetime(), 1800);
    let (wire, max_age) = e.serve(0x4242, key.question(), &policy(1800), Instant::now());
    assert_eq!(max_age, 1800);
    assert_eq!(dns::read_ttl(&wire, info.ttl_offsets[0] as usize), 1800);
    assert_eq!(&wire[..2], &[0x42, 0x42]);
    let (a, info) = answer(&key, 200_000);
    let e = Entry::from_answer(a, &info, &policy(0), Instant::now());
    assert_eq!(e.lifetime(), 86400);
}

#[test]
fn errors_are_short_lived_and_never_stale() {
    let key = Key::new("fail.test", 1, false).unwrap();
    let e = Entry::failure(&key, &policy(1800), Instant::now());
    assert!(e.is_error());
    assert_eq!(e.lifetime(), 2);
    let (_, max_age) = e.serve(1, key.question(), &policy(1800), Instant::now());
    assert!(max_age <= 2);
    let c = Cache::with_entries(10, policy(0));
    let (a, info) = answer(&key, 60);
    c.store(
        key.clone(),
        Entry::from_answer(a, &info, &policy(0), Instant::now()),
    );
    c.store(
        key.clone(),
        Entry::failure(&key, &policy(0), Instant::now()),
    );
    assert!(matches!(c.lookup(&key, Instant::now()), Lookup::Fresh(e) if !e.is_error()));
}

#[test]
fn a_zero_ceiling_is_never_exceeded_even_stale() {
    // Found by the `rewrite` fuzz target: max_ttl 0 made every answer
    // stale at once, served with TTL 30.
    let p = TtlPolicy {
        min_ttl: 0,
        max_ttl: 0,
        err_ttl: 2,
        stale_secs: 86400,
    };
    let key = Key::new("z.test", 1, false).unwrap();
    let (a, info) = answer(&key, 5);
    let e = Entry::from_answer(a, &info, &p, Instant::now());
    let (wire, max_age) = e.serve(1, key.question(), &p, Instant::now());
    assert_eq!(dns::read_ttl(&wire, info.ttl_offsets[0] as usize), 0);
    assert_eq!(max_age, 0);
}

#[test]
fn refresh_claim_is_exclusive() {
    let key = Key::new("x.test", 1, false).unwrap();
    let e = Entry::failure(&key, &policy(0), Instant::now());
    assert!(e.claim_refresh(Duration::from_secs(30), Instant::now()));
    assert!(!e.claim_refresh(Duration::from_secs(30), Instant::now()));
}

#[test]
fn capacity_bounds_entries() {
    let c = Cache::with_entries(1000, policy(0));
    let p = policy(0);
    for i in 0..20_000 {
        let key = Key::new(&format!("n{i}.test"), 1, false).unwrap();
        c.store(key.clone(), Entry::failure(&key, &p, Instant::now()));
    }
    c.sync();
    assert!(c.len() <= 1000, "{}", c.len());
}

/// An answer of about `len` bytes for `key` (one TXT record).
fn big_answer(key: &Key, len: usize) -> (Vec<u8>, AnswerInfo) {
    let mut a = dns::upstream_query(0, key);
    a[2] |= 0x80;
    a[7] = 1;
    let rdlen = len.saturating_sub(a.len() + 12).min(65000);
    let mut rr = vec![0xC0, 12, 0, 16, 0, 1, 0, 0, 1, 0];
    rr.extend_from_slice(&(rdlen as u16).to_be_bytes());
    let mut rdata = Vec::new();
    while rdata.len() < rdlen {
        let n = (rdlen - rdata.len() - 1).min(255);
        rdata.push(n as u8);
        rdata.extend(std::iter::repeat_n(b'x', n));
    }
    rr.extend_from_slice(&rdata);
    a.extend_from_slice(&rr);
    let info = dns::check_answer(&a, 0, key).unwrap();
    (a, info)
}

#[test]
fn bytes_bound_the_cache_and_large_answers_are_not_kept() {
    let p = policy(1800);
    let c = Cache::new(
        &CacheSettings {
            policy: p,
            max_entries: 100_000,
            max_bytes: 1 << 20,
            max_answer: 16 * 1024,
        },
        Clock::default(),
    );
    for i in 0..1000 {
        let key = Key::new(&format!("big{i}.test"), 16, false).unwrap();
        let (a, info) = big_answer(&key, 12_000);
        assert!(c
            .store(key, Entry::from_answer(a, &info, &p, Instant::now()))
            .stored());
    }
    // What moka evicted is freed once no thread can still be reading it:
    // other tests' threads, pinned a moment, may hold that back.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while {
        c.sync();
        c.bytes() > 1 << 20 && std::time::Instant::now() < deadline
    } {
        std::thread::yield_now();
    }
    assert!(c.bytes() <= 1 << 20, "{} bytes", c.bytes());
    assert!(c.len() >= 50 && c.len() <= 90, "{} entries", c.len());
    let key = Key::new("huge.test", 16, false).unwrap();
    let (a, info) = big_answer(&key, 30_000);
    let e = Entry::from_answer(a, &info, &p, Instant::now());
    assert!(e.wire_len() > 16 * 1024);
    assert!(!c.store(key.clone(), e).stored());
    assert!(matches!(c.lookup(&key, Instant::now()), Lookup::Miss(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_runs_work_once() {
    let inflight = Arc::new(Inflight::<u32>::default());
    let runs = Arc::new(AtomicUsize::new(0));
    let key = Key::new("c.test", 1, false).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (inflight, runs, key) = (inflight.clone(), runs.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            inflight
                .run(&key, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    7
                })
                .await
                .0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 7);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(inflight.is_empty());
}

#[test]
fn bytes_count_an_entry_until_it_is_freed() {
    let c = Cache::with_entries(10, policy(0));
    let key = Key::new("held.test", 1, false).unwrap();
    let (a, info) = answer(&key, 60);
    let first = c.store(
        key.clone(),
        Entry::from_answer(a.clone(), &info, &policy(0), Instant::now()),
    );
    let second = c.store(
        key.clone(),
        Entry::from_answer(a, &info, &policy(0), Instant::now()),
    );
    assert!(first.stored() && second.stored());
    let (one, two) = (u64::from(first.size()), u64::from(second.size()));
    c.sync();
    // Replaced, but still being served: its memory is still held.
    assert_eq!(c.bytes(), one + two);
    drop(first);
    assert_eq!(c.bytes(), two);
    drop(second);
    c.sync();
    assert_eq!(c.bytes(), two, "the cache still holds the second");
    let failure = c.store(
        key.clone(),
        Entry::failure(&key, &policy(0), Instant::now()),
    );
    assert!(!failure.stored(), "a failure never replaces a good answer");
    assert_eq!(c.bytes(), two);
}

/// A cache of `n` entries filled with names `fill0.test`…, housekeeping
/// run so that it knows it is full.
fn full_cache(n: u64) -> Cache {
    let c = Cache::with_entries(n, policy(1800));
    for i in 0..n {
        let key = Key::new(&format!("fill{i}.test"), 1, false).unwrap();
        let (a, info) = answer(&key, 60);
        c.store(
            key,
            Entry::from_answer(a, &info, &policy(1800), Instant::now()),
        );
    }
    c.sync();
    c
}

/// What a miss does: look up, then store the answer as the lookup said.
fn miss(c: &Cache, key: &Key) -> (Admit, bool) {
    let Lookup::Miss(admit) = c.lookup(key, Instant::now()) else {
        panic!("{} is held", key.name());
    };
    let (a, info) = answer(key, 60);
    let e = Entry::from_answer(a, &info, &policy(1800), Instant::now());
    (admit, c.store_if(key.clone(), e, admit).stored())
}

#[test]
fn a_cache_with_room_keeps_every_answer() {
    let c = Cache::with_entries(100, policy(1800));
    for i in 0..50 {
        let key = Key::new(&format!("new{i}.test"), 1, false).unwrap();
        assert_eq!(miss(&c, &key), (Admit::Yes, true), "new{i}.test");
    }
}

#[test]
fn a_full_cache_keeps_a_name_the_second_time_it_is_asked() {
    let c = full_cache(100);
    let key = Key::new("twice.test", 1, false).unwrap();
    assert_eq!(miss(&c, &key), (Admit::No, false), "kept the first time");
    assert_eq!(
        miss(&c, &key),
        (Admit::Yes, true),
        "not kept the second time"
    );
    assert!(matches!(c.lookup(&key, Instant::now()), Lookup::Fresh(_)));
}

#[test]
fn a_flood_of_new_names_hardly_touches_a_full_cache() {
    let c = full_cache(1000);
    let kept = (0..20_000)
        .filter(|i| {
            let key = Key::new(&format!("flood{i}.test"), 1, false).unwrap();
            miss(&c, &key).1
        })
        .count();
    // The doorkeeper takes about 1 % of new names for names seen
    // before (moka's policy then still weighs them against its entries).
    assert!(kept < 20_000 / 50, "{kept} of 20,000 new names kept");
    c.sync();
    let held = (0..1000)
        .filter(|i| {
            let key = Key::new(&format!("fill{i}.test"), 1, false).unwrap();
            matches!(c.lookup(&key, Instant::now()), Lookup::Fresh(_))
        })
        .count();
    assert!(
        held >= 1000 - 20_000 / 50,
        "only {held} of 1,000 entries left"
    );
}

#[test]
fn an_entry_held_is_always_replaced() {
    let c = full_cache(100);
    let key = Key::new("fill7.test", 1, false).unwrap();
    // A refresh (prefetch, serve-stale) stores whatever the doorkeeper says.
    let (a, info) = answer(&key, 90);
    assert!(c
        .store(
            key.clone(),
            Entry::from_answer(a, &info, &policy(0), Instant::now())
        )
        .stored());
    // So does the miss on an entry held but past serving.
    let later = Instant::now() + Duration::from_secs(200_000);
    assert!(matches!(c.lookup(&key, later), Lookup::Miss(Admit::Yes)));
}
