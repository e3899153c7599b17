//! The production scorer: one ONNX Runtime session on an exported detector, the preprocessing its
//! metadata prescribes, and batched scoring. `score`, `serve` and the export's calibration all go through
//! here, so calibration sees exactly what production sees.
//!
//! Preprocessing is the checkpoint's evaluation transform carried in the model (`eval_transform`),
//! applied with `src/data/`, the code training's evaluation uses: decode (PNG, JPEG, WebP, by content) →
//! channel conversion as PIL's `convert` → Resize/CenterCrop with torchvision semantics → either
//! `ToTensor` + `Normalize` (float input) or the uint8 pixels as they are (the graph normalises).
//!
//! Images of different sizes after the transform (CIFAR's ToTensor-only transform keeps each image's own
//! size) cannot share a tensor: a batch is split into one session run per size, results in input order.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType};
use rand::SeedableRng;
use serde::Serialize;

use super::metadata::{DetectorMetadata, InputKind};
use crate::data::{Pipeline, RawImage};
use crate::diffusion::session::{
    SessionOptions, input_spec, open_session, open_session_from_memory, require_output,
};
use crate::error::{Error, Result};

/// An image ready for the graph: after the evaluation transform, in the graph input's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub height: usize,
    pub width: usize,
    pub data: PreparedData,
}

/// Pixels of a [`Prepared`] image.
#[derive(Debug, Clone, PartialEq)]
pub enum PreparedData {
    /// `[C, H, W]` normalised floats (input `input`).
    F32(Vec<f32>),
    /// `[H, W, C]` bytes (input `image`).
    U8(Vec<u8>),
}

/// Why an image could not be prepared. `serve` answers 400 or 413 by kind; `score` prints the message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageError {
    /// Not a PNG, JPEG or WebP stream (by content).
    #[error("not a PNG, JPEG or WebP image")]
    NotAnImage,
    /// Larger than the pixel limit, found from the header before decoding.
    #[error("image is {width}×{height} = {pixels} pixels; the limit is {max} pixels")]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        max: u64,
    },
    /// The stream is truncated or corrupt.
    #[error("cannot decode image: {0}")]
    Corrupt(String),
    /// The evaluation transform failed on it.
    #[error("preprocessing failed: {0}")]
    Transform(String),
}

/// Decodes and transforms images as the detector's metadata says. Cheap to clone; `Send + Sync`, so it
/// runs on rayon's pool or tokio's blocking threads while the session runs elsewhere.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pipeline: Pipeline,
    input: InputKind,
    max_pixels: u64,
}

/// Default pixel limit: 100 megapixels, ten times a 12 MP photo; decoding one needs ~300 MB.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

