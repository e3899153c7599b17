//! Export of dream-ood's ResNet classifiers (`src/nn/`) to one self-contained ONNX file.
//!
//! The exporter receives named f32 tensors (PyTorch names: `encoder.conv1.weight`, `encoder.bn1.running_var`,
//! `fc.weight`, …) and the architecture description, never libtorch objects. Batch norm is folded into the
//! preceding convolution (inference only: `W' = W·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`), so the graph is
//! Conv/Relu/Add/MaxPool/GlobalAveragePool/Gemm, opset 17, with a dynamic batch axis and any image size.
//!
//! Outputs:
//! - `logits` `[batch, classes]`;
//! - `score` `[batch]`, a confidence (higher = more in-distribution) by [`ScoreKind`];
//! - `is_ood` `[batch]` (bool), `score < threshold`, when a threshold is given: one for every image, or one
//!   per class picked by the predicted class (`argmax(logits)`), so a score equal to the threshold is
//!   in-distribution.
//!
//! With [`Preprocess`], the input is the raw image (`image`, uint8 NHWC) and the normalisation happens inside
//! the graph; otherwise it is `input`, float32 NCHW, already normalised.

use std::collections::HashMap;

use super::builder::{Dim, ElemType, GraphBuilder, attr_int, attr_ints};
use super::proto::ModelProto;
use crate::error::{Error, Result};
use crate::nn::arch::{ResNetConfig, Stem};

/// The opset the exporter writes (ONNX Runtime 1.14+ and every current runtime read it).
pub const OPSET: i64 = 17;
/// `eps` of every BatchNorm in `src/nn/` (PyTorch's default).
const BN_EPS: f32 = 1e-5;

/// One named tensor: dims and row-major f32 data.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// Weights by PyTorch name.
pub type Weights = HashMap<String, NamedTensor>;

/// The OOD score the graph computes. Every score is a confidence: higher means more in-distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreKind {
    /// Negative free energy, `T · logsumexp(logits / T)` (Liu et al. 2020; Dream-OOD's test score, SPEC §5.1).
    Energy { temperature: f32 },
    /// Maximum softmax probability (Hendrycks & Gimpel 2017).
    Msp,
    /// Maximum logit (Hendrycks et al. 2022).
    MaxLogit,
}

