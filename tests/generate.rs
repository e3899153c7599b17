//! `dream-ood generate` on the tiny SD export (`tests/fixtures/tiny_sd/`): outputs and manifest, resume after
//! a kill, shards equal to one run, and the errors for bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ndarray::Array3;
use ndarray_npy::WriteNpyExt;

use crate::common::{dream_ood, stderr};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_sd/model")
}

const CLASSES: &str = "[[class]]\nname = \"airplane\"\n\n[[class]]\nname = \"cat\"\n\n[[class]]\nname = \"lawn-mower\"\nembedding_word = \"mower\"\n";

/// Writes classes.toml and an embeddings file `[3, 5, dim]` into `dir`; `edit` may spoil the values.
fn inputs(dir: &Path, dim: usize, edit: impl FnOnce(&mut Array3<f32>)) {
    std::fs::write(dir.join("classes.toml"), CLASSES).unwrap();
    let mut e = Array3::<f32>::from_shape_fn((3, 5, dim), |(c, r, d)| {
        ((c * 31 + r * 7 + d) as f32 * 0.37).sin() * 0.4
    });
    edit(&mut e);
    e.write_npy(std::fs::File::create(dir.join("outliers.npy")).unwrap())
        .unwrap();
}

fn generate(dir: &Path, out: &str, extra: &[&str]) -> Command {
    let mut cmd = dream_ood();
    cmd.current_dir(dir)
        .args(["-q", "generate", "--model"])
        .arg(model())
        .args([
            "--embeddings",
            "outliers.npy",
            "--classes",
            "classes.toml",
            "--out",
            out,
            "--steps",
            "4",
            "--image-size",
            "16",
            "--batch",
            "2",
        ]);
    cmd.args(extra);
    cmd
}

/// Every file under `dir` (but run.json, which records the shard) with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for class in std::fs::read_dir(dir).unwrap() {
        let class = class.unwrap().path();
        if class.is_dir() {
            for f in std::fs::read_dir(&class).unwrap() {
                let f = f.unwrap().path();
                out.insert(
                    f.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&f).unwrap(),
                );
            }
        }
    }
    out
}

fn manifest(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generates_resumes_and_shards_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    inputs(dir, 32, |_| {});

    let out = generate(dir, "full", &["--per-class", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let full = files(&dir.join("full"));
    assert_eq!(full.len(), 6);
    assert!(full.keys().all(|k| k.ends_with(".png")));
    let lines = manifest(&dir.join("full"));
    assert_eq!(lines.len(), 6);
    for line in &lines {
        for key in [
            "file",
            "class_index",
            "class_name",
            "embedding_row",
            "seed",
            "scheduler",
            "steps",
            "guidance",
            "sha256",
        ] {
            assert!(line.get(key).is_some(), "manifest line lacks {key}: {line}");
        }
        let png = image::load_from_memory(&full[line["file"].as_str().unwrap()]).unwrap();
        assert_eq!((png.width(), png.height()), (16, 16));
    }
    let mut per_class = [0; 3];
    lines
        .iter()
        .for_each(|l| per_class[l["class_index"].as_u64().unwrap() as usize] += 1);
    assert_eq!(per_class, [2, 2, 2]);
    // Different images for different plan entries.
    let distinct: std::collections::HashSet<&Vec<u8>> = full.values().collect();
    assert_eq!(distinct.len(), 6);

    // A rerun does nothing and changes nothing.
    let again = generate(dir, "full", &["--per-class", "2"])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(files(&dir.join("full")), full);
    assert_eq!(manifest(&dir.join("full")).len(), 6);

    // Two shards into one folder write the same files as the single run.
    for shard in ["0/2", "1/2"] {
        let out = generate(dir, "sharded", &["--per-class", "2", "--shard", shard])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(files(&dir.join("sharded")), full);

    // Neither the batch size nor the number of workers changes the images.
    let out = generate(
        dir,
        "batch3",
        &["--per-class", "2", "--batch", "3", "--workers", "1"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files(&dir.join("batch3")), full);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch3/run.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            run["job"]["workers"].as_u64(),
            run["job"]["batch_size"].as_u64()
        ),
        (Some(1), Some(3))
    );

    // The official post-processing: bilinear 2x down, then truncation.
    let out = generate(
        dir,
        "official",
        &["--per-class", "1", "--resize", "8", "--quantize", "floor"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let official = files(&dir.join("official"));
    assert_eq!(official.len(), 3);
    for png in official.values() {
        let img = image::load_from_memory(png).unwrap();
        assert_eq!((img.width(), img.height()), (8, 8));
    }

    // Other settings into the same folder are refused.
    let out = generate(dir, "full", &["--per-class", "2", "--seed", "7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("but these settings make plan"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    inputs(dir, 32, |_| {});
    let args = ["--per-class", "12", "--batch", "1", "--steps", "8"];
    let out = generate(dir, "reference", &args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = files(&dir.join("reference"));
    assert_eq!(reference.len(), 36);

    let mut child = generate(dir, "killed", &args).spawn().unwrap();
    let manifest_path = dir.join("killed/manifest.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = std::fs::read_to_string(&manifest_path)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 2 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = manifest(&dir.join("killed")).len();
    assert!(
        partial < 36,
        "the run finished before it could be killed; the test needs more work per run"
    );

    let out = generate(dir, "killed", &args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files(&dir.join("killed")), reference);
    assert_eq!(manifest(&dir.join("killed")).len(), 36);
}

#[test]
fn bad_input_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = |extra: &[&str]| {
        let out = generate(dir, "out", extra).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            !dir.join("out/manifest.jsonl").exists()
                || std::fs::read_to_string(dir.join("out/manifest.jsonl"))
                    .unwrap()
                    .is_empty()
        );
        stderr(&out)
    };
    inputs(dir, 16, |_| {});
    let err = run(&["--per-class", "1"]);
    assert!(
        err.contains("outliers.npy: embedding width 16 is not the text encoder's hidden size 32"),
        "{err}"
    );

    inputs(dir, 32, |e| e[[1, 3, 5]] = f32::NAN);
    let err = run(&["--per-class", "1"]);
    assert!(
        err.contains("outliers.npy: value NaN at class 1, row 3 is not finite"),
        "{err}"
    );

    inputs(dir, 32, |_| {});
    let err = run(&["--per-class", "1", "--shard", "2/2"]);
    assert!(err.contains("malformed shard \"2/2\""), "{err}");
    let err = run(&["--total", "4", "--scheduler", "plms2"]);
    assert!(err.contains("generate.scheduler"), "{err}");
    let err = run(&[]);
    assert!(
        err.contains("generate.per_class: give per_class or total"),
        "{err}"
    );
    std::fs::write(dir.join("classes.toml"), "[[class]]\nname = \"cat\"\n").unwrap();
    let err = run(&["--per-class", "1"]);
    assert!(
        err.contains("outliers.npy: has 3 classes, the classes file lists 1"),
        "{err}"
    );
}
