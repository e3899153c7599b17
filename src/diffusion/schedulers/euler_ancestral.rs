//! Euler ancestral: diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's `sample_euler_ancestral`, η = 1).
//!
//! Same sigmas, input scaling and x̂0 as [`EulerDiscreteScheduler`](super::EulerDiscreteScheduler); each step
//! goes down to `σ_down` deterministically and adds fresh noise of size `σ_up`, so that the marginal noise
//! level is `σ_{i+1}`:
//!
//! ```text
//! σ_up   = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²)
//! σ_down = √(σ_{i+1}² − σ_up²)
//! x_next = x + (x − x̂0)/σ_i · (σ_down − σ_i) + σ_up · z,   z ~ N(0, I) from the caller, every step
//! ```
//!
//! Upstream: `EulerAncestralDiscreteScheduler.step`,
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py>.

use ndarray::ArrayD;

use super::euler::{add_noise_sigma, euler_schedule, pred_original_sample, scale_by_sigma};
use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, StepIndex, check_shape,
    draw_noise, zip_map,
};
use crate::error::Result;

/// diffusers' `EulerAncestralDiscreteScheduler`. Stochastic: every `step` draws one noise tensor (also the last
/// one, where `σ_up = 0`, as diffusers does, so caller RNG streams stay aligned with diffusers').
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    step_index: StepIndex,
}

impl EulerAncestralDiscreteScheduler {
    /// diffusers' `EulerAncestralDiscreteScheduler.from_config(config)` with `set_timesteps(n)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate(SchedulerKind::EulerAncestral, num_inference_steps)?;
        let (timesteps, sigmas, init_noise_sigma) =
            euler_schedule(config, SchedulerKind::EulerAncestral, num_inference_steps);
        Ok(EulerAncestralDiscreteScheduler {
            prediction_type: config.prediction_type,
            timesteps,
            sigmas,
            init_noise_sigma,
            step_index: StepIndex::default(),
        })
    }

    /// The noise levels σ_0 … σ_N (σ_N = 0).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn is_stochastic(&self) -> bool {
        true
    }

    fn scale_model_input(&self, sample: &ArrayD<f32>, timestep: f64) -> Result<ArrayD<f32>> {
        let i =
            self.step_index
                .resolve(self.kind(), "scale_model_input", &self.timesteps, timestep)?;
        Ok(scale_by_sigma(sample, self.sigmas[i]))
    }

    fn step(
        &mut self,
        model_output: &ArrayD<f32>,
        timestep: f64,
        sample: &ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<ArrayD<f32>> {
        check_shape("model_output", model_output, sample)?;
        let i = self
            .step_index
            .resolve(self.kind(), "step", &self.timesteps, timestep)?;
        let sigma = self.sigmas[i] as f32;
        let pred_x0 =
            pred_original_sample(self.prediction_type, model_output, sample, self.sigmas[i]);
        // float32 scalar maths, as diffusers' 0-d tensors.
        let (from, to) = (sigma, self.sigmas[i + 1] as f32);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let mut prev = zip_map(sample, &pred_x0, |x, x0| x + ((x - x0) / sigma) * dt);
        let z = draw_noise(noise, sample)?;
        prev.zip_mut_with(&z, |p, &z| *p += z * sigma_up);
        self.step_index.advance(i);
        Ok(prev)
    }

    fn add_noise(
        &self,
        original: &ArrayD<f32>,
        noise: &ArrayD<f32>,
        timestep: f64,
    ) -> Result<ArrayD<f32>> {
        add_noise_sigma(
            self.kind(),
            &self.timesteps,
            &self.sigmas,
            original,
            noise,
            timestep,
        )
    }
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::*;

    #[test]
    fn ancestral_step_by_hand_and_noise_every_step() {
        let cfg = SchedulerConfig::default();
        let mut s = EulerAncestralDiscreteScheduler::new(&cfg, 3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 499.5, 0.0]);
        let x = ArrayD::from_elem(IxDyn(&[2]), 3.0f32);
        let e = ArrayD::from_elem(IxDyn(&[2]), 0.25f32);
        let mut calls = 0;
        let mut ones = |sh: &[usize]| {
            calls += 1;
            ArrayD::from_elem(IxDyn(sh), 1.0f32)
        };
        let t = s.timesteps().to_vec();
        let x1 = s.step(&e, t[0], &x, &mut ones).unwrap();
        let (from, to) = (s.sigmas()[0], s.sigmas()[1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let want = 3.0 + 0.25 * (down - from) + up;
        assert!(
            (f64::from(x1[[0]]) - want).abs() < 1e-4,
            "{} vs {want}",
            x1[[0]]
        );
        s.step(&e, t[1], &x1, &mut ones).unwrap();
        let last = s.step(&e, t[2], &x, &mut ones).unwrap();
        // Last step: σ_{N} = 0, so σ_up = 0 and the result is x̂0 = x − σ·ε, yet noise is still drawn.
        let want = 3.0 - s.sigmas()[2] * 0.25;
        assert!(
            (f64::from(last[[1]]) - want).abs() < 1e-5,
            "{} vs {want}",
            last[[1]]
        );
        assert_eq!(calls, 3);
    }
}