/// Normalisation baked into the graph: uint8 NHWC in, `(x/255 − mean)/std` inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The decision threshold baked into the graph (`is_ood = score < threshold`).
#[derive(Debug, Clone, PartialEq)]
pub enum Threshold {
    /// One threshold for every image.
    Global(f32),
    /// One threshold per class, chosen by the predicted class `argmax(logits)`; one value per class.
    PerClass(Vec<f32>),
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ClassifierExport {
    pub arch: ResNetConfig,
    /// Name of the linear head in the weights (`fc` for classifiers).
    pub head: String,
    pub score: ScoreKind,
    /// Adds `is_ood = score < threshold` when set.
    pub threshold: Option<Threshold>,
    pub preprocess: Option<Preprocess>,
}

/// Builds the ONNX model; `metadata` goes into `metadata_props`.
pub fn export_classifier(
    spec: &ClassifierExport,
    weights: &Weights,
    metadata: &[(&str, &str)],
) -> Result<ModelProto> {
    let mut ex = Exporter {
        g: GraphBuilder::new("dream_ood_classifier"),
        w: weights,
        next: 0,
    };
    let batch = || Dim::named("batch");
    let input = match spec.preprocess {
        None => {
            let dims = [
                batch(),
                Dim::Fixed(spec.arch.in_channels),
                Dim::named("height"),
                Dim::named("width"),
            ];
            ex.g.input("input", ElemType::Float, &dims);
            "input".to_owned()
        }
        Some(pre) => {
            let dims = [
                batch(),
                Dim::named("height"),
                Dim::named("width"),
                Dim::Fixed(spec.arch.in_channels),
            ];
            ex.g.input("image", ElemType::Uint8, &dims);
            ex.preprocess(&pre, spec.arch.in_channels)?
        }
    };
    let features = ex.backbone(&spec.arch, &input)?;
    let logits = ex.linear(&spec.head, &features, "logits")?;
    let classes = ex.get(&format!("{}.weight", spec.head))?.dims[0] as i64;
    ex.g.output("logits", ElemType::Float, &[batch(), Dim::Fixed(classes)]);
    ex.score(spec.score, &logits)?;
    ex.g.output("score", ElemType::Float, &[batch()]);
    match &spec.threshold {
        None => {}
        Some(Threshold::Global(t)) => {
            ex.g.initializer_f32("threshold", &[], &[*t]);
            ex.g.node("Less", &["score", "threshold"], &["is_ood"], vec![]);
        }
        Some(Threshold::PerClass(ts)) => {
            if ts.len() as i64 != classes {
                return Err(Error::Shape {
                    what: "export: per-class thresholds".to_owned(),
                    expected: format!("{classes} values (one per class)"),
                    got: ts.len().to_string(),
                });
            }
            ex.g.initializer_f32("class_thresholds", &[classes], ts);
            let attrs = vec![attr_int("axis", 1), attr_int("keepdims", 0)];
            ex.g.node("ArgMax", &["logits"], &["predicted"], attrs);
            ex.g.node(
                "Gather",
                &["class_thresholds", "predicted"],
                &["threshold"],
                vec![attr_int("axis", 0)],
            );
            ex.g.node("Less", &["score", "threshold"], &["is_ood"], vec![]);
        }
    }
    if spec.threshold.is_some() {
        ex.g.output("is_ood", ElemType::Bool, &[batch()]);
    }
    Ok(ex.g.into_model(OPSET, metadata))
}

struct Exporter<'a> {
    g: GraphBuilder,
    w: &'a Weights,
    next: usize,
}

