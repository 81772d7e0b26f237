//! The thread pool for batch work, safe across `fork()`. PyTorch DataLoader workers fork the
//! process; a rayon pool inherited by a child has no threads behind it and would hang. The pool
//! remembers the process that built it, and a forked child builds its own on first use.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

/// Number of worker threads: `MASKTRAIN_NUM_THREADS` when set to a positive integer, else
/// one per available core.
pub fn thread_count() -> usize {
    std::env::var("MASKTRAIN_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// The pool of this process, built on first use.
pub fn pool() -> Arc<ThreadPool> {
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((owner, pool)) = slot.as_ref() {
        if *owner == pid {
            return Arc::clone(pool);
        }
        // Inherited through fork: its threads do not exist here. Dropping it would try to
        // signal them, so it is leaked deliberately (once per forked child).
        if let Some((_, inherited)) = slot.take() {
            std::mem::forget(inherited);
        }
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(thread_count())
            .thread_name(|i| format!("masktrain-{i}"))
            .build()
            .expect("building the masktrain thread pool"),
    );
    *slot = Some((pid, Arc::clone(&pool)));
    pool
}
