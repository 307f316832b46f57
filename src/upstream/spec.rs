//! How an upstream is written: `IP:PORT` (UDP, TCP after truncation),
//! `tcp://IP:PORT`, `tls://IP:PORT#NAME` (DNS over TLS, RFC 7858) and
//! `https://IP:PORT/PATH#NAME` (DNS over HTTPS, HTTP/2). `NAME` is checked
//! against the upstream's certificate and sent as SNI; without it, the
//! address itself is checked. Addresses only: an upstream named by a host
//! name would need a resolver to find the resolver.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How queries reach one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP, with TCP after a truncated or oversized answer.
    Udp,
    Tcp,
    /// DNS over TLS; the name the certificate must carry.
    Tls {
        name: String,
    },
    /// DNS over HTTPS (HTTP/2): the path and the certificate name.
    Https {
        path: String,
        name: String,
    },
}

/// One `--upstream`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamSpec {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// As written, for metric labels and logs.
    text: String,
}

impl UpstreamSpec {
    pub fn udp(addr: SocketAddr) -> UpstreamSpec {
        UpstreamSpec {
            addr,
            transport: Transport::Udp,
            text: addr.to_string(),
        }
    }

    /// The label of this upstream in metrics and logs: what was written.
    pub fn label(&self) -> &str {
        &self.text
    }

    /// Whether queries go over a stream (TCP, TLS, HTTPS) from the start.
    pub fn is_stream(&self) -> bool {
        !matches!(self.transport, Transport::Udp)
    }
}

fn parse_addr(s: &str, default_port: u16, whole: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| {
            format!("upstream `{whole}`: `{s}` is not an IP address with an optional port")
        })
}

impl FromStr for UpstreamSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let whole = s.trim();
        let (scheme, rest) = match whole.split_once("://") {
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
            None => (String::from("udp"), whole),
        };
        let (rest, name) = match rest.split_once('#') {
            Some((r, n)) if !n.is_empty() => (r, Some(n.to_string())),
            Some(_) => return Err(format!("upstream `{whole}`: empty name after `#`")),
            None => (rest, None),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let transport = match scheme.as_str() {
            "udp" | "tcp" => {
                if path.is_some() || name.is_some() {
                    return Err(format!(
                        "upstream `{whole}`: a path or #NAME only goes with tls:// or https://"
                    ));
                }
                if scheme == "udp" {
                    Transport::Udp
                } else {
                    Transport::Tcp
                }
            }
            "tls" => {
                if path.is_some() {
                    return Err(format!("upstream `{whole}`: tls:// takes no path"));
                }
                Transport::Tls {
                    name: String::new(),
                }
            }
            "https" => {
                let path = path.unwrap_or("/dns-query");
                if path.contains(['?', ' ']) {
                    return Err(format!("upstream `{whole}`: the path holds `?` or a space"));
                }
                Transport::Https {
                    path: path.to_string(),
                    name: String::new(),
                }
            }
            other => {
                return Err(format!(
                    "upstream `{whole}`: unknown scheme `{other}` (use IP:PORT, tcp://, tls:// or https://)"
                ))
            }
        };
        let default_port = match transport {
            Transport::Udp | Transport::Tcp => 53,
            Transport::Tls { .. } => 853,
            Transport::Https { .. } => 443,
        };
        let addr = parse_addr(host, default_port, whole)?;
        let cert_name = name.unwrap_or_else(|| addr.ip().to_string());
        if rustls::pki_types::ServerName::try_from(cert_name.as_str()).is_err() {
            return Err(format!(
                "upstream `{whole}`: `{cert_name}` is not a valid certificate name"
            ));
        }
        let transport = match transport {
            Transport::Tls { .. } => Transport::Tls { name: cert_name },
            Transport::Https { path, .. } => Transport::Https {
                path,
                name: cert_name,
            },
            t => t,
        };
        Ok(UpstreamSpec {
            addr,
            transport,
            text: whole.to_string(),
        })
    }
}

impl fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for UpstreamSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UpstreamSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> UpstreamSpec {
        s.parse().unwrap()
    }

    #[test]
    fn every_form() {
        assert_eq!(spec("127.0.0.1:5300").transport, Transport::Udp);
        assert_eq!(spec("[::1]:53").addr, "[::1]:53".parse().unwrap());
        assert_eq!(spec("tcp://192.0.2.1:53").transport, Transport::Tcp);
        assert_eq!(spec("tcp://192.0.2.1").addr.port(), 53);
        let t = spec("tls://9.9.9.9:853#dns.quad9.net");
        assert_eq!(
            t.transport,
            Transport::Tls {
                name: "dns.quad9.net".into()
            }
        );
        assert_eq!(t.label(), "tls://9.9.9.9:853#dns.quad9.net");
        assert_eq!(
            spec("tls://192.0.2.53").transport,
            Transport::Tls {
                name: "192.0.2.53".into()
            }
        );
        assert_eq!(spec("tls://192.0.2.53").addr.port(), 853);
        let h = spec("https://127.0.0.1:8453/dns-query#localhost");
        assert_eq!(
            h.transport,
            Transport::Https {
                path: "/dns-query".into(),
                name: "localhost".into()
            }
        );
        assert_eq!(spec("https://[2001:db8::1]").addr.port(), 443);
    }

    #[test]
    fn clear_errors() {
        for (bad, says) in [
            ("dns.google:53", "not an IP address"),
            ("quic://1.1.1.1", "unknown scheme"),
            ("tls://1.1.1.1#", "empty name"),
            ("tcp://1.1.1.1#x", "only goes with"),
            ("tls://1.1.1.1/dns-query", "no path"),
            ("https://1.1.1.1/q?x=1", "`?`"),
            ("tls://1.1.1.1#not a name", "not a valid certificate name"),
        ] {
            let e = bad.parse::<UpstreamSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
