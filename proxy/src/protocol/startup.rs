//! The untagged first messages a client sends: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest. Sans-IO: takes the packet's bytes, returns what it is.

use bytes::Bytes;

use super::wire::Reader;

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0 and 3.2 (PostgreSQL 18); 3.1 was never used.
pub const PROTOCOL_3_0: u32 = 196_608;
/// Newest minor version this proxy implements.
pub const NEWEST_MINOR: u16 = 2;
/// `MAX_STARTUP_PACKET_LENGTH` in PostgreSQL.
pub const MAX_STARTUP_LEN: u32 = 10_000;

#[derive(Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: u32, key: Bytes },
    Startup(Startup),
}

impl std::fmt::Debug for StartupPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SslRequest => f.write_str("SslRequest"),
            Self::GssEncRequest => f.write_str("GssEncRequest"),
            Self::Cancel { pid, key } => write!(f, "Cancel {{ pid: {pid}, key_len: {} }}", key.len()),
            Self::Startup(s) => s.fmt(f),
        }
    }
}

/// A StartupMessage: requested protocol minor version and the parameters, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> &str {
        self.param("user").unwrap_or_default()
    }

    /// The database, defaulting to the user name as PostgreSQL does.
    pub fn database(&self) -> &str {
        self.param("database").unwrap_or_else(|| self.user())
    }

    pub fn application(&self) -> &str {
        self.param("application_name").unwrap_or_default()
    }

    /// Protocol-extension options (`_pq_.*`) the client asked for; this proxy implements none.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with("_pq_."))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{NEWEST_MINOR}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: expected terminator as last byte")]
    Malformed,
    #[error("startup parameters must be valid UTF-8")]
    NotUtf8,
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("replication connections are not supported through pgveil")]
    Replication,
}

/// Validates the 4-byte length word that opens every startup packet.
pub fn packet_len(word: [u8; 4]) -> Result<usize, StartupError> {
    let len = u32::from_be_bytes(word);
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(StartupError::BadLength);
    }
    usize::try_from(len).map_err(|_| StartupError::BadLength)
}

/// Parses a whole startup packet (`body` excludes the 4-byte length word).
pub fn parse(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut r = Reader::new(body);
    let code = r.u32().ok_or(StartupError::BadLength)?;
    match code {
        SSL_REQUEST_CODE if r.is_empty() => return Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if r.is_empty() => return Ok(StartupPacket::GssEncRequest),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => return Err(StartupError::BadLength),
        CANCEL_REQUEST_CODE => {
            let pid = r.u32().ok_or(StartupError::BadLength)?;
            let key = r.rest();
            // PostgreSQL ignores keys of length 0 or over 256.
            if key.is_empty() || key.len() > 256 {
                return Err(StartupError::BadLength);
            }
            return Ok(StartupPacket::Cancel { pid, key: Bytes::copy_from_slice(key) });
        }
        _ => {}
    }
    let (major, minor) = (u16::try_from(code >> 16).unwrap_or(u16::MAX), u16::try_from(code & 0xffff).unwrap_or(0));
    if major != 3 {
        return Err(StartupError::UnsupportedProtocol { major, minor });
    }
    let mut params = Vec::new();
    loop {
        let key = r.cstr().ok_or(StartupError::Malformed)?;
        if key.is_empty() {
            break;
        }
        let value = r.cstr().ok_or(StartupError::Malformed)?;
        let key = std::str::from_utf8(key).map_err(|_| StartupError::NotUtf8)?;
        let value = std::str::from_utf8(value).map_err(|_| StartupError::NotUtf8)?;
        params.push((key.to_owned(), value.to_owned()));
    }
    if !r.is_empty() {
        return Err(StartupError::Malformed);
    }
    let startup = Startup { minor, params };
    if startup.param("user").is_none_or(str::is_empty) {
        return Err(StartupError::NoUser);
    }
    if startup.param("replication").is_some_and(|v| !matches!(v, "false" | "off" | "no" | "0")) {
        return Err(StartupError::Replication);
    }
    Ok(StartupPacket::Startup(startup))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn startup(code: u32, kv: &[(&str, &str)]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        for (k, val) in kv {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v.push(0);
        v
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(parse(&SSL_REQUEST_CODE.to_be_bytes()), Ok(StartupPacket::SslRequest));
        assert_eq!(parse(&GSSENC_REQUEST_CODE.to_be_bytes()), Ok(StartupPacket::GssEncRequest));
        let mut cancel = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        cancel.extend_from_slice(&7u32.to_be_bytes());
        cancel.extend_from_slice(&[1; 32]);
        assert!(matches!(parse(&cancel), Ok(StartupPacket::Cancel { pid: 7, key }) if key.len() == 32));
        let StartupPacket::Startup(s) =
            parse(&startup(PROTOCOL_3_0 | 2, &[("user", "alice"), ("_pq_.x", "1")])).unwrap()
        else {
            panic!("not a startup")
        };
        assert_eq!((s.minor, s.user(), s.database()), (2, "alice", "alice"));
        assert_eq!(s.protocol_options().collect::<Vec<_>>(), ["_pq_.x"]);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            parse(&startup(2 << 16, &[("user", "a")])),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        );
        assert_eq!(parse(&startup(PROTOCOL_3_0, &[])), Err(StartupError::NoUser));
        let mut truncated = startup(PROTOCOL_3_0, &[("user", "a")]);
        truncated.pop();
        truncated.pop();
        assert_eq!(parse(&truncated), Err(StartupError::Malformed));
        assert_eq!(parse(&[0, 1]), Err(StartupError::BadLength));
        assert_eq!(packet_len(3u32.to_be_bytes()), Err(StartupError::BadLength));
        assert_eq!(packet_len(0x7fff_ffffu32.to_be_bytes()), Err(StartupError::BadLength));
        assert_eq!(
            parse(&startup(PROTOCOL_3_0, &[("user", "a"), ("replication", "database")])),
            Err(StartupError::Replication)
        );
    }
}
