//! UDP to one upstream from a bounded pool of connected sockets.
//!
//! A fresh socket per query costs six system calls beside the send and the
//! receive (socket, bind, connect, register, deregister, close); a socket
//! from the pool costs none. Each socket serves one query at a time: the
//! query that took it sends, reads its own answer and puts it back, so no
//! task stands between the answer and the query waiting for it.
//!
//! What the pool keeps of RFC 5452's protection against forged answers:
//!
//! - every query takes a socket chosen at random among the idle ones (of
//!   its own event loop, below), each bound by the kernel to its own
//!   random ephemeral port, and a random ID;
//! - each socket is connected to the upstream, so the kernel drops any
//!   datagram that does not come from the upstream's address and port;
//! - an answer is only taken for the ID and the question asked (a late
//!   answer to an earlier query on the same socket is dropped like any
//!   other mismatch);
//! - a socket is closed after [`RETIRE_AFTER`] queries and replaced by one
//!   on a new random port, so ports learnt by an observer soon stop
//!   mattering; at most [`POOL`] idle sockets are kept, the rest close;
//! - whatever the event loop has seen reach a socket while it sat idle is
//!   read and thrown away before its next query goes out, so that
//!   forgeries queued up in advance (many IDs for a name about to be
//!   asked) never meet a query: what the query looks at arrived while it
//!   waited, or an instant before, as with a socket of its own. A socket
//!   still receiving after [`DRAIN_MAX`] datagrams is closed (someone is
//!   aiming at its port) and another is taken. This costs a read that
//!   finds nothing when the socket's last answer left it marked readable
//!   (about 0.4 system calls per query, 1 % of a miss, measured).
//!
//! A socket is registered with the event loop of the runtime that opened
//! it, and that loop is the one told when its answer arrives. A query
//! only takes an idle socket of its own runtime's loop (each connection
//! worker has its own), else opens one: taken by a query on another
//! worker, every answer would wake one thread to hand it to the other.
//! When the pool is full, a socket coming back takes the place of an idle
//! one of another runtime, if there is one.
//!
//! Only a socket whose query got its answer goes back: one whose query
//! failed, timed out or was abandoned for a hedge closes, so that a late
//! answer never meets the next query (it would be counted as a dropped,
//! mismatched answer).

use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::net::UdpSocket;
use tokio::runtime::{Handle, Id};

use super::server::accept;
use super::{ExchangeError, Exchanged};
use crate::dns::{self, Key};
use crate::metrics::UpstreamMetrics;

/// Idle sockets kept per upstream: above the queries a busy instance has
/// in flight to one upstream (100 at a time under the benchmarks' load),
/// so that sockets are not closed and opened again as that number moves
/// (with 64, one query in thirteen opened a socket under that load).
/// Idle sockets are emptied before use, so how many there are tells an
/// attacker nothing: the ports that matter are those of the queries in
/// flight, as with a socket per query.
pub const POOL: usize = 256;
/// Datagrams read and thrown away from an idle socket before its next
/// query; one that has more is closed.
pub const DRAIN_MAX: usize = 16;
/// Queries a socket sends before it is closed and replaced.
pub const RETIRE_AFTER: u32 = 1000;

struct Pooled {
    sock: UdpSocket,
    /// The runtime whose event loop the socket is registered with.
    rt: Option<Id>,
    /// The receive buffer, kept with the socket for its next query.
    buf: Vec<u8>,
    uses: u32,
}

/// The idle sockets, one list per runtime that has any.
#[derive(Default)]
struct Idle {
    by_rt: Vec<(Option<Id>, Vec<Pooled>)>,
}

impl Idle {
    /// How many are idle (a few lists: one per runtime).
    fn len(&self) -> usize {
        self.by_rt.iter().map(|(_, list)| list.len()).sum()
    }

    /// Takes out an idle socket of runtime `rt`, chosen at random.
    fn take(&mut self, rt: Option<Id>) -> Option<Pooled> {
        let k = self.by_rt.iter().position(|(r, _)| *r == rt)?;
        Some(self.take_from(k, |n| rand::random_range(0..n)))
    }

    /// Takes out the socket `pick(len)` of list `k`, and the list once
    /// empty.
    fn take_from(&mut self, k: usize, pick: impl FnOnce(usize) -> usize) -> Pooled {
        let list = &mut self.by_rt[k].1;
        let p = list.swap_remove(pick(list.len()));
        if list.is_empty() {
            self.by_rt.swap_remove(k);
        }
        p
    }

