//! Stages 6–7 end to end: checkpoint → `dream-ood export` → ONNX Runtime, against libtorch and the data
//! layer; the threshold calibration through the exported graph; metadata round trips; `score` rows and
//! failures; `serve` over real HTTP on loopback.
//!
//! Checkpoints are made here with the fill formula of `tools/make_resnet_fixtures.py` (no RNG: tests run
//! in parallel and libtorch's generator is global) and saved with `nn::checkpoint::save`. Images are
//! written by the tests from pixel formulas.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use dream_ood::data::transforms::{Normalize, Size, Transform};
use dream_ood::data::{Pipeline, RawImage};
use dream_ood::deploy::DetectorMetadata;
use dream_ood::deploy::metadata::InputKind;
use dream_ood::nn::checkpoint::{CheckpointInfo, load_into, save};
use dream_ood::nn::{Depth, NetworkSpec, ResNetWithHead, Stem};
use dream_ood::onnx::export::ScoreKind;
use dream_ood::runtime::ort_environment;
use ort::value::Tensor as OrtTensor;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::common::{dream_ood, run_clean, stderr, stdout};

// ---------------------------------------------------------------------------------------------------------
// Checkpoints, images and the libtorch reference.

/// Formula weights, the same as `fill` in `tools/make_export_check.py` (both with torch ops in f64, then
/// f32): u = 2·frac(0.6180339887498949·i + phase) − 1 (a Weyl sequence: equidistributed, so kernels have
/// mean ≈ 0 like trained ones), phase = 0.01·(sum of the name's bytes). Convolutions and the head:
/// a·sqrt(3/fan_in)·u with a = 0.7 inside residual branches (so activations stay O(1) through 16 blocks in
/// eval mode and logits are a few units, as a trained network's are); BatchNorm weight 1 + 0.1u, bias and
/// running_mean 0.1u, running_var 1 + 0.25u.
fn fill(name: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let phase = name.bytes().map(f64::from).sum::<f64>() * 0.01;
    let t = Tensor::arange(n, (tch::Kind::Double, Device::Cpu)) * 0.6180339887498949 + phase;
    let u = (&t - t.floor()) * 2.0 - 1.0;
    let leaf = name.rsplit('.').next().unwrap();
    let v = match leaf {
        "weight" if shape.len() >= 2 => {
            let fan_in = shape[1..].iter().product::<i64>() as f64;
            let a = if name.contains("layer") && name.contains(".conv") {
                0.7
            } else {
                1.0
            };
            u * (a * (3.0 / fan_in).sqrt())
        }
        "weight" => u * 0.1 + 1.0,
        "bias" | "running_mean" => u * 0.1,
        "running_var" => u * 0.25 + 1.0,
        other => panic!("no fill rule for {other} ({name})"),
    };
    v.to_kind(tch::Kind::Float).view(shape)
}

fn spec(depth: Depth, stem: Stem, classes: i64) -> NetworkSpec {
    NetworkSpec {
        depth,
        stem,
        in_channels: 3,
        width: 64,
        head: "fc".into(),
        out_dim: classes,
    }
}

fn class_names(n: i64) -> Vec<String> {
    (0..n).map(|i| format!("class {i}, №{i}")).collect()
}

/// Writes a checkpoint of `spec` with formula weights and returns its path.
fn checkpoint(dir: &Path, name: &str, spec: &NetworkSpec, eval: Pipeline) -> PathBuf {
    let mut info = CheckpointInfo::new("detector", spec.clone(), class_names(spec.out_dim), eval);
    info.extra
        .insert("config_sha256".into(), "0123abcd".repeat(8).into());
    checkpoint_with(dir, name, &info)
}

fn checkpoint_with(dir: &Path, name: &str, info: &CheckpointInfo) -> PathBuf {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _net = info.network.build(&vs.root());
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(&fill(&name, &var.size()));
        }
    });
    let path = dir.join(name);
    save(&path, &vs, info).unwrap();
    path
}

/// The network of a checkpoint, loaded by libtorch.
fn load_net(path: &Path) -> (tch::nn::VarStore, ResNetWithHead, CheckpointInfo) {
    let info = dream_ood::nn::checkpoint::read_info(path).unwrap();
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    let net = info.network.build(&vs.root());
    load_into(path, &mut vs).unwrap();
    (vs, net, info)
}

/// Eval-mode logits of prepared `[C, H, W]` images (one forward pass per image: sizes may differ).
fn torch_logits(net: &ResNetWithHead, chw: &[dream_ood::data::transforms::Chw]) -> Vec<Vec<f32>> {
    chw.iter()
        .map(|c| {
            let x = Tensor::from_slice(&c.data).view([
                1,
                c.channels as i64,
                c.height as i64,
                c.width as i64,
            ]);
            let l = tch::no_grad(|| net.head(&net.features(&x, false)));
            Vec::<f32>::try_from(l.flatten(0, -1)).unwrap()
        })
        .collect()
}

fn energy(logits: &[f32], t: f64) -> f64 {
    let max = logits
        .iter()
        .map(|&v| f64::from(v) / t)
        .fold(f64::MIN, f64::max);
    t * (max
        + logits
            .iter()
            .map(|&v| (f64::from(v) / t - max).exp())
            .sum::<f64>()
            .ln())
}

