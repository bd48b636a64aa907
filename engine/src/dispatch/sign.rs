//! What every attempt carries besides the job's own headers: the idempotency key (stable for
//! a fire across retries and failovers), W3C trace context (`crate::trace`), and an HMAC-SHA256 signature.
//!
//! Signature: `X-Sundial-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes with the
//! shared secret, compares in constant time, and refuses timestamps too far from its clock
//! (say five minutes) so a captured request cannot be replayed later.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `<job id>:<fire ms>`: the same for every attempt of one fire, on any leader.
pub fn idempotency_key(job_id: &str, fire_ms: u64) -> String {
    format!("{job_id}:{fire_ms}")
}

/// The value of `X-Sundial-Signature` for `body` sent at `timestamp_ms`.
pub fn signature(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    format!("t={timestamp_ms},v1={}", hex(&hmac(secret, timestamp_ms, body)))
}

/// Checks a signature header the way a receiver should (the tests use it as one).
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_ms: u64, tolerance_ms: u64) -> bool {
    let mut timestamp = None;
    let mut given = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some(("v1", value)) => given = Some(value),
            _ => {}
        }
    }
    let (Some(timestamp), Some(given)) = (timestamp, given) else { return false };
    if timestamp.abs_diff(now_ms) > tolerance_ms {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let Some(given) = unhex(given) else { return false };
    mac.verify_slice(&given).is_ok()
}

fn hmac(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp_ms}.").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_body_or_old_timestamp_does_not() {
        let header = signature(b"secret", 1_000_000, b"{\"a\":1}");
        assert!(verify(b"secret", &header, b"{\"a\":1}", 1_000_500, 300_000));
        assert!(!verify(b"secret", &header, b"{\"a\":2}", 1_000_500, 300_000), "body changed");
        assert!(!verify(b"other", &header, b"{\"a\":1}", 1_000_500, 300_000), "wrong secret");
        assert!(!verify(b"secret", &header, b"{\"a\":1}", 2_000_000, 300_000), "too old");
    }
}