impl Preprocessor {
    pub fn new(meta: &DetectorMetadata) -> Self {
        Preprocessor {
            pipeline: meta.eval_transform.clone(),
            input: meta.input,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// Refuses images with more than `max` pixels, judged from the header before anything is decoded, so
    /// a small file that claims 50000×50000 (a decompression bomb) costs nothing.
    pub fn with_max_pixels(mut self, max: u64) -> Self {
        self.max_pixels = max;
        self
    }

    /// Decodes an encoded image (format by content), checking its dimensions first.
    pub fn decode(&self, bytes: &[u8]) -> std::result::Result<RawImage, ImageError> {
        let reader = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Corrupt(e.to_string()))?;
        // The decoders built in; other formats the content sniffing knows (GIF, BMP, …) are refused too.
        use image::ImageFormat::{Jpeg, Png, WebP};
        if !matches!(reader.format(), Some(Png | Jpeg | WebP)) {
            return Err(ImageError::NotAnImage);
        }
        let (width, height) = reader
            .into_dimensions()
            .map_err(|e| ImageError::Corrupt(e.to_string()))?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(ImageError::TooLarge {
                width,
                height,
                pixels,
                max: self.max_pixels,
            });
        }
        let mut reader = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Corrupt(e.to_string()))?;
        // A second guard inside the decoder, in case a format reports one size and decodes another.
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(width);
        limits.max_image_height = Some(height);
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8).max(1 << 20));
        reader.limits(limits);
        let img = reader
            .decode()
            .map_err(|e| ImageError::Corrupt(e.to_string()))?;
        Ok(RawImage::from_dynamic(img))
    }

    /// Runs the evaluation transform on a decoded image.
    pub fn prepare(&self, img: RawImage) -> std::result::Result<Prepared, ImageError> {
        let fail = |e: Error| ImageError::Transform(e.to_string());
        // The transform is checked deterministic when the model is loaded; this generator is never drawn
        // from and only satisfies the signature.
        let mut no_draws = rand::rngs::ChaCha8Rng::seed_from_u64(0);
        match self.input {
            InputKind::Float => {
                let chw = self.pipeline.apply(img, &mut no_draws).map_err(fail)?;
                Ok(Prepared {
                    height: chw.height,
                    width: chw.width,
                    data: PreparedData::F32(chw.data),
                })
            }
            InputKind::Uint8 => {
                let mut img = img.to_channels(self.pipeline.channels).map_err(fail)?;
                for t in &self.pipeline.transforms {
                    img =
                        crate::data::transforms::apply_one(t, img, &mut no_draws).map_err(fail)?;
                }
                Ok(Prepared {
                    height: img.height(),
                    width: img.width(),
                    data: PreparedData::U8(img.into_data()),
                })
            }
        }
    }

    /// Decodes and prepares encoded bytes.
    pub fn prepare_bytes(&self, bytes: &[u8]) -> std::result::Result<Prepared, ImageError> {
        self.prepare(self.decode(bytes)?)
    }

    /// Reads, decodes and prepares a file; errors name the file.
    pub fn prepare_file(&self, path: &Path) -> Result<Prepared> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.prepare_bytes(&bytes).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: None,
            msg: e.to_string(),
        })
    }
}

/// One image's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    /// The predicted class's name.
    pub class: String,
    /// `argmax(logits)`.
    pub class_index: usize,
    /// Softmax probability of the predicted class.
    pub confidence: f32,
    /// The OOD score (a confidence: higher = more in-distribution).
    pub score: f32,
    /// `score < threshold`, from the graph; `None` when the model was exported without a threshold.
    pub is_ood: Option<bool>,
    /// The threshold that applied (per-class: the predicted class's).
    pub threshold: Option<f32>,
    /// `score − threshold`: negative means OOD; its size says how clear the decision was.
    pub margin: Option<f32>,
}

