//! DNS over TCP and over TLS to one upstream, pipelined (RFC 7766, RFC
//! 7858): a few connections kept open and reused, many queries in flight
//! on each, answers matched by ID (and then by question) in whatever order
//! they come. A connection idle for a while is closed; one that fails is
//! reopened with backoff; a connection that dies fails the queries on it
//! at once, so that they can be tried again within the deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::server::{accept, Backoff};
use super::{ExchangeError, Exchanged};
use crate::dns::{self, Key};
use crate::metrics::UpstreamMetrics;

/// Connections kept to one upstream at most.
const MAX_CONNS: usize = 4;
/// Queries in flight on one connection at most.
const MAX_INFLIGHT: usize = 128;
/// A connection with nothing in flight this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// Time to open a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

struct Conn {
    writer: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>,
    closed: AtomicBool,
}

impl Conn {
    fn inflight(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(usize::MAX)
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && !self.writer.is_closed()
    }
}

/// Removes a query's slot when its exchange ends, however it ends.
struct Slot<'a>(&'a Conn, u16);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.0.pending.lock() {
            p.remove(&self.1);
        }
    }
}

pub struct StreamPool {
    addr: SocketAddr,
    label: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    conns: Mutex<Vec<Arc<Conn>>>,
    connecting: tokio::sync::Mutex<()>,
    backoff: Backoff,
    metrics: UpstreamMetrics,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl StreamPool {
    pub fn new(
        addr: SocketAddr,
        label: String,
        tls: Option<(TlsConnector, ServerName<'static>)>,
        metrics: UpstreamMetrics,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> StreamPool {
        StreamPool {
            addr,
            label,
            tls,
            conns: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            backoff: Backoff::default(),
            metrics,
            tasks,
            shutdown,
        }
    }

    /// Open connections (for tests and logs).
    pub fn open_connections(&self) -> usize {
        self.conns
            .lock()
            .map(|c| c.iter().filter(|c| c.usable()).count())
            .unwrap_or(0)
    }

    /// A connection with room for one more query, opening one if needed.
    async fn conn(&self) -> Result<Arc<Conn>, ExchangeError> {
        if let Some(c) = self.pick(false) {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        // Someone else may have opened one meanwhile.
        if let Some(c) = self.pick(false) {
            return Ok(c);
        }
        if self.open_connections() >= MAX_CONNS {
            return self.pick(true).ok_or(ExchangeError::Busy);
        }
        self.backoff.check()?;
        match tokio::time::timeout(CONNECT_TIMEOUT, self.open()).await {
            Ok(Ok(c)) => {
                self.backoff.succeeded(&self.label);
                Ok(c)
            }
            Ok(Err(e)) => {
                self.backoff.failed(&self.label, &e);
                Err(ExchangeError::Connect(e.to_string()))
            }
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                self.backoff.failed(&self.label, &e);
                Err(ExchangeError::Connect(e.to_string()))
            }
        }
    }

    /// The usable connection with the fewest queries in flight, if it has
    /// room (or, with `any`, whatever its load).
    fn pick(&self, any: bool) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().ok()?;
        conns.retain(|c| c.usable());
        conns
            .iter()
            .min_by_key(|c| c.inflight())
            .filter(|c| any || c.inflight() < MAX_INFLIGHT)
            .cloned()
    }

    async fn open(&self) -> std::io::Result<Arc<Conn>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let (tx, rx) = mpsc::channel(MAX_INFLIGHT);
        let conn = Arc::new(Conn {
            writer: tx,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await?;
                self.tasks
                    .spawn(drive(tls, rx, conn.clone(), self.shutdown.clone()));
            }
            None => {
                self.tasks
                    .spawn(drive(tcp, rx, conn.clone(), self.shutdown.clone()));
            }
        }
        self.metrics.connections.inc();
        if let Ok(mut conns) = self.conns.lock() {
            conns.push(conn.clone());
        }
        Ok(conn)
    }

    /// One query and its answer on a pooled connection.
    pub async fn exchange(&self, key: &Key) -> Result<Exchanged, ExchangeError> {
        let conn = self.conn().await?;
        let (id, rx) = {
            let mut pending = conn.pending.lock().map_err(|_| ExchangeError::Closed)?;
            if pending.len() >= MAX_INFLIGHT * 2 {
                return Err(ExchangeError::Busy);
            }
            let mut id: u16 = rand::random();
            while pending.contains_key(&id) {
                id = rand::random();
            }
            let (tx, rx) = oneshot::channel();
            pending.insert(id, tx);
            (id, rx)
        };
        let _slot = Slot(&conn, id);
        let q = dns::upstream_query(id, key);
        let mut frame = Vec::with_capacity(q.len() + 2);
        frame.extend_from_slice(&(q.len() as u16).to_be_bytes());
        frame.extend_from_slice(&q);
        conn.writer
            .try_send(frame)
            .map_err(|_| ExchangeError::Closed)?;
        let wire = rx.await.map_err(|_| ExchangeError::Closed)?;
        accept(&wire, id, key).map(Exchanged::Answer).map_err(|e| {
            self.metrics.dropped();
            ExchangeError::Answer(e)
        })
    }
}

/// Runs one connection: writes queued queries, hands each answer to the
/// query of its ID, and closes when idle, broken or shut down.
async fn drive<S>(
    stream: S,
    mut queue: mpsc::Receiver<Vec<u8>>,
    conn: Arc<Conn>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let reader = read_answers(r, &conn);
    let writer = write_queries(w, &mut queue, &conn);
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
        _ = shutdown.cancelled() => {}
    }
    conn.closed.store(true, Ordering::Relaxed);
    if let Ok(mut p) = conn.pending.lock() {
        // Dropping the senders fails every query still waiting.
        p.clear();
    }
}

async fn read_answers<R: AsyncRead>(r: R, conn: &Conn) -> std::io::Result<()> {
    tokio::pin!(r);
    loop {
        let len = r.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).await?;
        if buf.len() < 2 {
            continue;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let waiter = conn.pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some(tx) = waiter {
            let _ = tx.send(buf);
        }
    }
}

async fn write_queries<W: AsyncWrite>(
    w: W,
    queue: &mut mpsc::Receiver<Vec<u8>>,
    conn: &Conn,
) -> std::io::Result<()> {
    tokio::pin!(w);
    let mut last = Instant::now();
    loop {
        match tokio::time::timeout(IDLE, queue.recv()).await {
            Ok(Some(frame)) => {
                w.write_all(&frame).await?;
                // Pipelining: everything queued goes out in one flush.
                while let Ok(more) = queue.try_recv() {
                    w.write_all(&more).await?;
                }
                w.flush().await?;
                last = Instant::now();
            }
            Ok(None) => return Ok(()),
            Err(_) if conn.inflight() == 0 && last.elapsed() >= IDLE => return Ok(()),
            Err(_) => {}
        }
    }
}
