//! What an exported detector carries in its ONNX `metadata_props`, so that the one `.onnx` file is all a
//! production scorer needs: any ONNX Runtime (Python's `session.get_modelmeta().custom_metadata_map`, C++,
//! Rust) reads these plain string pairs.
//!
//! | key | value |
//! |---|---|
//! | `dream_ood.format` | layout version of these keys, [`FORMAT_VERSION`] |
//! | `dream_ood.version` | the dream-ood version that exported the file |
//! | `classes` | class names in label order, JSON array |
//! | `network` | the architecture (`depth`, `stem`, `in_channels`, `head`, `out_dim`), JSON |
//! | `input.name`, `input.dtype`, `input.layout` | `input` float32 NCHW normalised, or `image` uint8 NHWC (normalisation in the graph) |
//! | `input.size` | `HxW` the evaluation transform always yields (`224x224`), or `any` (fully convolutional, e.g. CIFAR's ToTensor-only transform) |
//! | `mean`, `std` | Normalize's per-channel values on the 0..1 scale, JSON arrays (`[0,…]`, `[1,…]` without Normalize) |
//! | `eval_transform` | the whole evaluation transform ([`Pipeline`]) as JSON: what `score` and `serve` apply before the graph |
//! | `score` | `energy`, `msp` or `maxlogit` |
//! | `score.sign` | `higher_is_in_distribution`: every score is a confidence; `is_ood = score < threshold` |
//! | `score.temperature` | T of the energy score `T·logsumexp(logits/T)` (energy only) |
//! | `threshold` | the calibrated threshold (f32, shortest round-trip decimal); absent when not calibrated |
//! | `threshold.per_class` | per-class thresholds by predicted class, JSON array (when calibrated per class) |
//! | `threshold.rule` | the calibration rule in words ([`crate::deploy::calibrate::RULE`]) |
//! | `calibration.target_tpr`, `calibration.achieved_tpr` | the ID TPR asked for, and the fraction of the calibration scores the threshold accepts |
//! | `calibration.count`, `calibration.source`, `calibration.sha256` | how many ID scores, `images` or `scores`, and a hash of the set (see [`crate::deploy::export`](mod@crate::deploy::export)) |
//! | `checkpoint.sha256` | sha256 of the checkpoint file the weights came from |
//! | `training_config.sha256` | the training config's hash, when the checkpoint records one |

use std::collections::HashMap;

use crate::data::Pipeline;
use crate::data::transforms::{Size, Transform};
use crate::error::{Error, Result};
use crate::nn::NetworkSpec;
use crate::onnx::export::ScoreKind;

/// Version of the key layout above; bumped when a key changes meaning.
pub const FORMAT_VERSION: u32 = 1;

/// The value of `score.sign`.
pub const SCORE_SIGN: &str = "higher_is_in_distribution";

/// The graph input a detector takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// `input`: float32 `[batch, C, H, W]`, already normalised by the evaluation transform.
    Float,
    /// `image`: uint8 `[batch, H, W, C]` after the evaluation transform's resize/crop; the graph normalises.
    Uint8,
}

impl InputKind {
    /// The graph input's name.
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Float => "input",
            InputKind::Uint8 => "image",
        }
    }

    fn dtype(self) -> &'static str {
        match self {
            InputKind::Float => "float32",
            InputKind::Uint8 => "uint8",
        }
    }

    fn layout(self) -> &'static str {
        match self {
            InputKind::Float => "NCHW",
            InputKind::Uint8 => "NHWC",
        }
    }
}

/// How the threshold was calibrated.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationInfo {
    /// The global threshold (with per-class thresholds: the one used for classes without calibration data).
    pub threshold: f32,
    /// Per-class thresholds by predicted class, when calibrated per class.
    pub per_class: Option<Vec<f32>>,
    /// The ID TPR asked for (0.95 by default).
    pub target_tpr: f64,
    /// Fraction of the calibration scores at or above their threshold.
    pub achieved_tpr: f64,
    /// Number of calibration scores.
    pub count: usize,
    /// `images` or `dataset` (a config's `[data.val]`), both scored through the exported graph, or `scores`
    /// (a file of precomputed scores).
    pub source: String,
    /// sha256 identifying the calibration set.
    pub sha256: String,
}

/// Everything a detector file says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorMetadata {
    pub classes: Vec<String>,
    pub network: NetworkSpec,
    pub input: InputKind,
    pub eval_transform: Pipeline,
    pub score: ScoreKind,
    pub calibration: Option<CalibrationInfo>,
    /// `dream_ood.version` of the exporter.
    pub dream_ood_version: String,
    pub checkpoint_sha256: String,
    pub training_config_sha256: Option<String>,
}

