//! Abuse protection: who may connect, how much each client may ask, and
//! the penalty box. One file per concern, each owning its state and its
//! lock; [`Guard`] is the facade the listeners and the pipeline call.
//!
//! - [`admission`]: at accept, before any TLS work: connection rates, caps
//!   per address, prefix and network, the global cap with eviction of the
//!   idlest connection, and the table of open connections.
//! - [`budget`]: token buckets per client address and prefix.
//! - [`penalty`]: refusals per client per minute; `--ban-after` bans.
//! - [`bans`]: bans in force, indexed by expiry; escalation to a prefix
//!   when 8 hosts of it are banned; repeat offenders get doubled bans.
//! - [`forwarded`]: the client behind a trusted proxy.
//! - [`known`]: the clients answered before, who keep a share of the
//!   upstream budget and their connections at `--max-conns`.
//! - [`nft`]: the ban list as an nftables script.
//!
//! `--allow` ranges are exempt from all of the above; trusted proxies are
//! never limited as clients. In `--dry-run`, every mitigation is counted
//! and logged, none enforced (static `--deny` ranges excepted).

pub(crate) mod admission;
mod banning;
pub mod bans;
pub(crate) mod budget;
pub(crate) mod forwarded;
pub mod known;
pub(crate) mod nft;
pub(crate) mod penalty;
mod persist;
mod screen;
pub mod state;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;
use ipnet::IpNet;
use tokio::time::Instant;

pub use admission::{Conn, ConnTicket, Expiry, InFlight, Unread};
pub use bans::BanView;

use crate::clock::unix_now;
use crate::metrics::Metrics;
use crate::net::{any_contains, canonical, is_host, overlaps, prefix_of, Cidr};
#[cfg(test)]
use crate::reject::Reject;
use crate::reject::{ConnReject, Refusal};
use admission::{Admission, Candidate};
use bans::{Bans, MAX_BANS};
use budget::{quota, KeyedRate};
pub use forwarded::ForwardedHeader;
use penalty::Penalty;
pub use screen::Screen;

/// Runs `job` on tokio's blocking threads when there is a runtime (file
/// writes stay off the threads that serve clients), else here.
fn in_background(job: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(job);
        }
        Err(_) => job(),
    }
}

/// Longest ban, as a multiple of `--ban-secs`.
const MAX_BAN_FACTOR: u64 = 16;

/// What the guard runs with.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub trusted: Vec<Cidr>,
    pub forwarded_header: ForwardedHeader,
    pub proxy_protocol: bool,
    pub dry_run: bool,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub per_ip_qps: u32,
    pub per_ip_burst: u32,
    pub per_prefix_qps: u32,
    /// `--odoh-relay-qps`: an Oblivious DoH relay's budget.
    pub odoh_relay_qps: u32,
    /// `--odoh-relay`: who gets it.
    pub odoh_relays: Vec<Cidr>,
    pub max_conns: u32,
    pub max_conns_per_ip: u32,
    pub per_ip_conn_rate: u32,
    pub per_prefix_conn_rate: u32,
    pub ban_after: u32,
    pub ban_secs: u64,
    pub ban_file: Option<PathBuf>,
    /// `--state-file`: bans and repeat counts kept across restarts.
    pub state_file: Option<PathBuf>,
    /// TCP ports the ban file's rule drops for banned sources (the bound
    /// listeners; set at start).
    pub ports: Vec<u16>,
    /// UDP ports likewise (HTTP/3).
    pub udp_ports: Vec<u16>,
    /// `--known-after-secs`.
    pub known_after_secs: u64,
    /// `--known-max`.
    pub known_max: u64,
    /// `--known-forget-secs`.
    pub known_forget_secs: u64,
}

