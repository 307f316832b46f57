//! Privacy: EDNS(0) padding of answers (RFC 7830, RFC 8467), and the
//! Oblivious DoH target (RFC 9230) with odoh-rs as the client.

use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::{Message, ResponseCode};
use odoh_rs::{ObliviousDoHConfigs, ObliviousDoHMessage, ObliviousDoHMessagePlaintext};

use crate::common::*;

/// Whether an answer carries a Padding option.
fn padding_of(m: &Message) -> Option<()> {
    m.edns
        .as_ref()?
        .option(hickory_proto::rr::rdata::opt::EdnsCode::Padding)
        .map(|_| ())
}

#[tokio::test]
async fn answers_to_padded_queries_are_padded_on_misses_and_hits() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    for round in 0..2 {
        let r = send(
            &p,
            Proto::H2,
            post(
                query_with_opt("pad.example.test", 7, 4096, true),
                "application/dns-message",
            ),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body.len() % 468,
            0,
            "round {round}: {} bytes",
            r.body.len()
        );
        let m = r.dns();
        assert!(padding_of(&m).is_some(), "round {round}: a Padding option");
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.answers[0].data.to_string(), "192.0.2.1");
    }
    assert_eq!(up.count("pad.example.test."), 1, "the second was a hit");
    // Without a Padding option: no padding by default.
    let r = send(
        &p,
        Proto::H2,
        post(
            query_with_opt("pad.example.test", 8, 4096, false),
            "application/dns-message",
        ),
    )
    .await;
    assert!(r.body.len() < 468 && padding_of(&r.dns()).is_none());
    // Over DoT and HTTP/3 too.
    let r = send(
        &p,
        Proto::H3,
        post(
            query_with_opt("pad.example.test", 9, 4096, true),
            "application/dns-message",
        ),
    )
    .await;
    assert_eq!(r.body.len(), 468);
}

