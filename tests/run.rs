//! `dream-ood run` on a micro config (tiny images, one epoch, the tiny SD fixture): every stage runs in
//! order into one folder (a baseline, then a Dream-OOD detector fine-tuned from it, evaluated side by side,
//! the Dream-OOD one exported and a few images scored through it, the run report written), a second run
//! skips them all, a changed stage-2 setting reruns the stages from 2 on only, `--only` and `--force` do
//! what they say.

use std::path::Path;

use crate::common::{run_clean, stderr, stdout};

fn config(sigma: f64) -> String {
    let sd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_sd/model");
    format!(
        r#"[run]
out_dir = "run"
seed = 1
device = "cpu"
threads = 1
methods = ["dream_ood", "baseline"]  # finetune.from is trained first whatever the order

[data]
classes = "classes.toml"
size = 8
padding = 1
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
[data.train]
format = "folder"
path = "images"
[data.test]
format = "folder"
path = "images"
[data.val]
format = "folder"
path = "images"
holdout = {{ fraction = 0.25, part = "held" }}
[data.ood.noise]
format = "noise"
path = "."
count = 12
side = 8

[latent]
sd_model = "{sd}"
depth = "resnet18"
epochs = 1
batch = 8
bank_per_class = 4

[sample]
k = 2
select = 2
anchors = 2
candidates = 10
keep = 1
per_class = 2
sigma = {sigma}

[generate]
model = "{sd}"
per_class = 1
steps = 2
batch = 3
image_size = 16
threads = 1

[train]
depth = "resnet18"
epochs = 1
batch = 8
outlier_batch = 3
threads = 1
finetune = {{ from = "baseline", epochs = 1, lr = 0.05 }}

[eval]
scores = ["energy", "msp", "knn"]
knn_k = 2
protocol = "full"
batch_size = 16
plots = false
"#,
        sd = sd.display()
    )
}

const STAGES: [&str; 6] = ["latent", "sample", "generate", "train", "eval", "export"];

/// `(stage, action)` from the stage table `run` prints first (up to the first blank line).
fn actions(out: &std::process::Output) -> Vec<(String, String)> {
    stdout(out)
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split_whitespace();
            let stage = parts.next().unwrap().to_owned();
            let rest: Vec<&str> = parts.collect();
            (stage, rest[..rest.len() - 1].join(" "))
        })
        .collect()
}

