//! The TOML configuration of a dream-ood run: one table per stage, strict, with the paper's defaults.
//!
//! Parsing has two steps, as ripgrep does with its arguments: serde maps the file onto the raw structs below
//! (`deny_unknown_fields` everywhere, so a misspelt key is an error, not a silently ignored setting), then
//! [`Config::validate`] checks ranges and resolves paths. Every error names the file, the line and the dotted
//! key path, and for an unknown key the nearest valid one:
//!
//! ```text
//! configs/demo.toml:7: sample.sigm: unknown key; did you mean `sigma`? (valid keys: mode, inliers, k, …)
//! ```
//!
//! Tables that exist today: `[run]` (shared settings), `[data]` (datasets and transforms), `[sample]` (stage 2)
//! and `[generate]` (stage 3). The other stages add their
//! table here when they land, each as one struct with documented defaults.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::DataSource;
use crate::data::transforms::{Normalize, Pipeline, Size, Transform};
use crate::error::{Error, Result};
use crate::latent::LatentConfig;

/// A whole config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Settings shared by every stage.
    pub run: RunConfig,
    /// Stage 2: outlier / inlier embedding sampling.
    pub sample: SampleConfig,
    /// Stage 3: decoding outlier embeddings into images with Stable Diffusion.
    pub generate: GenerateConfig,
    /// The ID and OOD datasets and their transforms, shared by stages 1, 4, evaluation and export.
    pub data: DataConfig,
    /// Stage 1: the text-aligned encoder and the feature bank.
    pub latent: LatentConfig,
    /// Evaluation: scores, OOD protocol, metric convention (`dream-ood eval`).
    pub eval: crate::eval::config::EvalConfig,
    /// Stage 4: training the OOD detector.
    pub train: crate::detector::TrainConfig,
    /// Export of the trained detector to ONNX (`dream-ood export CONFIG`, the `export` stage of `run`).
    pub export: crate::deploy::ExportConfig,
}

/// `[run]`: where results go, the seed and the compute device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run folder for every stage's outputs. Relative paths are taken from the config file's folder.
    /// Default `runs/default`.
    pub out_dir: PathBuf,
    /// Global seed; every random choice of every stage derives from it. Default 0.
    pub seed: u64,
    /// Compute device for the libtorch stages: `"auto"` (CUDA when available, logged), `"cpu"`, `"cuda"` or
    /// `"cuda:N"`. An explicit CUDA device fails when CUDA is missing. Default `"auto"`.
    pub device: String,
    /// Worker threads for CPU work; 0 means all available cores. Results never depend on it. Default 0.
    pub threads: usize,
    /// Detector methods `dream-ood run` trains and evaluates side by side (e.g. `["baseline", "dream_ood"]`);
    /// empty = only `[train] method`. Default [].
    pub methods: Vec<crate::detector::Method>,
    /// Markdown copied into the run report under "Notes": what the run is for, what to read its numbers
    /// against (the embedded demo explains there why its baseline wins). Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out_dir: PathBuf::from("runs/default"),
            seed: 0,
            device: "auto".to_owned(),
            threads: 0,
            methods: Vec::new(),
            notes: None,
        }
    }
}

/// Which reading of the official stage-2 code to run (SPEC §2 and §7 items 1–5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleMode {
    /// The method as the paper describes it, with the official code's bugs fixed (the default).
    #[default]
    Intended,
    /// Bit-for-bit the official `get_embed_*.py` behaviour, bugs included, to reproduce released files.
    Official,
}

/// Whether the candidates of one sampler call share their Gaussian draws (SPEC §7 item 3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseSharing {
    /// The same `candidates` draws perturb every boundary point of a call, as the official code does
    /// (`scripts/KNN.py:L79`): outliers of different anchors are correlated. The default.
    #[default]
    Shared,
    /// Fresh draws for each boundary point: independent candidates, `anchors` times more random numbers.
    PerAnchor,
}

