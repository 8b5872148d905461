//! Framing: splitting tagged messages off a per-connection read buffer.
//!
//! A `Frame` keeps the message exactly as it arrived (tag, length and body) as a frozen slice
//! of the read buffer, so forwarding it is a reference-count bump, never a copy.
//! Does no I/O and knows nothing about what a message means beyond its tag and direction.

use bytes::{Bytes, BytesMut};

/// Largest message PostgreSQL accepts for Query, Parse, Bind, FunctionCall and CopyData
/// (`PQ_LARGE_MESSAGE_LIMIT`, MaxAllocSize - 1).
pub const LARGE_MESSAGE_LIMIT: u32 = 0x3FFF_FFFE;
/// Limit for the short control messages and for startup packets (`PQ_SMALL_MESSAGE_LIMIT`).
pub const SMALL_MESSAGE_LIMIT: u32 = 10_000;
/// Server messages: a DataRow may approach 1 GB; anything longer than this is not PostgreSQL.
pub const SERVER_MESSAGE_LIMIT: u32 = 0x7FFF_FFFF;

/// One protocol message exactly as it arrived; `raw` includes tag and length.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    tag: u8,
    raw: Bytes,
}

impl std::fmt::Debug for Frame {
    // Never print payloads: they may carry protected values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame").field("tag", &char::from(self.tag)).field("len", &self.raw.len()).finish()
    }
}

impl Frame {
    /// Builds a frame from a complete encoded message (tag, length, body).
    /// Returns `None` if the bytes are not one well-formed message.
    pub fn from_encoded(raw: Bytes) -> Option<Frame> {
        let &[tag, l0, l1, l2, l3] = raw.first_chunk::<5>()?;
        let len = usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).ok()?;
        (len.checked_add(1)? == raw.len() && len >= 4).then_some(Frame { tag, raw })
    }

    pub fn tag(&self) -> u8 {
        self.tag
    }

    /// The message body after tag and length: a cheap slice of the same buffer.
    pub fn body(&self) -> Bytes {
        self.raw.slice(5..)
    }

    /// The body as a borrowed slice.
    pub fn body_ref(&self) -> &[u8] {
        self.raw.get(5..).unwrap_or_default()
    }

    /// The whole message as it arrived, for writing on unchanged.
    pub fn as_bytes(&self) -> &Bytes {
        &self.raw
    }

    pub fn into_bytes(self) -> Bytes {
        self.raw
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid frontend message type {}", char::from(*.0))]
    UnknownTag(u8),
    #[error("invalid message length {len} for message type {}", char::from(*tag))]
    BadLength { tag: u8, len: u32 },
}

/// Which peer produced the bytes: the limits and the set of valid tags differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromClient,
    FromServer,
}

/// The length limit PostgreSQL applies to a frontend message with this tag, or `None` when the
/// tag is not a frontend message at all (the server answers that with FATAL, and so do we).
pub fn client_limit(tag: u8) -> Option<u32> {
    match tag {
        b'Q' | b'P' | b'B' | b'F' | b'd' | b'p' => Some(LARGE_MESSAGE_LIMIT),
        b'X' | b'C' | b'D' | b'E' | b'H' | b'S' | b'c' | b'f' => Some(SMALL_MESSAGE_LIMIT),
        _ => None,
    }
}

