//! VOS's virtual outliers (Du et al., ICLR 2022, "VOS: Learning What You Don't Know by Virtual Outlier
//! Synthesis"; official `deeplearning-wisc/vos` `classification/CIFAR/train_virtual.py`, reference note
//! §3.1): class-conditional Gaussians with a shared covariance fitted to a queue of penultimate features,
//! and the least likely of many draws from each.
//!
//! What the official code does each step, and how it maps here:
//!
//! 1. Queue update ([`FeatureQueue::push`]): while some class has fewer than `queue` features, each ID
//!    feature is appended to its class until that class is full (extra ones are dropped); once every class
//!    is full (checked at the start of the step), each feature replaces its class's oldest. The official
//!    code shifts the tensor (`cat(q[1:], new)`); a ring buffer keeps the same set of features, which is
//!    all the Gaussians depend on.
//! 2. Gaussians ([`FeatureQueue::gaussians`]): `μ_c` = mean of class c's queue; `Σ = XᵀX / N + 1e-4·I`
//!    with X all queues centred by their class mean (N = C · queue).
//! 3. Sampling ([`draw_offsets`], [`ClassGaussians::outliers`]): per class, `samples` draws of
//!    `N(μ_c, Σ)` through `rsample` (`μ_c + L ε`, `L = cholesky(Σ)`), keeping the `select` with the lowest
//!    `log_prob`. With one shared Σ, `−log_prob = const + ½‖ε‖²`, so the kept draws are the `select` with
//!    the largest `‖ε‖²`.
//!    Deviation (same distribution, far less work): the norm and the direction of a standard normal are
//!    independent, ‖ε‖² ~ χ²_D and ε/‖ε‖ uniform on the sphere. So the `select` kept draws are exactly
//!    distributed as the `select` largest of `samples` χ²_D variates, each paired with an independent
//!    uniform direction. We draw those (`samples` scalars and `select · D` normals per class, from a
//!    generator seeded by `(seed, step, class)`) instead of `samples · D` normals, which for
//!    CIFAR-100 and a ResNet (512-d) would be 5·10⁸ normals per step. The test
//!    `offsets_follow_the_official_selection` compares the two procedures.

use std::collections::{BTreeMap, HashMap};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{ChiSquared, StandardNormal};
use tch::{Device, Kind, Tensor};

use crate::data::loader::sample_seed;
use crate::error::{Error, Result};

/// The ridge VOS adds to the shared covariance (`temp_precision += 0.0001 * eye_matrix`).
pub const COVARIANCE_RIDGE: f64 = 1e-4;

/// Domain tag of the virtual-outlier generator's seeds.
const VOS_TAG: u64 = 0x564f_535f_5341_4d50;

/// Per-class queues of penultimate features.
#[derive(Debug)]
pub struct FeatureQueue {
    /// `[C, Q, D]`.
    queue: Tensor,
    /// Filled slots per class (≤ Q).
    count: Vec<usize>,
    /// Next slot to overwrite once the class is full (its oldest feature).
    head: Vec<usize>,
    capacity: usize,
}

impl FeatureQueue {
    /// Empty queues of `capacity` features of width `dim` for `num_classes` classes.
    pub fn new(num_classes: usize, capacity: usize, dim: i64, device: Device) -> Self {
        Self {
            queue: Tensor::zeros(
                [num_classes as i64, capacity as i64, dim],
                (Kind::Float, device),
            ),
            count: vec![0; num_classes],
            head: vec![0; num_classes],
            capacity,
        }
    }

    /// Whether every class holds `capacity` features (the official `sum_temp == C * sample_number`).
    pub fn is_full(&self) -> bool {
        self.count.iter().all(|&n| n == self.capacity)
    }

