//! Zero-copy forwarding for sessions that need no inspection: after startup the two streams
//! are joined by a byte pump. Its only contract is byte-for-byte fidelity. Where both legs
//! are plaintext TCP the sockets go to a pump thread's event loop (`event_loop`), or with
//! `limits.splice` the bytes move through a pipe (`splice`); TLS legs are copied by tokio in
//! the session's task.

pub mod event_loop;
mod splice;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::Shared;
use crate::conn::Conn;
use crate::error::SessionError;

/// Buffer size per direction: large enough that a big result moves in few syscalls.
const PUMP_BUFFER: usize = 64 * 1024;

/// A stream that may be plaintext TCP underneath (then the pump can splice it or hand it to
/// a pump thread).
pub trait PlainTcp: Sized {
    fn plain_tcp(&self) -> Option<&TcpStream>;
    /// The TCP stream, or the stream unchanged when it is not plaintext TCP.
    fn into_plain_tcp(self) -> Result<TcpStream, Self>;
    fn from_plain_tcp(tcp: TcpStream) -> Self;
}

/// Joins the two legs until the session ends. The client's connection comes back (for the
/// last word to the client) unless it was lost with a pump thread.
pub async fn pump<C, S>(
    shared: &Arc<Shared>,
    mut client: Conn<C>,
    mut server: Conn<S>,
    killed: &tokio_util::sync::CancellationToken,
) -> (Result<(), SessionError>, Option<Conn<C>>)
where
    C: AsyncRead + AsyncWrite + Unpin + PlainTcp,
    S: AsyncRead + AsyncWrite + Unpin + PlainTcp,
{
    // Bytes already read past the last frame we handled belong to the other side first.
    if let Err(e) = hand_over_buffered(&mut client, &mut server).await {
        return (Err(e), Some(client));
    }
    let limits = &shared.config.limits;
    if limits.pump == crate::config::Pump::Loop
        && !limits.splice
        && client.io.plain_tcp().is_some()
        && server.io.plain_tcp().is_some()
        && let Some(loops) = shared.pump_loops.get(|| limits.pump_threads.count(crate::workers::cores()))
    {
        return on_loop(shared, loops, client, server, killed).await;
    }
    let ended = in_task(shared, &mut client, &mut server, killed).await;
    (ended, Some(client))
}

async fn hand_over_buffered<C, S>(client: &mut Conn<C>, server: &mut Conn<S>) -> Result<(), SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !client.rbuf.is_empty() {
        let pending = client.rbuf.split();
        server.write_all(&pending).await?;
    }
    if !server.rbuf.is_empty() {
        let pending = server.rbuf.split();
        client.write_all(&pending).await?;
    }
    client.flush().await?;
    server.flush().await
}

/// The session's end signals: the operator's stop and the end of the grace period.
fn ended(shared: &Shared, killed: &tokio_util::sync::CancellationToken) -> impl Future<Output = SessionError> {
    let (hard_stop, killed) = (shared.hard_stop.clone(), killed.clone());
    WhenWoken::new(async move {
        tokio::select! {
            () = hard_stop.cancelled() => SessionError::Shutdown,
            () = killed.cancelled() => SessionError::Terminated,
        }
    })
}

/// Pumps on one of the pump threads: the sockets leave this task's runtime until the session
/// ends or is stopped.
async fn on_loop<C, S>(
    shared: &Arc<Shared>,
    loops: &event_loop::Loops,
    client: Conn<C>,
    server: Conn<S>,
    killed: &tokio_util::sync::CancellationToken,
) -> (Result<(), SessionError>, Option<Conn<C>>)
where
    C: AsyncRead + AsyncWrite + Unpin + PlainTcp,
    S: AsyncRead + AsyncWrite + Unpin + PlainTcp,
{
    let (client, direction) = client.into_io();
    let (server, _) = server.into_io();
    // Both are plaintext TCP (checked by the caller); tokio gives them up deregistered and
    // non-blocking.
    let (Ok(c), Ok(s)) = (client.into_plain_tcp(), server.into_plain_tcp()) else {
        return (Err(SessionError::Internal("pump: a leg is not plaintext TCP")), None);
    };
    let (c, s) = match (c.into_std(), s.into_std()) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) => return (Err(SessionError::ClientIo(e)), None),
        (_, Err(e)) => return (Err(SessionError::UpstreamIo(e)), None),
    };
    let Some(mut ticket) = loops.submit(c, s) else {
        return (Err(SessionError::Internal("pump: the pump thread is gone")), None);
    };
    let _on_loop = Gauged::up(&shared.metrics.pump_loop_sessions);
    let mut stopped = None;
    let answer = tokio::select! {
        biased;
        answer = &mut ticket.ended => answer,
        e = ended(shared, killed) => {
            stopped = Some(e);
            loops.stop(&ticket);
            (&mut ticket.ended).await
        }
    };
    let Ok(answer) = answer else {
        return (Err(SessionError::Internal("pump: the pump thread ended with the session")), None);
    };
    shared.metrics.forwarded(answer.to_server, answer.to_client);
    let result = match (answer.outcome, stopped) {
        (event_loop::Outcome::Closed, _) => Ok(()),
        (event_loop::Outcome::Stopped, stopped) => Err(stopped.unwrap_or(SessionError::Shutdown)),
        (event_loop::Outcome::ClientIo(e), _) => Err(SessionError::ClientIo(e)),
        (event_loop::Outcome::UpstreamIo(e), _) => Err(SessionError::UpstreamIo(e)),
    };
    // Back on this task's runtime, for the session's last word to the client.
    let client =
        TcpStream::from_std(answer.client).ok().map(|c| Conn::new(C::from_plain_tcp(c), direction, BytesMut::new()));
    (result, client)
}

/// One more on a gauge while it lives (however the session's future ends).
struct Gauged<'a>(&'a AtomicU64);

impl<'a> Gauged<'a> {
    fn up(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Gauged(gauge)
    }
}

impl Drop for Gauged<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Pumps in the session's own task: tokio's bidirectional copy, or splicing.
async fn in_task<C, S>(
    shared: &Arc<Shared>,
    client: &mut Conn<C>,
    server: &mut Conn<S>,
    killed: &tokio_util::sync::CancellationToken,
) -> Result<(), SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin + PlainTcp,
    S: AsyncRead + AsyncWrite + Unpin + PlainTcp,
{
    let ended = ended(shared, killed);
    if shared.config.limits.splice
        && let (Some(c), Some(s)) = (client.io.plain_tcp(), server.io.plain_tcp())
        && let Some(pipes) = splice::Pipes::new()
    {
        // Atomics only because the session's future must be Send; one task touches them.
        let moved = (AtomicU64::new(0), AtomicU64::new(0));
        let spliced = tokio::select! {
            biased;
            r = splice::splice_both(c, s, &pipes, &moved) => r,
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
