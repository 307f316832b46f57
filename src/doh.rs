//! RFC 8484 request validation: from an HTTP request to the bytes of one
//! DNS message, or a [`Reject`].
//!
//! Checks run cheapest first and stop at the first failure: target length,
//! header size, path, method, obsolete-draft and JSON-API parameters, then
//! the `dns` parameter or the POST body. Nothing here looks at the DNS
//! message itself; that is [`crate::dns`]'s job, after the client budget.

use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use bytes::{Buf, BufMut, Bytes};
use http::{header, Method};
use http_body_util::BodyExt;

use crate::reject::Reject;

pub use crate::dns::DNS_MESSAGE;

/// Largest header block accepted (names and values, HTTP/1.1 framing).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// base64url without padding, as RFC 8484 requires; padding sent anyway by
/// some old clients is tolerated.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Limits of request validation, taken from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub path: String,
    pub max_uri: usize,
    pub max_body: usize,
    pub body_timeout: Duration,
    /// Whether the Oblivious DoH target is on (`--odoh`).
    pub odoh: bool,
}

/// What a request asks for once its head is valid.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// GET: the decoded `dns` parameter.
    Get(Vec<u8>),
    /// POST: the body is still to be read.
    Post,
    /// POST of a sealed Oblivious DoH query (`--odoh`); the body is still
    /// to be read.
    Oblivious,
    /// GET of the Oblivious DoH target's configs (`--odoh`).
    OdohConfigs,
}

/// Validates everything but a POST body.
pub fn check_head(parts: &http::request::Parts, limits: &Limits) -> Result<Wanted, Reject> {
    let target_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > limits.max_uri {
        return Err(Reject::UriTooLong);
    }
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Reject::HeadersTooLarge);
    }
    if parts.uri.path() != limits.path {
        if limits.odoh && parts.uri.path() == crate::odoh::CONFIGS_PATH {
            return match parts.method {
                Method::GET => Ok(Wanted::OdohConfigs),
                _ => Err(Reject::Method),
            };
        }
        return Err(Reject::NotFound);
    }
    let is_get = match parts.method {
        Method::GET => true,
        Method::POST => false,
        _ => return Err(Reject::Method),
    };
    let dns = scan_params(parts.uri.query().unwrap_or(""))?;
    if is_get {
        let dns = dns.ok_or(Reject::MissingDns)?;
        return decode_dns_param(dns).map(Wanted::Get);
    }
    let oblivious = limits.odoh && is_oblivious(parts.headers.get(header::CONTENT_TYPE));
    if !oblivious {
        check_content_type(parts.headers.get(header::CONTENT_TYPE))?;
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(Reject::BodyTooLarge);
    }
    Ok(if oblivious {
        Wanted::Oblivious
    } else {
        Wanted::Post
    })
}

fn is_oblivious(value: Option<&http::HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(crate::odoh::MEDIA_TYPE))
}

/// Walks the query string once: refuses obsolete-draft and JSON-API
/// parameters wherever they appear, and returns the single `dns` value.
fn scan_params(query: &str) -> Result<Option<&str>, Reject> {
    let mut dns = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("ct") || is("body") || is("content-type") || is("random_padding") {
            return Err(Reject::ObsoleteDraft);
        }
        if is("name") || is("type") {
            return Err(Reject::JsonApi);
        }
        if name == "dns" {
            if dns.is_some() {
                return Err(Reject::DuplicateDns);
            }
            dns = Some(value);
        }
    }
    Ok(dns)
}

fn decode_dns_param(value: &str) -> Result<Vec<u8>, Reject> {
    let mut v = value.as_bytes();
    // Percent-encoded padding (`%3D`) is the only escape a base64url value
    // can carry; strip it with the plain padding.
    loop {
        if let Some(rest) = v.strip_suffix(b"=") {
            v = rest;
        } else if v.len() >= 3 && v[v.len() - 3..].eq_ignore_ascii_case(b"%3d") {
            v = &v[..v.len() - 3];
        } else {
            break;
        }
    }
    if v.is_empty() {
        return Err(Reject::MissingDns);
    }
    B64.decode(v).map_err(|_| Reject::BadBase64)
}

