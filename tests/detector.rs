//! Stage 4, `dream-ood train`: the Dream-OOD and VOS losses against PyTorch
//! (`tools/make_training_fixtures.py` `energy.*`, `tools/make_detector_fixtures.py`), the regulariser's
//! gradient reaching the backbone and φ, and the CLI end to end on tiny generated images (the loss falls,
//! the energy separates ID from the outliers, a resumed run equals an uninterrupted one bit for bit, bad
//! settings are errors).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use dream_ood::data::source::Format;
use dream_ood::data::{DataSource, Loader, LoaderConfig, OnError};
use dream_ood::detector::loss::{PhiHead, dream_ood_loss, vos_loss, weighted_logsumexp};
use dream_ood::detector::trainer::{Model, StepBatch, step_loss};
use dream_ood::detector::vos::FeatureQueue;
use dream_ood::detector::{Method, Phi, TrainConfig};
use dream_ood::nn::checkpoint::{self, NetworkSpec};
use dream_ood::nn::optim::{Sgd, SgdConfig};
use dream_ood::nn::{Depth, Stem};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::common::{dream_ood, stderr, stdout};
use crate::training::max_abs_diff;

fn fixture(name: &str) -> BTreeMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let d = max_abs_diff(got, want);
    assert!(
        d <= tol,
        "{what}: max |diff| {d} > {tol}\n got {got}\nwant {want}"
    );
}

/// Copies fixture tensors into the variables of `vs` named like the fixture keys after `prefix`.
fn load_vars(vs: &VarStore, fx: &BTreeMap<String, Tensor>, prefix: &str, names: &[&str]) {
    let vars = vs.variables();
    tch::no_grad(|| {
        for n in names {
            vars[&format!("phi.{n}")]
                .shallow_clone()
                .copy_(&fx[&format!("{prefix}{n}")]);
        }
    });
}

/// The Dream-OOD loss (SPEC §4.4) for both φ, its parts and its gradients w.r.t. the logits and φ equal
/// PyTorch's within 1e-5.
#[test]
fn dream_ood_loss_and_gradients_equal_pytorch() {
    let fx = fixture("training/training.safetensors");
    let cases: [(&str, Phi, &[&str]); 2] = [
        ("lin", Phi::Linear, &["weight", "bias"]),
        (
            "mlp",
            Phi::Mlp,
            &["0.weight", "0.bias", "2.weight", "2.bias"],
        ),
    ];
    for (name, kind, params) in cases {
        let vs = VarStore::new(Device::Cpu);
        let phi = PhiHead::new(&(vs.root() / "phi"), kind);
        load_vars(&vs, &fx, &format!("energy.{name}."), params);
        let logits = fx["energy.logits"].copy().set_requires_grad(true);
        let parts = dream_ood_loss(&logits, &fx["energy.labels"], &phi, 2.5, 1.0);
        for (part, t) in [
            ("loss", &parts.loss),
            ("ce", &parts.ce),
            ("reg", &parts.reg),
        ] {
            close(
                &format!("{name} {part}"),
                t,
                &fx[&format!("energy.{name}.{part}")],
                1e-5,
            );
        }
        parts.loss.backward();
        close(
            &format!("{name} d loss / d logits"),
            &logits.grad(),
            &fx[&format!("energy.{name}.grad_logits")],
            1e-5,
        );
        let vars = vs.variables();
        for p in params {
            close(
                &format!("{name} d loss / d phi.{p}"),
                &vars[&format!("phi.{p}")].grad(),
                &fx[&format!("energy.{name}.grad_phi.{p}")],
                1e-5,
            );
        }
    }
}

