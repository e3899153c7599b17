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
    ///
    /// `resize` (the official script's 512 → 256, SPEC §3.1 step 8) resizes the [0, 1] images bilinearly
    /// before quantising, as `F.interpolate(mode="bilinear", align_corners=False)` does.
    pub fn decode(
        &mut self,
        latents: &ArrayD<f32>,
        quantize: Quantize,
        resize: Option<usize>,
    ) -> Result<(Vec<usize>, Vec<u8>)> {
        let start = Instant::now();
        let decoded = self.vae.decode(latents / self.dir.vae_scaling_factor)?; // [B, 3, H, W]
        self.session_time += start.elapsed();
        let images = decoded.mapv(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0)); // [B, 3, H, W] in [0, 1]
        let images = match resize {
            Some(size) => resize_bilinear(&images, size, size)?,
            None => images,
        };
        let nhwc = images.permuted_axes(vec![0, 2, 3, 1]); // [B, H, W, 3]
        let shape = nhwc.shape().to_vec();
        let pixels = nhwc
            .iter()
            .map(|&x| {
                let v = x * 255.0;
                match quantize {
                    Quantize::Round => v.round() as u8,
                    Quantize::Floor => v.floor() as u8,
                }
            })
            .collect();
        Ok((shape, pixels))
    }
}

/// Bilinear resize of `[B, C, H, W]` to `[B, C, out_h, out_w]` as PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`: source coordinate
/// `(i + 0.5)·(in/out) − 0.5`, clamped at 0, two taps per axis. For an exact 2× reduction that is a 2×2 mean.
pub fn resize_bilinear(images: &ArrayD<f32>, out_h: usize, out_w: usize) -> Result<ArrayD<f32>> {
    let &[b, c, h, w] = images.shape() else {
        return Err(Error::Shape {
            what: "images to resize".to_owned(),
            expected: "[B, C, H, W]".to_owned(),
            got: format!("{:?}", images.shape()),
        });
    };
    if out_h == 0 || out_w == 0 {
        return Err(Error::InvalidValue {
            key: "resize".to_owned(),
            msg: "the output size must be at least 1".to_owned(),
        });
    }
    // Per output index: (lower tap, upper tap, weight of the upper tap).
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|i| {
                let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, out_h), taps(w, out_w));
    let mut out = ArrayD::<f32>::zeros(ndarray::IxDyn(&[b, c, out_h, out_w]));
    for bi in 0..b {
        for ci in 0..c {
            let src = images.slice(ndarray::s![bi, ci, .., ..]);
            let mut dst = out.slice_mut(ndarray::s![bi, ci, .., ..]);
            for (oy, &(y0, y1, ly)) in ty.iter().enumerate() {
                for (ox, &(x0, x1, lx)) in tx.iter().enumerate() {
                    let top = src[[y0, x0]] * (1.0 - lx) + src[[y0, x1]] * lx;
                    let bottom = src[[y1, x0]] * (1.0 - lx) + src[[y1, x1]] * lx;
                    dst[[oy, ox]] = top * (1.0 - ly) + bottom * ly;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`
    /// (`tools/make_resize_fixture.py`), down (exact half and fractional) and up.
    #[test]
    fn resize_matches_pytorch() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/resize/bilinear.json"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        let input = ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 3, 16, 16]), floats(&json["input"]))
            .unwrap();
        for (size, want) in json["outputs"].as_object().unwrap() {
            let size: usize = size.parse().unwrap();
            let got = resize_bilinear(&input, size, size).unwrap();
            assert_eq!(got.shape(), &[1, 3, size, size]);
            let worst = got
                .iter()
                .zip(floats(want))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-6, "size {size}: max |diff| {worst:e}");
        }
        // The exact half is a 2×2 mean.
        let half = resize_bilinear(&input, 8, 8).unwrap();
        let mean =
            (input[[0, 1, 2, 4]] + input[[0, 1, 2, 5]] + input[[0, 1, 3, 4]] + input[[0, 1, 3, 5]])
                / 4.0;
        assert!((half[[0, 1, 1, 2]] - mean).abs() < 1e-6);
    }
}