fn check_content_type(value: Option<&http::HeaderValue>) -> Result<(), Reject> {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else {
        return Err(Reject::MediaType);
    };
    let media = v.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case(DNS_MESSAGE) {
        Ok(())
    } else if media.eq_ignore_ascii_case("application/dns-udpwireformat")
        || media.eq_ignore_ascii_case("message/dns")
    {
        Err(Reject::ObsoleteMediaType)
    } else {
        Err(Reject::MediaType)
    }
}

/// How much of a refused request's body is read and thrown away before
/// the refusal goes out, and for how long at most once found too large.
pub const LINGER_BYTES: usize = 256 * 1024;
pub const LINGER_TIME: Duration = Duration::from_secs(1);

/// Reads a POST body, at most `limits.max_body` bytes within
/// `limits.body_timeout`.
///
/// With `linger` (HTTP/1.1 and HTTP/2), a body found too large is read on
/// and thrown away, up to [`LINGER_BYTES`] within [`LINGER_TIME`], before
/// the 413 is returned: over HTTP/1.1 a client still sending its body when
/// the connection closes with unread data gets a reset instead of the
/// answer; over HTTP/2 a response that ends the stream before the request
/// did is followed by RST_STREAM(NO_ERROR), which some clients take for a
/// failed transfer.
pub async fn read_body<B>(body: B, limits: &Limits, linger: bool) -> Result<Bytes, Reject>
where
    B: http_body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            // A body that broke off mid-way is not worth more than a 400.
            let frame = frame.map_err(|_| Reject::EmptyBody)?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.remaining() > limits.max_body {
                    return Err(Reject::BodyTooLarge);
                }
                buf.put(data);
            }
        }
        Ok(())
    };
    let read = tokio::time::timeout(limits.body_timeout, read).await;
    match read {
        Err(_) => Err(Reject::BodyTimeout),
        Ok(Err(Reject::BodyTooLarge)) => {
            if linger {
                discard(body, LINGER_BYTES, LINGER_TIME).await;
            }
            Err(Reject::BodyTooLarge)
        }
        Ok(Err(r)) => Err(r),
        Ok(Ok(())) if buf.is_empty() => Err(Reject::EmptyBody),
        Ok(Ok(())) => Ok(buf.freeze()),
    }
}

