//! The OOD scores, each defined once, as pure functions over a network's logits and penultimate features.
//!
//! **Sign: every score is a confidence, higher = more in-distribution**, the convention of OpenOOD's
//! postprocessors and of [`crate::eval::metrics`]. (The official Dream-OOD test scripts store the negation,
//! "higher = more OOD", and flip it back before the metrics, SPEC §5.1; the numbers are the same.)
//!
//! | score | module | needs | reference |
//! |---|---|---|---|
//! | MSP | [`logit`] | logits | Hendrycks & Gimpel 2017 |
//! | MaxLogit | [`logit`] | logits | Hendrycks et al. 2022 ("Scaling OOD detection") |
//! | Energy | [`logit`] | logits | Liu et al. 2020; Dream-OOD's test score |
//! | ODIN | [`odin`] | the network (input gradient) | Liang et al. 2018 |
//! | Mahalanobis | [`mahalanobis`] | features; fitted on ID train features + labels | Lee et al. 2018 (OpenOOD `mds`) |
//! | KNN | [`knn`] | features; fitted on ID train features | Sun et al. 2022 |
//! | ReAct | [`react`] | features + head; fitted on ID train features | Sun et al. 2021 |
//! | ViM | [`vim`] | features + head; fitted on ID train features | Wang et al. 2022 |
//!
//! Inputs are float32 tensors (`[N, C]` logits, `[N, D]` features) on any device; the arithmetic that
//! decides the score runs in float64 where cancellation could bite (covariances, pseudo-inverses,
//! eigenvectors, Mahalanobis and residual norms), and every score comes out as `Vec<f64>`.
//! `tests/eval.rs` checks each against numpy / scikit-learn / PyTorch on fixed inputs
//! (`tools/make_score_fixtures.py`).

pub mod knn;
pub mod logit;
pub mod mahalanobis;
pub mod odin;
pub mod react;
pub mod vim;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Which score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    Msp,
    MaxLogit,
    Energy,
    Odin,
    Mahalanobis,
    Knn,
    React,
    Vim,
}

impl ScoreKind {
    /// Every score, in report order.
    pub const ALL: [ScoreKind; 8] = [
        ScoreKind::Msp,
        ScoreKind::MaxLogit,
        ScoreKind::Energy,
        ScoreKind::Odin,
        ScoreKind::Mahalanobis,
        ScoreKind::Knn,
        ScoreKind::React,
        ScoreKind::Vim,
    ];

    /// The name used in configs, file names and reports.
    pub fn name(self) -> &'static str {
        match self {
            ScoreKind::Msp => "msp",
            ScoreKind::MaxLogit => "max_logit",
            ScoreKind::Energy => "energy",
            ScoreKind::Odin => "odin",
            ScoreKind::Mahalanobis => "mahalanobis",
            ScoreKind::Knn => "knn",
            ScoreKind::React => "react",
            ScoreKind::Vim => "vim",
        }
    }

    /// Whether the score is fitted on ID training features (so evaluation must collect them).
    pub fn needs_fit(self) -> bool {
        matches!(
            self,
            ScoreKind::Mahalanobis | ScoreKind::Knn | ScoreKind::React | ScoreKind::Vim
        )
    }
}

impl fmt::Display for ScoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScoreKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ScoreKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ScoreKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown score \"{s}\"; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The linear classifier head `logits = features · Wᵀ + b`, kept in float64 for the scores that use it
/// directly (ReAct recomputes logits from clipped features; ViM needs `W⁺b`).
#[derive(Debug)]
pub struct Head {
    /// `[C, D]` float64.
    pub weight: Tensor,
    /// `[C]` float64.
    pub bias: Tensor,
}

impl Head {
    /// Copies `weight` `[C, D]` and `bias` `[C]` (any float kind) into a float64 head on their device.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Head> {
        let (ws, bs) = (weight.size(), bias.size());
        if ws.len() != 2 || bs != [ws[0]] {
            return Err(Error::Shape {
                what: "classifier head (weight, bias)".into(),
                expected: "[C, D] and [C]".into(),
                got: format!("{ws:?} and {bs:?}"),
            });
        }
        Ok(Head {
            weight: weight.detach().to_kind(Kind::Double),
            bias: bias.detach().to_kind(Kind::Double),
        })
    }

    /// Feature width `D`.
    pub fn feature_dim(&self) -> i64 {
        self.weight.size()[1]
    }

    /// `features · Wᵀ + b` in float64: `[N, D]` → `[N, C]`.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        check_2d(features, "features", Some(self.feature_dim()))?;
        features
            .f_to_kind(Kind::Double)
            .and_then(|f| f.f_to_device(self.weight.device()))
            .and_then(|f| f.f_matmul(&self.weight.tr()))
            .and_then(|l| l.f_add(&self.bias))
            .map_err(|e| Error::torch("head logits", e))
    }
}

/// Checks that `t` is `[N, D]` (with `D == dim` when given).
pub(crate) fn check_2d(t: &Tensor, what: &str, dim: Option<i64>) -> Result<(i64, i64)> {
    let s = t.size();
    match (s.as_slice(), dim) {
        ([n, d], Some(want)) if *d == want => Ok((*n, *d)),
        ([n, d], None) => Ok((*n, *d)),
        _ => Err(Error::Shape {
            what: what.into(),
            expected: match dim {
                Some(d) => format!("[N, {d}]"),
                None => "[N, D]".into(),
            },
            got: format!("{s:?}"),
        }),
    }
}

/// A 1-D tensor as `Vec<f64>` (copied to the CPU).
pub(crate) fn to_vec(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    let t = t
        .f_to_kind(Kind::Double)
        .and_then(|t| t.f_to_device(tch::Device::Cpu))
        .and_then(|t| t.f_contiguous())
        .map_err(|e| Error::torch(format!("{what}: copying scores"), e))?;
    Vec::<f64>::try_from(&t).map_err(|e| Error::torch(format!("{what}: copying scores"), e))
}
