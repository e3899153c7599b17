//! dream-ood: the Dream-OOD method (Du et al., NeurIPS 2023, "Dream the Impossible: Outlier Imagination
//! with Diffusion Models") as a toolkit: imagine outliers with Stable Diffusion, train OOD detectors on them,
//! evaluate them and ship them.
//!
//! ```text
//!  ID images ─► [1 latent]   encoder aligned to the CLIP token embeddings of the class names   (libtorch)
//!                  │ feature bank [C, N, D] (.npy)
//!                  ▼
//!             [2 sample]    kNN boundary points → Gaussian perturbation → kNN filter            (libtorch)
//!                  │ outlier embeddings [C, M, D] (.npy)
//!                  ▼
//!             [3 generate]  SD text encoder with the class token replaced → UNet loop → VAE     (ONNX Runtime)
//!                  │ outlier images + manifest.jsonl
//!                  ▼
//!             [4 train]     classifier with the energy regulariser (ID = 1, outlier = 0)        (libtorch)
//!             [5 eval]      scores → FPR95 / AUROC / AUPR → report
//!             [6 export]    detector → ONNX;  [7 score / serve] with ONNX Runtime
//! ```
//!
//! What exists today: [`config`] (the strict TOML schema), [`runtime`] (loading libtorch and ONNX Runtime,
//! devices, `doctor`), [`data`] (datasets, torchvision-exact transforms, the loader), [`nn`] (PyTorch-compatible
//! ResNets, checkpoints, the optimiser and training files), [`latent`] (stage 1), [`sampling`] (stage 2), [`detector`] (stage 4: the OOD detector's training loop, losses, VOS), [`diffusion`] (stage 3: schedulers, the SD pipeline on ONNX Runtime and
//! the `generate` job), [`onnx`] (ONNX files, graph builder, the SD text-encoder edit, the detector exporter),
//! [`eval`] (stage 5: OOD scores, exact metrics, reports), [`pipeline`] (`run`: the stages in one run folder), [`deploy`] (stages 6–7: export with threshold calibration, `score`, `serve`),
//! [`progress`] (progress events) and [`error`]. The README's status table says
//! what each stage still lacks.

pub mod config;
pub mod data;
pub mod deploy;
pub mod detector;
pub mod diffusion;
pub mod error;
pub mod eval;
pub mod files;
pub mod latent;
pub mod nn;
pub mod onnx;
pub mod pipeline;
pub mod progress;
pub mod runtime;
pub mod sampling;

pub use error::{Error, Result};
