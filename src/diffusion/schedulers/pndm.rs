//! PLMS: diffusers' `PNDMScheduler` with `skip_prk_steps = true` (SD 1.x's default sampler), and the official
//! Dream-OOD sampler, CompVis `ldm/models/diffusion/plms.py` (SPEC §3.2), which is the same algorithm with a
//! different timestep rule and float64 noise tables.
//!
//! Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
//! <https://arxiv.org/abs/2202.09778>). Notation: `ε` the model output, `ε'` the combined one, `x` the latent,
//! `ᾱ_t` = `alphas_cumprod[t]`, `r = T // N`.
//!
//! 1. The first step is a pseudo improved Euler (Heun) step from `t` to `t − r`: the model runs at `t` on `x`,
//!    then at `t − r` on the DDIM prediction `x̃`, and `ε' = (ε_t + ε_{t−r}(x̃))/2` moves `x` from `t` to `t − r`.
//!    So the timesteps read `[981, 961, 961, 941, …, 1]` for 50 steps: N + 1 model calls.
//! 2. Every later step combines the current `ε` with the last raw ones `e1 = ε, e2, e3, e4` (Adams–Bashforth):
//!    `(3e1 − e2)/2`, `(23e1 − 16e2 + 5e3)/12`, `(55e1 − 59e2 + 37e3 − 9e4)/24`.
//! 3. The move from `t` to `t_prev` with `ε'` is the η = 0 DDIM update (PNDM eq. 9 in diffusers' form):
//!    `x_prev = √(ᾱ_prev/ᾱ_t)·x − (ᾱ_prev − ᾱ_t)·ε' / (ᾱ_t·√(1−ᾱ_prev) + √(ᾱ_t(1−ᾱ_t)ᾱ_prev))`,
//!    which equals `√ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε'` with `x̂0 = (x − √(1−ᾱ_t)·ε')/√ᾱ_t` (ldm's form).
//!
//! Upstream: diffusers `step_plms` and `_get_prev_sample`,
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_pndm.py>;
//! CompVis `p_sample_plms`, <https://github.com/CompVis/stable-diffusion/blob/21f890f/ldm/models/diffusion/plms.py#L173-L236>;
//! `make_ddim_timesteps` and `make_ddim_sampling_parameters`,
//! <https://github.com/CompVis/stable-diffusion/blob/21f890f/ldm/modules/diffusionmodules/util.py#L46-L74>;
//! `register_schedule`, <https://github.com/CompVis/stable-diffusion/blob/21f890f/ldm/models/diffusion/ddpm.py#L117-L139>.

use ndarray::ArrayD;

use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, alphas_cumprod,
    alphas_cumprod_ldm, check_shape, integer_timesteps, invalid, same_timestep, timestep_error,
    zip_map,
};
use crate::error::Result;

/// Which reading of PLMS a [`PndmScheduler`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    /// diffusers `PNDMScheduler(skip_prk_steps=True)`.
    Diffusers,
    /// CompVis `ldm` `PLMSSampler` (the official Dream-OOD sampler).
    Ldm,
}

/// PLMS, as diffusers' `PNDMScheduler` with `skip_prk_steps` ([`PndmScheduler::new`], kind `pndm`) or as the
/// official CompVis sampler ([`PndmScheduler::official_plms`], kind `plms`).
///
/// The two agree step for step when `T` is a multiple of `N` (SD with 50 steps: both `[981, 961, 961, …, 1]`)
/// up to float rounding of their noise tables (about 1e-6 on the final latent). They differ:
///
/// - when `T % N != 0`: ldm takes `τ = range(0, T, T // N) + 1`, which has *more* than N entries
///   (N = 30: 31 steps from 991), diffusers takes exactly N from `arange(N)·(T // N) + steps_offset` (from 958);
/// - in rounding: ldm builds ᾱ in float64 then casts to float32, diffusers in float32;
/// - ldm ignores `timestep_spacing`, `steps_offset` (always +1) and `set_alpha_to_one` (the last step ends at
///   ᾱ_0), and supports only ε-prediction and η = 0.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    flavour: Flavour,
    prediction_type: PredictionType,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// T // N.
    step_ratio: i64,
    /// Model-call timesteps, `[t_0, t_1, t_1, t_2, …]`.
    timesteps: Vec<f64>,
    /// ldm only: the sub-sequence τ, ascending (τ_0 = 1).
    tau: Vec<usize>,
    /// Number of `step` calls made (diffusers' `counter`).
    counter: usize,
    /// Raw model outputs kept for the multistep formulas (diffusers' `ets`, ldm's `old_eps`).
    ets: Vec<ArrayD<f32>>,
    /// The latent at the start of the Heun step (diffusers' `cur_sample`).
    cur_sample: Option<ArrayD<f32>>,
}

