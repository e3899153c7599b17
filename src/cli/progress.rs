//! The CLI's side of [`dream_ood::progress::Progress`]: an indicatif bar with rate and ETA on a terminal,
//! a structured `info!` line at a fixed cadence otherwise (so batch-scheduler logs stay readable).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dream_ood::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

use super::logging::BARS;

/// How often a non-terminal run logs its progress.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// Jobs shorter than this end without a closing log line.
const QUIET_BELOW: Duration = Duration::from_secs(5);

/// Progress for the terminal or for logs, chosen by whether stderr is a terminal.
pub struct TermProgress {
    state: Mutex<Option<Job>>,
    draw_bar: bool,
}

struct Job {
    stage: String,
    total: u64,
    done: u64,
    resumed_from: u64,
    started: Instant,
    last_log: Instant,
    bar: Option<ProgressBar>,
}

impl TermProgress {
    pub fn new() -> Self {
        TermProgress {
            state: Mutex::new(None),
            draw_bar: std::io::stderr().is_terminal(),
        }
    }
}

impl Job {
    fn log(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let per_sec = (self.done - self.resumed_from) as f64 / secs;
        let eta_secs = if per_sec > 0.0 {
            ((self.total.saturating_sub(self.done)) as f64 / per_sec).round() as u64
        } else {
            0
        };
        tracing::info!(stage = %self.stage, done = self.done, total = self.total, per_sec = format!("{per_sec:.2}"), eta_secs, "progress");
    }
}

impl Progress for TermProgress {
    fn start(&self, stage: &str, total: u64, done: u64) {
        let bar = self.draw_bar.then(|| {
            let bar = BARS.add(ProgressBar::new(total).with_position(done));
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
                    .expect("invariant: the template is valid")
                    .progress_chars("=> "),
            );
            bar.set_prefix(stage.to_owned());
            bar.reset_eta();
            bar
        });
        let now = Instant::now();
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(Job {
            stage: stage.to_owned(),
            total,
            done,
            resumed_from: done,
            started: now,
            last_log: now,
            bar,
        });
    }

    fn advance(&self, n: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = state.as_mut() else { return };
        job.done = (job.done + n).min(job.total);
        match &job.bar {
            Some(bar) => bar.set_position(job.done),
            None if job.last_log.elapsed() >= LOG_EVERY => {
                job.last_log = Instant::now();
                job.log();
            }
            None => {}
        }
    }

    fn finish(&self) {
        let job = self.state.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(job) = job {
            match &job.bar {
                Some(bar) => {
                    bar.finish_and_clear();
                    BARS.remove(bar);
                }
                // A short job needs no closing line in the logs; a long one gets its totals.
                None if job.started.elapsed() >= QUIET_BELOW => job.log(),
                None => {}
            }
        }
    }
}
