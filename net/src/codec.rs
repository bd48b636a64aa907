//! The binary protocol v1 codec: frames to bytes and back, with every length bounded and
//! every malformed input an error (never a panic). docs/PROTOCOL.md specifies the format;
//! this file is its reference implementation.
//!
//! Frame: `u32 length` (big-endian, of what follows), `u8 kind`, `u8 flags`, `u64 request
//! id`, then the kind's payload. Strings are `u16 length` + UTF-8; blobs are `u32 length` +
//! bytes; lists are `u16 count` + items.

/// The protocol version this codec speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes after the length prefix that every frame has: kind, flags, request id.
pub const FRAME_HEADER_BYTES: usize = 1 + 1 + 8;
/// The largest frame (after its length prefix) either side accepts by default.
pub const FRAME_MAX_BYTES_DEFAULT: u32 = 4 * 1024 * 1024;
/// Items in one batch at most (create, get, cancel, results).
pub const BATCH_MAX: usize = 1_000;
/// Bytes in a string (id, token, message) at most.
pub const STRING_MAX_BYTES: usize = 1_024;

/// Flag bit: the request may be served from a replica's local state (a stale read).
/// Ignored by a single node; every bit but the known ones must be zero in v1.
pub const FLAG_STALE_OK: u8 = 0b0000_0001;
/// Flag bit of Create and Upsert: each created or replaced job is answered with its id only
/// (`{"id"}`), not the whole job (HTTP's `Prefer: return=minimal`). Ignored on other kinds.
/// A node before it answers the frame with an Error (an unknown bit) and closes the connection.
pub const FLAG_MINIMAL: u8 = 0b0000_0010;
const FLAGS_KNOWN: u8 = FLAG_STALE_OK | FLAG_MINIMAL;

/// Frame-level error codes; they mirror HTTP's statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// 400: the frame is malformed or not allowed here.
    BadRequest,
    /// 401: the handshake's token is missing or wrong.
    Unauthorized,
    /// 413: the frame exceeds the receiver's maximum.
    TooLarge,
    /// 429: the token's request rate is exceeded.
    RateLimited,
    /// 503: the node is busy or stopping.
    Unavailable,
    /// 505: no protocol version both sides speak.
    UnsupportedVersion,
    /// Another code (from a newer peer), kept as it came.
    Other(u16),
}

impl Code {
    pub fn as_u16(self) -> u16 {
        match self {
            Code::BadRequest => 400,
            Code::Unauthorized => 401,
            Code::TooLarge => 413,
            Code::RateLimited => 429,
            Code::Unavailable => 503,
            Code::UnsupportedVersion => 505,
            Code::Other(code) => code,
        }
    }

    pub fn from_u16(code: u16) -> Code {
        match code {
            400 => Code::BadRequest,
            401 => Code::Unauthorized,
            413 => Code::TooLarge,
            429 => Code::RateLimited,
            503 => Code::Unavailable,
            505 => Code::UnsupportedVersion,
            other => Code::Other(other),
        }
    }
}

/// One item's answer in a `Results` frame: an HTTP status, when to retry (429/503/507) and
/// the JSON body the HTTP API would have answered (empty for none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub status: u16,
    pub retry_after_s: u32,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Client → server, first frame: the versions it speaks and its bearer token ("" none).
    Hello {
        min_version: u16,
        max_version: u16,
        token: String,
    },
    /// Server → client: the version chosen and what the client needs to know.
    Welcome {
        version: u16,
        node_id: u64,
        partitions: u32,
        frame_max_bytes: u32,
    },
    /// Create jobs; each item is a job request document (JSON, as `POST /jobs` takes).
    Create {
        jobs: Vec<Vec<u8>>,
    },
    /// Read jobs by id.
    Get {
        ids: Vec<String>,
    },
    /// Cancel jobs by id.
    Cancel {
        ids: Vec<String>,
    },
    /// Create jobs, or replace the spec of the job with each one's id (`PUT /jobs/{id}`);
    /// each item is a job request document with its `id`.
    Upsert {
        jobs: Vec<Vec<u8>>,
    },
    /// An extra fire now of each job, with its own key (`POST /jobs/{id}/trigger`).
    Trigger {
        ids: Vec<String>,
    },
    Ping,
    Pong,
    /// Asks for the cluster's map; answered by `Results` with one item whose body is JSON:
    /// `{"partitions": N, "members": [{"node_id", "binary"}], "leaders": [node id or null,
    /// one per partition]}`. A client sends a job's requests to its partition's leader.
    Topology,
    /// The answers to a Create, Get, Cancel, Upsert or Trigger, one per item, in order.
    Results {
        items: Vec<Item>,
    },
    /// The whole frame (or connection) was refused.
    Error {
        code: Code,
        message: String,
    },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 0x01,
            Message::Welcome { .. } => 0x02,
            Message::Create { .. } => 0x10,
            Message::Get { .. } => 0x11,
            Message::Cancel { .. } => 0x12,
            Message::Ping => 0x13,
            Message::Pong => 0x14,
            Message::Topology => 0x15,
            Message::Upsert { .. } => 0x16,
            Message::Trigger { .. } => 0x17,
            Message::Results { .. } => 0x20,
            Message::Error { .. } => 0x7F,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Chosen by the client, echoed by the server; matches answers to requests when several
    /// are in flight (pipelining). The handshake uses 0.
    pub request_id: u64,
    pub flags: u8,
    pub message: Message,
}

