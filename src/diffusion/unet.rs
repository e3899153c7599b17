//! The SD UNet: ε (or v) prediction for a batch of latents at one timestep.

use std::path::Path;

use ndarray::ArrayD;
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType};

use super::session::{
    InputSpec, SessionOptions, float_input, float_output, input_spec, open_session, require_output,
};
use crate::error::{Error, Result};

/// A loaded UNet (`unet/model.onnx`).
pub struct Unet {
    session: Session,
    sample: InputSpec,
    timestep: InputSpec,
    context: InputSpec,
    what: String,
}

impl Unet {
    pub fn load(path: &Path, opts: &SessionOptions) -> Result<Unet> {
        let what = path.display().to_string();
        let session = open_session(path, opts)?;
        let sample = input_spec(&session, &what, "sample")?;
        let timestep = input_spec(&session, &what, "timestep")?;
        let context = input_spec(&session, &what, "encoder_hidden_states")?;
        require_output(&session, &what, "out_sample")?;
        if timestep.rank > 1 {
            return Err(Error::Onnx {
                what,
                msg: format!(
                    "input `timestep` has rank {}; expected a scalar or [batch]",
                    timestep.rank
                ),
            });
        }
        Ok(Unet {
            session,
            sample,
            timestep,
            context,
            what,
        })
    }

    /// The model output for `sample` `[B, C, h, w]` at `timestep` with `context` `[B, 77, D]`.
    pub fn predict(
        &mut self,
        sample: ArrayD<f32>,
        timestep: f64,
        context: ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        let batch = sample.shape()[0];
        let t = self.timestep_input(timestep, batch)?;
        let inputs = vec![
            (
                "sample".to_owned(),
                float_input(sample, self.sample.elem, &self.what)?,
            ),
            ("timestep".to_owned(), t),
            (
                "encoder_hidden_states".to_owned(),
                float_input(context, self.context.elem, &self.what)?,
            ),
        ];
        let outputs = self
            .session
            .run(inputs)
            .map_err(|e| Error::ort(self.what.clone(), e))?;
        float_output(&outputs, "out_sample", &self.what)
    }

    /// The timestep in the export's own form: int64/int32 (truncated, as diffusers' ONNX pipeline does) or
    /// float, a scalar (optimum >= 1.24) or one per batch row.
    fn timestep_input(&self, t: f64, batch: usize) -> Result<SessionInputValue<'static>> {
        let shape: Vec<usize> = if self.timestep.rank == 0 {
            vec![]
        } else {
            vec![batch]
        };
        let n = shape.iter().product::<usize>().max(1);
        let err = |e| Error::ort(format!("{}: timestep", self.what), e);
        Ok(match self.timestep.elem {
            TensorElementType::Int64 => Tensor::from_array((shape, vec![t as i64; n]))
                .map_err(err)?
                .into(),
            TensorElementType::Int32 => Tensor::from_array((shape, vec![t as i32; n]))
                .map_err(err)?
                .into(),
            TensorElementType::Float32 => Tensor::from_array((shape, vec![t as f32; n]))
                .map_err(err)?
                .into(),
            TensorElementType::Float16 => {
                Tensor::from_array((shape, vec![half::f16::from_f64(t); n]))
                    .map_err(err)?
                    .into()
            }
            other => {
                return Err(Error::Onnx {
                    what: self.what.clone(),
                    msg: format!(
                        "input `timestep` has element type {other:?}; expected int64, int32 or float"
                    ),
                });
            }
        })
    }
}
