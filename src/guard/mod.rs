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

pub mod admission;
pub mod bans;
pub mod budget;
pub mod forwarded;
pub mod known;
pub mod nft;
pub mod penalty;
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
    fn exempt(&self, s: &GuardSettings, client: IpAddr) -> bool {
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
                self.metrics.conn_rejected(ConnReject::Banned, true);
            } else {
                return Err(ConnReject::Banned);
            }
        }
        Ok(())
    }

    fn admit_as(&self, ip: IpAddr, place: Place) -> Result<ConnTicket, ConnReject> {
        if let Err(reason) = self.precheck(ip) {
            self.metrics.conn_rejected(reason, false);
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
                self.metrics.forwarded_missing.inc();
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

    /// Whether a request from `client` is refused as banned. In dry-run a
    /// ban only counts: the verdict is [`Verdict::DryRun`].
    pub fn banned(&self, client: IpAddr) -> Verdict {
        let client = canonical(client);
        let s = self.settings.load();
        if self.exempt(&s, client) || !self.bans.covers(client) {
            Verdict::Pass
        } else if s.dry_run {
            Verdict::DryRun
        } else {
            Verdict::Refuse
        }
    }

    /// Spends one request of the client's budgets (address, then prefix).
    pub fn check_budget(&self, client: IpAddr) -> Budget {
        let client = canonical(client);
        let s = self.settings.load();
        if self.exempt(&s, client) {
            return Budget::Ok;
        }
        let over = self.ip_budget.check(&client).err().or_else(|| {
            self.prefix_budget
                .check(&prefix_of(client, s.prefix_v4, s.prefix_v6))
                .err()
        });
        match over {
            None => Budget::Ok,
            Some(_) if s.dry_run => Budget::DryRun,
            Some(wait) => Budget::Over(wait.as_secs() + 1),
        }
    }

    /// Whether `client` is a named Oblivious DoH relay (`--odoh-relay`).
    pub fn is_odoh_relay(&self, client: IpAddr) -> bool {
        any_contains(&self.settings.load().odoh_relays, canonical(client))
    }

    /// Spends one request of an Oblivious DoH relay's budget: a relay
    /// carries many clients, so it has its own, larger one. Only for
    /// addresses [`Guard::is_odoh_relay`] names.
    pub fn check_relay_budget(&self, relay: IpAddr) -> Budget {
        let relay = canonical(relay);
        let s = self.settings.load();
        if self.exempt(&s, relay) {
            return Budget::Ok;
        }
        match self.relay_budget.check(&relay) {
            Ok(()) => Budget::Ok,
            Err(_) if s.dry_run => Budget::DryRun,
            Err(wait) => Budget::Over(wait.as_secs() + 1),
        }
    }

    /// Adds a refusal to the client's score if its reason scores; bans the
    /// client when the score reaches `--ban-after` within a minute.
    pub fn penalize(&self, client: IpAddr, reason: impl Refusal) {
        if !reason.scored() {
            return;
        }
        let client = canonical(client);
        let s = self.settings.load();
        if self.exempt(&s, client) {
            return;
        }
        if self.penalty.score(client, s.ban_after) {
            self.ban(IpNet::from(client), reason.label());
        }
    }

    /// Bans `target` (an address or a prefix) for `--ban-secs`, longer for
    /// repeat offenders. Allowlisted and trusted ranges are never banned.
    pub fn ban(&self, target: IpNet, reason: &'static str) {
        let target = target.trunc();
        let s = self.settings.load();
        let protected = |list: &[Cidr]| list.iter().any(|a| overlaps(&a.0, &target));
        if protected(&s.allow) || protected(&s.trusted) {
            return;
        }
        let host = is_host(&target);
        if s.dry_run {
            self.metrics.ban(!host, true);
            tracing::warn!(target = %target, reason, "dry run: would ban");
            return;
        }
        // A ban makes the client (or the prefix's clients) unknown again.
        self.known.forget(&target);
        let offences = self.bans.count_offence(target);
        let factor = (1u64 << offences.min(4)).min(MAX_BAN_FACTOR);
        let secs = s.ban_secs.saturating_mul(factor);
        let prefix = host.then(|| prefix_of(target.addr(), s.prefix_v4, s.prefix_v6));
        let added = self.bans.add(target, reason, secs, prefix);
        self.metrics.bans_active.set(self.bans.len() as i64);
        self.metrics.ban(!host, false);
        self.emit(BanEvent::Ban {
            target,
            reason,
            expires: unix_now() + secs,
            offences: offences + 1,
        });
        tracing::warn!(
            target = %crate::net::client_label(target.addr()),
            reason, secs, offences = offences + 1, "banned"
        );
        if let Some(evicted) = added.evicted {
            tracing::warn!(target = %evicted, "ban table full: the ban closest to expiry gave way");
        }
        if let Some(prefix) = added.escalate {
            self.ban(prefix, "prefix");
        }
    }

    /// Lifts the ban on exactly `target`; returns whether there was one.
    pub fn unban(&self, target: IpNet) -> bool {
        let target = target.trunc();
        let removed = self.bans.remove(&target);
        self.metrics.bans_active.set(self.bans.len() as i64);
        if removed {
            tracing::info!(target = %target, "ban lifted by the operator");
        }
        self.emit(BanEvent::Unban { target });
        removed
    }

    /// Bans and lifts made here will be told to the receiver returned.
    pub fn subscribe_events(&self) -> tokio::sync::mpsc::Receiver<BanEvent> {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let _ = self.events.set(tx);
        rx
    }

    fn emit(&self, ev: BanEvent) {
        if let Some(tx) = self.events.get() {
            // Never wait: a full queue drops the event (the next
            // resynchronisation carries the ban anyway).
            let _ = tx.try_send(ev);
        }
    }

    /// A ban another instance made: enforced here for what is left of it,
    /// its repeat count remembered; not told again. Allowlisted and
    /// trusted ranges are never banned, whoever asks.
    pub fn apply_remote_ban(
        &self,
        target: IpNet,
        reason: &str,
        remaining: std::time::Duration,
        offences: u32,
    ) {
        let target = target.trunc();
        let s = self.settings.load();
        let protected = |list: &[Cidr]| list.iter().any(|a| overlaps(&a.0, &target));
        if protected(&s.allow) || protected(&s.trusted) || s.dry_run {
            return;
        }
        let host = is_host(&target);
        let prefix = host.then(|| prefix_of(target.addr(), s.prefix_v4, s.prefix_v6));
        let reason = state::static_reason(reason);
        self.known.forget(&target);
        self.bans.restore(
            target,
            reason,
            std::time::SystemTime::now(),
            remaining,
            0,
            prefix,
            true,
        );
        if offences > self.bans.offences(&target) {
            self.bans
                .restore_offence(target, offences, std::time::Duration::from_secs(86400));
        }
        self.metrics.bans_active.set(self.bans.len() as i64);
    }

    /// A repeat count another instance holds: ours is raised to it.
    pub fn apply_remote_offence(&self, target: IpNet, count: u32, remaining: std::time::Duration) {
        let target = target.trunc();
        if count > self.bans.offences(&target) {
            self.bans.restore_offence(target, count, remaining);
        }
    }

    /// A ban another instance lifted.
    pub fn apply_remote_unban(&self, target: IpNet) {
        if self.bans.remove(&target.trunc()) {
            self.metrics.bans_active.set(self.bans.len() as i64);
            tracing::info!(target = %target, "ban lifted on another instance");
        }
    }

    /// Bans in force and repeat counts, to share them.
    pub fn export_bans(&self) -> (Vec<bans::SavedBan>, Vec<bans::SavedOffence>) {
        self.bans.export()
    }

    /// Active bans, soonest to expire first.
    pub fn bans(&self) -> Vec<BanView> {
        self.bans.views()
    }

    /// A page of [`Guard::bans`]: at most `limit` after the ban on `after`
    /// (`None`: no ban on `after` any more).
    pub fn bans_page(&self, after: Option<&IpNet>, limit: usize) -> Option<Vec<BanView>> {
        self.bans.page(after.map(|n| n.trunc()).as_ref(), limit)
    }

    /// A request from `client` was answered: the memory of known clients
    /// learns it (the shared `unknown` key behind a proxy never becomes
    /// known: it is a crowd, not a client).
    pub fn answered(&self, client: IpAddr) {
        if client != crate::net::UNKNOWN_CLIENT {
            self.known.answered(client, unix_now());
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
        self.metrics.bans_active.set(self.bans.len() as i64);
        self.penalty.prune();
        self.ip_budget.prune();
        self.prefix_budget.prune();
        self.relay_budget.prune();
        self.admission.prune();
        let now = unix_now();
        if now % 10 == 0 {
            let n = self.known.sweep(now);
            self.metrics.known_clients.set(n as i64);
        } else {
            self.metrics
                .known_clients
                .set(self.known.known_count() as i64);
        }
        self.persist();
    }

    /// Writes what changed: the state file's journal (O(changes)), a
    /// merge of it into the snapshot now and then (in a background thread,
    /// from the files), and the ban file when bans changed (at most once a
    /// second, every 5 s past 10,000 bans, built in a background thread
    /// from a copy taken a thousand bans per lock).
    fn persist(&self) {
        let s = self.settings.load();
        let (changes, overflowed) = self.bans.take_changes();
        if let Some(path) = &s.state_file {
            let r = if overflowed || self.snapshot_due.swap(false, Ordering::Relaxed) {
                self.save_state()
            } else if changes.is_empty() {
                Ok(())
            } else {
                state::append(path, &changes).map(|()| self.journaled(path, changes.len()))
            };
            if let Err(e) = r {
                // Whatever was lost, a whole snapshot puts right.
                self.snapshot_due.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "cannot write the state file");
            }
        }
        let now = self.epoch.elapsed().as_secs();
        if let Some(path) = &s.state_file {
            if now % 60 == 59 {
                self.save_known(path);
            }
        }
        let every = if self.bans.len() > 10_000 { 5 } else { 1 };
        if s.ban_file.is_some()
            && now >= self.ban_file_written.load(Ordering::Relaxed) + every
            && self.bans.take_dirty()
        {
            self.ban_file_written.store(now, Ordering::Relaxed);
            self.write_ban_file();
        }
    }

    /// `n` more lines in the journal: once it holds more lines than there
    /// are bans (and at least 4,096), merge it into the snapshot.
    fn journaled(&self, path: &std::path::Path, n: usize) {
        let lines = self.journal_lines.fetch_add(n, Ordering::Relaxed) + n;
        if lines < self.bans.len().max(4096) {
            return;
        }
        match state::rotate_journal(path) {
            Ok(true) => {
                self.journal_lines.store(0, Ordering::Relaxed);
                let path = path.to_path_buf();
                in_background(move || {
                    if let Err(e) = state::merge(&path) {
                        tracing::error!(error = %e, "cannot merge the state file's journal");
                    }
                });
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot rotate the state file's journal"),
        }
    }

    /// Writes `--state-file` whole now (at shutdown, after a damaged file
    /// was set aside, when the journal overflowed); the journals are then
    /// redundant and removed.
    pub fn save_state(&self) -> std::io::Result<()> {
        let s = self.settings.load();
        let Some(path) = &s.state_file else {
            return Ok(());
        };
        let _ = self.bans.take_changes();
        let (bans, offences) = self.bans.export();
        state::save(path, bans, offences)?;
        self.journal_lines.store(0, Ordering::Relaxed);
        let known = self.known.export(unix_now(), s.known_max as usize);
        state::save_known(path, &known)
    }

    /// Writes the known clients beside the state file, in a background
    /// thread (the list is copied a shard at a time).
    fn save_known(&self, path: &std::path::Path) {
        let known = self
            .known
            .export(unix_now(), self.settings.load().known_max as usize);
        let path = path.to_path_buf();
        in_background(move || {
            if let Err(e) = state::save_known(&path, &known) {
                tracing::error!(error = %e, "cannot write the known clients");
            }
        });
    }

    /// Reads `--state-file` back at start; a damaged file is reported and
    /// set aside, never fatal.
    pub fn restore_state(&self) {
        let s = self.settings.load();
        let Some(path) = &s.state_file else {
            return;
        };
        let limits = state::Limits {
            prefix_v4: s.prefix_v4,
            prefix_v6: s.prefix_v6,
        };
        // Known clients first: a ban restored below forgets its client.
        let max = usize::try_from(s.known_max).unwrap_or(usize::MAX);
        match state::load_known(path, unix_now(), s.known_forget_secs, max) {
            Ok(r) => {
                for (ip, last) in &r.clients {
                    self.known.make_known(*ip, *last);
                }
                if !r.clients.is_empty() || r.dropped > 0 {
                    tracing::info!(
                        known = r.clients.len(),
                        dropped = r.dropped,
                        "known clients restored"
                    );
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
        match state::load(path, limits) {
            Ok(None) => {}
            Ok(Some(r)) => {
                let (n, m) = (r.bans.len(), r.offences.len());
                for why in r.invalid.iter().take(10) {
                    tracing::warn!(file = %path.display(), "state file entry dropped: {why}");
                }
                if let Some(aside) = &r.set_aside {
                    tracing::warn!("{aside}");
                    // What was valid is written back at the next tick.
                    self.snapshot_due.store(true, Ordering::Relaxed);
                }
                for (net, reason, since, remaining, hits) in r.bans {
                    let prefix =
                        is_host(&net).then(|| prefix_of(net.addr(), s.prefix_v4, s.prefix_v6));
                    self.known.forget(&net);
                    self.bans
                        .restore(net, reason, since, remaining, hits, prefix, false);
                }
                for (net, count, remaining) in r.offences {
                    self.bans.restore_offence(net, count, remaining);
                }
                self.metrics.bans_active.set(self.bans.len() as i64);
                tracing::info!(
                    bans = n,
                    repeat_counts = m,
                    expired = r.dropped,
                    invalid = r.invalid.len(),
                    file = %path.display(),
                    "state restored"
                );
            }
            Err(e) => tracing::warn!("{e}"),
        }
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

    /// Renders and writes the ban file in a background thread, from a
    /// copy of the bans taken a thousand per lock.
    fn write_ban_file(&self) {
        let s = self.settings.load_full();
        let Some(path) = s.ban_file.clone() else {
            return;
        };
        let bans = self.bans.for_firewall();
        in_background(move || {
            let text = nft::render(&bans, &s.ports, &s.udp_ports);
            if let Err(e) = nft::write_atomically(&path, &text) {
                tracing::error!(error = %e, "cannot write the ban file");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::net::UNKNOWN_CLIENT;
    use std::time::Duration;

    fn guard(extra: &str) -> Arc<Guard> {
        let (s, _) = Config::from_toml(&format!("upstream=[\"127.0.0.1:53\"]\n{extra}"))
            .unwrap()
            .settings()
            .unwrap();
        Arc::new(Guard::new(s.guard, Arc::new(Metrics::new())))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connection_caps_per_ip_and_release() {
        let g = guard("max_conns_per_ip = 2");
        let a = g.admit(ip("127.0.0.2")).unwrap();
        let _b = g.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(g.admit(ip("127.0.0.2")).err(), Some(ConnReject::PerIp));
        assert!(g.admit(ip("127.0.1.2")).is_ok());
        drop(a);
        assert!(g.admit(ip("127.0.0.2")).is_ok());
    }

    #[test]
    fn prefix_cap_is_eight_times_the_address_cap() {
        let g = guard("max_conns_per_ip = 1");
        let held: Vec<_> = (1..=8)
            .map(|i| g.admit(ip(&format!("127.0.5.{i}"))).unwrap())
            .collect();
        assert_eq!(g.admit(ip("127.0.5.9")).err(), Some(ConnReject::PerPrefix));
        drop(held);
        assert!(g.admit(ip("127.0.5.9")).is_ok());
    }

    #[test]
    fn allowlist_is_never_capped_limited_or_banned() {
        let g = guard(
            "max_conns_per_ip = 1\nper_ip_qps = 1\nper_ip_burst = 1\nban_after = 2\nallow = [\"127.0.0.9\"]",
        );
        let _held: Vec<_> = (0..5).map(|_| g.admit(ip("127.0.0.9")).unwrap()).collect();
        for _ in 0..50 {
            assert_eq!(g.check_budget(ip("127.0.0.9")), Budget::Ok);
            g.penalize(ip("127.0.0.9"), Reject::ObsoleteDraft);
        }
        assert!(g.bans().is_empty());
        g.ban(IpNet::from(ip("127.0.0.9")), "manual");
        g.ban("127.0.0.0/24".parse().unwrap(), "prefix");
        assert!(g.bans().is_empty(), "no ban covers an allowlisted range");
        assert!(g.admit(ip("127.0.0.9")).is_ok());
        assert_eq!(g.banned(ip("127.0.0.9")), Verdict::Pass);
    }

    #[test]
    fn budget_then_429() {
        let g = guard("per_ip_qps = 1\nper_ip_burst = 3");
        for _ in 0..3 {
            assert_eq!(g.check_budget(ip("127.0.0.3")), Budget::Ok);
        }
        assert!(matches!(g.check_budget(ip("127.0.0.3")), Budget::Over(s) if s >= 1));
        assert_eq!(g.check_budget(ip("127.0.0.4")), Budget::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn penalty_box_bans_then_expires() {
        let g = guard("ban_after = 3\nban_secs = 1");
        for _ in 0..2 {
            g.penalize(ip("127.0.0.5"), Reject::ObsoleteDraft);
        }
        g.penalize(ip("127.0.0.5"), Reject::UpstreamBudget); // not scored
        assert!(g.admit(ip("127.0.0.5")).is_ok());
        g.penalize(ip("127.0.0.5"), Reject::NotFound);
        assert_eq!(g.admit(ip("127.0.0.5")).err(), Some(ConnReject::Banned));
        assert_eq!(g.banned(ip("127.0.0.5")), Verdict::Refuse);
        assert_eq!(g.bans()[0].target, "127.0.0.5/32");
        assert_eq!(g.bans()[0].reason, "not_found");
        tokio::time::advance(Duration::from_millis(1100)).await;
        g.tick();
        assert!(g.admit(ip("127.0.0.5")).is_ok());
        assert!(g.bans().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn repeat_offenders_get_longer_bans() {
        let g = guard("ban_after = 1\nban_secs = 10");
        g.penalize(ip("127.0.0.6"), Reject::BadBase64);
        let first = g.bans()[0].remaining_secs;
        assert!(g.unban("127.0.0.6/32".parse().unwrap()));
        g.penalize(ip("127.0.0.6"), Reject::BadBase64);
        let second = g.bans()[0].remaining_secs;
        assert!(first <= 10 && second >= 19, "{first} {second}");
    }

    #[test]
    fn eight_banned_hosts_ban_their_prefix() {
        let g = guard("ban_after = 1");
        for i in 1..=8 {
            g.penalize(ip(&format!("127.9.9.{i}")), Reject::ObsoleteDraft);
        }
        assert!(g.bans().iter().any(|b| b.target == "127.9.9.0/24"));
        assert_eq!(g.admit(ip("127.9.9.200")).err(), Some(ConnReject::Banned));
        assert!(g.admit(ip("127.9.8.1")).is_ok());
    }

    #[test]
    fn connection_rate_refusals_score() {
        let g = guard("per_ip_conn_rate = 1\nban_after = 3");
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..20 {
            match g.admit(ip("127.0.7.1")) {
                Ok(t) => held.push(t),
                Err(ConnReject::ConnRate) => refused += 1,
                Err(ConnReject::Banned) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(held.len(), 5, "burst of 5 s at 1/s");
        assert_eq!(refused, 3);
        assert_eq!(g.bans()[0].reason, "conn_rate");
    }

    #[test]
    fn dry_run_enforces_nothing() {
        let g = guard(
            "dry_run = true\nmax_conns_per_ip = 1\nper_ip_qps = 1\nper_ip_burst = 1\nban_after = 1",
        );
        let _a = g.admit(ip("127.0.0.7")).unwrap();
        assert!(g.admit(ip("127.0.0.7")).is_ok());
        assert_eq!(g.check_budget(ip("127.0.0.7")), Budget::Ok);
        assert_eq!(g.check_budget(ip("127.0.0.7")), Budget::DryRun);
        g.penalize(ip("127.0.0.7"), Reject::ObsoleteDraft);
        assert!(g.bans().is_empty());
        let text = g.metrics.encode();
        assert!(
            text.contains("doh_bans_total{kind=\"address\",dry_run=\"true\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("doh_connections_rejected_total{reason=\"per_ip\",dry_run=\"true\"} 1")
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let g = guard("trusted_proxy = [\"127.0.0.1\", \"10.0.0.0/8\"]");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.1.1.1".parse().unwrap());
        assert_eq!(g.client_of(ip("127.0.0.1"), None, &h), ip("203.0.113.7"));
        assert_eq!(g.client_of(ip("127.0.0.2"), None, &h), ip("127.0.0.2"));
        let mut junk = HeaderMap::new();
        junk.insert("x-forwarded-for", "nonsense".parse().unwrap());
        assert_eq!(g.client_of(ip("127.0.0.1"), None, &junk), UNKNOWN_CLIENT);
        // A PROXY header alone names the client; forwarding headers are ignored.
        assert_eq!(
            g.client_of(ip("127.0.0.1"), Some(Some(ip("198.51.100.9"))), &h),
            ip("198.51.100.9")
        );
        assert_eq!(g.client_of(ip("127.0.0.1"), Some(None), &h), UNKNOWN_CLIENT);
    }

    #[test]
    fn the_unknown_key_is_limited_like_any_client() {
        let g = guard(
            "trusted_proxy = [\"127.0.0.1\"]\nper_ip_qps = 1\nper_ip_burst = 2\nban_after = 3",
        );
        assert_eq!(g.check_budget(UNKNOWN_CLIENT), Budget::Ok);
        assert_eq!(g.check_budget(UNKNOWN_CLIENT), Budget::Ok);
        assert!(matches!(g.check_budget(UNKNOWN_CLIENT), Budget::Over(_)));
        for _ in 0..3 {
            g.penalize(UNKNOWN_CLIENT, Reject::BadBase64);
        }
        assert_eq!(g.banned(UNKNOWN_CLIENT), Verdict::Refuse);
        assert_eq!(g.bans()[0].target, "unknown");
        assert!(g.bans.for_firewall().is_empty(), "not for the firewall");
    }

    #[test]
    fn limiter_state_stays_bounded() {
        let g = guard("");
        for i in 0..200_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x7F00_0000 | i));
            g.check_budget(a);
        }
        assert!(g.tracked_clients() >= 200_000);
        std::thread::sleep(Duration::from_millis(100));
        g.tick();
        // What remains are the ~800 /24 prefixes, whose buckets refill slower.
        assert!(g.tracked_clients() < 1000, "{}", g.tracked_clients());
    }
}
