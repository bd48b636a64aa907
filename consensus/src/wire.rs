//! Raft messages as bytes, for the cluster transport: a batch of messages of many groups
//! (partitions) between two nodes travels as one byte string. Hand-written and
//! versioned like the rest of the wire; every length is bounded by the input and every
//! malformed input is an error, never a panic.
//!
//! Batch: `u8 version (1)`, `u32 count`, then per message `u32 group`, then the message:
//! `u64 from`, `u64 to`, `u64 term`, `u8 kind`, then the kind's fields (integers
//! big-endian, booleans one byte 0/1, byte strings `u32 length` and the bytes, lists
//! `u32 count` and the items). Entries: `u64 term`, `u64 index`, `u8 kind` (0 normal, 1 add
//! voter, 2 add learner, 3 remove; the change's node id `u64` follows for 1–3), data.

use crate::types::{ConfChange, ConfState, Entry, EntryKind, Message, MessageKind, SnapshotMeta};

const WIRE_VERSION: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unsupported wire version {0} (this node speaks 1)")]
    Version(u8),
    #[error("{field}: the bytes end inside it")]
    Truncated { field: &'static str },
    #[error("{field}: unknown value {value}")]
    Unknown { field: &'static str, value: u8 },
    #[error("{0} bytes after the last message")]
    TrailingBytes(usize),
}

/// Encodes messages of several groups into one batch.
pub fn encode_batch(messages: &[(u32, Message)]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch_into(messages, &mut out);
    out
}

/// `encode_batch`, appended to `out`, which grows once: a batch of appends runs to
/// megabytes, and growing by doubling copied it several times over, into fresh pages.
pub fn encode_batch_into(messages: &[(u32, Message)], out: &mut Vec<u8>) {
    out.reserve(batch_bytes_max(messages));
    out.push(WIRE_VERSION);
    put_u32(out, messages.len() as u32);
    for (group, message) in messages {
        put_u32(out, *group);
        encode_message(message, out);
    }
}

/// At least the bytes `encode_batch` writes for `messages`.
pub fn batch_bytes_max(messages: &[(u32, Message)]) -> usize {
    5 + messages.iter().map(|(_, message)| 4 + encoded_bytes_max(message)).sum::<usize>()
}

/// At least the bytes `encode_message` writes for `message`.
fn encoded_bytes_max(message: &Message) -> usize {
    // from, to, term, kind, then the largest fixed fields of any kind (a vote request's).
    let fixed = 8 * 3 + 1 + 32;
    fixed
        + match &message.kind {
            MessageKind::Append { entries, .. } => {
                4 + entries.iter().map(|e| 8 + 8 + 1 + 8 + 4 + e.data.len()).sum::<usize>()
            }
            MessageKind::Snapshot { meta, chunk, .. } => {
                8 * (2 + meta.conf.voters.len() + meta.conf.learners.len()) + 4 + chunk.len()
            }
            _ => 0,
        }
}

/// Decodes a batch made by `encode_batch`.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<(u32, Message)>, WireError> {
    let mut reader = Reader { bytes };
    let version = reader.u8("version")?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let count = reader.u32("count")? as usize;
    // Each message takes at least 29 bytes: a count larger than that allows is a lie, and
    // must not size an allocation.
    let mut messages = Vec::with_capacity(count.min(reader.bytes.len() / 29));
    for _ in 0..count {
        let group = reader.u32("group")?;
        messages.push((group, decode_message(&mut reader)?));
    }
    if !reader.bytes.is_empty() {
        return Err(WireError::TrailingBytes(reader.bytes.len()));
    }
    Ok(messages)
}

fn encode_message(message: &Message, out: &mut Vec<u8>) {
    put_u64(out, message.from);
    put_u64(out, message.to);
    put_u64(out, message.term);
    match &message.kind {
        MessageKind::VoteRequest { pre, last_index, last_term, force } => {
            out.push(1);
            put_bool(out, *pre);
            put_u64(out, *last_index);
            put_u64(out, *last_term);
            put_bool(out, *force);
        }
        MessageKind::VoteResponse { pre, granted } => {
            out.push(2);
            put_bool(out, *pre);
            put_bool(out, *granted);
        }
        MessageKind::Append { prev_index, prev_term, entries, commit } => {
            out.push(3);
            put_u64(out, *prev_index);
            put_u64(out, *prev_term);
            put_u64(out, *commit);
            put_u32(out, entries.len() as u32);
            for entry in entries {
                put_u64(out, entry.term);
                put_u64(out, entry.index);
                match entry.kind {
                    EntryKind::Normal => out.push(0),
                    EntryKind::ConfChange(ConfChange::AddVoter(id)) => {
                        out.push(1);
                        put_u64(out, id);
                    }
                    EntryKind::ConfChange(ConfChange::AddLearner(id)) => {
                        out.push(2);
                        put_u64(out, id);
                    }
                    EntryKind::ConfChange(ConfChange::Remove(id)) => {
                        out.push(3);
                        put_u64(out, id);
                    }
                }
                put_bytes(out, &entry.data);
            }
        }
        MessageKind::AppendResponse { reject, index, hint_index, hint_term } => {
            out.push(4);
            put_bool(out, *reject);
            put_u64(out, *index);
            put_u64(out, *hint_index);
            put_u64(out, *hint_term);
        }
        MessageKind::Heartbeat { commit, round } => {
            out.push(5);
            put_u64(out, *commit);
            put_u64(out, *round);
        }
        MessageKind::HeartbeatResponse { round } => {
            out.push(6);
            put_u64(out, *round);
        }
        MessageKind::Snapshot { meta, offset, chunk, done } => {
            out.push(7);
            put_u64(out, meta.index);
            put_u64(out, meta.term);
            put_ids(out, &meta.conf.voters);
            put_ids(out, &meta.conf.learners);
            put_u64(out, *offset);
            put_bytes(out, chunk);
            put_bool(out, *done);
        }
        MessageKind::SnapshotProgress { index, received_bytes } => {
            out.push(8);
            put_u64(out, *index);
            put_u64(out, *received_bytes);
        }
        MessageKind::SnapshotResponse { index } => {
            out.push(9);
            put_u64(out, *index);
        }
        MessageKind::TimeoutNow => out.push(10),
        MessageKind::ReadIndex { context } => {
            out.push(11);
            put_u64(out, *context);
        }
        MessageKind::ReadIndexResponse { context, index } => {
            out.push(12);
            put_u64(out, *context);
            put_u64(out, *index);
        }
    }
}

