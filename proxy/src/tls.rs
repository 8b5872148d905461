//! rustls configurations: the acceptor offered to clients (SSLRequest and direct TLS with ALPN
//! `postgresql`) and the connector used towards PostgreSQL. Decides nothing about *when* to
//! upgrade; that is the session's handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{Config, UpstreamTls};

pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {source}")]
    Cert { path: String, source: rustls::pki_types::pem::Error },
    #[error("cannot read private key {path}: {source}")]
    Key { path: String, source: rustls::pki_types::pem::Error },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{path} holds no certificate")]
    Empty { path: String },
}

/// The process-wide crypto provider: aws-lc-rs, installed once.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// What the client-facing side needs: the acceptor and our certificate (for channel binding).
#[derive(Clone)]
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub cert: CertificateDer<'static>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Cert { path: path.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: path.display().to_string() });
    }
    Ok(certs)
}

pub fn server_tls(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|source| TlsError::Key { path: key.display().to_string(), source })?;
    server_tls_from(chain, key)
}

pub fn server_tls_from(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerTls, TlsError> {
    let leaf = chain.first().cloned().ok_or(TlsError::Empty { path: "(memory)".to_owned() })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert: leaf })
}

/// The connector towards PostgreSQL, or `None` when `upstream.tls` is `disable`.
pub fn upstream_connector(config: &Config) -> Result<Option<tokio_rustls::TlsConnector>, TlsError> {
    if config.upstream.tls == UpstreamTls::Disable {
        return Ok(None);
    }
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(upstream_client_config(config)?))))
}

/// The rustls client configuration for the server leg (also used by the catalog connection).
pub fn upstream_client_config(config: &Config) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut client = match config.upstream.tls {
        UpstreamTls::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            if let Some(ca) = &config.upstream.ca {
                for cert in load_certs(ca)? {
                    roots.add(cert)?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        // prefer / require encrypt without verifying the server, as libpq's sslmode does.
        UpstreamTls::Disable | UpstreamTls::Prefer | UpstreamTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth(),
    };
    client.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(client)
}

/// The server name to verify for the upstream host (an IP address or a DNS name).
pub fn upstream_name(host: &str) -> ServerName<'static> {
    ServerName::try_from(host.to_owned())
        .or_else(|_| ServerName::try_from("localhost"))
        .unwrap_or_else(|_| ServerName::from(std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST)))
}

/// A verifier that accepts any server certificate (`sslmode=require` semantics).
pub fn no_verification() -> Arc<dyn ServerCertVerifier> {
    Arc::new(NoVerification(provider()))
}

/// `sslmode=require` semantics: encryption without authentication of the server.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A self-signed certificate for `localhost` (used by `pgveil demo`).
pub fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = rcgen::generate_simple_self_signed(names)?;
    Ok((cert.cert.pem(), cert.signing_key.serialize_pem()))
}