    /// Keeps `p` if fewer than [`POOL`] are idle, else in place of an idle
    /// socket of another runtime if there is one. Returns the socket left
    /// out (to be closed once the lock is released).
    fn put(&mut self, p: Pooled) -> Option<Pooled> {
        let out = if self.len() < POOL {
            None
        } else {
            let Some(k) = self.by_rt.iter().position(|(r, _)| *r != p.rt) else {
                return Some(p);
            };
            Some(self.take_from(k, |n| n - 1))
        };
        match self.by_rt.iter_mut().find(|(r, _)| *r == p.rt) {
            Some((_, list)) => list.push(p),
            None => self.by_rt.push((p.rt, vec![p])),
        }
        out
    }
}

pub struct UdpPool {
    addr: SocketAddr,
    buf_len: usize,
    idle: Mutex<Idle>,
}

/// A socket taken from the pool for one query; it goes back when dropped
/// if [`Taken::keep`] was called and it has not served its turn, else it
/// closes.
pub struct Taken<'a> {
    pool: &'a UdpPool,
    sock: Option<Pooled>,
    keep: bool,
    /// Datagrams found on idle sockets when this one was taken, thrown
    /// away.
    drained: usize,
}

impl Taken<'_> {
    /// The socket and its receive buffer (one byte longer than the largest
    /// answer accepted, to see a larger one).
    pub fn parts(&mut self) -> Option<(&UdpSocket, &mut [u8])> {
        self.sock.as_mut().map(|p| (&p.sock, &mut p.buf[..]))
    }

    /// Puts the socket back when dropped: its query got its answer.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Datagrams that had reached idle sockets before this query, thrown
    /// away when it took one.
    pub fn drained(&self) -> usize {
        self.drained
    }
}

/// Empties an idle socket: false if it still had more after
/// [`DRAIN_MAX`] datagrams (or could not be read), and is to be closed.
fn drain(p: &mut Pooled, drained: &mut usize) -> bool {
    for _ in 0..DRAIN_MAX {
        match p.sock.try_recv(&mut p.buf) {
            Ok(_) => *drained += 1,
            Err(e) => return e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
    false
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.sock.take() {
            if self.keep && p.uses < RETIRE_AFTER {
                // One put out of the pool closes once the lock is released.
                let _closed = self.pool.idle.lock().ok().and_then(|mut i| i.put(p));
            }
        }
    }
}

impl UdpPool {
    /// `buf_len`: one byte more than the largest answer accepted.
    pub fn new(addr: SocketAddr, buf_len: usize) -> UdpPool {
        UdpPool {
            addr,
            buf_len,
            idle: Mutex::default(),
        }
    }

    /// A socket for one query: an idle one of this runtime chosen at
    /// random and emptied, else a new one on a random port.
    pub async fn take(&self) -> std::io::Result<Taken<'_>> {
        let rt = Handle::try_current().ok().map(|h| h.id());
        let mut drained = 0;
        let pooled = loop {
            let Some(mut p) = self.idle.lock().ok().and_then(|mut idle| idle.take(rt)) else {
                break None;
            };
            if drain(&mut p, &mut drained) {
                break Some(p);
            }
            // That one closes here, and the next is tried.
        };
        let mut p = match pooled {
            Some(p) => p,
            None => {
                let bind: SocketAddr = if self.addr.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let sock = UdpSocket::bind(bind).await?;
                sock.connect(self.addr).await?;
                Pooled {
                    sock,
                    rt,
                    buf: vec![0; self.buf_len],
                    uses: 0,
                }
            }
        };
        p.uses += 1;
        Ok(Taken {
            pool: self,
            sock: Some(p),
            keep: false,
            drained,
        })
    }
}

/// One query over UDP from the pool with a random ID. Answers
/// that do not match are dropped and the wait goes on; a truncated answer,
/// or one larger than the payload size we advertised, means TCP.
pub(super) async fn udp_exchange(
    pool: &UdpPool,
    addr: SocketAddr,
    key: &Key,
    metrics: &UpstreamMetrics,
) -> Result<Exchanged, ExchangeError> {
    let mut taken = pool.take().await?;
    for _ in 0..taken.drained() {
        metrics.dropped();
    }
    let r = udp_query(&mut taken, addr, key, metrics).await;
    if r.is_ok() {
        // Its answer is taken: nothing more can arrive for this query.
        taken.keep();
    }
    r
}

