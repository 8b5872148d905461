//! One side of a connection: a stream plus its read buffer (frames are split off it as frozen
//! slices), and who the session is. Below `session`, so the layers it uses (forwarding,
//! audit, containment) never import from it.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::SessionError;
use crate::protocol::{Direction, Frame, decode};

/// Who a session is, for logs, audit events and the operators' session list.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    pub id: String,
    pub client: String,
    pub user: String,
    pub database: String,
    pub application: String,
}

const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug)]
pub struct Conn<S> {
    pub io: S,
    pub rbuf: BytesMut,
    dir: Direction,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S, dir: Direction, leftover: BytesMut) -> Self {
        let mut rbuf = leftover;
        rbuf.reserve(READ_CHUNK);
        Conn { io, rbuf, dir }
    }

    /// The stream and the direction its frames come from (its read buffer must be empty).
    pub fn into_io(self) -> (S, Direction) {
        debug_assert!(self.rbuf.is_empty());
        (self.io, self.dir)
    }

    /// Reads the next whole frame; `Ok(None)` at a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            if let Some(frame) = decode(&mut self.rbuf, self.dir).map_err(|e| SessionError::frame(self.dir, e))? {
                return Ok(Some(frame));
            }
            if self.rbuf.capacity().saturating_sub(self.rbuf.len()) < 1024 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let n = self.io.read_buf(&mut self.rbuf).await.map_err(|e| SessionError::io(self.dir, e))?;
            if n == 0 {
                return if self.rbuf.is_empty() { Ok(None) } else { Err(SessionError::Truncated(self.dir)) };
            }
        }
    }

    /// The next frame if one is already buffered, without reading.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, SessionError> {
        decode(&mut self.rbuf, self.dir).map_err(|e| SessionError::frame(self.dir, e))
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        // A write error is this connection's peer going away: the side this connection's
        // frames come from (a client connection's write fails when the client is gone).
        self.io.write_all(bytes).await.map_err(|e| SessionError::io(self.dir, e))
    }

    pub async fn flush(&mut self) -> Result<(), SessionError> {
        self.io.flush().await.map_err(|e| SessionError::io(self.dir, e))
    }
}
