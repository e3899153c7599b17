//! One class of stage 2: boundary points, Gaussian candidates on the sphere, the kNN filter, ×‖T_y‖.
//!
//! Notation (SPEC §2): `Z_c` the class's unit feature rows (N of them), `d_K` the k-th nearest-neighbour
//! squared distance to `Z_c` ([`super::knn`]), `select` boundary points, `P = anchors` boundary points
//! perturbed per call, `L = candidates` Gaussian draws, `m = keep` candidates kept per boundary point,
//! `σ = sigma`. One call makes `P·m` unit vectors; calls repeat until `per_class` rows, which are then
//! scaled by `‖T_y‖`, the norm of the class's token embedding (`scripts/get_embed_cifar100.py:L75-78`).
//!
//! The two modes differ only where the official code is broken (SPEC §7 items 1, 2, 5); each difference is
//! marked `Deviation:` below. The random draws come from a [`NoiseSource`], so tests can replay the draws
//! a Python port of the official code recorded.

use tch::{Device, Kind, Tensor};

use super::knn::{kth_distance, normalize_rows};
use super::noise::NoiseSource;
use crate::config::{NoiseSharing, SampleConfig, SampleMode};
use crate::{Error, Result};

/// What one class's sampling produced.
#[derive(Debug)]
pub struct ClassSample {
    /// `[per_class, D]` float32 on the CPU: unit directions times `‖T_y‖`.
    pub embeddings: Tensor,
    /// Boundary points actually ranked (`select`, or fewer when the class has fewer rows; intended mode).
    pub select_used: usize,
    /// Sampler calls made (the last one may be cut short to reach `per_class`).
    pub calls: usize,
    /// Row indices (into the class's bank rows) of the boundary points, in rank order.
    pub boundary: Vec<usize>,
}

/// The flat candidate indices the kNN filter keeps, for candidates laid out block-major (`j = p·L + l`)
/// with k-th distances `kth` `[P·L]`. Keeps the largest distances for outliers, the smallest for inliers.
///
/// * `Intended`: for each boundary point p, its `m` candidates with the most extreme `d_K`, p-major.
/// * `Official`: `scripts/KNN.py:L46-63` as coded: `kth.view(L, P)`, top-m down each column q, returning
///   `q·L + r` (boundary point q with the noise draw whose row r was ranked, a score that belongs to another
///   candidate); and when `m = 1`, the `squeeze`/`reshape` there makes it return `r_q` for every column,
///   i.e. P candidates all from boundary point 0 (SPEC §2.2 step 5, §7 items 1–2).
pub fn kept_indices(
    kth: &Tensor,
    anchors: usize,
    candidates: usize,
    keep: usize,
    mode: SampleMode,
    inliers: bool,
) -> Result<Tensor> {
    let (p, l, m) = (anchors as i64, candidates as i64, keep as i64);
    if kth.size() != [p * l] || m < 1 || m > l {
        return Err(Error::Shape {
            what: "kNN filter distances".into(),
            expected: format!("[{}] with 1 <= keep <= {l}", p * l),
            got: format!("{:?} with keep = {m}", kth.size()),
        });
    }
    let largest = !inliers;
    let dev = kth.device();
    let block_start = (Tensor::arange(p, (Kind::Int64, dev)) * l).unsqueeze(1); // [P, 1]
    let kept = match mode {
        SampleMode::Intended => {
            // Deviation: the official filter ranks a scrambled layout (see `Official`), so its kept
            // candidates are random draws; we keep each boundary point's own m most extreme candidates, which
            // is what the NPOS/Dream-OOD papers describe (SPEC §7 item 1, and item 2 for m = 1). A stable
            // sort breaks ties by candidate index, the same way on every device.
            let (_, order) = kth.view([p, l]).sort_stable(true, 1, largest); // [P, L]
            (order.narrow(1, 0, m) + block_start).view([-1]) // [P·m]
        }
        SampleMode::Official => {
            // As coded: `topk(k_th)` for outliers, `topk(-k_th)` for inliers (ties fall as topk drops them).
            let table = kth.view([l, p]); // [L, P]
            let key = if inliers { -table } else { table };
            let (_, idx) = key.topk(m, 0, true, true); // [m, P]: rows r_k per column q
            if m == 1 {
                idx.view([-1]) // [P]: flat r_q, all in block 0
            } else {
                (idx.tr() + block_start).reshape([-1]) // [P·m]: q·L + r_{k,q}, q-major
            }
        }
    };
    Ok(kept)
}

