//! SVHN as distributed: `train_32x32.mat`, `test_32x32.mat`, `extra_32x32.mat`
//! (<http://ufldl.stanford.edu/housenumbers/>, "Format 2: cropped digits"), an OOD test set of the paper's
//! CIFAR-100 benchmark (SPEC §5.3: "SVHN test split, native 32×32").
//!
//! Each file is a MATLAB level-5 MAT-file (read by the crate's `data::mat5`) with two variables:
//! `X`, uint8 `[32, 32, 3, N]`, column-major, so element `(h, w, c, n)` is at `h + H (w + W (c + 3 n))`;
//! and `y`, `[N, 1]` labels 1..10 where 10 stands for the digit 0. Other sizes `[H, W, 3, N]` are read the
//! same way. A config's `path` is a file (`extra_32x32.mat` is read this way) or a folder in which `split`
//! picks [`TRAIN_FILE`] or [`TEST_FILE`]. Images come out as HWC RGB
//! [`RawImage`]s and labels as digits: 10 becomes 0, which is what `torchvision.datasets.SVHN` does
//! (`np.place(labels, labels == 10, 0)`), so label `d` is the digit `d`. A label 0 is taken as the digit 0
//! too (torchvision keeps it), anything else outside 0..=10 is an error.
//!
//! The file is one unit (images and labels), so any defect is an error naming it; there is nothing to skip.
//! `X` stays in memory as stored (80 MB for the test split) and is reordered to HWC one image at a time.

use std::path::{Path, PathBuf};

use super::mat5::{self, Variable};
use super::{Dataset, RawImage, index_error};
use crate::{Error, Result};

/// The split files of the SVHN distribution that a folder `path` picks between.
pub const TRAIN_FILE: &str = "train_32x32.mat";
/// See [`TRAIN_FILE`].
pub const TEST_FILE: &str = "test_32x32.mat";

/// An SVHN `.mat` file in memory.
#[derive(Debug, Clone)]
pub struct SvhnMat {
    /// `X` as stored: column-major `[H, W, 3, N]`, so image `n` is the contiguous block `n·H·W·3..`.
    pixels: Vec<u8>,
    labels: Vec<u8>,
    height: usize,
    width: usize,
    source: PathBuf,
}

impl SvhnMat {
    /// Opens an SVHN `.mat` file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Data {
            path: path.to_path_buf(),
            line: None,
            msg,
        };
        let mut vars = mat5::read_variables(path, &["X", "y"])?;
        let names: Vec<String> = vars.iter().map(|v| v.name.clone()).collect();
        let mut take = |name: &str| match vars.iter().position(|v| v.name == name) {
            Some(i) => Ok(vars.swap_remove(i)),
            None => Err(bad(format!(
                "no variable `{name}` (the file has: {}); an SVHN file holds `X` (uint8 \
                 [32, 32, 3, N]) and `y` (labels, [N, 1])",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))),
        };
        let x = take("X")?;
        let y = take("y")?;

        let shape = |v: &Variable| format!("{} {:?}", v.class_name(), v.dims);
        let (height, width, n) = match x.dims[..] {
            [h, w, 3, n] if x.class == mat5::MX_UINT8 && !x.complex => (h, w, n),
            _ => {
                return Err(bad(format!(
                    "`X` is {}{}; expected uint8 [H, W, 3, N] (SVHN's is [32, 32, 3, N])",
                    if x.complex { "complex " } else { "" },
                    shape(&x)
                )));
            }
        };
        let pixels = stored(x)
            .map_err(|m| bad(format!("`X`: {m}")))?
            .into_u8()
            .map_err(|m| bad(format!("`X`: {m}")))?;

        if !y.is_numeric() || y.complex || y.numel() != Some(n) {
            return Err(bad(format!(
                "`y` is {}{}; expected {n} real labels, one per image of `X`",
                if y.complex { "complex " } else { "" },
                shape(&y)
            )));
        }
        let labels = stored(y)
            .map_err(|m| bad(format!("`y`: {m}")))?
            .to_f64()
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                10.0 => Ok(0),
                _ if v.fract() == 0.0 && (0.0..10.0).contains(&v) => Ok(v as u8),
                _ => Err(bad(format!(
                    "`y` entry {i} is {v}; SVHN labels are 1..10 (10 is the digit 0)"
                ))),
            })
            .collect::<Result<Vec<u8>>>()?;
        Ok(Self {
            pixels,
            labels,
            height,
            width,
            source: path.to_path_buf(),
        })
    }

    /// Opens `path` when it is a file, else the split's file in the folder `path` ([`TRAIN_FILE`] or
    /// [`TEST_FILE`]).
    pub fn open_split(path: &Path, train: bool) -> Result<Self> {
        if path.is_dir() {
            Self::open(&path.join(if train { TRAIN_FILE } else { TEST_FILE }))
        } else {
            Self::open(path)
        }
    }

    /// Image height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Image width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }
}

/// The real part of `v`, with exactly as many elements as its dimensions promise.
fn stored(v: Variable) -> std::result::Result<mat5::Numeric, String> {
    let numel = v.numel();
    let real = v.real.ok_or("no real part was read")?;
    match numel {
        Some(n) if real.len() == n => Ok(real),
        _ => Err(format!(
            "dimensions {:?} promise {} elements, the file stores {}",
            v.dims,
            numel.map_or("too many".into(), |n| n.to_string()),
            real.len()
        )),
    }
}

