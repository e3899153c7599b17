//! The energy regulariser of Dream-OOD (SPEC §4.4) and VOS (reference note §3.1), and the logistic head φ.
//!
//! Notation (SPEC §4.4): `G ∈ R^{B×C}` logits, the first `B_in` rows ID; `u_b = lse_c(G_b) / T = −E(x_b)/T`;
//! `z_b = φ(u_b) ∈ R^2`; `ℓ_b = 1` for ID rows and `0` for outliers.
//!
//! ```text
//! L_CE     = mean_{b ∈ ID} −log softmax(G_b)_{y_b}
//! L_energy = mean_{all b}  −log softmax(z_b)_{ℓ_b}
//! L        = L_CE + β · L_energy
//! ```
//!
//! `scripts/train_ood_det_cifar100.py:L245-258` (φ = Linear(1, 2), β = 2.5) and
//! `scripts/train_ood_det_in100.py:L322-334` (φ = Linear(1,512)-ReLU-Linear(512,2), β = 1). VOS replaces
//! `lse` by a weighted one with learnable non-negative class weights ([`weighted_logsumexp`]).
//!
//! φ is built on a `VarStore` path, so its parameters are optimised and checkpointed like the network's.
//! That is the point of the regulariser: OpenOOD's VOS trainer rebuilds a random φ inside every call and
//! detaches the scores, so no gradient ever reaches the backbone (reference note §1.5); the tests here
//! and in `tests/detector.rs` check that both the backbone and φ move.

use tch::{Kind, Tensor, nn};

use super::config::Phi;
use crate::nn::resnet::linear;

/// φ: the energy → 2-logit head, with PyTorch's names under its path (`phi.weight`, `phi.bias` for the
/// linear head; `phi.0.*`, `phi.2.*` for the MLP, as `nn.Sequential` names them).
#[derive(Debug)]
pub enum PhiHead {
    Linear(nn::Linear),
    Mlp(nn::Linear, nn::Linear),
}

impl PhiHead {
    /// Builds φ under `p` with PyTorch's default `nn.Linear` initialisation.
    pub fn new(p: &nn::Path, kind: Phi) -> PhiHead {
        match kind {
            Phi::Linear => PhiHead::Linear(linear(p.clone(), 1, 2)),
            Phi::Mlp => PhiHead::Mlp(linear(p / "0", 1, 512), linear(p / "2", 512, 2)),
        }
    }

    /// The mean slope of `z_1 − z_0` (the ID-vs-outlier logit) in `u` over `u ∈ [0, 20]`, the range
    /// of `lse` of a classifier's logits.
    pub fn slope(&self) -> f64 {
        tch::no_grad(|| {
            let u = Tensor::linspace(0.0, 20.0, 41, (Kind::Float, self.device())).view([-1, 1]);
            let z = self.forward(&u);
            let d = z.select(1, 1) - z.select(1, 0); // [41]
            (d.get(40) - d.get(0)).double_value(&[]) / 20.0
        })
    }

    /// Swaps φ's two outputs when its slope is negative, so that at the first step the regulariser
    /// already pushes ID rows towards higher `lse`, the direction the energy score assumes at test time.
    /// PyTorch's init is symmetric in the two rows, so this is the same init conditioned on the sign.
    pub fn align(&self) {
        if self.slope() >= 0.0 {
            return;
        }
        let last = match self {
            PhiHead::Linear(l) => l,
            PhiHead::Mlp(_, b) => b,
        };
        tch::no_grad(|| {
            let flip = Tensor::from_slice(&[1i64, 0]).to_device(last.ws.device());
            let mut w = last.ws.shallow_clone();
            w.copy_(&last.ws.index_select(0, &flip));
            if let Some(bs) = &last.bs {
                let mut b = bs.shallow_clone();
                b.copy_(&bs.index_select(0, &flip));
            }
        });
    }

    fn device(&self) -> tch::Device {
        match self {
            PhiHead::Linear(l) => l.ws.device(),
            PhiHead::Mlp(a, _) => a.ws.device(),
        }
    }

    /// `[B, 1]` → `[B, 2]`.
    pub fn forward(&self, u: &Tensor) -> Tensor {
        match self {
            PhiHead::Linear(l) => u.apply(l),
            PhiHead::Mlp(a, b) => u.apply(a).relu().apply(b),
        }
    }
}

