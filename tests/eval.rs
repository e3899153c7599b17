//! `dream_ood::eval::scores` against numpy / scikit-learn / PyTorch (`tools/make_score_fixtures.py`), score
//! invariants, and `dream-ood eval` end to end on tiny data.

use std::collections::HashMap;
use std::path::PathBuf;

use dream_ood::eval::scores::{
    Head, knn::Knn, logit, mahalanobis::Mahalanobis, odin, react::React, vim::Vim,
};
use dream_ood::nn::{Depth, ResNetConfig, ResNetWithHead, Stem};
use tch::{Device, Kind, Tensor};

/// Relative tolerance against the references (stated in the fixture script).
const RTOL: f64 = 1e-5;

fn fixtures() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/scores.safetensors");
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = RTOL * w.abs().max(1e-3);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, expected {w} (tolerance {tol:e})\n got {got:?}\nwant {want:?}"
        );
    }
}

#[test]
fn logit_scores_match_numpy() {
    let f = fixtures();
    let z = &f["test_logits"];
    assert_close("msp", &logit::msp(z).unwrap(), &values(&f["msp"]));
    assert_close(
        "max_logit",
        &logit::max_logit(z).unwrap(),
        &values(&f["max_logit"]),
    );
    assert_close(
        "energy T=1",
        &logit::energy(z, 1.0).unwrap(),
        &values(&f["energy_t1"]),
    );
    assert_close(
        "energy T=2.5",
        &logit::energy(z, 2.5).unwrap(),
        &values(&f["energy_t2.5"]),
    );
}

#[test]
fn mahalanobis_matches_scikit_learn_with_a_singular_covariance() {
    let f = fixtures();
    let m = Mahalanobis::fit(&f["train_features"], &f["train_labels"], 4).unwrap();
    assert_close(
        "mahalanobis",
        &m.score(&f["test_features"]).unwrap(),
        &values(&f["mahalanobis"]),
    );
}

#[test]
fn knn_matches_numpy_for_several_k() {
    let f = fixtures();
    for k in [1, 3, 7] {
        let knn = Knn::fit(&f["train_features"], k).unwrap();
        assert_close(
            &format!("knn k={k}"),
            &knn.score(&f["test_features"]).unwrap(),
            &values(&f[&format!("knn_k{k}")]),
        );
    }
}

#[test]
fn react_matches_numpy() {
    let f = fixtures();
    let head = Head::new(&f["head_weight"], &f["head_bias"]).unwrap();
    let r = React::fit(&f["train_features"], 90.0).unwrap();
    assert_close(
        "react threshold",
        &[r.threshold],
        &values(&f["react_p90_threshold"]),
    );
    assert_close(
        "react",
        &r.score(&f["test_features"], &head).unwrap(),
        &values(&f["react_p90"]),
    );
}

#[test]
fn vim_matches_numpy_and_scikit_learn() {
    let f = fixtures();
    let head = Head::new(&f["head_weight"], &f["head_bias"]).unwrap();
    let v = Vim::fit(&f["train_features"], &head, 5).unwrap();
    assert_close("vim alpha", &[v.alpha], &values(&f["vim_dim5_alpha"]));
    assert_close(
        "vim",
        &v.score(&f["test_features"], &head).unwrap(),
        &values(&f["vim_dim5"]),
    );
}

/// A ResNet-18 (CIFAR stem, 10 classes) with every variable set by [`fill`].
use crate::common::resnet_fixture_fill as fill;

pub fn filled_resnet18(num_classes: i64) -> (tch::nn::VarStore, ResNetWithHead) {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = ResNetConfig {
        depth: Depth::Resnet18,
        stem: Stem::Cifar,
        in_channels: 3,
        width: 64,
    };
    let net = ResNetWithHead::new(&vs.root(), &cfg, "fc", num_classes);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            t.copy_(&fill(&name, &t.size()));
        }
    });
    (vs, net)
}

