//! Command line and configuration file.
//!
//! Every flag has a key of the same name (dashes become underscores) in the
//! TOML file. The file is read first, then every flag given on the command
//! line replaces the file's value: the command line always wins. Merging goes
//! through TOML values so that one struct, [`Config`], carries the defaults
//! and the validation for both sources.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Default config file, read when it exists and no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "doh-proxy.toml";

/// Command line of `doh-proxy`.
#[derive(Debug, Parser)]
#[command(
    name = "doh-proxy",
    version,
    about = "A DNS-over-HTTPS (RFC 8484) endpoint that rejects malformed requests early, \
             enforces per-client and global budgets, bans abusers for a while and answers \
             from a cache with a TTL floor.",
    after_help = "Every option also has a key of the same name (dashes become underscores) in \
                  the TOML config file; the command line wins over the file.\n\
                  Example: doh-proxy --min-ttl 1800 -u 9.9.9.9:53 --tls-cert chain.pem --tls-key key.pem"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration (file and flags) and exit: 0 when it is sound,
    /// 1 with a one-line reason otherwise. Nothing is bound or sent.
    Check,
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// An address range written `ADDR/BITS`, or a bare address for a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

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

impl Cidr {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.contains(&crate::guard::canonical(*ip))
    }
}

/// Flags as given on the command line. Every field is optional so that only
/// what the user typed overrides the file; defaults live in [`Config`].
#[derive(Debug, Default, Args, Serialize)]
pub struct Flags {
    /// TOML config file [default: ./doh-proxy.toml when it exists]
    #[arg(short = 'c', long, global = true, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// HTTPS listener (TLS, ALPN h2 and http/1.1); repeatable [default: 127.0.0.1:8443]
    #[arg(short = 'l', long, global = true, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<SocketAddr>,

    /// PEM certificate chain for the HTTPS listeners [default: a self-signed
    /// certificate for `localhost`, generated at start with a warning]
    #[arg(long, global = true, value_name = "PEM", requires = "tls_key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching --tls-cert
    #[arg(long, global = true, value_name = "PEM", requires = "tls_cert")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// Plain-HTTP listener (HTTP/1.1 and h2c) for use behind a reverse proxy;
    /// repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen_http: Vec<SocketAddr>,

    /// Upstream resolver IP:PORT (UDP, TCP when the answer is truncated);
    /// repeatable, tried in order with failover [default: nameservers of /etc/resolv.conf]
    #[arg(short = 'u', long, global = true, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<SocketAddr>,

    /// Time one client query may spend upstream, retries and failover
    /// included, before it gets SERVFAIL (or a stale answer) [default: 2500]
    #[arg(long, global = true, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_timeout: Option<u64>,

    /// Global budget of queries sent upstream per second, whatever the number
    /// of clients; beyond it misses are answered stale or get 503 [default: 1000]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_qps: Option<u32>,

    /// DoH path [default: /dns-query]
    #[arg(long, global = true, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,

    /// Longest request target accepted, in bytes; longer gets 414 [default: 4096]
    #[arg(long, global = true, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uri: Option<usize>,

    /// Largest POST body accepted, in bytes (at most 65535); larger gets 413 [default: 65535]
    #[arg(long, global = true, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body: Option<usize>,

    /// TTL floor: cached answers live at least this long and are served with
    /// TTLs of at least this value [default: 0]
    #[arg(long, global = true, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_ttl: Option<u32>,

    /// TTL ceiling [default: 86400]
    #[arg(long, global = true, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<u32>,

    /// Maximum number of cached answers (bounds memory) [default: 100000]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<u64>,

    /// How long SERVFAIL answers and upstream failures are cached [default: 2]
    #[arg(long, global = true, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err_ttl: Option<u32>,

    /// How long past expiry an entry may still be served stale (RFC 8767)
    /// when the upstream fails or its budget is spent; 0 disables [default: 86400]
    #[arg(long, global = true, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_secs: Option<u32>,

    /// Sustained queries per second allowed per client address [default: 20]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_ip_qps: Option<u32>,

    /// Burst allowed per client address [default: 100]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_ip_burst: Option<u32>,

    /// Sustained queries per second allowed per client prefix (burst: 5 s
    /// worth) [default: 200]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_prefix_qps: Option<u32>,

