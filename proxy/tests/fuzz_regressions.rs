//! Every input kept in `fuzz/regressions/<target>/` (inputs that once crashed a fuzz target,
//! and hand-picked edge cases) runs through the same entry point the fuzzer calls.

use std::path::Path;

#[test]
fn fuzz_regressions_still_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut ran = 0;
    for (name, target) in proxy::fuzz::TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            // A panic names the input; `cargo fuzz run <target> <file>` reproduces it.
            eprintln!("{name}: {}", path.display());
            target(&data);
            ran += 1;
        }
    }
    assert!(ran > 0, "no regression inputs found under {}", root.display());
}
