//! Fuzz target: arbitrary bytes as a stream of binary-protocol frames must never panic the
//! decoder; every frame it accepts re-encodes to exactly the bytes it consumed, and feeding
//! the same bytes in pieces (sizes from the first input byte) decodes the same frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sundial_net::codec::{decode, encode, Frame};

const FRAME_MAX_BYTES: u32 = 64 * 1024;

/// Decodes frames from the front of `bytes` until one is refused or more are needed.
fn frames_of(bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut offset = 0;
    while let Ok(Some((frame, used))) = decode(&bytes[offset..], FRAME_MAX_BYTES) {
        let mut again = Vec::new();
        encode(&frame, FRAME_MAX_BYTES, &mut again).expect("an accepted frame encodes");
        assert_eq!(&again[..], &bytes[offset..offset + used], "re-encoding differs");
        offset += used;
        frames.push(frame);
    }
    frames
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else { return };
    let whole = frames_of(stream);
    // The same stream arriving `piece + 1` bytes at a time.
    let step = usize::from(piece) + 1;
    let (mut buffer, mut pieces, mut offset) = (Vec::new(), Vec::new(), 0);
    while offset < stream.len() {
        let end = (offset + step).min(stream.len());
        buffer.extend_from_slice(&stream[offset..end]);
        offset = end;
        loop {
            match decode(&buffer, FRAME_MAX_BYTES) {
                Ok(Some((frame, used))) => {
                    buffer.drain(..used);
                    pieces.push(frame);
                }
                Ok(None) => break,
                Err(_) => {
                    assert_eq!(pieces, whole, "split decoding differs before the refusal");
                    return;
                }
            }
        }
    }
    assert_eq!(pieces, whole);
});
