//! The pump's own event loops (`limits.pump: loop`, issue 18). A session whose two legs are
//! plaintext TCP leaves its tokio runtime when it starts pumping: both sockets are handed to
//! one of a few threads that each wait on one epoll set (mio, edge-triggered) and move bytes
//! with plain `read` and `write` into one buffer per thread. No task, waker or future is
//! involved per message; that machinery was most of the copying pump's user-space CPU over
//! PgBouncer's.
//!
//! A direction reads only while nothing it read is still unwritten, so a slow reader holds
//! at most one buffer's worth per direction (allocated only then, freed once written) and backpressure reaches
//! the sender through TCP, as with the copying pump. The session's task stays on its runtime,
//! parked on the loop's answer and on the session's end signals; the sockets come back with
//! the answer, so the task can still tell the client why it was stopped.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

/// Bytes read per call, and the size of each thread's one buffer.
const BUFFER: usize = 64 * 1024;
/// Reads one direction makes per turn before the loop serves other sessions (the rest waits
/// in the ready list, so a bulk transfer cannot starve the other sessions of its thread).
const READS_PER_TURN: usize = 16;
const WAKE: Token = Token(usize::MAX);

/// How a pumped session ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached their end of stream.
    Closed,
    /// Stopped on request ([`Loops::stop`]).
    Stopped,
    /// Reading from or writing to the client failed.
    ClientIo(std::io::Error),
    /// Reading from or writing to the server failed.
    UpstreamIo(std::io::Error),
}

/// The loop's answer for one session: how it ended, its sockets back, and the bytes moved.
#[derive(Debug)]
pub struct Ended {
    pub outcome: Outcome,
    pub client: std::net::TcpStream,
    pub server: std::net::TcpStream,
    pub to_server: u64,
    pub to_client: u64,
}

/// A session handed to a loop: where to stop it and where its answer arrives.
#[derive(Debug)]
pub struct Ticket {
    lane: usize,
    id: u64,
    pub ended: tokio::sync::oneshot::Receiver<Ended>,
}

enum Command {
    Add(Job),
    Stop(u64),
    /// The `Loops` is dropped: the thread ends, closing what it still pumps.
    Exit,
}

struct Job {
    id: u64,
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    done: tokio::sync::oneshot::Sender<Ended>,
}

struct Lane {
    commands: mpsc::Sender<Command>,
    /// Shared with the thread: the eventfd must outlive the wake-up `Drop` sends, or the
    /// thread would never see it (a closed descriptor leaves the epoll set with its event).
    waker: Arc<Waker>,
}

/// The pump threads. Dropping it ends them; sessions still on them are closed.
pub struct Loops {
    lanes: Vec<Lane>,
    next_lane: AtomicUsize,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops").field("threads", &self.lanes.len()).finish_non_exhaustive()
    }
}

impl Loops {
    /// Starts `n` pump threads (at least one).
    pub fn start(n: usize) -> std::io::Result<Loops> {
        let mut lanes = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let (commands, inbox) = mpsc::channel();
            let kept = Arc::clone(&waker);
            std::thread::Builder::new().name(format!("pgveil-pump-{i}")).spawn(move || {
                run(poll, &inbox);
                drop(kept);
            })?;
            lanes.push(Lane { commands, waker });
        }
        Ok(Loops { lanes, next_lane: AtomicUsize::new(0), next_id: AtomicU64::new(0) })
    }

    /// Hands a session's two sockets (non-blocking, as tokio's `into_std` leaves them) to the
    /// next thread. `None` when that thread is gone (the sockets are then closed with it).
    pub fn submit(&self, client: std::net::TcpStream, server: std::net::TcpStream) -> Option<Ticket> {
        let lane = self.next_lane.fetch_add(1, Ordering::Relaxed).checked_rem(self.lanes.len()).unwrap_or(0);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, ended) = tokio::sync::oneshot::channel();
        self.send(lane, Command::Add(Job { id, client, server, done }))?;
        Some(Ticket { lane, id, ended })
    }

    /// Asks the session's thread to stop pumping it; its answer (`Stopped`, or how it had
    /// ended already) arrives on the ticket.
    pub fn stop(&self, ticket: &Ticket) {
        let _ = self.send(ticket.lane, Command::Stop(ticket.id));
    }

    fn send(&self, lane: usize, command: Command) -> Option<()> {
        let lane = self.lanes.get(lane)?;
        lane.commands.send(command).ok()?;
        lane.waker.wake().ok()
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for lane in 0..self.lanes.len() {
            let _ = self.send(lane, Command::Exit);
        }
    }
}

