//! Command line and configuration file: what the user typed.
//!
//! [`Config`] is declared once: each field is a flag (with its help text and
//! its default, in clap's attributes) and a key of the TOML file of the same
//! name. The file is read first, then every flag that was typed on the
//! command line replaces the file's value (clap tells typed values from
//! defaults), and the result is deserialized with the same defaults. A
//! [`Config`] is then checked once into the [`Settings`] the program runs
//! with (see [`settings`]); nothing else reads a `Config`.

mod settings;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};

pub use crate::app::LogFormat;
pub use crate::guard::forwarded::ForwardedHeader;
pub use crate::net::Cidr;
pub use crate::pipeline::Padding;
pub use crate::upstream::{Strategy, UpstreamSpec};
pub use settings::Warnings;

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
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration (file and flags) and exit: 0 when it is sound,
    /// 1 with a one-line reason otherwise. Nothing is bound or sent.
    Check,
}

/// A size in bytes, written `268435456`, `256MiB`, `1GiB`, `64KiB`, `100MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (bytes, or a number with KiB, MiB, GiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "`{s}`: unknown unit `{unit}` (use KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= m && n % m == 0 {
                return write!(f, "{}{unit}", n / m);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Every flag and config key. Defaults live in the `default_value`
/// attributes and nowhere else: [`Config::default`] parses an empty
/// command line.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TOML config file [default: ./doh-proxy.toml when it exists]
    #[arg(short = 'c', long, global = true, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    // --- Listeners
    /// HTTPS listener (TLS, ALPN h2 and http/1.1); repeatable
    #[arg(
        short = 'l',
        long,
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:8443",
        help_heading = "Listeners"
    )]
    pub listen: Vec<SocketAddr>,

    /// PEM certificate chain for the TLS listeners [default: a self-signed
    /// certificate for `localhost`, generated at start with a warning]
    #[arg(long, global = true, value_name = "PEM", help_heading = "Listeners")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching --tls-cert
    #[arg(long, global = true, value_name = "PEM", help_heading = "Listeners")]
    pub tls_key: Option<PathBuf>,

    /// Seconds a TLS session ticket lets a returning client resume without
    /// a full handshake (at most 604800); ticket keys change every period
    /// and are erased after two, and are shared with --redis. 0: no
    /// tickets, resumption from a 16,384-session memory cache only
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 21600,
        help_heading = "Listeners"
    )]
    pub tls_ticket_lifetime: u64,

    /// Plain-HTTP listener (HTTP/1.1 and h2c) for use behind a reverse
    /// proxy; repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = "Listeners")]
    pub listen_http: Vec<SocketAddr>,

    /// DoH over HTTP/3 listener (UDP), same certificate, same answers and
    /// refusals as over HTTP/2; HTTPS answers then carry `Alt-Svc`;
    /// repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = "Listeners")]
    pub listen_h3: Vec<SocketAddr>,

    /// DNS over QUIC listener (RFC 9250, UDP; usually port 853): ALPN
    /// `doq`, one query per stream, same certificate, guard and answers as
    /// HTTP/3; repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = "Listeners")]
    pub listen_doq: Vec<SocketAddr>,

    /// Unvalidated QUIC handshakes per second beyond which a source must
    /// prove its address with a Retry first (0: always)
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 100,
        help_heading = "Listeners"
    )]
    pub h3_retry_threshold: u32,

    /// DNS over TLS listener (RFC 7858), same certificate; pipelined
    /// queries answered out of order; repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = "Listeners")]
    pub listen_dot: Vec<SocketAddr>,

    /// DoH path
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "/dns-query",
        help_heading = "Listeners"
    )]
    pub path: String,

    /// Longest request target accepted, in bytes; longer gets 414
    #[arg(
        long,
        global = true,
        value_name = "BYTES",
        default_value_t = 4096,
        help_heading = "Listeners"
    )]
    pub max_uri: usize,

    /// Largest POST body accepted, in bytes (at most 65535); larger gets 413
    #[arg(
        long,
        global = true,
        value_name = "BYTES",
        default_value_t = 65535,
        help_heading = "Listeners"
    )]
    pub max_body: usize,

    /// Seconds from accept to a connection's first complete request: TLS
    /// handshake, PROXY header, protocol detection and request headers
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 5,
        help_heading = "Listeners"
    )]
    pub handshake_timeout: u64,

    /// Seconds a connection may stay open with no request in flight and none
    /// started; control frames and stray bytes do not count as activity
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 30,
        help_heading = "Listeners"
    )]
    pub idle_timeout: u64,

    /// Seconds a client may leave its answers unread (DNS over TLS and
    /// QUIC, HTTP/2 and HTTP/3 streams whose window stays shut); then the
    /// connection is closed and the client scored
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 10,
        help_heading = "Listeners"
    )]
    pub write_timeout: u64,

    /// Requests served on one connection before it is closed (HTTP/1.1:
    /// `Connection: close`; HTTP/2: GOAWAY)
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 10_000,
        help_heading = "Listeners"
    )]
    pub max_requests_per_conn: u64,

    /// Obtain and renew the certificate from an ACME CA for this name
    /// (TLS-ALPN-01 on the TLS listener); repeatable; replaces
    /// --tls-cert/--tls-key [default: off]
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Certificates"
    )]
    pub acme_domain: Vec<String>,

    /// Contact for the ACME account (`mailto:admin@example.org`) [default: none]
    #[arg(long, global = true, value_name = "URI", help_heading = "Certificates")]
    pub acme_contact: Option<String>,

    /// ACME directory URL
    #[arg(long, global = true, value_name = "URL", default_value = crate::acme::LETS_ENCRYPT, help_heading = "Certificates")]
    pub acme_directory: String,

    /// Trust anchors (PEM) for the ACME directory, for a test CA such as
    /// pebble [default: the system's roots]
    #[arg(long, global = true, value_name = "PEM", help_heading = "Certificates")]
    pub acme_ca: Option<PathBuf>,

    /// Where the ACME account, certificate and key are kept
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "acme-cache",
        help_heading = "Certificates"
    )]
    pub acme_cache: PathBuf,

    /// Renew the ACME certificate when fewer days than this remain
    #[arg(
        long,
        global = true,
        value_name = "DAYS",
        default_value_t = 30,
        help_heading = "Certificates"
    )]
    pub acme_renew_days: u32,

    // --- Upstream
    /// Upstream resolver; repeatable: `IP:PORT` (UDP, TCP when the answer is
    /// truncated), `tcp://IP:PORT`, `tls://IP:PORT#NAME` (DNS over TLS; NAME
    /// is checked against the certificate and sent as SNI, default the IP),
    /// `https://IP:PORT/PATH#NAME` (DNS over HTTPS, HTTP/2) [default:
    /// nameservers of /etc/resolv.conf]
    #[arg(
        short = 'u',
        long,
        global = true,
        value_name = "SPEC",
        help_heading = "Upstream"
    )]
    pub upstream: Vec<UpstreamSpec>,

    /// Extra trust anchors (PEM) for tls:// and https:// upstreams;
    /// repeatable [default: the system's roots only]
    #[arg(long, global = true, value_name = "PEM", help_heading = "Upstream")]
    pub upstream_ca: Vec<PathBuf>,

    /// How upstreams are ordered: `fastest` (those up, by measured latency;
    /// the others keep being probed) or `ordered` (those up, as listed)
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "STRATEGY",
        default_value = "fastest",
        help_heading = "Upstream"
    )]
    pub upstream_strategy: Strategy,

    /// One deadline for the whole resolution of a query, in ms: hedged
    /// attempts and failover included; then SERVFAIL (or a stale answer).
    /// An upstream that answers within it is never turned into SERVFAIL
    #[arg(
        long,
        global = true,
        value_name = "MS",
        default_value_t = 2500,
        help_heading = "Upstream"
    )]
    pub upstream_timeout: u64,

    /// Global budget of queries sent upstream per second, whatever the number
    /// of clients; beyond it misses are answered stale or get 503
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 1000,
        help_heading = "Upstream"
    )]
    pub upstream_qps: u32,

    /// Share of --upstream-qps (percent) that only known clients may spend
    /// once new clients have spent the rest; 0 turns the priority off
    #[arg(
        long,
        global = true,
        value_name = "PERCENT",
        default_value_t = 50,
        help_heading = "Upstream"
    )]
    pub known_share: u8,

    /// A client answered once, and answered again at least this long after
    /// without being banned in between, is known (it keeps --known-share of
    /// the upstream budget, and its connections at --max-conns)
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 86400,
        help_heading = "Clients"
    )]
    pub known_after_secs: u64,

    /// Clients remembered at most (first-seen times and known ones, at most
    /// 60 bytes each); when full, a client not yet known is forgotten before
    /// a known one, the least recently seen first
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 1_000_000,
        help_heading = "Clients"
    )]
    pub known_max: u64,

    /// A known client not seen for this long is forgotten
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 2_592_000,
        help_heading = "Clients"
    )]
    pub known_forget_secs: u64,

    // --- Cache
    /// TTL floor: cached answers live at least this long and are served with
    /// TTLs of at least this value
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 0,
        help_heading = "Cache"
    )]
    pub min_ttl: u32,

    /// TTL ceiling
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 86400,
        help_heading = "Cache"
    )]
    pub max_ttl: u32,

    /// Maximum number of cached answers
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 100_000,
        help_heading = "Cache"
    )]
    pub cache_size: u64,

    /// Memory the cache may hold, each entry weighed by its real size
    /// (`256MiB`, `1GiB` or bytes); answers over 16 KiB are served but not
    /// cached
    #[arg(
        long,
        global = true,
        value_name = "SIZE",
        default_value = "256MiB",
        help_heading = "Cache"
    )]
    pub cache_memory: ByteSize,

    /// How long SERVFAIL answers and upstream failures are cached
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 2,
        help_heading = "Cache"
    )]
    pub err_ttl: u32,

    /// How long past expiry an entry may still be served stale (RFC 8767)
    /// when the upstream fails or its budget is spent; 0 disables
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 86400,
        help_heading = "Cache"
    )]
    pub stale_secs: u32,

    // --- Clients
    /// Sustained requests per second allowed per client address (every
    /// request counts, whatever its path or method)
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 20,
        help_heading = "Clients"
    )]
    pub per_ip_qps: u32,

    /// Burst allowed per client address
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 100,
        help_heading = "Clients"
    )]
    pub per_ip_burst: u32,

    /// Sustained requests per second allowed per client prefix (burst: 5 s
    /// worth)
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 200,
        help_heading = "Clients"
    )]
    pub per_prefix_qps: u32,

    /// IPv4 prefix length grouping clients for budgets, caps and prefix bans
    #[arg(
        long,
        global = true,
        value_name = "BITS",
        default_value_t = 24,
        help_heading = "Clients"
    )]
    pub prefix_v4: u8,

    /// IPv6 prefix length grouping clients for budgets, caps and prefix bans
    #[arg(
        long,
        global = true,
        value_name = "BITS",
        default_value_t = 56,
        help_heading = "Clients"
    )]
    pub prefix_v6: u8,

    /// Open connections allowed per client address; per prefix, 8 times
    /// this; per IPv4 /16 or IPv6 /48, a quarter of --max-conns
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 32,
        help_heading = "Clients"
    )]
    pub max_conns_per_ip: u32,

    /// Open connections allowed in all; when reached, the connection idle
    /// the longest is closed to make room
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 10_000,
        help_heading = "Clients"
    )]
    pub max_conns: u32,

    /// New connections per second per client address (burst: 5 s worth);
    /// over it a connection is closed at accept and scored
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 10,
        help_heading = "Clients"
    )]
    pub per_ip_conn_rate: u32,

    /// New connections per second per client prefix (burst: 5 s worth)
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 100,
        help_heading = "Clients"
    )]
    pub per_prefix_conn_rate: u32,

    /// Peers (CIDR) whose forwarding header (and PROXY protocol with
    /// --proxy-protocol) names the real client; repeatable. Headers from
    /// anyone else are ignored [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = "Clients")]
    pub trusted_proxy: Vec<Cidr>,

    /// Which header names the client behind a trusted proxy; the other is
    /// ignored. An unparseable hop names no client: such requests share one
    /// budget, `unknown`
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "HEADER",
        default_value = "xff",
        help_heading = "Clients"
    )]
    pub forwarded_header: ForwardedHeader,

    /// Expect a PROXY protocol v1/v2 header from --trusted-proxy peers on
    /// every listener; it alone then names the client
    #[arg(long, global = true, help_heading = "Clients")]
    pub proxy_protocol: bool,

    /// Clients (CIDR) never rate-limited, banned or capped; no automatic rule
    /// overrides it; repeatable [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = "Clients")]
    pub allow: Vec<Cidr>,

    /// Clients (CIDR) always refused at accept (a static block); repeatable
    /// [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = "Clients")]
    pub deny: Vec<Cidr>,

    // --- Penalty box
    /// Ban a client after this many refused requests, refused connections
    /// or protocol errors within a minute
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 20,
        help_heading = "Penalty box"
    )]
    pub ban_after: u32,

    /// Length of a first ban; each repeat within a day doubles it, up to 16
    /// times. Bans expire by themselves
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 600,
        help_heading = "Penalty box"
    )]
    pub ban_secs: u64,

    /// Keep an nftables script of the active bans here (rewritten atomically
    /// on change), for `nft -f` [default: off]
    #[arg(long, global = true, value_name = "PATH", help_heading = "Penalty box")]
    pub ban_file: Option<PathBuf>,

    /// Keep the bans in force and the repeat counts here (JSON, written
    /// atomically on change and at shutdown), and restore them at start
    /// [default: off]
    #[arg(long, global = true, value_name = "PATH", help_heading = "Penalty box")]
    pub state_file: Option<PathBuf>,

    /// Count and log every mitigation (rate limit, ban, connection cap) but
    /// enforce none; static --deny ranges and the upstream budget stay
    /// enforced
    #[arg(long, global = true, help_heading = "Penalty box")]
    pub dry_run: bool,

    // --- Privacy
    /// EDNS(0) padding of answers to a multiple of 468 bytes (RFC 8467),
    /// never beyond the client's payload size: `padded-queries` (answers to
    /// queries that carried a Padding option), `always`, `never`
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "WHEN",
        default_value = "padded-queries",
        help_heading = "Privacy"
    )]
    pub padding: Padding,

    /// Oblivious DoH target (RFC 9230): `GET /.well-known/odohconfigs`, and
    /// `POST PATH` with `Content-Type: application/oblivious-dns-message`
    #[arg(long, global = true, help_heading = "Privacy")]
    pub odoh: bool,

    /// Lifetime of an Oblivious DoH key; the previous key is still
    /// accepted for one more lifetime
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 86400,
        help_heading = "Privacy"
    )]
    pub odoh_rotate_secs: u64,

    /// Oblivious DoH requests per second per relay address (burst 5 s'
    /// worth), in place of --per-ip-qps
    #[arg(
        long,
        global = true,
        value_name = "N",
        default_value_t = 2000,
        help_heading = "Privacy"
    )]
    pub odoh_relay_qps: u32,

    /// Addresses (CIDR) of the Oblivious DoH relays this target serves;
    /// only their sealed queries get --odoh-relay-qps, anybody else's meet
    /// the ordinary per-client budget; repeatable [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = "Privacy")]
    pub odoh_relay: Vec<Cidr>,

    /// Share bans, the upstream budget, unique-client counts and ODoH keys
    /// with every instance naming the same Redis: `redis://HOST:PORT/DB` or
    /// `rediss://…` [default: off]
    #[arg(long, global = true, value_name = "URL", help_heading = "Operations")]
    pub redis: Option<String>,

    // --- Operations
    /// Admin listener: /metrics, /healthz, /bans
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:9153",
        help_heading = "Operations"
    )]
    pub metrics_listen: SocketAddr,

    /// Bearer token required on the admin listener; without it the admin
    /// listener may only bind a loopback address [default: none]
    #[arg(long, global = true, value_name = "TOKEN", help_heading = "Operations")]
    pub admin_token: Option<String>,

    /// More logging: -v logs one line per request
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count, help_heading = "Operations")]
    pub verbose: u8,

    /// Log format
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value = "text",
        help_heading = "Operations"
    )]
    pub log_format: LogFormat,
}

