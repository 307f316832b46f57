//! The admin listener: exact metrics after a known sequence, health that
//! follows the upstream, the ban list and its DELETE, the bearer token,
//! and refusing a public admin listener without one.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn metrics_after_a_known_sequence() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.per_ip_qps = 1;
        c.per_ip_burst = 3;
        c.ban_after = 3;
    })
    .await;
    // A miss then a hit.
    assert_eq!(
        send_from(
            &p,
            Proto::H2,
            "127.0.40.1",
            get(&ok_path("www.example.test"))
        )
        .await
        .unwrap()
        .status,
        200
    );
    assert_eq!(
        send_from(
            &p,
            Proto::H1,
            "127.0.40.1",
            get(&ok_path("www.example.test"))
        )
        .await
        .unwrap()
        .status,
        200
    );
    // One of each reject reason, each from its own address.
    let q = query("www.example.test", 1, 1);
    let cases: Vec<(&str, http::Request<http_body_util::Full<bytes::Bytes>>, u16)> = vec![
        ("127.0.41.1", get("/dns-query?ct=x&dns=AAAA"), 400),
        ("127.0.41.2", get("/dns-query?name=a.test&type=A"), 400),
        ("127.0.41.3", get("/dns-query?dns=!!!"), 400),
        ("127.0.41.4", post(q.clone(), "text/plain"), 415),
        ("127.0.41.5", post(q.clone(), "message/dns"), 415),
        ("127.0.41.6", get("/nope"), 404),
        (
            "127.0.41.7",
            http::Request::put("/dns-query")
                .body(Default::default())
                .unwrap(),
            405,
        ),
        ("127.0.41.8", get(&get_path(&q[..10])), 400),
    ];
    for (src, req, status) in cases {
        assert_eq!(
            send_from(&p, Proto::H2, src, req).await.unwrap().status,
            status,
            "{src}"
        );
    }
    // A client over budget: 3 hits, then 2 refused.
    let mut c = Client::connect(&p, Proto::H2, Some("127.0.42.1".parse().unwrap()))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            c.send(get(&ok_path("www.example.test")))
                .await
                .unwrap()
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // A client banned after three obsolete-draft requests, then refused at accept.
    let mut g = Client::connect(&p, Proto::H1, Some("127.0.43.1".parse().unwrap()))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            g.send(get("/dns-query?body=AAAA")).await.unwrap().status,
            400
        );
    }
    assert!(
        Client::connect(&p, Proto::H2, Some("127.0.43.1".parse().unwrap()))
            .await
            .is_err()
    );

    let text = String::from_utf8_lossy(&admin(&p, "GET", "/metrics", None).await.body).to_string();
    let expect = [
        ("doh_requests_total{outcome=\"answered\"}", 5.0),
        ("doh_requests_total{outcome=\"rejected\"}", 11.0),
        ("doh_requests_total{outcome=\"rate_limited\"}", 2.0),
        ("doh_requests_total{outcome=\"banned\"}", 0.0),
        ("doh_requests_total{outcome=\"overloaded\"}", 0.0),
        ("doh_rejects_total{reason=\"obsolete_draft\"}", 4.0),
        ("doh_rejects_total{reason=\"json_api\"}", 1.0),
        ("doh_rejects_total{reason=\"bad_base64\"}", 1.0),
        ("doh_rejects_total{reason=\"unsupported_media_type\"}", 1.0),
        ("doh_rejects_total{reason=\"obsolete_media_type\"}", 1.0),
        ("doh_rejects_total{reason=\"not_found\"}", 1.0),
        ("doh_rejects_total{reason=\"method_not_allowed\"}", 1.0),
        ("doh_rejects_total{reason=\"dns_too_short\"}", 1.0),
        ("doh_rejects_total{reason=\"rate_limited\"}", 2.0),
        ("doh_cache_hits_total", 4.0),
        ("doh_cache_misses_total", 1.0),
        ("doh_cache_entries", 1.0),
        ("doh_bans_total{kind=\"address\"}", 1.0),
        ("doh_bans_active", 1.0),
        ("doh_connections_rejected_total{reason=\"banned\"}", 1.0),
        ("doh_unique_clients", 11.0),
    ];
    for (series, want) in expect {
        assert_eq!(sum_series(&text, series), want, "{series}\n{text}");
    }
    let ok = format!(
        "doh_upstream_queries_total{{upstream=\"{}\",result=\"ok\"}}",
        up.addr
    );
    assert!(text.lines().any(|l| l.starts_with(&ok)), "{text}");
    assert!(
        text.contains("doh_upstream_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("doh_connections_open "), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn healthz_follows_the_upstream() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.upstream_timeout = 300).await;
    let health = async || admin(&p, "GET", "/healthz", None).await;
    wait_for(
        "healthy once probed",
        async || health().await.status == 200,
        Duration::from_secs(5),
    )
    .await;
    up.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    // Three unanswered probes, one every 2 s, mark it down.
    wait_for(
        "marked down",
        async || health().await.status == 503,
        Duration::from_secs(10),
    )
    .await;
    let body = String::from_utf8_lossy(&health().await.body).to_string();
    assert!(body.contains("down"), "{body}");
    up.paused.store(false, std::sync::atomic::Ordering::SeqCst);
    // The next probe finds it again.
    wait_for(
        "up again",
        async || health().await.status == 200,
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test]
async fn bans_are_listed_and_lifted() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 2).await;
    let src = Some("127.0.44.1".parse().unwrap());
    let mut c = Client::connect(&p, Proto::H2, src).await.unwrap();
    for _ in 0..2 {
        let _ = c.send(get("/dns-query?random_padding=1")).await;
    }
    assert!(Client::connect(&p, Proto::H2, src).await.is_err());
    let r = admin(&p, "GET", "/bans", None).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    let bans: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(bans[0]["target"], "127.0.44.1/32");
    assert_eq!(bans[0]["reason"], "obsolete_draft");
    assert!(bans[0]["expires"].as_u64().unwrap() > bans[0]["since"].as_u64().unwrap());
    assert!(bans[0]["hits"].as_u64().unwrap() >= 1);
    assert_eq!(
        admin(&p, "DELETE", "/bans/127.0.44.9", None).await.status,
        404
    );
    assert_eq!(
        admin(&p, "DELETE", "/bans/not-an-address", None)
            .await
            .status,
        400
    );
    assert_eq!(
        admin(&p, "DELETE", "/bans/127.0.44.1", None).await.status,
        200
    );
    let mut c = Client::connect(&p, Proto::H2, src)
        .await
        .expect("served again");
    assert_eq!(
        c.send(get(&ok_path("www.example.test")))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(admin(&p, "GET", "/bans", None).await.body, "[]");
}

#[tokio::test]
async fn admin_token_is_required_when_set() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.admin_token = Some("s3cret".into())).await;
    for path in ["/metrics", "/healthz", "/bans"] {
        assert_eq!(admin(&p, "GET", path, Some("")).await.status, 401, "{path}");
        assert_eq!(
            admin(&p, "GET", path, Some("wrong")).await.status,
            401,
            "{path}"
        );
        assert_ne!(
            admin(&p, "GET", path, Some("s3cret")).await.status,
            401,
            "{path}"
        );
    }
    assert_eq!(
        admin(&p, "DELETE", "/bans/127.0.0.1", Some(""))
            .await
            .status,
        401
    );
}

