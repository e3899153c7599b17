//! Micro-batching for `serve`: concurrent requests share ONNX Runtime session runs.
//!
//! One thread owns the [`Detector`] (a session runs one call at a time). It waits for a job, then keeps
//! collecting jobs until `max_batch` images are waiting or `max_wait` has passed since the first, scores
//! them together (chunks of at most `max_batch` images) and hands each job its own results. Under light
//! load a request waits at most `max_wait` extra; under heavy load batches fill up and throughput rises.
//! The queue is bounded: [`Batcher::submit`] fails at once when it is full, and `serve` answers 503.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::scorer::{Detector, Prepared, Scored};

/// The results of one job, or why the session failed.
pub type JobResult = std::result::Result<Vec<Scored>, String>;

struct Job {
    images: Vec<Prepared>,
    reply: oneshot::Sender<JobResult>,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds its maximum number of jobs.
    Full,
    /// The batcher thread has stopped.
    Stopped,
}

/// Handle to the batching thread. Dropping every handle ends the thread after the jobs queued.
pub struct Batcher {
    tx: SyncSender<Job>,
}

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Jobs that may wait in the queue.
    pub max_queue: usize,
}

impl Batcher {
    /// Starts the thread that owns `detector`.
    pub fn start(
        detector: Detector,
        policy: BatchPolicy,
        metrics: Arc<Metrics>,
    ) -> (Batcher, JoinHandle<()>) {
        let (tx, rx) = mpsc::sync_channel(policy.max_queue.max(1));
        let handle = std::thread::Builder::new()
            .name("dream-ood-batcher".into())
            .spawn(move || run(detector, rx, policy, &metrics))
            .expect("invariant: the OS can start one thread");
        (Batcher { tx }, handle)
    }

    /// Queues images; the receiver yields their results in order.
    pub fn submit(
        &self,
        images: Vec<Prepared>,
    ) -> std::result::Result<oneshot::Receiver<JobResult>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { images, reply }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

fn run(mut detector: Detector, rx: Receiver<Job>, policy: BatchPolicy, metrics: &Metrics) {
    let max_batch = policy.max_batch.max(1);
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + policy.max_wait;
        let mut waiting = first.images.len();
        let mut jobs = vec![first];
        while waiting < max_batch {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(job) => {
                    waiting += job.images.len();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        // A client that gave up (timeout, closed connection) needs no work.
        jobs.retain(|j| !j.reply.is_closed());
        score_jobs(&mut detector, jobs, max_batch, metrics);
    }
    tracing::debug!("batcher: queue closed, stopping");
}

fn score_jobs(detector: &mut Detector, jobs: Vec<Job>, max_batch: usize, metrics: &Metrics) {
    let all: Vec<&Prepared> = jobs.iter().flat_map(|j| j.images.iter()).collect();
    let mut results: Vec<Scored> = Vec::with_capacity(all.len());
    for chunk in all.chunks(max_batch) {
        match detector.score(chunk) {
            Ok(r) => {
                metrics.batch(chunk.len() as u64);
                results.extend(r);
            }
            Err(e) => {
                tracing::error!("scoring a batch of {} images failed: {e}", chunk.len());
                for job in jobs {
                    let _ = job.reply.send(Err(e.to_string()));
                }
                return;
            }
        }
    }
    tracing::trace!(jobs = jobs.len(), images = all.len(), "batch scored");
    let mut results = results.into_iter();
    for job in jobs {
        let mine: Vec<Scored> = results.by_ref().take(job.images.len()).collect();
        // The receiver may have timed out meanwhile; its result is simply dropped.
        let _ = job.reply.send(Ok(mine));
    }
}
