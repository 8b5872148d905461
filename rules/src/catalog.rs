//! What the proxy knows about the database's relations: a snapshot the proxy loads from
//! pg_catalog (data only; loading is I/O and lives in the proxy). Relations are identified by
//! OID; names resolve through the session's search_path as the server resolves them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::names::TableName;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    Table,
    PartitionedTable,
    View,
    MaterializedView,
    Foreign,
    Other,
}

impl RelKind {
    pub fn from_relkind(c: char) -> RelKind {
        match c {
            'r' => RelKind::Table,
            'p' => RelKind::PartitionedTable,
            'v' => RelKind::View,
            'm' => RelKind::MaterializedView,
            'f' => RelKind::Foreign,
            _ => RelKind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub attnum: i16,
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub name: TableName,
    pub kind: RelKind,
    /// User columns in attnum order (dropped columns excluded).
    pub columns: Vec<Column>,
    /// Inheritance / partition parents, transitively, nearest first.
    pub ancestors: Vec<TableName>,
    /// The defining query of a view or materialized view.
    pub view_sql: Option<String>,
}

impl Relation {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn column_by_attnum(&self, attnum: i16) -> Option<&Column> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }
}

/// Relations of one database.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_name: HashMap<TableName, Arc<Relation>>,
    by_oid: HashMap<u32, Arc<Relation>>,
}

impl Catalog {
    pub fn new(relations: impl IntoIterator<Item = Relation>) -> Self {
        let mut c = Catalog::default();
        for r in relations {
            let r = Arc::new(r);
            c.by_oid.insert(r.oid, Arc::clone(&r));
            c.by_name.insert(r.name.clone(), r);
        }
        c
    }

    pub fn len(&self) -> usize {
        self.by_oid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_oid.is_empty()
    }

    pub fn by_oid(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.by_oid.get(&oid)
    }

    pub fn get(&self, name: &TableName) -> Option<&Arc<Relation>> {
        self.by_name.get(name)
    }

    /// Resolves a possibly unqualified name: `pg_catalog` first (as the server does when it is
    /// not in the path explicitly), then each schema of `search_path`.
    pub fn resolve(&self, schema: Option<&str>, name: &str, search_path: &[String]) -> Option<&Arc<Relation>> {
        if let Some(schema) = schema {
            return self.by_name.get(&TableName::new(schema, name));
        }
        let implicit = (!search_path.iter().any(|s| s == "pg_catalog")).then_some("pg_catalog");
        implicit
            .into_iter()
            .chain(search_path.iter().map(String::as_str))
            .find_map(|s| self.by_name.get(&TableName::new(s, name)))
    }

    pub fn relations(&self) -> impl Iterator<Item = &Arc<Relation>> {
        self.by_oid.values()
    }
}