impl Default for Config {
    /// The defaults: an empty command line.
    fn default() -> Self {
        match Cli::try_parse_from(["doh-proxy"]) {
            Ok(cli) => cli.config,
            // Covered by a unit test: the built-in defaults always parse.
            Err(e) => panic!("built-in defaults do not parse: {e}"),
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

/// What the command line said: the subcommand, and the flags that were
/// typed (as TOML values) so that they can be laid over the file again
/// whenever it is re-read.
#[derive(Debug, Clone)]
pub struct CommandLine {
    pub check: bool,
    /// `--config`, if given.
    pub file: Option<PathBuf>,
    typed: toml::Table,
}

impl CommandLine {
    /// Parses the process's arguments (exits with usage on error, as clap does).
    pub fn parse() -> CommandLine {
        Self::from_matches(&Cli::command().get_matches())
    }

    /// Parses `args` (the program name first).
    pub fn try_parse_from<I, T>(args: I) -> Result<CommandLine, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(Self::from_matches(
            &Cli::command().try_get_matches_from(args)?,
        ))
    }

    fn from_matches(m: &ArgMatches) -> CommandLine {
        let (check, config) = match Cli::from_arg_matches(m) {
            Ok(cli) => (matches!(cli.command, Some(Command::Check)), cli.config),
            Err(e) => e.exit(),
        };
        let mut typed = toml::Table::new();
        if let Ok(toml::Value::Table(all)) = toml::Value::try_from(&config) {
            for (key, value) in all {
                if m.value_source(&key) == Some(ValueSource::CommandLine) {
                    typed.insert(key, value);
                }
            }
        }
        CommandLine {
            check,
            file: config.config,
            typed,
        }
    }

    /// The config file to read: `--config`, else `./doh-proxy.toml` if present.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| {
            let p = PathBuf::from(DEFAULT_CONFIG_FILE);
            p.exists().then_some(p)
        })
    }

    /// Reads the file (if any) and lays the typed flags over it.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let path = self.config_file();
        let mut table = match &path {
            Some(p) => read_table(p)?,
            None => toml::Table::new(),
        };
        table.extend(self.typed.clone());
        let origin = path.unwrap_or_else(|| PathBuf::from("<command line>"));
        let mut cfg: Config =
            table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: origin,
                    message: e.message().to_string(),
                })?;
        cfg.config = self.file.clone();
        Ok(cfg)
    }
}

