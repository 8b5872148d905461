//! PostgreSQL identifiers as DBAs write them in the rules file: dot-separated, unquoted parts
//! folded to lower case, double-quoted parts kept exactly (`""` is a quote), each truncated to
//! 63 bytes as the server does (NAMEDATALEN - 1).

use std::fmt;
use std::sync::Arc;

/// The server's identifier length limit in bytes.
pub const MAX_IDENT: usize = 63;

/// A role, as the session's identity holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleName(Arc<str>);

impl RoleName {
    pub fn new(name: &str) -> Self {
        RoleName(Arc::from(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `schema.table`, folded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

/// `schema.table.column`, folded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnName {
    pub table: TableName,
    pub column: String,
}

impl TableName {
    pub fn new(schema: &str, table: &str) -> Self {
        TableName { schema: schema.to_owned(), table: table.to_owned() }
    }
}

impl ColumnName {
    pub fn new(schema: &str, table: &str, column: &str) -> Self {
        ColumnName { table: TableName::new(schema, table), column: column.to_owned() }
    }
}

/// Quotes an identifier only where PostgreSQL would need it.
pub fn quote_ident(s: &str) -> String {
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain { s.to_owned() } else { format!("\"{}\"", s.replace('"', "\"\"")) }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl fmt::Display for ColumnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.table, quote_ident(&self.column))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("unterminated quoted identifier")]
    Unterminated,
    #[error("zero-length quoted identifier")]
    EmptyQuoted,
    #[error("unexpected character {0:?} after a quoted identifier")]
    AfterQuote(char),
    #[error("invalid character {0:?} in an unquoted identifier (quote it: '\"…\"')")]
    BadChar(char),
    #[error("expected {expected} dot-separated parts, found {found}")]
    Parts { expected: usize, found: usize },
}

/// Splits and folds a dotted name.
pub fn parse_parts(s: &str) -> Result<Vec<String>, NameError> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        match chars.peek() {
            None => return Err(NameError::Empty),
            Some('"') => {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err(NameError::Unterminated),
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                    }
                }
                if part.is_empty() {
                    return Err(NameError::EmptyQuoted);
                }
                match chars.peek() {
                    None | Some('.') => {}
                    Some(&c) => return Err(NameError::AfterQuote(c)),
                }
            }
            Some(_) => {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if !(c.is_alphanumeric() || c == '_' || c == '$')
                        || (part.is_empty() && (c.is_ascii_digit() || c == '$'))
                    {
                        return Err(NameError::BadChar(c));
                    }
                    part.extend(c.to_lowercase());
                    chars.next();
                }
                if part.is_empty() {
                    return Err(NameError::Empty);
                }
            }
        }
        parts.push(truncate(part));
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(c) => return Err(NameError::AfterQuote(c)),
        }
    }
}

/// Truncates to 63 bytes on a character boundary, as the server does with long identifiers.
pub fn truncate(mut s: String) -> String {
    if s.len() > MAX_IDENT {
        let mut end = MAX_IDENT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

pub fn parse_role(s: &str) -> Result<RoleName, NameError> {
    match parse_parts(s)?.as_slice() {
        [one] => Ok(RoleName::new(one)),
        parts => Err(NameError::Parts { expected: 1, found: parts.len() }),
    }
}

pub fn parse_table(s: &str) -> Result<TableName, NameError> {
    match parse_parts(s)?.as_slice() {
        [schema, table] => Ok(TableName::new(schema, table)),
        parts => Err(NameError::Parts { expected: 2, found: parts.len() }),
    }
}

pub fn parse_column(s: &str) -> Result<ColumnName, NameError> {
    match parse_parts(s)?.as_slice() {
        [schema, table, column] => Ok(ColumnName::new(schema, table, column)),
        parts => Err(NameError::Parts { expected: 3, found: parts.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_and_quotes_like_postgres() {
        assert_eq!(parse_column("Public.Customers.SSN").unwrap(), ColumnName::new("public", "customers", "ssn"));
        assert_eq!(parse_column(r#"public."Customers".ssn"#).unwrap(), ColumnName::new("public", "Customers", "ssn"));
        assert_eq!(parse_column(r#"public."a.b"."x""y""#).unwrap(), ColumnName::new("public", "a.b", "x\"y"));
        assert_eq!(parse_table("public.customers.ssn"), Err(NameError::Parts { expected: 2, found: 3 }));
        assert_eq!(parse_table("public."), Err(NameError::Empty));
        assert_eq!(parse_table(r#"public."cust"#), Err(NameError::Unterminated));
        assert_eq!(parse_table("public.cust-omers"), Err(NameError::BadChar('-')));
        let long = "a".repeat(70);
        assert_eq!(parse_table(&format!("public.{long}")).unwrap().table.len(), 63);
        assert_eq!(ColumnName::new("public", "Customers", "ssn").to_string(), r#"public."Customers".ssn"#);
    }
}
