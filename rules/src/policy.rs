//! The compiled, immutable policy: who is exempt, which columns are masked for whom, and the
//! minimization rules. Lookups only; no SQL, no YAML.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::mask::{HashKey, Mask};
use crate::names::{ColumnName, RoleName, TableName};
use crate::tree::Pos;

/// How far a masked column may be used in filters (rules.md `predicates:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Predicates {
    #[default]
    None,
    /// Filters, joins, ordering and grouping compare the masked value.
    Masked,
    Equality,
    Any,
}

/// `enforce` blocks; `monitor` lets the statement run and records what would have been blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRule {
    pub mask: Mask,
    pub unmasked_for: Vec<RoleName>,
    pub predicates: Predicates,
    pub by_role: Vec<(RoleName, Mask)>,
    pub pos: Pos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Deny {
    SelectStar,
    Unfiltered,
}

impl Deny {
    pub fn as_str(self) -> &'static str {
        match self {
            Deny::SelectStar => "select_star",
            Deny::Unfiltered => "unfiltered",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectRule {
    pub name: String,
    /// `None`: every non-exempt session.
    pub roles: Option<Vec<RoleName>>,
    pub tables: Vec<TableName>,
    pub deny: Vec<Deny>,
    pub max_rows: Option<u64>,
    pub mode: Mode,
    pub pos: Pos,
}

/// A session's identity: its login role and every role it is a member of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    roles: BTreeSet<RoleName>,
}

impl Identity {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(roles: I) -> Self {
        Identity { roles: roles.into_iter().map(|r| RoleName::new(r.as_ref())).collect() }
    }

    pub fn contains(&self, role: &RoleName) -> bool {
        self.roles.contains(role)
    }

    pub fn roles(&self) -> impl Iterator<Item = &RoleName> {
        self.roles.iter()
    }
}

/// What one column means for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnView {
    pub mask: Mask,
    pub predicates: Predicates,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) exempt: Vec<RoleName>,
    pub(crate) columns: BTreeMap<ColumnName, ColumnRule>,
    pub(crate) selects: Vec<SelectRule>,
    pub(crate) mode: Mode,
    pub(crate) hash_key: Option<HashKey>,
    /// `functions.allow`: user-defined functions masked sessions may call (schema, name).
    pub(crate) functions: Vec<TableName>,
}

impl Policy {
    pub fn exempt(&self) -> &[RoleName] {
        &self.exempt
    }

    pub fn columns(&self) -> &BTreeMap<ColumnName, ColumnRule> {
        &self.columns
    }

    pub fn selects(&self) -> &[SelectRule] {
        &self.selects
    }

    /// The global mode (`mode:` at the top of the file).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        self.hash_key.as_ref()
    }

    /// Whether any rule uses the `hash` mask (then `pgveil init` must have installed its
    /// function and key).
    pub fn uses_hash(&self) -> bool {
        self.columns.values().any(|c| {
            matches!(c.mask, Mask::Hash { .. }) || c.by_role.iter().any(|(_, m)| matches!(m, Mask::Hash { .. }))
        })
    }

    /// `functions.allow`, as (schema, name) pairs.
    pub fn functions(&self) -> &[TableName] {
        &self.functions
    }

    pub fn is_exempt(&self, id: &Identity) -> bool {
        self.exempt.iter().any(|r| id.contains(r))
    }

    /// The mask a session gets for a column (rules.md "Which mask a session gets"); `None`
    /// when it sees the raw value.
    pub fn column_mask(&self, column: &ColumnName, id: &Identity) -> Option<&Mask> {
        if self.is_exempt(id) {
            return None;
        }
        let rule = self.columns.get(column)?;
        if let Some((_, mask)) = rule.by_role.iter().find(|(role, _)| id.contains(role)) {
            return Some(mask);
        }
        if rule.unmasked_for.iter().any(|r| id.contains(r)) {
            return None;
        }
        Some(&rule.mask)
    }

    /// Every table some rule names (columns or selects).
    pub fn tables(&self) -> BTreeSet<&TableName> {
        self.columns.keys().map(|c| &c.table).chain(self.selects.iter().flat_map(|s| &s.tables)).collect()
    }

    /// The rules as a session no grant applies to sees them: every ruled column masked with
    /// its default mask. Column usage for the audit log is computed against it, so a column
    /// is "protected" whoever reads it.
    pub fn universal(self: &Arc<Self>) -> SessionPolicy {
        self.for_identity(&Identity::default())
    }

    /// Everything that applies to one identity, computed once per session (and per reload).
    pub fn for_identity(self: &Arc<Self>, id: &Identity) -> SessionPolicy {
        let exempt = self.is_exempt(id);
        let masked: HashMap<ColumnName, ColumnView> = if exempt {
            HashMap::new()
        } else {
            self.columns
                .iter()
                .filter_map(|(name, rule)| {
                    self.column_mask(name, id)
                        .map(|m| (name.clone(), ColumnView { mask: m.clone(), predicates: rule.predicates }))
                })
                .collect()
        };
        let selects: Vec<SelectRule> = if exempt {
            Vec::new()
        } else {
            self.selects
                .iter()
                .filter(|s| s.roles.as_ref().is_none_or(|roles| roles.iter().any(|r| id.contains(r))))
                .map(|s| SelectRule {
                    mode: if self.mode == Mode::Monitor { Mode::Monitor } else { s.mode },
                    ..s.clone()
                })
                .collect()
        };
        let masked_tables: HashSet<TableName> = masked.keys().map(|c| c.table.clone()).collect();
        SessionPolicy { policy: Arc::clone(self), exempt, masked, masked_tables, selects }
    }
}

/// The policy as one session sees it.
#[derive(Debug, Clone)]
pub struct SessionPolicy {
    pub policy: Arc<Policy>,
    pub exempt: bool,
    pub masked: HashMap<ColumnName, ColumnView>,
    pub masked_tables: HashSet<TableName>,
    pub selects: Vec<SelectRule>,
}

impl SessionPolicy {
    /// Whether nothing applies: the session can be a plain byte pump.
    pub fn is_pass_through(&self) -> bool {
        self.exempt || (self.masked.is_empty() && self.selects.is_empty())
    }

    pub fn mask(&self, column: &ColumnName) -> Option<&ColumnView> {
        self.masked.get(column)
    }
}
