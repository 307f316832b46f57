//! Forwarding to the upstream resolvers.
//!
//! Each query goes out over UDP from a fresh socket (so a random source
//! port chosen by the kernel) with a random ID; only an answer whose ID and
//! question match is accepted, anything else is dropped and the wait goes
//! on. An answer larger than the payload size we advertise is dropped too,
//! and a truncated or oversized one is retried over TCP. Upstreams are
//! tried in turn on timeout, error or SERVFAIL until `--upstream-timeout`
//! runs out. Every query sent spends one token of the global
//! `--upstream-qps` budget.
//!
//! Whether an upstream is up is decided by the proxy's own probes only
//! ([`Upstream::probe`]): queries for names a client chose can time out
//! for reasons of their own (a dead authoritative server), and must not
//! let clients mark a healthy upstream down.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use crate::dns::{self, AnswerInfo, Key, RCODE_SERVFAIL};
use crate::metrics::{Metrics, UpstreamResult};

/// Consecutive failed probes after which an upstream is reported down.
const DOWN_AFTER: u32 = 3;
/// Shortest time given to one attempt.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);

/// What the upstream side runs with.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub servers: Vec<SocketAddr>,
    /// `--upstream-timeout`: the whole resolution, retries included.
    pub timeout: Duration,
    /// `--upstream-qps`: queries sent per second, in all.
    pub qps: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream answered in time")]
    Failed,
    #[error("upstream budget spent")]
    Budget,
}

struct Server {
    addr: SocketAddr,
    failures: AtomicU32,
    up: AtomicBool,
    /// Milliseconds since `Upstream::epoch` of the last answered probe.
    last_probe_ok_ms: AtomicU64,
}

pub struct Upstream {
    servers: Vec<Server>,
    timeout: Duration,
    budget: DefaultDirectRateLimiter,
    metrics: Arc<Metrics>,
    epoch: Instant,
}

enum Attempt {
    Answer(Vec<u8>, AnswerInfo),
    Error,
}

impl Upstream {
    pub fn new(s: &UpstreamSettings, metrics: Arc<Metrics>) -> Upstream {
        let qps = NonZeroU32::new(s.qps).unwrap_or(NonZeroU32::MIN);
        Upstream {
            servers: s
                .servers
                .iter()
                .map(|&addr| Server {
                    addr,
                    failures: AtomicU32::new(0),
                    up: AtomicBool::new(true),
                    last_probe_ok_ms: AtomicU64::new(0),
                })
                .collect(),
            timeout: s.timeout,
            budget: RateLimiter::direct(Quota::per_second(qps).allow_burst(qps)),
            metrics,
            epoch: Instant::now(),
        }
    }