impl Frame {
    pub fn new(request_id: u64, message: Message) -> Frame {
        Frame { request_id, flags: 0, message }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len_bytes} bytes exceeds the maximum of {max_bytes}")]
    TooLarge { len_bytes: u32, max_bytes: u32 },
    #[error("frame of {len_bytes} bytes is shorter than its {FRAME_HEADER_BYTES}-byte header")]
    TooShort { len_bytes: u32 },
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("flags: unknown bits 0x{0:02x} (v1 knows 0x01 and 0x02)")]
    UnknownFlags(u8),
    #[error("{field}: the frame ends inside it")]
    Truncated { field: &'static str },
    #[error("{field}: {count} items, more than the {max} allowed")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("{field}: {len_bytes} bytes, more than the {max_bytes} allowed")]
    StringTooLong { field: &'static str, len_bytes: usize, max_bytes: usize },
    #[error("{field}: not UTF-8")]
    NotUtf8 { field: &'static str },
    #[error("{0} bytes after the payload")]
    TrailingBytes(usize),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{field}: {count} items, more than the {max} allowed")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("{field}: {len_bytes} bytes, more than the {max_bytes} allowed")]
    TooLong { field: &'static str, len_bytes: usize, max_bytes: usize },
    #[error("the frame would be {len_bytes} bytes, more than the maximum of {max_bytes}")]
    FrameTooLarge { len_bytes: usize, max_bytes: u32 },
}

/// Appends the frame's bytes to `out`; on error `out` is unchanged.
pub fn encode(frame: &Frame, frame_max_bytes: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let result = encode_unchecked(frame, out).and_then(|()| {
        let len_bytes = out.len() - start - 4;
        if len_bytes > frame_max_bytes as usize {
            return Err(EncodeError::FrameTooLarge { len_bytes, max_bytes: frame_max_bytes });
        }
        out[start..start + 4].copy_from_slice(&(len_bytes as u32).to_be_bytes());
        Ok(())
    });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_unchecked(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.extend_from_slice(&[0; 4]); // the length, filled in by `encode`
    out.push(frame.message.kind());
    out.push(frame.flags);
    out.extend_from_slice(&frame.request_id.to_be_bytes());
    match &frame.message {
        Message::Hello { min_version, max_version, token } => {
            out.extend_from_slice(&min_version.to_be_bytes());
            out.extend_from_slice(&max_version.to_be_bytes());
            put_string(out, "token", token)?;
        }
        Message::Welcome { version, node_id, partitions, frame_max_bytes } => {
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&node_id.to_be_bytes());
            out.extend_from_slice(&partitions.to_be_bytes());
            out.extend_from_slice(&frame_max_bytes.to_be_bytes());
        }
        Message::Create { jobs } | Message::Upsert { jobs } => {
            put_count(out, "jobs", jobs.len())?;
            for job in jobs {
                put_blob(out, "jobs[]", job)?;
            }
        }
        Message::Get { ids } | Message::Cancel { ids } | Message::Trigger { ids } => {
            put_count(out, "ids", ids.len())?;
            for id in ids {
                put_string(out, "ids[]", id)?;
            }
        }
        Message::Ping | Message::Pong | Message::Topology => {}
        Message::Results { items } => {
            put_count(out, "items", items.len())?;
            for item in items {
                out.extend_from_slice(&item.status.to_be_bytes());
                out.extend_from_slice(&item.retry_after_s.to_be_bytes());
                put_blob(out, "items[].body", &item.body)?;
            }
        }
        Message::Error { code, message } => {
            out.extend_from_slice(&code.as_u16().to_be_bytes());
            put_string(out, "message", message)?;
        }
    }
    Ok(())
}

fn put_count(out: &mut Vec<u8>, field: &'static str, count: usize) -> Result<(), EncodeError> {
    if count > BATCH_MAX {
        return Err(EncodeError::TooMany { field, count, max: BATCH_MAX });
    }
    out.extend_from_slice(&(count as u16).to_be_bytes());
    Ok(())
}

fn put_string(out: &mut Vec<u8>, field: &'static str, text: &str) -> Result<(), EncodeError> {
    if text.len() > STRING_MAX_BYTES {
        return Err(EncodeError::TooLong { field, len_bytes: text.len(), max_bytes: STRING_MAX_BYTES });
    }
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

fn put_blob(out: &mut Vec<u8>, field: &'static str, bytes: &[u8]) -> Result<(), EncodeError> {
    let len_bytes = u32::try_from(bytes.len()).map_err(|_| EncodeError::TooLong {
        field,
        len_bytes: bytes.len(),
        max_bytes: u32::MAX as usize,
    })?;
    out.extend_from_slice(&len_bytes.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// The length a frame announces, once 4 bytes are in: lets a reader refuse an oversized
/// frame before buffering it.
pub fn announced_len(buf: &[u8], frame_max_bytes: u32) -> Result<Option<u32>, DecodeError> {
    let Some(prefix) = buf.get(..4) else { return Ok(None) };
    let len_bytes = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
    if len_bytes > frame_max_bytes {
        return Err(DecodeError::TooLarge { len_bytes, max_bytes: frame_max_bytes });
    }
    if (len_bytes as usize) < FRAME_HEADER_BYTES {
        return Err(DecodeError::TooShort { len_bytes });
    }
    Ok(Some(len_bytes))
}

/// Decodes the first frame in `buf`: `Ok(None)` when more bytes are needed, else the frame
/// and how many bytes it took. An error means the stream is unusable (close it).
pub fn decode(buf: &[u8], frame_max_bytes: u32) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(len_bytes) = announced_len(buf, frame_max_bytes)? else { return Ok(None) };
    let total = 4 + len_bytes as usize;
    let Some(body) = buf.get(4..total) else { return Ok(None) };
    let mut reader = Reader { bytes: body };
    let kind = reader.u8("kind")?;
    let flags = reader.u8("flags")?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(DecodeError::UnknownFlags(flags & !FLAGS_KNOWN));
    }
    let request_id = reader.u64("request_id")?;
    let message = match kind {
        0x01 => Message::Hello {
            min_version: reader.u16("min_version")?,
            max_version: reader.u16("max_version")?,
            token: reader.string("token")?,
        },
        0x02 => Message::Welcome {
            version: reader.u16("version")?,
            node_id: reader.u64("node_id")?,
            partitions: reader.u32("partitions")?,
            frame_max_bytes: reader.u32("frame_max_bytes")?,
        },
        0x10 | 0x16 => {
            let count = reader.count("jobs")?;
            let jobs = (0..count).map(|_| reader.blob("jobs[]")).collect::<Result<_, _>>()?;
            if kind == 0x10 {
                Message::Create { jobs }
            } else {
                Message::Upsert { jobs }
            }
        }
        0x11 | 0x12 | 0x17 => {
            let count = reader.count("ids")?;
            let ids = (0..count).map(|_| reader.string("ids[]")).collect::<Result<_, _>>()?;
            match kind {
                0x11 => Message::Get { ids },
                0x12 => Message::Cancel { ids },
                _ => Message::Trigger { ids },
            }
        }
        0x13 => Message::Ping,
        0x14 => Message::Pong,
        0x15 => Message::Topology,
        0x20 => {
            let count = reader.count("items")?;
            let items = (0..count)
                .map(|_| {
                    Ok(Item {
                        status: reader.u16("items[].status")?,
                        retry_after_s: reader.u32("items[].retry_after_s")?,
                        body: reader.blob("items[].body")?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Message::Results { items }
        }
        0x7F => Message::Error { code: Code::from_u16(reader.u16("code")?), message: reader.string("message")? },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if !reader.bytes.is_empty() {
        return Err(DecodeError::TrailingBytes(reader.bytes.len()));
    }
    Ok(Some((Frame { request_id, flags, message }, total)))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(field, 1)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(field, 2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(field, 4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(field, 8)?.try_into().expect("8 bytes")))
    }

    fn count(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let count = self.u16(field)? as usize;
        if count > BATCH_MAX {
            return Err(DecodeError::TooMany { field, count, max: BATCH_MAX });
        }
        Ok(count)
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len_bytes = self.u16(field)? as usize;
        if len_bytes > STRING_MAX_BYTES {
            return Err(DecodeError::StringTooLong { field, len_bytes, max_bytes: STRING_MAX_BYTES });
        }
        let bytes = self.take(field, len_bytes)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8 { field })
    }

    fn blob(&mut self, field: &'static str) -> Result<Vec<u8>, DecodeError> {
        let len_bytes = self.u32(field)? as usize;
        Ok(self.take(field, len_bytes)?.to_vec())
    }
}
