//! `dream-ood eval`: score every checkpoint on the ID test set and each OOD set, and write the results.
//!
//! For each checkpoint: rebuild its network from its [`CheckpointInfo`], load the weights, and run it with
//! **its own** evaluation transform over (1) a seeded subset of the ID training set, when a fitted score is
//! asked for, (2) the ID test set, (3) each OOD set, the paper's seeded fifth or all of it; an OOD set with
//! `preprocess = "native"` skips the transform's Resize and CenterCrop and is scored at its own image size,
//! as the official CIFAR-100 script scores LSUN-C and iSUN (SPEC §5.3). Then fit the
//! fitted scores, score every set, compute the metrics per OOD set and their mean, and write:
//!
//! ```text
//! <out>/metrics.json  metrics.csv  report.md
//! <out>/scores/<method>/<score>/id_test.npy, <ood set>.npy     float64, one score per image
//! <out>/plots/<method>/<score>_hist.png, <score>_roc.png       when plots = true
//! ```
//!
//! Every file is written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor, nn};

use super::collect::{CollectOptions, Collected, OdinPass, collect};
use super::config::{EvalConfig, OodProtocol};
use super::metrics::{self, Metrics};
use super::plots;
use super::report::{EvalReport, Fitted, MeanMetrics, MethodReport, ScoreResult, SetInfo};
use super::scores::{
    Head, ScoreKind, knn::Knn, logit, mahalanobis::Mahalanobis, odin, react::React, vim,
};
use crate::config::{Config, DataConfig};
use crate::data::source::{Limit, Preprocess, View};
use crate::data::{DataSource, Dataset, OnError, Pipeline};
use crate::files::write_atomic;
use crate::nn::{CheckpointInfo, ResNetWithHead, checkpoint};
use crate::progress::Progress;
use crate::{Error, Result};

/// The file name of the ID test scores in each `scores/<method>/<score>/` folder.
pub const ID_TEST: &str = "id_test";

/// One evaluation run, resolved.
#[derive(Debug, Clone)]
pub struct EvalJob {
    /// Datasets (paths resolved).
    pub data: DataConfig,
    pub settings: EvalConfig,
    /// `(name, path)`; a `None` name is taken from the checkpoint's `method` or its file stem.
    pub checkpoints: Vec<(Option<String>, PathBuf)>,
    pub out_dir: PathBuf,
    /// `run.seed`: the fit subset and the OOD subsets derive from it.
    pub seed: u64,
    pub device: Device,
    /// Decoding threads.
    pub threads: usize,
}

impl EvalJob {
    /// The job a loaded config describes; `checkpoints` empty means the model `dream-ood train` writes for
    /// `[train] method`: `<run.out_dir>/train/<method>/model.safetensors` (or `[train] out`).
    pub fn from_config(
        config: &Config,
        checkpoints: Vec<(Option<String>, PathBuf)>,
        device: Device,
    ) -> EvalJob {
        let checkpoints = if checkpoints.is_empty() {
            let dir = config.train.out.clone().unwrap_or_else(|| {
                config
                    .run
                    .out_dir
                    .join("train")
                    .join(config.train.method.name())
            });
            vec![(None, dir.join("model.safetensors"))]
        } else {
            checkpoints
        };
        let threads = match config.run.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        EvalJob {
            data: config.data.clone(),
            settings: config.eval.clone(),
            checkpoints,
            out_dir: config
                .eval
                .out
                .clone()
                .unwrap_or_else(|| config.run.out_dir.join("eval")),
            seed: config.run.seed,
            device,
            threads,
        }
    }
}

fn invalid(key: &str, msg: String) -> Error {
    Error::InvalidValue {
        key: key.to_owned(),
        msg,
    }
}

/// Names become folder and file names and CSV fields: keep them plain.
fn check_name(key: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        return Err(invalid(
            key,
            format!(
                "\"{name}\" is not usable as a file name; use letters, digits, '_', '-' and '.'"
            ),
        ));
    }
    Ok(())
}

/// A seed for one named draw, from the run seed (FNV-1a of the tag, mixed in).
fn derive_seed(seed: u64, tag: &str) -> u64 {
    let h = tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    seed ^ h
}

/// A dataset opened for evaluation, with what the report says about it.
struct OpenSet {
    data: Arc<dyn Dataset>,
    info: SetInfo,
    on_error: OnError,
}

