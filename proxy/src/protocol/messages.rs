//! Typed views of the messages the proxy inspects, and encoders for the ones it originates.
//! Views borrow the frame's bytes; nothing here copies a row or logs a payload.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::Frame;
use super::wire::{Reader, begin, finish, put_cstr};

/// SQLSTATE codes the proxy itself uses.
pub mod sqlstate {
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INTERNAL_ERROR: &str = "XX000";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse the proxy originates. All text here is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorResponse {
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        ErrorResponse { severity, code, message: message.into(), detail: None, hint: None }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let at = begin(out, b'E');
        for (field, value) in [
            (b'S', Some(self.severity.as_str())),
            (b'V', Some(self.severity.as_str())),
            (b'C', Some(self.code)),
            (b'M', Some(self.message.as_str())),
            (b'D', self.detail.as_deref()),
            (b'H', self.hint.as_deref()),
        ] {
            if let Some(value) = value {
                out.put_u8(field);
                put_cstr(out, value.replace('\0', " ").as_bytes());
            }
        }
        out.put_u8(0);
        finish(out, at);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let at = begin(out, b'Z');
    out.put_u8(status);
    finish(out, at);
}

pub fn backend_key_data(out: &mut BytesMut, pid: u32, key: &[u8]) {
    let at = begin(out, b'K');
    out.put_u32(pid);
    out.put_slice(key);
    finish(out, at);
}

pub fn negotiate_protocol_version(out: &mut BytesMut, minor: u16, unsupported: &[&str]) {
    let at = begin(out, b'v');
    out.put_u32(super::startup::PROTOCOL_3_0 | u32::from(minor));
    out.put_u32(u32::try_from(unsupported.len()).unwrap_or(0));
    for name in unsupported {
        put_cstr(out, name.as_bytes());
    }
    finish(out, at);
}

pub fn authentication(out: &mut BytesMut, code: u32, data: &[u8]) {
    let at = begin(out, b'R');
    out.put_u32(code);
    out.put_slice(data);
    finish(out, at);
}

/// A frontend message with a tag and an arbitrary body (used for upstream authentication).
/// A message whose body is `parts` in order, written straight into `out`.
pub fn tagged_parts(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let at = begin(out, tag);
    for p in parts {
        out.put_slice(p);
    }
    finish(out, at);
}

pub fn tagged(out: &mut BytesMut, tag: u8, body: &[u8]) {
    let at = begin(out, tag);
    out.put_slice(body);
    finish(out, at);
}

/// A StartupMessage for the upstream leg.
pub fn startup_message(minor: u16, params: &[(String, String)]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32(0);
    out.put_u32(super::startup::PROTOCOL_3_0 | u32::from(minor));
    for (k, v) in params {
        put_cstr(&mut out, k.as_bytes());
        put_cstr(&mut out, v.as_bytes());
    }
    out.put_u8(0);
    let len = u32::try_from(out.len()).unwrap_or(0).to_be_bytes();
    if let Some(slot) = out.get_mut(..4) {
        slot.copy_from_slice(&len);
    }
    out.freeze()
}

pub fn ssl_request() -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&8u32.to_be_bytes());
    b[4..].copy_from_slice(&super::startup::SSL_REQUEST_CODE.to_be_bytes());
    b
}

pub fn cancel_request(pid: u32, key: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32(u32::try_from(key.len().saturating_add(12)).unwrap_or(0));
    out.put_u32(super::startup::CANCEL_REQUEST_CODE);
    out.put_u32(pid);
    out.put_slice(key);
    out.freeze()
}

/// `R`: the authentication request code and its data.
pub fn auth_request(frame: &Frame) -> Option<(u32, &[u8])> {
    let mut r = Reader::new(frame.body_ref());
    let code = r.u32()?;
    Some((code, r.rest()))
}

