//! `sundial-consensus`: Raft as a pure state machine, in the manner of etcd's raft library.
//! Its deterministic simulator, which tries to break it, is the crate `sundial-consensus-sim`
//! (consensus/sim).
//!
//! The caller owns all I/O. It feeds inputs — [`RawNode::tick`], [`RawNode::step`] (a peer's
//! message), [`RawNode::propose`], [`RawNode::read_index`] — and drains outputs:
//!
//! ```
//! use sundial_consensus::{Config, MemStorage, RawNode, Storage};
//! let storage = MemStorage::new_with_voters(&[1]);
//! let mut node = RawNode::new(Config::new(1), storage.clone()).expect("valid config");
//! // Bounded for the example; a server loops forever on its event loop.
//! for _ in 0..100 {
//!     node.tick();
//!     let status = node.status();
//!     if status.role == sundial_consensus::Role::Leader && status.committed < 2 {
//!         node.propose(b"set x=1".to_vec()).expect("leader accepts");
//!     }
//!     while node.has_ready() {
//!         let ready = node.ready();
//!         // 1. persist (here: the in-memory storage the node reads through)
//!         node.storage_mut().persist(&ready);
//!         // 2. send ready.messages to peers; 3. apply ready.committed_entries
//!         node.advance(ready);
//!     }
//! }
//! assert!(node.status().committed >= 2, "the no-op and the proposal committed");
//! ```
//!
//! Main types: [`RawNode`], [`Ready`], [`Config`], [`Storage`] (implemented by the node on
//! sundial-wal; [`MemStorage`] for tests), [`Message`].
//!
//! This crate never does I/O, never reads a clock, never spawns a thread, and draws
//! randomness only from the seed in [`Config`].

mod log;
mod progress;
mod raft;
mod raw_node;
mod storage;
mod types;
pub mod wire;

pub use progress::{Inflights, Progress, ProgressState};
pub use raft::{Config, ConfigError, ProposeError};
#[cfg(feature = "test-hooks")]
pub use raft::{InjectedBug, Raft};
pub use raw_node::{RawNode, Ready, SoftState, Status};
pub use storage::{check_entries_range, MemStorage, Storage, StorageError};
pub use types::*;
