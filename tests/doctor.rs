use crate::common::{run_clean, stderr, stdout};

/// The binary, from a folder outside the checkout with no environment but PATH, finds libtorch (rpath)
/// and ONNX Runtime (baked-in path) and passes every check.
#[test]
fn doctor_runs_anywhere_with_no_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_clean(dir.path(), &["doctor", "--json"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout(&out)).expect("--json prints JSON");
    assert_eq!(report["dream_ood_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        report["libtorch"]["build_version"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0")
    );
    assert_eq!(report["onnxruntime"]["version"], "1.31.1");
    assert_eq!(report["onnxruntime"]["dylib"]["source"], "built-in");
    let compiled = report["onnxruntime"]["compiled_providers"]
        .as_array()
        .unwrap();
    assert!(
        compiled.iter().any(|p| p == "CPUExecutionProvider"),
        "{compiled:?}"
    );
    let cpu = &report["onnxruntime"]["providers"][0];
    assert_eq!(
        (cpu["name"].as_str(), cpu["status"].as_str()),
        (Some("CPU"), Some("registered"))
    );
    let smoke = report["smoke"].as_array().unwrap();
    let names: Vec<&str> = smoke.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["libtorch", "onnxruntime"]);
    assert!(smoke.iter().all(|s| s["ok"] == true), "{smoke:?}");
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn doctor_text_report_says_all_good() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_clean(dir.path(), &["doctor"], &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ONNX Runtime  1.31.1 from "), "{text}");
    assert!(text.contains("libtorch    ok: 30 SGD steps"), "{text}");
    assert!(
        text.contains("onnxruntime ok: tiny_mlp.onnx matches Python onnxruntime"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("all good"), "{text}");
}

/// A missing ONNX Runtime library is one clear line naming the path and the fix, and a non-zero exit;
/// libtorch's smoke run still runs.
#[test]
fn missing_onnxruntime_gives_the_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("lib/libonnxruntime.so.1.31.1");
    let missing = missing.to_str().unwrap();
    let out = run_clean(dir.path(), &["doctor"], &[("ORT_DYLIB_PATH", missing)]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let expected = format!(
        "cannot load ONNX Runtime from {missing} (no such file); run `tools/bootstrap` (or `make test`) to put \
         it in .deps/, or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.31 or newer"
    );
    assert!(
        text.contains(&format!("ONNX Runtime  NOT LOADED: {expected}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("1 problem(s):\n  - {expected}")),
        "{text}"
    );
    assert!(text.contains("libtorch    ok:"), "{text}");
}

/// A file that is not an ONNX Runtime library gives the same kind of error, with dlopen's reason.
#[test]
fn wrong_library_file_gives_the_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("libonnxruntime.so");
    std::fs::write(&bogus, b"not a shared object").unwrap();
    let out = run_clean(
        dir.path(),
        &["doctor", "--json"],
        &[("ORT_DYLIB_PATH", bogus.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let err = report["onnxruntime"]["load_error"].as_str().unwrap();
    assert!(
        err.starts_with(&format!(
            "cannot load ONNX Runtime from {}",
            bogus.display()
        )),
        "{err}"
    );
    assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
    assert_eq!(report["onnxruntime"]["dylib"]["source"], "ORT_DYLIB_PATH");
}
