//! Relayed authentication: the backend authenticates the client through the proxy.
//!
//! Authentication requests are forwarded to the client and its answers to the server. The
//! proxy never offers SCRAM channel binding it cannot honour: `SCRAM-SHA-256-PLUS` is removed
//! from the server's list when the server leg is TLS (the client would bind to our
//! certificate, not the server's), and a client that then insists on binding (gs2 flag `y`,
//! which a TLS server rejects) gets an error explaining what to change.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::Frame;
use crate::protocol::messages;
use crate::protocol::wire::Reader;
use crate::session::SessionError;
use crate::session::conn::Conn;

const AUTH_OK: u32 = 0;
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;

/// Outcome of the relayed exchange.
#[derive(Debug)]
pub(crate) enum Relayed {
    Ok,
    /// The server rejected the client; its ErrorResponse was forwarded.
    Failed,
}

pub async fn relay<C, S>(client: &mut Conn<C>, server: &mut Conn<S>, server_tls: bool) -> Result<Relayed, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    loop {
        let Some(frame) = server.read_frame().await? else {
            return Err(SessionError::Truncated(crate::protocol::Direction::FromServer));
        };
        match frame.tag() {
            b'R' => {
                let (code, data) = messages::auth_request(&frame).ok_or(SessionError::UnexpectedServerMessage(b'R'))?;
                match code {
                    AUTH_OK => {
                        client.write_all(frame.as_bytes()).await?;
                        return Ok(Relayed::Ok);
                    }
                    AUTH_SASL if server_tls => {
                        out.clear();
                        messages::authentication(&mut out, AUTH_SASL, &without_plus(data));
                        client.write_all(&out).await?;
                        client.flush().await?;
                        let answer = client_answer(client).await?;
                        if binds_channel(&answer) {
                            return Err(SessionError::ChannelBinding);
                        }
                        server.write_all(answer.as_bytes()).await?;
                    }
                    AUTH_CLEARTEXT | AUTH_MD5 | AUTH_SASL | AUTH_SASL_CONTINUE => {
                        client.write_all(frame.as_bytes()).await?;
                        client.flush().await?;
                        let answer = client_answer(client).await?;
                        server.write_all(answer.as_bytes()).await?;
                    }
                    AUTH_SASL_FINAL => client.write_all(frame.as_bytes()).await?,
                    // GSS, SSPI and anything newer: the client answers what it can; we relay.
                    _ => {
                        client.write_all(frame.as_bytes()).await?;
                        client.flush().await?;
                        let answer = client_answer(client).await?;
                        server.write_all(answer.as_bytes()).await?;
                    }
                }
            }
            b'E' => {
                client.write_all(frame.as_bytes()).await?;
                client.flush().await?;
                return Ok(Relayed::Failed);
            }
            b'N' => client.write_all(frame.as_bytes()).await?,
            other => return Err(SessionError::UnexpectedServerMessage(other)),
        }
    }
}

/// The client's next message, which must be a password / SASL response.
async fn client_answer<C: AsyncRead + AsyncWrite + Unpin>(client: &mut Conn<C>) -> Result<Frame, SessionError> {
    match client.read_frame().await? {
        Some(f) if f.tag() == b'p' => Ok(f),
        Some(f) => Err(SessionError::UnexpectedClientMessage(f.tag())),
        None => Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into())),
    }
}

/// The SASL mechanism list without `-PLUS` variants.
fn without_plus(data: &[u8]) -> BytesMut {
    let mut r = Reader::new(data);
    let mut out = BytesMut::new();
    while let Some(mech) = r.cstr() {
        if mech.is_empty() {
            break;
        }
        if !mech.ends_with(b"-PLUS") {
            out.put_slice(mech);
            out.put_u8(0);
        }
    }
    out.put_u8(0);
    out
}

/// Whether a SASLInitialResponse asks for channel binding (`p=`) or says the client supports
/// it (`y`): both fail against a TLS server behind a TLS-terminating proxy.
pub fn binds_channel(frame: &Frame) -> bool {
    let mut r = Reader::new(frame.body_ref());
    let Some(mech) = r.cstr() else { return false };
    if mech.ends_with(b"-PLUS") {
        return true;
    }
    let Some(len) = r.i32() else { return false };
    let Ok(len) = usize::try_from(len) else { return false };
    matches!(r.bytes(len).and_then(|b| b.first()), Some(b'y' | b'p'))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn sasl_initial(mech: &str, msg: &str) -> Frame {
        let mut body = BytesMut::new();
        body.put_slice(mech.as_bytes());
        body.put_u8(0);
        body.put_i32(i32::try_from(msg.len()).unwrap());
        body.put_slice(msg.as_bytes());
        let mut out = BytesMut::new();
        messages::tagged(&mut out, b'p', &body);
        Frame::from_encoded(out.freeze()).unwrap()
    }

    #[test]
    fn detects_channel_binding_flags() {
        assert!(!binds_channel(&sasl_initial("SCRAM-SHA-256", "n,,n=,r=abc")));
        assert!(binds_channel(&sasl_initial("SCRAM-SHA-256", "y,,n=,r=abc")));
        assert!(binds_channel(&sasl_initial("SCRAM-SHA-256-PLUS", "p=tls-server-end-point,,n=,r=abc")));
    }

    #[test]
    fn strips_plus_mechanisms() {
        let list = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(&without_plus(list)[..], b"SCRAM-SHA-256\0\0");
    }
}
