//! Statement analysis: the one place that imports the SQL parser (PostgreSQL's own, through
//! `pg_query`). For a session's policy it finds every use of a masked column and every read
//! of a table a `selects` rule names, and says whether the statement may run and which output
//! columns need a mask that RowDescription alone cannot reveal (expressions over masked
//! columns, whose origin the server reports as 0).
//!
//! Fail closed: a construct this walker does not understand blocks the statement, and a
//! safety net counts the column references in the whole tree: if the walk saw fewer than the
//! tree holds, something was skipped and the statement is blocked.

#![allow(clippy::result_large_err, reason = "a Block is the cold path; boxing it would not speed the hot one")]

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use pg_query::protobuf as pb;
use pg_query::protobuf::node::Node as N;

use crate::catalog::{Catalog, RelKind, Relation};
use crate::mask::Mask;
use crate::names::{ColumnName, TableName};
use crate::policy::{Deny, Mode, Predicates, SessionPolicy};

/// Why a statement may not run (or, in monitor mode, would not have run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The `selects` rule's name, or a built-in reason (`predicate`, `whole_row`, …).
    pub rule: String,
    pub reason: String,
    pub hint: String,
    pub tables: Vec<String>,
    pub columns: Vec<String>,
    /// For a `selects` rule, which check fired (`select_star`, `unfiltered`); `None` for the
    /// built-in reasons, where `rule` already says it.
    pub check: Option<&'static str>,
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.reason)
    }
}

fn block(rule: &str, reason: impl Into<String>, hint: impl Into<String>) -> Block {
    Block {
        rule: rule.to_owned(),
        reason: reason.into(),
        hint: hint.into(),
        tables: Vec::new(),
        columns: Vec::new(),
        check: None,
    }
}

fn col_block(rule: &str, col: &ColumnName, reason: impl Into<String>, hint: impl Into<String>) -> Block {
    Block { tables: vec![col.table.to_string()], columns: vec![col.to_string()], ..block(rule, reason, hint) }
}

/// A `max_rows` cut for one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLimit {
    pub rule: String,
    pub rows: u64,
    pub mode: Mode,
    pub tables: Vec<String>,
}

/// What the session must do for one statement of the text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatementPlan {
    /// Every output column with the mask the analysis gives it (for `pgveil explain`).
    pub columns: Vec<(String, Option<Mask>)>,
    /// Masks by output position for columns whose origin the server does not report;
    /// empty when RowDescription's origins suffice.
    pub outputs: Vec<Option<Mask>>,
    /// Whether some masked output has no origin in RowDescription (an expression or a view
    /// column), so masking needs `outputs` by position: results the proxy cannot tie to this
    /// plan (SQL-level cursors and EXECUTE) must not carry such columns.
    pub needs_positions: bool,
    pub max_rows: Option<RowLimit>,
    /// Protected tables this statement reads (for `raw_access` auditing).
    pub tables: Vec<String>,
}

/// Session-level effects a statement has that the proxy must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// SQL `PREPARE name`: the proxy learns the statement's plan under this name.
    Prepare(String, Box<StatementPlan>),
    /// SQL `EXECUTE name`: allowed only for names the proxy saw prepared.
    Execute(String),
    /// SQL `DEALLOCATE name` (`None`: ALL).
    Deallocate(Option<String>),
}

/// The result of analysing one Query or Parse text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Analysis {
    pub statements: Vec<StatementPlan>,
    /// The first enforced block, if any: nothing of the text may run.
    pub block: Option<Block>,
    /// Findings of `monitor`-mode rules: the text runs, these are recorded.
    pub flagged: Vec<Block>,
    pub effects: Vec<Effect>,
}

/// Normalizes a statement for the audit log: every literal becomes `$n`.
pub fn normalize(sql: &str) -> Option<String> {
    pg_query::normalize(sql).ok()
}

/// A stable hash of the statement's normalized shape, for grouping.
pub fn fingerprint(sql: &str) -> Option<String> {
    pg_query::fingerprint(sql, pg_query::ParserOptions::DEFAULT, pg_query::FingerprintOptions::DEFAULT)
        .ok()
        .map(|f| f.hex)
}

/// Keywords whose literal arguments change what analysis decides (positions in ORDER BY,
/// LIMIT NULL, setting values, …): statements with them get no shape key.
const SHAPE_SENSITIVE: &[&str] = &[
    "order",
    "group",
    "limit",
    "offset",
    "fetch",
    "set",
    "reset",
    "distinct",
    "copy",
    "explain",
    "do",
    "prepare",
    "execute",
    "declare",
    "call",
    "values",
    "into",
    "window",
    "over",
    "filter",
    "returning",
    "show",
    "set_config",
];

/// Of `SHAPE_SENSITIVE`, the keywords that are plain syntax in a statement starting with the
/// given word: `UPDATE … SET col = <value>` and `INSERT INTO … VALUES (<values>)` assign values,
/// which analysis never looks at (it looks at the columns and the sources they come from).
const SHAPE_SYNTAX: &[(&str, &[&str])] = &[("update", &["set"]), ("insert", &["into", "values"])];

/// A key equal for statements that differ only in literal values, where literals cannot
/// change the analysis: the server's own scanner splits the text, literals become `$`,
/// everything else is kept as written. `None` when the statement must be analysed as is.
pub fn shape_key(sql: &str) -> Option<String> {
    let scanned = pg_query::scan(sql).ok()?;
    let mut key = String::with_capacity(sql.len());
    // The first word of the statement being scanned (a text may hold several).
    let mut head: Option<&str> = None;
    for t in &scanned.tokens {
        let start = usize::try_from(t.start).ok()?;
        let end = usize::try_from(t.end).ok()?;
        let text = sql.get(start..end)?;
        if matches!(pb::Token::try_from(t.token), Ok(pb::Token::SqlComment | pb::Token::CComment)) {
            continue;
        }
        if text == ";" {
            head = None;
        } else if head.is_none() {
            head = Some(text);
        }
        let literal = matches!(
            pb::Token::try_from(t.token),
            Ok(pb::Token::Sconst
                | pb::Token::Usconst
                | pb::Token::Iconst
                | pb::Token::Fconst
                | pb::Token::Bconst
                | pb::Token::Xconst)
        );
        if literal {
            key.push('$');
        } else {
            let syntax = SHAPE_SYNTAX.iter().any(|(first, words)| {
                head.is_some_and(|h| h.eq_ignore_ascii_case(first))
                    && words.iter().any(|w| text.eq_ignore_ascii_case(w))
            });
            if !syntax && SHAPE_SENSITIVE.iter().any(|k| text.eq_ignore_ascii_case(k)) {
                return None;
            }
            key.push_str(text);
        }
        key.push('\u{1f}');
    }
    Some(key)
}

/// The relations a statement names (`schema.table` or `table`), for tools.
pub fn tables(sql: &str) -> Option<Vec<String>> {
    pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok().map(|p| p.tables())
}

/// Relations masked sessions may never read: statistics hold sample values of every column.
const DENIED_RELATIONS: &[&str] =
    &["pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data", "pg_stat_statements"];

/// Functions masked sessions may call: built-ins that neither run SQL text, touch files,
/// change settings nor send notifications (threat model I5).
const ALLOWED_FUNCTIONS: &[&str] = &[
    // aggregates and windows
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
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "bit_and",
    "bit_or",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    "grouping",
    // strings
    "lower",
    "upper",
    "initcap",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "substring",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "replace",
    "concat",
    "concat_ws",
    "left",
    "right",
    "lpad",
    "rpad",
    "position",
    "strpos",
    "split_part",
    "format",
    "repeat",
    "reverse",
    "translate",
    "starts_with",
    "ascii",
    "chr",
    "md5",
    "encode",
    "decode",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_like",
    "to_hex",
    "string_to_array",
    "array_to_string",
    "overlay",
    "normalize",
    "unistr",
    // numbers
    "abs",
    "round",
    "ceil",
    "ceiling",
    "floor",
    "trunc",
    "mod",
    "power",
    "pow",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log10",
    "sign",
    "div",
    "greatest",
    "least",
    "random",
    "width_bucket",
    "scale",
    "gcd",
    "lcm",
    "pi",
    "numeric",
    "int4",
    "int8",
    "int2",
    "float8",
    "float4",
    "text",
    "date",
    "timestamp",
    "timestamptz",
    "bool",
    "varchar",
    // dates
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "date_trunc",
    "date_part",
    "extract",
    "age",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "isfinite",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "date_bin",
    "timezone",
    // sets, arrays, json
    "generate_series",
    "generate_subscripts",
    "unnest",
    "array_length",
    "array_lower",
    "array_upper",
    "array_ndims",
    "array_dims",
    "cardinality",
    "array_position",
    "array_positions",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_remove",
    "array_replace",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "to_json",
    "to_jsonb",
    "json_extract_path",
    "jsonb_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path_text",
    "jsonb_array_elements",
    "json_array_elements",
    "jsonb_array_elements_text",
    "json_array_elements_text",
    "jsonb_each",
    "json_each",
    "jsonb_each_text",
    "json_each_text",
    "jsonb_object_keys",
    "json_object_keys",
    "jsonb_typeof",
    "json_typeof",
    "jsonb_set",
    "jsonb_insert",
    "jsonb_strip_nulls",
    "jsonb_pretty",
    "jsonb_array_length",
    "json_array_length",
    "jsonb_path_query",
    "jsonb_path_exists",
    "jsonb_path_match",
    "coalesce",
    "nullif",
    // misc and driver introspection
    "gen_random_uuid",
    "uuid_generate_v4",
    "version",
    "current_database",
    "current_schema",
    "current_schemas",
    "pg_backend_pid",
    "pg_sleep",
    "txid_current",
    "pg_current_xact_id",
    "nextval",
    "currval",
    "lastval",
    "pg_typeof",
    "format_type",
    "pg_table_is_visible",
    "pg_type_is_visible",
    "pg_function_is_visible",
    "pg_get_userbyid",
    "obj_description",
    "col_description",
    "shobj_description",
    "has_table_privilege",
    "has_schema_privilege",
    "has_column_privilege",
    "has_database_privilege",
    "pg_encoding_to_char",
    "pg_get_expr",
    "pg_get_constraintdef",
    "pg_get_indexdef",
    "pg_get_function_result",
    "pg_get_function_arguments",
    "pg_get_function_identity_arguments",
    "pg_postmaster_start_time",
    "pg_is_in_recovery",
    "inet_server_addr",
    "inet_server_port",
    "array_in",
    "row_number",
    "pg_char_to_encoding",
    "pg_get_serial_sequence",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_size_pretty",
    "exists",
    "to_regtype",
    "to_regclass",
    "to_regnamespace",
    "to_regproc",
    "to_regprocedure",
    "to_regrole",
    "to_regoper",
    "current_setting",
    "has_function_privilege",
    "has_sequence_privilege",
    "pg_get_keywords",
    "pg_get_viewdef",
    "pg_get_triggerdef",
    "pg_get_ruledef",
    "pg_get_partkeydef",
    "pg_get_statisticsobjdef",
    "pg_index_column_has_property",
    "pg_opclass_is_visible",
    "pg_client_encoding",
    "row_security_active",
];