/// `[sample]`: stage 2, kNN boundary sampling of outlier (or inlier) embeddings. Defaults are the CIFAR-100
/// outlier settings of the official code (`scripts/get_embed_cifar100.py:L17-L20,L42,L61-L69`). The
/// paper's other sets (SPEC §2.4): ImageNet-100 outliers `sigma = 0.03, select = 200`; inliers
/// `inliers = true, sigma = 0.01, select = 1000, anchors = 100, keep = 1` (`--inliers` alone changes
/// no other default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// The stage-1 feature bank `[C, N, D]` float32 `.npy`; a `BANK.json` beside it with `{"counts": [...]}`
    /// gives each class's filled rows. Relative to the config file's folder. Required; no default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bank: Option<PathBuf>,
    /// The class token embeddings `[C, D]` `.npy` (the official `token_embed_c100.npy`). Relative to the
    /// config file's folder. Required; no default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<PathBuf>,
    /// Output `[C, per_class, D]` float32 `.npy` (a `.json` sidecar is written beside it). Relative to the
    /// config file's folder. Default `<run.out_dir>/sample/outliers.npy` (`inliers.npy` with `inliers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// `intended` (default) or `official`.
    pub mode: SampleMode,
    /// Sample inliers (densest points, smallest kNN distances) instead of outliers (the official `--shift 1`
    /// of `get_embed_cifar100.py`, `--inlier 1` of `get_embed_in100.py`). Default false.
    pub inliers: bool,
    /// k of the kNN distance that ranks boundary points and filters candidates. Default 300.
    pub k: usize,
    /// Boundary points selected per class (largest k-th neighbour distance). Default 50.
    pub select: usize,
    /// Boundary points perturbed per sampler call, drawn without replacement from the `select` ones (the
    /// official `pic_nums`). Default 50.
    pub anchors: usize,
    /// Candidates kept per boundary point after the kNN filter. Default 2.
    pub keep: usize,
    /// Standard deviation of the Gaussian perturbation on the unit sphere. Default 0.07 (ImageNet-100: 0.03).
    pub sigma: f64,
    /// Gaussian draws per boundary point. Default 1500.
    pub candidates: usize,
    /// Embeddings written per class; calls of `anchors × keep` rows repeat until there are this many (the
    /// last call is cut short when it does not divide). Default 10000.
    pub per_class: usize,
    /// `shared` (default, as the official code) or `per_anchor` Gaussian draws.
    pub noise: NoiseSharing,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            bank: None,
            tokens: None,
            out: None,
            mode: SampleMode::Intended,
            inliers: false,
            k: 300,
            select: 50,
            anchors: 50,
            keep: 2,
            sigma: 0.07,
            candidates: 1500,
            per_class: 10_000,
            noise: NoiseSharing::Shared,
        }
    }
}

