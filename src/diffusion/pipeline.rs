//! One generation batch: prompt embeddings with injection → guided denoising loop → VAE decode → 8-bit images.

use std::time::{Duration, Instant};

use ndarray::{ArrayD, Axis, concatenate};

use super::model_dir::SdModelDir;
use super::schedulers::{NoiseSource, SchedulerKind};
use super::session::SessionOptions;
use super::text_encoder::{Injection, TextEncoder};
use super::tokenizer::ClipTokenizer;
use super::unet::Unet;
use super::vae::VaeDecoder;
use crate::error::{Error, Result};

/// How pixels in [0, 1] become 8-bit values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// `round(255·x)`, as diffusers' `numpy_to_pil` (the default).
    #[default]
    Round,
    /// `floor(255·x)`, as the official Dream-OOD script (`uint8(255·img)` truncates; SPEC §3.1 step 9).
    Floor,
}

/// Sampler settings of a batch.
#[derive(Debug, Clone, Copy)]
pub struct SamplerSettings {
    pub scheduler: SchedulerKind,
    pub num_inference_steps: usize,
    pub guidance_scale: f32,
}

/// The loaded models of one SD export.
pub struct StableDiffusion {
    pub dir: SdModelDir,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: TextEncoder,
    pub unet: Unet,
    pub vae: VaeDecoder,
    /// `encode("")`, `[1, 77, D]`, computed once.
    uncond: ArrayD<f32>,
    /// Wall time spent inside ONNX Runtime session runs (for the overhead figure of `generate`).
    pub session_time: Duration,
}

impl StableDiffusion {
    pub fn load(dir: SdModelDir, opts: &SessionOptions) -> Result<StableDiffusion> {
        let tokenizer = ClipTokenizer::from_dir(&dir.tokenizer)?;
        let mut text_encoder = TextEncoder::load(&dir.text_encoder, opts)?;
        let unet = Unet::load(&dir.unet, opts)?;
        let vae = VaeDecoder::load(&dir.vae_decoder, opts)?;
        let uncond = text_encoder.encode(&[tokenizer.encode("")?], &[None])?;
        Ok(StableDiffusion {
            dir,
            tokenizer,
            text_encoder,
            unet,
            vae,
            uncond,
            session_time: Duration::ZERO,
        })
    }

    /// Prompt embeddings `[B, 77, D]`, each prompt with its own injection.
    pub fn encode_prompts(
        &mut self,
        prompts: &[String],
        injections: &[Option<Injection<'_>>],
    ) -> Result<ArrayD<f32>> {
        let ids = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<Vec<_>>>()?;
        self.text_encoder.encode(&ids, injections)
    }

    /// Denoises `latents` (`N(0, I)` draws, `[B, 4, h, w]`) under classifier-free guidance with the prompt
    /// embeddings `cond` `[B, 77, D]`, and returns the final latents.
    pub fn denoise(
        &mut self,
        cond: &ArrayD<f32>,
        latents: ArrayD<f32>,
        settings: &SamplerSettings,
        noise: &mut dyn NoiseSource,
    ) -> Result<ArrayD<f32>> {
        let batch = latents.shape()[0];
        if cond.shape()[0] != batch {
            return Err(Error::Shape {
                what: "prompt embeddings".to_owned(),
                expected: format!("{batch} rows (one per latent)"),
                got: format!("{:?}", cond.shape()),
            });
        }
        let uncond = self
            .uncond
            .broadcast(cond.shape())
            .map(|u| u.to_owned())
            .ok_or_else(|| Error::Shape {
                what: "unconditional embedding".to_owned(),
                expected: format!("{:?}", cond.shape()),
                got: format!("{:?}", self.uncond.shape()),
            })?;
        let context =
            concatenate(Axis(0), &[uncond.view(), cond.view()]).expect("invariant: same shapes"); // [2B, 77, D]
        let mut scheduler = self
            .dir
            .scheduler
            .build(settings.scheduler, settings.num_inference_steps)?;
        let mut latents = latents * scheduler.init_noise_sigma() as f32;
        let guidance = settings.guidance_scale;
        for &t in &scheduler.timesteps().to_vec() {
            // 1. expand for classifier-free guidance: [uncond; cond]
            let doubled = concatenate(Axis(0), &[latents.view(), latents.view()])
                .expect("invariant: same shapes");
            let model_input = scheduler.scale_model_input(&doubled, t)?;
            // 2. one UNet call on the batch [2B, 4, h, w]
            let start = Instant::now();
            let out = self.unet.predict(model_input, t, context.clone())?;
            self.session_time += start.elapsed();
            // 3. guidance: ε_u + s·(ε_c − ε_u)
            let (eps_u, eps_c) = out.view().split_at(Axis(0), batch);
            let eps = &eps_u + &((&eps_c - &eps_u) * guidance);
            // 4. scheduler step
            latents = scheduler.step(&eps, t, &latents, noise)?;
        }
        Ok(latents)
    }

    /// Decodes latents into 8-bit RGB images, `[B, H, W, 3]` row-major.
    pub fn decode(
        &mut self,
        latents: &ArrayD<f32>,
        quantize: Quantize,
    ) -> Result<(Vec<usize>, Vec<u8>)> {
        let start = Instant::now();
        let decoded = self.vae.decode(latents / self.dir.vae_scaling_factor)?; // [B, 3, H, W]
        self.session_time += start.elapsed();
        let nhwc = decoded.permuted_axes(vec![0, 2, 3, 1]); // [B, H, W, 3]
        let shape = nhwc.shape().to_vec();
        let pixels = nhwc
            .iter()
            .map(|&x| {
                let v = ((x / 2.0 + 0.5).clamp(0.0, 1.0)) * 255.0;
                match quantize {
                    Quantize::Round => v.round() as u8,
                    Quantize::Floor => v.floor() as u8,
                }
            })
            .collect();
        Ok((shape, pixels))
    }
}
