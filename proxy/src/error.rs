//! What can end a session, which side caused it, and what the client may be told.

use crate::protocol::messages::{ErrorResponse, sqlstate};
use crate::protocol::startup::StartupError;
use crate::protocol::{Direction, FrameError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    /// A decision of pgveil's policy (a refusal, a fail-closed end, containment).
    Policy,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client sent a malformed message: {0}")]
    ClientProtocol(FrameError),
    #[error("server sent a malformed message: {0}")]
    ServerProtocol(FrameError),
    #[error("invalid startup packet: {0}")]
    Startup(#[from] StartupError),
    #[error("{0:?} closed the connection in the middle of a message")]
    Truncated(Direction),
    #[error("client connection: {0}")]
    ClientIo(#[source] std::io::Error),
    #[error("server connection: {0}")]
    UpstreamIo(#[source] std::io::Error),
    /// The server closed the connection between messages (a crash, a shutdown, a terminated
    /// backend after its FATAL): the client sees the same plain close.
    #[error("the database server closed the connection")]
    UpstreamClosed,
    #[error("startup did not complete within the startup timeout")]
    StartupTimeout,
    #[error("TLS is required for this connection")]
    TlsRequired,
    #[error("TLS handshake with client failed: {0}")]
    ClientTls(#[source] std::io::Error),
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    NoAlpn,
    #[error("received unencrypted data after SSL request")]
    DataAfterSslRequest,
    #[error("cannot connect to the database server: {0}")]
    Connect(String),
    #[error("server refused TLS but upstream.tls requires it")]
    UpstreamTlsRefused,
    #[error("server sent an unexpected message during startup")]
    UnexpectedServerMessage(u8),
    #[error("client sent an unexpected message during authentication")]
    UnexpectedClientMessage(u8),
    #[error("SCRAM channel binding cannot be relayed through TLS termination")]
    ChannelBinding,
    #[error("authentication failed")]
    AuthFailed,
    #[error("the server refused the session after authentication")]
    ServerRefusedStartup,
    #[error("the proxy is shutting down")]
    Shutdown,
    /// A fault of pgveil's own (a pump thread gone); the session ends.
    #[error("pgveil: {0}")]
    Internal(&'static str),
    /// Ended by containment (an operator, a quarantine); the session says why.
    #[error("the session was terminated")]
    Terminated,
    #[error("{}", .0.message)]
    Refused(Box<ErrorResponse>),
    /// The session is ended rather than let something unclassifiable reach the client (I1).
    #[error("{0}")]
    Policy(&'static str),
}

impl SessionError {
    pub fn frame(dir: Direction, e: FrameError) -> Self {
        match dir {
            Direction::FromClient => Self::ClientProtocol(e),
            Direction::FromServer => Self::ServerProtocol(e),
        }
    }

    pub fn io(dir: Direction, e: std::io::Error) -> Self {
        match dir {
            Direction::FromClient => Self::ClientIo(e),
            Direction::FromServer => Self::UpstreamIo(e),
        }
    }

    pub fn side(&self) -> Side {
        match self {
            Self::ClientProtocol(_)
            | Self::Startup(_)
            | Self::Truncated(Direction::FromClient)
            | Self::ClientIo(_)
            | Self::StartupTimeout
            | Self::TlsRequired
            | Self::ClientTls(_)
            | Self::NoAlpn
            | Self::DataAfterSslRequest
            | Self::UnexpectedClientMessage(_)
            | Self::ChannelBinding
            | Self::AuthFailed => Side::Client,
            Self::ServerProtocol(_)
            | Self::Truncated(Direction::FromServer)
            | Self::UpstreamIo(_)
            | Self::UpstreamClosed
            | Self::Connect(_)
            | Self::UpstreamTlsRefused
            | Self::UnexpectedServerMessage(_)
            | Self::ServerRefusedStartup => Side::Upstream,
            Self::Terminated | Self::Refused(_) | Self::Policy(_) => Side::Policy,
            Self::Shutdown | Self::Internal(_) => Side::Internal,
        }
    }

    /// Whether this is malformed client input (audited as `protocol_error`).
    pub fn is_client_protocol_error(&self) -> bool {
        matches!(
            self,
            Self::ClientProtocol(_)
                | Self::Startup(_)
                | Self::DataAfterSslRequest
                | Self::UnexpectedClientMessage(_)
                | Self::Truncated(Direction::FromClient)
        )
    }

    /// The only text a client ever sees about a failure. No upstream internals, no values.
    pub fn to_client(&self) -> Option<ErrorResponse> {
        use sqlstate::*;
        Some(match self {
            Self::ClientProtocol(e) => ErrorResponse::fatal(PROTOCOL_VIOLATION, e.to_string()),
            Self::Startup(e) => ErrorResponse::fatal(PROTOCOL_VIOLATION, e.to_string()),
            Self::DataAfterSslRequest => ErrorResponse::fatal(PROTOCOL_VIOLATION, "received unencrypted data after SSL request")
                .with_detail("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."),
            Self::UnexpectedClientMessage(tag) => ErrorResponse::fatal(
                PROTOCOL_VIOLATION,
                format!("expected password response, got message type {}", char::from(*tag)),
            ),
            Self::TlsRequired => ErrorResponse::fatal(INVALID_AUTHORIZATION, "pgveil: SSL/TLS is required for this server")
                .with_hint("Connect with sslmode=require (or stronger)."),
            Self::StartupTimeout => ErrorResponse::fatal(PROTOCOL_VIOLATION, "pgveil: startup packet not received in time"),
            Self::Connect(why) => ErrorResponse::fatal(CONNECTION_FAILURE, format!("pgveil: could not connect to the database server: {why}")),
            Self::UpstreamTlsRefused => ErrorResponse::fatal(
                CONNECTION_FAILURE,
                "pgveil: the database server does not accept TLS, but upstream.tls requires it",
            ),
            Self::ServerProtocol(_) | Self::UnexpectedServerMessage(_) | Self::Truncated(Direction::FromServer) => {
                ErrorResponse::fatal(CONNECTION_FAILURE, "pgveil: the database server sent an invalid message")
            }
            Self::ChannelBinding => ErrorResponse::fatal(
                INVALID_AUTHORIZATION,
                "pgveil: SCRAM channel binding cannot be relayed through a TLS-terminating proxy (auth.mode: relay with upstream TLS)",
            )
            .with_hint(
                "Ask the operator to set auth.mode: scram in pgveil's configuration, or connect with channel_binding=disable.",
            ),
            Self::Shutdown => ErrorResponse::fatal(ADMIN_SHUTDOWN, "pgveil: terminating connection because the proxy is shutting down"),
            Self::Internal(_) => ErrorResponse::fatal(INTERNAL_ERROR, "pgveil: internal error; closing the session"),
            Self::Refused(e) => (**e).clone(),
            Self::Terminated => ErrorResponse::fatal(ADMIN_SHUTDOWN, "pgveil: session terminated"),
            Self::Policy(why) => ErrorResponse::fatal(INSUFFICIENT_PRIVILEGE, format!("pgveil: {why}; closing the session")),
            // A lost server connection is a plain close, as PostgreSQL's own end would be
            // (what the server said last, a FATAL included, was relayed).
            Self::NoAlpn
            | Self::ClientTls(_)
            | Self::ClientIo(_)
            | Self::Truncated(Direction::FromClient)
            | Self::AuthFailed
            | Self::ServerRefusedStartup
            | Self::UpstreamIo(_)
            | Self::UpstreamClosed => return None,
        })
    }
}