/// `[generate]`: stage 3 (`dream-ood generate`). Paths are relative to the config file's folder; the same keys
/// exist as command-line flags, which win. Defaults are the official sampling settings (SPEC §3: PLMS-equivalent
/// PNDM, 50 steps, guidance 7.5, seed 42, 512×512).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// The SD ONNX export folder (`optimum-cli export onnx` layout).
    pub model: Option<PathBuf>,
    /// Stage 2's embeddings, `[C, M, D]` float32 `.npy`.
    pub embeddings: Option<PathBuf>,
    /// The classes file (`configs/classes/*.toml`).
    pub classes: Option<PathBuf>,
    /// Output folder (ImageFolder of PNGs + `manifest.jsonl` + `run.json`).
    pub out: Option<PathBuf>,
    /// Images per class (exclusive with `total`).
    pub per_class: Option<usize>,
    /// Images in all, classes drawn uniformly (exclusive with `per_class`).
    pub total: Option<usize>,
    /// Denoising steps. Default 50.
    pub steps: usize,
    /// Classifier-free guidance scale. Default 7.5.
    pub guidance: f32,
    /// `pndm` (default; diffusers' PNDM with skip_prk_steps = PLMS), `plms` (the official ldm sampler),
    /// `ddim`, `euler`, `euler_ancestral`, `dpmpp_2m`.
    pub scheduler: String,
    /// Images per UNet batch (the UNet runs on twice this for guidance). Default 4.
    pub batch: usize,
    /// Global seed of the plan. Default 42 (the official `seed_everything(42)`).
    pub seed: u64,
    /// Image size in pixels. Default 512.
    pub image_size: usize,
    /// `round` (default, diffusers) or `floor` (the official script's truncation).
    pub quantize: String,
    /// Resize the images to this size (bilinear, as the official 512 → 256) before quantising; 0 keeps the
    /// decoder's size. Default 0.
    pub resize: usize,
    /// Execution provider: `cpu` (default), `cuda` / `cuda:N` or `tensorrt` / `tensorrt:N` (a
    /// `make build-gpu` binary; TensorRT also needs the TensorRT 10 libraries).
    pub ep: String,
    /// GPUs to spread the job over, one worker each (`[0, 1]`); empty = the device of `ep`. Default [].
    pub devices: Vec<i32>,
    /// TensorRT: allow fp16 kernels. Default true.
    pub trt_fp16: bool,
    /// ONNX Runtime intra-op threads per session; 0 = cores / workers. Default 0.
    pub threads: usize,
    /// Parallel workers, each with its own sessions; 0 = auto (CPU: single-thread workers, one per core, as
    /// memory allows; GPU: one). Default 0.
    pub workers: usize,
    /// Initial latents `[K, 4, h, w]` float32 `.npy` instead of seeded noise; image k takes row `k mod K`.
    pub init_latents: Option<PathBuf>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            model: None,
            embeddings: None,
            classes: None,
            out: None,
            per_class: None,
            total: None,
            steps: 50,
            guidance: 7.5,
            scheduler: "pndm".to_owned(),
            batch: 4,
            seed: 42,
            image_size: 512,
            quantize: "round".to_owned(),
            resize: 0,
            ep: "cpu".to_owned(),
            devices: Vec::new(),
            trt_fp16: true,
            threads: 0,
            workers: 0,
            init_latents: None,
        }
    }
}

/// The training augmentation of ID images (uint8 steps before ToTensor + Normalize).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// RandomHorizontalFlip → RandomCrop(size, padding): the CIFAR recipe (SPEC §1.4). The default.
    #[default]
    FlipCrop,
    /// RandomResizedCrop(size) → RandomHorizontalFlip: the ImageNet-100 recipe.
    ResizedCropFlip,
    /// RandomCrop(size, padding) only: for images whose mirror image is another class (digits, letters).
    Crop,
    /// No augmentation.
    None,
}

/// `[data] id_blur`: see [`DataConfig::id_blur`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlurConfig {
    /// Probability of blurring an image.
    pub p: f64,
    /// σ is drawn uniformly from `[lo, hi]` (pixels).
    pub sigma: [f64; 2],
    /// Odd window side. Default 5.
    #[serde(default = "default_blur_kernel")]
    pub kernel: usize,
}

fn default_blur_kernel() -> usize {
    5
}

