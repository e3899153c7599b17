//! Progress of long jobs, reported by the library and drawn by whoever calls it.
//!
//! The library never draws: a stage takes a `&dyn Progress` and calls [`Progress::start`] once, then
//! [`Progress::advance`] as items finish. The CLI turns that into an indicatif bar with rate and ETA on a
//! terminal, or into a periodic `info!` line when stderr is not a terminal (Slurm and Kubernetes logs).

/// Receives progress events of one job at a time.
pub trait Progress: Send + Sync {
    /// A job (`stage`, e.g. `"generate"`) with `total` items starts; `done` were already done (resume).
    fn start(&self, stage: &str, total: u64, done: u64);
    /// `n` more items are done.
    fn advance(&self, n: u64);
    /// The job ended (successfully or not).
    fn finish(&self);
}

/// Discards every event (tests, library callers that do not care).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _stage: &str, _total: u64, _done: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
}
