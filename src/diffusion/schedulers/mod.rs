//! Diffusion samplers ("schedulers" in diffusers' words): the maths that turns the UNet's noise prediction at
//! timestep `t` into the latent at the next timestep. They hold no weights, only a noise schedule and a little
//! state, so they are pure Rust on `ndarray` and can be swapped under the same UNet.
//!
//! Each algorithm is one file, a port of the diffusers class named there, with the maths in its doc comments:
//!
//! | [`SchedulerKind`] | type | diffusers class / source |
//! |---|---|---|
//! | `pndm` | [`PndmScheduler`] | `PNDMScheduler` with `skip_prk_steps` (= PLMS), SD 1.x's default |
//! | `plms` | [`PndmScheduler::official_plms`] | CompVis `ldm/models/diffusion/plms.py`, the official Dream-OOD sampler (SPEC §3.2) |
//! | `ddim` | [`DdimScheduler`] | `DDIMScheduler` (`eta` = 0 by default; `eta` > 0 draws caller noise) |
//! | `euler` | [`EulerDiscreteScheduler`] | `EulerDiscreteScheduler` |
//! | `euler_ancestral` | [`EulerAncestralDiscreteScheduler`] | `EulerAncestralDiscreteScheduler` |
//! | `dpmpp_2m` | [`DpmSolverMultistepScheduler`] | `DPMSolverMultistepScheduler`, `dpmsolver++`, order 2 |
//!
//! A [`SchedulerConfig`] is the noise schedule of a model (diffusers' `scheduler_config.json`, read leniently
//! because an SD export owns that file). [`SchedulerConfig::build`] picks the algorithm and keeps the noise
//! schedule, as diffusers' `OtherScheduler.from_config(s.config)` does. The loop is diffusers' `# 7.` block:
//!
//! ```no_run
//! # use dream_ood::diffusion::schedulers::{SchedulerConfig, SchedulerKind};
//! # use ndarray::ArrayD;
//! # fn unet(x: &ArrayD<f32>, t: f64) -> ArrayD<f32> { x.clone() }
//! # fn randn(shape: &[usize]) -> ArrayD<f32> { ArrayD::zeros(shape) }
//! # fn main() -> dream_ood::Result<()> {
//! let config = SchedulerConfig::load_from_export("models/sd-v1-4-onnx".as_ref())?;
//! let mut scheduler = config.build(SchedulerKind::Pndm, 50)?;
//! let mut latents = randn(&[1, 4, 64, 64]) * scheduler.init_noise_sigma() as f32; // [B, 4, H/8, W/8]
//! for t in scheduler.timesteps().to_vec() {
//!     let input = scheduler.scale_model_input(&latents, t)?;
//!     let noise_pred = unet(&input, t); // plus classifier-free guidance
//!     latents = scheduler.step(&noise_pred, t, &latents, &mut randn)?;
//! }
//! # Ok(()) }
//! ```
//!
//! Randomness never comes from inside a scheduler: [`Scheduler::step`] takes a [`NoiseSource`] (any
//! `FnMut(&[usize]) -> ArrayD<f32>` drawing standard normal noise), which the stochastic samplers (Euler
//! ancestral, DDIM with `eta` > 0) call once per step and the others never call. The caller owns the seed.
//!
//! Numbers: noise tables (`alphas_cumprod`, sigmas) are built as diffusers builds them, in float32 with a
//! float64 cumulative product (torch's CPU `cumprod`), and held as `f64`; per-step coefficients are computed
//! in `f64` (PNDM, PLMS, DDIM) or in `f32` like diffusers' 0-d tensors (Euler, Euler ancestral,
//! DPM-Solver), and the elementwise latent maths runs in `f32` in diffusers' order of operations. The golden
//! tests in `parity_tests.rs` hold every scheduler to diffusers 0.42.1 within `atol = rtol = 1e-5`
//! elementwise; on the fixtures' 50-step loops the largest error is about 1e-6 of the latent's range.
//!
//! Misuse is an error, not a panic: a `step` at a timestep that is not the next one (or not in the
//! schedule), a step past the end, mismatched shapes, and settings whose maths is not implemented here
//! (Karras sigmas, thresholding, PNDM's PRK warm-up, …) all return [`Error`] naming what was expected.

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod pndm;

