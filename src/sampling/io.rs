//! Stage 2's files: the feature bank and token embeddings it reads, the `.npy` it streams out, and atomic
//! writes.
//!
//! * Bank: `[C, N, D]` float32 (or float64) `.npy`, what stage 1 and the official `pretrain_*.py` write.
//!   `BANK.json` beside `BANK.npy`, when present, holds `{"counts": [N_0, …]}`: rows at or past a class's
//!   count are padding. Without it, all-zero rows are taken as padding (SPEC §7 item 9), with a warning.
//! * Tokens: `[C, D]` float32 (or float64) `.npy`, like the official `token_embed_c100.npy`.
//! * Output: `[C, M, D]` float32 little-endian `.npy` (format 1.0, C order), written class by class into a
//!   temporary file beside the target and renamed at the end, so a reader never sees half a file and memory
//!   holds one class at a time (the CIFAR-100 output is 2.9 GiB).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, ArrayD, Ix2, Ix3};
use ndarray_npy::{ReadNpyError, ReadNpyExt};

use crate::files::temp_path;
use crate::{Error, Result};

fn data_error(path: &Path, msg: String) -> Error {
    Error::Data {
        path: path.to_owned(),
        line: None,
        msg,
    }
}

/// Reads a float32 or float64 `.npy` as f32, checking its rank; `what` says what the file should hold.
fn read_f32(path: &Path, ndim: usize, what: &str) -> Result<ArrayD<f32>> {
    let open = || {
        File::open(path)
            .map(BufReader::new)
            .map_err(|e| Error::io(path, e))
    };
    let fail =
        |e: ReadNpyError| data_error(path, format!("cannot read the .npy array ({what}): {e}"));
    let array = match ArrayD::<f32>::read_npy(open()?) {
        Ok(a) => a,
        Err(ReadNpyError::WrongDescriptor(_)) => match ArrayD::<f64>::read_npy(open()?) {
            Ok(a) => a.mapv(|v| v as f32),
            Err(ReadNpyError::WrongDescriptor(descr)) => {
                return Err(data_error(
                    path,
                    format!("dtype {descr} is not supported; expected float32 ({what})"),
                ));
            }
            Err(e) => return Err(fail(e)),
        },
        Err(e) => return Err(fail(e)),
    };
    if array.ndim() != ndim {
        return Err(data_error(
            path,
            format!(
                "expected a {ndim}-D array ({what}), got shape {:?}",
                array.shape()
            ),
        ));
    }
    if let Some(i) = array.iter().position(|v| !v.is_finite()) {
        return Err(data_error(
            path,
            format!("holds a non-finite value at flat index {i}; {what} must be finite"),
        ));
    }
    Ok(array)
}

/// Where the per-class row counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CountsSource {
    /// The bank's JSON sidecar.
    Sidecar,
    /// Every row that is not all zeros (no sidecar).
    NonzeroRows,
}

/// A feature bank with the rows of each class that hold data.
#[derive(Debug)]
pub struct Bank {
    /// `[C, N, D]`, padding included.
    pub data: Array3<f32>,
    /// Per class, the indices of the rows that hold data (in order).
    pub rows: Vec<Vec<usize>>,
    pub counts_source: CountsSource,
}

/// The sidecar path of a bank: `BANK.npy` → `BANK.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Reads the feature bank and works out each class's data rows (see the module doc).
pub fn read_bank(path: &Path) -> Result<Bank> {
    let data = read_f32(path, 3, "the feature bank [C, N, D]")?
        .into_dimensionality::<Ix3>()
        .expect("invariant: rank checked");
    let (c, n, _) = data.dim();
    let sidecar = sidecar_path(path);
    let (rows, counts_source) = match std::fs::read(&sidecar) {
        Ok(bytes) => {
            #[derive(serde::Deserialize)]
            struct Counts {
                counts: Vec<usize>,
            }
            let counts: Counts = serde_json::from_slice(&bytes).map_err(|e| {
                data_error(
                    &sidecar,
                    format!("expected {{\"counts\": [N_0, …]}} with one count per class: {e}"),
                )
            })?;
            if counts.counts.len() != c {
                return Err(data_error(
                    &sidecar,
                    format!(
                        "has {} counts but the bank {} has {c} classes",
                        counts.counts.len(),
                        path.display()
                    ),
                ));
            }
            if let Some((i, &bad)) = counts.counts.iter().enumerate().find(|&(_, &k)| k > n) {
                return Err(data_error(
                    &sidecar,
                    format!("class {i} count {bad} exceeds the bank's {n} rows per class"),
                ));
            }
            let rows = counts.counts.iter().map(|&k| (0..k).collect()).collect();
            (rows, CountsSource::Sidecar)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rows: Vec<Vec<usize>> = data
                .outer_iter()
                .map(|class| {
                    class
                        .outer_iter()
                        .enumerate()
                        .filter(|(_, row)| row.iter().any(|&v| v != 0.0))
                        .map(|(i, _)| i)
                        .collect()
                })
                .collect();
            let padded: usize = rows.iter().map(|r| n - r.len()).sum();
            if padded > 0 {
                tracing::warn!(
                    bank = %path.display(),
                    "no {} sidecar: treating {padded} all-zero rows as padding",
                    sidecar.display()
                );
            }
            (rows, CountsSource::NonzeroRows)
        }
        Err(e) => return Err(Error::io(&sidecar, e)),
    };
    Ok(Bank {
        data,
        rows,
        counts_source,
    })
}

