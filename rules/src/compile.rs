//! The rules file → `Policy`, reporting every problem at once with its position.

use std::collections::{BTreeMap, HashMap};

use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::mask::{Granularity, HashKey, Mask};
use crate::names::{self, ColumnName, RoleName, TableName};
use crate::policy::{ColumnRule, Deny, Mode, Policy, Predicates, SelectRule};
use crate::tree::{self, Key, Node, Pos, Value};
use crate::types::Decimal;

/// What compiling needs from outside the file (the caller reads the environment).
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// `PGVEIL_HASH_KEY`; a file using `hash` is refused without it.
    pub hash_key: Option<Vec<u8>>,
}

const TOP_KEYS: &[&str] = &["version", "exempt", "columns", "selects", "mode", "functions"];
const COLUMN_KEYS: &[&str] = &["mask", "unmasked_for", "predicates", "by_role"];
const BY_ROLE_KEYS: &[&str] = &["role", "mask"];
const SELECT_KEYS: &[&str] = &["name", "roles", "tables", "deny", "max_rows", "mode"];
const MASK_NAMES: &[&str] = &["redact", "nullify", "email", "hash", "partial", "generalize", "round", "constant"];
const PARTIAL_KEYS: &[&str] = &["keep_first", "keep_last", "fill"];
const HASH_KEYS: &[&str] = &["length"];

struct Ctx {
    diags: Vec<Diagnostic>,
    uses_hash: Option<Pos>,
}

impl Ctx {
    fn err(&mut self, pos: Pos, message: impl Into<String>) -> &mut Diagnostic {
        self.diags.push(Diagnostic::new(pos, message));
        self.diags.last_mut().expect("just pushed")
    }

    fn unknown_key(&mut self, key: &Key, allowed: &[&str], what: &str) {
        let hint = did_you_mean(&key.name, allowed).map(|s| format!("did you mean `{s}`?"));
        let d = self.err(key.pos, format!("unknown key `{}` in {what}", key.name));
        d.expected = Some(format!("one of: {}", allowed.join(", ")));
        d.hint = hint;
    }

    fn map<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [(Key, Node)]> {
        match &node.value {
            Value::Map(m) => Some(m),
            other => {
                let found = other.kind();
                self.err(node.pos, format!("{what} must be a mapping, found {found}"));
                None
            }
        }
    }

    fn seq<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(s) => Some(s),
            other => {
                let found = other.kind();
                self.err(node.pos, format!("{what} must be a list, found {found}")).hint =
                    Some("write `[a, b]` or one `- item` per line".to_owned());
                None
            }
        }
    }

    fn string<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        match &node.value {
            Value::Str(s) => Some(s),
            other => {
                let found = other.kind();
                self.err(node.pos, format!("{what} must be a string, found {found}"));
                None
            }
        }
    }

    fn roles(&mut self, node: &Node, what: &str) -> Vec<RoleName> {
        let Some(items) = self.seq(node, what) else { return Vec::new() };
        items
            .iter()
            .filter_map(|n| {
                let s = self.string(n, "a role name")?;
                names::parse_role(s).map_err(|e| self.err(n.pos, format!("invalid role name {s:?}: {e}"))).ok()
            })
            .collect()
    }
}

