//! One pass over a statement's parse tree (pg_query's protobuf as JSON, so that no node type
//! can be skipped by a walker that forgot it): every relation named, with the place it is
//! named in; every column reference, with its scope and clause; every function call; every
//! CTE; the WHERE conjuncts a raw-predicate grant may move. Pure bookkeeping: what is allowed
//! is decided in `checks`.

use serde_json::{Map, Value};

use pg_query::protobuf as pb;

/// Where a relation is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Site {
    /// Read: FROM / JOIN, UPDATE … FROM, DELETE … USING, MERGE … USING.
    Read,
    /// `FROM t TABLESAMPLE …`.
    Tablesample,
    /// `COPY t [(cols)] TO …`.
    CopyTo,
    /// The target of INSERT / UPDATE / DELETE / MERGE / COPY FROM.
    Target,
    /// Anything else (DDL, LOCK, GRANT, …): the containing node type and its field.
    Other(&'static str, String),
}

#[derive(Debug, Clone)]
pub(crate) struct RelSite<'v> {
    pub rv: &'v Map<String, Value>,
    pub site: Site,
    pub scope: usize,
    /// On the nullable side of an outer join (a filter cannot move into it).
    pub nullable: bool,
    /// `COPY t (a, b)`: the column list.
    pub copy_columns: Vec<String>,
    /// An unqualified name that a WITH of this query level or an enclosing one defines (and
    /// that is visible here: a non-recursive CTE is not visible inside itself or earlier
    /// CTEs of its WITH), so it names that CTE, not a relation.
    pub cte: bool,
}

impl RelSite<'_> {
    pub fn location(&self) -> i32 {
        int(self.rv.get("location")).unwrap_or(-1)
    }

    pub fn schema(&self) -> Option<&str> {
        str_field(self.rv, "schemaname").filter(|s| !s.is_empty())
    }

    pub fn relname(&self) -> &str {
        str_field(self.rv, "relname").unwrap_or("")
    }

    pub fn inh(&self) -> bool {
        self.rv.get("inh").and_then(Value::as_bool).unwrap_or(true)
    }

    pub fn alias(&self) -> Option<&str> {
        self.rv.get("alias").and_then(Value::as_object).and_then(|a| str_field(a, "aliasname"))
    }

    /// The alias's column list (`AS k(a, b)` renames the first columns by position).
    pub fn alias_columns(&self) -> Vec<String> {
        strings(self.rv.get("alias").and_then(Value::as_object).and_then(|a| a.get("colnames")))
    }

    /// The name references use for it: the alias, else the relation's name.
    pub fn reference_name(&self) -> &str {
        self.alias().unwrap_or(self.relname())
    }
}

/// The clause a column reference is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// Output, expression, function argument: computed on masked values.
    Output,
    /// A comparison position (`predicates:` applies): the clause's name.
    Filter(&'static str),
    /// The value assigned by UPDATE SET / ON CONFLICT / MERGE.
    Assign,
    Returning,
    Other,
}

#[derive(Debug, Clone)]
pub(crate) struct ColSite {
    /// Field names; `*` for A_Star.
    pub fields: Vec<String>,
    pub location: i32,
    pub scope: usize,
    pub position: Position,
}

#[derive(Debug, Clone)]
pub(crate) struct FuncSite {
    pub name: Vec<String>,
    /// Constant text arguments (for `set_config`).
    pub text_args: Vec<Option<String>>,
    /// The name's location in the text.
    pub location: i32,
}

/// One FROM entry a column reference may resolve to.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The name references use: the alias, else the relation's name.
    pub alias: String,
    /// The relation site (`rels` index) for a named relation; `None` for subqueries,
    /// functions, joins with aliases and pseudo-relations, whose columns are not known.
    pub rel: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Scope {
    pub parent: Option<usize>,
    pub entries: Vec<Entry>,
    /// WHERE conjuncts of this SELECT (or DML) that compare one column with constants.
    pub conjuncts: Vec<Conjunct>,
    /// The DML target's entry, for a DML scope.
    pub dml_target: Option<usize>,
    /// CTE names visible from this query level (its WITH, as far as walked).
    pub ctes: Vec<String>,
}

/// `col <op> constant-or-parameter`, or `col IN (…)`: a top-level AND conjunct of a WHERE.
#[derive(Debug, Clone)]
pub(crate) struct Conjunct {
    /// The column reference's location (unique in the text).
    pub col_location: i32,
    pub op: String,
    /// The location of the first token of the conjunct and of the last token (inclusive).
    pub first: i32,
    /// Tokens of the right-hand side: from this location ...
    pub rhs_first: i32,
    /// ... to this one (inclusive); for IN, the closing parenthesis.
    pub rhs_last: i32,
    pub is_in: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StmtKind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Copy,
    Prepare(String),
    Deallocate(Option<String>),
    /// SQL `EXECUTE name`.
    Execute(String),
    /// `DECLARE name CURSOR`.
    Declare(String),
    /// `FETCH` / `MOVE` from a cursor.
    Fetch(String),
    /// `CLOSE name` (`None`: ALL).
    CloseCursor(Option<String>),
    /// `SET name = values` (lower-cased name, constant values); `None` values: RESET / DEFAULT.
    Set {
        name: String,
        values: Option<Vec<String>>,
        local: bool,
    },
    ResetAll,
    /// `DISCARD ALL` (`all`) or `DISCARD TEMP` / `PLANS` / `SEQUENCES`.
    Discard {
        all: bool,
        temp: bool,
    },
    /// A transaction statement: its change to the session's search_path state.
    Transaction(super::session::Change),
    Do,
    CreateFunction {
        language: String,
        string_body: Option<String>,
        has_sql_body: bool,
    },
    Call,
    /// CREATE AGGREGATE / OPERATOR / TYPE / COLLATION / TEXT SEARCH …: the object kind.
    Define(i64),
    Drop {
        remove_type: i64,
        objects: Vec<Vec<String>>,
    },
    Other(String),
}

