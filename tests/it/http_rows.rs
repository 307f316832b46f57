//! Every row of SPEC's HTTP table, over real TLS with HTTP/1.1 and HTTP/2,
//! over the plain listener with HTTP/1.1 and h2c, and over HTTP/3 (QUIC),
//! against a real UDP/TCP upstream: the same statuses everywhere.

use crate::common::*;
use hickory_proto::op::ResponseCode;

const ALL: [Proto; 5] = [
    Proto::H1,
    Proto::H2,
    Proto::PlainH1,
    Proto::PlainH2,
    Proto::H3,
];

#[tokio::test]
async fn answers_get_and_post_on_every_protocol() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    for proto in ALL {
        let r = send(
            &p,
            proto,
            get(&get_path(&query("www.example.test", 1, 0xABCD))),
        )
        .await;
        assert_eq!(r.status, 200, "{proto:?}");
        assert_eq!(r.header("content-type"), Some("application/dns-message"));
        // RFC 9110, 6.6.1: an origin server with a clock sends Date.
        let date = r.header("date").expect("a Date header");
        let date = httpdate::parse_http_date(date).expect("an HTTP date");
        let skew = date.duration_since(std::time::SystemTime::now());
        assert!(
            skew.map_or(true, |ahead| ahead.as_secs() < 2),
            "{proto:?}: Date ahead of now"
        );
        assert!(
            std::time::SystemTime::now()
                .duration_since(date)
                .map_or(true, |behind| behind.as_secs() < 60),
            "{proto:?}: Date far behind now"
        );
        let m = r.dns();
        assert_eq!(m.metadata.id, 0xABCD);
        assert_eq!(m.answers[0].data.to_string(), "192.0.2.1");
        assert!(
            r.max_age() <= m.answers[0].ttl,
            "max-age never exceeds a served TTL"
        );

        let r = send(
            &p,
            proto,
            post(query("short.example.test", 1, 7), "application/dns-message"),
        )
        .await;
        assert_eq!(r.status, 200, "{proto:?}");
        assert_eq!(r.dns().metadata.id, 7);
        assert_eq!(r.dns().answers[0].data.to_string(), "192.0.2.5");
    }
}

#[tokio::test]
async fn dns_errors_are_still_200() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("nx.example.test", 1, 1))),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.dns().metadata.response_code, ResponseCode::NXDomain);
    let r = send(
        &p,
        Proto::H2,
        get(&get_path(&query("fail.example.test", 1, 2))),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.dns().metadata.response_code, ResponseCode::ServFail);
    assert!(r.max_age() <= 2);
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 10_000).await;
    let good = query("www.example.test", 1, 1);
    let mut trailing = good.clone();
    trailing.push(0);
    let mut qr = good.clone();
    qr[2] |= 0x80;
    let mut opcode = good.clone();
    opcode[2] |= 0x10;
    let mut qd2 = good.clone();
    qd2[5] = 2;
    let mut records = good.clone();
    records[7] = 1;
    let bad_bodies: Vec<(&str, Vec<u8>)> = vec![
        ("too short", good[..8].to_vec()),
        ("trailing", trailing),
        ("QR set", qr),
        ("opcode", opcode),
        ("QDCOUNT 2", qd2),
        ("answer records", records),
    ];
    for proto in ALL {
        for path in [
            "/dns-query",
            "/dns-query?dns=",
            "/dns-query?dns=%%%",
            "/dns-query?dns=A",
        ] {
            let r = send(&p, proto, get(path)).await;
            assert_eq!(r.status, 400, "{proto:?} {path}");
        }
        for (what, body) in &bad_bodies {
            let r = send(&p, proto, get(&get_path(body))).await;
            assert_eq!(r.status, 400, "{proto:?} GET {what}");
            let r = send(&p, proto, post(body.clone(), "application/dns-message")).await;
            assert_eq!(r.status, 400, "{proto:?} POST {what}");
        }
        let r = send(&p, proto, post(Vec::new(), "application/dns-message")).await;
        assert_eq!(r.status, 400, "{proto:?} empty POST");
    }
    assert_eq!(
        up.count("www.example.test."),
        0,
        "nothing malformed reaches the upstream"
    );
}

