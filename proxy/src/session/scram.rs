//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) on both legs, for `auth.mode: scram`: the proxy runs
//! the exchange with the client itself, offering `SCRAM-SHA-256-PLUS` bound to its own
//! certificate, verifies the proof against the role's stored verifier, recovers the
//! ClientKey from the proof, and uses it to authenticate to the server as the same role (bound
//! to the server's certificate when that leg is TLS). The password never passes through the
//! proxy and nothing secret is stored. Sans-IO: strings in, strings out.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type Key = [u8; 32];

fn hmac(key: &[u8], data: &[u8]) -> Key {
    #[allow(clippy::expect_used, reason = "HMAC accepts keys of any length")]
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

/// `tls-server-end-point` channel-binding data: SHA-256 of the certificate (RFC 5929; SHA-256
/// is what it prescribes for the SHA-256-signed certificates rustls and PostgreSQL use).
pub fn end_point_hash(cert_der: &[u8]) -> Vec<u8> {
    sha256(cert_der).to_vec()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("SCRAM channel binding negotiation error")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("wrong password")]
    Proof,
    #[error("the server's SCRAM signature is wrong")]
    ServerSignature,
    #[error("the server uses different SCRAM parameters than the stored verifier")]
    Parameters,
}

/// A role's stored SCRAM secret: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// The verifier PostgreSQL would store for `password` (tests, and `pgveil`'s own use).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A verifier for a role that does not exist: the exchange runs to the end and fails
    /// exactly as a wrong password does, so roles cannot be enumerated.
    pub fn mock(user: &str, secret: &[u8]) -> Verifier {
        let salt = hmac(secret, user.as_bytes())[..16].to_vec();
        Verifier {
            iterations: 4096,
            salt,
            stored_key: hmac(secret, b"no such role"),
            server_key: hmac(secret, b"server"),
        }
    }
}

fn attr(msg: &str, name: char) -> Option<&str> {
    msg.split(',').find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

fn nonce() -> String {
    let mut b = [0u8; 18];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    B64.encode(b)
}

/// How the client's gs2 header said it handles channel binding.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gs2 {
    /// `n`: no binding.
    None,
    /// `y`: supports binding but thinks the server does not.
    Supported,
    /// `p=tls-server-end-point`.
    Bound,
}