    /// Adds the features `[B, D]` of ID images with classes `labels` (official semantics, module doc
    /// step 1). The features are detached.
    pub fn push(&mut self, features: &Tensor, labels: &[i64]) -> Result<()> {
        let fifo = self.is_full();
        let num_classes = self.count.len();
        // Slot of each row, in row order; a later row that lands on the same slot wins, as the official
        // sequential update does.
        let mut slots: HashMap<usize, i64> = HashMap::new();
        for (row, &label) in labels.iter().enumerate() {
            let c = usize::try_from(label)
                .ok()
                .filter(|&c| c < num_classes)
                .ok_or_else(|| Error::InvalidValue {
                    key: "labels".into(),
                    msg: format!("class {label} is outside 0..{num_classes}"),
                })?;
            let slot = if fifo {
                let s = self.head[c];
                self.head[c] = (s + 1) % self.capacity;
                s
            } else if self.count[c] < self.capacity {
                self.count[c] += 1;
                self.count[c] - 1
            } else {
                continue;
            };
            slots.insert(c * self.capacity + slot, row as i64);
        }
        if slots.is_empty() {
            return Ok(());
        }
        let mut pairs: Vec<(usize, i64)> = slots.into_iter().collect();
        pairs.sort_unstable();
        let device = self.queue.device();
        let dst: Vec<i64> = pairs.iter().map(|&(s, _)| s as i64).collect();
        let src: Vec<i64> = pairs.iter().map(|&(_, r)| r).collect();
        let dst = Tensor::from_slice(&dst).to_device(device);
        let src = Tensor::from_slice(&src).to_device(device);
        let dim = self.queue.size()[2];
        let rows = features.detach().to_kind(Kind::Float).index_select(0, &src); // [n, D]
        let mut flat = self.queue.view([-1, dim]); // [C·Q, D], shares storage
        tch::no_grad(|| flat.f_index_copy_(0, &dst, &rows))
            .map_err(|e| Error::torch("updating the VOS feature queue", e))
            .map(drop)?;
        Ok(())
    }

    /// The class means `[C, D]` and the shared covariance `[D, D]` (module doc step 2). Only meaningful
    /// when [`FeatureQueue::is_full`].
    pub fn gaussians(&self) -> Result<ClassGaussians> {
        tch::no_grad(|| {
            let dim = self.queue.size()[2];
            let means = self.queue.mean_dim(1, false, Kind::Float); // [C, D]
            let centred = (&self.queue - means.unsqueeze(1)).view([-1, dim]); // [C·Q, D]
            let n = centred.size()[0] as f64;
            let eye = Tensor::eye(dim, (Kind::Float, self.queue.device()));
            let cov = centred.transpose(0, 1).matmul(&centred) / n + eye * COVARIANCE_RIDGE; // [D, D]
            let chol = cov
                .f_linalg_cholesky(false)
                .map_err(|e| Error::torch("Cholesky factor of the VOS covariance", e))?;
            Ok(ClassGaussians { means, cov, chol })
        })
    }

    /// The queue as named tensors for the training state file (`vos.queue`, `vos.count`, `vos.head`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let ints =
            |v: &[usize]| Tensor::from_slice(&v.iter().map(|&x| x as i64).collect::<Vec<_>>());
        vec![
            ("vos.queue".into(), self.queue.shallow_clone()),
            ("vos.count".into(), ints(&self.count)),
            ("vos.head".into(), ints(&self.head)),
        ]
    }

    /// Restores [`FeatureQueue::state`]; a missing or misshapen entry is an error naming it.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |name: &str, want: Vec<i64>| -> Result<&Tensor> {
            let t = tensors.get(name).ok_or_else(|| Error::InvalidValue {
                key: name.into(),
                msg: "missing from the training state (was the run started with another method?)"
                    .into(),
            })?;
            if t.size() != want {
                return Err(Error::Shape {
                    what: format!("`{name}` in the training state"),
                    expected: format!("{want:?}"),
                    got: format!("{:?}", t.size()),
                });
            }
            Ok(t)
        };
        let c = self.count.len() as i64;
        let queue = get("vos.queue", self.queue.size())?;
        let ints = |t: &Tensor| -> Result<Vec<usize>> {
            let v = Vec::<i64>::try_from(t.to_kind(Kind::Int64))
                .map_err(|e| Error::torch("reading the VOS queue state", e))?;
            Ok(v.into_iter().map(|x| x.max(0) as usize).collect())
        };
        let count = ints(get("vos.count", vec![c])?)?;
        let head = ints(get("vos.head", vec![c])?)?;
        if count.iter().chain(&head).any(|&x| x > self.capacity) {
            return Err(Error::InvalidValue {
                key: "vos.count".into(),
                msg: format!("holds a value above the queue size {}", self.capacity),
            });
        }
        tch::no_grad(|| self.queue.copy_(&queue.to_device(self.queue.device())));
        self.count = count;
        self.head = head;
        Ok(())
    }
}