/// Reads the class token embeddings `[C, D]`.
pub fn read_tokens(path: &Path) -> Result<Array2<f32>> {
    Ok(read_f32(path, 2, "the class token embeddings [C, D]")?
        .into_dimensionality::<Ix2>()
        .expect("invariant: rank checked"))
}

/// The header of a format-1.0 `.npy` file holding little-endian float32 in C order, padded so the data
/// starts on a 64-byte boundary (`numpy/lib/format.py`).
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + header length (2) + dict + newline, a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Streams a float32 `.npy` of a known shape into a temporary file; [`NpyWriter::finish`] renames it
/// into place once every value is written. Dropped unfinished, it removes the temporary file.
pub struct NpyWriter {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    expected: usize,
    written: usize,
}

impl NpyWriter {
    /// Creates the temporary file and writes the header for `shape`.
    pub fn create(target: &Path, shape: &[usize]) -> Result<Self> {
        let tmp = temp_path(target);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut writer = NpyWriter {
            target: target.to_owned(),
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            expected: shape.iter().product(),
            written: 0,
        };
        writer.write_bytes(&npy_header(shape))?;
        Ok(writer)
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("invariant: not finished");
        file.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Appends values in C order.
    pub fn write(&mut self, values: &[f32]) -> Result<()> {
        self.written += values.len();
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.write_bytes(&bytes)
    }

    /// Checks the value count, flushes and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(Error::Check {
                what: format!("writing {}", self.target.display()),
                msg: format!(
                    "wrote {} values, the shape needs {}",
                    self.written, self.expected
                ),
            });
        }
        let file = self.file.take().expect("invariant: not finished");
        let file = file
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))
    }
}

impl Drop for NpyWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray_npy::WriteNpyExt;

    #[test]
    fn streamed_npy_reads_back_with_ndarray_npy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.npy");
        let values: Vec<f32> = (0..2 * 3 * 5).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut w = NpyWriter::create(&path, &[2, 3, 5]).unwrap();
        w.write(&values[..15]).unwrap();
        w.write(&values[15..]).unwrap();
        assert!(!path.exists(), "visible before finish");
        w.finish().unwrap();
        let back = Array3::<f32>::read_npy(File::open(&path).unwrap()).unwrap();
        assert_eq!(back.dim(), (2, 3, 5));
        assert_eq!(back.iter().copied().collect::<Vec<_>>(), values);
        // The data starts on a 64-byte boundary.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!((bytes.len() - 30 * 4) % 64, 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary file left"
        );
    }

    #[test]
    fn short_write_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.npy");
        let mut w = NpyWriter::create(&path, &[4]).unwrap();
        w.write(&[1.0, 2.0]).unwrap();
        let msg = w.finish().unwrap_err().to_string();
        assert!(msg.contains("wrote 2 values, the shape needs 4"), "{msg}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bank_padding_from_sidecar_or_zero_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bank.npy");
        let mut bank = Array3::<f32>::ones((2, 4, 3));
        bank[[1, 1, 0]] = 0.0; // a zero entry but not a zero row
        bank.slice_mut(ndarray::s![1, 2.., ..]).fill(0.0);
        bank.write_npy(File::create(&path).unwrap()).unwrap();
        let b = read_bank(&path).unwrap();
        assert_eq!(b.counts_source, CountsSource::NonzeroRows);
        assert_eq!(b.rows, vec![vec![0, 1, 2, 3], vec![0, 1]]);
        std::fs::write(
            dir.path().join("bank.json"),
            r#"{"counts": [3, 2], "extra": 1}"#,
        )
        .unwrap();
        let b = read_bank(&path).unwrap();
        assert_eq!(b.counts_source, CountsSource::Sidecar);
        assert_eq!(b.rows, vec![vec![0, 1, 2], vec![0, 1]]);
        std::fs::write(dir.path().join("bank.json"), r#"{"counts": [3, 5]}"#).unwrap();
        let msg = read_bank(&path).unwrap_err().to_string();
        assert!(
            msg.contains("bank.json: class 1 count 5 exceeds the bank's 4 rows"),
            "{msg}"
        );
        std::fs::write(dir.path().join("bank.json"), r#"{"counts": [3]}"#).unwrap();
        let msg = read_bank(&path).unwrap_err().to_string();
        assert!(msg.contains("has 1 counts but the bank"), "{msg}");
    }

    #[test]
    fn wrong_rank_dtype_and_nan_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.npy");
        Array2::<f32>::ones((2, 3))
            .write_npy(File::create(&path).unwrap())
            .unwrap();
        let msg = read_bank(&path).unwrap_err().to_string();
        assert!(
            msg.contains(
                "t.npy: expected a 3-D array (the feature bank [C, N, D]), got shape [2, 3]"
            ),
            "{msg}"
        );
        Array2::<i32>::ones((2, 3))
            .write_npy(File::create(&path).unwrap())
            .unwrap();
        let msg = read_tokens(&path).unwrap_err().to_string();
        assert!(msg.contains("not supported; expected float32"), "{msg}");
        let mut t = Array2::<f64>::ones((2, 3));
        assert_eq!(read_tokens_after_write(&path, &t).dim(), (2, 3));
        t[[1, 2]] = f64::NAN;
        t.write_npy(File::create(&path).unwrap()).unwrap();
        let msg = read_tokens(&path).unwrap_err().to_string();
        assert!(msg.contains("non-finite value at flat index 5"), "{msg}");
    }

    fn read_tokens_after_write(path: &Path, t: &Array2<f64>) -> Array2<f32> {
        t.write_npy(File::create(path).unwrap()).unwrap();
        read_tokens(path).unwrap()
    }
}
