//! Addresses and ranges: what configuration, guard and admin share about
//! IP addresses, and nothing else.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The one client key for requests whose forwarded hop names no usable
/// address (`garbage`, empty, `unknown`, `_hidden`, a zone-indexed IPv6, a
/// PROXY `UNKNOWN`/`LOCAL`). `::` never connects, so it cannot collide with
/// a real client; it has the normal per-client budget and penalty box,
/// and is shown as `unknown`.
pub const UNKNOWN_CLIENT: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// How a client key is written in logs and the admin API.
pub fn client_label(ip: IpAddr) -> String {
    if ip == UNKNOWN_CLIENT {
        "unknown".into()
    } else {
        ip.to_string()
    }
}

/// Maps an IPv4-mapped IPv6 address to IPv4, so one client has one key.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The prefix of `bits` (for IPv4) or `bits6` (for IPv6) an address
/// belongs to.
pub fn prefix_of(ip: IpAddr, bits4: u8, bits6: u8) -> IpNet {
    let bits = if ip.is_ipv4() { bits4 } else { bits6 };
    IpNet::new(ip, bits)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

/// Whether two ranges share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `net` is a single address.
pub fn is_host(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// An address range written `ADDR/BITS`, or a bare address for a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

impl Cidr {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.contains(&canonical(*ip))
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| format!("`{s}` is not an address or an ADDR/BITS range"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether any range of `list` contains `ip`.
pub fn any_contains(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_accepts_bare_addresses() {
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("10.1.2.3/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn mapped_addresses_are_one_client() {
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
        let c: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(c.contains(&mapped));
    }

    #[test]
    fn prefixes_and_overlap() {
        let ip: IpAddr = "2001:db8:1:2:3::1".parse().unwrap();
        assert_eq!(prefix_of(ip, 24, 48).to_string(), "2001:db8:1::/48");
        let a: IpNet = "10.0.0.0/8".parse().unwrap();
        let b: IpNet = "10.1.0.0/16".parse().unwrap();
        let c: IpNet = "11.0.0.0/8".parse().unwrap();
        assert!(overlaps(&a, &b) && overlaps(&b, &a) && !overlaps(&a, &c));
        assert_eq!(client_label(UNKNOWN_CLIENT), "unknown");
    }
}
