//! `sundial-node`: what joins the leaves into a node. A partition is a Raft group whose log
//! is a sundial-wal log (`storage`) and whose committed entries drive the engine's state
//! machine (`partition`). Shards (`shard`) are threads that own partitions; the router
//! (`router`) validates requests and sends them to the owning shard; the HTTP API (`http`)
//! calls the router, and so does the binary protocol (`binary`).

pub mod auth;
pub mod binary;
pub mod cli;
pub mod config;
pub mod http;
pub mod members;
pub mod mesh;
pub mod meta;
pub mod metrics;
pub mod ops;
pub mod partition;
pub mod router;
pub mod shard;
pub mod storage;
pub mod telemetry;
pub mod ui;

pub use partition::{Partition, PartitionError, PartitionOptions};
pub use storage::WalStorage;
