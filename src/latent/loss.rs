//! The stage-1 loss (SPEC §1.3): cross-entropy over the cosine similarities between the encoder's output and
//! every class token embedding, divided by τ:
//!
//! ```text
//! ℓ_{b,c} = cos(f_b, T_c) / τ,   cos(a, b) = a·b / (max(‖a‖, ε) · max(‖b‖, ε)),   L = CE(ℓ, y)
//! ```
//!
//! The official code builds the `[B, C]` cosines with `repeat` + `F.cosine_similarity`; the normalised
//! matmul here is the same numbers without the `[B, C, D]` intermediate. PyTorch 2.11's
//! `cosine_similarity` clamps each norm separately (ε = 1e-8), as this does. Checked against PyTorch in
//! `tests/training.rs` (loss and gradient).

use tch::{Kind, Tensor};

/// ε of `F.cosine_similarity`.
const EPS: f64 = 1e-8;

/// Rows scaled to unit L2 norm (norms clamped at ε).
pub fn unit_rows(x: &Tensor) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)
        .clamp_min(EPS);
    x / norm
}

/// `[B, C]` cosine logits `cos(f_b, T_c) / τ`; `tokens_unit` is `unit_rows(T)`.
pub fn cosine_logits(features: &Tensor, tokens_unit: &Tensor, tau: f64) -> Tensor {
    unit_rows(features).matmul(&tokens_unit.tr()) / tau
}

/// The mean stage-1 loss of a batch.
pub fn alignment_loss(
    features: &Tensor,
    tokens_unit: &Tensor,
    labels: &Tensor,
    tau: f64,
) -> Tensor {
    cosine_logits(features, tokens_unit, tau)
        .log_softmax(-1, Kind::Float)
        .nll_loss(labels)
}