/// An RGB (or gray) PNG from a pixel formula keyed by `seed`.
fn write_png(path: &Path, w: u32, h: u32, seed: u32, gray: bool) {
    let px = |x: u32, y: u32, c: u32| {
        ((x * (7 + seed) + y * (13 + 3 * c) + seed * 31 + c * 77) % 256) as u8
    };
    if gray {
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([px(x, y, 0)]))
            .save(path)
            .unwrap();
    } else {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([px(x, y, 0), px(x, y, 1), px(x, y, 2)])
        })
        .save(path)
        .unwrap();
    }
}

fn prepare(pipeline: &Pipeline, path: &Path) -> dream_ood::data::transforms::Chw {
    let mut rng = rand_chacha_compatible();
    pipeline
        .apply(RawImage::open(path).unwrap(), &mut rng)
        .unwrap()
}

fn rand_chacha_compatible() -> rand::rngs::ChaCha8Rng {
    rand::rngs::ChaCha8Rng::seed_from_u64(0)
}

/// metadata_props of an `.onnx` file, read with dream-ood's protobuf reader (not ONNX Runtime).
fn props(path: &Path) -> HashMap<String, String> {
    dream_ood::onnx::model::load_model(path)
        .unwrap()
        .metadata_props
        .into_iter()
        .map(|p| (p.key().to_owned(), p.value().to_owned()))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn export_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    run_clean(dir, &[&["export"], args].concat(), &[])
}

fn rows(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

// ---------------------------------------------------------------------------------------------------------
// Export: parity, calibration, metadata.

/// For every network of `src/nn/`: the checkpoint → `deploy::export` → ONNX Runtime path gives libtorch's
/// logits and energy on a fixed batch within 1e-4 absolute, float input and baked-in uint8 input alike.
#[test]
fn every_resnet_checkpoint_exports_with_libtorch_parity() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..2 * 32 * 32 * 3)
        .map(|i| ((i * 37 + i / 7) % 256) as u8)
        .collect();
    for depth in [Depth::Resnet18, Depth::Resnet34, Depth::Resnet50] {
        for stem in [Stem::Cifar, Stem::Imagenet] {
            let ckpt = checkpoint(
                dir.path(),
                "m.safetensors",
                &spec(depth, stem, 10),
                Pipeline::cifar_test(),
            );
            let (_vs, net, _) = load_net(&ckpt);
            // The batch as the CIFAR evaluation transform makes it: x/255, − mean, / std (f32, torch order).
            let n = Normalize::cifar();
            let nchw: Vec<f32> = (0..2 * 3 * 32 * 32)
                .map(|i| {
                    let (b, c, p) = (i / 3072, (i / 1024) % 3, i % 1024);
                    (f32::from(pixels[b * 3072 + p * 3 + c]) / 255.0 - n.mean[c] as f32)
                        / n.std[c] as f32
                })
                .collect();
            let x = Tensor::from_slice(&nchw).view([2, 3, 32, 32]);
            let logits = tch::no_grad(|| net.head(&net.features(&x, false)));
            let want_logits = Vec::<f32>::try_from(logits.flatten(0, -1)).unwrap();
            let want_energy: Vec<f64> = want_logits.chunks(10).map(|l| energy(l, 1.0)).collect();

            // Baked-in preprocessing once per stem: the backbone is the same graph either way.
            let variants: &[bool] = if depth == Depth::Resnet18 {
                &[false, true]
            } else {
                &[false]
            };
            for &preprocess in variants {
                let out = dir.path().join("m.onnx");
                let job = dream_ood::deploy::ExportJob {
                    checkpoint: ckpt.clone(),
                    out: out.clone(),
                    network: Default::default(),
                    score: ScoreKind::Energy { temperature: 1.0 },
                    preprocess,
                    calibration: dream_ood::deploy::CalibrationSet::None,
                    target_tpr: 0.95,
                    per_class: false,
                    batch: 2,
                    session: Default::default(),
                };
                dream_ood::deploy::export(&job, &dream_ood::progress::NoProgress).unwrap();
                let model = dream_ood::onnx::model::load_model(&out).unwrap();
                assert!(model.opset_import[0].version() >= 17);
                let mut session = ort::session::Session::builder(ort_environment().unwrap())
                    .unwrap()
                    .with_intra_threads(1)
                    .unwrap()
                    .commit_from_file(&out)
                    .unwrap();
                let input: ort::session::SessionInputValue = if preprocess {
                    OrtTensor::from_array((vec![2usize, 32, 32, 3], pixels.clone()))
                        .unwrap()
                        .into()
                } else {
                    OrtTensor::from_array((vec![2usize, 3, 32, 32], nchw.clone()))
                        .unwrap()
                        .into()
                };
                let name = if preprocess { "image" } else { "input" };
                let outputs = session.run(vec![(name.to_owned(), input)]).unwrap();
                let got_logits = outputs["logits"]
                    .try_extract_tensor::<f32>()
                    .unwrap()
                    .1
                    .to_vec();
                let got_score = outputs["score"]
                    .try_extract_tensor::<f32>()
                    .unwrap()
                    .1
                    .to_vec();
                let dl = got_logits
                    .iter()
                    .zip(&want_logits)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                let ds = got_score
                    .iter()
                    .zip(&want_energy)
                    .map(|(a, b)| (f64::from(*a) - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    dl <= 1e-4 && ds <= 1e-4,
                    "{depth:?}/{stem:?} preprocess {preprocess}: max |diff| logits {dl:e}, energy {ds:e}"
                );
            }
        }
    }
}