impl Dataset for SvhnMat {
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
        let (h, w) = (self.height, self.width);
        let block = &self.pixels[index * h * w * 3..(index + 1) * h * w * 3];
        // Column-major (h, w, c) → HWC: out[(row·W + col)·3 + c] = block[row + H·(col + W·c)].
        let mut hwc = Vec::with_capacity(h * w * 3);
        for row in 0..h {
            for col in 0..w {
                for c in 0..3 {
                    hwc.push(block[row + h * (col + w * c)]);
                }
            }
        }
        RawImage::new(w, h, 3, hwc)
    }

    fn describe(&self, index: usize) -> String {
        format!("{} image {index}", self.source.display())
    }
}

#[cfg(test)]
mod tests {
    use super::super::mat5::tests::{file, matrix};
    use super::*;

    /// `tests/fixtures/svhn/`, written by `tools/make_svhn_fixture.py` with `scipy.io.savemat`: 5 images
    /// of 5×7, labels [10, 1, 5, 10, 9]; `no_x.mat` holds only `y`.
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/svhn")
            .join(name)
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn open_err(dir: &Path, bytes: &[u8]) -> String {
        SvhnMat::open(&write(dir, "bad.mat", bytes))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_file_without_x_names_what_it_has() {
        let err = SvhnMat::open(&fixture("no_x.mat")).unwrap_err().to_string();
        assert!(
            err.contains("no_x.mat") && err.contains("no variable `X` (the file has: y)"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_not_mat_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_err(dir.path(), &std::fs::read(fixture("images.npy")).unwrap());
        assert!(
            err.contains("bad.mat") && err.contains("not a MATLAB level-5 MAT-file"),
            "{err}"
        );
    }

    #[test]
    fn truncated_files_are_errors_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["plain.mat", "compressed.mat"] {
            let whole = std::fs::read(fixture(name)).unwrap();
            let err = open_err(dir.path(), &whole[..whole.len() / 2]);
            assert!(
                err.contains("bad.mat") && err.contains("truncated"),
                "{name}: {err}"
            );
            for cut in 0..whole.len() {
                assert!(
                    SvhnMat::open(&write(dir.path(), "cut.mat", &whole[..cut])).is_err(),
                    "{name} cut to {cut} bytes opened"
                );
            }
        }
    }

    #[test]
    fn corrupt_bytes_never_panic_and_compressed_data_is_checksummed() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["plain.mat", "compressed.mat"] {
            let whole = std::fs::read(fixture(name)).unwrap();
            for i in 0..whole.len() {
                let mut bytes = whole.clone();
                bytes[i] ^= 0xff;
                // Any outcome but a panic; a flipped pixel of an uncompressed file cannot be noticed.
                let _ = SvhnMat::open(&write(dir.path(), "flip.mat", &bytes));
            }
        }
        // Byte 400 of compressed.mat lies in the zlib stream of `X` (stored blocks: the pixels are noise).
        let mut bytes = std::fs::read(fixture("compressed.mat")).unwrap();
        bytes[400] ^= 1;
        let err = open_err(dir.path(), &bytes);
        assert!(err.contains("cannot be read"), "{err}");
    }

    #[test]
    fn shapes_and_labels_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let x = |dims: &[i32], class| matrix(class, dims, "X", (2, &[9u8; 6]), false);
        let y = |v: &[f64]| {
            let b: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            matrix(6, &[v.len() as i32, 1], "y", (9, &b), false)
        };
        // Two 1×1 RGB images, labels 10 and 3, y first: the order of variables does not matter.
        let good = file(false, &[y(&[10.0, 3.0]), x(&[1, 1, 3, 2], 9)]);
        let ds = SvhnMat::open(&write(dir.path(), "ok.mat", &good)).unwrap();
        assert_eq!((ds.len(), ds.label(0), ds.label(1)), (2, 0, 3));

        let err = open_err(dir.path(), &file(false, &[x(&[2, 1, 3, 1], 6), y(&[1.0])]));
        assert!(
            err.contains("`X` is double [2, 1, 3, 1]; expected uint8"),
            "{err}"
        );
        let err = open_err(dir.path(), &file(false, &[x(&[3, 2], 9), y(&[1.0])]));
        assert!(err.contains("`X` is uint8 [3, 2]"), "{err}");
        let err = open_err(dir.path(), &file(false, &[x(&[1, 1, 3, 2], 9), y(&[1.0])]));
        assert!(err.contains("expected 2 real labels"), "{err}");
        let err = open_err(
            dir.path(),
            &file(false, &[x(&[1, 1, 3, 2], 9), y(&[1.0, 11.0])]),
        );
        assert!(err.contains("`y` entry 1 is 11"), "{err}");
        let err = open_err(
            dir.path(),
            &file(false, &[x(&[1, 1, 3, 2], 9), y(&[1.5, 1.0])]),
        );
        assert!(err.contains("`y` entry 0 is 1.5"), "{err}");
        // Dimensions that promise more pixels than are stored.
        let err = open_err(
            dir.path(),
            &file(false, &[x(&[2, 1, 3, 2], 9), y(&[1.0, 2.0])]),
        );
        assert!(
            err.contains("promise 12 elements, the file stores 6"),
            "{err}"
        );
    }

    #[test]
    fn a_folder_picks_the_split_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("compressed.mat"), dir.path().join(TEST_FILE)).unwrap();
        let ds = SvhnMat::open_split(dir.path(), false).unwrap();
        assert_eq!((ds.len(), ds.height(), ds.width()), (5, 5, 7));
        assert!(ds.describe(4).ends_with("test_32x32.mat image 4"));
        let err = SvhnMat::open_split(dir.path(), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains(TRAIN_FILE), "{err}");
        assert!(ds.get(5).is_err());
    }
}
