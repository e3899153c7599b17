//! The noise schedule and sampler settings ([`SchedulerConfig`], diffusers' `scheduler_config.json`) and the
//! sampler names ([`SchedulerKind`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{
    DdimScheduler, DpmSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler, PndmScheduler, Scheduler,
};
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------------------

/// How `β_t` grows over the training timesteps (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `β = linspace(beta_start, beta_end, T)`.
    Linear,
    /// `β = linspace(√beta_start, √beta_end, T)²`: SD's schedule (CompVis `ldm` calls it "linear").
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal 2021 eq. 17: `β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), 0.999)` with
    /// `ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)`.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε (SD 1.x, SD 2.x base 512).
    Epsilon,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x0` (Salimans & Ho 2022; SD 2.x 768).
    VPrediction,
}

/// How the inference timesteps are picked from the training ones (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `linspace(0, T−1, N)`, rounded for the integer schedulers.
    Linspace,
    /// `arange(N)·(T // N) + steps_offset`: SD's default.
    Leading,
    /// `round(arange(T, 0, −T/N)) − 1`: always starts at `T − 1`.
    Trailing,
}

impl fmt::Display for TimestepSpacing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimestepSpacing::Linspace => "linspace",
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
        })
    }
}

/// The noise schedule and sampler settings of a diffusion model: diffusers' `scheduler_config.json`, plus
/// `eta`. Defaults are SD 1.x's (`runwayml/stable-diffusion-v1-5` `scheduler/scheduler_config.json`, and
/// diffusers' `SCHEDULER_DEFAULT_CONFIG` in `loaders/single_file_utils.py`), except `timestep_spacing`, which
/// is each algorithm's diffusers class default when the file does not name it (see the field).
///
/// Keys this type does not know are logged at `debug` and ignored (the file belongs to the export). Known keys
/// with values that would change the maths in a way not implemented here (`use_karras_sigmas = true`,
/// `thresholding = true`, …) make [`build`](SchedulerConfig::build) fail instead of being ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// diffusers' `_class_name`: the scheduler the export was saved with (`PNDMScheduler` for SD 1.x).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Number of training timesteps T. Default 1000.
    pub num_train_timesteps: usize,
    /// β at t = 0. Default 0.00085 (SD; `linear_start` in CompVis' `v1-inference.yaml`).
    pub beta_start: f64,
    /// β at t = T − 1. Default 0.012 (SD; `linear_end`).
    pub beta_end: f64,
    /// Default `scaled_linear` (SD).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule (length T). Default none.
    pub trained_betas: Option<Vec<f64>>,
    /// Default `epsilon`; SD 2.x 768 uses `v_prediction`.
    pub prediction_type: PredictionType,
    /// Timestep spacing. When absent, each algorithm's diffusers class default: `leading` for PNDM, PLMS and
    /// DDIM, `linspace` for Euler, Euler ancestral and DPM-Solver (what `from_config` does with a missing key;
    /// the SD 1.5 file written by diffusers 0.6 has no such key, re-saved exports say `leading`).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to the `leading` timesteps. Default 1 (SD).
    pub steps_offset: usize,
    /// Use ᾱ = 1 after the last step (PNDM, DDIM); otherwise ᾱ_0. Default false (SD).
    pub set_alpha_to_one: bool,
    /// PNDM: skip the Runge–Kutta warm-up, i.e. run PLMS. Default true (SD). `false` is not implemented.
    pub skip_prk_steps: bool,
    /// DDIM: clamp the predicted x0 to `±clip_sample_range`. Default false (SD).
    pub clip_sample: bool,
    /// DDIM: see `clip_sample`. Default 1.0.
    pub clip_sample_range: f64,
    /// DDIM η (Song et al. 2021, eq. 16): 0 is deterministic DDIM, 1 is DDPM-like. Not a diffusers config key
    /// (diffusers passes it to `step`). Default 0.
    pub eta: f64,
    /// DPM-Solver: must be `"dpmsolver++"` or absent. The `dpmpp_2m` kind fixes `solver_order` to 2.
    pub algorithm_type: Option<String>,
    /// DPM-Solver: must be `"midpoint"` (the default) or absent.
    pub solver_type: Option<String>,
    /// Euler, DPM-Solver: sigma after the last step; must be `"zero"` (the default) or absent.
    pub final_sigmas_type: Option<String>,
    /// Euler: must be `"linear"` (the default) or absent.
    pub interpolation_type: Option<String>,
    /// Euler: must be `"discrete"` (the default) or absent.
    pub timestep_type: Option<String>,
    /// Karras sigmas are not implemented: must be false. Default false.
    pub use_karras_sigmas: bool,
    /// Dynamic thresholding is not implemented: must be false. Default false.
    pub thresholding: bool,
    /// Zero-terminal-SNR rescaling is not implemented: must be false. Default false.
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            skip_prk_steps: true,
            clip_sample: false,
            clip_sample_range: 1.0,
            eta: 0.0,
            algorithm_type: None,
            solver_type: None,
            final_sigmas_type: None,
            interpolation_type: None,
            timestep_type: None,
            use_karras_sigmas: false,
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Keys of diffusers scheduler configs that [`SchedulerConfig`] reads.
const KNOWN_KEYS: &[&str] = &[
    "_class_name",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "skip_prk_steps",
    "clip_sample",
    "clip_sample_range",
    "eta",
    "algorithm_type",
    "solver_type",
    "final_sigmas_type",
    "interpolation_type",
    "timestep_type",
    "use_karras_sigmas",
    "thresholding",
    "rescale_betas_zero_snr",
];