impl PndmScheduler {
    /// diffusers' `PNDMScheduler.from_config(config)` with `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate(SchedulerKind::Pndm, num_inference_steps)?;
        let n = num_inference_steps;
        let spacing = config
            .timestep_spacing
            .unwrap_or(SchedulerKind::Pndm.default_spacing());
        // diffusers' `_timesteps` ascending; PLMS order `concat(_t[:-1], _t[-2:-1], _t[-1:])[::-1]`.
        let mut ts = integer_timesteps(spacing, config.num_train_timesteps, n, config.steps_offset);
        ts.reverse();
        let mut plms: Vec<i64> = ts[..ts.len() - 1].to_vec();
        if ts.len() >= 2 {
            plms.push(ts[ts.len() - 2]);
        }
        plms.push(ts[ts.len() - 1]);
        plms.reverse();
        if let Some(&bad) = plms
            .iter()
            .find(|&&t| t as usize >= config.num_train_timesteps)
        {
            return Err(invalid(
                "steps_offset",
                format!(
                    "timestep {bad} is past num_train_timesteps - 1 = {}; lower steps_offset",
                    config.num_train_timesteps - 1
                ),
            ));
        }
        let alphas_cumprod = alphas_cumprod(config);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(PndmScheduler {
            flavour: Flavour::Diffusers,
            prediction_type: config.prediction_type,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (config.num_train_timesteps / n) as i64,
            timesteps: plms.into_iter().map(|t| t as f64).collect(),
            tau: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
        })
    }

    /// The official Dream-OOD sampler: CompVis `PLMSSampler` (`ldm/models/diffusion/plms.py`) with
    /// `ddim_discretize = "uniform"` and η = 0, on this config's noise schedule (SPEC §3.2).
    ///
    /// Timesteps `τ_i = i·(T // N) + 1` for `i·(T // N) < T` (`make_ddim_timesteps`), `ᾱ` in float64 cast to
    /// float32 (`register_schedule`), `ᾱ_prev` of τ_0 is `ᾱ_0` (`make_ddim_sampling_parameters`), and the
    /// update in ldm's form `√ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε'` (`get_x_prev_and_pred_x0`). Fails for
    /// `v_prediction`, for `eta` ≠ 0 (ldm: "ddim_eta must be 0 for PLMS"), and where ldm would index past
    /// `T − 1` (more than T/2 steps).
    pub fn official_plms(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate(SchedulerKind::Plms, num_inference_steps)?;
        let t_train = config.num_train_timesteps;
        if config.prediction_type != PredictionType::Epsilon {
            return Err(invalid(
                "prediction_type",
                "the official PLMS sampler (ldm plms.py) supports only \"epsilon\"; use kind pndm for \
                 v_prediction"
                    .to_owned(),
            ));
        }
        if config.eta != 0.0 {
            return Err(invalid(
                "eta",
                format!(
                    "ddim_eta must be 0 for PLMS (ldm plms.py), got {}",
                    config.eta
                ),
            ));
        }
        let c = t_train / num_inference_steps;
        // make_ddim_timesteps("uniform"): range(0, T, c) + 1.
        let tau: Vec<usize> = (0..t_train).step_by(c).map(|t| t + 1).collect();
        if let Some(&bad) = tau.iter().find(|&&t| t >= t_train) {
            return Err(invalid(
                "num_inference_steps",
                format!(
                    "{num_inference_steps} steps make ldm's PLMS evaluate timestep {bad}, past num_train_timesteps \
                     - 1 = {} (ldm fails here too); use at most {} steps",
                    t_train - 1,
                    t_train / 2
                ),
            ));
        }
        // Calls: τ_{n-1}, then t_next = τ_{n-2} (τ_0 when n = 1), then τ_{n-2}, …, τ_0.
        let n = tau.len();
        let mut timesteps = vec![tau[n - 1] as f64, tau[n.saturating_sub(2)] as f64];
        timesteps.extend((0..n - 1).rev().map(|i| tau[i] as f64));
        let alphas_cumprod = alphas_cumprod_ldm(config);
        Ok(PndmScheduler {
            flavour: Flavour::Ldm,
            prediction_type: PredictionType::Epsilon,
            final_alpha_cumprod: alphas_cumprod[0],
            alphas_cumprod,
            step_ratio: c as i64,
            timesteps,
            tau,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
        })
    }

    /// `ᾱ` for the training timesteps, as this scheduler uses them.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// ᾱ at training timestep `t`, or at the end of the chain for negative `t`.
    fn alpha_at(&self, t: i64) -> Result<f64> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod.get(t as usize).copied().ok_or_else(|| {
            invalid(
                "steps_offset",
                format!(
                    "this schedule needs training timestep {t}, past num_train_timesteps - 1 = {}",
                    self.alphas_cumprod.len() - 1
                ),
            )
        })
    }

    /// diffusers `_get_prev_sample`: from `timestep` to `prev_timestep` with the combined output `e`.
    fn prev_sample_diffusers(
        &self,
        x: &ArrayD<f32>,
        t: i64,
        prev_t: i64,
        e: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        let a = self.alpha_at(t)?;
        let ap = self.alpha_at(prev_t)?;
        let (b, bp) = (1.0 - a, 1.0 - ap);
        let eps = match self.prediction_type {
            PredictionType::Epsilon => e.clone(),
            // ε = √ᾱ·v + √(1−ᾱ)·x, applied to the combined output as diffusers does.
            PredictionType::VPrediction => {
                let (ca, cb) = (a.sqrt() as f32, b.sqrt() as f32);
                zip_map(e, x, |v, x| ca * v + cb * x)
            }
        };
        let sample_coeff = (ap / a).sqrt() as f32;
        let denom = (a * bp.sqrt() + (a * b * ap).sqrt()) as f32;
        let d = (ap - a) as f32;
        Ok(zip_map(x, &eps, |x, e| sample_coeff * x - d * e / denom))
    }

    /// ldm `get_x_prev_and_pred_x0` with η = 0: from τ_i to τ_{i−1} (ᾱ_0 for i = 0).
    fn prev_sample_ldm(&self, x: &ArrayD<f32>, i: usize, e: &ArrayD<f32>) -> ArrayD<f32> {
        let a = self.alphas_cumprod[self.tau[i]];
        let ap = if i == 0 {
            self.alphas_cumprod[0]
        } else {
            self.alphas_cumprod[self.tau[i - 1]]
        };
        let (sqrt_one_minus_at, sqrt_at) = ((1.0 - a).sqrt() as f32, a.sqrt() as f32);
        let (sqrt_one_minus_ap, sqrt_ap) = ((1.0 - ap).sqrt() as f32, ap.sqrt() as f32);
        zip_map(x, e, |x, e| {
            let pred_x0 = (x - sqrt_one_minus_at * e) / sqrt_at;
            sqrt_ap * pred_x0 + sqrt_one_minus_ap * e
        })
    }

    /// `ε'` from the current output and the stored ones (both flavours); `ets` ends with the current one.
    fn multistep(ets: &[ArrayD<f32>]) -> ArrayD<f32> {
        let k = ets.len();
        let e = |j: usize| &ets[k - j];
        match k {
            1 => e(1).clone(),
            2 => zip_map(e(1), e(2), |e1, e2| (3.0 * e1 - e2) / 2.0),
            3 => {
                let mut out = zip_map(e(1), e(2), |e1, e2| 23.0 * e1 - 16.0 * e2);
                out.zip_mut_with(e(3), |o, &e3| *o = (*o + 5.0 * e3) / 12.0);
                out
            }
            _ => {
                let mut out = zip_map(e(1), e(2), |e1, e2| 55.0 * e1 - 59.0 * e2);
                out.zip_mut_with(e(3), |o, &e3| *o += 37.0 * e3);
                out.zip_mut_with(e(4), |o, &e4| *o = (1.0f32 / 24.0) * (*o - 9.0 * e4));
                out
            }
        }
    }

    /// diffusers `step_plms`.
    fn step_diffusers(
        &mut self,
        eps: &ArrayD<f32>,
        timestep: i64,
        sample: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        let mut t = timestep;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(eps.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let (e, x) = if self.ets.len() == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            (eps.clone(), sample.clone())
        } else if self.ets.len() == 1 && self.counter == 1 {
            let e0 = &self.ets[0];
            let e = zip_map(eps, e0, |a, b| (a + b) / 2.0);
            let x = self
                .cur_sample
                .take()
                .expect("invariant: cur_sample is set by the first PLMS call");
            (e, x)
        } else {
            (Self::multistep(&self.ets), sample.clone())
        };
        self.prev_sample_diffusers(&x, t, prev_t, &e)
    }

    /// ldm `p_sample_plms`, split at its second model call.
    fn step_ldm(&mut self, eps: &ArrayD<f32>, sample: &ArrayD<f32>) -> ArrayD<f32> {
        let n = self.tau.len();
        match self.counter {
            // First call at τ_{n−1}: x̃ = U(x, ε, n−1); the caller evaluates the model at t_next on x̃.
            0 => {
                self.cur_sample = Some(sample.clone());
                self.ets.push(eps.clone());
                self.prev_sample_ldm(sample, n - 1, eps)
            }
            // Second call: ε' = (ε_t + ε_{t_next}(x̃))/2 moves the stored x; old_eps keeps only ε_t.
            1 => {
                let e = zip_map(&self.ets[0], eps, |a, b| (a + b) / 2.0);
                let x = self
                    .cur_sample
                    .take()
                    .expect("invariant: cur_sample is set by the first PLMS call");
                self.prev_sample_ldm(&x, n - 1, &e)
            }
            c => {
                let i = n - c;
                let mut hist = self.ets.clone();
                hist.push(eps.clone());
                let e = Self::multistep(&hist);
                self.ets.push(eps.clone());
                if self.ets.len() >= 4 {
                    self.ets.remove(0);
                }
                self.prev_sample_ldm(sample, i, &e)
            }
        }
    }
}