/// Ranks the class's rows by `d_K` and returns the `select` most extreme (largest for outliers, smallest for
/// inliers), as `KNN_dis_search_decrease` does (`scripts/KNN.py:L11-31`).
///
/// Mutual k-th neighbours have exactly equal `d_K`, so ties do occur. Official mode ranks with `topk` as the
/// official code does (`topk(-d)` for inliers), so ties fall as libtorch's `topk` drops them on that
/// device. Intended mode sorts stably: ties go to the lower row index on every device.
fn boundary_points(
    unit: &Tensor,
    base: &Tensor,
    cfg: &SampleConfig,
    select: usize,
    chunk_bytes: usize,
) -> Result<Vec<usize>> {
    let dk = kth_distance(unit, base, cfg.k, chunk_bytes)?; // [N]
    let order = match cfg.mode {
        SampleMode::Official => {
            let key = if cfg.inliers { -dk } else { dk };
            key.topk(select as i64, 0, true, true).1
        }
        SampleMode::Intended => dk
            .sort_stable(true, 0, !cfg.inliers)
            .1
            .narrow(0, 0, select as i64),
    };
    let order: Vec<i64> = Vec::try_from(order.to(Device::Cpu))
        .map_err(|e| Error::torch("reading the boundary ranking", e))?;
    Ok(order.into_iter().map(|i| i as usize).collect())
}