impl SchedulerConfig {
    /// The SD 1.x config (the defaults).
    pub fn sd15() -> Self {
        Self::default()
    }

    /// Parses the text of a diffusers `scheduler_config.json`. `path` only labels errors. `null` values count
    /// as absent (diffusers treats `None` as its default), unknown keys are logged at `debug`.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let bad = |key: &str, msg: String| Error::Config {
            path: path.to_path_buf(),
            line: None,
            key: key.to_owned(),
            msg,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            line: Some(e.line()),
            key: "scheduler config".to_owned(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let serde_json::Value::Object(map) = value else {
            return Err(bad("scheduler config", "expected a JSON object".to_owned()));
        };
        let mut known = serde_json::Map::new();
        let mut ignored = BTreeMap::new();
        for (key, v) in map {
            if v.is_null() {
                continue;
            } else if KNOWN_KEYS.contains(&key.as_str()) {
                known.insert(key, v);
            } else {
                ignored.insert(key, v);
            }
        }
        for (key, v) in &ignored {
            tracing::debug!(file = %path.display(), key, value = %v, "scheduler config: key not used, ignored");
        }
        serde_path_to_error::deserialize(serde_json::Value::Object(known)).map_err(|e| {
            let key = e.path().to_string();
            bad(&key, e.into_inner().to_string())
        })
    }

    /// Reads a diffusers `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Reads `<export_dir>/scheduler/scheduler_config.json` when present, otherwise returns the SD 1.x
    /// defaults (logged at `info`).
    pub fn load_from_export(export_dir: &Path) -> Result<Self> {
        let path = export_dir.join("scheduler").join("scheduler_config.json");
        if path.is_file() {
            Self::load(&path)
        } else {
            tracing::info!(missing = %path.display(), "no scheduler config in the export; using SD 1.x defaults");
            Ok(Self::default())
        }
    }

    /// The algorithm the export was saved with, from `_class_name`, if it is one of ours.
    pub fn saved_kind(&self) -> Option<SchedulerKind> {
        SchedulerKind::from_class_name(self.class_name.as_deref()?)
    }

