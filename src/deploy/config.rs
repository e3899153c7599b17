//! `[export]`: how `dream-ood run` (its `export` stage) and `dream-ood export CONFIG` turn a trained detector
//! into `detector.onnx`. Every key is also an `export` flag; a flag given on the command line wins.

use serde::{Deserialize, Serialize};

use crate::detector::Method;
use crate::onnx::export::ScoreKind;

/// `[export]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// The detector to export. Default: `dream_ood` when the run trains it (`[run] methods`), otherwise
    /// `[train] method`.
    pub method: Option<Method>,
    /// The OOD score baked into the graph: `energy` (the score Dream-OOD trains), `msp` or `maxlogit`.
    /// Default `energy`.
    pub score: String,
    /// Temperature T of the energy score. Default 1.
    pub temperature: f32,
    /// Target in-distribution TPR of the threshold, calibrated on `[data.val]`. Default 0.95 (the
    /// operating point of FPR95).
    pub tpr: f64,
    /// One threshold per predicted class instead of one global threshold. Default false.
    pub per_class_thresholds: bool,
    /// Bake the normalisation into the graph (input `image`, uint8 NHWC). Default false.
    pub preprocess: bool,
    /// `dream-ood run` only: images taken from the ID test set and from each OOD set, written as PNG under
    /// `<out_dir>/export/samples/` and scored with the exported file exactly as `dream-ood score` would,
    /// so a run ends with the production path exercised. 0 skips it. Default 4.
    pub score_samples: usize,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            method: None,
            score: "energy".to_owned(),
            temperature: 1.0,
            tpr: 0.95,
            per_class_thresholds: false,
            preprocess: false,
            score_samples: 4,
        }
    }
}

/// Parses a score name as `export --score` and `[export] score` spell it.
pub fn parse_score(name: &str, temperature: f32) -> Result<ScoreKind, String> {
    match name {
        "energy" => Ok(ScoreKind::Energy { temperature }),
        "msp" => Ok(ScoreKind::Msp),
        "maxlogit" => Ok(ScoreKind::MaxLogit),
        _ => Err(format!(
            "unknown score \"{name}\"; expected energy, msp or maxlogit"
        )),
    }
}

impl ExportConfig {
    /// The score as the exporter takes it.
    pub fn score_kind(&self) -> Result<ScoreKind, String> {
        parse_score(&self.score, self.temperature)
    }

    /// The method exported when `method` is not set: `dream_ood` if `trained` has it, else `fallback`.
    pub fn method_or(&self, trained: &[Method], fallback: Method) -> Method {
        self.method
            .unwrap_or(if trained.contains(&Method::DreamOod) {
                Method::DreamOod
            } else {
                fallback
            })
    }

    /// Checks ranges; an error names the field (relative to `export.`).
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        self.score_kind().map_err(|msg| ("score", msg))?;
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err((
                "temperature",
                format!("must be a positive number, got {}", self.temperature),
            ));
        }
        if !(self.tpr > 0.0 && self.tpr <= 1.0) {
            return Err((
                "tpr",
                format!("must be a fraction in (0, 1], e.g. 0.95, got {}", self.tpr),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_method_prefers_dream_ood_among_those_trained() {
        let c = ExportConfig::default();
        let both = [Method::Baseline, Method::DreamOod];
        assert_eq!(c.method_or(&both, Method::Baseline), Method::DreamOod);
        assert_eq!(
            c.method_or(&[Method::Baseline, Method::Vos], Method::Vos),
            Method::Vos
        );
        let pinned = ExportConfig {
            method: Some(Method::Baseline),
            ..c
        };
        assert_eq!(pinned.method_or(&both, Method::DreamOod), Method::Baseline);
    }

    #[test]
    fn bad_values_name_their_field() {
        let bad = |c: ExportConfig| c.check().unwrap_err().0;
        let d = ExportConfig::default;
        assert_eq!(
            bad(ExportConfig {
                score: "odin".into(),
                ..d()
            }),
            "score"
        );
        assert_eq!(
            bad(ExportConfig {
                temperature: 0.0,
                ..d()
            }),
            "temperature"
        );
        assert_eq!(bad(ExportConfig { tpr: 1.5, ..d() }), "tpr");
        assert!(d().check().is_ok());
    }
}
