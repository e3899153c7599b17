//! Stage 3, outlier images: decode the outlier embeddings of stage 2 into images with Stable Diffusion on ONNX
//! Runtime (SPEC §3).
//!
//! For each batch the SD text encoder runs with the class token's row replaced by an outlier embedding, the
//! UNet denoises a latent `[n, 4, 64, 64]` under classifier-free guidance, and the VAE decoder turns it into
//! images. What exists today is the sampler maths:
//!
//! - [`schedulers`]: the diffusion samplers (PLMS / PNDM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M) in
//!   pure Rust, configured from an SD export's `scheduler/scheduler_config.json` and checked against diffusers
//!   0.42.1 by golden fixtures. The official Dream-OOD sampler (CompVis `ldm` `plms.py`, SPEC §3.2) is
//!   [`schedulers::SchedulerKind::Plms`].
//!
//! The ONNX models (text encoder, UNet, VAE) and the `generate` loop arrive with their issues.

pub mod schedulers;
