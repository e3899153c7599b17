//! `dream-ood run CONFIG`: the stages in order inside one run folder (latent, sample, generate, train for
//! every method of `[run] methods`, eval of them side by side, export of one of them to ONNX with a few
//! images scored through it), each skipped when its outputs are complete and were made from the same
//! inputs and settings. Then [`report`] writes the run's `report.md`.
//!
//! Every stage has a folder `<run.out_dir>/<stage>/` and a `stamp.json` in it:
//!
//! ```json
//! {"stage": "latent", "fingerprint": "…sha256…", "state": "done", "seconds": 812.4}
//! ```
//!
//! The fingerprint is the sha256 of the stage's settings (its config tables, the seed, the paths it reads)
//! and of its upstream stages' fingerprints, so changing `[sample] sigma` reruns sample, generate and
//! everything after, and nothing before. A stage is skipped when its stamp says `done` with the same
//! fingerprint. A stage whose stamp says `running` with the same fingerprint was interrupted: it runs again
//! and resumes from its own files (epochs, images). A stage whose stamp has another fingerprint, or any stage
//! under `--force`, has its folder cleared first, so old outputs never mix with new ones.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, DeviceSpec};
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::progress::Progress;

pub mod report;
pub mod samples;

/// The per-stage `out` keys a config sets. `run` ignores them: its stamps, resume and later stages rely on
/// the fixed layout of the run folder.
fn ignored_out_keys(c: &Config) -> Vec<&'static str> {
    [
        ("latent.out", c.latent.out.is_some()),
        ("sample.out", c.sample.out.is_some()),
        ("generate.out", c.generate.out.is_some()),
        ("train.out", c.train.out.is_some()),
        ("eval.out", c.eval.out.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect()
}

fn names(methods: &[crate::detector::Method]) -> String {
    let names: Vec<&str> = methods.iter().map(|m| m.name()).collect();
    names.join(", ")
}

/// The stages `run` knows, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Latent,
    Sample,
    Generate,
    Train,
    Eval,
    Export,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Latent,
        Stage::Sample,
        Stage::Generate,
        Stage::Train,
        Stage::Eval,
        Stage::Export,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Latent => "latent",
            Stage::Sample => "sample",
            Stage::Generate => "generate",
            Stage::Train => "train",
            Stage::Eval => "eval",
            Stage::Export => "export",
        }
    }
}

impl std::str::FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "unknown stage \"{s}\"; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Which stages to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Start at this stage (earlier ones are taken as they are on disk).
    pub from: Option<Stage>,
    /// Run only this stage.
    pub only: Option<Stage>,
    /// Rerun the selected stages from scratch even when up to date.
    pub force: bool,
}

/// What happened to one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageOutcome {
    pub stage: Stage,
    /// `ran`, `up to date` (skipped) or `not selected`.
    pub action: &'static str,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Stamp {
    stage: Stage,
    fingerprint: String,
    state: String,
    #[serde(default)]
    seconds: f64,
}

/// Everything a run needs, resolved from the config file.
pub struct Run {
    pub config: Config,
    /// The config file's folder (relative paths in `[generate]` are taken from it).
    pub base: PathBuf,
    pub device: tch::Device,
    pub threads: usize,
}

impl Run {
    pub fn load(config_path: &Path) -> Result<Run> {
        let config = Config::load(config_path)?;
        let base = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let spec: DeviceSpec =
            config
                .run
                .device
                .parse()
                .map_err(|msg: String| Error::InvalidValue {
                    key: "run.device".into(),
                    msg,
                })?;
        let threads = match config.run.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let ignored = ignored_out_keys(&config);
        if !ignored.is_empty() {
            tracing::warn!(
                "{} set: `run` keeps every stage's files under {} (<stage>/), so these apply only to \
                 the single-stage commands",
                ignored.join(", "),
                config.run.out_dir.display()
            );
        }
        Ok(Run {
            device: crate::runtime::resolve_device(spec)?,
            config,
            base,
            threads,
        })
    }