#[derive(Debug, Clone, PartialEq)]
struct MaskedCol {
    col: ColumnName,
    mask: Mask,
    predicates: Predicates,
    /// A bare reference or a cast of one: the column's mask applies to the value as is.
    transparent: bool,
    /// A plain column of a table reached directly or through subqueries and CTEs: the
    /// server reports its origin in RowDescription, so masking does not depend on positions.
    origin: bool,
}

/// Lineage of a value: clean, or derived from a masked column.
#[derive(Debug, Clone, PartialEq, Default)]
struct Lin(Option<MaskedCol>);

impl Lin {
    fn clean() -> Lin {
        Lin(None)
    }

    fn taint(self) -> Lin {
        Lin(self.0.map(|m| MaskedCol { transparent: false, origin: false, ..m }))
    }

    /// A cast or collation of the value: still the column's value, no longer its origin.
    fn cast(self) -> Lin {
        Lin(self.0.map(|m| MaskedCol { origin: false, ..m }))
    }

    fn or(self, other: Lin) -> Lin {
        match (self.0, other.0) {
            (Some(a), _) => Lin(Some(MaskedCol { transparent: false, origin: false, ..a })),
            (None, Some(b)) => Lin(Some(MaskedCol { transparent: false, origin: false, ..b })),
            (None, None) => Lin(None),
        }
    }
}

#[derive(Debug, Clone)]
struct ScopeCol {
    name: String,
    lin: Lin,
}

#[derive(Debug, Clone, Default)]
struct Rel {
    alias: String,
    cols: Vec<ScopeCol>,
    /// Base tables this relation reads (through views and subqueries).
    reads: BTreeSet<TableName>,
    /// Whether a WHERE or LIMIT already restricts it (subqueries).
    filtered: bool,
    /// Columns not known (set-returning functions): references resolve as `lin_unknown`.
    unknown_cols: bool,
    lin_unknown: Lin,
}

impl Rel {
    fn any_masked(&self) -> Option<&MaskedCol> {
        self.cols.iter().find_map(|c| c.lin.0.as_ref()).or(self.lin_unknown.0.as_ref())
    }
}

#[derive(Debug, Default)]
struct Scope<'p> {
    rels: Vec<Rel>,
    ctes: Vec<Rel>,
    parent: Option<&'p Scope<'p>>,
}

