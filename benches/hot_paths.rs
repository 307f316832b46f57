//! The hot paths, in isolation: validating a request, serving a cache hit
//! (lookup + TTL rewrite + ID rewrite), and refusing an obsolete-draft
//! request. `cargo bench --bench hot_paths`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use doh_proxy::cache::{Cache, Entry, Lookup, TtlPolicy};
use doh_proxy::dns::{self, Key};
use doh_proxy::doh::{self, Limits};

fn limits() -> Limits {
    Limits {
        path: "/dns-query".into(),
        max_uri: 4096,
        max_body: 65535,
        body_timeout: std::time::Duration::from_secs(5),
    }
}

fn query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
    q
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

fn bench(c: &mut Criterion) {
    let limits = limits();
    let q = query("www.Example.test");
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
    let cache = Cache::new(100_000, policy);
    let parsed = dns::parse_query(&q).unwrap();
    let key = parsed.key.clone();
    let mut a = dns::upstream_query(7, &key);
    a[2] |= 0x80;
    a[7] = 1;
    let at = a.len() - 11;
    a.splice(
        at..at,
        [0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 192, 0, 2, 1],
    );
    let info = dns::check_answer(&a, 7, &key).unwrap();
    cache.store(key.clone(), Arc::new(Entry::from_answer(a, &info, &policy)));
    for i in 0..10_000 {
        let k = Key::new(&format!("n{i}.example.test"), 1, true).unwrap();
        cache.store(k.clone(), Arc::new(Entry::failure(&k, &policy)));
    }

    c.bench_function("cache hit (lookup + rewrite)", |b| {
        b.iter(|| {
            let Lookup::Fresh(e) = cache.lookup(black_box(&key)) else {
                unreachable!()
            };
            black_box(e.serve(0xBEEF, parsed.question, &policy));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
