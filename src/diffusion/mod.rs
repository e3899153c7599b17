//! Stage 3, outlier images: decode the outlier embeddings of stage 2 into images with Stable Diffusion on ONNX
//! Runtime (SPEC §3).
//!
//! For each batch the SD text encoder runs with the class token's row replaced by an outlier embedding, the
//! UNet denoises a latent `[n, 4, 64, 64]` under classifier-free guidance, and the VAE decoder turns it into
//! images. What exists today:
//!
//! - [`schedulers`]: the diffusion samplers (PLMS / PNDM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M) in
//!   pure Rust, configured from an SD export's `scheduler/scheduler_config.json` and checked against diffusers
//!   0.42.1 by golden fixtures. The official Dream-OOD sampler (CompVis `ldm` `plms.py`, SPEC §3.2) is
//!   [`schedulers::SchedulerKind::Plms`].
//!
//! - [`model_dir`]: the parts of an SD export folder; [`tokenizer`]: its CLIP tokenizer;
//! - [`text_encoder`] (with embedding injection), [`unet`], [`vae`]: the three ONNX Runtime models, each
//!   converting at its boundary to the element types and ranks its export declares ([`session`]);
//! - [`pipeline`]: one batch: prompt embeddings → guided denoising loop → VAE decode → 8-bit images.
//!
//! The `generate` job (plan, shards, resume, manifest) arrives with its issue.

pub mod classes;
pub mod generate;
pub mod model_dir;
pub mod pipeline;
pub mod plan;
pub mod schedulers;
pub mod session;
pub mod te_cache;
pub mod tensorrt;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
