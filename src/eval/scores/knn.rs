//! KNN (Sun, Ming, Zhu, Li, ICML 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors").
//!
//! Features are L2-normalised, `ẑ = z / (‖z‖ + 1e-10)` (knn-ood `run_cifar.py` and OpenOOD `knn`), and the
//! score is the negative distance to the k-th nearest normalised ID training feature:
//!
//! `S(x) = −‖ẑ(x) − ẑ_(k)‖²`
//!
//! Squared, because both reference codes search a `faiss.IndexFlatL2`, which returns squared L2 distances
//! (`scores = -D[:, -1]`); the paper writes the plain distance. The two are one monotone map apart, so
//! every metric is the same, and keeping faiss's value keeps per-image scores and thresholds comparable
//! with OpenOOD's. The search is exact: one `[chunk, N]` float32 distance block at a time, like faiss's
//! flat index (`‖q‖² + ‖z‖² − 2q·z`, [`crate::sampling::knn::squared_distances`]). Default k = 50, the
//! paper's CIFAR setting (OpenOOD's default `K: 50`).

use tch::{Kind, Tensor};

use super::{check_2d, to_vec};
use crate::sampling::knn::{DEFAULT_CHUNK_BYTES, chunk_rows, squared_distances};
use crate::{Error, Result};

/// The k-th-nearest-neighbour score, fitted: the normalised ID training features.
#[derive(Debug)]
pub struct Knn {
    /// `[N, D]` float32 unit rows.
    bank: Tensor,
    k: usize,
    chunk_bytes: usize,
}

/// Rows divided by their norm + 1e-10, as knn-ood's `normalizer`.
pub fn normalize(features: &Tensor) -> Result<Tensor> {
    let f = features
        .f_to_kind(Kind::Float)
        .map_err(|e| Error::torch("knn: features", e))?;
    let norms = f
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .map_err(|e| Error::torch("knn: feature norms", e))?
        + 1e-10; // [N, 1]
    Ok(f / norms)
}

impl Knn {
    /// Normalises and keeps the ID training features `[N, D]`; needs `1 ≤ k ≤ N`.
    pub fn fit(train_features: &Tensor, k: usize) -> Result<Knn> {
        let (n, _) = check_2d(train_features, "knn: ID training features", None)?;
        if k == 0 || k as i64 > n {
            return Err(Error::InvalidValue {
                key: "eval.knn_k".into(),
                msg: format!(
                    "k = {k} but the fit set has {n} ID training features; need 1 <= k <= {n}"
                ),
            });
        }
        Ok(Knn {
            bank: normalize(train_features)?,
            k,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        })
    }

    /// `−d_k²` for every row of `features` `[Q, D]`.
    pub fn score(&self, features: &Tensor) -> Result<Vec<f64>> {
        let d = self.bank.size()[1];
        let (q, _) = check_2d(features, "knn: features", Some(d))?;
        let step = chunk_rows(self.bank.size()[0] as usize, self.chunk_bytes) as i64;
        let mut out = Vec::with_capacity(q as usize);
        let mut start = 0;
        while start < q {
            let len = step.min(q - start);
            let chunk = normalize(&features.narrow(0, start, len))?
                .f_to_device(self.bank.device())
                .map_err(|e| Error::torch("knn: moving features", e))?;
            let dist = squared_distances(&chunk, &self.bank)?; // [len, N]
            let (kth, _) = dist
                .f_kthvalue(self.k as i64, 1, false)
                .map_err(|e| Error::torch("knn: k-th distance", e))?; // [len]
            out.extend(to_vec(&kth, "knn")?.into_iter().map(|v| -v));
            start += len;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_larger_than_the_fit_set_is_refused() {
        let f = Tensor::ones([3, 4], (Kind::Float, tch::Device::Cpu));
        let err = Knn::fit(&f, 4).unwrap_err().to_string();
        assert!(
            err.starts_with("eval.knn_k: k = 4 but the fit set has 3"),
            "{err}"
        );
    }
}
