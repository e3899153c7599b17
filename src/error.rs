//! The library's one error type.
//!
//! Every variant carries what a user needs to act: the file, key path, model or tensor at fault, what was
//! expected and what was found, and where there is one, the fix. The CLI prints it as `error: {err:#}`.

use std::path::PathBuf;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in dream-ood's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// A config file is malformed, or a value in it is invalid. `key` is the dotted key path
    /// (`sample.sigma`); `line` is 1-based when known.
    #[error("{}{}: {key}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Config {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        msg: String,
    },

    /// A data file (scores, arrays) could not be used: not a number on a line, NaN, the wrong dtype or
    /// rank. `line` is 1-based when the file is text.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },

    /// A value given on the command line or in code is invalid (no file involved).
    #[error("{key}: {msg}")]
    InvalidValue { key: String, msg: String },

    /// The ONNX Runtime shared library could not be loaded.
    #[error(
        "cannot load ONNX Runtime from {} ({reason}); run `tools/bootstrap` (or `make test`) to put it in \
         .deps/, or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.31 or newer",
        path.display()
    )]
    OrtLibrary { path: PathBuf, reason: String },

    /// An ONNX Runtime call failed; `what` says which model or step.
    #[error("ONNX Runtime: {what}: {cause}")]
    Ort { what: String, cause: ort::Error },

    /// An ONNX model is malformed, or lacks the structure an operation needs; `what` names the file or
    /// graph element.
    #[error("{what}: {msg}")]
    Onnx { what: String, msg: String },

    /// A libtorch call failed; `op` says which.
    #[error("libtorch: {op}: {cause}")]
    Torch { op: String, cause: tch::TchError },

    /// A tensor or array has the wrong shape.
    #[error("{what}: expected shape {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    /// A self-check (doctor's smoke runs) computed something other than the reference.
    #[error("{what}: {msg}")]
    Check { what: String, msg: String },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    /// Wraps an ONNX Runtime error with what was being done.
    pub fn ort(what: impl Into<String>, source: impl Into<ort::Error>) -> Self {
        Error::Ort {
            what: what.into(),
            cause: source.into(),
        }
    }

    /// Wraps a libtorch error with the operation that failed.
    pub fn torch(op: impl Into<String>, source: tch::TchError) -> Self {
        Error::Torch {
            op: op.into(),
            cause: source,
        }
    }
}
