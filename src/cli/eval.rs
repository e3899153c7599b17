//! `dream-ood eval`: arguments, merged over the config's `[eval]` table, and the call into
//! [`dream_ood::eval::evaluate`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use dream_ood::config::{Config, DeviceSpec};
use dream_ood::eval::evaluate::{EvalJob, run};
use dream_ood::eval::scores::ScoreKind;

/// Flags of `eval`; each overrides the config.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The TOML config: [data] names the ID test, ID train and OOD sets, [eval] the scores and protocol,
    /// [run] the seed, device and run folder.
    pub config: PathBuf,
    /// A checkpoint to evaluate, as NAME=PATH or PATH (named after its method or file stem); repeat for
    /// several. Default: <run.out_dir>/train/<[train] method>/model.safetensors, where `train` writes it.
    #[arg(long = "checkpoint", value_name = "NAME=PATH")]
    pub checkpoints: Vec<String>,
    /// Output folder [default: eval.out, else <run.out_dir>/eval].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Scores to compute, comma-separated: msp, max_logit, energy, odin, mahalanobis, knn, react, vim
    /// [default: eval.scores].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub scores: Vec<String>,
}

/// Runs `dream-ood eval`; prints the output folder on stdout.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(&args.config)?;
    if !args.scores.is_empty() {
        config.eval.scores = args
            .scores
            .iter()
            .map(|s| s.trim().parse::<ScoreKind>())
            .collect::<Result<_, _>>()
            .map_err(|msg| anyhow::anyhow!("--scores: {msg}"))?;
        if let Err((field, msg)) = config.eval.check() {
            bail!("--{field}: {msg}");
        }
    }
    if let Some(out) = args.out {
        config.eval.out = Some(std::path::absolute(&out).unwrap_or(out));
    }
    let mut checkpoints = Vec::new();
    for spec in &args.checkpoints {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) if !n.is_empty() => (Some(n.to_owned()), PathBuf::from(p)),
            _ => (None, PathBuf::from(spec)),
        };
        checkpoints.push((name, std::path::absolute(&path).unwrap_or(path)));
    }
    let spec: DeviceSpec = config
        .run
        .device
        .parse()
        .map_err(|msg: String| anyhow::anyhow!("run.device: {msg}"))?;
    let device = dream_ood::runtime::resolve_device(spec)?;
    let job = EvalJob::from_config(&config, checkpoints, device);
    let report = run(&job, &super::progress::TermProgress::new())
        .with_context(|| format!("evaluating into {}", job.out_dir.display()))?;
    for m in &report.methods {
        tracing::info!(
            method = m.name.as_str(),
            id_accuracy = format!("{:.4}", m.id_accuracy),
            "ID accuracy"
        );
    }
    let shown = std::path::absolute(&job.out_dir).unwrap_or(job.out_dir);
    super::super::print_stdout(&format!("{}\n", shown.display()))?;
    Ok(ExitCode::SUCCESS)
}
