//! ODIN (Liang, Li, Srikant, ICLR 2018), as the official Dream-OOD code runs it
//! (`utils/score_calculation.py:L17-87`, Liang et al.'s own `calData.py`) and OpenOOD's `odin`:
//!
//! 1. `ŷ = argmax_c g(x)_c`; the loss `L = CE(g(x) / T, ŷ)` (mean over the batch, PyTorch's default);
//! 2. `x̃ = x − ε · sign(∇ₓL) / σ`, where `sign` maps a gradient ≥ 0 to +1 and < 0 to −1
//!    (`(torch.ge(grad, 0).float() − 0.5) · 2`), and `σ` is the per-channel std of the input normalisation;
//! 3. score `S(x) = max_c softmax(g(x̃) / T)_c`.
//!
//! `x` is the normalised network input, so the step is taken in normalised space and divided by `σ`: a
//! step of ε in 0..1 pixel space. Deviation: the official Dream-OOD code divides by the CIFAR std constants
//! `(63.0, 62.1, 66.7)/255` even for ImageNet-100 inputs (SPEC §5.1); here σ is the std of the
//! checkpoint's own evaluation transform, as OpenOOD does (the same numbers on CIFAR). Defaults T = 1000,
//! ε = 0.0014, the values of the official scripts' arguments.
//!
//! Descending `L` raises the temperature-scaled softmax of the predicted class, and does so more for ID
//! than for OOD inputs; that gap is what the score reads.

use tch::nn::ModuleT;
use tch::{Kind, Tensor};

use super::logit::msp_at_temperature;
use crate::nn::ResNetWithHead;
use crate::{Error, Result};

/// The logits of the perturbed inputs `g(x̃)` `[B, C]` (steps 1–2) for a batch `images` `[B, ch, H, W]`
/// (normalised). `std` has one value per input channel.
pub fn perturbed_logits(
    net: &ResNetWithHead,
    images: &Tensor,
    temperature: f64,
    epsilon: f64,
    std: &[f64],
) -> Result<Tensor> {
    let size = images.size();
    if size.len() != 4 || size[1] as usize != std.len() {
        return Err(Error::Shape {
            what: "odin: input images".into(),
            expected: format!("[B, {}, H, W]", std.len()),
            got: format!("{size:?}"),
        });
    }
    let x = images
        .f_detach()
        .and_then(|x| x.f_to_kind(Kind::Float))
        .map_err(|e| Error::torch("odin: input", e))?
        .set_requires_grad(true);
    let logits = net.forward_t(&x, false); // [B, C]
    let predicted = logits.argmax(1, false); // [B]
    let loss = (logits / temperature).cross_entropy_for_logits(&predicted);
    let grads = Tensor::f_run_backward(&[loss], &[&x], false, false)
        .map_err(|e| Error::torch("odin: input gradient", e))?;
    let sign = grads[0].ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0; // [B, ch, H, W] in {−1, +1}
    let inv_std: Vec<f32> = std.iter().map(|s| (1.0 / s) as f32).collect();
    let inv_std =
        Tensor::from_slice(&inv_std)
            .to_device(x.device())
            .view([1, std.len() as i64, 1, 1]);
    let perturbed = x.detach() - sign * inv_std * epsilon;
    Ok(tch::no_grad(|| net.forward_t(&perturbed, false)))
}

/// Step 3: `max_c softmax(g(x̃) / T)_c` from the perturbed logits.
pub fn score(perturbed_logits: &Tensor, temperature: f64) -> Result<Vec<f64>> {
    msp_at_temperature(perturbed_logits, temperature)
}