/// Samples `cfg.per_class` embeddings for one class from its bank rows `bank` `[N, D]` (any device; padding
/// already removed) and its token norm `token_norm = ‖T_y‖`. `class` only names the class in errors.
/// `chunk_bytes` bounds the kNN's distance blocks ([`super::knn::DEFAULT_CHUNK_BYTES`]).
pub fn sample_class(
    bank: &Tensor,
    token_norm: f32,
    cfg: &SampleConfig,
    class: usize,
    chunk_bytes: usize,
    noise: &mut dyn NoiseSource,
) -> Result<ClassSample> {
    let size = bank.size();
    let (n, d) = match size[..] {
        [n, d] => (n as usize, d),
        _ => {
            return Err(Error::Shape {
                what: format!("class {class} bank rows"),
                expected: "[N, D]".into(),
                got: format!("{size:?}"),
            });
        }
    };
    if n <= cfg.k {
        return Err(Error::InvalidValue {
            key: format!("class {class}"),
            msg: format!(
                "has {n} feature rows, but k = {} needs at least k + 1 = {} (each row's own distance counts \
                 as a neighbour); lower k or give the class more rows",
                cfg.k,
                cfg.k + 1
            ),
        });
    }
    let select = if cfg.select <= n {
        cfg.select
    } else if cfg.mode == SampleMode::Official {
        // `torch.topk(k_th_distance, select)` fails in the official code (SPEC §7 item 5).
        return Err(Error::InvalidValue {
            key: format!("class {class}"),
            msg: format!(
                "select = {} boundary points but the class has only {n} rows; the official code fails here \
                 (SPEC §7 item 5); use mode = \"intended\" (which clamps) or a smaller select",
                cfg.select
            ),
        });
    } else {
        // Deviation: the official code crashes when select > N (CIFAR inliers); we rank all N rows.
        tracing::warn!(
            class,
            select = cfg.select,
            rows = n,
            "select exceeds the class's rows; using all {n}"
        );
        n
    };
    if cfg.anchors > select {
        return Err(Error::InvalidValue {
            key: format!("class {class}"),
            msg: format!(
                "anchors = {} exceeds the {select} boundary points available",
                cfg.anchors
            ),
        });
    }
    let dev = bank.device();
    // The official driver normalises the bank (F.normalize), and generate_outliers divides by the norm
    // again before filling the index; both are kept so that the port agrees to the last bit.
    let unit = normalize_rows(&bank.to_kind(Kind::Float)); // [N, D]
    let base = normalize_rows(&unit); // [N, D], the kNN index
    let boundary = boundary_points(&unit, &base, cfg, select, chunk_bytes)?;

    let (p, l, m) = (cfg.anchors, cfg.candidates, cfg.keep);
    let per_call = p * m;
    let calls = cfg.per_class.div_ceil(per_call);
    let mut outputs = Vec::with_capacity(calls);
    for call in 0..calls {
        // 3. Which boundary points this call perturbs (`np.random.choice(select, P, replace=False)`).
        let picks: Vec<i64> = noise
            .choose(call, select, p)
            .into_iter()
            .map(|i| boundary[i] as i64)
            .collect();
        let anchors = unit.index_select(0, &Tensor::from_slice(&picks).to(dev)); // [P, D]
        // 4. Candidates normalize(z_p + σ ε_l), block-major.
        let noise_rows = match cfg.noise {
            NoiseSharing::Shared => l,
            NoiseSharing::PerAnchor => p * l,
        };
        let eps = Tensor::from_slice(&noise.gaussian(call, noise_rows, d as usize))
            .to(dev)
            .view([-1, l as i64, d]); // [1 or P, L, D]
        let cand = (eps * cfg.sigma + anchors.unsqueeze(1)).view([-1, d]); // [P·L, D]
        let cand = normalize_rows(&cand);
        // 5. The kNN filter.
        let kth = kth_distance(&cand, &base, cfg.k, chunk_bytes)?; // [P·L]
        let kept = kept_indices(&kth, p, l, m, cfg.mode, cfg.inliers)?;
        outputs.push(cand.index_select(0, &kept)); // [P·m, D] (official inliers: [P, D])
    }
    let unit_out = Tensor::f_cat(&outputs, 0)
        .map_err(|e| Error::torch("concatenating sampler calls", e))?
        .narrow(0, 0, cfg.per_class as i64); // [per_class, D]
    let embeddings = (unit_out * f64::from(token_norm)).to(Device::Cpu);
    Ok(ClassSample {
        embeddings,
        select_used: select,
        calls,
        boundary,
    })
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::sampling::knn::DEFAULT_CHUNK_BYTES;
    use crate::sampling::noise::SeededNoise;

    fn ints(t: &Tensor) -> Vec<i64> {
        Vec::try_from(t).unwrap()
    }

    #[test]
    fn intended_filter_keeps_each_blocks_extremes() {
        // P = 2 blocks of L = 4: block 0 = [5, 1, 9, 3], block 1 = [2, 8, 0, 7].
        let kth = Tensor::from_slice(&[5f32, 1., 9., 3., 2., 8., 0., 7.]);
        let out = kept_indices(&kth, 2, 4, 2, SampleMode::Intended, false).unwrap();
        assert_eq!(ints(&out), vec![2, 0, 5, 7]);
        let inl = kept_indices(&kth, 2, 4, 1, SampleMode::Intended, true).unwrap();
        assert_eq!(ints(&inl), vec![1, 6]);
    }

    #[test]
    fn official_filter_reproduces_the_scramble() {
        // view(L = 4, P = 2) reads the flat array row-major: column 0 = flat [0, 2, 4, 6] = [5, 9, 2, 0],
        // column 1 = flat [1, 3, 5, 7] = [1, 3, 8, 7].
        let kth = Tensor::from_slice(&[5f32, 1., 9., 3., 2., 8., 0., 7.]);
        // Top-2 rows: column 0 → rows 1 (9), 0 (5); column 1 → rows 2 (8), 3 (7). Returned as q·L + r.
        let out = kept_indices(&kth, 2, 4, 2, SampleMode::Official, false).unwrap();
        assert_eq!(ints(&out), vec![1, 0, 4 + 2, 4 + 3]);
        // m = 1, inliers: smallest row per column, column 0 → row 3 (0), column 1 → row 0 (1); both
        // returned as block-0 indices.
        let inl = kept_indices(&kth, 2, 4, 1, SampleMode::Official, true).unwrap();
        assert_eq!(ints(&inl), vec![3, 0]);
    }

    /// A class bank with a dense core and a sparse rim, from a fixed seed.
    fn toy_bank(n: usize, d: usize) -> Tensor {
        let mut src = SeededNoise::new(99, 0, NonZeroUsize::MIN);
        let g = Tensor::from_slice(&src.gaussian(0, n, d)).view([n as i64, d as i64]);
        let scale = Tensor::linspace(0.2, 2.0, n as i64, (Kind::Float, Device::Cpu)).unsqueeze(1);
        let mut centre = vec![0f32; d];
        centre[0] = 3.0;
        g * scale + Tensor::from_slice(&centre).unsqueeze(0)
    }

    fn cfg(mode: SampleMode, inliers: bool) -> SampleConfig {
        SampleConfig {
            mode,
            inliers,
            k: 10,
            select: 8,
            anchors: 4,
            keep: 2,
            sigma: 0.5,
            candidates: 60,
            per_class: 20,
            ..SampleConfig::default()
        }
    }

    /// Mean percentile rank, within its own boundary block, of each kept candidate's d_K (SPEC Appendix B:
    /// about 0.5 for the official filter, near 1 for a per-block top-m).
    fn mean_rank_of_kept(mode: SampleMode) -> f64 {
        let c = cfg(mode, false);
        let bank = toy_bank(60, 8);
        let unit = normalize_rows(&bank);
        let mut src = SeededNoise::new(5, 0, NonZeroUsize::MIN);
        let (p, l) = (c.anchors as i64, c.candidates as i64);
        let mut ranks = Vec::new();
        for call in 0..40 {
            let picks: Vec<i64> = src
                .choose(call, 60, c.anchors)
                .into_iter()
                .map(|i| i as i64)
                .collect();
            let anchors = unit.index_select(0, &Tensor::from_slice(&picks));
            let eps = Tensor::from_slice(&src.gaussian(call, c.candidates, 8)).view([1, l, 8]);
            let cand = normalize_rows(&(eps * c.sigma + anchors.unsqueeze(1)).view([-1, 8]));
            let kth = kth_distance(&cand, &unit, c.k, DEFAULT_CHUNK_BYTES).unwrap();
            let kept =
                ints(&kept_indices(&kth, c.anchors, c.candidates, c.keep, mode, false).unwrap());
            let kth: Vec<f32> = Vec::try_from(&kth).unwrap();
            for j in kept {
                let block = &kth[(j / l * l) as usize..((j / l + 1) * l) as usize];
                let below = block.iter().filter(|&&v| v < kth[j as usize]).count();
                ranks.push(below as f64 / (l - 1) as f64);
            }
            assert_eq!(p * c.keep as i64, ranks.len() as i64 / (call as i64 + 1));
        }
        ranks.iter().sum::<f64>() / ranks.len() as f64
    }

    #[test]
    fn intended_keeps_far_candidates_official_keeps_random_ones() {
        let intended = mean_rank_of_kept(SampleMode::Intended);
        let official = mean_rank_of_kept(SampleMode::Official);
        assert!(intended >= 0.95, "intended mean rank {intended}");
        assert!(
            (0.3..0.7).contains(&official),
            "official mean rank {official}"
        );
    }

    #[test]
    fn rows_are_scaled_unit_vectors_and_per_class_is_exact() {
        let c = cfg(SampleMode::Intended, false);
        let mut src = SeededNoise::new(1, 0, NonZeroUsize::MIN);
        let out =
            sample_class(&toy_bank(40, 8), 0.39, &c, 0, DEFAULT_CHUNK_BYTES, &mut src).unwrap();
        assert_eq!(out.embeddings.size(), [20, 8]);
        assert_eq!(out.calls, 3); // 8 per call: 8 + 8 + 4 of 8.
        let norms: Vec<f32> = Vec::try_from(out.embeddings.norm_scalaropt_dim(
            2,
            [1i64].as_slice(),
            false,
        ))
        .unwrap();
        assert!(norms.iter().all(|v| (v - 0.39).abs() < 1e-6), "{norms:?}");
        assert_eq!(out.boundary.len(), 8);
    }

    #[test]
    fn boundary_points_are_the_sparsest_or_densest_rows() {
        // The bank's scale grows with the row index, so the rim (large d_K) is at the end.
        let bank = toy_bank(40, 8);
        let unit = normalize_rows(&bank);
        let dk: Vec<f32> = Vec::try_from(kth_distance(&unit, &unit, 10, 1 << 20).unwrap()).unwrap();
        for mode in [SampleMode::Intended, SampleMode::Official] {
            let c = |inliers| SampleConfig {
                k: 10,
                ..cfg(mode, inliers)
            };
            let outer = boundary_points(&unit, &unit, &c(false), 5, 1 << 20).unwrap();
            let inner = boundary_points(&unit, &unit, &c(true), 5, 1 << 20).unwrap();
            let min_outer = outer.iter().map(|&i| dk[i]).fold(f32::INFINITY, f32::min);
            let rest_max = (0..40)
                .filter(|i| !outer.contains(i))
                .map(|i| dk[i])
                .fold(0f32, f32::max);
            assert!(min_outer >= rest_max, "{min_outer} < {rest_max}");
            let max_inner = inner.iter().map(|&i| dk[i]).fold(0f32, f32::max);
            let rest_min = (0..40)
                .filter(|i| !inner.contains(i))
                .map(|i| dk[i])
                .fold(f32::INFINITY, f32::min);
            assert!(max_inner <= rest_min, "{max_inner} > {rest_min}");
            // Ranked in order.
            assert!(outer.windows(2).all(|w| dk[w[0]] >= dk[w[1]]));
            assert!(inner.windows(2).all(|w| dk[w[0]] <= dk[w[1]]));
        }
    }

    #[test]
    fn intended_ties_go_to_the_lower_index() {
        // Candidates 1 and 3 of block 0 tie, as do 4 and 6 of block 1.
        let kth = Tensor::from_slice(&[1f32, 7., 2., 7., 5., 0., 5., 3.]);
        let out = kept_indices(&kth, 2, 4, 1, SampleMode::Intended, false).unwrap();
        assert_eq!(ints(&out), vec![1, 4]);
        // Rows 0 and 2 of a square tie on d_K: the lower one ranks first.
        let square = Tensor::from_slice(&[1f32, 0., 0., 1., -1., 0., 0., -1.]).view([4, 2]);
        let c = SampleConfig {
            k: 2,
            ..cfg(SampleMode::Intended, false)
        };
        assert_eq!(
            boundary_points(&square, &square, &c, 4, 1 << 20).unwrap(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn too_few_rows_and_select_are_errors() {
        let mut src = SeededNoise::new(1, 0, NonZeroUsize::MIN);
        let bank = toy_bank(10, 8);
        let msg = sample_class(
            &bank,
            1.0,
            &cfg(SampleMode::Intended, false),
            3,
            1 << 20,
            &mut src,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("class 3: has 10 feature rows, but k = 10 needs at least k + 1 = 11"),
            "{msg}"
        );
        let c = SampleConfig {
            select: 30,
            ..cfg(SampleMode::Official, false)
        };
        let msg = sample_class(&toy_bank(20, 8), 1.0, &c, 0, 1 << 20, &mut src)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("select = 30 boundary points but the class has only 20 rows"),
            "{msg}"
        );
        // Intended clamps instead.
        let c = SampleConfig {
            mode: SampleMode::Intended,
            ..c
        };
        let out = sample_class(&toy_bank(20, 8), 1.0, &c, 0, 1 << 20, &mut src).unwrap();
        assert_eq!(out.select_used, 20);
    }
}
