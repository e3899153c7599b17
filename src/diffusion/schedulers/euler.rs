//! Euler: diffusers' `EulerDiscreteScheduler`, the Euler method of Karras et al. 2022 ("Elucidating the Design
//! Space of Diffusion-Based Generative Models", <https://arxiv.org/abs/2206.00364>, Algorithm 2 with
//! `s_churn = 0`) on the discrete SD sigmas.
//!
//! Notation: `σ_i` the noise level of step i, `x` the latent in the σ-parametrisation (`x = x0 + σ·ε`, so the
//! initial noise is `N(0, σ_0²)`), `d` the derivative `dx/dσ`.
//!
//! ```text
//! σ_train[k] = √((1 − ᾱ_k)/ᾱ_k);  σ_i = interp(t_i, 0..T, σ_train), then σ_N = 0
//! model input  x / √(σ_i² + 1)
//! x̂0 = x − σ_i·ε            (ε-prediction)
//! x̂0 = −σ_i/√(σ_i²+1)·v + x/(σ_i²+1)   (v-prediction)
//! d = (x − x̂0)/σ_i;  x_next = x + d·(σ_{i+1} − σ_i)
//! ```
//!
//! Upstream: `EulerDiscreteScheduler.set_timesteps` and `step`,
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_euler_discrete.py>.

use ndarray::ArrayD;

use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, StepIndex,
    TimestepSpacing, alphas_cumprod, arange, check_shape, index_for_timestep, interp_index,
    linspace, train_sigmas, unknown_timestep_error, zip_map,
};
use crate::error::Result;

/// Timesteps (float32 values) and sigmas (`N + 1` float32 values, the last 0) of diffusers' Euler schedulers,
/// with the `init_noise_sigma` that goes with them.
pub(super) fn euler_schedule(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    num_inference_steps: usize,
) -> (Vec<f64>, Vec<f64>, f64) {
    let (t, n) = (config.num_train_timesteps, num_inference_steps);
    let spacing = config.timestep_spacing.unwrap_or(kind.default_spacing());
    let as_f32 = |x: f64| f64::from(x as f32);
    let timesteps: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(as_f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| f64::from((i * ratio) as f32 + config.steps_offset as f32))
                .collect()
        }
        TimestepSpacing::Trailing => arange(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(|x| f64::from(x.round_ties_even() as f32 - 1.0))
            .collect(),
    };
    let train = train_sigmas(&alphas_cumprod(config));
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&ts| as_f32(interp_index(ts, &train)))
        .collect();
    sigmas.push(0.0);
    let max_sigma = sigmas.iter().copied().fold(0.0, f64::max) as f32;
    let init_noise_sigma = match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max_sigma),
        TimestepSpacing::Leading => f64::from((max_sigma * max_sigma + 1.0).sqrt()),
    };
    (timesteps, sigmas, init_noise_sigma)
}

/// `x / √(σ² + 1)`, in float32 as diffusers.
pub(super) fn scale_by_sigma(sample: &ArrayD<f32>, sigma: f64) -> ArrayD<f32> {
    let s = sigma as f32;
    let d = (s * s + 1.0).sqrt();
    sample.mapv(|x| x / d)
}

/// `x̂0` from the model output at noise level σ (diffusers' Euler `step`, float32).
pub(super) fn pred_original_sample(
    prediction_type: PredictionType,
    model_output: &ArrayD<f32>,
    sample: &ArrayD<f32>,
    sigma: f64,
) -> ArrayD<f32> {
    let s = sigma as f32;
    match prediction_type {
        PredictionType::Epsilon => zip_map(sample, model_output, |x, e| x - s * e),
        PredictionType::VPrediction => {
            let c_out = -s / (s * s + 1.0).sqrt();
            let c_in = s * s + 1.0;
            zip_map(model_output, sample, |v, x| v * c_out + x / c_in)
        }
    }
}

/// `x0 + σ·noise` with σ of the step at `timestep` (diffusers' Euler `add_noise`).
pub(super) fn add_noise_sigma(
    kind: SchedulerKind,
    timesteps: &[f64],
    sigmas: &[f64],
    original: &ArrayD<f32>,
    noise: &ArrayD<f32>,
    timestep: f64,
) -> Result<ArrayD<f32>> {
    check_shape("noise", noise, original)?;
    let i = index_for_timestep(timesteps, timestep)
        .ok_or_else(|| unknown_timestep_error(kind, "add_noise", timestep, timesteps))?;
    let s = sigmas[i] as f32;
    Ok(zip_map(original, noise, |x, z| x + z * s))
}

/// diffusers' `EulerDiscreteScheduler` with its defaults: linear sigma interpolation, no Karras sigmas, final
/// sigma 0, `s_churn = 0` (deterministic).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    step_index: StepIndex,
}

