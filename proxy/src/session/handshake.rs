//! Client-facing handshake: SSLRequest, direct TLS, GSSENCRequest and the StartupMessage.
//!
//! Ends when the client has sent a valid StartupMessage (or a CancelRequest). Does not talk to
//! PostgreSQL or parse SQL.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::config::ClientTlsMode;
use crate::protocol::startup::{self, Startup, StartupPacket};
use crate::session::SessionError;
use crate::tls::{ALPN_POSTGRESQL, ServerTls};

pub type ClientStream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

impl crate::forward::PlainTcp for ClientStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            Either::Left(tcp) => Some(tcp),
            Either::Right(_) => None,
        }
    }

    fn into_plain_tcp(self) -> Result<TcpStream, Self> {
        match self {
            Either::Left(tcp) => Ok(tcp),
            tls @ Either::Right(_) => Err(tls),
        }
    }

    fn from_plain_tcp(tcp: TcpStream) -> Self {
        Either::Left(tcp)
    }
}

/// What the client asked for.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "made once per connection; boxing would put the stream behind a pointer for its whole life"
)]
pub enum Hello {
    Startup {
        stream: ClientStream,
        startup: Startup,
        leftover: BytesMut,
    },
    /// A cancel request; `stream` is the connection it came on, closed cleanly (TLS
    /// close_notify) once the cancel is handled, as libpq 17's cancel API expects.
    Cancel {
        pid: u32,
        key: bytes::Bytes,
        stream: Option<ClientStream>,
    },
}

const TLS_HANDSHAKE_RECORD: u8 = 0x16;

pub async fn handshake(tcp: TcpStream, tls: Option<&ServerTls>, mode: ClientTlsMode) -> Result<Hello, SessionError> {
    let mut tcp = tcp;
    match negotiate(&mut tcp, tls, mode).await {
        Ok(Negotiated::Startup { startup, leftover }) => {
            Ok(Hello::Startup { stream: Either::Left(tcp), startup, leftover })
        }
        Ok(Negotiated::Cancel { pid, key }) => Ok(Hello::Cancel { pid, key, stream: Some(Either::Left(tcp)) }),
        Ok(Negotiated::Tls) => {
            let Some(tls) = tls else { return Err(SessionError::NoAlpn) };
            let stream = tls.acceptor.accept(tcp).await.map_err(SessionError::ClientTls)?;
            read_startup(Either::Right(stream)).await
        }
        Ok(Negotiated::DirectTls) => {
            let Some(tls) = tls else { return Err(SessionError::NoAlpn) };
            let stream = tls.acceptor.accept(tcp).await.map_err(SessionError::ClientTls)?;
            if stream.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
                return Err(SessionError::NoAlpn);
            }
            read_startup(Either::Right(stream)).await
        }
        Err(e) => {
            write_refusal(&mut tcp, &e).await;
            Err(e)
        }
    }
}

enum Negotiated {
    /// A plaintext StartupMessage.
    Startup {
        startup: Startup,
        leftover: BytesMut,
    },
    Cancel {
        pid: u32,
        key: bytes::Bytes,
    },
    /// The client sent SSLRequest and we answered `S`.
    Tls,
    /// The first byte was a TLS handshake record.
    DirectTls,
}

async fn negotiate(
    tcp: &mut TcpStream,
    tls: Option<&ServerTls>,
    mode: ClientTlsMode,
) -> Result<Negotiated, SessionError> {
    let tls = tls.filter(|_| mode != ClientTlsMode::Disable);
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(SessionError::ClientIo)?;
    if n == 0 {
        return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        // Direct TLS (PostgreSQL 17 `sslnegotiation=direct`): ALPN "postgresql" is mandatory.
        return if tls.is_some() { Ok(Negotiated::DirectTls) } else { Err(SessionError::NoAlpn) };
    }
    let mut buf = BytesMut::with_capacity(512);
    for _ in 0..4 {
        match read_packet(tcp, &mut buf).await? {
            StartupPacket::SslRequest => {
                // Bytes already behind the SSLRequest would be smuggled into the TLS session
                // (CVE-2021-23214): a well-behaved client waits for our answer.
                if !buf.is_empty() || has_pending(tcp) {
                    return Err(SessionError::DataAfterSslRequest);
                }
                if tls.is_none() {
                    tcp.write_all(b"N").await.map_err(SessionError::ClientIo)?;
                    continue;
                }
                tcp.write_all(b"S").await.map_err(SessionError::ClientIo)?;
                return Ok(Negotiated::Tls);
            }
            StartupPacket::GssEncRequest => {
                tcp.write_all(b"N").await.map_err(SessionError::ClientIo)?;
            }
            StartupPacket::Cancel { pid, key } => return Ok(Negotiated::Cancel { pid, key }),
            StartupPacket::Startup(startup) => {
                if mode == ClientTlsMode::Require {
                    return Err(SessionError::TlsRequired);
                }
                return Ok(Negotiated::Startup { startup, leftover: buf });
            }
        }
    }
    Err(SessionError::Startup(startup::StartupError::BadLength))
}

/// After TLS: the StartupMessage (or a cancel). A second SSLRequest is answered `N`.
async fn read_startup(mut stream: ClientStream) -> Result<Hello, SessionError> {
    let mut buf = BytesMut::with_capacity(512);
    for _ in 0..3 {
        let packet = match read_packet(&mut stream, &mut buf).await {
            Ok(p) => p,
            Err(e) => {
                write_refusal(&mut stream, &e).await;
                return Err(e);
            }
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                stream.write_all(b"N").await.map_err(SessionError::ClientIo)?;
            }
            StartupPacket::Cancel { pid, key } => return Ok(Hello::Cancel { pid, key, stream: Some(stream) }),
            StartupPacket::Startup(startup) => return Ok(Hello::Startup { stream, startup, leftover: buf }),
        }
    }
    Err(SessionError::Startup(startup::StartupError::BadLength))
}

/// Reads one length-prefixed startup packet, keeping any bytes read beyond it in `buf`.
async fn read_packet<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> Result<StartupPacket, SessionError> {
    while buf.len() < 4 {
        read_more(io, buf).await?;
    }
    let word = buf.first_chunk::<4>().copied().unwrap_or_default();
    let len = startup::packet_len(word)?;
    while buf.len() < len {
        read_more(io, buf).await?;
    }
    let packet = buf.split_to(len);
    startup::parse(packet.get(4..).unwrap_or_default()).map_err(SessionError::from)
}

async fn read_more<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> Result<(), SessionError> {
    // Never read further than a maximal startup packet: the client waits for our answers.
    let want = (startup::MAX_STARTUP_LEN as usize).saturating_sub(buf.len()).max(1);
    let mut chunk = vec![0u8; want.min(1024)];
    let n = io.read(&mut chunk).await.map_err(SessionError::ClientIo)?;
    if n == 0 {
        // The client went away before a whole packet: PostgreSQL answers nothing (it only
        // logs an incomplete startup packet), and neither does pgveil.
        return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
    }
    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    Ok(())
}

/// Whether the client already sent more bytes (checked without blocking: the socket is
/// non-blocking, so an empty receive queue is `WouldBlock`).
fn has_pending(tcp: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(tcp).peek(&mut probe), Ok(n) if n > 0)
}

/// Generic over the stream so tests can drive it with `tokio::io::duplex`.
pub async fn write_refusal<S: AsyncWrite + Unpin>(io: &mut S, err: &SessionError) {
    if let Some(resp) = err.to_client() {
        let _ = io.write_all(&resp.to_bytes()).await;
        let _ = io.flush().await;
    }
}