    /// Builds the `kind` sampler for `num_inference_steps` steps on this noise schedule: diffusers'
    /// `Kind.from_config(config)` followed by `set_timesteps(num_inference_steps)`.
    pub fn build(
        &self,
        kind: SchedulerKind,
        num_inference_steps: usize,
    ) -> Result<Box<dyn Scheduler>> {
        Ok(match kind {
            SchedulerKind::Pndm => Box::new(PndmScheduler::new(self, num_inference_steps)?),
            SchedulerKind::Plms => {
                Box::new(PndmScheduler::official_plms(self, num_inference_steps)?)
            }
            SchedulerKind::Ddim => Box::new(DdimScheduler::new(self, num_inference_steps)?),
            SchedulerKind::Euler => {
                Box::new(EulerDiscreteScheduler::new(self, num_inference_steps)?)
            }
            SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(
                self,
                num_inference_steps,
            )?),
            SchedulerKind::Dpmpp2m => {
                Box::new(DpmSolverMultistepScheduler::new(self, num_inference_steps)?)
            }
        })
    }

    /// Checks what every scheduler needs: sane betas, `1 ≤ num_inference_steps ≤ T`, and no setting whose
    /// maths is not implemented.
    pub(crate) fn validate(&self, kind: SchedulerKind, num_inference_steps: usize) -> Result<()> {
        let t = self.num_train_timesteps;
        if t < 2 {
            return Err(invalid(
                "num_train_timesteps",
                format!("must be at least 2, got {t}"),
            ));
        }
        if num_inference_steps == 0 || num_inference_steps > t {
            return Err(invalid(
                "num_inference_steps",
                format!(
                    "must be between 1 and num_train_timesteps = {t}, got {num_inference_steps}"
                ),
            ));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != t {
                return Err(invalid(
                    "trained_betas",
                    format!("has {} values but num_train_timesteps is {t}", b.len()),
                ));
            }
            if let Some(x) = b.iter().find(|x| !(**x > 0.0 && **x < 1.0)) {
                return Err(invalid(
                    "trained_betas",
                    format!("every beta must be in (0, 1), found {x}"),
                ));
            }
        } else if !(self.beta_start > 0.0
            && self.beta_end < 1.0
            && self.beta_start <= self.beta_end)
        {
            return Err(invalid(
                "beta_start",
                format!(
                    "need 0 < beta_start <= beta_end < 1, got beta_start = {} and beta_end = {}",
                    self.beta_start, self.beta_end
                ),
            ));
        }
        let unsupported = |key: &str, found: &str, want: &str| {
            invalid(
                key,
                format!(
                    "{found} is not implemented for scheduler {kind}; use {want} (or leave the key out)"
                ),
            )
        };
        for (key, on) in [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("thresholding", self.thresholding),
            ("rescale_betas_zero_snr", self.rescale_betas_zero_snr),
        ] {
            if on {
                return Err(unsupported(key, "true", "false"));
            }
        }
        let uses = |key: &str| match kind {
            SchedulerKind::Dpmpp2m => {
                matches!(key, "final_sigmas_type" | "algorithm_type" | "solver_type")
            }
            SchedulerKind::Euler => {
                matches!(
                    key,
                    "final_sigmas_type" | "interpolation_type" | "timestep_type"
                )
            }
            _ => false,
        };
        for (key, value, want) in [
            ("algorithm_type", &self.algorithm_type, "dpmsolver++"),
            ("solver_type", &self.solver_type, "midpoint"),
            ("final_sigmas_type", &self.final_sigmas_type, "zero"),
            ("interpolation_type", &self.interpolation_type, "linear"),
            ("timestep_type", &self.timestep_type, "discrete"),
        ] {
            if let Some(v) = value
                && v != want
                && uses(key)
            {
                return Err(unsupported(key, &format!("{v:?}"), &format!("{want:?}")));
            }
        }
        if kind == SchedulerKind::Pndm && !self.skip_prk_steps {
            return Err(unsupported(
                "skip_prk_steps",
                "false (the PRK warm-up)",
                "true",
            ));
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return Err(invalid(
                "eta",
                format!("must be in [0, 1], got {}", self.eta),
            ));
        }
        Ok(())
    }
}