/// The `(height, width)` every image has after `pipeline`, when it is fixed.
pub fn fixed_output_size(pipeline: &Pipeline) -> Option<(usize, usize)> {
    let mut size = None;
    for t in &pipeline.transforms {
        match *t {
            Transform::Resize(Size::Exact { height, width })
            | Transform::CenterCrop { height, width }
            | Transform::RandomCrop { height, width, .. }
            | Transform::RandomResizedCrop { height, width, .. } => size = Some((height, width)),
            Transform::Resize(Size::Shorter(_)) => size = None,
            Transform::RandomHorizontalFlip { .. }
            | Transform::RandomGaussianBlur { .. }
            | Transform::Grayscale => {}
        }
    }
    size
}

fn score_name(score: ScoreKind) -> &'static str {
    match score {
        ScoreKind::Energy { .. } => "energy",
        ScoreKind::Msp => "msp",
        ScoreKind::MaxLogit => "maxlogit",
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("invariant: plain data serialises")
}

impl DetectorMetadata {
    /// The `(mean, std)` the graph or the caller normalises with.
    pub fn mean_std(&self) -> (Vec<f64>, Vec<f64>) {
        let c = self.eval_transform.channels;
        match &self.eval_transform.normalize {
            Some(n) => (n.mean.clone(), n.std.clone()),
            None => (vec![0.0; c], vec![1.0; c]),
        }
    }

    /// The threshold that applies to an image predicted as `class`.
    pub fn threshold_for(&self, class: usize) -> Option<f32> {
        let cal = self.calibration.as_ref()?;
        Some(
            cal.per_class
                .as_ref()
                .and_then(|p| p.get(class).copied())
                .unwrap_or(cal.threshold),
        )
    }

