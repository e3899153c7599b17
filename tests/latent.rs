//! Stage 1 (`dream-ood latent`) end to end on a tiny ImageFolder: the files and their shapes, the checkpoint
//! loading back into the network, resume continuing the uninterrupted run bit for bit, stage 2 picking the
//! bank up from the run folder, token embeddings read from an SD export equal to the rows stage 3 injects
//! around, and the errors for bad settings.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use dream_ood::nn::checkpoint;
use ndarray::{Array2, ArrayD};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

use crate::common::{run_clean, stderr};

const CLASSES: usize = 3;
const PER_CLASS: usize = 20;
const DIM: usize = 16;

fn write_tokens(path: &Path) {
    let t = Array2::<f32>::from_shape_fn((CLASSES, DIM), |(c, d)| {
        (0.3 * ((c * DIM + d) as f32 * 0.9 + c as f32).sin()) + if d == c { 1.0 } else { 0.0 }
    });
    t.write_npy(File::create(path).unwrap()).unwrap();
}

fn write_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"[run]
out_dir = "run"
seed = 3
device = "cpu"
threads = 1

[data]
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

[latent]
tokens = "tokens.npy"
depth = "resnet18"
epochs = 3
batch = 8
lr = 0.05
bank_per_class = 6
{extra}
"#
        ),
    )
    .unwrap();
    path
}

fn read_f32(path: &Path) -> ArrayD<f32> {
    ArrayD::<f32>::read_npy(File::open(path).unwrap()).unwrap()
}

fn fixture_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    crate::common::write_colour_classes(&dir.path().join("images"), CLASSES, PER_CLASS);
    write_tokens(&dir.path().join("tokens.npy"));
    dir
}

