//! Stage 5, evaluation: how well a detector's scores separate in-distribution (ID) from
//! out-of-distribution (OOD) inputs.
//!
//! ```text
//!  checkpoint ──► collect (network over ID train subset, ID test, each OOD set; ODIN pass) ──► features, logits
//!        scores/ (MSP, MaxLogit, Energy, ODIN, Mahalanobis, KNN, ReAct, ViM; fitted on ID train) ──► per-image
//!        metrics (AUROC, AUPR-In/Out, FPR@95 by a named rule) ──► report (JSON, CSV, Markdown), plots (PNG)
//! ```
//!
//! - [`evaluate`]: the `dream-ood eval` job, driven by [`config::EvalConfig`] (`[eval]`) and `[data]`.
//! - [`collect`]: one network pass over a dataset with the checkpoint's evaluation transform.
//! - [`scores`]: every OOD score, each defined once, higher = more in-distribution.
//! - [`metrics`], [`fpr`]: AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR under the rule of a named codebase,
//!   exact with ties and equal to scikit-learn's (or the named codebase's) value in f64
//!   (`tests/fixtures/metrics/`, made by `tools/make_metric_fixtures.py`).
//! - [`report`], [`plots`]: `metrics.json`, `metrics.csv`, `report.md`; score histograms and ROC curves.
//! - [`score_file`]: reading score files (`.npy` or text) for `dream-ood metrics`.
//!
//! Reference: the paper reports FPR95 / AUROC / AUPR as computed by `utils/display_results.py` of the official
//! code (Hendrycks' OE code; SPEC §5.2), with ID as the positive class.

pub mod collect;
pub mod config;
pub mod evaluate;
pub mod fpr;
pub mod metrics;
pub mod plots;
pub mod report;
pub mod score_file;
pub mod scores;
