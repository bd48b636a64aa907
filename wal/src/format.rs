//! The on-disk byte layout of segments and records: encoding, decoding and checksums, nothing else.
//!
//! Pure functions over byte slices, so recovery logic and the fuzz target can use them without a
//! file. docs/INTERNALS.md ("On-disk format") describes the same layout in prose.

/// First bytes of every segment file; the trailing digit is the format version.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SUNDWAL1";
pub const FORMAT_VERSION: u32 = 1;
/// The segment header occupies the first bytes of each segment; records follow.
pub const SEGMENT_HEADER_SIZE: usize = 64;
pub const RECORD_HEADER_SIZE: usize = 32;
/// Every record starts on this boundary, so a record body (which starts right after its
/// header) is aligned for rkyv, whose archived roots need up to 16-byte alignment.
pub const RECORD_ALIGN: usize = 16;

const _: () = assert!(SEGMENT_HEADER_SIZE % RECORD_ALIGN == 0);
const _: () = assert!(RECORD_HEADER_SIZE % RECORD_ALIGN == 0);
const _: () = assert!(RECORD_ALIGN.is_power_of_two());

/// Rounds `n` up to the record alignment.
pub const fn align_up(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

/// Bytes a record with a body of `body_len` bytes takes in a segment, padding included.
pub const fn record_size(body_len: usize) -> usize {
    align_up(RECORD_HEADER_SIZE + body_len)
}

/// The fixed header at the start of each segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Log index of the first record this segment holds (or will hold).
    pub first_index: u64,
    /// Checksum of the record just before `first_index` (0 when the chain starts here), so the
    /// chain of checksums runs across segment boundaries.
    pub prev_crc: u32,
    /// The preallocated size of the file; records never extend past it.
    pub segment_size_bytes: u64,
}

/// Why a segment header could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderFault {
    TooShort,
    BadMagic,
    UnsupportedVersion(u32),
    ChecksumMismatch,
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderFault::TooShort => write!(f, "file shorter than the segment header"),
            HeaderFault::BadMagic => write!(f, "not a Sundial log segment (bad magic)"),
            HeaderFault::UnsupportedVersion(v) => write!(
                f,
                "log segment format version {v}, this build reads version {FORMAT_VERSION}: run the Sundial version that wrote it"
            ),
            HeaderFault::ChecksumMismatch => write!(f, "segment header checksum mismatch"),
        }
    }
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_SIZE] {
        let mut out = [0u8; SEGMENT_HEADER_SIZE];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_index.to_le_bytes());
        out[24..28].copy_from_slice(&self.prev_crc.to_le_bytes());
        out[32..40].copy_from_slice(&self.segment_size_bytes.to_le_bytes());
        let crc = segment_header_crc(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderFault> {
        let Some(raw) = bytes.get(..SEGMENT_HEADER_SIZE) else {
            return Err(HeaderFault::TooShort);
        };
        if raw[0..8] != SEGMENT_MAGIC {
            // `SUNDWAL` and another digit: a segment of another version, named as such.
            return match (raw[0..7] == SEGMENT_MAGIC[0..7], raw[7]) {
                (true, digit @ b'0'..=b'9') => Err(HeaderFault::UnsupportedVersion(u32::from(digit - b'0'))),
                _ => Err(HeaderFault::BadMagic),
            };
        }
        let version = read_u32(raw, 8);
        if version != FORMAT_VERSION {
            return Err(HeaderFault::UnsupportedVersion(version));
        }
        if read_u32(raw, 12) != segment_header_crc(raw) {
            return Err(HeaderFault::ChecksumMismatch);
        }
        Ok(SegmentHeader {
            first_index: read_u64(raw, 16),
            prev_crc: read_u32(raw, 24),
            segment_size_bytes: read_u64(raw, 32),
        })
    }
}

fn segment_header_crc(raw: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&raw[0..12]);
    crc32c::crc32c_append(crc, &raw[16..SEGMENT_HEADER_SIZE])
}

/// The fixed header in front of each record body.
///
/// Layout (little endian): crc u32 · body_len u32 · index u64 · tag u64 · prev_crc u32 ·
/// batch_offset u32. `crc` covers bytes 4..32 of the header and the body, so each record can be
/// checked on its own; `prev_crc` (covered by `crc`) links it to the record before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub crc: u32,
    pub body_len: u32,
    pub index: u64,
    /// Caller-chosen value stored beside the record (Raft puts the entry's term here).
    pub tag: u64,
    /// `crc` of the previous record in the log: the chain that makes a lost or reordered
    /// record detectable even when each record is valid on its own.
    pub prev_crc: u32,
    /// `index` minus the index of the first record of the batch this record was written in.
    /// Recovery uses it to tell a torn, never-acknowledged batch from later damage.
    pub batch_offset: u32,
}

/// Why the bytes at an offset are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// The header is all zeros: the clean end of the written part of a segment.
    Zeroed,
    /// The header or body would extend past the end of the segment.
    Truncated,
    ChecksumMismatch,
}

impl RecordHeader {
    /// Builds the header for `body`, computing its checksum.
    pub fn new(index: u64, tag: u64, prev_crc: u32, batch_offset: u32, body: &[u8]) -> Self {
        let body_len = u32::try_from(body.len()).expect("caller bounds bodies below u32::MAX");
        let mut header = RecordHeader { crc: 0, body_len, index, tag, prev_crc, batch_offset };
        header.crc = record_crc(&header.encode(), body);
        header
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_SIZE] {
        let mut out = [0u8; RECORD_HEADER_SIZE];
        out[0..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.index.to_le_bytes());
        out[16..24].copy_from_slice(&self.tag.to_le_bytes());
        out[24..28].copy_from_slice(&self.prev_crc.to_le_bytes());
        out[28..32].copy_from_slice(&self.batch_offset.to_le_bytes());
        out
    }