/// VOS's loss with its ReLU'd learnable class weights (`train_virtual.py` `log_sum_exp` and the logistic
/// regulariser) and its gradients w.r.t. the logits, `fc`, the weights and φ equal PyTorch's.
#[test]
fn vos_loss_and_gradients_equal_pytorch() {
    let fx = fixture("detector/vos.safetensors");
    let vs = VarStore::new(Device::Cpu);
    let phi = PhiHead::new(&(vs.root() / "phi"), Phi::Linear);
    load_vars(&vs, &fx, "loss.phi.", &["weight", "bias"]);
    let logits = fx["loss.logits"].copy().set_requires_grad(true);
    let fc_w = fx["loss.fc.weight"].copy().set_requires_grad(true);
    let fc_b = fx["loss.fc.bias"].copy().set_requires_grad(true);
    let w = fx["loss.weight_energy"].copy().set_requires_grad(true);
    let virtual_logits = fx["loss.outliers"].linear(&fc_w, Some(&fc_b));
    close(
        "weighted lse",
        &weighted_logsumexp(&logits, &w),
        &fx["loss.lse_in"],
        1e-5,
    );
    let parts = vos_loss(&logits, &fx["loss.labels"], &virtual_logits, &w, &phi, 0.1);
    for part in ["loss", "ce", "reg"] {
        let t = match part {
            "loss" => &parts.loss,
            "ce" => &parts.ce,
            _ => &parts.reg,
        };
        close(part, t, &fx[&format!("loss.{part}")], 1e-5);
    }
    parts.loss.backward();
    let vars = vs.variables();
    for (name, got) in [
        ("logits", logits.grad()),
        ("fc.weight", fc_w.grad()),
        ("fc.bias", fc_b.grad()),
        ("weight_energy", w.grad()),
        ("phi.weight", vars["phi.weight"].grad()),
        ("phi.bias", vars["phi.bias"].grad()),
    ] {
        close(
            &format!("d loss / d {name}"),
            &got,
            &fx[&format!("loss.grad.{name}")],
            1e-5,
        );
    }
}

/// The class means and shared covariance equal the official loop's, the samples are `μ + L ε`, and the
/// official `topk(−log_prob)` keeps the draws with the largest ‖ε‖, which is what `vos::draw_offsets`
/// draws directly.
#[test]
fn vos_gaussians_and_selection_equal_the_official_code() {
    let fx = fixture("detector/vos.safetensors");
    let queue = &fx["gauss.queue"]; // [3, 4, 5]
    let mut q = FeatureQueue::new(3, 4, 5, Device::Cpu);
    let labels: Vec<i64> = (0..3).flat_map(|c| [c; 4]).collect();
    q.push(&queue.view([12, 5]), &labels).unwrap();
    assert!(q.is_full());
    let g = q.gaussians().unwrap();
    close("means", &g.means, &fx["gauss.means"], 1e-6);
    close("covariance", &g.cov, &fx["gauss.cov"], 1e-6);
    let eps = &fx["gauss.eps"]; // [50, 5]
    let samples = g.means.get(1).unsqueeze(0) + eps.matmul(&g.chol.transpose(0, 1));
    close("rsample", &samples, &fx["gauss.samples"], 1e-5);
    let norms = eps
        .square()
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let (_, largest) = norms.topk(3, 0, true, true);
    assert_eq!(
        Vec::<i64>::try_from(&largest).unwrap(),
        Vec::<i64>::try_from(&fx["gauss.keep"]).unwrap()
    );
}

/// Deterministic values in every variable (no global RNG: tests run in parallel); BN running variances 1.
fn fill(vs: &VarStore) {
    tch::no_grad(|| {
        for (i, (name, mut t)) in vs.variables().into_iter().enumerate() {
            let v = if name.ends_with("running_var") {
                t.ones_like()
            } else {
                Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu))
                    .g_mul_scalar(0.37 + i as f64 * 0.01)
                    .sin()
                    .g_mul_scalar(0.2)
                    .reshape(t.size())
            };
            t.copy_(&v);
        }
    });
}

fn images(n: i64, phase: f64) -> Tensor {
    Tensor::arange(n * 3 * 8 * 8, (Kind::Float, Device::Cpu))
        .g_mul_scalar(0.113)
        .g_add_scalar(phase)
        .sin()
        .view([n, 3, 8, 8])
}

fn grad_norm(vs: &VarStore, name: &str) -> f64 {
    let g = vs.variables()[name].grad();
    if g.defined() {
        g.norm().double_value(&[])
    } else {
        0.0
    }
}

