//! `[train]`: stage 4's settings. Defaults are the CIFAR-100 recipe of the official
//! `scripts/train_ood_det_cifar100.py` (SPEC §4); the ImageNet-100 recipe differs in `epochs = 20`,
//! `lr = 0.001`, `batch = outlier_batch = 80`, `beta = 1`, `phi = "mlp"`, `batching = "permute"` and an
//! `init` checkpoint (SPEC §0 table, §4.3–§4.5).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::nn::{Depth, Stem};

/// Which training objective (one loop; the method only changes the batch and the loss).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Cross-entropy on the ID images only: the baseline every OOD score is compared against, and the
    /// pretrained classifier the ImageNet-100 recipe starts from (SPEC §7 item 13).
    Baseline,
    /// Dream-OOD (SPEC §4.4): CE on ID + β · 2-class CE of φ(logsumexp(logits) / T), ID = 1, generated
    /// outlier = 0. The default.
    #[default]
    DreamOod,
    /// VOS (Du et al., ICLR 2022; reference note §3.1): the same logistic regulariser, but the outliers are
    /// virtual: low-likelihood samples of class-conditional Gaussians fitted to a queue of penultimate
    /// features, scored by the `fc` head, with learnable per-class energy weights.
    Vos,
    /// The generalisation variant (SPEC §4.6): plain CE over real ID images and generated *inliers*
    /// labelled by their class; no energy term and no φ.
    InlierAug,
}

impl Method {
    /// The config spelling (also the default output folder's name).
    pub fn name(self) -> &'static str {
        match self {
            Method::Baseline => "baseline",
            Method::DreamOod => "dream_ood",
            Method::Vos => "vos",
            Method::InlierAug => "inlier_aug",
        }
    }

    /// Whether the method reads stage 3's generated images.
    pub fn uses_generated(self) -> bool {
        matches!(self, Method::DreamOod | Method::InlierAug)
    }

    /// Whether the method trains φ.
    pub fn uses_phi(self) -> bool {
        matches!(self, Method::DreamOod | Method::Vos)
    }
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "baseline" => Ok(Method::Baseline),
            "dream_ood" => Ok(Method::DreamOod),
            "vos" => Ok(Method::Vos),
            "inlier_aug" => Ok(Method::InlierAug),
            _ => Err(format!(
                "unknown method \"{s}\"; expected baseline, dream_ood, vos or inlier_aug"
            )),
        }
    }
}

/// The logistic head φ on the (negative) energy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phi {
    /// `Linear(1, 2)` (CIFAR-100, `scripts/train_ood_det_cifar100.py:L190-192`; VOS). The default.
    #[default]
    Linear,
    /// `Linear(1, 512) → ReLU → Linear(512, 2)` (ImageNet-100, `scripts/train_ood_det_in100.py:L238-242`).
    Mlp,
}

/// How φ starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhiInit {
    /// PyTorch's init, then φ's two outputs swapped if its slope in `u` is negative, so the regulariser
    /// pushes ID towards higher `lse` from the first step: the direction the energy score assumes at test
    /// time. The default. Deviation: the official code leaves the sign to the random init, and the
    /// regulariser can then separate ID and outliers the other way round (it did in 5 of 6 seeds of a
    /// 16-step toy run; 0 of 6 with this init).
    #[default]
    Aligned,
    /// PyTorch's `nn.Linear` init as is (the official code).
    Pytorch,
}

/// How the ID batch and the generated batch share a step (SPEC §4.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// The CIFAR script: `zip(loader_in, loader_out)`, one forward pass of `[ID; generated]`; an epoch is
    /// the shorter of the two loaders. The default.
    #[default]
    Concat,
    /// The ImageNet-100 script: iterate the ID loader, restart the generated loader whenever it runs out
    /// (it starts afresh each epoch, as the official `iter()` inside `train_permute` does), and send a
    /// seeded random permutation of `[ID; generated]` through the network.
    Permute,
}

/// `[train] finetune`: see [`TrainConfig::finetune`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finetune {
    /// The method whose model the others start from (trained first by `run`).
    pub from: Method,
    /// Epochs of the fine-tuned methods (default: `[train] epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// Initial learning rate of the fine-tuned methods (default: `[train] lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
}

/// `[train.vos]`: VOS's virtual-outlier synthesis. Defaults are the official VOS classification code
/// (`deeplearning-wisc/vos` `classification/CIFAR/train_virtual.py`, arguments `--sample_number`,
/// `--sample_from`, `--select`, `--start_epoch`, `--loss_weight`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VosConfig {
    /// Penultimate features kept per class (a FIFO queue once full). Default 1000.
    pub queue: usize,
    /// Gaussian draws per class and step from which the least likely are kept. Default 10000.
    pub samples: usize,
    /// Virtual outliers kept per class and step (lowest likelihood). Default 1.
    pub select: usize,
    /// First epoch (0-based, as the official `epoch >= start_epoch`) with the regulariser; earlier epochs
    /// only fill the queues. Default 40 (of VOS's 100).
    pub start_epoch: u64,
    /// Weight of the regulariser. Default 0.1.
    pub loss_weight: f64,
}

