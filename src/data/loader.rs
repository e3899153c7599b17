//! The batch loader: decoding and augmentation on a local rayon pool, a bounded queue of ready batches in
//! front of the trainer, seeded shuffling per epoch, and the last partial batch kept (as the official
//! `DataLoader(shuffle=True)` with `drop_last=False`, SPEC §1.4).
//!
//! Determinism: the epoch's order comes from a generator seeded by `(seed, epoch)`, and every sample's
//! augmentation from a generator seeded by `(seed, epoch, index)`, so batches do not depend on the number of
//! threads or on which thread decoded what. One producer thread assembles batches in order, each batch
//! decoded in parallel, and keeps up to `prefetch` finished batches ahead of the consumer.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use tch::Tensor;

use super::transforms::{Chw, Pipeline};
use super::{Dataset, OnError, Skipped};
use crate::{Error, Result};

/// How batches are made.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch; the last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Reshuffle every epoch (training) or keep dataset order (evaluation).
    pub shuffle: bool,
    /// Seed for the order and the augmentations.
    pub seed: u64,
    /// Decoding threads; `1` decodes on the producer thread's pool of one. Results do not depend on it.
    pub threads: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch: usize,
    /// A sample that cannot be decoded: leave it out of its batch (and count it), or end the epoch.
    pub on_error: OnError,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            shuffle: true,
            seed: 0,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: 4,
            on_error: OnError::Skip,
        }
    }
}

/// One batch.
#[derive(Debug)]
pub struct Batch {
    /// `[B, C, H, W]` float32.
    pub images: Tensor,
    /// `[B]` int64 class indices.
    pub labels: Tensor,
    /// Dataset indices of the rows, in row order.
    pub indices: Vec<usize>,
}

/// What an epoch left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochSummary {
    /// Samples delivered in batches.
    pub loaded: usize,
    /// Samples left out under [`OnError::Skip`].
    pub skipped: Vec<Skipped>,
}

/// Batches from a dataset through a pipeline.
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    cfg: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
    /// Indices already warned about, so a bad file is logged once per loader, not once per epoch.
    warned: Arc<Mutex<HashSet<usize>>>,
}

impl Loader {
    /// Checks the settings and builds the decoding pool.
    pub fn new(dataset: Arc<dyn Dataset>, pipeline: Pipeline, cfg: LoaderConfig) -> Result<Self> {
        let bad = |key: &str, msg: &str| {
            Err(Error::InvalidValue {
                key: format!("loader.{key}"),
                msg: msg.into(),
            })
        };
        if cfg.batch_size == 0 {
            return bad("batch_size", "0; must be at least 1");
        }
        if cfg.threads == 0 {
            return bad("threads", "0; must be at least 1");
        }
        if cfg.prefetch == 0 {
            return bad("prefetch", "0; must be at least 1");
        }
        pipeline.validate()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("data-{i}"))
            .build()
            .map_err(|e| Error::InvalidValue {
                key: "loader.threads".into(),
                msg: format!("cannot start {} decoding threads: {e}", cfg.threads),
            })?;
        Ok(Self {
            dataset,
            pipeline: Arc::new(pipeline),
            cfg,
            pool: Arc::new(pool),
            warned: Arc::default(),
        })
    }

    /// Batches per epoch, counting the last partial one.
    pub fn num_batches(&self) -> usize {
        self.dataset.len().div_ceil(self.cfg.batch_size)
    }

    /// The dataset indices of epoch `epoch` in the order they are served.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
                mix(self.cfg.seed, epoch),
                SHUFFLE,
            )));
        }
        order
    }

    /// Starts epoch `epoch`: batches are decoded ahead while the returned iterator is read. Dropping it
    /// early stops the work. Fails only if the producer thread cannot be started.
    pub fn epoch(&self, epoch: u64) -> Result<Epoch> {
        let order = self.order(epoch);
        let (tx, rx) = sync_channel(self.cfg.prefetch);
        let summary = Arc::new(Mutex::new(EpochSummary::default()));
        let job = Job {
            dataset: Arc::clone(&self.dataset),
            pipeline: Arc::clone(&self.pipeline),
            pool: Arc::clone(&self.pool),
            warned: Arc::clone(&self.warned),
            summary: Arc::clone(&summary),
            cfg: self.cfg.clone(),
            epoch,
        };
        let handle = std::thread::Builder::new()
            .name("data-batches".into())
            .spawn(move || job.run(order, tx))
            .map_err(|e| Error::InvalidValue {
                key: "loader".into(),
                msg: format!("cannot start the batch thread: {e}"),
            })?;
        Ok(Epoch {
            rx: Some(rx),
            handle: Some(handle),
            summary,
        })
    }
}

