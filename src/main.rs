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

use dream_ood::config::{Config, DeviceSpec, NoiseSharing, SampleMode};
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
    /// Run the stages in order in the config's run folder, skipping those that are up to date.
    ///
    /// Stages: latent, sample, generate, train ([run] methods side by side), eval. Each stage's folder holds a stamp.json with the hash of its
    /// settings and inputs; a changed setting reruns that stage and the later ones. A killed run resumes.
    Run(Box<cli::run::RunArgs>),
    /// Stage 1: train the encoder aligned to the class token embeddings and write the feature bank.
    ///
    /// Writes <out>/tokens.npy, model.safetensors, log.jsonl/csv, bank.npy + bank.json, summary.json
    /// (default out: <run.out_dir>/latent). Rerunning resumes after the last finished epoch.
    Latent(Box<cli::latent::LatentArgs>),
    /// Stage 2: sample outlier (or inlier) embeddings at the boundary of each class's stage-1 features.
    ///
    /// Writes OUT.npy [C, per_class, D] float32 (what the official get_embed_*.py writes) and OUT.json.
    /// Give a config (its [sample] and [run] tables) or the flags; flags override the config. Defaults are
    /// the official CIFAR-100 outlier settings; inliers as in the paper: --inliers --sigma 0.01
    /// --select 1000 --anchors 100 --keep 1.
    Sample(Box<SampleArgs>),
    /// Decode outlier embeddings into images with Stable Diffusion on ONNX Runtime (stage 3).
    ///
    /// Writes OUT/<class_index>/<k>.png, OUT/manifest.jsonl and OUT/run.json. Rerunning the same command
    /// resumes; Ctrl-C finishes the batch in flight. Exits 1 when interrupted. A flag given twice takes
    /// its last value.
    #[command(args_override_self = true)]
    Generate(Box<GenerateArgs>),
    /// Export a detector checkpoint to one ONNX file (stage 6): logits, score, is_ood, with the
    /// calibrated threshold and the evaluation transform in its metadata. Prints the file's path.
    Export(Box<cli::export::ExportArgs>),
    /// Score image files and folders with an exported detector: one JSONL/CSV row per image. Exits 1
    /// when a file could not be scored (its row says why).
    Score(Box<cli::score::ScoreArgs>),
    /// Serve an exported detector over HTTP (POST /v1/score, GET /v1/model, /healthz, /metrics) until
    /// SIGTERM or Ctrl-C. Prints its URL.
    Serve(Box<cli::serve::ServeArgs>),

    /// Evaluate detectors: OOD scores on the ID test set and each OOD set of the config, metrics per set
    /// and their mean (stage 5).
    ///
    /// Writes OUT/metrics.json, OUT/metrics.csv, OUT/report.md, per-image scores
    /// OUT/scores/<method>/<score>/<set>.npy (ID test: id_test.npy) and PNG plots OUT/plots/<method>/.
    /// Prints OUT.
    Eval(cli::eval::EvalArgs),

    /// Stage 4: train the OOD detector (baseline, dream_ood, vos or inlier_aug) from a config.
    ///
    /// Writes OUT/model.safetensors (the classifier, loadable by PyTorch), OUT/state.safetensors, OUT/log.jsonl
    /// and OUT/log.csv after every epoch, and prints the model's path. Rerunning the same command resumes
    /// after the last finished epoch; Ctrl-C stops after the current step (exit 1).
    Train(Box<cli::train::TrainArgs>),
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
    /// Resize images to N×N before quantising (official: --resize 256 --quantize floor) [default: 0 = keep].
    #[arg(long, value_name = "N")]
    resize: Option<usize>,
    /// cpu, cuda, cuda:N, tensorrt or tensorrt:N [default: cpu].
    #[arg(long)]
    ep: Option<String>,
    /// GPUs to spread the job over, one worker each (e.g. 0,1,2,3) [default: the device of --ep].
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<i32>>,
    /// TensorRT: allow fp16 kernels [default: true].
    #[arg(long, value_name = "BOOL")]
    trt_fp16: Option<bool>,
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

