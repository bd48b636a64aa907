//! A command's bytes in a Raft entry: one format byte, then the command archived by rkyv
//! (validated when read back). Format 2 carries a create's spec as the spec's own archive,
//! the bytes the spec store keeps; format 1 archived the spec inside the command, and
//! entries logged before the format byte are JSON objects (format 0): both are still read,
//! and written while a member that reads no newer one replicates the partition. A format
//! this build does not know is refused by name.

use crate::job::JobSpec;
use crate::spec::PackedSpec;
use crate::state::{Command, CommandOf};
use rkyv::rancor;
use rkyv::util::AlignedVec;

/// The format this build writes. rkyv archives have no schema evolution: any change to
/// `Command` or a type inside it changes the bytes, so it needs a new format number (the
/// tests below pin the layouts) while this build goes on reading the older ones. A format
/// number is never 123, the first byte of the JSON of format 0.
pub const COMMAND_FORMAT: u8 = 2;
/// Format 1: creates and upserts carry their spec archived inside the command.
const SPEC_INSIDE_FORMAT: u8 = 1;
/// Format 0: a JSON object, whose first byte is always this.
const JSON_FORMAT_FIRST_BYTE: u8 = b'{';

/// A command of format 1.
type CommandWithSpecInside = CommandOf<Box<JobSpec>>;

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
    archived_with_format(command, COMMAND_FORMAT)
}

/// The format byte, then `command` archived.
fn archived_with_format<C>(command: &C, format: u8) -> Vec<u8>
where
    C: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    // Every command is plain owned data (no shared pointers, no I/O): archiving can fail
    // only to allocate, which aborts anyway.
    // Never fails: see above.
    let archived = rkyv::to_bytes::<rancor::Error>(command).expect("a command always archives");
    let mut bytes = Vec::with_capacity(1 + archived.len());
    bytes.push(format);
    bytes.extend_from_slice(&archived);
    bytes
}

/// The entry bytes of `command` in `format`: `COMMAND_FORMAT`, or an older one (1: the spec
/// archived inside the command; 0: JSON) while a member that reads no newer one replicates
/// the partition.
pub fn encode_command_as(command: &Command, format: u8) -> Vec<u8> {
    match format {
        0 => {
            // Never fails: commands are maps, strings and numbers, which JSON always holds.
            serde_json::to_vec(command).expect("a command always serializes")
        }
        SPEC_INSIDE_FORMAT => {
            let older = command.clone().map_spec(|spec| Box::new(spec.to_spec()));
            archived_with_format(&older, SPEC_INSIDE_FORMAT)
        }
        _ => encode_command(command),
    }
}

