//! The `dream-ood` command line. Parsing, logging setup and exit codes only: every subcommand calls one
//! library function.
//!
//! Exit status: 0 all good; 1 the command ran but something it checked or processed failed (listed in its
//! output); 2 a fatal error (bad arguments, bad config, missing files), printed as `error: …`.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use dream_ood::config::Config;
use dream_ood::eval::fpr::Convention;

/// Dream-OOD: imagine outliers with Stable Diffusion and train OOD detectors on them.
#[derive(Debug, Parser)]
#[command(name = "dream-ood", version, about, propagate_version = true)]
struct Cli {
    /// More log output (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors in the log.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this machine can do (libtorch, CUDA, ONNX Runtime and its providers) and prove both
    /// runtimes work in one process. Exits 1 when something is broken.
    Doctor {
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Compute AUROC, AUPR-In, AUPR-Out and FPR@95TPR from ID and OOD scores.
    ///
    /// Scores are confidences: higher means more in-distribution (for energy, pass -E = logsumexp of the
    /// logits). Each file is a 1-D float32/float64 `.npy` array or text with one number per line.
    Metrics {
        /// In-distribution scores (.npy or text).
        #[arg(long, value_name = "ID_SCORES")]
        id: PathBuf,
        /// Out-of-distribution scores (.npy or text).
        #[arg(long, value_name = "OOD_SCORES")]
        ood: PathBuf,
        /// FPR@95TPR rule: hendrycks (Dream-OOD's official code, ID positive), knn-ood, id-first-tpr95,
        /// or openood (OpenOOD v1.5, OOD positive).
        #[arg(long, value_name = "NAME", default_value = "hendrycks")]
        convention: Convention,
        /// Print the metrics as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file; prints the resolved config (every default filled in) as TOML.
    Check {
        /// The TOML config file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbosity = if cli.quiet {
        -1
    } else {
        cli.verbose.min(2) as i8
    };
    cli::logging::init(verbosity);
    match run(cli.command) {
        Ok(code) => code,
        // `dream-ood doctor | head`: the reader left; that is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Writes a command's result to stdout, returning write errors (a closed pipe) instead of panicking.
fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Doctor { json } => {
            let report =
                dream_ood::runtime::doctor::run_doctor(&cli::progress::TermProgress::new());
            let text = if json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                report.to_text()
            };
            print_stdout(&text)?;
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(&file)?;
            let resolved = toml::to_string(&config).context("printing the resolved config")?;
            tracing::info!("{} is valid", file.display());
            print_stdout(&resolved)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Metrics {
            id,
            ood,
            convention,
            json,
        } => {
            let id = dream_ood::eval::scores::read_scores(&id)?;
            let ood = dream_ood::eval::scores::read_scores(&ood)?;
            let metrics = dream_ood::eval::metrics::compute(&id, &ood, convention)?;
            let text = if json {
                serde_json::to_string_pretty(&metrics)? + "\n"
            } else {
                metrics.to_text()
            };
            print_stdout(&text)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
