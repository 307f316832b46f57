//! Connection workers: the threads TCP connections live on.
//!
//! Each worker is a thread with a runtime of its own (single-threaded), and
//! accepts on every TCP listener itself, through a duplicate of the
//! listening socket registered in its own event loop. A connection — its
//! TLS, its HTTP/2 streams, the task hyper spawns for each request — stays
//! on the thread that accepted it, so no wake-up crosses threads and the
//! connection's locks are never contended: on cache hits over HTTP/2 that
//! is about a fifth less CPU than on a work-stealing runtime. Whichever worker
//! is waiting in its event loop wakes and takes the next connection, so a
//! busy worker does not hold new clients back.
//!
//! Everything else (HTTP/3, the admin listener, housekeeping, Redis) runs
//! on the main runtime.

use std::future::Future;
use std::io;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The running workers; dropping them ends their threads, and with them
/// whatever still runs there. The threads are not joined: a worker ends
/// once its runtime has dropped what it still held, which may take a
/// moment and must not block the caller's runtime.
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// One worker per available core.
    pub fn per_core() -> io::Result<Workers> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Workers::start(n.clamp(1, 64))
    }

    pub fn start(n: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("doh-conn-{i}"))
                .spawn(move || {
                    // Counters written here go to a line of this worker's own.
                    crate::metrics::count_on(i);
                    rt.block_on(stop.cancelled())
                })?;
        }
        Ok(Workers { handles, stop })
    }

    /// Gives every worker its own duplicate of `listener` and runs there
    /// the accept loop `serve` makes of it, tracked by `tasks`.
    pub fn accept_on<F, Fut>(
        &self,
        listener: std::net::TcpListener,
        tasks: &TaskTracker,
        mut serve: F,
    ) -> io::Result<()>
    where
        F: FnMut(std::net::TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let copies = self
            .handles
            .iter()
            .map(|_| listener.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        for (copy, h) in copies.into_iter().zip(&self.handles) {
            tasks.spawn_on(serve(copy), h);
        }
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    /// Connections to one listener are accepted on every worker thread,
    /// each worker on its own duplicate of the socket.
    #[test]
    fn every_worker_accepts_on_the_listener() {
        let workers = Workers::start(2).unwrap();
        let tasks = TaskTracker::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let seen = Arc::new(Mutex::new(HashSet::new()));
        workers
            .accept_on(listener, &tasks, |l| {
                let (seen, stop) = (seen.clone(), stop.clone());
                async move {
                    let l = tokio::net::TcpListener::from_std(l).unwrap();
                    loop {
                        tokio::select! {
                            r = l.accept() => {
                                let (_s, _) = r.unwrap();
                                let me = std::thread::current().name().map(str::to_string);
                                seen.lock().unwrap().insert(me);
                                // Stay busy so that the other worker
                                // takes the next connections.
                                std::thread::sleep(std::time::Duration::from_millis(50));
                            }
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            })
            .unwrap();
        let mut open = Vec::new();
        let t = std::time::Instant::now();
        while seen.lock().unwrap().len() < 2 && t.elapsed().as_secs() < 10 {
            open.push(std::net::TcpStream::connect(addr).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        stop.cancel();
        tasks.close();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(tasks.wait());
        let seen = seen.lock().unwrap();
        assert!(seen.contains(&Some("doh-conn-0".to_string())), "{seen:?}");
        assert!(seen.contains(&Some("doh-conn-1".to_string())), "{seen:?}");
    }
}
