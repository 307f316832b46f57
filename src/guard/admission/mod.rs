//! Admission of connections, before any TLS work, and the table of open
//! connections.
//!
//! A new connection meets, in order: its address's and its prefix's
//! new-connection rates, the caps on open connections per address, per
//! prefix and per wider network (IPv4 /16, IPv6 /48, so one network cannot
//! take the whole table while staying under every narrower cap), and the
//! global cap. At the global cap the connection idle the longest — no
//! request in flight, measured from its last request, or from accept if it
//! never sent one — is closed to make room; only when none is idle is the
//! new one refused. A [`ConnTicket`] holds a connection's place and gives it
//! back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::budget::{quota, ConnBudgets, KeyedRate};
use super::GuardSettings;
use crate::metrics::Metrics;
use crate::net::prefix_of;
use crate::reject::ConnReject;

/// Prefix lengths of the wider network capped as a whole.
pub const NET_V4: u8 = 16;
pub const NET_V6: u8 = 48;
/// A connection's new-connection burst, in seconds of its rate.
const CONN_BURST_SECS: u32 = 5;

/// One open client connection, as the guard, the pipeline and the
/// connection's own task see it. Activity is requests, nothing else:
/// control frames and stray bytes do not keep a connection alive.
///
/// A request is *in flight* while the proxy works on it, and its answer
/// *unread* from when it is handed to the transport until the client has
/// taken it (written into the socket, or into the HTTP/2 stream's window).
/// A client that stops reading is never "busy": its connection is idle as
/// of the last answer it took, and closed when answers wait unread for
/// `--write-timeout` ([`Expiry::Stuck`]).
#[derive(Debug)]
pub struct Conn {
    peer: IpAddr,
    born: Instant,
    /// Milliseconds after `born` of the last request end or answer taken.
    last_ms: AtomicU64,
    inflight: AtomicU32,
    /// Answers handed to the transport that the client has not taken.
    unread: AtomicU32,
    /// Milliseconds after `born` the client last took an answer (or its
    /// oldest unread answer was queued, if it took none since).
    progress_ms: AtomicU64,
    requests: AtomicU64,
    /// The peer was a known client when it connected.
    known: AtomicBool,
    close: CancellationToken,
    /// Whether this connection still holds a place in the global count.
    counted: AtomicBool,
    /// Its client's request budgets, held for its next request.
    budgets: ConnBudgets,
    /// The second (unix) its peer last had an answer recorded in the
    /// memory of known clients: once a second is enough.
    answered_secs: AtomicU64,
}

/// Why the watchdog closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No complete request within the first-request deadline.
    FirstRequest,
    /// Nothing in flight and nothing started for the idle timeout.
    Idle,
    /// Answers waited unread for the write timeout.
    Stuck,
}

impl Conn {
    fn new(peer: IpAddr) -> Conn {
        Conn {
            peer,
            born: crate::clock::coarse(),
            last_ms: AtomicU64::new(0),
            inflight: AtomicU32::new(0),
            unread: AtomicU32::new(0),
            progress_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            known: AtomicBool::new(false),
            close: CancellationToken::new(),
            counted: AtomicBool::new(false),
            budgets: ConnBudgets::default(),
            answered_secs: AtomicU64::new(0),
        }
    }

    /// A connection outside the table (tests, tools).
    pub fn detached(peer: IpAddr) -> Arc<Conn> {
        Arc::new(Conn::new(peer))
    }

    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    pub(in crate::guard) fn budgets(&self) -> &ConnBudgets {
        &self.budgets
    }

    /// Whether an answer to `client` at `now` (unix seconds) is news to
    /// the memory of known clients: not when `client` is this
    /// connection's peer and an answer to it was recorded this second.
    pub(in crate::guard) fn first_answer_in(&self, client: IpAddr, now: u64) -> bool {
        if client != crate::net::canonical(self.peer) {
            return true;
        }
        self.answered_secs.swap(now, Ordering::Relaxed) != now
    }

