//! The search_path as the server keeps it for one session (threat model I12): the session's
//! value, a transaction's `SET LOCAL` over it, and what `ROLLBACK` and `ROLLBACK TO SAVEPOINT`
//! restore. The analyzer follows it statement by statement within one text; the proxy follows
//! it across texts, applying each statement's changes when the server confirms that statement
//! ran (its CommandComplete), so a SET that was only parsed, or skipped after an error, changes
//! nothing.
//!
//! pgveil's model can still differ from the server's (a change it cannot see); the text it
//! sends pins every name it resolved, so such a difference fails a statement or reads an
//! unprotected relation, never a protected one raw.

/// A change a statement makes to the session's name resolution, in statement order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `SET [LOCAL] search_path` / `RESET` / `set_config('search_path', …)`: the schemas,
    /// `$user` already expanded (`None`: back to the session's default).
    SearchPath {
        path: Option<Vec<String>>,
        local: bool,
    },
    Begin,
    /// `COMMIT` (`chain`: `AND CHAIN` opens the next transaction at once). A COMMIT of a
    /// failed transaction rolls back: the proxy tells by the server's tag.
    Commit {
        chain: bool,
    },
    Rollback {
        chain: bool,
    },
    Savepoint(String),
    Release(String),
    RollbackTo(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Frame {
    name: String,
    session: Vec<String>,
    local: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Tx {
    /// The session's value when the transaction began (what ROLLBACK restores).
    start: Vec<String>,
    savepoints: Vec<Frame>,
}

/// One session's search_path state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PathState {
    default: Vec<String>,
    session: Vec<String>,
    local: Option<Vec<String>>,
    tx: Option<Tx>,
}

impl PathState {
    /// A session that starts with `path` (also what RESET returns to).
    pub fn new(path: Vec<String>) -> Self {
        PathState { default: path.clone(), session: path, local: None, tx: None }
    }

    /// The schemas names resolve through now.
    pub fn current(&self) -> &[String] {
        self.local.as_deref().unwrap_or(&self.session)
    }

    /// The schemas RESET returns to.
    pub fn default_path(&self) -> &[String] {
        &self.default
    }

    /// What decides how a text's names resolve, for cache keys: the paths in force and
    /// whether a transaction is open, but not the savepoints' names (which ORMs number
    /// afresh for every nested block; keyed on them, every statement inside would miss the
    /// cache). A multi-statement text that rolls back to a savepoint is decided as if its
    /// frames were the ones of the state it was first seen in; its names are pinned, so a
    /// wrong guess fails a statement.
    pub fn key(&self, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        self.default.hash(h);
        self.session.hash(h);
        self.local.hash(h);
        self.tx.as_ref().map(|t| &t.start).hash(h);
    }

    /// Inside an explicit transaction block.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Applies one statement's change. `implicit`: the statement runs in an implicit
    /// transaction block (a multi-statement Query), where SET LOCAL holds until its end.
    pub fn apply(&mut self, change: &Change, implicit: bool) {
        match change {
            Change::SearchPath { path, local } => {
                let new = path.clone().unwrap_or_else(|| self.default.clone());
                if *local {
                    // Outside a transaction block SET LOCAL has no effect (the server warns).
                    if self.tx.is_some() || implicit {
                        self.local = Some(new);
                    }
                } else {
                    self.session = new;
                    self.local = None;
                }
            }
            Change::Begin => {
                if self.tx.is_none() {
                    self.tx = Some(Tx { start: self.session.clone(), savepoints: Vec::new() });
                }
            }
            Change::Commit { chain } => {
                self.end();
                if *chain {
                    self.apply(&Change::Begin, false);
                }
            }
            Change::Rollback { chain } => {
                if let Some(tx) = self.tx.take() {
                    self.session = tx.start;
                }
                self.local = None;
                if *chain {
                    self.apply(&Change::Begin, false);
                }
            }
            Change::Savepoint(name) => {
                let frame = Frame { name: name.clone(), session: self.session.clone(), local: self.local.clone() };
                if let Some(tx) = self.tx.as_mut() {
                    tx.savepoints.push(frame);
                }
            }
            Change::Release(name) => {
                if let Some(tx) = self.tx.as_mut()
                    && let Some(at) = tx.savepoints.iter().rposition(|f| &f.name == name)
                {
                    tx.savepoints.truncate(at);
                }
            }
            Change::RollbackTo(name) => {
                let Some(tx) = self.tx.as_mut() else { return };
                let Some(at) = tx.savepoints.iter().rposition(|f| &f.name == name) else { return };
                tx.savepoints.truncate(at.saturating_add(1));
                if let Some(f) = tx.savepoints.last() {
                    self.session.clone_from(&f.session);
                    self.local.clone_from(&f.local);
                }
            }
        }
    }

    /// The transaction (explicit or implicit) ended with its changes kept.
    pub fn end(&mut self) {
        self.tx = None;
        self.local = None;
    }
}

/// A search_path value as the server writes it (`a, "B", "x,y", "$user"`) as schema names:
/// a comma inside double quotes is part of the name, `""` is a quote, unquoted names fold to
/// lower case, and `$user` (quoted or not) is the session's user.
pub fn parse_list(v: &str, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut name = String::new();
    let (mut quoted, mut was_quoted) = (false, false);
    let mut chars = v.chars().peekable();
    let mut flush = |name: &mut String, was_quoted: &mut bool| {
        let n = if *was_quoted { std::mem::take(name) } else { std::mem::take(name).to_lowercase() };
        if !n.is_empty() {
            out.push(expand_user(&n, user));
        }
        *was_quoted = false;
    };
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                name.push('"');
            }
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            ',' if !quoted => flush(&mut name, &mut was_quoted),
            c if !quoted && c.is_whitespace() => {}
            c => name.push(c),
        }
    }
    flush(&mut name, &mut was_quoted);
    out
}

