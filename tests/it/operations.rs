//! Day-two operations: certificate files replaced in place, SIGHUP,
//! a refused reload, the state file across a restart, systemd socket
//! activation and notifications, graceful stop.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::common::*;

/// Replaces `path` the way certbot does: a new file, then a rename.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn renewed_certificate_files_are_served_within_ten_seconds() {
    let up = MockUpstream::start().await;
    let dir = scratch("renew");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(&pki().cert, &cert).unwrap();
    std::fs::copy(&pki().key, &key).unwrap();
    let (c2, k2) = (cert.clone(), key.clone());
    let p = proxy(&[up.addr], move |c| {
        c.tls_cert = Some(c2);
        c.tls_key = Some(k2);
    })
    .await;
    let before = served_cert(p.addrs(Kind::Https)[0]).await;
    // A connection opened before, and a cached answer.
    let mut old = Client::connect(&p, Proto::H2, None).await.unwrap();
    assert_eq!(
        old.send(get(&ok_path("long.example.test")))
            .await
            .unwrap()
            .status,
        200
    );
    let (pem, key_pem, der) = new_leaf();
    assert_ne!(before, der);
    replace(&key, &key_pem);
    replace(&cert, &pem);
    // Certificate files are checked every 10 s.
    wait_for(
        "the new certificate served",
        async || served_cert(p.addrs(Kind::Https)[0]).await == der,
        Duration::from_secs(11),
    )
    .await;
    let r = old.send(get(&ok_path("long.example.test"))).await.unwrap();
    assert_eq!(
        r.status, 200,
        "the connection opened before keeps answering"
    );
    assert_eq!(up.count("long.example.test."), 1, "the cache is intact");
    assert_eq!(metric(&p, "doh_reloads_total{result=\"ok\"}").await, 1.0);
    let expiry = metric(&p, "doh_tls_cert_expiry_seconds").await;
    assert!(expiry > 86400.0 * 365.0, "{expiry}");
}

fn config_file(
    dir: &std::path::Path,
    upstream: std::net::SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    let p = pki();
    let file = dir.join("doh-proxy.toml");
    std::fs::write(
        &file,
        format!(
            "upstream = [\"{upstream}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             per_ip_conn_rate = 1000\nban_after = 3\n{extra}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
        ),
    )
    .unwrap();
    std::fs::copy(&p.cert, dir.join("cert.pem")).unwrap();
    std::fs::copy(&p.key, dir.join("key.pem")).unwrap();
    file
}

/// SIGHUP: a tighter budget from the file applies at once, a flag from
/// the command line still wins, the certificate is read again; a broken
/// certificate is refused and the old one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_the_certificate() {
    let up = MockUpstream::start().await;
    let dir = scratch("sighup");
    let file = config_file(
        &dir,
        up.addr,
        "per_ip_qps = 100\nper_ip_burst = 100\nmax_ttl = 3600",
    );
    let (tls, admin) = (free_port(), free_port());
    let f = file.to_str().unwrap();
    let p = Proc::start(&dir, tls, admin, &["-c", f, "--max-ttl", "60"], &[]).await;
    for i in 0..5 {
        let r = p
            .send("127.0.90.1", get(&ok_path(&format!("b{i}.example.test"))))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    // Tighten the budget in the file, change the certificate, SIGHUP.
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "per_ip_qps = 100\nper_ip_burst = 100\nmax_ttl = 3600",
        "per_ip_qps = 1\nper_ip_burst = 2\nmax_ttl = 86400",
    );
    std::fs::write(&file, text).unwrap();
    let (pem, key_pem, der) = new_leaf();
    std::fs::write(dir.join("key.pem"), key_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), pem).unwrap();
    p.signal("HUP");
    wait_for(
        "reloaded",
        async || p.metric("doh_reloads_total{result=\"ok\"}").await == 1.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(served_cert(p.tls).await, der, "new certificate at once");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = p
            .send("127.0.90.1", get(&ok_path("long.example.test")))
            .await
            .unwrap();
        statuses.push(r.status);
        if r.status == 200 {
            assert!(
                r.dns().answers[0].ttl <= 60,
                "--max-ttl from the command line wins"
            );
        }
    }
    assert_eq!(
        statuses,
        vec![200, 200, 429, 429],
        "the file's budget applies"
    );
    assert_eq!(p.metric("doh_reloads_total{result=\"ok\"}").await, 1.0);
    // A broken certificate: refused, the old one stays, the process too.
    std::fs::write(
        dir.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    p.signal("HUP");
    wait_for(
        "the reload refused",
        async || p.metric("doh_reloads_total{result=\"error\"}").await == 1.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(served_cert(p.tls).await, der, "the old certificate stays");
    assert!(p.log().contains("reload refused"), "{}", p.log());
    // A broken configuration too.
    std::fs::write(&file, "min_tll = 5\n").unwrap();
    p.signal("HUP");
    wait_for(
        "the second reload refused",
        async || p.metric("doh_reloads_total{result=\"error\"}").await == 2.0,
        Duration::from_secs(5),
    )
    .await;
    let r = p
        .send("127.0.90.2", get(&ok_path("www.example.test")))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "still serving");
}

