//! What every in-process test server shares: serving an axum router on a listener in a background
//! task until it is stopped or dropped, the base URL to reach it, and a count of its connections.
//!
//! A server speaks HTTP/1.1 and HTTP/2 alike: HTTP/2 without TLS (`h2c`) to a client that starts
//! with it (prior knowledge), as the fleet's model client does with `http = "http2"`. The count of
//! connections shows how many a client's calls actually used.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A router served in the background; dropping it stops the server (without waiting).
#[derive(Debug)]
pub struct Served {
    /// The address it listens on.
    pub addr: SocketAddr,
    name: &'static str,
    connections: Arc<Connections>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Served {
    /// Serves `router` on `listener` in a background task; `name` labels its log lines.
    ///
    /// Fails when the listener has no local address.
    pub fn start(name: &'static str, listener: TcpListener, router: axum::Router) -> anyhow::Result<Self> {
        Self::start_counting(name, listener, router, Arc::default())
    }

    /// As [`Served::start`], counting the connections into `connections` (which the router's
    /// handlers may read too).
    pub fn start_counting(
        name: &'static str,
        listener: TcpListener,
        router: axum::Router,
        connections: Arc<Connections>,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr().context("listener has no local address")?;
        let listener = CountingListener { listener, connections: Arc::clone(&connections) };
        let shutdown = CancellationToken::new();
        let stopped = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, router).with_graceful_shutdown(stopped);
            if let Err(error) = server.await {
                tracing::error!(error = %error, "{name} stopped with an error");
            }
        });
        Ok(Self { addr, name, connections, shutdown, task: Some(task) })
    }

    /// The connections accepted so far, and how many are open.
    pub fn connections(&self) -> ConnectionStats {
        self.connections.snapshot()
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

/// The connections of a server, counted as they are accepted and closed.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicU64,
    accepted: AtomicU64,
}

impl Connections {
    /// The counts now.
    pub fn snapshot(&self) -> ConnectionStats {
        ConnectionStats { open: self.open.load(Ordering::Relaxed), accepted: self.accepted.load(Ordering::Relaxed) }
    }

    fn opened(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A server's connections at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStats {
    /// Open now.
    pub open: u64,
    /// Accepted since the server started.
    pub accepted: u64,
}

/// A TCP listener whose connections are counted: accepted, and open until the server drops them.
struct CountingListener {
    listener: TcpListener,
    connections: Arc<Connections>,
}

impl axum::serve::Listener for CountingListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CountedStream, SocketAddr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        self.connections.opened();
        (CountedStream { stream, connections: Arc::clone(&self.connections) }, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection; counted closed when the server drops it.
struct CountedStream {
    stream: TcpStream,
    connections: Arc<Connections>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.connections.closed();
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
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
        assert_eq!(served.connections().accepted, 1);
        served.stop().await;
        assert!(reqwest::get(&url).await.is_err(), "stopped: connections are refused");
    }

    #[tokio::test]
    async fn speaks_http2_without_tls_and_counts_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let served = Served::start("test server", listener, router).expect("start");
        let url = served.base_url();
        let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
        for response in futures::future::join_all((0..20).map(|_| h2.get(&url).send())).await {
            assert_eq!(response.expect("get").version(), reqwest::Version::HTTP_2);
        }
        assert_eq!(served.connections(), ConnectionStats { open: 1, accepted: 1 }, "one connection, 20 streams");
        let h1 = reqwest::Client::builder().http1_only().build().expect("client");
        let response = h1.get(&url).send().await.expect("get");
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
        drop((h1, h2, response));
        let closed = async {
            while served.connections().open > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), closed).await.expect("both closed");
        assert_eq!(served.connections().accepted, 2);
        served.stop().await;
    }
}
