//! Forwarding to the upstream resolvers.
//!
//! Each query goes out over UDP from a fresh socket (so a random source
//! port chosen by the kernel) with a random ID; only an answer whose ID and
//! question match is accepted, anything else is dropped and the wait goes
//! on. A truncated answer is retried over TCP. Upstreams are tried in turn
//! on timeout, error or SERVFAIL until `--upstream-timeout` runs out. Every
//! query sent spends one token of the global `--upstream-qps` budget.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::dns::{self, AnswerInfo, Key, RCODE_SERVFAIL};
use crate::metrics::{Metrics, UpstreamResult};

/// Consecutive failures after which an upstream is reported down.
const DOWN_AFTER: u32 = 3;
/// Shortest time given to one attempt.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);

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
    /// Milliseconds since `Upstream::epoch` of the last accepted answer.
    last_ok_ms: AtomicU64,
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
    pub fn new(
        addrs: &[SocketAddr],
        timeout: Duration,
        qps: u32,
        metrics: Arc<Metrics>,
    ) -> Upstream {
        let qps = NonZeroU32::new(qps).unwrap_or(NonZeroU32::MIN);
        Upstream {
            servers: addrs
                .iter()
                .map(|&addr| Server {
                    addr,
                    failures: AtomicU32::new(0),
                    up: AtomicBool::new(true),
                    last_ok_ms: AtomicU64::new(0),
                })
                .collect(),
            timeout,
            budget: RateLimiter::direct(Quota::per_second(qps).allow_burst(qps)),
            metrics,
            epoch: Instant::now(),
        }
    }

    /// Labels for metrics, in the order of the servers.
    pub fn labels(addrs: &[SocketAddr]) -> Vec<String> {
        addrs.iter().map(|a| a.to_string()).collect()
    }

    /// Time since any upstream last gave an accepted answer.
    pub fn since_last_answer(&self) -> Option<Duration> {
        let last = self
            .servers
            .iter()
            .map(|s| s.last_ok_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (last > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
        })
    }

    /// (address, up) for each server.
    pub fn status(&self) -> Vec<(SocketAddr, bool)> {
        self.servers
            .iter()
            .map(|s| (s.addr, s.up.load(Ordering::Relaxed)))
            .collect()
    }

    /// Resolves `key`: the first good answer, else the last SERVFAIL
    /// received, else an error.
    pub async fn resolve(&self, key: &Key) -> Result<(Vec<u8>, AnswerInfo), UpstreamError> {
        let n = self.servers.len();
        if n == 0 {
            return Err(UpstreamError::Failed);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
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
        while tokio::time::Instant::now() < deadline {
            let idx = (first + attempt) % n;
            attempt += 1;
            if self.budget.check().is_err() {
                self.metrics.upstream_budget_exhausted.inc();
                return servfail.ok_or(UpstreamError::Budget);
            }
            let server = &self.servers[idx];
            let until = (tokio::time::Instant::now() + per_try).min(deadline);
            let started = Instant::now();
            let res = tokio::time::timeout_at(until, self.query(idx, key)).await;
            match res {
                Ok(Attempt::Answer(wire, info)) if info.rcode == RCODE_SERVFAIL => {
                    self.metrics
                        .upstream(idx, UpstreamResult::Servfail, Some(started.elapsed()));
                    self.mark(server, true);
                    servfail = Some((wire, info));
                    if attempt >= n {
                        break;
                    }
                }
                Ok(Attempt::Answer(wire, info)) => {
                    self.metrics
                        .upstream(idx, UpstreamResult::Ok, Some(started.elapsed()));
                    self.mark(server, true);
                    return Ok((wire, info));
                }
                Ok(Attempt::Error) => {
                    self.metrics.upstream(idx, UpstreamResult::Error, None);
                    self.mark(server, false);
                    // A refused port fails at once: do not spin on it.
                    if attempt >= n {
                        tokio::time::sleep_until(until).await;
                    }
                }
                Err(_) => {
                    self.metrics.upstream(idx, UpstreamResult::Timeout, None);
                    self.mark(server, false);
                }
            }
        }
        servfail.ok_or(UpstreamError::Failed)
    }

    fn mark(&self, s: &Server, ok: bool) {
        if ok {
            s.failures.store(0, Ordering::Relaxed);
            s.last_ok_ms.store(
                self.epoch.elapsed().as_millis().max(1) as u64,
                Ordering::Relaxed,
            );
            if !s.up.swap(true, Ordering::Relaxed) {
                tracing::info!(upstream = %s.addr, "upstream is up again");
            }
        } else {
            let f = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if f >= DOWN_AFTER && s.up.swap(false, Ordering::Relaxed) {
                tracing::warn!(upstream = %s.addr, failures = f, "upstream is down");
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

    /// Returns `Ok(None)` when the answer was truncated.
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
        let mut buf = vec![0u8; 65535];
        loop {
            let n = sock.recv(&mut buf).await?;
            match dns::check_answer(&buf[..n], id, key) {
                Ok(info) if info.truncated => return Ok(None),
                Ok(info) => {
                    buf.truncate(n);
                    return Ok(Some(Attempt::Answer(buf, info)));
                }
                Err(e) => {
                    self.metrics.upstream(idx, UpstreamResult::Dropped, None);
                    tracing::debug!(upstream = %addr, error = %e, "dropped an answer");
                }
            }
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
    match dns::check_answer(&buf, id, key) {
        Ok(info) => Ok(Attempt::Answer(buf, info)),
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
    }
}
