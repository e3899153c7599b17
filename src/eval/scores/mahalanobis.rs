//! Mahalanobis (Lee, Lee, Lee, Shin, NeurIPS 2018), as OpenOOD's `mds` postprocessor: class-conditional
//! Gaussians with one shared covariance on the penultimate features, no input preprocessing and no
//! feature ensemble.
//!
//! Fit on ID training features `z_i` with labels `y_i`:
//!
//! * `μ_c` = mean of the features of class c;
//! * `Σ` = covariance of the class-centred features `z_i − μ_{y_i}` (biased, divided by N; scikit-learn's
//!   `EmpiricalCovariance(assume_centered=False)`, which OpenOOD fits);
//! * `P = Σ⁺`, the pseudo-inverse of the symmetric `Σ` (scikit-learn's `precision_ = pinvh(Σ)`: singular
//!   values below `max(D, D)·eps·σ_max` are dropped; ReLU features often have dead, constant units).
//!
//! Score: `S(x) = −min_c (z − μ_c)ᵀ P (z − μ_c)`, the negative smallest squared Mahalanobis distance.
//! It is evaluated as `zᵀPz − 2 zᵀPμ_c + μ_cᵀPμ_c` in float64, one `[N, D]·[D, D]` product and one
//! `[N, D]·[D, C]` product instead of C quadratic forms.

use tch::{Kind, Tensor};

use super::{check_2d, to_vec};
use crate::{Error, Result};

/// The fitted class means and shared precision.
#[derive(Debug)]
pub struct Mahalanobis {
    /// `[C, D]` float64.
    means: Tensor,
    /// `[D, D]` float64.
    precision: Tensor,
    /// `P μ_c` as `[D, C]`.
    p_means: Tensor,
    /// `μ_cᵀ P μ_c`, `[C]`.
    mean_terms: Tensor,
}

fn torch(op: &str) -> impl Fn(tch::TchError) -> Error + '_ {
    move |e| Error::torch(format!("mahalanobis: {op}"), e)
}

impl Mahalanobis {
    /// Fits on `features` `[N, D]` with `labels` `[N]` in `0..num_classes`. Fails, naming the class, when
    /// a class has no sample (its mean would be undefined).
    pub fn fit(features: &Tensor, labels: &Tensor, num_classes: i64) -> Result<Mahalanobis> {
        let (n, _) = check_2d(features, "mahalanobis: ID training features", None)?;
        if labels.size() != [n] {
            return Err(Error::Shape {
                what: "mahalanobis: ID training labels".into(),
                expected: format!("[{n}]"),
                got: format!("{:?}", labels.size()),
            });
        }
        let z = features
            .f_to_kind(Kind::Double)
            .map_err(torch("features"))?;
        let labels = labels
            .f_to_kind(Kind::Int64)
            .and_then(|l| l.f_to_device(z.device()))
            .map_err(torch("labels"))?;
        let mut means = Vec::with_capacity(num_classes as usize);
        for c in 0..num_classes {
            let mask = labels.eq(c);
            let count = i64::try_from(mask.sum(Kind::Int64)).map_err(torch("class counts"))?;
            if count == 0 {
                return Err(Error::InvalidValue {
                    key: "mahalanobis".into(),
                    msg: format!(
                        "class {c} has no sample among the {n} ID training features it is fitted on; \
                         every class needs at least one (raise eval.fit_images)"
                    ),
                });
            }
            means.push(z.index_select(0, &mask.nonzero().squeeze_dim(1)).mean_dim(
                0,
                false,
                Kind::Double,
            ));
        }
        let means = Tensor::stack(&means, 0); // [C, D]
        let centred = &z - means.index_select(0, &labels); // [N, D]
        // EmpiricalCovariance(assume_centered=False) subtracts the (≈0) mean of the centred data again.
        let centred = &centred - centred.mean_dim(0, true, Kind::Double);
        let cov = centred.tr().matmul(&centred) / n as f64; // [D, D]
        let precision = cov
            .f_linalg_pinv_atol_rtol_float(None, None, true)
            .map_err(torch("pseudo-inverse of the covariance"))?;
        let p_means = precision.matmul(&means.tr()); // [D, C]
        let mean_terms = (&means * p_means.tr()).sum_dim_intlist(1, false, Kind::Double); // [C]
        Ok(Mahalanobis {
            means,
            precision,
            p_means,
            mean_terms,
        })
    }

    /// The class means `[C, D]` (float64).
    pub fn means(&self) -> &Tensor {
        &self.means
    }

    /// `−min_c d²_c(z)` for every row of `features` `[N, D]`.
    pub fn score(&self, features: &Tensor) -> Result<Vec<f64>> {
        let d = self.precision.size()[0];
        check_2d(features, "mahalanobis: features", Some(d))?;
        let z = features
            .f_to_kind(Kind::Double)
            .and_then(|z| z.f_to_device(self.precision.device()))
            .map_err(torch("features"))?;
        let quad = (z.matmul(&self.precision) * &z).sum_dim_intlist(1, true, Kind::Double); // [N, 1]
        let cross = z.matmul(&self.p_means); // [N, C]
        let dist = quad - cross * 2.0 + self.mean_terms.unsqueeze(0); // [N, C]
        let min = dist.f_amin(1, false).map_err(torch("min over classes"))?;
        Ok(to_vec(&min, "mahalanobis")?
            .into_iter()
            .map(|v| -v)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_class_is_named() {
        let f = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]).view([2, 2]);
        let l = Tensor::from_slice(&[0i64, 0]);
        let err = Mahalanobis::fit(&f, &l, 2).unwrap_err().to_string();
        assert!(err.contains("class 1 has no sample"), "{err}");
    }

    #[test]
    fn identity_covariance_gives_squared_euclidean_distance() {
        // Two classes whose centred features are ±e1, ±e2 with equal weight: Σ = I/2, P = 2I.
        let f = Tensor::from_slice(&[1.0f32, 0.0, -1.0, 0.0, 10.0, 1.0, 10.0, -1.0]).view([4, 2]);
        let l = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let m = Mahalanobis::fit(&f, &l, 2).unwrap();
        let s = m
            .score(&Tensor::from_slice(&[0.0f32, 3.0, 9.0, 0.0]).view([2, 2]))
            .unwrap();
        assert!((s[0] - (-18.0)).abs() < 1e-9, "{s:?}"); // 2·(0² + 3²) to class 0
        assert!((s[1] - (-2.0)).abs() < 1e-9, "{s:?}"); // 2·(1² + 0²) to class 1
    }
}
