//! The hot paths, in isolation: validating a request, serving a cache hit
//! (lookup + TTL rewrite + ID rewrite), refusing an obsolete-draft request,
//! adding a ban to a full ban table, and persisting one ban to the state
//! file. `cargo bench --bench hot_paths`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use doh_proxy::cache::{Cache, Entry, Lookup, TtlPolicy};
use doh_proxy::dns::{self, Key};
use doh_proxy::doh::{self, Limits};
use doh_proxy::guard::bans::{Bans, MAX_BANS};
use doh_proxy::guard::state;
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use ipnet::IpNet;

fn limits() -> Limits {
    Limits {
        path: "/dns-query".into(),
        max_uri: 4096,
        max_body: 65535,
        body_timeout: std::time::Duration::from_secs(5),
        odoh: false,
    }
}

fn parts(uri: &str) -> http::request::Parts {
    http::Request::get(uri)
        .header("accept", "application/dns-message")
        .header("user-agent", "bench")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// An upstream answer to `key`: one A record, TTL 5.
fn answer(key: &Key) -> Vec<u8> {
    let mut m = Message::from_vec(&dns::upstream_query(7, key)).unwrap();
    m.metadata.message_type = MessageType::Response;
    let name = m.queries[0].name().clone();
    m.add_answer(Record::from_rdata(name, 5, RData::A(A::new(192, 0, 2, 1))));
    m.to_vec().unwrap()
}

fn requests(c: &mut Criterion) {
    let limits = limits();
    let q = dns::query_message("www.Example.test", 1, 0x1234, true).unwrap();
    let good = parts(&format!("/dns-query?dns={}", doh::encode_dns_param(&q)));
    let obsolete = parts(&format!(
        "/dns-query?ct=application/dns-udpwireformat&dns={}",
        doh::encode_dns_param(&q)
    ));

    c.bench_function("validate GET (base64 + DNS)", |b| {
        b.iter(|| {
            let doh::Wanted::Get(msg) = doh::check_head(black_box(&good), &limits).unwrap() else {
                unreachable!()
            };
            black_box(dns::parse_query(&msg).unwrap().key);
        })
    });

    c.bench_function("reject obsolete draft", |b| {
        b.iter(|| black_box(doh::check_head(black_box(&obsolete), &limits).unwrap_err()))
    });

    let policy = TtlPolicy {
        min_ttl: 1800,
        max_ttl: 86400,
        err_ttl: 2,
        stale_secs: 86400,
    };
    let cache = Cache::with_entries(100_000, policy);
    let parsed = dns::parse_query(&q).unwrap();
    let key = parsed.key.clone();
    let a = answer(&key);
    let info = dns::check_answer(&a, 7, &key).unwrap();
    cache.store(
        key.clone(),
        Entry::from_answer(a, &info, &policy, tokio::time::Instant::now()),
    );
    for i in 0..10_000 {
        let k = Key::new(&format!("n{i}.example.test"), 1, true).unwrap();
        cache.store(
            k.clone(),
            Entry::failure(&k, &policy, tokio::time::Instant::now()),
        );
    }

    c.bench_function("cache hit (lookup + rewrite)", |b| {
        b.iter(|| {
            let Lookup::Fresh(e) = cache.lookup(black_box(&key), cache.now()) else {
                unreachable!()
            };
            black_box(e.serve(
                0xBEEF,
                parsed.question,
                &policy,
                tokio::time::Instant::now(),
            ));
        })
    });
}

/// At the cap of 200,000 bans every new ban evicts the one closest to
/// expiry: with the expiry index, O(log n), not a scan of the table.
fn bans(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    for size in [2_000usize, MAX_BANS] {
        let bans = Bans::new(size);
        let host = |i: u32| {
            IpNet::from(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                0x0A00_0000 + i,
            )))
        };
        for i in 0..size as u32 {
            bans.add(host(i), "bench", 600 + u64::from(i % 600), None);
        }
        let mut next = size as u32;
        c.bench_function(&format!("ban insert at the cap ({size} bans)"), |b| {
            b.iter(|| {
                next = next.wrapping_add(1);
                black_box(bans.add(host(next), "bench", 600, None));
            })
        });
        c.bench_function(&format!("ban lookup ({size} bans)"), |b| {
            b.iter(|| black_box(bans.covers(black_box("10.0.1.1".parse().unwrap()))))
        });
        // What --state-file costs per ban: the ban, then what the
        // once-a-second write does with it (one journal line appended).
        // Independent of the number of bans kept.
        let dir = std::env::temp_dir().join(format!("doh-bench-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let _ = bans.take_changes();
        c.bench_function(
            &format!("ban persisted to the state file ({size} bans)"),
            |b| {
                b.iter(|| {
                    next = next.wrapping_add(1);
                    bans.add(host(next), "bench", 600, None);
                    let (changes, _) = bans.take_changes();
                    state::append(&path, &changes).unwrap();
                })
            },
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

criterion_group!(benches, requests, bans);
criterion_main!(benches);
