//! Zero-copy forwarding for sessions that need no inspection: after startup the two streams
//! are joined by a byte pump. Its only contract is byte-for-byte fidelity.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Shared;
use crate::conn::Conn;
use crate::error::SessionError;

/// Buffer size per direction: large enough that a big result moves in few syscalls.
const PUMP_BUFFER: usize = 64 * 1024;

pub async fn pump<C, S>(
    shared: &Arc<Shared>,
    client: &mut Conn<C>,
    server: &mut Conn<S>,
    killed: &tokio_util::sync::CancellationToken,
) -> Result<(), SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Bytes already read past the last frame we handled belong to the other side first.
    if !client.rbuf.is_empty() {
        let pending = client.rbuf.split();
        server.write_all(&pending).await?;
    }
    if !server.rbuf.is_empty() {
        let pending = server.rbuf.split();
        client.write_all(&pending).await?;
    }
    client.flush().await?;
    server.flush().await?;
    let mut c = Watched { io: &mut client.io, failed: false };
    let mut s = Watched { io: &mut server.io, failed: false };
    let copied = tokio::select! {
        biased;
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut s, PUMP_BUFFER, PUMP_BUFFER) => r,
        () = shared.hard_stop.cancelled() => return Err(SessionError::Shutdown),
        () = killed.cancelled() => return Err(SessionError::Terminated),
    };
    match copied {
        Ok((to_server, to_client)) => {
            shared.metrics.forwarded(to_server, to_client);
            Ok(())
        }
        // The side whose read or write failed is the one that went away.
        Err(e) if s.failed && !c.failed => Err(SessionError::UpstreamIo(e)),
        Err(e) => Err(SessionError::ClientIo(e)),
    }
}

/// A stream that remembers whether one of its reads or writes failed, so a failure of the
/// bidirectional copy can be told apart by side.
struct Watched<'a, S> {
    io: &'a mut S,
    failed: bool,
}

impl<S> Watched<'_, S> {
    /// Remembers a failed poll and passes it on.
    fn note<T>(&mut self, r: std::task::Poll<std::io::Result<T>>) -> std::task::Poll<std::io::Result<T>> {
        if matches!(r, std::task::Poll::Ready(Err(_))) {
            self.failed = true;
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut *self.io).poll_read(cx, buf);
        self.note(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.io).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut *self.io).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut *self.io).poll_shutdown(cx);
        self.note(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failure_names_the_side_that_failed() {
        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        let mut w = Watched { io: &mut a, failed: false };
        let e = tokio::io::AsyncWriteExt::write_all(&mut w, b"hello").await;
        assert!(e.is_err());
        assert!(w.failed);
    }
}
