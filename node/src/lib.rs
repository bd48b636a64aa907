//! `sundial-node`: what joins the leaves into a node, in layers (each imports only the ones
//! below it; `obs` stands beside them, counting what each layer does):
//! - `api`: the edges — HTTP/JSON (`http`), the binary protocol (`binary`), the console
//!   (`ui`), bearer tokens (`auth`); they call the router.
//! - `shard`: the router (`shard::router`: validates a request, picks its partition, sends it
//!   to the owning shard or forwards it to the leader), the shard threads that own
//!   partitions, and what a shard does with a request (`shard::ops`).
//! - `replica`: a partition — one Raft group (`partition`) whose log is a sundial-wal log
//!   (`storage`) and whose committed entries drive the engine's state machine.
//! - `cluster`: the cluster's metadata (`meta`), membership (`members`) and the QUIC links
//!   between members (`mesh`).
//! - `obs`: Prometheus metrics and OTLP span export.
//! - `config` (settings) and `server` (`Node::start`: a whole node, as the binary runs it).

pub mod api;
pub mod cluster;
pub mod config;
pub mod obs;
pub mod replica;
pub mod server;
pub mod shard;

pub use replica::partition::{Partition, PartitionError, PartitionOptions};
pub use replica::storage::WalStorage;