impl EulerDiscreteScheduler {
    /// diffusers' `EulerDiscreteScheduler.from_config(config)` with `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate(SchedulerKind::Euler, num_inference_steps)?;
        let (timesteps, sigmas, init_noise_sigma) =
            euler_schedule(config, SchedulerKind::Euler, num_inference_steps);
        Ok(EulerDiscreteScheduler {
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

impl Scheduler for EulerDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<ArrayD<f32>> {
        check_shape("model_output", model_output, sample)?;
        let i = self
            .step_index
            .resolve(self.kind(), "step", &self.timesteps, timestep)?;
        // s_churn = 0, so γ = 0 and σ̂ = σ_i.
        let sigma_hat = self.sigmas[i] as f32;
        let pred_x0 =
            pred_original_sample(self.prediction_type, model_output, sample, self.sigmas[i]);
        let dt = self.sigmas[i + 1] as f32 - sigma_hat;
        let prev = zip_map(sample, &pred_x0, |x, x0| x + ((x - x0) / sigma_hat) * dt);
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
    fn euler_reference_values_linspace() {
        // sd-onnx-runtime.md §5: N = 30: t = [999, 964.5517, 930.1034, …], σ = [14.6146, 11.9176, 9.8142, …];
        // N = 50: t[1] = 978.6122, σ[1] = 12.9368, last σ = 0.029167, then 0.
        let cfg = SchedulerConfig::default();
        let s = EulerDiscreteScheduler::new(&cfg, 30).unwrap();
        for (got, want) in s.timesteps()[..3].iter().zip([999.0, 964.5517, 930.1034]) {
            assert!((got - want).abs() < 1e-4, "timestep {got} vs {want}");
        }
        for (got, want) in s.sigmas()[..3].iter().zip([14.6146, 11.9176, 9.8142]) {
            assert!((got - want).abs() < 1e-4, "sigma {got} vs {want}");
        }
        assert!((s.init_noise_sigma() - 14.6146).abs() < 1e-4);
        let s = EulerDiscreteScheduler::new(&cfg, 50).unwrap();
        assert!(
            (s.timesteps()[1] - 978.6122).abs() < 1e-4 && (s.sigmas()[1] - 12.9368).abs() < 1e-4
        );
        assert!((s.sigmas()[49] - 0.029167).abs() < 1e-6 && s.sigmas()[50] == 0.0);
        let leading = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Leading),
            ..cfg
        };
        let s = EulerDiscreteScheduler::new(&leading, 50).unwrap();
        assert_eq!((s.timesteps()[0], s.timesteps()[49]), (981.0, 1.0));
        let smax = s.sigmas()[0];
        assert!((s.init_noise_sigma() - (smax * smax + 1.0).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn euler_scales_input_and_checks_order() {
        let cfg = SchedulerConfig::default();
        let mut s = EulerDiscreteScheduler::new(&cfg, 4).unwrap();
        let x = ArrayD::from_elem(IxDyn(&[3]), 2.0f32);
        let t: Vec<f64> = s.timesteps().to_vec();
        let y = s.scale_model_input(&x, t[0]).unwrap();
        let s0 = s.sigmas()[0];
        assert!((f64::from(y[[0]]) - 2.0 / (s0 * s0 + 1.0).sqrt()).abs() < 1e-6);
        // One Euler step with ε = 0.5 by hand: x + ε·(σ_1 − σ_0).
        let e = ArrayD::from_elem(IxDyn(&[3]), 0.5f32);
        let x1 = s
            .step(&e, t[0], &x, &mut |_: &[usize]| -> ArrayD<f32> {
                unreachable!()
            })
            .unwrap();
        let want = 2.0 + 0.5 * (s.sigmas()[1] - s0);
        assert!(
            (f64::from(x1[[0]]) - want).abs() < 1e-5,
            "{} vs {want}",
            x1[[0]]
        );
        let err = s
            .step(&e, t[2], &x1, &mut |_: &[usize]| -> ArrayD<f32> {
                unreachable!()
            })
            .unwrap_err();
        assert!(
            err.to_string().contains(&format!("expected {}", t[1])),
            "{err}"
        );
        let err = s.scale_model_input(&x, 500.0).unwrap_err();
        assert!(
            err.to_string().contains("timestep 500 is not the next one"),
            "{err}"
        );
        let fresh = EulerDiscreteScheduler::new(&cfg, 4).unwrap();
        let err = fresh.scale_model_input(&x, 500.0).unwrap_err().to_string();
        assert!(
            err.contains(
                "timestep 500 is not in this schedule; valid timesteps: [999, 666, 333, 0]"
            ),
            "{err}"
        );
    }
}
