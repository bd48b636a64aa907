//! What the node tells its operators: Prometheus metrics (`metrics`) and OTLP span export
//! (`telemetry`).

pub mod metrics;
pub mod telemetry;

/// The process's resident memory (Linux: /proc/self/statm); `None` where unknown.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_bytes).ok()?)
}
