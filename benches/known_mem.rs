//! Memory of the known-clients table (`--known-max`): the heap it holds,
//! counted by a wrapping allocator, for 100,000 and 1,000,000 remembered
//! clients after three times as many distinct addresses came (a crowd of
//! new ones pushing each other out), checked against the bound README
//! states ([`MAX_BYTES_PER_CLIENT`]). Also how many of 100 known clients
//! the crowd left in place, the time one new client costs the table, and
//! what every answered request pays.
//!
//! `cargo bench --bench known_mem`

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use doh_proxy::guard::known::{Known, MAX_BYTES_PER_CLIENT};

struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HELD.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn address(i: u64) -> IpAddr {
    // Half IPv4, half IPv6: both kinds take the same 16-byte key.
    if i % 2 == 0 {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i as u32 >> 1)))
    } else {
        IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)))
    }
}

fn run(max: u64) {
    let before = HELD.load(Ordering::Relaxed);
    let k = Known::new(max, 10, 30 * 86_400);
    // 100 regular clients, known.
    for i in 0..100 {
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, i as u8));
        k.answered(ip, 1_000);
        k.answered(ip, 1_100);
    }
    let t = Instant::now();
    let crowd = 3 * max;
    for i in 0..crowd {
        k.answered(address(i), 2_000 + i / 10_000);
    }
    let per_answer = t.elapsed().as_nanos() as f64 / crowd as f64;
    let held = (HELD.load(Ordering::Relaxed) - before) as f64;
    let n = k.len();
    let kept = (0..100)
        .filter(|i| k.is_known(IpAddr::V4(Ipv4Addr::new(192, 0, 2, *i as u8)), 2_000))
        .count();
    let per = held / n as f64;
    println!(
        "known_max {max}: {crowd} addresses → {n} remembered, {:.1} MiB, {per:.1} bytes a client (bound {MAX_BYTES_PER_CLIENT}), {kept}/100 known clients kept, {per_answer:.0} ns an answer",
        held / 1048576.0
    );
    assert!(n as u64 <= max, "{n} remembered over {max}");
    assert!(per <= MAX_BYTES_PER_CLIENT as f64, "{per} bytes a client");
    assert_eq!(kept, 100, "the crowd pushed out known clients");
}

/// What every answered request pays: a client seen before, answered
/// again (the table's lookup and update under its shard's lock).
fn per_request() {
    let k = Known::new(1_000_000, 86_400, 30 * 86_400);
    let clients: Vec<IpAddr> = (0..10_000).map(address).collect();
    for c in &clients {
        k.answered(*c, 1_000);
    }
    let n = 2_000_000u64;
    let t = Instant::now();
    for i in 0..n {
        k.answered(clients[(i % 10_000) as usize], 1_000 + i / 100_000);
    }
    println!(
        "an answered request from a remembered client: {:.0} ns",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

fn main() {
    per_request();
    // `cargo test --benches` runs this too: keep it short there.
    let quick = std::env::args().any(|a| a == "--test" || a == "--quick");
    run(100_000);
    if !quick {
        run(1_000_000);
    }
}
