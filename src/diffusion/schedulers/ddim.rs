//! DDIM: diffusers' `DDIMScheduler` (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models",
//! <https://arxiv.org/abs/2010.02502>).
//!
//! Notation (diffusers' `step` docstring): `ᾱ_t` = `alpha_prod_t`, `x̂0` = `pred_original_sample`,
//! `σ_t` = `std_dev_t`, `ε̂` = `pred_epsilon`, `t_prev = t − T // N` (`ᾱ_prev` = `final_alpha_cumprod` when
//! `t_prev < 0`). One step, formulas (12) and (16) of the paper:
//!
//! ```text
//! x̂0  = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t                 ε-prediction
//! x̂0  = √ᾱ_t·x_t − √(1−ᾱ_t)·v,  ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t   v-prediction
//! σ_t = η · √((1−ᾱ_prev)/(1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_prev)
//! x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_t²)·ε̂ + σ_t·z,   z ~ N(0, I) from the caller when η > 0
//! ```
//!
//! Upstream: `DDIMScheduler.step`,
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddim.py>.

use ndarray::ArrayD;

use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, alphas_cumprod,
    check_shape, draw_noise, integer_timesteps, pndm::add_noise_alphas, same_timestep,
    unknown_timestep_error, zip_map,
};
use crate::error::Result;

/// diffusers' `DDIMScheduler`: deterministic for `eta = 0` (the default), stochastic with caller noise for
/// `eta > 0`. Stateless like diffusers: `step` accepts any of its timesteps, in any order.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    prediction_type: PredictionType,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: i64,
    timesteps: Vec<f64>,
    eta: f64,
    clip_sample_range: Option<f32>,
}