/// `[data]`: the datasets (see [`crate::data::source`] for a source's keys) and how images become network
/// inputs. Defaults are the CIFAR settings of the official code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// ID training images (stage 1, stage 4, fitting of the scores that need ID statistics).
    pub train: Option<DataSource>,
    /// ID test images (evaluation only; never used for a choice).
    pub test: Option<DataSource>,
    /// Held-out ID validation images: threshold calibration at export, and anything else that needs
    /// unseen ID data. Usually the `train` source with `holdout = { fraction = …, part = "held" }`.
    pub val: Option<DataSource>,
    /// Named OOD test sets, `[data.ood.<name>]`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ood: BTreeMap<String, DataSource>,
    /// Class names in label order (a classes TOML as stage 3 reads; only `name` is used here). When
    /// absent, the names the format carries, else the label numbers.
    pub classes: Option<PathBuf>,
    /// Channels the network takes (gray images are repeated). Default 3.
    pub channels: usize,
    /// Network input side in pixels. Default 32.
    pub size: usize,
    /// Zero padding of the random crop. Default 4.
    pub padding: usize,
    /// Training augmentation. Default `flip_crop`.
    pub augment: Augment,
    /// Evaluation: Resize(shorter side = eval_resize) → CenterCrop(size); 0 means `size` (images already at
    /// `size` pass unchanged). ImageNet: 256 with size 224. An OOD set with `preprocess = "native"` skips
    /// both steps. Default 0.
    pub eval_resize: usize,
    /// Per-channel mean on the 0..1 scale. Default CIFAR's `[125.3, 123.0, 113.9] / 255`.
    pub mean: Vec<f64>,
    /// Per-channel std on the 0..1 scale. Default CIFAR's `[63.0, 62.1, 66.7] / 255`.
    pub std: Vec<f64>,
    /// Random Gaussian blur of ID training images, e.g. `{ p = 0.5, sigma = [0.1, 2.0], kernel = 5 }`
    /// (torchvision `RandomApply([GaussianBlur(kernel, sigma)], p)`, after the augmentation; never applied
    /// to generated outliers). A generator whose images are smoother than real ones (the demo's small SD)
    /// lets the regulariser learn "blurry = outlier", which flags blurred ID images and passes sharp OOD
    /// ones; blurring some ID images takes that cue away. Default none (the official code has no blur).
    pub id_blur: Option<BlurConfig>,
    /// Convert generated outliers to gray (PIL luma) before training. Set it when the ID images are gray
    /// (Fashion-MNIST, MNIST): Stable Diffusion decodes RGB with a little colour in every image, which no
    /// ID image has, and the detector then learns "colour = outlier" instead of the boundary of the
    /// classes. Stage 4 warns when the ID images are gray and this is off. Default false.
    pub outlier_gray: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        let n = Normalize::cifar();
        DataConfig {
            train: None,
            test: None,
            val: None,
            ood: BTreeMap::new(),
            classes: None,
            channels: 3,
            size: 32,
            padding: 4,
            augment: Augment::FlipCrop,
            eval_resize: 0,
            mean: n.mean,
            std: n.std,
            id_blur: None,
            outlier_gray: false,
        }
    }
}

