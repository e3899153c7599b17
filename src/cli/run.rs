//! `dream-ood run CONFIG`: the stages in order in one run folder (`dream_ood::pipeline`).

use std::path::PathBuf;

use dream_ood::pipeline::{Run, RunOptions, Stage, run};

/// Flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The run config.
    pub config: PathBuf,
    /// Start at this stage; earlier stages are used as they are on disk.
    #[arg(long, value_name = "STAGE", conflicts_with = "only")]
    pub from: Option<Stage>,
    /// Run only this stage.
    #[arg(long, value_name = "STAGE")]
    pub only: Option<Stage>,
    /// Rerun the selected stages from scratch even when they are up to date.
    #[arg(long)]
    pub force: bool,
}

pub fn run_run(args: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    let pipeline = Run::load(&args.config)?;
    let stop = super::interrupt::stop_flag(
        "finishing the batch in flight (Ctrl-C again to stop at once)",
    )?;
    let opts = RunOptions {
        from: args.from,
        only: args.only,
        force: args.force,
    };
    let outcomes = run(
        &pipeline,
        &opts,
        &super::progress::TermProgress::new(),
        &stop,
    )?;
    let mut text = String::from("stage      action        seconds\n");
    for o in &outcomes {
        text.push_str(&format!(
            "{:<10} {:<13} {:>7.1}\n",
            o.stage.name(),
            o.action,
            o.seconds
        ));
    }
    let summary = dream_ood::pipeline::report::write(&pipeline, &outcomes)?;
    if !summary.table.is_empty() {
        text.push('\n');
        text.push_str(&summary.table);
    }
    text.push_str(&format!(
        "\nrun folder: {}\nreport:     {}\n",
        pipeline.config.run.out_dir.display(),
        summary.report.display()
    ));
    crate::print_stdout(&text)?;
    Ok(std::process::ExitCode::SUCCESS)
}