fn decode_message(reader: &mut Reader<'_>) -> Result<Message, WireError> {
    let from = reader.u64("from")?;
    let to = reader.u64("to")?;
    let term = reader.u64("term")?;
    let kind = match reader.u8("kind")? {
        1 => MessageKind::VoteRequest {
            pre: reader.bool("pre")?,
            last_index: reader.u64("last_index")?,
            last_term: reader.u64("last_term")?,
            force: reader.bool("force")?,
        },
        2 => MessageKind::VoteResponse { pre: reader.bool("pre")?, granted: reader.bool("granted")? },
        3 => {
            let prev_index = reader.u64("prev_index")?;
            let prev_term = reader.u64("prev_term")?;
            let commit = reader.u64("commit")?;
            let count = reader.u32("entries")? as usize;
            let mut entries = Vec::with_capacity(count.min(reader.bytes.len() / 21));
            for _ in 0..count {
                let term = reader.u64("entry.term")?;
                let index = reader.u64("entry.index")?;
                let kind = match reader.u8("entry.kind")? {
                    0 => EntryKind::Normal,
                    1 => EntryKind::ConfChange(ConfChange::AddVoter(reader.u64("entry.node")?)),
                    2 => EntryKind::ConfChange(ConfChange::AddLearner(reader.u64("entry.node")?)),
                    3 => EntryKind::ConfChange(ConfChange::Remove(reader.u64("entry.node")?)),
                    value => return Err(WireError::Unknown { field: "entry.kind", value }),
                };
                entries.push(Entry { term, index, kind, data: reader.bytes_field("entry.data")?.into() });
            }
            MessageKind::Append { prev_index, prev_term, entries, commit }
        }
        4 => MessageKind::AppendResponse {
            reject: reader.bool("reject")?,
            index: reader.u64("index")?,
            hint_index: reader.u64("hint_index")?,
            hint_term: reader.u64("hint_term")?,
        },
        5 => MessageKind::Heartbeat { commit: reader.u64("commit")?, round: reader.u64("round")? },
        6 => MessageKind::HeartbeatResponse { round: reader.u64("round")? },
        7 => {
            let index = reader.u64("snapshot.index")?;
            let term = reader.u64("snapshot.term")?;
            let voters = reader.ids("snapshot.voters")?;
            let learners = reader.ids("snapshot.learners")?;
            MessageKind::Snapshot {
                meta: SnapshotMeta { index, term, conf: ConfState { voters, learners } },
                offset: reader.u64("offset")?,
                chunk: reader.bytes_field("chunk")?,
                done: reader.bool("done")?,
            }
        }
        8 => {
            MessageKind::SnapshotProgress { index: reader.u64("index")?, received_bytes: reader.u64("received_bytes")? }
        }
        9 => MessageKind::SnapshotResponse { index: reader.u64("index")? },
        10 => MessageKind::TimeoutNow,
        11 => MessageKind::ReadIndex { context: reader.u64("context")? },
        12 => MessageKind::ReadIndexResponse { context: reader.u64("context")?, index: reader.u64("index")? },
        value => return Err(WireError::Unknown { field: "kind", value }),
    };
    Ok(Message { from, to, term, kind })
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_bool(out: &mut Vec<u8>, value: bool) {
    out.push(u8::from(value));
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

fn put_ids(out: &mut Vec<u8>, ids: &[u64]) {
    put_u32(out, ids.len() as u32);
    for id in ids {
        put_u64(out, *id);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < n {
            return Err(WireError::Truncated { field });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(field, 1)?[0])
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::Unknown { field, value }),
        }
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(field, 4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(field, 8)?.try_into().expect("8 bytes")))
    }

    fn bytes_field(&mut self, field: &'static str) -> Result<Vec<u8>, WireError> {
        let len = self.u32(field)? as usize;
        Ok(self.take(field, len)?.to_vec())
    }

    fn ids(&mut self, field: &'static str) -> Result<Vec<u64>, WireError> {
        let count = self.u32(field)? as usize;
        if count > self.bytes.len() / 8 {
            return Err(WireError::Truncated { field });
        }
        (0..count).map(|_| self.u64(field)).collect()
    }
}
