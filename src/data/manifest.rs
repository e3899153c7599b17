//! A folder of generated images described by its `manifest.jsonl` (stage 3's output).
//!
//! One JSON object per line with at least the image path relative to the manifest's folder (`path`, or
//! `file` as stage 3 writes it) and the class index (`class`, or `class_index`). Other fields (seed,
//! scheduler, sha256, …) are ignored, so the manifest can grow without breaking readers. Blank lines are
//! skipped. A line that does not parse, or lacks a field, is an error naming the line: a broken manifest
//! means a broken run, not a bad image. Images are decoded on demand, so a corrupt or missing PNG falls
//! under the loader's [`super::OnError`].
//!
//! The images are taken in path order, not line order: stage 3's parallel workers append lines as their
//! batches finish, so two generations of the same plan write the same files in different line orders, and
//! a dataset in line order would give a seeded training run a different sample order each time.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::{Dataset, RawImage, index_error};
use crate::{Error, Result};

/// The manifest's file name inside a generated folder.
pub const MANIFEST: &str = "manifest.jsonl";

#[derive(Deserialize)]
struct Entry {
    #[serde(alias = "file")]
    path: String,
    #[serde(alias = "class_index")]
    class: i64,
}

/// Generated images listed by a manifest.
#[derive(Debug, Clone)]
pub struct GeneratedFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Vec<i64>,
}

impl GeneratedFolder {
    /// Opens `path`: a folder holding `manifest.jsonl`, or the manifest file itself.
    pub fn open(path: &Path) -> Result<Self> {
        let manifest = if path.is_dir() {
            path.join(MANIFEST)
        } else {
            path.to_path_buf()
        };
        let root = manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
        let text = std::fs::read_to_string(&manifest).map_err(|e| Error::io(&manifest, e))?;
        let mut entries: Vec<(String, i64)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| Error::Data {
                path: manifest.clone(),
                line: Some(i + 1),
                msg,
            };
            let entry: Entry = serde_json::from_str(line).map_err(|e| {
                bad(format!(
                    "not a manifest entry (a JSON object with `path` and `class`): {e}"
                ))
            })?;
            if entry.class < 0 {
                return Err(bad(format!("class {} is negative", entry.class)));
            }
            let rel = Path::new(&entry.path);
            if rel.as_os_str().is_empty()
                || rel
                    .components()
                    .any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
            {
                return Err(bad(format!(
                    "path {:?} must be relative to the manifest's folder",
                    entry.path
                )));
            }
            entries.push((entry.path, entry.class));
        }
        // Path order (see the module docs); a stable sort keeps repeated paths in line order.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let (files, labels) = entries
            .into_iter()
            .map(|(rel, class)| (root.join(rel), class))
            .unzip();
        Ok(Self {
            root,
            files,
            labels,
        })
    }

    /// The folder the paths are relative to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image files, in path order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl Dataset for GeneratedFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn label(&self, index: usize) -> i64 {
        self.labels.get(index).copied().unwrap_or(-1)
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        let path = self
            .files
            .get(index)
            .ok_or_else(|| index_error(index, self.len()))?;
        RawImage::open(path)
    }

    fn describe(&self, index: usize) -> String {
        self.files
            .get(index)
            .map_or_else(|| format!("image {index}"), |p| p.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_key_spellings_and_ignores_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("3")).unwrap();
        image::RgbImage::from_raw(1, 1, vec![1, 2, 3])
            .unwrap()
            .save(dir.path().join("3/a.png"))
            .unwrap();
        let lines = [
            r#"{"path": "3/a.png", "class": 3, "seed": 42, "sha256": "00"}"#,
            "",
            r#"{"file": "3/a.png", "class_index": 7, "class_name": "x", "embedding_row": 5}"#,
        ];
        std::fs::write(dir.path().join(MANIFEST), lines.join("\n")).unwrap();
        let ds = GeneratedFolder::open(dir.path()).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!([ds.label(0), ds.label(1)], [3, 7]);
        assert_eq!(ds.get(1).unwrap().data(), &[1, 2, 3]);
        let same = GeneratedFolder::open(&dir.path().join(MANIFEST)).unwrap();
        assert_eq!(same.files(), ds.files());
    }

    #[test]
    fn images_come_in_path_order_whatever_the_line_order() {
        let dir = tempfile::tempdir().unwrap();
        let entries = [
            r#"{"file": "1/0000003.png", "class_index": 1}"#,
            r#"{"file": "0/0000000.png", "class_index": 0}"#,
            r#"{"file": "1/0000001.png", "class_index": 1}"#,
            r#"{"file": "0/0000002.png", "class_index": 0}"#,
        ];
        let open = |order: &[usize]| {
            let text: Vec<&str> = order.iter().map(|&i| entries[i]).collect();
            std::fs::write(dir.path().join(MANIFEST), text.join("\n")).unwrap();
            let ds = GeneratedFolder::open(dir.path()).unwrap();
            let labels: Vec<i64> = (0..ds.len()).map(|i| ds.label(i)).collect();
            (ds.files().to_vec(), labels)
        };
        let (files, labels) = open(&[0, 1, 2, 3]);
        let names: Vec<_> = files
            .iter()
            .map(|f| {
                f.strip_prefix(dir.path())
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "0/0000000.png",
                "0/0000002.png",
                "1/0000001.png",
                "1/0000003.png"
            ]
        );
        assert_eq!(labels, [0, 0, 1, 1]);
        assert_eq!(open(&[3, 2, 1, 0]), (files.clone(), labels.clone()));
        assert_eq!(open(&[2, 0, 3, 1]), (files, labels));
    }

    #[test]
    fn a_bad_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"path": "a.png", "class": 1}"#.to_string() + "\n{oops\n",
                ":2:",
            ),
            (r#"{"path": "a.png"}"#.to_string(), ":1:"),
            (r#"{"path": "a.png", "class": -1}"#.to_string(), "negative"),
            (
                r#"{"path": "/etc/a.png", "class": 0}"#.to_string(),
                "relative",
            ),
            ("\n\n[1, 2]".to_string(), ":3:"),
        ];
        for (text, want) in cases {
            std::fs::write(dir.path().join(MANIFEST), &text).unwrap();
            let err = GeneratedFolder::open(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains(MANIFEST) && err.contains(want),
                "{text:?}: {err}"
            );
        }
    }
}
