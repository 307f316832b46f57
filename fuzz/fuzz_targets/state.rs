//! The state file reader: whatever `--state-file` holds (damaged, hostile,
//! another program's), it gives entries within range or a clear error,
//! never a panic.
#![no_main]

use doh_proxy::guard::state::{parse, Limits, HORIZON};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        prefix_v4: 24,
        prefix_v6: 56,
    };
    let now = 1_800_000_000;
    if let Ok(r) = parse(data, now, limits) {
        for (net, _, _, remaining, _) in &r.bans {
            assert!(*remaining <= HORIZON);
            assert!(net.prefix_len() >= if net.addr().is_ipv4() { 24 } else { 56 });
        }
    }
});
