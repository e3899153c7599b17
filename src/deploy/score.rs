//! `dream-ood score`: image files and folders through one detector session, one row per image.
//!
//! Files are decoded and transformed on rayon's pool one batch ahead, while the session scores the batch
//! before (a producer thread and a one-slot channel), so decoding and inference overlap. A file that
//! cannot be read or decoded gets an error row and the rest still score; the [`Summary`] counts it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rayon::prelude::*;
use serde::Serialize;

use super::scorer::{Detector, Prepared, Scored};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// File extensions taken from folders (case-insensitive). Files named on the command line are always
/// tried, whatever their name.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// The files to score: named files as given, folders walked recursively in sorted order (image
/// extensions only, hidden entries skipped). Returns the files and the number of folder entries that were
/// not images.
pub fn collect_inputs(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, usize)> {
    let mut files = Vec::new();
    let mut ignored = 0;
    for p in paths {
        if p.is_dir() {
            walk(p, &mut files, &mut ignored)?;
        } else {
            files.push(p.clone());
        }
    }
    Ok((files, ignored))
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, ignored: &mut usize) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, files, ignored)?;
        } else if is_image_name(&path) {
            files.push(path);
        } else {
            tracing::debug!("not an image file name, left out: {}", path.display());
            *ignored += 1;
        }
    }
    Ok(())
}

fn is_image_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| {
        let e = e.to_string_lossy().to_ascii_lowercase();
        IMAGE_EXTENSIONS.contains(&e.as_str())
    })
}

/// One output row: the file and its result or error.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub path: PathBuf,
    pub result: std::result::Result<Scored, String>,
}

/// Totals of a scoring run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Files attempted.
    pub count: usize,
    /// Files scored.
    pub scored: usize,
    /// Scored files flagged OOD.
    pub ood: usize,
    /// Files that could not be scored (error rows).
    pub failed: usize,
}

impl Summary {
    /// OOD fraction of the scored files (0 when none scored).
    pub fn ood_rate(&self) -> f64 {
        if self.scored == 0 {
            0.0
        } else {
            self.ood as f64 / self.scored as f64
        }
    }
}

/// Scores `files` in batches of `batch`, handing each row to `sink` in input order.
pub fn score_files(
    detector: &mut Detector,
    files: &[PathBuf],
    batch: usize,
    progress: &dyn Progress,
    sink: &mut dyn FnMut(Row) -> Result<()>,
) -> Result<Summary> {
    let batch = batch.max(1);
    let pre = detector.preprocessor();
    let mut summary = Summary::default();
    progress.start("score", files.len() as u64, 0);
    let result = std::thread::scope(|scope| -> Result<()> {
        // One batch decoded ahead: enough to keep the session busy without holding many images.
        let (tx, rx) = mpsc::sync_channel::<Vec<Result<Prepared>>>(1);
        let pre = &pre;
        scope.spawn(move || {
            for chunk in files.chunks(batch) {
                let prepared: Vec<Result<Prepared>> =
                    chunk.par_iter().map(|p| pre.prepare_file(p)).collect();
                if tx.send(prepared).is_err() {
                    return; // the consumer stopped on an error
                }
            }
        });
        for (chunk, prepared) in files.chunks(batch).zip(rx.iter()) {
            let ok: Vec<&Prepared> = prepared.iter().filter_map(|r| r.as_ref().ok()).collect();
            let mut scored = if ok.is_empty() {
                Vec::new()
            } else {
                detector.score(&ok)?
            }
            .into_iter();
            for (path, prep) in chunk.iter().zip(&prepared) {
                let result = match prep {
                    Ok(_) => Ok(scored.next().expect("invariant: one result per image")),
                    Err(e) => {
                        tracing::warn!("{e}");
                        Err(e.to_string())
                    }
                };
                summary.count += 1;
                match &result {
                    Ok(s) => {
                        summary.scored += 1;
                        summary.ood += usize::from(s.is_ood == Some(true));
                    }
                    Err(_) => summary.failed += 1,
                }
                sink(Row {
                    path: path.clone(),
                    result,
                })?;
            }
            progress.advance(chunk.len() as u64);
        }
        Ok(())
    });
    progress.finish();
    result?;
    Ok(summary)
}

/// Output format of `score`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// A header line, then one record per image (RFC 4180 quoting).
    Csv,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            _ => Err(format!("unknown format \"{s}\"; expected jsonl or csv")),
        }
    }
}

/// The columns of both formats, in order.
pub const COLUMNS: [&str; 9] = [
    "path",
    "class",
    "class_index",
    "confidence",
    "score",
    "is_ood",
    "threshold",
    "margin",
    "error",
];

/// Writes rows in a [`Format`]. JSONL leaves out the fields a row does not have; CSV leaves them empty.
pub struct RowWriter<W: Write> {
    format: Format,
    csv: Option<csv::Writer<W>>,
    out: Option<W>,
}