impl Scope<'_> {
    fn cte(&self, name: &str) -> Option<&Rel> {
        self.ctes.iter().rev().find(|r| r.alias == name).or_else(|| self.parent.and_then(|p| p.cte(name)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clause {
    Output,
    Value,
    Where,
    Join,
    Having,
    Group,
    Order,
    Other,
}

impl Clause {
    fn name(self) -> &'static str {
        match self {
            Clause::Output | Clause::Value => "an expression",
            Clause::Where => "WHERE",
            Clause::Join => "a JOIN condition",
            Clause::Having => "HAVING",
            Clause::Group => "GROUP BY",
            Clause::Order => "ORDER BY",
            Clause::Other => "this clause",
        }
    }

    /// Where `predicates: any` relaxes the rule.
    fn allows_any(self) -> bool {
        matches!(self, Clause::Where | Clause::Join | Clause::Having | Clause::Group | Clause::Order)
    }
}

type R<T> = Result<T, Block>;

/// Analyses statement text for one session.
#[derive(Debug)]
pub struct Analyzer<'a> {
    policy: &'a SessionPolicy,
    catalog: &'a Catalog,
    search_path: Vec<String>,
    /// Whether the session has masked columns (the strict rules apply).
    strict: bool,
    column_refs_seen: usize,
    star_tables: BTreeSet<TableName>,
    unfiltered_tables: BTreeSet<TableName>,
    read_tables: BTreeSet<TableName>,
    protected_read: BTreeSet<TableName>,
    views: HashMap<u32, Rel>,
    depth: usize,
    /// A `*` expanded over a JOIN … USING / NATURAL JOIN: the server merges columns, so
    /// output positions are not known exactly; RowDescription origins must do.
    positions_uncertain: bool,
}

impl<'a> Analyzer<'a> {
    pub fn new(policy: &'a SessionPolicy, catalog: &'a Catalog, user: &str) -> Self {
        Analyzer {
            policy,
            catalog,
            search_path: vec![user.to_owned(), "public".to_owned()],
            strict: !policy.masked.is_empty(),
            column_refs_seen: 0,
            star_tables: BTreeSet::new(),
            unfiltered_tables: BTreeSet::new(),
            read_tables: BTreeSet::new(),
            protected_read: BTreeSet::new(),
            views: HashMap::new(),
            depth: 0,
            positions_uncertain: false,
        }
    }

    /// Analyses a Query or Parse text (one or more statements).
    pub fn analyze(&mut self, sql: &str) -> Analysis {
        let mut out = Analysis::default();
        let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
            Ok(p) => p,
            Err(e) => {
                out.block = Some(block(
                    "unanalysable",
                    format!("pgveil cannot parse this statement ({})", first_words(&e.to_string())),
                    "check the statement's syntax",
                ));
                return out;
            }
        };
        for raw in &parsed.protobuf.stmts {
            let Some(stmt) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else { continue };
            self.column_refs_seen = 0;
            self.star_tables.clear();
            self.unfiltered_tables.clear();
            self.read_tables.clear();
            self.protected_read.clear();
            self.positions_uncertain = false;
            match self.statement(stmt, &mut out) {
                Ok(mut plan) => {
                    let total = count_column_refs(raw);
                    if self.column_refs_seen < total {
                        out.block = Some(block(
                            "unanalysable",
                            "pgveil cannot analyse every part of this statement",
                            "simplify the statement, or ask the DBA to exempt this role",
                        ));
                        return out;
                    }
                    if let Err(b) = self.apply_selects(&mut plan, &mut out.flagged) {
                        out.block = Some(b);
                        return out;
                    }
                    plan.tables = self.protected_read.iter().map(ToString::to_string).collect();
                    out.statements.push(plan);
                }
                Err(b) => {
                    out.block = Some(b);
                    return out;
                }
            }
        }
        out
    }

    fn apply_selects(&self, plan: &mut StatementPlan, flagged: &mut Vec<Block>) -> R<()> {
        for rule in &self.policy.selects {
            let hit = |set: &BTreeSet<TableName>| rule.tables.iter().find(|t| set.contains(t)).cloned();
            let mut findings = Vec::new();
            if rule.deny.contains(&Deny::SelectStar)
                && let Some(t) = hit(&self.star_tables)
            {
                findings.push(Block {
                    tables: vec![t.to_string()],
                    check: Some(Deny::SelectStar.as_str()),
                    ..block(&rule.name, format!("SELECT * over {t} is not allowed"), "list the columns you need")
                });
            }
            if rule.deny.contains(&Deny::Unfiltered)
                && let Some(t) = hit(&self.unfiltered_tables)
            {
                findings.push(Block {
                    tables: vec![t.to_string()],
                    check: Some(Deny::Unfiltered.as_str()),
                    ..block(
                        &rule.name,
                        format!("reading {t} without a WHERE clause or a LIMIT is not allowed"),
                        "add a WHERE clause that restricts the rows, or a LIMIT",
                    )
                });
            }
            for f in findings {
                match rule.mode {
                    Mode::Enforce => return Err(f),
                    Mode::Monitor => flagged.push(f),
                }
            }
            if let (Some(rows), Some(t)) = (rule.max_rows, hit(&self.read_tables))
                && plan.max_rows.as_ref().is_none_or(|l| rows < l.rows)
            {
                plan.max_rows =
                    Some(RowLimit { rule: rule.name.clone(), rows, mode: rule.mode, tables: vec![t.to_string()] });
            }
        }
        Ok(())
    }

    fn strict_block(&self, b: Block) -> R<()> {
        if self.strict { Err(b) } else { Ok(()) }
    }

    fn statement(&mut self, stmt: &N, out: &mut Analysis) -> R<StatementPlan> {
        let mut plan = StatementPlan::default();
        match stmt {
            N::SelectStmt(s) => {
                if s.into_clause.is_some() {
                    self.strict_block(block(
                        "ddl_copy",
                        "SELECT INTO creates a table from the result and is not allowed for masked sessions",
                        "select the rows instead",
                    ))?;
                }
                let outputs = self.select(s, None, true)?;
                plan.outputs = self.output_masks(&outputs)?;
                plan.needs_positions = needs_positions(&outputs);
                plan.columns = describe(&outputs);
            }
            N::InsertStmt(s) => plan.outputs = self.insert(s)?,
            N::UpdateStmt(s) => plan.outputs = self.update(s)?,
            N::DeleteStmt(s) => plan.outputs = self.delete(s)?,
            N::CopyStmt(s) => self.copy(s)?,
            N::ExplainStmt(s) => self.explain(s)?,
            N::DeclareCursorStmt(s) => {
                if let Some(N::SelectStmt(q)) = s.query.as_ref().and_then(|q| q.node.as_ref()) {
                    let outputs = self.select(q, None, true)?;
                    self.output_masks(&outputs)?;
                    if needs_positions(&outputs) {
                        self.strict_block(block(
                            "cursor",
                            "this cursor would return computed values of masked columns",
                            "select the masked columns themselves, or compute on unmasked columns",
                        ))?;
                    }
                } else {
                    self.strict_block(block("unanalysable", "pgveil cannot analyse this cursor's query", ""))?;
                }
            }
            N::PrepareStmt(s) => {
                let inner = s.query.as_ref().and_then(|q| q.node.as_ref());
                match inner {
                    Some(q) => {
                        let inner_plan = self.statement(q, out)?;
                        out.effects.push(Effect::Prepare(s.name.clone(), Box::new(inner_plan)));
                    }
                    None => self.strict_block(block("unanalysable", "empty PREPARE", ""))?,
                }
            }
            N::ExecuteStmt(s) => {
                for p in &s.params {
                    let sc = Scope::default();
                    let lin = self.expr(p, &sc, Clause::Value)?;
                    self.check_clean(&lin, Clause::Value)?;
                }
                out.effects.push(Effect::Execute(s.name.clone()));
            }
            N::DeallocateStmt(s) => {
                out.effects.push(Effect::Deallocate((!s.isall).then(|| s.name.clone())));
            }
            N::VariableSetStmt(s) => self.variable_set(s)?,
            N::TransactionStmt(_)
            | N::VariableShowStmt(_)
            | N::DiscardStmt(_)
            | N::ListenStmt(_)
            | N::UnlistenStmt(_)
            | N::NotifyStmt(_)
            | N::LockStmt(_)
            | N::ClosePortalStmt(_)
            | N::FetchStmt(_)
            | N::ConstraintsSetStmt(_) => {}
            N::CreateTableAsStmt(_) | N::ViewStmt(_) | N::RefreshMatViewStmt(_) => self.strict_block(block(
                "ddl_copy",
                "creating tables or views from queries is not allowed for masked sessions",
                "ask a DBA (exempt role) to create the object",
            ))?,
            N::DoStmt(_) | N::CallStmt(_) | N::CreateFunctionStmt(_) => self.strict_block(block(
                "procedural",
                "procedural code (DO, CALL, CREATE FUNCTION) is not allowed for masked sessions",
                "run the statements directly",
            ))?,
            other => {
                let kind = statement_kind(other);
                self.strict_block(block(
                    "statement_type",
                    format!("{kind} is not allowed for masked sessions"),
                    "run it as a role the rules exempt",
                ))?;
                // Sessions without masked columns: the statement runs, but its tree is not
                // walked, so the safety net must not count it.
                self.column_refs_seen = usize::MAX / 2;
            }
        }
        if !self.strict {
            // Only `selects` rules apply; the completeness net matters for masking only.
            self.column_refs_seen = usize::MAX / 2;
        }
        Ok(plan)
    }

    /// `set_config('name', value, local)` with a constant name and value is `SET`: allowed
    /// under the same rules (drivers such as asyncpg use it to turn JIT off).
    fn set_config_allowed(&self, f: &pb::FuncCall) -> bool {
        let text = |n: Option<&pb::Node>| match n.and_then(|n| n.node.as_ref()) {
            Some(N::AConst(c)) => match &c.val {
                Some(pb::a_const::Val::Sval(v)) => Some(v.sval.to_lowercase()),
                _ => None,
            },
            _ => None,
        };
        // A value that is not a constant (a parameter) is allowed only for settings that any
        // value is fine for.
        let Some(name) = text(f.args.first()) else { return false };
        let value = text(f.args.get(1)).unwrap_or_else(|| "(parameter)".to_owned());
        setting_allowed(&name, &value) == Some(true)
    }

    fn check_clean(&self, lin: &Lin, clause: Clause) -> R<()> {
        match &lin.0 {
            None => Ok(()),
            Some(m) => Err(col_block(
                "predicate",
                &m.col,
                format!("column {} is masked for this session and cannot be used in {}", m.col, clause.name()),
                if matches!(clause, Clause::Where) {
                    "filter on an unmasked column, or ask the DBA to allow `predicates: equality` for it"
                } else {
                    "use only unmasked columns here"
                },
            )),
        }
    }

    /// Layer-2 masks for a result's output columns.
    fn output_masks(&self, outputs: &[ScopeCol]) -> R<Vec<Option<Mask>>> {
        let mut masks = Vec::with_capacity(outputs.len());
        for (i, c) in outputs.iter().enumerate() {
            match &c.lin.0 {
                None => masks.push(None),
                Some(m) if m.transparent => masks.push(Some(m.mask.clone())),
                Some(m) => {
                    return Err(col_block(
                        "derived_column",
                        &m.col,
                        format!("output column {} (\"{}\") is computed from masked column {}", i + 1, c.name, m.col),
                        "select the masked column itself (it will be masked), or compute on unmasked columns",
                    ));
                }
            }
        }
        if masks.iter().all(Option::is_none) || self.positions_uncertain {
            // Every masked output is a bare column here: its origin in RowDescription says
            // which mask applies, whatever its position.
            masks.clear();
        }
        Ok(masks)
    }

    fn variable_set(&mut self, s: &pb::VariableSetStmt) -> R<()> {
        let name = s.name.to_lowercase();
        let value = s
            .args
            .iter()
            .filter_map(|a| match a.node.as_ref() {
                Some(N::AConst(c)) => match &c.val {
                    Some(pb::a_const::Val::Sval(v)) => Some(v.sval.to_lowercase()),
                    Some(pb::a_const::Val::Ival(v)) => Some(v.ival.to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(",");
        // RESET / SET … TO DEFAULT go back to the session's startup value, which pgveil pins.
        let reset = value.is_empty();
        let Some(allowed) = setting_allowed(&name, &value).map(|a| a || reset) else {
            return self.strict_block(block(
                "identity_change",
                "changing the session's role is not allowed for masked sessions",
                "connect as the role you need",
            ));
        };
        if allowed {
            Ok(())
        } else {
            self.strict_block(block(
                "setting",
                format!("changing {name} is not allowed for masked sessions"),
                "pgveil pins settings that change how statements are read or values are printed",
            ))
        }
    }

    /// A SELECT at any depth; returns its output columns with their lineage.
    fn select(&mut self, s: &pb::SelectStmt, parent: Option<&Scope<'_>>, top: bool) -> R<Vec<ScopeCol>> {
        self.depth += 1;
        if self.depth > 200 {
            return Err(block("unanalysable", "the statement nests too deeply for analysis", "simplify the statement"));
        }
        let r = self.select_inner(s, parent, top);
        self.depth -= 1;
        r
    }

    fn select_inner(&mut self, s: &pb::SelectStmt, parent: Option<&Scope<'_>>, top: bool) -> R<Vec<ScopeCol>> {
        let mut sc = Scope { parent, ..Scope::default() };
        if let Some(with) = &s.with_clause {
            for cte in &with.ctes {
                let Some(N::CommonTableExpr(c)) = cte.node.as_ref() else { return Err(unknown("WITH item")) };
                let rel = self.cte(c, &sc, with.recursive)?;
                sc.ctes.push(rel);
            }
        }
        // Set operations: UNION / INTERSECT / EXCEPT.
        if s.op() != pb::SetOperation::SetopNone && s.op() != pb::SetOperation::Undefined {
            let (Some(l), Some(r)) = (&s.larg, &s.rarg) else { return Err(unknown("set operation")) };
            let left = self.select(l, Some(&sc), false)?;
            let right = self.select(r, Some(&sc), false)?;
            let mut outs = Vec::with_capacity(left.len());
            for (i, lc) in left.iter().enumerate() {
                let rl = right.get(i).map(|c| c.lin.clone()).unwrap_or_default();
                let masked = lc.lin.0.clone().or(rl.0.clone());
                let lin = match (&lc.lin.0, &rl.0) {
                    (None, None) => Lin::clean(),
                    _ if s.op() != pb::SetOperation::SetopUnion || !s.all => {
                        let m = masked.expect("one side is masked");
                        if !m.predicates.eq(&Predicates::Any) {
                            return Err(col_block(
                                "predicate",
                                &m.col,
                                format!("{} compares values of masked column {}", set_op_name(s), m.col),
                                "use UNION ALL, or compare unmasked columns",
                            ));
                        }
                        Lin::clean()
                    }
                    (Some(a), Some(b)) if a.transparent && b.transparent && a.mask == b.mask => {
                        Lin(Some(a.clone())).cast()
                    }
                    (Some(a), None) if a.transparent => Lin(Some(a.clone())).cast(),
                    (None, Some(b)) if b.transparent => Lin(Some(b.clone())).cast(),
                    _ => Lin(masked).taint(),
                };
                outs.push(ScopeCol { name: lc.name.clone(), lin });
            }
            for item in &s.sort_clause {
                self.sort_item(item, &sc, &outs)?;
            }
            self.limit(s, &sc)?;
            return Ok(outs);
        }
        // VALUES lists.
        if !s.values_lists.is_empty() {
            let mut outs: Vec<ScopeCol> = Vec::new();
            for row in &s.values_lists {
                let Some(N::List(items)) = row.node.as_ref() else { return Err(unknown("VALUES row")) };
                for (i, item) in items.items.iter().enumerate() {
                    let lin = self.expr(item, &sc, Clause::Output)?;
                    match outs.get_mut(i) {
                        Some(c) => c.lin = c.lin.clone().or(lin),
                        None => outs.push(ScopeCol { name: format!("column{}", i + 1), lin }),
                    }
                }
            }
            return Ok(outs);
        }
        for item in &s.from_clause {
            let rels = self.from_item(item, &sc)?;
            sc.rels.extend(rels);
        }
        let has_where = s.where_clause.is_some();
        if let Some(w) = &s.where_clause {
            let lin = self.predicate(w, &sc, Clause::Where)?;
            self.check_clean(&lin, Clause::Where)?;
        }
        // Target list.
        let mut outs = Vec::new();
        let mut only_aggregates = true;
        for t in &s.target_list {
            let Some(N::ResTarget(rt)) = t.node.as_ref() else { return Err(unknown("target")) };
            let Some(val) = rt.val.as_deref() else { return Err(unknown("target")) };
            if let Some(N::ColumnRef(cr)) = val.node.as_ref()
                && cr.fields.last().is_some_and(|f| matches!(f.node, Some(N::AStar(_))))
            {
                self.column_refs_seen += 1;
                only_aggregates = false;
                let rels = self.star_rels(cr, &sc)?;
                for rel in rels {
                    self.star_tables.extend(rel.reads.iter().cloned());
                    if rel.unknown_cols {
                        if let Some(m) = rel.lin_unknown.0.as_ref() {
                            return Err(col_block(
                                "derived_column",
                                &m.col,
                                format!("* over a function of masked column {}", m.col),
                                "list the columns you need",
                            ));
                        }
                        continue;
                    }
                    outs.extend(rel.cols.iter().cloned());
                }
                continue;
            }
            if !is_aggregate_call(val) {
                only_aggregates = false;
            }
            let lin = self.expr(val, &sc, Clause::Output)?;
            let name = if rt.name.is_empty() { default_name(val) } else { rt.name.clone() };
            outs.push(ScopeCol { name, lin });
        }
        // GROUP BY, HAVING, DISTINCT, ORDER BY, WINDOW, LIMIT.
        for g in &s.group_clause {
            let lin = self.positional_or_expr(g, &sc, &outs, Clause::Group)?;
            self.check_clean(&lin, Clause::Group)?;
        }
        if let Some(h) = &s.having_clause {
            let lin = self.predicate(h, &sc, Clause::Having)?;
            self.check_clean(&lin, Clause::Having)?;
        }
        if !s.distinct_clause.is_empty() {
            if s.distinct_clause.iter().all(|d| d.node.is_none()) {
                if let Some(m) = outs.iter().find_map(|c| c.lin.0.as_ref())
                    && m.predicates != Predicates::Any
                {
                    return Err(col_block(
                        "predicate",
                        &m.col,
                        format!("DISTINCT compares values of masked column {}", m.col),
                        "remove DISTINCT or the masked column",
                    ));
                }
            } else {
                for d in &s.distinct_clause {
                    let lin = self.positional_or_expr(d, &sc, &outs, Clause::Order)?;
                    self.check_clean(&lin, Clause::Order)?;
                }
            }
        }
        for w in &s.window_clause {
            self.window_def(w, &sc)?;
        }
        for item in &s.sort_clause {
            self.sort_item(item, &sc, &outs)?;
        }
        let limited = self.limit(s, &sc)?;
        // Minimization facts.
        let reads: BTreeSet<TableName> = sc.rels.iter().flat_map(|r| r.reads.iter().cloned()).collect();
        self.read_tables.extend(reads.iter().cloned());
        if top {
            let aggregate_only = only_aggregates && s.group_clause.is_empty() && !s.target_list.is_empty();
            if !has_where && !limited && !aggregate_only {
                for rel in &sc.rels {
                    if !rel.filtered {
                        self.unfiltered_tables.extend(rel.reads.iter().cloned());
                    }
                }
            }
        }
        Ok(outs)
    }

    fn limit(&mut self, s: &pb::SelectStmt, sc: &Scope<'_>) -> R<bool> {
        let mut limited = false;
        for n in [&s.limit_count, &s.limit_offset].into_iter().flatten() {
            let lin = self.expr(n, sc, Clause::Other)?;
            self.check_clean(&lin, Clause::Other)?;
        }
        if let Some(n) = &s.limit_count {
            // LIMIT ALL / LIMIT NULL do not limit.
            limited = !matches!(n.node.as_ref(), Some(N::AConst(c)) if c.isnull);
        }
        Ok(limited)
    }

    fn cte(&mut self, c: &pb::CommonTableExpr, sc: &Scope<'_>, recursive: bool) -> R<Rel> {
        let Some(q) = c.ctequery.as_ref().and_then(|q| q.node.as_ref()) else { return Err(unknown("CTE")) };
        let outs = match q {
            N::SelectStmt(s)
                if recursive
                    && s.op() != pb::SetOperation::SetopNone
                    && s.op() != pb::SetOperation::Undefined
                    && s.larg.is_some()
                    && s.rarg.is_some() =>
            {
                // WITH RECURSIVE: the anchor's columns stand in for the CTE while the recursive
                // term is analysed; anything masked that flows through the recursion is tainted.
                let (Some(l), Some(r)) = (&s.larg, &s.rarg) else { return Err(unknown("recursive CTE")) };
                let before = self.unfiltered_tables.clone();
                let left = self.select(l, Some(sc), false)?;
                let mut provisional = Rel { alias: c.ctename.clone(), cols: left.clone(), ..Rel::default() };
                rename(&mut provisional, &c.aliascolnames);
                let inner = Scope { rels: Vec::new(), ctes: vec![provisional], parent: Some(sc) };
                let right = self.select(r, Some(&inner), false)?;
                self.unfiltered_tables = before;
                left.into_iter()
                    .enumerate()
                    .map(|(i, lc)| {
                        let rl = right.get(i).map(|c| c.lin.clone()).unwrap_or_default();
                        let lin =
                            if lc.lin.0.is_some() || rl.0.is_some() { lc.lin.or(rl).taint() } else { Lin::clean() };
                        ScopeCol { name: lc.name, lin }
                    })
                    .collect()
            }
            N::SelectStmt(s) => {
                let before = self.unfiltered_tables.clone();
                let outs = self.select(s, Some(sc), false)?;
                self.unfiltered_tables = before;
                outs
            }
            N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) => {
                let mut dummy = Analysis::default();
                let plan = self.statement(q, &mut dummy)?;
                if !plan.outputs.is_empty() {
                    return Err(block(
                        "derived_column",
                        "a data-modifying CTE returns masked values",
                        "use RETURNING on unmasked columns",
                    ));
                }
                Vec::new()
            }
            _ => return Err(unknown("CTE")),
        };
        let mut rel = Rel { alias: c.ctename.clone(), cols: outs, ..Rel::default() };
        rename(&mut rel, &c.aliascolnames);
        Ok(rel)
    }

    #[allow(clippy::wrong_self_convention, reason = "a FROM item, not a conversion")]
    fn from_item(&mut self, item: &pb::Node, sc: &Scope<'_>) -> R<Vec<Rel>> {
        match item.node.as_ref() {
            Some(N::RangeVar(rv)) => Ok(vec![self.range_var(rv, sc)?]),
            Some(N::RangeSubselect(rs)) => {
                let Some(N::SelectStmt(q)) = rs.subquery.as_ref().and_then(|q| q.node.as_ref()) else {
                    return Err(unknown("subquery"));
                };
                let reads_before = self.read_tables.clone();
                let outs = self.select(q, Some(sc), false)?;
                let reads: BTreeSet<TableName> = self.read_tables.difference(&reads_before).cloned().collect();
                let mut rel = Rel {
                    alias: rs.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_default(),
                    cols: outs,
                    reads,
                    filtered: q.where_clause.is_some() || q.limit_count.is_some(),
                    ..Rel::default()
                };
                if let Some(a) = &rs.alias {
                    rename(&mut rel, &a.colnames);
                }
                Ok(vec![rel])
            }
            Some(N::JoinExpr(j)) => {
                let mut rels = Vec::new();
                for side in [&j.larg, &j.rarg].into_iter().flatten() {
                    rels.extend(self.from_item(side, sc)?);
                }
                let joined = Scope { rels: rels.clone(), ctes: Vec::new(), parent: Some(sc) };
                if let Some(q) = &j.quals {
                    let lin = self.predicate(q, &joined, Clause::Join)?;
                    self.check_clean(&lin, Clause::Join)?;
                }
                let mut using: Vec<String> = j
                    .using_clause
                    .iter()
                    .filter_map(|u| match u.node.as_ref() {
                        Some(N::String(s)) => Some(s.sval.clone()),
                        _ => None,
                    })
                    .collect();
                if j.is_natural || !j.using_clause.is_empty() {
                    self.positions_uncertain = true;
                }
                if j.is_natural {
                    let names: Vec<Vec<String>> =
                        rels.iter().map(|r| r.cols.iter().map(|c| c.name.clone()).collect()).collect();
                    if let [l, r] = names.as_slice() {
                        using.extend(l.iter().filter(|n| r.contains(n)).cloned());
                    }
                }
                for name in &using {
                    for rel in &rels {
                        if let Some(c) = rel.cols.iter().find(|c| &c.name == name)
                            && let Some(m) = &c.lin.0
                            && m.predicates != Predicates::Any
                        {
                            return Err(col_block(
                                "predicate",
                                &m.col,
                                format!("joining on masked column {} compares its values", m.col),
                                "join on an unmasked key",
                            ));
                        }
                    }
                }
                if let Some(alias) = &j.alias {
                    // `(a JOIN b) AS j`: one relation with every column.
                    let cols = rels.iter().flat_map(|r| r.cols.clone()).collect();
                    let reads = rels.iter().flat_map(|r| r.reads.clone()).collect();
                    return Ok(vec![Rel { alias: alias.aliasname.clone(), cols, reads, ..Rel::default() }]);
                }
                Ok(rels)
            }
            Some(N::RangeFunction(rf)) => {
                let mut lin = Lin::clean();
                for f in &rf.functions {
                    let Some(N::List(parts)) = f.node.as_ref() else { return Err(unknown("FROM function")) };
                    if let Some(call) = parts.items.first() {
                        lin = lin.or(self.expr(call, sc, Clause::Value)?);
                    }
                }
                let mut rel = Rel {
                    alias: rf.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_default(),
                    unknown_cols: true,
                    lin_unknown: lin.taint(),
                    ..Rel::default()
                };
                if let Some(a) = &rf.alias
                    && !a.colnames.is_empty()
                {
                    rel.unknown_cols = false;
                    rel.cols = a
                        .colnames
                        .iter()
                        .filter_map(|c| match c.node.as_ref() {
                            Some(N::String(s)) => Some(ScopeCol { name: s.sval.clone(), lin: rel.lin_unknown.clone() }),
                            _ => None,
                        })
                        .collect();
                }
                Ok(vec![rel])
            }
            _ => Err(unknown("FROM item")),
        }
    }

    fn range_var(&mut self, rv: &pb::RangeVar, sc: &Scope<'_>) -> R<Rel> {
        let alias = rv.alias.as_ref().map_or_else(|| rv.relname.clone(), |a| a.aliasname.clone());
        if rv.schemaname.is_empty()
            && let Some(cte) = sc.cte(&rv.relname)
        {
            let mut rel = cte.clone();
            rel.alias = alias;
            if let Some(a) = &rv.alias {
                rename(&mut rel, &a.colnames);
            }
            return Ok(rel);
        }
        let schema = (!rv.schemaname.is_empty()).then_some(rv.schemaname.as_str());
        let Some(primary) = self.catalog.resolve(schema, &rv.relname, &self.search_path).cloned() else {
            let name = if let Some(s) = schema { format!("{s}.{}", rv.relname) } else { rv.relname.clone() };
            if self.strict {
                return Err(block(
                    "unknown_relation",
                    format!("relation {name} is not known to pgveil, so it cannot be classified"),
                    "check the name; if the relation is new, retry in a moment",
                ));
            }
            return Ok(Rel { alias, unknown_cols: true, ..Rel::default() });
        };
        if self.strict && primary.name.schema == "pg_catalog" && DENIED_RELATIONS.contains(&primary.name.table.as_str())
        {
            return Err(Block {
                tables: vec![primary.name.to_string()],
                ..block(
                    "catalog",
                    format!("{} holds sample values of columns and is not readable by masked sessions", primary.name),
                    "",
                )
            });
        }
        // An unqualified name could mean a same-named relation in another schema of the
        // session's search_path: mask a column if it is masked in any of them.
        let mut candidates = vec![primary.clone()];
        if schema.is_none() {
            candidates.extend(
                self.catalog
                    .relations()
                    .filter(|r| r.name.table == rv.relname && r.oid != primary.oid && r.name.schema != "pg_catalog")
                    .cloned(),
            );
        }
        let mut rel = self.relation_rel(&primary)?;
        for other in candidates.iter().skip(1) {
            let extra = self.relation_rel(other)?;
            for c in &mut rel.cols {
                if c.lin.0.is_none()
                    && let Some(oc) = extra.cols.iter().find(|e| e.name == c.name)
                {
                    c.lin = oc.lin.clone();
                }
            }
            rel.reads.extend(extra.reads);
        }
        rel.alias = alias;
        if let Some(a) = &rv.alias {
            rename(&mut rel, &a.colnames);
        }
        Ok(rel)
    }

    /// A catalog relation as a scope relation: columns with their masks (through views,
    /// partitions and inheritance parents).
    fn relation_rel(&mut self, r: &std::sync::Arc<Relation>) -> R<Rel> {
        if let Some(v) = self.views.get(&r.oid) {
            return Ok(v.clone());
        }
        let rel = match (&r.kind, &r.view_sql) {
            (RelKind::View | RelKind::MaterializedView, Some(sql)) => {
                let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).map_err(|_| {
                    block("unanalysable", format!("pgveil cannot analyse the definition of view {}", r.name), "")
                })?;
                let Some(N::SelectStmt(q)) =
                    parsed.protobuf.stmts.first().and_then(|s| s.stmt.as_ref()).and_then(|s| s.node.as_ref())
                else {
                    return Err(block(
                        "unanalysable",
                        format!("pgveil cannot analyse the definition of view {}", r.name),
                        "",
                    ));
                };
                // The view's own filters are the view owner's; its columns carry lineage.
                let saved =
                    (self.strict, self.column_refs_seen, self.unfiltered_tables.clone(), self.star_tables.clone());
                let reads_before = self.read_tables.clone();
                self.strict = true;
                let outs = self.select(q, None, false);
                let reads: BTreeSet<TableName> = self.read_tables.difference(&reads_before).cloned().collect();
                (self.strict, self.column_refs_seen, self.unfiltered_tables, self.star_tables) = saved;
                let outs = match outs {
                    Ok(o) => o,
                    // A view whose definition would be blocked for this session: its columns
                    // are tainted wholesale, so reading any of them is refused.
                    Err(b) => {
                        return Err(Block {
                            reason: format!("view {} cannot be classified for this session: {}", r.name, b.reason),
                            ..b
                        });
                    }
                };
                let cols = r
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| ScopeCol {
                        name: c.name.clone(),
                        lin: outs.get(i).map(|o| o.lin.clone().cast()).unwrap_or_default(),
                    })
                    .collect();
                let mut reads = reads;
                reads.insert(r.name.clone());
                Rel { alias: r.name.table.clone(), cols, reads, ..Rel::default() }
            }
            _ => {
                let cols = r
                    .columns
                    .iter()
                    .map(|c| ScopeCol { name: c.name.clone(), lin: self.column_lin(r, &c.name) })
                    .collect();
                let mut reads: BTreeSet<TableName> = r.ancestors.iter().cloned().collect();
                reads.insert(r.name.clone());
                Rel { alias: r.name.table.clone(), cols, reads, ..Rel::default() }
            }
        };
        if rel.any_masked().is_some() || self.policy.masked_tables.iter().any(|t| rel.reads.contains(t)) {
            self.protected_read.extend(rel.reads.iter().filter(|t| self.policy.masked_tables.contains(t)).cloned());
        }
        self.views.insert(r.oid, rel.clone());
        Ok(rel)
    }

    fn column_lin(&self, r: &Relation, column: &str) -> Lin {
        std::iter::once(&r.name)
            .chain(r.ancestors.iter())
            .find_map(|t| {
                let name = ColumnName { table: t.clone(), column: column.to_owned() };
                self.policy.mask(&name).map(|v| MaskedCol {
                    col: name,
                    mask: v.mask.clone(),
                    predicates: v.predicates,
                    transparent: true,
                    origin: true,
                })
            })
            .map_or_else(Lin::clean, |m| Lin(Some(m)))
    }

    fn star_rels<'s>(&self, cr: &pb::ColumnRef, sc: &'s Scope<'_>) -> R<Vec<&'s Rel>> {
        let names = field_names(cr);
        match names.as_slice() {
            [] => Ok(sc.rels.iter().collect()),
            [.., rel] => sc
                .rels
                .iter()
                .find(|r| &r.alias == rel)
                .map(|r| vec![r])
                .ok_or_else(|| block("unanalysable", format!("cannot resolve {rel}.*"), "")),
        }
    }

    fn positional_or_expr(&mut self, n: &pb::Node, sc: &Scope<'_>, outs: &[ScopeCol], clause: Clause) -> R<Lin> {
        if let Some(N::AConst(c)) = n.node.as_ref()
            && let Some(pb::a_const::Val::Ival(i)) = &c.val
        {
            let lin = usize::try_from(i.ival)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| outs.get(i))
                .map(|c| c.lin.clone());
            return Ok(relax(lin.unwrap_or_default(), clause));
        }
        if let Some(N::ColumnRef(cr)) = n.node.as_ref()
            && let [name] = field_names(cr).as_slice()
            && !sc.rels.iter().any(|r| r.cols.iter().any(|c| &c.name == name))
            && let Some(out) = outs.iter().find(|o| &o.name == name)
        {
            // An output column's alias (ORDER BY / GROUP BY alias).
            self.column_refs_seen += 1;
            return Ok(relax(out.lin.clone(), clause));
        }
        match n.node.as_ref() {
            Some(N::GroupingSet(g)) => {
                let mut lin = Lin::clean();
                for c in &g.content {
                    lin = lin.or(self.positional_or_expr(c, sc, outs, clause)?);
                }
                Ok(lin)
            }
            _ => self.expr(n, sc, clause),
        }
    }

    fn sort_item(&mut self, item: &pb::Node, sc: &Scope<'_>, outs: &[ScopeCol]) -> R<()> {
        let Some(N::SortBy(sb)) = item.node.as_ref() else { return Err(unknown("ORDER BY item")) };
        let Some(n) = sb.node.as_deref() else { return Err(unknown("ORDER BY item")) };
        let lin = self.positional_or_expr(n, sc, outs, Clause::Order)?;
        self.check_clean(&lin, Clause::Order)
    }

    fn window_def(&mut self, w: &pb::Node, sc: &Scope<'_>) -> R<()> {
        let Some(N::WindowDef(wd)) = w.node.as_ref() else { return Err(unknown("window")) };
        self.window(wd, sc)
    }

    fn window(&mut self, wd: &pb::WindowDef, sc: &Scope<'_>) -> R<()> {
        for p in &wd.partition_clause {
            let lin = self.expr(p, sc, Clause::Other)?;
            self.check_clean(&lin, Clause::Other)?;
        }
        for o in &wd.order_clause {
            let Some(N::SortBy(sb)) = o.node.as_ref() else { return Err(unknown("window ORDER BY")) };
            if let Some(n) = sb.node.as_deref() {
                let lin = self.expr(n, sc, Clause::Other)?;
                self.check_clean(&lin, Clause::Other)?;
            }
        }
        for n in [&wd.start_offset, &wd.end_offset].into_iter().flatten() {
            let lin = self.expr(n, sc, Clause::Other)?;
            self.check_clean(&lin, Clause::Other)?;
        }
        Ok(())
    }

    /// A WHERE / JOIN / HAVING condition: `col = value` and `col IN (values)` on columns with
    /// `predicates: equality` are allowed in WHERE; `predicates: any` allows every use.
    fn predicate(&mut self, n: &pb::Node, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        match n.node.as_ref() {
            Some(N::BoolExpr(b)) => {
                let mut lin = Lin::clean();
                for a in &b.args {
                    lin = lin.or(self.predicate(a, sc, clause)?);
                }
                Ok(lin)
            }
            Some(N::AExpr(e)) if clause == Clause::Where && is_equality(e) => {
                let (Some(l), Some(r)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else {
                    return self.expr(n, sc, clause);
                };
                for (col_side, other) in [(l, r), (r, l)] {
                    if let Some(N::ColumnRef(cr)) = col_side.node.as_ref() {
                        let lin = self.column_ref(cr, sc, clause)?;
                        if let Some(m) = &lin.0
                            && m.predicates == Predicates::Equality
                        {
                            let other_lin = self.expr(other, sc, clause)?;
                            if other_lin.0.is_none() && is_constant_like(other) {
                                return Ok(Lin::clean());
                            }
                            return Ok(lin.or(other_lin));
                        }
                        // Not an equality-relaxed column: walk the other side normally.
                        let other_lin = self.expr(other, sc, clause)?;
                        return Ok(lin.or(other_lin).taint());
                    }
                }
                self.expr(n, sc, clause)
            }
            _ => self.expr(n, sc, clause),
        }
    }

    fn column_ref(&mut self, cr: &pb::ColumnRef, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        self.column_refs_seen += 1;
        let names = field_names(cr);
        if cr.fields.last().is_some_and(|f| matches!(f.node, Some(N::AStar(_)))) {
            // `t.*` outside the target list: a whole row.
            let rels = self.star_rels(cr, sc)?;
            return self.whole_row(&rels);
        }
        let (rel_name, col) = match names.as_slice() {
            [col] => (None, col.as_str()),
            [.., rel, col] => (Some(rel.as_str()), col.as_str()),
            [] => return Err(unknown("column reference")),
        };
        let mut scope = Some(sc);
        while let Some(s) = scope {
            for rel in &s.rels {
                if rel_name.is_some_and(|n| n != rel.alias) {
                    continue;
                }
                if let Some(c) = rel.cols.iter().find(|c| c.name == col) {
                    return Ok(relax(c.lin.clone(), clause));
                }
                if rel.unknown_cols {
                    return Ok(relax(rel.lin_unknown.clone(), clause));
                }
            }
            scope = s.parent;
        }
        // `SELECT c FROM customers c`: a bare name that is a relation is a whole-row reference.
        if rel_name.is_none() {
            let mut scope = Some(sc);
            while let Some(s) = scope {
                if let Some(rel) = s.rels.iter().find(|r| r.alias == col) {
                    return self.whole_row(&[rel]);
                }
                scope = s.parent;
            }
        }
        // Unresolvable: the server rejects it (column does not exist) before reading data.
        Ok(Lin::clean())
    }

    fn whole_row(&self, rels: &[&Rel]) -> R<Lin> {
        for rel in rels {
            if let Some(m) = rel.any_masked() {
                return Err(col_block(
                    "whole_row",
                    &m.col,
                    format!("a whole-row reference to {} would carry masked column {} unmasked", rel.alias, m.col),
                    "list the columns you need",
                ));
            }
        }
        Ok(Lin::clean())
    }

    fn expr(&mut self, n: &pb::Node, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        self.depth += 1;
        if self.depth > 400 {
            return Err(block("unanalysable", "the statement nests too deeply for analysis", "simplify the statement"));
        }
        let r = self.expr_inner(n, sc, clause);
        self.depth -= 1;
        r
    }

    fn exprs<'n>(&mut self, ns: impl IntoIterator<Item = &'n pb::Node>, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        let mut lin = Lin::clean();
        for n in ns {
            lin = lin.or(self.expr(n, sc, clause)?);
        }
        Ok(lin)
    }

    fn opt(&mut self, n: Option<&pb::Node>, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        n.map_or_else(|| Ok(Lin::clean()), |n| self.expr(n, sc, clause))
    }

    fn expr_inner(&mut self, n: &pb::Node, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        let Some(node) = n.node.as_ref() else { return Ok(Lin::clean()) };
        Ok(match node {
            N::ColumnRef(cr) => self.column_ref(cr, sc, clause)?,
            N::AConst(_)
            | N::ParamRef(_)
            | N::SqlvalueFunction(_)
            | N::SetToDefault(_)
            | N::String(_)
            | N::Integer(_)
            | N::Float(_)
            | N::Boolean(_) => Lin::clean(),
            N::TypeCast(t) => self.opt(t.arg.as_deref(), sc, clause)?.cast(),
            N::CollateClause(c) => self.opt(c.arg.as_deref(), sc, clause)?.cast(),
            N::AExpr(e) => {
                let l = self.opt(e.lexpr.as_deref(), sc, clause)?;
                let r = self.opt(e.rexpr.as_deref(), sc, clause)?;
                l.or(r)
            }
            N::BoolExpr(b) => self.exprs(&b.args, sc, clause)?.taint(),
            N::NullTest(t) => self.opt(t.arg.as_deref(), sc, clause)?.taint(),
            N::BooleanTest(t) => self.opt(t.arg.as_deref(), sc, clause)?.taint(),
            N::CaseExpr(c) => {
                let a = self.opt(c.arg.as_deref(), sc, clause)?;
                let w = self.exprs(&c.args, sc, clause)?;
                let d = self.opt(c.defresult.as_deref(), sc, clause)?;
                a.or(w).or(d)
            }
            N::CaseWhen(w) => {
                let e = self.opt(w.expr.as_deref(), sc, clause)?;
                let r = self.opt(w.result.as_deref(), sc, clause)?;
                e.or(r)
            }
            N::CoalesceExpr(c) => self.exprs(&c.args, sc, clause)?.taint(),
            N::MinMaxExpr(m) => self.exprs(&m.args, sc, clause)?.taint(),
            N::AArrayExpr(a) => self.exprs(&a.elements, sc, clause)?.taint(),
            N::RowExpr(r) => self.exprs(&r.args, sc, clause)?.taint(),
            N::List(l) => self.exprs(&l.items, sc, clause)?.taint(),
            N::NamedArgExpr(a) => self.opt(a.arg.as_deref(), sc, clause)?,
            N::AIndices(i) => {
                let l = self.opt(i.lidx.as_deref(), sc, clause)?;
                let u = self.opt(i.uidx.as_deref(), sc, clause)?;
                l.or(u)
            }
            N::AIndirection(ind) => {
                // `(c).ssn`: a field of a whole-row reference is that column.
                if let (Some(N::ColumnRef(cr)), [field]) =
                    (ind.arg.as_deref().and_then(|a| a.node.as_ref()), ind.indirection.as_slice())
                    && let Some(N::String(f)) = field.node.as_ref()
                {
                    let mut names = field_names(cr);
                    names.push(f.sval.clone());
                    let fake = pb::ColumnRef {
                        fields: names
                            .into_iter()
                            .map(|s| pb::Node { node: Some(N::String(pb::String { sval: s })) })
                            .collect(),
                        location: cr.location,
                    };
                    return self.column_ref(&fake, sc, clause);
                }
                let a = self.opt(ind.arg.as_deref(), sc, clause)?;
                let i = self.exprs(&ind.indirection, sc, clause)?;
                a.or(i).taint()
            }
            N::FuncCall(f) => self.func_call(f, sc, clause)?,
            N::SubLink(s) => self.sublink(s, sc, clause)?,
            N::GroupingFunc(_) => Lin::clean(),
            other => return Err(unknown(node_name(other))),
        })
    }

    fn func_call(&mut self, f: &pb::FuncCall, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        let names: Vec<String> = f
            .funcname
            .iter()
            .filter_map(|n| match n.node.as_ref() {
                Some(N::String(s)) => Some(s.sval.to_lowercase()),
                _ => None,
            })
            .collect();
        let name = names.last().cloned().unwrap_or_default();
        let schema_ok = match names.as_slice() {
            [_] => true,
            [schema, _] => schema == "pg_catalog",
            _ => false,
        };
        let settable = name == "set_config" && schema_ok && self.set_config_allowed(f);
        if self.strict && !settable && (!schema_ok || !ALLOWED_FUNCTIONS.contains(&name.as_str())) {
            return Err(block(
                "function",
                format!("function {} is not on pgveil's allow-list for masked sessions", names.join(".")),
                "use built-in functions, or ask for the function to be reviewed and allowed",
            ));
        }
        let mut lin = self.exprs(&f.args, sc, Clause::Value)?;
        for o in &f.agg_order {
            let Some(N::SortBy(sb)) = o.node.as_ref() else { return Err(unknown("aggregate ORDER BY")) };
            if let Some(n) = sb.node.as_deref() {
                let l = self.expr(n, sc, Clause::Value)?;
                self.check_clean(&l, Clause::Order)?;
            }
        }
        if let Some(filter) = f.agg_filter.as_deref() {
            let l = self.expr(filter, sc, Clause::Where)?;
            self.check_clean(&l, Clause::Where)?;
        }
        if let Some(w) = &f.over {
            self.window(w, sc)?;
        }
        if f.agg_distinct && lin.0.is_some() {
            lin = lin.taint();
        }
        let _ = clause;
        Ok(lin.taint())
    }

    fn sublink(&mut self, s: &pb::SubLink, sc: &Scope<'_>, clause: Clause) -> R<Lin> {
        let Some(N::SelectStmt(q)) = s.subselect.as_ref().and_then(|q| q.node.as_ref()) else {
            return Err(unknown("subquery"));
        };
        let outs = self.select(q, Some(sc), false)?;
        let first = outs.first().map(|c| c.lin.clone()).unwrap_or_default();
        Ok(match s.sub_link_type() {
            pb::SubLinkType::ExistsSublink => Lin::clean(),
            pb::SubLinkType::ExprSublink => first.cast(),
            pb::SubLinkType::ArraySublink => first.taint(),
            _ => {
                // x IN (SELECT …), x = ANY (SELECT …): the subquery's values are compared.
                let test = self.opt(s.testexpr.as_deref(), sc, clause)?;
                let compared = relax(outs.iter().fold(Lin::clean(), |a, c| a.or(c.lin.clone())), clause);
                self.check_clean(&compared, if clause == Clause::Output { Clause::Where } else { clause })?;
                test.taint()
            }
        })
    }

    fn returning(&mut self, rc: Option<&pb::ReturningClause>, sc: &Scope<'_>) -> R<Vec<Option<Mask>>> {
        let Some(rc) = rc else { return Ok(Vec::new()) };
        let mut outs = Vec::new();
        for t in &rc.exprs {
            let Some(N::ResTarget(rt)) = t.node.as_ref() else { return Err(unknown("RETURNING item")) };
            let Some(val) = rt.val.as_deref() else { continue };
            if let Some(N::ColumnRef(cr)) = val.node.as_ref()
                && cr.fields.last().is_some_and(|f| matches!(f.node, Some(N::AStar(_))))
            {
                self.column_refs_seen += 1;
                for rel in self.star_rels(cr, sc)? {
                    outs.extend(rel.cols.iter().cloned());
                }
                continue;
            }
            let lin = self.expr(val, sc, Clause::Output)?;
            outs.push(ScopeCol { name: rt.name.clone(), lin });
        }
        self.output_masks(&outs)
    }

    fn write_source(&self, lin: &Lin) -> R<()> {
        match &lin.0 {
            None => Ok(()),
            Some(m) => Err(col_block(
                "write_source",
                &m.col,
                format!("the statement would write values of masked column {} somewhere else", m.col),
                "write constants or unmasked columns",
            )),
        }
    }

    fn target_scope(&mut self, rv: Option<&pb::RangeVar>) -> R<Scope<'static>> {
        let Some(rv) = rv else { return Err(unknown("target table")) };
        let empty = Scope::default();
        let rel = self.range_var(rv, &empty)?;
        Ok(Scope { rels: vec![rel], ..Scope::default() })
    }

    fn insert(&mut self, s: &pb::InsertStmt) -> R<Vec<Option<Mask>>> {
        if let Some(w) = &s.with_clause
            && !w.ctes.is_empty()
        {
            self.strict_block(block(
                "unanalysable",
                "INSERT with WITH is not analysed for masked sessions",
                "move the CTE into the SELECT",
            ))?;
        }
        let target = self.target_scope(s.relation.as_ref())?;
        if let Some(src) = s.select_stmt.as_deref() {
            let Some(N::SelectStmt(q)) = src.node.as_ref() else { return Err(unknown("INSERT source")) };
            let outs = self.select(q, None, false)?;
            for o in &outs {
                self.write_source(&o.lin)?;
            }
        }
        if let Some(oc) = &s.on_conflict_clause {
            let mut excluded = target.rels.first().cloned().unwrap_or_default();
            excluded.alias = "excluded".to_owned();
            let mut sc = Scope { rels: target.rels.clone(), ..Scope::default() };
            sc.rels.push(excluded);
            for t in &oc.target_list {
                let Some(N::ResTarget(rt)) = t.node.as_ref() else { return Err(unknown("ON CONFLICT SET")) };
                let lin = self.opt(rt.val.as_deref(), &sc, Clause::Value)?;
                self.write_source(&lin)?;
            }
            if let Some(w) = oc.where_clause.as_deref() {
                let lin = self.predicate(w, &sc, Clause::Where)?;
                self.check_clean(&lin, Clause::Where)?;
            }
            if let Some(infer) = &oc.infer
                && let Some(w) = infer.where_clause.as_deref()
            {
                let lin = self.expr(w, &sc, Clause::Where)?;
                self.check_clean(&lin, Clause::Where)?;
            }
        }
        self.returning(s.returning_clause.as_ref(), &target)
    }

    fn update(&mut self, s: &pb::UpdateStmt) -> R<Vec<Option<Mask>>> {
        if s.with_clause.as_ref().is_some_and(|w| !w.ctes.is_empty()) {
            self.strict_block(block("unanalysable", "UPDATE with WITH is not analysed for masked sessions", ""))?;
        }
        let mut sc = self.target_scope(s.relation.as_ref())?;
        for f in &s.from_clause {
            let rels = self.from_item(f, &sc)?;
            sc.rels.extend(rels);
        }
        for t in &s.target_list {
            let Some(N::ResTarget(rt)) = t.node.as_ref() else { return Err(unknown("SET item")) };
            let lin = match rt.val.as_deref().and_then(|v| v.node.as_ref()) {
                Some(N::MultiAssignRef(m)) => self.opt(m.source.as_deref(), &sc, Clause::Value)?,
                _ => self.opt(rt.val.as_deref(), &sc, Clause::Value)?,
            };
            self.write_source(&lin)?;
        }
        if let Some(w) = s.where_clause.as_deref() {
            let lin = self.predicate(w, &sc, Clause::Where)?;
            self.check_clean(&lin, Clause::Where)?;
        }
        self.returning(s.returning_clause.as_ref(), &sc)
    }

    fn delete(&mut self, s: &pb::DeleteStmt) -> R<Vec<Option<Mask>>> {
        if s.with_clause.as_ref().is_some_and(|w| !w.ctes.is_empty()) {
            self.strict_block(block("unanalysable", "DELETE with WITH is not analysed for masked sessions", ""))?;
        }
        let mut sc = self.target_scope(s.relation.as_ref())?;
        for f in &s.using_clause {
            let rels = self.from_item(f, &sc)?;
            sc.rels.extend(rels);
        }
        if let Some(w) = s.where_clause.as_deref() {
            let lin = self.predicate(w, &sc, Clause::Where)?;
            self.check_clean(&lin, Clause::Where)?;
        }
        self.returning(s.returning_clause.as_ref(), &sc)
    }

    fn copy(&mut self, s: &pb::CopyStmt) -> R<()> {
        if !s.filename.is_empty() || s.is_program {
            return self.strict_block(block(
                "statement_type",
                "COPY to or from a server file or program is not allowed for masked sessions",
                "use COPY … FROM STDIN / TO STDOUT",
            ));
        }
        if s.is_from {
            let _ = self.target_scope(s.relation.as_ref())?;
            if let Some(w) = s.where_clause.as_deref() {
                let _ = w;
                self.column_refs_seen = usize::MAX / 2;
            }
            return Ok(());
        }
        let copy_block = |m: &MaskedCol| {
            col_block(
                "copy_out",
                &m.col,
                format!("COPY TO would export masked column {}", m.col),
                "use SELECT with the columns you need (masked columns are masked there)",
            )
        };
        if let Some(rv) = &s.relation {
            let sc = self.target_scope(Some(rv))?;
            let rel = sc.rels.first().cloned().unwrap_or_default();
            let listed: Vec<String> = s
                .attlist
                .iter()
                .filter_map(|a| match a.node.as_ref() {
                    Some(N::String(st)) => Some(st.sval.clone()),
                    _ => None,
                })
                .collect();
            for c in &rel.cols {
                if (listed.is_empty() || listed.contains(&c.name))
                    && let Some(m) = &c.lin.0
                {
                    return Err(copy_block(m));
                }
            }
            // For minimization, COPY of a table reads every row, every column.
            self.read_tables.extend(rel.reads.iter().cloned());
            self.unfiltered_tables.extend(rel.reads.iter().cloned());
            if listed.is_empty() {
                self.star_tables.extend(rel.reads.iter().cloned());
            }
            return Ok(());
        }
        let Some(N::SelectStmt(q)) = s.query.as_ref().and_then(|q| q.node.as_ref()) else {
            return Err(unknown("COPY query"));
        };
        let outs = self.select(q, None, true)?;
        if let Some(m) = outs.iter().find_map(|c| c.lin.0.as_ref()) {
            return Err(copy_block(m));
        }
        Ok(())
    }

    fn explain(&mut self, s: &pb::ExplainStmt) -> R<()> {
        let analyze = s.options.iter().any(|o| match o.node.as_ref() {
            Some(N::DefElem(d)) => {
                d.defname == "analyze"
                    && !matches!(d.arg.as_deref().and_then(|a| a.node.as_ref()), Some(N::Boolean(b)) if !b.boolval)
                    && !matches!(d.arg.as_deref().and_then(|a| a.node.as_ref()), Some(N::String(v)) if matches!(v.sval.as_str(), "false" | "off" | "0"))
            }
            _ => false,
        });
        let Some(inner) = s.query.as_ref().and_then(|q| q.node.as_ref()) else { return Err(unknown("EXPLAIN")) };
        let mut scratch = Analysis::default();
        let inner_result = self.statement(inner, &mut scratch);
        if analyze {
            inner_result?;
            if self.strict && !self.protected_read.is_empty() {
                return Err(block(
                    "explain_analyze",
                    "EXPLAIN ANALYZE runs the statement and reports row counts over protected tables",
                    "use EXPLAIN without ANALYZE",
                ));
            }
        }
        // Plain EXPLAIN shows the plan, not data; its text is not walked further.
        self.column_refs_seen = usize::MAX / 2;
        Ok(())
    }
}

