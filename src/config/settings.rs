//! From what the user typed to what the program runs with: every check
//! that can be made without binding a socket or sending a packet, done
//! once, into one settings value per component.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{system_nameservers, Config, ConfigError};
use crate::acme::AcmeSettings;
use crate::admin::AdminSettings;
use crate::app::Settings;
use crate::cache::{CacheSettings, TtlPolicy};
use crate::doh::Limits;
use crate::fleet::FleetSettings;
use crate::guard::GuardSettings;
use crate::net::overlaps;
use crate::odoh::OdohSettings;
use crate::pipeline::ConnLimits;
use crate::server::listener::{Addrs, Kind};
use crate::server::{ServerSettings, TlsSource};
use crate::upstream::{UpstreamSettings, UpstreamSpec};

/// Sound but suspicious settings, for `check` and the start-up log.
pub type Warnings = Vec<String>;

/// Largest answer the cache keeps; larger ones are served, not cached.
pub const MAX_CACHED_ANSWER: usize = 16 * 1024;
/// Connections the admin listener serves at once.
pub const ADMIN_MAX_CONNS: usize = 16;

fn bad<T>(m: String) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(m))
}

impl Config {
    /// Checks everything that can be checked without binding a socket or
    /// sending a packet, and builds the settings; returns warnings for
    /// sound but suspicious values.
    pub fn settings(&self) -> Result<(Settings, Warnings), ConfigError> {
        self.settings_for(false)
    }

    /// As [`Config::settings`], for a process the service manager passed
    /// listening sockets to (`inherited`): it may then configure none.
    /// One builder per component below, each checking what it takes.
    pub fn settings_for(&self, inherited: bool) -> Result<(Settings, Warnings), ConfigError> {
        let mut warnings = Vec::new();
        self.check_counts()?;
        let settings = Settings {
            server: self.server(inherited)?,
            doh: self.doh()?,
            cache: self.cache()?,
            upstream: self.upstream(&mut warnings)?,
            guard: self.guard(&mut warnings)?,
            admin: self.admin()?,
            acme: self.acme()?,
            padding: self.padding,
            odoh: self.odoh(),
            fleet: self.fleet()?,
            verbose: self.verbose,
            log_format: self.log_format,
        };
        if let Some(w) = descriptor_warning(self, &settings.upstream) {
            warnings.push(w);
        }
        Ok((settings, warnings))
    }

    /// Counts and durations that mean nothing at zero.
    fn check_counts(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("cache_size", self.cache_size),
            ("per_ip_qps", self.per_ip_qps.into()),
            ("per_ip_burst", self.per_ip_burst.into()),
            ("per_prefix_qps", self.per_prefix_qps.into()),
            ("per_ip_conn_rate", self.per_ip_conn_rate.into()),
            ("per_prefix_conn_rate", self.per_prefix_conn_rate.into()),
            ("upstream_qps", self.upstream_qps.into()),
            ("known_max", self.known_max),
            ("known_forget_secs", self.known_forget_secs),
            ("max_conns_per_ip", self.max_conns_per_ip.into()),
            ("max_conns", self.max_conns.into()),
            ("ban_after", self.ban_after.into()),
            ("ban_secs", self.ban_secs),
            ("odoh_rotate_secs", self.odoh_rotate_secs),
            ("odoh_relay_qps", self.odoh_relay_qps.into()),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("write_timeout", self.write_timeout),
            ("max_requests_per_conn", self.max_requests_per_conn),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }

    /// The listeners, their certificate and what every connection is held to.
    fn server(&self, inherited: bool) -> Result<ServerSettings, ConfigError> {
        let listen = self.listeners();
        if !inherited && listen.is_empty() {
            let keys: Vec<String> = Kind::ALL
                .iter()
                .map(|k| format!("--{}", k.key().replace('_', "-")))
                .collect();
            return bad(format!("no listener: give {}", keys.join(", ")));
        }
        if let Some(k) = listen.keys().find(|k| k.udp() && !cfg!(feature = "h3")) {
            return bad(format!(
                "{} needs a build with the `h3` feature (QUIC)",
                k.key()
            ));
        }
        if self.tls_ticket_lifetime > 7 * 86400 {
            return bad(format!(
                "tls_ticket_lifetime {} s: at most 604800 (7 days, RFC 8446)",
                self.tls_ticket_lifetime
            ));
        }
        Ok(ServerSettings {
            listen,
            h3_retry_threshold: self.h3_retry_threshold,
            tls: self.tls_source()?,
            ticket_lifetime: (self.tls_ticket_lifetime > 0)
                .then(|| Duration::from_secs(self.tls_ticket_lifetime)),
            conn: ConnLimits {
                handshake_timeout: Duration::from_secs(self.handshake_timeout),
                idle_timeout: Duration::from_secs(self.idle_timeout),
                write_timeout: Duration::from_secs(self.write_timeout),
                max_requests_per_conn: self.max_requests_per_conn,
                proxy_protocol: self.proxy_protocol,
            },
        })
    }

