//! The optimiser every Dream-OOD training uses (SPEC §1.5, §4.5): SGD with Nesterov momentum 0.9 and weight
//! decay 5e-4 on every parameter, with the learning rate cosine-annealed per iteration to 1e-6.
//!
//! Why not `tch::nn::Sgd`: its momentum buffers live inside libtorch's C++ optimiser, out of reach, so a
//! resumed run would restart with zero momentum and drift from an uninterrupted one. Here the buffers are
//! ordinary tensors that [`Sgd::state`] hands to the checkpoint writer. The update is `torch.optim.SGD`'s
//! (dampening 0):
//!
//! ```text
//! g ← ∇p + wd·p;   b ← μ·b + g   (b = g on the first step);   p ← p − lr·(g + μ·b)   (Nesterov)
//! ```
//!
//! `tools/make_optim_fixture.py` records PyTorch's trajectory for fixed gradients; the tests replay it.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use tch::{Tensor, nn};

use crate::error::{Error, Result};

/// SGD settings; defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
        }
    }
}

/// `lr(s) = lr_min + (lr0 − lr_min) · ½ (1 + cos(π s / S))` for step `s` of `S` (0-based; the first step
/// uses `lr0`), the official `LambdaLR(cosine_annealing)` stepped after every optimiser step.
pub fn cosine_lr(step: u64, total_steps: u64, lr0: f64, lr_min: f64) -> f64 {
    let frac = if total_steps == 0 {
        1.0
    } else {
        (step as f64 / total_steps as f64).min(1.0)
    };
    lr_min + (lr0 - lr_min) * 0.5 * (1.0 + (PI * frac).cos())
}

/// SGD over named trainable tensors, with its momentum buffers in the open.
pub struct Sgd {
    params: Vec<(String, Tensor)>,
    buffers: Vec<Option<Tensor>>,
    cfg: SgdConfig,
}

/// Prefix of the momentum buffers' names in [`Sgd::state`].
const MOMENTUM_PREFIX: &str = "momentum.";

impl Sgd {
    /// Optimises every trainable variable of `vs` (BatchNorm running statistics are not trainable).
    pub fn new(vs: &nn::VarStore, cfg: SgdConfig) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let buffers = (0..params.len()).map(|_| None).collect();
        Self {
            params,
            buffers,
            cfg,
        }
    }

    /// Names of the optimised tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|(n, _)| n.as_str())
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update with learning rate `lr`. Parameters without a gradient (unused in this step) are left
    /// alone, as PyTorch does.
    pub fn step(&mut self, lr: f64) {
        let SgdConfig {
            momentum,
            weight_decay,
            nesterov,
        } = self.cfg;
        // In place, with scalars as 0-dim tensors for `addcmul_` (`x += a · b`): one pass per operation and
        // no full-size temporaries. Allocating and freeing a parameter-sized temporary per operation (the
        // first version) made the allocator map and unmap pages every step: a fifth of the time in the
        // kernel on a CPU (BENCHMARKS.md, stage 4). The gradient is overwritten by `d_p`, as nothing reads it
        // after the step and `zero_grad` clears it.
        let Some(device) = self.params.first().map(|(_, p)| p.device()) else {
            return;
        };
        let scalar = |v: f64| Tensor::from(v as f32).to_device(device);
        let (wd, mom, neg_lr) = (scalar(weight_decay), scalar(momentum), scalar(-lr));
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(self.buffers.iter_mut()) {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                if weight_decay != 0.0 {
                    let _ = g.addcmul_(p, &wd); // d_p = grad + wd · p
                }
                if momentum != 0.0 {
                    match buf {
                        Some(b) => {
                            let _ = b.g_mul_scalar_(momentum).g_add_(&g); // buf = m · buf + d_p
                            if nesterov {
                                let _ = g.addcmul_(b, &mom); // d_p += m · buf
                            } else {
                                g.copy_(b);
                            }
                        }
                        None => {
                            let b = buf.insert(g.copy()); // first step: buf = d_p
                            if nesterov {
                                let _ = g.addcmul_(b, &mom);
                            }
                        }
                    }
                }
                let _ = p.addcmul_(&g, &neg_lr); // p -= lr · d_p
            }
        });
    }

    /// The momentum buffers by name (`momentum.<parameter>`), for a checkpoint. Buffers not created yet
    /// (no step taken) are absent.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| {
                b.as_ref()
                    .map(|b| (format!("{MOMENTUM_PREFIX}{n}"), b.shallow_clone()))
            })
            .collect()
    }

    /// Restores buffers written by [`Sgd::state`]. A buffer whose shape does not match its parameter is an
    /// error; tensors of other names are ignored (the caller's file may hold more).
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for ((name, p), buf) in self.params.iter().zip(self.buffers.iter_mut()) {
            if let Some(t) = tensors.get(&format!("{MOMENTUM_PREFIX}{name}")) {
                if t.size() != p.size() {
                    return Err(Error::Shape {
                        what: format!("momentum buffer of `{name}`"),
                        expected: format!("{:?} (the parameter's)", p.size()),
                        got: format!("{:?}", t.size()),
                    });
                }
                *buf = Some(t.to_device(p.device()).to_kind(p.kind()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_lr0_and_ends_at_the_floor() {
        assert_eq!(cosine_lr(0, 100, 0.1, 1e-6), 0.1);
        assert!((cosine_lr(100, 100, 0.1, 1e-6) - 1e-6).abs() < 1e-15);
        let mid = cosine_lr(50, 100, 0.1, 1e-6);
        assert!((mid - (1e-6 + (0.1 - 1e-6) * 0.5)).abs() < 1e-12);
    }

    #[test]
    fn state_round_trip_resumes_the_same_trajectory() {
        let run = |split: Option<usize>| {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let w = vs
                .root()
                .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0, 0.5]));
            let mut opt = Sgd::new(&vs, SgdConfig::default());
            for step in 0..6 {
                if Some(step) == split {
                    // Simulate a restart: a fresh optimiser given the saved buffers.
                    let state: BTreeMap<_, _> = opt.state().into_iter().collect();
                    opt = Sgd::new(&vs, SgdConfig::default());
                    opt.load_state(&state).unwrap();
                }
                opt.zero_grad();
                let loss = (&w * &w * (step as f64 + 1.0)).sum(tch::Kind::Float);
                loss.backward();
                opt.step(cosine_lr(step as u64, 6, 0.1, 1e-6));
            }
            Vec::<f32>::try_from(&w).unwrap()
        };
        assert_eq!(run(None), run(Some(3)));
    }
}