/// The server side, towards the client.
#[derive(Debug)]
pub struct ServerExchange {
    verifier: Verifier,
    gs2_header: String,
    cbind_data: Vec<u8>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Starts from the SASLInitialResponse: `mechanism` and the client-first-message.
    /// `our_cert_hash` is the channel-binding data when the client is on TLS (and so was
    /// offered `-PLUS`).
    pub fn start(
        verifier: Verifier,
        mechanism: &str,
        client_first: &str,
        our_cert_hash: Option<&[u8]>,
    ) -> Result<(Self, String), ScramError> {
        let (gs2, rest) = if let Some(rest) = client_first.strip_prefix("n,") {
            (Gs2::None, rest)
        } else if let Some(rest) = client_first.strip_prefix("y,") {
            (Gs2::Supported, rest)
        } else if let Some(rest) = client_first.strip_prefix("p=tls-server-end-point,") {
            (Gs2::Bound, rest)
        } else {
            return Err(ScramError::Malformed);
        };
        // The authzid (between the commas) must be empty, as PostgreSQL requires.
        let client_first_bare = rest.strip_prefix(',').ok_or(ScramError::Malformed)?;
        let plus = mechanism == "SCRAM-SHA-256-PLUS";
        let cbind_data = match (&gs2, plus, our_cert_hash) {
            (Gs2::Bound, true, Some(h)) => h.to_vec(),
            (Gs2::None, false, _) => Vec::new(),
            // `y` while we offered -PLUS means someone removed it on the way: refuse (RFC 5802).
            (Gs2::Supported, false, None) => Vec::new(),
            _ => return Err(ScramError::ChannelBinding),
        };
        let gs2_header = client_first
            .get(..client_first.len().saturating_sub(client_first_bare.len()))
            .ok_or(ScramError::Malformed)?
            .to_owned();
        let client_nonce = attr(client_first_bare, 'r').ok_or(ScramError::Malformed)?;
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
        let ex = ServerExchange {
            verifier,
            gs2_header,
            cbind_data,
            client_first_bare: client_first_bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((ex, server_first))
    }

    /// Checks the client-final-message; returns the server-final-message and the ClientKey.
    pub fn finish(self, client_final: &str) -> Result<(String, Key), ScramError> {
        let (without_proof, proof) = client_final.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let mut expected_c = self.gs2_header.as_bytes().to_vec();
        expected_c.extend_from_slice(&self.cbind_data);
        let c =
            B64.decode(attr(without_proof, 'c').ok_or(ScramError::Malformed)?).map_err(|_| ScramError::Malformed)?;
        if c != expected_c {
            return Err(ScramError::ChannelBinding);
        }
        if attr(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: Key =
            B64.decode(proof).map_err(|_| ScramError::Malformed)?.try_into().map_err(|_| ScramError::Malformed)?;
        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, self.server_first);
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(client_signature)) {
            *k = p ^ s;
        }
        if !bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// The client side, towards the server, authenticating with a recovered ClientKey.
#[derive(Debug)]
pub struct ClientExchange {
    client_key: Key,
    verifier: Verifier,
    gs2_header: String,
    cbind_data: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl ClientExchange {
    /// `server_mechanisms` as the server listed them; `server_cert_hash` when the server leg
    /// is TLS. Returns the exchange, the mechanism to use and the client-first-message.
    pub fn start(
        client_key: Key,
        verifier: Verifier,
        server_mechanisms: &[&str],
        server_cert_hash: Option<&[u8]>,
    ) -> (Self, &'static str, String) {
        let (mechanism, gs2_header, cbind_data) = match server_cert_hash {
            Some(h) if server_mechanisms.contains(&"SCRAM-SHA-256-PLUS") => {
                ("SCRAM-SHA-256-PLUS", "p=tls-server-end-point,,".to_owned(), h.to_vec())
            }
            Some(_) => ("SCRAM-SHA-256", "y,,".to_owned(), Vec::new()),
            None => ("SCRAM-SHA-256", "n,,".to_owned(), Vec::new()),
        };
        let nonce = nonce();
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("{gs2_header}{client_first_bare}");
        let ex = ClientExchange {
            client_key,
            verifier,
            gs2_header,
            cbind_data,
            client_first_bare,
            nonce,
            auth_message: None,
        };
        (ex, mechanism, first)
    }

    /// The client-final-message for the server-first-message.
    pub fn respond(&mut self, server_first: &str) -> Result<String, ScramError> {
        let r = attr(server_first, 'r').ok_or(ScramError::Malformed)?;
        if !r.starts_with(&self.nonce) || r.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt =
            B64.decode(attr(server_first, 's').ok_or(ScramError::Malformed)?).map_err(|_| ScramError::Malformed)?;
        let iterations: u32 = attr(server_first, 'i').and_then(|i| i.parse().ok()).ok_or(ScramError::Malformed)?;
        if salt != self.verifier.salt || iterations != self.verifier.iterations {
            // The ClientKey only proves knowledge of *this* secret.
            return Err(ScramError::Parameters);
        }
        let mut c = self.gs2_header.as_bytes().to_vec();
        c.extend_from_slice(&self.cbind_data);
        let without_proof = format!("c={},r={r}", B64.encode(c));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key = sha256(&self.client_key);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self.client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server's signature (mutual authentication).
    pub fn verify(&self, server_final: &str) -> Result<(), ScramError> {
        let am = self.auth_message.as_deref().ok_or(ScramError::Malformed)?;
        let v = B64.decode(attr(server_final, 'v').ok_or(ScramError::Malformed)?).map_err(|_| ScramError::Malformed)?;
        let expected = hmac(&self.verifier.server_key, am.as_bytes());
        if bool::from(v.as_slice().ct_eq(&expected)) { Ok(()) } else { Err(ScramError::ServerSignature) }
    }
}

/// A client proof computed from a password, as a driver does (tests).
pub fn client_final_for_password(
    password: &str,
    client_first_bare: &str,
    server_first: &str,
    without_proof: &str,
) -> String {
    let salt = B64.decode(attr(server_first, 's').unwrap_or_default()).unwrap_or_default();
    let iterations: u32 = attr(server_first, 'i').and_then(|i| i.parse().ok()).unwrap_or(4096);
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let am = format!("{client_first_bare},{server_first},{without_proof}");
    let sig = hmac(&sha256(&client_key), am.as_bytes());
    let proof: Vec<u8> = client_key.iter().zip(sig).map(|(k, s)| k ^ s).collect();
    format!("{without_proof},p={}", B64.encode(proof))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    /// RFC 7677 §3: user "user", password "pencil".
    #[test]
    fn rfc7677_vectors() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = Verifier::from_password("pencil", &salt, 4096);
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let without_proof = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let client_final = client_final_for_password("pencil", client_first_bare, server_first, without_proof);
        assert_eq!(client_final, format!("{without_proof},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="));
        let am = format!("{client_first_bare},{server_first},{without_proof}");
        assert_eq!(B64.encode(hmac(&v.server_key, am.as_bytes())), "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    /// Both state machines against each other: client ↔ proxy (bound), proxy ↔ server.
    #[test]
    fn proxy_recovers_the_client_key_and_reuses_it() {
        let v = Verifier::from_password("s3cret", b"saltsaltsaltsalt", 4096);
        let cert = end_point_hash(b"proxy certificate");
        // A client binding to the proxy's certificate.
        let client_first = "p=tls-server-end-point,,n=,r=clientnonce";
        let (server, server_first) =
            ServerExchange::start(v.clone(), "SCRAM-SHA-256-PLUS", client_first, Some(&cert)).unwrap();
        let mut c = b"p=tls-server-end-point,,".to_vec();
        c.extend_from_slice(&cert);
        let r = attr(&server_first, 'r').unwrap();
        let without_proof = format!("c={},r={r}", B64.encode(&c));
        let client_final = client_final_for_password("s3cret", "n=,r=clientnonce", &server_first, &without_proof);
        let (server_final, client_key) = server.finish(&client_final).unwrap();
        assert!(server_final.starts_with("v="));
        // The proxy, as a client of the real server (which holds the same verifier).
        let backend_cert = end_point_hash(b"server certificate");
        let (mut up, mech, first) =
            ClientExchange::start(client_key, v.clone(), &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], Some(&backend_cert));
        assert_eq!(mech, "SCRAM-SHA-256-PLUS");
        let (backend, backend_first) = ServerExchange::start(v.clone(), mech, &first, Some(&backend_cert)).unwrap();
        let final_msg = up.respond(&backend_first).unwrap();
        let (backend_final, _) = backend.finish(&final_msg).expect("the server accepts the recovered key");
        up.verify(&backend_final).unwrap();
    }

    #[test]
    fn wrong_passwords_and_binding_games_fail() {
        let v = Verifier::from_password("right", b"0123456789abcdef", 4096);
        let (server, sf) = ServerExchange::start(v.clone(), "SCRAM-SHA-256", "n,,n=,r=abc", None).unwrap();
        let r = attr(&sf, 'r').unwrap().to_owned();
        let wrong = client_final_for_password("wrong", "n=,r=abc", &sf, &format!("c=biws,r={r}"));
        assert_eq!(server.finish(&wrong).unwrap_err(), ScramError::Proof);
        // `y` although the proxy offered -PLUS over TLS: a downgrade.
        let cert = end_point_hash(b"c");
        assert_eq!(
            ServerExchange::start(v.clone(), "SCRAM-SHA-256", "y,,n=,r=abc", Some(&cert)).unwrap_err(),
            ScramError::ChannelBinding
        );
        // A non-existent role fails like a wrong password.
        let mock = Verifier::mock("ghost", b"k");
        let (server, sf) = ServerExchange::start(mock, "SCRAM-SHA-256", "n,,n=,r=abc", None).unwrap();
        let r = attr(&sf, 'r').unwrap().to_owned();
        let any = client_final_for_password("whatever", "n=,r=abc", &sf, &format!("c=biws,r={r}"));
        assert_eq!(server.finish(&any).unwrap_err(), ScramError::Proof);
    }

    #[test]
    fn parses_postgres_verifiers() {
        let v = Verifier::from_password("pw", b"0123456789abcdef", 4096);
        let text = format!(
            "SCRAM-SHA-256$4096:{}${}:{}",
            B64.encode(&v.salt),
            B64.encode(v.stored_key),
            B64.encode(v.server_key)
        );
        assert_eq!(Verifier::parse(&text), Some(v));
        assert_eq!(Verifier::parse("md5abcdef"), None);
    }
}
