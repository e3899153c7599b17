//! `dream-ood doctor`: what this machine can do, proven by running both runtimes.
//!
//! The report lists versions, devices, ONNX Runtime execution providers and thread counts, then runs two
//! smoke tests at the same time in this one process (the product trains with libtorch while ONNX Runtime
//! generates or scores, so both must coexist):
//! - libtorch: a few SGD steps on a tiny MLP must lower its loss;
//! - ONNX Runtime: `tests/fixtures/doctor/tiny_mlp.onnx` (embedded in the binary) must reproduce the
//!   output Python onnxruntime computed for it (`tools/make_doctor_fixture.py`).
//!
//! Every failure is collected in [`DoctorReport::problems`]; the CLI exits non-zero when there is one.

use std::ffi::{CStr, c_char, c_int};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::{Module, OptimizerConfig};

use super::{LibtorchInfo, OrtDylib, libtorch_info, ort_dylib_path, ort_environment, ort_version};
use crate::config::DeviceSpec;
use crate::error::{Error, Result};
use crate::progress::Progress;

const SMOKE_MODEL: &[u8] = include_bytes!("../../tests/fixtures/doctor/tiny_mlp.onnx");
const SMOKE_EXPECTED: &str = include_str!("../../tests/fixtures/doctor/tiny_mlp_expected.json");

/// Everything doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub dream_ood_version: String,
    pub machine: MachineInfo,
    pub libtorch: LibtorchInfo,
    pub onnxruntime: OrtReport,
    pub smoke: Vec<SmokeResult>,
    /// One line per thing that is broken; empty when all is well.
    pub problems: Vec<String>,
}

/// The host as Rust sees it.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    pub os: String,
    pub arch: String,
    /// `std::thread::available_parallelism` (respects cgroup and affinity limits).
    pub available_cpus: usize,
}

/// ONNX Runtime: where it came from, its version and its execution providers.
#[derive(Debug, Clone, Serialize)]
pub struct OrtReport {
    pub dylib: OrtDylib,
    pub version: Option<String>,
    /// Providers the loaded library was compiled with (`GetAvailableProviders`).
    pub compiled_providers: Vec<String>,
    /// Whether each provider dream-ood can use registers on a real session.
    pub providers: Vec<ProviderCheck>,
    /// Why the library could not be loaded, if it could not.
    pub load_error: Option<String>,
}

/// The result of registering one execution provider.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderCheck {
    pub name: String,
    /// `registered`, `failed` or `not built in`.
    pub status: String,
    pub detail: String,
}

/// One smoke run.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub seconds: f64,
}

#[derive(Deserialize)]
struct SmokeExpected {
    input_name: String,
    output_name: String,
    input_shape: Vec<usize>,
    input: Vec<f32>,
    expected: Vec<f32>,
    atol: f32,
}

