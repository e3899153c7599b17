//! `dream-ood export`: a checkpoint → one self-contained detector `.onnx` (weights with batch norm folded,
//! the score, the calibrated threshold and everything `score`/`serve` need in `metadata_props`).
//!
//! Calibration runs on the production path: the model is first built without a threshold, held in memory,
//! opened with ONNX Runtime and fed the calibration images through [`super::score::score_files`] (the
//! same decoding, transform and graph `dream-ood score` uses); the threshold by
//! [`super::calibrate::RULE`] then goes into the final graph (`is_ood`) and its metadata. The calibration
//! images must be a held-out **ID validation** split, never the test split (see [`super::calibrate`]).
//!
//! `calibration.sha256` identifies the calibration set: for images, the sha256 of the sorted lines
//! `<sha256 of the file's bytes>\n`, one per image (so it names the set of images, whatever their paths
//! or order); for a scores file, the sha256 of the file.
//!
//! [`export`] is the library entry a config-driven `run` calls; the CLI fills an [`ExportJob`] from flags.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::calibrate::{Calibrated, check_tpr, per_class_thresholds, threshold_at_tpr};
use super::metadata::{CalibrationInfo, DetectorMetadata, InputKind};
use super::score::{collect_inputs, score_files};
use super::scorer::Detector;
use crate::data::Pipeline;
use crate::diffusion::session::SessionOptions;
use crate::error::{Error, Result};
use crate::nn::checkpoint::{CheckpointInfo, read_weights};
use crate::nn::{Depth, NetworkSpec, Stem};
use crate::onnx::export::{
    ClassifierExport, Preprocess, ScoreKind, Threshold, Weights, export_classifier,
};
use crate::onnx::model::{encode_model, save_model};
use crate::progress::Progress;

/// Where the ID calibration scores come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationSet {
    /// No threshold: the model has `logits` and `score` but no `is_ood`.
    None,
    /// Image files and folders of a held-out ID validation split, scored through the exported graph.
    Images(Vec<PathBuf>),
    /// Precomputed ID scores (`.npy` or text, [`crate::eval::score_file::read_scores`]), of the same score
    /// function; converted to f32, the type the graph compares in.
    Scores(PathBuf),
    /// A config's dataset (usually `[data.val]`, a held-out part of the ID training split), decoded by the
    /// data layer and scored through the exported graph.
    Dataset(crate::data::DataSource),
}

/// Architecture facts for checkpoints without dream-ood metadata (a PyTorch `state_dict`), and overrides
/// for those with it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkOverride {
    /// Needed without metadata; with metadata it must agree.
    pub depth: Option<Depth>,
    /// Needed without metadata; with metadata it must agree.
    pub stem: Option<Stem>,
    /// Class names (default without metadata: `0`, `1`, …).
    pub classes: Option<Vec<String>>,
    /// Evaluation transform (default without metadata: the stem's test preset).
    pub eval_transform: Option<Pipeline>,
}

/// One export.
#[derive(Debug, Clone)]
pub struct ExportJob {
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    pub network: NetworkOverride,
    pub score: ScoreKind,
    /// Bake normalisation into the graph: input `image` uint8 NHWC instead of `input` float32 NCHW.
    pub preprocess: bool,
    pub calibration: CalibrationSet,
    /// Target ID TPR of the threshold (0.95 by default).
    pub target_tpr: f64,
    /// One threshold per predicted class (needs calibration images).
    pub per_class: bool,
    /// Images per session run while calibrating.
    pub batch: usize,
    pub session: SessionOptions,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    pub metadata: DetectorMetadata,
    /// Classes without calibration images that fell back to the global threshold (per-class only).
    pub classes_without_calibration: Vec<String>,
}

