//! The end of the `export` stage: a few images of the ID test set and of each OOD set, written as PNG and
//! scored with the exported `detector.onnx` exactly as `dream-ood score` scores files (decode, the
//! detector's own transform, ONNX Runtime). It shows the production path working on the run's own data,
//! and what a user would see from it. An OOD set's `preprocess = "native"` does not apply here: the images
//! go through the detector's own transform, as `dream-ood score` would put those files through it.
//!
//! `samples/<set>/<k>.png`, `samples/scores.csv` (the columns of `dream-ood score --format csv`) and
//! `samples/summary.json`: per set, how many images were scored and how many were flagged OOD.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::DataConfig;
use crate::data::DataSource;
use crate::deploy::score::{Format, RowWriter, score_files};
use crate::deploy::{Detector, scorer};
use crate::diffusion::session::SessionOptions;
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::progress::Progress;

/// The name of the ID test set in the summary (OOD sets keep their `[data.ood.<name>]` names).
pub const ID_SET: &str = "id_test";

/// One set's line of `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetSummary {
    pub set: String,
    /// Whether the set is in-distribution (the ID test set) or not.
    pub in_distribution: bool,
    pub scored: usize,
    /// Images whose score fell below the detector's threshold.
    pub flagged_ood: usize,
}

/// Indices spread evenly over `0..len` (the first image of each of `n` equal strides), so a few samples
/// are not all of one class when a set is sorted by label.
fn spread(len: usize, n: usize) -> Vec<usize> {
    let n = n.min(len);
    (0..n).map(|k| k * len / n).collect()
}

/// Writes `per_set` images of each set to `dir/<set>/<k>.png`; returns `(set, is_id, files)`.
fn write_images(
    data: &DataConfig,
    dir: &Path,
    per_set: usize,
) -> Result<Vec<(String, bool, Vec<PathBuf>)>> {
    let mut sets: Vec<(String, bool, &DataSource)> = Vec::new();
    if let Some(test) = &data.test {
        sets.push((ID_SET.to_owned(), true, test));
    }
    sets.extend(
        data.ood
            .iter()
            .map(|(name, src)| (name.clone(), false, src)),
    );
    let mut out = Vec::new();
    for (name, is_id, src) in sets {
        let ds = src.open()?;
        let set_dir = dir.join(&name);
        std::fs::create_dir_all(&set_dir).map_err(|e| Error::io(&set_dir, e))?;
        let mut files = Vec::new();
        for (k, i) in spread(ds.len(), per_set).into_iter().enumerate() {
            let file = set_dir.join(format!("{k}.png"));
            let png = ds.get(i)?.to_png(&ds.describe(i))?;
            write_atomic(&file, &png)?;
            files.push(file);
        }
        out.push((name, is_id, files));
    }
    Ok(out)
}

/// Writes and scores the samples; returns the per-set summary (also written to `dir/summary.json`).
pub fn score_samples(
    data: &DataConfig,
    detector: &Path,
    dir: &Path,
    per_set: usize,
    session: &SessionOptions,
    progress: &dyn Progress,
) -> Result<Vec<SetSummary>> {
    let sets = write_images(data, dir, per_set)?;
    let mut det = Detector::open(detector, session)?;
    let csv_path = dir.join("scores.csv");
    let mut writer = RowWriter::new(Vec::new(), Format::Csv)?;
    let mut summaries = Vec::new();
    for (set, in_distribution, files) in sets {
        let mut flagged = 0;
        let summary = score_files(&mut det, &files, 64, progress, &mut |row| {
            if let Ok(scorer::Scored {
                is_ood: Some(true), ..
            }) = &row.result
            {
                flagged += 1;
            }
            writer.write(&row)
        })?;
        if summary.failed > 0 {
            return Err(Error::Check {
                what: format!("scoring {}", dir.join(&set).display()),
                msg: format!(
                    "{} of {} images failed (see the warnings)",
                    summary.failed, summary.count
                ),
            });
        }
        summaries.push(SetSummary {
            set,
            in_distribution,
            scored: summary.scored,
            flagged_ood: flagged,
        });
    }
    write_atomic(&csv_path, &writer.finish()?)?;
    let json = serde_json::to_vec_pretty(&summaries).expect("plain data");
    write_atomic(&dir.join("summary.json"), &json)?;
    Ok(summaries)
}

/// Reads `summary.json` back (for the run report); `None` when it is missing or unreadable.
pub fn read_summary(dir: &Path) -> Option<Vec<SetSummary>> {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_covers_the_set_evenly_and_never_repeats() {
        assert_eq!(spread(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(spread(3, 5), vec![0, 1, 2]);
        assert!(spread(0, 4).is_empty());
        assert_eq!(spread(1000, 1), vec![0]);
    }
}
