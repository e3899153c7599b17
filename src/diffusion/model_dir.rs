//! An SD export folder as `optimum-cli export onnx` (or diffusers' conversion script) writes it, untouched:
//! `text_encoder/model.onnx`, `unet/model.onnx` (+ external data), `vae_decoder/model.onnx`,
//! `tokenizer/{vocab.json, merges.txt, …}`, `scheduler/scheduler_config.json`, `vae_decoder/config.json`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::schedulers::SchedulerConfig;
use crate::error::{Error, Result};

/// SD 1.x's VAE scaling factor (`scaling_factor` of `vae_decoder/config.json` when present).
pub const SD_VAE_SCALING_FACTOR: f32 = 0.18215;

/// The parts of an SD export dream-ood uses.
#[derive(Debug, Clone)]
pub struct SdModelDir {
    pub root: PathBuf,
    pub text_encoder: PathBuf,
    pub unet: PathBuf,
    pub vae_decoder: PathBuf,
    pub tokenizer: PathBuf,
    pub scheduler: SchedulerConfig,
    pub vae_scaling_factor: f32,
    /// Pixels per latent cell: `2^(len(block_out_channels) − 1)` of the VAE config (8 for SD).
    pub vae_scale_factor: usize,
}

#[derive(Deserialize)]
struct VaeConfig {
    scaling_factor: Option<f32>,
    block_out_channels: Option<Vec<u32>>,
}

impl SdModelDir {
    /// Checks that every needed part is there, naming all missing ones at once.
    pub fn open(root: &Path) -> Result<SdModelDir> {
        let text_encoder = root.join("text_encoder/model.onnx");
        let unet = root.join("unet/model.onnx");
        let vae_decoder = root.join("vae_decoder/model.onnx");
        let tokenizer = root.join("tokenizer");
        let missing: Vec<String> = [&text_encoder, &unet, &vae_decoder]
            .into_iter()
            .filter(|p| !p.is_file())
            .chain([&tokenizer].into_iter().filter(|p| !p.is_dir()))
            .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Onnx {
                what: root.display().to_string(),
                msg: format!(
                    "not a Stable Diffusion ONNX export: missing {} (expected the folder `optimum-cli export onnx` writes)",
                    missing.join(", ")
                ),
            });
        }
        let vae_config = root.join("vae_decoder/config.json");
        let (vae_scaling_factor, vae_scale_factor) = if vae_config.is_file() {
            let text =
                std::fs::read_to_string(&vae_config).map_err(|e| Error::io(&vae_config, e))?;
            let config: VaeConfig = serde_json::from_str(&text).map_err(|e| Error::Onnx {
                what: vae_config.display().to_string(),
                msg: e.to_string(),
            })?;
            let levels = config.block_out_channels.map_or(4, |b| b.len().max(1));
            (
                config.scaling_factor.unwrap_or(SD_VAE_SCALING_FACTOR),
                1usize << (levels - 1),
            )
        } else {
            (SD_VAE_SCALING_FACTOR, 8)
        };
        Ok(SdModelDir {
            root: root.to_owned(),
            text_encoder,
            unet,
            vae_decoder,
            tokenizer,
            scheduler: SchedulerConfig::load_from_export(root)?,
            vae_scaling_factor,
            vae_scale_factor,
        })
    }
}