    /// Where the certificate comes from: files, ACME, or self-signed.
    fn tls_source(&self) -> Result<TlsSource, ConfigError> {
        Ok(match (&self.tls_cert, &self.tls_key) {
            _ if !self.acme_domain.is_empty() => {
                if self.tls_cert.is_some() || self.tls_key.is_some() {
                    return bad("acme_domain and tls_cert/tls_key exclude each other".into());
                }
                if self.listen.is_empty() {
                    return bad(
                        "acme_domain needs a TLS listener (--listen) for TLS-ALPN-01".into(),
                    );
                }
                TlsSource::Acme
            }
            (Some(cert), Some(key)) => {
                crate::tls::load_pair(cert, key)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                TlsSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }
            }
            (None, None) => TlsSource::SelfSigned,
            _ => return bad("--tls-cert and --tls-key go together".into()),
        })
    }

    /// DoH request validation.
    fn doh(&self) -> Result<Limits, ConfigError> {
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return bad(format!(
                "path `{}` must start with `/` and hold no `?`, `#` or space",
                self.path
            ));
        }
        if self.max_body == 0 || self.max_body > 65535 {
            return bad("max_body must be between 1 and 65535".into());
        }
        if self.max_uri < 64 {
            return bad("max_uri must be at least 64 bytes".into());
        }
        Ok(Limits {
            path: self.path.clone(),
            max_uri: self.max_uri,
            max_body: self.max_body,
            body_timeout: Duration::from_secs(self.handshake_timeout),
            odoh: self.odoh,
        })
    }

    fn cache(&self) -> Result<CacheSettings, ConfigError> {
        if self.min_ttl > self.max_ttl {
            return bad(format!(
                "min_ttl ({}) is above max_ttl ({})",
                self.min_ttl, self.max_ttl
            ));
        }
        if self.cache_memory.0 < 1 << 20 {
            return bad(format!(
                "cache_memory {} is below the smallest useful cache, 1MiB",
                self.cache_memory
            ));
        }
        Ok(CacheSettings {
            policy: TtlPolicy {
                min_ttl: self.min_ttl,
                max_ttl: self.max_ttl,
                err_ttl: self.err_ttl,
                stale_secs: self.stale_secs,
            },
            max_entries: self.cache_size,
            max_bytes: self.cache_memory.0,
            max_answer: MAX_CACHED_ANSWER,
        })
    }

    /// The upstreams (those of `/etc/resolv.conf` when none is given, with
    /// a warning), their trust anchors and the budget.
    fn upstream(&self, warnings: &mut Warnings) -> Result<UpstreamSettings, ConfigError> {
        if self.upstream_timeout == 0 {
            return bad("upstream_timeout must be at least 1 ms".into());
        }
        if self.known_share > 100 {
            return bad(format!(
                "known_share {} is a percentage: 0 to 100",
                self.known_share
            ));
        }
        let servers = if self.upstream.is_empty() {
            match system_nameservers(Path::new("/etc/resolv.conf")) {
                Ok(v) if !v.is_empty() => {
                    warnings.push(format!(
                        "no upstream given: using the nameservers of /etc/resolv.conf ({})",
                        list(&v)
                    ));
                    v.into_iter().map(UpstreamSpec::udp).collect()
                }
                _ => {
                    return bad("no upstream given and /etc/resolv.conf names no nameserver".into())
                }
            }
        } else {
            self.upstream.clone()
        };
        let mut extra_roots = Vec::new();
        for path in &self.upstream_ca {
            extra_roots.extend(crate::upstream::read_ca(path).map_err(ConfigError::Invalid)?);
        }
        Ok(UpstreamSettings {
            servers,
            timeout: Duration::from_millis(self.upstream_timeout),
            qps: self.upstream_qps,
            known_share: self.known_share,
            dry_run: self.dry_run,
            strategy: self.upstream_strategy,
            extra_roots,
        })
    }

    /// Who may connect and how much each client may ask.
    fn guard(&self, warnings: &mut Warnings) -> Result<GuardSettings, ConfigError> {
        if self.known_max > 100_000_000 {
            return bad(format!(
                "known_max {} is over 100,000,000 (60 bytes each: 6 GiB)",
                self.known_max
            ));
        }
        if self.prefix_v4 == 0 || self.prefix_v4 > 32 {
            return bad(format!("prefix_v4 {} is not in 1..=32", self.prefix_v4));
        }
        if self.prefix_v6 == 0 || self.prefix_v6 > 128 {
            return bad(format!("prefix_v6 {} is not in 1..=128", self.prefix_v6));
        }
        for (kind, list) in [
            ("allow", &self.allow),
            ("trusted_proxy", &self.trusted_proxy),
            ("odoh_relay", &self.odoh_relay),
        ] {
            for r in list {
                if let Some(d) = self.deny.iter().find(|d| overlaps(&d.0, &r.0)) {
                    return bad(format!(
                        "{kind} range {r} would be blocked by the static deny range {d}"
                    ));
                }
            }
        }
        if !self.listen_http.is_empty() && self.trusted_proxy.is_empty() {
            warnings.push(
                "listen_http is set but no trusted_proxy: every client behind the reverse proxy \
                 will look like the proxy itself and share one budget"
                    .into(),
            );
        }
        if self.proxy_protocol && self.trusted_proxy.is_empty() {
            warnings.push(
                "proxy_protocol is set but no trusted_proxy: PROXY headers will never be read"
                    .into(),
            );
        }
        Ok(GuardSettings {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            trusted: self.trusted_proxy.clone(),
            forwarded_header: self.forwarded_header,
            proxy_protocol: self.proxy_protocol,
            dry_run: self.dry_run,
            prefix_v4: self.prefix_v4,
            prefix_v6: self.prefix_v6,
            per_ip_qps: self.per_ip_qps,
            per_ip_burst: self.per_ip_burst,
            per_prefix_qps: self.per_prefix_qps,
            odoh_relay_qps: self.odoh_relay_qps,
            odoh_relays: self.odoh_relay.clone(),
            max_conns: self.max_conns,
            max_conns_per_ip: self.max_conns_per_ip,
            per_ip_conn_rate: self.per_ip_conn_rate,
            known_after_secs: self.known_after_secs,
            known_max: self.known_max,
            known_forget_secs: self.known_forget_secs,
            per_prefix_conn_rate: self.per_prefix_conn_rate,
            ban_after: self.ban_after,
            ban_secs: self.ban_secs,
            ban_file: self.ban_file.clone(),
            state_file: self.state_file.clone(),
            ports: Vec::new(),
            udp_ports: Vec::new(),
        })
    }

    fn admin(&self) -> Result<AdminSettings, ConfigError> {
        if self.admin_token.is_none() && !self.metrics_listen.ip().is_loopback() {
            return bad(format!(
                "the admin listener {} is not a loopback address: set admin_token",
                self.metrics_listen
            ));
        }
        if matches!(&self.admin_token, Some(t) if t.trim().is_empty()) {
            return bad("admin_token is empty".into());
        }
        Ok(AdminSettings {
            listen: self.metrics_listen,
            token: self.admin_token.clone(),
            max_conns: ADMIN_MAX_CONNS,
        })
    }

    /// Certificates from an ACME CA, with `--acme-domain`.
    fn acme(&self) -> Result<Option<AcmeSettings>, ConfigError> {
        if self.acme_domain.is_empty() {
            return Ok(None);
        }
        for d in &self.acme_domain {
            if rustls::pki_types::DnsName::try_from(d.as_str()).is_err() || !d.contains('.') {
                return bad(format!("acme_domain `{d}` is not a domain name"));
            }
        }
        if !self.acme_directory.starts_with("https://") {
            return bad(format!(
                "acme_directory `{}` must be an https:// URL",
                self.acme_directory
            ));
        }
        if let Some(ca) = &self.acme_ca {
            crate::upstream::read_ca(ca)
                .map_err(|e| ConfigError::Invalid(e.replace("upstream_ca", "acme_ca")))?;
        }
        Ok(Some(AcmeSettings {
            domains: self.acme_domain.clone(),
            contact: self.acme_contact.clone(),
            directory: self.acme_directory.clone(),
            ca: self.acme_ca.clone(),
            cache: self.acme_cache.clone(),
            renew_before: Duration::from_secs(u64::from(self.acme_renew_days) * 86400),
        }))
    }

    fn odoh(&self) -> OdohSettings {
        OdohSettings {
            enabled: self.odoh,
            rotate: Duration::from_secs(self.odoh_rotate_secs),
            relay_qps: self.odoh_relay_qps,
        }
    }

    /// State shared through Redis, with `--redis`.
    fn fleet(&self) -> Result<Option<FleetSettings>, ConfigError> {
        let Some(url) = &self.redis else {
            return Ok(None);
        };
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return bad(format!("redis `{url}` must be a redis:// or rediss:// URL"));
        }
        redis::Client::open(url.as_str())
            .map_err(|e| ConfigError::Invalid(format!("redis `{url}`: {e}")))?;
        Ok(Some(FleetSettings { url: url.clone() }))
    }
}

