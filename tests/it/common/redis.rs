//! A redis-server on loopback, and proxy instances sharing it.

use super::*;

/// A redis-server on a loopback port, no persistence.
pub struct Redis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
        };
        r.restart().await;
        r
    }

    pub async fn restart(&mut self) {
        need("redis-server", "redis-server");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server)");
        self.child = Some(child);
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("redis-server did not start");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An instance of the proxy sharing its state through Redis at `url`.
pub async fn instance(
    up: SocketAddr,
    url: &str,
    tweak: impl FnOnce(&mut doh_proxy::config::Config),
) -> doh_proxy::app::Running {
    let url = url.to_string();
    proxy(&[up], move |c| {
        c.redis = Some(url);
        tweak(c);
    })
    .await
}

/// Two instances sharing `redis`, both connected.
pub async fn pair(
    up: SocketAddr,
    redis: &Redis,
    tweak: impl Fn(&mut doh_proxy::config::Config) + Clone + Send + 'static,
) -> (doh_proxy::app::Running, doh_proxy::app::Running) {
    let a = instance(up, &redis.url(), tweak.clone()).await;
    let b = instance(up, &redis.url(), tweak).await;
    wait_for(
        "both connected",
        async || metric(&a, "doh_redis_up").await == 1.0 && metric(&b, "doh_redis_up").await == 1.0,
        Duration::from_secs(5),
    )
    .await;
    (a, b)
}
