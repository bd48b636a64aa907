//! `sundial-engine`: what a job is, when it fires and how an attempt is made. This first part
//! holds the hierarchical timing wheel, the deterministic core that decides what is due; the
//! job model, the state machine and the dispatcher build on it (ARCHITECTURE.md).

pub mod cron;
pub mod flow;
pub mod job;
pub mod limits;
pub mod request;
pub mod sign;
pub mod state;
pub mod trace;
pub mod wheel;

pub use wheel::{TimerHandle, TimingWheel, WheelFull};
