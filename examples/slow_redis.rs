//! What a slow Redis costs a request: queries sent in turns to two running
//! doh-proxy instances, one on its own and one whose `--redis` answers
//! slowly, half cache hits and half misses (which spend the upstream
//! budget the fleet leases). Prints each one's median and 99th percentile
//! latency and their differences. `benches/slow_redis.sh` sets the two up.
//!
//!     cargo run --release --example slow_redis -- \
//!         --alone 127.0.0.1:8091 --slow 127.0.0.1:8092 --n 2000

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), common::Error> {
    let alone = common::arg("--alone", "127.0.0.1:8091");
    let slow = common::arg("--slow", "127.0.0.1:8092");
    let n: usize = common::arg("--n", "2000").parse()?;
    let tag = std::process::id();
    let mut conns = [common::h2c(&alone).await?, common::h2c(&slow).await?];
    let mut lat = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..n {
        for (k, c) in conns.iter_mut().enumerate() {
            let name = if i % 2 == 0 {
                "www.example.test".to_string()
            } else {
                format!("s{tag}-{k}-{i}.example.test")
            };
            let path = common::dns_path("/dns-query", &name, 1);
            let host = if k == 0 { &alone } else { &slow };
            let t = Instant::now();
            let status = common::get_as(c, host, &path, "198.51.100.7").await?;
            lat[k].push(t.elapsed().as_secs_f64() * 1000.0);
            if status != 200 {
                return Err(format!("status {status} from {host}").into());
            }
        }
    }
    for l in &mut lat {
        l.sort_by(f64::total_cmp);
    }
    let [a, s] = &lat;
    let (am, ap) = (common::percentile(a, 0.5), common::percentile(a, 0.99));
    let (sm, sp) = (common::percentile(s, 0.5), common::percentile(s, 0.99));
    println!("| instance | median ms | p99 ms |");
    println!("|---|---|---|");
    println!("| alone | {am:.3} | {ap:.3} |");
    println!("| slow Redis | {sm:.3} | {sp:.3} |");
    println!("| difference | {:+.3} | {:+.3} |", sm - am, sp - ap);
    Ok(())
}
