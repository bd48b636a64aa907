//! The node's edges: HTTP/JSON with the OpenAPI document, the binary protocol, the admin
//! console, and the bearer-token gate in front of all three. JSON lives here (and in the
//! versioned codecs of the wire); everything behind calls the router with typed values.

pub mod auth;
pub mod binary;
pub mod http;
pub mod origin;
pub mod ui;

use crate::obs::metrics::Metrics;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// By default one client address may hold at most this share of a listener's connections
/// at once (a quarter): a single address that opens and holds connections cannot lock
/// others out (`connections_per_address` sets it; 0 turns it off).
const ADDRESS_SHARE_DIVISOR: usize = 4;

/// The connections one address may hold on a listener of `connections_max`: `setting`
/// (0: no limit of its own), else a quarter of the listener's.
pub fn per_address_max(setting: Option<usize>, connections_max: usize) -> usize {
    match setting {
        Some(0) => usize::MAX,
        Some(max) => max,
        None => (connections_max / ADDRESS_SHARE_DIVISOR).max(1),
    }
}

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
    per_address: Arc<AddressCounts>,
    /// Written (best effort) to a connection refused for its address before it is closed.
    refusal: Vec<u8>,
    shards: Vec<tokio::runtime::Handle>,
    next_shard: usize,
}

/// A served connection's places: one of the listener's, one of its address's; both given
/// back when it is dropped.
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    _address: AddressSlot,
}

/// Open connections per client address (only addresses with one: at most the listener's cap).
struct AddressCounts {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

struct AddressSlot {
    counts: Arc<AddressCounts>,
    address: IpAddr,
}

impl AddressCounts {
    /// A place for one more connection of `address`, unless it holds `max` already.
    fn take(counts: &Arc<AddressCounts>, address: IpAddr) -> Option<AddressSlot> {
        let mut open = counts.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let held = open.entry(address).or_insert(0);
        if *held >= counts.max {
            return None;
        }
        *held += 1;
        Some(AddressSlot { counts: counts.clone(), address })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(held) = open.get_mut(&self.address) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                open.remove(&self.address);
            }
        }
    }
}

impl Acceptor {
    /// `refusal`: what a connection refused because its address holds its share already
    /// is sent before it is closed (the protocol's own "too many" answer).
    pub fn new(
        listener: tokio::net::TcpListener,
        name: &'static str,
        (connections_max, per_address_max): (usize, usize),
        shards: Vec<tokio::runtime::Handle>,
        refusal: Vec<u8>,
    ) -> Acceptor {
        let connections = Arc::new(Semaphore::new(connections_max.max(1)));
        let per_address = Arc::new(AddressCounts { open: Mutex::new(HashMap::new()), max: per_address_max.max(1) });
        Acceptor { listener, name, connections, per_address, refusal, shards, next_shard: 0 }
    }

    /// The next connection, once there is room for it under the cap (at the cap, new
    /// connections wait in the kernel's backlog); its slot is held while it is served. A
    /// connection from an address that holds its share already is refused (counted in
    /// `sundial_connections_refused_total`) and closed. An error says why the listener is done.
    pub async fn next(&self, metrics: &Metrics) -> Result<(ConnectionSlot, tokio::net::TcpStream), String> {
        let permit = self
            .connections
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "its connection limit was closed".to_string())?;
        // Bounded by the listener: each turn accepts one connection or returns.
        loop {
            let stream = accept(&self.listener, self.name, metrics).await.map_err(|error| error.to_string())?;
            let address = client_address(stream.peer_addr());
            let Some(address_slot) = AddressCounts::take(&self.per_address, address) else {
                metrics.connection_refused(self.name, "per_address");
                // Best effort: a socket just accepted has room for a short answer.
                let _ = stream.try_write(&self.refusal);
                continue;
            };
            let _ = stream.set_nodelay(true);
            return Ok((ConnectionSlot { _permit: permit, _address: address_slot }, stream));
        }
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