/// `K`: backend process id and secret key.
pub fn backend_key(frame: &Frame) -> Option<(u32, &[u8])> {
    let mut r = Reader::new(frame.body_ref());
    let pid = r.u32()?;
    Some((pid, r.rest()))
}

/// `E` / `N` fields, in order.
pub fn error_fields(frame: &Frame) -> Option<Vec<(u8, &[u8])>> {
    let mut r = Reader::new(frame.body_ref());
    let mut out = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            return Some(out);
        }
        out.push((code, r.cstr()?));
    }
}

/// Encodes `E`/`N` fields, as received or scrubbed.
pub fn encode_fields(out: &mut BytesMut, tag: u8, fields: &[(u8, &[u8])]) {
    let at = begin(out, tag);
    for (code, value) in fields {
        out.put_u8(*code);
        put_cstr(out, value);
    }
    out.put_u8(0);
    finish(out, at);
}

/// `v` from a server: the newest minor version it supports.
pub fn negotiated_minor(frame: &Frame) -> Option<u16> {
    let mut r = Reader::new(frame.body_ref());
    u16::try_from(r.u32()? & 0xffff).ok()
}

/// One field of a RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDesc {
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub typlen: i16,
    pub typmod: i32,
    pub format: i16,
}

/// `T`: the fields of a RowDescription.
pub fn row_description(frame: &Frame) -> Option<Vec<FieldDesc>> {
    let mut r = Reader::new(frame.body_ref());
    let n = r.u16()?;
    let mut out = Vec::with_capacity(usize::from(n).min(1664));
    for _ in 0..n {
        r.cstr()?;
        out.push(FieldDesc {
            table_oid: r.u32()?,
            attnum: r.i16()?,
            type_oid: r.u32()?,
            typlen: r.i16()?,
            typmod: r.i32()?,
            format: r.i16()?,
        });
    }
    r.is_empty().then_some(out)
}

/// A RowDescription with the origin (table OID, attnum) of fields that report none set from
/// `origin` by field name; `None` when nothing changes (forward the frame as it is).
pub fn row_description_with_origins(frame: &Frame, origin: impl Fn(&[u8]) -> Option<(u32, i16)>) -> Option<BytesMut> {
    let mut r = Reader::new(frame.body_ref());
    let n = r.u16()?;
    let mut body = BytesMut::with_capacity(frame.body_ref().len());
    body.put_u16(n);
    let mut changed = false;
    for _ in 0..n {
        let name = r.cstr()?;
        let (table_oid, attnum) = (r.u32()?, r.i16()?);
        let (table_oid, attnum) = match origin(name) {
            Some(o) if table_oid == 0 && attnum == 0 => {
                changed = true;
                o
            }
            _ => (table_oid, attnum),
        };
        body.put_slice(name);
        body.put_u8(0);
        body.put_u32(table_oid);
        body.put_i16(attnum);
        body.put_u32(r.u32()?);
        body.put_i16(r.i16()?);
        body.put_i32(r.i32()?);
        body.put_i16(r.i16()?);
    }
    if !r.is_empty() || !changed {
        return None;
    }
    let mut out = BytesMut::with_capacity(body.len().saturating_add(5));
    tagged(&mut out, b'T', &body);
    Some(out)
}

/// `D`: the first cell of a DataRow (`None` for NULL or a malformed row).
pub fn first_cell(frame: &Frame) -> Option<&[u8]> {
    let mut r = Reader::new(frame.body_ref());
    if r.u16()? == 0 {
        return None;
    }
    let len = usize::try_from(r.i32()?).ok()?;
    r.bytes(len)
}

/// `C`: the row count a CommandComplete tag ends with (`SELECT 5`, `INSERT 0 5`, `COPY 5`);
/// `None` for tags without one (`CREATE TABLE`).
pub fn command_rows(frame: &Frame) -> Option<u64> {
    let tag = Reader::new(frame.body_ref()).cstr()?;
    let last = tag.rsplit(|b| *b == b' ').next()?;
    std::str::from_utf8(last).ok()?.parse().ok()
}