    /// Reads the header at the start of `raw` without checking anything.
    pub fn decode_unchecked(raw: &[u8]) -> RecordHeader {
        RecordHeader {
            crc: read_u32(raw, 0),
            body_len: read_u32(raw, 4),
            index: read_u64(raw, 8),
            tag: read_u64(raw, 16),
            prev_crc: read_u32(raw, 24),
            batch_offset: read_u32(raw, 28),
        }
    }

    /// Index of the first record of the batch this record was written in.
    pub fn batch_first_index(&self) -> u64 {
        self.index.saturating_sub(u64::from(self.batch_offset))
    }

    /// Bytes this record occupies in its segment.
    pub fn size(&self) -> usize {
        record_size(self.body_len as usize)
    }
}

/// Decodes and checks the record at `offset` of `segment`: on success, its header and body.
pub fn decode_record(segment: &[u8], offset: usize) -> Result<(RecordHeader, &[u8]), RecordFault> {
    let header_end = offset.checked_add(RECORD_HEADER_SIZE).ok_or(RecordFault::Truncated)?;
    let raw = segment.get(offset..header_end).ok_or(RecordFault::Truncated)?;
    if raw.iter().all(|&b| b == 0) {
        return Err(RecordFault::Zeroed);
    }
    let header = RecordHeader::decode_unchecked(raw);
    let body_end = header_end.checked_add(header.body_len as usize).ok_or(RecordFault::Truncated)?;
    let body = segment.get(header_end..body_end).ok_or(RecordFault::Truncated)?;
    if record_crc(raw, body) != header.crc {
        return Err(RecordFault::ChecksumMismatch);
    }
    Ok((header, body))
}

/// crc32c over the header bytes after the crc field, then the body.
fn record_crc(header_raw: &[u8], body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header_raw[4..RECORD_HEADER_SIZE]);
    crc32c::crc32c_append(crc, body)
}

/// Appends one framed record (header, body, zero padding) to `out`.
pub fn encode_record_into(out: &mut Vec<u8>, header: &RecordHeader, body: &[u8]) {
    debug_assert_eq!(header.body_len as usize, body.len());
    debug_assert_eq!(out.len() % RECORD_ALIGN, 0, "records start aligned");
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
    let padded_len = align_up(out.len());
    out.resize(padded_len, 0);
}

fn read_u32(raw: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&raw[at..at + 4]);
    u32::from_le_bytes(b)
}

fn read_u64(raw: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips_and_detects_a_flipped_bit() {
        let header = SegmentHeader { first_index: 42, prev_crc: 7, segment_size_bytes: 1 << 20 };
        let mut raw = header.encode();
        assert_eq!(SegmentHeader::decode(&raw), Ok(header));
        raw[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&raw), Err(HeaderFault::ChecksumMismatch));
        raw[0] = b'X';
        assert_eq!(SegmentHeader::decode(&raw), Err(HeaderFault::BadMagic));
        assert_eq!(SegmentHeader::decode(&raw[..10]), Err(HeaderFault::TooShort));
        let mut newer = header.encode();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let refused = SegmentHeader::decode(&newer).expect_err("a newer version is refused, not misread");
        assert_eq!(refused, HeaderFault::UnsupportedVersion(FORMAT_VERSION + 1));
        // A future version may change the magic's digit too: named the same way.
        let mut renamed = header.encode();
        renamed[7] = b'2';
        assert_eq!(SegmentHeader::decode(&renamed), Err(HeaderFault::UnsupportedVersion(2)));
        assert_eq!(
            refused.to_string(),
            "log segment format version 2, this build reads version 1: run the Sundial version that wrote it"
        );
    }

    #[test]
    fn record_round_trips_aligned_and_every_flipped_bit_is_caught() {
        let body = b"hello, sundial";
        let header = RecordHeader::new(5, 3, 99, 1, body);
        let mut seg = Vec::new();
        encode_record_into(&mut seg, &header, body);
        assert_eq!(seg.len(), record_size(body.len()));
        assert_eq!(seg.len() % RECORD_ALIGN, 0);
        let (decoded, decoded_body) = decode_record(&seg, 0).expect("valid record");
        assert_eq!(decoded, header);
        assert_eq!(decoded_body, body);
        assert_eq!(decoded.batch_first_index(), 4);
        let framed_len = RECORD_HEADER_SIZE + body.len();
        for bit in 0..framed_len * 8 {
            let mut damaged = seg.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&damaged, 0).is_err(), "flipped bit {bit} went unnoticed");
        }
    }

    #[test]
    fn zeroed_and_truncated_records_are_told_apart() {
        let zeros = [0u8; 64];
        assert_eq!(decode_record(&zeros, 0), Err(RecordFault::Zeroed));
        assert_eq!(decode_record(&zeros, 48), Err(RecordFault::Truncated));
        let header = RecordHeader::new(1, 0, 0, 0, &[1u8; 100]);
        let mut seg = Vec::new();
        encode_record_into(&mut seg, &header, &[1u8; 100]);
        assert_eq!(decode_record(&seg[..60], 0), Err(RecordFault::Truncated));
    }
}
