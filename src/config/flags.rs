//! Every flag and config key, one field each: its doc comment is its
//! `--help`, its `default_value` its default (and nowhere else).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{ByteSize, Cidr, ForwardedHeader, LogFormat, Padding, Strategy, UpstreamSpec};

// The headings of `--help`.
const LISTENERS: &str = "Listeners";
const CERTIFICATES: &str = "Certificates";
const UPSTREAM: &str = "Upstream";
const CLIENTS: &str = "Clients";
const CACHE: &str = "Cache";
const PENALTY_BOX: &str = "Penalty box";
const PRIVACY: &str = "Privacy";
const OPERATIONS: &str = "Operations";

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
    #[arg(short = 'l', long, global = true, value_name = "ADDR", default_value = "127.0.0.1:8443", help_heading = LISTENERS)]
    pub listen: Vec<SocketAddr>,

    /// PEM certificate chain for the TLS listeners [default: a self-signed
    /// certificate for `localhost`, generated at start with a warning]
    #[arg(long, global = true, value_name = "PEM", help_heading = LISTENERS)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching --tls-cert
    #[arg(long, global = true, value_name = "PEM", help_heading = LISTENERS)]
    pub tls_key: Option<PathBuf>,

    /// Seconds a TLS session ticket lets a returning client resume without
    /// a full handshake (at most 604800); ticket keys change every period
    /// and are erased after two, and are shared with --redis. 0: no
    /// tickets, resumption from a 16,384-session memory cache only
    #[arg(long, global = true, value_name = "SECS", default_value_t = 21600, help_heading = LISTENERS)]
    pub tls_ticket_lifetime: u64,

    /// Plain-HTTP listener (HTTP/1.1 and h2c) for use behind a reverse
    /// proxy; repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = LISTENERS)]
    pub listen_http: Vec<SocketAddr>,

    /// DoH over HTTP/3 listener (UDP), same certificate, same answers and
    /// refusals as over HTTP/2; HTTPS answers then carry `Alt-Svc`;
    /// repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = LISTENERS)]
    pub listen_h3: Vec<SocketAddr>,

    /// DNS over QUIC listener (RFC 9250, UDP; usually port 853): ALPN
    /// `doq`, one query per stream, same certificate, guard and answers as
    /// HTTP/3; repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = LISTENERS)]
    pub listen_doq: Vec<SocketAddr>,

    /// Unvalidated QUIC handshakes per second beyond which a source must
    /// prove its address with a Retry first (0: always)
    #[arg(long, global = true, value_name = "N", default_value_t = 100, help_heading = LISTENERS)]
    pub h3_retry_threshold: u32,

    /// DNS over TLS listener (RFC 7858), same certificate; pipelined
    /// queries answered out of order; repeatable [default: off]
    #[arg(long, global = true, value_name = "ADDR", help_heading = LISTENERS)]
    pub listen_dot: Vec<SocketAddr>,

    /// DoH path
    #[arg(long, global = true, value_name = "PATH", default_value = "/dns-query", help_heading = LISTENERS)]
    pub path: String,

    /// Longest request target accepted, in bytes; longer gets 414
    #[arg(long, global = true, value_name = "BYTES", default_value_t = 4096, help_heading = LISTENERS)]
    pub max_uri: usize,

    /// Largest POST body accepted, in bytes (at most 65535); larger gets 413
    #[arg(long, global = true, value_name = "BYTES", default_value_t = 65535, help_heading = LISTENERS)]
    pub max_body: usize,

    /// Seconds from accept to a connection's first complete request: TLS
    /// handshake, PROXY header, protocol detection and request headers
    #[arg(long, global = true, value_name = "SECS", default_value_t = 5, help_heading = LISTENERS)]
    pub handshake_timeout: u64,

    /// Seconds a connection may stay open with no request in flight and none
    /// started; control frames and stray bytes do not count as activity
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30, help_heading = LISTENERS)]
    pub idle_timeout: u64,

    /// Seconds a client may leave its answers unread (DNS over TLS and
    /// QUIC, HTTP/2 and HTTP/3 streams whose window stays shut); then the
    /// connection is closed and the client scored
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10, help_heading = LISTENERS)]
    pub write_timeout: u64,

    /// Requests served on one connection before it is closed (HTTP/1.1:
    /// `Connection: close`; HTTP/2: GOAWAY)
    #[arg(long, global = true, value_name = "N", default_value_t = 10_000, help_heading = LISTENERS)]
    pub max_requests_per_conn: u64,

    /// Obtain and renew the certificate from an ACME CA for this name
    /// (TLS-ALPN-01 on the TLS listener); repeatable; replaces
    /// --tls-cert/--tls-key [default: off]
    #[arg(long, global = true, value_name = "NAME", help_heading = CERTIFICATES)]
    pub acme_domain: Vec<String>,

    /// Contact for the ACME account (`mailto:admin@example.org`) [default: none]
    #[arg(long, global = true, value_name = "URI", help_heading = CERTIFICATES)]
    pub acme_contact: Option<String>,

    /// ACME directory URL
    #[arg(long, global = true, value_name = "URL", default_value = crate::acme::LETS_ENCRYPT, help_heading = CERTIFICATES)]
    pub acme_directory: String,

    /// Trust anchors (PEM) for the ACME directory, for a test CA such as
    /// pebble [default: the system's roots]
    #[arg(long, global = true, value_name = "PEM", help_heading = CERTIFICATES)]
    pub acme_ca: Option<PathBuf>,

    /// Where the ACME account, certificate and key are kept
    #[arg(long, global = true, value_name = "DIR", default_value = "acme-cache", help_heading = CERTIFICATES)]
    pub acme_cache: PathBuf,

    /// Renew the ACME certificate when fewer days than this remain
    #[arg(long, global = true, value_name = "DAYS", default_value_t = 30, help_heading = CERTIFICATES)]
    pub acme_renew_days: u32,

    // --- Upstream
    /// Upstream resolver; repeatable: `IP:PORT` (UDP, TCP when the answer is
    /// truncated), `tcp://IP:PORT`, `tls://IP:PORT#NAME` (DNS over TLS; NAME
    /// is checked against the certificate and sent as SNI, default the IP),
    /// `https://IP:PORT/PATH#NAME` (DNS over HTTPS, HTTP/2) [default:
    /// nameservers of /etc/resolv.conf]
    #[arg(short = 'u', long, global = true, value_name = "SPEC", help_heading = UPSTREAM)]
    pub upstream: Vec<UpstreamSpec>,

    /// Extra trust anchors (PEM) for tls:// and https:// upstreams;
    /// repeatable [default: the system's roots only]
    #[arg(long, global = true, value_name = "PEM", help_heading = UPSTREAM)]
    pub upstream_ca: Vec<PathBuf>,

    /// How upstreams are ordered: `fastest` (those up, by measured latency;
    /// the others keep being probed) or `ordered` (those up, as listed)
    #[arg(long, global = true, value_enum, value_name = "STRATEGY", default_value = "fastest", help_heading = UPSTREAM)]
    pub upstream_strategy: Strategy,

    /// One deadline for the whole resolution of a query, in ms: hedged
    /// attempts and failover included; then SERVFAIL (or a stale answer).
    /// An upstream that answers within it is never turned into SERVFAIL
    #[arg(long, global = true, value_name = "MS", default_value_t = 2500, help_heading = UPSTREAM)]
    pub upstream_timeout: u64,

    /// Global budget of queries sent upstream per second, whatever the number
    /// of clients; beyond it misses are answered stale or get 503
    #[arg(long, global = true, value_name = "N", default_value_t = 1000, help_heading = UPSTREAM)]
    pub upstream_qps: u32,

    /// Share of --upstream-qps (percent) that only known clients may spend
    /// once new clients have spent the rest; 0 turns the priority off
    #[arg(long, global = true, value_name = "PERCENT", default_value_t = 50, help_heading = UPSTREAM)]
    pub known_share: u8,

    /// A client answered once, and answered again at least this long after
    /// without being banned in between, is known (it keeps --known-share of
    /// the upstream budget, and its connections at --max-conns)
    #[arg(long, global = true, value_name = "SECS", default_value_t = 86400, help_heading = CLIENTS)]
    pub known_after_secs: u64,

    /// Clients remembered at most (first-seen times and known ones, at most
    /// 60 bytes each); when full, a client not yet known is forgotten before
    /// a known one, the least recently seen first
    #[arg(long, global = true, value_name = "N", default_value_t = 1_000_000, help_heading = CLIENTS)]
    pub known_max: u64,

    /// A known client not seen for this long is forgotten
    #[arg(long, global = true, value_name = "SECS", default_value_t = 2_592_000, help_heading = CLIENTS)]
    pub known_forget_secs: u64,

    // --- Cache
    /// TTL floor: cached answers live at least this long and are served with
    /// TTLs of at least this value
    #[arg(long, global = true, value_name = "SECS", default_value_t = 0, help_heading = CACHE)]
    pub min_ttl: u32,

    /// TTL ceiling
    #[arg(long, global = true, value_name = "SECS", default_value_t = 86400, help_heading = CACHE)]
    pub max_ttl: u32,

    /// Maximum number of cached answers
    #[arg(long, global = true, value_name = "N", default_value_t = 100_000, help_heading = CACHE)]
    pub cache_size: u64,

    /// Memory the cache may hold, each entry weighed by its real size
    /// (`256MiB`, `1GiB` or bytes); answers over 16 KiB are served but not
    /// cached
    #[arg(long, global = true, value_name = "SIZE", default_value = "256MiB", help_heading = CACHE)]
    pub cache_memory: ByteSize,

    /// How long SERVFAIL answers and upstream failures are cached
    #[arg(long, global = true, value_name = "SECS", default_value_t = 2, help_heading = CACHE)]
    pub err_ttl: u32,

    /// How long past expiry an entry may still be served stale (RFC 8767)
    /// when the upstream fails or its budget is spent; 0 disables
    #[arg(long, global = true, value_name = "SECS", default_value_t = 86400, help_heading = CACHE)]
    pub stale_secs: u32,

    // --- Clients
    /// Sustained requests per second allowed per client address (every
    /// request counts, whatever its path or method)
    #[arg(long, global = true, value_name = "N", default_value_t = 20, help_heading = CLIENTS)]
    pub per_ip_qps: u32,

    /// Burst allowed per client address
    #[arg(long, global = true, value_name = "N", default_value_t = 100, help_heading = CLIENTS)]
    pub per_ip_burst: u32,

    /// Sustained requests per second allowed per client prefix (burst: 5 s
    /// worth)
    #[arg(long, global = true, value_name = "N", default_value_t = 200, help_heading = CLIENTS)]
    pub per_prefix_qps: u32,

    /// IPv4 prefix length grouping clients for budgets, caps and prefix bans
    #[arg(long, global = true, value_name = "BITS", default_value_t = 24, help_heading = CLIENTS)]
    pub prefix_v4: u8,

    /// IPv6 prefix length grouping clients for budgets, caps and prefix bans
    #[arg(long, global = true, value_name = "BITS", default_value_t = 56, help_heading = CLIENTS)]
    pub prefix_v6: u8,

    /// Open connections allowed per client address; per prefix, 8 times
    /// this; per IPv4 /16 or IPv6 /48, a quarter of --max-conns
    #[arg(long, global = true, value_name = "N", default_value_t = 32, help_heading = CLIENTS)]
    pub max_conns_per_ip: u32,

    /// Open connections allowed in all; when reached, the connection idle
    /// the longest is closed to make room
    #[arg(long, global = true, value_name = "N", default_value_t = 10_000, help_heading = CLIENTS)]
    pub max_conns: u32,

    /// New connections per second per client address (burst: 5 s worth);
    /// over it a connection is closed at accept and scored
    #[arg(long, global = true, value_name = "N", default_value_t = 10, help_heading = CLIENTS)]
    pub per_ip_conn_rate: u32,

    /// New connections per second per client prefix (burst: 5 s worth)
    #[arg(long, global = true, value_name = "N", default_value_t = 100, help_heading = CLIENTS)]
    pub per_prefix_conn_rate: u32,

    /// Peers (CIDR) whose forwarding header (and PROXY protocol with
    /// --proxy-protocol) names the real client; repeatable. Headers from
    /// anyone else are ignored [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = CLIENTS)]
    pub trusted_proxy: Vec<Cidr>,

    /// Which header names the client behind a trusted proxy; the other is
    /// ignored. An unparseable hop names no client: such requests share one
    /// budget, `unknown`
    #[arg(long, global = true, value_enum, value_name = "HEADER", default_value = "xff", help_heading = CLIENTS)]
    pub forwarded_header: ForwardedHeader,

    /// Expect a PROXY protocol v1/v2 header from --trusted-proxy peers on
    /// every listener; it alone then names the client
    #[arg(long, global = true, help_heading = CLIENTS)]
    pub proxy_protocol: bool,

    /// Clients (CIDR) never rate-limited, banned or capped; no automatic rule
    /// overrides it; repeatable [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = CLIENTS)]
    pub allow: Vec<Cidr>,

    /// Clients (CIDR) always refused at accept (a static block); repeatable
    /// [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = CLIENTS)]
    pub deny: Vec<Cidr>,

    // --- Penalty box
    /// Ban a client after this many refused requests, refused connections
    /// or protocol errors within a minute
    #[arg(long, global = true, value_name = "N", default_value_t = 20, help_heading = PENALTY_BOX)]
    pub ban_after: u32,

    /// Length of a first ban; each repeat within a day doubles it, up to 16
    /// times. Bans expire by themselves
    #[arg(long, global = true, value_name = "SECS", default_value_t = 600, help_heading = PENALTY_BOX)]
    pub ban_secs: u64,

    /// Keep an nftables script of the active bans here (rewritten atomically
    /// on change), for `nft -f` [default: off]
    #[arg(long, global = true, value_name = "PATH", help_heading = PENALTY_BOX)]
    pub ban_file: Option<PathBuf>,

    /// Keep the bans in force and the repeat counts here (JSON, written
    /// atomically on change and at shutdown), and restore them at start
    /// [default: off]
    #[arg(long, global = true, value_name = "PATH", help_heading = PENALTY_BOX)]
    pub state_file: Option<PathBuf>,

    /// Count and log every mitigation (rate limit, ban, connection cap) but
    /// enforce none; static --deny ranges and the upstream budget stay
    /// enforced
    #[arg(long, global = true, help_heading = PENALTY_BOX)]
    pub dry_run: bool,

    // --- Privacy
    /// EDNS(0) padding of answers to a multiple of 468 bytes (RFC 8467),
    /// never beyond the client's payload size: `padded-queries` (answers to
    /// queries that carried a Padding option), `always`, `never`
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value = "padded-queries", help_heading = PRIVACY)]
    pub padding: Padding,

    /// Oblivious DoH target (RFC 9230): `GET /.well-known/odohconfigs`, and
    /// `POST PATH` with `Content-Type: application/oblivious-dns-message`
    #[arg(long, global = true, help_heading = PRIVACY)]
    pub odoh: bool,

    /// Lifetime of an Oblivious DoH key; the previous key is still
    /// accepted for one more lifetime
    #[arg(long, global = true, value_name = "SECS", default_value_t = 86400, help_heading = PRIVACY)]
    pub odoh_rotate_secs: u64,

    /// Oblivious DoH requests per second per relay address (burst 5 s'
    /// worth), in place of --per-ip-qps
    #[arg(long, global = true, value_name = "N", default_value_t = 2000, help_heading = PRIVACY)]
    pub odoh_relay_qps: u32,

    /// Addresses (CIDR) of the Oblivious DoH relays this target serves;
    /// only their sealed queries get --odoh-relay-qps, anybody else's meet
    /// the ordinary per-client budget; repeatable [default: none]
    #[arg(long, global = true, value_name = "CIDR", help_heading = PRIVACY)]
    pub odoh_relay: Vec<Cidr>,

    /// Share bans, the upstream budget, unique-client counts and ODoH keys
    /// with every instance naming the same Redis: `redis://HOST:PORT/DB` or
    /// `rediss://…` [default: off]
    #[arg(long, global = true, value_name = "URL", help_heading = OPERATIONS)]
    pub redis: Option<String>,

    // --- Operations
    /// Admin listener: /metrics, /healthz, /bans
    #[arg(long, global = true, value_name = "ADDR", default_value = "127.0.0.1:9153", help_heading = OPERATIONS)]
    pub metrics_listen: SocketAddr,

    /// Bearer token required on the admin listener; without it the admin
    /// listener may only bind a loopback address [default: none]
    #[arg(long, global = true, value_name = "TOKEN", help_heading = OPERATIONS)]
    pub admin_token: Option<String>,

    /// More logging: -v logs one line per request
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count, help_heading = OPERATIONS)]
    pub verbose: u8,

    /// Log format
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value = "text", help_heading = OPERATIONS)]
    pub log_format: LogFormat,
}
