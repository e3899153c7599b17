//! Stages 6 and 7: shipping a detector and scoring with it in production, on ONNX Runtime only (no
//! libtorch, no Python at run time).
//!
//! ```text
//!  checkpoint (.safetensors) ──► export ──► detector.onnx  (logits, score, is_ood; metadata_props)
//!                                  ▲              │
//!          held-out ID images ─────┘ calibrate    ├──► score  PATH…  → JSONL / CSV rows
//!          (through the graph itself)             └──► serve       → HTTP: /v1/score, /v1/model, /metrics
//! ```
//!
//! - [`config`]: the `[export]` table;
//! - [`export`](mod@export): the checkpoint → ONNX export with threshold calibration on the production path;
//! - [`calibrate`]: the threshold rule for a target ID TPR (global or per predicted class);
//! - [`metadata`]: what the `.onnx` file says about itself (classes, transform, score, threshold, hashes);
//! - [`scorer`]: decoding, the evaluation transform and batched session runs, shared by all of the above;
//! - [`score`]: files and folders → rows; [`serve`] (+ [`batcher`], [`metrics`]): the HTTP server.

pub mod batcher;
pub mod calibrate;
pub mod config;
pub mod export;
pub mod metadata;
pub mod metrics;
pub mod score;
pub mod scorer;
pub mod serve;

pub use config::ExportConfig;
pub use export::{CalibrationSet, ExportJob, ExportReport, NetworkOverride, export};
pub use metadata::DetectorMetadata;
pub use scorer::{Detector, Preprocessor, Scored};