/// Runs every check, reporting each finished one to `progress`. Never fails: what is broken goes into
/// `problems`.
pub fn run_doctor(progress: &dyn Progress) -> DoctorReport {
    progress.start("doctor", 3, 0);
    let machine = MachineInfo {
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        available_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let libtorch = libtorch_info();
    progress.advance(1);
    let onnxruntime = ort_report();
    progress.advance(1);
    let ort_loaded = onnxruntime.load_error.is_none();

    // Both runtimes at once, in one process.
    let (torch_smoke, ort_smoke) = std::thread::scope(|scope| {
        let ort_thread = scope.spawn(move || ort_loaded.then(|| timed("onnxruntime", ort_smoke)));
        let torch_smoke = timed("libtorch", torch_smoke);
        (
            torch_smoke,
            ort_thread
                .join()
                .unwrap_or_else(|_| Some(panicked("onnxruntime"))),
        )
    });
    progress.advance(1);
    progress.finish();

    let mut problems = Vec::new();
    if let Some(e) = &onnxruntime.load_error {
        problems.push(e.clone());
    }
    for check in &onnxruntime.providers {
        if check.status == "failed" {
            problems.push(format!(
                "ONNX Runtime provider {} does not register: {}",
                check.name, check.detail
            ));
        }
    }
    let smoke: Vec<SmokeResult> = [Some(torch_smoke), ort_smoke]
        .into_iter()
        .flatten()
        .collect();
    for s in smoke.iter().filter(|s| !s.ok) {
        problems.push(format!("{} smoke run failed: {}", s.name, s.detail));
    }
    DoctorReport {
        dream_ood_version: env!("CARGO_PKG_VERSION").to_owned(),
        machine,
        libtorch,
        onnxruntime,
        smoke,
        problems,
    }
}

fn timed(name: &str, f: impl FnOnce() -> Result<String>) -> SmokeResult {
    let start = Instant::now();
    let outcome = f();
    let seconds = start.elapsed().as_secs_f64();
    let (ok, detail) = match outcome {
        Ok(detail) => (true, detail),
        Err(e) => (false, e.to_string()),
    };
    SmokeResult {
        name: name.to_owned(),
        ok,
        detail,
        seconds,
    }
}

fn panicked(name: &str) -> SmokeResult {
    SmokeResult {
        name: name.to_owned(),
        ok: false,
        detail: "the smoke run panicked".to_owned(),
        seconds: 0.0,
    }
}

/// A few SGD steps on `y = x·w*` with a tiny MLP, on the `auto` device; the loss must drop.
fn torch_smoke() -> Result<String> {
    const STEPS: usize = 30;
    let device = super::resolve_device(DeviceSpec::Auto)?;
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let root = vs.root();
    let net = tch::nn::seq()
        .add(tch::nn::linear(&root / "fc1", 4, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(tch::nn::linear(&root / "fc2", 16, 1, Default::default()));
    let x = tch::Tensor::f_randn([64, 4], (tch::Kind::Float, device))
        .map_err(|e| Error::torch("randn", e))?;
    let w_true = tch::Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25])
        .to_device(device)
        .view([4, 1]);
    let y = x.matmul(&w_true); // [64, 1]
    let mut opt = tch::nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.05)
    .map_err(|e| Error::torch("building SGD", e))?;
    let mut first = f64::NAN;
    let mut last = f64::NAN;
    for step in 0..STEPS {
        let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        let value = loss.double_value(&[]);
        if step == 0 {
            first = value;
        }
        last = value;
        opt.backward_step(&loss);
    }
    if !(last.is_finite() && last < 0.5 * first) {
        return Err(Error::Check {
            what: "libtorch SGD".to_owned(),
            msg: format!(
                "loss went from {first:.4} to {last:.4} in {STEPS} steps; expected it to halve"
            ),
        });
    }
    let device = super::device_name(device);
    Ok(format!(
        "{STEPS} SGD steps on {device}: MSE {first:.3} -> {last:.3}"
    ))
}