impl DataConfig {
    fn normalize(&self) -> Normalize {
        Normalize {
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }

    /// The training pipeline of ID images.
    pub fn train_pipeline(&self) -> Pipeline {
        let mut p = self.augment_pipeline();
        if let Some(b) = &self.id_blur {
            p.transforms.push(Transform::RandomGaussianBlur {
                kernel: b.kernel,
                sigma: (b.sigma[0], b.sigma[1]),
                p: b.p,
            });
        }
        p
    }

    /// The `augment` steps (no blur) with ToTensor + Normalize.
    fn augment_pipeline(&self) -> Pipeline {
        let (s, padding) = (self.size, self.padding);
        let crop = Transform::RandomCrop {
            height: s,
            width: s,
            padding,
        };
        let flip = Transform::RandomHorizontalFlip { p: 0.5 };
        let transforms = match self.augment {
            Augment::FlipCrop => vec![flip, crop],
            Augment::ResizedCropFlip => vec![
                Transform::RandomResizedCrop {
                    height: s,
                    width: s,
                    scale: (0.08, 1.0),
                    ratio: (3.0 / 4.0, 4.0 / 3.0),
                },
                flip,
            ],
            Augment::Crop => vec![crop],
            Augment::None => vec![],
        };
        Pipeline {
            channels: self.channels,
            transforms,
            normalize: Some(self.normalize()),
        }
    }

    /// The training pipeline of generated outliers: Resize(shorter side = size) first (SPEC §7 item 11),
    /// Grayscale when `outlier_gray`, then the ID augmentation.
    pub fn outlier_pipeline(&self) -> Pipeline {
        let mut p = self.augment_pipeline();
        p.transforms
            .insert(0, Transform::Resize(Size::Shorter(self.size)));
        if self.outlier_gray {
            p.transforms.insert(1, Transform::Grayscale);
        }
        p
    }

    /// The evaluation pipeline (ID test, OOD sets, validation, `score`, `serve`): Resize → CenterCrop.
    /// Checkpoints store it; `eval` drops its Resize and CenterCrop for an OOD set with `preprocess =
    /// "native"` ([`Pipeline::native`]).
    pub fn eval_pipeline(&self) -> Pipeline {
        let resize = if self.eval_resize == 0 {
            self.size
        } else {
            self.eval_resize
        };
        Pipeline {
            channels: self.channels,
            transforms: vec![
                Transform::Resize(Size::Shorter(resize)),
                Transform::CenterCrop {
                    height: self.size,
                    width: self.size,
                },
            ],
            normalize: Some(self.normalize()),
        }
    }

    /// Checks ranges; an error names the field.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        if let Some(b) = &self.id_blur {
            let ok = b.kernel % 2 == 1
                && b.sigma[0] > 0.0
                && b.sigma[0] <= b.sigma[1]
                && b.sigma[1].is_finite()
                && (0.0..=1.0).contains(&b.p);
            if !ok {
                return Err((
                    "id_blur".into(),
                    format!(
                        "kernel {}, sigma {:?}, p {}; expected an odd kernel, 0 < sigma[0] ≤ sigma[1] and \
                         0 ≤ p ≤ 1",
                        b.kernel, b.sigma, b.p
                    ),
                ));
            }
        }
        if !matches!(self.channels, 1 | 3) {
            return Err((
                "channels".into(),
                format!("must be 1 or 3, got {}", self.channels),
            ));
        }
        if self.size == 0 {
            return Err(("size".into(), "must be at least 1".into()));
        }
        for (key, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != self.channels {
                return Err((
                    key.into(),
                    format!(
                        "has {} values; expected one per channel ({})",
                        v.len(),
                        self.channels
                    ),
                ));
            }
        }
        if self.std.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(("std".into(), "every value must be positive".into()));
        }
        let sources = [
            ("train", &self.train),
            ("test", &self.test),
            ("val", &self.val),
        ];
        for (key, src) in sources {
            if let Some(Some(h)) = src.as_ref().map(|s| s.holdout)
                && !(h.fraction > 0.0 && h.fraction < 1.0)
            {
                return Err((
                    format!("{key}.holdout.fraction"),
                    format!("{} is not in (0, 1)", h.fraction),
                ));
            }
            // The ID sets define what "in-distribution" looks like to the network: training, the bank,
            // the ID test scores and the exported threshold all need the one transform the detector is
            // trained and deployed with, so a per-set transform there would change the question.
            if let Some(s) = src
                && !s.preprocess.is_default()
            {
                return Err((
                    format!("{key}.preprocess"),
                    format!(
                        "\"{}\" is only for OOD sets ([data.ood.<name>]); the ID sets always use the \
                         evaluation transform (Resize → CenterCrop to size): remove the key",
                        s.preprocess.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Class names in label order: the `classes` file, else the names the training source carries, else
    /// the label numbers `0..num_classes` (`num_classes` default: the largest label + 1).
    pub fn class_names(
        &self,
        train: &dyn crate::data::Dataset,
        num_classes: Option<usize>,
    ) -> Result<Vec<String>> {
        if let Some(path) = &self.classes {
            let classes = crate::diffusion::classes::Classes::load(path)?;
            return Ok(classes.classes.into_iter().map(|c| c.name).collect());
        }
        let n = num_classes.unwrap_or_else(|| {
            (0..train.len())
                .map(|i| train.label(i))
                .max()
                .map_or(0, |m| (m + 1).max(0) as usize)
        });
        if !train.classes().is_empty() && train.classes().len() == n {
            return Ok(train.classes().to_vec());
        }
        Ok((0..n).map(|i| i.to_string()).collect())
    }

    /// Resolves every source path and the classes file against `base`.
    fn resolve(&mut self, base: &Path) {
        for s in [&mut self.train, &mut self.test, &mut self.val]
            .into_iter()
            .flatten()
        {
            *s = s.resolved(base);
        }
        for s in self.ood.values_mut() {
            *s = s.resolved(base);
        }
        if let Some(p) = &mut self.classes
            && p.is_relative()
        {
            *p = join_clean(base, p);
        }
    }
}

impl SampleConfig {
    /// Checks ranges and cross-field rules; an error names the field (`sigma`) and says why.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        for (key, value) in [
            ("k", self.k),
            ("select", self.select),
            ("anchors", self.anchors),
            ("keep", self.keep),
            ("candidates", self.candidates),
            ("per_class", self.per_class),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1, got 0".to_owned()));
            }
        }
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return Err((
                "sigma",
                format!("must be a positive number, got {}", self.sigma),
            ));
        }
        if self.keep > self.candidates {
            return Err((
                "keep",
                format!(
                    "keeps {} of {} candidates per boundary point; keep must not exceed candidates",
                    self.keep, self.candidates
                ),
            ));
        }
        if self.anchors > self.select {
            return Err((
                "anchors",
                format!(
                    "draws {} of {} boundary points per call without replacement; anchors must not exceed \
                     select",
                    self.anchors, self.select
                ),
            ));
        }
        Ok(())
    }
}