#[cfg(test)]
mod parity_tests;

use ndarray::{ArrayD, Zip};

use crate::error::{Error, Result};

pub(crate) use config::invalid;
pub use config::{BetaSchedule, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing};

pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use pndm::PndmScheduler;

// ---------------------------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------------------------

/// A source of standard normal noise, `N(0, I)`, of a requested shape. Any `FnMut(&[usize]) -> ArrayD<f32>`
/// is one, so a caller can pass a closure over its own seeded RNG, or a closure that hands out fixed tensors.
pub trait NoiseSource {
    /// Draws a tensor of standard normal noise of `shape`.
    fn standard_normal(&mut self, shape: &[usize]) -> ArrayD<f32>;
}

impl<F: FnMut(&[usize]) -> ArrayD<f32>> NoiseSource for F {
    fn standard_normal(&mut self, shape: &[usize]) -> ArrayD<f32> {
        self(shape)
    }
}

/// One diffusion sampler, set up for a fixed number of inference steps (diffusers' `set_timesteps` is done by
/// [`SchedulerConfig::build`], so stepping an unprepared scheduler cannot be written).
///
/// Call [`scale_model_input`](Scheduler::scale_model_input), the model, then [`step`](Scheduler::step) once for
/// each entry of [`timesteps`](Scheduler::timesteps), in order.
pub trait Scheduler: Send {
    /// Which algorithm this is.
    fn kind(&self) -> SchedulerKind;

    /// The timesteps at which the model is evaluated, in calling order; one `step` call each. Integral for all
    /// schedulers except Euler and Euler ancestral with `linspace` spacing (fractional, as in diffusers; an
    /// ONNX UNet with an int64 `timestep` input truncates them, as diffusers' ONNX pipeline does).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise: multiply `N(0, I)` latents by it before the loop.
    fn init_noise_sigma(&self) -> f64;

    /// diffusers' `order`: model evaluations per step of the underlying solver (1 for all of these).
    fn order(&self) -> usize {
        1
    }

    /// Whether [`step`](Scheduler::step) draws from its [`NoiseSource`] (Euler ancestral, DDIM with `eta` > 0).
    fn is_stochastic(&self) -> bool {
        false
    }

    /// The latent to feed the model at `timestep`: `x / √(σ² + 1)` for the sigma-parametrised schedulers
    /// (Euler, Euler ancestral), the identity for the others.
    fn scale_model_input(&self, sample: &ArrayD<f32>, timestep: f64) -> Result<ArrayD<f32>>;

    /// One denoising step: from the model output at `timestep` (ε, or v with `v_prediction`) and the current
    /// latent, the latent at the next timestep. `noise` is called only by the stochastic samplers. Fails, naming
    /// the valid timesteps, when `timestep` is not the next one of the schedule, and when shapes differ.
    fn step(
        &mut self,
        model_output: &ArrayD<f32>,
        timestep: f64,
        sample: &ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<ArrayD<f32>>;

    /// Forward diffusion to `timestep` (img2img and training targets): `√ᾱ_t·x0 + √(1−ᾱ_t)·noise` for the
    /// ᾱ-parametrised schedulers, `x0 + σ·noise` for Euler and Euler ancestral. `timestep` must be one of
    /// [`timesteps`](Scheduler::timesteps) for Euler, Euler ancestral and DPM-Solver (diffusers looks up that
    /// step's sigma), and any integer training timestep for PNDM, PLMS and DDIM.
    fn add_noise(
        &self,
        original_samples: &ArrayD<f32>,
        noise: &ArrayD<f32>,
        timestep: f64,
    ) -> Result<ArrayD<f32>>;
}

// ---------------------------------------------------------------------------------------------------------
// Shared noise-schedule helpers
// ---------------------------------------------------------------------------------------------------------

/// `β_t` for t = 0..T, as diffusers computes them: float32 values (`torch.linspace(.., dtype=float32)`; the
/// cosine schedule in Python floats, then cast). Returned as `f64` holding float32 values.
///
/// Upstream: `scheduling_ddim.py` `DDIMScheduler.__init__` and `betas_for_alpha_bar`
/// (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddim.py>).
pub fn betas(config: &SchedulerConfig) -> Vec<f64> {
    let t = config.num_train_timesteps;
    let f32v = |x: f64| f64::from(x as f32);
    if let Some(b) = &config.trained_betas {
        return b.iter().map(|&x| f32v(x)).collect();
    }
    match config.beta_schedule {
        BetaSchedule::Linear => linspace(config.beta_start, config.beta_end, t)
            .into_iter()
            .map(f32v)
            .collect(),
        BetaSchedule::ScaledLinear => linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), t)
            .into_iter()
            .map(|x| {
                // float32 linspace, then float32 square
                let x = x as f32;
                f64::from(x * x)
            })
            .collect(),
        BetaSchedule::SquaredcosCapV2 => {
            // Python floats: `i / num_diffusion_timesteps` is true division (candle's port used integer
            // division here and collapsed the schedule; see STYLE.md §1).
            let alpha_bar = |x: f64| {
                ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..t)
                .map(|i| {
                    let (t1, t2) = (i as f64 / t as f64, (i + 1) as f64 / t as f64);
                    f32v((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
                })
                .collect()
        }
    }
}

/// `ᾱ_t = Π_{s≤t} (1 − β_s)` as diffusers computes it: `alphas = 1 − betas` in float32, and torch's CPU
/// `cumprod`, which accumulates in float64 and rounds each output to float32.
pub fn alphas_cumprod(config: &SchedulerConfig) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas(config)
        .into_iter()
        .map(|b| {
            acc *= f64::from(1.0f32 - b as f32);
            f64::from(acc as f32)
        })
        .collect()
}

