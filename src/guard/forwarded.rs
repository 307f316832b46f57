//! Who a request behind a trusted proxy comes from.
//!
//! Only the header chosen with `--forwarded-header` is read; the other is
//! ignored, so a client cannot pick whichever header the proxy forgot to
//! overwrite. The client is the right-most hop that is not itself a trusted
//! proxy. A hop that names no usable address (`garbage`, empty, a trailing
//! comma, `unknown`, `_hidden`, a zone-indexed IPv6) ends the walk with the
//! shared key [`UNKNOWN_CLIENT`]: a request is never attributed to the
//! trusted proxy because its header was unreadable.

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName};

use crate::net::{canonical, UNKNOWN_CLIENT};

/// `X-Forwarded-For`, a name `http` has no constant for: looked up as a
/// string, it would be parsed again on every request.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Which header a trusted proxy's client address is read from
/// (`--forwarded-header`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`
    Xff,
    /// `Forwarded` (RFC 7239)
    Forwarded,
}

/// The client named by `headers` for a request that a trusted proxy
/// `peer` forwarded; `None` when the configured header is absent (a
/// proxy that sends the other header, or none: the caller decides, and
/// never attributes it to the proxy).
pub fn client(
    peer: IpAddr,
    headers: &HeaderMap,
    which: ForwardedHeader,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> Option<IpAddr> {
    let mut hops: Vec<Option<IpAddr>> = Vec::new();
    match which {
        ForwardedHeader::Xff => {
            for v in headers.get_all(&X_FORWARDED_FOR) {
                match v.to_str() {
                    Ok(s) => hops.extend(s.split(',').map(parse_hop)),
                    Err(_) => hops.push(None),
                }
            }
        }
        ForwardedHeader::Forwarded => {
            for v in headers.get_all(http::header::FORWARDED) {
                let Ok(s) = v.to_str() else {
                    hops.push(None);
                    continue;
                };
                for elem in s.split(',') {
                    let hop = elem.split(';').find_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
                    });
                    hops.push(hop.and_then(parse_hop));
                }
            }
        }
    }
    if hops.is_empty() {
        return None;
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) => {
                client = canonical(*ip);
                if !is_trusted(client) {
                    return Some(client);
                }
            }
            None => return Some(UNKNOWN_CLIENT),
        }
    }
    Some(client)
}

/// Whether `headers` carry any forwarding header at all.
pub fn has_forwarding(headers: &HeaderMap) -> bool {
    headers.contains_key(&X_FORWARDED_FOR) || headers.contains_key(http::header::FORWARDED)
}

/// Parses one hop: `1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `"[2001:db8::1]"`
/// (Forwarded quotes IPv6). Anything else is `None`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let s = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s);
    if s.is_empty() || s.contains('%') {
        return None;
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':')?.parse::<u16>().is_ok()) {
            return None;
        }
        return inner.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(ip: IpAddr) -> bool {
        ip == "127.0.0.1".parse::<IpAddr>().unwrap() || ip.to_string().starts_with("10.")
    }

    fn xff(v: &str) -> IpAddr {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        client(ip("127.0.0.1"), &h, ForwardedHeader::Xff, trusted).unwrap()
    }

    fn fwd(v: &str) -> IpAddr {
        let mut h = HeaderMap::new();
        h.insert("forwarded", v.parse().unwrap());
        client(ip("127.0.0.1"), &h, ForwardedHeader::Forwarded, trusted).unwrap()
    }

    #[test]
    fn right_most_untrusted_hop() {
        assert_eq!(xff("203.0.113.7, 10.1.1.1"), ip("203.0.113.7"));
        assert_eq!(xff("198.51.100.1, 203.0.113.7"), ip("203.0.113.7"));
        assert_eq!(xff("203.0.113.7:4711"), ip("203.0.113.7"));
        assert_eq!(xff("[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(
            fwd("for=\"[2001:db8::1]:4711\";proto=https"),
            ip("2001:db8::1")
        );
        assert_eq!(
            fwd("for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(xff("10.0.0.1, 127.0.0.1"), ip("10.0.0.1"), "all trusted");
    }

    #[test]
    fn unreadable_hops_are_unknown_never_the_proxy() {
        for v in [
            "garbage",
            "",
            " ",
            "203.0.113.7,",
            "fe80::1%eth0",
            "[fe80::1%25eth0]:80",
            "1.2.3.4:99999",
        ] {
            assert_eq!(xff(v), UNKNOWN_CLIENT, "{v:?}");
        }
        for v in [
            "for=unknown",
            "for=_hidden",
            "proto=https",
            "for=\"\"",
            "for=garbage",
        ] {
            assert_eq!(fwd(v), UNKNOWN_CLIENT, "{v:?}");
        }
    }

    #[test]
    fn only_the_chosen_header_counts() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.1".parse().unwrap());
        h.insert("forwarded", "for=198.51.100.2".parse().unwrap());
        let peer = ip("127.0.0.1");
        assert_eq!(
            client(peer, &h, ForwardedHeader::Xff, trusted),
            Some(ip("203.0.113.1"))
        );
        assert_eq!(
            client(peer, &h, ForwardedHeader::Forwarded, trusted),
            Some(ip("198.51.100.2"))
        );
        let mut only_fwd = HeaderMap::new();
        only_fwd.insert("forwarded", "for=198.51.100.2".parse().unwrap());
        assert_eq!(
            client(peer, &only_fwd, ForwardedHeader::Xff, trusted),
            None,
            "no XFF: nobody named"
        );
    }
}