impl OpenSet {
    /// The pipeline this set is run through: the checkpoint's evaluation transform, or, for a `native`
    /// set, the same without its size-setting steps.
    fn pipeline(&self, eval_transform: &Pipeline) -> Pipeline {
        match self.info.preprocess {
            Preprocess::ResizeCrop => eval_transform.clone(),
            Preprocess::Native => eval_transform.native(),
        }
    }

    /// Names the set in a batch-size error of a `native` set (its images differ in size), with the fix;
    /// other errors pass unchanged.
    fn explain(&self, e: Error) -> Error {
        match (self.info.preprocess, e) {
            (
                Preprocess::Native,
                Error::Shape {
                    what,
                    expected,
                    got,
                },
            ) => Error::Shape {
                what: format!(
                    "data.ood.{} (preprocess = \"native\": images keep their own size, so a batch needs \
                     one size; set preprocess = \"resize_crop\" for a set of mixed sizes, or eval.batch_size \
                     = 1): {what}",
                    self.info.name
                ),
                expected,
                got,
            },
            (_, e) => e,
        }
    }
}

fn open_set(name: &str, src: &DataSource, subset: Option<(usize, u64)>) -> Result<OpenSet> {
    let full = src.open()?;
    let available = full.len();
    let (data, subset_seed): (Arc<dyn Dataset>, _) = match subset {
        Some((count, seed)) if count < available => (
            Arc::new(View::all(full).with_limit(&Limit { count, seed })),
            Some(seed),
        ),
        _ => (full, None),
    };
    Ok(OpenSet {
        info: SetInfo {
            name: name.to_owned(),
            path: src.path.clone(),
            available,
            used: data.len(),
            subset_seed,
            preprocess: src.preprocess,
        },
        data,
        on_error: src.on_error,
    })
}

/// The fitted scores of one network.
struct Scorer {
    head: Head,
    mahalanobis: Option<Mahalanobis>,
    knn: Option<Knn>,
    react: Option<React>,
    vim: Option<vim::Vim>,
}

impl Scorer {
    fn fit(
        settings: &EvalConfig,
        head: Head,
        fit: Option<&Collected>,
        classes: i64,
        device: Device,
    ) -> Result<(Scorer, Fitted)> {
        let mut s = Scorer {
            head,
            mahalanobis: None,
            knn: None,
            react: None,
            vim: None,
        };
        let mut fitted = Fitted::default();
        let Some(fit) = fit else {
            return Ok((s, fitted));
        };
        fitted.images = fit.len();
        let feats = fit.features.to_device(device);
        for kind in &settings.scores {
            match kind {
                ScoreKind::Mahalanobis => {
                    s.mahalanobis = Some(Mahalanobis::fit(&feats, &fit.labels, classes)?)
                }
                ScoreKind::Knn => s.knn = Some(Knn::fit(&feats, settings.knn_k)?),
                ScoreKind::React => {
                    let r = React::fit(&feats, settings.react_percentile)?;
                    fitted.react_threshold = Some(r.threshold);
                    s.react = Some(r);
                }
                ScoreKind::Vim => {
                    let dim = match settings.vim_dim {
                        0 => vim::default_dim(s.head.feature_dim() as usize),
                        d => d,
                    };
                    let v = vim::Vim::fit(&feats, &s.head, dim)?;
                    fitted.vim_dim = Some(dim);
                    fitted.vim_alpha = Some(v.alpha);
                    s.vim = Some(v);
                }
                _ => {}
            }
        }
        Ok((s, fitted))
    }

    fn score(&self, kind: ScoreKind, set: &Collected, settings: &EvalConfig) -> Result<Vec<f64>> {
        let missing = || Error::Check {
            what: format!("score {kind}"),
            msg: "was not fitted".into(),
        };
        match kind {
            ScoreKind::Msp => logit::msp(&set.logits),
            ScoreKind::MaxLogit => logit::max_logit(&set.logits),
            ScoreKind::Energy => logit::energy(&set.logits, settings.energy_temperature),
            ScoreKind::Odin => odin::score(
                set.odin_logits.as_ref().ok_or_else(missing)?,
                settings.odin_temperature,
            ),
            ScoreKind::Mahalanobis => self
                .mahalanobis
                .as_ref()
                .ok_or_else(missing)?
                .score(&set.features),
            ScoreKind::Knn => self.knn.as_ref().ok_or_else(missing)?.score(&set.features),
            ScoreKind::React => self
                .react
                .as_ref()
                .ok_or_else(missing)?
                .score(&set.features, &self.head),
            ScoreKind::Vim => self
                .vim
                .as_ref()
                .ok_or_else(missing)?
                .score(&set.features, &self.head),
        }
    }
}