/// Exports `job.checkpoint` to `job.out` (atomically), calibrating when asked.
pub fn export(job: &ExportJob, progress: &dyn Progress) -> Result<ExportReport> {
    check_tpr(job.target_tpr)?;
    if job.per_class
        && !matches!(
            job.calibration,
            CalibrationSet::Images(_) | CalibrationSet::Dataset(_)
        )
    {
        return Err(Error::InvalidValue {
            key: "per_class_thresholds".to_owned(),
            msg:
                "per-class thresholds need calibration images (the predicted class of each), not a \
                  scores file or nothing"
                    .to_owned(),
        });
    }
    let (info, weights) = read_weights(&job.checkpoint)?;
    let (network, classes, eval_transform, info) =
        resolve_network(&job.checkpoint, info, &weights, &job.network)?;
    let bytes = std::fs::read(&job.checkpoint).map_err(|e| Error::io(&job.checkpoint, e))?;
    let mut meta = DetectorMetadata {
        classes,
        network,
        input: if job.preprocess {
            InputKind::Uint8
        } else {
            InputKind::Float
        },
        eval_transform,
        score: job.score,
        calibration: None,
        dream_ood_version: env!("CARGO_PKG_VERSION").to_owned(),
        checkpoint_sha256: hex(&Sha256::digest(&bytes)),
        training_config_sha256: info.as_ref().and_then(training_config_hash),
    };
    drop(bytes);
    meta.validate().map_err(|msg| Error::Data {
        path: job.checkpoint.clone(),
        line: None,
        msg,
    })?;
    let mut fallback = Vec::new();
    let threshold = match &job.calibration {
        CalibrationSet::None => None,
        CalibrationSet::Scores(path) => {
            let scores: Vec<f32> = crate::eval::score_file::read_scores(path)?
                .into_iter()
                .map(|s| s as f32)
                .collect();
            let c = threshold_at_tpr(&scores, job.target_tpr).map_err(|e| Error::Data {
                path: path.clone(),
                line: None,
                msg: e.to_string(),
            })?;
            let sha = hex(&Sha256::digest(
                std::fs::read(path).map_err(|e| Error::io(path, e))?,
            ));
            meta.calibration = Some(info_of(&c, None, job.target_tpr, "scores", sha));
            Some(Threshold::Global(c.threshold))
        }
        CalibrationSet::Images(paths) => {
            let (t, cal, missing) = calibrate_on_images(job, &meta, &weights, paths, progress)?;
            meta.calibration = Some(cal);
            fallback = missing;
            Some(t)
        }
        CalibrationSet::Dataset(source) => {
            let (t, cal, missing) = calibrate_on_dataset(job, &meta, &weights, source, progress)?;
            meta.calibration = Some(cal);
            fallback = missing;
            Some(t)
        }
    };
    let model = build(&meta, &weights, threshold)?;
    save_model(&model, &job.out)?;
    if let Some(c) = &meta.calibration {
        tracing::info!(
            threshold = c.threshold,
            target_tpr = c.target_tpr,
            achieved_tpr = c.achieved_tpr,
            count = c.count,
            "calibrated"
        );
    }
    tracing::info!("wrote {}", job.out.display());
    Ok(ExportReport {
        out: job.out.clone(),
        metadata: meta,
        classes_without_calibration: fallback,
    })
}

/// The exporter's input for `meta`.
fn build(
    meta: &DetectorMetadata,
    weights: &Weights,
    threshold: Option<Threshold>,
) -> Result<crate::onnx::proto::ModelProto> {
    let preprocess = match meta.input {
        InputKind::Float => None,
        InputKind::Uint8 => {
            let (mean, std) = meta.mean_std();
            let three = |v: &[f64]| -> Result<[f32; 3]> {
                match v {
                    [a, b, c] => Ok([*a as f32, *b as f32, *c as f32]),
                    _ => Err(Error::InvalidValue {
                        key: "preprocess".to_owned(),
                        msg: format!(
                            "baked-in preprocessing needs 3 channels, the evaluation transform has {}",
                            v.len()
                        ),
                    }),
                }
            };
            Some(Preprocess {
                mean: three(&mean)?,
                std: three(&std)?,
            })
        }
    };
    let spec = ClassifierExport {
        arch: meta.network.arch(),
        head: meta.network.head.clone(),
        score: meta.score,
        threshold,
        preprocess,
    };
    let props = meta.to_props();
    let refs: Vec<(&str, &str)> = props
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    export_classifier(&spec, weights, &refs)
}

fn info_of(
    c: &Calibrated,
    per_class: Option<Vec<f32>>,
    tpr: f64,
    source: &str,
    sha256: String,
) -> CalibrationInfo {
    CalibrationInfo {
        threshold: c.threshold,
        per_class,
        target_tpr: tpr,
        achieved_tpr: c.achieved_tpr,
        count: c.count,
        source: source.to_owned(),
        sha256,
    }
}

