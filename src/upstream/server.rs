//! One upstream server: its link (a UDP socket pool, or a kept stream
//! connection), its measured round-trip time, its reconnection backoff, and
//! one exchange with it.

use super::udp::udp_exchange;
use super::*;

/// Reconnection backoff, and a log line when an upstream starts failing
/// and when it recovers (not one per failure).
#[derive(Default)]
pub(super) struct Backoff {
    pub(super) state: Mutex<(Option<Instant>, Duration)>,
    pub(super) failing: AtomicBool,
}

impl Backoff {
    pub(super) fn check(&self) -> Result<(), ExchangeError> {
        let s = self.state.lock().map_err(|_| ExchangeError::Backoff)?;
        match s.0 {
            Some(until) if Instant::now() < until => Err(ExchangeError::Backoff),
            _ => Ok(()),
        }
    }

    pub(super) fn failed(&self, label: &str, e: &std::io::Error) {
        if let Ok(mut s) = self.state.lock() {
            let delay = (s.1 * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
            *s = (Some(Instant::now() + delay), delay);
        }
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(upstream = label, error = %e, "cannot connect to the upstream (logged once until it recovers)");
        }
    }

    pub(super) fn succeeded(&self, label: &str) {
        if let Ok(mut s) = self.state.lock() {
            *s = (None, Duration::ZERO);
        }
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(upstream = label, "connected to the upstream again");
        }
    }
}

/// Checks an answer and strips what a client must not get.
pub(super) fn accept(
    wire: &[u8],
    id: u16,
    key: &Key,
) -> Result<(Vec<u8>, AnswerInfo), dns::AnswerError> {
    let info = dns::check_answer(wire, id, key)?;
    let mut out = match dns::strip_extras(wire, key.flags().dnssec_ok()) {
        None => wire.to_vec(),
        Some(stripped) => stripped,
    };
    let before = out.len();
    dns::clear_options(&mut out);
    if out.len() == wire.len() && before == wire.len() {
        return Ok((out, info));
    }
    // Offsets moved: locate the TTLs again.
    let info = dns::check_answer(&out, id, key)?;
    Ok((out, info))
}

pub(super) enum Link {
    /// UDP, and a pool for TCP after truncation.
    Udp(udp::UdpPool, stream::StreamPool),
    Stream(stream::StreamPool),
    Https(https::HttpsLink),
}

/// Smoothed RTT and its deviation (RFC 6298), in microseconds.
#[derive(Default)]
pub(super) struct Rtt {
    pub(super) srtt: AtomicU64,
    pub(super) rttvar: AtomicU64,
}

impl Rtt {
    pub(super) fn sample(&self, took: Duration) {
        let r = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let srtt = self.srtt.load(Ordering::Relaxed);
        if srtt == 0 {
            self.srtt.store(r.max(1), Ordering::Relaxed);
            self.rttvar.store(r / 2, Ordering::Relaxed);
            return;
        }
        let var = self.rttvar.load(Ordering::Relaxed);
        let diff = srtt.abs_diff(r);
        self.rttvar.store((3 * var + diff) / 4, Ordering::Relaxed);
        self.srtt
            .store(((7 * srtt + r) / 8).max(1), Ordering::Relaxed);
    }

    pub(super) fn srtt(&self) -> Option<Duration> {
        let s = self.srtt.load(Ordering::Relaxed);
        (s > 0).then(|| Duration::from_micros(s))
    }

    pub(super) fn rto(&self) -> Duration {
        match self.srtt() {
            None => INITIAL_RTO,
            Some(s) => s + Duration::from_micros(4 * self.rttvar.load(Ordering::Relaxed)),
        }
    }
}

pub(super) struct Server {
    pub(super) spec: UpstreamSpec,
    pub(super) link: Link,
    pub(super) rtt: Rtt,
    pub(super) failures: AtomicU32,
    pub(super) up: AtomicBool,
    /// Milliseconds since `Upstream::epoch` of the last answered probe.
    pub(super) last_probe_ok_ms: AtomicU64,
    pub(super) metrics: UpstreamMetrics,
}

impl Server {
    /// One exchange with this upstream. A truncated UDP answer is asked
    /// again over TCP, which is a second packet: it waits for a second
    /// token of `budget`, ahead of new queries ([`Spend::spend_retry`]).
    pub(super) async fn exchange(
        &self,
        key: &Key,
        budget: &dyn Spend,
        who: Who,
    ) -> Result<(Vec<u8>, AnswerInfo), ExchangeError> {
        // UDP inline, the rest boxed: this future is moved into the
        // resolution's set of attempts on every miss, and the stream and
        // HTTPS exchanges (a TLS connection being set up, an HTTP/2
        // request) would make it several times larger than the UDP one.
        let r = match &self.link {
            Link::Udp(udp, tcp) => {
                match udp_exchange(udp, self.spec.addr, key, &self.metrics).await? {
                    Exchanged::Truncated => {
                        if !budget.spend_retry(who).await {
                            return Err(ExchangeError::Budget);
                        }
                        Box::pin(tcp.exchange(key)).await?
                    }
                    answered => answered,
                }
            }
            Link::Stream(pool) => Box::pin(pool.exchange(key)).await?,
            Link::Https(h) => Box::pin(h.exchange(key)).await?,
        };
        match r {
            Exchanged::Answer(a) => Ok(a),
            Exchanged::Truncated => Err(ExchangeError::Closed),
        }
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}
