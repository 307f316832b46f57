//! The rewrite of an accepted upstream answer for one client: TTL floor and
//! ceiling, the client's ID and question case. Never panics; the output has
//! the input's length, the client's ID and question, and every TTL within
//! the policy.
#![no_main]

use doh_proxy::cache::{Entry, TtlPolicy};
use doh_proxy::dns::{self, Key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let min_ttl = u32::from(data[0]) * 60;
    let max_ttl = min_ttl + u32::from(data[1]) * 600;
    let policy = TtlPolicy {
        min_ttl,
        max_ttl,
        err_ttl: 2,
        stale_secs: 86400,
    };
    let answer = &data[2..];
    let Some(key) = Key::new("Mixed.Example.test", 1, data[2] & 1 == 1) else {
        return;
    };
    let id = u16::from_be_bytes([answer[0], answer[1]]);
    let Ok(info) = dns::check_answer(answer, id, &key) else {
        return;
    };
    let now = doh_proxy::clock::Clock::default().now();
    let entry = Entry::from_answer(answer.to_vec(), &info, &policy, now);
    let mut client_q = key.question().to_vec();
    client_q[1] = b'M';
    let (out, max_age) = entry.serve(0xBEEF, &client_q, &policy, now);
    assert_eq!(out.len(), answer.len());
    assert_eq!(&out[..2], &[0xBE, 0xEF]);
    assert_eq!(&out[12..12 + client_q.len()], &client_q[..]);
    for off in &info.ttl_offsets {
        let ttl = dns::read_ttl(&out, *off as usize);
        assert!(ttl <= max_ttl.max(policy.err_ttl), "{ttl} > {max_ttl}");
        if !entry.is_error() {
            assert!(ttl >= min_ttl.min(max_ttl), "{ttl} < {min_ttl}");
        }
        assert!(max_age <= ttl);
    }
});
