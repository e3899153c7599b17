//! Finding and initialising the two native runtimes, and choosing devices.
//!
//! - **ONNX Runtime** is loaded at run time (`ort` with `load-dynamic`). [`ort_environment`] loads it once
//!   per process from [`ort_dylib_path`]: `ORT_DYLIB_PATH` when set, else the path baked in at build time
//!   (`.deps/onnxruntime/capi/libonnxruntime.so.1.31.1` of the checkout that built the binary). A missing or
//!   wrong library is an [`Error::OrtLibrary`] naming the path and the fix, never ort's panic.
//! - **libtorch** is linked; the loader finds it through the rpath that `build.rs` sets. [`libtorch_info`]
//!   reports the version built against and the file actually loaded.
//! - [`resolve_device`] turns a [`DeviceSpec`] into a `tch::Device`, failing instead of falling back.
//! - [`heap`] keeps freed memory in the process for libtorch training on the CPU (glibc `mallopt`).
//!
//! `dream-ood doctor` ([`doctor`]) reports all of it and runs both runtimes in one process.

pub mod doctor;
pub mod heap;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::Serialize;

use crate::config::DeviceSpec;
use crate::error::{Error, Result};

/// The ONNX Runtime library path baked in by `build.rs` (empty when the build had none).
const BAKED_ORT_DYLIB: &str = env!("DREAM_OOD_ORT_DYLIB");
/// The libtorch version string of the build (`$LIBTORCH/build-version`, e.g. `2.11.0+cu130`).
pub const LIBTORCH_BUILD_VERSION: &str = env!("DREAM_OOD_LIBTORCH_BUILD");

/// Where the ONNX Runtime library is taken from, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrtDylib {
    pub path: PathBuf,
    /// `"ORT_DYLIB_PATH"` or `"built-in"`.
    pub source: &'static str,
}

/// The ONNX Runtime library to load: `ORT_DYLIB_PATH` if set and non-empty, else the baked-in path.
pub fn ort_dylib_path() -> OrtDylib {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => OrtDylib {
            path: PathBuf::from(p),
            source: "ORT_DYLIB_PATH",
        },
        _ => OrtDylib {
            path: PathBuf::from(BAKED_ORT_DYLIB),
            source: "built-in",
        },
    }
}

static ORT_ENV: OnceLock<ort::environment::Environment> = OnceLock::new();
static ORT_INIT: Mutex<()> = Mutex::new(());

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn ort_environment() -> Result<&'static ort::environment::Environment> {
    if let Some(env) = ORT_ENV.get() {
        return Ok(env);
    }
    let _guard = ORT_INIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = ORT_ENV.get() {
        return Ok(env);
    }
    let dylib = ort_dylib_path();
    let builder = load_ort(&dylib.path)?;
    let env = builder
        .with_name("dream-ood")
        .with_telemetry(false)
        .build()
        .map_err(|e| Error::ort("creating the environment", e))?;
    tracing::debug!(path = %dylib.path.display(), source = dylib.source, "ONNX Runtime loaded");
    Ok(ORT_ENV.get_or_init(|| env))
}