/// Writes a float64 `.npy` vector atomically.
pub fn write_scores_npy(path: &Path, scores: &[f64]) -> Result<()> {
    use ndarray_npy::WriteNpyExt;
    let mut bytes = Vec::new();
    ndarray::Array1::from(scores.to_vec())
        .write_npy(&mut bytes)
        .map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: None,
            msg: format!("cannot encode .npy: {e}"),
        })?;
    write_atomic(path, &bytes)
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Checks the config for what evaluation needs, before any work.
fn check_job(job: &EvalJob) -> Result<()> {
    if let Err((field, msg)) = job.data.check() {
        return Err(invalid(&format!("data.{field}"), msg));
    }
    if job.data.test.is_none() {
        return Err(invalid(
            "data.test",
            "missing: eval needs the ID test set ([data.test])".into(),
        ));
    }
    if job.data.ood.is_empty() {
        return Err(invalid(
            "data.ood",
            "no OOD set: eval needs at least one [data.ood.<name>] table".into(),
        ));
    }
    if job.settings.needs_fit() && job.data.train.is_none() {
        let fitted: Vec<_> = job
            .settings
            .scores
            .iter()
            .filter(|s| s.needs_fit())
            .map(|s| s.name())
            .collect();
        return Err(invalid(
            "data.train",
            format!(
                "missing: {} are fitted on ID training features; add [data.train] or drop them from eval.scores",
                fitted.join(", ")
            ),
        ));
    }
    for name in job.data.ood.keys() {
        check_name(&format!("data.ood.{name}"), name)?;
        if name == ID_TEST || name == "mean" {
            return Err(invalid(
                &format!("data.ood.{name}"),
                format!(
                    "\"{name}\" is reserved for the ID test scores and the mean rows; rename the set"
                ),
            ));
        }
    }
    Ok(())
}

/// Runs the evaluation and writes its files; returns the report it wrote.
pub fn run(job: &EvalJob, progress: &dyn Progress) -> Result<EvalReport> {
    check_job(job)?;
    let settings = &job.settings;
    let _span = tracing::info_span!("eval").entered();

    // 1. Datasets, opened once for every checkpoint.
    let test = open_set(
        ID_TEST,
        job.data.test.as_ref().expect("invariant: checked"),
        None,
    )?;
    let fit = match (&job.data.train, settings.needs_fit()) {
        (Some(src), true) => {
            let count = if settings.fit_images == 0 {
                usize::MAX
            } else {
                settings.fit_images
            };
            Some(open_set(
                "fit",
                src,
                Some((count, derive_seed(job.seed, "eval/fit"))),
            )?)
        }
        _ => None,
    };
    let mut oods = Vec::new();
    for (name, src) in &job.data.ood {
        let subset = match settings.protocol {
            OodProtocol::Paper => Some((
                (test.info.used / 5).max(1),
                derive_seed(job.seed, &format!("eval/ood/{name}")),
            )),
            OodProtocol::Full => None,
        };
        let set = open_set(name, src, subset)?;
        tracing::info!(
            set = name.as_str(),
            images = set.info.used,
            of = set.info.available,
            preprocess = src.preprocess.name(),
            "OOD set"
        );
        oods.push(set);
    }

    // 2. Each checkpoint.
    let mut methods: Vec<MethodReport> = Vec::new();
    for (name, path) in &job.checkpoints {
        let method = evaluate_checkpoint(
            job,
            name.as_deref(),
            path,
            (&test, fit.as_ref(), &oods),
            progress,
        )?;
        if methods.iter().any(|m| m.name == method.name) {
            return Err(invalid(
                "--checkpoint",
                format!(
                    "two checkpoints are named \"{}\"; name them with NAME=PATH",
                    method.name
                ),
            ));
        }
        methods.push(method);
    }

    // 3. The reports.
    let report = EvalReport {
        protocol: settings.protocol.name(),
        seed: job.seed,
        device: crate::runtime::device_name(job.device),
        settings: settings.clone(),
        id_test: test.info.clone(),
        fit: fit.map(|f| f.info),
        ood_sets: oods.into_iter().map(|o| o.info).collect(),
        methods,
        writer: format!("dream-ood {}", env!("CARGO_PKG_VERSION")),
    };
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| invalid("metrics.json", e.to_string()))?;
    write_atomic(
        &job.out_dir.join("metrics.json"),
        format!("{json}\n").as_bytes(),
    )?;
    write_atomic(&job.out_dir.join("metrics.csv"), report.to_csv().as_bytes())?;
    write_atomic(
        &job.out_dir.join("report.md"),
        report.to_markdown().as_bytes(),
    )?;
    tracing::info!(out = %job.out_dir.display(), "eval done");
    Ok(report)
}