/// Compiles a rules file. `Err` holds every problem found, in no particular order.
pub fn compile(src: &str, opts: &CompileOptions) -> Result<Policy, Vec<Diagnostic>> {
    if src.trim().is_empty() || src.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        return Err(vec![
            Diagnostic::new(Pos { line: 1, col: 1 }, "the rules file is empty").expected("at least `version: 1`"),
        ]);
    }
    let root = tree::parse(src).map_err(|e| {
        let hint = e
            .message
            .to_lowercase()
            .contains("duplicate")
            .then(|| "each table, column and key may appear once; merge the two entries".to_owned());
        vec![Diagnostic { pos: e.pos, message: e.message, expected: None, hint }]
    })?;
    let mut cx = Ctx { diags: Vec::new(), uses_hash: None };
    let Some(top) = cx.map(&root, "the rules file") else { return Err(cx.diags) };

    let mut version = None;
    let mut exempt = Vec::new();
    let mut columns = BTreeMap::new();
    let mut selects = Vec::new();
    let mut mode = Mode::Enforce;
    let mut functions = Vec::new();
    for (key, value) in top {
        match key.name.as_str() {
            "version" => version = Some(value),
            "exempt" => exempt = cx.roles(value, "`exempt`"),
            "columns" => columns = compile_columns(&mut cx, value),
            "selects" => selects = compile_selects(&mut cx, value),
            "mode" => mode = compile_mode(&mut cx, value).unwrap_or_default(),
            "functions" => functions = compile_functions(&mut cx, value),
            _ => cx.unknown_key(key, TOP_KEYS, "the rules file"),
        }
    }
    match version.map(|v| &v.value) {
        Some(Value::Int(1)) => {}
        Some(_) => {
            let pos = version.map(|v| v.pos).unwrap_or_default();
            cx.err(pos, "unsupported rules file version").expected = Some("`version: 1`".to_owned());
        }
        None => {
            cx.err(Pos { line: 1, col: 1 }, "missing `version`").hint =
                Some("add `version: 1` as the first line".to_owned());
        }
    }
    if let Some(pos) = cx.uses_hash
        && opts.hash_key.as_ref().is_none_or(Vec::is_empty)
    {
        cx.err(pos, "the `hash` mask needs a key, and PGVEIL_HASH_KEY is not set").hint =
            Some("set PGVEIL_HASH_KEY in the proxy's environment (never in this file)".to_owned());
    }
    if !cx.diags.is_empty() {
        return Err(cx.diags);
    }
    let hash_key = opts.hash_key.as_deref().filter(|k| !k.is_empty()).map(HashKey::new);
    Ok(Policy { exempt, columns, selects, mode, hash_key, functions })
}

/// `functions: { allow: [schema.fn, …] }`: user-defined functions masked sessions may call.
fn compile_functions(cx: &mut Ctx, node: &Node) -> Vec<TableName> {
    let mut out = Vec::new();
    let Some(fields) = cx.map(node, "`functions`") else { return out };
    for (k, v) in fields {
        if k.name != "allow" {
            cx.unknown_key(k, &["allow"], "`functions`");
            continue;
        }
        let Some(items) = cx.seq(v, "`functions.allow`") else { continue };
        for item in items {
            let Some(s) = cx.string(item, "a function name") else { continue };
            match crate::names::parse_table(s) {
                Ok(t) => out.push(t),
                Err(e) => {
                    cx.err(item.pos, format!("invalid function name `{s}`: {e}")).expected =
                        Some("`schema.function`".to_owned());
                }
            }
        }
    }
    out
}

fn compile_mode(cx: &mut Ctx, node: &Node) -> Option<Mode> {
    match node.as_str() {
        Some("enforce") => Some(Mode::Enforce),
        Some("monitor") => Some(Mode::Monitor),
        _ => {
            cx.err(node.pos, "invalid mode").expected = Some("`enforce` or `monitor`".to_owned());
            None
        }
    }
}

fn compile_columns(cx: &mut Ctx, node: &Node) -> BTreeMap<ColumnName, ColumnRule> {
    let mut out = BTreeMap::new();
    let mut seen: HashMap<ColumnName, Pos> = HashMap::new();
    let Some(entries) = cx.map(node, "`columns`") else { return out };
    for (key, body) in entries {
        let name = match names::parse_column(&key.name) {
            Ok(n) => n,
            Err(e) => {
                let d = cx.err(key.pos, format!("invalid column name {:?}: {e}", key.name));
                d.expected = Some("`schema.table.column`, e.g. `public.customers.ssn`".to_owned());
                continue;
            }
        };
        if let Some(first) = seen.get(&name) {
            let msg = format!("column {name} is listed twice (first at line {})", first.line);
            cx.err(key.pos, msg).hint =
                Some("names fold to lower case unless quoted; merge the two entries".to_owned());
            continue;
        }
        seen.insert(name.clone(), key.pos);
        if let Some(rule) = compile_column(cx, key.pos, body) {
            out.insert(name, rule);
        }
    }
    out
}