/// Bans survive a restart through --state-file; a damaged file is set
/// aside with a warning and the proxy starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_survive_a_restart() {
    let up = MockUpstream::start().await;
    let dir = scratch("state");
    let file = config_file(&dir, up.addr, "");
    let state = dir.join("state.json");
    let (tls, admin) = (free_port(), free_port());
    let args = [
        "-c",
        file.to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
    ];
    let mut p = Proc::start(&dir, tls, admin, &args, &[]).await;
    for _ in 0..3 {
        let _ = p.send("127.0.91.1", get("/dns-query?ct=x")).await;
    }
    wait_for(
        "banned",
        async || p.metric("doh_bans_active").await == 1.0,
        Duration::from_secs(5),
    )
    .await;
    p.signal("TERM");
    let status = p.wait(Duration::from_secs(10)).expect("stops");
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains("127.0.91.1/32"), "{saved}");
    drop(p);
    // Restarted: the banned client is closed at accept and listed.
    let p = Proc::start(&dir, tls, admin, &args, &[]).await;
    assert!(p
        .send("127.0.91.1", get(&ok_path("www.example.test")))
        .await
        .is_err());
    let bans =
        String::from_utf8_lossy(&admin_at(p.admin, "GET", "/bans", None).await.body).to_string();
    assert!(bans.contains("127.0.91.1/32"), "{bans}");
    assert_eq!(
        p.send("127.0.91.2", get(&ok_path("www.example.test")))
            .await
            .unwrap()
            .status,
        200
    );
    drop(p);
    // A truncated state file: a warning, set aside, and the proxy starts.
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, &text[..text.len() / 2]).unwrap();
    let p = Proc::start(&dir, tls, admin, &args, &[]).await;
    wait_for(
        "the truncated state file set aside",
        async || p.log().contains("not a doh-proxy state file"),
        Duration::from_secs(5),
    )
    .await;
    assert!(dir.join("state.json.bad").exists());
    assert_eq!(
        p.send("127.0.91.1", get(&ok_path("www.example.test")))
            .await
            .unwrap()
            .status,
        200
    );
}

