//! `dream-ood train CONFIG`: the command line of stage 4.

use std::path::PathBuf;
use std::process::ExitCode;

use dream_ood::config::Config;
use dream_ood::detector::{Method, Overrides, TrainJob};

/// Flags of `train`; each overrides the same key of the config.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The TOML config: [data] (ID images), [train] (method and settings), [run] (seed, device, out_dir).
    pub config: PathBuf,
    /// baseline, dream_ood, vos or inlier_aug [default: train.method, dream_ood].
    #[arg(long)]
    pub method: Option<Method>,
    /// Epochs of the schedule [default: train.epochs, 200].
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Output folder [default: train.out, else <run.out_dir>/train/<method>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N [default: run.device].
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads for libtorch and decoding [default: train.threads, else run.threads, else all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Stop after epoch N of the schedule (which still spans --epochs); rerun without it to continue
    /// the same trajectory. For time-limited jobs.
    #[arg(long, value_name = "N")]
    pub until_epoch: Option<u64>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let overrides = Overrides {
        method: args.method,
        epochs: args.epochs,
        out: args.out.map(|p| std::path::absolute(&p).unwrap_or(p)),
        device: args.device,
        threads: args.threads,
        until_epoch: args.until_epoch,
    };
    let job = TrainJob::from_config(&config, overrides)?;

    let stop = super::interrupt::stop_flag(
        "stopping after this step (the unfinished epoch is redone on resume)",
    )?;
    let report = dream_ood::detector::run(&job, &super::progress::TermProgress::new(), &stop)?;
    if report.interrupted {
        eprintln!(
            "interrupted: {} of {} epochs done; rerun the same command to resume",
            report.epochs_done, report.epochs
        );
        return Ok(ExitCode::from(1));
    }
    let model = report.out.join("model.safetensors");
    tracing::info!(epochs = report.epochs_done, of = report.epochs, model = %model.display(), "train done");
    crate::print_stdout(&format!("{}\n", model.display()))?;
    Ok(ExitCode::SUCCESS)
}