/// One direction's state.
#[derive(Default)]
struct Way {
    /// Read but not yet written (empty unless the writer's socket was full).
    pending: Vec<u8>,
    written: usize,
    /// End of stream read (and the other socket's writing side shut).
    ended: bool,
    moved: u64,
}

/// One socket's readiness as the last event and operations left it (edge-triggered: set by
/// an event, cleared by an operation that would block).
#[derive(Clone, Copy)]
struct Ready {
    read: bool,
    write: bool,
    /// The peer's end of stream (or an error) has been signalled: it raises no further edge,
    /// so reading stays ready until a read returns it.
    read_closed: bool,
}

struct Session {
    id: u64,
    client: TcpStream,
    server: TcpStream,
    ready: [Ready; 2],
    up: Way,
    down: Way,
    queued: bool,
    done: tokio::sync::oneshot::Sender<Ended>,
}

/// Which end of a direction failed.
enum Failed {
    From(std::io::Error),
    To(std::io::Error),
}

/// What a turn of one direction left behind.
enum Turn {
    /// Blocked on a socket (or ended): the next event resumes it.
    Idle,
    /// Its read budget ran out with bytes still readable.
    More,
}

/// Moves bytes `from` → `to` until a socket would block, the direction ends, or its read
/// budget for this turn is spent.
fn turn(
    from: &mut TcpStream,
    to: &mut TcpStream,
    way: &mut Way,
    from_ready: &mut Ready,
    to_ready: &mut Ready,
    buf: &mut [u8],
) -> Result<Turn, Failed> {
    let mut reads = 0;
    loop {
        while way.written < way.pending.len() {
            if !to_ready.write {
                return Ok(Turn::Idle);
            }
            match to.write(way.pending.get(way.written..).unwrap_or_default()) {
                Ok(0) => return Err(Failed::To(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    way.written = way.written.saturating_add(n);
                    way.moved = way.moved.saturating_add(n as u64);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => to_ready.write = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Failed::To(e)),
            }
        }
        if way.pending.capacity() > 0 {
            // Given back once written: an idle session holds no buffer of its own.
            way.pending = Vec::new();
            way.written = 0;
        }
        if way.ended || !from_ready.read {
            return Ok(Turn::Idle);
        }
        if reads == READS_PER_TURN {
            return Ok(Turn::More);
        }
        reads = reads.saturating_add(1);
        let n = match from.read(buf) {
            Ok(0) => {
                way.ended = true;
                return match to.shutdown(Shutdown::Write) {
                    // The other side may have closed already.
                    Err(e) if e.kind() != ErrorKind::NotConnected => Err(Failed::To(e)),
                    _ => Ok(Turn::Idle),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                from_ready.read = false;
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failed::From(e)),
        };
        // A short read emptied the socket: more data would raise a new edge. An end of stream
        // that came with the data would not, so it is read next.
        if n < buf.len() && !from_ready.read_closed {
            from_ready.read = false;
        }
        let mut off = 0;
        while off < n {
            match to.write(buf.get(off..n).unwrap_or_default()) {
                Ok(0) => return Err(Failed::To(ErrorKind::WriteZero.into())),
                Ok(m) => {
                    off = off.saturating_add(m);
                    way.moved = way.moved.saturating_add(m as u64);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    to_ready.write = false;
                    way.pending.extend_from_slice(buf.get(off..n).unwrap_or_default());
                    return Ok(Turn::Idle);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Failed::To(e)),
            }
        }
    }
}

/// What both directions' turns left behind.
enum Drive {
    Ended(Outcome),
    /// Waiting for an event on one of its sockets.
    Waiting,
    /// Wants another turn without a new event.
    More,
}

impl Session {
    fn drive(&mut self, buf: &mut [u8]) -> Drive {
        let [c, s] = &mut self.ready;
        let up = match turn(&mut self.client, &mut self.server, &mut self.up, c, s, buf) {
            Err(Failed::From(e)) => return Drive::Ended(Outcome::ClientIo(e)),
            Err(Failed::To(e)) => return Drive::Ended(Outcome::UpstreamIo(e)),
            Ok(t) => t,
        };
        let down = match turn(&mut self.server, &mut self.client, &mut self.down, s, c, buf) {
            Err(Failed::From(e)) => return Drive::Ended(Outcome::UpstreamIo(e)),
            Err(Failed::To(e)) => return Drive::Ended(Outcome::ClientIo(e)),
            Ok(t) => t,
        };
        if self.up.ended && self.down.ended {
            Drive::Ended(Outcome::Closed)
        } else if matches!(up, Turn::More) || matches!(down, Turn::More) {
            Drive::More
        } else {
            Drive::Waiting
        }
    }
}

/// A thread's loop: until its `Loops` is dropped.
fn run(mut poll: Poll, inbox: &mpsc::Receiver<Command>) {
    let mut events = Events::with_capacity(256);
    let mut slots: Vec<Option<Session>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut queue: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; BUFFER];
    loop {
        // Sessions with work left from the last turn are served before waiting again.
        let timeout = (!queue.is_empty()).then_some(std::time::Duration::ZERO);
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "pump thread cannot wait for its sockets");
            return;
        }
        let mut woken = false;
        let mut due = std::mem::take(&mut queue);
        for event in &events {
            if event.token() == WAKE {
                woken = true;
                continue;
            }
            let slot = event.token().0 >> 1;
            let Some(Some(session)) = slots.get_mut(slot) else { continue };
            if let Some(r) = session.ready.get_mut(event.token().0 & 1) {
                r.read_closed |= event.is_read_closed() || event.is_error();
                r.read |= event.is_readable() || r.read_closed;
                r.write |= event.is_writable() || event.is_write_closed() || event.is_error();
            }
            if !std::mem::replace(&mut session.queued, true) {
                due.push(slot);
            }
        }
        for slot in due.drain(..) {
            let Some(Some(session)) = slots.get_mut(slot) else { continue };
            session.queued = false;
            match session.drive(&mut buf) {
                Drive::Ended(outcome) => finish(&mut poll, &mut slots, &mut free, slot, outcome),
                Drive::More => {
                    session.queued = true;
                    queue.push(slot);
                }
                Drive::Waiting => {}
            }
        }
        if woken {
            loop {
                match inbox.try_recv() {
                    Ok(Command::Add(job)) => add(&mut poll, &mut slots, &mut free, &mut queue, job),
                    Ok(Command::Stop(id)) => {
                        if let Some(slot) = slots.iter().position(|s| s.as_ref().is_some_and(|s| s.id == id)) {
                            finish(&mut poll, &mut slots, &mut free, slot, Outcome::Stopped);
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // The proxy is shutting down: remaining sessions close with the thread.
                    Ok(Command::Exit) | Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
        }
    }
}

fn add(poll: &mut Poll, slots: &mut Vec<Option<Session>>, free: &mut Vec<usize>, queue: &mut Vec<usize>, job: Job) {
    let slot = free.pop().unwrap_or_else(|| {
        slots.push(None);
        slots.len().saturating_sub(1)
    });
    let mut client = TcpStream::from_std(job.client);
    let mut server = TcpStream::from_std(job.server);
    let both = Interest::READABLE | Interest::WRITABLE;
    let registered = poll
        .registry()
        .register(&mut client, Token(slot << 1), both)
        .and_then(|()| poll.registry().register(&mut server, Token((slot << 1) | 1), both));
    let ready = Ready { read: true, write: true, read_closed: false };
    let session = Session {
        id: job.id,
        client,
        server,
        ready: [ready; 2],
        up: Way::default(),
        down: Way::default(),
        queued: true,
        done: job.done,
    };
    if let Some(s) = slots.get_mut(slot) {
        *s = Some(session);
    }
    match registered {
        // Bytes may have arrived before the registration: the first turn reads without an event.
        Ok(()) => queue.push(slot),
        Err(e) => finish(poll, slots, free, slot, Outcome::UpstreamIo(e)),
    }
}

fn finish(poll: &mut Poll, slots: &mut [Option<Session>], free: &mut Vec<usize>, slot: usize, outcome: Outcome) {
    let Some(mut session) = slots.get_mut(slot).and_then(Option::take) else { return };
    free.push(slot);
    let _ = poll.registry().deregister(&mut session.client);
    let _ = poll.registry().deregister(&mut session.server);
    let _ = session.done.send(Ended {
        outcome,
        client: session.client.into(),
        server: session.server.into(),
        to_server: session.up.moved,
        to_client: session.down.moved,
    });
}

/// The threads a process pumps on, started with the first session that needs them.
#[derive(Debug, Default)]
pub struct Lazy(std::sync::OnceLock<Option<Arc<Loops>>>);

impl Lazy {
    /// The loops (`threads()` of them, asked once: the first pumped session starts them), or
    /// `None` when they could not be started (the copying pump is used then).
    pub fn get(&self, threads: impl FnOnce() -> usize) -> Option<&Arc<Loops>> {
        self.0
            .get_or_init(|| {
                Loops::start(threads())
                    .inspect_err(|e| tracing::warn!(error = %e, "cannot start the pump threads; copying instead"))
                    .ok()
                    .map(Arc::new)
            })
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair: (the outside end a test drives, the end a pump thread gets).
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let outside = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // A pump that stops moving bytes fails the test instead of hanging it.
        outside.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        outside.set_write_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let (inside, _) = listener.accept().unwrap();
        inside.set_nonblocking(true).unwrap();
        (outside, inside)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap_or_default() ^ seed).collect()
    }

    #[test]
    fn bytes_cross_both_ways_unchanged_through_a_slow_reader_and_both_ends_close() {
        let loops = Loops::start(1).unwrap();
        let (mut client, client_in) = pair();
        let (mut server, server_in) = pair();
        let ticket = loops.submit(client_in, server_in).unwrap();
        // 4 MiB each way, written while the other side is not yet reading: the pump must hold
        // what it cannot write and resume on writability.
        let up = pattern(4 << 20, 0x11);
        let down = pattern(4 << 20, 0x5a);
        let writer = {
            let (mut c, mut s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (up, down) = (up.clone(), down.clone());
            std::thread::spawn(move || {
                let a = std::thread::spawn(move || {
                    c.write_all(&up).unwrap();
                    c.shutdown(Shutdown::Write).unwrap();
                });
                s.write_all(&down).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                a.join().unwrap();
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            got
        });
        let mut got_down = Vec::new();
        client.read_to_end(&mut got_down).unwrap();
        let got_up = reader.join().unwrap();
        writer.join().unwrap();
        assert!(got_up == up, "client → server bytes changed ({} of {} bytes)", got_up.len(), up.len());
        assert!(got_down == down, "server → client bytes changed ({} of {} bytes)", got_down.len(), down.len());
        let ended = ticket.ended.blocking_recv().unwrap();
        assert!(matches!(ended.outcome, Outcome::Closed), "{:?}", ended.outcome);
        assert_eq!((ended.to_server, ended.to_client), (4 << 20, 4 << 20));
    }

    /// Data and the end of stream behind it, both already queued when the pump first reads:
    /// the short read of the data must not leave the end unread (the session would never end).
    #[test]
    fn an_end_of_stream_that_arrived_with_the_last_bytes_ends_the_session() {
        let loops = Loops::start(1).unwrap();
        let (mut client, client_in) = pair();
        let (mut server, server_in) = pair();
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        server.write_all(b"bye").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut ticket = loops.submit(client_in, server_in).unwrap();
        let (mut up, mut down) = (Vec::new(), Vec::new());
        server.read_to_end(&mut up).unwrap();
        client.read_to_end(&mut down).unwrap();
        assert_eq!((up.as_slice(), down.as_slice()), (&b"hello"[..], &b"bye"[..]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let ended = loop {
            if let Ok(ended) = ticket.ended.try_recv() {
                break ended;
            }
            assert!(std::time::Instant::now() < deadline, "the session did not end");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(matches!(ended.outcome, Outcome::Closed), "{:?}", ended.outcome);
    }

    #[test]
    fn a_stopped_session_gets_its_sockets_back_still_connected() {
        let loops = Loops::start(2).unwrap();
        let (mut client, client_in) = pair();
        let (mut server, server_in) = pair();
        let ticket = loops.submit(client_in, server_in).unwrap();
        client.write_all(b"ping").unwrap();
        let mut four = [0u8; 4];
        server.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"ping");
        loops.stop(&ticket);
        let ended = ticket.ended.blocking_recv().unwrap();
        assert!(matches!(ended.outcome, Outcome::Stopped), "{:?}", ended.outcome);
        assert_eq!((ended.to_server, ended.to_client), (4, 0));
        // No longer pumped, still connected: what the server sends now stays with the proxy.
        server.write_all(b"late").unwrap();
        let mut back = ended.client;
        back.set_nonblocking(false).unwrap();
        back.write_all(b"bye").unwrap();
        let mut three = [0u8; 3];
        client.read_exact(&mut three).unwrap();
        assert_eq!(&three, b"bye");
    }

    #[test]
    fn dropping_the_loops_ends_their_threads() {
        let loops = Loops::start(2).unwrap();
        let (_client, client_in) = pair();
        let (_server, server_in) = pair();
        let ticket = loops.submit(client_in, server_in).unwrap();
        drop(loops);
        // The thread ended and dropped the session with it: its answer never comes.
        assert!(ticket.ended.blocking_recv().is_err());
    }

    #[test]
    fn a_reset_names_the_side_that_went_away() {
        let loops = Loops::start(1).unwrap();
        let (client, client_in) = pair();
        let (mut server, server_in) = pair();
        let mut ticket = loops.submit(client_in, server_in).unwrap();
        // A close with unread data makes the kernel reset the connection.
        socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(client);
        // Writing towards the reset client fails on the client's side.
        let ended = loop {
            let _ = server.write_all(&[0u8; 1024]);
            if let Ok(ended) = ticket.ended.try_recv() {
                break ended;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(matches!(ended.outcome, Outcome::ClientIo(_)), "{:?}", ended.outcome);
    }
}
