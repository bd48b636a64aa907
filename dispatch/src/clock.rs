//! The wall clock, read here and nowhere in the deterministic core: the shell stamps each
//! turn, attempt and command with these milliseconds and hands them in.

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is set before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
