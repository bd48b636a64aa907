//! What every attempt carries besides the job's own headers: the idempotency key (stable for
//! a fire across retries and failovers), W3C trace context (`crate::trace`), and an HMAC-SHA256 signature.
//!
//! Signature: `X-Sundial-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes with the
//! shared secret, compares in constant time, and refuses timestamps too far from its clock
//! (say five minutes) so a captured request cannot be replayed later. During a key rotation
//! (a current and a next secret) the header carries one `v1=` per secret, current first: a
//! receiver accepts the request when any of them verifies with the secret it holds.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `<job id>:<fire ms>`: the same for every attempt of one fire, on any leader.
pub fn idempotency_key(job_id: &str, fire_ms: u64) -> String {
    format!("{job_id}:{fire_ms}")
}

/// The value of `X-Sundial-Signature` for `body` sent at `timestamp_ms`.
pub fn signature(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    signatures(&[secret], timestamp_ms, body)
}

/// The header signed by each of `secrets` (current, then next), in order.
pub fn signatures(secrets: &[&[u8]], timestamp_ms: u64, body: &[u8]) -> String {
    let mut header = format!("t={timestamp_ms}");
    for secret in secrets {
        header.push_str(",v1=");
        header.push_str(&hex(&hmac(secret, timestamp_ms, body)));
    }
    header
}

/// Checks a signature header the way a receiver should (the tests use it as one).
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_ms: u64, tolerance_ms: u64) -> bool {
    let mut timestamp = None;
    let mut given = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some(("v1", value)) => given.push(value),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else { return false };
    if timestamp.abs_diff(now_ms) > tolerance_ms {
        return false;
    }
    given.into_iter().filter_map(unhex).any(|given| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&given).is_ok()
    })
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

    #[test]
    fn during_a_rotation_either_secret_verifies_and_a_third_does_not() {
        let header = signatures(&[b"current", b"next"], 1_000_000, b"body");
        assert_eq!(header.matches("v1=").count(), 2, "{header}");
        assert!(verify(b"current", &header, b"body", 1_000_000, 300_000));
        assert!(verify(b"next", &header, b"body", 1_000_000, 300_000));
        assert!(!verify(b"retired", &header, b"body", 1_000_000, 300_000));
    }
}
