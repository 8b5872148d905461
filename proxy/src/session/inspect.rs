//! The async driver of the inspecting relay (`relay/`): reads frames from both sides, has the
//! session's rules analyse each statement text, feeds the relay, sends the audit events it
//! produced, cancels the backend's work for a row limit, ends the session for the probe
//! budget or an operator, and writes what the relay buffered for each side.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::analysis::{Decided, SessionRules};
use super::conn::Conn;
use super::relay::Relay;
use super::{SessionError, SessionInfo};
use crate::Shared;
use crate::audit::{Event, EventKind};
use crate::protocol::{Frame, messages};

/// The longest a session whose probe budget is spent waits for the answers still owed to
/// the client before its FATAL.
const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// What the driver does after the client frames it had read.
enum Next {
    Go,
    /// The client sent Terminate.
    ClientDone,
    /// The probe budget is spent.
    Spent,
}

pub(super) struct Inspector<'a> {
    shared: &'a Arc<Shared>,
    relay: Relay,
    backend: (u32, Bytes),
    live: &'a Arc<crate::containment::Live>,
    /// The cancel sent for a row limit. ReadyForQuery is held until it has been delivered,
    /// so a late cancel can never hit the client's next statement (the server ignores a
    /// cancel that arrives while it waits for a command).
    pending_cancel: Option<tokio::task::JoinHandle<()>>,
}

impl<'a> Inspector<'a> {
    pub(super) fn new(
        shared: &'a Arc<Shared>,
        info: &SessionInfo,
        rules: SessionRules,
        backend: (u32, Bytes),
        live: &'a Arc<crate::containment::Live>,
    ) -> Self {
        let relay = Relay::new(Arc::clone(shared), info.clone(), rules, Arc::clone(live));
        Inspector { shared, relay, backend, live, pending_cancel: None }
    }