/// Builds a calibration folder of `n` images (and one non-image, which folders skip).
fn calibration_images(dir: &Path, n: u32) -> PathBuf {
    let cal = dir.join("calibration");
    std::fs::create_dir_all(cal.join("nested")).unwrap();
    for i in 0..n {
        let sub = if i % 4 == 0 { "nested/" } else { "" };
        write_png(&cal.join(format!("{sub}{i:03}.png")), 32, 32, i, i % 9 == 0);
    }
    std::fs::write(cal.join("README.txt"), "validation split, not test").unwrap();
    cal
}

/// The threshold is the rule applied to the scores the exported graph gives the calibration images (the
/// same scores `dream-ood score` then prints), the metadata says everything the issue lists, and it
/// round-trips through both the protobuf reader and ONNX Runtime.
#[test]
fn export_calibrates_through_the_graph_and_records_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let eval = Pipeline::cifar_test();
    let ckpt = checkpoint(
        d,
        "det.safetensors",
        &spec(Depth::Resnet18, Stem::Cifar, 4),
        eval.clone(),
    );
    calibration_images(d, 40);
    let out = export_cli(
        d,
        &[
            "--checkpoint",
            "det.safetensors",
            "--out",
            "det.onnx",
            "--score",
            "energy",
            "--temperature",
            "2",
            "--preprocess",
            "--tpr",
            "0.9",
            "--calibration",
            "calibration",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "det.onnx");

    // Score the calibration images with the production command and apply the rule by hand.
    let scored = run_clean(
        d,
        &[
            "score",
            "--model",
            "det.onnx",
            "calibration",
            "--batch",
            "7",
        ],
        &[],
    );
    assert!(scored.status.success(), "{}", stderr(&scored));
    let rows = rows(&stdout(&scored));
    assert_eq!(rows.len(), 40, "the README.txt in the folder is not scored");
    let mut scores: Vec<f32> = rows.iter().map(|r| f(r, "score") as f32).collect();
    scores.sort_by(f32::total_cmp);
    // n = 40, TPR 0.9: the largest k with (40 − k)/40 ≥ 0.9 is k = 4.
    let want = scores[4];
    let p = props(&d.join("det.onnx"));
    assert_eq!(p["threshold"].parse::<f32>().unwrap(), want, "{p:?}");
    let accepted = rows.iter().filter(|r| r["is_ood"] == false).count();
    assert!(accepted >= 36);
    assert_eq!(
        p["calibration.achieved_tpr"].parse::<f64>().unwrap(),
        accepted as f64 / 40.0
    );
    assert_eq!(p["calibration.target_tpr"], "0.9");
    assert_eq!(p["calibration.count"], "40");
    assert_eq!(p["calibration.source"], "images");
    for r in &rows {
        let (s, m) = (f(r, "score") as f32, f(r, "margin") as f32);
        assert_eq!(r["is_ood"], s < want, "{r}");
        assert_eq!(m, s - want);
    }

    // The scores are libtorch's on the data layer's transform (to 1e-4), so the threshold is too.
    let (_vs, net, _) = load_net(&ckpt);
    let mut files: Vec<PathBuf> = rows
        .iter()
        .map(|r| d.join(r["path"].as_str().unwrap()))
        .collect();
    let chw: Vec<_> = files.iter().map(|p| prepare(&eval, p)).collect();
    for (r, l) in rows.iter().zip(torch_logits(&net, &chw)) {
        assert!((f(r, "score") - energy(&l, 2.0)).abs() < 1e-4, "{r}");
    }

    // Metadata: what the issue lists, with hashes recomputed here independently.
    files.sort();
    let mut file_hashes: Vec<String> = files
        .iter()
        .map(|p| sha256_hex(&std::fs::read(p).unwrap()))
        .collect();
    file_hashes.sort();
    let set: String = file_hashes.iter().map(|h| format!("{h}\n")).collect();
    assert_eq!(p["calibration.sha256"], sha256_hex(set.as_bytes()));
    assert_eq!(
        p["checkpoint.sha256"],
        sha256_hex(&std::fs::read(&ckpt).unwrap())
    );
    assert_eq!(p["training_config.sha256"], "0123abcd".repeat(8));
    assert_eq!(p["dream_ood.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["score"], "energy");
    assert_eq!(p["score.temperature"], "2");
    assert_eq!(p["score.sign"], "higher_is_in_distribution");
    assert_eq!(p["input.name"], "image");
    assert_eq!(p["input.layout"], "NHWC");
    assert_eq!(p["input.size"], "any");
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&p["classes"]).unwrap(),
        class_names(4)
    );
    assert_eq!(
        serde_json::from_str::<Pipeline>(&p["eval_transform"]).unwrap(),
        eval
    );
    let mean: Vec<f64> = serde_json::from_str(&p["mean"]).unwrap();
    assert_eq!(mean, Normalize::cifar().mean);
    assert!(p["threshold.rule"].contains("largest t such that the fraction"));

    // Round trip: protobuf props → metadata == ONNX Runtime's view of the same file.
    let meta = DetectorMetadata::from_props(&p, "det.onnx").unwrap();
    let detector =
        dream_ood::deploy::Detector::open(&d.join("det.onnx"), &Default::default()).unwrap();
    assert_eq!(detector.metadata(), &meta);
    assert_eq!(meta.input, InputKind::Uint8);
    assert_eq!(meta.score, ScoreKind::Energy { temperature: 2.0 });
    let cal_info = meta.calibration.unwrap();
    assert_eq!((cal_info.threshold, cal_info.count), (want, 40));
}

