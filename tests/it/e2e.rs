//! Runs `tests/e2e.sh`: NSD as the upstream and real clients (curl, kdig,
//! dig, dnspython) against the built binary. The script installs what is
//! missing with apt-get and pip.

use std::process::Command;

#[test]
fn real_clients_against_nsd() {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e.sh"))
        .arg(env!("CARGO_BIN_EXE_doh-proxy"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "e2e failed:\n{stdout}");
    assert!(stdout.contains(" passed, 0 failed"));
}
