//! What `dream-ood eval` found, and its three renderings: `metrics.json` (everything, for machines),
//! `metrics.csv` (one row per method × score × OOD set, plus a `mean` row per method × score) and
//! `report.md` (tables for people, with the settings and what was fitted on what).
//!
//! Metric values are fractions in [0, 1] in JSON and CSV; the Markdown shows percentages, as the papers do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use super::config::EvalConfig;
use super::metrics::Metrics;
use super::scores::ScoreKind;
use crate::data::source::Preprocess;

/// A dataset as evaluation used it.
#[derive(Debug, Clone, Serialize)]
pub struct SetInfo {
    /// `id_test`, `fit`, or the OOD set's name.
    pub name: String,
    pub path: PathBuf,
    /// Images in the set (after the config's own views).
    pub available: usize,
    /// Images scored (a seeded subset under the paper protocol or `fit_images`).
    pub used: usize,
    /// Seed of the subset, when one was drawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset_seed: Option<u64>,
    /// How its images became network inputs (`native`: at their own size); written only when not the
    /// checkpoint's transform.
    #[serde(skip_serializing_if = "Preprocess::is_default")]
    pub preprocess: Preprocess,
}

/// The unweighted mean of the metrics over the OOD sets (as the paper and OpenOOD average).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanMetrics {
    pub fpr95: f64,
    pub auroc: f64,
    pub aupr_in: f64,
    pub aupr_out: f64,
    pub aupr_in_trapezoid: f64,
    pub aupr_out_trapezoid: f64,
}

impl MeanMetrics {
    /// The mean of `metrics` (at least one).
    pub fn of<'a>(metrics: impl IntoIterator<Item = &'a Metrics>) -> MeanMetrics {
        let all: Vec<&Metrics> = metrics.into_iter().collect();
        let n = all.len().max(1) as f64;
        let mean = |f: fn(&Metrics) -> f64| all.iter().map(|m| f(m)).sum::<f64>() / n;
        MeanMetrics {
            fpr95: mean(|m| m.fpr95),
            auroc: mean(|m| m.auroc),
            aupr_in: mean(|m| m.aupr_in),
            aupr_out: mean(|m| m.aupr_out),
            aupr_in_trapezoid: mean(|m| m.aupr_in_trapezoid),
            aupr_out_trapezoid: mean(|m| m.aupr_out_trapezoid),
        }
    }
}

/// One score of one method.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreResult {
    pub score: ScoreKind,
    /// Metrics per OOD set, by name.
    pub sets: BTreeMap<String, Metrics>,
    pub mean: MeanMetrics,
}

/// What the fitted scores learnt from the ID training features.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fitted {
    /// ID training images they were fitted on.
    pub images: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub react_threshold: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vim_dim: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vim_alpha: Option<f64>,
}

/// One checkpoint's results.
#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    /// The method's name (`--checkpoint NAME=…`, the checkpoint's `method`, or its file stem).
    pub name: String,
    pub checkpoint: PathBuf,
    /// Top-1 accuracy on the ID test set (images with a label).
    pub id_accuracy: f64,
    /// Feature width D and classes C of the network.
    pub feature_dim: i64,
    pub num_classes: i64,
    pub fitted: Fitted,
    pub scores: Vec<ScoreResult>,
}

/// Everything `metrics.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub protocol: &'static str,
    pub seed: u64,
    pub device: String,
    pub settings: EvalConfig,
    pub id_test: SetInfo,
    /// The ID training subset the fitted scores were fitted on (absent when no score needs fitting).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit: Option<SetInfo>,
    pub ood_sets: Vec<SetInfo>,
    pub methods: Vec<MethodReport>,
    /// The dream-ood version that wrote it.
    pub writer: String,
}

const CSV_HEADER: &str = "method,score,ood_set,n_id,n_ood,fpr95,auroc,aupr_in,aupr_out,\
                          aupr_in_trapezoid,aupr_out_trapezoid,convention";

impl EvalReport {
    /// `metrics.csv`: a header, then per method × score one row per OOD set and a `mean` row (empty
    /// `n_ood`). Names never need quoting: they are checked to be `[A-Za-z0-9_.-]`.
    pub fn to_csv(&self) -> String {
        let convention = self.settings.convention.name();
        let mut out = format!("{CSV_HEADER}\n");
        for m in &self.methods {
            for s in &m.scores {
                for (set, x) in &s.sets {
                    let _ = writeln!(
                        out,
                        "{},{},{set},{},{},{},{},{},{},{},{},{convention}",
                        m.name,
                        s.score,
                        x.n_id,
                        x.n_ood,
                        x.fpr95,
                        x.auroc,
                        x.aupr_in,
                        x.aupr_out,
                        x.aupr_in_trapezoid,
                        x.aupr_out_trapezoid
                    );
                }
                let x = &s.mean;
                let n_id = s.sets.values().next().map_or(0, |x| x.n_id);
                let _ = writeln!(
                    out,
                    "{},{},mean,{n_id},,{},{},{},{},{},{},{convention}",
                    m.name,
                    s.score,
                    x.fpr95,
                    x.auroc,
                    x.aupr_in,
                    x.aupr_out,
                    x.aupr_in_trapezoid,
                    x.aupr_out_trapezoid
                );
            }
        }
        out
    }

