//! Reading score files: a 1-D float32 or float64 `.npy` array, or text with one number per line.
//!
//! The format is told by content, not by name: a file that starts with the `.npy` magic (`\x93NUMPY`) is
//! read as `.npy` (what `np.save` writes), anything else as UTF-8 text. A file named `*.npy` without the
//! magic is an error rather than text, since it is most likely a truncated or foreign file. Text lines are
//! trimmed; blank lines and lines starting with `#` (`np.savetxt` headers) are skipped. Every error names
//! the file, and for text the 1-based line, so a user can go straight to the bad value.

use std::io::Cursor;
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt};

use crate::{Error, Result};

/// The first bytes of every `.npy` file (format spec, `numpy/lib/format.py`).
const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Reads the scores in `path` as f64. Fails, naming the file (and line), when it cannot be read, holds no
/// score, holds something that is not a number, a NaN or an infinity, or is an `.npy` array that is not
/// 1-D float32/float64.
pub fn read_scores(path: &Path) -> Result<Vec<f64>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let is_npy_name = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    let scores = if bytes.starts_with(NPY_MAGIC) {
        parse_npy(path, &bytes)?
    } else if is_npy_name {
        return Err(data_error(
            path,
            None,
            "not a .npy file (it does not start with the \\x93NUMPY magic); write it with np.save"
                .into(),
        ));
    } else {
        parse_text(path, &bytes)?
    };
    if scores.is_empty() {
        return Err(data_error(path, None, "no scores in the file".into()));
    }
    Ok(scores)
}

fn data_error(path: &Path, line: Option<usize>, msg: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg,
    }
}

/// Parses text with one number per line.
fn parse_text(path: &Path, bytes: &[u8]) -> Result<Vec<f64>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        data_error(
            path,
            None,
            format!(
                "neither a .npy file nor UTF-8 text (invalid byte at offset {}); expected one score per \
                 line or an np.save array",
                e.valid_up_to()
            ),
        )
    })?;
    let mut scores = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let field = line.trim();
        if field.is_empty() || field.starts_with('#') {
            continue;
        }
        let value: f64 = field.parse().map_err(|_| {
            data_error(
                path,
                Some(i + 1),
                format!("\"{field}\" is not a number; expected one score per line"),
            )
        })?;
        if !value.is_finite() {
            return Err(data_error(
                path,
                Some(i + 1),
                format!("{value} is not a valid score; scores must be finite numbers"),
            ));
        }
        scores.push(value);
    }
    Ok(scores)
}