/// The pieces of one step's loss, as 0-d tensors still in the graph (`reg` is zero when the method has no
/// regulariser or it is not active yet).
#[derive(Debug)]
pub struct LossParts {
    /// `ce + weight · reg`.
    pub loss: Tensor,
    pub ce: Tensor,
    pub reg: Tensor,
    /// Means of the regulariser's input score (`u`, or VOS's weighted lse) over the ID rows and over the
    /// outlier rows, detached; `None` without a regulariser. Logged per epoch: the energy score ranks
    /// correctly at test time only if the ID mean ends up above the outliers'.
    pub score_means: Option<(Tensor, Tensor)>,
}

fn means(s_in: &Tensor, s_out: &Tensor) -> Option<(Tensor, Tensor)> {
    let m = |t: &Tensor| t.detach().mean(Kind::Float);
    Some((m(s_in), m(s_out)))
}

/// The logistic regulariser on per-row scores: `mean_b −log softmax(φ(s_b))_{ℓ_b}` over `[s_in; s_out]`
/// with `ℓ = 1` for `s_in` and `0` for `s_out`. `s_in` `[B_in]`, `s_out` `[B_out]`.
pub fn logistic_regulariser(phi: &PhiHead, s_in: &Tensor, s_out: &Tensor) -> Tensor {
    let (n_in, n_out) = (s_in.size()[0], s_out.size()[0]);
    let device = s_in.device();
    let scores = Tensor::cat(&[s_in, s_out], 0).view([-1, 1]); // [B, 1]
    let target = Tensor::cat(
        &[
            Tensor::ones([n_in], (Kind::Int64, device)),
            Tensor::zeros([n_out], (Kind::Int64, device)),
        ],
        0,
    ); // [B]
    phi.forward(&scores).cross_entropy_for_logits(&target)
}

/// The Dream-OOD loss (SPEC §4.4) on `logits` `[B, C]` whose first `labels.size()[0]` rows are ID with
/// class `labels` and the rest generated outliers: `u = lse(logits) / temperature` for every row.
pub fn dream_ood_loss(
    logits: &Tensor,
    labels: &Tensor,
    phi: &PhiHead,
    beta: f64,
    temperature: f64,
) -> LossParts {
    let n_in = labels.size()[0];
    let n = logits.size()[0];
    let ce = logits.narrow(0, 0, n_in).cross_entropy_for_logits(labels);
    let u = logits.logsumexp([1], false) / temperature; // [B]
    let (u_in, u_out) = (u.narrow(0, 0, n_in), u.narrow(0, n_in, n - n_in));
    let reg = logistic_regulariser(phi, &u_in, &u_out);
    LossParts {
        loss: &ce + &reg * beta,
        ce,
        reg,
        score_means: means(&u_in, &u_out),
    }
}

/// VOS's weighted log-sum-exp over classes (`train_virtual.py` `log_sum_exp`):
/// `m + log Σ_k ReLU(w_k) · exp(v_k − m)` with `m = max_k v_k`. `value` `[B, C]`, `weight` `[1, C]` → `[B]`.
pub fn weighted_logsumexp(value: &Tensor, weight: &Tensor) -> Tensor {
    let (m, _) = value.max_dim(1, true); // [B, 1]
    let sum =
        (weight.relu() * (value - &m).exp()).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    m.squeeze_dim(1) + sum.log()
}

/// The VOS loss: CE on the ID logits + `loss_weight` · the logistic regulariser on the weighted energy of
/// the ID logits (ℓ = 1) and of the virtual outliers' logits (ℓ = 0).
pub fn vos_loss(
    id_logits: &Tensor,
    labels: &Tensor,
    virtual_logits: &Tensor,
    energy_weight: &Tensor,
    phi: &PhiHead,
    loss_weight: f64,
) -> LossParts {
    let ce = id_logits.cross_entropy_for_logits(labels);
    let s_in = weighted_logsumexp(id_logits, energy_weight);
    let s_out = weighted_logsumexp(virtual_logits, energy_weight);
    let reg = logistic_regulariser(phi, &s_in, &s_out);
    LossParts {
        loss: &ce + &reg * loss_weight,
        ce,
        reg,
        score_means: means(&s_in, &s_out),
    }
}