impl Config {
    /// Parses a configuration from TOML text alone (used by tests and fuzzing).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.message().to_string(),
        })
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

    fn cmdline(args: &[&str]) -> CommandLine {
        let mut v = vec!["doh-proxy"];
        v.extend_from_slice(args);
        CommandLine::try_parse_from(v).unwrap()
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("doh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        file
    }

    #[test]
    fn defaults_match_spec() {
        let c = Config::default();
        assert_eq!(c.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(c.path, "/dns-query");
        assert_eq!((c.min_ttl, c.max_ttl, c.cache_size), (0, 86400, 100_000));
        assert_eq!(c.cache_memory, ByteSize(256 << 20));
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
        assert_eq!((c.per_ip_conn_rate, c.per_prefix_conn_rate), (10, 100));
        assert_eq!(c.forwarded_header, ForwardedHeader::Xff);
        assert_eq!((c.ban_after, c.ban_secs), (20, 600));
        assert_eq!(c.metrics_listen, "127.0.0.1:9153".parse().unwrap());
        assert_eq!(c.upstream_timeout, 2500);
        assert!(!c.dry_run && c.tls_cert.is_none() && c.upstream.is_empty());
        assert_eq!(c.upstream_strategy, Strategy::Fastest);
        // An empty file means the same defaults.
        let empty = Config::from_toml("").unwrap();
        assert_eq!(format!("{empty:?}"), format!("{c:?}"));
    }

    #[test]
    fn command_line_wins_over_file() {
        let file = temp_file(
            "c.toml",
            "min_ttl = 60\nmax_ttl = 600\nupstream = [\"127.0.0.1:5300\"]\nallow = [\"10.0.0.0/8\"]\ndry_run = true\n",
        );
        let f = file.to_str().unwrap();
        let c = cmdline(&["-c", f, "--min-ttl", "1800", "--max-ttl", "86400"])
            .load()
            .unwrap();
        assert_eq!(c.min_ttl, 1800);
        assert_eq!(c.max_ttl, 86400);
        assert_eq!(c.upstream[0].label(), "127.0.0.1:5300");
        assert_eq!(c.allow[0].to_string(), "10.0.0.0/8");
        assert!(c.dry_run, "a key the command line did not give stays");
        let c = cmdline(&["-c", f, "-u", "127.0.0.2:53"]).load().unwrap();
        assert_eq!(c.upstream[0].label(), "127.0.0.2:53");
        // Flags after the subcommand count too.
        let cl = cmdline(&["check", "-c", f, "--cache-memory", "1GiB"]);
        assert!(cl.check);
        assert_eq!(cl.load().unwrap().cache_memory, ByteSize(1 << 30));
    }

    #[test]
    fn unknown_key_and_bad_values_are_refused() {
        assert!(Config::from_toml("min_tll = 5").is_err());
        assert!(Config::from_toml("upstream = [\"not-an-address\"]").is_err());
        assert!(Config::from_toml("min_ttl = -1").is_err());
        assert!(Config::from_toml("cache_memory = \"12 parsecs\"").is_err());
        assert!(Config::from_toml("forwarded_header = \"via\"").is_err());
        let e = Config::from_toml("upstream = [\"quic://1.1.1.1\"]").unwrap_err();
        assert!(e.to_string().contains("unknown scheme"), "{e}");
        assert_eq!(
            Config::from_toml("cache_memory = 1048576")
                .unwrap()
                .cache_memory,
            ByteSize(1 << 20)
        );
    }

    #[test]
    fn the_example_file_is_exactly_the_defaults() {
        // doh-proxy.toml says it changes nothing until edited: hold it to it.
        let example = include_str!("../../doh-proxy.toml");
        let parsed = Config::from_toml(example).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
        // And it names every key (commented out or not).
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for key in defaults.as_table().unwrap().keys() {
            assert!(
                example.contains(&format!("\n{key} =")) || example.contains(&format!("# {key} =")),
                "doh-proxy.toml does not mention `{key}`"
            );
        }
        for key in ["upstream", "tls_cert", "tls_key", "ban_file", "admin_token"] {
            assert!(example.contains(&format!("# {key} =")), "{key}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize(256 << 20));
        assert_eq!("1GiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 30));
        assert_eq!("100MB".parse::<ByteSize>().unwrap(), ByteSize(100_000_000));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
    }

    #[test]
    fn resolv_conf_nameservers() {
        let p = temp_file(
            "resolv.conf",
            "# c\nnameserver 192.0.2.53\nsearch x\nnameserver fe80::1%eth0\n",
        );
        let v = system_nameservers(&p).unwrap();
        assert_eq!(v[0], "192.0.2.53:53".parse().unwrap());
        assert_eq!(v.len(), 2);
    }
}
