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

/// The fill formula of `tools/make_resnet_fixtures.py` (`fill`), as `tests/nn.rs` evaluates it.
fn fill(name: &str, shape: &[i64]) -> Tensor {
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
    Tensor::from_slice(&values).view(shape)
}

/// A ResNet-18 (CIFAR stem, 10 classes) with every variable set by [`fill`].
pub fn filled_resnet18(num_classes: i64) -> (tch::nn::VarStore, ResNetWithHead) {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = ResNetConfig {
        depth: Depth::Resnet18,
        stem: Stem::Cifar,
        in_channels: 3,
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
