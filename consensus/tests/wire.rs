//! Raft messages on the wire: every batch round-trips, arbitrary bytes are decoded exactly
//! or refused (never a panic, never a huge allocation from a lying count).

use proptest::prelude::*;
use sundial_consensus::wire::{batch_bytes_max, decode_batch, encode_batch, WireError};
use sundial_consensus::{ConfChange, ConfState, Entry, EntryKind, Message, MessageKind, SnapshotMeta};

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..64)
}

fn entry() -> impl Strategy<Value = Entry> {
    let kind = prop_oneof![
        Just(EntryKind::Normal),
        any::<u64>().prop_map(|id| EntryKind::ConfChange(ConfChange::AddVoter(id))),
        any::<u64>().prop_map(|id| EntryKind::ConfChange(ConfChange::AddLearner(id))),
        any::<u64>().prop_map(|id| EntryKind::ConfChange(ConfChange::Remove(id))),
    ];
    (any::<u64>(), any::<u64>(), kind, bytes()).prop_map(|(term, index, kind, data)| Entry {
        term,
        index,
        kind,
        data: data.into(),
    })
}

fn kind() -> impl Strategy<Value = MessageKind> {
    let ids = || proptest::collection::vec(any::<u64>(), 0..5);
    prop_oneof![
        (any::<bool>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(pre, last_index, last_term, force)| {
            MessageKind::VoteRequest { pre, last_index, last_term, force }
        }),
        (any::<bool>(), any::<bool>()).prop_map(|(pre, granted)| MessageKind::VoteResponse { pre, granted }),
        (any::<u64>(), any::<u64>(), proptest::collection::vec(entry(), 0..5), any::<u64>()).prop_map(
            |(prev_index, prev_term, entries, commit)| MessageKind::Append { prev_index, prev_term, entries, commit }
        ),
        (any::<bool>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(reject, index, hint_index, hint_term)| {
            MessageKind::AppendResponse { reject, index, hint_index, hint_term }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(commit, round)| MessageKind::Heartbeat { commit, round }),
        any::<u64>().prop_map(|round| MessageKind::HeartbeatResponse { round }),
        (any::<u64>(), any::<u64>(), ids(), ids(), any::<u64>(), bytes(), any::<bool>()).prop_map(
            |(index, term, voters, learners, offset, chunk, done)| MessageKind::Snapshot {
                meta: SnapshotMeta { index, term, conf: ConfState { voters, learners } },
                offset,
                chunk,
                done,
            }
        ),
        (any::<u64>(), any::<u64>())
            .prop_map(|(index, received_bytes)| MessageKind::SnapshotProgress { index, received_bytes }),
        any::<u64>().prop_map(|index| MessageKind::SnapshotResponse { index }),
        Just(MessageKind::TimeoutNow),
        any::<u64>().prop_map(|context| MessageKind::ReadIndex { context }),
        (any::<u64>(), any::<u64>()).prop_map(|(context, index)| MessageKind::ReadIndexResponse { context, index }),
    ]
}

fn batch() -> impl Strategy<Value = Vec<(u32, Message)>> {
    let message = (any::<u64>(), any::<u64>(), any::<u64>(), kind()).prop_map(|(from, to, term, kind)| Message {
        from,
        to,
        term,
        kind,
    });
    proptest::collection::vec((any::<u32>(), message), 0..8)
}

proptest! {
    #[test]
    fn every_batch_round_trips(batch in batch()) {
        prop_assert_eq!(decode_batch(&encode_batch(&batch)).unwrap(), batch);
    }

    /// The room reserved before encoding is enough: the buffer never grows mid-way.
    #[test]
    fn a_batch_fits_the_room_reserved_for_it(batch in batch()) {
        prop_assert!(encode_batch(&batch).len() <= batch_bytes_max(&batch));
    }

    #[test]
    fn arbitrary_bytes_are_decoded_exactly_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(batch) = decode_batch(&bytes) {
            prop_assert_eq!(encode_batch(&batch), bytes);
        }
    }

    /// Any cut of a valid batch is refused as truncated (a batch is all or nothing).
    #[test]
    fn a_cut_batch_is_refused(batch in batch(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_batch(&batch);
        let at = cut.index(bytes.len());
        let truncated = matches!(decode_batch(&bytes[..at]), Err(WireError::Truncated { .. }));
        prop_assert!(truncated, "a cut at {} of {} bytes was not refused as truncated", at, bytes.len());
    }
}

#[test]
fn refusals_name_what_is_wrong() {
    assert_eq!(decode_batch(&[2, 0, 0, 0, 0]), Err(WireError::Version(2)));
    // A count of four billion messages over five bytes: refused without allocating for them.
    assert_eq!(decode_batch(&[1, 0xFF, 0xFF, 0xFF, 0xFF]), Err(WireError::Truncated { field: "group" }));
    let heartbeat = Message { from: 1, to: 2, term: 3, kind: MessageKind::Heartbeat { commit: 4, round: 5 } };
    let mut bytes = encode_batch(&[(7, heartbeat)]);
    bytes[1 + 4 + 4 + 24] = 99;
    assert_eq!(decode_batch(&bytes), Err(WireError::Unknown { field: "kind", value: 99 }));
    let mut trailing = encode_batch(&[]);
    trailing.push(0);
    assert_eq!(decode_batch(&trailing), Err(WireError::TrailingBytes(1)));
}
