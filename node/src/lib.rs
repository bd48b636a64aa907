//! `sundial-node`: what joins the leaves into a node. A partition is a Raft group whose log
//! is a sundial-wal log (`storage`) and whose committed entries drive the engine's state
//! machine (`partition`). The server binary, its APIs and the shard runtime build on this.

pub mod api;
pub mod auth;
pub mod partition;
pub mod storage;

pub use partition::{Partition, PartitionError, PartitionOptions};
pub use storage::WalStorage;
