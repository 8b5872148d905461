//! `auth.mode: scram`: the proxy authenticates the client with SCRAM itself (offering
//! `-PLUS` on TLS), then logs in to the server as the same role with the recovered ClientKey.
//! Failed logins look exactly like PostgreSQL's, whether the role exists or not, and repeated
//! failures from one address are slowed down.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::Relayed;
use super::conn::Conn;
use super::scram::{ClientExchange, ServerExchange, Verifier};
use super::{SessionError, SessionInfo};
use crate::Shared;
use crate::audit::{Event, EventKind};
use crate::protocol::messages::{self, ErrorResponse, sqlstate};
use crate::protocol::wire::Reader;
use crate::protocol::{Direction, Frame};

/// Why pgveil's own login to the server, as the client's role, failed (`auth.mode: scram`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    #[error("{0}")]
    Connection(#[from] SessionError),
    #[error("the server closed the connection")]
    ServerClosed,
    #[error("malformed authentication request")]
    Malformed,
    #[error("unexpected {0}")]
    OutOfOrder(&'static str),
    #[error("SCRAM with the server: {0}")]
    Scram(String),
    #[error(
        "the server asks for a password or md5; auth.mode scram needs the server to use scram-sha-256 for this role"
    )]
    PasswordMethod,
    #[error("the server asks for authentication method {0}, which auth.mode scram cannot answer")]
    UnsupportedMethod(u32),
    #[error("the server rejected the login")]
    Rejected,
    #[error("unexpected message {0} during authentication")]
    Unexpected(char),
}

/// How long the last good verifier may stand in while the catalog connection is down.
const VERIFIER_TTL: Duration = Duration::from_secs(30);

pub(super) struct Login<'a> {
    pub shared: &'a Shared,
    pub info: &'a SessionInfo,
    pub peer: Option<IpAddr>,
    pub client_tls: bool,
    pub server_cert_hash: Option<Vec<u8>>,
}