/// The bug OpenOOD's VOS trainer has (reference note §1.5) cannot happen here: the regulariser alone sends
/// a gradient into the first and last backbone layers and into φ, and the trainer's optimiser moves φ.
#[test]
fn regulariser_reaches_the_backbone_and_phi_is_optimised() {
    for method in [Method::DreamOod, Method::Vos] {
        let cfg = TrainConfig {
            method,
            depth: Depth::Resnet18,
            vos: dream_ood::detector::VosConfig {
                queue: 2,
                samples: 50,
                select: 2,
                start_epoch: 0,
                loss_weight: 0.1,
            },
            ..TrainConfig::default()
        };
        let spec = NetworkSpec {
            depth: Depth::Resnet18,
            stem: Stem::Cifar,
            in_channels: 3,
            width: 64,
            head: "fc".into(),
            out_dim: 3,
        };
        let (vs, aux) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let model = Model::new(&vs, &aux, &spec, &cfg);
        fill(&vs);
        fill(&aux);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
        let batch = StepBatch {
            images: images(6, 0.0),
            labels: labels.shallow_clone(),
            generated: Some(images(4, 1.7)),
            generated_labels: None,
            permutation: None,
        };
        let mut queue = FeatureQueue::new(3, 2, 512, Device::Cpu);
        if method == Method::Vos {
            // Fill the queues first, as the epochs before `start_epoch` do.
            let feats = tch::no_grad(|| model.net.features(&images(6, 0.5), true));
            queue.push(&feats, &[0, 1, 2, 0, 1, 2]).unwrap();
        }
        let vos_step = (method == Method::Vos).then_some(dream_ood::detector::trainer::VosStep {
            queue: &mut queue,
            after_start: true,
            seed: 3,
            step: 0,
        });
        let out = step_loss(&model, &cfg, &batch, vos_step).unwrap();
        assert!(
            out.parts.reg.double_value(&[]) > 0.0,
            "{method:?}: no regulariser"
        );
        out.parts.reg.backward();
        for name in [
            "encoder.conv1.weight",
            "encoder.layer4.1.conv2.weight",
            "fc.weight",
        ] {
            assert!(
                grad_norm(&vs, name) > 0.0,
                "{method:?}: no gradient of the regulariser in {name}"
            );
        }
        assert!(
            grad_norm(&aux, "phi.weight") > 0.0,
            "{method:?}: φ gets no gradient"
        );
        if method == Method::Vos {
            assert!(grad_norm(&aux, "weight_energy.weight") > 0.0);
        }
        let before = aux.variables()["phi.weight"].copy();
        let mut opt = Sgd::new(&aux, SgdConfig::default());
        assert!(opt.names().any(|n| n == "phi.weight"));
        opt.step(0.1);
        assert!(
            !aux.variables()["phi.weight"].equal(&before),
            "{method:?}: φ did not move"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// The CLI end to end on tiny images.

/// A cheap deterministic hash → 0..255.
fn noise(a: usize, b: usize, c: usize) -> u8 {
    let mut z = (a as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (b as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ (c as u64).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 29;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (z >> 56) as u8
}

/// ID class `class`: stripes (horizontal, vertical, diagonal) with a little noise, 16×16.
fn id_image(class: usize, i: usize) -> image::RgbImage {
    image::RgbImage::from_fn(16, 16, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let on = match class {
            0 => (y / 2) % 2 == 0,
            1 => (x / 2) % 2 == 0,
            _ => ((x + y) / 2) % 2 == 0,
        };
        let base: i32 = if on { 200 } else { 60 };
        let v = (base + noise(i, x, y) as i32 / 8 - 16).clamp(0, 255) as u8;
        image::Rgb([v, v, v])
    })
}

/// "Outliers": 24×24 colour blobs (smooth, coloured, unlike the gray stripes), resized to 16 when loaded.
fn outlier_image(i: usize) -> image::RgbImage {
    image::RgbImage::from_fn(24, 24, |x, y| {
        let (x, y) = (x as usize, y as usize);
        image::Rgb([
            (noise(i, 0, 0) as usize * (x + 1) / 24) as u8,
            (noise(i, 1, 0) as usize * (y + 1) / 24) as u8,
            noise(i, x / 8, y / 8),
        ])
    })
}

const CLASSES: usize = 3;

/// Writes `root/train/<c>/…`, `root/test/<c>/…` (ImageFolder) and `root/run/generate/` (stage 3's default folder,
/// with `manifest.jsonl`, images labelled round-robin by class).
fn dataset(root: &Path, per_class: usize, outliers: usize) {
    for (split, offset) in [("train", 0), ("test", 1000)] {
        for c in 0..CLASSES {
            let dir = root.join(split).join(format!("c{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            let n = if split == "train" { per_class } else { 8 };
            for i in 0..n {
                id_image(c, offset + i)
                    .save(dir.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let generated = root.join("run/generate");
    let mut manifest = String::new();
    for i in 0..outliers {
        let class = i % CLASSES;
        std::fs::create_dir_all(generated.join(class.to_string())).unwrap();
        let file = format!("{class}/{i}.png");
        outlier_image(i).save(generated.join(&file)).unwrap();
        manifest.push_str(&format!(
            "{{\"file\": \"{file}\", \"class_index\": {class}, \"seed\": {i}}}\n"
        ));
    }
    std::fs::write(generated.join("manifest.jsonl"), manifest).unwrap();
}

/// A config for the tiny data; `train` is extra `[train]` lines.
fn config(root: &Path, train: &str) -> PathBuf {
    // `train` lines replace the base lines of the same key.
    let base = [
        "depth = \"resnet18\"",
        "epochs = 2",
        "lr = 0.05",
        "batch = 12",
        "outlier_batch = 12",
    ];
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_owned();
    let given: Vec<String> = train.lines().map(key).collect();
    let kept: Vec<&str> = base
        .into_iter()
        .filter(|l| !given.contains(&key(l)))
        .collect();
    let text = format!(
        "[run]\nout_dir = \"run\"\nseed = 5\ndevice = \"cpu\"\nthreads = 1\n\n\
         [data]\nsize = 16\npadding = 2\naugment = \"crop\"\n\
         [data.train]\nformat = \"folder\"\npath = \"train\"\n\
         [data.test]\nformat = \"folder\"\npath = \"test\"\n\n\
         [train]\n{}\n{train}\n",
        kept.join("\n")
    );
    let path = root.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train(root: &Path, args: &[&str]) -> Output {
    let mut cmd = dream_ood();
    cmd.current_dir(root)
        .args(["-q", "train", "config.toml"])
        .args(args);
    cmd.output().unwrap()
}

fn ok(out: &Output) {
    assert!(out.status.success(), "train failed:\n{}", stderr(out));
}

fn log_rows(dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn num(row: &serde_json::Map<String, serde_json::Value>, key: &str) -> f64 {
    row.get(key)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("no `{key}` in {row:?}"))
}

/// `logsumexp(logits)` (= −energy) of every image of a source through the eval pipeline.
fn neg_energy(model: &Path, source: DataSource) -> Vec<f64> {
    let info = checkpoint::read_info(model).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let net = info.network.build(&vs.root());
    checkpoint::load_into(model, &mut vs).unwrap();
    // The checkpoint's own eval transform: Resize(16) → CenterCrop(16) → Normalize.
    let pipeline = info.eval_transform.clone();
    let cfg = LoaderConfig {
        batch_size: 64,
        shuffle: false,
        seed: 0,
        threads: 1,
        prefetch: 1,
        on_error: OnError::Fail,
    };
    let loader = Loader::new(source.open().unwrap(), pipeline, cfg).unwrap();
    let mut out = Vec::new();
    for b in loader.epoch(0).unwrap() {
        let logits = tch::no_grad(|| net.forward_t(&b.unwrap().images, false));
        out.extend(
            Vec::<f32>::try_from(logits.logsumexp([1], false))
                .unwrap()
                .into_iter()
                .map(f64::from),
        );
    }
    out
}

/// Dream-OOD on tiny data: the log has every column, the loss falls, the energy separates ID from the
/// outliers the detector was shown (ID with the higher logsumexp, as the energy score needs), φ was trained (its momentum is in the state), the checkpoint loads
/// into a plain classifier and describes itself.
#[test]
fn dream_ood_training_separates_id_from_outliers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 16, 48);
    config(root, "epochs = 4\nlr = 0.01\n");
    let out = train(root, &[]);
    ok(&out);
    let run = root.join("run/train/dream_ood");
    let model = run.join("model.safetensors");
    assert_eq!(stdout(&out).trim(), model.display().to_string());
    let rows = log_rows(&run);
    assert_eq!(rows.len(), 4);
    for key in [
        "epoch",
        "step",
        "lr",
        "loss",
        "ce",
        "reg",
        "train_acc",
        "test_acc",
        "seconds",
        "images_per_s",
        "data_wait_s",
    ] {
        num(&rows[0], key);
    }
    assert_eq!(
        num(&rows[3], "step"),
        16.0,
        "4 steps per epoch (48 ID / 12)"
    );
    assert!(
        num(&rows[3], "loss") < num(&rows[0], "loss")
            && num(&rows[3], "reg") < num(&rows[0], "reg"),
        "loss did not fall: {rows:?}"
    );
    assert!(
        num(&rows[3], "train_acc") >= 0.9,
        "the classes are not learnt: {rows:?}"
    );
    assert!(
        std::fs::read_to_string(run.join("log.csv"))
            .unwrap()
            .starts_with("epoch,step,lr,loss,ce,reg")
    );

    let info = checkpoint::read_info(&model).unwrap();
    assert_eq!(info.stage, "detector");
    assert_eq!(info.epoch, 4);
    assert_eq!(info.classes, ["c0", "c1", "c2"]);
    assert_eq!(info.extra["method"], "dream_ood");
    let state = Tensor::read_safetensors(run.join("state.safetensors")).unwrap();
    let state: BTreeMap<String, Tensor> = state.into_iter().collect();
    assert!(state["momentum.phi.weight"].norm().double_value(&[]) > 0.0);
    assert!(state.contains_key("phi.bias") && state.contains_key("momentum.encoder.conv1.weight"));

    let id = neg_energy(&model, DataSource::new(Format::Folder, root.join("train")));
    let ood = neg_energy(
        &model,
        DataSource::new(Format::Manifest, root.join("run/generate")),
    );
    let ranked = dream_ood::eval::metrics::RankedScores::new(&id, &ood).unwrap();
    let auroc = ranked.auroc();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        auroc > 0.9 && mean(&id) > mean(&ood),
        "energy does not separate ID from outliers: AUROC {auroc}, mean lse ID {} vs outliers {}",
        mean(&id),
        mean(&ood)
    );
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Asserts two runs wrote the same model file (byte for byte) and the same state: every tensor bit for
/// bit and the same metadata (the state file's metadata map has no fixed key order, so its bytes may
/// differ).
fn same_run(a: &Path, b: &Path) {
    assert!(
        bytes(&a.join("model.safetensors")) == bytes(&b.join("model.safetensors")),
        "model.safetensors differs between {} and {}",
        a.display(),
        b.display()
    );
    let (sa, sb) = (
        checkpoint::read_tensors(&a.join("state.safetensors")).unwrap(),
        checkpoint::read_tensors(&b.join("state.safetensors")).unwrap(),
    );
    assert_eq!(sa.metadata, sb.metadata);
    assert_eq!(
        sa.tensors.keys().collect::<Vec<_>>(),
        sb.tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &sa.tensors {
        assert!(t.equal(&sb.tensors[k]), "state tensor `{k}` differs");
    }
}

/// Stopping after epoch 1 (`--until-epoch`) and rerunning the same command gives the same model and
/// state files, byte for byte, as one uninterrupted run (CPU, one thread): data order, augmentation, the
/// permutation, the generated loader's restarts, momentum and φ all continue where they were.
#[test]
fn resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // 24 ID images and 12 outliers per pass with batch 12: `permute` restarts the outlier loader
    // within every epoch.
    dataset(root, 8, 12);
    config(
        root,
        "batching = \"permute\"\nphi = \"mlp\"\nphi_init = \"pytorch\"\nlr = 0.01\n",
    );
    ok(&train(root, &["--out", "a"]));
    ok(&train(root, &["--out", "b", "--until-epoch", "1"]));
    assert_eq!(log_rows(&root.join("b")).len(), 1);
    let again = train(root, &["--out", "b"]);
    ok(&again);
    assert_eq!(log_rows(&root.join("b")).len(), 2);
    same_run(&root.join("a"), &root.join("b"));
    // A finished run has nothing left to do.
    ok(&train(root, &["--out", "b"]));
    assert_eq!(log_rows(&root.join("b")).len(), 2);
}

/// Ctrl-C (SIGINT) stops the run after the current step with exit status 1 and a hint; rerunning the
/// command finishes it with the same files as a run that was never stopped.
#[test]
fn interrupted_run_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 4, 3);
    config(root, "epochs = 6\nlr = 0.01\n");
    ok(&train(root, &["--out", "a"]));
    let child = dream_ood()
        .current_dir(root)
        .args(["-q", "train", "config.toml", "--out", "b"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = root.join("b/log.jsonl");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|t| !t.is_empty()) {
        assert!(start.elapsed().as_secs() < 120, "no epoch finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    if out.status.code() == Some(1) {
        assert!(err.contains("rerun the same command to resume"), "{err}");
        assert!(log_rows(&root.join("b")).len() < 6);
    } else {
        // The run finished before the signal landed (a very slow machine); nothing to resume.
        assert!(out.status.success(), "{err}");
    }
    ok(&train(root, &["--out", "b"]));
    same_run(&root.join("a"), &root.join("b"));
}

/// VOS on tiny data, its queue filled in epoch 1 and the regulariser on from epoch 2; the resumed run
/// (queue, energy weights and φ restored from the state file) equals the uninterrupted one.
#[test]
fn vos_trains_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 8, 3);
    config(
        root,
        "method = \"vos\"\n[train.vos]\nqueue = 4\nsamples = 200\nselect = 2\nstart_epoch = 1\n",
    );
    ok(&train(root, &["--out", "a"]));
    ok(&train(root, &["--out", "b", "--until-epoch", "1"]));
    ok(&train(root, &["--out", "b"]));
    same_run(&root.join("a"), &root.join("b"));
    let rows = log_rows(&root.join("a"));
    assert_eq!(
        num(&rows[0], "reg"),
        0.0,
        "the regulariser is off before start_epoch"
    );
    assert!(
        num(&rows[1], "reg") > 0.0,
        "the regulariser is on from start_epoch"
    );
    let state: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(root.join("a/state.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(state["vos.queue"].size(), [3, 4, 512]);
    assert!(
        state["momentum.weight_energy.weight"]
            .norm()
            .double_value(&[])
            > 0.0
    );
    assert!(state["momentum.phi.weight"].norm().double_value(&[]) > 0.0);
}

/// The baseline (no generated images needed) and the inlier variant (generated images labelled by the
/// manifest's class) both train, and a baseline checkpoint initialises a Dream-OOD fine-tune (`init`).
#[test]
fn baseline_inlier_aug_and_init_from_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 8, 12);
    config(root, "epochs = 1\n");
    ok(&train(root, &["--method", "baseline"]));
    let baseline = root.join("run/train/baseline/model.safetensors");
    assert_eq!(
        checkpoint::read_info(&baseline).unwrap().extra["method"],
        "baseline"
    );
    ok(&train(root, &["--method", "inlier_aug"]));
    let rows = log_rows(&root.join("run/train/inlier_aug"));
    assert_eq!(num(&rows[0], "reg"), 0.0);
    // 24 ID and 12 generated images with batches of 12: one step (the shorter loader ends the epoch).
    assert_eq!(num(&rows[0], "step"), 1.0);

    config(
        root,
        "epochs = 1\ninit = \"run/train/baseline/model.safetensors\"\nlr = 0.001\n",
    );
    ok(&train(root, &["--out", "ft"]));
    let run: serde_json::Value = serde_json::from_slice(&bytes(&root.join("ft/run.json"))).unwrap();
    assert!(
        run["init"]
            .as_str()
            .unwrap()
            .ends_with("baseline/model.safetensors"),
        "{run}"
    );
    assert_eq!(run["settings"]["init"], true);
}

/// Bad settings and inputs are errors (exit 2) that name the key or file and what was expected.
#[test]
fn bad_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root, 4, 3);
    let fails = |train_toml: &str, args: &[&str], want: &[&str]| {
        config(root, train_toml);
        let out = train(root, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{train_toml} {args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for w in want {
            assert!(
                err.contains(w),
                "{train_toml} {args:?}: `{w}` not in: {err}"
            );
        }
    };
    fails(
        "method = \"energy\"\n",
        &[],
        &["train.method", "unknown variant `energy`", "dream_ood"],
    );
    fails("beta = -1.0\n", &[], &["config.toml", "train.beta", "≥ 0"]);
    fails(
        "outliers = \"nowhere\"\n",
        &[],
        &["nowhere", "manifest.jsonl", "dream-ood generate"],
    );
    fails("", &["--until-epoch", "3"], &["until-epoch", "1..=2"]);
    fails(
        "",
        &["--method", "vos2"],
        &["vos2", "baseline, dream_ood, vos or inlier_aug"],
    );
    fails(
        "init = \"missing.safetensors\"\n",
        &[],
        &["missing.safetensors"],
    );
    // A generated inlier labelled with a class the ID data does not have.
    std::fs::write(
        root.join("run/generate/manifest.jsonl"),
        "{\"file\": \"0/0.png\", \"class_index\": 7}\n",
    )
    .unwrap();
    fails(
        "method = \"inlier_aug\"\n",
        &[],
        &["train.outliers", "label 7", "3 ID classes"],
    );
    // A folder of another run is not resumed with other settings.
    dataset(root, 4, 3);
    config(root, "epochs = 2\n");
    ok(&train(root, &["--until-epoch", "1"]));
    fails(
        "epochs = 2\nlr = 0.2\n",
        &[],
        &[
            "model.safetensors",
            "other settings",
            "train.lr: 0.05 → 0.2",
        ],
    );
}
