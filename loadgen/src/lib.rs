//! `sundial-loadgen`: load for a Sundial node or cluster, and the accounting that says
//! whether it kept its contract under that load. `drive` paces requests (open loop by
//! intended send time, or a bounded window) over a `target` (binary protocol or HTTP);
//! `receiver` is the webhook sink's HTTP server (with `faults` and `signature` checks) and
//! `sink` accounts its deliveries (missing, duplicate, early); `histogram` and `timeline`
//! hold latencies, `plot` draws them; `reference` measures the bare disk and loopback.
//! `cli` is the command line, `scenario` the runs it chooses, `report` what they print and write.

pub mod cli;
pub mod drive;
pub mod faults;
pub mod histogram;
pub mod open_loop;
pub mod plot;
pub mod receiver;
pub mod reference;
pub mod report;
pub mod scenario;
pub mod signature;
pub mod sink;
pub mod target;
pub mod timeline;