impl Exporter<'_> {
    fn get(&self, name: &str) -> Result<&NamedTensor> {
        self.w.get(name).ok_or_else(|| Error::Onnx {
            what: "export".to_owned(),
            msg: format!(
                "the weights have no tensor `{name}` ({} tensors given)",
                self.w.len()
            ),
        })
    }

    fn get_shaped(&self, name: &str, dims: &[usize]) -> Result<&NamedTensor> {
        let t = self.get(name)?;
        if t.dims != dims || t.data.len() != dims.iter().product::<usize>() {
            return Err(Error::Shape {
                what: format!("export: tensor `{name}`"),
                expected: format!("{dims:?}"),
                got: format!("{:?} ({} values)", t.dims, t.data.len()),
            });
        }
        Ok(t)
    }

    /// A fresh value name.
    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    fn preprocess(&mut self, pre: &Preprocess, channels: i64) -> Result<String> {
        if channels != 3 {
            return Err(Error::InvalidValue {
                key: "export.preprocess".to_owned(),
                msg: format!(
                    "baked-in preprocessing needs 3 input channels, the network has {channels}"
                ),
            });
        }
        let scale: Vec<f32> = pre.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let shift: Vec<f32> = pre.mean.iter().zip(&pre.std).map(|(m, s)| m / s).collect();
        self.g
            .initializer_f32("preprocess.scale", &[1, 3, 1, 1], &scale);
        self.g
            .initializer_f32("preprocess.shift", &[1, 3, 1, 1], &shift);
        let to_float = tensor_proto_float();
        self.g.node(
            "Cast",
            &["image"],
            &["image_f32"],
            vec![attr_int("to", to_float)],
        );
        self.g.node(
            "Transpose",
            &["image_f32"],
            &["image_nchw"],
            vec![attr_ints("perm", &[0, 3, 1, 2])],
        );
        // (x/255 − mean)/std = x·(1/(255·std)) − mean/std
        self.g.node(
            "Mul",
            &["image_nchw", "preprocess.scale"],
            &["image_scaled"],
            vec![],
        );
        self.g.node(
            "Sub",
            &["image_scaled", "preprocess.shift"],
            &["input"],
            vec![],
        );
        Ok("input".to_owned())
    }

    /// Conv (no bias) followed by BN, folded into one Conv with bias.
    fn conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        x: &str,
        stride: i64,
        padding: i64,
    ) -> Result<String> {
        let w = self.get(&format!("{conv}.weight"))?;
        if w.dims.len() != 4 {
            return Err(Error::Shape {
                what: format!("export: tensor `{conv}.weight`"),
                expected: "[out, in, k, k]".to_owned(),
                got: format!("{:?}", w.dims),
            });
        }
        let (c_out, kernel) = (w.dims[0], w.dims[2] as i64);
        let gamma = &self.get_shaped(&format!("{bn}.weight"), &[c_out])?.data;
        let beta = &self.get_shaped(&format!("{bn}.bias"), &[c_out])?.data;
        let mean = &self
            .get_shaped(&format!("{bn}.running_mean"), &[c_out])?
            .data;
        let var = &self
            .get_shaped(&format!("{bn}.running_var"), &[c_out])?
            .data;
        let per_out = w.data.len() / c_out;
        let mut folded = w.data.clone();
        let mut bias = vec![0f32; c_out];
        for o in 0..c_out {
            // f64 for the fold itself: it is computed once and should not add rounding of its own.
            let k = f64::from(gamma[o]) / (f64::from(var[o]) + f64::from(BN_EPS)).sqrt();
            for v in &mut folded[o * per_out..(o + 1) * per_out] {
                *v = (f64::from(*v) * k) as f32;
            }
            bias[o] = (f64::from(beta[o]) - f64::from(mean[o]) * k) as f32;
        }
        let dims: Vec<i64> = w.dims.iter().map(|&d| d as i64).collect();
        let (wn, bn_name) = (format!("{conv}.weight"), format!("{conv}.bias"));
        self.g.initializer_f32(&wn, &dims, &folded);
        self.g.initializer_f32(&bn_name, &[c_out as i64], &bias);
        let out = self.fresh(conv);
        let attrs = vec![
            attr_ints("kernel_shape", &[kernel, kernel]),
            attr_ints("strides", &[stride, stride]),
            attr_ints("pads", &[padding; 4]),
        ];
        self.g.node("Conv", &[x, &wn, &bn_name], &[&out], attrs);
        Ok(out)
    }

    fn relu(&mut self, x: &str) -> String {
        let out = self.fresh("relu");
        self.g.node("Relu", &[x], &[&out], vec![]);
        out
    }

    fn backbone(&mut self, arch: &ResNetConfig, x: &str) -> Result<String> {
        // (stride, padding) of the stem conv; its kernel size comes from the weight's shape.
        let (s, p) = match arch.stem {
            Stem::Cifar => (1, 1),
            Stem::Imagenet => (2, 3),
        };
        let mut out = self.conv_bn("encoder.conv1", "encoder.bn1", x, s, p)?;
        out = self.relu(&out);
        if arch.stem == Stem::Imagenet {
            let pooled = self.fresh("maxpool");
            let attrs = vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ];
            self.g.node("MaxPool", &[&out], &[&pooled], attrs);
            out = pooled;
        }
        let (blocks, bottleneck) = arch.depth.layout();
        let mut c_in = arch.width as usize;
        for (i, &n) in blocks.iter().enumerate() {
            let (planes, stride) = (arch.planes(i) as usize, if i == 0 { 1i64 } else { 2 });
            for j in 0..n {
                let p = format!("encoder.layer{}.{j}", i + 1);
                let stride = if j == 0 { stride } else { 1 };
                let c_out = if bottleneck { planes * 4 } else { planes };
                out = self.block(&p, &out, bottleneck, stride, c_in != c_out || stride != 1)?;
                c_in = c_out;
            }
        }
        let pooled = self.fresh("gap");
        self.g
            .node("GlobalAveragePool", &[&out], &[&pooled], vec![]);
        self.g.node(
            "Flatten",
            &[&pooled],
            &["features"],
            vec![attr_int("axis", 1)],
        );
        Ok("features".to_owned())
    }

    fn block(
        &mut self,
        p: &str,
        x: &str,
        bottleneck: bool,
        stride: i64,
        projection: bool,
    ) -> Result<String> {
        let branch = if bottleneck {
            let h = self.conv_bn(&format!("{p}.conv1"), &format!("{p}.bn1"), x, 1, 0)?;
            let h = self.relu(&h);
            let h = self.conv_bn(&format!("{p}.conv2"), &format!("{p}.bn2"), &h, stride, 1)?;
            let h = self.relu(&h);
            self.conv_bn(&format!("{p}.conv3"), &format!("{p}.bn3"), &h, 1, 0)?
        } else {
            let h = self.conv_bn(&format!("{p}.conv1"), &format!("{p}.bn1"), x, stride, 1)?;
            let h = self.relu(&h);
            self.conv_bn(&format!("{p}.conv2"), &format!("{p}.bn2"), &h, 1, 1)?
        };
        let shortcut = if projection {
            self.conv_bn(
                &format!("{p}.shortcut.0"),
                &format!("{p}.shortcut.1"),
                x,
                stride,
                0,
            )?
        } else {
            x.to_owned()
        };
        let sum = self.fresh("add");
        self.g.node("Add", &[&branch, &shortcut], &[&sum], vec![]);
        Ok(self.relu(&sum))
    }

    fn linear(&mut self, name: &str, x: &str, out: &str) -> Result<String> {
        let w = self.get(&format!("{name}.weight"))?.clone();
        if w.dims.len() != 2 {
            return Err(Error::Shape {
                what: format!("export: tensor `{name}.weight`"),
                expected: "[out, in]".to_owned(),
                got: format!("{:?}", w.dims),
            });
        }
        let b = self
            .get_shaped(&format!("{name}.bias"), &[w.dims[0]])?
            .clone();
        let (wn, bn) = (format!("{name}.weight"), format!("{name}.bias"));
        self.g
            .initializer_f32(&wn, &[w.dims[0] as i64, w.dims[1] as i64], &w.data);
        self.g.initializer_f32(&bn, &[w.dims[0] as i64], &b.data);
        self.g
            .node("Gemm", &[x, &wn, &bn], &[out], vec![attr_int("transB", 1)]);
        Ok(out.to_owned())
    }

    fn score(&mut self, kind: ScoreKind, logits: &str) -> Result<()> {
        match kind {
            ScoreKind::Energy { temperature } => {
                if !(temperature.is_finite() && temperature > 0.0) {
                    return Err(Error::InvalidValue {
                        key: "score.temperature".to_owned(),
                        msg: format!("must be a positive number, got {temperature}"),
                    });
                }
                self.g
                    .initializer_f32("score.temperature", &[], &[temperature]);
                self.g.node(
                    "Div",
                    &[logits, "score.temperature"],
                    &["logits_over_t"],
                    vec![],
                );
                let attrs = vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)];
                self.g
                    .node("ReduceLogSumExp", &["logits_over_t"], &["lse"], attrs);
                self.g
                    .node("Mul", &["lse", "score.temperature"], &["score"], vec![]);
            }
            ScoreKind::Msp => {
                self.g
                    .node("Softmax", &[logits], &["probs"], vec![attr_int("axis", 1)]);
                let attrs = vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)];
                self.g.node("ReduceMax", &["probs"], &["score"], attrs);
            }
            ScoreKind::MaxLogit => {
                let attrs = vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)];
                self.g.node("ReduceMax", &[logits], &["score"], attrs);
            }
        }
        Ok(())
    }
}

fn tensor_proto_float() -> i64 {
    super::proto::tensor_proto::DataType::Float as i64
}
