//! Stored definitions (view and function bodies) decided as statements of their own.

#[allow(clippy::wildcard_imports, reason = "a part of checks, with its imports")]
use super::*;

/// A view definition with its protected relations substituted; `None` when nothing in it is
/// protected (the view is then not protected either).
pub(crate) fn substitute_definition(sql: &str, protect: &mut Protection<'_>) -> Result<Option<String>, Block> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| block(Reason::Unsupported, e.to_string(), ""))?;
    let toks = Tokens::new(sql).ok_or_else(|| block(Reason::Unsupported, "unscannable view", ""))?;
    let mut edits = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let tree = serde_json::to_value(stmt).map_err(|e| block(Reason::Unsupported, e.to_string(), ""))?;
        let found = walk::walk(&tree);
        if found.too_deep {
            return Err(block(Reason::Unsupported, "a view definition nests too deeply", ""));
        }
        edits.extend(check(&found, protect, &toks)?.edits);
    }
    if edits.is_empty() {
        return Ok(None);
    }
    crate::sql::Rewrite::new(edits, toks.len())
        .apply(sql)
        .map(Some)
        .ok_or_else(|| block(Reason::Unsupported, "view not rewritable", ""))
}

/// The relations a definition reads; `None` when the definition cannot be read whole (does
/// not parse, nests too deeply): callers then fail closed.
pub(crate) fn definition_relations(sql: &str, protect: &mut Protection<'_>) -> Option<Vec<Arc<Relation>>> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let tree = serde_json::to_value(stmt).ok()?;
        let found = walk::walk(&tree);
        if found.too_deep {
            return None;
        }
        for r in &found.rels {
            if matches!(r.site, Site::Read | Site::Tablesample | Site::CopyTo)
                && let Some(rel) = protect.resolve(r.schema(), r.relname())
            {
                out.push(rel);
            }
        }
    }
    Some(out)
}

/// The protected relations a function body names anywhere; a body that does not parse counts
/// as reading one.
pub(super) fn definition_relations_all(sql: &str, protect: &mut Protection<'_>) -> Vec<String> {
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        return vec!["(unparsable body)".to_owned()];
    };
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let Ok(tree) = serde_json::to_value(stmt) else { return vec!["(unreadable body)".to_owned()] };
        let found = walk::walk(&tree);
        if found.too_deep {
            return vec!["(body nests too deeply)".to_owned()];
        }
        for r in &found.rels {
            if let Some(rel) = protect.resolve(r.schema(), r.relname())
                && protect.protected(&rel).is_some()
            {
                out.push(rel.name.to_string());
            }
        }
        for f in &found.funcs {
            if function(f, protect, false, None).is_err() {
                out.push(f.name.join("."));
            }
        }
    }
    out
}