#[test]
fn run_chains_the_stages_and_skips_what_is_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::write_colour_classes(&dir.path().join("images"), 3, 8);
    std::fs::write(
        dir.path().join("classes.toml"),
        "[[class]]\nname = \"apple\"\n[[class]]\nname = \"cat\"\n[[class]]\nname = \"dog\"\n",
    )
    .unwrap();
    let cfg = dir.path().join("micro.toml");
    std::fs::write(&cfg, config(0.07)).unwrap();
    let cfg_arg = cfg.to_str().unwrap();

    let out = run_clean(dir.path(), &["run", cfg_arg], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ran =
        |a: &[(String, String)], stage: &str| a.iter().find(|(s, _)| s == stage).unwrap().1.clone();
    let a = actions(&out);
    for stage in STAGES {
        assert_eq!(ran(&a, stage), "ran", "{a:?}");
    }
    // The comparison table and the report's path follow.
    let printed = stdout(&out);
    assert!(
        printed.contains("score: energy") && printed.contains("dream_ood FPR95"),
        "{printed}"
    );
    assert!(printed.contains("report:"), "{printed}");
    let run = dir.path().join("run");
    assert!(run.join("latent/bank.npy").exists());
    assert!(run.join("sample/outliers.npy").exists());
    let manifest = std::fs::read_to_string(run.join("generate/manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 3, "{manifest}");
    let stamp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("generate/stamp.json")).unwrap()).unwrap();
    assert_eq!(stamp["state"], "done");
    for method in ["baseline", "dream_ood"] {
        assert!(
            run.join(format!("train/{method}/model.safetensors"))
                .exists()
        );
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("eval/metrics.json")).unwrap()).unwrap();
    let text = metrics.to_string();
    assert!(
        text.contains("baseline") && text.contains("dream_ood"),
        "{text}"
    );
    // dream_ood started from the baseline's model (finetune), for the 1 epoch finetune gives.
    let log = std::fs::read_to_string(run.join("train/dream_ood/log.csv")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");

    // The export stage: detector.onnx, and 4 images of each set scored through it as `score` would.
    assert!(run.join("export/detector.onnx").is_file());
    let samples: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("export/samples/summary.json")).unwrap())
            .unwrap();
    let sets: Vec<(&str, u64)> = samples
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["set"].as_str().unwrap(), s["scored"].as_u64().unwrap()))
        .collect();
    assert_eq!(sets, [("id_test", 4), ("noise", 4)], "{samples}");
    let scores = std::fs::read_to_string(run.join("export/samples/scores.csv")).unwrap();
    assert_eq!(scores.lines().count(), 1 + 8, "{scores}");
    assert!(scores.starts_with("path,class,class_index,confidence,score,is_ood"));
    assert!(run.join("export/samples/noise/3.png").is_file());

    // The run report: the comparison, the outlier grid beside real images, deployment, stage times.
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    for part in [
        "## Detection",
        "| **mean** |",
        "![generated outliers](outliers.png)",
        "## Deployment",
        "| noise | OOD | 4 |",
        "| export |",
    ] {
        assert!(report.contains(part), "{part:?} missing from\n{report}");
    }
    let grid = image::open(run.join("outliers.png")).unwrap();
    assert!(grid.width() > 2 * 48 && grid.height() >= 3 * 48);

    // `export CONFIG`: the trained dream_ood model, its threshold calibrated through the exported graph on
    // [data.val] (2 held-out images of each class).
    let out = run_clean(dir.path(), &["export", cfg_arg], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let onnx = run.join("export/detector.onnx");
    assert_eq!(stdout(&out).trim(), onnx.display().to_string());
    let props: std::collections::HashMap<String, String> =
        dream_ood::onnx::model::load_model(&onnx)
            .unwrap()
            .metadata_props
            .into_iter()
            .map(|p| (p.key().to_owned(), p.value().to_owned()))
            .collect();
    let meta = dream_ood::deploy::DetectorMetadata::from_props(&props, "detector.onnx").unwrap();
    let cal = meta.calibration.expect("calibrated");
    assert_eq!((cal.source.as_str(), cal.count), ("dataset", 6));
    assert!(cal.achieved_tpr >= 0.95);
    assert_eq!(
        meta.training_config_sha256.as_ref().map(String::len),
        Some(64)
    );

    // Nothing changed: everything is up to date.
    let out = run_clean(dir.path(), &["run", cfg_arg], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = actions(&out);
    for stage in STAGES {
        assert_eq!(ran(&a, stage), "up to date", "{a:?}");
    }

    // A stage-2 setting changed: stages 2 and 3 rerun, stage 1 does not.
    std::fs::write(&cfg, config(0.05)).unwrap();
    let out = run_clean(dir.path(), &["run", cfg_arg], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = actions(&out);
    assert_eq!(ran(&a, "latent"), "up to date", "{a:?}");
    assert_eq!(ran(&a, "sample"), "ran", "{a:?}");
    assert_eq!(ran(&a, "generate"), "ran", "{a:?}");
    assert_eq!(ran(&a, "train"), "ran", "{a:?}");
    assert_eq!(ran(&a, "eval"), "ran", "{a:?}");
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("sample/outliers.json")).unwrap()).unwrap();
    assert_eq!(sidecar["settings"]["sigma"], 0.05, "{sidecar}");

    // --only and --force.
    let out = run_clean(
        dir.path(),
        &["run", cfg_arg, "--only", "sample", "--force"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let a = actions(&out);
    assert_eq!(ran(&a, "sample"), "ran", "{a:?}");
    assert_eq!(ran(&a, "latent"), "not selected", "{a:?}");
    assert_eq!(ran(&a, "generate"), "not selected", "{a:?}");

    let out = run_clean(dir.path(), &["run", cfg_arg, "--only", "train9"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown stage"), "{}", stderr(&out));
}