/// Starts `latent` and kills it (SIGKILL) as soon as its first epoch is logged.
fn run_killed_after_first_epoch(dir: &Path, cfg: &Path) {
    let mut child = crate::common::dream_ood()
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(dir)
        .args(["latent", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = dir.join("run/latent/log.jsonl");
    let started = std::time::Instant::now();
    loop {
        let rows = std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
        if rows >= 1 {
            child.kill().unwrap();
            child.wait().unwrap();
            let rows = std::fs::read_to_string(&log).unwrap().lines().count();
            assert!(
                rows < 3,
                "the run finished before it could be killed; the test needs longer epochs"
            );
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("latent exited ({status}) before its first epoch was logged");
        }
        assert!(
            started.elapsed().as_secs() < 300,
            "no epoch logged in 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn latent_writes_model_bank_and_log_and_resumes_exactly() {
    let dir = fixture_dir();
    let cfg = write_config(dir.path(), "a.toml", "");
    run_killed_after_first_epoch(dir.path(), &cfg);
    // Rerunning the same command continues after the last saved epoch.
    let out = run_clean(dir.path(), &["latent", cfg.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming after epoch"),
        "{}",
        stderr(&out)
    );

    let run = dir.path().join("run/latent");
    let bank = read_f32(&run.join("bank.npy"));
    assert_eq!(bank.shape(), &[CLASSES, 6, DIM]);
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("bank.json")).unwrap()).unwrap();
    assert_eq!(sidecar["counts"], serde_json::json!([6, 6, 6]));
    assert_eq!(
        sidecar["classes"],
        serde_json::json!(["class0", "class1", "class2"])
    );
    // Every bank row is a real feature (no zero padding with 10 images per class).
    for row in bank.to_shape((CLASSES * 6, DIM)).unwrap().rows() {
        assert!(row.iter().any(|&v| v != 0.0));
    }
    assert_eq!(read_f32(&run.join("tokens.npy")).shape(), &[CLASSES, DIM]);
    let log = std::fs::read_to_string(run.join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");
    // Each epoch says how long training waited for the loader: a part of the epoch's seconds.
    let header: Vec<&str> = log.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    for row in log.lines().skip(1) {
        let cells: Vec<f64> = row.split(',').map(|c| c.parse().unwrap()).collect();
        let (wait, secs) = (cells[col("data_wait_s")], cells[col("seconds")]);
        assert!(
            (0.0..=secs).contains(&wait),
            "data_wait_s {wait} of {secs} s"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let acc = summary["test_nearest_token_top1"].as_f64().unwrap();
    // Three colour-separable classes: stage 1 learns them well above chance (1/3) in 3 epochs (0.67 here).
    assert!(
        acc > 0.5,
        "nearest-token accuracy {acc}: stage 1 did not learn"
    );

    // The checkpoint loads into the network it describes.
    let info = checkpoint::read_info(&run.join("model.safetensors")).unwrap();
    assert_eq!(info.stage, "latent");
    assert_eq!(info.epoch, 3);
    assert_eq!(info.network.head, "trans");
    assert_eq!(info.network.out_dim, DIM as i64);
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = info.network.build(&vs.root());
    checkpoint::load_into(&run.join("model.safetensors"), &mut vs).unwrap();

    // One uninterrupted run in another folder gives the same weights and bank, bit for bit.
    let cfg_b = write_config(dir.path(), "b.toml", "out = \"run_b\"");
    let out = run_clean(dir.path(), &["latent", cfg_b.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = checkpoint::read_tensors(&run.join("model.safetensors")).unwrap();
    let b = checkpoint::read_tensors(&dir.path().join("run_b/model.safetensors")).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        assert!(
            t.equal(&b.tensors[name]),
            "{name} differs between resumed and uninterrupted runs"
        );
    }
    assert_eq!(bank, read_f32(&dir.path().join("run_b/bank.npy")));

    // Stage 2 finds the bank and tokens in the run folder.
    std::fs::write(
        dir.path().join("a.toml"),
        std::fs::read_to_string(&cfg).unwrap()
            + "\n[sample]\nk = 2\nselect = 2\nanchors = 2\ncandidates = 10\nkeep = 2\nper_class = 4\n",
    )
    .unwrap();
    let out = run_clean(dir.path(), &["sample", cfg.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let outliers = read_f32(&dir.path().join("run/sample/outliers.npy"));
    assert_eq!(outliers.shape(), &[CLASSES, 4, DIM]);
}

#[test]
fn latent_errors_name_the_setting() {
    let dir = fixture_dir();
    // Labels beyond the token table.
    let two = Array2::<f32>::ones((2, DIM));
    two.write_npy(File::create(dir.path().join("two.npy")).unwrap())
        .unwrap();
    let cfg = write_config(dir.path(), "c.toml", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("tokens.npy", "two.npy");
    std::fs::write(&cfg, text).unwrap();
    let out = run_clean(dir.path(), &["latent", cfg.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("label 2") && stderr(&out).contains("2 class token"),
        "{}",
        stderr(&out)
    );

    // A misspelt key.
    let cfg = write_config(dir.path(), "d.toml", "tua = 0.1");
    let out = run_clean(dir.path(), &["latent", cfg.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("latent.tua") && stderr(&out).contains("tau"),
        "{}",
        stderr(&out)
    );

    // No token source.
    let cfg = write_config(dir.path(), "e.toml", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("tokens = \"tokens.npy\"\n", "");
    std::fs::write(&cfg, text).unwrap();
    let out = run_clean(dir.path(), &["latent", cfg.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("latent.tokens"), "{}", stderr(&out));
}

/// T read from an SD export is the rows of its token table at each class's anchor token, the very rows
/// stage 3's text encoder looks up (same table reader, same tokenizer, same classes file).
#[test]
fn tokens_from_an_sd_export_are_the_injection_rows() {
    use dream_ood::diffusion::classes::Classes;
    use dream_ood::diffusion::session::SessionOptions;
    use dream_ood::diffusion::text_encoder::TextEncoder;
    use dream_ood::diffusion::tokenizer::ClipTokenizer;

    let sd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_sd/model");
    let dir = tempfile::tempdir().unwrap();
    let classes_path = dir.path().join("classes.toml");
    std::fs::write(
        &classes_path,
        "[[class]]\nname = \"apple\"\n[[class]]\nname = \"aquarium fish\"\nembedding_word = \"fish\"\n[[class]]\nname = \"cockroach\"\n",
    )
    .unwrap();
    let classes = Classes::load(&classes_path).unwrap();
    let (t, anchors) = dream_ood::latent::tokens::from_sd_model(&sd, &classes).unwrap();
    let tokenizer = ClipTokenizer::from_dir(&sd.join("tokenizer")).unwrap();
    let te = TextEncoder::load(
        &sd.join("text_encoder/model.onnx"),
        &SessionOptions::default(),
    )
    .unwrap();
    let mut seen = BTreeMap::new();
    for (c, class) in classes.classes.iter().enumerate() {
        let id = tokenizer.anchor_token(&class.embedding_word).unwrap();
        assert_eq!(anchors[c], id);
        let row = te.token_table().row(id as usize).unwrap();
        assert_eq!(t.row(c).to_vec(), row.to_vec(), "class {c}");
        seen.insert(id, c);
    }
    assert_eq!(seen.len(), 3, "distinct anchors");
}
