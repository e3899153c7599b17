//! Exact k-nearest-neighbour search on unit vectors, brute force through one matrix product per chunk.
//!
//! The official code puts each class's unit feature rows in a `faiss.GpuIndexFlatL2` and asks for the K
//! nearest neighbours of each query (SPEC §2.1). That index is exact and returns **squared** L2 distances,
//! computed as `‖q‖² + ‖z‖² − 2 q·z`; this module computes the same quantity with libtorch on the CPU or a
//! CUDA device. Queries are processed in chunks so that the `[chunk, N]` distance block stays below a
//! memory budget, whatever the number of queries (75,000 candidates per call at CIFAR-100 scale).
//!
//! Notation: `q` a query row, `z_j` the rows of the base (the class's feature bank), `d_K(q)` the K-th
//! smallest squared distance from `q` to the base, ties and the query itself included (a base row queried
//! against its own base has distance 0 to itself, which counts as one of its K neighbours, as in faiss).

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Default memory budget of one `[chunk, N]` distance block: 256 MiB of float32.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 20;

/// Number of query rows per chunk for a base of `base_rows` rows within `chunk_bytes` (at least 1).
pub fn chunk_rows(base_rows: usize, chunk_bytes: usize) -> usize {
    (chunk_bytes / (4 * base_rows.max(1))).max(1)
}

/// Squared L2 distances `[Q, N]` between the rows of `queries` `[Q, D]` and `base` `[N, D]`, as faiss's
/// flat L2 index computes them: `‖q‖² + ‖z‖² − 2 q·z`, clamped at 0 (rounding can make a self-distance
/// slightly negative).
pub fn squared_distances(queries: &Tensor, base: &Tensor) -> Result<Tensor> {
    let op = |e| Error::torch("kNN distance matrix", e);
    let q_sq = queries
        .f_square()
        .and_then(|t| t.f_sum_dim_intlist(1, true, Kind::Float))
        .map_err(op)?; // [Q, 1]
    let z_sq = base
        .f_square()
        .and_then(|t| t.f_sum_dim_intlist(1, false, Kind::Float))
        .map_err(op)?; // [N]
    let dots = queries.f_mm(&base.tr()).map_err(op)?; // [Q, N]
    let dist = (q_sq + z_sq.unsqueeze(0)) - dots * 2.0; // [Q, N]
    dist.f_clamp_min(0.0).map_err(op)
}

fn check_inputs(queries: &Tensor, base: &Tensor, k: usize) -> Result<(i64, i64)> {
    let (qs, bs) = (queries.size(), base.size());
    if qs.len() != 2 || bs.len() != 2 || qs[1] != bs[1] {
        return Err(Error::Shape {
            what: "kNN queries and base".into(),
            expected: "[Q, D] and [N, D] with the same D".into(),
            got: format!("{qs:?} and {bs:?}"),
        });
    }
    if k == 0 || k as i64 > bs[0] {
        return Err(Error::InvalidValue {
            key: "k".into(),
            msg: format!(
                "the kNN needs 1 <= k <= N = {} base rows, got k = {k}",
                bs[0]
            ),
        });
    }
    Ok((qs[0], bs[0]))
}

/// Normalises the rows of `x` to unit length, as `F.normalize(x, dim=1)` does (a zero row stays zero).
pub fn normalize_rows(x: &Tensor) -> Tensor {
    let norms = x
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12); // [Q, 1]
    x / norms
}

/// `d_K(q)` for every query row: the k-th smallest squared L2 distance to the rows of `base`. Queries are
/// normalised first, as the official search functions do (`scripts/KNN.py:L19-24,L41-46`); `base` must
/// already hold unit rows. Returns a float32 tensor `[Q]` on the queries' device.
pub fn kth_distance(
    queries: &Tensor,
    base: &Tensor,
    k: usize,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (num_queries, base_rows) = check_inputs(queries, base, k)?;
    let step = chunk_rows(base_rows as usize, chunk_bytes) as i64;
    let mut parts = Vec::with_capacity((num_queries / step + 1) as usize);
    let mut start = 0;
    while start < num_queries {
        let len = step.min(num_queries - start);
        let chunk = normalize_rows(&queries.narrow(0, start, len)); // [len, D]
        let dist = squared_distances(&chunk, base)?; // [len, N]
        let (kth, _) = dist
            .f_kthvalue(k as i64, 1, false)
            .map_err(|e| Error::torch("kNN k-th distance", e))?; // [len]
        parts.push(kth);
        start += len;
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros([0], (Kind::Float, queries.device())));
    }
    Tensor::f_cat(&parts, 0).map_err(|e| Error::torch("kNN concatenation", e))
}