    /// `report.md`.
    pub fn to_markdown(&self) -> String {
        let s = &self.settings;
        let pct = |v: f64| format!("{:.2}", 100.0 * v);
        let mut md = String::from("# Dream-OOD evaluation\n\n");
        let protocol = match self.protocol {
            "paper" => format!(
                "**paper**: each OOD set is a seeded random subset of ⌊n_ID_test / 5⌋ = {} images (the \
                 official code's size; a smaller set is used whole)",
                self.id_test.used / 5
            ),
            _ => "**full**: every image of every OOD set".to_owned(),
        };
        let _ = writeln!(md, "- OOD protocol: {protocol}.");
        let _ = writeln!(
            md,
            "- Metrics: FPR@95TPR under the `{}` rule, AUROC, AUPR-In and AUPR-Out (average precision, ID \
             resp. OOD positive); all in %. Every score is a confidence: higher = more in-distribution.",
            s.convention.name()
        );
        let _ = writeln!(
            md,
            "- ID test set: `{}` ({} images).",
            self.id_test.path.display(),
            self.id_test.used
        );
        match &self.fit {
            Some(f) => {
                let _ = writeln!(
                    md,
                    "- Fitted scores (Mahalanobis, KNN, ReAct, ViM) were fitted on ID training images from `{}`: \
                     {} of {}{}.",
                    f.path.display(),
                    f.used,
                    f.available,
                    f.subset_seed
                        .map(|seed| format!(" (seeded random subset, seed {seed})"))
                        .unwrap_or_default()
                );
            }
            None => md.push_str("- No score needed fitting.\n"),
        }
        let _ = writeln!(
            md,
            "- Settings: energy T = {}; ODIN T = {}, ε = {}; KNN k = {}; ReAct percentile {}; ViM dim {}. \
             Seed {}; device {}.",
            s.energy_temperature,
            s.odin_temperature,
            s.odin_epsilon,
            s.knn_k,
            s.react_percentile,
            if s.vim_dim == 0 {
                "auto".to_owned()
            } else {
                s.vim_dim.to_string()
            },
            self.seed,
            self.device
        );
        md.push_str("\n| OOD set | path | images | scored | input |\n|---|---|---:|---:|---|\n");
        for o in &self.ood_sets {
            let input = match o.preprocess {
                Preprocess::ResizeCrop => "evaluation transform",
                Preprocess::Native => "native size (no resize, no crop)",
            };
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {} | {input} |",
                o.name,
                o.path.display(),
                o.available,
                o.used
            );
        }
        for m in &self.methods {
            let _ = writeln!(md, "\n## {}\n", m.name);
            let _ = writeln!(
                md,
                "Checkpoint `{}`: {} classes, {}-d features. **ID accuracy {}%** on {} test images.",
                m.checkpoint.display(),
                m.num_classes,
                m.feature_dim,
                pct(m.id_accuracy),
                self.id_test.used
            );
            let f = &m.fitted;
            let mut fitted = vec![];
            if let Some(t) = f.react_threshold {
                fitted.push(format!("ReAct threshold {t:.4}"));
            }
            if let (Some(d), Some(a)) = (f.vim_dim, f.vim_alpha) {
                fitted.push(format!("ViM dim {d}, α = {a:.4}"));
            }
            if !fitted.is_empty() {
                let _ = writeln!(
                    md,
                    "Fitted on {} ID training images: {}.",
                    f.images,
                    fitted.join("; ")
                );
            }
            md.push_str("\n### Mean over the OOD sets\n\n| score | FPR95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |\n|---|---:|---:|---:|---:|\n");
            for r in &m.scores {
                let x = &r.mean;
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    r.score,
                    pct(x.fpr95),
                    pct(x.auroc),
                    pct(x.aupr_in),
                    pct(x.aupr_out)
                );
            }
            md.push_str("\n### Per OOD set\n\n| score | OOD set | FPR95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |\n|---|---|---:|---:|---:|---:|\n");
            for r in &m.scores {
                for (set, x) in &r.sets {
                    let _ = writeln!(
                        md,
                        "| {} | {set} | {} | {} | {} | {} |",
                        r.score,
                        pct(x.fpr95),
                        pct(x.auroc),
                        pct(x.aupr_in),
                        pct(x.aupr_out)
                    );
                }
            }
            if s.plots {
                md.push_str("\nPlots: ");
                let links: Vec<String> = m
                    .scores
                    .iter()
                    .map(|r| {
                        format!(
                            "{0} [histograms](plots/{1}/{0}_hist.png), [ROC](plots/{1}/{0}_roc.png)",
                            r.score, m.name
                        )
                    })
                    .collect();
                md.push_str(&links.join("; "));
                md.push('\n');
            }
        }
        let _ = writeln!(
            md,
            "\nPer-image scores: `scores/<method>/<score>/id_test.npy` and `<ood set>.npy` (float64), from \
             which any tool can recompute these metrics. Written by {}.",
            self.writer
        );
        md
    }
}