fn compile_column(cx: &mut Ctx, pos: Pos, node: &Node) -> Option<ColumnRule> {
    let entries = cx.map(node, "a column rule")?;
    let mut mask = None;
    let mut unmasked_for = Vec::new();
    let mut predicates = Predicates::None;
    let mut by_role = Vec::new();
    let mut mask_seen = false;
    for (key, value) in entries {
        match key.name.as_str() {
            "mask" => {
                mask_seen = true;
                mask = compile_mask(cx, value);
            }
            "unmasked_for" => unmasked_for = cx.roles(value, "`unmasked_for`"),
            "predicates" => match value.as_str() {
                Some("none") => predicates = Predicates::None,
                Some("equality") => predicates = Predicates::Equality,
                Some("any") => predicates = Predicates::Any,
                Some("masked") => predicates = Predicates::Masked,
                _ => {
                    cx.err(value.pos, "invalid `predicates`").expected =
                        Some("`none`, `masked`, `equality` or `any`".to_owned());
                }
            },
            "by_role" => {
                let Some(items) = cx.seq(value, "`by_role`") else { continue };
                for item in items {
                    let Some(fields) = cx.map(item, "a `by_role` entry") else { continue };
                    let (mut role, mut m) = (None, None);
                    for (k, v) in fields {
                        match k.name.as_str() {
                            "role" => {
                                role = cx.string(v, "`role`").and_then(|s| {
                                    names::parse_role(s)
                                        .map_err(|e| cx.err(v.pos, format!("invalid role name {s:?}: {e}")))
                                        .ok()
                                });
                            }
                            "mask" => m = compile_mask(cx, v),
                            _ => cx.unknown_key(k, BY_ROLE_KEYS, "a `by_role` entry"),
                        }
                    }
                    match (role, m) {
                        (Some(r), Some(m)) => by_role.push((r, m)),
                        (None, _) if !fields.iter().any(|(k, _)| k.name == "role") => {
                            cx.err(item.pos, "a `by_role` entry needs `role`");
                        }
                        (_, None) if !fields.iter().any(|(k, _)| k.name == "mask") => {
                            cx.err(item.pos, "a `by_role` entry needs `mask`");
                        }
                        _ => {}
                    }
                }
            }
            _ => cx.unknown_key(key, COLUMN_KEYS, "a column rule"),
        }
    }
    if !mask_seen {
        cx.err(pos, "this column has no `mask`").expected = Some(format!("`mask:` one of {}", MASK_NAMES.join(", ")));
    }
    Some(ColumnRule { mask: mask?, unmasked_for, predicates, by_role, pos })
}

fn unknown_mask(cx: &mut Ctx, pos: Pos, name: &str) {
    let hint = did_you_mean(name, MASK_NAMES).map(|s| format!("did you mean `{s}`?"));
    let d = cx.err(pos, format!("unknown mask `{name}`"));
    d.expected = Some(format!("one of: {}", MASK_NAMES.join(", ")));
    d.hint = hint;
}

