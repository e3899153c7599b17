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
    /// Decode outlier embeddings into images with Stable Diffusion on ONNX Runtime (stage 3).
    ///
    /// Writes OUT/<class_index>/<k>.png, OUT/manifest.jsonl and OUT/run.json. Rerunning the same command
    /// resumes; Ctrl-C finishes the batch in flight. Exits 1 when interrupted. A flag given twice takes
    /// its last value.
    #[command(args_override_self = true)]
    Generate(Box<GenerateArgs>),
}

/// Flags of `generate`; each overrides the same key of the config's `[generate]` table.
#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// A config file whose `[generate]` table holds the settings (paths relative to it).
    config: Option<PathBuf>,
    /// The SD ONNX export folder (`optimum-cli export onnx` layout).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Stage 2's embeddings, [C, M, D] float32 .npy.
    #[arg(long)]
    embeddings: Option<PathBuf>,
    /// The classes file (see configs/classes/).
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Images per class.
    #[arg(long, conflicts_with = "total")]
    per_class: Option<usize>,
    /// Images in all (classes drawn uniformly).
    #[arg(long)]
    total: Option<usize>,
    /// Denoising steps [default: 50].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale [default: 7.5].
    #[arg(long)]
    guidance: Option<f32>,
    /// pndm, plms, ddim, euler, euler_ancestral or dpmpp_2m [default: pndm].
    #[arg(long)]
    scheduler: Option<String>,
    /// Images per batch [default: 4].
    #[arg(long)]
    batch: Option<usize>,
    /// Global seed [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Image size in pixels [default: 512].
    #[arg(long)]
    image_size: Option<usize>,
    /// round or floor [default: round].
    #[arg(long)]
    quantize: Option<String>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    ep: Option<String>,
    /// ONNX Runtime intra-op threads per session [default: 0 = cores / workers].
    #[arg(long)]
    threads: Option<usize>,
    /// Parallel workers with their own sessions [default: 0 = auto, logged].
    #[arg(long)]
    workers: Option<usize>,
    /// Run shard I of N (images with index mod N = I), e.g. for a Slurm array.
    #[arg(long, value_name = "I/N")]
    shard: Option<dream_ood::diffusion::plan::Shard>,
    /// Initial latents [K, 4, h, w] float32 .npy instead of seeded noise.
    #[arg(long)]
    init_latents: Option<PathBuf>,
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

fn run_generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    use dream_ood::diffusion::generate::{GenerateJob, run_generate};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (mut cfg, base) = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            (
                config.generate,
                path.parent()
                    .unwrap_or(std::path::Path::new("."))
                    .to_owned(),
            )
        }
        None => (Default::default(), PathBuf::from(".")),
    };
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = args.$field { cfg.$field = v; })* };
    }
    macro_rules! set_path {
        ($($field:ident),*) => { $(if let Some(v) = args.$field { cfg.$field = Some(abs(v)); })* };
    }
    set!(
        steps, guidance, scheduler, batch, seed, image_size, quantize, ep, threads
    );
    set_path!(model, embeddings, classes, out, init_latents);
    if args.per_class.is_some() || args.total.is_some() {
        cfg.per_class = args.per_class;
        cfg.total = args.total;
    }
    let mut job = GenerateJob::from_config(&cfg, &base)?;
    job.shard = args.shard;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: stopping now; rerun the same command to resume");
            std::process::exit(130);
        }
        eprintln!("interrupt: finishing the batch in flight (Ctrl-C again to stop at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let report = run_generate(&job, &cli::progress::TermProgress::new(), &stop)?;
    let done = report.already_done + report.generated;
    if report.interrupted {
        eprintln!(
            "interrupted: {done} of {} images done; rerun the same command to resume",
            report.planned
        );
        return Ok(ExitCode::from(1));
    }
    tracing::info!(
        generated = report.generated,
        skipped = report.already_done,
        workers = report.workers,
        seconds = format!("{:.1}", report.seconds),
        outside_sessions = format!("{:.1}%", 100.0 * report.outside_sessions),
        "generate done"
    );
    print_stdout(&format!("{}\n", job.out.display()))?;
    Ok(ExitCode::SUCCESS)
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
        Command::Generate(args) => run_generate(*args),
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
