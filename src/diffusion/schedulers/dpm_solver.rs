//! DPM-Solver++(2M): diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`,
//! `solver_order = 2`, `solver_type = "midpoint"` (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
//! Sampling of Diffusion Probabilistic Models", <https://arxiv.org/abs/2211.01095>, Algorithm 2).
//!
//! Notation: for noise level σ (the Euler sigma), `α_t = 1/√(σ²+1)`, `σ_t = σ·α_t`, `λ = ln α_t − ln σ_t`
//! (half log-SNR); `m` the data prediction x̂0 (`convert_model_output`); `s0, s1` the current and previous
//! steps, `t` the next one; `h = λ_t − λ_s0`.
//!
//! ```text
//! x̂0 = (x − σ_s0·ε)/α_s0   (ε)     x̂0 = α_s0·x − σ_s0·v   (v)
//! first order (first step, and the last step, where σ = 0 gives x_next = x̂0):
//!   x_t = (σ_t/σ_s0)·x − α_t·(e^{−h} − 1)·m0
//! second order (midpoint), r0 = (λ_s0 − λ_s1)/h, D1 = (m0 − m1)/r0:
//!   x_t = (σ_t/σ_s0)·x − α_t·(e^{−h} − 1)·m0 − ½·α_t·(e^{−h} − 1)·D1
//! ```
//!
//! The latent is in the ᾱ-parametrisation (`init_noise_sigma = 1`, no input scaling); timesteps are integers.
//!
//! Upstream: `DPMSolverMultistepScheduler.set_timesteps`, `convert_model_output`,
//! `dpm_solver_first_order_update`, `multistep_dpm_solver_second_order_update` and `step`,
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py>.

use ndarray::ArrayD;

use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, StepIndex,
    TimestepSpacing, alphas_cumprod, arange, check_shape, index_for_timestep, interp_index,
    linspace, train_sigmas, unknown_timestep_error, zip_map,
};
use crate::error::Result;

/// diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++(2M): first order at the first step (no history) and
/// at the last step (diffusers' `lower_order_final` rule, which `final_sigmas_type = "zero"` always triggers),
/// second order in between. The config's `solver_order`, `lower_order_final` and `euler_at_final` keys change
/// nothing for this kind and are ignored.
///
/// Deviation: diffusers' `index_for_timestep` silently takes the last step for a timestep not in the schedule;
/// here `step` fails and names the valid timesteps.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    /// σ_0 … σ_N, float32 values, σ_N = 0.
    sigmas: Vec<f64>,
    step_index: StepIndex,
    /// Data predictions of the previous and current steps (diffusers' `model_outputs`).
    model_outputs: [Option<ArrayD<f32>>; 2],
    lower_order_nums: usize,
}

/// `(α_t, σ_t)` of a noise level σ, in float32 (diffusers' `_sigma_to_alpha_sigma_t`).
fn alpha_sigma(sigma: f64) -> (f32, f32) {
    let s = sigma as f32;
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    (alpha, s * alpha)
}

