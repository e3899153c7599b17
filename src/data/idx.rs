//! IDX files: MNIST and Fashion-MNIST (`train-images-idx3-ubyte[.gz]` + `train-labels-idx1-ubyte[.gz]`).
//!
//! Format (LeCun's MNIST page; data-sources.md §1): two zero bytes, a type byte (0x08 = uint8, the only type
//! image sets use), the number of dimensions, then each dimension as a big-endian u32, then the values
//! row-major. Images are `[N, H, W]`, labels `[N]`. Files may be gzipped or not; the content decides.
//!
//! An image file and its label file are one unit, so a defect in either (bad magic, truncation, counts that
//! disagree) is always an error: there is nothing sensible to skip.

use std::path::{Path, PathBuf};

use super::{Dataset, RawImage, index_error, read_maybe_gz};
use crate::{Error, Result};

/// Which half of an MNIST-style folder to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train-*` (60,000 images in MNIST and Fashion-MNIST).
    Train,
    /// `t10k-*` (10,000 images).
    Test,
}

/// An IDX image file and its labels, held in memory (Fashion-MNIST train is 47 MB).
#[derive(Debug, Clone)]
pub struct IdxDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    height: usize,
    width: usize,
    source: PathBuf,
}

/// A parsed IDX header: the dimensions and where the uint8 values start.
struct Header {
    dims: Vec<usize>,
    offset: usize,
}

fn parse_header(bytes: &[u8], path: &Path, want_dims: usize) -> Result<Header> {
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            "not an IDX file (the first two bytes must be zero)".into()
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX value type 0x{:02x}; only 0x08 (unsigned byte) image and label files are supported",
            bytes[2]
        )));
    }
    let ndims = bytes[3] as usize;
    if ndims != want_dims {
        return Err(bad(format!("{ndims} dimensions; expected {want_dims}")));
    }
    let offset = 4 + 4 * ndims;
    if bytes.len() < offset {
        return Err(bad("truncated IDX header".into()));
    }
    let dims: Vec<usize> = bytes[4..offset]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match count {
        Some(n) if bytes.len() - offset == n => Ok(Header { dims, offset }),
        Some(n) => Err(bad(format!(
            "header {dims:?} promises {n} values, the file holds {} (truncated or padded)",
            bytes.len() - offset
        ))),
        None => Err(bad(format!("header {dims:?} overflows"))),
    }
}

impl IdxDataset {
    /// Opens an image file `[N, H, W]` and its label file `[N]`.
    pub fn open(images: &Path, labels: &Path) -> Result<Self> {
        let img_bytes = read_maybe_gz(images)?;
        let lab_bytes = read_maybe_gz(labels)?;
        let ih = parse_header(&img_bytes, images, 3)?;
        let lh = parse_header(&lab_bytes, labels, 1)?;
        if ih.dims[0] != lh.dims[0] {
            return Err(Error::Data {
                path: labels.to_path_buf(),
                line: None,
                msg: format!(
                    "{} labels for {} images in {}",
                    lh.dims[0],
                    ih.dims[0],
                    images.display()
                ),
            });
        }
        Ok(Self {
            height: ih.dims[1],
            width: ih.dims[2],
            images: img_bytes[ih.offset..].to_vec(),
            labels: lab_bytes[lh.offset..].to_vec(),
            source: images.to_path_buf(),
        })
    }

    /// Opens `{train,t10k}-{images-idx3,labels-idx1}-ubyte` in `dir`, gzipped (`.gz`, as Debian's
    /// `dataset-fashion-mnist` ships them) or not.
    pub fn open_dir(dir: &Path, split: Split) -> Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let find = |stem: String| -> Result<PathBuf> {
            let plain = dir.join(&stem);
            let gz = dir.join(format!("{stem}.gz"));
            if gz.is_file() {
                Ok(gz)
            } else if plain.is_file() {
                Ok(plain)
            } else {
                Err(Error::io(
                    &gz,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("neither {stem} nor {stem}.gz exists in this folder"),
                    ),
                ))
            }
        };
        let images = find(format!("{prefix}-images-idx3-ubyte"))?;
        let labels = find(format!("{prefix}-labels-idx1-ubyte"))?;
        Self::open(&images, &labels)
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

impl Dataset for IdxDataset {
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
        let n = self.height * self.width;
        RawImage::new(
            self.width,
            self.height,
            1,
            self.images[index * n..(index + 1) * n].to_vec(),
        )
    }

    fn describe(&self, index: usize) -> String {
        format!("{} image {index}", self.source.display())
    }
}

/// Writes an IDX uint8 file (used by tests to make fixtures).
#[cfg(test)]
pub(crate) fn idx_bytes(dims: &[u32], values: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(values);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_pair(dir: &Path, gz: bool) -> (PathBuf, PathBuf) {
        let pixels: Vec<u8> = (0..3 * 2 * 4).map(|v| v as u8 * 10).collect();
        let img = idx_bytes(&[3, 2, 4], &pixels);
        let lab = idx_bytes(&[3], &[7, 0, 9]);
        let (ip, lp) = if gz {
            (
                dir.join("train-images-idx3-ubyte.gz"),
                dir.join("train-labels-idx1-ubyte.gz"),
            )
        } else {
            (
                dir.join("train-images-idx3-ubyte"),
                dir.join("train-labels-idx1-ubyte"),
            )
        };
        for (p, b) in [(&ip, img), (&lp, lab)] {
            if gz {
                let mut e = flate2::write::GzEncoder::new(
                    std::fs::File::create(p).unwrap(),
                    Default::default(),
                );
                e.write_all(&b).unwrap();
                e.finish().unwrap();
            } else {
                std::fs::write(p, b).unwrap();
            }
        }
        (ip, lp)
    }

    #[test]
    fn reads_plain_and_gzipped_pairs_alike() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_pair(dir.path(), gz);
            let ds = IdxDataset::open_dir(dir.path(), Split::Train).unwrap();
            assert_eq!((ds.len(), ds.height(), ds.width()), (3, 2, 4));
            assert_eq!([ds.label(0), ds.label(1), ds.label(2)], [7, 0, 9]);
            let img = ds.get(1).unwrap();
            assert_eq!((img.width(), img.height(), img.channels()), (4, 2, 1));
            let want: Vec<u8> = (8..16).map(|v| v as u8 * 10).collect();
            assert_eq!(img.data(), want.as_slice());
            assert!(ds.get(3).is_err());
        }
    }

    #[test]
    fn truncated_and_mismatched_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (ip, lp) = write_pair(dir.path(), false);
        let mut bytes = std::fs::read(&ip).unwrap();
        bytes.pop();
        std::fs::write(&ip, &bytes).unwrap();
        let err = IdxDataset::open(&ip, &lp).unwrap_err().to_string();
        assert!(
            err.contains("train-images-idx3-ubyte") && err.contains("truncated"),
            "{err}"
        );

        write_pair(dir.path(), false);
        std::fs::write(&lp, idx_bytes(&[2], &[1, 2])).unwrap();
        let err = IdxDataset::open(&ip, &lp).unwrap_err().to_string();
        assert!(err.contains("2 labels for 3 images"), "{err}");

        std::fs::write(&lp, b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd").unwrap();
        let err = IdxDataset::open(&ip, &lp).unwrap_err().to_string();
        assert!(err.contains("0x0d"), "{err}");
    }

    #[test]
    fn missing_files_name_what_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let err = IdxDataset::open_dir(dir.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(err.contains("t10k-images-idx3-ubyte"), "{err}");
    }
}
