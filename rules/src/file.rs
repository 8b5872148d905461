//! The serde mirror of the rules file: the shape DBAs write, used to generate the committed
//! JSON Schema (`rules/rules.schema.json`) for editors. Validation with positions and every
//! problem at once is `compile`; a test keeps the two in agreement on every valid example.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// A pgveil rules file (see spec/rules.md).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "pgveil rules file")]
pub struct RulesFile {
    /// The format version; must be 1.
    pub version: u32,
    /// Members of these roles bypass every rule: their sessions are forwarded untouched.
    #[serde(default)]
    pub exempt: Vec<String>,
    /// Protected columns, keyed `schema.table.column`.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnRule>,
    /// Minimization rules for over-broad reads.
    #[serde(default)]
    pub selects: Vec<SelectRule>,
    /// `monitor` runs every rule in monitor mode (log, do not block).
    #[serde(default)]
    pub mode: Option<Mode>,
    /// User-defined functions masked sessions may call.
    #[serde(default)]
    pub functions: Option<Functions>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Functions {
    /// `schema.function` names (their bodies run with their own rights and are not seen by
    /// the proxy: list only functions that do not read protected data).
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnRule {
    /// The mask masked sessions see.
    pub mask: Mask,
    /// Members of these roles see raw values.
    #[serde(default)]
    pub unmasked_for: Vec<String>,
    /// How the column may be used in filters: `none` (default), `equality`, `any`.
    #[serde(default)]
    pub predicates: Option<Predicates>,
    /// Per-role masks; the first role the session has wins, before `unmasked_for`.
    #[serde(default)]
    pub by_role: Vec<ByRole>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ByRole {
    pub role: String,
    pub mask: Mask,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Mask {
    /// `redact`, `nullify`, `email` or `hash`.
    Named(NamedMask),
    Partial {
        partial: PartialOptions,
    },
    Hash {
        hash: Option<HashOptions>,
    },
    Generalize {
        generalize: Granularity,
    },
    Round {
        /// Round to the nearest multiple of this positive number.
        round: f64,
    },
    Constant {
        /// A literal valid for the column's type.
        constant: serde_json::Value,
    },
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NamedMask {
    Redact,
    Nullify,
    Email,
    Hash,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartialOptions {
    #[serde(default)]
    pub keep_first: u32,
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub fill: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HashOptions {
    /// Hex characters kept (1 to 64, default 16).
    pub length: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Year,
    Month,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Predicates {
    None,
    Masked,
    Equality,
    Any,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Enforce,
    Monitor,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectRule {
    /// Shown in block messages and the audit log.
    pub name: String,
    /// Roles this applies to; omitted: every non-exempt session.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Tables (`schema.table`) whose reads this rule checks.
    pub tables: Vec<String>,
    #[serde(default)]
    pub deny: Vec<Deny>,
    /// Cut results after this many rows.
    #[serde(default)]
    pub max_rows: Option<u64>,
    #[serde(default)]
    pub mode: Option<Mode>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Deny {
    SelectStar,
    Unfiltered,
}

/// The JSON Schema of the rules file, pretty-printed.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(RulesFile);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}
