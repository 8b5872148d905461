//! The layering the code map promises: nothing below `session` imports from it. Only the
//! crate root (which declares it), the accept loop that runs sessions, and the fuzz entry
//! points may name it.

use std::path::Path;

/// Modules above `session` (they start or drive sessions).
const ABOVE: &[&str] = &["lib.rs", "server.rs", "fuzz.rs", "main.rs"];

#[test]
fn no_module_below_session_imports_from_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    let mut offenders = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if rel != "session" {
                    stack.push(path);
                }
                continue;
            }
            if rel == "session.rs" || ABOVE.contains(&rel.as_str()) || !rel.ends_with(".rs") {
                continue;
            }
            checked += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if code.contains("crate::session") || code.contains("super::session") {
                    offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(checked >= 20, "the source tree was found ({checked} files)");
    assert!(offenders.is_empty(), "lower layers import from session:\n{}", offenders.join("\n"));
}