#[tokio::test]
async fn padding_always_and_never_beyond_the_payload() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.padding = doh_proxy::config::Padding::Always
    })
    .await;
    let r = send(
        &p,
        Proto::H2,
        post(
            query_with_opt("pad.example.test", 1, 1232, false),
            "application/dns-message",
        ),
    )
    .await;
    assert_eq!(r.body.len(), 468, "padded without being asked");
    // 28 records: over one block, and the next block would exceed 512.
    let r = send(
        &p,
        Proto::H2,
        post(
            query_with_opt("many.example.test", 2, 512, true),
            "application/dns-message",
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = r.dns();
    assert_eq!(m.answers.len(), 28);
    assert!(
        r.body.len() <= 512 && r.body.len() > 468,
        "{}",
        r.body.len()
    );
    assert!(
        padding_of(&m).is_none(),
        "936 would not fit in 512: no padding"
    );
    // With room, the next block.
    let r = send(
        &p,
        Proto::H2,
        post(
            query_with_opt("many.example.test", 3, 4096, true),
            "application/dns-message",
        ),
    )
    .await;
    assert_eq!(r.body.len(), 936);
    let p2 = proxy(&[up.addr], |c| {
        c.padding = doh_proxy::config::Padding::Never
    })
    .await;
    let r = send(
        &p2,
        Proto::H2,
        post(
            query_with_opt("pad.example.test", 4, 4096, true),
            "application/dns-message",
        ),
    )
    .await;
    assert!(r.body.len() < 468);
}

pub async fn fetch_configs(p: &doh_proxy::app::Running) -> (ObliviousDoHConfigs, Reply) {
    let r = send(p, Proto::H2, get("/.well-known/odohconfigs")).await;
    assert_eq!(r.status, 200);
    let configs: ObliviousDoHConfigs = odoh_rs::parse(&mut r.body.clone()).unwrap();
    (configs, r)
}

/// Seals `query` under `configs`, posts it, opens the answer.
pub async fn oblivious(
    p: &doh_proxy::app::Running,
    configs: &ObliviousDoHConfigs,
    query: Vec<u8>,
) -> Result<Message, u16> {
    let config = configs.clone().supported().into_iter().next().unwrap();
    let plain = ObliviousDoHMessagePlaintext::new(&query, 0);
    let mut rng = rand010::rng();
    let (sealed, secret) = odoh_rs::encrypt_query(&plain, &config.into(), &mut rng).unwrap();
    let body = odoh_rs::compose(&sealed).unwrap().to_vec();
    let r = send(
        p,
        Proto::H2,
        post(body, "application/oblivious-dns-message"),
    )
    .await;
    if r.status != 200 {
        return Err(r.status);
    }
    assert_eq!(
        r.header("content-type"),
        Some("application/oblivious-dns-message")
    );
    let answer: ObliviousDoHMessage = odoh_rs::parse(&mut r.body.clone()).unwrap();
    let opened = odoh_rs::decrypt_response(&plain, &answer, secret).unwrap();
    Ok(Message::from_vec(&opened.into_msg()).unwrap())
}

#[tokio::test]
async fn oblivious_queries_are_opened_answered_and_sealed() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| c.odoh = true).await;
    let (configs, r) = fetch_configs(&p).await;
    let max_age: u64 = r
        .header("cache-control")
        .unwrap()
        .strip_prefix("max-age=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age > 86000 && max_age <= 86400, "{max_age}");
    let m = oblivious(&p, &configs, query("www.example.test", 1, 0x1234))
        .await
        .unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.answers[0].data.to_string(), "192.0.2.1");
    // Same cache as plain queries.
    let r = send(&p, Proto::H2, get(&ok_path("www.example.test"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count("www.example.test."), 1);
    // The plain query inside is validated like any other.
    let mut bad = query("www.example.test", 1, 1);
    bad[2] |= 0x80;
    assert_eq!(oblivious(&p, &configs, bad).await.err(), Some(400));
    // Under a key we never had: 401, fetch the configs again.
    let other = proxy(&[up.addr], |c| c.odoh = true).await;
    let (foreign, _) = fetch_configs(&other).await;
    assert_eq!(
        oblivious(&p, &foreign, query("www.example.test", 1, 2))
            .await
            .err(),
        Some(401)
    );
    // Truncated: 400.
    let config = configs.clone().supported().into_iter().next().unwrap();
    let plain = ObliviousDoHMessagePlaintext::new(query("a.example.test", 1, 3), 0);
    let (sealed, _) = odoh_rs::encrypt_query(&plain, &config.into(), &mut rand010::rng()).unwrap();
    let body = odoh_rs::compose(&sealed).unwrap();
    let r = send(
        &p,
        Proto::H2,
        post(
            body[..body.len() / 2].to_vec(),
            "application/oblivious-dns-message",
        ),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        metric(&p, "doh_odoh_requests_total{result=\"ok\"}").await,
        1.0
    );
    assert_eq!(
        metric(&p, "doh_odoh_requests_total{result=\"unknown_key\"}").await,
        1.0
    );
    assert_eq!(
        metric(&p, "doh_odoh_requests_total{result=\"malformed\"}").await,
        1.0
    );
    // Without --odoh the media type is refused and the configs are not there.
    let plain_proxy = proxy(&[up.addr], |_| {}).await;
    assert_eq!(
        send(&plain_proxy, Proto::H2, get("/.well-known/odohconfigs"))
            .await
            .status,
        404
    );
    assert_eq!(
        send(
            &plain_proxy,
            Proto::H2,
            post(b"x".to_vec(), "application/oblivious-dns-message")
        )
        .await
        .status,
        415
    );
}

#[tokio::test]
async fn the_previous_key_is_accepted_for_one_more_period() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.odoh = true;
        c.odoh_rotate_secs = 2;
    })
    .await;
    let (first, _) = fetch_configs(&p).await;
    let key = |c: &odoh_rs::ObliviousDoHConfigs| odoh_rs::compose(c).unwrap();
    let current = async || key(&fetch_configs(&p).await.0);
    wait_for(
        "rotated",
        async || current().await != key(&first),
        Duration::from_secs(5),
    )
    .await;
    let (second, _) = fetch_configs(&p).await;
    assert_ne!(
        odoh_rs::compose(&first).unwrap(),
        odoh_rs::compose(&second).unwrap(),
        "rotated"
    );
    let m = oblivious(&p, &first, query("www.example.test", 1, 5))
        .await
        .unwrap();
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "the previous key still answers"
    );
    wait_for(
        "rotated again",
        async || current().await != key(&second),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        oblivious(&p, &first, query("www.example.test", 1, 6))
            .await
            .err(),
        Some(401),
        "the one before that does not"
    );
    assert!(oblivious(&p, &second, query("www.example.test", 1, 7))
        .await
        .is_ok());
}

/// A named relay has its own budget; the same sealed queries from any
/// other address meet the ordinary per-client one.
#[tokio::test]
async fn a_named_relay_has_its_own_budget() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |c| {
        c.odoh = true;
        c.per_ip_qps = 1;
        c.per_ip_burst = 2;
        c.odoh_relay_qps = 1000;
        c.odoh_relay = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    let (configs, _) = fetch_configs(&p).await;
    for i in 0..20 {
        assert!(
            oblivious(&p, &configs, query(&format!("r{i}.example.test"), 1, i))
                .await
                .is_ok(),
            "relayed query {i}"
        );
    }
    let _: Bytes = Bytes::new();
}
