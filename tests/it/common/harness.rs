//! The proxy under test: in process on ephemeral ports, or the binary run
//! as a service; its admin listener and metrics; waiting for a condition.

use super::*;

/// The admin token of the test configuration: changing state on the admin
/// listener needs one.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The test configuration: ephemeral loopback ports, TLS with the test PKI,
/// an admin token ([`ADMIN_TOKEN`], which [`admin`] sends unless told
/// otherwise).
pub fn test_config(upstreams: &[SocketAddr]) -> Config {
    let p = pki();
    Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        listen_http: vec!["127.0.0.1:0".parse().unwrap()],
        listen_h3: vec!["127.0.0.1:0".parse().unwrap()],
        listen_dot: vec!["127.0.0.1:0".parse().unwrap()],
        listen_doq: vec!["127.0.0.1:0".parse().unwrap()],
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        admin_token: Some(ADMIN_TOKEN.into()),
        tls_cert: Some(p.cert.clone()),
        tls_key: Some(p.key.clone()),
        upstream: upstreams.iter().map(|a| UpstreamSpec::udp(*a)).collect(),
        upstream_timeout: 1000,
        // Tests open many connections from one address quickly.
        per_ip_conn_rate: 1000,
        per_prefix_conn_rate: 10_000,
        ..Config::default()
    }
}

/// The proxy on ephemeral loopback ports, TLS with the test PKI.
pub async fn proxy(upstreams: &[SocketAddr], tweak: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = test_config(upstreams);
    tweak(&mut cfg);
    let (settings, _) = cfg.settings().expect("test config is valid");
    app::start(settings).await.expect("proxy starts")
}

/// One request on a fresh connection.
pub async fn send(running: &Running, proto: Proto, req: Request<Full<Bytes>>) -> Reply {
    let mut c = Client::connect(running, proto, None)
        .await
        .expect("connect");
    c.send(req).await.expect("response")
}

/// One request on a fresh connection from a given source address.
pub async fn send_from(
    running: &Running,
    proto: Proto,
    source: &str,
    req: Request<Full<Bytes>>,
) -> std::io::Result<Reply> {
    let mut c = Client::connect(running, proto, Some(source.parse().unwrap())).await?;
    c.send(req).await.map_err(std::io::Error::other)
}

/// A request on the admin listener, with `token` (`None`: [`ADMIN_TOKEN`];
/// `Some("")`: no `Authorization` header at all).
pub async fn admin(running: &Running, method: &str, path: &str, token: Option<&str>) -> Reply {
    let token = Some(token.unwrap_or(ADMIN_TOKEN)).filter(|t| !t.is_empty());
    admin_at(running.admin_addr, method, path, token).await
}

/// The sum of the series of a metric family whose labels include those of
/// `series` (`name{k="v",...}` or `name`). Series counted only in dry-run
/// (`dry_run="true"`) are left out unless `series` asks for them.
pub async fn metric(running: &Running, series: &str) -> f64 {
    let text = admin(running, "GET", "/metrics", None).await.body;
    sum_series(&String::from_utf8_lossy(&text), series)
}

pub fn sum_series(text: &str, series: &str) -> f64 {
    let (family, wanted) = split_series(series);
    let dry = wanted.iter().any(|l| l.starts_with("dry_run="));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name_labels, value) = l.rsplit_once(' ')?;
            let (name, labels) = split_series(name_labels);
            (name == family
                && wanted.iter().all(|w| labels.contains(w))
                && (dry || !labels.iter().any(|x| x.starts_with("dry_run="))))
            .then(|| value.trim().parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

fn split_series(s: &str) -> (&str, Vec<&str>) {
    match s.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|x| !x.is_empty())
                .collect(),
        ),
        None => (s, Vec::new()),
    }
}

