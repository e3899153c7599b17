//! ONNX Runtime sessions for the SD models, and conversion at their boundary.
//!
//! Exports differ in their I/O element types (fp32, or fp16 for `--dtype fp16` exports), in the token-id type
//! (int32 or int64) and in the UNet timestep (int64 `[batch]`, float `[batch]`, float scalar); see the reference
//! table of `sd-onnx-runtime.md` §2.2. So every model reads its inputs' types and ranks from the session once,
//! and converts f32 arrays to them at each call. Everything inside dream-ood is f32.

use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::{Tensor, TensorElementType};

use super::tensorrt::{JobShapes, ModelSource};
use crate::error::{Error, Result};
use crate::runtime::ort_environment;

/// The execution provider a model runs on. A provider the user asked for that cannot be registered is an
/// error, never a silent CPU fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    /// CUDA on one device (needs a `--features cuda` build and `onnxruntime-gpu`).
    Cuda {
        device: i32,
    },
    /// TensorRT on one device, with CUDA for the nodes TensorRT does not take (needs a
    /// `--features tensorrt,cuda` build, `onnxruntime-gpu` and the TensorRT 10 libraries).
    TensorRt {
        device: i32,
        /// Let TensorRT pick fp16 kernels (`trt_fp16_enable`); I/O stays as the export declares it.
        fp16: bool,
        /// Root of the engine and timing caches: each model's engines go in a folder of their own under it,
        /// keyed by the model's content, fp16 and the profile; the timing cache sits in the root
        /// ([`super::tensorrt`] says why). `None` rebuilds the engines at every start (minutes for SD's UNet).
        cache_dir: Option<std::path::PathBuf>,
        /// The shapes the job feeds, for explicit optimisation profiles (one engine per model, built at
        /// session creation); `None` lets TensorRT build for the shapes it meets at run time, rebuilding when a
        /// new one falls outside them.
        shapes: Option<JobShapes>,
    },
}

impl Provider {
    /// The same provider on another device (CPU stays CPU).
    pub fn on_device(&self, device: i32) -> Provider {
        match self {
            Provider::Cpu => Provider::Cpu,
            Provider::Cuda { .. } => Provider::Cuda { device },
            Provider::TensorRt {
                fp16,
                cache_dir,
                shapes,
                ..
            } => Provider::TensorRt {
                device,
                fp16: *fp16,
                cache_dir: cache_dir.clone(),
                shapes: *shapes,
            },
        }
    }

    /// The same provider with TensorRT profiles for a job of these shapes (other providers are unchanged:
    /// CUDA and the CPU take any shape without a rebuild).
    pub fn with_job_shapes(&self, job: JobShapes) -> Provider {
        match self {
            Provider::TensorRt {
                device,
                fp16,
                cache_dir,
                ..
            } => Provider::TensorRt {
                device: *device,
                fp16: *fp16,
                cache_dir: cache_dir.clone(),
                shapes: Some(job),
            },
            other => other.clone(),
        }
    }
}

/// How the SD sessions are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    pub provider: Provider,
    /// Intra-op threads per session (CPU); 0 lets ONNX Runtime choose.
    pub intra_threads: usize,
    /// Root of the edited-text-encoder cache ([`super::te_cache`]); `None` edits in memory at every load.
    pub text_encoder_cache: Option<std::path::PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            provider: Provider::Cpu,
            intra_threads: 0,
            text_encoder_cache: None,
        }
    }
}

/// Opens a model file (external data resolves beside it) with the requested provider.
pub fn open_session(path: &Path, opts: &SessionOptions) -> Result<Session> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model file not found"),
        ));
    }
    let what = path.display().to_string();
    builder(&what, opts, ModelSource::File(path))?
        .commit_from_file(path)
        .map_err(|e| Error::ort(what, e))
}

/// Opens a model from bytes (the edited text encoder), with the same options.
pub fn open_session_from_memory(
    bytes: &[u8],
    what: &str,
    opts: &SessionOptions,
) -> Result<Session> {
    builder(what, opts, ModelSource::Memory(bytes))?
        .commit_from_memory(bytes)
        .map_err(|e| Error::ort(what, e))
}

/// A session builder with the threads and provider of `opts`; `source` is the model the session will hold
/// (TensorRT reads its inputs for the profile and keys its engine folder by it).
fn builder(
    what: &str,
    opts: &SessionOptions,
    source: ModelSource<'_>,
) -> Result<ort::session::builder::SessionBuilder> {
    let mut builder = Session::builder(ort_environment()?).map_err(|e| Error::ort(what, e))?;
    if opts.intra_threads > 0 {
        builder = builder
            .with_intra_threads(opts.intra_threads)
            .map_err(|e| Error::ort(what, e))?;
    }
    register_provider(builder, &opts.provider, what, source)
}