    pub(super) async fn run<C, S>(mut self, client: &mut Conn<C>, server: &mut Conn<S>) -> Result<(), SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Bytes the client sent before the session became ready are handled first.
        let next = self.buffered(client).await?;
        if !self.settle(next, client, server).await? {
            return Ok(());
        }
        // Made once (a fresh wait per message registered and removed two waiters each time),
        // and polled only when a token wakes it.
        let shared = Arc::clone(self.shared);
        let live = Arc::clone(self.live);
        let mut ended = crate::forward::WhenWoken::new(async move {
            tokio::select! {
                () = shared.hard_stop.cancelled() => SessionError::Shutdown,
                () = live.killed().cancelled() => SessionError::Terminated,
            }
        });
        loop {
            tokio::select! {
                f = client.read_frame() => {
                    let Some(f) = f? else { return Ok(()) };
                    let next = if self.on_client(f).await? { self.buffered(client).await? } else { Next::ClientDone };
                    if !self.settle(next, client, server).await? {
                        return Ok(());
                    }
                }
                f = server.read_frame() => {
                    let Some(f) = f? else {
                        self.flush_client(client).await?;
                        return Err(SessionError::UpstreamClosed);
                    };
                    self.relay.on_server(f)?;
                    while let Some(f) = server.buffered_frame()? {
                        self.relay.on_server(f)?;
                    }
                    self.after_server();
                    if self.relay.take_ready()
                        && let Some(cancel) = self.pending_cancel.take()
                    {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), cancel).await;
                    }
                    self.flush_client(client).await?;
                }
                e = &mut ended => return Err(e),
            }
        }
    }

    /// Handles the client frames already read. A spent probe budget stops here, before
    /// anything more of the client's is handled.
    async fn buffered<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut Conn<C>,
    ) -> Result<Next, SessionError> {
        loop {
            if self.relay.over_budget() {
                return Ok(Next::Spent);
            }
            let Some(f) = client.buffered_frame()? else { return Ok(Next::Go) };
            if !self.on_client(f).await? {
                return Ok(Next::ClientDone);
            }
        }
    }

    /// One client message: its statement analysed (Query, Parse), then handed to the relay.
    /// A Bind of a statement prepared under rules since reloaded first has it decided again
    /// and prepared anew (I11).
    async fn on_client(&mut self, f: Frame) -> Result<bool, SessionError> {
        if matches!(f.tag(), b'B' | b'E' | b'D') {
            // The rules in force now, also for a session that only binds and executes.
            self.relay.rules_mut().refresh(self.shared);
        }
        if let Some((name, text)) = self.relay.stale_statement(&f) {
            let decided = self.relay.rules_mut().analyze(self.shared, &text).await;
            self.relay.reprepare(name, &decided);
        }
        let text = match f.tag() {
            b'Q' => messages::query_text(&f),
            b'P' => messages::parse_message(&f).map(|(_, sql)| sql),
            _ => None,
        };
        let decided: Option<Decided> = match text {
            Some(text) => Some(self.relay.rules_mut().analyze(self.shared, text).await),
            None => None,
        };
        if f.tag() == b'Q'
            && let Some(d) = &decided
        {
            // SQL-prepared statements it executes, decided under earlier rules, go first (I11).
            for (name, prepare) in self.relay.stale_sql(&d.analysis) {
                let again = self.relay.rules_mut().analyze(self.shared, prepare.as_bytes()).await;
                self.relay.reprepare_sql(name, &prepare, &again);
            }
        }
        let go_on = self.relay.on_client(f, decided)?;
        self.send_events().await;
        Ok(go_on)
    }

    /// Events and requests the relay produced while handling server messages.
    fn after_server(&mut self) {
        for a in self.relay.take_events() {
            self.shared.audit.log(a.event);
        }
        if self.relay.take_cancel() {
            let shared = Arc::clone(self.shared);
            let (pid, key) = self.backend.clone();
            self.pending_cancel = Some(tokio::spawn(async move { super::cancel_backend(&shared, pid, &key).await }));
        }
    }

    /// Statement events wait for room in the audit queue (never lost); others are queued.
    async fn send_events(&mut self) {
        for a in self.relay.take_events() {
            if a.wait {
                self.shared.audit.send(a.event).await;
            } else {
                self.shared.audit.log(a.event);
            }
        }
    }

    /// Sends what the client's frames produced for the server; `false` when the session ends
    /// with that (the client terminated), an error when the probe budget ended it.
    async fn settle<C, S>(
        &mut self,
        next: Next,
        client: &mut Conn<C>,
        server: &mut Conn<S>,
    ) -> Result<bool, SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match next {
            Next::Go => self.flush_server(server).await.map(|()| true),
            Next::ClientDone => self.flush_server(server).await.map(|()| false),
            Next::Spent => Err(self.spent(client, server).await),
        }
    }

    /// The probe budget is spent: the session is ended (and its role quarantined, with
    /// `limits.quarantine`), each step audited in order. The statement that spent it never
    /// runs; the answers still owed for earlier ones are relayed first (within
    /// [`DRAIN_WITHIN`]), so the FATAL answers that statement as it would from PostgreSQL: a
    /// client reading answers in order (tokio-postgres) would otherwise take the FATAL for
    /// the earlier statement and report a closed connection for this one.
    async fn spent<C, S>(&mut self, client: &mut Conn<C>, server: &mut Conn<S>) -> SessionError
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let drain = self.relay.forget_from_trip();
        let why = self.relay.budget_reason();
        let info = self.relay.info().clone();
        self.shared.metrics.sessions_terminated_budget.fetch_add(1, Relaxed);
        self.live.terminate(format!("pgveil: session terminated: {why}"));
        self.shared
            .audit
            .send(Event::session(EventKind::SessionTerminated, &info).rule("probe_budget").reason(&why))
            .await;
        tracing::warn!(user = %info.user, "{why}: session terminated");
        if let Some(how_long) = self.shared.config.limits.quarantine {
            let c = &self.shared.containment;
            if let Err(e) = c.quarantine(self.shared, &info.user, how_long, &why, "probe_budget").await {
                tracing::error!(user = %info.user, error = %e, "quarantine");
            }
        }
        if drain && tokio::time::timeout(DRAIN_WITHIN, self.drain(client, server)).await.is_err() {
            tracing::debug!("answers owed before the probe budget was spent did not come in time");
        }
        SessionError::Terminated
    }

    /// Sends what was buffered before the tripping statement and relays the server's answers
    /// until nothing more is owed.
    async fn drain<C, S>(&mut self, client: &mut Conn<C>, server: &mut Conn<S>) -> Result<(), SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.flush_server(server).await?;
        self.flush_client(client).await?;
        while self.relay.awaiting_server() {
            let Some(f) = server.read_frame().await? else { break };
            self.relay.on_server(f)?;
            while let Some(f) = server.buffered_frame()? {
                self.relay.on_server(f)?;
            }
            self.after_server();
            self.flush_client(client).await?;
        }
        Ok(())
    }

    async fn flush_server<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        server: &mut Conn<S>,
    ) -> Result<(), SessionError> {
        flush(self.relay.for_server(), server, &self.shared.metrics.bytes_client_to_server).await
    }

    async fn flush_client<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut Conn<C>,
    ) -> Result<(), SessionError> {
        flush(self.relay.for_client(), client, &self.shared.metrics.bytes_server_to_client).await
    }
}

/// Writes what is buffered for one side, in one write, and counts it.
async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    buf: &mut BytesMut,
    to: &mut Conn<S>,
    counter: &crate::metrics::Striped,
) -> Result<(), SessionError> {
    if buf.is_empty() {
        return Ok(());
    }
    counter.add(u64::try_from(buf.len()).unwrap_or(u64::MAX));
    // Written from the buffer and then cleared, which keeps its allocation for the next
    // message without sharing it (a split made it shared: two atomic counts per flush).
    // A failed write ends the session, so what is left in the buffer then does not matter.
    to.write_all(buf).await?;
    buf.clear();
    to.flush().await
}