/// A compute device named in a config or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA when libtorch sees a GPU, else CPU; the choice is logged.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("unknown device \"{s}\"; expected auto, cpu, cuda or cuda:N")
                }),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths in it are resolved against its folder.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut config = Config::parse(&text, path)?;
        config.validate(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.run.out_dir.is_relative() {
            config.run.out_dir = join_clean(base, &config.run.out_dir);
        }
        config.data.resolve(base);
        let latent = &mut config.latent;
        for p in [&mut latent.tokens, &mut latent.sd_model, &mut latent.out]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = join_clean(base, p);
            }
        }
        if let Some(p) = &mut config.eval.out
            && p.is_relative()
        {
            *p = join_clean(base, p);
        }
        let train = &mut config.train;
        for p in [&mut train.init, &mut train.out, &mut train.outliers]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = join_clean(base, p);
            }
        }
        let sample = &mut config.sample;
        for p in [&mut sample.bank, &mut sample.tokens, &mut sample.out]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = join_clean(base, p);
            }
        }
        Ok(config)
    }

    /// The detector methods a run trains: `[run] methods`, or `[train] method` alone when that is empty.
    pub fn trained_methods(&self) -> Vec<crate::detector::Method> {
        if self.run.methods.is_empty() {
            vec![self.train.method]
        } else {
            self.run.methods.clone()
        }
    }

    /// The method `[export]` exports ([`crate::deploy::ExportConfig::method_or`]).
    pub fn export_method(&self) -> crate::detector::Method {
        self.export
            .method_or(&self.trained_methods(), self.train.method)
    }

    /// Where the exported method's `model.safetensors` is: `<out_dir>/train/<method>/`, as `run` and
    /// `train` write it, or `[train] out` when that names the folder of the very method exported.
    pub fn detector_checkpoint(&self) -> PathBuf {
        let method = self.export_method();
        match &self.train.out {
            Some(out) if method == self.train.method => out.clone(),
            _ => self.run.out_dir.join("train").join(method.name()),
        }
        .join("model.safetensors")
    }

    /// Parses TOML text; `path` is used only in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        parse_toml(text, path)
    }

    /// Checks ranges and cross-field rules; errors name the key path and the line.
    pub fn validate(&self, text: &str, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Error::Config {
            path: path.to_owned(),
            line: key_line(text, key),
            key: key.to_owned(),
            msg,
        };
        if let Err(msg) = self.run.device.parse::<DeviceSpec>() {
            return Err(bad("run.device", msg));
        }
        if let Err((field, msg)) = self.sample.check() {
            return Err(bad(&format!("sample.{field}"), msg));
        }
        if let Err((field, msg)) = self.data.check() {
            return Err(bad(&format!("data.{field}"), msg));
        }
        if let Err((field, msg)) = self.latent.check() {
            return Err(bad(&format!("latent.{field}"), msg));
        }
        if let Err((field, msg)) = self.eval.check() {
            return Err(bad(&format!("eval.{field}"), msg));
        }
        if let Err((field, msg)) = self.train.check() {
            return Err(bad(&format!("train.{field}"), msg));
        }
        if let Err((field, msg)) = self.export.check() {
            return Err(bad(&format!("export.{field}"), msg));
        }
        Ok(())
    }
}

/// `base/p` with `dir/..` pairs folded away (`configs/../runs/demo` → `runs/demo`), so that the paths a run
/// prints and records read as the user would write them. Purely lexical: a `..` after a symlinked folder
/// is folded too, as the shell's `cd` does.
pub fn join_clean(base: &Path, p: &Path) -> PathBuf {
    use std::path::Component;
    let joined = base.join(p);
    let mut out: Vec<Component> = Vec::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            // `/..` is `/`.
            Component::ParentDir if matches!(out.last(), Some(Component::RootDir)) => {}
            c => out.push(c),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

/// Parses any strict TOML document of dream-ood (configs, classes files) with the errors described in the
/// module doc: file, line, dotted key path, nearest valid key.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| toml_error(text, path, "", &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        toml_error(text, path, &key, e.inner())
    })
}

