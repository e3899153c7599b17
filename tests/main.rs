//! Integration tests, built as one binary. Each module runs the real `dream-ood` binary or the library's
//! public API; fixtures are under `tests/fixtures/<topic>/`, each with the `tools/` script that made it.

mod common;

/// `dream-ood config check`: valid files, and the errors for bad ones (file, line, key path, nearest key).
mod config_check;

/// `dream-ood doctor`: the report, running outside cargo, and the error for a missing ONNX Runtime.
mod doctor;

/// libtorch and ONNX Runtime in one process, through the library, concurrently and in sequence.
mod runtimes;

/// `dream-ood metrics` and `dream_ood::eval::metrics`: scikit-learn parity on the fixtures, invariance to
/// monotone transforms, `.npy` and text inputs, and the errors for bad files.
mod metrics;

/// The stage-3 text-encoder graph edit (token lookup → `inputs_embeds`) on an exported CLIP encoder.
mod text_encoder;

/// `src/nn/` ResNets against PyTorch: parameter names and shapes, outputs for formula-filled weights, init.
mod nn;

/// The ONNX exporter: libtorch parity of every ResNet (BN folded), scores, threshold, baked preprocessing.
mod export;

/// Stage 3 on a tiny random SD export: tokenizer vs transformers, images vs diffusers, injection.
mod tiny_sd;

/// `dream-ood generate`: outputs and manifest, resume after a kill, shards equal one run, bad input.
mod generate;

/// Stage 2 `dream-ood sample`: kNN vs scikit-learn, both modes vs the Python port of the official code,
/// the CLI end to end (shape, norms, sidecar, determinism, errors).
mod sampling;

/// `src/data/`: transforms against torchvision with its draws replayed, every source format through the
/// loader, corrupt files skipped or failing.
mod data;

/// Training code against PyTorch: SGD + cosine trajectory, the stage-1 loss and the Dream-OOD loss with
/// their gradients.
mod training;

/// Stage 1 `dream-ood latent`: files, checkpoint, exact resume, stage 2 chaining, tokens from an SD export.
mod latent;

/// `dream-ood run`: stages chained in one folder, skipped when up to date, rerun when their settings change.
mod run;

/// The shipped demo SD (`onnx/demo-sd/`): opens, CLIP anchors, 32×32 images from `generate`.
mod demo_sd;

/// Stages 6–7: checkpoint → `export` parity with libtorch for every ResNet, calibration through the graph,
/// metadata, `score` rows against the data layer + libtorch and its error rows, `serve` over loopback HTTP.
mod deploy;

/// `src/eval/`: every OOD score against numpy / scikit-learn / PyTorch, score invariants, and
/// `dream-ood eval` end to end (files, shapes, metrics recomputed from the saved scores, errors).
mod eval;

/// Stage 4 `dream-ood train`: the Dream-OOD and VOS losses vs PyTorch, the regulariser's gradient in the
/// backbone and φ, training on tiny images (loss falls, energy separates), exact resume, bad settings.
mod detector;