/// The k nearest base rows of every (normalised) query: squared distances `[Q, k]` in increasing order and
/// the matching base row indices `[Q, k]` (int64).
pub fn knn(
    queries: &Tensor,
    base: &Tensor,
    k: usize,
    chunk_bytes: usize,
) -> Result<(Tensor, Tensor)> {
    let (num_queries, base_rows) = check_inputs(queries, base, k)?;
    let step = chunk_rows(base_rows as usize, chunk_bytes) as i64;
    let (mut dists, mut indices) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < num_queries {
        let len = step.min(num_queries - start);
        let chunk = normalize_rows(&queries.narrow(0, start, len));
        let dist = squared_distances(&chunk, base)?; // [len, N]
        let (d, i) = dist
            .f_topk(k as i64, 1, false, true)
            .map_err(|e| Error::torch("kNN top-k", e))?; // [len, k] each
        dists.push(d);
        indices.push(i);
        start += len;
    }
    if dists.is_empty() {
        let dev = queries.device();
        return Ok((
            Tensor::zeros([0, k as i64], (Kind::Float, dev)),
            Tensor::zeros([0, k as i64], (Kind::Int64, dev)),
        ));
    }
    let cat = |parts: &[Tensor]| {
        Tensor::f_cat(parts, 0).map_err(|e| Error::torch("kNN concatenation", e))
    };
    Ok((cat(&dists)?, cat(&indices)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit rows from a fixed formula (no RNG needed): row i, column j.
    fn rows(n: usize, d: usize, phase: f32) -> Tensor {
        let v: Vec<f32> = (0..n * d)
            .map(|x| ((x as f32) * 0.731 + phase).sin() + 0.1 * (x % d) as f32)
            .collect();
        normalize_rows(&Tensor::from_slice(&v).view([n as i64, d as i64]))
    }

    /// The k-th smallest squared distance by plain loops in f64.
    fn brute_kth(q: &Tensor, z: &Tensor, k: usize) -> Vec<f64> {
        let q: Vec<Vec<f32>> = Vec::try_from(normalize_rows(q)).unwrap();
        let z: Vec<Vec<f32>> = Vec::try_from(z).unwrap();
        q.iter()
            .map(|qi| {
                let mut d: Vec<f64> = z
                    .iter()
                    .map(|zj| {
                        qi.iter()
                            .zip(zj)
                            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                            .sum()
                    })
                    .collect();
                d.sort_by(f64::total_cmp);
                d[k - 1]
            })
            .collect()
    }

    #[test]
    fn kth_distance_matches_brute_force_for_every_chunking() {
        let (q, z) = (rows(37, 9, 0.3) * 3.0, rows(20, 9, 1.7));
        for k in [1, 5, 20] {
            let expected = brute_kth(&q, &z, k);
            // 1 row per chunk, an uneven split, and everything at once.
            for chunk_bytes in [1, 4 * 20 * 7, DEFAULT_CHUNK_BYTES] {
                let got: Vec<f32> =
                    Vec::try_from(kth_distance(&q, &z, k, chunk_bytes).unwrap()).unwrap();
                assert_eq!(got.len(), 37);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (*g as f64 - e).abs() < 1e-5,
                        "k={k} chunk={chunk_bytes} row {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn self_distance_counts_as_a_neighbour() {
        let z = rows(12, 5, 0.0);
        let d1: Vec<f32> =
            Vec::try_from(kth_distance(&z, &z, 1, DEFAULT_CHUNK_BYTES).unwrap()).unwrap();
        assert!(d1.iter().all(|&d| d.abs() < 1e-6), "{d1:?}");
        let (d, i) = knn(&z, &z, 3, 100).unwrap();
        let first: Vec<i64> = Vec::try_from(i.select(1, 0)).unwrap();
        assert_eq!(first, (0..12).collect::<Vec<i64>>());
        // Distances are sorted and the last column equals kth_distance.
        let d: Vec<Vec<f32>> = Vec::try_from(&d).unwrap();
        let kth: Vec<f32> = Vec::try_from(kth_distance(&z, &z, 3, 100).unwrap()).unwrap();
        for (row, k3) in d.iter().zip(&kth) {
            assert!(row[0] <= row[1] && row[1] <= row[2]);
            assert_eq!(row[2], *k3);
        }
    }

    #[test]
    fn bad_shapes_and_k_are_errors() {
        let z = rows(4, 3, 0.0);
        let msg = kth_distance(&rows(2, 5, 0.0), &z, 1, 64)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("[2, 5] and [4, 3]"), "{msg}");
        let msg = kth_distance(&z, &z, 5, 64).unwrap_err().to_string();
        assert!(msg.contains("1 <= k <= N = 4"), "{msg}");
    }
}
