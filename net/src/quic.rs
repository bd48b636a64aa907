//! The cluster transport: QUIC (quinn) with mutual TLS. Every node holds a certificate
//! issued by the cluster's own CA (`certs`); a connection is accepted only when the peer
//! presents one from that CA, in both directions, so a node from another cluster — or no
//! certificate at all — is refused at the handshake. Messages are opaque byte strings, one
//! per unidirectional stream (cheap in QUIC: no head-of-line blocking between messages),
//! bounded in size.

use crate::certs::NodeIdentity;
pub use crate::certs::CLUSTER_SERVER_NAME;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Bytes in one message at most (a snapshot chunk or a batch of appends fits).
pub const MESSAGE_MAX_BYTES: usize = 16 * 1024 * 1024;
/// A silent connection is closed after this (keep-alives keep a healthy one open): short,
/// so a peer killed without closing is noticed, and redialled, within seconds.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const KEEP_ALIVE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("connecting to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("the connection failed: {0}")]
    Connection(String),
    #[error("a message of {len_bytes} bytes exceeds the maximum of {MESSAGE_MAX_BYTES}")]
    TooLarge { len_bytes: usize },
}

/// One node's QUIC endpoint: it accepts peers and connects to them, both with mutual TLS.
pub struct Endpoint {
    endpoint: quinn::Endpoint,
}

impl Endpoint {
    /// Binds `addr` (port 0 picks one) with this node's identity.
    pub fn bind(addr: SocketAddr, identity: &NodeIdentity) -> Result<Endpoint, TransportError> {
        let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.ca_certificate()).map_err(|e| tls(&e))?;
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = vec![identity.certificate()];
        let key: PrivateKeyDer<'static> = identity.private_key();

        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| tls(&e))?;
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls(&e))?;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).map_err(|e| tls(&e))?));
        server.transport_config(transport_config()?);

        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls(&e))?;
        let mut client =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).map_err(|e| tls(&e))?));
        client.transport_config(transport_config()?);

        let mut endpoint =
            quinn::Endpoint::server(server, addr).map_err(|source| TransportError::Bind { addr, source })?;
        endpoint.set_default_client_config(client);
        Ok(Endpoint { endpoint })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(|e| TransportError::Connection(e.to_string()))
    }

    /// Connects to a peer; fails when its certificate is not from this cluster's CA (or it
    /// refuses ours).
    pub async fn connect(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let connect_error = |message: String| TransportError::Connect { addr, message };
        let connecting = self.endpoint.connect(addr, CLUSTER_SERVER_NAME).map_err(|e| connect_error(e.to_string()))?;
        let connection = connecting.await.map_err(|e| connect_error(e.to_string()))?;
        Ok(Connection { connection })
    }

    /// The next peer that completed the handshake; `None` once the endpoint is closed.
    /// Peers that fail it (no certificate, another CA) are skipped, each logged.
    pub async fn accept(&self) -> Option<Connection> {
        // Bounded by the endpoint: each pass takes one incoming connection attempt.
        while let Some(incoming) = self.endpoint.accept().await {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => return Some(Connection { connection }),
                Err(error) => tracing::warn!(%remote, %error, "refused a peer at the handshake"),
            }
        }
        None
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"closing");
    }
}

fn transport_config() -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let mut config = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|e| TransportError::Tls(e.to_string()))?;
    config.max_idle_timeout(Some(idle)).keep_alive_interval(Some(KEEP_ALIVE));
    Ok(Arc::new(config))
}

/// A connection to one peer, mutually authenticated.
#[derive(Clone)]
pub struct Connection {
    connection: quinn::Connection,
}

impl Connection {
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Opens the stream of the next message, to be written apart (`OutgoingMessage::send`):
    /// streams are numbered in the order they are opened and accepted in that order, so a
    /// receiver can take messages in the order they were opened however long each takes
    /// to write.
    pub async fn open_message(&self) -> Result<OutgoingMessage, TransportError> {
        let stream = self.connection.open_uni().await.map_err(|e| TransportError::Connection(e.to_string()))?;
        Ok(OutgoingMessage { stream })
    }

    /// Sends one message on its own stream. The message is handed to QUIC as it is, not
    /// copied (a batch of appends runs to megabytes).
    pub async fn send(&self, message: Vec<u8>) -> Result<(), TransportError> {
        if message.len() > MESSAGE_MAX_BYTES {
            return Err(TransportError::TooLarge { len_bytes: message.len() });
        }
        let stream = self.connection.open_uni().await.map_err(|e| TransportError::Connection(e.to_string()))?;
        OutgoingMessage { stream }.send(message).await
    }

    /// The next message from the peer; an error once the connection is closed.
    pub async fn receive(&self) -> Result<Vec<u8>, TransportError> {
        let failed = |e: &dyn std::fmt::Display| TransportError::Connection(e.to_string());
        let mut stream = self.connection.accept_uni().await.map_err(|e| failed(&e))?;
        stream.read_to_end(MESSAGE_MAX_BYTES).await.map_err(|e| failed(&e))
    }

    /// The next message's stream, to be read apart (`IncomingMessage::read`), so a large
    /// message does not hold up the small ones behind it.
    pub async fn accept_message(&self) -> Result<IncomingMessage, TransportError> {
        let stream = self.connection.accept_uni().await.map_err(|e| TransportError::Connection(e.to_string()))?;
        Ok(IncomingMessage { stream })
    }

    pub fn close(&self) {
        self.connection.close(0u32.into(), b"closing");
    }
}

/// A message's stream, opened; `send` writes the message and ends the stream.
pub struct OutgoingMessage {
    stream: quinn::SendStream,
}

impl OutgoingMessage {
    pub async fn send(mut self, message: Vec<u8>) -> Result<(), TransportError> {
        if message.len() > MESSAGE_MAX_BYTES {
            return Err(TransportError::TooLarge { len_bytes: message.len() });
        }
        let failed = |e: &dyn std::fmt::Display| TransportError::Connection(e.to_string());
        self.stream.write_chunk(message.into()).await.map_err(|e| failed(&e))?;
        self.stream.finish().map_err(|e| failed(&e))?;
        Ok(())
    }
}

/// A message whose stream has arrived; `read` takes it whole (bounded in size).
pub struct IncomingMessage {
    stream: quinn::RecvStream,
}

impl IncomingMessage {
    pub async fn read(mut self) -> Result<Vec<u8>, TransportError> {
        self.stream.read_to_end(MESSAGE_MAX_BYTES).await.map_err(|e| TransportError::Connection(e.to_string()))
    }
}
