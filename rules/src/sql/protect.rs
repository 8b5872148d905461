//! Which relations are protected for a session, and the masked subquery each becomes.
//!
//! A relation is protected when a rule masks one of its columns for the session, when it is
//! an inheritance child or partition of such a table (the parent's rules apply by column
//! name), or when it is a view or materialized view whose definition reads a protected
//! relation. A table becomes `(SELECT id, <mask of email> AS email, … FROM [ONLY] t)`; a view
//! becomes its own definition with the protected relations inside it substituted, so every
//! expression of the view is computed on masked values.

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::{Catalog, RelKind, Relation};
use crate::names::{ColumnName, TableName, quote_ident};
use crate::policy::{ColumnView, SessionPolicy};
use crate::types::PgType;

use super::mask_sql;
use super::tokens::Piece;
use super::{Block, Reason, block};

/// How deep views over views are followed.
const MAX_VIEW_DEPTH: usize = 8;

#[derive(Debug)]
pub(crate) enum Protected {
    /// A table (or child): one entry per catalog column, its view when masked.
    Table { rel: Arc<Relation>, cols: Vec<Option<ColumnView>>, whole: bool },
    /// A view over a protected relation: its definition with substitutions.
    View { sql: String },
}

impl Protected {
    /// Names of the masked columns (a table's; a view's definition decides its own).
    pub fn masked_names(&self) -> Vec<&str> {
        match self {
            Protected::Table { rel, cols, whole } => rel
                .columns
                .iter()
                .zip(cols)
                .filter(|(_, v)| *whole || v.is_some())
                .map(|(c, _)| c.name.as_str())
                .collect(),
            Protected::View { .. } => Vec::new(),
        }
    }

    pub fn column(&self, name: &str) -> Option<&ColumnView> {
        match self {
            Protected::Table { rel, cols, .. } => {
                rel.columns.iter().position(|c| c.name == name).and_then(|i| cols.get(i)).and_then(Option::as_ref)
            }
            Protected::View { .. } => None,
        }
    }

