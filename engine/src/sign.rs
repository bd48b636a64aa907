//! What every attempt carries besides the job's own headers: the idempotency key (stable for
//! a fire across retries and failovers), W3C trace context (`crate::trace`), and an HMAC-SHA256 signature.
//!
//! Signature: `X-Sundial-Signature: t=<unix ms>,v1=<hex>,v2=<hex>`.
//! - `v2` = HMAC-SHA256(secret, "v2\n<t>\n<METHOD>\n<url>\n<idempotency key>\n" + body): it
//!   binds the request's method, the target URL as the job gave it and the Idempotency-Key,
//!   so a signature made for one URL (or one fire) does not verify for another. Fields are
//!   separated by newlines, which none of them can hold.
//! - `v1` = HMAC-SHA256(secret, "<t>." + body), the body only: kept beside `v2` while
//!   receivers move over (deprecated; any client able to create jobs can have the node sign
//!   a body of its choosing to a URL of its choosing with it).
//!
//! A receiver recomputes the HMAC with the shared secret, compares in constant time, and
//! refuses timestamps too far from its clock (say five minutes) so a captured request cannot
//! be replayed later. During a key rotation (a current and a next secret) the header carries
//! a `v1=` and a `v2=` per secret, current first: a receiver accepts the request when any of
//! them verifies with the secret it holds.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `<job id>:<fire ms>`: the same for every attempt of one fire, on any leader.
pub fn idempotency_key(job_id: &str, fire_ms: u64) -> String {
    format!("{job_id}:{fire_ms}")
}

/// Bits of a fencing token that hold the log index; the term holds the 24 above them.
pub const FENCING_INDEX_BITS: u32 = 40;

/// An attempt's fencing token (`X-Sundial-Fencing-Token`): the leadership term of its
/// partition in the high 24 bits and the partition's log index when the attempt was made in
/// the low 40. Every attempt a later leadership makes carries a larger token than any an
/// earlier one made, so a receiver that saw a token for a job can refuse a request of that
/// job from an older term: one a deposed leader sent, or had in flight. Within one
/// leadership a later attempt of a fire carries a token no smaller (its predecessor's
/// outcome was logged between them). Past their widths (2^24 terms, 2^40 entries) the parts
/// stay at their largest: tokens then stop growing, never shrink.
pub fn fencing_token(term: u64, log_index: u64) -> u64 {
    let term = term.min((1 << (64 - FENCING_INDEX_BITS)) - 1);
    let log_index = log_index.min((1 << FENCING_INDEX_BITS) - 1);
    (term << FENCING_INDEX_BITS) | log_index
}

/// The leadership term a fencing token was made in.
pub fn fencing_term(token: u64) -> u64 {
    token >> FENCING_INDEX_BITS
}

/// What a `v2=` signature binds besides the timestamp and the body.
#[derive(Clone, Copy, Debug)]
pub struct Bound<'a> {
    /// The request's method, upper-case (`POST`).
    pub method: &'a str,
    /// The target URL as the job gave it.
    pub url: &'a str,
    pub idempotency_key: &'a str,
}

/// The header signed by each of `secrets` (current, then next), in order: `v1` then `v2`
/// for each.
pub fn signatures(secrets: &[&[u8]], timestamp_ms: u64, bound: &Bound, body: &[u8]) -> String {
    let mut header = format!("t={timestamp_ms}");
    for secret in secrets {
        header.push_str(",v1=");
        header.push_str(&hex(&hmac(secret, timestamp_ms, body)));
        header.push_str(",v2=");
        header.push_str(&hex(&hmac_v2(secret, timestamp_ms, bound, body)));
    }
    header
}

/// Checks a header's `v2=` signatures the way a receiver should: with the method, URL and
/// Idempotency-Key of the request it received.
pub fn verify_v2(secret: &[u8], header: &str, bound: &Bound, body: &[u8], now_ms: u64, tolerance_ms: u64) -> bool {
    let Some((timestamp, given)) = parse(header, "v2", now_ms, tolerance_ms) else { return false };
    let expected = hmac_v2(secret, timestamp, bound, body);
    given.into_iter().filter_map(unhex).any(|given| constant_time_eq(&expected, &given))
}

/// Checks a header's `v1=` signatures (the body only; deprecated, see the module).
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_ms: u64, tolerance_ms: u64) -> bool {
    let Some((timestamp, given)) = parse(header, "v1", now_ms, tolerance_ms) else { return false };
    let expected = hmac(secret, timestamp, body);
    given.into_iter().filter_map(unhex).any(|given| constant_time_eq(&expected, &given))
}