impl Login<'_> {
    pub(super) async fn run<C, S>(&self, client: &mut Conn<C>, server: &mut Conn<S>) -> Result<Relayed, SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let user = self.info.user.as_str();
        let (verifier, md5_only) = self.verifier(user).await?;
        if md5_only {
            // No downgrade: the proxy cannot log in upstream from an md5 hash via SCRAM, and it
            // never offers a weaker method than SCRAM. Say so instead of a bare failure.
            return Err(SessionError::Refused(Box::new(
                ErrorResponse::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!(
                        "pgveil: role \"{user}\" has an md5 password; auth.mode scram needs a SCRAM-SHA-256 verifier"
                    ),
                )
                .with_hint("set the password again with password_encryption = 'scram-sha-256'"),
            )));
        }
        let known = verifier.is_some();
        let verifier = verifier.unwrap_or_else(|| Verifier::mock(user, self.shared.cancel_mock_secret()));
        // 1. The client's exchange with us.
        let mut out = BytesMut::new();
        let mechs: &[u8] =
            if self.client_tls { b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0" } else { b"SCRAM-SHA-256\0\0" };
        messages::authentication(&mut out, 10, mechs);
        client.write_all(&out).await?;
        client.flush().await?;
        let initial = expect_password(client).await?;
        let (mechanism, first) = sasl_initial(&initial).ok_or(SessionError::UnexpectedClientMessage(b'p'))?;
        let cert_hash = self
            .client_tls
            .then(|| self.shared.server_tls.as_ref().map(|t| super::scram::end_point_hash(&t.cert)))
            .flatten();
        let (exchange, server_first) =
            match ServerExchange::start(verifier.clone(), &mechanism, &first, cert_hash.as_deref()) {
                Ok(x) => x,
                Err(e) => return self.fail(client, &format!("SCRAM: {e}")).await,
            };
        out.clear();
        messages::authentication(&mut out, 11, server_first.as_bytes());
        client.write_all(&out).await?;
        client.flush().await?;
        let response = expect_password(client).await?;
        let client_final = String::from_utf8_lossy(response.body_ref()).into_owned();
        let (server_final, client_key) = match exchange.finish(&client_final) {
            Ok(x) if known => x,
            Ok(_) | Err(_) => return self.fail(client, "wrong password or unknown role").await,
        };
        // 2. Our exchange with the server, as the same role.
        if let Err(why) = self.upstream(server, client_key, verifier).await {
            // A password changed since the verifier was read: read it again next time.
            self.shared.verifiers.remove(&(self.info.database.clone(), user.to_owned()));
            return self.fail(client, &why.to_string()).await;
        }
        out.clear();
        messages::authentication(&mut out, 12, server_final.as_bytes());
        messages::authentication(&mut out, 0, &[]);
        client.write_all(&out).await?;
        Ok(Relayed::Ok)
    }

    async fn upstream<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        server: &mut Conn<S>,
        client_key: [u8; 32],
        verifier: Verifier,
    ) -> Result<(), LoginError> {
        let mut exchange: Option<ClientExchange> = None;
        loop {
            let frame = server.read_frame().await?.ok_or(LoginError::ServerClosed)?;
            match frame.tag() {
                b'R' => {
                    let (code, data) = messages::auth_request(&frame).ok_or(LoginError::Malformed)?;
                    let mut out = BytesMut::new();
                    match code {
                        0 => return Ok(()),
                        10 => {
                            let mut r = Reader::new(data);
                            let mut mechs = Vec::new();
                            while let Some(m) = r.cstr().filter(|m| !m.is_empty()) {
                                mechs.push(String::from_utf8_lossy(m).into_owned());
                            }
                            let mechs: Vec<&str> = mechs.iter().map(String::as_str).collect();
                            let (ex, mech, first) = ClientExchange::start(
                                client_key,
                                verifier.clone(),
                                &mechs,
                                self.server_cert_hash.as_deref(),
                            );
                            let mut body = BytesMut::new();
                            body.put_slice(mech.as_bytes());
                            body.put_u8(0);
                            body.put_i32(i32::try_from(first.len()).unwrap_or(0));
                            body.put_slice(first.as_bytes());
                            messages::tagged(&mut out, b'p', &body);
                            exchange = Some(ex);
                        }
                        11 => {
                            let ex = exchange.as_mut().ok_or(LoginError::OutOfOrder("SASL continue"))?;
                            let reply = ex
                                .respond(&String::from_utf8_lossy(data))
                                .map_err(|e| LoginError::Scram(e.to_string()))?;
                            messages::tagged(&mut out, b'p', reply.as_bytes());
                        }
                        12 => {
                            let ex = exchange.as_ref().ok_or(LoginError::OutOfOrder("SASL final"))?;
                            ex.verify(&String::from_utf8_lossy(data)).map_err(|e| LoginError::Scram(e.to_string()))?;
                            continue;
                        }
                        3 | 5 => return Err(LoginError::PasswordMethod),
                        other => return Err(LoginError::UnsupportedMethod(other)),
                    }
                    server.write_all(&out).await?;
                    server.flush().await?;
                }
                b'E' => return Err(LoginError::Rejected),
                b'N' => {}
                other => return Err(LoginError::Unexpected(char::from(other))),
            }
        }
    }

    async fn fail<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut Conn<C>,
        why: &str,
    ) -> Result<Relayed, SessionError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.shared.metrics.auth_failures_total.fetch_add(1, Relaxed);
        self.shared.audit.log(Event::session(EventKind::AuthFailed, self.info).reason(why));
        tracing::info!(reason = why, "authentication failed");
        if let Some(ip) = self.peer {
            let delay = {
                let mut e = self.shared.auth_failures.entry(ip).or_insert((0, Instant::now()));
                if e.1.elapsed() > Duration::from_secs(300) {
                    e.0 = 0;
                }
                e.0 = e.0.saturating_add(1);
                e.1 = Instant::now();
                Duration::from_millis(100u64.saturating_mul(1 << e.0.min(5)).min(3000))
            };
            tokio::time::sleep(delay).await;
        }
        let e = ErrorResponse::fatal(
            sqlstate::INVALID_PASSWORD,
            format!("password authentication failed for user \"{}\"", self.info.user),
        );
        client.write_all(&e.to_bytes()).await?;
        client.flush().await?;
        Ok(Relayed::Failed)
    }

    /// The role's SCRAM verifier from `auth.file` or `auth.query`, read at every login so a
    /// changed password works at once; the last good answer is kept briefly for when the
    /// catalog connection is down.
    /// The verifier, and whether the role has only an md5 secret.
    async fn verifier(&self, user: &str) -> Result<(Option<Verifier>, bool), SessionError> {
        let key = (self.info.database.clone(), user.to_owned());
        match self.read_verifier(user).await {
            Ok(secret) => {
                let md5 = secret.as_deref().is_some_and(|s| s.starts_with("md5"));
                let v = secret.as_deref().and_then(Verifier::parse);
                self.shared.verifiers.insert(key, (v.clone(), Instant::now()));
                Ok((v, md5))
            }
            Err(e) => match self.shared.verifiers.get(&key).filter(|e| e.1.elapsed() < VERIFIER_TTL) {
                Some(hit) => Ok((hit.0.clone(), false)),
                None => Err(e),
            },
        }
    }

    async fn read_verifier(&self, user: &str) -> Result<Option<String>, SessionError> {
        let auth = &self.shared.config.auth;
        let secret: Option<String> = if let Some(file) = &auth.file {
            let text =
                std::fs::read_to_string(file).map_err(|e| unavailable(&format!("cannot read auth.file: {e}")))?;
            userlist_lookup(&text, user)
        } else if let Some(sql) = &auth.query {
            self.shared
                .catalogs
                .for_db(&self.info.database)
                .verifier(&self.shared.config, sql, user)
                .await
                .map_err(|e| unavailable(&e.to_string()))?
        } else {
            None
        };
        Ok(secret)
    }
}