    /// The key/value pairs for `metadata_props`, in the order of the table above.
    pub fn to_props(&self) -> Vec<(String, String)> {
        let (mean, std) = self.mean_std();
        let size = fixed_output_size(&self.eval_transform)
            .map_or_else(|| "any".to_owned(), |(h, w)| format!("{h}x{w}"));
        let mut p: Vec<(&str, String)> = vec![
            ("dream_ood.format", FORMAT_VERSION.to_string()),
            ("dream_ood.version", self.dream_ood_version.clone()),
            ("classes", json(&self.classes)),
            ("network", json(&self.network)),
            ("input.name", self.input.name().to_owned()),
            ("input.dtype", self.input.dtype().to_owned()),
            ("input.layout", self.input.layout().to_owned()),
            ("input.size", size),
            ("mean", json(&mean)),
            ("std", json(&std)),
            ("eval_transform", json(&self.eval_transform)),
            ("score", score_name(self.score).to_owned()),
            ("score.sign", SCORE_SIGN.to_owned()),
        ];
        if let ScoreKind::Energy { temperature } = self.score {
            p.push(("score.temperature", temperature.to_string()));
        }
        if let Some(c) = &self.calibration {
            p.push(("threshold", c.threshold.to_string()));
            if let Some(per_class) = &c.per_class {
                p.push(("threshold.per_class", json(per_class)));
            }
            let rule = if c.per_class.is_some() {
                format!(
                    "{} Per class: the same rule on the calibration images predicted as each class; a class with none uses `threshold`.",
                    super::calibrate::RULE
                )
            } else {
                super::calibrate::RULE.to_owned()
            };
            p.push(("threshold.rule", rule));
            p.push(("calibration.target_tpr", c.target_tpr.to_string()));
            p.push(("calibration.achieved_tpr", c.achieved_tpr.to_string()));
            p.push(("calibration.count", c.count.to_string()));
            p.push(("calibration.source", c.source.clone()));
            p.push(("calibration.sha256", c.sha256.clone()));
        }
        p.push(("checkpoint.sha256", self.checkpoint_sha256.clone()));
        if let Some(h) = &self.training_config_sha256 {
            p.push(("training_config.sha256", h.clone()));
        }
        p.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// Reads the pairs back; `what` names the model in errors. Fails on a missing or malformed key, and on
    /// a newer key layout than this dream-ood reads.
    pub fn from_props(props: &HashMap<String, String>, what: &str) -> Result<Self> {
        let bad = |key: &str, msg: String| Error::Onnx {
            what: what.to_owned(),
            msg: format!("metadata_props `{key}`: {msg}"),
        };
        let get = |key: &str| -> Result<&str> {
            props.get(key).map(String::as_str).ok_or_else(|| Error::Onnx {
                what: what.to_owned(),
                msg: format!(
                    "metadata_props has no `{key}`: not a detector exported by `dream-ood export`"
                ),
            })
        };
        fn parse<T: std::str::FromStr>(
            v: &str,
            key: &str,
            bad: &dyn Fn(&str, String) -> Error,
        ) -> Result<T> {
            v.parse()
                .map_err(|_| bad(key, format!("{v:?} is not a valid value")))
        }
        fn from_json<T: serde::de::DeserializeOwned>(
            v: &str,
            key: &str,
            bad: &dyn Fn(&str, String) -> Error,
        ) -> Result<T> {
            serde_json::from_str(v).map_err(|e| bad(key, format!("not the expected JSON: {e}")))
        }
        let format: u32 = parse(get("dream_ood.format")?, "dream_ood.format", &bad)?;
        if format > FORMAT_VERSION {
            return Err(bad(
                "dream_ood.format",
                format!(
                    "{format} is newer than this dream-ood reads ({FORMAT_VERSION}); upgrade dream-ood"
                ),
            ));
        }
        let input = match get("input.name")? {
            "input" => InputKind::Float,
            "image" => InputKind::Uint8,
            other => {
                return Err(bad(
                    "input.name",
                    format!("{other:?}; expected input or image"),
                ));
            }
        };
        let score = match get("score")? {
            "energy" => ScoreKind::Energy {
                temperature: parse(get("score.temperature")?, "score.temperature", &bad)?,
            },
            "msp" => ScoreKind::Msp,
            "maxlogit" => ScoreKind::MaxLogit,
            other => {
                return Err(bad(
                    "score",
                    format!("{other:?}; expected energy, msp or maxlogit"),
                ));
            }
        };
        let sign = get("score.sign")?;
        if sign != SCORE_SIGN {
            return Err(bad(
                "score.sign",
                format!("{sign:?}; expected {SCORE_SIGN}"),
            ));
        }
        let calibration = match props.get("threshold") {
            None => None,
            Some(t) => Some(CalibrationInfo {
                threshold: parse(t, "threshold", &bad)?,
                per_class: props
                    .get("threshold.per_class")
                    .map(|v| from_json(v, "threshold.per_class", &bad))
                    .transpose()?,
                target_tpr: parse(
                    get("calibration.target_tpr")?,
                    "calibration.target_tpr",
                    &bad,
                )?,
                achieved_tpr: parse(
                    get("calibration.achieved_tpr")?,
                    "calibration.achieved_tpr",
                    &bad,
                )?,
                count: parse(get("calibration.count")?, "calibration.count", &bad)?,
                source: get("calibration.source")?.to_owned(),
                sha256: get("calibration.sha256")?.to_owned(),
            }),
        };
        let meta = DetectorMetadata {
            classes: from_json(get("classes")?, "classes", &bad)?,
            network: from_json(get("network")?, "network", &bad)?,
            input,
            eval_transform: from_json(get("eval_transform")?, "eval_transform", &bad)?,
            score,
            calibration,
            dream_ood_version: get("dream_ood.version")?.to_owned(),
            checkpoint_sha256: get("checkpoint.sha256")?.to_owned(),
            training_config_sha256: props.get("training_config.sha256").cloned(),
        };
        meta.validate()
            .map_err(|msg| bad("classes / network / eval_transform", msg))?;
        Ok(meta)
    }

    /// Checks that the pieces agree with each other: one class name per output, a deterministic
    /// evaluation transform with the network's channel count, per-class thresholds for every class.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.classes.len() as i64 != self.network.out_dim {
            return Err(format!(
                "{} class names for a head with {} outputs",
                self.classes.len(),
                self.network.out_dim
            ));
        }
        self.eval_transform.validate().map_err(|e| e.to_string())?;
        if self.eval_transform.channels as i64 != self.network.in_channels {
            return Err(format!(
                "the evaluation transform makes {}-channel images, the network takes {}",
                self.eval_transform.channels, self.network.in_channels
            ));
        }
        if let Some(t) = self.eval_transform.transforms.iter().find(|t| {
            matches!(
                t,
                Transform::RandomCrop { .. }
                    | Transform::RandomHorizontalFlip { .. }
                    | Transform::RandomResizedCrop { .. }
            )
        }) {
            return Err(format!(
                "the evaluation transform has a random step ({t:?}); scoring must be deterministic"
            ));
        }
        if let Some(per_class) = self.calibration.as_ref().and_then(|c| c.per_class.as_ref())
            && per_class.len() != self.classes.len()
        {
            return Err(format!(
                "{} per-class thresholds for {} classes",
                per_class.len(),
                self.classes.len()
            ));
        }
        Ok(())
    }

    /// The metadata as JSON, for `GET /v1/model` and logs: every key of the table, with JSON values
    /// parsed (so `classes` is an array, not a string).
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (k, v) in self.to_props() {
            let is_json = matches!(
                k.as_str(),
                "classes" | "network" | "mean" | "std" | "eval_transform" | "threshold.per_class"
            );
            let value = if is_json {
                serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v))
            } else {
                serde_json::Value::String(v)
            };
            map.insert(k, value);
        }
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Depth, Stem};

    pub(crate) fn sample(calibrated: bool, per_class: bool) -> DetectorMetadata {
        DetectorMetadata {
            classes: vec!["cat".into(), "dog, big".into(), "\"quoted\"".into()],
            network: NetworkSpec {
                depth: Depth::Resnet18,
                stem: Stem::Imagenet,
                in_channels: 3,
                width: 64,
                head: "fc".into(),
                out_dim: 3,
            },
            input: InputKind::Uint8,
            eval_transform: Pipeline::imagenet_test(36, 32),
            score: ScoreKind::Energy { temperature: 1.5 },
            calibration: calibrated.then(|| CalibrationInfo {
                threshold: 7.123_456_7,
                per_class: per_class.then(|| vec![1.0, -0.1, 3.3e-8]),
                target_tpr: 0.95,
                achieved_tpr: 0.953_333_333_333_333_4,
                count: 150,
                source: "images".into(),
                sha256: "ab".repeat(32),
            }),
            dream_ood_version: "0.1.0".into(),
            checkpoint_sha256: "cd".repeat(32),
            training_config_sha256: Some("ef".repeat(32)),
        }
    }

    fn round_trip(m: &DetectorMetadata) -> DetectorMetadata {
        let props: HashMap<String, String> = m.to_props().into_iter().collect();
        DetectorMetadata::from_props(&props, "m.onnx").unwrap()
    }

    #[test]
    fn every_variant_round_trips_exactly() {
        for (cal, per_class) in [(false, false), (true, false), (true, true)] {
            let m = sample(cal, per_class);
            assert_eq!(round_trip(&m), m, "calibrated {cal}, per class {per_class}");
        }
        let mut m = sample(true, false);
        m.score = ScoreKind::Msp;
        m.input = InputKind::Float;
        m.training_config_sha256 = None;
        m.eval_transform = Pipeline::cifar_test();
        assert_eq!(round_trip(&m), m);
    }

    #[test]
    fn props_spell_out_size_layout_and_sign() {
        let props: HashMap<String, String> = sample(true, false).to_props().into_iter().collect();
        assert_eq!(props["input.size"], "32x32");
        assert_eq!(props["input.layout"], "NHWC");
        assert_eq!(props["input.dtype"], "uint8");
        assert_eq!(props["score.sign"], "higher_is_in_distribution");
        assert_eq!(props["mean"], "[0.485,0.456,0.406]");
        // f32 7.1234567 is 7.12345648…; its shortest round-trip decimal is written.
        assert_eq!(props["threshold"], "7.1234565");
        let mut m = sample(false, false);
        m.eval_transform = Pipeline::cifar_test();
        let props: HashMap<String, String> = m.to_props().into_iter().collect();
        assert_eq!(props["input.size"], "any");
        assert!(!props.contains_key("threshold"));
    }

    #[test]
    fn missing_or_bad_keys_are_named() {
        let mut props: HashMap<String, String> =
            sample(true, true).to_props().into_iter().collect();
        props.remove("classes");
        let err = DetectorMetadata::from_props(&props, "d.onnx")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "d.onnx: metadata_props has no `classes`: not a detector exported by `dream-ood export`"
        );
        props.insert("classes".into(), "[\"a\"]".into());
        let err = DetectorMetadata::from_props(&props, "d.onnx")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 class names for a head with 3 outputs"),
            "{err}"
        );
        props.insert("classes".into(), "[\"a\",\"b\",\"c\"]".into());
        props.insert("score".into(), "odin".into());
        let err = DetectorMetadata::from_props(&props, "d.onnx")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`score`: \"odin\"; expected energy, msp or maxlogit"),
            "{err}"
        );
        props.insert("score".into(), "energy".into());
        props.insert("dream_ood.format".into(), "9".into());
        let err = DetectorMetadata::from_props(&props, "d.onnx")
            .unwrap_err()
            .to_string();
        assert!(err.contains("newer than this dream-ood reads"), "{err}");
    }

    #[test]
    fn random_eval_transforms_are_refused() {
        let mut m = sample(false, false);
        m.eval_transform = Pipeline::cifar_train();
        let err = m.validate().unwrap_err();
        assert!(err.contains("random step"), "{err}");
    }
}