/// systemd: the socket comes from systemd-socket-activate, READY=1,
/// RELOADING=1 and STOPPING=1 go to NOTIFY_SOCKET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_and_notifications() {
    let up = MockUpstream::start().await;
    let dir = scratch("systemd");
    let file = config_file(&dir, up.addr, "listen = []");
    let tls = free_port();
    let admin = free_port();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let stderr = dir.join("stderr.log");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    crate::common::need("systemd-socket-activate", "systemd");
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{tls}"), "--fdname=https"])
        .args(["-E", &format!("NOTIFY_SOCKET={}", notify_path.display())])
        .arg(env!("CARGO_BIN_EXE_doh-proxy"))
        .args([
            "-c",
            file.to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .current_dir(&dir)
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .map(Kill)
        .expect("systemd-socket-activate (Debian package systemd)");
    // The first connection starts the proxy on the passed socket, once
    // systemd-socket-activate listens on it.
    let listening =
        async || std::fs::read_to_string(&stderr).is_ok_and(|l| l.contains("Listening on"));
    wait_for(
        "systemd-socket-activate listening",
        listening,
        Duration::from_secs(5),
    )
    .await;
    let tcp = tcp_from(
        Some("127.0.92.1".parse().unwrap()),
        std::net::SocketAddr::from(([127, 0, 0, 1], tls)),
    )
    .await
    .unwrap();
    let mut c = Client::over_tls(tcp, true)
        .await
        .expect("served on the inherited socket");
    let r = c.send(get(&ok_path("www.example.test"))).await.unwrap();
    assert_eq!(r.status, 200);
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = notify.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    };
    assert_eq!(
        next(),
        "READY=1",
        "{}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let msg = next();
    assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
    assert_eq!(next(), "READY=1");
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(next(), "STOPPING=1");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The shipped units pass `systemd-analyze verify` (with ExecStart
/// pointing at the binary just built).
#[test]
fn systemd_units_verify() {
    let dir = scratch("units");
    let root = env!("CARGO_MANIFEST_DIR");
    for unit in ["doh-proxy.service", "doh-proxy.socket"] {
        let text = std::fs::read_to_string(format!("{root}/examples/systemd/{unit}")).unwrap();
        let text = text.replace("/usr/local/bin/doh-proxy", env!("CARGO_BIN_EXE_doh-proxy"));
        std::fs::write(dir.join(unit), text).unwrap();
    }
    crate::common::need("systemd-analyze", "systemd");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("doh-proxy.socket"))
        .arg(dir.join("doh-proxy.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("doh-proxy"),
        "warnings about our units: {err}"
    );
}

/// Started under the usual soft limit of 1024 descriptors, the proxy
/// raises it to the hard limit.
#[test]
fn the_descriptor_limit_is_raised_at_start() {
    use std::process::{Command, Stdio};
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .unwrap();
    if Command::new("prlimit").arg("--version").output().is_err() {
        panic!("prlimit (util-linux) is needed");
    }
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile=1024:{hard}"))
        .arg(env!("CARGO_BIN_EXE_doh-proxy"))
        .args([
            "-l",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "-u",
            "127.0.0.1:9",
        ])
        .env("DOH_PROXY_LOG", "info")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let soft = || {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let line = limits.lines().find(|l| l.starts_with("Max open files"));
        line.and_then(|l| l.split_whitespace().nth(3))
            .unwrap_or("")
            .to_string()
    };
    wait_until(
        "soft limit raised to the hard one",
        || soft() == hard,
        Duration::from_secs(5),
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The ban file is an nftables script (checked by `nft -c` where it can
/// run), naming the bound TCP and UDP ports, rewritten when a ban is lifted.
#[tokio::test]
async fn ban_file_is_an_nftables_script() {
    let up = MockUpstream::start().await;
    let file = std::env::temp_dir().join(format!("doh-bans-{}.nft", std::process::id()));
    let f2 = file.clone();
    let p = proxy(&[up.addr], move |c| {
        c.ban_after = 1;
        c.ban_file = Some(f2);
    })
    .await;
    let _ = send_from(&p, Proto::H1, "127.0.17.1", get("/dns-query?ct=x")).await;
    wait_for(
        "the ban in the file",
        async || std::fs::read_to_string(&file).is_ok_and(|t| t.contains("127.0.17.1/32 timeout")),
        Duration::from_secs(10),
    )
    .await;
    let text = std::fs::read_to_string(&file).unwrap();
    let mut tcp = [
        p.addrs(Kind::Https)[0].port(),
        p.addrs(Kind::Http)[0].port(),
        p.addrs(Kind::Dot)[0].port(),
    ];
    tcp.sort_unstable();
    let tcp: Vec<String> = tcp.iter().map(|p| p.to_string()).collect();
    assert!(
        text.contains(&format!("tcp dport {{ {} }} drop", tcp.join(", "))),
        "{text}"
    );
    // HTTP/3 and DNS over QUIC.
    let mut udp = [p.addrs(Kind::H3)[0].port(), p.addrs(Kind::Doq)[0].port()];
    udp.sort_unstable();
    let udp: Vec<String> = udp.iter().map(|p| p.to_string()).collect();
    assert!(
        text.contains(&format!("udp dport {{ {} }} drop", udp.join(", "))),
        "{text}"
    );
    if let Ok(out) = std::process::Command::new("nft")
        .arg("-c")
        .arg("-f")
        .arg(&file)
        .output()
    {
        let err = String::from_utf8_lossy(&out.stderr);
        let no_netlink = err.contains("Operation not permitted") || err.contains("netlink");
        assert!(
            out.status.success() || no_netlink,
            "nft -c refused the ban file: {err}\n{text}"
        );
    }
    assert_eq!(
        admin(&p, "DELETE", "/bans/127.0.17.1", None).await.status,
        200
    );
    let gone = async || {
        !std::fs::read_to_string(&file)
            .unwrap()
            .contains("127.0.17.1")
    };
    wait_for(
        "the lifted ban gone from the ban file",
        gone,
        Duration::from_secs(5),
    )
    .await;
}

/// The binary runs under valgrind, which gives a process no vDSO of the
/// kernel's: the clocks are read through the C library, which knows to
/// do without, not through a vDSO lookup of their own that reads where it
/// is told the vDSO is. What `benches/instructions.sh` (callgrind) needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_answers_under_valgrind() {
    need("valgrind", "valgrind");
    let up = MockUpstream::start().await;
    let dir = scratch("valgrind");
    let file = config_file(&dir, up.addr, "");
    let (tls, admin) = (free_port(), free_port());
    let args = ["-c", file.to_str().unwrap()];
    let wrapper = ["valgrind", "--tool=none", "--quiet"];
    let within = Duration::from_secs(120);
    let p = Proc::start_under(&wrapper, &dir, tls, admin, &args, &[], within).await;
    let r = p
        .send("127.0.93.1", get(&ok_path("www.example.test")))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", p.log());
    assert!(p.metric("doh_cache_misses_total").await >= 1.0);
}