#[test]
fn public_admin_listener_without_token_is_refused_without_binding() {
    let bin = env!("CARGO_BIN_EXE_doh-proxy");
    let args = [
        "-u",
        "127.0.0.1:53",
        "--metrics-listen",
        "0.0.0.0:9",
        "-l",
        "127.0.0.1:0",
    ];
    let check = Command::new(bin).arg("check").args(args).output().unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("admin_token"));
    // Start-up refuses too, at once (port 9 would need root to bind: it
    // is never reached).
    let start = Command::new(bin).args(args).output().unwrap();
    assert!(!start.status.success());
    assert!(String::from_utf8_lossy(&start.stderr).contains("admin_token"));
    let with_token = Command::new(bin)
        .arg("check")
        .args(args)
        .args(["--admin-token", "t"])
        .output()
        .unwrap();
    assert!(
        with_token.status.success(),
        "{}",
        String::from_utf8_lossy(&with_token.stderr)
    );
}

#[test]
fn check_reports_one_line_reasons() {
    let bin = env!("CARGO_BIN_EXE_doh-proxy");
    let run = |args: &[&str]| Command::new(bin).arg("check").args(args).output().unwrap();
    let dir = std::env::temp_dir().join(format!("doh-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = pki();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("other.key"), other.signing_key.serialize_pem()).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["-u".into(), "not-an-address".into()], "invalid value"),
        (
            vec![
                "-u".into(),
                "127.0.0.1:53".into(),
                "--path".into(),
                "dns".into(),
            ],
            "path",
        ),
        (
            vec![
                "-u".into(),
                "127.0.0.1:53".into(),
                "--allow".into(),
                "10.1.2.3".into(),
                "--deny".into(),
                "10.0.0.0/8".into(),
            ],
            "would be blocked",
        ),
        (
            vec![
                "-u".into(),
                "127.0.0.1:53".into(),
                "--tls-cert".into(),
                p.cert.display().to_string(),
                "--tls-key".into(),
                dir.join("other.key").display().to_string(),
            ],
            "does not match",
        ),
        (
            vec![
                "-u".into(),
                "127.0.0.1:53".into(),
                "--min-ttl".into(),
                "9".into(),
                "--max-ttl".into(),
                "5".into(),
            ],
            "min_ttl",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let ok = run(&[
        "-u",
        "127.0.0.1:53",
        "--tls-cert",
        p.cert.to_str().unwrap(),
        "--tls-key",
        p.key.to_str().unwrap(),
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad_file = dir.join("bad.toml");
    std::fs::write(&bad_file, "min_tll = 5\n").unwrap();
    let out = run(&["-c", bad_file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_tll"));
}
