//! Helpers shared by the integration tests.

use std::path::Path;
use std::process::{Command, Output};

/// The `dream-ood` binary cargo built for these tests.
pub fn dream_ood() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dream-ood"))
}

/// Runs the binary with a clean environment (no `LD_LIBRARY_PATH`, `ORT_DYLIB_PATH`, `LIBTORCH`, only
/// `PATH`) in `dir`, as a user would from any folder.
pub fn run_clean(dir: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = dream_ood();
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(dir)
        .args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("the dream-ood binary runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
