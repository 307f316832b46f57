//! The ban list as an nftables script, so that the kernel drops banned
//! sources before they reach the proxy (incident 2).

use std::fmt::Write as _;
use std::path::Path;

use ipnet::IpNet;

/// The nftables script for a set of bans: one table `inet doh_proxy` with
/// two interval sets whose elements carry their remaining time, and a rule
/// dropping banned sources on the proxy's ports (TCP, and UDP for QUIC).
/// Declaring, deleting and re-creating the table makes `nft -f` replace it
/// atomically.
pub fn render(bans: &[(IpNet, u64)], tcp_ports: &[u16], udp_ports: &[u16]) -> String {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (net, secs) in bans {
        let secs = (*secs).max(1);
        match net {
            IpNet::V4(n) => v4.push(format!("{n} timeout {secs}s")),
            IpNet::V6(n) => v6.push(format!("{n} timeout {secs}s")),
        }
    }
    let mut s = String::from(
        "#!/usr/sbin/nft -f\n# Written by doh-proxy: active bans. Load with `nft -f FILE`.\n\
         table inet doh_proxy\ndelete table inet doh_proxy\n\ntable inet doh_proxy {\n",
    );
    for (name, ty, elems) in [
        ("banned_v4", "ipv4_addr", &v4),
        ("banned_v6", "ipv6_addr", &v6),
    ] {
        let _ = writeln!(
            s,
            "    set {name} {{\n        type {ty}\n        flags interval, timeout"
        );
        if !elems.is_empty() {
            let _ = writeln!(s, "        elements = {{ {} }}", elems.join(", "));
        }
        s.push_str("    }\n");
    }
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tcp = if tcp_ports.is_empty() {
        "443".to_string()
    } else {
        list(tcp_ports)
    };
    let _ = write!(
        s,
        "    chain input {{\n        type filter hook input priority filter - 10; policy accept;\n\
         \x20       ip saddr @banned_v4 tcp dport {{ {tcp} }} drop\n\
         \x20       ip6 saddr @banned_v6 tcp dport {{ {tcp} }} drop\n"
    );
    if !udp_ports.is_empty() {
        let udp = list(udp_ports);
        let _ = write!(
            s,
            "\x20       ip saddr @banned_v4 udp dport {{ {udp} }} drop\n\
             \x20       ip6 saddr @banned_v6 udp dport {{ {udp} }} drop\n"
        );
    }
    s.push_str("    }\n}\n");
    s
}

/// Writes `text` to `path` atomically (a temporary file, then rename).
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_shape() {
        let s = render(
            &[
                ("192.0.2.1/32".parse().unwrap(), 600),
                ("2001:db8::/56".parse().unwrap(), 30),
            ],
            &[443, 8443],
            &[],
        );
        assert!(s.contains("elements = { 192.0.2.1/32 timeout 600s }"));
        assert!(s.contains("elements = { 2001:db8::/56 timeout 30s }"));
        assert!(s.contains("tcp dport { 443, 8443 } drop"));
        assert!(!s.contains("udp dport"));
        let s = render(&[], &[443], &[443]);
        assert!(s.contains("udp dport { 443 } drop"));
    }
}