/// Reads and throws away the rest of a refused request's body, at most
/// `max` bytes within `within`; see [`read_body`].
pub async fn discard<B: http_body::Body>(body: B, max: usize, within: Duration) {
    let mut body = std::pin::pin!(body);
    let mut seen = 0usize;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.remaining();
                if seen > max {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(within, drain).await;
}

/// Encodes a DNS message for a GET `dns` parameter (for clients and tests).
pub fn encode_dns_param(msg: &[u8]) -> String {
    B64.encode(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            path: "/dns-query".into(),
            max_uri: 4096,
            max_body: 65535,
            body_timeout: Duration::from_secs(1),
            odoh: false,
        }
    }

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Result<Wanted, Reject> {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        check_head(&parts, &limits())
    }

    #[test]
    fn get_decodes_base64url_with_or_without_padding() {
        assert_eq!(
            head("GET", "/dns-query?dns=AAEC", &[]),
            Ok(Wanted::Get(vec![0, 1, 2]))
        );
        assert_eq!(
            head("GET", "/dns-query?dns=AAE", &[]),
            Ok(Wanted::Get(vec![0, 1]))
        );
        assert_eq!(
            head("GET", "/dns-query?dns=AAE=", &[]),
            Ok(Wanted::Get(vec![0, 1]))
        );
        assert_eq!(
            head("GET", "/dns-query?dns=AAE%3D", &[]),
            Ok(Wanted::Get(vec![0, 1]))
        );
        assert_eq!(
            head("GET", "/dns-query?dns=-_8", &[]),
            Ok(Wanted::Get(vec![0xfb, 0xff]))
        );
    }

    #[test]
    fn get_rejections() {
        assert_eq!(head("GET", "/dns-query", &[]), Err(Reject::MissingDns));
        assert_eq!(head("GET", "/dns-query?dns=", &[]), Err(Reject::MissingDns));
        assert_eq!(
            head("GET", "/dns-query?dns=a+b/", &[]),
            Err(Reject::BadBase64)
        );
        assert_eq!(head("GET", "/dns-query?dns=A", &[]), Err(Reject::BadBase64));
        assert_eq!(
            head("GET", "/dns-query?dns=AA&dns=AA", &[]),
            Err(Reject::DuplicateDns)
        );
        assert_eq!(
            head("GET", "/dns-query?ct=x&dns=AA", &[]),
            Err(Reject::ObsoleteDraft)
        );
        assert_eq!(
            head("GET", "/dns-query?body=AA", &[]),
            Err(Reject::ObsoleteDraft)
        );
        assert_eq!(
            head("GET", "/dns-query?dns=AA&random_padding=x", &[]),
            Err(Reject::ObsoleteDraft)
        );
        assert_eq!(
            head("GET", "/dns-query?content-type=x", &[]),
            Err(Reject::ObsoleteDraft)
        );
        assert_eq!(
            head("GET", "/dns-query?name=a.test&type=A", &[]),
            Err(Reject::JsonApi)
        );
        assert_eq!(head("GET", "/other?dns=AA", &[]), Err(Reject::NotFound));
        assert_eq!(head("PUT", "/dns-query?dns=AA", &[]), Err(Reject::Method));
        let long = format!("/dns-query?dns={}", "A".repeat(5000));
        assert_eq!(head("GET", &long, &[]), Err(Reject::UriTooLong));
        let big = "x".repeat(17 * 1024);
        assert_eq!(
            head("GET", "/dns-query?dns=AA", &[("x-big", &big)]),
            Err(Reject::HeadersTooLarge)
        );
    }

    #[test]
    fn post_content_types() {
        let ct = |v: &str| head("POST", "/dns-query", &[("content-type", v)]);
        assert_eq!(ct("application/dns-message"), Ok(Wanted::Post));
        assert_eq!(ct("Application/DNS-Message; charset=x"), Ok(Wanted::Post));
        assert_eq!(
            ct("application/dns-udpwireformat"),
            Err(Reject::ObsoleteMediaType)
        );
        assert_eq!(ct("message/dns"), Err(Reject::ObsoleteMediaType));
        assert_eq!(ct("application/json"), Err(Reject::MediaType));
        assert_eq!(head("POST", "/dns-query", &[]), Err(Reject::MediaType));
        assert_eq!(
            head(
                "POST",
                "/dns-query",
                &[("content-type", DNS_MESSAGE), ("content-length", "70000")]
            ),
            Err(Reject::BodyTooLarge)
        );
        assert_eq!(
            head(
                "POST",
                "/dns-query?ct=application/dns-message",
                &[("content-type", DNS_MESSAGE)]
            ),
            Err(Reject::ObsoleteDraft)
        );
    }

    /// Throwing away a refused body stops at its byte bound, however much
    /// the client has to send.
    #[tokio::test]
    async fn discarding_is_bounded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let polled = Arc::new(AtomicUsize::new(0));
        let count = polled.clone();
        let endless = futures_util::stream::repeat_with(move || {
            count.fetch_add(1, Ordering::Relaxed);
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                &[0u8; 1000],
            )))
        });
        discard(
            http_body_util::StreamBody::new(endless),
            10_000,
            LINGER_TIME,
        )
        .await;
        assert_eq!(polled.load(Ordering::Relaxed), 11);
    }

    #[tokio::test]
    async fn body_limits() {
        let full = http_body_util::Full::new(Bytes::from(vec![1u8; 70_000]));
        assert_eq!(
            read_body(full, &limits(), false).await,
            Err(Reject::BodyTooLarge)
        );
        let empty = http_body_util::Full::new(Bytes::new());
        assert_eq!(
            read_body(empty, &limits(), false).await,
            Err(Reject::EmptyBody)
        );
        let ok = http_body_util::Full::new(Bytes::from_static(b"abc"));
        assert_eq!(
            read_body(ok, &limits(), false).await.unwrap(),
            Bytes::from_static(b"abc")
        );
    }
}