async fn udp_query(
    taken: &mut Taken<'_>,
    addr: SocketAddr,
    key: &Key,
    metrics: &UpstreamMetrics,
) -> Result<Exchanged, ExchangeError> {
    let (sock, buf) = taken.parts().ok_or(ExchangeError::Closed)?;
    let id: u16 = rand::random();
    sock.send(&dns::upstream_query(id, key)).await?;
    let limit = if key.flags().edns() {
        usize::from(dns::EDNS_PAYLOAD)
    } else {
        512
    };
    loop {
        let n = sock.recv(buf).await?;
        if n > limit {
            metrics.dropped();
            tracing::debug!(upstream = %addr, "answer larger than advertised: retrying over TCP");
            return Ok(Exchanged::Truncated);
        }
        match accept(&buf[..n], id, key) {
            Ok((_, info)) if info.truncated => return Ok(Exchanged::Truncated),
            Ok(a) => return Ok(Exchanged::Answer(a)),
            Err(e) => {
                metrics.dropped();
                tracing::debug!(upstream = %addr, error = %e, "dropped an answer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn upstream() -> (UdpSocket, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let a = s.local_addr().expect("addr");
        (s, a)
    }

    #[tokio::test]
    async fn a_socket_is_reused_and_answers_reach_it() {
        let (up, addr) = upstream().await;
        let pool = UdpPool::new(addr, 513);
        let first = {
            let mut t = pool.take().await.expect("take");
            let (sock, _) = t.parts().expect("socket");
            sock.send(b"one").await.expect("send");
            let addr = sock.local_addr().expect("addr");
            t.keep();
            addr
        };
        let mut buf = [0u8; 16];
        let (n, from) = up.recv_from(&mut buf).await.expect("recv");
        assert_eq!((&buf[..n], from), (&b"one"[..], first));
        // Put back and taken again: the same port, still connected.
        let mut t = pool.take().await.expect("take");
        let (sock, rbuf) = t.parts().expect("socket");
        assert_eq!(sock.local_addr().expect("addr"), first);
        assert_eq!(rbuf.len(), 513);
        up.send_to(b"answer", first).await.expect("send");
        let n = sock.recv(rbuf).await.expect("recv");
        assert_eq!(&rbuf[..n], b"answer");
    }

    #[tokio::test]
    async fn a_datagram_from_another_port_never_arrives() {
        let (up, addr) = upstream().await;
        let (forger, _) = upstream().await;
        let pool = UdpPool::new(addr, 513);
        let mut t = pool.take().await.expect("take");
        let (sock, rbuf) = t.parts().expect("socket");
        let port = sock.local_addr().expect("addr");
        // On loopback a datagram is queued (or dropped) before send_to
        // returns: the forged one would be read first.
        forger.send_to(b"forged", port).await.expect("send");
        up.send_to(b"real", port).await.expect("send");
        let n = sock.recv(rbuf).await.expect("recv");
        assert_eq!(
            &rbuf[..n],
            b"real",
            "a datagram from another address was received"
        );
    }

    #[test]
    fn a_query_takes_a_socket_of_its_own_event_loop() {
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        let (one, two) = (rt(), rt());
        let addr = one.block_on(async {
            let (up, addr) = upstream().await;
            drop(up);
            addr
        });
        let pool = UdpPool::new(addr, 513);
        let port = |t: &mut Taken<'_>| {
            t.keep();
            t.parts().expect("socket").0.local_addr().expect("addr")
        };
        let ports = |rt: &tokio::runtime::Runtime, n: usize| -> Vec<SocketAddr> {
            rt.block_on(async {
                let mut ts = Vec::new();
                for _ in 0..n {
                    ts.push(pool.take().await.expect("take"));
                }
                ts.iter_mut().map(port).collect()
            })
        };
        // Three sockets of the first runtime's loop, idle: the second
        // runtime's query opens its own all the same.
        let firsts = ports(&one, 3);
        let second = ports(&two, 1)[0];
        assert!(!firsts.contains(&second));
        // From then on each takes its own, whatever else is idle.
        for _ in 0..20 {
            assert_eq!(ports(&two, 1), [second]);
            assert!(firsts.contains(&ports(&one, 1)[0]));
        }
        let mut again = ports(&one, 3);
        again.sort();
        let mut firsts = firsts;
        firsts.sort();
        assert_eq!(again, firsts);
        // A full pool: a socket coming back replaces one of another loop.
        let many = ports(&two, POOL);
        let idle = pool.idle.lock().expect("lock");
        assert_eq!(idle.len(), POOL);
        assert_eq!(idle.by_rt.len(), 1);
        assert_eq!(idle.by_rt[0].0, Some(two.handle().id()));
        let kept: Vec<SocketAddr> = idle.by_rt[0]
            .1
            .iter()
            .map(|p| p.sock.local_addr().expect("addr"))
            .collect();
        assert!(kept.iter().all(|a| many.contains(a) || *a == second));
    }

    #[tokio::test]
    async fn sockets_are_retired_and_the_idle_ones_bounded() {
        let (_up, addr) = upstream().await;
        let pool = UdpPool::new(addr, 513);
        // Each query answered: its socket is kept.
        let port = |t: &mut Taken<'_>| {
            t.keep();
            t.parts().expect("socket").0.local_addr().expect("addr")
        };
        let mut t = pool.take().await.expect("take");
        let first = port(&mut t);
        drop(t);
        for _ in 1..RETIRE_AFTER {
            let mut t = pool.take().await.expect("take");
            assert_eq!(port(&mut t), first);
        }
        // Its 1,000th query was its last.
        let mut t = pool.take().await.expect("take");
        assert_ne!(port(&mut t), first);
        drop(t);
        // More queries at once than POOL: only POOL sockets stay.
        let mut many = Vec::new();
        for _ in 0..POOL + 10 {
            let mut t = pool.take().await.expect("take");
            t.keep();
            many.push(t);
        }
        drop(many);
        assert_eq!(pool.idle.lock().expect("lock").len(), POOL);
        // A query that got no answer (failed, timed out, abandoned): its
        // socket is not put back, a late answer can meet nobody.
        let t = pool.take().await.expect("take");
        drop(t);
        assert_eq!(pool.idle.lock().expect("lock").len(), POOL - 1);
    }

    /// An idle socket of the pool with `n` datagrams queued on it from the
    /// upstream's own address (so that the connected socket takes them),
    /// once the event loop has seen them arrive: its address.
    async fn queued_on_idle(pool: &UdpPool, up: &UdpSocket, n: usize) -> SocketAddr {
        let port = {
            let mut t = pool.take().await.expect("take");
            t.keep();
            t.parts().expect("socket").0.local_addr().expect("addr")
        };
        for i in 0..n {
            up.send_to(&[b'f', i as u8], port).await.expect("send");
        }
        let rt = Handle::current().id();
        let p = {
            let mut idle = pool.idle.lock().expect("lock");
            let list = &mut idle
                .by_rt
                .iter_mut()
                .find(|(r, _)| *r == Some(rt))
                .expect("list")
                .1;
            let k = list
                .iter()
                .position(|p| p.sock.local_addr().ok() == Some(port))
                .expect("idle");
            list.swap_remove(k)
        };
        p.sock.readable().await.expect("readable");
        let _none = pool.idle.lock().expect("lock").put(p);
        port
    }

    #[tokio::test]
    async fn what_reached_an_idle_socket_never_meets_its_next_query() {
        let (up, addr) = upstream().await;
        let pool = UdpPool::new(addr, 513);
        // Forgeries queued in advance, before any query is asked.
        let port = queued_on_idle(&pool, &up, 3).await;
        let mut t = pool.take().await.expect("take");
        assert_eq!(t.drained(), 3);
        let (sock, rbuf) = t.parts().expect("socket");
        assert_eq!(
            sock.local_addr().expect("addr"),
            port,
            "the same socket, emptied"
        );
        up.send_to(b"real", port).await.expect("send");
        let n = sock.recv(rbuf).await.expect("recv");
        assert_eq!(&rbuf[..n], b"real", "a datagram queued while idle was read");
    }

    #[tokio::test]
    async fn an_idle_socket_someone_keeps_sending_to_is_closed() {
        let (up, addr) = upstream().await;
        let pool = UdpPool::new(addr, 513);
        let port = queued_on_idle(&pool, &up, DRAIN_MAX + 4).await;
        let mut t = pool.take().await.expect("take");
        assert_eq!(t.drained(), DRAIN_MAX);
        let (sock, _) = t.parts().expect("socket");
        assert_ne!(
            sock.local_addr().expect("addr"),
            port,
            "the flooded socket was used"
        );
        assert_eq!(
            pool.idle.lock().expect("lock").len(),
            0,
            "the flooded socket was kept"
        );
    }
}