impl<W: Write> RowWriter<W> {
    /// A writer; CSV writes its header at once.
    pub fn new(out: W, format: Format) -> Result<Self> {
        match format {
            Format::Jsonl => Ok(RowWriter {
                format,
                csv: None,
                out: Some(out),
            }),
            Format::Csv => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record(COLUMNS).map_err(csv_err)?;
                Ok(RowWriter {
                    format,
                    csv: Some(w),
                    out: None,
                })
            }
        }
    }

    /// Writes one row.
    pub fn write(&mut self, row: &Row) -> Result<()> {
        let path = row.path.display().to_string();
        match self.format {
            Format::Jsonl => {
                let mut obj = serde_json::Map::new();
                obj.insert("path".into(), path.into());
                match &row.result {
                    Ok(s) => {
                        if let serde_json::Value::Object(m) =
                            serde_json::to_value(s).expect("invariant: plain data")
                        {
                            obj.extend(m.into_iter().filter(|(_, v)| !v.is_null()));
                        }
                    }
                    Err(e) => {
                        obj.insert("error".into(), e.clone().into());
                    }
                }
                let out = self.out.as_mut().expect("invariant: jsonl has a writer");
                serde_json::to_writer(&mut *out, &obj).map_err(|e| stdout_err(e.into()))?;
                out.write_all(b"\n").map_err(stdout_err)
            }
            Format::Csv => {
                let opt = |v: Option<String>| v.unwrap_or_default();
                let record: [String; 9] = match &row.result {
                    Ok(s) => [
                        path,
                        s.class.clone(),
                        s.class_index.to_string(),
                        s.confidence.to_string(),
                        s.score.to_string(),
                        opt(s.is_ood.map(|b| b.to_string())),
                        opt(s.threshold.map(|t| t.to_string())),
                        opt(s.margin.map(|m| m.to_string())),
                        String::new(),
                    ],
                    Err(e) => {
                        let mut r: [String; 9] = Default::default();
                        r[0] = path;
                        r[8] = e.clone();
                        r
                    }
                };
                let w = self.csv.as_mut().expect("invariant: csv has a writer");
                w.write_record(&record).map_err(csv_err)
            }
        }
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(self) -> Result<W> {
        match (self.csv, self.out) {
            (Some(w), _) => w.into_inner().map_err(|e| stdout_err(e.into_error())),
            (None, Some(mut out)) => {
                out.flush().map_err(stdout_err)?;
                Ok(out)
            }
            (None, None) => unreachable!("invariant: one writer"),
        }
    }
}

fn stdout_err(e: std::io::Error) -> Error {
    Error::io("<score output>", e)
}

fn csv_err(e: csv::Error) -> Error {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => stdout_err(io),
        other => stdout_err(std::io::Error::other(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored() -> Scored {
        Scored {
            class: "dog, big".into(),
            class_index: 1,
            confidence: 0.75,
            score: 3.5,
            is_ood: Some(false),
            threshold: Some(2.0),
            margin: Some(1.5),
        }
    }

    #[test]
    fn jsonl_rows_carry_results_or_errors() {
        let mut w = RowWriter::new(Vec::new(), Format::Jsonl).unwrap();
        w.write(&Row {
            path: "a/x.png".into(),
            result: Ok(scored()),
        })
        .unwrap();
        let mut s = scored();
        s.is_ood = None;
        s.threshold = None;
        s.margin = None;
        w.write(&Row {
            path: "b.png".into(),
            result: Ok(s),
        })
        .unwrap();
        w.write(&Row {
            path: "c.txt".into(),
            result: Err("c.txt: not a PNG, JPEG or WebP image".into()),
        })
        .unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"path": "a/x.png", "class": "dog, big", "class_index": 1,
                "confidence": 0.75, "score": 3.5, "is_ood": false, "threshold": 2.0, "margin": 1.5})
        );
        assert_eq!(lines[1].get("is_ood"), None);
        assert_eq!(
            lines[2],
            serde_json::json!({"path": "c.txt", "error": "c.txt: not a PNG, JPEG or WebP image"})
        );
    }

    #[test]
    fn csv_quotes_commas_and_leaves_missing_fields_empty() {
        let mut w = RowWriter::new(Vec::new(), Format::Csv).unwrap();
        w.write(&Row {
            path: "x.png".into(),
            result: Ok(scored()),
        })
        .unwrap();
        w.write(&Row {
            path: "y.png".into(),
            result: Err("bad \"data\"".into()),
        })
        .unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        assert_eq!(
            text,
            "path,class,class_index,confidence,score,is_ood,threshold,margin,error\n\
             x.png,\"dog, big\",1,0.75,3.5,false,2,1.5,\n\
             y.png,,,,,,,,\"bad \"\"data\"\"\"\n"
        );
    }

    #[test]
    fn folders_are_walked_sorted_with_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
        for f in [
            "b.PNG",
            "a.jpg",
            "notes.txt",
            ".hidden.png",
            "sub/c.webp",
            "sub/deeper/d.jpeg",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let explicit = d.join("notes.txt");
        let (files, ignored) = collect_inputs(&[d.to_path_buf(), explicit.clone()]).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "a.jpg",
                "b.PNG",
                "sub/c.webp",
                "sub/deeper/d.jpeg",
                "notes.txt"
            ]
        );
        assert_eq!(ignored, 1);
    }
}