/// Plain cross-entropy (baseline, inlier augmentation, VOS before its start epoch).
pub fn ce_loss(logits: &Tensor, labels: &Tensor) -> LossParts {
    let ce = logits.cross_entropy_for_logits(labels);
    LossParts {
        loss: ce.shallow_clone(),
        reg: ce.zeros_like(),
        ce,
        score_means: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_has_pytorch_names_and_shapes() {
        for (kind, want) in [
            (
                Phi::Linear,
                vec![("phi.bias", vec![2]), ("phi.weight", vec![2, 1])],
            ),
            (
                Phi::Mlp,
                vec![
                    ("phi.0.bias", vec![512]),
                    ("phi.0.weight", vec![512, 1]),
                    ("phi.2.bias", vec![2]),
                    ("phi.2.weight", vec![2, 512]),
                ],
            ),
        ] {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let phi = PhiHead::new(&(vs.root() / "phi"), kind);
            let mut got: Vec<(String, Vec<i64>)> = vs
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
            got.sort();
            let want: Vec<(String, Vec<i64>)> =
                want.into_iter().map(|(n, s)| (n.to_owned(), s)).collect();
            assert_eq!(got, want);
            assert_eq!(
                phi.forward(&Tensor::zeros([3, 1], (Kind::Float, tch::Device::Cpu)))
                    .size(),
                [3, 2]
            );
        }
    }

    #[test]
    fn weighted_lse_with_unit_weights_is_logsumexp_and_ignores_negative_weights() {
        let v = Tensor::from_slice(&[1.0f32, 2.0, 3.0, -4.0, 0.5, 9.0]).view([2, 3]);
        let ones = Tensor::ones([1, 3], (Kind::Float, tch::Device::Cpu));
        let d = (weighted_logsumexp(&v, &ones) - v.logsumexp([1], false))
            .abs()
            .max();
        assert!(d.double_value(&[]) < 1e-6);
        // A negative weight counts as 0: class 2 drops out.
        let w = Tensor::from_slice(&[1.0f32, 1.0, -3.0]).view([1, 3]);
        let want = v.narrow(1, 0, 2).logsumexp([1], false);
        let d = (weighted_logsumexp(&v, &w) - want).abs().max();
        assert!(d.double_value(&[]) < 1e-6);
    }

    #[test]
    fn align_makes_the_slope_positive_by_swapping_the_outputs() {
        for kind in [Phi::Linear, Phi::Mlp] {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let phi = PhiHead::new(&(vs.root() / "phi"), kind);
            // Deterministic weights with a negative slope: z_0 rises with u, z_1 falls.
            tch::no_grad(|| {
                for (name, mut t) in vs.variables() {
                    let n = t.numel() as i64;
                    let v = Tensor::arange(n, (Kind::Float, tch::Device::Cpu))
                        .g_mul_scalar(0.3)
                        .cos();
                    let v = if name.ends_with("weight") && t.size()[0] == 2 {
                        Tensor::cat(
                            &[
                                v.abs().narrow(0, 0, n / 2),
                                -v.abs().narrow(0, n / 2, n / 2),
                            ],
                            0,
                        )
                    } else {
                        v.abs()
                    };
                    t.copy_(&v.reshape(t.size()));
                }
            });
            assert!(phi.slope() < 0.0, "{kind:?}");
            let u = Tensor::from_slice(&[0.5f32, 3.0, 9.0]).view([3, 1]);
            let before = phi.forward(&u);
            phi.align();
            assert!(phi.slope() > 0.0, "{kind:?}");
            let after = phi.forward(&u);
            assert!(
                after.equal(&before.index_select(1, &Tensor::from_slice(&[1i64, 0]))),
                "{kind:?}"
            );
            phi.align();
            assert!(
                phi.forward(&u).equal(&after),
                "{kind:?}: a second align changes nothing"
            );
        }
    }

    #[test]
    fn ce_loss_has_a_zero_regulariser() {
        let logits = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 0.0]).view([2, 2]);
        let labels = Tensor::from_slice(&[1i64, 0]);
        let parts = ce_loss(&logits, &labels);
        assert_eq!(parts.reg.double_value(&[]), 0.0);
        assert_eq!(parts.loss.double_value(&[]), parts.ce.double_value(&[]));
    }
}