    /// IPv4 prefix length grouping clients for budgets, caps and prefix bans [default: 24]
    #[arg(long, global = true, value_name = "BITS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_v4: Option<u8>,

    /// IPv6 prefix length grouping clients for budgets, caps and prefix bans [default: 56]
    #[arg(long, global = true, value_name = "BITS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_v6: Option<u8>,

    /// Open connections allowed per client address; per prefix, 8 times this
    /// [default: 32]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_conns_per_ip: Option<u32>,

    /// Open connections allowed in all [default: 10000]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,

    /// Peers (CIDR) whose X-Forwarded-For / Forwarded headers (and PROXY
    /// protocol with --proxy-protocol) name the real client; repeatable.
    /// Headers from anyone else are ignored [default: none]
    #[arg(long, global = true, value_name = "CIDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxy: Vec<Cidr>,

    /// Expect a PROXY protocol v1/v2 header from --trusted-proxy peers on every listener
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,

    /// Clients (CIDR) never rate-limited, banned or capped; no automatic rule
    /// overrides it; repeatable [default: none]
    #[arg(long, global = true, value_name = "CIDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,

    /// Clients (CIDR) always refused at accept (a static block); repeatable [default: none]
    #[arg(long, global = true, value_name = "CIDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,

    /// Ban a client after this many rejected or rate-limited requests within
    /// a minute [default: 20]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ban_after: Option<u32>,

    /// Length of a first ban; each repeat within a day doubles it, up to 16
    /// times. Bans expire by themselves [default: 600]
    #[arg(long, global = true, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ban_secs: Option<u64>,

    /// Keep an nftables script of the active bans here (rewritten atomically
    /// on change), for `nft -f` [default: off]
    #[arg(long, global = true, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ban_file: Option<PathBuf>,

    /// Count and log every mitigation (rate limit, ban, connection cap) but
    /// enforce none; static --deny ranges and the upstream budget stay
    /// enforced
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,

    /// Admin listener: /metrics, /healthz, /bans [default: 127.0.0.1:9153]
    #[arg(long, global = true, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,

    /// Bearer token required on the admin listener; without it the admin
    /// listener may only bind a loopback address [default: none]
    #[arg(long, global = true, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,

    /// Seconds a client has to complete the TLS handshake (or send a PROXY
    /// header) [default: 5]
    #[arg(long, global = true, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<u64>,

    /// Seconds a connection may stay open with no request in flight and no
    /// bytes moving, before it is closed [default: 30]
    #[arg(long, global = true, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,

    /// Requests served on one connection before it is closed (HTTP/1.1:
    /// `Connection: close`; HTTP/2: GOAWAY) [default: 10000]
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_conn: Option<u64>,

    /// More logging: -v logs one line per request
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    #[serde(skip_serializing_if = "is_zero")]
    pub verbose: u8,

    /// Log format
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// The effective configuration: file values, overridden by flags, over defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub listen_http: Vec<SocketAddr>,
    pub upstream: Vec<SocketAddr>,
    pub upstream_timeout: u64,
    pub upstream_qps: u32,
    pub path: String,
    pub max_uri: usize,
    pub max_body: usize,
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub cache_size: u64,
    pub err_ttl: u32,
    pub stale_secs: u32,
    pub per_ip_qps: u32,
    pub per_ip_burst: u32,
    pub per_prefix_qps: u32,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub max_conns_per_ip: u32,
    pub max_conns: u32,
    pub trusted_proxy: Vec<Cidr>,
    pub proxy_protocol: bool,
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub ban_after: u32,
    pub ban_secs: u64,
    pub ban_file: Option<PathBuf>,
    pub dry_run: bool,
    pub metrics_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub handshake_timeout: u64,
    pub idle_timeout: u64,
    pub max_requests_per_conn: u64,
    pub verbose: u8,
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8443))],
            tls_cert: None,
            tls_key: None,
            listen_http: Vec::new(),
            upstream: Vec::new(),
            upstream_timeout: 2500,
            upstream_qps: 1000,
            path: "/dns-query".into(),
            max_uri: 4096,
            max_body: 65535,
            min_ttl: 0,
            max_ttl: 86400,
            cache_size: 100_000,
            err_ttl: 2,
            stale_secs: 86400,
            per_ip_qps: 20,
            per_ip_burst: 100,
            per_prefix_qps: 200,
            prefix_v4: 24,
            prefix_v6: 56,
            max_conns_per_ip: 32,
            max_conns: 10_000,
            trusted_proxy: Vec::new(),
            proxy_protocol: false,
            allow: Vec::new(),
            deny: Vec::new(),
            ban_after: 20,
            ban_secs: 600,
            ban_file: None,
            dry_run: false,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9153)),
            admin_token: None,
            handshake_timeout: 5,
            idle_timeout: 30,
            max_requests_per_conn: 10_000,
            verbose: 0,
            log_format: LogFormat::Text,
        }
    }
}