/// What one statement holds.
#[derive(Debug)]
pub(crate) struct Found<'v> {
    pub kind: StmtKind,
    pub rels: Vec<RelSite<'v>>,
    pub cols: Vec<ColSite>,
    pub funcs: Vec<FuncSite>,
    pub ctes: Vec<String>,
    pub scopes: Vec<Scope>,
    /// Every SELECT: its scope, whether it has `*`/`t.*` (and which aliases), WHERE, LIMIT,
    /// only aggregates; for the `selects` rules.
    pub selects: Vec<SelectFacts>,
    /// Every name a column reference, USING list or assignment uses: a relation none of
    /// whose protected columns is named here (and with no `*`, whole-row reference or
    /// NATURAL join) cannot have them read.
    pub names: std::collections::HashSet<String>,
    pub natural_join: bool,
    /// Temporary relations this statement creates.
    pub temp_created: Vec<String>,
    /// SQL-prepared statements it runs (`EXECUTE p`, also inside CREATE TABLE AS / EXPLAIN).
    pub executes: Vec<String>,
    /// The tree nests deeper than the walker follows: nothing about it can be relied on.
    pub too_deep: bool,
}

/// How many nodes deep the walker follows a tree (each level is a few stack frames).
const MAX_DEPTH: usize = 400;

#[derive(Debug, Clone, Default)]
pub(crate) struct SelectFacts {
    pub scope: usize,
    /// `*` (None) or `alias.*` (Some).
    pub stars: Vec<Option<String>>,
    pub has_where: bool,
    pub limited: bool,
    pub aggregate_only: bool,
    /// `SELECT f(…)` and nothing else: one output that is a function call, no FROM, WHERE,
    /// GROUP BY, HAVING, ORDER BY, LIMIT, OFFSET, DISTINCT, WITH or window (so the call runs
    /// exactly once).
    pub lone_call: bool,
    /// Relation sites directly in its FROM (through joins), and subqueries' scopes.
    pub from_rels: Vec<usize>,
    pub from_subselects: Vec<usize>,
    /// Each output: its name (given or implied) and, for a plain column reference, the
    /// column's name (the checker of substitutions reads these).
    pub outputs: Vec<(String, Option<String>)>,
}

pub(crate) fn walk(stmt: &Value) -> Found<'_> {
    let mut w = Walker {
        found: Found {
            kind: StmtKind::Other(String::new()),
            rels: Vec::new(),
            cols: Vec::new(),
            funcs: Vec::new(),
            ctes: Vec::new(),
            scopes: vec![Scope::default()],
            selects: Vec::new(),
            names: std::collections::HashSet::new(),
            natural_join: false,
            temp_created: Vec::new(),
            executes: Vec::new(),
            too_deep: false,
        },
        scope: 0,
        position: Position::Other,
        nullable: false,
        select_index: None,
        depth: 0,
    };
    if let Some((t, body)) = variant(stmt) {
        w.found.kind = kind(t, body);
        w.typed(t, body, true);
    }
    w.found
}

struct Walker<'v> {
    found: Found<'v>,
    scope: usize,
    position: Position,
    nullable: bool,
    /// The SELECT whose FROM is being walked.
    select_index: Option<usize>,
    depth: usize,
}

/// `{"node": {"T": body}}` or `{"T": body}` → (T, body).
fn variant(v: &Value) -> Option<(&str, &Map<String, Value>)> {
    let o = v.as_object()?;
    if o.len() != 1 {
        return None;
    }
    let (k, inner) = o.iter().next()?;
    if k == "node" {
        return variant(inner);
    }
    if k.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
        return Some((k.as_str(), inner.as_object()?));
    }
    None
}

pub(crate) fn str_field<'v>(o: &'v Map<String, Value>, k: &str) -> Option<&'v str> {
    o.get(k).and_then(Value::as_str)
}

pub(crate) fn int(v: Option<&Value>) -> Option<i32> {
    v.and_then(Value::as_i64).and_then(|i| i32::try_from(i).ok())
}

fn is_rangevar(o: &Map<String, Value>) -> bool {
    o.contains_key("relname") && o.contains_key("inh") && o.contains_key("relpersistence")
}