fn compile_mask(cx: &mut Ctx, node: &Node) -> Option<Mask> {
    match &node.value {
        Value::Str(name) => match name.as_str() {
            "redact" => Some(Mask::Redact),
            "nullify" => Some(Mask::Nullify),
            "email" => Some(Mask::Email),
            "hash" => {
                cx.uses_hash.get_or_insert(node.pos);
                Some(Mask::Hash { length: 16 })
            }
            "partial" | "generalize" | "round" | "constant" => {
                let example = match name.as_str() {
                    "partial" => "{ partial: { keep_last: 4 } }",
                    "generalize" => "{ generalize: year }",
                    "round" => "{ round: 1000 }",
                    _ => "{ constant: \"n/a\" }",
                };
                cx.err(node.pos, format!("mask `{name}` needs options")).hint =
                    Some(format!("write `mask: {example}`"));
                None
            }
            other => {
                unknown_mask(cx, node.pos, other);
                None
            }
        },
        Value::Map(entries) => {
            let [(key, opts)] = entries.as_slice() else {
                cx.err(node.pos, "a mask mapping must have exactly one key, the mask's name").hint =
                    Some("for example `mask: { partial: { keep_last: 4 } }`".to_owned());
                return None;
            };
            match key.name.as_str() {
                "partial" => {
                    let fields = cx.map(opts, "`partial` options")?;
                    let (mut keep_first, mut keep_last, mut fill) = (0, 0, '*');
                    for (k, v) in fields {
                        match k.name.as_str() {
                            "keep_first" | "keep_last" => match v.value {
                                Value::Int(n) if (0..=1000).contains(&n) => {
                                    let n = usize::try_from(n).unwrap_or(0);
                                    if k.name == "keep_first" { keep_first = n } else { keep_last = n }
                                }
                                _ => {
                                    cx.err(v.pos, format!("`{}` must be a whole number from 0 to 1000", k.name))
                                        .expected = None;
                                }
                            },
                            "fill" => match v.as_str().map(|s| s.chars().collect::<Vec<_>>()) {
                                Some(c) if c.len() == 1 => fill = c[0],
                                _ => {
                                    cx.err(v.pos, "`fill` must be a single character").expected =
                                        Some("e.g. `fill: \"*\"`".to_owned());
                                }
                            },
                            _ => cx.unknown_key(k, PARTIAL_KEYS, "`partial` options"),
                        }
                    }
                    Some(Mask::Partial { keep_first, keep_last, fill })
                }
                "hash" => {
                    cx.uses_hash.get_or_insert(node.pos);
                    let mut length = 16;
                    if !matches!(opts.value, Value::Null) {
                        for (k, v) in cx.map(opts, "`hash` options")? {
                            match (k.name.as_str(), &v.value) {
                                ("length", Value::Int(n)) if (1..=64).contains(n) => {
                                    length = usize::try_from(*n).unwrap_or(16);
                                }
                                ("length", _) => {
                                    cx.err(v.pos, "`length` must be a whole number from 1 to 64");
                                }
                                _ => cx.unknown_key(k, HASH_KEYS, "`hash` options"),
                            }
                        }
                    }
                    Some(Mask::Hash { length })
                }
                "generalize" => match opts.as_str() {
                    Some("year") => Some(Mask::Generalize(Granularity::Year)),
                    Some("month") => Some(Mask::Generalize(Granularity::Month)),
                    _ => {
                        cx.err(opts.pos, "invalid `generalize`").expected = Some("`year` or `month`".to_owned());
                        None
                    }
                },
                "round" => {
                    let step = match &opts.value {
                        Value::Int(n) if *n > 0 => Decimal::parse(&n.to_string()),
                        Value::Float(f) if *f > 0.0 && f.is_finite() => Decimal::parse(&format!("{f}")),
                        Value::Str(s) => Decimal::parse(s).filter(|d| d.mantissa > 0),
                        _ => None,
                    };
                    if step.is_none() {
                        cx.err(opts.pos, "`round` needs a positive number").expected =
                            Some("e.g. `{ round: 1000 }`".to_owned());
                    }
                    step.map(Mask::Round)
                }
                "constant" => match &opts.value {
                    Value::Str(s) => Some(Mask::Constant(s.clone())),
                    Value::Int(n) => Some(Mask::Constant(n.to_string())),
                    Value::Float(f) => Some(Mask::Constant(f.to_string())),
                    Value::Bool(b) => Some(Mask::Constant(if *b { "t" } else { "f" }.to_owned())),
                    _ => {
                        cx.err(opts.pos, "`constant` needs a value").expected =
                            Some("e.g. `{ constant: \"n/a\" }`".to_owned());
                        None
                    }
                },
                "redact" | "nullify" | "email" => {
                    let name = key.name.clone();
                    cx.err(key.pos, format!("mask `{name}` takes no options")).hint =
                        Some(format!("write `mask: {name}`"));
                    None
                }
                other => {
                    unknown_mask(cx, key.pos, other);
                    None
                }
            }
        }
        other => {
            let found = other.kind();
            cx.err(node.pos, format!("a mask must be a name or a mapping, found {found}")).expected =
                Some(format!("one of: {}", MASK_NAMES.join(", ")));
            None
        }
    }
}