/// `Q`: the query text up to its NUL (PostgreSQL rejects trailing bytes itself).
pub fn query_text(frame: &Frame) -> Option<&[u8]> {
    Reader::new(frame.body_ref()).cstr()
}

/// `P`: statement name and query text.
pub fn parse_message(frame: &Frame) -> Option<(&[u8], &[u8])> {
    let mut r = Reader::new(frame.body_ref());
    Some((r.cstr()?, r.cstr()?))
}

/// `P`: what follows the statement text (the parameter types), unchanged by a rewrite.
pub fn parse_rest(frame: &Frame) -> Option<&[u8]> {
    let mut r = Reader::new(frame.body_ref());
    r.cstr()?;
    r.cstr()?;
    Some(r.rest())
}

/// `B`: portal, statement and the result-format codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub result_formats: Vec<i16>,
}

pub fn bind_message(frame: &Frame) -> Option<Bind<'_>> {
    let mut r = Reader::new(frame.body_ref());
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let nfmt = r.u16()?;
    for _ in 0..nfmt {
        r.i16()?;
    }
    let nparams = r.u16()?;
    for _ in 0..nparams {
        r.value()?;
    }
    let nres = r.u16()?;
    let mut result_formats = Vec::with_capacity(usize::from(nres).min(1664));
    for _ in 0..nres {
        result_formats.push(r.i16()?);
    }
    r.is_empty().then_some(Bind { portal, statement, result_formats })
}

/// `D` / `C` from a client: kind (`S` or `P`) and name.
pub fn target(frame: &Frame) -> Option<(u8, &[u8])> {
    let mut r = Reader::new(frame.body_ref());
    let kind = r.u8()?;
    Some((kind, r.cstr()?))
}

/// `E` from a client: portal name and row limit.
pub fn execute_message(frame: &Frame) -> Option<(&[u8], i32)> {
    let mut r = Reader::new(frame.body_ref());
    Some((r.cstr()?, r.i32()?))
}

/// `S` from a server: parameter name and value.
pub fn parameter_status(frame: &Frame) -> Option<(&[u8], &[u8])> {
    let mut r = Reader::new(frame.body_ref());
    Some((r.cstr()?, r.cstr()?))
}

/// A FunctionCall's function OID and argument count.
pub fn function_call(f: &Frame) -> Option<(u32, u16)> {
    let body = f.body_ref();
    let oid = u32::from_be_bytes(body.get(0..4)?.try_into().ok()?);
    let nformats = usize::from(u16::from_be_bytes(body.get(4..6)?.try_into().ok()?));
    let at = nformats.checked_mul(2)?.checked_add(6)?;
    let nargs = u16::from_be_bytes(body.get(at..at.checked_add(2)?)?.try_into().ok()?);
    Some((oid, nargs))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::protocol::frame::{Direction, decode};

    #[test]
    fn error_response_round_trips() {
        let e = ErrorResponse::error(sqlstate::INSUFFICIENT_PRIVILEGE, "blocked").with_hint("add a WHERE clause");
        let mut buf = BytesMut::from(&e.to_bytes()[..]);
        let frame = decode(&mut buf, Direction::FromServer).unwrap().unwrap();
        let fields = error_fields(&frame).unwrap();
        assert!(fields.contains(&(b'C', b"42501".as_slice())));
        assert!(fields.contains(&(b'H', b"add a WHERE clause".as_slice())));
    }

    #[test]
    fn truncated_messages_are_none() {
        let frame = Frame::from_encoded(Bytes::from_static(b"T\0\0\0\x06\0\x01")).unwrap();
        assert_eq!(row_description(&frame), None);
        let frame = Frame::from_encoded(Bytes::from_static(b"B\0\0\0\x06a\0")).unwrap();
        assert_eq!(bind_message(&frame), None);
    }
}