/// The String values of a list of Nodes.
pub(crate) fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|n| match variant(n) {
                    Some(("String", s)) => str_field(s, "sval").map(str::to_owned),
                    Some(("AStar", _)) => Some("*".to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn const_text(v: &Value) -> Option<String> {
    let (t, body) = variant(v)?;
    if t != "AConst" {
        return None;
    }
    let (vt, val) = variant(body.get("val")?)?;
    match vt {
        "Sval" => str_field(val, "sval").map(str::to_owned),
        "Ival" => Some(val.get("ival").and_then(Value::as_i64).unwrap_or(0).to_string()),
        "Fval" => str_field(val, "fval").map(str::to_owned),
        "Boolval" => Some(val.get("boolval").and_then(Value::as_bool).unwrap_or(false).to_string()),
        _ => None,
    }
}

fn kind(t: &str, b: &Map<String, Value>) -> StmtKind {
    match t {
        "SelectStmt" => StmtKind::Select,
        "InsertStmt" => StmtKind::Insert,
        "UpdateStmt" => StmtKind::Update,
        "DeleteStmt" => StmtKind::Delete,
        "MergeStmt" => StmtKind::Merge,
        "CopyStmt" => StmtKind::Copy,
        "PrepareStmt" => StmtKind::Prepare(str_field(b, "name").unwrap_or("").to_owned()),
        "ExecuteStmt" => StmtKind::Execute(str_field(b, "name").unwrap_or("").to_owned()),
        "DeclareCursorStmt" => StmtKind::Declare(str_field(b, "portalname").unwrap_or("").to_owned()),
        "FetchStmt" => StmtKind::Fetch(str_field(b, "portalname").unwrap_or("").to_owned()),
        "ClosePortalStmt" => {
            StmtKind::CloseCursor(str_field(b, "portalname").filter(|n| !n.is_empty()).map(str::to_owned))
        }
        "DeallocateStmt" => {
            let all = b.get("isall").and_then(Value::as_bool).unwrap_or(false);
            StmtKind::Deallocate((!all).then(|| str_field(b, "name").unwrap_or("").to_owned()))
        }
        "VariableSetStmt" => {
            // kind: 1 VAR_SET_VALUE, 2 VAR_SET_DEFAULT, 3 VAR_SET_CURRENT, 4 VAR_SET_MULTI, 5 VAR_RESET, 6 VAR_RESET_ALL
            let k = b.get("kind").and_then(Value::as_i64).unwrap_or(0);
            let name = str_field(b, "name").unwrap_or("").to_lowercase();
            let local = b.get("is_local").and_then(Value::as_bool).unwrap_or(false);
            match k {
                6 => StmtKind::ResetAll,
                // SET … FROM CURRENT: the value in force, which only the server knows.
                3 if name == "search_path" => StmtKind::Other("SetSearchPathFromCurrent".to_owned()),
                1 | 4 => {
                    let values = b
                        .get("args")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().map(|v| const_text(v).unwrap_or_else(|| "?".to_owned())).collect())
                        .unwrap_or_default();
                    StmtKind::Set { name, values: Some(values), local }
                }
                _ => StmtKind::Set { name, values: None, local },
            }
        }
        "DiscardStmt" => {
            let target = b.get("target").and_then(Value::as_i64).unwrap_or(0);
            let all = target == pb::DiscardMode::DiscardAll as i64;
            StmtKind::Discard { all, temp: all || target == pb::DiscardMode::DiscardTemp as i64 }
        }
        "TransactionStmt" => {
            use super::session::Change;
            use pb::TransactionStmtKind as K;
            let k = b.get("kind").and_then(Value::as_i64).unwrap_or(0);
            let chain = b.get("chain").and_then(Value::as_bool).unwrap_or(false);
            let name = str_field(b, "savepoint_name").unwrap_or("").to_owned();
            let change = match k {
                x if x == K::TransStmtBegin as i64 || x == K::TransStmtStart as i64 => Some(Change::Begin),
                // PREPARE TRANSACTION ends the transaction with its settings kept.
                x if x == K::TransStmtCommit as i64 || x == K::TransStmtPrepare as i64 => {
                    Some(Change::Commit { chain })
                }
                x if x == K::TransStmtRollback as i64 => Some(Change::Rollback { chain }),
                x if x == K::TransStmtSavepoint as i64 => Some(Change::Savepoint(name)),
                x if x == K::TransStmtRelease as i64 => Some(Change::Release(name)),
                x if x == K::TransStmtRollbackTo as i64 => Some(Change::RollbackTo(name)),
                _ => None,
            };
            change.map_or_else(|| StmtKind::Other("TransactionStmt".to_owned()), StmtKind::Transaction)
        }
        "DoStmt" => StmtKind::Do,
        "CreateFunctionStmt" => {
            let mut language = String::new();
            let mut string_body = None;
            for o in b.get("options").and_then(Value::as_array).into_iter().flatten() {
                let Some(("DefElem", d)) = variant(o) else { continue };
                match str_field(d, "defname") {
                    Some("language") => {
                        language = d.get("arg").and_then(const_text_or_string).unwrap_or_default().to_lowercase();
                    }
                    Some("as") => {
                        string_body = d.get("arg").map(|a| {
                            let parts = strings_or_list(a);
                            parts.join("\n")
                        });
                    }
                    _ => {}
                }
            }
            let has_sql_body = b.get("sql_body").is_some_and(|v| !v.is_null());
            StmtKind::CreateFunction { language, string_body, has_sql_body }
        }
        "CallStmt" => StmtKind::Call,
        "DefineStmt" => StmtKind::Define(b.get("kind").and_then(Value::as_i64).unwrap_or(0)),
        "DropStmt" => {
            let remove_type = b.get("remove_type").and_then(Value::as_i64).unwrap_or(0);
            let objects = b
                .get("objects")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|o| match variant(o) {
                            Some(("List", l)) => strings(l.get("items")),
                            Some(("String", s)) => vec![str_field(s, "sval").unwrap_or("").to_owned()],
                            _ => Vec::new(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            StmtKind::Drop { remove_type, objects }
        }
        other => StmtKind::Other(other.to_owned()),
    }
}

fn const_text_or_string(v: &Value) -> Option<String> {
    match variant(v) {
        Some(("String", s)) => str_field(s, "sval").map(str::to_owned),
        _ => const_text(v),
    }
}

fn strings_or_list(v: &Value) -> Vec<String> {
    match variant(v) {
        Some(("List", l)) => strings(l.get("items")),
        Some(("String", s)) => str_field(s, "sval").map(str::to_owned).into_iter().collect(),
        _ => Vec::new(),
    }
}

const AEXPR_OP: i64 = pb::AExprKind::AexprOp as i64;
const AEXPR_IN: i64 = pb::AExprKind::AexprIn as i64;
const AEXPR_LIKE: i64 = pb::AExprKind::AexprLike as i64;
const AEXPR_ILIKE: i64 = pb::AExprKind::AexprIlike as i64;
const BOOL_AND: i64 = pb::BoolExprType::AndExpr as i64;
const JOIN_LEFT: i64 = pb::JoinType::JoinLeft as i64;
const JOIN_RIGHT: i64 = pb::JoinType::JoinRight as i64;
const JOIN_FULL: i64 = pb::JoinType::JoinFull as i64;

impl<'v> Walker<'v> {
    fn with<R>(&mut self, position: Position, f: impl FnOnce(&mut Self) -> R) -> R {
        let saved = std::mem::replace(&mut self.position, position);
        let r = f(self);
        self.position = saved;
        r
    }

    fn new_scope(&mut self) -> usize {
        self.found.scopes.push(Scope { parent: Some(self.scope), ..Scope::default() });
        self.found.scopes.len().saturating_sub(1)
    }

    fn in_scope<R>(&mut self, scope: usize, f: impl FnOnce(&mut Self) -> R) -> R {
        let saved = std::mem::replace(&mut self.scope, scope);
        let r = f(self);
        self.scope = saved;
        r
    }

    /// Any value: nodes by their type, other objects field by field.
    fn value(&mut self, v: &'v Value, parent: &str) {
        self.value_in(v, parent, "");
    }

    fn value_in(&mut self, v: &'v Value, parent: &str, key: &str) {
        match v {
            Value::Array(a) => {
                for x in a {
                    self.value_in(x, parent, key);
                }
            }
            Value::Object(o) => {
                if let Some((t, body)) = variant(v) {
                    if t == "RangeVar" {
                        self.rangevar(body, other_site(parent, key));
                    } else {
                        self.typed(t, body, false);
                    }
                } else if is_rangevar(o) {
                    self.rangevar(o, other_site(parent, key));
                } else {
                    for (k, x) in o {
                        self.value_in(x, parent, k);
                    }
                }
            }
            _ => {}
        }
    }

    fn field(&mut self, b: &'v Map<String, Value>, key: &str, parent: &str) {
        if let Some(v) = b.get(key) {
            self.value_in(v, parent, key);
        }
    }

    fn typed(&mut self, t: &str, b: &'v Map<String, Value>, _top: bool) {
        if self.depth >= MAX_DEPTH {
            // Not walked, so not decided: the statement is refused (fail closed).
            self.found.too_deep = true;
            return;
        }
        self.depth = self.depth.saturating_add(1);
        match t {
            "SelectStmt" => self.select(b),
            "ColumnRef" => {
                let fields = strings(b.get("fields"));
                for f in &fields {
                    self.found.names.insert(f.clone());
                }
                let location = int(b.get("location")).unwrap_or(-1);
                self.found.cols.push(ColSite { fields, location, scope: self.scope, position: self.position });
            }
            "FuncCall" => self.func_call(b),
            "ExecuteStmt" => {
                self.found.executes.push(str_field(b, "name").unwrap_or("").to_owned());
                for (k, x) in b {
                    self.value_in(x, t, k);
                }
            }
            "CommonTableExpr" => {
                if let Some(n) = str_field(b, "ctename") {
                    self.found.ctes.push(n.to_owned());
                }
                self.field(b, "ctequery", t);
                self.field(b, "search_clause", t);
                self.field(b, "cycle_clause", t);
            }
            "RangeSubselect" => {
                let alias = b.get("alias").and_then(Value::as_object).and_then(|a| str_field(a, "aliasname"));
                if let Some(a) = alias {
                    self.entry(Entry { alias: a.to_owned(), rel: None });
                }
                let before = self.found.selects.len();
                self.with(Position::Output, |w| w.field(b, "subquery", t));
                if let (Some(si), Some(sub)) = (self.select_index, self.found.selects.get(before).map(|s| s.scope))
                    && let Some(s) = self.found.selects.get_mut(si)
                {
                    s.from_subselects.push(sub);
                }
            }
            "RangeFunction" => {
                let alias = b.get("alias").and_then(Value::as_object).and_then(|a| str_field(a, "aliasname"));
                self.entry(Entry { alias: alias.unwrap_or("").to_owned(), rel: None });
                self.with(Position::Output, |w| w.field(b, "functions", t));
            }
            "RangeTableSample" => {
                if let Some(rv) = b.get("relation").and_then(variant).map(|(_, o)| o) {
                    self.rangevar(rv, Site::Tablesample);
                }
                self.with(Position::Output, |w| {
                    w.field(b, "args", t);
                    w.field(b, "repeatable", t);
                });
            }
            "JoinExpr" => self.join(b),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => self.dml(t, b),
            "CopyStmt" => self.copy(b),
            _ => {
                for (k, x) in b {
                    self.value_in(x, t, k);
                }
            }
        }
        self.depth = self.depth.saturating_sub(1);
    }

    fn entry(&mut self, e: Entry) {
        if let Some(s) = self.found.scopes.get_mut(self.scope) {
            s.entries.push(e);
        }
    }

    fn rangevar(&mut self, rv: &'v Map<String, Value>, site: Site) {
        if matches!(site, Site::Other(..)) && str_field(rv, "relpersistence") == Some("t") {
            self.found.temp_created.push(str_field(rv, "relname").unwrap_or("").to_owned());
        }
        if matches!(site, Site::Other(..)) && str_field(rv, "schemaname").is_some_and(|s| s.starts_with("pg_temp")) {
            self.found.temp_created.push(str_field(rv, "relname").unwrap_or("").to_owned());
        }
        let read = matches!(site, Site::Read | Site::Tablesample | Site::CopyTo);
        let idx = self.found.rels.len();
        let unqualified = str_field(rv, "schemaname").is_none_or(str::is_empty);
        // A DML target is always a relation, whatever the WITH defines.
        let cte = unqualified && site != Site::Target && self.names_cte(str_field(rv, "relname").unwrap_or(""));
        self.found.rels.push(RelSite {
            rv,
            site: site.clone(),
            scope: self.scope,
            nullable: self.nullable,
            copy_columns: Vec::new(),
            cte,
        });
        if read || site == Site::Target {
            let alias = RelSite { rv, ..self.found.rels[idx].clone() };
            let name = alias.alias().unwrap_or(alias.relname()).to_owned();
            self.entry(Entry { alias: name, rel: Some(idx) });
            if let Some(si) = self.select_index
                && read
                && let Some(s) = self.found.selects.get_mut(si)
            {
                s.from_rels.push(idx);
            }
        }
    }

    /// A FROM item.
    fn walk_from_item(&mut self, v: &'v Value) {
        match variant(v) {
            Some(("RangeVar", rv)) => self.rangevar(rv, Site::Read),
            Some((t, b)) => self.typed(t, b, false),
            None => self.value(v, "from"),
        }
    }

    fn join(&mut self, b: &'v Map<String, Value>) {
        let jt = b.get("jointype").and_then(Value::as_i64).unwrap_or(0);
        if b.get("is_natural").and_then(Value::as_bool).unwrap_or(false) {
            self.found.natural_join = true;
        }
        let outer = self.nullable;
        self.nullable = outer || jt == JOIN_RIGHT || jt == JOIN_FULL;
        if let Some(l) = b.get("larg") {
            self.walk_from_item(l);
        }
        self.nullable = outer || jt == JOIN_LEFT || jt == JOIN_FULL;
        if let Some(r) = b.get("rarg") {
            self.walk_from_item(r);
        }
        self.nullable = outer;
        for name in strings(b.get("using_clause")) {
            self.found.names.insert(name.clone());
            self.found.cols.push(ColSite {
                fields: vec![name],
                location: -1,
                scope: self.scope,
                position: Position::Filter("a JOIN condition"),
            });
        }
        if let Some(q) = b.get("quals") {
            self.with(Position::Filter("a JOIN condition"), |w| w.value(q, "JoinExpr"));
        }
        if let Some(a) = b.get("alias").and_then(Value::as_object).and_then(|a| str_field(a, "aliasname")) {
            self.entry(Entry { alias: a.to_owned(), rel: None });
        }
        if let Some(a) = b.get("join_using_alias").and_then(Value::as_object).and_then(|a| str_field(a, "aliasname")) {
            self.entry(Entry { alias: a.to_owned(), rel: None });
        }
    }

    fn func_call(&mut self, b: &'v Map<String, Value>) {
        let name = strings(b.get("funcname"));
        let text_args =
            b.get("args").and_then(Value::as_array).map(|a| a.iter().map(const_text).collect()).unwrap_or_default();
        let location = int(b.get("location")).unwrap_or(-1);
        self.found.funcs.push(FuncSite { name, text_args, location });
        let distinct = b.get("agg_distinct").and_then(Value::as_bool).unwrap_or(false);
        let args_position = if distinct { Position::Filter("DISTINCT") } else { self.position };
        self.with(args_position, |w| w.field(b, "args", "FuncCall"));
        self.with(Position::Filter("ORDER BY"), |w| w.field(b, "agg_order", "FuncCall"));
        self.with(Position::Filter("FILTER"), |w| w.field(b, "agg_filter", "FuncCall"));
        self.with(Position::Filter("a window"), |w| w.field(b, "over", "FuncCall"));
    }

    /// A WITH clause, in the current scope: each CTE's name becomes visible to the CTEs after
    /// it and to the query (to every CTE of a WITH RECURSIVE, itself included), as the server
    /// scopes them.
    fn ctes(&mut self, b: &'v Map<String, Value>) {
        let Some(with) = b.get("with_clause").and_then(Value::as_object) else { return };
        let recursive = with.get("recursive").and_then(Value::as_bool).unwrap_or(false);
        let list: Vec<&'v Value> =
            with.get("ctes").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        let name_of = |v: &'v Value| match variant(v) {
            Some(("CommonTableExpr", c)) => str_field(c, "ctename").map(str::to_owned),
            _ => None,
        };
        if recursive {
            for n in list.iter().filter_map(|v| name_of(v)) {
                self.visible_cte(n);
            }
        }
        for v in list {
            self.with(Position::Output, |w| w.value(v, "WithClause"));
            if !recursive && let Some(n) = name_of(v) {
                self.visible_cte(n);
            }
        }
    }

    fn visible_cte(&mut self, name: String) {
        if let Some(s) = self.found.scopes.get_mut(self.scope) {
            s.ctes.push(name);
        }
    }

    /// Whether an unqualified relation name names a CTE visible from the current scope.
    fn names_cte(&self, name: &str) -> bool {
        let mut scope = Some(self.scope);
        while let Some(si) = scope {
            let Some(s) = self.found.scopes.get(si) else { break };
            if s.ctes.iter().any(|c| c == name) {
                return true;
            }
            scope = s.parent;
        }
        false
    }

    fn select(&mut self, b: &'v Map<String, Value>) {
        let scope = self.new_scope();
        self.in_scope(scope, |w| {
            w.ctes(b);
            let op = b.get("op").and_then(Value::as_i64).unwrap_or(1);
            if op != pb::SetOperation::SetopNone as i64 {
                for arm in ["larg", "rarg"] {
                    if let Some(a) = b.get(arm).and_then(Value::as_object) {
                        // Set-operation arms nest as deep as the chain is long: counted too.
                        w.typed("SelectStmt", a, false);
                    }
                }
                w.with(Position::Filter("ORDER BY"), |w| w.field(b, "sort_clause", "SelectStmt"));
                w.with(Position::Other, |w| {
                    w.field(b, "limit_count", "SelectStmt");
                    w.field(b, "limit_offset", "SelectStmt");
                });
                return;
            }
            let si = w.found.selects.len();
            let limited = b.get("limit_count").is_some_and(|l| {
                !l.is_null() && !matches!(variant(l), Some(("AConst", c)) if c.get("isnull").and_then(Value::as_bool) == Some(true))
            });
            let absent = |k: &str| b.get(k).is_none_or(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty));
            let lone_call = ["from_clause", "where_clause", "group_clause", "having_clause", "sort_clause", "limit_count",
                "limit_offset", "distinct_clause", "with_clause", "window_clause", "locking_clause", "into_clause"]
                .iter()
                .all(|k| absent(k))
                && matches!(
                    b.get("target_list").and_then(Value::as_array).map(Vec::as_slice),
                    Some([t]) if matches!(variant(t), Some(("ResTarget", rt)) if matches!(rt.get("val").and_then(variant), Some(("FuncCall", _))))
                );
            w.found.selects.push(SelectFacts {
                scope,
                has_where: b.get("where_clause").is_some_and(|v| !v.is_null()),
                limited,
                lone_call,
                ..SelectFacts::default()
            });
            let saved_select = w.select_index.replace(si);
            let saved_nullable = std::mem::replace(&mut w.nullable, false);
            for item in b.get("from_clause").and_then(Value::as_array).into_iter().flatten() {
                w.walk_from_item(item);
            }
            w.nullable = saved_nullable;
            w.select_index = saved_select;
            w.with(Position::Output, |w| w.field(b, "values_lists", "SelectStmt"));
            let no_distinct: &'v [Value] = &[];
            let distinct: &'v [Value] = b.get("distinct_clause").and_then(Value::as_array).map_or(no_distinct, Vec::as_slice);
            let plain_distinct = !distinct.is_empty() && distinct.iter().all(|d| variant(d).is_none());
            let targets = b.get("target_list").and_then(Value::as_array);
            let mut aggregate_only = targets.is_some_and(|t| !t.is_empty());
            for t in targets.into_iter().flatten() {
                let Some(("ResTarget", rt)) = variant(t) else { continue };
                let val = rt.get("val");
                if let Some(("ColumnRef", cr)) = val.and_then(variant) {
                    let f = strings(cr.get("fields"));
                    if f.last().is_some_and(|x| x == "*") {
                        let alias = (f.len() >= 2).then(|| f.get(f.len().saturating_sub(2)).cloned()).flatten();
                        if let Some(s) = w.found.selects.get_mut(si) {
                            s.stars.push(alias);
                        }
                    }
                }
                if !val.is_some_and(is_aggregate) {
                    aggregate_only = false;
                }
                let plain = match val.and_then(variant) {
                    Some(("ColumnRef", cr)) => strings(cr.get("fields")).last().cloned().filter(|f| f != "*"),
                    _ => None,
                };
                let name = str_field(rt, "name").filter(|n| !n.is_empty()).map(str::to_owned);
                if let Some(s) = w.found.selects.get_mut(si) {
                    s.outputs.push((name.or_else(|| plain.clone()).unwrap_or_default(), plain));
                }
                let pos = if plain_distinct { Position::Filter("DISTINCT") } else { Position::Output };
                w.with(pos, |w| {
                    if let Some(v) = val {
                        w.value(v, "ResTarget");
                    }
                    w.field(rt, "indirection", "ResTarget");
                });
            }
            let group = b.get("group_clause").and_then(Value::as_array);
            if group.is_some_and(|g| !g.is_empty()) {
                aggregate_only = false;
            }
            if let Some(s) = w.found.selects.get_mut(si) {
                s.aggregate_only = aggregate_only;
            }
            if let Some(wc) = b.get("where_clause") {
                w.conjuncts(wc, scope);
                w.with(Position::Filter("WHERE"), |w| w.value(wc, "SelectStmt"));
            }
            for g in group.into_iter().flatten() {
                w.positional(g, targets, Position::Filter("GROUP BY"));
            }
            w.with(Position::Filter("HAVING"), |w| w.field(b, "having_clause", "SelectStmt"));
            for s in b.get("sort_clause").and_then(Value::as_array).into_iter().flatten() {
                let inner = variant(s).filter(|(t, _)| *t == "SortBy").and_then(|(_, sb)| sb.get("node"));
                w.positional(inner.unwrap_or(s), targets, Position::Filter("ORDER BY"));
            }
            if !plain_distinct {
                for d in distinct {
                    w.positional(d, targets, Position::Filter("DISTINCT"));
                }
            }
            w.with(Position::Filter("a window"), |w| w.field(b, "window_clause", "SelectStmt"));
            w.with(Position::Other, |w| {
                w.field(b, "limit_count", "SelectStmt");
                w.field(b, "limit_offset", "SelectStmt");
                w.field(b, "locking_clause", "SelectStmt");
                w.field(b, "into_clause", "IntoClause");
            });
        });
    }

    /// A GROUP BY / ORDER BY / DISTINCT ON item: an output position (`1`) or output name
    /// stands for that output's expression.
    fn positional(&mut self, item: &'v Value, targets: Option<&'v Vec<Value>>, pos: Position) {
        let target_val = |i: usize| {
            targets
                .and_then(|t| t.get(i))
                .and_then(variant)
                .filter(|(t, _)| *t == "ResTarget")
                .and_then(|(_, rt)| rt.get("val"))
        };
        match variant(item) {
            Some(("AConst", c)) => {
                if let Some(("Ival", iv)) = c.get("val").and_then(variant)
                    && let Some(n) = iv.get("ival").and_then(Value::as_i64)
                    && let Some(v) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).and_then(target_val)
                {
                    self.with(pos, |w| w.value(v, "SortBy"));
                }
            }
            Some(("ColumnRef", cr)) => {
                let f = strings(cr.get("fields"));
                if let [name] = f.as_slice()
                    && let Some(ts) = targets
                {
                    for (i, t) in ts.iter().enumerate() {
                        if let Some(("ResTarget", rt)) = variant(t)
                            && str_field(rt, "name") == Some(name.as_str())
                            && let Some(v) = target_val(i)
                        {
                            self.with(pos, |w| w.value(v, "SortBy"));
                        }
                    }
                }
            }
            _ => {}
        }
        self.with(pos, |w| w.value(item, "SortBy"));
    }

    /// Records the top-level AND conjuncts of a WHERE that compare one column with constants
    /// or parameters (the ones a raw-predicate grant lets filter by the raw value).
    fn conjuncts(&mut self, wc: &'v Value, scope: usize) {
        let mut parts: Vec<&Value> = vec![wc];
        if let Some(("BoolExpr", be)) = variant(wc)
            && be.get("boolop").and_then(Value::as_i64) == Some(BOOL_AND)
        {
            parts = be.get("args").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        }
        for p in parts {
            let Some(("AExpr", e)) = variant(p) else { continue };
            let k = e.get("kind").and_then(Value::as_i64).unwrap_or(0);
            let op = strings(e.get("name")).join(".");
            let (Some(l), Some(r)) = (e.get("lexpr"), e.get("rexpr")) else { continue };
            let Some(("ColumnRef", cr)) = variant(l) else { continue };
            let first = int(cr.get("location")).unwrap_or(-1);
            let (rhs_first, rhs_last, is_in) = if k == AEXPR_IN {
                let (Some(s), Some(end)) = (int(e.get("rexpr_list_start")), int(e.get("rexpr_list_end"))) else {
                    continue;
                };
                let items = match variant(r) {
                    Some(("List", l)) => l.get("items").and_then(Value::as_array).cloned().unwrap_or_default(),
                    _ => continue,
                };
                if op != "=" || !items.iter().all(is_simple_value) {
                    continue;
                }
                (s, end, true)
            } else if k == AEXPR_OP || k == AEXPR_LIKE || k == AEXPR_ILIKE {
                if !is_simple_value(r) {
                    continue;
                }
                let loc = simple_value_location(r);
                (loc, loc, false)
            } else {
                continue;
            };
            let op = match k {
                AEXPR_LIKE => {
                    if op == "~~" {
                        "LIKE".to_owned()
                    } else {
                        "NOT LIKE".to_owned()
                    }
                }
                AEXPR_ILIKE => {
                    if op == "~~*" {
                        "ILIKE".to_owned()
                    } else {
                        "NOT ILIKE".to_owned()
                    }
                }
                _ => op,
            };
            if let Some(s) = self.found.scopes.get_mut(scope) {
                s.conjuncts.push(Conjunct { col_location: first, op, first, rhs_first, rhs_last, is_in });
            }
        }
    }

    fn dml(&mut self, t: &str, b: &'v Map<String, Value>) {
        let outer = self.scope;
        let scope = self.new_scope();
        self.in_scope(scope, |w| {
            w.ctes(b);
            if let Some(rv) = b.get("relation").and_then(Value::as_object) {
                let idx_entry = w.found.scopes.get(scope).map_or(0, |s| s.entries.len());
                w.rangevar(rv, Site::Target);
                if let Some(s) = w.found.scopes.get_mut(scope) {
                    s.dml_target = Some(idx_entry);
                }
            }
            let from_key = match t {
                "UpdateStmt" => Some("from_clause"),
                "DeleteStmt" => Some("using_clause"),
                "MergeStmt" => Some("source_relation"),
                _ => None,
            };
            if let Some(k) = from_key {
                match b.get(k) {
                    Some(Value::Array(items)) => {
                        for i in items {
                            w.walk_from_item(i);
                        }
                    }
                    Some(v) => w.walk_from_item(v),
                    None => {}
                }
            }
            if t == "InsertStmt" {
                // The source query does not see the target, but it sees the WITH.
                let sel = b.get("select_stmt");
                let ctes = w.found.scopes.get(scope).map(|s| s.ctes.clone()).unwrap_or_default();
                w.in_scope(outer, |w| {
                    let source = w.new_scope();
                    if let Some(s) = w.found.scopes.get_mut(source) {
                        s.ctes = ctes;
                    }
                    w.in_scope(source, |w| {
                        if let Some(s) = sel {
                            w.with(Position::Output, |w| w.value(s, "InsertStmt"));
                        }
                    });
                });
                for c in b.get("cols").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(("ResTarget", rt)) = variant(c)
                        && let Some(n) = str_field(rt, "name")
                    {
                        w.found.names.insert(n.to_owned());
                    }
                }
                if let Some(oc) = b.get("on_conflict_clause").and_then(Value::as_object) {
                    w.entry(Entry { alias: "excluded".to_owned(), rel: None });
                    w.assignments(oc.get("target_list"));
                    if let Some(wc) = oc.get("where_clause") {
                        w.conjuncts(wc, scope);
                        w.with(Position::Filter("WHERE"), |w| w.value(wc, "OnConflictClause"));
                    }
                    w.with(Position::Other, |w| w.field(oc, "infer", "OnConflictClause"));
                }
            }
            if t == "UpdateStmt" {
                w.assignments(b.get("target_list"));
            }
            if t == "MergeStmt" {
                w.with(Position::Filter("a JOIN condition"), |w| w.field(b, "join_condition", "MergeStmt"));
                for wc in b.get("merge_when_clauses").and_then(Value::as_array).into_iter().flatten() {
                    let Some(("MergeWhenClause", m)) = variant(wc) else { continue };
                    w.with(Position::Filter("a MERGE condition"), |w| w.field(m, "condition", "MergeWhenClause"));
                    w.assignments(m.get("target_list"));
                    w.with(Position::Assign, |w| w.field(m, "values", "MergeWhenClause"));
                }
            }
            if let Some(wc) = b.get("where_clause") {
                w.conjuncts(wc, scope);
                w.with(Position::Filter("WHERE"), |w| w.value(wc, t));
            }
            if let Some(rc) = b.get("returning_clause").and_then(Value::as_object) {
                w.with(Position::Returning, |w| w.field(rc, "exprs", "ReturningClause"));
            }
            w.with(Position::Returning, |w| w.field(b, "returning_list", t));
        });
    }

    fn assignments(&mut self, list: Option<&'v Value>) {
        for item in list.and_then(Value::as_array).into_iter().flatten() {
            let Some(("ResTarget", rt)) = variant(item) else { continue };
            if let Some(n) = str_field(rt, "name") {
                self.found.names.insert(n.to_owned());
            }
            self.with(Position::Assign, |w| {
                w.field(rt, "val", "ResTarget");
                w.field(rt, "indirection", "ResTarget");
            });
        }
    }

    fn copy(&mut self, b: &'v Map<String, Value>) {
        let is_from = b.get("is_from").and_then(Value::as_bool).unwrap_or(false);
        if let Some(rv) = b.get("relation").and_then(Value::as_object) {
            let site = if is_from { Site::Target } else { Site::CopyTo };
            let idx = self.found.rels.len();
            self.rangevar(rv, site);
            let cols = strings(b.get("attlist"));
            for c in &cols {
                self.found.names.insert(c.clone());
            }
            if let Some(r) = self.found.rels.get_mut(idx) {
                r.copy_columns = cols;
            }
        }
        if let Some(q) = b.get("query") {
            self.with(Position::Output, |w| w.value(q, "CopyStmt"));
        }
        self.with(Position::Filter("WHERE"), |w| w.field(b, "where_clause", "CopyStmt"));
        self.with(Position::Other, |w| w.field(b, "options", "CopyStmt"));
    }
}