    /// Read on every request and answer: the coarse clock.
    fn now_ms(&self) -> u64 {
        let since = crate::clock::coarse().saturating_duration_since(self.born);
        since.as_millis().min(u64::MAX.into()) as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// An answer is handed to the transport; the client has not taken it
    /// until the returned guard is dropped.
    pub fn queued(self: &Arc<Self>) -> Unread {
        if self.unread.fetch_add(1, Ordering::Relaxed) == 0 {
            self.progress_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        Unread(self.clone())
    }

    /// Answers the client has not taken yet.
    pub fn unread(&self) -> u32 {
        self.unread.load(Ordering::Relaxed)
    }

    /// A request starts; returns its number on this connection (1-based)
    /// and a guard that marks its end when dropped. The start is not
    /// timed: nothing reads `last_ms` while a request is in flight, and
    /// its end (or the taking of its answer) stamps it.
    pub fn begin(self: &Arc<Self>) -> (u64, InFlight) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        (n, InFlight(self.clone()))
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Asks the connection's task to close it.
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Resolves when the connection was asked to close.
    pub fn closing(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    pub fn is_closing(&self) -> bool {
        self.close.is_cancelled()
    }

    fn progress(&self) -> Instant {
        self.born + Duration::from_millis(self.progress_ms.load(Ordering::Relaxed))
    }

    /// The last request end or answer taken (accept, before any).
    fn last(&self) -> Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Since when nothing has happened on the connection: no request in
    /// flight, no answer unread, none ended or taken since; `None` while
    /// something is. Before its first request, since it was accepted.
    pub fn quiet_since(&self) -> Option<Instant> {
        if self.unread() > 0 || self.inflight() > 0 {
            return None;
        }
        Some(self.last())
    }

    /// Since when the connection has been idle, or `None` while a request
    /// is in flight and the client takes its answers. A client that leaves
    /// answers unread is idle since it last took one.
    fn idle_since(&self) -> Option<Instant> {
        if self.unread() > 0 {
            return Some(self.progress());
        }
        if self.inflight() > 0 {
            return None;
        }
        Some(self.last())
    }

    /// When the watchdog must close the connection if nothing happens
    /// before, and why; `None` while a request is in flight (and nothing
    /// waits unread). `write` is `--write-timeout`.
    pub fn deadline(
        &self,
        first: Duration,
        idle: Duration,
        write: Duration,
    ) -> Option<(Instant, Expiry)> {
        if self.unread() > 0 {
            return Some((self.progress() + write, Expiry::Stuck));
        }
        if self.inflight() > 0 {
            return None;
        }
        if self.requests() == 0 {
            return Some((self.born + first, Expiry::FirstRequest));
        }
        self.idle_since().map(|t| (t + idle, Expiry::Idle))
    }
}

/// An answer the client has not taken; its drop says it took it (or that
/// it is gone), which is progress.
#[derive(Debug)]
pub struct Unread(Arc<Conn>);

impl Drop for Unread {
    fn drop(&mut self) {
        let c = &self.0;
        let now = c.now_ms();
        c.progress_ms.store(now, Ordering::Relaxed);
        c.last_ms.store(now, Ordering::Relaxed);
        c.unread.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in flight on a connection; its drop ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Conn>);

impl InFlight {
    /// The connection the request is on.
    pub fn conn(&self) -> &Conn {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // An answer still unread stamps the connection when it is taken,
        // later than now: one clock read per request instead of two.
        if self.0.unread() == 0 {
            self.0.touch();
        }
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Table {
    per_ip: HashMap<IpAddr, u32>,
    per_prefix: HashMap<IpNet, u32>,
    per_net: HashMap<IpNet, u32>,
    live: HashMap<u64, Arc<Conn>>,
}

fn inc<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    *map.entry(key).or_default() += 1;
}

fn dec<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Whom a connection is admitted as.
pub struct Candidate {
    pub ip: IpAddr,
    /// Spends (and meets) the new-connection rates. A QUIC source that
    /// has not proved it owns its address does not: its packets may be
    /// spoofed, and must not spend (or exhaust) somebody else's rate.
    pub rated: bool,
    /// Meets and takes the per-address, per-prefix and per-network caps.
    /// A QUIC source does only once its handshake proved its address.
    pub capped: bool,
    /// Takes a place in the global count (a real socket, not a client
    /// named by a PROXY header on an already counted one).
    pub global: bool,
    /// Exempt from the global cap (allowlisted).
    pub exempt: bool,
    /// A known client: at `--max-conns`, its idle connections are closed
    /// only once no other client's is idle.
    pub known: bool,
}

pub struct Admission {
    open: AtomicUsize,
    table: Mutex<Table>,
    next_id: AtomicU64,
    ip_rate: KeyedRate<IpAddr>,
    prefix_rate: KeyedRate<IpNet>,
    metrics: Arc<Metrics>,
}

impl Admission {
    pub fn new(s: &GuardSettings, metrics: Arc<Metrics>) -> Admission {
        Admission {
            open: AtomicUsize::new(0),
            table: Mutex::default(),
            next_id: AtomicU64::new(1),
            ip_rate: KeyedRate::new("per-address connection", conn_quota(s.per_ip_conn_rate)),
            prefix_rate: KeyedRate::new(
                "per-prefix connection",
                conn_quota(s.per_prefix_conn_rate),
            ),
            metrics,
        }
    }

    /// Takes new rates from reloaded settings.
    pub fn reconfigure(&self, s: &GuardSettings) {
        self.ip_rate.set_quota(conn_quota(s.per_ip_conn_rate));
        self.prefix_rate
            .set_quota(conn_quota(s.per_prefix_conn_rate));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a mitigation; returns whether to enforce it.
    fn enforce(&self, reason: ConnReject, ip: IpAddr, s: &GuardSettings) -> bool {
        let dry = s.dry_run && reason.is_mitigation();
        self.metrics.guard.conn_rejected(reason, dry);
        if dry {
            tracing::info!(client = %ip, reason = reason.label(), "dry run: would close connection");
        }
        !dry
    }

    pub fn admit(
        self: &Arc<Self>,
        who: Candidate,
        s: &GuardSettings,
    ) -> Result<ConnTicket, ConnReject> {
        let ip = who.ip;
        let prefix = prefix_of(ip, s.prefix_v4, s.prefix_v6);
        let net = prefix_of(ip, NET_V4, NET_V6);
        if who.rated {
            let over = self.ip_rate.check(&ip).is_err() || self.prefix_rate.check(&prefix).is_err();
            if over && self.enforce(ConnReject::ConnRate, ip, s) {
                return Err(ConnReject::ConnRate);
            }
        }
        let mut t = self.lock();
        if who.capped {
            let n_ip = t.per_ip.get(&ip).copied().unwrap_or(0);
            let n_prefix = t.per_prefix.get(&prefix).copied().unwrap_or(0);
            let n_net = t.per_net.get(&net).copied().unwrap_or(0);
            if n_ip >= s.max_conns_per_ip && self.enforce(ConnReject::PerIp, ip, s) {
                return Err(ConnReject::PerIp);
            }
            if n_prefix >= s.max_conns_per_prefix() && self.enforce(ConnReject::PerPrefix, ip, s) {
                return Err(ConnReject::PerPrefix);
            }
            if n_net >= s.max_conns_per_net() && self.enforce(ConnReject::PerNetwork, ip, s) {
                return Err(ConnReject::PerNetwork);
            }
        }
        let mut evicted = None;
        if who.global && !who.exempt && self.open.load(Ordering::Relaxed) >= s.max_conns as usize {
            evicted = idlest(&mut t);
            if evicted.is_none() && self.enforce(ConnReject::Global, ip, s) {
                return Err(ConnReject::Global);
            }
        }
        let mut counted = None;
        if who.capped {
            inc(&mut t.per_ip, ip);
            inc(&mut t.per_prefix, prefix);
            inc(&mut t.per_net, net);
            counted = Some((ip, prefix, net));
        }
        let conn = Arc::new(Conn::new(ip));
        conn.known.store(who.known, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if who.global {
            conn.counted.store(true, Ordering::Relaxed);
            t.live.insert(id, conn.clone());
            self.open.fetch_add(1, Ordering::Relaxed);
            self.metrics.guard.connections_open.inc();
        }
        drop(t);
        if let Some(victim) = evicted {
            self.uncount(&victim);
            victim.close();
            self.metrics.guard.connections_evicted.inc();
            tracing::debug!(peer = %victim.peer, "idle connection closed to make room");
        }
        Ok(ConnTicket {
            admission: self.clone(),
            conn,
            id,
            counted,
        })
    }

    fn uncount(&self, conn: &Conn) {
        if conn.counted.swap(false, Ordering::Relaxed) {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.metrics.guard.connections_open.dec();
        }
    }

    /// Open connections in all.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn prune(&self) {
        self.ip_rate.prune();
        self.prefix_rate.prune();
    }
}

/// Takes the connection idle the longest out of the table, if any is
/// idle: a client's that is not known before a known client's.
fn idlest(t: &mut Table) -> Option<Arc<Conn>> {
    let id = t
        .live
        .iter()
        .filter(|(_, c)| !c.is_closing())
        .filter_map(|(id, c)| {
            c.idle_since()
                .map(|since| (c.known.load(Ordering::Relaxed), since, *id))
        })
        .min()
        .map(|(_, _, id)| id)?;
    t.live.remove(&id)
}

fn conn_quota(rate: u32) -> governor::Quota {
    quota(rate, rate.saturating_mul(CONN_BURST_SECS))
}

/// Where a connection's place is held; dropping it frees the place.
pub struct ConnTicket {
    admission: Arc<Admission>,
    conn: Arc<Conn>,
    id: u64,
    counted: Option<(IpAddr, IpNet, IpNet)>,
}

impl ConnTicket {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        let a = &self.admission;
        {
            let mut t = a.lock();
            if let Some((ip, prefix, net)) = &self.counted {
                dec(&mut t.per_ip, ip);
                dec(&mut t.per_prefix, prefix);
                dec(&mut t.per_net, net);
            }
            t.live.remove(&self.id);
        }
        a.uncount(&self.conn);
    }
}

#[cfg(test)]
mod tests;