/// Runs the embedded fixture model and compares with Python onnxruntime's output.
fn ort_smoke() -> Result<String> {
    let expected: SmokeExpected =
        serde_json::from_str(SMOKE_EXPECTED).map_err(|e| Error::Check {
            what: "tiny_mlp_expected.json".to_owned(),
            msg: e.to_string(),
        })?;
    let env = ort_environment()?;
    let mut session = ort::session::Session::builder(env)
        .and_then(|b| Ok(b.with_intra_threads(1)?))
        .map_err(|e| Error::ort("tiny_mlp.onnx: session options", e))?
        .commit_from_memory(SMOKE_MODEL)
        .map_err(|e| Error::ort("tiny_mlp.onnx: loading", e))?;
    let input =
        ort::value::Tensor::from_array((expected.input_shape.clone(), expected.input.clone()))
            .map_err(|e| Error::ort("tiny_mlp.onnx: input tensor", e))?;
    let outputs = session
        .run(ort::inputs![expected.input_name.as_str() => input])
        .map_err(|e| Error::ort("tiny_mlp.onnx: run", e))?;
    let (_, got) = outputs[expected.output_name.as_str()]
        .try_extract_tensor::<f32>()
        .map_err(|e| Error::ort("tiny_mlp.onnx: output", e))?;
    if got.len() != expected.expected.len() {
        return Err(Error::Shape {
            what: "tiny_mlp.onnx output `probs`".to_owned(),
            expected: format!("{} values", expected.expected.len()),
            got: format!("{} values", got.len()),
        });
    }
    let diffs: Vec<f32> = got
        .iter()
        .zip(&expected.expected)
        .map(|(a, b)| (a - b).abs())
        .collect();
    // NaN-aware: a NaN output is a failure, not a difference that `f32::max` would skip.
    let max_diff = diffs
        .iter()
        .copied()
        .fold(0.0f32, |m, d| if d.is_nan() || d > m { d } else { m });
    if max_diff.is_nan() || max_diff > expected.atol {
        return Err(Error::Check {
            what: "ONNX Runtime tiny_mlp.onnx".to_owned(),
            msg: format!(
                "max |diff| {max_diff:e} against Python onnxruntime exceeds {:e}",
                expected.atol
            ),
        });
    }
    Ok(format!(
        "tiny_mlp.onnx matches Python onnxruntime: max |diff| {max_diff:.1e} (tolerance {:.0e})",
        expected.atol
    ))
}

fn ort_report() -> OrtReport {
    let dylib = ort_dylib_path();
    if let Err(e) = ort_environment() {
        return OrtReport {
            dylib,
            version: None,
            compiled_providers: Vec::new(),
            providers: Vec::new(),
            load_error: Some(e.to_string()),
        };
    }
    let compiled_providers =
        compiled_providers().unwrap_or_else(|e| vec![format!("(query failed: {e})")]);
    OrtReport {
        dylib,
        version: ort_version().ok(),
        compiled_providers,
        providers: provider_checks(),
        load_error: None,
    }
}