/// `ᾱ_t` as CompVis `ldm` computes it (`ldm/modules/diffusionmodules/util.py` `make_beta_schedule` and
/// `ldm/models/diffusion/ddpm.py` `register_schedule`): betas and their cumulative product in float64, then
/// cast to float32.
pub fn alphas_cumprod_ldm(config: &SchedulerConfig) -> Vec<f64> {
    let t = config.num_train_timesteps;
    let betas: Vec<f64> = match (&config.trained_betas, config.beta_schedule) {
        (Some(b), _) => b.clone(),
        (None, BetaSchedule::ScaledLinear) => {
            linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), t)
                .into_iter()
                .map(|x| x * x)
                .collect()
        }
        (None, BetaSchedule::Linear) => linspace(config.beta_start, config.beta_end, t),
        (None, BetaSchedule::SquaredcosCapV2) => betas(config),
    };
    let mut acc = 1.0f64;
    betas
        .into_iter()
        .map(|b| {
            acc *= 1.0 - b;
            f64::from(acc as f32)
        })
        .collect()
}

/// NumPy's `linspace(start, stop, num)` (endpoint included): `start + i·step`, the last value exactly `stop`.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i + 1 == num {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// NumPy's `arange(start, stop, step)` for floats: `ceil((stop − start)/step)` values `start + i·d`, where NumPy
/// takes `d` as the difference of its first two values.
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len <= 0.0 {
        return Vec::new();
    }
    let d = (start + step) - start;
    (0..len as usize).map(|i| start + i as f64 * d).collect()
}

