//! The `selects` minimization rules: `select_star`, `unfiltered` and `max_rows`, for every
//! session they apply to (masked or not), on the tables a statement reads under any name.

use std::collections::BTreeSet;

use crate::names::TableName;
use crate::policy::{Deny, Mode, SessionPolicy};

use super::protect::Protection;
use super::walk::{Found, Site};
use super::{Block, RowLimit, StatementPlan};

/// One `deny:` check: what it denies, the tables it found, why (given the table), the hint.
type Check<'a> = (Deny, &'a BTreeSet<TableName>, fn(&TableName) -> String, &'static str);

pub(crate) fn apply(
    policy: &SessionPolicy,
    found: &Found<'_>,
    protect: &mut Protection<'_>,
    plan: &mut StatementPlan,
    flagged: &mut Vec<Block>,
) -> Result<(), Block> {
    if policy.selects.is_empty() {
        return Ok(());
    }
    let lineage = |i: usize, protect: &mut Protection<'_>| -> Vec<TableName> {
        let Some(r) = found.rels.get(i) else { return Vec::new() };
        if r.cte {
            return Vec::new();
        }
        protect.resolve(r.schema(), r.relname()).map(|rel| protect.lineage(&rel).to_vec()).unwrap_or_default()
    };
    let mut read = BTreeSet::new();
    let mut star = BTreeSet::new();
    let mut unfiltered = BTreeSet::new();
    for (i, r) in found.rels.iter().enumerate() {
        if matches!(r.site, Site::Read | Site::Tablesample | Site::CopyTo) {
            let l = lineage(i, protect);
            if r.site == Site::CopyTo {
                unfiltered.extend(l.iter().cloned());
                if r.copy_columns.is_empty() {
                    star.extend(l.iter().cloned());
                }
            }
            read.extend(l);
        }
    }
    for s in &found.selects {
        for alias in &s.stars {
            for &i in &s.from_rels {
                let Some(r) = found.rels.get(i) else { continue };
                if alias.as_deref().is_none_or(|a| a == r.alias().unwrap_or(r.relname())) {
                    star.extend(lineage(i, protect));
                }
            }
        }
        let top = found.scopes.get(s.scope).and_then(|sc| sc.parent) == Some(0);
        if top && !s.has_where && !s.limited && !s.aggregate_only {
            let mut pending: Vec<&super::walk::SelectFacts> = vec![s];
            while let Some(q) = pending.pop() {
                for &i in &q.from_rels {
                    unfiltered.extend(lineage(i, protect));
                }
                for sub in &q.from_subselects {
                    if let Some(inner) = found.selects.iter().find(|x| x.scope == *sub)
                        && !inner.has_where
                        && !inner.limited
                    {
                        pending.push(inner);
                    }
                }
            }
        }
    }
    for rule in &policy.selects {
        let hit = |set: &BTreeSet<TableName>| rule.tables.iter().find(|t| set.contains(*t)).cloned();
        let checks: [Check<'_>; 2] = [
            (Deny::SelectStar, &star, |t| format!("SELECT * over {t} is not allowed"), "list the columns you need"),
            (
                Deny::Unfiltered,
                &unfiltered,
                |t| format!("reading {t} without a WHERE clause or a LIMIT is not allowed"),
                "add a WHERE clause that restricts the rows, or a LIMIT",
            ),
        ];
        let mut findings = Vec::new();
        for (deny, tables, why, hint) in checks {
            if let Some(t) = rule.deny.contains(&deny).then(|| hit(tables)).flatten() {
                findings.push(Block {
                    tables: vec![t.to_string()],
                    check: Some(deny.as_str()),
                    rule: rule.name.clone(),
                    ..super::block(super::Reason::Unsupported, why(&t), hint)
                });
            }
        }
        for f in findings {
            match rule.mode {
                Mode::Enforce => return Err(f),
                Mode::Monitor => flagged.push(f),
            }
        }
        if let (Some(rows), Some(t)) = (rule.max_rows, hit(&read))
            && plan.max_rows.as_ref().is_none_or(|l| rows < l.rows)
        {
            plan.max_rows =
                Some(RowLimit { rule: rule.name.clone(), rows, mode: rule.mode, tables: vec![t.to_string()] });
        }
    }
    Ok(())
}