/// The command in `bytes`, of any format this build reads.
pub fn decode_command(bytes: &[u8]) -> Result<Command, DecodeError> {
    let (&format, archived) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let damaged = |error: rancor::Error| DecodeError::Damaged { format, reason: error.to_string() };
    // An archive needs its own alignment; the entry's bytes follow a format byte.
    let aligned = || crate::spec::aligned_copy(archived);
    match format {
        COMMAND_FORMAT => rkyv::from_bytes::<Command, rancor::Error>(&aligned()).map_err(damaged),
        SPEC_INSIDE_FORMAT => rkyv::from_bytes::<CommandWithSpecInside, rancor::Error>(&aligned())
            .map(|command| command.map_spec(|spec| PackedSpec::of(&spec)))
            .map_err(damaged),
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

    /// One command of every kind, with every field of a job set, as format 1 carried them.
    fn commands_of_every_kind() -> Vec<CommandWithSpecInside> {
        let request = serde_json::json!({
            "id": "pinned", "cron": "*/5 * * * *", "time_zone": "Europe/Paris", "url": "https://example.com/h",
            "method": "PUT", "headers": {"x-a": "1"}, "json": {"k": [1, 2]}, "retry": {"max_attempts": 4, "backoff": [10, 20]},
            "deadline_ms": 60000, "priority": 1, "labels": {"team": "x"}, "secret": "s", "flow": {"key": "k", "parallelism": 2},
            "callbacks": {"on_success": "https://example.com/ok"}, "dst": {"missing": "skip", "repeated": "both"},
        });
        let spec = crate::request::parse_job_request(&request.to_string(), 1_800_000_000_000, "unused").expect("valid");
        let outcome =
            crate::state::Outcome::Response { status: 503, body: vec![1], retry_after_ms: Some(5), no_retry: false };
        let id = || "pinned".to_string();
        vec![
            CommandOf::Create { spec: Box::new(spec.clone()), now_ms: 1, dedup_window_ms: Some(2) },
            CommandOf::Upsert { spec: Box::new(spec), now_ms: 3 },
            CommandOf::Cancel { id: id(), now_ms: 4 },
            CommandOf::Delete { id: id(), now_ms: 5 },
            CommandOf::Trigger { id: id(), now_ms: 6 },
            CommandOf::Backfill { id: id(), from_ms: 7, to_ms: 8, now_ms: 9 },
            CommandOf::RedriveJob { id: id(), now_ms: 10 },
            CommandOf::PauseKey { key: "k".into() },
            CommandOf::ResumeKey { key: "k".into(), now_ms: 11 },
            CommandOf::CallbackStarted { id: id(), fire_ms: 12, attempt: 1, now_ms: 13 },
            CommandOf::CallbackFinished {
                id: id(),
                fire_ms: 12,
                attempt: 1,
                started_ms: 13,
                finished_ms: 14,
                outcome: outcome.clone(),
                retry_at_ms: 15,
            },
            CommandOf::Pause { id: id() },
            CommandOf::Resume { id: id(), now_ms: 16 },
            CommandOf::FireStarted { id: id(), fire_ms: 17, attempt: 2, node: 3, now_ms: 18 },
            CommandOf::AttemptFinished {
                id: id(),
                fire_ms: 17,
                attempt: 2,
                node: 3,
                started_ms: 18,
                finished_ms: 19,
                outcome,
                retry_at_ms: 20,
            },
            CommandOf::AttemptFinished {
                id: id(),
                fire_ms: 17,
                attempt: 2,
                node: 3,
                started_ms: 18,
                finished_ms: 19,
                outcome: crate::state::Outcome::Error(crate::state::ErrorClass::Timeout),
                retry_at_ms: 20,
            },
            CommandOf::Redrive { id: id(), fire_ms: 21, now_ms: 22 },
            CommandOf::Purge { id: Some(id()) },
            CommandOf::Expire { now_ms: 23, retention_ms: 24, dedup_window_ms: 25, max: 26 },
        ]
    }

    /// The first 8 bytes of the SHA-256 of `entries`, in hex.
    fn digest_of(entries: &[Vec<u8>]) -> String {
        use sha2::{Digest, Sha256};
        let mut all = Sha256::new();
        for entry in entries {
            all.update(entry);
        }
        all.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Every kind of command archived in both formats this build reads: a change of
    /// layout shows here before it reaches a log, and entries of format 1 (from logs and
    /// peers of the build before) still read as the commands they were.
    #[test]
    fn the_archived_layouts_of_formats_1_and_2_are_pinned() {
        let older = commands_of_every_kind();
        let current: Vec<Command> =
            older.iter().cloned().map(|command| command.map_spec(|spec| PackedSpec::of(&spec))).collect();
        let format_1: Vec<Vec<u8>> =
            older.iter().map(|command| archived_with_format(command, SPEC_INSIDE_FORMAT)).collect();
        let format_2: Vec<Vec<u8>> = current.iter().map(encode_command).collect();
        for ((one, two), command) in format_1.iter().zip(&format_2).zip(&current) {
            assert_eq!(decode_command(one).as_ref(), Ok(command));
            assert_eq!(decode_command(two).as_ref(), Ok(command));
            assert_eq!(&encode_command_as(command, SPEC_INSIDE_FORMAT), one, "written for a peer of format 1");
        }
        assert_eq!(digest_of(&format_1), "9b3f59e96c74e8f5", "the layout of format 1 changed: it must not");
        assert_eq!(
            digest_of(&format_2),
            "7dc7bbf5c99f80c5",
            "the archived layout of commands changed: give it a new COMMAND_FORMAT and keep reading format 2"
        );
    }

    /// A create of format 2 whose spec bytes are not a spec archive is refused as damaged
    /// when read, never taken into the state.
    #[test]
    fn a_create_whose_spec_archive_is_damaged_is_refused_when_read() {
        let command = commands_of_every_kind().remove(0).map_spec(|spec| PackedSpec::of(&spec));
        let bytes = encode_command(&command);
        let spec = PackedSpec::of(&command_spec(&command));
        let at = bytes.windows(spec.len()).position(|window| window == &spec[..]).expect("the spec's bytes are inside");
        let mut damaged = bytes.clone();
        // Every pointer and length of the spec's archive now points far outside it.
        damaged[at..at + spec.len()].fill(0xff);
        assert!(matches!(decode_command(&damaged), Err(DecodeError::Damaged { format: 2, .. })));
    }

    fn command_spec(command: &Command) -> JobSpec {
        match command {
            Command::Create { spec, .. } | Command::Upsert { spec, .. } => spec.to_spec(),
            _ => unreachable!("a create"),
        }
    }

    #[test]
    fn an_unknown_format_is_refused_by_number_and_damage_is_reported_not_misread() {
        let mut bytes = encode_command(&some_commands()[0]);
        bytes[0] = COMMAND_FORMAT + 1;
        let refused = decode_command(&bytes).expect_err("unknown format");
        assert_eq!(refused, DecodeError::UnknownFormat { found: COMMAND_FORMAT + 1 });
        assert!(refused
            .to_string()
            .contains("command format 3 is unknown (a newer Sundial wrote it); this node reads formats 0 to 2"));
        let mut cut = encode_command(&some_commands()[0]);
        cut.truncate(cut.len() - 3);
        assert!(matches!(decode_command(&cut), Err(DecodeError::Damaged { format: COMMAND_FORMAT, .. })));
        assert_eq!(decode_command(&[]), Err(DecodeError::Empty));
    }
}