/// NumPy's `interp(x, arange(len(fp)), fp)` for `x` within `[0, len − 1]`.
pub(crate) fn interp_index(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last];
    }
    if x <= 0.0 {
        return fp[0];
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// The integer inference timesteps of the ᾱ-parametrised schedulers (DDIM, PNDM), largest first:
/// diffusers' `set_timesteps` for `spacing`.
pub(crate) fn integer_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<i64> {
    let (t, n) = (num_train_timesteps, num_inference_steps);
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => arange(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(|x| x.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// `σ_t = √((1 − ᾱ_t)/ᾱ_t)` for every training timestep, in float32 as diffusers computes it.
pub(crate) fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0 - a) / a).sqrt())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Shared step helpers
// ---------------------------------------------------------------------------------------------------------

/// Fails unless `got` has the shape of `sample`.
pub(crate) fn check_shape(what: &str, got: &ArrayD<f32>, sample: &ArrayD<f32>) -> Result<()> {
    if got.shape() == sample.shape() {
        Ok(())
    } else {
        Err(Error::Shape {
            what: what.to_owned(),
            expected: format!("{:?} (the sample's shape)", sample.shape()),
            got: format!("{:?}", got.shape()),
        })
    }
}

/// Draws noise shaped like `sample` and checks the shape the source returned.
pub(crate) fn draw_noise(noise: &mut dyn NoiseSource, sample: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let z = noise.standard_normal(sample.shape());
    check_shape("noise from the NoiseSource", &z, sample)?;
    Ok(z)
}

/// `f(a_i, b_i)` elementwise over two arrays of one shape (checked by the caller).
pub(crate) fn zip_map(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    f: impl Fn(f32, f32) -> f32,
) -> ArrayD<f32> {
    Zip::from(a).and(b).map_collect(|&x, &y| f(x, y))
}

/// Formats a timestep list for messages, shortening long ones.
fn format_timesteps(timesteps: &[f64]) -> String {
    let fmt = |t: &f64| format!("{t}");
    if timesteps.len() <= 12 {
        format!(
            "[{}]",
            timesteps.iter().map(fmt).collect::<Vec<_>>().join(", ")
        )
    } else {
        let head: Vec<_> = timesteps[..6].iter().map(fmt).collect();
        let tail: Vec<_> = timesteps[timesteps.len() - 3..].iter().map(fmt).collect();
        format!(
            "[{}, …, {}] ({} values)",
            head.join(", "),
            tail.join(", "),
            timesteps.len()
        )
    }
}

/// The error of a `step` at a timestep that does not fit the scheduler's state.
pub(crate) fn timestep_error(
    kind: SchedulerKind,
    timestep: f64,
    expected: Option<f64>,
    timesteps: &[f64],
) -> Error {
    let msg = match expected {
        Some(e) => format!(
            "timestep {timestep} is not the next one of this {kind} schedule: expected {e}; call `step` once \
             per value of `timesteps()`, in order: {}",
            format_timesteps(timesteps)
        ),
        None => format!(
            "timestep {timestep}: the {kind} schedule has no such step left (it has run all of {}); build a new \
             scheduler for another loop",
            format_timesteps(timesteps)
        ),
    };
    Error::InvalidValue {
        key: format!("{kind}.step(timestep)"),
        msg,
    }
}

/// The error of a timestep that is not in the schedule at all.
pub(crate) fn unknown_timestep_error(
    kind: SchedulerKind,
    what: &str,
    timestep: f64,
    valid: &[f64],
) -> Error {
    Error::InvalidValue {
        key: format!("{kind}.{what}(timestep)"),
        msg: format!(
            "timestep {timestep} is not in this schedule; valid timesteps: {}",
            format_timesteps(valid)
        ),
    }
}

/// Whether two timesteps are the same float32 timestep (what diffusers compares).
pub(crate) fn same_timestep(a: f64, b: f64) -> bool {
    a as f32 == b as f32
}

/// diffusers' `index_for_timestep`: the position of `timestep` in `timesteps`, the second one when it occurs
/// twice (so that img2img, which starts in the middle, does not skip a step).
pub(crate) fn index_for_timestep(timesteps: &[f64], timestep: f64) -> Option<usize> {
    let hits: Vec<usize> = (0..timesteps.len())
        .filter(|&i| same_timestep(timesteps[i], timestep))
        .collect();
    match hits.len() {
        0 => None,
        1 => Some(hits[0]),
        _ => Some(hits[1]),
    }
}

/// The step index of the sigma-parametrised schedulers (Euler, Euler ancestral, DPM-Solver): set by the first
/// call from the timestep (diffusers' `_init_step_index`), then advanced by one per `step`.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepIndex(Option<usize>);

impl StepIndex {
    /// The index of the step `timestep` should be, failing when it does not fit.
    pub(crate) fn resolve(
        &self,
        kind: SchedulerKind,
        what: &str,
        timesteps: &[f64],
        timestep: f64,
    ) -> Result<usize> {
        match self.0 {
            None => index_for_timestep(timesteps, timestep)
                .ok_or_else(|| unknown_timestep_error(kind, what, timestep, timesteps)),
            Some(i) if i >= timesteps.len() => Err(timestep_error(kind, timestep, None, timesteps)),
            Some(i) if same_timestep(timesteps[i], timestep) => Ok(i),
            Some(i) => Err(timestep_error(
                kind,
                timestep,
                Some(timesteps[i]),
                timesteps,
            )),
        }
    }

    /// Records that step `index` was taken.
    pub(crate) fn advance(&mut self, index: usize) {
        self.0 = Some(index + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_linear_betas_and_alphas_cumprod_match_reference_values() {
        let cfg = SchedulerConfig::default();
        let b = betas(&cfg);
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 0.00085).abs() < 1e-10, "beta_0 = {}", b[0]);
        assert!((b[999] - 0.012).abs() < 1e-9, "beta_999 = {}", b[999]);
        // β_500 = (√0.00085 + 500/999·(√0.012 − √0.00085))²
        let s = 0.00085f64.sqrt() + 500.0 / 999.0 * (0.012f64.sqrt() - 0.00085f64.sqrt());
        assert!(
            (b[500] - s * s).abs() < 1e-9,
            "beta_500 = {} vs {}",
            b[500],
            s * s
        );
        let ac = alphas_cumprod(&cfg);
        // sd-onnx-runtime.md §5: ᾱ[0] = 0.99915, ᾱ[1] = 0.998296, ᾱ[999] = 0.0046601.
        for (i, want) in [(0, 0.99915), (1, 0.998296), (999, 0.0046601)] {
            assert!(
                (ac[i] - want).abs() < 5e-7,
                "alphas_cumprod[{i}] = {} vs {want}",
                ac[i]
            );
        }
        let sig = train_sigmas(&ac);
        assert!(
            (sig[999] - 14.614641).abs() < 1e-4,
            "sigma_max = {}",
            sig[999]
        );
        assert!((sig[0] - 0.0291672).abs() < 1e-6, "sigma_min = {}", sig[0]);
    }

    #[test]
    fn linear_and_cosine_betas() {
        let cfg = SchedulerConfig {
            beta_schedule: BetaSchedule::Linear,
            beta_start: 0.0001,
            beta_end: 0.02,
            ..Default::default()
        };
        let b = betas(&cfg);
        assert!((b[0] - 0.0001).abs() < 1e-10 && (b[999] - 0.02).abs() < 1e-9);
        assert!(
            (b[1] - (0.0001 + 0.0199 / 999.0)).abs() < 1e-9,
            "beta_1 = {}",
            b[1]
        );
        let cos = SchedulerConfig {
            beta_schedule: BetaSchedule::SquaredcosCapV2,
            ..Default::default()
        };
        let b = betas(&cos);
        // Not candle's integer-division collapse: the first betas are small and growing, the last is capped.
        let ab = |t: f64| {
            ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                .cos()
                .powi(2)
        };
        let want0 = 1.0 - ab(0.001) / ab(0.0);
        assert!((b[0] - want0).abs() < 1e-9, "beta_0 = {} vs {want0}", b[0]);
        assert!(
            b[0] > 0.0 && b[1] > b[0] && b[500] > b[1],
            "{} {} {}",
            b[0],
            b[1],
            b[500]
        );
        assert_eq!(b[999], f64::from(0.999f32));
    }

    #[test]
    fn integer_timestep_spacings() {
        use TimestepSpacing::*;
        assert_eq!(
            integer_timesteps(Leading, 1000, 5, 1),
            vec![801, 601, 401, 201, 1]
        );
        assert_eq!(integer_timesteps(Leading, 1000, 3, 1), vec![667, 334, 1]);
        assert_eq!(
            integer_timesteps(Trailing, 1000, 5, 0),
            vec![999, 799, 599, 399, 199]
        );
        assert_eq!(integer_timesteps(Trailing, 1000, 3, 0), vec![999, 666, 332]);
        assert_eq!(
            integer_timesteps(Linspace, 1000, 5, 0),
            vec![999, 749, 500, 250, 0]
        );
        assert_eq!(
            integer_timesteps(Linspace, 1000, 4, 0),
            vec![999, 666, 333, 0]
        );
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(arange(10.0, 0.0, -2.5), vec![10.0, 7.5, 5.0, 2.5]);
        assert_eq!(interp_index(1.25, &[0.0, 4.0, 8.0]), 5.0);
        assert_eq!(interp_index(2.0, &[0.0, 4.0, 8.0]), 8.0);
    }
}