#[cfg(test)]
impl GuardSettings {
    /// The guard's unit tests start from these values (those of an empty
    /// configuration, written out: the guard's tests do not go through
    /// the configuration layer) and change what they test.
    pub(crate) fn for_tests(change: impl FnOnce(&mut GuardSettings)) -> GuardSettings {
        let mut s = GuardSettings {
            allow: Vec::new(),
            deny: Vec::new(),
            trusted: Vec::new(),
            forwarded_header: ForwardedHeader::Xff,
            proxy_protocol: false,
            dry_run: false,
            prefix_v4: 24,
            prefix_v6: 56,
            per_ip_qps: 20,
            per_ip_burst: 100,
            per_prefix_qps: 200,
            odoh_relay_qps: 2000,
            odoh_relays: Vec::new(),
            max_conns: 10_000,
            max_conns_per_ip: 32,
            per_ip_conn_rate: 10,
            per_prefix_conn_rate: 100,
            ban_after: 20,
            ban_secs: 600,
            ban_file: None,
            state_file: None,
            ports: Vec::new(),
            udp_ports: Vec::new(),
            known_after_secs: 86_400,
            known_max: 1_000_000,
            known_forget_secs: 2_592_000,
        };
        change(&mut s);
        s
    }
}

impl GuardSettings {
    pub fn max_conns_per_prefix(&self) -> u32 {
        self.max_conns_per_ip.saturating_mul(8)
    }

    /// The cap of a wider network (IPv4 /16, IPv6 /48): a quarter of the
    /// table, and never below the prefix cap.
    pub fn max_conns_per_net(&self) -> u32 {
        (self.max_conns / 4).max(self.max_conns_per_prefix())
    }

    fn ip_quota(&self) -> governor::Quota {
        quota(self.per_ip_qps, self.per_ip_burst)
    }

    fn prefix_quota(&self) -> governor::Quota {
        quota(self.per_prefix_qps, self.per_prefix_qps.saturating_mul(5))
    }

    fn relay_quota(&self) -> governor::Quota {
        quota(self.odoh_relay_qps, self.odoh_relay_qps.saturating_mul(5))
    }
}

/// A ban made or lifted here, for other instances (`--redis`).
#[derive(Debug, Clone)]
pub enum BanEvent {
    Ban {
        target: IpNet,
        reason: &'static str,
        /// Unix seconds.
        expires: u64,
        offences: u32,
    },
    Unban {
        target: IpNet,
    },
}

/// What a connection is admitted for (see the `admit_*` methods).
#[derive(Debug, Clone, Copy)]
enum Place {
    /// A TCP connection: everything.
    Socket,
    /// The client a PROXY header names on a counted connection.
    Proxied,
    /// A QUIC connection's first packet.
    QuicInitial { validated: bool },
    /// A QUIC connection whose handshake completed.
    QuicHandshaken { rate_spent: bool },
}

/// The verdict on a client's request budget.
#[derive(Debug, PartialEq, Eq)]
pub enum Budget {
    Ok,
    /// Over budget: retry after this many seconds.
    Over(u64),
    /// Over budget, but `--dry-run` only counts it.
    DryRun,
}

/// The verdict on a mitigation that `--dry-run` only counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Refuse,
    /// Would be refused, but `--dry-run` only counts it.
    DryRun,
}

pub struct Guard {
    settings: ArcSwap<GuardSettings>,
    admission: Arc<Admission>,
    ip_budget: KeyedRate<IpAddr>,
    prefix_budget: KeyedRate<IpNet>,
    relay_budget: KeyedRate<IpAddr>,
    penalty: Penalty,
    bans: Bans,
    known: known::Known,
    metrics: Arc<Metrics>,
    epoch: Instant,
    last_forwarding_warning: AtomicU64,
    last_missing_warning: AtomicU64,
    /// Lines appended to the state file's journal since its last merge.
    journal_lines: std::sync::atomic::AtomicUsize,
    /// A whole snapshot of the state file is to be written.
    snapshot_due: std::sync::atomic::AtomicBool,
    /// Seconds after `epoch` the ban file was last written.
    ban_file_written: AtomicU64,
    /// Where bans made and lifted here are told, when instances share them.
    events: std::sync::OnceLock<tokio::sync::mpsc::Sender<BanEvent>>,
}