/// Turns a toml/serde error into [`Error::Config`] with the line, the key path and, for unknown keys, the
/// nearest valid one.
fn toml_error(text: &str, path: &Path, key_path: &str, err: &toml::de::Error) -> Error {
    let line = err.span().map(|span| line_of_offset(text, span.start));
    let message = err.message().trim();
    let (key, msg) = match unknown_field(message) {
        Some((unknown, valid)) => {
            // serde_path_to_error's path already ends with the unknown key.
            let key = if key_path.is_empty() {
                unknown.clone()
            } else {
                key_path.to_owned()
            };
            let nearest = valid
                .iter()
                .map(|v| (strsim::jaro_winkler(&unknown, v), v))
                .filter(|(score, _)| *score >= 0.7)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let hint = match nearest {
                Some((_, v)) => format!("; did you mean `{v}`?"),
                None => String::new(),
            };
            (
                key,
                format!("unknown key{hint} (valid keys: {})", valid.join(", ")),
            )
        }
        None => {
            let key = if key_path.is_empty() {
                "(document)".to_owned()
            } else {
                key_path.to_owned()
            };
            (key, message.to_owned())
        }
    };
    Error::Config {
        path: path.to_owned(),
        line,
        key,
        msg,
    }
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`", or "there are no
/// fields") into the unknown name and the valid ones.
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, rest) = rest.split_once('`')?;
    let valid = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((unknown.to_owned(), valid))
}