/// Parses an `.npy` file holding a 1-D float64 or float32 array (either byte order).
fn parse_npy(path: &Path, bytes: &[u8]) -> Result<Vec<f64>> {
    let npy_error =
        |e: ReadNpyError| data_error(path, None, format!("cannot read the .npy array: {e}"));
    let array: ArrayD<f64> = match ArrayD::<f64>::read_npy(Cursor::new(bytes)) {
        Ok(a) => a,
        Err(ReadNpyError::WrongDescriptor(_)) => {
            match ArrayD::<f32>::read_npy(Cursor::new(bytes)) {
                Ok(a) => a.mapv(f64::from),
                Err(ReadNpyError::WrongDescriptor(descr)) => {
                    return Err(data_error(
                        path,
                        None,
                        format!(
                            "dtype {descr} is not supported; expected float32 or float64 \
                         (convert with .astype(np.float64))"
                        ),
                    ));
                }
                Err(e) => return Err(npy_error(e)),
            }
        }
        Err(e) => return Err(npy_error(e)),
    };
    if array.ndim() != 1 {
        return Err(data_error(
            path,
            None,
            format!(
                "expected a 1-D array of scores, found shape {:?}; flatten it first (np.ravel)",
                array.shape()
            ),
        ));
    }
    let scores = array.into_raw_vec_and_offset().0;
    if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(data_error(
            path,
            None,
            format!("element {i} is {s}; scores must be finite numbers"),
        ));
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};
    use ndarray_npy::WriteNpyExt;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn npy_bytes(write_fn: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut buf = Vec::new();
        write_fn(&mut buf);
        buf
    }

    #[test]
    fn text_with_blanks_comments_and_exponents() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "s.txt", b"# energy\n0.5\n\n  -1.25e1 \n3\r\n");
        assert_eq!(read_scores(&p).unwrap(), [0.5, -12.5, 3.0]);
    }

    #[test]
    fn text_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "s.txt", b"0.5\n0.25\nabc\n");
        let err = read_scores(&p).unwrap_err().to_string();
        assert!(
            err.ends_with("s.txt:3: \"abc\" is not a number; expected one score per line"),
            "{err}"
        );
        let p = write(dir.path(), "n.txt", b"0.5\nnan\n");
        let err = read_scores(&p).unwrap_err().to_string();
        assert!(
            err.ends_with("n.txt:2: NaN is not a valid score; scores must be finite numbers"),
            "{err}"
        );
        let p = write(dir.path(), "i.txt", b"-inf\n");
        assert!(
            read_scores(&p)
                .unwrap_err()
                .to_string()
                .contains("i.txt:1: -inf is not")
        );
        let p = write(dir.path(), "e.txt", b"\n# header only\n");
        let err = read_scores(&p).unwrap_err().to_string();
        assert!(err.ends_with("e.txt: no scores in the file"), "{err}");
        let p = write(dir.path(), "b.txt", b"0.5\n\xff\xfe\n");
        let err = read_scores(&p).unwrap_err().to_string();
        assert!(
            err.contains("b.txt: neither a .npy file nor UTF-8 text"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = read_scores(Path::new("/nonexistent/id.npy")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(
            err.to_string().starts_with("/nonexistent/id.npy: "),
            "{err}"
        );
    }

    #[test]
    fn npy_float64_and_float32() {
        let dir = tempfile::tempdir().unwrap();
        let f64s = npy_bytes(|b| Array1::from(vec![0.1f64, -2.0, 3.5]).write_npy(b).unwrap());
        // Named .bin on purpose: the magic decides, not the extension.
        let p = write(dir.path(), "a.bin", &f64s);
        assert_eq!(read_scores(&p).unwrap(), [0.1, -2.0, 3.5]);
        let f32s = npy_bytes(|b| Array1::from(vec![0.1f32, 2.0]).write_npy(b).unwrap());
        let p = write(dir.path(), "b.npy", &f32s);
        assert_eq!(read_scores(&p).unwrap(), [f64::from(0.1f32), 2.0]);
    }

    #[test]
    fn npy_errors_name_dtype_rank_and_element() {
        let dir = tempfile::tempdir().unwrap();
        let ints = npy_bytes(|b| Array1::from(vec![1i64, 2]).write_npy(b).unwrap());
        let err = read_scores(&write(dir.path(), "i.npy", &ints))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("i.npy: dtype '<i8' is not supported; expected float32 or float64"),
            "{err}"
        );
        let two_d = npy_bytes(|b| Array2::<f64>::zeros((2, 3)).write_npy(b).unwrap());
        let err = read_scores(&write(dir.path(), "m.npy", &two_d))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.npy: expected a 1-D array of scores, found shape [2, 3]"),
            "{err}"
        );
        let nan = npy_bytes(|b| Array1::from(vec![1.0f32, f32::NAN]).write_npy(b).unwrap());
        let err = read_scores(&write(dir.path(), "n.npy", &nan))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("n.npy: element 1 is NaN; scores must be finite numbers"),
            "{err}"
        );
        let empty = npy_bytes(|b| Array1::<f64>::zeros(0).write_npy(b).unwrap());
        let err = read_scores(&write(dir.path(), "z.npy", &empty))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("z.npy: no scores in the file"), "{err}");
        let err = read_scores(&write(dir.path(), "t.npy", b"0.5\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.npy: not a .npy file"), "{err}");
        let mut truncated = npy_bytes(|b| Array1::from(vec![1.0f64, 2.0]).write_npy(b).unwrap());
        truncated.truncate(truncated.len() - 3);
        let err = read_scores(&write(dir.path(), "c.npy", &truncated))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.npy: cannot read the .npy array"), "{err}");
    }
}
