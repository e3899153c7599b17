//! The CIFAR-10 / CIFAR-100 binary distribution (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`).
//!
//! Each file is a run of fixed-size records: CIFAR-10 `<label u8><3072 pixels>` in `data_batch_{1..5}.bin`
//! and `test_batch.bin`; CIFAR-100 `<coarse u8><fine u8><3072 pixels>` in `train.bin` and `test.bin`. The
//! 3072 pixels are the red plane, then green, then blue, each 32×32 row-major. Class names come from
//! `batches.meta.txt` (CIFAR-10) or `{fine,coarse}_label_names.txt` (CIFAR-100) when present.
//!
//! A file whose length is not a whole number of records, or with a label out of range, is corrupt and falls
//! under [`OnError`]: skipped whole, or an error.

use std::path::{Path, PathBuf};

use super::{Dataset, OnError, RawImage, Skipped, handle_open_error, index_error, read_maybe_gz};
use crate::{Error, Result};

const SIDE: usize = 32;
const PIXELS: usize = SIDE * SIDE * 3;

/// Which CIFAR layout, and for CIFAR-100 which label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// 10 classes, one label byte per record.
    Cifar10,
    /// 100 fine classes (what Dream-OOD trains on), coarse byte ignored.
    Cifar100Fine,
    /// 20 coarse superclasses.
    Cifar100Coarse,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            _ => 2,
        }
    }

    fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100Fine => 100,
            CifarKind::Cifar100Coarse => 20,
        }
    }

    /// Files of a split, as the binary tarballs name them.
    fn files(self, train: bool) -> Vec<&'static str> {
        match (self, train) {
            (CifarKind::Cifar10, true) => vec![
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (CifarKind::Cifar10, false) => vec!["test_batch.bin"],
            (_, true) => vec!["train.bin"],
            (_, false) => vec!["test.bin"],
        }
    }

    fn names_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100Fine => "fine_label_names.txt",
            CifarKind::Cifar100Coarse => "coarse_label_names.txt",
        }
    }
}

/// CIFAR images in memory as HWC RGB (CIFAR-100 train is 150 MB).
#[derive(Debug, Clone)]
pub struct CifarDataset {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    /// `(first index, file)` per loaded file, for [`Dataset::describe`].
    origins: Vec<(usize, PathBuf)>,
    classes: Vec<String>,
    skipped: Vec<Skipped>,
}

impl CifarDataset {
    /// Opens record files of `kind`, in order.
    pub fn open(files: &[PathBuf], kind: CifarKind, on_error: OnError) -> Result<Self> {
        let mut ds = Self {
            pixels: Vec::new(),
            labels: Vec::new(),
            origins: Vec::new(),
            classes: Vec::new(),
            skipped: Vec::new(),
        };
        for path in files {
            match read_records(path, kind) {
                Ok((labels, pixels)) => {
                    ds.origins.push((ds.labels.len(), path.clone()));
                    ds.labels.extend(labels);
                    ds.pixels.extend(pixels);
                }
                Err(e) => handle_open_error(on_error, e, &mut ds.skipped)?,
            }
        }
        if ds.labels.is_empty() {
            return Err(Error::Data {
                path: files.first().cloned().unwrap_or_default(),
                line: None,
                msg: format!(
                    "no {kind:?} record could be read from {} file(s){}",
                    files.len(),
                    ds.skipped
                        .first()
                        .map(|s| format!("; first problem: {}", s.reason))
                        .unwrap_or_default()
                ),
            });
        }
        Ok(ds)
    }

    /// Opens the train or test split of an extracted binary tarball (`cifar-10-batches-bin/` or
    /// `cifar-100-binary/`), with class names when the names file is there.
    pub fn open_dir(dir: &Path, kind: CifarKind, train: bool, on_error: OnError) -> Result<Self> {
        let files: Vec<PathBuf> = kind.files(train).iter().map(|f| dir.join(f)).collect();
        let mut ds = Self::open(&files, kind, on_error)?;
        if let Ok(text) = std::fs::read_to_string(dir.join(kind.names_file())) {
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() == kind.num_classes() {
                ds.classes = names;
            } else {
                tracing::warn!(
                    "{}: {} names for {} classes; class names not used",
                    dir.join(kind.names_file()).display(),
                    names.len(),
                    kind.num_classes()
                );
            }
        }
        Ok(ds)
    }
}

/// Reads one record file into labels and HWC pixels.
fn read_records(path: &Path, kind: CifarKind) -> Result<(Vec<u8>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    let record = kind.label_bytes() + PIXELS;
    if bytes.is_empty() || bytes.len() % record != 0 {
        return Err(bad(format!(
            "{} bytes is not a whole number of {record}-byte {kind:?} records",
            bytes.len()
        )));
    }
    let n = bytes.len() / record;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * PIXELS);
    for (r, rec) in bytes.chunks_exact(record).enumerate() {
        let label = match kind {
            CifarKind::Cifar100Coarse => rec[0],
            CifarKind::Cifar10 => rec[0],
            CifarKind::Cifar100Fine => rec[1],
        };
        if label as usize >= kind.num_classes() {
            return Err(bad(format!(
                "record {r}: label {label} is out of range for {} classes (wrong CIFAR kind?)",
                kind.num_classes()
            )));
        }
        labels.push(label);
        // Planes R, G, B → interleaved HWC.
        let planes = &rec[kind.label_bytes()..];
        for p in 0..SIDE * SIDE {
            pixels.extend_from_slice(&[
                planes[p],
                planes[SIDE * SIDE + p],
                planes[2 * SIDE * SIDE + p],
            ]);
        }
    }
    Ok((labels, pixels))
}

