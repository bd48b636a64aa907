//! One replica of a partition: a Raft group (`partition`) over a sundial-wal log (`storage`),
//! applying committed commands to the engine's state machine and snapshotting it.

pub mod partition;
pub mod storage;