/// Per-class thresholds: each class's threshold is the rule on the calibration images predicted as that
/// class; the graph picks it by the predicted class.
#[test]
fn per_class_thresholds_follow_the_predicted_class() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(
        d,
        "det.safetensors",
        &spec(Depth::Resnet18, Stem::Cifar, 4),
        Pipeline::cifar_test(),
    );
    calibration_images(d, 40);
    let out = export_cli(
        d,
        &[
            "--checkpoint",
            "det.safetensors",
            "--out",
            "det.onnx",
            "--score",
            "maxlogit",
            "--calibration",
            "calibration",
            "--tpr",
            "0.8",
            "--per-class-thresholds",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let scored = run_clean(d, &["score", "--model", "det.onnx", "calibration"], &[]);
    let rows = rows(&stdout(&scored));
    let p = props(&d.join("det.onnx"));
    let per_class: Vec<f32> = serde_json::from_str(&p["threshold.per_class"]).unwrap();
    let global: f32 = p["threshold"].parse().unwrap();
    let mut by_class: Vec<Vec<f32>> = vec![Vec::new(); 4];
    for r in &rows {
        let c = r["class_index"].as_u64().unwrap() as usize;
        let s = f(r, "score") as f32;
        by_class[c].push(s);
        assert_eq!(f(r, "threshold") as f32, per_class[c], "{r}");
        assert_eq!(r["is_ood"], s < per_class[c], "{r}");
    }
    for (c, mut s) in by_class.into_iter().enumerate() {
        if s.is_empty() {
            assert_eq!(
                per_class[c], global,
                "class {c} has no calibration image: global threshold"
            );
            continue;
        }
        s.sort_by(f32::total_cmp);
        let n = s.len();
        let k = (0..n)
            .rev()
            .find(|&k| (n - k) as f64 / n as f64 >= 0.8)
            .unwrap();
        assert_eq!(per_class[c], s[k], "class {c}: {s:?}");
    }
}

/// `--calibration-scores`: the rule on a scores file (text here), its sha256 recorded.
#[test]
fn calibration_scores_file_and_bad_export_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(
        d,
        "det.safetensors",
        &spec(Depth::Resnet18, Stem::Cifar, 3),
        Pipeline::cifar_test(),
    );
    // 20 scores 1..20 → at 95%: t = 2 (only 1 rejected).
    let text: String = (1..=20).rev().map(|v| format!("{v}\n")).collect();
    std::fs::write(d.join("id_val_scores.txt"), &text).unwrap();
    let out = export_cli(
        d,
        &[
            "--checkpoint",
            "det.safetensors",
            "--out",
            "det.onnx",
            "--calibration-scores",
            "id_val_scores.txt",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let p = props(&d.join("det.onnx"));
    assert_eq!(p["threshold"], "2");
    assert_eq!(p["calibration.achieved_tpr"], "0.95");
    assert_eq!(p["calibration.source"], "scores");
    assert_eq!(p["calibration.sha256"], sha256_hex(text.as_bytes()));

    // Errors: exit 2, one line naming what is wrong.
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--checkpoint", "missing.safetensors", "--out", "x.onnx"],
            "missing.safetensors",
        ),
        (
            vec![
                "--checkpoint",
                "det.safetensors",
                "--out",
                "x.onnx",
                "--calibration-scores",
                "id_val_scores.txt",
                "--per-class-thresholds",
            ],
            "per-class thresholds need calibration images",
        ),
        (
            vec![
                "--checkpoint",
                "det.safetensors",
                "--out",
                "x.onnx",
                "--arch",
                "resnet50",
            ],
            "holds a Resnet18 network, --arch says Resnet50",
        ),
        (
            vec![
                "--checkpoint",
                "det.safetensors",
                "--out",
                "x.onnx",
                "--tpr",
                "1.5",
            ],
            "tpr: 1.5; expected a fraction in (0, 1]",
        ),
        (
            vec!["--checkpoint", "id_val_scores.txt", "--out", "x.onnx"],
            "not a safetensors file",
        ),
    ];
    for (args, want) in cases {
        let out = export_cli(d, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!d.join("x.onnx").exists());
}

/// A PyTorch state_dict (no dream-ood metadata) exports with --arch/--stem/--classes/--transform.
#[test]
fn a_state_dict_without_metadata_exports_with_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let with_info = checkpoint(
        d,
        "full.safetensors",
        &spec(Depth::Resnet18, Stem::Imagenet, 2),
        Pipeline::cifar_test(),
    );
    // Strip the metadata: rewrite the tensors alone, as safetensors.torch.save_file(model.state_dict()) does.
    let file = dream_ood::nn::checkpoint::read_tensors(&with_info).unwrap();
    let tensors: Vec<(String, Tensor)> = file.tensors.into_iter().collect();
    dream_ood::nn::checkpoint::write_tensors(&d.join("sd.safetensors"), &tensors, HashMap::new())
        .unwrap();
    std::fs::write(d.join("classes.txt"), "cat\ndog\n").unwrap();

    let out = export_cli(d, &["--checkpoint", "sd.safetensors", "--out", "x.onnx"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("has no dream-ood metadata (a PyTorch state_dict?); give --arch and --stem"),
        "{}",
        stderr(&out)
    );

    let out = export_cli(
        d,
        &[
            "--checkpoint",
            "sd.safetensors",
            "--out",
            "x.onnx",
            "--arch",
            "resnet18",
            "--stem",
            "imagenet",
            "--classes",
            "classes.txt",
            "--transform",
            "imagenet",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let p = props(&d.join("x.onnx"));
    assert_eq!(p["classes"], r#"["cat","dog"]"#);
    assert_eq!(p["input.size"], "224x224");
    assert!(!p.contains_key("training_config.sha256"));
}

/// The same checkpoint as `tools/make_export_check.py` writes with PyTorch, exported here, against what
/// that script recorded: `onnx.checker` (full check) passed on its export, Python onnxruntime's outputs,
/// PyTorch eager's logits, numpy's threshold and the metadata keys and values.
#[test]
fn export_matches_the_python_reference() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deploy");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("export_check.json")).unwrap())
            .unwrap();
    assert!(fx["checker"].as_str().unwrap().starts_with("passed"));
    assert!(fx["opset"].as_i64().unwrap() >= 17);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let classes: Vec<String> = ["apple", "bee, honey", "castle", "\"dolphin\""]
        .map(String::from)
        .to_vec();
    let mut info = CheckpointInfo::new(
        "detector",
        spec(Depth::Resnet18, Stem::Cifar, 4),
        classes,
        Pipeline::cifar_test(),
    );
    info.extra
        .insert("config_sha256".into(), "5".repeat(64).into());
    checkpoint_with(d, "det.safetensors", &info);
    let cal = fixtures.join("calibration");
    let out = export_cli(
        d,
        &[
            "--checkpoint",
            "det.safetensors",
            "--out",
            "det.onnx",
            "--preprocess",
            "--score",
            "energy",
            "--temperature",
            "1.5",
            "--tpr",
            "0.9",
            "--calibration",
            cal.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let ours = props(&d.join("det.onnx"));
    let theirs: HashMap<String, String> = serde_json::from_value(fx["metadata"].clone()).unwrap();
    let mut keys: Vec<&String> = ours.keys().collect();
    keys.sort();
    let mut their_keys: Vec<&String> = theirs.keys().collect();
    their_keys.sort();
    assert_eq!(keys, their_keys);
    for k in keys {
        match k.as_str() {
            // Different writers (safetensors from PyTorch vs libtorch) give different file bytes.
            "checkpoint.sha256" => {}
            // Computed from scores of weights rebuilt here: equal to rounding.
            "threshold" => {
                let (a, b): (f64, f64) = (ours[k].parse().unwrap(), theirs[k].parse().unwrap());
                assert!((a - b).abs() < 1e-4, "threshold {a} vs {b}");
                assert!((b - fx["threshold_numpy"].as_f64().unwrap()).abs() < 1e-6);
            }
            _ => assert_eq!(ours[k], theirs[k], "{k}"),
        }
    }

    let mut session = ort::session::Session::builder(ort_environment().unwrap())
        .unwrap()
        .commit_from_file(d.join("det.onnx"))
        .unwrap();
    let mut batch = Vec::new();
    for name in fx["test_images"].as_array().unwrap() {
        batch.extend(
            RawImage::open(&fixtures.join("test").join(name.as_str().unwrap()))
                .unwrap()
                .into_data(),
        );
    }
    let outputs = session
        .run(ort::inputs!["image" => OrtTensor::from_array((vec![2usize, 32, 32, 3], batch)).unwrap()])
        .unwrap();
    let logits = outputs["logits"]
        .try_extract_tensor::<f32>()
        .unwrap()
        .1
        .to_vec();
    let score = outputs["score"]
        .try_extract_tensor::<f32>()
        .unwrap()
        .1
        .to_vec();
    let is_ood = outputs["is_ood"]
        .try_extract_tensor::<bool>()
        .unwrap()
        .1
        .to_vec();
    let flat = |v: &serde_json::Value| -> Vec<f64> {
        let mut out = Vec::new();
        for x in v.as_array().unwrap() {
            match x.as_array() {
                Some(row) => out.extend(row.iter().map(|y| y.as_f64().unwrap())),
                None => out.push(x.as_f64().unwrap()),
            }
        }
        out
    };
    let close = |got: &[f32], want: &[f64], tol: f64, what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() <= tol,
                "{what}: {got:?} vs {want:?}"
            );
        }
    };
    close(
        &logits,
        &flat(&fx["ort_logits"]),
        1e-5,
        "logits vs Python onnxruntime",
    );
    close(
        &score,
        &flat(&fx["ort_score"]),
        1e-5,
        "score vs Python onnxruntime",
    );
    close(
        &logits,
        &flat(&fx["torch_logits"]),
        1e-4,
        "logits vs PyTorch eager",
    );
    close(
        &score,
        &flat(&fx["torch_energy"]),
        1e-4,
        "energy vs PyTorch eager",
    );
    let their_ood: Vec<bool> = fx["ort_is_ood"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    assert_eq!(is_ood, their_ood);
}

// ---------------------------------------------------------------------------------------------------------
// score

/// An evaluation transform with a resize and a crop, so decoding + transform are really exercised.
fn resize_crop() -> Pipeline {
    Pipeline {
        channels: 3,
        transforms: vec![
            Transform::Resize(Size::Shorter(36)),
            Transform::CenterCrop {
                height: 32,
                width: 32,
            },
        ],
        normalize: Some(Normalize::imagenet()),
    }
}

/// `score` rows equal libtorch on `data::Pipeline` applied to the same files (sizes, gray, JPEG), for
/// float and baked-in uint8 inputs: preprocessing in production is training's evaluation transform.
#[test]
fn score_rows_equal_libtorch_on_the_evaluation_transform() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let eval = resize_crop();
    let ckpt = checkpoint(
        d,
        "det.safetensors",
        &spec(Depth::Resnet18, Stem::Imagenet, 5),
        eval.clone(),
    );
    let imgs = d.join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    write_png(&imgs.join("a_wide.png"), 57, 40, 1, false);
    write_png(&imgs.join("b_tall.png"), 33, 61, 2, false);
    write_png(&imgs.join("c_gray.png"), 44, 44, 3, true);
    image::RgbImage::from_fn(48, 36, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
    })
    .save(imgs.join("d.jpg"))
    .unwrap();
    std::fs::write(d.join("scores.txt"), "1\n2\n3\n4\n").unwrap();
    let (_vs, net, _) = load_net(&ckpt);
    let files: Vec<PathBuf> = ["a_wide.png", "b_tall.png", "c_gray.png", "d.jpg"]
        .iter()
        .map(|n| imgs.join(n))
        .collect();
    let chw: Vec<_> = files.iter().map(|p| prepare(&eval, p)).collect();
    let want = torch_logits(&net, &chw);

    for preprocess in [false, true] {
        let mut args = vec![
            "--checkpoint",
            "det.safetensors",
            "--out",
            "det.onnx",
            "--score",
            "msp",
            "--calibration-scores",
            "scores.txt",
        ];
        if preprocess {
            args.push("--preprocess");
        }
        let out = export_cli(d, &args);
        assert!(out.status.success(), "{}", stderr(&out));
        let threshold: f32 = props(&d.join("det.onnx"))["threshold"].parse().unwrap();
        let out = run_clean(
            d,
            &["score", "--model", "det.onnx", "imgs", "--batch", "3"],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let rows = rows(&stdout(&out));
        assert_eq!(rows.len(), 4);
        for ((row, logits), file) in rows.iter().zip(&want).zip(&files) {
            assert_eq!(d.join(row["path"].as_str().unwrap()), *file);
            let (best, p) = softmax_max(logits);
            assert_eq!(row["class_index"], best as u64, "{row}");
            assert_eq!(row["class"], class_names(5)[best], "{row}");
            assert!((f(row, "confidence") - p).abs() < 1e-5, "{row} vs {p}");
            assert!((f(row, "score") - p).abs() < 1e-5, "msp: {row} vs {p}");
            let s = f(row, "score") as f32;
            assert_eq!(row["is_ood"], s < threshold);
            assert_eq!(f(row, "margin") as f32, s - threshold);
        }
    }
}

fn softmax_max(logits: &[f32]) -> (usize, f64) {
    let (best, max) =
        logits.iter().enumerate().fold(
            (0, f32::MIN),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        );
    let sum: f64 = logits
        .iter()
        .map(|&v| (f64::from(v) - f64::from(max)).exp())
        .sum();
    (best, 1.0 / sum)
}

/// A corrupt PNG and a text file get error rows, the rest still score, the exit status is 1; CSV to a
/// file, written atomically.
#[test]
fn score_reports_bad_files_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(
        d,
        "det.safetensors",
        &spec(Depth::Resnet18, Stem::Cifar, 3),
        Pipeline::cifar_test(),
    );
    let out = export_cli(d, &["--checkpoint", "det.safetensors", "--out", "det.onnx"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let imgs = d.join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    write_png(&imgs.join("1_good.png"), 32, 32, 1, false);
    let mut png = Vec::new();
    let mut f = std::fs::File::open(imgs.join("1_good.png")).unwrap();
    f.read_to_end(&mut png).unwrap();
    std::fs::write(imgs.join("2_corrupt.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(imgs.join("3_text.png"), "this is not an image").unwrap();
    write_png(&imgs.join("4_good.png"), 32, 32, 4, false);
    std::fs::write(imgs.join("notes.txt"), "left out of folders").unwrap();

    let out = run_clean(
        d,
        &[
            "score",
            "--model",
            "det.onnx",
            "imgs",
            "imgs/notes.txt",
            "missing.png",
            "--format",
            "csv",
            "--out",
            "rows.csv",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let text = std::fs::read_to_string(d.join("rows.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "path,class,class_index,confidence,score,is_ood,threshold,margin,error"
    );
    assert_eq!(lines.len(), 1 + 6, "{text}");
    let path_and_error = |l: &str| {
        let cols: Vec<&str> = l.splitn(2, ',').collect();
        (cols[0].to_owned(), l.rsplit(',').next().unwrap().to_owned())
    };
    assert!(
        lines[1].starts_with("imgs/1_good.png,\"class "),
        "{}",
        lines[1]
    );
    assert!(lines[1].ends_with(","), "no error: {}", lines[1]);
    assert!(
        lines[2].starts_with("imgs/2_corrupt.png,,,,,,,,")
            && lines[2].contains("cannot decode image"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].contains("imgs/3_text.png: not a PNG, JPEG or WebP image"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].starts_with("imgs/4_good.png,\"class "),
        "{}",
        lines[4]
    );
    assert!(
        lines[5].contains("imgs/notes.txt: not a PNG, JPEG or WebP image"),
        "{}",
        lines[5]
    );
    let (p, e) = path_and_error(lines[6]);
    assert_eq!(p, "missing.png");
    assert!(e.contains("No such file"), "{e}");
    let err = stderr(&out);
    assert!(err.contains("4 of 6 files could not be scored"), "{err}");
    assert!(
        err.contains("failed=4") && err.contains("scored=2"),
        "{err}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A model that is not a detector: a clear error, exit 2.
    std::fs::write(d.join("junk.onnx"), b"junk").unwrap();
    let out = run_clean(d, &["score", "--model", "junk.onnx", "imgs"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("junk.onnx"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------------------
// serve

/// A `dream-ood serve` child on a free loopback port; killed on drop if still running.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut child = dream_ood()
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(dir)
            .args(
                [
                    &["serve", "--model", "det.onnx", "--addr", "127.0.0.1:0"],
                    extra,
                ]
                .concat(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(
            line.starts_with("http://127.0.0.1:"),
            "server said {line:?}"
        );
        Server {
            child,
            url: line.trim().to_owned(),
        }
    }

    /// Sends `signal` (TERM, INT) and returns the exit status and stderr.
    fn stop(mut self, signal: &str) -> (Option<i32>, String) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut resp = agent()
        .post(format!("{url}/v1/score"))
        .header("Content-Type", content_type)
        .send(body)
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

fn get(url: &str) -> (u16, String) {
    let mut resp = agent().get(url).call().unwrap();
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap(),
    )
}

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "dream-ood-test-boundary";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).bytes());
        body.extend_from_slice(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// The server end to end over loopback: results equal `score`'s, bad input gets 4xx JSON and the server
/// carries on, an image too large by its header is refused, 64 concurrent requests are micro-batched,
/// the metrics count all of it, and SIGTERM stops it cleanly.
#[test]
fn serve_scores_refuses_bad_input_batches_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(
        d,
        "det.safetensors",
        &spec(Depth::Resnet18, Stem::Cifar, 3),
        Pipeline::cifar_test(),
    );
    let imgs = d.join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..8 {
        write_png(&imgs.join(format!("{i}.png")), 32, 32, 100 + i, i == 5);
    }
    std::fs::write(
        d.join("scores.txt"),
        (0..20)
            .map(|i| format!("{}\n", i as f64 * 0.2))
            .collect::<String>(),
    )
    .unwrap();
    let out = export_cli(
        d,
        &[
            "--checkpoint",
            "det.safetensors",
            "--out",
            "det.onnx",
            "--calibration-scores",
            "scores.txt",
            "--preprocess",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // What `score` says about each image: the server must say the same.
    let out = run_clean(d, &["score", "--model", "det.onnx", "imgs"], &[]);
    let want: HashMap<String, serde_json::Value> = rows(&stdout(&out))
        .into_iter()
        .map(|r| {
            (
                r["path"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("imgs/")
                    .to_owned(),
                r,
            )
        })
        .collect();
    let png = |i: usize| std::fs::read(imgs.join(format!("{i}.png"))).unwrap();

    let server = Server::start(
        d,
        &[
            "--max-batch",
            "16",
            "--max-wait-ms",
            "50",
            "--max-body-bytes",
            "200000",
            "--max-pixels",
            "1000000",
        ],
    );
    let url = server.url.clone();
    assert_eq!(
        get(&format!("{url}/healthz")),
        (200, r#"{"status":"ok"}"#.to_owned())
    );
    let (code, model) = get(&format!("{url}/v1/model"));
    assert_eq!(code, 200);
    let model: serde_json::Value = serde_json::from_str(&model).unwrap();
    assert_eq!(model["classes"], serde_json::json!(class_names(3)));
    assert_eq!(model["score"], "energy");
    assert_eq!(model["input.name"], "image");
    assert_eq!(model["threshold"], props(&d.join("det.onnx"))["threshold"]);

    let same = |got: &serde_json::Value, want: &serde_json::Value| {
        for k in [
            "class",
            "class_index",
            "confidence",
            "score",
            "is_ood",
            "threshold",
            "margin",
        ] {
            assert_eq!(got[k], want[k], "{k}: {got} vs {want}");
        }
    };
    // A raw body.
    let (code, body) = post(&url, "image/png", &png(0));
    assert_eq!(code, 200, "{body}");
    same(&body["results"][0], &want["0.png"]);
    // Multipart with three images, in order, named.
    let (ct, mp) = multipart(&[("2.png", &png(2)), ("5.png", &png(5)), ("7.png", &png(7))]);
    let (code, body) = post(&url, &ct, &mp);
    assert_eq!(code, 200, "{body}");
    for (i, name) in ["2.png", "5.png", "7.png"].iter().enumerate() {
        let r = &body["results"][i];
        assert_eq!(r["filename"], *name);
        assert_eq!(r["index"], i);
        same(r, &want[*name]);
    }

    // Bad input: 4xx with a JSON error saying what was wrong.
    let (code, body) = post(&url, "application/octet-stream", b"GIF89a garbage");
    assert_eq!(code, 400);
    assert_eq!(
        body["error"],
        "not a PNG, JPEG or WebP image (judged by its content)"
    );
    let (code, body) = post(&url, "image/png", b"");
    assert_eq!(
        (
            code,
            body["error"].as_str().unwrap().starts_with("empty image")
        ),
        (400, true),
        "{body}"
    );
    let good = png(1);
    let (code, body) = post(&url, "image/png", &good[..good.len() - 40]);
    assert_eq!(code, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot decode image"),
        "{body}"
    );
    let (ct, mp) = multipart(&[("ok.png", &png(1)), ("bad.png", b"nope")]);
    let (code, body) = post(&url, &ct, &mp);
    assert_eq!(code, 400);
    assert_eq!(body["part"]["filename"], "bad.png", "{body}");
    assert_eq!(body["part"]["index"], 1);
    let (code, body) = post(&url, "multipart/form-data; boundary=x", b"--y\r\n\r\n");
    assert_eq!(code, 400, "{body}");
    // An image whose header claims 5000×5000 (25 MP > 1 MP): a 32×32 PNG with its IHDR size (and CRC)
    // rewritten, as a decompression bomb would be; refused from the header, nothing decoded.
    let mut bomb = png(3);
    bomb[16..20].copy_from_slice(&5000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&5000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let (code, body) = post(&url, "image/png", &bomb);
    assert_eq!(code, 413, "{body}");
    assert_eq!(
        body["error"],
        "image is 5000×5000 = 25000000 pixels; the limit is 1000000 pixels"
    );
    // A body over --max-body-bytes.
    let (code, body) = post(&url, "image/png", &vec![0u8; 300_000]);
    assert_eq!(code, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("200000 bytes"),
        "{body}"
    );
    let (code, body) = get(&format!("{url}/nope"));
    assert_eq!(code, 404);
    assert!(body.contains("no route GET /nope"), "{body}");
    let (code, _) = get(&format!("{url}/v1/score"));
    assert_eq!(code, 405);

    // Still serving: 64 concurrent requests, each answered with its own image's result.
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let (url, bytes) = (url.clone(), png(i % 8));
            std::thread::spawn(move || (i % 8, post(&url, "image/png", &bytes)))
        })
        .collect();
    for t in threads {
        let (i, (code, body)) = t.join().unwrap();
        assert_eq!(code, 200, "{body}");
        same(&body["results"][0], &want[&format!("{i}.png")]);
    }

    let (code, text) = get(&format!("{url}/metrics"));
    assert_eq!(code, 200);
    let score_ok = metric(
        &text,
        "dream_ood_requests_total{route=\"/v1/score\",code=\"200\"}",
    );
    assert_eq!(score_ok, 66.0);
    assert_eq!(
        metric(
            &text,
            "dream_ood_requests_total{route=\"/v1/score\",code=\"400\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(
            &text,
            "dream_ood_requests_total{route=\"/v1/score\",code=\"413\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(&text, "dream_ood_request_errors_total"),
        9.0,
        "5 + 2 + 404 + 405"
    );
    assert_eq!(metric(&text, "dream_ood_images_scored_total"), 68.0);
    let ood_want = (0..64)
        .map(|i| i % 8)
        .chain([0, 2, 5, 7])
        .filter(|i| want[&format!("{i}.png")]["is_ood"] == true)
        .count();
    assert_eq!(metric(&text, "dream_ood_images_ood_total"), ood_want as f64);
    assert!((metric(&text, "dream_ood_ood_rate") - ood_want as f64 / 68.0).abs() < 1e-12);
    assert_eq!(metric(&text, "dream_ood_batch_images_total"), 68.0);
    let batches = metric(&text, "dream_ood_batches_total");
    assert!(
        batches < 60.0,
        "64 concurrent requests should share session runs: {batches} batches"
    );
    assert_eq!(
        metric(&text, "dream_ood_request_duration_seconds_count"),
        73.0
    );
    assert_eq!(
        metric(
            &text,
            "dream_ood_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        73.0
    );

    let (code, err) = server.stop("TERM");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("SIGTERM: finishing the requests in flight"),
        "{err}"
    );
    assert!(err.contains("server stopped"), "{err}");
}

/// The request time limit answers 503 with a JSON error and the server carries on; Ctrl-C (SIGINT) stops
/// it as cleanly as SIGTERM.
#[test]
fn serve_times_out_slow_requests_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(
        d,
        "det.safetensors",
        &spec(Depth::Resnet18, Stem::Cifar, 3),
        Pipeline::cifar_test(),
    );
    let out = export_cli(d, &["--checkpoint", "det.safetensors", "--out", "det.onnx"]);
    assert!(out.status.success(), "{}", stderr(&out));
    write_png(&d.join("x.png"), 32, 32, 9, false);
    // 1 ms is less than any decode + session run of a ResNet-18 takes.
    let server = Server::start(d, &["--timeout-ms", "1"]);
    let (code, body) = post(
        &server.url,
        "image/png",
        &std::fs::read(d.join("x.png")).unwrap(),
    );
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        body["error"],
        "the request took longer than the server's limit of 1 ms"
    );
    assert_eq!(get(&format!("{}/healthz", server.url)).0, 200);
    let (_, text) = get(&format!("{}/metrics", server.url));
    assert_eq!(
        metric(
            &text,
            "dream_ood_requests_total{route=\"/v1/score\",code=\"503\"}"
        ),
        1.0
    );
    let (code, err) = server.stop("INT");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("Ctrl-C: finishing the requests in flight"),
        "{err}"
    );
}
