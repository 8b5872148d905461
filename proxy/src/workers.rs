//! Thread-per-core session runtimes: `limits.workers` threads, each running its own
//! single-threaded tokio runtime with its own I/O driver. The accept loop hands each accepted
//! socket to one of them (round robin); from then on the session's client socket, its server
//! socket and every task it spawns are polled by that one thread, so relaying a message never
//! wakes another thread (issue 18: cross-thread wake-ups were the pump's extra cost over
//! PgBouncer's single event loop).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The session runtimes. Dropping it (or [`Workers::stop`]) ends the threads after their
/// runtimes' tasks are dropped.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    next: AtomicUsize,
}

impl Workers {
    /// Starts the session threads `limits.workers` asks for (none for `shared`).
    pub fn start(setting: crate::config::Workers) -> std::io::Result<Option<Workers>> {
        let n = match setting {
            crate::config::Workers::Shared => return Ok(None),
            crate::config::Workers::Auto => cores(),
            crate::config::Workers::Threads(n) => n,
        };
        Self::threads(n).map(Some)
    }

    /// Starts `n` session threads.
    pub fn threads(n: usize) -> std::io::Result<Workers> {
        let n = n.max(1);
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new().name(format!("pgveil-session-{i}")).spawn(move || {
                runtime.block_on(stop.cancelled());
                // Remaining tasks are dropped here, on their own thread.
                drop(runtime);
            })?;
            threads.push(thread);
        }
        Ok(Workers { handles, threads, stop, next: AtomicUsize::new(0) })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `task` on the next session thread.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed).checked_rem(self.handles.len()).unwrap_or(0);
        if let Some(h) = self.handles.get(i) {
            drop(h.spawn(task));
        }
    }

    /// Ends the session threads and waits for them (call after the sessions are drained).
    pub fn stop(mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_session_threads_in_turn() {
        let workers = Workers::threads(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            workers.spawn(async move {
                tx.send(std::thread::current().name().unwrap_or("").to_owned()).unwrap();
            });
        }
        let mut names: Vec<String> = (0..4).map(|_| rx.recv().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["pgveil-session-0", "pgveil-session-0", "pgveil-session-1", "pgveil-session-1"]);
        workers.stop();
    }
}
