//! The binary protocol codec: every frame round-trips, streams split anywhere decode the
//! same, and malformed input is an error naming what is wrong — never a panic.

use proptest::prelude::*;
use sundial_net::codec::{
    announced_len, decode, encode, Code, DecodeError, Frame, Item, Message, BATCH_MAX, FLAG_MINIMAL, FLAG_STALE_OK,
    FRAME_MAX_BYTES_DEFAULT, STRING_MAX_BYTES,
};

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..40).prop_map(|chars| chars.into_iter().collect())
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..200)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), text()).prop_map(|(min_version, max_version, token)| Message::Hello {
            min_version,
            max_version,
            token
        }),
        (any::<u16>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(version, node_id, partitions, max)| {
            Message::Welcome { version, node_id, partitions, frame_max_bytes: max }
        }),
        proptest::collection::vec(bytes(), 0..20).prop_map(|jobs| Message::Create { jobs }),
        proptest::collection::vec(text(), 0..20).prop_map(|ids| Message::Get { ids }),
        proptest::collection::vec(text(), 0..20).prop_map(|ids| Message::Cancel { ids }),
        proptest::collection::vec(bytes(), 0..20).prop_map(|jobs| Message::Upsert { jobs }),
        proptest::collection::vec(text(), 0..20).prop_map(|ids| Message::Trigger { ids }),
        Just(Message::Ping),
        Just(Message::Pong),
        Just(Message::Topology),
        proptest::collection::vec((any::<u16>(), any::<u32>(), bytes()), 0..20).prop_map(|items| Message::Results {
            items: items
                .into_iter()
                .map(|(status, retry_after_s, body)| Item { status, retry_after_s, body })
                .collect()
        }),
        (any::<u16>(), text()).prop_map(|(code, message)| Message::Error { code: Code::from_u16(code), message }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (any::<u64>(), 0u8..2, message()).prop_map(|(request_id, flags, message)| Frame { request_id, flags, message })
}

proptest! {
    #[test]
    fn every_frame_round_trips(frame in frame()) {
        let mut bytes = Vec::new();
        encode(&frame, FRAME_MAX_BYTES_DEFAULT, &mut bytes).unwrap();
        let (decoded, used) = decode(&bytes, FRAME_MAX_BYTES_DEFAULT).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(decoded, frame);
    }

    /// A stream of frames read in arbitrary pieces decodes to the same frames in order.
    #[test]
    fn a_stream_split_anywhere_decodes_the_same(frames in proptest::collection::vec(frame(), 1..6), cuts in proptest::collection::vec(1usize..64, 1..50)) {
        let mut stream = Vec::new();
        for frame in &frames {
            encode(frame, FRAME_MAX_BYTES_DEFAULT, &mut stream).unwrap();
        }
        let (mut buffer, mut decoded, mut offset) = (Vec::new(), Vec::new(), 0);
        let mut cuts = cuts.into_iter().cycle();
        while offset < stream.len() {
            let take = cuts.next().unwrap().min(stream.len() - offset);
            buffer.extend_from_slice(&stream[offset..offset + take]);
            offset += take;
            while let Some((frame, used)) = decode(&buffer, FRAME_MAX_BYTES_DEFAULT).unwrap() {
                buffer.drain(..used);
                decoded.push(frame);
            }
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(decoded, frames);
    }

    /// Arbitrary bytes never panic the decoder; whatever it accepts re-encodes to the bytes
    /// it consumed (so it is exactly the format).
    #[test]
    fn arbitrary_bytes_are_decoded_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some((frame, used))) = decode(&bytes, FRAME_MAX_BYTES_DEFAULT) {
            let mut again = Vec::new();
            encode(&frame, FRAME_MAX_BYTES_DEFAULT, &mut again).unwrap();
            prop_assert_eq!(&again[..], &bytes[..used]);
        }
    }
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode(frame, FRAME_MAX_BYTES_DEFAULT, &mut bytes).unwrap();
    bytes
}