/// Class-conditional Gaussians with one shared covariance.
#[derive(Debug)]
pub struct ClassGaussians {
    /// `[C, D]`.
    pub means: Tensor,
    /// `[D, D]`, ridge included.
    pub cov: Tensor,
    /// Lower Cholesky factor of `cov`.
    pub chol: Tensor,
}

impl ClassGaussians {
    /// `μ_c + L ε` for standard-normal-space offsets `ε` `[C · select, D]` (class-major, as
    /// [`draw_offsets`] returns them) → virtual outliers `[C · select, D]` on the means' device.
    pub fn outliers(&self, offsets: &Tensor, select: usize) -> Tensor {
        let means = self
            .means
            .repeat_interleave_self_int(select as i64, 0, None); // [C·select, D]
        means
            + offsets
                .to_device(self.means.device())
                .matmul(&self.chol.transpose(0, 1))
    }
}

/// The standard-normal offsets `ε` of the virtual outliers of one step (module doc step 3): for each class,
/// the `select` largest of `samples` χ²_dim draws as squared radii, each with a uniform direction.
/// Returns `[num_classes · select, dim]` on the CPU, class-major. Depends only on its arguments.
pub fn draw_offsets(
    seed: u64,
    step: u64,
    num_classes: usize,
    dim: usize,
    samples: usize,
    select: usize,
) -> Tensor {
    let chi2 = ChiSquared::new(dim as f64).expect("invariant: dim ≥ 1");
    let mut out = Vec::with_capacity(num_classes * select * dim);
    let mut radii2 = Vec::with_capacity(samples);
    for class in 0..num_classes {
        let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(seed ^ VOS_TAG, step, class));
        radii2.clear();
        radii2.extend((0..samples).map(|_| rng.sample::<f64, _>(chi2)));
        radii2.sort_unstable_by(|a, b| b.total_cmp(a));
        for &r2 in &radii2[..select] {
            let dir: Vec<f64> = (0..dim)
                .map(|_| rng.sample::<f64, _>(StandardNormal))
                .collect();
            let norm = dir
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
                .max(f64::MIN_POSITIVE);
            let scale = r2.sqrt() / norm;
            out.extend(dir.iter().map(|x| (x * scale) as f32));
        }
    }
    Tensor::from_slice(&out).view([(num_classes * select) as i64, dim as i64])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(rows: &[f32], dim: i64) -> Tensor {
        Tensor::from_slice(rows).view([-1, dim])
    }

    fn queue_rows(q: &FeatureQueue, class: i64) -> Vec<f32> {
        Vec::<f32>::try_from(q.queue.get(class).flatten(0, -1)).unwrap()
    }

    #[test]
    fn queue_fills_then_drops_extras_then_replaces_the_oldest() {
        let mut q = FeatureQueue::new(2, 2, 1, Device::Cpu);
        // Step 1 (filling): class 0 gets 1, 2 and drops 3; class 1 gets 10.
        q.push(&feats(&[1.0, 10.0, 2.0, 3.0], 1), &[0, 1, 0, 0])
            .unwrap();
        assert!(!q.is_full());
        assert_eq!(queue_rows(&q, 0), [1.0, 2.0]);
        // Step 2 (still filling at its start): class 1 gets 11 and drops 12; class 0 drops 4.
        q.push(&feats(&[11.0, 4.0, 12.0], 1), &[1, 0, 1]).unwrap();
        assert!(q.is_full());
        assert_eq!(queue_rows(&q, 1), [10.0, 11.0]);
        // Step 3 (full at its start): FIFO; class 0: 1 → 5, then 2 → 6, then 5 → 7 (the same slot twice
        // in one step: the later row wins, as in the sequential official update).
        q.push(&feats(&[5.0, 6.0, 7.0], 1), &[0, 0, 0]).unwrap();
        let mut got = queue_rows(&q, 0);
        got.sort_by(f32::total_cmp);
        assert_eq!(got, [6.0, 7.0]);
        assert!(q.push(&feats(&[1.0], 1), &[2]).is_err());
    }

    #[test]
    fn gaussians_are_class_means_and_the_pooled_centred_covariance() {
        let mut q = FeatureQueue::new(2, 2, 2, Device::Cpu);
        q.push(
            &feats(&[1.0, 0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 5.0], 2),
            &[0, 0, 1, 1],
        )
        .unwrap();
        let g = q.gaussians().unwrap();
        assert_eq!(
            Vec::<f32>::try_from(g.means.flatten(0, -1)).unwrap(),
            [2.0, 0.0, 0.0, 3.0]
        );
        // Centred rows: (−1,0), (1,0), (0,−2), (0,2) → XᵀX / 4 = diag(0.5, 2) + 1e-4.
        let cov = Vec::<f32>::try_from(g.cov.flatten(0, -1)).unwrap();
        let want = [0.5 + 1e-4, 0.0, 0.0, 2.0 + 1e-4];
        for (a, b) in cov.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{cov:?}");
        }
        let back = g.chol.matmul(&g.chol.transpose(0, 1)) - &g.cov;
        assert!(back.abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn state_round_trip() {
        let mut q = FeatureQueue::new(3, 2, 2, Device::Cpu);
        q.push(&feats(&[1.0, 2.0, 3.0, 4.0], 2), &[2, 0]).unwrap();
        let state: BTreeMap<String, Tensor> = q.state().into_iter().collect();
        let mut r = FeatureQueue::new(3, 2, 2, Device::Cpu);
        r.load_state(&state).unwrap();
        assert!(r.queue.equal(&q.queue));
        assert_eq!(
            (r.count.clone(), r.head.clone()),
            (q.count.clone(), q.head.clone())
        );
        let mut wrong = FeatureQueue::new(4, 2, 2, Device::Cpu);
        assert!(wrong.load_state(&state).is_err());
        assert!(
            wrong
                .load_state(&BTreeMap::new())
                .unwrap_err()
                .to_string()
                .contains("vos.queue")
        );
    }

    #[test]
    fn offsets_are_seeded_and_shaped() {
        let a = draw_offsets(3, 7, 4, 5, 100, 2);
        assert_eq!(a.size(), [8, 5]);
        assert!(a.equal(&draw_offsets(3, 7, 4, 5, 100, 2)));
        assert!(!a.equal(&draw_offsets(3, 8, 4, 5, 100, 2)));
        // Within a class, the first kept offset is the longer one.
        let norms = Vec::<f32>::try_from(a.square().sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Float,
        ))
        .unwrap();
        for c in 0..4 {
            assert!(norms[2 * c] >= norms[2 * c + 1], "{norms:?}");
        }
    }

    /// The official procedure (draw `samples` standard normals in R^dim, keep the `select` with the largest
    /// norm, which is `topk(−log_prob)` under a shared covariance) against [`draw_offsets`]: the kept
    /// squared norms agree in mean and spread, and the directions are isotropic.
    #[test]
    fn offsets_follow_the_official_selection() {
        let (dim, samples, select, reps) = (6usize, 400usize, 2usize, 400usize);
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let mut official: Vec<f64> = Vec::new();
        for _ in 0..reps {
            let mut norms: Vec<f64> = (0..samples)
                .map(|_| {
                    (0..dim)
                        .map(|_| rng.sample::<f64, _>(StandardNormal).powi(2))
                        .sum()
                })
                .collect();
            norms.sort_unstable_by(|a, b| b.total_cmp(a));
            official.extend_from_slice(&norms[..select]);
        }
        let ours_t = draw_offsets(5, 0, reps, dim, samples, select);
        let ours: Vec<f64> = Vec::<f32>::try_from(ours_t.square().sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Float,
        ))
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
        let stats = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            (m, s)
        };
        let ((m_o, s_o), (m_u, s_u)) = (stats(&official), stats(&ours));
        // Standard error of each mean ≈ s / √800 ≈ 0.1; the two must agree within a few of those.
        assert!(
            (m_o - m_u).abs() < 0.5,
            "mean ‖ε‖²: official {m_o:.3}, ours {m_u:.3}"
        );
        assert!(
            (s_o - s_u).abs() < 0.5,
            "std ‖ε‖²: official {s_o:.3}, ours {s_u:.3}"
        );
        // Far in the tail of χ²_6 (mean 6): the kept draws are the extreme ones.
        assert!(m_u > 15.0, "{m_u}");
        // Isotropy: each coordinate's mean is ~0 and the coordinates share the squared norm equally.
        let mean_coord = ours_t
            .mean_dim(0, false, Kind::Float)
            .abs()
            .max()
            .double_value(&[]);
        assert!(mean_coord < 0.5, "{mean_coord}");
    }
}