    /// The column is masked (whole-table masking counts).
    pub fn is_masked(&self, name: &str) -> bool {
        match self {
            Protected::Table { whole: true, rel, .. } => rel.column(name).is_some(),
            _ => self.column(name).is_some(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Protection<'a> {
    pub policy: &'a SessionPolicy,
    pub catalog: &'a Catalog,
    pub search_path: &'a [String],
    /// Temporary relations the session created.
    pub temp: &'a [String],
    memo: HashMap<u32, Option<Arc<Protected>>>,
    lineage: HashMap<u32, Arc<Vec<TableName>>>,
    depth: usize,
}

impl<'a> Protection<'a> {
    pub fn new(policy: &'a SessionPolicy, catalog: &'a Catalog, search_path: &'a [String]) -> Self {
        Protection { policy, catalog, search_path, temp: &[], memo: HashMap::new(), lineage: HashMap::new(), depth: 0 }
    }

    pub fn with_temp(mut self, temp: &'a [String]) -> Self {
        self.temp = temp;
        self
    }

    /// A relation by its name as written: qualified, or through the search_path.
    pub fn resolve(&self, schema: Option<&str>, name: &str) -> Option<Arc<Relation>> {
        self.catalog.resolve(schema, name, self.search_path).cloned()
    }

    /// A protected relation of this name in any schema.
    pub fn protected_named(&mut self, name: &str) -> Option<TableName> {
        let candidates: Vec<Arc<Relation>> =
            self.catalog.relations().filter(|r| r.name.table == name).cloned().collect();
        candidates.into_iter().find(|r| self.protected(r).is_some()).map(|r| r.name.clone())
    }

    /// How the session sees a relation: `None` when nothing of it is masked.
    pub fn protected(&mut self, rel: &Arc<Relation>) -> Option<Arc<Protected>> {
        if let Some(p) = self.memo.get(&rel.oid) {
            return p.clone();
        }
        let p = self.compute(rel).map(Arc::new);
        self.memo.insert(rel.oid, p.clone());
        p
    }

    fn compute(&mut self, rel: &Arc<Relation>) -> Option<Protected> {
        if self.policy.masked.is_empty() {
            return None;
        }
        match rel.kind {
            RelKind::View | RelKind::MaterializedView => {
                let Some(def) = rel.view_sql.as_deref() else {
                    return rel.definition_unavailable.then(|| self.whole_table(rel));
                };
                let def = def.trim().trim_end_matches(';').trim();
                if self.depth >= MAX_VIEW_DEPTH {
                    // Too deep to follow: every column redacted rather than a raw one.
                    return Some(self.whole_table(rel));
                }
                self.depth = self.depth.saturating_add(1);
                // Only a view that reads a protected relation is protected; one that does not
                // stays as it is whatever its definition holds.
                let substituted = match super::checks::definition_relations(def, self) {
                    // A definition pgveil cannot read whole: every column redacted.
                    None => Err(()),
                    Some(bases) if bases.iter().any(|b| b.oid != rel.oid && self.protected(b).is_some()) => {
                        super::checks::substitute_definition(def, self).map_err(|_| ())
                    }
                    Some(_) => Ok(None),
                };
                self.depth = self.depth.saturating_sub(1);
                match substituted {
                    Ok(Some(sql)) => Some(Protected::View { sql }),
                    Ok(None) => None,
                    Err(_) => Some(self.whole_table(rel)),
                }
            }
            _ => {
                let tables: Vec<&TableName> = std::iter::once(&rel.name).chain(rel.ancestors.iter()).collect();
                if !tables.iter().any(|t| self.policy.masked_tables.contains(*t)) {
                    return None;
                }
                // A rule naming a column this relation lacks (renamed, dropped, misspelt):
                // the whole table is masked until the rules are fixed.
                // A column renamed since an earlier snapshot still answers to its old name
                // (bound by attnum), so its rule keeps applying.
                let whole =
                    self.policy.masked.keys().any(|c| {
                        tables.contains(&&c.table) && !rel.columns.iter().any(|col| col.answers_to(&c.column))
                    });
                let cols = rel
                    .columns
                    .iter()
                    .map(|c| {
                        let names = std::iter::once(c.name.as_str()).chain(c.bound_name.as_deref());
                        names
                            .flat_map(|n| tables.iter().map(move |t| ColumnName::new(&t.schema, &t.table, n)))
                            .find_map(|cn| self.policy.mask(&cn))
                            .cloned()
                    })
                    .collect();
                Some(Protected::Table { rel: Arc::clone(rel), cols, whole })
            }
        }
    }

    fn whole_table(&self, rel: &Arc<Relation>) -> Protected {
        Protected::Table { rel: Arc::clone(rel), cols: vec![None; rel.columns.len()], whole: true }
    }

    /// Tables a relation derives from (itself, its ancestors, a view's bases), for the
    /// `selects` rules and the audit log.
    pub fn lineage(&mut self, rel: &Arc<Relation>) -> Arc<Vec<TableName>> {
        if let Some(l) = self.lineage.get(&rel.oid) {
            return Arc::clone(l);
        }
        let mut out = vec![rel.name.clone()];
        out.extend(rel.ancestors.iter().cloned());
        if let Some(def) = rel.view_sql.as_deref()
            && self.depth < MAX_VIEW_DEPTH
        {
            self.depth = self.depth.saturating_add(1);
            for base in super::checks::definition_relations(def, self).into_iter().flatten() {
                for t in self.lineage(&base).iter() {
                    if !out.contains(t) {
                        out.push(t.clone());
                    }
                }
            }
            self.depth = self.depth.saturating_sub(1);
        }
        let out = Arc::new(out);
        self.lineage.insert(rel.oid, Arc::clone(&out));
        out
    }

    /// The masked subquery of a protected relation, without its alias: `only` for
    /// `ONLY t` / `COPY t`; `columns` for `COPY t (a, b)`; `named`: list only these columns
    /// of a table (possibly none: `SELECT FROM t`), in table order; `filters` are
    /// raw-predicate conjuncts moved in (each a sequence of pieces, ANDed).
    pub fn subquery(
        &self,
        p: &Protected,
        only: bool,
        columns: &[String],
        named: Option<&std::collections::HashSet<String>>,
        filters: Vec<Vec<Piece>>,
    ) -> Result<Vec<Piece>, Block> {
        let mut pieces = Vec::new();
        match p {
            Protected::View { sql } => {
                if !filters.is_empty() {
                    return Err(block(
                        Reason::Unsupported,
                        "a raw predicate cannot be applied through a view",
                        "filter the table itself",
                    ));
                }
                if columns.is_empty() {
                    pieces.push(Piece::Text(format!("({sql})")));
                } else {
                    let list: Vec<String> = columns.iter().map(|c| format!("pgveil_view.{}", quote_ident(c))).collect();
                    pieces.push(Piece::Text(format!("(SELECT {} FROM ({sql}) AS pgveil_view)", list.join(", "))));
                }
            }
            Protected::Table { rel, cols, whole } => {
                let key = self.policy.policy.hash_key();
                let mut list = Vec::with_capacity(rel.columns.len());
                for (c, view) in rel.columns.iter().zip(cols) {
                    if !columns.is_empty() && !columns.contains(&c.name) {
                        continue;
                    }
                    if named.is_some_and(|n| !n.contains(&c.name)) {
                        continue;
                    }
                    let name = quote_ident(&c.name);
                    // Qualified (I12): a column the relation lost since the catalog was read
                    // (another session's DDL) fails here, never binds to an outer query's.
                    let q = format!("{}.{name}", quote_ident(&rel.name.table));
                    let ty = PgType::from_oid(c.type_oid);
                    let mask = match (view, whole) {
                        (Some(v), _) => Some(&v.mask),
                        (None, true) => Some(&crate::mask::Mask::Redact),
                        (None, false) => None,
                    };
                    match mask {
                        Some(m) => {
                            let m = if crate::mask::fits(m, ty).is_ok() { m } else { &crate::mask::Mask::Nullify };
                            list.push(format!("{} AS {name}", mask_sql::expr(m, &q, ty, &c.sql_type, key)));
                        }
                        None => list.push(q),
                    }
                }
                let only = if only { "ONLY " } else { "" };
                pieces.push(Piece::Text(format!(
                    "(SELECT {} FROM {only}{}.{} AS {}",
                    list.join(", "),
                    quote_ident(&rel.name.schema),
                    quote_ident(&rel.name.table),
                    quote_ident(&rel.name.table)
                )));
                for (i, f) in filters.into_iter().enumerate() {
                    pieces.push(Piece::Text(if i == 0 { " WHERE ".to_owned() } else { " AND ".to_owned() }));
                    pieces.extend(f);
                }
                pieces.push(Piece::Text(")".to_owned()));
            }
        }
        Ok(pieces)
    }

    /// The mask expression of one protected column of a DML target, over `qualified`.
    pub fn column_expr(&self, p: &Protected, name: &str, qualified: &str) -> Option<String> {
        let Protected::Table { rel, cols, whole } = p else { return None };
        let i = rel.columns.iter().position(|c| c.name == name)?;
        let c = rel.columns.get(i)?;
        let ty = PgType::from_oid(c.type_oid);
        let mask = match cols.get(i).and_then(Option::as_ref) {
            Some(v) => &v.mask,
            None if *whole => &crate::mask::Mask::Redact,
            None => return None,
        };
        let mask = if crate::mask::fits(mask, ty).is_ok() { mask } else { &crate::mask::Mask::Nullify };
        Some(mask_sql::expr(mask, qualified, ty, &c.sql_type, self.policy.policy.hash_key()))
    }
}
