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
    /// The type as SQL writes it (`format_type`, with its modifier): masks cast to it.
    pub sql_type: String,
    /// The name this column (the same relation OID and attnum) had when an earlier snapshot
    /// saw it, if it was renamed since: rules naming the old name keep applying to it.
    pub bound_name: Option<String>,
}

impl Column {
    /// Whether a rule naming `name` applies to this column (its name, or the one it was
    /// renamed from).
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.bound_name.as_deref() == Some(name)
    }
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
    /// A view whose definition could not be read (locked by another session's DDL): it is
    /// treated as protected, every column redacted, until it can be read (fail closed).
    pub definition_unavailable: bool,
}

impl Relation {
    /// A table whose columns, in this order, are all `text` (offline decisions such as
    /// `pgveil explain` without a database, tests and benchmarks).
    pub fn text_table(oid: u32, name: TableName, columns: impl IntoIterator<Item = String>) -> Relation {
        Relation {
            oid,
            name,
            kind: RelKind::Table,
            columns: columns
                .into_iter()
                .zip(1i16..)
                .map(|(name, attnum)| Column {
                    name,
                    attnum,
                    type_oid: 25,
                    sql_type: "text".to_owned(),
                    bound_name: None,
                })
                .collect(),
            ancestors: Vec::new(),
            view_sql: None,
            definition_unavailable: false,
        }
    }

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
    /// What `pgveil init` installed in this database, if anything.
    pub pgveil: Option<Installed>,
}

/// The `pgveil` schema as installed: its version and the fingerprints of its hash keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Installed {
    pub version: i32,
    pub keys: Vec<String>,
}

impl Installed {
    /// Why `hash` masks cannot be computed with this installation and `key`, if they cannot.
    pub fn problem(installed: Option<&Installed>, key: Option<&crate::HashKey>) -> Option<String> {
        let want = crate::sql::mask_sql::SCHEMA_VERSION;
        match (installed, key) {
            (_, None) => Some("PGVEIL_HASH_KEY is not set".to_owned()),
            (None, _) => Some("the pgveil schema is not installed".to_owned()),
            (Some(i), _) if i.version != want => {
                Some(format!("the pgveil schema is version {}, this pgveil needs {want}", i.version))
            }
            (Some(i), Some(k)) if !i.keys.contains(&k.fingerprint()) => Some(format!(
                "the installed keys do not include this PGVEIL_HASH_KEY (fingerprint {})",
                k.fingerprint()
            )),
            _ => None,
        }
    }
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

fn rel(oid: u32, schema: &str, name: &str, kind: RelKind, cols: &[(&str, u32)], view: Option<&str>) -> Relation {
    Relation {
        oid,
        name: TableName::new(schema, name),
        kind,
        columns: cols
            .iter()
            .enumerate()
            .map(|(i, (n, t))| Column {
                name: (*n).to_owned(),
                attnum: i16::try_from(i.saturating_add(1)).unwrap_or(i16::MAX),
                type_oid: *t,
                sql_type: crate::types::PgType::from_oid(*t).name().to_owned(),
                bound_name: None,
            })
            .collect(),
        ancestors: Vec::new(),
        view_sql: view.map(str::to_owned),
        definition_unavailable: false,
    }
}

/// The relations the spec example's rules name (`rules/testdata/valid/spec-example.yaml`): a
/// catalog for tests, benches and fuzz targets, which have no server to read one from.
#[doc(hidden)]
pub fn example() -> Catalog {
    let customers = [
        ("id", 23),
        ("name", 25),
        ("email", 25),
        ("ssn", 25),
        ("card_number", 25),
        ("phone", 25),
        ("birth_date", 1082),
        ("balance", 1700),
        ("notes", 25),
        ("signup", 1184),
    ];
    let mut child = rel(16_390, "public", "customers_eu", RelKind::Table, &customers, None);
    child.ancestors = vec![TableName::new("public", "customers")];
    Catalog::new([
        rel(16_384, "public", "customers", RelKind::Table, &customers, None),
        rel(
            16_385,
            "public",
            "orders",
            RelKind::Table,
            &[("id", 23), ("customer_id", 23), ("amount", 1700), ("status", 25)],
            None,
        ),
        rel(
            16_386,
            "public",
            "customers_v",
            RelKind::View,
            &[("id", 23), ("ssn", 25), ("upper_email", 25)],
            Some("SELECT id, ssn, upper(email) AS upper_email FROM public.customers"),
        ),
        rel(
            16_387,
            "public",
            "names_v",
            RelKind::View,
            &[("id", 23), ("name", 25)],
            Some("SELECT id, name FROM public.customers"),
        ),
        child,
        rel(1259, "pg_catalog", "pg_class", RelKind::Table, &[("oid", 26), ("relname", 19)], None),
        rel(12_000, "pg_catalog", "pg_stats", RelKind::View, &[("attname", 19), ("most_common_vals", 2277)], None),
    ])
}
