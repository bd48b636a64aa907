//! What the node tells its operators: Prometheus metrics (`metrics`) and OTLP span export
//! (`telemetry`).

pub mod metrics;
pub mod telemetry;
