//! ReAct (Sun, Guo, Li, NeurIPS 2021, "ReAct: Out-of-distribution Detection With Rectified Activations").
//!
//! Fit: the threshold `c` = the p-th percentile of every activation of the ID training features (all
//! `N·D` values pooled; numpy's default linear interpolation, `np.percentile(feats.flatten(), p)`).
//! Score: the energy of the head applied to the clipped features,
//!
//! `S(x) = logsumexp(W · min(z, c) + b)`
//!
//! Default p = 90 (the paper's and OpenOOD's). Deviation: OpenOOD estimates `c` on its ID *validation*
//! split; here it is the same ID training fit set the other fitted scores use (the paper: "estimated on
//! ID data"), so no validation images are needed.

use tch::{Kind, Tensor};

use super::{Head, check_2d, to_vec};
use crate::{Error, Result};

/// The fitted clipping threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct React {
    /// The clipping threshold `c`.
    pub threshold: f64,
}

/// numpy's `percentile(values, p)` with the default `linear` method: the value at fractional rank
/// `p/100 · (n − 1)` of the ascending order, interpolated between its neighbours.
pub fn percentile(values: &Tensor, p: f64) -> Result<f64> {
    let flat = values
        .f_flatten(0, -1)
        .and_then(|v| v.f_to_kind(Kind::Double))
        .map_err(|e| Error::torch("react: percentile", e))?;
    let n = flat.size()[0];
    if n == 0 || !(0.0..=100.0).contains(&p) {
        return Err(Error::InvalidValue {
            key: "eval.react_percentile".into(),
            msg: format!("needs values and 0 <= p <= 100; got {n} values and p = {p}"),
        });
    }
    let pos = p / 100.0 * (n - 1) as f64;
    let lo = pos.floor() as i64;
    let hi = (lo + 1).min(n - 1);
    let kth = |k: i64| -> Result<f64> {
        let (v, _) = flat
            .f_kthvalue(k + 1, 0, false)
            .map_err(|e| Error::torch("react: percentile", e))?;
        f64::try_from(v).map_err(|e| Error::torch("react: percentile", e))
    };
    let (a, b) = (kth(lo)?, kth(hi)?);
    let t = pos - lo as f64;
    // numpy's _lerp: a + (b − a)·t, computed from the nearer end for t ≥ 0.5.
    Ok(if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    })
}

impl React {
    /// The p-th percentile of the ID training activations `[N, D]`.
    pub fn fit(train_features: &Tensor, percentile_p: f64) -> Result<React> {
        check_2d(train_features, "react: ID training features", None)?;
        Ok(React {
            threshold: percentile(train_features, percentile_p)?,
        })
    }

    /// `logsumexp(head(min(z, c)))` for every row of `features` `[N, D]`.
    pub fn score(&self, features: &Tensor, head: &Head) -> Result<Vec<f64>> {
        check_2d(features, "react: features", Some(head.feature_dim()))?;
        let clipped = features
            .f_to_kind(Kind::Double)
            .and_then(|z| z.f_clamp_max(self.threshold))
            .map_err(|e| Error::torch("react: clipping", e))?;
        let lse = head
            .logits(&clipped)?
            .f_logsumexp(1, false)
            .map_err(|e| Error::torch("react: energy", e))?;
        to_vec(&lse, "react")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_as_numpy() {
        // np.percentile([1, 2, 3, 4], 90) = 3.7; np.percentile([5, 1], 50) = 3.0
        let v = Tensor::from_slice(&[4.0f32, 1.0, 3.0, 2.0]).view([2, 2]);
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        assert_eq!(
            percentile(&Tensor::from_slice(&[5.0f32, 1.0]), 50.0).unwrap(),
            3.0
        );
        assert_eq!(percentile(&v, 100.0).unwrap(), 4.0);
        assert!(percentile(&v, 101.0).is_err());
    }
}