    fn dir(&self, stage: Stage) -> PathBuf {
        self.config.run.out_dir.join(stage.name())
    }

    /// The settings a stage's outputs depend on, as JSON (hashed into the fingerprint).
    fn settings(&self, stage: Stage) -> serde_json::Value {
        let c = &self.config;
        // Stages 1 and 4 never read the OOD sets or the validation split: changing those reruns only
        // evaluation and export.
        let mut id_data = serde_json::to_value(&c.data).expect("plain data");
        if let Some(m) = id_data.as_object_mut() {
            m.remove("ood");
            m.remove("val");
        }
        match stage {
            Stage::Latent => serde_json::json!({
                "data": id_data, "latent": c.latent, "seed": c.run.seed,
            }),
            Stage::Sample => serde_json::json!({ "sample": c.sample, "seed": c.run.seed }),
            Stage::Generate => serde_json::json!({ "generate": c.generate, "base": self.base }),
            Stage::Train => serde_json::json!({
                "data": id_data, "train": c.train, "methods": self.methods(), "seed": c.run.seed,
            }),
            Stage::Eval => {
                serde_json::json!({ "data": c.data, "eval": c.eval, "seed": c.run.seed })
            }
            Stage::Export => serde_json::json!({ "data": c.data, "export": c.export }),
        }
    }

    /// The detector methods the run trains and evaluates, `[train] finetune.from` first (the others start
    /// from its model).
    pub fn methods(&self) -> Vec<crate::detector::Method> {
        let mut methods = self.config.trained_methods();
        if let Some(ft) = &self.config.train.finetune {
            methods.sort_by_key(|&m| m != ft.from);
        }
        methods
    }

    /// The fingerprint of `stage`: its settings and its upstream fingerprints.
    fn fingerprint(&self, stage: Stage) -> String {
        let mut h = Sha256::new();
        for s in Stage::ALL.into_iter().filter(|&s| s <= stage) {
            h.update(s.name().as_bytes());
            h.update(self.settings(s).to_string().as_bytes());
        }
        format!("{:x}", h.finalize())
    }
}