    /// Labels for metrics, in the order of the servers.
    pub fn labels(s: &UpstreamSettings) -> Vec<String> {
        s.servers.iter().map(|a| a.to_string()).collect()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Time since any upstream last answered a probe.
    pub fn since_last_probe(&self) -> Option<Duration> {
        let last = self
            .servers
            .iter()
            .map(|s| s.last_probe_ok_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (last > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
        })
    }

    /// (address, up) for each server.
    pub fn status(&self) -> Vec<(String, bool)> {
        self.servers
            .iter()
            .map(|s| (s.addr.to_string(), s.up.load(Ordering::Relaxed)))
            .collect()
    }

    /// Resolves `key`: the first good answer, else the last SERVFAIL
    /// received, else an error.
    pub async fn resolve(&self, key: &Key) -> Result<(Vec<u8>, AnswerInfo), UpstreamError> {
        let n = self.servers.len();
        if n == 0 {
            return Err(UpstreamError::Failed);
        }
        let deadline = Instant::now() + self.timeout;
        let per_try = (self.timeout / n.max(2) as u32)
            .max(MIN_ATTEMPT)
            .min(self.timeout);
        let first = self
            .servers
            .iter()
            .position(|s| s.up.load(Ordering::Relaxed))
            .unwrap_or(0);
        let mut servfail = None;
        let mut attempt = 0;
        while Instant::now() < deadline {
            let idx = (first + attempt) % n;
            attempt += 1;
            if self.budget.check().is_err() {
                self.metrics.upstream_budget_exhausted.inc();
                return servfail.ok_or(UpstreamError::Budget);
            }
            let until = (Instant::now() + per_try).min(deadline);
            let started = Instant::now();
            let res = tokio::time::timeout_at(until, self.query(idx, key)).await;
            match res {
                Ok(Attempt::Answer(wire, info)) if info.rcode == RCODE_SERVFAIL => {
                    self.metrics
                        .upstream(idx, UpstreamResult::Servfail, Some(started.elapsed()));
                    servfail = Some((wire, info));
                    if attempt >= n {
                        break;
                    }
                }
                Ok(Attempt::Answer(wire, info)) => {
                    self.metrics
                        .upstream(idx, UpstreamResult::Ok, Some(started.elapsed()));
                    return Ok((wire, info));
                }
                Ok(Attempt::Error) => {
                    self.metrics.upstream(idx, UpstreamResult::Error, None);
                    // A refused port fails at once: do not spin on it.
                    if attempt >= n {
                        tokio::time::sleep_until(until).await;
                    }
                }
                Err(_) => {
                    self.metrics.upstream(idx, UpstreamResult::Timeout, None);
                }
            }
        }
        servfail.ok_or(UpstreamError::Failed)
    }

    /// Probes every upstream once (the root's NS, outside the budget: a
    /// spent budget must not make the proxy look dead); any answer, even
    /// REFUSED or SERVFAIL, shows the upstream is there.
    pub async fn probe(&self) {
        let Some(key) = Key::new(".", 2, false) else {
            return;
        };
        let probes = (0..self.servers.len()).map(|idx| {
            let key = key.clone();
            async move {
                let ok = matches!(
                    tokio::time::timeout(self.timeout, self.query(idx, &key)).await,
                    Ok(Attempt::Answer(..))
                );
                self.mark(&self.servers[idx], ok);
            }
        });
        futures_util::future::join_all(probes).await;
    }

    fn mark(&self, s: &Server, ok: bool) {
        if ok {
            s.failures.store(0, Ordering::Relaxed);
            s.last_probe_ok_ms.store(
                self.epoch.elapsed().as_millis().max(1) as u64,
                Ordering::Relaxed,
            );
            if !s.up.swap(true, Ordering::Relaxed) {
                tracing::info!(upstream = %s.addr, "upstream is up again");
            }
        } else {
            let f = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if f >= DOWN_AFTER && s.up.swap(false, Ordering::Relaxed) {
                tracing::warn!(upstream = %s.addr, failures = f, "upstream is down (probes unanswered)");
            }
        }
    }

    async fn query(&self, idx: usize, key: &Key) -> Attempt {
        let addr = self.servers[idx].addr;
        match self.query_udp(idx, addr, key).await {
            Ok(Some(a)) => a,
            Ok(None) => match query_tcp(addr, key).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(upstream = %addr, error = %e, "TCP query failed");
                    Attempt::Error
                }
            },
            Err(e) => {
                tracing::debug!(upstream = %addr, error = %e, "UDP query failed");
                Attempt::Error
            }
        }
    }

    /// Returns `Ok(None)` when the answer was truncated, or larger than the
    /// payload size we advertised (then TCP is tried).
    async fn query_udp(
        &self,
        idx: usize,
        addr: SocketAddr,
        key: &Key,
    ) -> std::io::Result<Option<Attempt>> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(addr).await?;
        let id: u16 = rand::random();
        sock.send(&dns::upstream_query(id, key)).await?;
        let limit = if key.flags.edns() {
            usize::from(dns::EDNS_PAYLOAD)
        } else {
            512
        };
        // One byte more than allowed, to see an oversized datagram.
        let mut buf = vec![0u8; limit + 1];
        loop {
            let n = sock.recv(&mut buf).await?;
            if n > limit {
                self.metrics.upstream(idx, UpstreamResult::Dropped, None);
                tracing::debug!(upstream = %addr, "answer larger than advertised: retrying over TCP");
                return Ok(None);
            }
            match accept(&buf[..n], id, key) {
                Ok((_, info)) if info.truncated => return Ok(None),
                Ok((wire, info)) => return Ok(Some(Attempt::Answer(wire, info))),
                Err(e) => {
                    self.metrics.upstream(idx, UpstreamResult::Dropped, None);
                    tracing::debug!(upstream = %addr, error = %e, "dropped an answer");
                }
            }
        }
    }
}

/// Checks an answer and strips what a client must not get.
fn accept(wire: &[u8], id: u16, key: &Key) -> Result<(Vec<u8>, AnswerInfo), dns::AnswerError> {
    let info = dns::check_answer(wire, id, key)?;
    match dns::strip_extras(wire, key.flags.dnssec_ok()) {
        None => Ok((wire.to_vec(), info)),
        Some(stripped) => {
            let info = dns::check_answer(&stripped, id, key)?;
            Ok((stripped, info))
        }
    }
}

async fn query_tcp(addr: SocketAddr, key: &Key) -> std::io::Result<Attempt> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let id: u16 = rand::random();
    let q = dns::upstream_query(id, key);
    let mut msg = Vec::with_capacity(q.len() + 2);
    msg.extend_from_slice(&(q.len() as u16).to_be_bytes());
    msg.extend_from_slice(&q);
    s.write_all(&msg).await?;
    let len = s.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    match accept(&buf, id, key) {
        Ok((wire, info)) => Ok(Attempt::Answer(wire, info)),
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
    }
}
