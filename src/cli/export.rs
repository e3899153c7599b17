//! `dream-ood export`: flags → [`dream_ood::deploy::ExportJob`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dream_ood::data::Pipeline;
use dream_ood::deploy::config::parse_score;
use dream_ood::deploy::{CalibrationSet, ExportJob, NetworkOverride};
use dream_ood::diffusion::session::SessionOptions;
use dream_ood::nn::{Depth, Stem};

/// Flags of `export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A run config: the checkpoint defaults to the model `train` or `run` wrote for [export] method (default
    /// dream_ood when [run] methods has it, else [train] method), the output to
    /// <run.out_dir>/export/detector.onnx, [data.val] (a held-out ID split) calibrates the threshold, and
    /// [export] gives the defaults of the flags below.
    config: Option<PathBuf>,
    /// The checkpoint (.safetensors): a dream-ood detector, or a PyTorch state_dict with --arch/--stem.
    #[arg(long, required_unless_present = "config")]
    checkpoint: Option<PathBuf>,
    /// The detector file to write (written atomically).
    #[arg(long, required_unless_present = "config")]
    out: Option<PathBuf>,
    /// resnet18, resnet34 or resnet50 (only for checkpoints without dream-ood metadata; must agree
    /// otherwise).
    #[arg(long)]
    arch: Option<Depth>,
    /// cifar or imagenet (as --arch).
    #[arg(long)]
    stem: Option<Stem>,
    /// Class names, one per line, in label order (overrides the checkpoint's).
    #[arg(long, value_name = "FILE")]
    classes: Option<PathBuf>,
    /// Evaluation transform: cifar (ToTensor + Normalize), imagenet (Resize 256, CenterCrop 224,
    /// Normalize) or a JSON file of a dream-ood transform pipeline (overrides the checkpoint's).
    #[arg(long, value_name = "cifar|imagenet|FILE")]
    transform: Option<String>,
    /// The OOD score: energy (T·logsumexp(logits/T)), msp or maxlogit; all are confidences, higher =
    /// more in-distribution. [default: [export] score, else energy]
    #[arg(long, value_parser = ["energy", "msp", "maxlogit"])]
    score: Option<String>,
    /// Temperature T of the energy score. [default: [export] temperature, else 1]
    #[arg(long)]
    temperature: Option<f32>,
    /// Bake normalisation into the graph: its input becomes `image`, uint8 NHWC (also [export] preprocess).
    #[arg(long)]
    preprocess: bool,
    /// Image files or folders of a held-out ID validation split (never the test split), scored through
    /// the exported graph to set the threshold.
    #[arg(long, num_args = 1.., value_name = "PATH", conflicts_with = "calibration_scores")]
    calibration: Vec<PathBuf>,
    /// Precomputed ID scores of the same score (.npy or text, one per line) instead of images.
    #[arg(long, value_name = "FILE")]
    calibration_scores: Option<PathBuf>,
    /// Target in-distribution TPR of the threshold. [default: [export] tpr, else 0.95]
    #[arg(long)]
    tpr: Option<f64>,
    /// One threshold per predicted class (needs calibration images; also [export] per_class_thresholds).
    #[arg(long)]
    per_class_thresholds: bool,
    /// Images per ONNX Runtime run while calibrating.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// ONNX Runtime intra-op threads (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn transform(spec: &str) -> anyhow::Result<Pipeline> {
    Ok(match spec {
        "cifar" => Pipeline::cifar_test(),
        "imagenet" => Pipeline::imagenet_test(256, 224),
        path => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--transform: reading {path}"))?;
            let p: Pipeline = serde_json::from_str(&text).with_context(|| {
                format!("--transform: {path} is not a transform pipeline (JSON)")
            })?;
            p.validate()
                .with_context(|| format!("--transform: {path}"))?;
            p
        }
    })
}

fn classes(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--classes: reading {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(
        !names.is_empty(),
        "--classes: {} has no class names",
        path.display()
    );
    Ok(names)
}

/// Runs `export`; prints the written file's path on stdout.
pub fn run(
    args: ExportArgs,
    progress: &dyn dream_ood::progress::Progress,
) -> anyhow::Result<ExitCode> {
    let config = args
        .config
        .as_deref()
        .map(dream_ood::config::Config::load)
        .transpose()?;
    let settings = config
        .as_ref()
        .map(|c| c.export.clone())
        .unwrap_or_default();
    let score = parse_score(
        args.score.as_deref().unwrap_or(&settings.score),
        args.temperature.unwrap_or(settings.temperature),
    )
    .map_err(anyhow::Error::msg)?;
    let calibration = match (args.calibration.is_empty(), args.calibration_scores) {
        (false, _) => CalibrationSet::Images(args.calibration),
        (true, Some(f)) => CalibrationSet::Scores(f),
        (true, None) => match config.as_ref().and_then(|c| c.data.val.clone()) {
            Some(val) => CalibrationSet::Dataset(val),
            None => CalibrationSet::None,
        },
    };
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let checkpoint = match (args.checkpoint, &config) {
        (Some(p), _) => p,
        (None, Some(c)) => c.detector_checkpoint(),
        (None, None) => anyhow::bail!("--checkpoint is required without a config"),
    };
    let out = match (args.out, &config) {
        (Some(p), _) => p,
        (None, Some(c)) => c.run.out_dir.join("export").join("detector.onnx"),
        (None, None) => anyhow::bail!("--out is required without a config"),
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let job = ExportJob {
        checkpoint,
        out,
        network: NetworkOverride {
            depth: args.arch,
            stem: args.stem,
            classes: args.classes.as_ref().map(classes).transpose()?,
            eval_transform: args.transform.as_deref().map(transform).transpose()?,
        },
        score,
        preprocess: args.preprocess || settings.preprocess,
        calibration,
        target_tpr: args.tpr.unwrap_or(settings.tpr),
        per_class: args.per_class_thresholds || settings.per_class_thresholds,
        batch: args.batch,
        session: SessionOptions {
            intra_threads: args.threads,
            ..Default::default()
        },
    };
    let report = dream_ood::deploy::export(&job, progress)?;
    crate::print_stdout(&format!("{}\n", report.out.display()))?;
    Ok(ExitCode::SUCCESS)
}