/// The execution providers the loaded ONNX Runtime was compiled with.
fn compiled_providers() -> Result<Vec<String>> {
    let api = ort::api();
    let mut names: *mut *mut c_char = std::ptr::null_mut();
    let mut count: c_int = 0;
    // SAFETY: the API fills `names` with `count` C strings that stay valid until released below.
    let status = unsafe { (api.GetAvailableProviders)(&mut names, &mut count) };
    if !status.0.is_null() {
        // SAFETY: a non-null status carries a message and must be released once.
        let msg = unsafe { CStr::from_ptr((api.GetErrorMessage)(status.0)) }
            .to_string_lossy()
            .into_owned();
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err(Error::Check {
            what: "GetAvailableProviders".to_owned(),
            msg,
        });
    }
    let list = (0..count.max(0) as usize)
        // SAFETY: index < count; each entry is a NUL-terminated string.
        .map(|i| {
            unsafe { CStr::from_ptr(*names.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: releases exactly what GetAvailableProviders returned.
    let status = unsafe { (api.ReleaseAvailableProviders)(names, count) };
    if !status.0.is_null() {
        unsafe { (api.ReleaseStatus)(status.0) };
    }
    Ok(list)
}

/// Registers each provider dream-ood knows on a real session (with `error_on_failure`, so nothing falls back
/// silently) and loads the fixture model with it.
fn provider_checks() -> Vec<ProviderCheck> {
    let mut checks = vec![register_check("CPU", ort::ep::CPU::default().build())];
    #[cfg(feature = "cuda")]
    checks.push(register_check("CUDA", ort::ep::CUDA::default().build()));
    #[cfg(not(feature = "cuda"))]
    checks.push(not_built_in("CUDA", "cuda"));
    #[cfg(feature = "tensorrt")]
    checks.push(register_check(
        "TensorRT",
        ort::ep::TensorRT::default().build(),
    ));
    #[cfg(not(feature = "tensorrt"))]
    checks.push(not_built_in("TensorRT", "tensorrt"));
    checks
}

#[cfg_attr(all(feature = "cuda", feature = "tensorrt"), allow(dead_code))]
fn not_built_in(name: &str, feature: &str) -> ProviderCheck {
    ProviderCheck {
        name: name.to_owned(),
        status: "not built in".to_owned(),
        detail: format!(
            "this binary was built without the `{feature}` feature; see `make build-gpu`"
        ),
    }
}

fn register_check(name: &str, ep: ort::ep::ExecutionProviderDispatch) -> ProviderCheck {
    let outcome = ort_environment().and_then(|env| {
        ort::session::Session::builder(env)
            .and_then(|b| Ok(b.with_execution_providers([ep.error_on_failure()])?))
            .map_err(|e| Error::ort("registering", e))?
            .commit_from_memory(SMOKE_MODEL)
            .map_err(|e| Error::ort("loading tiny_mlp.onnx", e))
    });
    let (status, detail) = match outcome {
        Ok(_) => (
            "registered",
            "a session with it loads the fixture model".to_owned(),
        ),
        Err(e) => ("failed", e.to_string()),
    };
    ProviderCheck {
        name: name.to_owned(),
        status: status.to_owned(),
        detail,
    }
}

impl DoctorReport {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        let yes = |b: bool| if b { "yes" } else { "no" };
        line(format!("dream-ood {}", self.dream_ood_version));
        let m = &self.machine;
        line(format!(
            "machine       {} {}, {} CPUs available",
            m.os, m.arch, m.available_cpus
        ));
        let t = &self.libtorch;
        let from = t
            .loaded_from
            .as_ref()
            .map_or("(not found in /proc/self/maps)".to_owned(), |p| {
                p.display().to_string()
            });
        line(format!("libtorch      {} from {from}", t.build_version));
        line(format!(
            "              threads {} intra-op, {} inter-op; OpenMP {}, MKL {}",
            t.intra_op_threads,
            t.inter_op_threads,
            yes(t.openmp),
            yes(t.mkl)
        ));
        let cuda = if t.cuda_available {
            format!(
                "{} device(s), cuDNN {}",
                t.cuda_device_count,
                yes(t.cudnn_available)
            )
        } else if t.cuda_linked {
            "not available (libtorch_cuda is linked, but no GPU or driver is visible)".to_owned()
        } else {
            "not available (CPU build: libtorch_cuda not linked; `make build-gpu` on a CUDA machine)".to_owned()
        };
        line(format!("  CUDA        {cuda}"));
        let o = &self.onnxruntime;
        match (&o.version, &o.load_error) {
            (_, Some(e)) => line(format!("ONNX Runtime  NOT LOADED: {e}")),
            (v, None) => line(format!(
                "ONNX Runtime  {} from {} ({})",
                v.as_deref().unwrap_or("(unknown version)"),
                o.dylib.path.display(),
                o.dylib.source
            )),
        }
        if o.load_error.is_none() {
            line(format!("  compiled in {}", o.compiled_providers.join(", ")));
        }
        for p in &o.providers {
            line(format!("  {:<11} {}: {}", p.name, p.status, p.detail));
        }
        line("smoke runs    (both runtimes at once, in one process)".to_owned());
        for s in &self.smoke {
            let verdict = if s.ok { "ok" } else { "FAILED" };
            line(format!(
                "  {:<11} {verdict}: {} ({:.2} s)",
                s.name, s.detail, s.seconds
            ));
        }
        if self.problems.is_empty() {
            line("all good".to_owned());
        } else {
            line(format!("{} problem(s):", self.problems.len()));
            for p in &self.problems {
                line(format!("  - {p}"));
            }
        }
        out
    }
}
