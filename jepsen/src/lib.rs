//! `sundial-jepsen`: fault injection against a local Sundial cluster. `cluster` runs the
//! nodes, `nemesis` plans the faults and `faults` carries them out (with `firewall` for
//! partitions and `torn` for damaged logs), `workload` drives clients against a webhook
//! receiver and records the `history`, `checker` judges it against the contract, `report`
//! writes the verdict; `run` ties one run together.

pub mod checker;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod faults;
pub mod firewall;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod rng;
pub mod run;
pub mod torn;
pub mod workload;

/// The harness's wall clock, µs since the epoch (the receiver's clock too).
pub fn now_us() -> u64 {
    sundial_loadgen::receiver::now_us()
}
