//! `[eval]`: which scores `dream-ood eval` computes, with which settings, under which OOD protocol.
//!
//! The datasets come from `[data]` (`test` is the ID test set, `train` the ID set the fitted scores are
//! fitted on, `ood.<name>` the OOD sets); the seed and device from `[run]`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fpr::Convention;
use super::scores::ScoreKind;

/// How much of each OOD set is scored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OodProtocol {
    /// The official code's: a random subset of ⌊n_ID_test / 5⌋ images of each OOD set (SPEC §5.3),
    /// seeded here (the official seeds are commented out). Deviation: the official loop stops at whole
    /// batches, so it scores 2,000 images on CIFAR (the same) but 960 rather than 1,000 on ImageNet-100.
    /// A set smaller than that is scored whole. The default.
    #[default]
    Paper,
    /// Every image of every OOD set.
    Full,
}

impl OodProtocol {
    /// The name in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            OodProtocol::Paper => "paper",
            OodProtocol::Full => "full",
        }
    }
}

/// `[eval]`. Defaults: the official test settings (SPEC §5) and each score's reference defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Scores to compute, any of msp, max_logit, energy, odin, mahalanobis, knn, react, vim. Default all.
    pub scores: Vec<ScoreKind>,
    /// `paper` (default) or `full`.
    pub protocol: OodProtocol,
    /// The FPR@95 rule: `hendrycks` (default; Dream-OOD's official code, ID positive), `knn-ood`,
    /// `id-first-tpr95` or `openood` (OpenOOD v1.5, OOD positive).
    pub convention: Convention,
    /// Images per forward pass. Default 200 (the official CIFAR `test_bs`).
    pub batch_size: usize,
    /// ID training images the fitted scores (Mahalanobis, KNN, ReAct, ViM) are fitted on: a seeded random
    /// subset of `[data.train]` (seed `run.seed`); 0 means all. Default 50000 (all of CIFAR's training set).
    pub fit_images: usize,
    /// Energy temperature T in `T·logsumexp(z/T)`. Default 1 (the official `--T 1`).
    pub energy_temperature: f64,
    /// ODIN temperature. Default 1000 (Liang et al.; the official `--T` for ODIN runs).
    pub odin_temperature: f64,
    /// ODIN input perturbation magnitude ε (0..1 pixel scale). Default 0.0014 (the official `--noise`).
    pub odin_epsilon: f64,
    /// KNN: the k of the k-th nearest ID training feature. Default 50 (Sun et al. 2022, CIFAR).
    pub knn_k: usize,
    /// ReAct: the percentile of ID activations to clip at. Default 90 (Sun et al. 2021).
    pub react_percentile: f64,
    /// ViM: principal dimensions; 0 picks by feature width (1000 for 2048, 512 for ≥ 768, 300 for 512, else
    /// D/2, as the ViM authors' code). Default 0.
    pub vim_dim: usize,
    /// Write PNG plots (score histograms ID vs each OOD set, ROC curves). Default true.
    pub plots: bool,
    /// Output folder. Relative to the config file's folder. Default `<run.out_dir>/eval`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            scores: ScoreKind::ALL.to_vec(),
            protocol: OodProtocol::Paper,
            convention: Convention::Hendrycks,
            batch_size: 200,
            fit_images: 50_000,
            energy_temperature: 1.0,
            odin_temperature: 1000.0,
            odin_epsilon: 0.0014,
            knn_k: 50,
            react_percentile: 90.0,
            vim_dim: 0,
            plots: true,
            out: None,
        }
    }
}

impl EvalConfig {
    /// Checks ranges; an error names the field.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.scores.is_empty() {
            return Err(("scores", "is empty; name at least one score".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.scores.iter().find(|s| !seen.insert(**s)) {
            return Err(("scores", format!("names \"{dup}\" twice")));
        }
        if self.batch_size == 0 {
            return Err(("batch_size", "must be at least 1, got 0".into()));
        }
        if self.knn_k == 0 {
            return Err(("knn_k", "must be at least 1, got 0".into()));
        }
        for (key, v) in [
            ("energy_temperature", self.energy_temperature),
            ("odin_temperature", self.odin_temperature),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err((key, format!("must be a positive number, got {v}")));
            }
        }
        if !(self.odin_epsilon.is_finite() && self.odin_epsilon >= 0.0) {
            return Err((
                "odin_epsilon",
                format!("must be >= 0, got {}", self.odin_epsilon),
            ));
        }
        if !(self.react_percentile > 0.0 && self.react_percentile <= 100.0) {
            return Err((
                "react_percentile",
                format!("must be in (0, 100], got {}", self.react_percentile),
            ));
        }
        Ok(())
    }

    /// Whether any configured score is fitted on ID training features.
    pub fn needs_fit(&self) -> bool {
        self.scores.iter().any(|s| s.needs_fit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field() {
        let mut c = EvalConfig::default();
        c.check().unwrap();
        c.scores = vec![ScoreKind::Knn, ScoreKind::Knn];
        assert_eq!(
            c.check().unwrap_err(),
            ("scores", "names \"knn\" twice".into())
        );
        c.scores = vec![ScoreKind::Energy];
        c.react_percentile = 0.0;
        assert_eq!(c.check().unwrap_err().0, "react_percentile");
        c.react_percentile = 90.0;
        c.odin_temperature = -1.0;
        assert_eq!(
            c.check().unwrap_err(),
            (
                "odin_temperature",
                "must be a positive number, got -1".into()
            )
        );
    }
}