fn register_provider(
    builder: ort::session::builder::SessionBuilder,
    provider: &Provider,
    what: &str,
    #[cfg_attr(
        not(all(feature = "tensorrt", feature = "cuda")),
        allow(unused_variables)
    )]
    source: ModelSource<'_>,
) -> Result<ort::session::builder::SessionBuilder> {
    match provider {
        Provider::Cpu => Ok(builder),
        #[cfg(feature = "cuda")]
        Provider::Cuda { device } => builder
            .with_execution_providers([ort::ep::CUDA::default()
                .with_device_id(*device)
                .build()
                .error_on_failure()])
            .map_err(|e| Error::ort(format!("{what}: registering CUDA device {device}"), e)),
        #[cfg(all(feature = "tensorrt", feature = "cuda"))]
        Provider::TensorRt {
            device,
            fp16,
            cache_dir,
            shapes,
        } => {
            let settings = super::tensorrt::session_settings(
                source,
                what,
                *fp16,
                shapes.as_ref(),
                cache_dir.as_deref(),
            )?;
            let mut trt = ort::ep::TensorRT::default()
                .with_device_id(*device)
                .with_fp16(*fp16);
            if let Some(profile) = &settings.profile {
                trt = trt
                    .with_profile_min_shapes(&profile.min)
                    .with_profile_opt_shapes(&profile.opt)
                    .with_profile_max_shapes(&profile.max);
            }
            if let (Some(engines), Some(timing)) = (&settings.engine_dir, &settings.timing_dir) {
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(engines.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(timing.display());
            }
            builder
                .with_execution_providers([
                    trt.build().error_on_failure(),
                    ort::ep::CUDA::default()
                        .with_device_id(*device)
                        .build()
                        .error_on_failure(),
                ])
                .map_err(|e| {
                    Error::ort(
                        format!("{what}: registering TensorRT on device {device}"),
                        e,
                    )
                })
        }
        #[cfg(not(all(feature = "tensorrt", feature = "cuda")))]
        Provider::TensorRt { .. } => Err(Error::InvalidValue {
            key: "ep".to_owned(),
            msg: format!(
                "{what}: TensorRT was requested but this binary was built without the `tensorrt` and `cuda` features (`make build-gpu`)"
            ),
        }),
        #[cfg(not(feature = "cuda"))]
        Provider::Cuda { .. } => Err(Error::InvalidValue {
            key: "ep".to_owned(),
            msg: format!(
                "{what}: CUDA was requested but this binary was built without the `cuda` feature (`make build-gpu`)"
            ),
        }),
    }
}

/// The element type and the static rank of one input, as the session declares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSpec {
    pub elem: TensorElementType,
    pub rank: usize,
}

/// Reads an input's spec, failing with the names the model does have.
pub fn input_spec(session: &Session, model: &str, name: &str) -> Result<InputSpec> {
    let outlet = session
        .inputs()
        .iter()
        .find(|o| o.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
            Error::Onnx {
                what: model.to_owned(),
                msg: format!("has no input `{name}` (inputs: {names:?})"),
            }
        })?;
    let elem = outlet.dtype().tensor_type().ok_or_else(|| Error::Onnx {
        what: model.to_owned(),
        msg: format!("input `{name}` is not a tensor"),
    })?;
    let rank = outlet.dtype().tensor_shape().map_or(0, |s| s.len());
    Ok(InputSpec { elem, rank })
}

/// Checks that the model has an output of this name.
pub fn require_output(session: &Session, model: &str, name: &str) -> Result<()> {
    if session.outputs().iter().any(|o| o.name() == name) {
        return Ok(());
    }
    let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    Err(Error::Onnx {
        what: model.to_owned(),
        msg: format!("has no output `{name}` (outputs: {names:?})"),
    })
}

/// An f32 array as a session input of element type `elem` (f32 or f16).
pub fn float_input(
    array: ArrayD<f32>,
    elem: TensorElementType,
    what: &str,
) -> Result<SessionInputValue<'static>> {
    let shape = array.shape().to_vec();
    let data = array.into_raw_vec_and_offset().0;
    match elem {
        TensorElementType::Float32 => Ok(Tensor::from_array((shape, data))
            .map_err(|e| Error::ort(what, e))?
            .into()),
        TensorElementType::Float16 => {
            let data: Vec<half::f16> = data.into_iter().map(half::f16::from_f32).collect();
            Ok(Tensor::from_array((shape, data))
                .map_err(|e| Error::ort(what, e))?
                .into())
        }
        other => Err(Error::Onnx {
            what: what.to_owned(),
            msg: format!("expected a float32 or float16 input, the model declares {other:?}"),
        }),
    }
}

/// Token ids as a session input of element type `elem` (int32 or int64), shape `[batch, 77]`.
pub fn ids_input(
    ids: &[Vec<u32>],
    elem: TensorElementType,
    what: &str,
) -> Result<SessionInputValue<'static>> {
    let shape = vec![ids.len(), ids.first().map_or(0, Vec::len)];
    match elem {
        TensorElementType::Int64 => {
            let data: Vec<i64> = ids.iter().flatten().map(|&i| i64::from(i)).collect();
            Ok(Tensor::from_array((shape, data))
                .map_err(|e| Error::ort(what, e))?
                .into())
        }
        TensorElementType::Int32 => {
            let data: Vec<i32> = ids.iter().flatten().map(|&i| i as i32).collect();
            Ok(Tensor::from_array((shape, data))
                .map_err(|e| Error::ort(what, e))?
                .into())
        }
        other => Err(Error::Onnx {
            what: what.to_owned(),
            msg: format!("expected int32 or int64 token ids, the model declares {other:?}"),
        }),
    }
}

/// A float output (f32 or f16) as an f32 array.
pub fn float_output(outputs: &SessionOutputs<'_>, name: &str, what: &str) -> Result<ArrayD<f32>> {
    let value = &outputs[name];
    let err = |e| Error::ort(format!("{what}: output `{name}`"), e);
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        return ArrayD::from_shape_vec(IxDyn(&dims), data.to_vec())
            .map_err(|e| shape_err(what, name, e));
    }
    let (shape, data) = value.try_extract_tensor::<half::f16>().map_err(err)?;
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let data = data.iter().map(|v| v.to_f32()).collect();
    ArrayD::from_shape_vec(IxDyn(&dims), data).map_err(|e| shape_err(what, name, e))
}

fn shape_err(what: &str, name: &str, e: ndarray::ShapeError) -> Error {
    Error::Onnx {
        what: what.to_owned(),
        msg: format!("output `{name}`: {e}"),
    }
}
