//! Ctrl-C for the long jobs: the first interrupt sets a stop flag the job checks at its next safe point
//! (`first` says what that is), the second exits at once (130). Either way a rerun of the same command
//! resumes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

/// Installs the handler and returns the flag the job polls.
pub fn stop_flag(first: &'static str) -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: stopping now; rerun the same command to resume");
            std::process::exit(130);
        }
        eprintln!("interrupt: {first}");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}