/// Scores the calibration images through the threshold-less graph and computes the threshold(s).
fn calibrate_on_images(
    job: &ExportJob,
    meta: &DetectorMetadata,
    weights: &Weights,
    paths: &[PathBuf],
    progress: &dyn Progress,
) -> Result<(Threshold, CalibrationInfo, Vec<String>)> {
    let (files, ignored) = collect_inputs(paths)?;
    if ignored > 0 {
        tracing::info!("calibration: {ignored} files without an image extension left out");
    }
    let bytes = encode_model(&build(meta, weights, None)?);
    let mut detector = Detector::from_bytes(&bytes, "detector (calibration pass)", &job.session)?;
    let mut scores = Vec::with_capacity(files.len());
    let mut predicted = Vec::with_capacity(files.len());
    let mut failed = Vec::new();
    score_files(&mut detector, &files, job.batch, progress, &mut |row| {
        match row.result {
            Ok(s) => {
                scores.push(s.score);
                predicted.push(s.class_index);
            }
            Err(e) => failed.push(e),
        }
        Ok(())
    })?;
    if !failed.is_empty() {
        let more = failed.len().saturating_sub(3);
        let mut msg = failed
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if more > 0 {
            msg.push_str(&format!("; and {more} more"));
        }
        return Err(Error::InvalidValue {
            key: "calibration".to_owned(),
            msg: format!(
                "{} of {} calibration images could not be scored ({msg}); fix or remove them",
                failed.len(),
                files.len()
            ),
        });
    }
    let sha = image_set_sha256(&files)?;
    thresholds_from(job, meta, &scores, &predicted, "images", sha)
}

/// Scores the images of a dataset (`[data.val]`) through the threshold-less graph and computes the
/// threshold(s). The calibration hash is the sha256 of every decoded image's size and pixels, in order.
fn calibrate_on_dataset(
    job: &ExportJob,
    meta: &DetectorMetadata,
    weights: &Weights,
    source: &crate::data::DataSource,
    progress: &dyn Progress,
) -> Result<(Threshold, CalibrationInfo, Vec<String>)> {
    let dataset = source.open()?;
    let bytes = encode_model(&build(meta, weights, None)?);
    let mut detector = Detector::from_bytes(&bytes, "detector (calibration pass)", &job.session)?;
    let pre = detector.preprocessor();
    let mut scores = Vec::with_capacity(dataset.len());
    let mut predicted = Vec::with_capacity(dataset.len());
    let mut hasher = Sha256::new();
    progress.start("calibrate", dataset.len() as u64, 0);
    let result = (|| -> Result<()> {
        let indices: Vec<usize> = (0..dataset.len()).collect();
        for chunk in indices.chunks(job.batch.max(1)) {
            let mut prepared = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let img = dataset.get(i)?;
                hasher.update((img.width() as u64).to_le_bytes());
                hasher.update((img.height() as u64).to_le_bytes());
                hasher.update(img.data());
                prepared.push(pre.prepare(img).map_err(|e| Error::Data {
                    path: source.path.clone(),
                    line: None,
                    msg: format!("{}: {e}", dataset.describe(i)),
                })?);
            }
            let refs: Vec<&_> = prepared.iter().collect();
            for s in detector.score(&refs)? {
                scores.push(s.score);
                predicted.push(s.class_index);
            }
            progress.advance(chunk.len() as u64);
        }
        Ok(())
    })();
    progress.finish();
    result?;
    let sha = hex(&hasher.finalize());
    thresholds_from(job, meta, &scores, &predicted, "dataset", sha)
}