impl Config {
    /// The configured addresses of each kind of listener.
    fn listeners(&self) -> Addrs {
        Kind::ALL
            .into_iter()
            .map(|k| (k, self.listen_of(k).to_vec()))
            .filter(|(_, a)| !a.is_empty())
            .collect()
    }

    /// The addresses configured for one kind of listener (its key).
    fn listen_of(&self, kind: Kind) -> &[SocketAddr] {
        match kind {
            Kind::Https => &self.listen,
            Kind::Http => &self.listen_http,
            Kind::Dot => &self.listen_dot,
            Kind::H3 => &self.listen_h3,
            Kind::Doq => &self.listen_doq,
        }
    }
}

fn list(v: &[SocketAddr]) -> String {
    v.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Descriptors the proxy may need at once: every client connection, every
/// upstream query in flight (the upstream budget over the timeout, one
/// socket each), the idle sockets the UDP pools keep, the admin
/// connections and a margin for listeners and files.
pub fn descriptors_needed(
    max_conns: u32,
    upstream_qps: u32,
    upstream_timeout: Duration,
    idle_upstream: u64,
) -> u64 {
    let upstream = (f64::from(upstream_qps) * upstream_timeout.as_secs_f64()).ceil() as u64;
    u64::from(max_conns) + upstream + idle_upstream + ADMIN_MAX_CONNS as u64 + 64
}

fn descriptor_warning(cfg: &Config, upstream: &UpstreamSettings) -> Option<String> {
    let (_, hard) = crate::app::nofile_limit()?;
    let needed = descriptors_needed(
        cfg.max_conns,
        cfg.upstream_qps,
        upstream.timeout,
        upstream.idle_sockets(),
    );
    (hard < needed).then(|| {
        format!(
            "max_conns ({}) plus upstream sockets (upstream_qps × upstream_timeout, and the \
             idle ones kept per UDP upstream) need about {needed} file descriptors, but the \
             hard limit is {hard}: raise LimitNOFILE (or ulimit -Hn) or lower max_conns",
            cfg.max_conns
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Result<(Settings, Warnings), ConfigError> {
        Config::from_toml(&format!("upstream=[\"127.0.0.1:53\"]\n{extra}"))
            .unwrap()
            .settings()
    }

    #[test]
    fn bad_values_get_one_line_reasons() {
        let e = settings("path = \"dns-query\"").unwrap_err().to_string();
        assert!(e.contains("path"), "{e}");
        let e = settings("min_ttl = 10\nmax_ttl = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_ttl"), "{e}");
        let e = settings("per_ip_conn_rate = 0").unwrap_err().to_string();
        assert!(e.contains("per_ip_conn_rate"), "{e}");
        let e = settings("cache_memory = \"4KiB\"").unwrap_err().to_string();
        assert!(e.contains("cache_memory"), "{e}");
        assert!(settings("").is_ok());
    }

    #[test]
    fn allow_inside_deny_is_refused() {
        let e = settings("allow=[\"192.0.2.7\"]\ndeny=[\"192.0.2.0/24\"]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("192.0.2.7/32") && e.contains("192.0.2.0/24"),
            "{e}"
        );
        assert!(settings("trusted_proxy=[\"10.0.0.0/8\"]\ndeny=[\"10.1.0.0/16\"]").is_err());
    }

    #[test]
    fn public_admin_listener_needs_a_token() {
        let e = settings("metrics_listen=\"0.0.0.0:9153\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_token"), "{e}");
        assert!(settings("metrics_listen=\"0.0.0.0:9153\"\nadmin_token=\"s3cret\"").is_ok());
    }

    fn config(text: &str) -> Config {
        Config::from_toml(&format!("upstream=[\"127.0.0.1:53\"]\n{text}")).unwrap()
    }

    #[test]
    fn server_needs_a_listener_unless_sockets_are_passed() {
        let c = config("listen = []");
        let e = c.server(false).unwrap_err().to_string();
        assert!(e.contains("--listen-doq"), "{e}");
        assert!(c.server(true).unwrap().listen.is_empty());
        let s = config("listen_dot = [\"127.0.0.1:853\"]")
            .server(false)
            .unwrap();
        assert_eq!(s.listen[&Kind::Dot], ["127.0.0.1:853".parse().unwrap()]);
        assert_eq!(s.listen[&Kind::Https], ["127.0.0.1:8443".parse().unwrap()]);
        assert!(config("tls_ticket_lifetime = 604801")
            .server(false)
            .is_err());
        assert_eq!(
            config("tls_ticket_lifetime = 0")
                .server(false)
                .unwrap()
                .ticket_lifetime,
            None
        );
    }

    #[test]
    fn cache_takes_the_ttl_policy() {
        let c = config("min_ttl = 1800\nmax_ttl = 3600\ncache_memory = \"2MiB\"")
            .cache()
            .unwrap();
        assert_eq!((c.policy.min_ttl, c.policy.max_ttl), (1800, 3600));
        assert_eq!(c.max_bytes, 2 << 20);
        assert_eq!(c.max_answer, MAX_CACHED_ANSWER);
    }

    #[test]
    fn upstream_takes_its_servers_and_budget() {
        let u = config("upstream_qps = 7\nknown_share = 0")
            .upstream(&mut Vec::new())
            .unwrap();
        assert_eq!(
            u.servers,
            vec![UpstreamSpec::udp("127.0.0.1:53".parse().unwrap())]
        );
        assert_eq!((u.qps, u.known_share), (7, 0));
        assert!(config("known_share = 101")
            .upstream(&mut Vec::new())
            .is_err());
        assert!(config("upstream_timeout = 0")
            .upstream(&mut Vec::new())
            .is_err());
    }

    #[test]
    fn guard_warns_of_an_untrusted_reverse_proxy() {
        let mut w = Vec::new();
        config("listen_http = [\"127.0.0.1:8080\"]")
            .guard(&mut w)
            .unwrap();
        assert!(w.iter().any(|w| w.contains("trusted_proxy")), "{w:?}");
        assert!(config("prefix_v4 = 33").guard(&mut Vec::new()).is_err());
    }

    #[test]
    fn fleet_and_acme_only_when_asked() {
        assert!(config("").fleet().unwrap().is_none());
        assert!(config("redis = \"http://127.0.0.1\"").fleet().is_err());
        assert!(config("").acme().unwrap().is_none());
        assert!(config("acme_domain = [\"localhost\"]").acme().is_err());
    }

    #[test]
    fn descriptor_needs_count_upstream_sockets() {
        assert_eq!(
            descriptors_needed(10_000, 1000, Duration::from_millis(2500), 512),
            10_000 + 2500 + 512 + 16 + 64
        );
        // Two UDP upstreams keep their idle sockets; a DoT one has none.
        let c = Config::from_toml(
            "upstream = [\"127.0.0.1:53\", \"127.0.0.2:53\", \"tls://127.0.0.3:853#dns.test\"]",
        )
        .unwrap();
        let three = c.upstream(&mut Vec::new()).unwrap().idle_sockets();
        let one = config("").upstream(&mut Vec::new()).unwrap().idle_sockets();
        assert!(one >= 64, "{one}");
        assert_eq!(three, 2 * one);
    }
}
