//! The server leg: connecting (TCP or Unix socket), TLS negotiation with SSLRequest, and the
//! channel-binding material of the server's certificate.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

use crate::Shared;
use crate::config::UpstreamTls;
use crate::protocol::messages;
use crate::session::SessionError;

pub type ServerStream = Either<Either<TcpStream, UnixStream>, tokio_rustls::client::TlsStream<TcpStream>>;

impl crate::forward::PlainTcp for ServerStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            Either::Left(Either::Left(tcp)) => Some(tcp),
            _ => None,
        }
    }

    fn into_plain_tcp(self) -> Result<TcpStream, Self> {
        match self {
            Either::Left(Either::Left(tcp)) => Ok(tcp),
            other => Err(other),
        }
    }

    fn from_plain_tcp(tcp: TcpStream) -> Self {
        Either::Left(Either::Left(tcp))
    }
}

/// Opens a connection to PostgreSQL, negotiating TLS as `upstream.tls` says. The whole of it
/// (TCP, SSLRequest, TLS handshake) is bounded by `upstream.connect_timeout`: a server that
/// accepts but never answers costs the session a clear error, not a hang.
pub async fn connect(shared: &Shared) -> Result<ServerStream, SessionError> {
    let up = &shared.config.upstream;
    tokio::time::timeout(up.connect_timeout, connect_within(shared)).await.map_err(|_| {
        SessionError::Connect(format!("{}:{}: no answer within {:?}", up.host, up.port, up.connect_timeout))
    })?
}

async fn connect_within(shared: &Shared) -> Result<ServerStream, SessionError> {
    let up = &shared.config.upstream;
    let fail = |e: String| SessionError::Connect(e);
    if up.is_unix() {
        let path = up.socket_path();
        let sock = UnixStream::connect(&path).await.map_err(|e| fail(format!("{}: {e}", path.display())))?;
        return Ok(Either::Left(Either::Right(sock)));
    }
    let addr = format!("{}:{}", up.host, up.port);
    let mut tcp = TcpStream::connect(&addr).await.map_err(|e| fail(format!("{addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let Some(connector) = shared.upstream_tls.as_ref() else {
        return Ok(Either::Left(Either::Left(tcp)));
    };
    tcp.write_all(&messages::ssl_request()).await.map_err(|e| fail(format!("{addr}: {e}")))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| fail(format!("{addr}: {e}")))?;
    match answer[0] {
        b'S' => {
            let name = crate::tls::upstream_name(&up.host);
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS handshake with {addr} failed: {e}")))?;
            Ok(Either::Right(tls))
        }
        b'N' if up.tls == UpstreamTls::Prefer => Ok(Either::Left(Either::Left(tcp))),
        b'N' => Err(SessionError::UpstreamTlsRefused),
        _ => Err(SessionError::UnexpectedServerMessage(answer[0])),
    }
}

/// Whether the server leg is encrypted (and so channel binding cannot be relayed).
pub fn is_tls(stream: &ServerStream) -> bool {
    matches!(stream, Either::Right(_))
}

/// The server certificate's channel-binding hash, when the server leg is TLS.
pub fn cert_hash(stream: &ServerStream) -> Option<Vec<u8>> {
    match stream {
        Either::Right(tls) => tls.get_ref().1.peer_certificates()?.first().map(|c| super::scram::end_point_hash(c)),
        Either::Left(_) => None,
    }
}