/// `λ = ln α − ln σ`.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistepScheduler {
    /// diffusers' `DPMSolverMultistepScheduler.from_config(config)` (as DPM-Solver++(2M)) with
    /// `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate(SchedulerKind::Dpmpp2m, num_inference_steps)?;
        let (t, n) = (config.num_train_timesteps, num_inference_steps);
        // lambda_min_clipped = −inf, so last_timestep = T.
        let timesteps: Vec<i64> = match config
            .timestep_spacing
            .unwrap_or(SchedulerKind::Dpmpp2m.default_spacing())
        {
            TimestepSpacing::Linspace => {
                let mut v: Vec<i64> = linspace(0.0, (t - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(|x| x.round_ties_even() as i64)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = t / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => arange(t as f64, 0.0, -(t as f64 / n as f64))
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect(),
        };
        let train = train_sigmas(&alphas_cumprod(config));
        if let Some(&bad) = timesteps.iter().find(|&&ts| ts as usize >= train.len()) {
            return Err(super::invalid(
                "steps_offset",
                format!("timestep {bad} is past num_train_timesteps - 1; lower steps_offset"),
            ));
        }
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&ts| f64::from(interp_index(ts as f64, &train) as f32))
            .collect();
        sigmas.push(0.0);
        Ok(DpmSolverMultistepScheduler {
            prediction_type: config.prediction_type,
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            sigmas,
            step_index: StepIndex::default(),
            model_outputs: [None, None],
            lower_order_nums: 0,
        })
    }

    /// The noise levels σ_0 … σ_N (σ_N = 0).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// diffusers `convert_model_output` for `dpmsolver++`: the data prediction x̂0 at step `i`.
    fn convert_model_output(
        &self,
        model_output: &ArrayD<f32>,
        sample: &ArrayD<f32>,
        i: usize,
    ) -> ArrayD<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        match self.prediction_type {
            PredictionType::Epsilon => {
                zip_map(sample, model_output, |x, e| (x - sigma_t * e) / alpha_t)
            }
            PredictionType::VPrediction => {
                zip_map(sample, model_output, |x, v| alpha_t * x - sigma_t * v)
            }
        }
    }

    /// diffusers `dpm_solver_first_order_update` (DPM-Solver++(1) = DDIM in λ).
    fn first_order_update(&self, m0: &ArrayD<f32>, sample: &ArrayD<f32>, i: usize) -> ArrayD<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let c_x = sigma_t / sigma_s;
        let c_m = alpha_t * ((-h).exp() - 1.0);
        zip_map(sample, m0, |x, m| c_x * x - c_m * m)
    }

    /// diffusers `multistep_dpm_solver_second_order_update`, `dpmsolver++` with `midpoint`.
    fn second_order_update(
        &self,
        m0: &ArrayD<f32>,
        m1: &ArrayD<f32>,
        sample: &ArrayD<f32>,
        i: usize,
    ) -> ArrayD<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let inv_r0 = 1.0 / r0;
        let c_x = sigma_t / sigma_s0;
        let c_m = alpha_t * ((-h).exp() - 1.0);
        let c_d = 0.5 * c_m;
        let d1 = zip_map(m0, m1, |a, b| inv_r0 * (a - b));
        let mut out = zip_map(sample, m0, |x, m| c_x * x - c_m * m);
        out.zip_mut_with(&d1, |o, &d| *o -= c_d * d);
        out
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Dpmpp2m
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &ArrayD<f32>, _timestep: f64) -> Result<ArrayD<f32>> {
        Ok(sample.clone())
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
        let n = self.timesteps.len();
        // diffusers: `lower_order_final = last step and (euler_at_final or (lower_order_final and N < 15) or
        // final_sigmas_type == "zero")`; the final sigma is always 0 here, so the last step is first order
        // whatever `lower_order_final` and `euler_at_final` say (and `lower_order_second` only matters at order 3).
        let lower_order_final = i == n - 1;
        let m0 = self.convert_model_output(model_output, sample, i);
        let prev_m = self.model_outputs[1].take();
        let prev = match &prev_m {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                self.second_order_update(&m0, m1, sample, i)
            }
            _ => self.first_order_update(&m0, sample, i),
        };
        self.model_outputs = [prev_m, Some(m0)];
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        self.step_index.advance(i);
        Ok(prev)
    }

    fn add_noise(
        &self,
        original: &ArrayD<f32>,
        noise: &ArrayD<f32>,
        timestep: f64,
    ) -> Result<ArrayD<f32>> {
        check_shape("noise", noise, original)?;
        let i = index_for_timestep(&self.timesteps, timestep).ok_or_else(|| {
            unknown_timestep_error(self.kind(), "add_noise", timestep, &self.timesteps)
        })?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(zip_map(original, noise, |x, z| alpha_t * x + sigma_t * z))
    }
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::*;

    #[test]
    fn dpm_timesteps_per_spacing() {
        let cfg = SchedulerConfig::default();
        // linspace (class default): linspace(0, 999, N + 1).round()[::-1][:-1]
        let s = DpmSolverMultistepScheduler::new(&cfg, 5).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 799.0, 599.0, 400.0, 200.0]);
        let leading = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Leading),
            ..cfg.clone()
        };
        // ratio = 1000 // 6 = 166: [830, 664, 498, 332, 166] + 1
        let s = DpmSolverMultistepScheduler::new(&leading, 5).unwrap();
        assert_eq!(s.timesteps(), &[831.0, 665.0, 499.0, 333.0, 167.0]);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
    }

    #[test]
    fn last_step_returns_the_data_prediction() {
        let cfg = SchedulerConfig::default();
        let mut s = DpmSolverMultistepScheduler::new(&cfg, 2).unwrap();
        let x = ArrayD::from_elem(IxDyn(&[2]), 1.5f32);
        let e = ArrayD::from_elem(IxDyn(&[2]), 0.5f32);
        let t = s.timesteps().to_vec();
        let never = &mut |_: &[usize]| -> ArrayD<f32> { unreachable!() };
        s.step(&e, t[0], &x, never).unwrap();
        let out = s.step(&e, t[1], &x, never).unwrap();
        let (a, sg) = alpha_sigma(s.sigmas()[1]);
        let want = (1.5 - sg * 0.5) / a;
        assert!((out[[0]] - want).abs() < 1e-6, "{} vs {want}", out[[0]]);
    }
}