/// A configuration that cannot be used, with a one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Builds the effective configuration from parsed flags: reads the file
    /// (explicit `--config`, else `./doh-proxy.toml` if present), then lays
    /// the flags over it.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let path = match &flags.config {
            Some(p) => Some(p.clone()),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                p.exists().then_some(p)
            }
        };
        let mut table = match &path {
            Some(p) => read_table(p)?,
            None => toml::Table::new(),
        };
        let over = toml::Table::try_from(flags).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        table.extend(over);
        let origin = path.unwrap_or_else(|| PathBuf::from("<command line>"));
        table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: origin,
                message: e.message().to_string(),
            })
    }

    /// Parses a configuration from TOML text alone (used by tests and fuzzing).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.message().to_string(),
        })
    }

    /// Checks everything that can be checked without binding a socket or
    /// sending a packet. Returns warnings for sound but suspicious settings.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut warnings = Vec::new();
        if self.listen.is_empty() && self.listen_http.is_empty() {
            return bad("no listener: give --listen or --listen-http".into());
        }
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return bad(format!(
                "path `{}` must start with `/` and hold no `?`, `#` or space",
                self.path
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("--tls-cert and --tls-key go together".into());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            crate::tls::load_pair(cert, key).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if self.upstream_timeout == 0 {
            return bad("upstream_timeout must be at least 1 ms".into());
        }
        if self.min_ttl > self.max_ttl {
            return bad(format!(
                "min_ttl ({}) is above max_ttl ({})",
                self.min_ttl, self.max_ttl
            ));
        }
        if self.max_body == 0 || self.max_body > 65535 {
            return bad("max_body must be between 1 and 65535".into());
        }
        if self.max_uri < 64 {
            return bad("max_uri must be at least 64 bytes".into());
        }
        for (name, v) in [
            ("cache_size", self.cache_size),
            ("per_ip_qps", self.per_ip_qps.into()),
            ("per_ip_burst", self.per_ip_burst.into()),
            ("per_prefix_qps", self.per_prefix_qps.into()),
            ("upstream_qps", self.upstream_qps.into()),
            ("max_conns_per_ip", self.max_conns_per_ip.into()),
            ("max_conns", self.max_conns.into()),
            ("ban_after", self.ban_after.into()),
            ("ban_secs", self.ban_secs),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("max_requests_per_conn", self.max_requests_per_conn),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
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
        ] {
            for r in list {
                if let Some(d) = self
                    .deny
                    .iter()
                    .find(|d| crate::guard::overlaps(&d.0, &r.0))
                {
                    return bad(format!(
                        "{kind} range {r} would be blocked by the static deny range {d}"
                    ));
                }
            }
        }
        if self.admin_token.is_none() && !self.metrics_listen.ip().is_loopback() {
            return bad(format!(
                "the admin listener {} is not a loopback address: set admin_token",
                self.metrics_listen
            ));
        }
        if matches!(&self.admin_token, Some(t) if t.trim().is_empty()) {
            return bad("admin_token is empty".into());
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
        if self.upstream.is_empty() {
            match system_nameservers(Path::new("/etc/resolv.conf")) {
                Ok(v) if !v.is_empty() => warnings.push(format!(
                    "no upstream given: using the nameservers of /etc/resolv.conf ({})",
                    v.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                _ => {
                    return bad("no upstream given and /etc/resolv.conf names no nameserver".into())
                }
            }
        }
        Ok(warnings)
    }

    /// The upstreams to use: the configured ones, else the system's.
    pub fn upstreams(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        if !self.upstream.is_empty() {
            return Ok(self.upstream.clone());
        }
        match system_nameservers(Path::new("/etc/resolv.conf")) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(ConfigError::Invalid(
                "no upstream given and /etc/resolv.conf names no nameserver".into(),
            )),
        }
    }

    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout)
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_string(),
    })
}

