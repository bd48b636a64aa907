//! `sundial-net`: Sundial's wire. `codec` is the binary protocol v1 (docs/PROTOCOL.md) as a
//! pure encoder/decoder of frames — no sockets — so it can be property-tested and fuzzed;
//! `client` is the Rust client over TCP with connection reuse and automatic batching;
//! `topology` says which partition a job is in and who leads it; `cluster` routes a client's
//! requests to the leader of each job's partition;
//! `quic` is the cluster transport (QUIC, mutual TLS with the cluster's CA from `certs`).

#[cfg(feature = "quic")]
pub mod certs;
pub mod client;
pub mod cluster;
pub mod codec;
#[cfg(feature = "quic")]
pub mod quic;
pub mod topology;

pub use client::{Client, ClientError, ClientOptions};
pub use cluster::ClusterClient;
pub use codec::{Code, DecodeError, Frame, Item, Message, PROTOCOL_VERSION};
pub use topology::{partition_of, MemberAddress, Topology};