impl DdimScheduler {
    /// diffusers' `DDIMScheduler.from_config(config)` with `set_timesteps(num_inference_steps)`; η from
    /// `config.eta`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate(SchedulerKind::Ddim, num_inference_steps)?;
        let spacing = config
            .timestep_spacing
            .unwrap_or(SchedulerKind::Ddim.default_spacing());
        let timesteps = integer_timesteps(
            spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        );
        let alphas_cumprod = alphas_cumprod(config);
        if let Some(&t) = timesteps
            .iter()
            .find(|&&t| t as usize >= alphas_cumprod.len())
        {
            return Err(super::invalid(
                "steps_offset",
                format!("timestep {t} is past num_train_timesteps - 1; lower steps_offset"),
            ));
        }
        Ok(DdimScheduler {
            prediction_type: config.prediction_type,
            final_alpha_cumprod: if config.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            step_ratio: (config.num_train_timesteps / num_inference_steps) as i64,
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            eta: config.eta,
            clip_sample_range: config
                .clip_sample
                .then_some(config.clip_sample_range as f32),
        })
    }

    /// η of this scheduler.
    pub fn eta(&self) -> f64 {
        self.eta
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn is_stochastic(&self) -> bool {
        self.eta > 0.0
    }

    fn scale_model_input(&self, sample: &ArrayD<f32>, _timestep: f64) -> Result<ArrayD<f32>> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &ArrayD<f32>,
        timestep: f64,
        sample: &ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<ArrayD<f32>> {
        check_shape("model_output", model_output, sample)?;
        let Some(&t) = self.timesteps.iter().find(|&&t| same_timestep(t, timestep)) else {
            return Err(unknown_timestep_error(
                self.kind(),
                "step",
                timestep,
                &self.timesteps,
            ));
        };
        // 1. previous step value (= t − T // N)
        let t = t as i64;
        let prev_t = t - self.step_ratio;
        // 2. alphas, betas
        let a = self.alphas_cumprod[t as usize];
        let ap = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b = 1.0 - a;
        let (sa, sb) = (a.sqrt() as f32, b.sqrt() as f32);
        // 3. predicted x0 and ε, formula (12)
        let (mut pred_x0, pred_eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                zip_map(sample, model_output, |x, e| (x - sb * e) / sa),
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                zip_map(sample, model_output, |x, v| sa * x - sb * v),
                zip_map(model_output, sample, |v, x| sa * v + sb * x),
            ),
        };
        // 4. clip x0
        if let Some(r) = self.clip_sample_range {
            pred_x0.mapv_inplace(|v| v.clamp(-r, r));
        }
        // 5. σ_t, formula (16)
        let variance = ((1.0 - ap) / b) * (1.0 - a / ap);
        let std_dev_t = self.eta * variance.sqrt();
        // 6. direction pointing to x_t, and 7. x_prev, formula (12)
        let c_dir = (1.0 - ap - std_dev_t * std_dev_t).sqrt() as f32;
        let sap = ap.sqrt() as f32;
        let mut prev = zip_map(&pred_x0, &pred_eps, |x0, e| sap * x0 + c_dir * e);
        if self.eta > 0.0 {
            let z = draw_noise(noise, sample)?;
            let s = std_dev_t as f32;
            prev.zip_mut_with(&z, |p, &z| *p += s * z);
        }
        Ok(prev)
    }

    fn add_noise(
        &self,
        original: &ArrayD<f32>,
        noise: &ArrayD<f32>,
        timestep: f64,
    ) -> Result<ArrayD<f32>> {
        add_noise_alphas(self.kind(), &self.alphas_cumprod, original, noise, timestep)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::*;
    use crate::diffusion::schedulers::TimestepSpacing;

    #[test]
    fn ddim_timesteps_like_diffusers_tests() {
        // diffusers tests/schedulers/test_scheduler_ddim.py `test_steps_offset`.
        let s = DdimScheduler::new(&SchedulerConfig::default(), 5).unwrap();
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0, 1.0]);
        let trailing = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Trailing),
            ..Default::default()
        };
        assert_eq!(
            DdimScheduler::new(&trailing, 5).unwrap().timesteps(),
            &[999.0, 799.0, 599.0, 399.0, 199.0]
        );
        let s50 = DdimScheduler::new(&SchedulerConfig::default(), 50).unwrap();
        assert_eq!(s50.timesteps().len(), 50);
        assert_eq!((s50.timesteps()[0], s50.timesteps()[49]), (981.0, 1.0));
    }

    #[test]
    fn eta_draws_caller_noise_and_eta_zero_does_not() {
        let x = ArrayD::from_elem(IxDyn(&[1, 2]), 0.5f32);
        let e = ArrayD::from_elem(IxDyn(&[1, 2]), 0.1f32);
        let mut det = DdimScheduler::new(&SchedulerConfig::default(), 10).unwrap();
        assert!(!det.is_stochastic());
        let y0 = det
            .step(&e, 901.0, &x, &mut |_: &[usize]| -> ArrayD<f32> {
                panic!("η = 0 drew noise")
            })
            .unwrap();
        let cfg = SchedulerConfig {
            eta: 1.0,
            ..Default::default()
        };
        let clip = SchedulerConfig {
            clip_sample: true,
            clip_sample_range: 1.0,
            ..Default::default()
        };
        // clip_sample: x̂0 = (0.5 − √(1−ᾱ)·0.1)/√ᾱ_901 ≈ 3.4 is clamped to 1, so x_prev = √ᾱ_801 + √(1−ᾱ_801)·0.1.
        let clipped = DdimScheduler::new(&clip, 10)
            .unwrap()
            .step(&e, 901.0, &x, &mut |_: &[usize]| -> ArrayD<f32> {
                unreachable!()
            })
            .unwrap();
        let ac = alphas_cumprod(&cfg);
        let want = ac[801].sqrt() + (1.0 - ac[801]).sqrt() * 0.1;
        assert!(
            (f64::from(clipped[[0, 1]]) - want).abs() < 1e-6,
            "{} vs {want}",
            clipped[[0, 1]]
        );
        let mut sto = DdimScheduler::new(&cfg, 10).unwrap();
        assert!(sto.is_stochastic());
        let mut calls = 0;
        let y1 = sto
            .step(&e, 901.0, &x, &mut |s: &[usize]| {
                calls += 1;
                ArrayD::from_elem(IxDyn(s), 1.0f32)
            })
            .unwrap();
        assert_eq!(calls, 1);
        // By hand: σ = √((1−ᾱ_801)/(1−ᾱ_901))·√(1 − ᾱ_901/ᾱ_801); the result moves by σ·z minus the change in
        // the ε direction, so it must differ from η = 0.
        let (a, ap) = (ac[901], ac[801]);
        let sigma = ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt();
        let x0 = (0.5 - (1.0 - a).sqrt() * 0.1) / a.sqrt();
        let want = ap.sqrt() * x0 + (1.0 - ap - sigma * sigma).sqrt() * 0.1 + sigma;
        assert!(
            (f64::from(y1[[0, 0]]) - want).abs() < 1e-5,
            "{} vs {want}",
            y1[[0, 0]]
        );
        assert!((y1[[0, 0]] - y0[[0, 0]]).abs() > 0.1);
        let err = sto
            .step(&e, 900.0, &x, &mut |s: &[usize]| ArrayD::zeros(IxDyn(s)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("timestep 900 is not in this schedule; valid timesteps: [901, 801"),
            "{err}"
        );
        let err = sto
            .step(&e, 801.0, &x, &mut |_: &[usize]| ArrayD::zeros(IxDyn(&[3])))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("noise from the NoiseSource: expected shape [1, 2]"),
            "{err}"
        );
    }
}
