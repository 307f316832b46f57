//! RFC 9000's anti-amplification limit, enforced on the QUIC socket itself.
//!
//! quinn keeps the limit too, but lets one full datagram through whenever
//! any budget is left (so a spoofed source can get three times what it
//! sent plus almost one MTU). This socket wrapper counts, per remote
//! address not yet validated, the bytes received from it and sent to it,
//! and drops (as the network might) any datagram that would take it past
//! three times what it sent. An address becomes validated when its Retry
//! token or its handshake proves it, and is forgotten when its connection
//! ends. The books are bounded: past [`MAX_TRACKED`] unvalidated
//! addresses the oldest are forgotten, and a forgotten unvalidated
//! address gets nothing until it sends again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Unvalidated addresses tracked at most.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Default)]
struct Books {
    /// Bytes (received, sent) per unvalidated address.
    unvalidated: HashMap<SocketAddr, (u64, u64)>,
    /// Insertion order, to forget the oldest first.
    order: VecDeque<SocketAddr>,
    validated: HashSet<SocketAddr>,
}

/// A UDP socket that never sends an unvalidated address more than three
/// times what it received from it.
pub struct Guarded {
    inner: Arc<dyn AsyncUdpSocket>,
    books: Mutex<Books>,
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded").finish_non_exhaustive()
    }
}

impl Guarded {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> Arc<Guarded> {
        Arc::new(Guarded {
            inner,
            books: Mutex::default(),
        })
    }

    /// `addr` proved it owns its address: no limit from now on.
    pub fn validate(&self, addr: SocketAddr) {
        if let Ok(mut b) = self.books.lock() {
            b.unvalidated.remove(&addr);
            b.validated.insert(addr);
        }
    }

    /// `addr`'s connection ended.
    pub fn forget(&self, addr: SocketAddr) {
        if let Ok(mut b) = self.books.lock() {
            b.validated.remove(&addr);
            b.unvalidated.remove(&addr);
        }
    }
}

impl AsyncUdpSocket for Guarded {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let to = transmit.destination;
        let len = transmit.contents.len() as u64;
        let allowed = match self.books.lock() {
            Ok(mut b) => {
                if b.validated.contains(&to) {
                    true
                } else {
                    match b.unvalidated.get_mut(&to) {
                        Some((recvd, sent)) if *sent + len <= 3 * *recvd => {
                            *sent += len;
                            true
                        }
                        _ => false,
                    }
                }
            }
            Err(_) => false,
        };
        if !allowed {
            // As if the network had lost it.
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let r = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &r {
            if let Ok(mut b) = self.books.lock() {
                for m in &meta[..*n] {
                    if b.validated.contains(&m.addr) {
                        continue;
                    }
                    let fresh = !b.unvalidated.contains_key(&m.addr);
                    b.unvalidated.entry(m.addr).or_default().0 += m.len as u64;
                    if fresh {
                        b.order.push_back(m.addr);
                        while b.unvalidated.len() > MAX_TRACKED {
                            match b.order.pop_front() {
                                Some(old) => {
                                    b.unvalidated.remove(&old);
                                }
                                None => break,
                            }
                        }
                        // The order list keeps addresses validated or
                        // forgotten since; trim it when it runs ahead.
                        if b.order.len() > 2 * MAX_TRACKED {
                            let keep: VecDeque<SocketAddr> = b
                                .order
                                .iter()
                                .copied()
                                .filter(|a| b.unvalidated.contains_key(a))
                                .collect();
                            b.order = keep;
                        }
                    }
                }
            }
        }
        r
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