#[test]
fn odin_matches_the_official_pytorch_code() {
    let f = fixtures();
    let (vs, net) = filled_resnet18(10);
    // As the fixture script: the head scaled by 1e-4 so that the logits are O(10), not O(1e5).
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.starts_with("fc.") {
                t.copy_(&(&t * 1e-4));
            }
        }
    });
    let std: Vec<f64> = [63.0, 62.1, 66.7].iter().map(|v| v / 255.0).collect();
    let logits = odin::perturbed_logits(&net, &f["odin_input"], 1000.0, 0.0014, &std).unwrap();
    let want = &f["odin_perturbed_logits"];
    let diff = (&logits - want).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "perturbed logits differ by {diff}:\n{logits}\n{want}"
    );
    assert_close(
        "odin",
        &odin::score(&logits, 1000.0).unwrap(),
        &values(&f["odin_t1000_eps0.0014"]),
    );
    // The perturbation moved the logits (so the test would see a wrong sign or scale).
    let plain = tch::no_grad(|| tch::nn::ModuleT::forward_t(&net, &f["odin_input"], false));
    assert!((&logits - &plain).abs().max().double_value(&[]) > 1e-3);
}

/// k = 1 KNN equals a brute-force nearest-neighbour search written out loop by loop.
#[test]
fn knn_k1_equals_brute_force() {
    let f = fixtures();
    let (train, test) = (&f["train_features"], &f["test_features"]);
    let unit = |t: &Tensor| -> Vec<Vec<f64>> {
        let rows = t.size()[0];
        (0..rows)
            .map(|i| {
                let r = values(&t.get(i));
                let n = r.iter().map(|v| v * v).sum::<f64>().sqrt() + 1e-10;
                r.iter().map(|v| v / n).collect()
            })
            .collect()
    };
    let (bank, queries) = (unit(train), unit(test));
    let want: Vec<f64> = queries
        .iter()
        .map(|q| {
            -bank
                .iter()
                .map(|z| q.iter().zip(z).map(|(a, b)| (a - b) * (a - b)).sum::<f64>())
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    assert_close(
        "knn k=1 brute force",
        &Knn::fit(train, 1).unwrap().score(test).unwrap(),
        &want,
    );
    // An ID training row scores 0 against its own bank (its own nearest neighbour).
    let own = Knn::fit(train, 1)
        .unwrap()
        .score(&train.narrow(0, 1, 3))
        .unwrap();
    assert!(own.iter().all(|s| s.abs() < 1e-5), "{own:?}");
}

/// Mahalanobis scores do not change when every feature is shifted by a constant vector (the means and
/// the queries shift together), and a training class mean scores 0 when it is the closest.
#[test]
fn mahalanobis_is_shift_invariant() {
    let f = fixtures();
    let (train, labels, test) = (
        &f["train_features"],
        &f["train_labels"],
        &f["test_features"],
    );
    let a = Mahalanobis::fit(train, labels, 4)
        .unwrap()
        .score(test)
        .unwrap();
    let shift = Tensor::arange(12, (Kind::Float, Device::Cpu)) * 0.5;
    let m = Mahalanobis::fit(&(train + &shift), labels, 4).unwrap();
    let b = m.score(&(test + &shift)).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
    }
    let at_means = m.score(&m.means().to_kind(Kind::Float)).unwrap();
    assert!(at_means.iter().all(|s| s.abs() < 1e-4), "{at_means:?}");
}

// ---------------------------------------------------------------------------------------------------------
// `dream-ood eval` end to end.

use std::path::Path;

use crate::common::{run_clean, stderr, stdout};
use dream_ood::data::Pipeline;
use dream_ood::eval::fpr::Convention;
use dream_ood::eval::metrics;
use dream_ood::eval::score_file::read_scores;
use dream_ood::nn::{CheckpointInfo, NetworkSpec, checkpoint};

/// Image side of the tiny datasets (the CIFAR-stem ResNet takes any size; 16 px keeps the test fast).
const SIDE: u32 = 16;

/// Writes an ImageFolder: `per_class` PNGs in each of `classes` folders, pixels from a formula of
/// (class, image, position) with `style` changing the look of the whole set.
fn image_folder(root: &Path, classes: usize, per_class: usize, style: u32) {
    for c in 0..classes {
        let dir = root.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for k in 0..per_class {
            let img = image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
                let v = |ch: u32| {
                    let t = (x * (c as u32 + 1 + ch) + y * (k as u32 + 2) + ch * 31 + style * 57)
                        as f64;
                    ((t * 0.37 + style as f64).sin() * 110.0 + 128.0 + 40.0 * c as f64
                        - 30.0 * ch as f64)
                        .clamp(0.0, 255.0) as u8
                };
                image::Rgb([v(0), v(1), v(2)])
            });
            img.save(dir.join(format!("{k:03}.png"))).unwrap();
        }
    }
}

