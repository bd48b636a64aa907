//! The node's edges: HTTP/JSON with the OpenAPI document, the binary protocol, the admin
//! console, and the bearer-token gate in front of all three. JSON lives here (and in the
//! versioned codecs of the wire); everything behind calls the router with typed values.

pub mod auth;
pub mod binary;
pub mod http;
pub mod ui;

use crate::obs::metrics::Metrics;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A path's segments as routes read them: empty ones (doubled or trailing slashes) dropped.
pub fn path_segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|segment| !segment.is_empty()).collect()
}

/// The address a connection comes from, given its socket's `peer_addr()` (the unspecified
/// address when the socket cannot say: such connections then share one budget of guesses,
/// `auth::Gate::check_from`).
pub fn client_address(peer: std::io::Result<std::net::SocketAddr>) -> std::net::IpAddr {
    peer.map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |address| address.ip())
}

/// The first pause after a failed `accept`; it doubles up to `ACCEPT_BACKOFF_MS_MAX`.
const ACCEPT_BACKOFF_MS_MIN: u64 = 10;
const ACCEPT_BACKOFF_MS_MAX: u64 = 1_000;

/// Whether a failed `accept` says something about this moment (out of descriptors or memory,
/// a connection reset before it was taken) rather than about the listener: it is retried.
fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED | libc::EINTR)
    ) || matches!(error.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted)
}

/// The next connection of `listener` (named `name` in logs and metrics). Transient failures
/// are logged, counted (`sundial_accept_errors_total`) and retried after a back-off, so a
/// moment without file descriptors does not close the port for good; any other error is
/// returned, and the caller ends the node (a supervisor restarts it).
pub async fn accept(
    listener: &tokio::net::TcpListener,
    name: &'static str,
    metrics: &Metrics,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut backoff_ms = ACCEPT_BACKOFF_MS_MIN;
    // Bounded by the listener: every turn either accepts, fails for good, or waits.
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return Ok(stream),
            Err(error) if is_transient(&error) => {
                metrics.accept_error(name, &error);
                tracing::warn!(listener = name, %error, backoff_ms, "could not accept a connection; retrying");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(ACCEPT_BACKOFF_MS_MAX);
            }
            Err(error) => return Err(error),
        }
    }
}

/// A listener with its connection cap, spreading what it accepts over the shards' runtimes
/// (round robin) so that parsing and routing run on every core.
pub struct Acceptor {
    listener: tokio::net::TcpListener,
    name: &'static str,
    connections: Arc<Semaphore>,
    shards: Vec<tokio::runtime::Handle>,
    next_shard: usize,
}

impl Acceptor {
    pub fn new(
        listener: tokio::net::TcpListener,
        name: &'static str,
        connections_max: usize,
        shards: Vec<tokio::runtime::Handle>,
    ) -> Acceptor {
        let connections = Arc::new(Semaphore::new(connections_max.max(1)));
        Acceptor { listener, name, connections, shards, next_shard: 0 }
    }

    /// The next connection, once there is room for it under the cap (at the cap, new
    /// connections wait in the kernel's backlog); its permit is held while it is served.
    /// An error says why the listener is done.
    pub async fn next(&self, metrics: &Metrics) -> Result<(OwnedSemaphorePermit, tokio::net::TcpStream), String> {
        let permit = self
            .connections
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "its connection limit was closed".to_string())?;
        let stream = accept(&self.listener, self.name, metrics).await.map_err(|error| error.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok((permit, stream))
    }

    /// Serves `stream` with `serve` on the next shard's runtime. The stream is moved to that
    /// runtime's own reactor first: left registered with the accepting runtime, every read
    /// and write readiness would be relayed from that runtime's thread to the shard's, one
    /// wake-up of an idle thread more per request (measured: 2–7 % of a lone create's round
    /// trip, docs/BENCHMARKS.md).
    pub fn spawn<Serve, Served>(&mut self, stream: tokio::net::TcpStream, serve: Serve)
    where
        Serve: FnOnce(tokio::net::TcpStream) -> Served + Send + 'static,
        Served: Future<Output = ()> + Send + 'static,
    {
        let Some(shard) = self.shards.get(self.next_shard % self.shards.len().max(1)) else {
            drop(tokio::spawn(serve(stream)));
            return;
        };
        self.next_shard = self.next_shard.wrapping_add(1);
        let name = self.name;
        let detached = match stream.into_std() {
            Ok(detached) => detached,
            Err(error) => {
                tracing::warn!(listener = name, %error, "could not hand a connection to a shard; closing it");
                return;
            }
        };
        drop(shard.spawn(async move {
            match tokio::net::TcpStream::from_std(detached) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::warn!(listener = name, %error, "could not register a connection; closing it"),
            }
        }));
    }
}
