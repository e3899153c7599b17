//! Stage 4: training the OOD detector (SPEC §4), `dream-ood train CONFIG`.
//!
//! One loop, four methods ([`Method`]); the method only changes what goes into a step and the loss:
//!
//! | method | a step's batch | loss |
//! |---|---|---|
//! | `baseline` | ID | CE |
//! | `dream_ood` | `[ID; generated outliers]`, one forward pass | CE(ID) + β · logistic(φ(lse / T)) (SPEC §4.4) |
//! | `vos` | ID, plus virtual outliers in feature space | CE + w · logistic(φ(weighted lse)) ([`vos`]) |
//! | `inlier_aug` | `[ID; generated inliers]` | CE over all rows (SPEC §4.6) |
//!
//! Optimisation is the paper's for every method (SPEC §4.5): SGD, Nesterov momentum 0.9, weight decay
//! 5e-4, learning rate cosine-annealed per step from `lr` to 1e-6 over `epochs × steps per epoch`; φ and
//! VOS's energy weights are optimised with the same settings.
//!
//! Reads: `[data.train]` (ID images), `[data.test]` (optional, ID accuracy per epoch), stage 3's folder
//! (`train.outliers`, default `<run.out_dir>/generate`) for `dream_ood` and `inlier_aug`, and an optional
//! `train.init` checkpoint. Writes into `train.out` (default `<run.out_dir>/train/<method>`):
//!
//! ```text
//! model.safetensors  the network (`encoder.*`, `fc.*`: the official ResNet_Model's state_dict) with its
//!                    CheckpointInfo (stage "detector", classes, eval transform, method and settings)
//! state.safetensors  momentum buffers, φ (`phi.*`), VOS's `weight_energy.weight` and feature queue
//! log.jsonl, log.csv one row per epoch: epoch, step, lr, loss, ce, reg, train_acc, test_acc, seconds,
//!                    images_per_s
//! run.json           the resolved settings and paths of the run
//! ```
//!
//! φ is trained and saved but kept out of `model.safetensors`: at test time the score is the plain energy
//! (SPEC §5.1), and the file then loads strictly into any classifier of the same shape (export, eval, the
//! official PyTorch model).
//!
//! Resume: rerunning the same command continues after the last finished epoch and follows the same
//! trajectory as an uninterrupted run (data order and augmentation from `(seed, epoch)`, every other draw
//! from `(seed, step)`); a run folder made with other settings is refused rather than continued.

pub mod config;
pub mod loss;
pub mod trainer;
pub mod vos;

use std::path::PathBuf;

pub use config::{Batching, Finetune, Method, Phi, PhiInit, TrainConfig, VosConfig};
pub use trainer::{TrainReport, run};

use crate::config::{Config, DataConfig, DeviceSpec};
use crate::error::{Error, Result};

/// A training run, resolved: settings, absolute paths, device and threads.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// The `[train]` settings with command-line overrides applied.
    pub train: TrainConfig,
    /// `[data]`, paths resolved.
    pub data: DataConfig,
    /// `run.seed`.
    pub seed: u64,
    pub device: tch::Device,
    /// CPU threads for libtorch and decoding (≥ 1).
    pub threads: usize,
    /// Stage 3's folder, for the methods that read it.
    pub generated: Option<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// Stop after this epoch (1-based count of finished epochs) even if `epochs` is larger; the schedule
    /// still spans `epochs`, so a later run without it continues the same trajectory.
    pub until_epoch: Option<u64>,
}

/// Command-line overrides of `[train]` and `[run]` keys.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub method: Option<Method>,
    pub epochs: Option<u64>,
    pub out: Option<PathBuf>,
    pub device: Option<String>,
    pub threads: Option<usize>,
    pub until_epoch: Option<u64>,
}

impl TrainJob {
    /// Builds the job from a loaded config (its paths already resolved against the config's folder by
    /// [`Config::load`]), with `overrides` applied and checked.
    pub fn from_config(config: &Config, overrides: Overrides) -> Result<TrainJob> {
        let mut train = config.train.clone();
        if let Some(m) = overrides.method {
            train.method = m;
        }
        if let Some(ft) = train.finetune.clone()
            && train.method != ft.from
        {
            train.init = Some(
                config
                    .run
                    .out_dir
                    .join("train")
                    .join(ft.from.name())
                    .join("model.safetensors"),
            );
            train.epochs = ft.epochs.unwrap_or(train.epochs);
            train.lr = ft.lr.unwrap_or(train.lr);
            train.finetune = None;
        }
        if let Some(e) = overrides.epochs {
            train.epochs = e;
        }
        if let Some(t) = overrides.threads {
            train.threads = t;
        }
        if let Err((key, msg)) = train.check() {
            return Err(Error::InvalidValue {
                key: format!("train.{key}"),
                msg,
            });
        }
        let out = match overrides.out.or_else(|| train.out.clone()) {
            Some(p) => p,
            None => config.run.out_dir.join("train").join(train.method.name()),
        };
        let generated = train.method.uses_generated().then(|| {
            train
                .outliers
                .clone()
                .unwrap_or_else(|| config.run.out_dir.join("generate"))
        });
        let device_name = overrides
            .device
            .unwrap_or_else(|| config.run.device.clone());
        let spec: DeviceSpec = device_name.parse().map_err(|msg| Error::InvalidValue {
            key: "device".into(),
            msg,
        })?;
        let device = crate::runtime::resolve_device(spec)?;
        let threads = match (train.threads, config.run.threads) {
            (0, 0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            (0, t) | (t, _) => t,
        };
        if let Some(u) = overrides.until_epoch
            && !(1..=train.epochs).contains(&u)
        {
            return Err(Error::InvalidValue {
                key: "until-epoch".into(),
                msg: format!("{u} is not in 1..={} (train.epochs)", train.epochs),
            });
        }
        if config.data.train.is_none() {
            return Err(Error::InvalidValue {
                key: "data.train".into(),
                msg:
                    "training needs the ID training images: add a [data.train] table (format, path)"
                        .into(),
            });
        }
        Ok(TrainJob {
            train,
            data: config.data.clone(),
            seed: config.run.seed,
            device,
            threads,
            generated,
            out: std::path::absolute(&out).unwrap_or(out),
            until_epoch: overrides.until_epoch,
        })
    }
}
