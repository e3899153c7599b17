//! Build-time wiring of the two native libraries (facts in the README's "Building" section).
//!
//! - libtorch is linked (by torch-sys) from `$LIBTORCH/lib`; rustc does not carry torch-sys' rpath into
//!   our binaries, so every target gets `-rpath $LIBTORCH/lib` here: binaries and tests then run with no
//!   `LD_LIBRARY_PATH`.
//! - When `$LIBTORCH/lib` holds `libtorch_cuda.so` (the full CUDA wheel from `tools/bootstrap --gpu`), it is
//!   linked with `--no-as-needed`: nothing references its symbols directly, so the default `--as-needed`
//!   would drop it and `tch::Cuda::is_available()` would stay false.
//! - ONNX Runtime is loaded at run time (`ort` with `load-dynamic`). The absolute path of the library at
//!   build time is baked in as `DREAM_OOD_ORT_DYLIB`, so the binary finds it from any directory;
//!   `ORT_DYLIB_PATH` at run time overrides it.
//! - The vendored `src/onnx/proto/onnx.proto` is compiled to prost types (`$OUT_DIR/onnx.rs`) with protox, a
//!   pure-Rust protobuf compiler, so no `protoc` binary is needed.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=ORT_DYLIB_PATH");
    println!("cargo:rerun-if-changed=build.rs");
    compile_onnx_proto();

    // torch-sys has already failed with its own message when LIBTORCH is unset; repeat the fix here.
    let libtorch = env::var("LIBTORCH").unwrap_or_else(|_| {
        panic!("LIBTORCH is not set: run `tools/bootstrap` (or `make test`), which fills .deps/ and is read by .cargo/config.toml")
    });
    let lib_dir = PathBuf::from(&libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:rustc-cfg=libtorch_cuda_linked");
    }
    println!("cargo::rustc-check-cfg=cfg(libtorch_cuda_linked)");

    let ort = env::var("ORT_DYLIB_PATH").unwrap_or_default();
    println!("cargo:rustc-env=DREAM_OOD_ORT_DYLIB={ort}");
    let version =
        std::fs::read_to_string(PathBuf::from(&libtorch).join("build-version")).unwrap_or_default();
    println!(
        "cargo:rustc-env=DREAM_OOD_LIBTORCH_BUILD={}",
        version.trim()
    );
}

fn compile_onnx_proto() {
    const PROTO: &str = "src/onnx/proto/onnx.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors =
        protox::compile([PROTO], ["src/onnx/proto"]).unwrap_or_else(|e| panic!("{PROTO}: {e}"));
    prost_build::Config::new()
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("generating Rust types from {PROTO}: {e}"));
}
