//! Stage 5, evaluation: how well a detector's scores separate in-distribution (ID) from
//! out-of-distribution (OOD) inputs.
//!
//! Today this is the metrics layer only (`dream-ood metrics`): it reads two files of confidence scores, where
//! higher means more in-distribution ([`score_file`]), and computes AUROC, AUPR-In, AUPR-Out ([`metrics`]) and
//! FPR at 95% TPR under the rule of a named codebase ([`fpr`]). Every number is exact with ties and equals
//! scikit-learn's (or the named codebase's) value in f64; `tests/fixtures/metrics/` holds the references,
//! made by `tools/make_metric_fixtures.py`. Scoring a trained detector on image folders (`dream-ood eval`)
//! arrives with stage 4.
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