#[tokio::test]
async fn obsolete_drafts_and_json_api_get_400_with_their_reason() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 10_000).await;
    let q = doh_proxy::doh::encode_dns_param(&query("www.example.test", 1, 1));
    for proto in ALL {
        for path in [
            format!("/dns-query?ct=application/dns-udpwireformat&dns={q}"),
            format!("/dns-query?body={q}"),
            format!("/dns-query?dns={q}&content-type=application/dns-message"),
            format!("/dns-query?dns={q}&random_padding=xxxx"),
        ] {
            assert_eq!(
                send(&p, proto, get(&path)).await.status,
                400,
                "{proto:?} {path}"
            );
        }
        let r = send(&p, proto, get("/dns-query?name=example.test&type=A")).await;
        assert_eq!(r.status, 400);
    }
    assert_eq!(
        metric(&p, "doh_rejects_total{reason=\"obsolete_draft\"}").await,
        20.0
    );
    assert_eq!(
        metric(&p, "doh_rejects_total{reason=\"json_api\"}").await,
        5.0
    );
    assert_eq!(up.count("www.example.test."), 0);
}

#[tokio::test]
async fn wrong_media_types_get_415() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 10_000).await;
    let q = query("www.example.test", 1, 1);
    for proto in ALL {
        for ct in [
            "application/dns-udpwireformat",
            "message/dns",
            "application/json",
            "text/plain",
        ] {
            let r = send(&p, proto, post(q.clone(), ct)).await;
            assert_eq!(r.status, 415, "{proto:?} {ct}");
        }
        let req = http::Request::post("/dns-query")
            .body(http_body_util::Full::new(bytes::Bytes::from(q.clone())))
            .unwrap();
        assert_eq!(
            send(&p, proto, req).await.status,
            415,
            "{proto:?} no content-type"
        );
    }
    assert_eq!(
        metric(&p, "doh_rejects_total{reason=\"obsolete_media_type\"}").await,
        10.0
    );
}

/// Over HTTP/2, a POST refused on its headers is answered once its body
/// has come: a response that ended the stream before the request did
/// would be followed by RST_STREAM(NO_ERROR) (RFC 9113, 8.1), which some
/// clients (curl 7.88) take for a failed transfer instead of reading the
/// refusal. The body is sent once a PING's answer shows the server has
/// read the headers.
#[tokio::test]
async fn http2_post_refused_on_its_headers_is_answered_after_its_body() {
    use tokio::io::AsyncWriteExt;
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 10_000).await;
    let mut s = h2_started(p.addrs(Kind::Https)[0], "127.0.64.1")
        .await
        .unwrap();
    let ping_ack = |f: &Frame| f.kind == 6 && f.flags & 1 == 1;
    for stream in (1..=19).step_by(2) {
        let ended = |f: &Frame| f.stream == stream && f.flags & 1 == 1;
        let block = post_block("application/dns-udpwireformat");
        s.write_all(&frame(1, 0x04, stream, &block)).await.unwrap(); // END_HEADERS
        s.write_all(&ping()).await.unwrap();
        let mut seen = frames_until(&mut s, ping_ack).await.expect("a PING answer");
        let early = seen.iter().any(ended);
        s.write_all(&frame(0, 0x01, stream, b"x")).await.unwrap(); // END_STREAM
        if !early {
            seen.extend(frames_until(&mut s, ended).await.expect("a response"));
        }
        // Whatever the server sent on the stream after its response
        // comes before the answer to a PING sent now.
        s.write_all(&ping()).await.unwrap();
        seen.extend(frames_until(&mut s, ping_ack).await.expect("a PING answer"));
        let on_stream: Vec<u8> = seen
            .iter()
            .filter(|f| f.stream == stream)
            .map(|f| f.kind)
            .collect();
        assert!(
            !early,
            "stream {stream} answered before its body: {on_stream:?}"
        );
        assert_eq!(on_stream[0], 1, "stream {stream}: {on_stream:?}");
        assert!(
            !on_stream.contains(&3),
            "stream {stream} was reset: {on_stream:?}"
        );
    }
    assert_eq!(
        metric(&p, "doh_rejects_total{reason=\"obsolete_media_type\"}").await,
        10.0
    );
}