/// Whether a masked session may set `name` to `value`; `None` for identity changes.
fn setting_allowed(name: &str, value: &str) -> Option<bool> {
    Some(match name {
        "role" | "session_authorization" | "session authorization" => return None,
        "standard_conforming_strings" => value == "on",
        "client_encoding" | "names" => matches!(value, "utf8" | "unicode" | "utf-8"),
        "bytea_output" => value == "hex",
        "datestyle" => value.starts_with("iso"),
        "row_security" => value == "on",
        _ => true,
    })
}

fn needs_positions(outputs: &[ScopeCol]) -> bool {
    outputs.iter().any(|c| c.lin.0.as_ref().is_some_and(|m| !m.origin))
}

fn describe(outputs: &[ScopeCol]) -> Vec<(String, Option<Mask>)> {
    outputs.iter().map(|c| (c.name.clone(), c.lin.0.as_ref().map(|m| m.mask.clone()))).collect()
}

fn relax(lin: Lin, clause: Clause) -> Lin {
    match &lin.0 {
        Some(m) if m.predicates == Predicates::Any && clause.allows_any() => Lin::clean(),
        _ => lin,
    }
}

fn rename(rel: &mut Rel, colnames: &[pb::Node]) {
    for (c, n) in rel.cols.iter_mut().zip(colnames) {
        if let Some(N::String(s)) = n.node.as_ref() {
            c.name = s.sval.clone();
        }
    }
}