/// A 3-class ResNet-18 detector checkpoint (formula-filled, head scaled so logits are O(1..10)).
fn tiny_checkpoint(path: &Path, method: &str) {
    tiny_checkpoint_with(path, method, Pipeline::cifar_test());
}

/// [`tiny_checkpoint`] with `eval_transform` as its evaluation transform.
fn tiny_checkpoint_with(path: &Path, method: &str, eval_transform: Pipeline) {
    let (vs, _net) = filled_resnet18(3);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.starts_with("fc.") {
                t.copy_(&(&t * 1e-4));
            }
        }
    });
    let spec = NetworkSpec {
        depth: Depth::Resnet18,
        stem: Stem::Cifar,
        in_channels: 3,
        width: 64,
        head: "fc".into(),
        out_dim: 3,
    };
    let mut info = CheckpointInfo::new(
        "detector",
        spec,
        vec!["a".into(), "b".into(), "c".into()],
        eval_transform,
    );
    info.extra.insert("method".into(), method.into());
    checkpoint::save(path, &vs, &info).unwrap();
}

/// A run folder with data, a checkpoint at `<out_dir>/train/dream_ood/model.safetensors` (where `train` puts
/// the default method's model) and a config whose
/// `[eval]` table is `eval` (plus `extra` appended).
fn setup(eval: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image_folder(&d.join("id_train"), 3, 8, 0);
    image_folder(&d.join("id_test"), 3, 5, 0);
    image_folder(&d.join("noise"), 1, 8, 3);
    image_folder(&d.join("waves"), 2, 4, 7);
    std::fs::create_dir_all(d.join("run/train/dream_ood")).unwrap();
    tiny_checkpoint(&d.join("run/train/dream_ood/model.safetensors"), "tiny");
    let config = format!(
        "[run]\nout_dir = \"run\"\ndevice = \"cpu\"\nthreads = 1\nseed = 3\n\n\
         [data]\nsize = 16\ntrain = {{ format = \"folder\", path = \"id_train\" }}\n\
         test = {{ format = \"folder\", path = \"id_test\" }}\n\
         ood.noise = {{ format = \"folder\", path = \"noise\" }}\n\
         ood.waves = {{ format = \"folder\", path = \"waves\" }}\n\n[eval]\n{eval}\n{extra}"
    );
    std::fs::write(d.join("config.toml"), config).unwrap();
    dir
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn eval_writes_every_file_and_its_metrics_are_those_of_its_saved_scores() {
    let dir = setup("knn_k = 3\nvim_dim = 8\nbatch_size = 7\n", "");
    let d = dir.path();
    let out = run_clean(d, &["eval", "config.toml"], &[]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let out_dir = d.join("run/eval");
    assert_eq!(stdout(&out).trim(), out_dir.display().to_string());

    let json = read_json(&out_dir.join("metrics.json"));
    assert_eq!(json["protocol"], "paper");
    assert_eq!(json["id_test"]["used"], 15);
    // Paper protocol: floor(15 / 5) = 3 images of each OOD set (of 8), a seeded subset.
    for set in json["ood_sets"].as_array().unwrap() {
        assert_eq!(set["available"], 8);
        assert_eq!(set["used"], 3);
    }
    assert_eq!(json["fit"]["used"], 24);
    let methods = json["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 1);
    let m = &methods[0];
    assert_eq!(m["name"], "tiny");
    let acc = m["id_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(m["fitted"]["vim_dim"], 8);
    let scores = m["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 8, "every score by default");

    let convention: Convention =
        serde_json::from_value(json["settings"]["convention"].clone()).unwrap();
    for s in scores {
        let name = s["score"].as_str().unwrap();
        let sdir = out_dir.join("scores/tiny").join(name);
        let id = read_scores(&sdir.join("id_test.npy")).unwrap();
        assert_eq!(id.len(), 15, "{name}");
        let mut fprs = vec![];
        for set in ["noise", "waves"] {
            let ood = read_scores(&sdir.join(format!("{set}.npy"))).unwrap();
            assert_eq!(ood.len(), 3, "{name}/{set}");
            let want = metrics::compute(&id, &ood, convention).unwrap();
            let got = &s["sets"][set];
            for (key, v) in [
                ("auroc", want.auroc),
                ("fpr95", want.fpr95),
                ("aupr_in", want.aupr_in),
                ("aupr_out", want.aupr_out),
            ] {
                assert_eq!(got[key].as_f64().unwrap(), v, "{name}/{set}/{key}");
            }
            fprs.push(want.fpr95);
        }
        let mean = s["mean"]["fpr95"].as_f64().unwrap();
        assert!(
            (mean - (fprs[0] + fprs[1]) / 2.0).abs() < 1e-15,
            "{name} mean"
        );
        for kind in ["hist", "roc"] {
            let png = out_dir.join(format!("plots/tiny/{name}_{kind}.png"));
            let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
            assert!(img.width() > 300 && img.height() > 200);
        }
    }

    // The CSV: a header, then per score one row per set and a mean row.
    let csv = std::fs::read_to_string(out_dir.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 8 * 3);
    assert!(lines[0].starts_with("method,score,ood_set,n_id,n_ood,fpr95,auroc"));
    let energy_noise = lines
        .iter()
        .find(|l| l.starts_with("tiny,energy,noise,"))
        .unwrap();
    let fields: Vec<&str> = energy_noise.split(',').collect();
    let auroc: f64 = fields[6].parse().unwrap();
    let want = scores.iter().find(|s| s["score"] == "energy").unwrap()["sets"]["noise"]["auroc"]
        .as_f64()
        .unwrap();
    assert_eq!(auroc, want);
    assert!(lines.iter().any(|l| l.starts_with("tiny,vim,mean,15,,")));

    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    for needle in [
        "OOD protocol: **paper**",
        "ID accuracy",
        "`hendrycks` rule",
        "fitted on ID training images",
        "| knn |",
        "ViM dim 8",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
}

#[test]
fn eval_full_protocol_with_named_checkpoints_and_a_score_list() {
    let dir = setup("knn_k = 2\nprotocol = \"full\"\nplots = false\n", "");
    let d = dir.path();
    let ckpt = d.join("run/train/dream_ood/model.safetensors");
    let a = format!("first={}", ckpt.display());
    let b = format!("second={}", ckpt.display());
    let out = run_clean(
        d,
        &[
            "eval",
            "config.toml",
            "--checkpoint",
            &a,
            "--checkpoint",
            &b,
            "--scores",
            "energy,knn",
            "--out",
            "elsewhere",
        ],
        &[],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let out_dir = d.join("elsewhere");
    let json = read_json(&out_dir.join("metrics.json"));
    assert_eq!(json["protocol"], "full");
    let names: Vec<&str> = json["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    for method in names {
        let scores: Vec<&str> = json["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == method)
            .unwrap()["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["score"].as_str().unwrap())
            .collect();
        assert_eq!(scores, ["energy", "knn"]);
    }
    // Full protocol: every OOD image is scored; the same checkpoint gives the same scores twice.
    let first = read_scores(&out_dir.join("scores/first/knn/waves.npy")).unwrap();
    assert_eq!(first.len(), 8);
    assert_eq!(
        first,
        read_scores(&out_dir.join("scores/second/knn/waves.npy")).unwrap()
    );
    assert!(!out_dir.join("plots").exists(), "plots = false writes none");
    assert!(
        std::fs::read_to_string(out_dir.join("report.md"))
            .unwrap()
            .contains("**full**")
    );
}

fn eval_error(eval: &str, extra: &str, args: &[&str]) -> String {
    let dir = setup(eval, extra);
    let mut all = vec!["eval", "config.toml"];
    all.extend_from_slice(args);
    let out = run_clean(dir.path(), &all, &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2; stderr: {}",
        stderr(&out)
    );
    stderr(&out)
}

#[test]
fn eval_errors_name_the_key_or_file() {
    let err = eval_error("knn = 5\n", "", &[]);
    assert!(
        err.contains("eval.knn: unknown key; did you mean `knn_k`?"),
        "{err}"
    );

    let err = eval_error("scores = [\"energy\", \"mahalanobis2\"]\n", "", &[]);
    assert!(
        err.contains("eval.scores") && err.contains("unknown variant `mahalanobis2`"),
        "{err}"
    );

    let err = eval_error("", "", &["--scores", "energy,msq"]);
    assert!(
        err.contains("--scores: unknown score \"msq\"; expected one of msp, max_logit"),
        "{err}"
    );

    let err = eval_error("knn_k = 50\n", "", &["--scores", "knn"]);
    assert!(
        err.contains("eval.knn_k: k = 50 but the fit set has 24 ID training features"),
        "{err}"
    );

    let err = eval_error("", "", &["--checkpoint", "gone.safetensors"]);
    assert!(err.contains("gone.safetensors"), "{err}");

    // A config without OOD sets.
    let dir = setup("", "");
    let text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("ood."))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    let out = run_clean(
        dir.path(),
        &["eval", "config.toml", "--scores", "energy"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("data.ood: no OOD set"),
        "{}",
        stderr(&out)
    );

    // An OOD set whose folder is missing.
    let dir = setup("", "");
    std::fs::remove_dir_all(dir.path().join("waves")).unwrap();
    let out = run_clean(
        dir.path(),
        &["eval", "config.toml", "--scores", "energy"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("waves"), "{}", stderr(&out));
}

/// The paper protocol's OOD subsets and the fit subset come from `run.seed`: the same seed gives the same
/// files, another seed other subsets.
#[test]
fn eval_subsets_follow_the_run_seed() {
    let dir = setup("", "");
    let d = dir.path();
    let run = |out: &str| {
        let o = run_clean(
            d,
            &["eval", "config.toml", "--scores", "energy", "--out", out],
            &[],
        );
        assert!(o.status.success(), "stderr: {}", stderr(&o));
    };
    run("a");
    run("b");
    let scores = |out: &str, set: &str| {
        read_scores(&d.join(out).join(format!("scores/tiny/energy/{set}.npy"))).unwrap()
    };
    for set in ["noise", "waves"] {
        assert_eq!(
            scores("a", set),
            scores("b", set),
            "{set}: same seed, same subset"
        );
    }
    let text = std::fs::read_to_string(d.join("config.toml")).unwrap();
    std::fs::write(d.join("config.toml"), text.replace("seed = 3", "seed = 11")).unwrap();
    run("c");
    assert!(
        ["noise", "waves"]
            .iter()
            .any(|set| scores("a", set) != scores("c", set)),
        "another seed draws other OOD subsets"
    );
    let json = read_json(&d.join("c/metrics.json"));
    assert_eq!(json["seed"], 11);
    assert!(json["ood_sets"][0]["subset_seed"].is_u64());
}

/// A stage-1 checkpoint (head `trans`, no class logits) is refused with the file and the reason.
#[test]
fn eval_refuses_a_checkpoint_without_a_classifier_head() {
    let dir = setup("", "");
    let d = dir.path();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let spec = NetworkSpec {
        depth: Depth::Resnet18,
        stem: Stem::Cifar,
        in_channels: 3,
        width: 64,
        head: "trans".into(),
        out_dim: 8,
    };
    let _net = spec.build(&vs.root());
    // Deterministic file contents (the values do not matter: the head is refused before loading).
    tch::no_grad(|| {
        vs.variables()
            .into_values()
            .for_each(|mut t| drop(t.zero_()))
    });
    let info = CheckpointInfo::new("latent", spec, vec![], Pipeline::cifar_test());
    checkpoint::save(&d.join("latent.safetensors"), &vs, &info).unwrap();
    let out = run_clean(
        d,
        &[
            "eval",
            "config.toml",
            "--scores",
            "energy",
            "--checkpoint",
            "latent.safetensors",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("latent.safetensors") && err.contains("head `trans`"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// `preprocess = "native"` on an OOD set (SPEC §5.3: the official CIFAR-100 script feeds LSUN-C and iSUN at
// their own size, 36×36 for the ODIN release's LSUN-C).

/// A `w`×`h` RGB PNG at `path`, pixels from a closed formula of (position, `seed`).
fn write_png(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = |ch: u32| {
            let t = (x * (3 + ch) + y * (5 + seed) + ch * 17 + seed * 29) as f64;
            ((t * 0.23).sin() * 100.0 + 128.0 + 20.0 * ch as f64).clamp(0.0, 255.0) as u8
        };
        image::Rgb([v(0), v(1), v(2)])
    })
    .save(path)
    .unwrap();
}

/// A run folder for the `native` tests: 3-class ID test images at 16 px, a checkpoint whose evaluation
/// transform is the CIFAR one with Resize(32) → CenterCrop(32) (`[data]` defaults), and `ood` as the
/// config's OOD tables. Every image is scored (`full` protocol), with max_logit and energy.
fn native_setup(ood: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image_folder(&d.join("id_test"), 3, 2, 0);
    std::fs::create_dir_all(d.join("run/train/dream_ood")).unwrap();
    let eval_transform = dream_ood::config::DataConfig::default().eval_pipeline();
    assert_eq!(eval_transform.transforms.len(), 2, "Resize → CenterCrop");
    tiny_checkpoint_with(
        &d.join("run/train/dream_ood/model.safetensors"),
        "tiny",
        eval_transform,
    );
    let config = format!(
        "[run]\nout_dir = \"run\"\ndevice = \"cpu\"\nthreads = 1\n\n\
         [data]\ntest = {{ format = \"folder\", path = \"id_test\" }}\n{ood}\n\
         [eval]\nprotocol = \"full\"\nscores = [\"max_logit\", \"energy\"]\nplots = false\n"
    );
    std::fs::write(d.join("config.toml"), config).unwrap();
    dir
}

/// A `native` set of 36×36 images is scored at 36×36: its max-logit scores equal a forward pass through
/// the checkpoint's network on the normalised 36×36 pixels (computed here from the PNGs, without the
/// data layer), and differ from the same images through the checkpoint's Resize(32) → CenterCrop(32).
#[test]
fn eval_scores_a_native_set_at_its_own_size() {
    let dir = native_setup(
        "ood.lsun_native = { format = \"folder\", path = \"lsun\", preprocess = \"native\" }\n\
         ood.lsun_resized = { format = \"folder\", path = \"lsun\" }\n",
    );
    let d = dir.path();
    let files: Vec<PathBuf> = (0..4)
        .map(|k| d.join(format!("lsun/class0/{k:03}.png")))
        .collect();
    for (k, f) in files.iter().enumerate() {
        write_png(f, 36, 36, k as u32);
    }
    let out = run_clean(d, &["eval", "config.toml"], &[]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let out_dir = d.join("run/eval");

    // The expected scores: ToTensor + Normalize(CIFAR) by hand, [4, 3, 36, 36], through the network.
    let n = dream_ood::data::transforms::Normalize::cifar();
    let mut pixels = Vec::new();
    for f in &files {
        let img = image::open(f).unwrap().to_rgb8();
        for ch in 0..3 {
            for p in img.pixels() {
                let x = p[ch] as f32 / 255.0;
                pixels.push((x - n.mean[ch] as f32) / n.std[ch] as f32);
            }
        }
    }
    let x = Tensor::from_slice(&pixels).view([4, 3, 36, 36]);
    let ckpt = d.join("run/train/dream_ood/model.safetensors");
    let info = checkpoint::read_info(&ckpt).unwrap();
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    let net = info.network.build(&vs.root());
    checkpoint::load_into(&ckpt, &mut vs).unwrap();
    let logits = tch::no_grad(|| net.head(&net.features(&x, false))); // [4, 3]
    let want = values(&logits.max_dim(1, false).0);

    let scores =
        |set: &str| read_scores(&out_dir.join(format!("scores/tiny/max_logit/{set}.npy"))).unwrap();
    let native = scores("lsun_native");
    assert_close("native max_logit", &native, &want);
    let resized = scores("lsun_resized");
    assert_eq!(resized.len(), 4);
    let gap = native
        .iter()
        .zip(&resized)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        gap > 1e-3,
        "resize_crop gave the native scores: {native:?} vs {resized:?}"
    );

    // The report says which set was scored how.
    let json = read_json(&out_dir.join("metrics.json"));
    let sets = json["ood_sets"].as_array().unwrap();
    let set = |name: &str| sets.iter().find(|s| s["name"] == name).unwrap();
    assert_eq!(set("lsun_native")["preprocess"], "native");
    assert!(set("lsun_resized").get("preprocess").is_none());
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(
        md.contains("| lsun_native |") && md.contains("| native size (no resize, no crop) |"),
        "{md}"
    );
}

/// Images of two sizes in one batch of a `native` set: exit 2 with the set, both files and both sizes.
#[test]
fn eval_native_set_of_mixed_sizes_is_a_clear_error() {
    let dir = native_setup(
        "ood.mixed = { format = \"folder\", path = \"mixed\", preprocess = \"native\" }\n",
    );
    let d = dir.path();
    write_png(&d.join("mixed/class0/000.png"), 36, 36, 0);
    write_png(&d.join("mixed/class0/001.png"), 40, 36, 1);
    let out = run_clean(d, &["eval", "config.toml"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    for needle in [
        "data.ood.mixed (preprocess = \"native\"",
        "resize_crop",
        "001.png after the transforms",
        "first image",
        "000.png",
        "expected shape 3×36×36, got 3×36×40",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}