/// `$user` as the session's user.
pub fn expand_user(s: &str, user: &str) -> String {
    if s == "$user" { user.to_owned() } else { s.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn set(v: &[&str], local: bool) -> Change {
        Change::SearchPath { path: Some(p(v)), local }
    }

    #[test]
    fn rollback_savepoints_and_set_local_undo_as_the_server_does() {
        let mut s = PathState::new(p(&["app", "public"]));
        s.apply(&Change::Begin, false);
        s.apply(&set(&["crm"], false), false);
        assert_eq!(s.current(), p(&["crm"]));
        s.apply(&Change::Rollback { chain: false }, false);
        assert_eq!(s.current(), p(&["app", "public"]), "ROLLBACK undoes SET");

        s.apply(&Change::Begin, false);
        s.apply(&set(&["crm"], true), false);
        assert_eq!(s.current(), p(&["crm"]));
        s.apply(&Change::Commit { chain: false }, false);
        assert_eq!(s.current(), p(&["app", "public"]), "SET LOCAL ends with its transaction");

        s.apply(&set(&["x"], true), false);
        assert_eq!(s.current(), p(&["app", "public"]), "SET LOCAL outside a transaction does nothing");
        s.apply(&set(&["x"], true), true);
        assert_eq!(s.current(), p(&["x"]), "in a multi-statement Query it holds to the end");
        s.end();

        s.apply(&Change::Begin, false);
        s.apply(&set(&["a"], false), false);
        s.apply(&Change::Savepoint("sp".to_owned()), false);
        s.apply(&set(&["b"], false), false);
        s.apply(&Change::RollbackTo("sp".to_owned()), false);
        assert_eq!(s.current(), p(&["a"]), "ROLLBACK TO restores the savepoint's value");
        s.apply(&set(&["c"], false), false);
        s.apply(&Change::RollbackTo("sp".to_owned()), false);
        assert_eq!(s.current(), p(&["a"]), "the savepoint stays after ROLLBACK TO");
        s.apply(&Change::Release("sp".to_owned()), false);
        s.apply(&Change::Commit { chain: true }, false);
        assert!(s.in_transaction(), "AND CHAIN");
        assert_eq!(s.current(), p(&["a"]));
        s.apply(&Change::SearchPath { path: None, local: false }, false);
        assert_eq!(s.current(), p(&["app", "public"]), "RESET");
    }

    #[test]
    fn search_path_lists_are_read_as_the_server_writes_them() {
        assert_eq!(parse_list("\"$user\", public", "app"), ["app", "public"]);
        assert_eq!(parse_list("\"x,crm,y\", public", "app"), ["x,crm,y", "public"]);
        assert_eq!(parse_list("\"My \"\"Q\"\" S\", Crm", "app"), ["My \"Q\" S", "crm"]);
        assert!(parse_list("", "app").is_empty());
        assert!(parse_list("\"\"", "app").is_empty());
        assert_eq!(parse_list("$user", "Ann"), ["Ann"]);
    }
}