impl Scheduler for PndmScheduler {
    fn kind(&self) -> SchedulerKind {
        match self.flavour {
            Flavour::Diffusers => SchedulerKind::Pndm,
            Flavour::Ldm => SchedulerKind::Plms,
        }
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
        let Some(&expected) = self.timesteps.get(self.counter) else {
            return Err(timestep_error(self.kind(), timestep, None, &self.timesteps));
        };
        if !same_timestep(timestep, expected) {
            return Err(timestep_error(
                self.kind(),
                timestep,
                Some(expected),
                &self.timesteps,
            ));
        }
        let out = match self.flavour {
            Flavour::Diffusers => self.step_diffusers(model_output, expected as i64, sample)?,
            Flavour::Ldm => self.step_ldm(model_output, sample),
        };
        self.counter += 1;
        Ok(out)
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

/// `√ᾱ_t·x0 + √(1−ᾱ_t)·noise` at an integer training timestep (diffusers' `add_noise` of PNDM and DDIM).
pub(super) fn add_noise_alphas(
    kind: SchedulerKind,
    alphas_cumprod: &[f64],
    original: &ArrayD<f32>,
    noise: &ArrayD<f32>,
    timestep: f64,
) -> Result<ArrayD<f32>> {
    check_shape("noise", noise, original)?;
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep as usize >= alphas_cumprod.len() {
        return Err(invalid(
            &format!("{kind}.add_noise(timestep)"),
            format!(
                "timestep {timestep} is not a training timestep; expected an integer in 0..={}",
                alphas_cumprod.len() - 1
            ),
        ));
    }
    let a = alphas_cumprod[timestep as usize] as f32;
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    Ok(zip_map(original, noise, |x, z| sa * x + sb * z))
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::*;

    fn no_noise(_: &[usize]) -> ArrayD<f32> {
        panic!("a deterministic scheduler asked for noise")
    }

    #[test]
    fn plms_timesteps_50_and_odd_counts() {
        let cfg = SchedulerConfig::default();
        let s = PndmScheduler::new(&cfg, 50).unwrap();
        assert_eq!(s.timesteps().len(), 51);
        assert_eq!(&s.timesteps()[..5], &[981.0, 961.0, 961.0, 941.0, 921.0]);
        assert_eq!(&s.timesteps()[48..], &[41.0, 21.0, 1.0]);
        let official = PndmScheduler::official_plms(&cfg, 50).unwrap();
        assert_eq!(official.timesteps(), s.timesteps());
        // T % N != 0: ldm's range(0, 1000, 33) has 31 entries, diffusers takes 30.
        let d30 = PndmScheduler::new(&cfg, 30).unwrap();
        assert_eq!(&d30.timesteps()[..4], &[958.0, 925.0, 925.0, 892.0]);
        assert_eq!(d30.timesteps().len(), 31);
        let o30 = PndmScheduler::official_plms(&cfg, 30).unwrap();
        assert_eq!(&o30.timesteps()[..4], &[991.0, 958.0, 958.0, 925.0]);
        assert_eq!(o30.timesteps().len(), 32);
        assert_eq!(*o30.timesteps().last().unwrap(), 1.0);
        // One step: diffusers makes one call, ldm a Heun step with both calls at τ_0 = 1.
        assert_eq!(PndmScheduler::new(&cfg, 1).unwrap().timesteps(), &[1.0]);
        assert_eq!(
            PndmScheduler::official_plms(&cfg, 1).unwrap().timesteps(),
            &[1.0, 1.0]
        );
        let offset = SchedulerConfig {
            steps_offset: 30,
            ..cfg.clone()
        };
        let err = PndmScheduler::new(&offset, 50).unwrap_err().to_string();
        assert!(
            err.contains("timestep 1010 is past num_train_timesteps - 1 = 999"),
            "{err}"
        );
        // Where ldm indexes past T − 1 it fails (here, too).
        let err = PndmScheduler::official_plms(&cfg, 600)
            .unwrap_err()
            .to_string();
        assert!(err.contains("timestep 1000"), "{err}");
    }

    #[test]
    fn wrong_timestep_is_an_error_naming_the_expected_one() {
        let cfg = SchedulerConfig::default();
        let mut s = PndmScheduler::new(&cfg, 5).unwrap();
        let x = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2, 2]));
        let err = s
            .step(&x, 600.0, &x, &mut no_noise)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "pndm.step(timestep): timestep 600 is not the next one of this pndm schedule: expected 801; call \
             `step` once per value of `timesteps()`, in order: [801, 601, 601, 401, 201, 1]"
        );
        for t in s.timesteps().to_vec() {
            s.step(&x, t, &x, &mut no_noise).unwrap();
        }
        let err = s.step(&x, 1.0, &x, &mut no_noise).unwrap_err().to_string();
        assert!(err.contains("no such step left"), "{err}");
        let bad = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2, 3]));
        let mut s = PndmScheduler::new(&cfg, 5).unwrap();
        let err = s
            .step(&bad, 801.0, &x, &mut no_noise)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("model_output: expected shape [1, 4, 2, 2]"),
            "{err}"
        );
    }

    /// The official sampler by hand, on a 10-step training schedule with 2 inference steps (c = 5, τ = [1, 6])
    /// and a model ε(x, t) = 0.1·x + t/10 on a one-element latent. Expected values are SPEC §3.2 worked in
    /// float64 (`python3`: see the comments):
    ///
    /// ```text
    /// β = [0.01·(k+1)], ᾱ = cumprod(1 − β); a6 = ᾱ[6], a1 = ᾱ[1], a0 = ᾱ[0]
    /// U(x, e, a, ap) = √ap·(x − √(1−a)·e)/√a + √(1−ap)·e
    /// x = 1: e = ε(1, 6) = 0.7;  x̃ = U(1, 0.7, a6, a1);  e' = (0.7 + ε(x̃, 1))/2;  x1 = U(1, e', a6, a1)
    /// then at τ_0 = 1: e = ε(x1, 1);  e' = (3e − 0.7)/2;  x0 = U(x1, e', a1, a0)
    /// ```
    #[test]
    fn official_plms_hand_computed_case() {
        let cfg = SchedulerConfig {
            num_train_timesteps: 10,
            trained_betas: Some((0..10).map(|k| 0.01 * (k + 1) as f64).collect()),
            ..Default::default()
        };
        let mut s = PndmScheduler::official_plms(&cfg, 2).unwrap();
        assert_eq!(s.timesteps(), &[6.0, 1.0, 1.0]);
        let model = |x: &ArrayD<f32>, t: f64| x.mapv(|v| 0.1 * v + (t / 10.0) as f32);
        let mut x = ArrayD::from_elem(IxDyn(&[1]), 1.0f32);
        let mut seen = Vec::new();
        for t in s.timesteps().to_vec() {
            let e = model(&x, t);
            x = s.step(&e, t, &x, &mut no_noise).unwrap();
            seen.push(x[[0]]);
        }
        // a0 = 0.99, a1 = 0.9702, a6 = 0.99·0.98·0.97·0.96·0.95·0.94·0.93 = 0.75030639. Worked values:
        //   x̃ = 0.86021923, ε(x̃, 1) = 0.18602192, e' = 0.44301096, x1 = 0.96188185,
        //   ε(x1, 1) = 0.19618819, e'' = −0.05571772, x0 = 0.97579165.
        let want = [0.860_219_2_f32, 0.961_881_9, 0.975_791_6];
        for (i, (got, want)) in seen.iter().zip(want).enumerate() {
            assert!(
                (got - want).abs() < 2e-6,
                "call {i}: expected {want}, found {got}"
            );
        }
    }

    #[test]
    fn pndm_v_prediction_and_add_noise() {
        let cfg = SchedulerConfig::default();
        let s = PndmScheduler::new(&cfg, 10).unwrap();
        let x0 = ArrayD::from_elem(IxDyn(&[2]), 2.0f32);
        let z = ArrayD::from_elem(IxDyn(&[2]), -1.0f32);
        let y = s.add_noise(&x0, &z, 999.0).unwrap();
        let a = s.alphas_cumprod()[999];
        let want = 2.0 * a.sqrt() - (1.0 - a).sqrt();
        assert!(
            (f64::from(y[[0]]) - want).abs() < 1e-6,
            "{} vs {want}",
            y[[0]]
        );
        assert!(s.add_noise(&x0, &z, 1000.0).is_err());
        assert!(s.add_noise(&x0, &z, 1.5).is_err());
        let v = SchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..cfg
        };
        let err = PndmScheduler::official_plms(&v, 50)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prediction_type"), "{err}");
    }
}
