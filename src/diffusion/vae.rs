//! The SD VAE decoder: latents to images.

use std::path::Path;

use ndarray::ArrayD;
use ort::session::Session;

use super::session::{
    InputSpec, SessionOptions, float_input, float_output, input_spec, open_session, require_output,
};
use crate::error::{Error, Result};

/// A loaded VAE decoder (`vae_decoder/model.onnx`).
pub struct VaeDecoder {
    session: Session,
    latent: InputSpec,
    what: String,
}

impl VaeDecoder {
    pub fn load(path: &Path, opts: &SessionOptions) -> Result<VaeDecoder> {
        let what = path.display().to_string();
        let session = open_session(path, opts)?;
        let latent = input_spec(&session, &what, "latent_sample")?;
        require_output(&session, &what, "sample")?;
        Ok(VaeDecoder {
            session,
            latent,
            what,
        })
    }

    /// Images `[B, 3, H, W]` in about [-1, 1] from already-unscaled latents (`latents / scaling_factor`).
    pub fn decode(&mut self, latents: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let inputs = vec![(
            "latent_sample".to_owned(),
            float_input(latents, self.latent.elem, &self.what)?,
        )];
        let outputs = self
            .session
            .run(inputs)
            .map_err(|e| Error::ort(self.what.clone(), e))?;
        float_output(&outputs, "sample", &self.what)
    }
}
