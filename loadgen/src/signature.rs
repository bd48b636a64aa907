//! Checks a delivery's `X-Sundial-Signature` the way a receiver should:
//! `t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, compared in constant time,
//! the timestamp within a tolerance of the receiver's clock. During a key rotation the header
//! holds one `v1=` per secret; any one verifying is enough.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Whether `header` signs `body` with `secret`, sent within `tolerance_ms` of `now_ms`.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_ms: u64, tolerance_ms: u64) -> bool {
    let mut timestamp_ms = None;
    let mut given_hex = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp_ms = value.parse::<u64>().ok(),
            Some(("v1", value)) => given_hex.push(value),
            _ => {}
        }
    }
    let Some(timestamp_ms) = timestamp_ms else { return false };
    if timestamp_ms.abs_diff(now_ms) > tolerance_ms {
        return false;
    }
    given_hex.into_iter().filter_map(decode_hex).any(|given| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
        mac.update(format!("{timestamp_ms}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&given).is_ok()
    })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(format!("{timestamp_ms}.").as_bytes());
        mac.update(body);
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={timestamp_ms},v1={hex}")
    }

    #[test]
    fn a_good_signature_passes_and_every_kind_of_bad_one_fails() {
        let header = sign(b"s3cret", 1_000_000, b"{\"i\":1}");
        assert!(verify(b"s3cret", &header, b"{\"i\":1}", 1_000_400, 300_000));
        assert!(!verify(b"other", &header, b"{\"i\":1}", 1_000_400, 300_000), "wrong secret");
        assert!(!verify(b"s3cret", &header, b"{\"i\":2}", 1_000_400, 300_000), "body changed");
        assert!(!verify(b"s3cret", &header, b"{\"i\":1}", 9_000_000, 300_000), "too old");
        assert!(!verify(b"s3cret", "t=1000000", b"{\"i\":1}", 1_000_000, 300_000), "no v1");
        assert!(!verify(b"s3cret", "t=1000000,v1=zz", b"{\"i\":1}", 1_000_000, 300_000), "not hex");
        assert!(!verify(b"s3cret", "", b"", 0, 300_000), "no header");
    }
}