/// An exported detector on one ONNX Runtime session.
pub struct Detector {
    session: Session,
    meta: DetectorMetadata,
    what: String,
    has_is_ood: bool,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl Detector {
    /// Opens a detector file, checking its metadata and graph interface.
    pub fn open(path: &Path, opts: &SessionOptions) -> Result<Self> {
        let what = path.display().to_string();
        Self::from_session(open_session(path, opts)?, what)
    }

    /// Opens a detector held in memory (the export's calibration pass).
    pub fn from_bytes(bytes: &[u8], what: &str, opts: &SessionOptions) -> Result<Self> {
        Self::from_session(
            open_session_from_memory(bytes, what, opts)?,
            what.to_owned(),
        )
    }

    fn from_session(session: Session, what: String) -> Result<Self> {
        let props = {
            let meta = session
                .metadata()
                .map_err(|e| Error::ort(format!("{what}: reading metadata"), e))?;
            let keys = meta
                .custom_keys()
                .map_err(|e| Error::ort(format!("{what}: reading metadata keys"), e))?;
            keys.into_iter()
                .filter_map(|k| meta.custom(&k).map(|v| (k, v)))
                .collect::<HashMap<_, _>>()
        };
        let meta = DetectorMetadata::from_props(&props, &what)?;
        let spec = input_spec(&session, &what, meta.input.name())?;
        let want = match meta.input {
            InputKind::Float => TensorElementType::Float32,
            InputKind::Uint8 => TensorElementType::Uint8,
        };
        if spec.elem != want || spec.rank != 4 {
            return Err(Error::Onnx {
                what,
                msg: format!(
                    "input `{}` is {:?} of rank {}; its metadata says {want:?} of rank 4",
                    meta.input.name(),
                    spec.elem,
                    spec.rank
                ),
            });
        }
        require_output(&session, &what, "logits")?;
        require_output(&session, &what, "score")?;
        let has_is_ood = session.outputs().iter().any(|o| o.name() == "is_ood");
        if has_is_ood != meta.calibration.is_some() {
            return Err(Error::Onnx {
                what,
                msg: format!(
                    "the graph {} an `is_ood` output but its metadata {} a threshold",
                    if has_is_ood { "has" } else { "lacks" },
                    if meta.calibration.is_some() {
                        "has"
                    } else {
                        "lacks"
                    }
                ),
            });
        }
        Ok(Detector {
            session,
            meta,
            what,
            has_is_ood,
        })
    }

    /// What the model carries.
    pub fn metadata(&self) -> &DetectorMetadata {
        &self.meta
    }

    /// The preprocessing this model needs.
    pub fn preprocessor(&self) -> Preprocessor {
        Preprocessor::new(&self.meta)
    }

    /// Scores prepared images, one session run per distinct image size; results in input order.
    pub fn score(&mut self, images: &[&Prepared]) -> Result<Vec<Scored>> {
        let mut out: Vec<Option<Scored>> = vec![None; images.len()];
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (i, img) in images.iter().enumerate() {
            let key = (img.height, img.width);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        for (_, idx) in groups {
            let group: Vec<&Prepared> = idx.iter().map(|&i| images[i]).collect();
            for (i, s) in idx.into_iter().zip(self.run(&group)?) {
                out[i] = Some(s);
            }
        }
        Ok(out
            .into_iter()
            .map(|s| s.expect("invariant: every image is in one group"))
            .collect())
    }

    /// One session run on images of one size.
    fn run(&mut self, images: &[&Prepared]) -> Result<Vec<Scored>> {
        let n = images.len();
        let (h, w) = (images[0].height, images[0].width);
        let c = self.meta.network.in_channels as usize;
        let what = format!("{}: scoring a batch of {n} {h}×{w} images", self.what);
        let input: SessionInputValue = match self.meta.input {
            InputKind::Float => {
                let mut data = Vec::with_capacity(n * c * h * w);
                for img in images {
                    match &img.data {
                        PreparedData::F32(v) if v.len() == c * h * w => data.extend_from_slice(v),
                        _ => return Err(self.layout_error(img)),
                    }
                }
                Tensor::from_array((vec![n, c, h, w], data))
                    .map_err(|e| Error::ort(what.clone(), e))?
                    .into()
            }
            InputKind::Uint8 => {
                let mut data = Vec::with_capacity(n * c * h * w);
                for img in images {
                    match &img.data {
                        PreparedData::U8(v) if v.len() == c * h * w => data.extend_from_slice(v),
                        _ => return Err(self.layout_error(img)),
                    }
                }
                Tensor::from_array((vec![n, h, w, c], data))
                    .map_err(|e| Error::ort(what.clone(), e))?
                    .into()
            }
        };
        let name = self.meta.input.name().to_owned();
        let outputs = self
            .session
            .run(vec![(name, input)])
            .map_err(|e| Error::ort(what.clone(), e))?;
        let logits = outputs["logits"]
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::ort(format!("{what}: output `logits`"), e))?
            .1;
        let score = outputs["score"]
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::ort(format!("{what}: output `score`"), e))?
            .1;
        let is_ood = if self.has_is_ood {
            Some(
                outputs["is_ood"]
                    .try_extract_tensor::<bool>()
                    .map_err(|e| Error::ort(format!("{what}: output `is_ood`"), e))?
                    .1
                    .to_vec(),
            )
        } else {
            None
        };
        let classes = self.meta.classes.len();
        if logits.len() != n * classes || score.len() != n {
            return Err(Error::Shape {
                what,
                expected: format!("logits [{n}, {classes}] and score [{n}]"),
                got: format!("{} logits and {} scores", logits.len(), score.len()),
            });
        }
        Ok((0..n)
            .map(|i| {
                let row = &logits[i * classes..(i + 1) * classes];
                let (class_index, confidence) = argmax_softmax(row);
                let threshold = self.meta.threshold_for(class_index);
                Scored {
                    class: self.meta.classes[class_index].clone(),
                    class_index,
                    confidence,
                    score: score[i],
                    is_ood: is_ood.as_ref().map(|v| v[i]),
                    threshold,
                    margin: threshold.map(|t| score[i] - t),
                }
            })
            .collect())
    }

