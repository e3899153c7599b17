//! `dream-ood score`: image files and folders → one row per image (JSONL or CSV).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use dream_ood::deploy::Detector;
use dream_ood::deploy::score::{Format, Row, RowWriter, collect_inputs, score_files};
use dream_ood::diffusion::session::SessionOptions;
use dream_ood::files::temp_path;

/// Flags of `score`.
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The detector exported by `dream-ood export`.
    #[arg(long)]
    model: PathBuf,
    /// Image files (always tried) and folders (walked recursively; .png, .jpg, .jpeg, .webp files).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// jsonl or csv.
    #[arg(long, default_value = "jsonl")]
    format: Format,
    /// Images per ONNX Runtime run.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Write the rows to FILE (atomically, when all is done) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Runs `score`: exit 1 when any file could not be scored (its row says why), 0 otherwise.
/// Scores `files` into rows written to `out` in `--format`; returns the totals and `out` (flushed by the
/// caller: stdout as is, a file before its rename).
fn score_into<W: Write>(
    out: W,
    detector: &mut Detector,
    files: &[PathBuf],
    args: &ScoreArgs,
    progress: &dyn dream_ood::progress::Progress,
) -> anyhow::Result<(dream_ood::deploy::score::Summary, W)> {
    let mut writer = RowWriter::new(out, args.format)?;
    let summary = score_files(detector, files, args.batch, progress, &mut |row: Row| {
        writer.write(&row)
    })?;
    Ok((summary, writer.finish()?))
}

pub fn run(
    args: ScoreArgs,
    progress: &dyn dream_ood::progress::Progress,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let opts = SessionOptions {
        intra_threads: args.threads,
        ..Default::default()
    };
    let mut detector = Detector::open(&args.model, &opts)?;
    let (files, ignored) = collect_inputs(&args.paths)?;
    if ignored > 0 {
        tracing::info!("{ignored} files in the folders have no image extension and were left out");
    }
    let summary = match &args.out {
        None => {
            let stdout = std::io::BufWriter::new(std::io::stdout().lock());
            let (summary, mut out) = score_into(stdout, &mut detector, &files, &args, progress)?;
            out.flush()?;
            summary
        }
        Some(out) => {
            let tmp = temp_path(out);
            let file = std::fs::File::create(&tmp).map_err(|e| dream_ood::Error::io(&tmp, e))?;
            let result = (|| -> anyhow::Result<_> {
                let buffered = std::io::BufWriter::new(file);
                let (summary, buffered) =
                    score_into(buffered, &mut detector, &files, &args, progress)?;
                let file = buffered.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                std::fs::rename(&tmp, out).map_err(|e| dream_ood::Error::io(out, e))?;
                Ok(summary)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result?
        }
    };
    tracing::info!(
        count = summary.count,
        scored = summary.scored,
        ood = summary.ood,
        ood_rate = format!("{:.4}", summary.ood_rate()),
        failed = summary.failed,
        "score done"
    );
    if summary.failed > 0 {
        tracing::warn!(
            "{} of {} files could not be scored (see their rows)",
            summary.failed,
            summary.count
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
