//! `sundial-loadgen`: load for a Sundial node or cluster, and the accounting that says
//! whether it kept its contract under that load. `open_loop` paces requests by intended
//! send time; `sink` accounts deliveries (missing, duplicate, early); `histogram` holds
//! latencies; `receiver` is the webhook sink's HTTP server.

pub mod histogram;
pub mod open_loop;
pub mod receiver;
pub mod sink;
