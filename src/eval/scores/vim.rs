//! ViM, "Virtual-logit Matching" (Wang, Li, Feng, Zhang, CVPR 2022), as the authors' `benchmark.py` and
//! OpenOOD's `vim` postprocessor compute it.
//!
//! Notation: `z` the penultimate feature `[D]`, `W` `[C, D]` and `b` `[C]` the head, `u = −W⁺b` the origin
//! at which the head has zero logits (`W⁺` the Moore–Penrose pseudo-inverse).
//!
//! Fit on the ID training features:
//! 1. `Σ = (1/N) Σᵢ (zᵢ − u)(zᵢ − u)ᵀ` (`EmpiricalCovariance(assume_centered=True)` on `z − u`);
//! 2. `R` `[D, D − dim]` = the eigenvectors of `Σ` outside the `dim` largest eigenvalues: the residual
//!    space, orthogonal to the principal subspace;
//! 3. `α = mean_i max_c (W zᵢ + b)_c / mean_i ‖(zᵢ − u) R‖`, which puts the virtual logit on the scale of
//!    the real ones.
//!
//! Score: `S(x) = logsumexp(W z + b) − α ‖(z − u) R‖` (the energy minus the scaled residual norm; the
//! virtual-logit softmax of the paper is a monotone function of this).
//!
//! `dim` defaults by feature width as the authors' code does: 1000 for D ≥ 2048, 512 for D ≥ 768, and 300
//! for the 512-wide ResNet-18/34 features (their ResNet setting); below that D/2. The references call
//! `np.linalg.eig` on the symmetric `Σ`; `eigh` gives the same eigenvectors (up to sign, which the norm
//! ignores), in float64.

use tch::{Kind, Tensor};

use super::{Head, check_2d, to_vec};
use crate::{Error, Result};

/// The fitted origin, residual space and scale.
#[derive(Debug)]
pub struct Vim {
    /// `u = −W⁺b`, `[D]` float64.
    pub origin: Tensor,
    /// `R`, `[D, D − dim]` float64.
    residual_space: Tensor,
    /// `α`.
    pub alpha: f64,
    /// Principal dimensions left out of the residual.
    pub dim: usize,
}

/// The default principal dimension for features of width `d` (see the module docs).
pub fn default_dim(d: usize) -> usize {
    match d {
        2048.. => 1000,
        768.. => 512,
        512.. => 300,
        _ => d / 2,
    }
}

fn torch(op: &str) -> impl Fn(tch::TchError) -> Error + '_ {
    move |e| Error::torch(format!("vim: {op}"), e)
}

impl Vim {
    /// Fits on ID training features `[N, D]` with the head; `dim` must be below D.
    pub fn fit(train_features: &Tensor, head: &Head, dim: usize) -> Result<Vim> {
        let d = head.feature_dim();
        let (n, _) = check_2d(train_features, "vim: ID training features", Some(d))?;
        if dim == 0 || dim as i64 >= d {
            return Err(Error::InvalidValue {
                key: "eval.vim_dim".into(),
                msg: format!(
                    "{dim} principal dimensions of {d}-wide features; need 1 <= dim < {d}"
                ),
            });
        }
        let pinv = head
            .weight
            .f_linalg_pinv_atol_rtol_float(None, None, false)
            .map_err(torch("pseudo-inverse of the head"))?; // [D, C]
        let origin = -pinv.matmul(&head.bias); // [D]
        let z = train_features
            .f_to_kind(Kind::Double)
            .and_then(|z| z.f_to_device(origin.device()))
            .map_err(torch("features"))?;
        let centred = &z - origin.unsqueeze(0); // [N, D]
        let cov = centred.tr().matmul(&centred) / n as f64; // [D, D]
        let (_, vectors) = cov.f_linalg_eigh("L").map_err(torch("eigenvectors"))?; // ascending
        let residual_space = vectors.narrow(1, 0, d - dim as i64); // [D, D − dim]
        let residual =
            centred
                .matmul(&residual_space)
                .norm_scalaropt_dim(2, [1i64].as_slice(), false); // [N]
        let max_logit = head.logits(&z)?.amax(1, false); // [N]
        let alpha = f64::try_from(max_logit.mean(Kind::Double) / residual.mean(Kind::Double))
            .map_err(torch("alpha"))?;
        if !alpha.is_finite() {
            return Err(Error::InvalidValue {
                key: "vim".into(),
                msg: format!(
                    "alpha = {alpha}: the ID training features have no component outside the {dim} \
                     principal dimensions; lower eval.vim_dim"
                ),
            });
        }
        Ok(Vim {
            origin,
            residual_space,
            alpha,
            dim,
        })
    }

    /// `logsumexp(Wz + b) − α‖(z − u)R‖` for every row of `features` `[N, D]`.
    pub fn score(&self, features: &Tensor, head: &Head) -> Result<Vec<f64>> {
        check_2d(features, "vim: features", Some(head.feature_dim()))?;
        let z = features
            .f_to_kind(Kind::Double)
            .and_then(|z| z.f_to_device(self.origin.device()))
            .map_err(torch("features"))?;
        let energy = head.logits(&z)?.logsumexp(1, false); // [N]
        let residual = (&z - self.origin.unsqueeze(0))
            .matmul(&self.residual_space)
            .norm_scalaropt_dim(2, [1i64].as_slice(), false); // [N]
        to_vec(&(energy - residual * self.alpha), "vim")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dims_follow_the_authors() {
        assert_eq!(default_dim(2048), 1000);
        assert_eq!(default_dim(768), 512);
        assert_eq!(default_dim(512), 300);
        assert_eq!(default_dim(128), 64);
    }

    #[test]
    fn dim_out_of_range_is_refused() {
        let head = Head::new(
            &Tensor::ones([2, 4], (Kind::Float, tch::Device::Cpu)),
            &Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
        )
        .unwrap();
        let f = Tensor::ones([5, 4], (Kind::Float, tch::Device::Cpu));
        let err = Vim::fit(&f, &head, 4).unwrap_err().to_string();
        assert!(
            err.starts_with("eval.vim_dim: 4 principal dimensions of 4-wide"),
            "{err}"
        );
    }
}
