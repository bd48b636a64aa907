//! Connections per host, capped: a connector around the client's that opens a connection to
//! a host only while fewer than the cap are open to it, so `per_host_concurrency` is the most
//! connections a node holds to one host (idle pooled ones included), and that notes connects
//! slow enough to mean the host's accept queue overflowed (a dropped SYN is sent again after
//! a second), a sign of overload the adaptive limit backs off on.

use ahash::{HashMap, HashMapExt};
use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connect that took this long waited for a SYN to be sent again: the host's accept queue
/// was full.
const SLOW_CONNECT: Duration = Duration::from_millis(700);

/// Hosts whose connections are counted at most; hosts with none open are forgotten beyond it.
const HOSTS_COUNTED_MAX: usize = 10_000;

/// The open connections of every host, shared by the connector and the dispatcher.
pub(crate) struct HostConnections {
    per_host: usize,
    /// How long a connect waits for a slot before it fails.
    wait: Duration,
    hosts: Mutex<HashMap<String, Arc<HostSlots>>>,
}

struct HostSlots {
    open: Arc<Semaphore>,
    /// Slow connects since the dispatcher last asked (`take_slow_connects`).
    slow_connects: std::sync::atomic::AtomicU32,
}

impl HostConnections {
    pub(crate) fn new(per_host: usize, wait: Duration) -> HostConnections {
        HostConnections { per_host: per_host.max(1), wait, hosts: Mutex::new(HashMap::new()) }
    }

    fn slots(&self, host: &str) -> Arc<HostSlots> {
        let mut hosts = self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if hosts.len() >= HOSTS_COUNTED_MAX && !hosts.contains_key(host) {
            let per_host = self.per_host;
            hosts.retain(|_, slots| slots.open.available_permits() < per_host);
        }
        let per_host = self.per_host;
        hosts
            .entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(HostSlots {
                    open: Arc::new(Semaphore::new(per_host)),
                    slow_connects: std::sync::atomic::AtomicU32::new(0),
                })
            })
            .clone()
    }

    /// Connections open to `host` now.
    pub(crate) fn open(&self, host: &str) -> usize {
        let hosts = self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        hosts.get(host).map_or(0, |slots| self.per_host - slots.open.available_permits())
    }

    /// Slow connects to `host` since the last call.
    pub(crate) fn take_slow_connects(&self, host: &str) -> u32 {
        let hosts = self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        hosts.get(host).map_or(0, |slots| slots.slow_connects.swap(0, std::sync::atomic::Ordering::Relaxed))
    }
}

/// `scheme://host:port` of a URI, lower-cased (the key the dispatcher's limits use).
pub(crate) fn host_key_of(uri: &hyper::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
    let default_port = if scheme == "https" { 443 } else { 80 };
    let host = uri.host().unwrap_or("").to_ascii_lowercase();
    format!("{scheme}://{host}:{}", uri.port_u16().unwrap_or(default_port))
}

/// The client's connector, capped per host.
#[derive(Clone)]
pub(crate) struct CappedConnector<C> {
    inner: C,
    connections: Arc<HostConnections>,
}

impl<C> CappedConnector<C> {
    pub(crate) fn new(inner: C, connections: Arc<HostConnections>) -> CappedConnector<C> {
        CappedConnector { inner, connections }
    }
}

type BoxError = Box<dyn Error + Send + Sync>;

impl<C> tower_service::Service<hyper::Uri> for CappedConnector<C>
where
    C: tower_service::Service<hyper::Uri> + Clone + Send + 'static,
    C::Future: Send,
    C::Error: Into<BoxError>,
{
    type Response = Capped<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Capped<C::Response>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        // The connector made ready is the one used (a clone stays for the next call).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let slots = self.connections.slots(&host_key_of(&uri));
        let wait = self.connections.wait;
        Box::pin(async move {
            let permit = tokio::time::timeout(wait, slots.open.clone().acquire_owned())
                .await
                .map_err(|_| "no connection to the host became free in time")?
                .map_err(|_| "the host's connection count was closed")?;
            let started = Instant::now();
            let io = inner.call(uri).await.map_err(Into::into)?;
            if started.elapsed() >= SLOW_CONNECT {
                slots.slow_connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Capped { io, _slot: permit })
        })
    }
}

/// A connection that holds its host's slot until it closes (is dropped).
pub(crate) struct Capped<T> {
    io: T,
    _slot: OwnedSemaphorePermit,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Capped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Capped<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl<T: hyper_util::client::legacy::connect::Connection> hyper_util::client::legacy::connect::Connection for Capped<T> {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}