    fn layout_error(&self, img: &Prepared) -> Error {
        Error::Shape {
            what: format!("{}: prepared image", self.what),
            expected: format!(
                "{} data for {} channels",
                self.meta.input.name(),
                self.meta.network.in_channels
            ),
            got: format!("{}×{} {:?}", img.height, img.width, kind(&img.data)),
        }
    }
}

fn kind(d: &PreparedData) -> &'static str {
    match d {
        PreparedData::F32(_) => "float32",
        PreparedData::U8(_) => "uint8",
    }
}

/// The predicted class (first maximum, as `torch.argmax`) and its softmax probability, in f64.
pub fn argmax_softmax(logits: &[f32]) -> (usize, f32) {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    let max = f64::from(logits[best]);
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    (best, (1.0 / sum) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_softmax_is_the_first_maximum_and_its_probability() {
        let (i, p) = argmax_softmax(&[1.0, 3.0, 3.0, -2.0]);
        assert_eq!(i, 1);
        let want = 3f64.exp() / (1f64.exp() + 2.0 * 3f64.exp() + (-2f64).exp());
        assert!((f64::from(p) - want).abs() < 1e-7, "{p} vs {want}");
        // Large logits do not overflow.
        let (i, p) = argmax_softmax(&[1000.0, 0.0]);
        assert_eq!((i, p), (0, 1.0));
    }

    fn preprocessor(input: InputKind) -> Preprocessor {
        Preprocessor {
            pipeline: Pipeline::imagenet_test(8, 6),
            input,
            max_pixels: 100,
        }
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 20) as u8, (y * 30) as u8, 7])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn dimensions_are_checked_before_decoding() {
        let p = preprocessor(InputKind::Uint8);
        let ok = p.prepare_bytes(&png(10, 10)).unwrap();
        assert_eq!((ok.height, ok.width), (6, 6));
        let err = p.prepare_bytes(&png(11, 10)).unwrap_err();
        assert_eq!(
            err,
            ImageError::TooLarge {
                width: 11,
                height: 10,
                pixels: 110,
                max: 100
            }
        );
        // The header alone is enough: a PNG cut after its IHDR chunk and the next chunk's header (41 bytes)
        // still reports its size, with no pixel data at all.
        let bytes = png(40, 40);
        assert!(matches!(
            p.prepare_bytes(&bytes[..41]),
            Err(ImageError::TooLarge { width: 40, .. })
        ));
        assert_eq!(
            p.prepare_bytes(b"hello").unwrap_err(),
            ImageError::NotAnImage
        );
        assert!(matches!(
            preprocessor(InputKind::Float).prepare_bytes(&png(10, 10)[..60]),
            Err(ImageError::Corrupt(_))
        ));
    }

    #[test]
    fn float_and_uint8_layouts_hold_the_same_pixels() {
        let bytes = png(9, 7);
        let f = preprocessor(InputKind::Float)
            .prepare_bytes(&bytes)
            .unwrap();
        let u = preprocessor(InputKind::Uint8)
            .prepare_bytes(&bytes)
            .unwrap();
        let (PreparedData::F32(f), PreparedData::U8(u)) = (f.data, u.data) else {
            panic!("layouts");
        };
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        for c in 0..3 {
            for p in 0..36 {
                let want = (f32::from(u[p * 3 + c]) / 255.0 - mean[c]) / std[c];
                assert_eq!(f[c * 36 + p], want);
            }
        }
    }
}