impl Default for VosConfig {
    fn default() -> Self {
        Self {
            queue: 1000,
            samples: 10_000,
            select: 1,
            start_epoch: 40,
            loss_weight: 0.1,
        }
    }
}

/// `[train]`: stage 4 (`dream-ood train`). Paths are relative to the config file's folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `baseline`, `dream_ood` (default), `vos` or `inlier_aug`.
    pub method: Method,
    /// Network: `resnet18`, `resnet34` (default; the official CIFAR-100 and ImageNet-100 detector,
    /// SPEC §4.1) or `resnet50` (the official `--r50`).
    pub depth: Depth,
    /// `cifar` (default; the official networks use it at every size, SPEC §7 item 12) or `imagenet`.
    pub stem: Stem,
    /// Channels of the first stage (later stages double it). Default 64, the standard ResNet.
    pub width: i64,
    /// Epochs. Default 200 (CIFAR; ImageNet-100: 20).
    pub epochs: u64,
    /// Initial learning rate of the per-step cosine schedule. Default 0.1 (ImageNet-100: 0.001).
    pub lr: f64,
    /// Learning rate the cosine reaches at the last step. Default 1e-6 (SPEC §1.5).
    pub lr_min: f64,
    /// SGD momentum (Nesterov). Default 0.9.
    pub momentum: f64,
    /// Weight decay on every parameter, φ included. Default 5e-4.
    pub weight_decay: f64,
    /// ID images per step. Default 256 (ImageNet-100: 80).
    pub batch: usize,
    /// Generated images per step (`dream_ood`, `inlier_aug`). Default 256 (ImageNet-100: 80).
    pub outlier_batch: usize,
    /// β, the weight of the energy regulariser (`dream_ood`). Default 2.5 (ImageNet-100: 1.0).
    pub beta: f64,
    /// φ: `linear` (default) or `mlp` (ImageNet-100).
    pub phi: Phi,
    /// φ's init: `aligned` (default) or `pytorch` (the official code).
    pub phi_init: PhiInit,
    /// T in `u = logsumexp(logits) / T` (the official IN-100 `--T`; it divides, SPEC §4.4). Default 1.
    pub energy_temperature: f64,
    /// `concat` (default, CIFAR) or `permute` (ImageNet-100).
    pub batching: Batching,
    /// Stage 3's output folder (`manifest.jsonl` + images): outliers for `dream_ood`, inliers labelled by
    /// their class for `inlier_aug`. Default `<run.out_dir>/generate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outliers: Option<PathBuf>,
    /// A checkpoint to start from (a `baseline` run's `model.safetensors`, or a PyTorch state_dict saved
    /// with safetensors); loaded strictly. Default none: from scratch (CIFAR, SPEC §4.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Fine-tune every method but `from` from the model `from` wrote in this run folder
    /// (`<out_dir>/train/<from>/model.safetensors`), e.g. `{ from = "baseline", epochs = 5, lr = 0.01 }`:
    /// the ImageNet-100 recipe (a pretrained classifier, SPEC §4.5, §7 item 13) inside one `run`. Starting
    /// from a trained classifier, ID images already have the higher `logsumexp`, so the regulariser widens
    /// the gap the energy score reads instead of settling on either sign (from scratch it can separate ID
    /// and outliers the other way round; `train` warns when it does). Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetune: Option<Finetune>,
    /// CPU threads for libtorch and image decoding; 0 takes `run.threads`. Default 0.
    pub threads: usize,
    /// Output folder. Default `<run.out_dir>/train/<method>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// VOS settings (`vos` only).
    pub vos: VosConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::DreamOod,
            depth: Depth::Resnet34,
            stem: Stem::Cifar,
            width: crate::nn::arch::STANDARD_WIDTH,
            epochs: 200,
            lr: 0.1,
            lr_min: 1e-6,
            momentum: 0.9,
            weight_decay: 5e-4,
            batch: 256,
            outlier_batch: 256,
            beta: 2.5,
            phi: Phi::Linear,
            phi_init: PhiInit::Aligned,
            energy_temperature: 1.0,
            batching: Batching::Concat,
            outliers: None,
            init: None,
            finetune: None,
            threads: 0,
            out: None,
            vos: VosConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Checks ranges and cross-field rules; an error names the field (relative to `train.`) and says why.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((
                    key.to_owned(),
                    format!("must be a positive number, got {v}"),
                ))
            }
        };
        let non_negative = |key: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err((key.to_owned(), format!("must be a number ≥ 0, got {v}")))
            }
        };
        for (key, v) in [
            ("epochs", self.epochs as usize),
            ("batch", self.batch),
            ("outlier_batch", self.outlier_batch),
            ("width", self.width.max(0) as usize),
            ("vos.queue", self.vos.queue),
            ("vos.samples", self.vos.samples),
            ("vos.select", self.vos.select),
        ] {
            if v == 0 {
                return Err((key.to_owned(), "must be at least 1, got 0".to_owned()));
            }
        }
        positive("lr", self.lr)?;
        non_negative("lr_min", self.lr_min)?;
        if self.lr_min > self.lr {
            return Err((
                "lr_min".into(),
                format!(
                    "{} is above lr = {}; the cosine decays from lr to lr_min",
                    self.lr_min, self.lr
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err((
                "momentum".into(),
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        non_negative("weight_decay", self.weight_decay)?;
        non_negative("beta", self.beta)?;
        positive("energy_temperature", self.energy_temperature)?;
        non_negative("vos.loss_weight", self.vos.loss_weight)?;
        if let Some(ft) = &self.finetune {
            if self.init.is_some() {
                return Err((
                    "finetune".into(),
                    "give either init (a checkpoint file) or finetune (a method of this run), not both"
                        .into(),
                ));
            }
            if ft.epochs == Some(0) {
                return Err(("finetune.epochs".into(), "must be at least 1, got 0".into()));
            }
            if let Some(lr) = ft.lr {
                positive("finetune.lr", lr)?;
                if self.lr_min > lr {
                    return Err((
                        "finetune.lr".into(),
                        format!("{lr} is below lr_min = {}", self.lr_min),
                    ));
                }
            }
        }
        if self.vos.select > self.vos.samples {
            return Err((
                "vos.select".into(),
                format!(
                    "keeps {} of {} draws per class; select must not exceed samples",
                    self.vos.select, self.vos.samples
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_cifar_recipe() {
        let c = TrainConfig::default();
        assert_eq!(c.method, Method::DreamOod);
        assert_eq!((c.depth, c.stem), (Depth::Resnet34, Stem::Cifar));
        assert_eq!(
            (c.epochs, c.lr, c.batch, c.outlier_batch),
            (200, 0.1, 256, 256)
        );
        assert_eq!(
            (c.beta, c.phi, c.batching),
            (2.5, Phi::Linear, Batching::Concat)
        );
        assert_eq!(c.vos, VosConfig::default());
        assert_eq!(
            (c.vos.queue, c.vos.samples, c.vos.select),
            (1000, 10_000, 1)
        );
        assert_eq!((c.vos.start_epoch, c.vos.loss_weight), (40, 0.1));
        c.check().unwrap();
    }

    #[test]
    fn bad_values_name_the_field() {
        type Edit = Box<dyn Fn(&mut TrainConfig)>;
        let cases: Vec<(Edit, &str, &str)> = vec![
            (Box::new(|c| c.batch = 0), "batch", "at least 1"),
            (Box::new(|c| c.lr = -1.0), "lr", "positive"),
            (Box::new(|c| c.lr_min = 0.5), "lr_min", "above lr"),
            (Box::new(|c| c.momentum = 1.0), "momentum", "[0, 1)"),
            (Box::new(|c| c.beta = f64::NAN), "beta", "≥ 0"),
            (
                Box::new(|c| c.energy_temperature = 0.0),
                "energy_temperature",
                "positive",
            ),
            (
                Box::new(|c| c.vos.select = 20_000),
                "vos.select",
                "must not exceed samples",
            ),
            (Box::new(|c| c.width = 0), "width", "at least 1"),
            (
                Box::new(|c| {
                    c.init = Some("m.safetensors".into());
                    c.finetune = Some(Finetune {
                        from: Method::Baseline,
                        epochs: None,
                        lr: None,
                    });
                }),
                "finetune",
                "not both",
            ),
            (
                Box::new(|c| {
                    c.finetune = Some(Finetune {
                        from: Method::Baseline,
                        epochs: Some(0),
                        lr: None,
                    })
                }),
                "finetune.epochs",
                "at least 1",
            ),
            (
                Box::new(|c| {
                    c.finetune = Some(Finetune {
                        from: Method::Baseline,
                        epochs: None,
                        lr: Some(1e-9),
                    })
                }),
                "finetune.lr",
                "below lr_min",
            ),
        ];
        for (edit, key, msg) in cases {
            let mut c = TrainConfig::default();
            edit(&mut c);
            let (k, m) = c.check().unwrap_err();
            assert_eq!(k, key);
            assert!(m.contains(msg), "{key}: {m}");
        }
    }

    #[test]
    fn method_names_round_trip() {
        for m in [
            Method::Baseline,
            Method::DreamOod,
            Method::Vos,
            Method::InlierAug,
        ] {
            assert_eq!(m.name().parse::<Method>(), Ok(m));
        }
        assert!(
            "energy"
                .parse::<Method>()
                .unwrap_err()
                .contains("dream_ood")
        );
    }
}