fn compile_selects(cx: &mut Ctx, node: &Node) -> Vec<SelectRule> {
    let mut out = Vec::new();
    let mut names_seen: HashMap<String, Pos> = HashMap::new();
    let Some(items) = cx.seq(node, "`selects`") else { return out };
    for item in items {
        let Some(fields) = cx.map(item, "a `selects` entry") else { continue };
        let mut name = None;
        let mut roles = None;
        let mut tables: Vec<TableName> = Vec::new();
        let mut deny = Vec::new();
        let mut max_rows = None;
        let mut mode = Mode::Enforce;
        for (k, v) in fields {
            match k.name.as_str() {
                "name" => name = cx.string(v, "`name`").map(str::to_owned),
                "roles" => roles = Some(cx.roles(v, "`roles`")),
                "tables" => {
                    let Some(list) = cx.seq(v, "`tables`") else { continue };
                    for t in list {
                        let Some(s) = cx.string(t, "a table name") else { continue };
                        match names::parse_table(s) {
                            Ok(t) => tables.push(t),
                            Err(e) => {
                                cx.err(t.pos, format!("invalid table name {s:?}: {e}")).expected =
                                    Some("`schema.table`, e.g. `public.customers`".to_owned());
                            }
                        }
                    }
                }
                "deny" => {
                    let Some(list) = cx.seq(v, "`deny`") else { continue };
                    for d in list {
                        match d.as_str() {
                            Some("select_star") => deny.push(Deny::SelectStar),
                            Some("unfiltered") => deny.push(Deny::Unfiltered),
                            other => {
                                let hint = other.and_then(|o| did_you_mean(o, &["select_star", "unfiltered"]));
                                let diag = cx.err(
                                    d.pos,
                                    format!(
                                        "unknown `deny` check {}",
                                        other.map_or("(not a string)".to_owned(), |o| format!("`{o}`"))
                                    ),
                                );
                                diag.expected = Some("`select_star` or `unfiltered`".to_owned());
                                diag.hint = hint.map(|h| format!("did you mean `{h}`?"));
                            }
                        }
                    }
                }
                "max_rows" => match v.value {
                    Value::Int(n) if n > 0 => max_rows = u64::try_from(n).ok(),
                    _ => {
                        cx.err(v.pos, "`max_rows` must be a positive whole number");
                    }
                },
                "mode" => mode = compile_mode(cx, v).unwrap_or_default(),
                _ => cx.unknown_key(k, SELECT_KEYS, "a `selects` entry"),
            }
        }
        let Some(name) = name else {
            cx.err(item.pos, "a `selects` entry needs a `name`").hint =
                Some("the name appears in block messages and the audit log".to_owned());
            continue;
        };
        if let Some(first) = names_seen.insert(name.clone(), item.pos) {
            cx.err(item.pos, format!("two `selects` entries are named `{name}` (first at line {})", first.line));
        }
        if tables.is_empty() && !fields.iter().any(|(k, _)| k.name == "tables") {
            cx.err(item.pos, format!("`selects` entry `{name}` names no `tables`"));
        }
        if deny.is_empty() && max_rows.is_none() {
            cx.err(item.pos, format!("`selects` entry `{name}` does nothing")).hint =
                Some("add `deny: [select_star, unfiltered]` and/or `max_rows: N`".to_owned());
        }
        deny.sort();
        deny.dedup();
        out.push(SelectRule { name, roles, tables, deny, max_rows, mode, pos: item.pos });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Identity;

    pub(crate) const SPEC_EXAMPLE: &str = include_str!("../testdata/valid/spec-example.yaml");

    fn opts() -> CompileOptions {
        CompileOptions { hash_key: Some(b"test-key".to_vec()) }
    }

    #[test]
    fn accepts_the_spec_example_unchanged() {
        let p = compile(SPEC_EXAMPLE, &opts()).unwrap();
        assert_eq!(p.columns().len(), 7);
        assert_eq!(p.selects()[0].max_rows, Some(1000));
        let ssn = ColumnName::new("public", "customers", "ssn");
        let email = ColumnName::new("public", "customers", "email");
        let analyst = Identity::new(["analyst"]);
        assert_eq!(p.column_mask(&ssn, &analyst), Some(&Mask::Partial { keep_first: 0, keep_last: 4, fill: '*' }));
        assert_eq!(p.column_mask(&ssn, &Identity::new(["app", "billing_admin"])), None);
        assert_eq!(p.column_mask(&email, &Identity::new(["support"])), None);
        // by_role wins over unmasked_for, first match first.
        assert_eq!(
            p.column_mask(&email, &Identity::new(["support", "support_lead"])),
            Some(&Mask::Hash { length: 16 })
        );
        assert_eq!(p.column_mask(&ssn, &Identity::new(["dba"])), None);
    }

    #[test]
    fn hash_without_key_is_refused() {
        let e = compile(SPEC_EXAMPLE, &CompileOptions::default()).unwrap_err();
        assert!(e.iter().any(|d| d.message.contains("PGVEIL_HASH_KEY")), "{e:?}");
    }

    #[test]
    fn reports_every_problem() {
        let src = "version: 1\ncolums: {}\ncolumns:\n  public.t.a:\n    mask: hsah\n  public.t:\n    mask: redact\n  public.t.b:\n    mask: {round: -1}\n";
        let e = compile(src, &opts()).unwrap_err();
        assert_eq!(e.len(), 4, "{e:#?}");
    }
}

#[cfg(test)]
mod corpus {
    use super::*;

    /// Every broken file in `testdata/invalid` explains itself (snapshots in `snapshots/`).
    #[test]
    fn invalid_rule_files_explain_themselves() {
        insta::glob!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata"), "invalid/*.yaml", |path| {
            let src = std::fs::read_to_string(path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let opts = if name.starts_with("hash-without-key") {
                CompileOptions::default()
            } else {
                CompileOptions { hash_key: Some(b"k".to_vec()) }
            };
            let diags = compile(&src, &opts).expect_err("an invalid file compiled");
            insta::assert_snapshot!(crate::diagnostic::render_all(&diags, &name, &src));
        });
    }

    /// Every valid example compiles, and also deserializes into the schema types.
    #[test]
    fn valid_files_compile_and_match_the_schema_types() {
        insta::glob!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata"), "valid/*.yaml", |path| {
            let src = std::fs::read_to_string(path).unwrap();
            compile(&src, &CompileOptions { hash_key: Some(b"k".to_vec()) }).unwrap();
            serde_saphyr::from_str::<crate::file::RulesFile>(&src).unwrap();
        });
    }

    #[test]
    fn committed_json_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/rules.schema.json");
        let current = crate::file::schema_json();
        if std::env::var_os("PGVEIL_BLESS").is_some() {
            std::fs::write(path, &current).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(committed == current, "rules/rules.schema.json is stale: run `PGVEIL_BLESS=1 cargo test -p rules`");
    }
}