/// 1-based line number of a byte offset.
fn line_of_offset(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Line of the value at a dotted key path, when the key is in the file (defaults have no line).
fn key_line(text: &str, key_path: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut parts = key_path.split('.').peekable();
    while let Some(part) = parts.next() {
        let (_, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        if parts.peek().is_none() {
            return Some(line_of_offset(text, value.span().start));
        }
        table = value.get_ref().as_table()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        let config = Config::parse(text, Path::new("c.toml"));
        match config.and_then(|c| c.validate(text, Path::new("c.toml"))) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn id_blur_is_checked_and_only_in_the_id_pipeline() {
        let mut d = DataConfig {
            id_blur: Some(BlurConfig {
                p: 0.5,
                sigma: [0.1, 2.0],
                kernel: 5,
            }),
            outlier_gray: true,
            ..DataConfig::default()
        };
        assert!(d.check().is_ok());
        let blur = |p: &Pipeline| {
            p.transforms
                .iter()
                .any(|t| matches!(t, Transform::RandomGaussianBlur { .. }))
        };
        assert!(blur(&d.train_pipeline()));
        assert!(!blur(&d.outlier_pipeline()));
        assert!(
            d.outlier_pipeline()
                .transforms
                .contains(&Transform::Grayscale)
        );
        assert!(
            !d.train_pipeline()
                .transforms
                .contains(&Transform::Grayscale)
        );
        d.id_blur.as_mut().unwrap().kernel = 4;
        assert_eq!(d.check().unwrap_err().0, "id_blur");
    }

    #[test]
    fn native_preprocess_is_for_ood_sets_only() {
        let ok = "[data]\ntest = { format = \"folder\", path = \"t\" }\n\
                  ood.lsun = { format = \"folder\", path = \"l\", preprocess = \"native\" }\n";
        let config = Config::parse(ok, Path::new("c.toml")).unwrap();
        config.validate(ok, Path::new("c.toml")).unwrap();
        assert_eq!(
            config.data.ood["lsun"].preprocess,
            crate::data::source::Preprocess::Native
        );
        assert!(config.data.test.as_ref().unwrap().preprocess.is_default());
        for key in ["train", "test", "val"] {
            let text = format!(
                "[data]\n{key} = {{ format = \"folder\", path = \"t\", preprocess = \"native\" }}\n"
            );
            let msg = parse_err(&text);
            assert!(
                msg.starts_with(&format!(
                    "c.toml:2: data.{key}.preprocess: \"native\" is only for OOD sets"
                )),
                "{msg}"
            );
        }
        // Spelling the default out is allowed anywhere.
        let text =
            "[data]\ntest = { format = \"folder\", path = \"t\", preprocess = \"resize_crop\" }\n";
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        config.validate(text, Path::new("c.toml")).unwrap();
    }

    #[test]
    fn join_clean_folds_parent_steps_lexically() {
        let j = |b: &str, p: &str| join_clean(Path::new(b), Path::new(p));
        assert_eq!(j("configs", "../runs/demo"), PathBuf::from("runs/demo"));
        assert_eq!(j("configs", "./a/./b"), PathBuf::from("configs/a/b"));
        assert_eq!(j("", "../x"), PathBuf::from("../x"));
        assert_eq!(j("/a/b", "../../../c"), PathBuf::from("/c"));
        assert_eq!(j("configs", ".."), PathBuf::from("."));
        assert_eq!(j("x", "/abs/p"), PathBuf::from("/abs/p"));
    }

    #[test]
    fn empty_file_gives_paper_defaults() {
        let config = Config::parse("", Path::new("c.toml")).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.sample.k, 300);
        assert_eq!(config.sample.sigma, 0.07);
        config.validate("", Path::new("c.toml")).unwrap();
    }

    #[test]
    fn values_are_read() {
        let text =
            "[run]\nseed = 7\ndevice = \"cuda:1\"\n[sample]\nmode = \"official\"\nsigma = 0.03\n";
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(config.run.seed, 7);
        assert_eq!(
            config.run.device.parse::<DeviceSpec>(),
            Ok(DeviceSpec::Cuda(1))
        );
        assert_eq!(config.sample.mode, SampleMode::Official);
        assert_eq!(config.sample.sigma, 0.03);
    }

    #[test]
    fn misspelt_key_names_path_line_and_nearest() {
        let msg = parse_err("[run]\nseed = 1\n\n[sample]\nk = 5\nsigm = 0.1\n");
        assert_eq!(
            msg,
            "c.toml:6: sample.sigm: unknown key; did you mean `sigma`? (valid keys: bank, tokens, out, mode, \
             inliers, k, select, anchors, keep, sigma, candidates, per_class, noise)"
        );
    }

    #[test]
    fn misspelt_table_suggests_table() {
        let msg = parse_err("[sampel]\nk = 5\n");
        assert!(
            msg.starts_with("c.toml:1: sampel: unknown key; did you mean `sample`?"),
            "{msg}"
        );
    }

    #[test]
    fn far_off_key_gets_no_guess() {
        let msg = parse_err("[run]\nzzzzqqq = 1\n");
        assert!(
            msg.contains(
                "run.zzzzqqq: unknown key (valid keys: out_dir, seed, device, threads, methods, notes)"
            ),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let msg = parse_err("[sample]\n\nk = \"many\"\n");
        assert!(
            msg.starts_with("c.toml:3: sample.k: invalid type: string \"many\""),
            "{msg}"
        );
        assert!(msg.contains("usize") || msg.contains("integer"), "{msg}");
    }

    #[test]
    fn bad_enum_lists_variants() {
        let msg = parse_err("[sample]\nmode = \"paper\"\n");
        assert!(
            msg.starts_with("c.toml:2: sample.mode: unknown variant `paper`"),
            "{msg}"
        );
        assert!(
            msg.contains("intended") && msg.contains("official"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let msg = parse_err("[run]\nseed = \n");
        assert!(msg.starts_with("c.toml:2: (document):"), "{msg}");
    }

    #[test]
    fn range_errors_name_key_and_line() {
        assert_eq!(
            parse_err("[sample]\nsigma = -0.5\n"),
            "c.toml:2: sample.sigma: must be a positive number, got -0.5"
        );
        assert_eq!(
            parse_err("[sample]\n\nk = 0\n"),
            "c.toml:3: sample.k: must be at least 1, got 0"
        );
        assert_eq!(
            parse_err("[run]\ndevice = \"gpu\"\n"),
            "c.toml:2: run.device: unknown device \"gpu\"; expected auto, cpu, cuda or cuda:N"
        );
    }

    #[test]
    fn device_spec_parses() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