/// Reads `nameserver` lines of a resolv.conf, port 53.
pub fn system_nameservers(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver"))
                .then(|| it.next())
                .flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["doh-proxy"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().flags
    }

    #[test]
    fn defaults_match_spec() {
        let c = Config::default();
        assert_eq!(c.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(c.path, "/dns-query");
        assert_eq!((c.min_ttl, c.max_ttl, c.cache_size), (0, 86400, 100_000));
        assert_eq!((c.err_ttl, c.stale_secs), (2, 86400));
        assert_eq!(
            (c.per_ip_qps, c.per_ip_burst, c.per_prefix_qps),
            (20, 100, 200)
        );
        assert_eq!((c.prefix_v4, c.prefix_v6), (24, 56));
        assert_eq!(
            (c.upstream_qps, c.max_conns_per_ip, c.max_conns),
            (1000, 32, 10000)
        );
        assert_eq!((c.ban_after, c.ban_secs), (20, 600));
        assert_eq!(c.metrics_listen, "127.0.0.1:9153".parse().unwrap());
        assert_eq!(c.upstream_timeout, 2500);
    }

    #[test]
    fn command_line_wins_over_file() {
        let dir = std::env::temp_dir().join(format!("doh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "min_ttl = 60\nmax_ttl = 600\nupstream = [\"127.0.0.1:5300\"]\nallow = [\"10.0.0.0/8\"]\n",
        )
        .unwrap();
        let f = flags(&[
            "-c",
            file.to_str().unwrap(),
            "--min-ttl",
            "1800",
            "--max-ttl",
            "86400",
        ]);
        let c = Config::load(&f).unwrap();
        assert_eq!(c.min_ttl, 1800);
        assert_eq!(c.max_ttl, 86400);
        assert_eq!(c.upstream, vec!["127.0.0.1:5300".parse().unwrap()]);
        assert_eq!(c.allow[0].to_string(), "10.0.0.0/8");
        let f = flags(&["-c", file.to_str().unwrap(), "-u", "127.0.0.2:53"]);
        assert_eq!(
            Config::load(&f).unwrap().upstream,
            vec!["127.0.0.2:53".parse().unwrap()]
        );
    }

    #[test]
    fn unknown_key_and_bad_values_are_refused() {
        assert!(Config::from_toml("min_tll = 5").is_err());
        assert!(Config::from_toml("upstream = [\"not-an-address\"]").is_err());
        assert!(Config::from_toml("min_ttl = -1").is_err());
        let c = Config::from_toml("path = \"dns-query\"\nupstream=[\"127.0.0.1:53\"]").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("path"));
    }

    #[test]
    fn allow_inside_deny_is_refused() {
        let c = Config::from_toml(
            "upstream=[\"127.0.0.1:53\"]\nallow=[\"192.0.2.7\"]\ndeny=[\"192.0.2.0/24\"]",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("192.0.2.7/32") && e.contains("192.0.2.0/24"),
            "{e}"
        );
        let c = Config::from_toml(
            "upstream=[\"127.0.0.1:53\"]\ntrusted_proxy=[\"10.0.0.0/8\"]\ndeny=[\"10.1.0.0/16\"]",
        )
        .unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn public_admin_listener_needs_a_token() {
        let c = Config::from_toml("upstream=[\"127.0.0.1:53\"]\nmetrics_listen=\"0.0.0.0:9153\"")
            .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admin_token"));
        let c = Config::from_toml(
            "upstream=[\"127.0.0.1:53\"]\nmetrics_listen=\"0.0.0.0:9153\"\nadmin_token=\"s3cret\"",
        )
        .unwrap();
        assert!(c.validate().is_ok());
    }

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
    fn resolv_conf_nameservers() {
        let p = std::env::temp_dir().join(format!("resolv-{}", std::process::id()));
        std::fs::write(
            &p,
            "# c\nnameserver 192.0.2.53\nsearch x\nnameserver fe80::1%eth0\n",
        )
        .unwrap();
        let v = system_nameservers(&p).unwrap();
        assert_eq!(v[0], "192.0.2.53:53".parse().unwrap());
        assert_eq!(v.len(), 2);
    }
}