/// The global or per-class threshold(s) of ID calibration scores and their predicted classes.
fn thresholds_from(
    job: &ExportJob,
    meta: &DetectorMetadata,
    scores: &[f32],
    predicted: &[usize],
    source: &str,
    sha: String,
) -> Result<(Threshold, CalibrationInfo, Vec<String>)> {
    let global = threshold_at_tpr(scores, job.target_tpr)?;
    if !job.per_class {
        let info = info_of(&global, None, job.target_tpr, source, sha);
        return Ok((Threshold::Global(global.threshold), info, Vec::new()));
    }
    let per = per_class_thresholds(scores, predicted, meta.classes.len(), job.target_tpr)?;
    let mut missing = Vec::new();
    let values: Vec<f32> = per
        .iter()
        .zip(&meta.classes)
        .map(|(c, name)| match c {
            Some(c) => c.threshold,
            None => {
                missing.push(name.clone());
                global.threshold
            }
        })
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            "per-class thresholds: no calibration image is predicted as {} of {} classes ({}); they use the \
             global threshold {}",
            missing.len(),
            values.len(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            global.threshold
        );
    }
    // Achieved TPR of the per-class rule on the whole set: each image against its class's threshold.
    let accepted = scores
        .iter()
        .zip(predicted)
        .filter(|&(&s, &c)| s >= values[c])
        .count();
    let overall = Calibrated {
        threshold: global.threshold,
        achieved_tpr: accepted as f64 / scores.len() as f64,
        count: scores.len(),
    };
    let info = info_of(&overall, Some(values.clone()), job.target_tpr, source, sha);
    Ok((Threshold::PerClass(values), info, missing))
}

/// sha256 of the sorted per-file sha256 lines (see the module docs).
pub fn image_set_sha256(files: &[PathBuf]) -> Result<String> {
    let mut lines: Vec<String> = files
        .par_iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            Ok(hex(&Sha256::digest(&bytes)))
        })
        .collect::<Result<_>>()?;
    lines.sort();
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The training config's hash from the checkpoint's `extra`: `config_sha256` (or `config_hash`).
fn training_config_hash(info: &CheckpointInfo) -> Option<String> {
    ["config_sha256", "config_hash"].iter().find_map(|k| {
        info.extra
            .get(*k)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    })
}

/// The network, class names and evaluation transform: from the checkpoint's metadata, or from the
/// overrides and the weights' shapes when it has none.
fn resolve_network(
    path: &Path,
    info: Option<CheckpointInfo>,
    weights: &Weights,
    over: &NetworkOverride,
) -> Result<(NetworkSpec, Vec<String>, Pipeline, Option<CheckpointInfo>)> {
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    let (network, classes, transform) = match &info {
        Some(info) => {
            let n = &info.network;
            if let Some(d) = over.depth
                && d != n.depth
            {
                return Err(bad(format!(
                    "holds a {:?} network, --arch says {d:?}",
                    n.depth
                )));
            }
            if let Some(s) = over.stem
                && s != n.stem
            {
                return Err(bad(format!(
                    "holds a network with the {:?} stem, --stem says {s:?}",
                    n.stem
                )));
            }
            (n.clone(), info.classes.clone(), info.eval_transform.clone())
        }
        None => {
            let (Some(depth), Some(stem)) = (over.depth, over.stem) else {
                return Err(bad(
                    "has no dream-ood metadata (a PyTorch state_dict?); give --arch and --stem"
                        .into(),
                ));
            };
            let dim = |name: &str, axis: usize| {
                weights
                    .get(name)
                    .and_then(|t| t.dims.get(axis).copied())
                    .ok_or_else(|| bad(format!("has no tensor `{name}` to size the network from")))
            };
            let network = NetworkSpec {
                depth,
                stem,
                in_channels: dim("encoder.conv1.weight", 1)? as i64,
                width: dim("encoder.conv1.weight", 0)? as i64,
                head: "fc".to_owned(),
                out_dim: dim("fc.weight", 0)? as i64,
            };
            let classes = (0..network.out_dim).map(|i| i.to_string()).collect();
            let transform = match stem {
                Stem::Cifar => Pipeline::cifar_test(),
                Stem::Imagenet => Pipeline::imagenet_test(256, 224),
            };
            if over.classes.is_none() {
                tracing::warn!(
                    "no class names in the checkpoint or on the command line: using 0..{}",
                    network.out_dim
                );
            }
            if over.eval_transform.is_none() {
                tracing::warn!(
                    "no evaluation transform in the checkpoint or on the command line: using the {stem:?} test preset {transform:?}"
                );
            }
            (network, classes, transform)
        }
    };
    if network.head != "fc" {
        return Err(bad(format!(
            "has a `{}` head (a stage-1 latent encoder?); export needs a classifier with an `fc` head",
            network.head
        )));
    }
    Ok((
        network,
        over.classes.clone().unwrap_or(classes),
        over.eval_transform.clone().unwrap_or(transform),
        info,
    ))
}