fn load_ort(path: &Path) -> Result<ort::environment::EnvironmentBuilder> {
    let missing = |reason: &str| Error::OrtLibrary {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if path.as_os_str().is_empty() {
        // ort would fall back to a bare `libonnxruntime.so` lookup, which is not what we ship.
        return Err(missing(
            "no path: this binary was built without ORT_DYLIB_PATH",
        ));
    }
    if !path.is_file() {
        return Err(missing("no such file"));
    }
    ort::init_from(path).map_err(|e| missing(&e.to_string()))
}

/// The version string (`1.31.1`) of the ONNX Runtime library this process loaded.
pub fn ort_version() -> Result<String> {
    ort_environment()?;
    let path = ort_dylib_path().path;
    let fail = |msg: String| Error::Check {
        what: format!("ONNX Runtime version of {}", path.display()),
        msg,
    };
    // SAFETY: the library is already loaded by ort (this only takes another reference to it), and
    // `OrtGetApiBase` / `GetVersionString` are the stable C entry points of every ONNX Runtime release;
    // the returned string is static and never freed.
    unsafe {
        let lib = libloading::Library::new(&path).map_err(|e| fail(e.to_string()))?;
        let get_api_base: libloading::Symbol<
            unsafe extern "C" fn() -> *const ort::sys::OrtApiBase,
        > = lib.get(b"OrtGetApiBase").map_err(|e| fail(e.to_string()))?;
        let base = get_api_base();
        if base.is_null() {
            return Err(fail("OrtGetApiBase returned null".to_owned()));
        }
        let version = ((*base).GetVersionString)();
        Ok(std::ffi::CStr::from_ptr(version)
            .to_string_lossy()
            .into_owned())
    }
}

/// What libtorch this process runs on.
#[derive(Debug, Clone, Serialize)]
pub struct LibtorchInfo {
    /// The version the binary was built against.
    pub build_version: String,
    /// The `libtorch_cpu.so` the loader actually mapped (from `/proc/self/maps`).
    pub loaded_from: Option<PathBuf>,
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cudnn_available: bool,
    /// Whether `libtorch_cuda.so` was linked in (a `make build-gpu` build).
    pub cuda_linked: bool,
    pub openmp: bool,
    pub mkl: bool,
    pub intra_op_threads: i32,
    pub inter_op_threads: i32,
}

/// Queries libtorch (this initialises it, and CUDA when linked).
pub fn libtorch_info() -> LibtorchInfo {
    LibtorchInfo {
        build_version: LIBTORCH_BUILD_VERSION.to_owned(),
        loaded_from: loaded_library("libtorch_cpu.so"),
        cuda_available: tch::Cuda::is_available(),
        cuda_device_count: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cuda_linked: cfg!(libtorch_cuda_linked),
        openmp: tch::utils::has_openmp(),
        mkl: tch::utils::has_mkl(),
        intra_op_threads: tch::get_num_threads(),
        inter_op_threads: tch::get_num_interop_threads(),
    }
}

/// The path of a shared library mapped into this process, by file name.
fn loaded_library(file_name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| Path::new(path).file_name().is_some_and(|n| n == file_name))
        .map(PathBuf::from)
}

/// A device as configs spell it (`cpu`, `cuda:N`), for logs and reports.
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_owned(),
    }
}

/// Resolves a device spec against what libtorch sees. An explicit CUDA device without CUDA is an error;
/// `auto` logs its choice.
pub fn resolve_device(spec: DeviceSpec) -> Result<tch::Device> {
    let count = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    match spec {
        DeviceSpec::Cpu => Ok(tch::Device::Cpu),
        DeviceSpec::Auto if count > 0 => {
            tracing::info!("device auto: using cuda:0 ({count} CUDA device(s) visible)");
            Ok(tch::Device::Cuda(0))
        }
        DeviceSpec::Auto => {
            tracing::info!("device auto: no CUDA device visible to libtorch, using the CPU");
            Ok(tch::Device::Cpu)
        }
        DeviceSpec::Cuda(i) if (i as i64) < count => Ok(tch::Device::Cuda(i)),
        DeviceSpec::Cuda(i) => Err(Error::InvalidValue {
            key: "device".to_owned(),
            msg: if count == 0 {
                format!(
                    "cuda:{i} requested but libtorch sees no CUDA device{}",
                    if cfg!(libtorch_cuda_linked) {
                        ""
                    } else {
                        " (this binary is a CPU build: use `make build-gpu` on a CUDA machine)"
                    }
                )
            } else {
                format!("cuda:{i} requested but only {count} CUDA device(s) are visible")
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_device_resolves_and_cuda_fails_loudly_without_gpu() {
        assert_eq!(resolve_device(DeviceSpec::Cpu).unwrap(), tch::Device::Cpu);
        if !tch::Cuda::is_available() {
            let err = resolve_device(DeviceSpec::Cuda(0)).unwrap_err().to_string();
            assert!(
                err.starts_with("device: cuda:0 requested but libtorch sees no CUDA device"),
                "{err}"
            );
            assert_eq!(resolve_device(DeviceSpec::Auto).unwrap(), tch::Device::Cpu);
        }
    }

    #[test]
    fn libtorch_is_loaded_from_the_bootstrapped_build() {
        let info = libtorch_info();
        assert!(
            info.build_version.starts_with("2.11.0"),
            "{}",
            info.build_version
        );
        let loaded = info.loaded_from.expect("libtorch_cpu.so is mapped");
        assert!(
            loaded.ends_with("torch/lib/libtorch_cpu.so"),
            "{}",
            loaded.display()
        );
    }
}
