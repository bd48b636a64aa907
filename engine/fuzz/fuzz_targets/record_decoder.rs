//! Fuzz target: arbitrary bytes as a replicated command (`codec::decode_command`) or a state
//! snapshot (`State::restore`) must never panic, and whatever decodes must encode back to
//! something that decodes to the same value (no state that only looks restored).
//!
//! The first input byte picks the mode: even → the bytes go to the decoders as they are;
//! odd → a valid archived command is built (a backfill, or a create carrying its spec's own
//! archive: bit 1 picks) and the rest of the input flips its bytes, so damage lands inside
//! archives that pass the format byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sundial_engine::codec::{decode_command, encode_command};
use sundial_engine::request::parse_job_request;
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::{Command, State};

fn damaged_command(create: bool, flips: &[u8]) -> Vec<u8> {
    let command = if create {
        let request = serde_json::json!({"id": "fuzzed-job", "cron": "*/5 * * * *", "url": "https://example.com/h",
            "headers": {"x-a": "1"}, "body": "payload", "labels": {"team": "x"}});
        let spec = parse_job_request(&request.to_string(), 1_800_000_000_000, "secret").expect("a valid request");
        Command::Create { spec: PackedSpec::of(&spec), now_ms: 3, dedup_window_ms: Some(4) }
    } else {
        Command::Backfill { id: "fuzzed-job".into(), from_ms: 1, to_ms: 2, now_ms: 3 }
    };
    let mut bytes = encode_command(&command);
    for pair in flips.chunks(2) {
        if let [at, mask] = pair {
            let at = 1 + usize::from(*at) % (bytes.len() - 1);
            bytes[at] ^= mask;
        }
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode % 2 == 0 { rest.to_vec() } else { damaged_command(mode & 2 != 0, rest) };
    if let Ok(command) = decode_command(&bytes) {
        assert_eq!(decode_command(&encode_command(&command)).as_ref(), Ok(&command));
    }
    if let Ok(state) = State::restore(&bytes) {
        let again = State::restore(&state.snapshot().expect("a restored state archives")).expect("and restores");
        assert_eq!(again, state);
    }
});