impl Dataset for CifarDataset {
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
            3,
            self.pixels[index * PIXELS..(index + 1) * PIXELS].to_vec(),
        )
    }

    fn describe(&self, index: usize) -> String {
        let pos = self.origins.partition_point(|(start, _)| *start <= index);
        match pos.checked_sub(1).and_then(|i| self.origins.get(i)) {
            Some((start, path)) => format!("{} record {}", path.display(), index - start),
            None => format!("record {index}"),
        }
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose red plane is `r`, green `g`, blue a gradient, so plane order is visible.
    fn record(labels: &[u8], r: u8, g: u8) -> Vec<u8> {
        let mut rec = labels.to_vec();
        rec.extend(std::iter::repeat_n(r, 1024));
        rec.extend(std::iter::repeat_n(g, 1024));
        rec.extend((0..1024).map(|i| (i % 256) as u8));
        rec
    }

    #[test]
    fn cifar100_two_records_fine_and_coarse() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(&[3, 42], 10, 20);
        bytes.extend(record(&[19, 99], 30, 40));
        std::fs::write(dir.path().join("train.bin"), &bytes).unwrap();
        let fine = CifarDataset::open_dir(dir.path(), CifarKind::Cifar100Fine, true, OnError::Fail)
            .unwrap();
        assert_eq!(fine.len(), 2);
        assert_eq!([fine.label(0), fine.label(1)], [42, 99]);
        let img = fine.get(1).unwrap();
        // Pixel (row 0, col 5): R plane, G plane, B plane value 5.
        assert_eq!(&img.data()[15..18], &[30, 40, 5]);
        // Pixel (row 1, col 0) is plane index 32.
        assert_eq!(&img.data()[32 * 3..32 * 3 + 3], &[30, 40, 32]);
        let coarse =
            CifarDataset::open_dir(dir.path(), CifarKind::Cifar100Coarse, true, OnError::Fail)
                .unwrap();
        assert_eq!([coarse.label(0), coarse.label(1)], [3, 19]);
        assert!(
            fine.describe(1).ends_with("train.bin record 1"),
            "{}",
            fine.describe(1)
        );
    }

    #[test]
    fn cifar10_batches_names_and_a_corrupt_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut b1 = record(&[1], 1, 1);
        b1.extend(record(&[9], 2, 2));
        std::fs::write(dir.path().join("data_batch_1.bin"), &b1).unwrap();
        std::fs::write(dir.path().join("data_batch_2.bin"), &b1[..5000]).unwrap(); // truncated
        std::fs::write(dir.path().join("data_batch_3.bin"), record(&[4], 3, 3)).unwrap();
        let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";
        std::fs::write(dir.path().join("batches.meta.txt"), names).unwrap();

        let err = CifarDataset::open_dir(dir.path(), CifarKind::Cifar10, true, OnError::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("data_batch_2.bin"), "{err}");

        let ds =
            CifarDataset::open_dir(dir.path(), CifarKind::Cifar10, true, OnError::Skip).unwrap();
        // Batches 4 and 5 are missing, 2 is truncated: 3 skipped, 3 records kept.
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.skipped().len(), 3);
        assert!(
            ds.skipped()
                .iter()
                .any(|s| s.what.ends_with("data_batch_2.bin"))
        );
        assert_eq!([ds.label(0), ds.label(1), ds.label(2)], [1, 9, 4]);
        assert_eq!(ds.classes()[9], "truck");
        assert!(
            ds.describe(2).ends_with("data_batch_3.bin record 0"),
            "{}",
            ds.describe(2)
        );
    }

    #[test]
    fn nothing_readable_is_an_error_even_when_skipping() {
        let dir = tempfile::tempdir().unwrap();
        let err = CifarDataset::open_dir(dir.path(), CifarKind::Cifar100Fine, false, OnError::Skip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.bin") && err.contains("no Cifar100Fine record"),
            "{err}"
        );
    }

    #[test]
    fn a_label_out_of_range_says_the_kind_may_be_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("test_batch.bin");
        // Two CIFAR-10 records read as one file: 6146 bytes is 2 × 3073, not a multiple of 3074.
        let mut bytes = record(&[12], 0, 0);
        bytes.extend(record(&[1], 0, 0));
        std::fs::write(&p, &bytes).unwrap();
        let err = CifarDataset::open(std::slice::from_ref(&p), CifarKind::Cifar10, OnError::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 12") && err.contains("record 0"),
            "{err}"
        );
        let err = CifarDataset::open(&[p], CifarKind::Cifar100Fine, OnError::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3074-byte"), "{err}");
    }
}
