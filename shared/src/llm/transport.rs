//! The HTTP side of a model API: which HTTP version the client speaks, over how many connections,
//! and how a dead connection is noticed.
//!
//! Over HTTP/2 one connection carries every call in flight as a stream. A server caps the streams of
//! one connection (RFC 9113 asks for at least 100; many allow exactly that), and calls past the cap
//! wait for a stream to free up. One HTTP client keeps one HTTP/2 connection per host, so a process
//! that runs more calls at once than one connection carries holds several clients
//! ([`Connections`]) and takes them in turn: each adds one connection, and the streams spread
//! evenly over them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::types::LlmError;
use crate::config::HttpVersion;

/// The streams one HTTP/2 connection is counted on to carry at once: the least a server should
/// allow (RFC 9113, section 6.5.2).
pub const STREAMS_PER_CONNECTION: usize = 100;

/// The most HTTP/2 connections one client keeps to a model API, whatever the calls in flight.
pub const MAX_CONNECTIONS: usize = 256;

/// How often an HTTP/2 connection is pinged, idle or not: a connection that died without a word
/// (a dropped NAT entry, a vanished peer) is found by its missing answer, not by calls timing out.
const PING_INTERVAL: Duration = Duration::from_secs(20);

/// How long a ping may go unanswered before the connection is closed and its calls fail over.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP clients of one model API, taken in turn: one for HTTP/1.1 (its pool opens a
/// connection per call in flight), enough for the calls in flight otherwise (see the module docs).
#[derive(Clone)]
pub(crate) struct Connections {
    clients: Arc<[reqwest::Client]>,
    next: Arc<AtomicUsize>,
}

impl Connections {
    /// Clients speaking `version`, enough for `calls_in_flight` calls at once, each call bounded by
    /// `timeout_ms` in all.
    pub(crate) fn new(version: HttpVersion, timeout_ms: u64, calls_in_flight: usize) -> Result<Self, LlmError> {
        let count = match version {
            HttpVersion::Http1 => 1,
            HttpVersion::Auto | HttpVersion::Http2 => {
                calls_in_flight.div_ceil(STREAMS_PER_CONNECTION).clamp(1, MAX_CONNECTIONS)
            }
        };
        let clients: Vec<reqwest::Client> =
            (0..count).map(|_| client(version, timeout_ms)).collect::<Result<_, _>>()?;
        Ok(Self { clients: clients.into(), next: Arc::default() })
    }

    /// The next client in turn.
    pub(crate) fn next(&self) -> &reqwest::Client {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        &self.clients[turn % self.clients.len()]
    }

    /// How many clients (HTTP/2 connections per host) there are.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.clients.len()
    }
}

/// One HTTP client: a whole-call timeout of `timeout_ms`, 10 s to connect, enough idle HTTP/1.1
/// connections kept for the calls in flight, HTTP/2 flow-control windows that grow with the
/// traffic (a long reply is not throttled by the 64 KiB default), and pings that find a dead
/// connection.
fn client(version: HttpVersion, timeout_ms: u64) -> Result<reqwest::Client, LlmError> {
    let builder = reqwest::Client::builder()
        .timeout(Duration::from_millis(timeout_ms))
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(256)
        .tcp_keepalive(PING_INTERVAL)
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true);
    let builder = match version {
        HttpVersion::Auto => builder,
        HttpVersion::Http1 => builder.http1_only(),
        HttpVersion::Http2 => builder.http2_prior_knowledge(),
    };
    builder.build().map_err(|e| LlmError::Request(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_follow_the_calls_in_flight_over_http2_only() {
        let count = |version, calls| Connections::new(version, 1_000, calls).expect("builds").count();
        assert_eq!(count(HttpVersion::Http2, 0), 1);
        assert_eq!(count(HttpVersion::Http2, 64), 1);
        assert_eq!(count(HttpVersion::Http2, 101), 2);
        assert_eq!(count(HttpVersion::Auto, 1_000), 10);
        assert_eq!(count(HttpVersion::Http2, 65_535), MAX_CONNECTIONS);
        assert_eq!(count(HttpVersion::Http1, 1_000), 1, "HTTP/1.1 pools open a connection per call anyway");
    }

    #[test]
    fn clients_are_taken_in_turn() {
        let connections = Connections::new(HttpVersion::Http2, 1_000, 300).expect("builds");
        let turns: Vec<&reqwest::Client> = (0..4).map(|_| connections.next()).collect();
        let same = |a: usize, b: usize| std::ptr::eq(turns[a], turns[b]);
        assert!(!same(0, 1) && !same(1, 2) && !same(0, 2), "three clients, one after the other");
        assert!(same(0, 3), "then the first again");
    }
}
