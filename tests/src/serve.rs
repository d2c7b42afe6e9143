//! What every in-process test server shares: serving an axum router on a listener in a background
//! task until it is stopped or dropped, and the base URL to reach it.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A router served in the background; dropping it stops the server (without waiting).
#[derive(Debug)]
pub struct Served {
    /// The address it listens on.
    pub addr: SocketAddr,
    name: &'static str,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Served {
    /// Serves `router` on `listener` in a background task; `name` labels its log lines.
    ///
    /// Fails when the listener has no local address.
    pub fn start(name: &'static str, listener: TcpListener, router: axum::Router) -> anyhow::Result<Self> {
        let addr = listener.local_addr().context("listener has no local address")?;
        let shutdown = CancellationToken::new();
        let stopped = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, router).with_graceful_shutdown(stopped);
            if let Err(error) = server.await {
                tracing::error!(error = %error, "{name} stopped with an error");
            }
        });
        Ok(Self { addr, name, shutdown, task: Some(task) })
    }

    /// `http://IP:PORT`, with a wildcard bind address replaced by 127.0.0.1.
    pub fn base_url(&self) -> String {
        base_url(self.addr)
    }

    /// Stops accepting connections and waits for in-flight requests to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(error = %error, "{} task ended abnormally", self.name);
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `http://IP:PORT` for `addr`, reachable from this host.
pub fn base_url(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_is_reachable() {
        assert_eq!(base_url("0.0.0.0:8090".parse().expect("addr")), "http://127.0.0.1:8090");
        assert_eq!(base_url("127.0.0.1:1".parse().expect("addr")), "http://127.0.0.1:1");
    }

    #[tokio::test]
    async fn serves_until_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let served = Served::start("test server", listener, router).expect("start");
        let url = served.base_url();
        let body = reqwest::get(&url).await.expect("get").text().await.expect("body");
        assert_eq!(body, "hi");
        served.stop().await;
        assert!(reqwest::get(&url).await.is_err(), "stopped: connections are refused");
    }
}