/// The header's timestamp (when within `tolerance_ms` of `now_ms`) and its `scheme=` values.
fn parse<'a>(header: &'a str, scheme: &str, now_ms: u64, tolerance_ms: u64) -> Option<(u64, Vec<&'a str>)> {
    let mut timestamp = None;
    let mut given = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some((name, value)) if name == scheme => given.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp?;
    (timestamp.abs_diff(now_ms) <= tolerance_ms).then_some((timestamp, given))
}

fn constant_time_eq(expected: &[u8], given: &[u8]) -> bool {
    expected.len() == given.len() && expected.iter().zip(given).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

fn hmac_v2(secret: &[u8], timestamp_ms: u64, bound: &Bound, body: &[u8]) -> Vec<u8> {
    // Never fails: HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    let Bound { method, url, idempotency_key } = bound;
    mac.update(format!("v2\n{timestamp_ms}\n{method}\n{url}\n{idempotency_key}\n").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
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

    #[test]
    fn fencing_tokens_order_terms_first_then_log_positions_and_saturate() {
        assert_eq!(fencing_token(3, 7), (3 << 40) | 7);
        assert_eq!(fencing_term(fencing_token(3, 7)), 3);
        assert!(fencing_token(4, 1) > fencing_token(3, (1 << 40) - 1), "a later term wins over any index");
        assert!(fencing_token(3, 8) > fencing_token(3, 7));
        // Past the widths: the largest, never wrapped into a smaller token.
        assert_eq!(fencing_token(3, 1 << 41), fencing_token(3, (1 << 40) - 1));
        assert_eq!(fencing_term(fencing_token(1 << 30, 0)), (1 << 24) - 1);
        assert!(fencing_token(1 << 30, 0) > fencing_token((1 << 24) - 2, 9), "still above every earlier term");
    }

    use super::*;

    const BOUND: Bound = Bound { method: "POST", url: "https://example.com/hook", idempotency_key: "job-1:1000" };

    #[test]
    fn a_signature_verifies_and_a_changed_body_or_old_timestamp_does_not() {
        let header = signatures(&[b"secret"], 1_000_000, &BOUND, b"{\"a\":1}");
        for verifies in [
            |h: &str, s: &[u8], b: &[u8], now| verify(s, h, b, now, 300_000),
            |h: &str, s: &[u8], b: &[u8], now| verify_v2(s, h, &BOUND, b, now, 300_000),
        ] {
            assert!(verifies(&header, b"secret", b"{\"a\":1}", 1_000_500));
            assert!(!verifies(&header, b"secret", b"{\"a\":2}", 1_000_500), "body changed");
            assert!(!verifies(&header, b"other", b"{\"a\":1}", 1_000_500), "wrong secret");
            assert!(!verifies(&header, b"secret", b"{\"a\":1}", 2_000_000), "too old");
        }
    }

    #[test]
    fn a_v2_signature_binds_the_method_the_url_and_the_idempotency_key() {
        let header = signatures(&[b"secret"], 1_000_000, &BOUND, b"body");
        let other_url = Bound { url: "https://attacker.example/hook", ..BOUND };
        let other_method = Bound { method: "PUT", ..BOUND };
        let other_fire = Bound { idempotency_key: "job-1:2000", ..BOUND };
        for other in [other_url, other_method, other_fire] {
            assert!(!verify_v2(b"secret", &header, &other, b"body", 1_000_000, 300_000), "{other:?}");
        }
        // A field cannot be shifted into the next: "a\nb" + "c" is not "a" + "b\nc".
        let shifted = Bound { url: "https://example.com/hook\njob-1:1000", idempotency_key: "", ..BOUND };
        assert!(!verify_v2(b"secret", &header, &shifted, b"body", 1_000_000, 300_000));
        // v1 covers the body only: it verifies for any URL (why v2 exists).
        assert!(verify(b"secret", &header, b"body", 1_000_000, 300_000));
    }

    #[test]
    fn during_a_rotation_either_secret_verifies_and_a_third_does_not() {
        let header = signatures(&[b"current", b"next"], 1_000_000, &BOUND, b"body");
        assert_eq!((header.matches("v1=").count(), header.matches("v2=").count()), (2, 2), "{header}");
        for secret in [&b"current"[..], b"next"] {
            assert!(verify(secret, &header, b"body", 1_000_000, 300_000));
            assert!(verify_v2(secret, &header, &BOUND, b"body", 1_000_000, 300_000));
        }
        assert!(!verify_v2(b"retired", &header, &BOUND, b"body", 1_000_000, 300_000));
    }
}