/// The method's name: the one given, else the checkpoint's `method`, else its file stem.
fn method_name(name: Option<&str>, info: &CheckpointInfo, path: &Path) -> String {
    if let Some(n) = name {
        return n.to_owned();
    }
    info.extra
        .get("method")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
}

/// Reads a checkpoint's info, checks that it is a usable classifier, and loads its network on the device.
fn load_network(
    job: &EvalJob,
    path: &Path,
) -> Result<(CheckpointInfo, nn::VarStore, ResNetWithHead)> {
    let info = checkpoint::read_info(path)?;
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    if info.network.head != "fc" {
        return Err(bad(format!(
            "a {} checkpoint with head `{}`; eval needs a classifier (head `fc`, a stage-4 detector)",
            info.stage, info.network.head
        )));
    }
    if info.eval_transform.channels as i64 != info.network.in_channels {
        return Err(bad(format!(
            "the evaluation transform makes {}-channel images but the network takes {}; the checkpoint is \
             inconsistent",
            info.eval_transform.channels, info.network.in_channels
        )));
    }
    let mut vs = nn::VarStore::new(job.device);
    let net = info.network.build(&vs.root());
    checkpoint::load_into(path, &mut vs)?;
    vs.freeze();
    Ok((info, vs, net))
}

/// What one network produced on every set.
struct Passes {
    fit: Option<Collected>,
    id: Collected,
    oods: BTreeMap<String, Collected>,
}

/// Runs the network over the fit subset, the ID test set and each OOD set (with the ODIN pass on the
/// scored sets when ODIN is asked for), with the checkpoint's evaluation transform (without its Resize and
/// CenterCrop for a `native` OOD set; ODIN's input-space step uses the same normalisation either way).
fn collect_passes(
    job: &EvalJob,
    method: &str,
    net: &ResNetWithHead,
    info: &CheckpointInfo,
    sets: (&OpenSet, Option<&OpenSet>, &[OpenSet]),
    progress: &dyn Progress,
) -> Result<Passes> {
    let (test, fit, oods) = sets;
    let settings = &job.settings;
    let pipeline = &info.eval_transform;
    let odin = settings
        .scores
        .contains(&ScoreKind::Odin)
        .then(|| OdinPass {
            temperature: settings.odin_temperature,
            epsilon: settings.odin_epsilon,
            std: pipeline
                .normalize
                .as_ref()
                .map(|n| n.std.clone())
                .unwrap_or_else(|| vec![1.0; pipeline.channels]),
        });
    let run = |set: &OpenSet, odin: Option<OdinPass>| {
        let opts = CollectOptions {
            batch_size: settings.batch_size,
            threads: job.threads,
            device: job.device,
            on_error: set.on_error,
            odin,
        };
        let stage = format!("eval {method} {}", set.info.name);
        let pipeline = set.pipeline(pipeline);
        collect(net, set.data.clone(), &pipeline, &opts, progress, &stage)
            .map_err(|e| set.explain(e))
    };
    let fit = fit.map(|f| run(f, None)).transpose()?;
    let id = run(test, odin.clone())?;
    let classes = info.network.out_dim;
    for (key, set) in [("data.test", Some(&id)), ("data.train", fit.as_ref())] {
        let max = set.map_or(-1, |s| i64::try_from(s.labels.max()).unwrap_or(-1));
        if max >= classes {
            return Err(invalid(
                key,
                format!("has label {max} but the checkpoint has {classes} classes"),
            ));
        }
    }
    let mut ood_passes = BTreeMap::new();
    for set in oods {
        ood_passes.insert(set.info.name.clone(), run(set, odin.clone())?);
    }
    Ok(Passes {
        fit,
        id,
        oods: ood_passes,
    })
}

