//! `splice(2)` for the pump (`limits.splice`): where both legs are plaintext TCP, the bytes
//! move socket → pipe → socket and never enter user space.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::error::SessionError;

/// The largest splice asked for at once (a pipe holds 64 KiB unless resized).
const SPLICE_CHUNK: usize = 64 * 1024;

/// One pipe per direction, made when a session starts pumping. None when the process is out
/// of descriptors: the session is then pumped through user space instead.
pub(super) struct Pipes {
    up: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    down: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
}

impl Pipes {
    pub(super) fn new() -> Option<Pipes> {
        let flags = rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK;
        let up = rustix::pipe::pipe_with(flags).ok()?;
        let down = rustix::pipe::pipe_with(flags).ok()?;
        Some(Pipes { up, down })
    }
}

/// Both directions until both have ended, counting (bytes to the server, bytes to the client)
/// in `moved` as they go.
pub(super) async fn splice_both(
    client: &TcpStream,
    server: &TcpStream,
    pipes: &Pipes,
    moved: &(AtomicU64, AtomicU64),
) -> Result<(), SessionError> {
    let up = async {
        splice_one_way(client, server, &pipes.up, &moved.0).await.map_err(|e| match e {
            Side::From(e) => SessionError::ClientIo(e),
            Side::To(e) => SessionError::UpstreamIo(e),
        })
    };
    let down = async {
        splice_one_way(server, client, &pipes.down, &moved.1).await.map_err(|e| match e {
            Side::From(e) => SessionError::UpstreamIo(e),
            Side::To(e) => SessionError::ClientIo(e),
        })
    };
    tokio::try_join!(up, down).map(|_| ())
}

/// Which end of one direction failed.
enum Side {
    From(std::io::Error),
    To(std::io::Error),
}

/// Moves what `from` sends to `to` through `pipe` until `from` ends, then ends `to`'s
/// writing side (as the copying pump does). The pipe is always empty when `from` is read, so a
/// splice that would block is waiting for the socket named in its readiness, never the pipe.
async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &(std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    moved: &AtomicU64,
) -> Result<(), Side> {
    use rustix::pipe::{SpliceFlags, splice};
    let (out_of_pipe, into_pipe) = pipe;
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        let n = from
            .async_io(Interest::READABLE, || Ok(splice(from, None, into_pipe, None, SPLICE_CHUNK, flags)?))
            .await
            .map_err(Side::From)?;
        if n == 0 {
            return match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                Ok(()) => Ok(()),
                // The other side may have closed already.
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
                Err(e) => Err(Side::To(e)),
            };
        }
        let mut left = n;
        while left > 0 {
            let m = to
                .async_io(Interest::WRITABLE, || Ok(splice(out_of_pipe, None, to, None, left, flags)?))
                .await
                .map_err(Side::To)?;
            if m == 0 {
                // A pipe holding `left` bytes never yields none; do not spin if it does.
                return Err(Side::To(std::io::ErrorKind::WriteZero.into()));
            }
            left = left.saturating_sub(m);
            moved.fetch_add(u64::try_from(m).unwrap_or(u64::MAX), Relaxed);
        }
    }
}
