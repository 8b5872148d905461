//! The rules file in the running proxy: loading, atomic swap, and hot reload on file change
//! (the directory is watched, since editors replace files) and on SIGHUP. A file that fails
//! validation leaves the previous policy in force; it is logged, counted and audited.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use notify::Watcher;

use crate::Shared;
use crate::audit::{Event, EventKind};

/// Reads and compiles a rules file; the error is the DBA-facing rendering of every problem.
pub fn load(path: &Path, opts: &rules::CompileOptions) -> Result<rules::Policy, String> {
    let src = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    rules::compile(&src, opts).map_err(|diags| rules::diagnostic::render_all(&diags, &path.display().to_string(), &src))
}

/// The compile options from the environment (the hash key is a secret, never in the file).
pub fn options_from_env() -> rules::CompileOptions {
    rules::CompileOptions { hash_key: std::env::var("PGVEIL_HASH_KEY").ok().map(String::into_bytes) }
}

/// Reloads the rules file now. Returns whether the new policy is in force.
pub fn reload(shared: &Shared) -> bool {
    let Some(path) = shared.config.rules.as_deref() else { return false };
    match load(path, &shared.rules_options) {
        Ok(policy) => {
            shared.policy.store(Some(Arc::new(policy)));
            shared.policy_generation.fetch_add(1, Ordering::Relaxed);
            shared.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
            shared.audit.log(Event::new(EventKind::RulesReloaded).reason(&format!("{} loaded", path.display())));
            tracing::info!(path = %path.display(), "rules reloaded");
            true
        }
        Err(rendered) => {
            shared.metrics.reloads_rejected.fetch_add(1, Ordering::Relaxed);
            let first = rendered.lines().next().unwrap_or_default().to_owned();
            shared.audit.log(Event::new(EventKind::RulesRejected).reason(&first));
            tracing::error!(path = %path.display(), errors = %rendered, "rules file rejected; the previous rules stay in force");
            false
        }
    }
}

/// Watches the rules file's directory and SIGHUP notifications until the proxy stops.
pub async fn watch(shared: Arc<Shared>) {
    let Some(path) = shared.config.rules.clone() else { return };
    let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let file_name = path.file_name().map(std::ffi::OsStr::to_os_string);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && ev.paths.iter().any(|p| p.file_name().map(std::ffi::OsStr::to_os_string) == file_name)
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the rules file; reload with SIGHUP");
            return hup_only(shared).await;
        }
    };
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::error!(error = %e, dir = %dir.display(), "cannot watch the rules directory; reload with SIGHUP");
        return hup_only(shared).await;
    }
    loop {
        tokio::select! {
            () = shared.stop_accepting.cancelled() => return,
            () = shared.reload.notified() => { reload(&shared); }
            got = rx.recv() => {
                if got.is_none() { return; }
                // Debounce: an editor's save is several events; read once they settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                if path.exists() {
                    reload(&shared);
                } else {
                    // Deleted (or moved away mid-deploy): nothing to compile, so the rules in
                    // force stay, and security hears of it like any rejected file.
                    shared.metrics.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                    shared.audit.log(Event::new(EventKind::RulesRejected).reason(&format!(
                        "{} is gone; the previous rules stay in force",
                        path.display()
                    )));
                    tracing::error!(path = %path.display(), "rules file is gone; the previous rules stay in force");
                }
            }
        }
    }
}

async fn hup_only(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = shared.stop_accepting.cancelled() => return,
            () = shared.reload.notified() => { reload(&shared); }
        }
    }
}
