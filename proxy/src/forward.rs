//! Zero-copy forwarding for sessions that need no inspection: after startup the two streams
//! are joined by a byte pump. Its only contract is byte-for-byte fidelity. Where both legs
//! are plaintext TCP and `limits.splice` is on, the bytes move through a pipe with
//! `splice(2)` and never enter user space.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

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
    let ended = WhenWoken::new(async {
        tokio::select! {
            () = shared.hard_stop.cancelled() => SessionError::Shutdown,
            () = killed.cancelled() => SessionError::Terminated,
        }
    });
    if shared.config.limits.splice
        && let (Some(c), Some(s)) = (client.io.plain_tcp(), server.io.plain_tcp())
        && let Some(pipes) = Pipes::new()
    {
        // Atomics only because the session's future must be Send; one task touches them.
        let moved = (AtomicU64::new(0), AtomicU64::new(0));
        let spliced = tokio::select! {
            biased;
            r = splice_both(c, s, &pipes, &moved) => r,
            e = ended => Err(e),
        };
        shared.metrics.forwarded(moved.0.load(Relaxed), moved.1.load(Relaxed));
        return spliced;
    }
    let mut c = Watched { io: &mut client.io, failed: false, written: 0 };
    let mut s = Watched { io: &mut server.io, failed: false, written: 0 };
    let copied = tokio::select! {
        biased;
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut s, PUMP_BUFFER, PUMP_BUFFER) => Ok(r),
        e = ended => Err(e),
    };
    // Counted however the session ended: an I/O error or an operator's stop too.
    shared.metrics.forwarded(s.written, c.written);
    match copied {
        Err(e) => Err(e),
        Ok(Ok(_)) => Ok(()),
        // The side whose read or write failed is the one that went away.
        Ok(Err(e)) if s.failed && !c.failed => Err(SessionError::UpstreamIo(e)),
        Ok(Err(e)) => Err(SessionError::ClientIo(e)),
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

/// Both directions until both have ended, counting (bytes to the server, bytes to the client)
/// in `moved` as they go.
async fn splice_both(
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

/// A stream that remembers whether one of its reads or writes failed, so a failure of the
/// bidirectional copy can be told apart by side.
struct Watched<'a, S> {
    io: &'a mut S,
    failed: bool,
    /// Bytes written to this stream so far.
    written: u64,
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
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.written = self.written.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        }
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
        let mut w = Watched { io: &mut a, failed: false, written: 0 };
        let e = tokio::io::AsyncWriteExt::write_all(&mut w, b"hello").await;
        assert!(e.is_err());
        assert!(w.failed);
    }

    #[tokio::test]
    async fn bytes_written_are_counted_as_they_go() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut w = Watched { io: &mut a, failed: false, written: 0 };
        tokio::io::AsyncWriteExt::write_all(&mut w, b"hello").await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut w, b", world").await.unwrap();
        assert_eq!(w.written, 12);
        let mut got = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut got).await.unwrap();
        assert_eq!(&got, b"hello, world");
    }
}
