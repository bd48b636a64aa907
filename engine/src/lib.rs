//! `sundial-engine`: Sundial's deterministic core — what a job is (`job`, `request`), when it
//! fires (`cron`, `wheel`), what every command does to a partition (`state`), and the pure
//! decisions around an attempt (`flow` gates, `limits`, `sign`, `trace`). It does no I/O and
//! reads no clock: time is always an argument. The shell that drives it against the clock
//! and the network is `sundial-dispatch` (ARCHITECTURE.md).

pub mod codec;
pub mod cron;
pub mod flow;
pub mod job;
pub mod limits;
pub mod request;
pub mod room;
pub mod sign;
pub mod spec;
pub mod state;
pub mod table;
pub mod tombstones;
pub mod trace;
pub mod wheel;

pub use wheel::{TimerHandle, TimingWheel, WheelFull};