/// An [`Error::InvalidValue`] about a scheduler config key.
pub(crate) fn invalid(key: &str, msg: String) -> Error {
    Error::InvalidValue {
        key: format!("scheduler.{key}"),
        msg,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Kinds
// ---------------------------------------------------------------------------------------------------------

/// The sampling algorithms, by the names used in configs and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// diffusers `PNDMScheduler` with `skip_prk_steps` (PLMS): SD 1.x's default.
    Pndm,
    /// The official Dream-OOD / CompVis PLMS sampler (`ldm/models/diffusion/plms.py`, SPEC §3.2).
    Plms,
    /// diffusers `DDIMScheduler`.
    Ddim,
    /// diffusers `EulerDiscreteScheduler`.
    Euler,
    /// diffusers `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// diffusers `DPMSolverMultistepScheduler` (`dpmsolver++`, solver order 2): DPM-Solver++(2M).
    #[serde(rename = "dpmpp_2m")]
    Dpmpp2m,
}

impl SchedulerKind {
    /// Every kind, in documentation order.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Pndm,
        SchedulerKind::Plms,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Dpmpp2m,
    ];

    /// The config / command-line name.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Plms => "plms",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_ancestral",
            SchedulerKind::Dpmpp2m => "dpmpp_2m",
        }
    }

    /// The kind for a diffusers `_class_name`, if it is one of ours.
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        Some(match class_name {
            "PNDMScheduler" => SchedulerKind::Pndm,
            "DDIMScheduler" => SchedulerKind::Ddim,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "DPMSolverMultistepScheduler" => SchedulerKind::Dpmpp2m,
            _ => return None,
        })
    }

    /// The timestep spacing diffusers' class uses when the config does not name one.
    pub(crate) fn default_spacing(self) -> TimestepSpacing {
        match self {
            SchedulerKind::Pndm | SchedulerKind::Plms | SchedulerKind::Ddim => {
                TimestepSpacing::Leading
            }
            SchedulerKind::Euler | SchedulerKind::EulerAncestral | SchedulerKind::Dpmpp2m => {
                TimestepSpacing::Linspace
            }
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::InvalidValue {
                key: "scheduler".to_owned(),
                msg: format!(
                    "unknown {s:?}; expected one of {}",
                    Self::ALL.map(SchedulerKind::name).join(", ")
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_str_round_trips_and_lists_names_on_error() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.name())
            );
        }
        let err = "plms2".parse::<SchedulerKind>().unwrap_err().to_string();
        assert_eq!(
            err,
            "scheduler: unknown \"plms2\"; expected one of pndm, plms, ddim, euler, euler_ancestral, dpmpp_2m"
        );
    }

    #[test]
    fn config_reads_sd15_file_leniently() {
        // The hub file of runwayml/stable-diffusion-v1-5, as written by diffusers 0.6, plus an unknown key.
        let text = r#"{
          "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
          "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
          "steps_offset": 1, "trained_betas": null, "clip_sample": false, "some_future_key": [1, 2]
        }"#;
        let cfg = SchedulerConfig::from_json_str(text, Path::new("scheduler_config.json")).unwrap();
        assert_eq!(cfg.saved_kind(), Some(SchedulerKind::Pndm));
        assert_eq!(
            SchedulerConfig {
                class_name: None,
                ..cfg.clone()
            },
            SchedulerConfig::sd15()
        );
        assert_eq!(cfg.timestep_spacing, None);
    }

    #[test]
    fn load_from_export_reads_the_file_or_falls_back_to_sd15() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            SchedulerConfig::load_from_export(dir.path()).unwrap(),
            SchedulerConfig::sd15()
        );
        std::fs::create_dir(dir.path().join("scheduler")).unwrap();
        let path = dir.path().join("scheduler").join("scheduler_config.json");
        // SD 2.x 768 (stabilityai/stable-diffusion-2 scheduler/scheduler_config.json, abridged).
        std::fs::write(
            &path,
            r#"{"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": false, "num_train_timesteps": 1000,
                "prediction_type": "v_prediction", "set_alpha_to_one": false, "skip_prk_steps": true,
                "steps_offset": 1, "trained_betas": null}"#,
        )
        .unwrap();
        let cfg = SchedulerConfig::load_from_export(dir.path()).unwrap();
        assert_eq!(cfg.prediction_type, PredictionType::VPrediction);
        assert_eq!(cfg.saved_kind(), Some(SchedulerKind::Ddim));
        std::fs::write(&path, "{\"beta_end\": 0.012,\n \"num_train_timesteps\": }").unwrap();
        let err = SchedulerConfig::load_from_export(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{}:2: scheduler config: not valid JSON",
                path.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = SchedulerConfig::from_json_str(
            r#"{"beta_schedule": "quadratic"}"#,
            Path::new("s.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("s.json: beta_schedule: unknown variant `quadratic`"),
            "{err}"
        );
        let err = SchedulerConfig::from_json_str(r#"{"steps_offset": "one"}"#, Path::new("s.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("s.json: steps_offset: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn build_rejects_unimplemented_settings_and_bad_step_counts() {
        let karras = SchedulerConfig {
            use_karras_sigmas: true,
            ..Default::default()
        };
        let err = karras
            .build(SchedulerKind::Euler, 20)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("scheduler.use_karras_sigmas: true is not implemented"),
            "{err}"
        );
        let prk = SchedulerConfig {
            skip_prk_steps: false,
            ..Default::default()
        };
        assert!(prk.build(SchedulerKind::Pndm, 20).is_err());
        assert!(
            prk.build(SchedulerKind::Ddim, 20).is_ok(),
            "DDIM does not use skip_prk_steps"
        );
        let sde = SchedulerConfig {
            algorithm_type: Some("sde-dpmsolver++".into()),
            ..Default::default()
        };
        let err = sde
            .build(SchedulerKind::Dpmpp2m, 20)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("algorithm_type"), "{err}");
        for kind in SchedulerKind::ALL {
            let err = SchedulerConfig::default()
                .build(kind, 0)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("num_inference_steps"), "{kind}: {err}");
            let err = SchedulerConfig::default()
                .build(kind, 1001)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("got 1001"), "{kind}: {err}");
        }
    }
}
