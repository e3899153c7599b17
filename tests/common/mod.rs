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

/// An ImageFolder of `classes` classes × `per_class` 8×8 RGB PNGs told apart by colour (class c lifts
/// channel c), each with its own pattern from a closed formula. Files are `class{c}/{i:02}.png`.
pub fn write_colour_classes(root: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let dir = root.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(8, 8, |x, y| {
                let wave = (((x * 3 + y * 5 + i as u32 * 7) % 11) * 8) as u8;
                let mut px = [wave, wave, wave];
                px[c % 3] = px[c % 3].saturating_add(150);
                image::Rgb(px)
            });
            img.save(dir.join(format!("{i:02}.png"))).unwrap();
        }
    }
}

/// The fill formula of `tools/make_resnet_fixtures.py` (`fill`): value(name, i) = base + amp · sin(0.7 i +
/// phase), phase = 0.01 · (sum of the name's bytes), base/amp by role; evaluated in f64, then f32.
pub fn resnet_fixture_fill(name: &str, shape: &[i64]) -> tch::Tensor {
    let n: i64 = shape.iter().product();
    let phase = name.bytes().map(f64::from).sum::<f64>() * 0.01;
    let leaf = name.rsplit('.').next().unwrap();
    let (base, amp) = match leaf {
        "weight" if shape.len() >= 2 => (
            0.0,
            (3.0 / shape[1..].iter().product::<i64>() as f64).sqrt(),
        ),
        "weight" => (1.0, 0.1),
        "bias" | "running_mean" => (0.0, 0.1),
        "running_var" => (1.25, 0.25),
        other => panic!("no fill rule for {other} ({name})"),
    };
    let values: Vec<f32> = (0..n)
        .map(|i| (base + amp * (0.7 * i as f64 + phase).sin()) as f32)
        .collect();
    tch::Tensor::from_slice(&values).view(shape)
}