fn unavailable(why: &str) -> SessionError {
    tracing::warn!(error = why, "cannot read SCRAM verifiers");
    SessionError::Refused(Box::new(
        ErrorResponse::fatal(sqlstate::CANNOT_CONNECT_NOW, "pgveil: cannot verify logins right now")
            .with_hint("retry shortly"),
    ))
}

/// PgBouncer's userlist format: `"role" "secret"` per line.
pub(super) fn userlist_lookup(text: &str, user: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.split('"').filter(|p| !p.trim().is_empty());
        let (name, secret) = (parts.next()?, parts.next()?);
        (name == user).then(|| secret.to_owned())
    })
}

async fn expect_password<C: AsyncRead + AsyncWrite + Unpin>(client: &mut Conn<C>) -> Result<Frame, SessionError> {
    match client.read_frame().await? {
        Some(f) if f.tag() == b'p' => Ok(f),
        Some(f) => Err(SessionError::UnexpectedClientMessage(f.tag())),
        None => Err(SessionError::Truncated(Direction::FromClient)),
    }
}

/// SASLInitialResponse: the mechanism and the client-first-message.
fn sasl_initial(f: &Frame) -> Option<(String, String)> {
    let mut r = Reader::new(f.body_ref());
    let mech = String::from_utf8(r.cstr()?.to_vec()).ok()?;
    let len = usize::try_from(r.i32()?).ok()?;
    let data = String::from_utf8(r.bytes(len)?.to_vec()).ok()?;
    Some((mech, data))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    #[test]
    fn reads_pgbouncer_userlists() {
        let text = "\"alice\" \"SCRAM-SHA-256$4096:c2FsdA==$a:b\"\n\"bob\" \"md5abc\"\n";
        assert_eq!(super::userlist_lookup(text, "bob").as_deref(), Some("md5abc"));
        assert_eq!(super::userlist_lookup(text, "carol"), None);
    }
}