/// Splits one frame off the front of `buf`. Incomplete input is `Ok(None)`; the buffer keeps
/// what it has and grows to hold the rest of the message.
pub fn decode(buf: &mut BytesMut, dir: Direction) -> Result<Option<Frame>, FrameError> {
    let Some(&[tag, l0, l1, l2, l3]) = buf.first_chunk::<5>() else {
        // Validate the type byte as soon as it arrives, before waiting for a length.
        if let (Direction::FromClient, Some(&tag)) = (dir, buf.first()) {
            client_limit(tag).ok_or(FrameError::UnknownTag(tag))?;
        }
        return Ok(None);
    };
    let max = match dir {
        Direction::FromClient => client_limit(tag).ok_or(FrameError::UnknownTag(tag))?,
        Direction::FromServer => SERVER_MESSAGE_LIMIT,
    };
    let len = u32::from_be_bytes([l0, l1, l2, l3]);
    if !(4..=max).contains(&len) {
        return Err(FrameError::BadLength { tag, len });
    }
    let total = usize::try_from(len).ok().and_then(|l| l.checked_add(1)).ok_or(FrameError::BadLength { tag, len })?;
    if buf.len() < total {
        // Reserve only up to a modest amount ahead; huge messages grow as bytes arrive, so a
        // lying length prefix cannot make us allocate a gigabyte up front.
        buf.reserve(total.saturating_sub(buf.len()).min(1 << 20));
        return Ok(None);
    }
    Ok(Some(Frame { tag, raw: buf.split_to(total).freeze() }))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(u32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn splits_frames_and_keeps_bytes() {
        let mut input = msg(b'Q', b"select 1\0");
        input.extend(msg(b'S', b""));
        let mut buf = BytesMut::from(&input[..3]);
        assert_eq!(decode(&mut buf, Direction::FromClient), Ok(None));
        buf.extend_from_slice(&input[3..]);
        let q = decode(&mut buf, Direction::FromClient).unwrap().unwrap();
        assert_eq!(q.tag(), b'Q');
        assert_eq!(&q.body()[..], b"select 1\0");
        let s = decode(&mut buf, Direction::FromClient).unwrap().unwrap();
        assert_eq!(s.as_bytes().len(), 5);
        assert!(buf.is_empty());
        assert_eq!([q.as_bytes().as_ref(), s.as_bytes()].concat(), input);
    }

    #[test]
    fn rejects_bad_lengths_and_tags() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(decode(&mut buf, Direction::FromClient), Err(FrameError::BadLength { tag: b'Q', len: 3 }));
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(decode(&mut buf, Direction::FromClient).is_err());
        let mut buf = BytesMut::from(&[b'S', 0, 0, 0x27, 0x11][..]);
        assert!(decode(&mut buf, Direction::FromClient).is_err(), "Sync over the small limit");
        let mut buf = BytesMut::from(&[b'Z'][..]);
        assert_eq!(decode(&mut buf, Direction::FromClient), Err(FrameError::UnknownTag(b'Z')));
        let mut buf = BytesMut::from(&[b'Z', 0, 0, 0, 5, b'I'][..]);
        assert!(decode(&mut buf, Direction::FromServer).unwrap().is_some());
    }

    #[test]
    fn huge_length_does_not_allocate_up_front() {
        let mut buf = BytesMut::from(&[b'd', 0x3f, 0xff, 0xff, 0xf0][..]);
        assert_eq!(decode(&mut buf, Direction::FromClient), Ok(None));
        assert!(buf.capacity() < 2 << 20);
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn encode(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(u32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    proptest! {
        /// Any sequence of messages, split at any points, decodes to the same messages with
        /// the same bytes.
        #[test]
        fn framing_round_trips(msgs in proptest::collection::vec((prop::sample::select(&b"QPBDESHCXdcf"[..]), proptest::collection::vec(any::<u8>(), 0..300)), 1..20),
                               cuts in proptest::collection::vec(1usize..64, 1..50)) {
            let stream: Vec<u8> = msgs.iter().flat_map(|(t, b)| encode(*t, b)).collect();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while pos < stream.len() {
                let n = (*cut.next().unwrap()).min(stream.len() - pos);
                buf.extend_from_slice(&stream[pos..pos + n]);
                pos += n;
                while let Some(f) = decode(&mut buf, Direction::FromClient).unwrap() {
                    out.extend_from_slice(f.as_bytes());
                }
            }
            prop_assert_eq!(out, stream);
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            for dir in [Direction::FromClient, Direction::FromServer] {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = decode(&mut buf, dir) {}
            }
        }
    }
}