#[test]
fn a_ping_is_exactly_the_bytes_the_specification_gives() {
    // docs/PROTOCOL.md, "Example": length 10, kind 0x13, flags 0, request id 7.
    let bytes = encoded(&Frame::new(7, Message::Ping));
    assert_eq!(bytes, [0, 0, 0, 10, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    let get = encoded(&Frame::new(1, Message::Get { ids: vec!["ab".into()] }));
    assert_eq!(get, [0, 0, 0, 16, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 2, b'a', b'b']);
}

#[test]
fn malformed_frames_are_refused_with_what_is_wrong() {
    let max = FRAME_MAX_BYTES_DEFAULT;
    // Oversized: refused from the length prefix alone, before the bytes arrive.
    let huge = (max + 1).to_be_bytes();
    assert_eq!(announced_len(&huge, max), Err(DecodeError::TooLarge { len_bytes: max + 1, max_bytes: max }));
    assert_eq!(decode(&huge, max), Err(DecodeError::TooLarge { len_bytes: max + 1, max_bytes: max }));
    assert_eq!(decode(&[0, 0, 0, 3, 1, 2, 3], max), Err(DecodeError::TooShort { len_bytes: 3 }));
    // Incomplete: wait for more.
    assert_eq!(decode(&[0, 0], max), Ok(None));
    assert_eq!(decode(&encoded(&Frame::new(1, Message::Ping))[..9], max), Ok(None));

    let mut unknown_kind = encoded(&Frame::new(1, Message::Ping));
    unknown_kind[4] = 0x55;
    assert_eq!(decode(&unknown_kind, max), Err(DecodeError::UnknownKind(0x55)));
    let mut unknown_flags = encoded(&Frame::new(1, Message::Ping));
    unknown_flags[5] = 0x86;
    let refused = decode(&unknown_flags, max);
    assert_eq!(refused, Err(DecodeError::UnknownFlags(0x84)), "the unknown bits, not STALE_OK's or MINIMAL's");
    assert!(refused.expect_err("refused").to_string().contains("0x84"));
    let mut minimal = encoded(&Frame::new(1, Message::Create { jobs: vec![b"{}".to_vec()] }));
    minimal[5] = FLAG_MINIMAL | FLAG_STALE_OK;
    let (decoded, _) = decode(&minimal, max).expect("known flags").expect("a whole frame");
    assert_eq!(decoded.flags, FLAG_MINIMAL | FLAG_STALE_OK);

    // A count beyond the batch limit.
    let mut too_many = encoded(&Frame::new(1, Message::Get { ids: vec![] }));
    too_many[14..16].copy_from_slice(&(BATCH_MAX as u16 + 1).to_be_bytes());
    assert_eq!(
        decode(&too_many, max),
        Err(DecodeError::TooMany { field: "ids", count: BATCH_MAX + 1, max: BATCH_MAX })
    );
    // An id whose length runs past the frame.
    let mut truncated = encoded(&Frame::new(1, Message::Get { ids: vec!["ab".into()] }));
    truncated[17] = 9;
    assert_eq!(decode(&truncated, max), Err(DecodeError::Truncated { field: "ids[]" }));
    // Not UTF-8.
    let mut not_utf8 = encoded(&Frame::new(1, Message::Get { ids: vec!["ab".into()] }));
    not_utf8[18] = 0xFF;
    assert_eq!(decode(&not_utf8, max), Err(DecodeError::NotUtf8 { field: "ids[]" }));
    // Bytes past the payload.
    let mut trailing = encoded(&Frame::new(1, Message::Ping));
    trailing[3] += 2;
    trailing.extend_from_slice(&[0, 0]);
    assert_eq!(decode(&trailing, max), Err(DecodeError::TrailingBytes(2)));
}

#[test]
fn the_encoder_refuses_what_the_decoder_would() {
    let mut out = vec![9];
    let too_many = Frame::new(1, Message::Get { ids: vec![String::new(); BATCH_MAX + 1] });
    assert!(encode(&too_many, FRAME_MAX_BYTES_DEFAULT, &mut out).is_err());
    let too_long = Frame::new(1, Message::Get { ids: vec!["x".repeat(STRING_MAX_BYTES + 1)] });
    assert!(encode(&too_long, FRAME_MAX_BYTES_DEFAULT, &mut out).is_err());
    let too_big = Frame::new(1, Message::Create { jobs: vec![vec![0; 100]] });
    assert!(encode(&too_big, 50, &mut out).is_err());
    assert_eq!(out, [9], "a refused frame leaves the buffer as it was");
}
