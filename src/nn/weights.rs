//! Moving a `VarStore`'s tensors out of libtorch as plain named f32 arrays (for the ONNX exporter).

use crate::error::{Error, Result};
use crate::onnx::export::{NamedTensor, Weights};

/// Every variable of `vs` (parameters and BatchNorm buffers), by PyTorch name, as f32 on the CPU.
pub fn named_weights(vs: &tch::nn::VarStore) -> Result<Weights> {
    let mut weights = Weights::new();
    for (name, tensor) in vs.variables() {
        let t = tensor
            .f_to_kind(tch::Kind::Float)
            .and_then(|t| t.f_to_device(tch::Device::Cpu))
            .and_then(|t| t.f_contiguous())
            .map_err(|e| Error::torch(format!("reading `{name}`"), e))?;
        let dims: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let data = Vec::<f32>::try_from(t.flatten(0, -1))
            .map_err(|e| Error::torch(format!("copying `{name}`"), e))?;
        weights.insert(name, NamedTensor { dims, data });
    }
    Ok(weights)
}