fn field_names(cr: &pb::ColumnRef) -> Vec<String> {
    cr.fields
        .iter()
        .filter_map(|f| match f.node.as_ref() {
            Some(N::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

fn is_equality(e: &pb::AExpr) -> bool {
    let op = e.name.iter().find_map(|n| match n.node.as_ref() {
        Some(N::String(s)) => Some(s.sval.as_str()),
        _ => None,
    });
    matches!(e.kind(), pb::AExprKind::AexprOp | pb::AExprKind::AexprIn) && op == Some("=")
}

fn is_constant_like(n: &pb::Node) -> bool {
    match n.node.as_ref() {
        Some(N::AConst(_) | N::ParamRef(_)) => true,
        Some(N::TypeCast(t)) => t.arg.as_deref().is_some_and(is_constant_like),
        Some(N::List(l)) => l.items.iter().all(is_constant_like),
        _ => false,
    }
}

fn is_aggregate_call(n: &pb::Node) -> bool {
    const AGGS: &[&str] = &[
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
    ];
    match n.node.as_ref() {
        Some(N::FuncCall(f)) => {
            f.over.is_none()
                && f.funcname.last().is_some_and(
                    |l| matches!(l.node.as_ref(), Some(N::String(s)) if AGGS.contains(&s.sval.to_lowercase().as_str())),
                )
        }
        Some(N::TypeCast(t)) => t.arg.as_deref().is_some_and(is_aggregate_call),
        Some(N::AConst(_)) => true,
        _ => false,
    }
}

fn default_name(n: &pb::Node) -> String {
    match n.node.as_ref() {
        Some(N::ColumnRef(cr)) => field_names(cr).pop().unwrap_or_else(|| "?column?".to_owned()),
        Some(N::FuncCall(f)) => f
            .funcname
            .last()
            .and_then(|l| match l.node.as_ref() {
                Some(N::String(s)) => Some(s.sval.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "?column?".to_owned()),
        Some(N::TypeCast(t)) => t.arg.as_deref().map_or_else(|| "?column?".to_owned(), default_name),
        _ => "?column?".to_owned(),
    }
}

fn set_op_name(s: &pb::SelectStmt) -> &'static str {
    match s.op() {
        pb::SetOperation::SetopUnion => "UNION",
        pb::SetOperation::SetopIntersect => "INTERSECT",
        _ => "EXCEPT",
    }
}

fn unknown(what: &str) -> Block {
    block(
        "unanalysable",
        format!("pgveil cannot analyse {what} in this statement"),
        "simplify the statement, or ask the DBA to exempt this role",
    )
}

fn first_words(s: &str) -> String {
    s.chars().take(120).collect()
}

fn node_name(n: &N) -> &'static str {
    match n {
        N::XmlExpr(_) | N::XmlSerialize(_) => "an XML expression",
        N::JsonFuncExpr(_) | N::JsonTable(_) | N::JsonObjectConstructor(_) | N::JsonArrayConstructor(_) => {
            "an SQL/JSON expression"
        }
        N::RangeTableSample(_) => "TABLESAMPLE",
        N::MultiAssignRef(_) => "a multi-column assignment",
        _ => "an expression",
    }
}

fn statement_kind(n: &N) -> String {
    let dbg = format!("{n:?}");
    let name = dbg.split('(').next().unwrap_or("statement");
    let words: String = name
        .trim_end_matches("Stmt")
        .chars()
        .flat_map(|c| if c.is_uppercase() { vec![' ', c] } else { vec![c.to_ascii_uppercase()] })
        .collect();
    words.trim().to_uppercase()
}

/// Counts ColumnRef nodes anywhere in a statement, through every node type, for the
/// completeness check (an error counts as "more than seen": fail closed).
fn count_column_refs(raw: &pb::RawStmt) -> usize {
    crate::count::count_variant(raw, "ColumnRef").unwrap_or(usize::MAX)
}
