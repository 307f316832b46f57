//! The configuration parser and checker: any text gives a configuration or
//! a clear error, never a panic.
#![no_main]

use doh_proxy::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::from_toml(text) {
        // settings() reads no file unless tls_cert/tls_key are set; keep it
        // off the file system.
        if cfg.tls_cert.is_none() && !cfg.upstream.is_empty() {
            let _ = cfg.settings();
        }
    }
});