#[tokio::test]
async fn size_limits_413_414_431() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 10_000).await;
    for proto in ALL {
        let r = send(
            &p,
            proto,
            post(vec![0u8; 70_000], "application/dns-message"),
        )
        .await;
        assert_eq!(r.status, 413, "{proto:?} 70 KB POST");
        let long = format!("/dns-query?dns={}", "A".repeat(5000));
        assert_eq!(
            send(&p, proto, get(&long)).await.status,
            414,
            "{proto:?} 5 KB URI"
        );
    }
    // Over HTTP/1.1 a 20 KB target is still read, and refused with 414.
    for proto in [Proto::H1, Proto::PlainH1] {
        let long = format!("/dns-query?dns={}", "A".repeat(20_000));
        assert_eq!(
            send(&p, proto, get(&long)).await.status,
            414,
            "{proto:?} 20 KB URI"
        );
        let mut req = get(&get_path(&query("www.example.test", 1, 1)));
        for i in 0..3 {
            req.headers_mut().insert(
                format!("x-pad-{i}")
                    .as_str()
                    .parse::<http::HeaderName>()
                    .unwrap(),
                "x".repeat(7000).parse().unwrap(),
            );
        }
        assert_eq!(
            send(&p, proto, req).await.status,
            431,
            "{proto:?} 21 KB of headers"
        );
    }
    // Over HTTP/2, a header list over the limit is refused by the protocol layer.
    let mut req = get(&get_path(&query("www.example.test", 1, 1)));
    req.headers_mut()
        .insert("x-pad", "x".repeat(20_000).parse().unwrap());
    let mut c = Client::connect(&p, Proto::H2, None).await.unwrap();
    // Either a 431, or the stream is reset ("or the connection is closed").
    if let Ok(r) = c.send(req).await {
        assert_eq!(r.status, 431);
    }
}

#[tokio::test]
async fn method_and_path() {
    let up = MockUpstream::start().await;
    // Junk scores (tests/it/hardening.rs); here only the statuses matter.
    let p = proxy(&[up.addr], |c| c.ban_after = 1000).await;
    let path = get_path(&query("www.example.test", 1, 1));
    for proto in ALL {
        for m in ["PUT", "DELETE", "HEAD", "OPTIONS"] {
            let req = http::Request::builder()
                .method(m)
                .uri(&path)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let r = send(&p, proto, req).await;
            assert_eq!(r.status, 405, "{proto:?} {m}");
            assert_eq!(r.header("allow"), Some("GET, POST"));
        }
        let other = path.replace("/dns-query", "/resolve");
        assert_eq!(send(&p, proto, get(&other)).await.status, 404);
        assert_eq!(send(&p, proto, get("/")).await.status, 404);
    }
    assert_eq!(
        up.count("www.example.test."),
        0,
        "only GET and POST on PATH reach the upstream"
    );
}

#[tokio::test]
async fn custom_path() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.path = "/q".into()).await;
    let q = doh_proxy::doh::encode_dns_param(&query("www.example.test", 1, 1));
    assert_eq!(
        send(&p, Proto::H2, get(&format!("/q?dns={q}")))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&p, Proto::H2, get(&format!("/dns-query?dns={q}")))
            .await
            .status,
        404
    );
}

/// An HTTP/1.1 client still sending a body too large when the proxy
/// refuses it reads its 413, not a reset: the proxy reads the rest of the
/// body (within bounds) before answering. Both with a declared length and
/// with a chunked body.
#[tokio::test]
async fn http1_client_sending_a_large_body_reads_its_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.ban_after = 10_000).await;
    let chunked = |data: &[u8]| {
        let mut v = format!("{:x}\r\n", data.len()).into_bytes();
        v.extend_from_slice(data);
        v.extend_from_slice(b"\r\n");
        v
    };
    for declared in [true, false] {
        let mut s = tokio::net::TcpStream::connect(p.addrs(Kind::Http)[0])
            .await
            .unwrap();
        let framing = if declared {
            "content-length: 140000".to_string()
        } else {
            "transfer-encoding: chunked".to_string()
        };
        let head = format!(
            "POST /dns-query HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/dns-message\r\n{framing}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The body in slices, slower than the proxy decides.
        let mut every = tokio::time::interval(std::time::Duration::from_millis(10));
        for _ in 0..20 {
            every.tick().await;
            let slice = [0u8; 7000];
            let bytes = if declared {
                slice.to_vec()
            } else {
                chunked(&slice)
            };
            s.write_all(&bytes).await.unwrap();
        }
        every.tick().await;
        if !declared {
            s.write_all(b"0\r\n\r\n").await.unwrap();
        }
        let mut got = vec![0u8; 4096];
        let n = s.read(&mut got).await.unwrap();
        let text = String::from_utf8_lossy(&got[..n]);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "declared={declared}: {text}"
        );
    }
    assert_eq!(
        metric(&p, "doh_rejects_total{reason=\"body_too_large\"}").await,
        2.0
    );
}
