//! The run's `report.md` and `outliers.png`, written at the end of every `dream-ood run` from the files the
//! stages left (so a rerun whose stages were all up to date writes the same report):
//!
//! - the comparison of the trained methods on each OOD set and their mean, for the headline score
//!   (energy, the score Dream-OOD trains, when it was evaluated), with ID accuracy, read from
//!   `eval/metrics.json`; every score and the full metrics stay in `eval/report.md`;
//! - the score histograms of `eval/plots/`;
//! - a grid of real ID training images beside the outliers generated for each class;
//! - the exported detector and the images scored with it (`export/samples/summary.json`);
//! - the time each stage took when it last ran (`<stage>/stamp.json`);
//! - `[run] notes`, verbatim.
//!
//! The same comparison is returned as plain text for the terminal.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Run, Stage, StageOutcome, read_stamp, samples};
use crate::config::DataConfig;
use crate::data::{DataSource, Dataset, RawImage};
use crate::error::Result;
use crate::eval::plots::{GridRow, image_grid};
use crate::files::write_atomic;

/// Images per class on each side of the outlier grid.
const GRID_IMAGES: usize = 6;
/// Side of one grid cell in pixels.
const GRID_CELL: u32 = 48;

/// What `run` prints at the end.
pub struct RunSummary {
    /// The comparison table as plain text (empty when nothing was evaluated yet).
    pub table: String,
    pub report: PathBuf,
}

/// One method's numbers for one score, from `metrics.json`.
struct MethodRow {
    name: String,
    id_accuracy: f64,
    /// `(set, fpr95, auroc)` in the report's set order, then `("mean", …)`.
    sets: Vec<(String, f64, f64)>,
}

/// The score the comparison shows: energy when evaluated, else the first score of the report.
fn headline_score(metrics: &Value) -> Option<String> {
    let scores: Vec<&str> = metrics["methods"]
        .get(0)?
        .get("scores")?
        .as_array()?
        .iter()
        .filter_map(|s| s["score"].as_str())
        .collect();
    scores
        .iter()
        .find(|&&s| s == "energy")
        .or(scores.first())
        .map(|s| s.to_string())
}

fn method_rows(metrics: &Value, score: &str) -> Vec<MethodRow> {
    let Some(methods) = metrics["methods"].as_array() else {
        return Vec::new();
    };
    methods
        .iter()
        .filter_map(|m| {
            let s = m["scores"]
                .as_array()?
                .iter()
                .find(|s| s["score"].as_str() == Some(score))?;
            let pair = |x: &Value| Some((x["fpr95"].as_f64()?, x["auroc"].as_f64()?));
            let mut sets: Vec<(String, f64, f64)> = s["sets"]
                .as_object()?
                .iter()
                .filter_map(|(name, x)| pair(x).map(|(f, a)| (name.clone(), f, a)))
                .collect();
            let (f, a) = pair(&s["mean"])?;
            sets.push(("mean".to_owned(), f, a));
            Some(MethodRow {
                name: m["name"].as_str()?.to_owned(),
                id_accuracy: m["id_accuracy"].as_f64()?,
                sets,
            })
        })
        .collect()
}

