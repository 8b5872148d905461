//! Zero-copy forwarding for sessions that need no inspection: after startup the two streams
//! are joined by a byte pump. Its only contract is byte-for-byte fidelity. Where both legs
//! are plaintext TCP and `limits.splice` is on, the bytes move through a pipe with
//! `splice(2)` and never enter user space.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;

use crate::Shared;
use crate::conn::Conn;
use crate::error::SessionError;

/// Buffer size per direction: large enough that a big result moves in few syscalls.
const PUMP_BUFFER: usize = 64 * 1024;

/// A stream that may be plaintext TCP underneath (then the pump can splice it).
pub trait PlainTcp {
    fn plain_tcp(&self) -> Option<&TcpStream>;
}

pub async fn pump<C, S>(
    shared: &Arc<Shared>,
    client: &mut Conn<C>,
    server: &mut Conn<S>,
    killed: &tokio_util::sync::CancellationToken,
) -> Result<(), SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin + PlainTcp,
    S: AsyncRead + AsyncWrite + Unpin + PlainTcp,
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
    if shared.config.limits.splice
        && let (Some(c), Some(s)) = (client.io.plain_tcp(), server.io.plain_tcp())
        && let Some(pipes) = Pipes::new()
    {
        let ended = WhenWoken::new(async {
            tokio::select! {
                () = shared.hard_stop.cancelled() => SessionError::Shutdown,
                () = killed.cancelled() => SessionError::Terminated,
            }
        });
        let (to_server, to_client) = tokio::select! {
            biased;
            r = splice_both(c, s, &pipes) => r?,
            e = ended => return Err(e),
        };
        shared.metrics.forwarded(to_server, to_client);
        return Ok(());
    }
    let mut c = Watched { io: &mut client.io, failed: false };
    let mut s = Watched { io: &mut server.io, failed: false };
    let ended = WhenWoken::new(async {
        tokio::select! {
            () = shared.hard_stop.cancelled() => SessionError::Shutdown,
            () = killed.cancelled() => SessionError::Terminated,
        }
    });
    let copied = tokio::select! {
        biased;
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut s, PUMP_BUFFER, PUMP_BUFFER) => r,
        e = ended => return Err(e),
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

/// The largest splice asked for at once (a pipe holds 64 KiB unless resized).
const SPLICE_CHUNK: usize = 64 * 1024;

/// One pipe per direction, made when a session starts pumping. None when the process is out
/// of descriptors: the session is then pumped through user space instead.
struct Pipes {
    up: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    down: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
}

impl Pipes {
    fn new() -> Option<Pipes> {
        let flags = rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK;
        let up = rustix::pipe::pipe_with(flags).ok()?;
        let down = rustix::pipe::pipe_with(flags).ok()?;
        Some(Pipes { up, down })
    }
}

/// Both directions until both have ended; (bytes to the server, bytes to the client).
async fn splice_both(client: &TcpStream, server: &TcpStream, pipes: &Pipes) -> Result<(u64, u64), SessionError> {
    let up = async {
        splice_one_way(client, server, &pipes.up).await.map_err(|e| match e {
            Side::From(e) => SessionError::ClientIo(e),
            Side::To(e) => SessionError::UpstreamIo(e),
        })
    };
    let down = async {
        splice_one_way(server, client, &pipes.down).await.map_err(|e| match e {
            Side::From(e) => SessionError::UpstreamIo(e),
            Side::To(e) => SessionError::ClientIo(e),
        })
    };
    tokio::try_join!(up, down)
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
) -> Result<u64, Side> {
    use rustix::pipe::{SpliceFlags, splice};
    let (out_of_pipe, into_pipe) = pipe;
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let mut total = 0u64;
    loop {
        let n = from
            .async_io(Interest::READABLE, || Ok(splice(from, None, into_pipe, None, SPLICE_CHUNK, flags)?))
            .await
            .map_err(Side::From)?;
        if n == 0 {
            return match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                Ok(()) => Ok(total),
                // The other side may have closed already.
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(total),
                Err(e) => Err(Side::To(e)),
            };
        }
        let mut left = n;
        while left > 0 {
            let m = to
                .async_io(Interest::WRITABLE, || Ok(splice(out_of_pipe, None, to, None, left, flags)?))
                .await
                .map_err(Side::To)?;
            left = left.saturating_sub(m);
        }
        total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
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

/// A future polled only after its own waker fired (and on the first poll). A session's task
/// wakes for every message, and polling the end-of-session waits each time (a lock per
/// cancellation token) was a visible share of the pump's own CPU.
pub(crate) struct WhenWoken<F> {
    inner: std::pin::Pin<Box<F>>,
    flag: Arc<WakeFlag>,
    first: bool,
}

struct WakeFlag {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl<F: std::future::Future> WhenWoken<F> {
    pub(crate) fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag { woken: false.into(), task: futures_util::task::AtomicWaker::new() });
        WhenWoken { inner: Box::pin(inner), flag, first: true }
    }
}

impl<F: std::future::Future> std::future::Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        self.flag.task.register(cx.waker());
        let woken = self.flag.woken.swap(false, std::sync::atomic::Ordering::AcqRel);
        if !woken && !std::mem::take(&mut self.first) {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(Arc::clone(&self.flag));
        self.inner.as_mut().poll(&mut std::task::Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_polled_only_when_woken_still_ends_when_its_token_is_cancelled() {
        let token = tokio_util::sync::CancellationToken::new();
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&polls);
        let mut cancelled = Box::pin(token.clone().cancelled_owned());
        let mut wait = WhenWoken::new(std::future::poll_fn(move |cx| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            cancelled.as_mut().poll(cx)
        }));
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        for _ in 0..5 {
            assert!(std::pin::Pin::new(&mut wait).poll(&mut cx).is_pending());
        }
        // Polled once: later polls without a wake-up of its own leave it alone.
        assert_eq!(polls.load(std::sync::atomic::Ordering::Relaxed), 1);
        let task = tokio::spawn(wait);
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), task).await.unwrap().unwrap();
    }

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