/// Scores every set with one score, writes the `.npy` files (and plots), and computes the metrics.
fn score_one(
    job: &EvalJob,
    method: &str,
    kind: ScoreKind,
    scorer: &Scorer,
    passes: &Passes,
) -> Result<ScoreResult> {
    let settings = &job.settings;
    let dir = job.out_dir.join("scores").join(method).join(kind.name());
    create_dir(&dir)?;
    let id_scores = scorer.score(kind, &passes.id, settings)?;
    write_scores_npy(&dir.join(format!("{ID_TEST}.npy")), &id_scores)?;
    let mut sets = BTreeMap::new();
    let mut ood_scores = Vec::new();
    for (set_name, pass) in &passes.oods {
        let s = scorer.score(kind, pass, settings)?;
        write_scores_npy(&dir.join(format!("{set_name}.npy")), &s)?;
        let m: Metrics = metrics::compute(&id_scores, &s, settings.convention)?;
        sets.insert(set_name.clone(), m);
        ood_scores.push((set_name.clone(), s));
    }
    let mean = MeanMetrics::of(sets.values());
    tracing::info!(
        method,
        score = kind.name(),
        fpr95 = format!("{:.4}", mean.fpr95),
        auroc = format!("{:.4}", mean.auroc),
        "mean over OOD sets"
    );
    if settings.plots {
        let plot_dir = job.out_dir.join("plots").join(method);
        create_dir(&plot_dir)?;
        let title = format!("{method} / {kind}");
        let hist = plot_dir.join(format!("{kind}_hist.png"));
        plots::histograms(&hist, &title, &id_scores, &ood_scores)?;
        let roc = plot_dir.join(format!("{kind}_roc.png"));
        plots::roc_curves(&roc, &title, &id_scores, &ood_scores)?;
    }
    Ok(ScoreResult {
        score: kind,
        sets,
        mean,
    })
}

/// Evaluates one checkpoint: load, collect, fit, score, write.
fn evaluate_checkpoint(
    job: &EvalJob,
    name: Option<&str>,
    path: &Path,
    sets: (&OpenSet, Option<&OpenSet>, &[OpenSet]),
    progress: &dyn Progress,
) -> Result<MethodReport> {
    let (info, _vs, net) = load_network(job, path)?;
    let name = method_name(name, &info, path);
    check_name("--checkpoint", &name)?;
    let classes = info.network.out_dim;
    tracing::info!(method = name.as_str(), checkpoint = %path.display(), classes, "evaluating");
    let passes = collect_passes(job, &name, &net, &info, sets, progress)?;
    let bias = net
        .head
        .bs
        .as_ref()
        .ok_or_else(|| invalid("checkpoint", "the head has no bias".into()))?;
    let head = Head::new(&net.head.ws, bias)?;
    let (scorer, fitted) = Scorer::fit(
        &job.settings,
        head,
        passes.fit.as_ref(),
        classes,
        job.device,
    )?;
    let scores = job
        .settings
        .scores
        .iter()
        .map(|&kind| score_one(job, &name, kind, &scorer, &passes))
        .collect::<Result<Vec<_>>>()?;
    Ok(MethodReport {
        name,
        checkpoint: path.to_path_buf(),
        id_accuracy: accuracy(&passes.id),
        feature_dim: net.encoder.feature_dim(),
        num_classes: classes,
        fitted,
        scores,
    })
}

/// Top-1 accuracy over the rows with a label (≥ 0).
fn accuracy(set: &Collected) -> f64 {
    let labelled = set.labels.ge(0);
    let n = i64::try_from(labelled.sum(Kind::Int64)).unwrap_or(0);
    if n == 0 {
        return f64::NAN;
    }
    let correct: Tensor = set
        .logits
        .argmax(1, false)
        .eq_tensor(&set.labels)
        .logical_and(&labelled);
    i64::try_from(correct.sum(Kind::Int64)).unwrap_or(0) as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain() {
        check_name("k", "svhn_test-1.0").unwrap();
        for bad in ["", ".hidden", "a/b", "a b", "ä"] {
            assert!(check_name("data.ood.x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_seeds_differ_by_tag_and_follow_the_seed() {
        assert_ne!(derive_seed(0, "eval/ood/a"), derive_seed(0, "eval/ood/b"));
        assert_ne!(derive_seed(0, "eval/fit"), derive_seed(1, "eval/fit"));
        assert_eq!(derive_seed(5, "x"), derive_seed(5, "x"));
    }
}
