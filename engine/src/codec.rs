//! A command's bytes in a Raft entry: one format byte, then the command archived by rkyv
//! (validated when read back). Entries logged before the format byte are JSON objects
//! (format 0) and are still read; a format this build does not know is refused by name.

use crate::state::Command;
use rkyv::rancor;
use rkyv::util::AlignedVec;

/// The format this build writes. rkyv archives have no schema evolution: any change to
/// `Command` or a type inside it changes the bytes, so it needs a new format number (the
/// test below pins the layout) while this build goes on reading format 1. A format number
/// is never 123, the first byte of the JSON of format 0.
pub const COMMAND_FORMAT: u8 = 1;
/// Format 0: a JSON object, whose first byte is always this.
const JSON_FORMAT_FIRST_BYTE: u8 = b'{';

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "command format {found} is unknown (a newer Sundial wrote it); this node reads formats 0 to {COMMAND_FORMAT}: upgrade it to the version its peers run"
    )]
    UnknownFormat { found: u8 },
    #[error("a command of format {format} does not decode: {reason}")]
    Damaged { format: u8, reason: String },
    #[error("an empty command")]
    Empty,
}

/// The entry bytes of `command` (format `COMMAND_FORMAT`).
pub fn encode_command(command: &Command) -> Vec<u8> {
    // Every command is plain owned data (no shared pointers, no I/O): archiving can fail
    // only to allocate, which aborts anyway.
    // Never fails: see above.
    let archived = rkyv::to_bytes::<rancor::Error>(command).expect("a command always archives");
    let mut bytes = Vec::with_capacity(1 + archived.len());
    bytes.push(COMMAND_FORMAT);
    bytes.extend_from_slice(&archived);
    bytes
}

/// The entry bytes of `command` in `format`: `COMMAND_FORMAT`, or 0 (JSON) while a member
/// that reads only JSON replicates the partition.
pub fn encode_command_as(command: &Command, format: u8) -> Vec<u8> {
    if format == 0 {
        // Never fails: commands are maps, strings and numbers, which JSON always holds.
        return serde_json::to_vec(command).expect("a command always serializes");
    }
    encode_command(command)
}

