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
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client.io, &mut server.io, PUMP_BUFFER, PUMP_BUFFER) => r,
        () = shared.hard_stop.cancelled() => return Err(SessionError::Shutdown),
        () = killed.cancelled() => return Err(SessionError::Terminated),
    };
    match copied {
        Ok((to_server, to_client)) => {
            shared.metrics.forwarded(to_server, to_client);
            Ok(())
        }
        // Either peer going away ends the session; which one is not worth an error.
        Err(e) => Err(SessionError::ClientIo(e)),
    }
}