impl Guard {
    pub fn new(s: GuardSettings, metrics: Arc<Metrics>) -> Guard {
        Self::with_ban_cap(s, metrics, MAX_BANS)
    }

    /// A guard holding at most `max_bans` bans (tests and benchmarks of
    /// the cap use a small one).
    pub fn with_ban_cap(s: GuardSettings, metrics: Arc<Metrics>, max_bans: usize) -> Guard {
        Guard {
            admission: Arc::new(Admission::new(&s, metrics.clone())),
            ip_budget: KeyedRate::new("per-address request", s.ip_quota()),
            prefix_budget: KeyedRate::new("per-prefix request", s.prefix_quota()),
            relay_budget: KeyedRate::new("per-relay request", s.relay_quota()),
            penalty: Penalty::new(),
            bans: Bans::new(max_bans),
            known: known::Known::new(s.known_max, s.known_after_secs, s.known_forget_secs),
            metrics,
            epoch: Instant::now(),
            last_forwarding_warning: AtomicU64::new(0),
            last_missing_warning: AtomicU64::new(0),
            journal_lines: Default::default(),
            snapshot_due: Default::default(),
            ban_file_written: AtomicU64::new(0),
            events: std::sync::OnceLock::new(),
            settings: ArcSwap::from_pointee(s),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<GuardSettings> {
        self.settings.load_full()
    }

    /// Swaps in reloaded settings; bans, scores and open connections stay.
    /// Budgets start afresh only if their rate changed.
    pub fn reconfigure(&self, mut s: GuardSettings) {
        s.ports = self.settings.load().ports.clone();
        s.udp_ports = self.settings.load().udp_ports.clone();
        self.ip_budget.set_quota(s.ip_quota());
        self.prefix_budget.set_quota(s.prefix_quota());
        self.relay_budget.set_quota(s.relay_quota());
        self.admission.reconfigure(&s);
        self.known
            .configure(s.known_max, s.known_after_secs, s.known_forget_secs);
        self.settings.store(Arc::new(s));
        self.bans.mark_dirty();
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        any_contains(&self.settings.load().trusted, ip)
    }

    /// Whether a request is a trusted proxy's own (its health check): it
    /// comes from a `--trusted-proxy` and names nobody else.
    pub fn is_own_probe(&self, peer: IpAddr, headers: &HeaderMap) -> bool {
        self.is_trusted_proxy(canonical(peer)) && !forwarded::has_forwarding(headers)
    }

    /// Whether requests from `client` are exempt from budgets and bans.
    pub(super) fn exempt(&self, s: &GuardSettings, client: IpAddr) -> bool {
        any_contains(&s.allow, client) || any_contains(&s.trusted, client)
    }

    /// Admission of a new connection from `peer`, before any TLS work.
    pub fn admit(&self, peer: IpAddr) -> Result<ConnTicket, ConnReject> {
        self.admit_as(canonical(peer), Place::Socket)
    }

    /// Admission of the client that a trusted proxy's PROXY header names:
    /// its bans, rates and caps. The connection itself already holds its
    /// place in the global count, as the proxy's.
    pub fn admit_proxied(&self, client: IpAddr) -> Result<ConnTicket, ConnReject> {
        self.admit_as(canonical(client), Place::Proxied)
    }

    /// Admission of a QUIC connection at its first packet: a place in the
    /// global count only. Its packets may be spoofed, so it takes none of
    /// the per-address, per-prefix and per-network places shared with TCP
    /// (a spoofer would lock the real owner out), and is never scored; a
    /// source that proved its address with a Retry token spends its
    /// connection rate here, as a TCP accept would.
    pub fn admit_quic(&self, peer: IpAddr, validated: bool) -> Result<ConnTicket, ConnReject> {
        self.admit_as(canonical(peer), Place::QuicInitial { validated })
    }

    /// Admission of a QUIC connection whose handshake completed (its
    /// address is proven): the per-address, per-prefix and per-network
    /// caps, and the connection rate unless its Retry token already spent
    /// it. Refusals score. The returned ticket holds those places; the
    /// first packet's ticket keeps the global one.
    pub fn admit_quic_handshaken(
        &self,
        peer: IpAddr,
        rate_spent: bool,
    ) -> Result<ConnTicket, ConnReject> {
        self.admit_as(canonical(peer), Place::QuicHandshaken { rate_spent })
    }

    /// The checks that need no state of the connection's own: static
    /// denials and bans. Counted and (outside dry-run) refused; never scored.
    pub fn precheck(&self, peer: IpAddr) -> Result<(), ConnReject> {
        let ip = canonical(peer);
        let s = self.settings.load();
        let allowed = any_contains(&s.allow, ip);
        if !allowed && any_contains(&s.deny, ip) {
            return Err(ConnReject::Denied);
        }
        let limited = !allowed && !any_contains(&s.trusted, ip);
        if limited && self.bans.covers(ip) {
            if s.dry_run {
                self.metrics.guard.conn_rejected(ConnReject::Banned, true);
            } else {
                return Err(ConnReject::Banned);
            }
        }
        Ok(())
    }

    fn admit_as(&self, ip: IpAddr, place: Place) -> Result<ConnTicket, ConnReject> {
        if let Err(reason) = self.precheck(ip) {
            self.metrics.guard.conn_rejected(reason, false);
            return Err(reason);
        }
        let s = self.settings.load();
        let allowed = any_contains(&s.allow, ip);
        let limited = !allowed && !any_contains(&s.trusted, ip);
        let (global, rated, capped, proven) = match place {
            Place::Socket => (true, true, true, true),
            Place::Proxied => (false, true, true, true),
            Place::QuicInitial { validated } => (true, validated, false, validated),
            Place::QuicHandshaken { rate_spent } => (false, !rate_spent, true, true),
        };
        let who = Candidate {
            ip,
            rated: limited && rated,
            capped: limited && capped,
            global,
            exempt: allowed,
            // A QUIC source that has not proved its address could borrow
            // a known client's.
            known: proven && self.known.is_known(ip, unix_now()),
        };
        let r = self.admission.admit(who, &s);
        if let Err(reason) = r {
            if proven {
                self.penalize(ip, reason);
            }
        }
        r
    }

    /// Open connections in all.
    pub fn open_connections(&self) -> usize {
        self.admission.open()
    }

    /// The real client of a request on a connection from `peer`: the
    /// client a PROXY header named (`proxied`, where `Some(None)` is an
    /// `UNKNOWN`/`LOCAL` header), or, for a trusted proxy, the client its
    /// forwarding header names — the shared `unknown` key when the header
    /// is missing —, or the peer itself.
    pub fn client_of(
        &self,
        peer: IpAddr,
        proxied: Option<Option<IpAddr>>,
        headers: &HeaderMap,
    ) -> IpAddr {
        if let Some(named) = proxied {
            return named.map(canonical).unwrap_or(crate::net::UNKNOWN_CLIENT);
        }
        let peer = canonical(peer);
        let s = self.settings.load();
        if !any_contains(&s.trusted, peer) {
            if forwarded::has_forwarding(headers) {
                self.warn_untrusted_forwarding(peer);
            }
            return peer;
        }
        match forwarded::client(peer, headers, s.forwarded_header, |ip| {
            any_contains(&s.trusted, ip)
        }) {
            Some(client) => client,
            None => {
                // Never the proxy itself, which is never limited: the
                // shared key, limited like any client.
                self.metrics.requests.forwarded_missing.inc();
                self.warn_missing_header(peer, s.forwarded_header);
                crate::net::UNKNOWN_CLIENT
            }
        }
    }

    fn warn_missing_header(&self, peer: IpAddr, which: ForwardedHeader) {
        if self.once_a_minute(&self.last_missing_warning) {
            let (name, other) = match which {
                ForwardedHeader::Xff => ("X-Forwarded-For", "forwarded"),
                ForwardedHeader::Forwarded => ("Forwarded", "xff"),
            };
            tracing::warn!(
                peer = %peer,
                "a request from a --trusted-proxy without {name}: counted as the unknown client \
                 (does the proxy send the other header? then --forwarded-header {other}; \
                 this warning repeats at most once a minute)"
            );
        }
    }

    /// True at most once a minute per `last`.
    fn once_a_minute(&self, last: &AtomicU64) -> bool {
        let now = self.epoch.elapsed().as_secs() + 60;
        let before = last.load(Ordering::Relaxed);
        now >= before + 60
            && last
                .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn warn_untrusted_forwarding(&self, peer: IpAddr) {
        if self.once_a_minute(&self.last_forwarding_warning) {
            tracing::warn!(
                peer = %peer,
                "forwarding headers from a peer that is not a --trusted-proxy: ignored \
                 (this warning repeats at most once a minute)"
            );
        }
    }

    /// Whether `client` is a named Oblivious DoH relay (`--odoh-relay`).
    pub fn is_odoh_relay(&self, client: IpAddr) -> bool {
        any_contains(&self.settings.load().odoh_relays, canonical(client))
    }

    /// A request from `client` was answered (on `conn`, when the
    /// transport has one): the memory of known clients learns it (the
    /// shared `unknown` key behind a proxy never becomes known: it is a
    /// crowd, not a client). It counts in seconds, so a connection tells
    /// it its peer once a second, not at every answer.
    pub fn answered(&self, client: IpAddr, conn: Option<&Conn>) {
        if client == crate::net::UNKNOWN_CLIENT {
            return;
        }
        let now = unix_now();
        if conn.is_none_or(|c| c.first_answer_in(client, now)) {
            self.known.answered(client, now);
        }
    }

    /// Whether `client` is a known client now.
    pub fn is_known(&self, client: IpAddr) -> bool {
        self.known.is_known(client, unix_now())
    }

    /// The memory of known clients.
    pub fn known(&self) -> &known::Known {
        &self.known
    }

    /// Housekeeping, run every second: expire bans, prune limiter state,
    /// rewrite the ban file when bans changed.
    pub fn tick(&self) {
        for net in self.bans.expire() {
            tracing::info!(target = %net, "ban expired");
        }
        self.metrics.guard.bans_active.set(self.bans.len() as i64);
        self.penalty.prune();
        self.ip_budget.prune();
        self.prefix_budget.prune();
        self.relay_budget.prune();
        self.admission.prune();
        let now = unix_now();
        if now % 10 == 0 {
            let n = self.known.sweep(now);
            self.metrics.guard.known_clients.set(n as i64);
        } else {
            self.metrics
                .guard
                .known_clients
                .set(self.known.known_count() as i64);
        }
        self.persist();
    }

    /// Number of client keys the request limiters hold.
    pub fn tracked_clients(&self) -> usize {
        self.ip_budget.len() + self.prefix_budget.len()
    }

    /// Sets the TCP and UDP ports the ban file's rule covers (the bound
    /// listeners).
    pub fn set_ports(&self, mut ports: Vec<u16>, mut udp_ports: Vec<u16>) {
        ports.sort_unstable();
        ports.dedup();
        udp_ports.sort_unstable();
        udp_ports.dedup();
        let mut s = (**self.settings.load()).clone();
        s.ports = ports;
        s.udp_ports = udp_ports;
        self.settings.store(Arc::new(s));
        self.bans.mark_dirty();
    }
}

#[cfg(test)]
mod tests;