/// The command in `bytes`, of any format this build reads.
pub fn decode_command(bytes: &[u8]) -> Result<Command, DecodeError> {
    let (&format, archived) = bytes.split_first().ok_or(DecodeError::Empty)?;
    match format {
        COMMAND_FORMAT => {
            // The archive needs its own alignment; the entry's bytes follow a format byte.
            let mut aligned = AlignedVec::<16>::with_capacity(archived.len());
            aligned.extend_from_slice(archived);
            rkyv::from_bytes::<Command, rancor::Error>(&aligned)
                .map_err(|error| DecodeError::Damaged { format, reason: error.to_string() })
        }
        JSON_FORMAT_FIRST_BYTE => {
            serde_json::from_slice(bytes).map_err(|error| DecodeError::Damaged { format: 0, reason: error.to_string() })
        }
        found => Err(DecodeError::UnknownFormat { found }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_commands() -> Vec<Command> {
        vec![
            Command::Cancel { id: "a".into(), now_ms: 5 },
            Command::Expire { now_ms: 9, retention_ms: 1, dedup_window_ms: 2, max: 3 },
            Command::Purge { id: None },
        ]
    }

    #[test]
    fn commands_round_trip_and_json_entries_from_before_the_format_byte_are_read() {
        for command in some_commands() {
            assert_eq!(decode_command(&encode_command(&command)), Ok(command.clone()));
            let json = serde_json::to_vec(&command).expect("json");
            assert_eq!(decode_command(&json), Ok(command));
        }
    }

    /// One command of every kind, with every field of a job set, archived: a change of
    /// layout shows here before it reaches a log.
    #[test]
    fn the_archived_layout_of_format_1_is_pinned() {
        use sha2::{Digest, Sha256};
        let request = serde_json::json!({
            "id": "pinned", "cron": "*/5 * * * *", "time_zone": "Europe/Paris", "url": "https://example.com/h",
            "method": "PUT", "headers": {"x-a": "1"}, "json": {"k": [1, 2]}, "retry": {"max_attempts": 4, "backoff": [10, 20]},
            "deadline_ms": 60000, "priority": 1, "labels": {"team": "x"}, "secret": "s", "flow": {"key": "k", "parallelism": 2},
            "callbacks": {"on_success": "https://example.com/ok"}, "dst": {"missing": "skip", "repeated": "both"},
        });
        let spec = crate::request::parse_job_request(&request, 1_800_000_000_000, "unused").expect("valid");
        let outcome =
            crate::state::Outcome::Response { status: 503, body: vec![1], retry_after_ms: Some(5), no_retry: false };
        let id = || "pinned".to_string();
        let commands = vec![
            Command::Create { spec: Box::new(spec.clone()), now_ms: 1, dedup_window_ms: Some(2) },
            Command::Upsert { spec: Box::new(spec), now_ms: 3 },
            Command::Cancel { id: id(), now_ms: 4 },
            Command::Delete { id: id(), now_ms: 5 },
            Command::Trigger { id: id(), now_ms: 6 },
            Command::Backfill { id: id(), from_ms: 7, to_ms: 8, now_ms: 9 },
            Command::RedriveJob { id: id(), now_ms: 10 },
            Command::PauseKey { key: "k".into() },
            Command::ResumeKey { key: "k".into(), now_ms: 11 },
            Command::CallbackStarted { id: id(), fire_ms: 12, attempt: 1, now_ms: 13 },
            Command::CallbackFinished {
                id: id(),
                fire_ms: 12,
                attempt: 1,
                started_ms: 13,
                finished_ms: 14,
                outcome: outcome.clone(),
                retry_at_ms: 15,
            },
            Command::Pause { id: id() },
            Command::Resume { id: id(), now_ms: 16 },
            Command::FireStarted { id: id(), fire_ms: 17, attempt: 2, node: 3, now_ms: 18 },
            Command::AttemptFinished {
                id: id(),
                fire_ms: 17,
                attempt: 2,
                node: 3,
                started_ms: 18,
                finished_ms: 19,
                outcome,
                retry_at_ms: 20,
            },
            Command::AttemptFinished {
                id: id(),
                fire_ms: 17,
                attempt: 2,
                node: 3,
                started_ms: 18,
                finished_ms: 19,
                outcome: crate::state::Outcome::Error(crate::state::ErrorClass::Timeout),
                retry_at_ms: 20,
            },
            Command::Redrive { id: id(), fire_ms: 21, now_ms: 22 },
            Command::Purge { id: Some(id()) },
            Command::Expire { now_ms: 23, retention_ms: 24, dedup_window_ms: 25, max: 26 },
        ];
        let mut all = Sha256::new();
        for command in &commands {
            let bytes = encode_command(command);
            assert_eq!(decode_command(&bytes).as_ref(), Ok(command));
            all.update(&bytes);
        }
        let digest: String = all.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            digest, "9b3f59e96c74e8f5",
            "the archived layout of commands changed: give it a new COMMAND_FORMAT and keep reading format 1"
        );
    }

    #[test]
    fn an_unknown_format_is_refused_by_number_and_damage_is_reported_not_misread() {
        let mut bytes = encode_command(&some_commands()[0]);
        bytes[0] = COMMAND_FORMAT + 1;
        let refused = decode_command(&bytes).expect_err("unknown format");
        assert_eq!(refused, DecodeError::UnknownFormat { found: COMMAND_FORMAT + 1 });
        assert!(refused
            .to_string()
            .contains("command format 2 is unknown (a newer Sundial wrote it); this node reads formats 0 to 1"));
        let mut cut = encode_command(&some_commands()[0]);
        cut.truncate(cut.len() - 3);
        assert!(matches!(decode_command(&cut), Err(DecodeError::Damaged { format: 1, .. })));
        assert_eq!(decode_command(&[]), Err(DecodeError::Empty));
    }
}