/// Domain tag of the shuffling generator, so it never shares a seed with a sample's generator.
const SHUFFLE: u64 = 0x0053_4855_4646_4c45;

/// SplitMix64's finaliser over `a` and `b`: a well-mixed 64-bit seed from two inputs.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of sample `index`'s augmentation in `epoch`.
pub fn sample_seed(seed: u64, epoch: u64, index: usize) -> u64 {
    mix(mix(seed, epoch), index as u64)
}

/// The producer side of one epoch.
struct Job {
    dataset: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    pool: Arc<rayon::ThreadPool>,
    warned: Arc<Mutex<HashSet<usize>>>,
    summary: Arc<Mutex<EpochSummary>>,
    cfg: LoaderConfig,
    epoch: u64,
}

/// A decoded sample, or why the dataset could not give it (pipeline errors are not skippable: they
/// are settings, not files).
enum Loaded {
    Ok(Chw, i64),
    Unreadable(Error),
}

impl Job {
    fn run(self, order: Vec<usize>, tx: SyncSender<Result<Batch>>) {
        for chunk in order.chunks(self.cfg.batch_size) {
            let result = self.make_batch(chunk);
            let stop = result.is_err();
            match result {
                Ok(None) => continue,
                Ok(Some(batch)) => {
                    if tx.send(Ok(batch)).is_err() {
                        return; // consumer gone
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
            if stop {
                return;
            }
        }
    }

    fn load(&self, index: usize) -> Result<Loaded> {
        let img = match self.dataset.get(index) {
            Ok(img) => img,
            Err(e) => return Ok(Loaded::Unreadable(e)),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(self.cfg.seed, self.epoch, index));
        let chw = self
            .pipeline
            .apply(img, &mut rng)
            .map_err(|e| Error::Data {
                path: self.dataset.describe(index).into(),
                line: None,
                msg: format!("transform failed: {e}"),
            })?;
        Ok(Loaded::Ok(chw, self.dataset.label(index)))
    }

    /// Decodes one batch in parallel; `None` when every sample in it was skipped.
    fn make_batch(&self, chunk: &[usize]) -> Result<Option<Batch>> {
        let loaded: Vec<Result<Loaded>> = self
            .pool
            .install(|| chunk.par_iter().map(|&i| self.load(i)).collect());
        let mut rows: Vec<(usize, Chw, i64)> = Vec::with_capacity(chunk.len());
        for (&index, item) in chunk.iter().zip(loaded) {
            match item? {
                Loaded::Ok(chw, label) => rows.push((index, chw, label)),
                Loaded::Unreadable(e) => match self.cfg.on_error {
                    OnError::Fail => return Err(e),
                    OnError::Skip => self.skip(index, e),
                },
            }
        }
        self.summary.lock().map(|mut s| s.loaded += rows.len()).ok();
        let Some((first_index, first, _)) = rows.first() else {
            return Ok(None);
        };
        let (c, h, w) = (first.channels, first.height, first.width);
        let mut data = Vec::with_capacity(rows.len() * c * h * w);
        for (index, chw, _) in &rows {
            if (chw.channels, chw.height, chw.width) != (c, h, w) {
                // Name both images: the user has to find out which of them is the odd one.
                return Err(Error::Shape {
                    what: format!(
                        "{} after the transforms (all images in a batch must have one size, that of its \
                         first image {}; a Resize or CenterCrop step makes them so)",
                        self.dataset.describe(*index),
                        self.dataset.describe(*first_index)
                    ),
                    expected: format!("{c}×{h}×{w}"),
                    got: format!("{}×{}×{}", chw.channels, chw.height, chw.width),
                });
            }
            data.extend_from_slice(&chw.data);
        }
        let b = rows.len() as i64;
        let images = Tensor::f_from_slice(&data)
            .and_then(|t| t.f_view([b, c as i64, h as i64, w as i64])) // [B, C, H, W]
            .map_err(|e| Error::torch("batch images", e))?;
        let labels: Vec<i64> = rows.iter().map(|r| r.2).collect();
        let labels = Tensor::f_from_slice(&labels).map_err(|e| Error::torch("batch labels", e))?; // [B]
        Ok(Some(Batch {
            images,
            labels,
            indices: rows.iter().map(|r| r.0).collect(),
        }))
    }

    fn skip(&self, index: usize, e: Error) {
        let what = self.dataset.describe(index);
        let first = self
            .warned
            .lock()
            .map(|mut w| w.insert(index))
            .unwrap_or(true);
        if first {
            tracing::warn!("skipping {what}: {e}");
        }
        if let Ok(mut s) = self.summary.lock() {
            s.skipped.push(Skipped {
                what,
                reason: e.to_string(),
            });
        }
    }
}

/// The batches of one epoch, in order. An `Err` item ends the epoch.
pub struct Epoch {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    summary: Arc<Mutex<EpochSummary>>,
}

impl Epoch {
    /// Samples loaded and skipped so far (all of them once the iterator is exhausted).
    pub fn summary(&self) -> EpochSummary {
        self.summary.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.rx.as_ref()?.recv().ok();
        if item.is_none() {
            // Producer finished: join it so the summary is final, and turn a panic in it (a libtorch
            // abort, a bug) into an error rather than a silently short epoch.
            self.rx = None;
            if let Some(Err(_)) = self.handle.take().map(JoinHandle::join) {
                return Some(Err(Error::Check {
                    what: "data loader".into(),
                    msg: "the batch thread panicked; the epoch is incomplete".into(),
                }));
            }
        }
        item
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail, so it stops after the batch in hand.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::RawImage;
    use crate::data::transforms::Transform;

    /// `n` 6×5 gray images whose pixels encode their index; `bad` indices fail to decode and `odd`
    /// ones come out 5×5.
    struct Toy {
        n: usize,
        bad: Vec<usize>,
        odd: Vec<usize>,
    }

    impl Dataset for Toy {
        fn len(&self) -> usize {
            self.n
        }
        fn label(&self, index: usize) -> i64 {
            (index % 3) as i64
        }
        fn get(&self, index: usize) -> Result<RawImage> {
            if self.bad.contains(&index) {
                return Err(Error::Data {
                    path: format!("toy/{index}.png").into(),
                    line: None,
                    msg: "corrupt".into(),
                });
            }
            let w = if self.odd.contains(&index) { 5 } else { 6 };
            RawImage::new(
                w,
                5,
                1,
                (0..w * 5).map(|p| (index * 10 + p) as u8).collect(),
            )
        }
        fn describe(&self, index: usize) -> String {
            format!("toy/{index}.png")
        }
    }

    fn toy(n: usize) -> Arc<dyn Dataset> {
        Arc::new(Toy {
            n,
            bad: vec![],
            odd: vec![],
        })
    }

    fn cfg(batch_size: usize, threads: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            shuffle: true,
            seed: 11,
            threads,
            prefetch: 2,
            on_error: OnError::Skip,
        }
    }

    fn augmenting() -> Pipeline {
        Pipeline {
            channels: 3,
            transforms: vec![
                Transform::RandomCrop {
                    height: 4,
                    width: 4,
                    padding: 2,
                },
                Transform::RandomHorizontalFlip { p: 0.5 },
            ],
            normalize: None,
        }
    }

    fn collect(loader: &Loader, epoch: u64) -> Vec<Batch> {
        loader.epoch(epoch).unwrap().map(|b| b.unwrap()).collect()
    }

    #[test]
    fn every_sample_once_and_the_last_partial_batch_kept() {
        let loader = Loader::new(toy(10), augmenting(), cfg(4, 2)).unwrap();
        assert_eq!(loader.num_batches(), 3);
        let batches = collect(&loader, 0);
        let sizes: Vec<i64> = batches.iter().map(|b| b.images.size()[0]).collect();
        assert_eq!(sizes, [4, 4, 2]);
        assert_eq!(batches[0].images.size(), [4, 3, 4, 4]);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(seen, loader.order(0));
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let labels: Vec<i64> = Vec::try_from(&batches[0].labels).unwrap();
        let want: Vec<i64> = batches[0].indices.iter().map(|i| (i % 3) as i64).collect();
        assert_eq!(labels, want);
    }

    #[test]
    fn order_is_seeded_per_epoch_and_fixed_without_shuffle() {
        let loader = Loader::new(toy(50), augmenting(), cfg(8, 1)).unwrap();
        assert_eq!(loader.order(3), loader.order(3));
        assert_ne!(loader.order(3), loader.order(4));
        assert_ne!(loader.order(0), (0..50).collect::<Vec<_>>());
        let mut c = cfg(8, 1);
        c.shuffle = false;
        let plain = Loader::new(toy(50), augmenting(), c).unwrap();
        assert_eq!(plain.order(7), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn batches_do_not_depend_on_the_thread_count() {
        let one = collect(&Loader::new(toy(23), augmenting(), cfg(5, 1)).unwrap(), 2);
        let three = collect(&Loader::new(toy(23), augmenting(), cfg(5, 3)).unwrap(), 2);
        assert_eq!(one.len(), three.len());
        for (a, b) in one.iter().zip(&three) {
            assert_eq!(a.indices, b.indices);
            assert!(a.images.equal(&b.images));
        }
        // The augmentation really is random: another epoch crops the same sample differently somewhere.
        let other = collect(&Loader::new(toy(23), augmenting(), cfg(5, 2)).unwrap(), 3);
        let find = |bs: &[Batch], idx: usize| {
            bs.iter().find_map(|b| {
                b.indices
                    .iter()
                    .position(|&i| i == idx)
                    .map(|r| b.images.get(r as i64))
            })
        };
        let differs = (0..23).any(|i| !find(&one, i).unwrap().equal(&find(&other, i).unwrap()));
        assert!(differs);
    }

    #[test]
    fn unreadable_samples_are_skipped_and_counted_or_fail() {
        let ds: Arc<dyn Dataset> = Arc::new(Toy {
            n: 9,
            bad: vec![2, 7],
            odd: vec![],
        });
        let loader = Loader::new(Arc::clone(&ds), augmenting(), cfg(4, 2)).unwrap();
        let mut epoch = loader.epoch(0).unwrap();
        let rows: usize = epoch.by_ref().map(|b| b.unwrap().indices.len()).sum();
        assert_eq!(rows, 7);
        let summary = epoch.summary();
        assert_eq!(summary.loaded, 7);
        let mut what: Vec<String> = summary.skipped.iter().map(|s| s.what.clone()).collect();
        what.sort();
        assert_eq!(what, ["toy/2.png", "toy/7.png"]);

        let mut c = cfg(4, 2);
        c.on_error = OnError::Fail;
        let loader = Loader::new(ds, augmenting(), c).unwrap();
        let results: Vec<Result<Batch>> = loader.epoch(0).unwrap().collect();
        let err = results.last().unwrap().as_ref().unwrap_err().to_string();
        assert!(err.contains("toy/") && err.contains("corrupt"), "{err}");
    }

    #[test]
    fn mixed_sizes_in_a_batch_are_a_shape_error() {
        let ds: Arc<dyn Dataset> = Arc::new(Toy {
            n: 4,
            bad: vec![],
            odd: vec![1],
        });
        let mut c = cfg(4, 1);
        c.shuffle = false;
        let plain = Pipeline {
            channels: 1,
            transforms: vec![],
            normalize: None,
        };
        let loader = Loader::new(ds, plain, c).unwrap();
        let err = loader
            .epoch(0)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("toy/1.png after the transforms")
                && err.contains("first image toy/0.png")
                && err.contains("expected shape 1×5×6, got 1×5×5")
                && err.contains("Resize"),
            "{err}"
        );
    }

    #[test]
    fn dropping_an_epoch_early_returns() {
        let loader = Loader::new(toy(200), augmenting(), cfg(2, 2)).unwrap();
        let mut epoch = loader.epoch(0).unwrap();
        assert!(epoch.next().unwrap().is_ok());
        drop(epoch); // must not hang on the full queue
    }

    #[test]
    fn bad_settings_are_errors() {
        let mut c = cfg(0, 1);
        assert!(Loader::new(toy(1), augmenting(), c.clone()).is_err());
        c.batch_size = 1;
        c.threads = 0;
        assert!(Loader::new(toy(1), augmenting(), c).is_err());
    }
}