/// The comparison as (Markdown, plain text): rows = OOD sets and the mean, columns = FPR95 and AUROC of
/// each method, in %.
fn comparison(rows: &[MethodRow], score: &str) -> (String, String) {
    let pct = |v: f64| format!("{:.2}", 100.0 * v);
    let mut md = String::from("| OOD set |");
    let mut align = String::from("|---|");
    let mut head = vec!["OOD set".to_owned()];
    for m in rows {
        let _ = write!(md, " {0} FPR95 ↓ | {0} AUROC ↑ |", m.name);
        align.push_str("---:|---:|");
        head.push(format!("{} FPR95", m.name));
        head.push(format!("{} AUROC", m.name));
    }
    md.push('\n');
    md.push_str(&align);
    md.push('\n');
    let mut table: Vec<Vec<String>> = vec![head];
    let sets: Vec<String> = rows
        .first()
        .map(|m| m.sets.iter().map(|s| s.0.clone()).collect())
        .unwrap_or_default();
    for (i, set) in sets.iter().enumerate() {
        let name = if set == "mean" {
            "**mean**".to_owned()
        } else {
            set.clone()
        };
        let _ = write!(md, "| {name} |");
        let mut line = vec![set.clone()];
        for m in rows {
            let (f, a) = m.sets.get(i).map_or((f64::NAN, f64::NAN), |s| (s.1, s.2));
            let _ = write!(md, " {} | {} |", pct(f), pct(a));
            line.push(pct(f));
            line.push(pct(a));
        }
        md.push('\n');
        table.push(line);
    }
    let _ = write!(md, "| ID accuracy |");
    let mut line = vec!["ID accuracy".to_owned()];
    for m in rows {
        let _ = write!(md, " {} | |", pct(m.id_accuracy));
        line.push(pct(m.id_accuracy));
        line.push(String::new());
    }
    md.push('\n');
    table.push(line);

    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = format!("score: {score} (FPR95 lower is better, AUROC higher; %)\n");
    for r in &table {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                if c == 0 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    (md, text)
}

/// The first `n` images of each class of `ds` (labels `0..classes`).
fn per_class(ds: &dyn Dataset, classes: usize, n: usize) -> Result<Vec<Vec<RawImage>>> {
    let mut out: Vec<Vec<RawImage>> = vec![Vec::new(); classes];
    for i in 0..ds.len() {
        let label = ds.label(i);
        if let Some(v) = usize::try_from(label).ok().and_then(|l| out.get_mut(l))
            && v.len() < n
        {
            v.push(ds.get(i)?);
        }
        if out.iter().all(|v| v.len() >= n) {
            break;
        }
    }
    Ok(out)
}

/// `outliers.png`: per class, real training images beside generated ones. `None` when the run has no
/// training set or no generated images.
fn outlier_grid(data: &DataConfig, generated: &Path, out: &Path) -> Result<Option<()>> {
    let Some(train) = &data.train else {
        return Ok(None);
    };
    if !generated.join("manifest.jsonl").is_file() {
        return Ok(None);
    }
    let train = train.open()?;
    let names = data.class_names(&*train, None)?;
    let generated = DataSource::new(crate::data::source::Format::Manifest, generated).open()?;
    let real = per_class(&*train, names.len(), GRID_IMAGES)?;
    let fake = per_class(&*generated, names.len(), GRID_IMAGES)?;
    let rows: Vec<GridRow> = names
        .iter()
        .zip(real.into_iter().zip(fake))
        .map(|(name, (left, right))| GridRow {
            label: name.clone(),
            left,
            right,
        })
        .collect();
    image_grid(
        out,
        ("real ID training images", "generated outliers"),
        &rows,
        GRID_CELL,
    )?;
    Ok(Some(()))
}

/// Writes `<out_dir>/report.md` (and `outliers.png`) from what the stages left on disk.
pub fn write(run: &Run, outcomes: &[StageOutcome]) -> Result<RunSummary> {
    let c = &run.config;
    let out_dir = &c.run.out_dir;
    let mut md = String::from("# Dream-OOD run\n\n");
    let _ = writeln!(
        md,
        "Run folder `{}`; seed {}; device `{}`; methods: {}.\n",
        out_dir.display(),
        c.run.seed,
        c.run.device,
        super::names(&run.methods())
    );

    // 1. The comparison.
    let metrics: Option<Value> = std::fs::read(run.dir(Stage::Eval).join("metrics.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut table = String::new();
    md.push_str("## Detection\n\n");
    match metrics
        .as_ref()
        .and_then(|m| headline_score(m).map(|s| (m, s)))
    {
        Some((m, score)) => {
            let rows = method_rows(m, &score);
            let (cmp_md, cmp_text) = comparison(&rows, &score);
            table = cmp_text;
            let protocol = m["protocol"].as_str().unwrap_or("?");
            let _ = writeln!(
                md,
                "Score **{score}** (higher = more in-distribution), {protocol} OOD protocol, in %. Every \
                 score, AUPR and the settings: [eval/report.md](eval/report.md); numbers for machines: \
                 `eval/metrics.json`, `eval/metrics.csv`.\n"
            );
            md.push_str(&cmp_md);
            md.push_str("\nScore histograms (ID test vs each OOD set):\n\n");
            for r in &rows {
                let rel = format!("eval/plots/{}/{score}_hist.png", r.name);
                if out_dir.join(&rel).is_file() {
                    let _ = writeln!(md, "![{} {score}]({rel})", r.name);
                }
            }
        }
        None => md.push_str("Not evaluated yet (`eval` stage).\n"),
    }

    if let Some(notes) = &c.run.notes {
        let _ = writeln!(md, "\n## Notes\n\n{}", notes.trim());
    }

    // 2. The generated outliers.
    md.push_str("\n## Generated outliers\n\n");
    match outlier_grid(
        &c.data,
        &run.dir(Stage::Generate),
        &out_dir.join("outliers.png"),
    ) {
        Ok(Some(())) => {
            let _ = writeln!(
                md,
                "Each row is a class: {GRID_IMAGES} real training images (left) and the first \
                 {GRID_IMAGES} outliers stage 3 decoded from that class's boundary embeddings (right).\n\n\
                 ![generated outliers](outliers.png)"
            );
        }
        Ok(None) => md.push_str("No generated images yet (`generate` stage).\n"),
        Err(e) => {
            tracing::warn!("the report's outlier grid could not be drawn: {e}");
            let _ = writeln!(md, "The grid could not be drawn: {e}.");
        }
    }

    // 3. Deployment.
    md.push_str("\n## Deployment\n\n");
    let onnx = run.dir(Stage::Export).join("detector.onnx");
    if onnx.is_file() {
        let _ = writeln!(
            md,
            "`{}` ({}): score it with `dream-ood score {0} IMAGES…` or serve it with `dream-ood serve {0}`.",
            onnx.display(),
            c.export_method().name()
        );
        if let Some(sum) = samples::read_summary(&run.dir(Stage::Export).join("samples")) {
            md.push_str(
                "\nSample images scored through it (`export/samples/scores.csv`):\n\n\
                 | set | kind | images | flagged OOD |\n|---|---|---:|---:|\n",
            );
            for s in &sum {
                let kind = if s.in_distribution { "ID" } else { "OOD" };
                let _ = writeln!(
                    md,
                    "| {} | {kind} | {} | {} |",
                    s.set, s.scored, s.flagged_ood
                );
            }
        }
    } else {
        md.push_str("Not exported yet (`export` stage).\n");
    }

    // 4. Stage timings.
    md.push_str(
        "\n## Stages\n\nSeconds each stage took when it last ran; `up to date` stages were skipped by this \
         invocation.\n\n| stage | seconds | this invocation |\n|---|---:|---|\n",
    );
    for o in outcomes {
        let seconds = read_stamp(&run.dir(o.stage))
            .filter(|s| s.state == "done")
            .map_or("–".to_owned(), |s| format!("{:.1}", s.seconds));
        let _ = writeln!(md, "| {} | {seconds} | {} |", o.stage.name(), o.action);
    }

    let report = out_dir.join("report.md");
    write_atomic(&report, md.as_bytes())?;
    Ok(RunSummary { table, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Value {
        serde_json::json!({
            "protocol": "paper",
            "methods": [
                {"name": "baseline", "id_accuracy": 0.9, "scores": [
                    {"score": "msp", "sets": {"a": {"fpr95": 0.5, "auroc": 0.8}},
                     "mean": {"fpr95": 0.5, "auroc": 0.8}},
                    {"score": "energy", "sets": {"a": {"fpr95": 0.4, "auroc": 0.85},
                                                 "b": {"fpr95": 0.2, "auroc": 0.95}},
                     "mean": {"fpr95": 0.3, "auroc": 0.9}}]},
                {"name": "dream_ood", "id_accuracy": 0.91, "scores": [
                    {"score": "energy", "sets": {"a": {"fpr95": 0.1, "auroc": 0.97},
                                                 "b": {"fpr95": 0.3, "auroc": 0.9}},
                     "mean": {"fpr95": 0.2, "auroc": 0.935}}]}
            ]
        })
    }

    #[test]
    fn the_headline_score_is_energy_when_evaluated() {
        assert_eq!(headline_score(&metrics()).as_deref(), Some("energy"));
        let mut m = metrics();
        m["methods"][0]["scores"].as_array_mut().unwrap().remove(1);
        assert_eq!(headline_score(&m).as_deref(), Some("msp"));
    }

    #[test]
    fn comparison_has_a_column_pair_per_method_and_the_mean_last() {
        let rows = method_rows(&metrics(), "energy");
        let (md, text) = comparison(&rows, "energy");
        assert!(md.contains("| a | 40.00 | 85.00 | 10.00 | 97.00 |"), "{md}");
        assert!(
            md.contains("| **mean** | 30.00 | 90.00 | 20.00 | 93.50 |"),
            "{md}"
        );
        assert!(md.contains("| ID accuracy | 90.00 | | 91.00 | |"), "{md}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("OOD set") && lines[1].contains("dream_ood AUROC"));
        assert!(
            lines[4].starts_with("mean") && lines[4].ends_with("93.50"),
            "{text}"
        );
    }
}