fn read_stamp(dir: &Path) -> Option<Stamp> {
    let bytes = std::fs::read(dir.join("stamp.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_stamp(dir: &Path, stamp: &Stamp) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_vec_pretty(stamp).expect("plain data");
    write_atomic(&dir.join("stamp.json"), &json)
}

/// Runs the selected stages of the config at `config_path`.
pub fn run(
    run: &Run,
    opts: &RunOptions,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<Vec<StageOutcome>> {
    let mut outcomes = Vec::new();
    for stage in Stage::ALL {
        let selected = match (opts.only, opts.from) {
            (Some(only), _) => stage == only,
            (None, Some(from)) => stage >= from,
            (None, None) => true,
        };
        if !selected {
            outcomes.push(StageOutcome {
                stage,
                action: "not selected",
                seconds: 0.0,
            });
            continue;
        }
        let dir = run.dir(stage);
        let fingerprint = run.fingerprint(stage);
        let stamp = read_stamp(&dir);
        let same = stamp.as_ref().is_some_and(|s| s.fingerprint == fingerprint);
        if !opts.force && same && stamp.as_ref().is_some_and(|s| s.state == "done") {
            tracing::info!("{}: up to date ({})", stage.name(), dir.display());
            outcomes.push(StageOutcome {
                stage,
                action: "up to date",
                seconds: 0.0,
            });
            continue;
        }
        if dir.exists() && (opts.force || (stamp.is_some() && !same)) {
            let why = if opts.force {
                "--force"
            } else {
                "its settings or inputs changed"
            };
            tracing::info!("{}: clearing {} ({why})", stage.name(), dir.display());
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let mut stamp = Stamp {
            stage,
            fingerprint,
            state: "running".into(),
            seconds: 0.0,
        };
        write_stamp(&dir, &stamp)?;
        let t0 = Instant::now();
        tracing::info!("{}: running", stage.name());
        run_stage(run, stage, progress, stop)?;
        stamp.state = "done".into();
        stamp.seconds = t0.elapsed().as_secs_f64();
        write_stamp(&dir, &stamp)?;
        outcomes.push(StageOutcome {
            stage,
            action: "ran",
            seconds: stamp.seconds,
        });
    }
    Ok(outcomes)
}

fn run_stage(run: &Run, stage: Stage, progress: &dyn Progress, stop: &AtomicBool) -> Result<()> {
    let c = &run.config;
    let out_dir = &c.run.out_dir;
    match stage {
        Stage::Latent => {
            let job = crate::latent::LatentJob {
                settings: c.latent.clone(),
                data: c.data.clone(),
                seed: c.run.seed,
                device: run.device,
                threads: run.threads,
                out: run.dir(Stage::Latent),
            };
            crate::latent::run(&job, progress)?;
        }
        Stage::Sample => {
            let latent = run.dir(Stage::Latent);
            let name = if c.sample.inliers {
                "inliers.npy"
            } else {
                "outliers.npy"
            };
            let job = crate::sampling::SampleJob {
                bank: c
                    .sample
                    .bank
                    .clone()
                    .unwrap_or_else(|| latent.join("bank.npy")),
                tokens: c
                    .sample
                    .tokens
                    .clone()
                    .unwrap_or_else(|| latent.join("tokens.npy")),
                out: run.dir(Stage::Sample).join(name),
                settings: c.sample.clone(),
                seed: c.run.seed,
                device: run.device,
                threads: run.threads,
                chunk_bytes: crate::sampling::knn::DEFAULT_CHUNK_BYTES,
            };
            crate::sampling::run(&job, progress)?;
        }
        Stage::Generate => {
            let mut g = c.generate.clone();
            if g.embeddings.is_none() {
                let name = if c.sample.inliers {
                    "inliers.npy"
                } else {
                    "outliers.npy"
                };
                g.embeddings = Some(
                    std::path::absolute(run.dir(Stage::Sample).join(name))
                        .map_err(|e| Error::io(out_dir, e))?,
                );
            }
            g.out = Some(
                std::path::absolute(run.dir(Stage::Generate)).map_err(|e| Error::io(out_dir, e))?,
            );
            if g.classes.is_none() {
                // Already resolved against the config's folder by `Config::load`; absolute so that
                // `GenerateJob::from_config` does not join the folder a second time.
                g.classes = c
                    .data
                    .classes
                    .as_deref()
                    .map(std::path::absolute)
                    .transpose()
                    .map_err(|e| Error::io(out_dir, e))?;
            }
            let job = crate::diffusion::generate::GenerateJob::from_config(&g, &run.base)?;
            let report = crate::diffusion::generate::run_generate(&job, progress, stop)?;
            if report.interrupted {
                return Err(Error::Check {
                    what: "generate".into(),
                    msg: format!(
                        "interrupted after {} of {} images; rerun the same command to resume",
                        report.already_done + report.generated,
                        report.planned
                    ),
                });
            }
        }
        Stage::Train => {
            if let Some(ft) = &c.train.finetune
                && !run.methods().contains(&ft.from)
            {
                return Err(Error::InvalidValue {
                    key: "train.finetune.from".into(),
                    msg: format!(
                        "{} is not trained by this run (it trains {}); add it to [run] methods",
                        ft.from.name(),
                        names(&run.methods())
                    ),
                });
            }
            for method in run.methods() {
                let overrides = crate::detector::Overrides {
                    method: Some(method),
                    out: Some(run.dir(Stage::Train).join(method.name())),
                    device: Some(c.run.device.clone()),
                    ..Default::default()
                };
                let mut cfg = c.clone();
                if cfg.train.outliers.is_none() {
                    cfg.train.outliers = Some(run.dir(Stage::Generate));
                }
                let job = crate::detector::TrainJob::from_config(&cfg, overrides)?;
                let report = crate::detector::trainer::run(&job, progress, stop)?;
                if report.interrupted {
                    return Err(Error::Check {
                        what: "train".into(),
                        msg: format!(
                            "{} interrupted after epoch {}; rerun the same command to resume",
                            method.name(),
                            report.epochs_done
                        ),
                    });
                }
            }
        }
        Stage::Eval => {
            let checkpoints = run
                .methods()
                .into_iter()
                .map(|m| {
                    (
                        Some(m.name().to_owned()),
                        run.dir(Stage::Train)
                            .join(m.name())
                            .join("model.safetensors"),
                    )
                })
                .collect();
            let mut job = crate::eval::evaluate::EvalJob::from_config(c, checkpoints, run.device);
            job.out_dir = run.dir(Stage::Eval);
            crate::eval::evaluate::run(&job, progress)?;
        }
        Stage::Export => {
            let method = c.export_method();
            if !run.methods().contains(&method) {
                return Err(Error::InvalidValue {
                    key: "export.method".into(),
                    msg: format!(
                        "{} is not trained by this run (it trains {})",
                        method.name(),
                        names(&run.methods())
                    ),
                });
            }
            let dir = run.dir(Stage::Export);
            let calibration = match &c.data.val {
                Some(val) => crate::deploy::CalibrationSet::Dataset(val.clone()),
                None => {
                    tracing::warn!(
                        "no [data.val]: the detector is exported without a threshold (no is_ood output)"
                    );
                    crate::deploy::CalibrationSet::None
                }
            };
            let session = crate::diffusion::session::SessionOptions {
                intra_threads: run.threads,
                ..Default::default()
            };
            let job = crate::deploy::ExportJob {
                checkpoint: run
                    .dir(Stage::Train)
                    .join(method.name())
                    .join("model.safetensors"),
                out: dir.join("detector.onnx"),
                network: Default::default(),
                score: c.export.score_kind().map_err(|msg| Error::InvalidValue {
                    key: "export.score".into(),
                    msg,
                })?,
                preprocess: c.export.preprocess,
                calibration,
                target_tpr: c.export.tpr,
                per_class: c.export.per_class_thresholds,
                batch: 64,
                session: session.clone(),
            };
            let report = crate::deploy::export(&job, progress)?;
            if c.export.score_samples > 0 {
                samples::score_samples(
                    &c.data,
                    &report.out,
                    &dir.join("samples"),
                    c.export.score_samples,
                    &session,
                    progress,
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(text: &str) -> Run {
        let config = Config::parse(text, Path::new("t.toml")).unwrap();
        Run {
            config,
            base: PathBuf::from("."),
            device: tch::Device::Cpu,
            threads: 1,
        }
    }

    #[test]
    fn per_stage_out_keys_are_reported_as_ignored() {
        assert!(ignored_out_keys(&run_of("").config).is_empty());
        let c = run_of("[train]\nout = \"x\"\n[latent]\nout = \"y\"\n").config;
        assert_eq!(ignored_out_keys(&c), ["latent.out", "train.out"]);
    }

    #[test]
    fn a_changed_setting_changes_its_stage_and_the_later_ones_only() {
        let a = run_of("[sample]\nsigma = 0.07\n");
        let b = run_of("[sample]\nsigma = 0.05\n");
        assert_eq!(a.fingerprint(Stage::Latent), b.fingerprint(Stage::Latent));
        assert_ne!(a.fingerprint(Stage::Sample), b.fingerprint(Stage::Sample));
        assert_ne!(
            a.fingerprint(Stage::Generate),
            b.fingerprint(Stage::Generate)
        );
        let c = run_of("[latent]\nepochs = 3\n");
        assert_ne!(a.fingerprint(Stage::Latent), c.fingerprint(Stage::Latent));
        assert_ne!(a.fingerprint(Stage::Sample), c.fingerprint(Stage::Sample));
    }

    #[test]
    fn stage_names_parse() {
        assert_eq!("generate".parse::<Stage>().unwrap(), Stage::Generate);
        assert!(
            "train2"
                .parse::<Stage>()
                .unwrap_err()
                .contains("expected one of latent")
        );
    }
}