/// Resident set of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// A port free on 127.0.0.1 for TCP (and most likely UDP) right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Tests that allocate a lot, or measure the memory of this process (which
/// every test shares), take this for their whole run: one at a time, so
/// that no measurement counts another heavy test's memory. (Each test's
/// own peak, to find the heavy ones: `/usr/bin/time -f %M` over the test
/// binary run with one test name and `--exact`; most stay within a few MiB
/// of 35 MiB.)
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// How often a waiting test looks at the condition it waits for.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `cond` every [`POLL`] until it holds; panics with `what` after
/// `within` (a bound for a busy machine, never a measurement).
pub async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool, within: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < within {
        if cond().await {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("{what}: not within {within:?}");
}

/// [`wait_for`] on a thread without a runtime.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool, within: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < within {
        if cond() {
            return;
        }
        std::thread::sleep(POLL);
    }
    panic!("{what}: not within {within:?}");
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("doh-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `doh-proxy` binary, run as a service would run it.
pub struct Proc {
    pub child: std::process::Child,
    pub tls: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: PathBuf,
}

impl Proc {
    /// Starts the binary with `args` (its TLS and admin listeners on the
    /// ports given) in `dir`, and waits until it answers.
    pub async fn start(
        dir: &std::path::Path,
        tls: u16,
        admin: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Proc::start_under(&[], dir, tls, admin, args, env, Duration::from_secs(5)).await
    }

    /// [`Proc::start`] under another program (`wrapper`: it and its
    /// arguments, the binary's path after them), waiting `within` for it to
    /// answer.
    pub async fn start_under(
        wrapper: &[&str],
        dir: &std::path::Path,
        tls: u16,
        admin: u16,
        args: &[&str],
        env: &[(&str, &str)],
        within: Duration,
    ) -> Proc {
        let stderr = dir.join("stderr.log");
        let bin = env!("CARGO_BIN_EXE_doh-proxy");
        let mut cmd = match wrapper.split_first() {
            None => std::process::Command::new(bin),
            Some((program, wrapper_args)) => {
                let mut c = std::process::Command::new(program);
                c.args(wrapper_args).arg(bin);
                c
            }
        };
        cmd.args([
            "-l",
            &format!("127.0.0.1:{tls}"),
            "--metrics-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut p = Proc {
            child,
            tls: SocketAddr::from(([127, 0, 0, 1], tls)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            stderr,
        };
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            if TcpStream::connect(p.admin).await.is_ok() {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "doh-proxy exited ({status}) before it answered:\n{}",
                    p.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("doh-proxy did not start:\n{}", p.log());
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit; its status.
    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(POLL);
        }
        None
    }

    /// A request over TLS HTTP/2 from `source`.
    pub async fn send(&self, source: &str, req: Request<Full<Bytes>>) -> std::io::Result<Reply> {
        let tcp = tcp_from(Some(source.parse().unwrap()), self.tls).await?;
        let mut c = Client::over_tls(tcp, true).await?;
        c.send(req).await.map_err(std::io::Error::other)
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let body = admin_at(self.admin, "GET", "/metrics", None).await.body;
        sum_series(&String::from_utf8_lossy(&body), series)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request to an admin listener, with a bearer `token` if any.
pub async fn admin_at(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Reply {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let resp = send
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Waits for the proxy's start-up probe of its upstreams to be answered
/// (it spends a token of the upstream budget).
pub async fn probed(p: &Running) {
    wait_for(
        "the start-up probe answered",
        async || p.app.upstream.load().since_last_probe().is_some(),
        Duration::from_secs(5),
    )
    .await;
}

/// Makes sure `program` is on the PATH, installing Debian's `package` once
/// with apt-get when it is not (the suite runs as root on Debian, as the
/// end-to-end script does). Panics with what is missing otherwise.
pub fn need(program: &str, package: &str) {
    static APT: Mutex<()> = Mutex::new(());
    let found = || {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found() {
        return;
    }
    let _one_at_a_time = APT.lock().unwrap_or_else(|e| e.into_inner());
    if found() {
        return;
    }
    let _ = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {package} \
                 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {package})"
            ),
        ])
        .stdout(std::process::Stdio::null())
        .status();
    assert!(found(), "{program} is missing (Debian package {package})");
}
