//! Test certificates, generated at test time: a CA and a leaf for `localhost` / 127.0.0.1.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `ca.crt`, `<name>.crt` and `<name>.key` into `dir` (the CA is reused if present).
pub fn write(dir: &Path, name: &str) -> anyhow::Result<CertFiles> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "pgveil test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse()?));
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let leaf = params.signed_by(&leaf_key, &ca)?;
    let files = CertFiles {
        ca: dir.join(format!("{name}-ca.crt")),
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.cert, leaf.pem())?;
    std::fs::write(&files.key, leaf_key.serialize_pem())?;
    Ok(files)
}