#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
struct SampleArgs {
    /// A TOML config; its [sample] table gives the settings and paths, [run] the seed and device.
    config: Option<PathBuf>,
    /// Stage-1 feature bank [C, N, D] .npy (BANK.json beside it may give per-class row counts).
    #[arg(long, value_name = "BANK.npy")]
    bank: Option<PathBuf>,
    /// Class token embeddings [C, D] .npy.
    #[arg(long, value_name = "TOKENS.npy")]
    tokens: Option<PathBuf>,
    /// Output .npy (default <out_dir>/sample/outliers.npy or inliers.npy); OUT.json is written beside it.
    #[arg(long, value_name = "OUT.npy")]
    out: Option<PathBuf>,
    /// intended (the paper's method, the official code's bugs fixed) or official (bugs included).
    #[arg(long, value_parser = ["intended", "official"])]
    mode: Option<String>,
    /// Sample inliers (densest points, smallest kNN distances) instead of outliers.
    #[arg(long)]
    inliers: bool,
    /// k of the k-th nearest-neighbour distance [default: 300].
    #[arg(long)]
    k: Option<usize>,
    /// Boundary points per class [default: 50].
    #[arg(long)]
    select: Option<usize>,
    /// Boundary points perturbed per call, drawn from the selected ones [default: 50].
    #[arg(long)]
    anchors: Option<usize>,
    /// Candidates kept per boundary point [default: 2].
    #[arg(long)]
    keep: Option<usize>,
    /// Gaussian perturbation std on the unit sphere [default: 0.07].
    #[arg(long)]
    sigma: Option<f64>,
    /// Gaussian draws per boundary point per call [default: 1500].
    #[arg(long)]
    candidates: Option<usize>,
    /// Embeddings written per class [default: 10000].
    #[arg(long, value_name = "N")]
    per_class: Option<usize>,
    /// Gaussian draws shared by a call's boundary points (official) or drawn per anchor.
    #[arg(long, value_parser = ["shared", "per_anchor"])]
    noise: Option<String>,
    /// Seed of every random draw [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N [default: auto].
    #[arg(long)]
    device: Option<String>,
    /// CPU threads (0: all cores); the output does not depend on it.
    #[arg(long)]
    threads: Option<usize>,
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
        steps, guidance, scheduler, batch, seed, image_size, quantize, resize, ep, threads,
        workers, devices, trt_fp16
    );
    set_path!(model, embeddings, classes, out, init_latents);
    if args.per_class.is_some() || args.total.is_some() {
        cfg.per_class = args.per_class;
        cfg.total = args.total;
    }
    let mut job = GenerateJob::from_config(&cfg, &base)?;
    job.shard = args.shard;

    let stop =
        cli::interrupt::stop_flag("finishing the batch in flight (Ctrl-C again to stop at once)")?;
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
    // Commands that run libtorch on large tensors keep freed heap memory (src/runtime/heap.rs).
    if matches!(
        command,
        Command::Latent(_)
            | Command::Sample(_)
            | Command::Train(_)
            | Command::Eval(_)
            | Command::Run(_)
    ) {
        dream_ood::runtime::heap::keep_freed_memory();
    }
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
        Command::Export(args) => cli::export::run(*args, &cli::progress::TermProgress::new()),
        Command::Score(args) => cli::score::run(*args, &cli::progress::TermProgress::new()),
        Command::Serve(args) => cli::serve::run(*args),

        Command::Eval(args) => cli::eval::run_eval(args),

        Command::Train(args) => cli::train::run(*args),
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
            let id = dream_ood::eval::score_file::read_scores(&id)?;
            let ood = dream_ood::eval::score_file::read_scores(&ood)?;
            let metrics = dream_ood::eval::metrics::compute(&id, &ood, convention)?;
            let text = if json {
                serde_json::to_string_pretty(&metrics)? + "\n"
            } else {
                metrics.to_text()
            };
            print_stdout(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Latent(args) => cli::latent::run_latent(*args),
        Command::Run(args) => cli::run::run_run(*args),
        Command::Sample(args) => {
            let job = sample_job(*args)?;
            dream_ood::sampling::run(&job, &cli::progress::TermProgress::new())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Merges the config (when given) and the flags into one stage-2 job; flags win.
fn sample_job(args: SampleArgs) -> anyhow::Result<dream_ood::sampling::SampleJob> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // With a config, stage 1's outputs are the default inputs (when they exist).
    let latent_out = config
        .latent
        .out
        .clone()
        .unwrap_or_else(|| dream_ood::latent::default_out(&config.run.out_dir));
    let from_latent = |name: &str| {
        let p = latent_out.join(name);
        (args.config.is_some() && p.exists()).then_some(p)
    };
    let (bank_default, tokens_default) = (from_latent("bank.npy"), from_latent("tokens.npy"));
    let (mut s, run) = (config.sample, config.run);
    s.bank = args.bank.or(s.bank).or(bank_default);
    s.tokens = args.tokens.or(s.tokens).or(tokens_default);
    s.out = args.out.or(s.out);
    if let Some(mode) = args.mode {
        s.mode = if mode == "official" {
            SampleMode::Official
        } else {
            SampleMode::Intended
        };
    }
    s.inliers |= args.inliers;
    s.k = args.k.unwrap_or(s.k);
    s.select = args.select.unwrap_or(s.select);
    s.anchors = args.anchors.unwrap_or(s.anchors);
    s.keep = args.keep.unwrap_or(s.keep);
    s.sigma = args.sigma.unwrap_or(s.sigma);
    s.candidates = args.candidates.unwrap_or(s.candidates);
    s.per_class = args.per_class.unwrap_or(s.per_class);
    if let Some(noise) = args.noise {
        s.noise = if noise == "per_anchor" {
            NoiseSharing::PerAnchor
        } else {
            NoiseSharing::Shared
        };
    }
    if let Err((field, msg)) = s.check() {
        anyhow::bail!("--{}: {msg}", field.replace('_', "-"));
    }
    let need = |p: &Option<PathBuf>, flag: &str| {
        p.clone().with_context(|| {
            format!(
                "--{flag} is required (or sample.{flag} in a config, or a finished stage 1 in the \
                     config's run folder)"
            )
        })
    };
    let (bank, tokens) = (need(&s.bank, "bank")?, need(&s.tokens, "tokens")?);
    let out = s.out.clone().unwrap_or_else(|| {
        let name = if s.inliers {
            "inliers.npy"
        } else {
            "outliers.npy"
        };
        run.out_dir.join("sample").join(name)
    });
    let device_name = args.device.unwrap_or(run.device);
    let spec: DeviceSpec = device_name
        .parse()
        .map_err(|msg: String| anyhow::anyhow!("--device: {msg}"))?;
    Ok(dream_ood::sampling::SampleJob {
        bank,
        tokens,
        out,
        settings: s,
        seed: args.seed.unwrap_or(run.seed),
        device: dream_ood::runtime::resolve_device(spec)?,
        threads: args.threads.unwrap_or(run.threads),
        chunk_bytes: dream_ood::sampling::knn::DEFAULT_CHUNK_BYTES,
    })
}