/// The parent node types whose relation fields are known by name (the rest keep "Other").
fn other_site(parent: &str, key: &str) -> Site {
    const KNOWN: &[&str] = &[
        "LockStmt",
        "TruncateStmt",
        "GrantStmt",
        "VacuumRelation",
        "TableLikeClause",
        "ClusterStmt",
        "ReindexStmt",
        "RefreshMatViewStmt",
        "ViewStmt",
        "IntoClause",
        "CreateStmt",
        "AlterTableStmt",
        "AlterTableCmd",
        "PartitionCmd",
        "IndexStmt",
        "CreateTrigStmt",
        "RuleStmt",
        "CreatePolicyStmt",
        "AlterPolicyStmt",
        "RenameStmt",
        "Constraint",
        "CreateStatsStmt",
        "AlterObjectSchemaStmt",
        "CreateTableAsStmt",
        "CommentStmt",
        "SecLabelStmt",
        "CreateForeignTableStmt",
        "CopyStmt",
        "ExplainStmt",
        "AlterOwnerStmt",
        "LockingClause",
    ];
    let p = KNOWN.iter().find(|k| **k == parent).copied().unwrap_or("other");
    Site::Other(p, key.to_owned())
}

fn is_simple_value(v: &Value) -> bool {
    match variant(v) {
        Some(("AConst", c)) => c.get("isnull").and_then(Value::as_bool) != Some(true),
        Some(("ParamRef", _)) => true,
        _ => false,
    }
}

fn simple_value_location(v: &Value) -> i32 {
    variant(v).and_then(|(_, b)| int(b.get("location"))).unwrap_or(-1)
}

const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "every",
    "string_agg",
    "array_agg",
    "json_agg",
    "jsonb_agg",
    "stddev",
    "variance",
];

fn is_aggregate(v: &Value) -> bool {
    match variant(v) {
        Some(("FuncCall", f)) => strings(f.get("funcname"))
            .last()
            .is_some_and(|n| AGGREGATES.contains(&n.as_str()) && f.get("over").is_none_or(Value::is_null)),
        Some(("TypeCast", t)) => t.get("arg").is_some_and(is_aggregate),
        _ => false,
    }
}
