//! `[latent]`: stage 1 settings. Defaults are the CIFAR-100 recipe of the official code (SPEC §0, §1).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::nn::{Depth, Stem};

/// Which images the feature bank is built from (SPEC §7 item 10).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankTransform {
    /// The training loader with augmentation and shuffling, network in eval mode, as the official code
    /// does (`scripts/pretrain_cifar100.py:L270-283`). The default.
    #[default]
    Train,
    /// The evaluation transform, in dataset order: un-augmented features.
    Test,
}

/// `[latent]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatentConfig {
    /// Class token embeddings `[C, D]` as `.npy` (like the official `token_embed_c100.npy`). Either this or
    /// `sd_model` (with `[data] classes`).
    pub tokens: Option<PathBuf>,
    /// An SD ONNX export folder: T is read from its text encoder's token table at the anchor token (first
    /// BPE token after BOS) of each class's `embedding_word` in `[data] classes`, the rows stage 3 injects
    /// around.
    pub sd_model: Option<PathBuf>,
    /// Backbone. Default `resnet34` (SPEC §1.2).
    pub depth: Depth,
    /// Stem. Default `cifar` (the official models use it at every image size).
    pub stem: Stem,
    /// Channels of the first stage (later stages double it). Default 64, the standard ResNet.
    pub width: i64,
    /// Epochs. Default 200.
    pub epochs: u64,
    /// Initial learning rate. Default 0.1.
    pub lr: f64,
    /// Floor of the per-step cosine. Default 1e-6.
    pub lr_min: f64,
    /// Batch size. Default 256.
    pub batch: usize,
    /// Temperature τ of CE(cos(f, T)/τ). Default 0.1.
    pub tau: f64,
    /// SGD momentum (Nesterov). Default 0.9.
    pub momentum: f64,
    /// Weight decay on every parameter. Default 5e-4.
    pub weight_decay: f64,
    /// Feature-bank rows per class (the first ones seen). Default 500 (CIFAR-100's images per class).
    pub bank_per_class: usize,
    /// Feature-bank images: `train` (official) or `test` (the evaluation transform).
    pub bank_transform: BankTransform,
    /// Output folder. Default `<run.out_dir>/latent`.
    pub out: Option<PathBuf>,
}

impl Default for LatentConfig {
    fn default() -> Self {
        Self {
            tokens: None,
            sd_model: None,
            depth: Depth::Resnet34,
            stem: Stem::Cifar,
            width: crate::nn::arch::STANDARD_WIDTH,
            epochs: 200,
            lr: 0.1,
            lr_min: 1e-6,
            batch: 256,
            tau: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            bank_per_class: 500,
            bank_transform: BankTransform::Train,
            out: None,
        }
    }
}

impl LatentConfig {
    /// Checks ranges; an error names the field.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        for (key, v) in [
            ("epochs", self.epochs as usize),
            ("batch", self.batch),
            ("bank_per_class", self.bank_per_class),
            ("width", self.width.max(0) as usize),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1, got 0".into()));
            }
        }
        for (key, v) in [("lr", self.lr), ("tau", self.tau)] {
            if !(v.is_finite() && v > 0.0) {
                return Err((key, format!("must be a positive number, got {v}")));
            }
        }
        if !(self.lr_min >= 0.0 && self.lr_min <= self.lr) {
            return Err(("lr_min", format!("must be in [0, lr], got {}", self.lr_min)));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err((
                "momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err((
                "weight_decay",
                format!("must be ≥ 0, got {}", self.weight_decay),
            ));
        }
        if self.tokens.is_some() && self.sd_model.is_some() {
            return Err(("tokens", "give either tokens or sd_model, not both".into()));
        }
        Ok(())
    }
}
