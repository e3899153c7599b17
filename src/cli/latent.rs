//! `dream-ood latent CONFIG`: stage 1 from a config's `[run]`, `[data]` and `[latent]` tables.

use std::path::PathBuf;

use dream_ood::config::{Config, DeviceSpec};
use dream_ood::latent::{LatentJob, run};

/// Flags of `latent`; each overrides the same key of the config.
#[derive(Debug, clap::Args)]
pub struct LatentArgs {
    /// The run config ([run], [data] with train (and test), [latent]).
    pub config: PathBuf,
    /// Epochs (latent.epochs).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Output folder (latent.out) [default: <run.out_dir>/latent].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Class token embeddings [C, D] .npy (latent.tokens).
    #[arg(long, conflicts_with = "sd_model")]
    pub tokens: Option<PathBuf>,
    /// SD ONNX export whose token table gives T (latent.sd_model; needs [data] classes).
    #[arg(long)]
    pub sd_model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (run.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Decoding threads; 0 = all cores (run.threads).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run_latent(args: LatentArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = Config::load(&args.config)?;
    let mut s = config.latent;
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    if let Some(e) = args.epochs {
        s.epochs = e;
    }
    if let Some(t) = args.tokens {
        s.tokens = Some(abs(t));
        s.sd_model = None;
    }
    if let Some(m) = args.sd_model {
        s.sd_model = Some(abs(m));
        s.tokens = None;
    }
    if let Err((field, msg)) = s.check() {
        anyhow::bail!("latent.{field}: {msg}");
    }
    let out = args
        .out
        .map(abs)
        .or(s.out.clone())
        .unwrap_or_else(|| dream_ood::latent::default_out(&config.run.out_dir));
    let device_name = args.device.unwrap_or(config.run.device);
    let spec: DeviceSpec = device_name
        .parse()
        .map_err(|msg: String| anyhow::anyhow!("--device: {msg}"))?;
    let threads = match args.threads.unwrap_or(config.run.threads) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let job = LatentJob {
        settings: s,
        data: config.data,
        seed: config.run.seed,
        device: dream_ood::runtime::resolve_device(spec)?,
        threads,
        out,
    };
    let report = run(&job, &super::progress::TermProgress::new())?;
    if let Some(acc) = report.test_nearest_token_top1 {
        tracing::info!("nearest-token top-1 on the test split: {acc:.4}");
    }
    tracing::info!(
        "feature bank {} ({} classes, {} rows max)",
        report.bank.display(),
        report.bank_counts.len(),
        report.bank_counts.iter().max().copied().unwrap_or(0)
    );
    crate::print_stdout(&format!("{}\n", job.out.display()))?;
    Ok(std::process::ExitCode::SUCCESS)
}
