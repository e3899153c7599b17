//! Stage 2 (`dream-ood sample`, `dream_ood::sampling`): the kNN against scikit-learn, both sampling modes
//! against the Python port of the official code in `tools/make_sampling_fixtures.py` (replaying its recorded
//! draws), and the CLI end to end: shape, norms, sidecar, determinism, inliers vs outliers, errors.

use std::fs::File;
use std::path::{Path, PathBuf};

use dream_ood::config::{NoiseSharing, SampleConfig, SampleMode};
use dream_ood::sampling::knn::{DEFAULT_CHUNK_BYTES, knn, kth_distance, normalize_rows};
use dream_ood::sampling::{NoiseSource, sample_class};
use ndarray::{Array2, Array3, Array4, ArrayD};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use tch::Tensor;

use crate::common::{run_clean, stderr};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sampling")
        .join(name)
}

fn read<T: ndarray_npy::ReadableElement>(path: &Path) -> ArrayD<T> {
    ArrayD::<T>::read_npy(File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

fn tensor(a: &ArrayD<f32>) -> Tensor {
    let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
    Tensor::from_slice(a.as_standard_layout().as_slice().unwrap()).view(shape.as_slice())
}

fn assert_close(got: &[f32], expected: &[f32], atol: f32, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= atol,
            "{what}: element {i}: got {g}, expected {e} (atol {atol})"
        );
    }
}

#[test]
fn knn_matches_scikit_learn() {
    let queries = tensor(&read::<f32>(&fixture("knn_queries.npy")));
    let base = tensor(&read::<f32>(&fixture("knn_base.npy")));
    let ks = read::<i64>(&fixture("knn_ks.npy"));
    let expected = read::<f64>(&fixture("knn_kth_sq.npy"));
    for (row, &k) in ks.iter().enumerate() {
        for chunk in [1, 4 * 40 * 3, DEFAULT_CHUNK_BYTES] {
            let got: Vec<f32> =
                Vec::try_from(kth_distance(&queries, &base, k as usize, chunk).unwrap()).unwrap();
            let want: Vec<f32> = expected
                .index_axis(ndarray::Axis(0), row)
                .iter()
                .map(|&v| v as f32)
                .collect();
            assert_close(&got, &want, 1e-5, &format!("d_K, k = {k}, chunk {chunk} B"));
        }
    }
    let (_, idx) = knn(&queries, &base, 7, 4 * 40 * 5).unwrap();
    let idx: Vec<i64> = Vec::try_from(idx.view([-1])).unwrap();
    let want = read::<i64>(&fixture("knn_idx7.npy"));
    assert_eq!(idx, want.iter().copied().collect::<Vec<_>>());
}

/// Replays the draws the Python port recorded: `choices` `[C, calls, P]`, `noise` `[C, calls, rows, D]`.
struct Recorded {
    choices: Array3<i64>,
    noise: Array4<f32>,
    class: usize,
}

impl NoiseSource for Recorded {
    fn choose(&mut self, call: usize, population: usize, n: usize) -> Vec<usize> {
        let row = self.choices.slice(ndarray::s![self.class, call, ..]);
        assert_eq!(row.len(), n, "anchors per call");
        assert!(row.iter().all(|&i| (i as usize) < population));
        row.iter().map(|&i| i as usize).collect()
    }

    fn gaussian(&mut self, call: usize, rows: usize, dim: usize) -> Vec<f32> {
        let block = self.noise.slice(ndarray::s![self.class, call, .., ..]);
        assert_eq!(block.dim(), (rows, dim), "noise rows requested");
        block.iter().copied().collect()
    }
}

fn settings(name: &str) -> SampleConfig {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("settings.json")).unwrap()).unwrap();
    let s = &all[name];
    let n = |k: &str| s[k].as_u64().unwrap() as usize;
    SampleConfig {
        inliers: s["inliers"].as_bool().unwrap(),
        k: n("k"),
        select: n("select"),
        anchors: n("anchors"),
        keep: n("keep"),
        sigma: s["sigma"].as_f64().unwrap(),
        candidates: n("candidates"),
        per_class: n("per_class"),
        noise: if s["noise"] == "per_anchor" {
            NoiseSharing::PerAnchor
        } else {
            NoiseSharing::Shared
        },
        ..SampleConfig::default()
    }
}

/// Runs `sample_class` on every fixture class with the recorded draws; returns `[C · per_class · D]`.
fn replay(name: &str, mode: SampleMode) -> Vec<f32> {
    let cfg = SampleConfig {
        mode,
        ..settings(name)
    };
    let bank = read::<f32>(&fixture("bank.npy"));
    let tokens = tensor(&read::<f32>(&fixture("tokens.npy")));
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("bank.json")).unwrap()).unwrap();
    let choices = read::<i64>(&fixture(&format!("{name}_choices.npy")))
        .into_dimensionality()
        .unwrap();
    let noise = read::<f32>(&fixture(&format!("{name}_noise.npy")))
        .into_dimensionality()
        .unwrap();
    let mut source = Recorded {
        choices,
        noise,
        class: 0,
    };
    let mut out = Vec::new();
    for class in 0..bank.shape()[0] {
        source.class = class;
        let count = counts["counts"][class].as_u64().unwrap() as i64;
        let rows = tensor(&bank).get(class as i64).narrow(0, 0, count);
        let norm = tokens.get(class as i64).norm().double_value(&[]) as f32;
        let sample =
            sample_class(&rows, norm, &cfg, class, DEFAULT_CHUNK_BYTES, &mut source).unwrap();
        out.extend(Vec::<f32>::try_from(sample.embeddings.view([-1])).unwrap());
    }
    out
}

#[test]
fn both_modes_match_the_python_port_of_the_official_code() {
    for name in ["outliers", "inliers", "outliers_per_anchor"] {
        let official = replay(name, SampleMode::Official);
        let intended = replay(name, SampleMode::Intended);
        let want_official = read::<f32>(&fixture(&format!("{name}_expected_official.npy")));
        let want_intended = read::<f32>(&fixture(&format!("{name}_expected_intended.npy")));
        assert_close(
            &official,
            want_official.as_slice().unwrap(),
            1e-5,
            &format!("{name}, official"),
        );
        assert_close(
            &intended,
            want_intended.as_slice().unwrap(),
            1e-5,
            &format!("{name}, intended"),
        );
        // The fixture must tell the modes apart, or the checks above prove nothing about the filter.
        let differ = official
            .iter()
            .zip(&intended)
            .filter(|(a, b)| (*a - *b).abs() > 1e-3)
            .count();
        assert!(
            differ > official.len() / 4,
            "{name}: the two modes agree on too much ({differ})"
        );
    }
}

// ------------------------------------------------------------------------------------------------------
// The CLI end to end.
// ------------------------------------------------------------------------------------------------------

/// A temporary folder with the fixture bank, its sidecar and the tokens.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["bank.npy", "bank.json", "tokens.npy"] {
        std::fs::copy(fixture(name), dir.path().join(name)).unwrap();
    }
    dir
}

const OUTLIER_FLAGS: &[&str] = &[
    "--k",
    "8",
    "--select",
    "10",
    "--anchors",
    "5",
    "--keep",
    "2",
    "--sigma",
    "0.3",
    "--candidates",
    "30",
    "--per-class",
    "25",
    "--device",
    "cpu",
];

fn sample(dir: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "sample",
        "--bank",
        "bank.npy",
        "--tokens",
        "tokens.npy",
        "--out",
        out,
    ];
    args.extend_from_slice(OUTLIER_FLAGS);
    args.extend_from_slice(extra);
    run_clean(dir, &args, &[])
}

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "status {:?}, stderr:\n{}",
        out.status,
        stderr(&out)
    );
    out
}

fn read3(path: &Path) -> Array3<f32> {
    Array3::<f32>::read_npy(File::open(path).unwrap()).unwrap()
}

#[test]
fn cli_writes_scaled_embeddings_and_a_sidecar() {
    let dir = workdir();
    ok(sample(dir.path(), "out/o.npy", &["--seed", "3"]));
    let out = read3(&dir.path().join("out/o.npy"));
    assert_eq!(out.dim(), (3, 25, 16));
    let tokens =
        Array2::<f32>::read_npy(File::open(dir.path().join("tokens.npy")).unwrap()).unwrap();
    for c in 0..3 {
        let t = tokens.row(c).iter().map(|v| v * v).sum::<f32>().sqrt();
        for row in out.index_axis(ndarray::Axis(0), c).outer_iter() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(
                (norm - t).abs() < 1e-5 * t.max(1.0),
                "class {c}: row norm {norm}, ‖T‖ {t}"
            );
        }
    }
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/o.json")).unwrap())
            .unwrap();
    assert_eq!(side["mode"], "intended");
    assert_eq!(side["kind"], "outliers");
    assert_eq!(side["seed"], 3);
    assert_eq!(side["shape"], serde_json::json!([3, 25, 16]));
    assert_eq!(side["settings"]["per_class"], 25);
    assert_eq!(side["settings"]["anchors"], 5);
    assert_eq!(side["bank"]["counts_from"], "sidecar");
    assert_eq!(side["dream_ood_version"], env!("CARGO_PKG_VERSION"));
    let rows: Vec<u64> = side["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bank_rows"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, vec![48, 40, 48]);
    let calls: Vec<u64> = side["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["calls"].as_u64().unwrap())
        .collect();
    assert_eq!(calls, vec![3, 3, 3]); // 10 rows per call, 25 rows: 10 + 10 + 5.
    assert!(side["timings"]["total_secs"].as_f64().unwrap() >= 0.0);
    // Nothing but the two files in the output folder (no temporary files left).
    assert_eq!(
        std::fs::read_dir(dir.path().join("out")).unwrap().count(),
        2
    );
}

#[test]
fn cli_is_deterministic_in_the_seed_and_not_in_the_threads() {
    let dir = workdir();
    ok(sample(
        dir.path(),
        "a.npy",
        &["--seed", "7", "--threads", "1"],
    ));
    ok(sample(
        dir.path(),
        "b.npy",
        &["--seed", "7", "--threads", "2"],
    ));
    ok(sample(dir.path(), "c.npy", &["--seed", "8"]));
    let bytes = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    assert_eq!(
        bytes("a.npy"),
        bytes("b.npy"),
        "same seed, different thread count"
    );
    assert_ne!(
        bytes("a.npy"),
        bytes("c.npy"),
        "another seed gave the same file"
    );
    // Official mode differs from intended with the same draws.
    ok(sample(
        dir.path(),
        "d.npy",
        &["--seed", "7", "--mode", "official"],
    ));
    assert_ne!(bytes("a.npy"), bytes("d.npy"));
}

#[test]
fn config_file_gives_the_same_file_as_the_flags() {
    let dir = workdir();
    ok(sample(dir.path(), "flags.npy", &["--seed", "5"]));
    std::fs::write(
        dir.path().join("run.toml"),
        "[run]\nseed = 5\ndevice = \"cpu\"\n[sample]\nbank = \"bank.npy\"\ntokens = \"tokens.npy\"\nout = \"cfg.npy\"\n\
         k = 8\nselect = 10\nanchors = 5\nkeep = 2\nsigma = 0.3\ncandidates = 30\nper_class = 25\n",
    )
    .unwrap();
    // Run from another folder: paths in the config are relative to the config file.
    let elsewhere = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    ok(run_clean(
        elsewhere.path(),
        &["sample", config.to_str().unwrap()],
        &[],
    ));
    assert_eq!(
        std::fs::read(dir.path().join("flags.npy")).unwrap(),
        std::fs::read(dir.path().join("cfg.npy")).unwrap()
    );
}

/// Mean over classes and rows of d_K(row) against the row's own class bank (k = 8).
fn mean_kth_to_bank(out: &Array3<f32>) -> f64 {
    let bank = read::<f32>(&fixture("bank.npy"));
    let counts = [48, 40, 48];
    let mut total = 0.0;
    for (c, &n) in counts.iter().enumerate() {
        let base = normalize_rows(&tensor(&bank).get(c as i64).narrow(0, 0, n));
        let rows = tensor(&out.index_axis(ndarray::Axis(0), c).to_owned().into_dyn());
        total += kth_distance(&rows, &base, 8, DEFAULT_CHUNK_BYTES)
            .unwrap()
            .mean(tch::Kind::Float)
            .double_value(&[]);
    }
    total / counts.len() as f64
}

#[test]
fn outliers_lie_farther_from_their_class_than_inliers_and_bank_rows() {
    let dir = workdir();
    ok(sample(dir.path(), "out.npy", &[]));
    ok(sample(
        dir.path(),
        "in.npy",
        &[
            "--inliers",
            "--sigma",
            "0.05",
            "--select",
            "20",
            "--anchors",
            "5",
            "--keep",
            "1",
        ],
    ));
    let outliers = mean_kth_to_bank(&read3(&dir.path().join("out.npy")));
    let inliers = mean_kth_to_bank(&read3(&dir.path().join("in.npy")));
    let bank = read::<f32>(&fixture("bank.npy"));
    let own = {
        let b = bank.slice(ndarray::s![.., 0..40, ..]).to_owned();
        mean_kth_to_bank(&b)
    };
    assert!(
        outliers > own && own > inliers,
        "d_K means: outliers {outliers}, bank rows {own}, inliers {inliers}"
    );
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("in.json")).unwrap())
            .unwrap();
    assert_eq!(side["kind"], "inliers");
}

#[test]
fn zero_rows_are_padding_without_a_sidecar() {
    let dir = workdir();
    std::fs::remove_file(dir.path().join("bank.json")).unwrap();
    let out = ok(sample(dir.path(), "o.npy", &[]));
    assert!(
        stderr(&out).contains("treating 8 all-zero rows as padding"),
        "{}",
        stderr(&out)
    );
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("o.json")).unwrap()).unwrap();
    assert_eq!(side["bank"]["counts_from"], "nonzero_rows");
    assert_eq!(side["classes"][1]["bank_rows"], 40);
}

fn fails_with(dir: &Path, out: std::process::Output, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "stderr:\n{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("o.") || n.starts_with(".o."))
        .collect();
    assert!(
        leftovers.is_empty(),
        "files left after a failure: {leftovers:?}"
    );
}

#[test]
fn bad_inputs_are_named_errors() {
    let dir = workdir();
    let p = dir.path();
    // Tokens with the wrong D.
    Array2::<f32>::ones((3, 15))
        .write_npy(File::create(p.join("t15.npy")).unwrap())
        .unwrap();
    let out = run_clean(
        p,
        &[
            "sample", "--bank", "bank.npy", "--tokens", "t15.npy", "--out", "o.npy", "--device",
            "cpu",
        ],
        &[],
    );
    fails_with(
        p,
        out,
        "t15.npy for the bank bank.npy ([3, 48, 16]): expected shape [3, 16]",
    );
    // A bank of the wrong rank.
    Array2::<f32>::ones((3, 16))
        .write_npy(File::create(p.join("flat.npy")).unwrap())
        .unwrap();
    let out = run_clean(
        p,
        &[
            "sample",
            "--bank",
            "flat.npy",
            "--tokens",
            "tokens.npy",
            "--out",
            "o.npy",
        ],
        &[],
    );
    fails_with(
        p,
        out,
        "flat.npy: expected a 3-D array (the feature bank [C, N, D]), got shape [3, 16]",
    );
    // k too large for class 1 (40 filled rows).
    let out = sample(p, "o.npy", &["--k", "45", "--select", "10"]);
    fails_with(
        p,
        out,
        "k = 45 needs at least k + 1 = 46 rows per class; too few in class 1 (40 rows)",
    );
    // Settings out of range, and a missing input.
    let out = sample(p, "o.npy", &["--sigma=-1"]);
    fails_with(p, out, "--sigma: must be a positive number, got -1");
    let out = sample(p, "o.npy", &["--anchors", "11"]);
    fails_with(p, out, "--anchors: draws 11 of 10 boundary points");
    let out = run_clean(
        p,
        &["sample", "--tokens", "tokens.npy", "--out", "o.npy"],
        &[],
    );
    fails_with(p, out, "--bank is required");
    let out = run_clean(
        p,
        &[
            "sample",
            "--bank",
            "gone.npy",
            "--tokens",
            "tokens.npy",
            "--out",
            "o.npy",
        ],
        &[],
    );
    fails_with(p, out, "gone.npy: No such file or directory");
    // Official mode keeps the official code's failure for select > N (SPEC §7 item 5).
    let out = sample(
        p,
        "o.npy",
        &["--mode", "official", "--select", "45", "--anchors", "5"],
    );
    fails_with(
        p,
        out,
        "select = 45 boundary points but the class has only 40 rows",
    );
}

/// What the two filter modes keep, measured on real candidates (issue #4's proof): Gaussian candidates
/// around 10 boundary points of a random unit bank, their k-th neighbour distances, and each kept
/// candidate's percentile rank among its own boundary point's candidates. `intended` keeps each block's
/// farthest (mean rank ≥ 0.95); the official index layout picks ranks that are effectively random (≈ 0.5).
#[test]
fn intended_keeps_the_farthest_candidates_of_each_block_and_official_does_not() {
    use dream_ood::config::SampleMode;
    use dream_ood::sampling::outliers::kept_indices;
    use rand::{RngExt, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};

    let (n, d, p, l, m, k) = (200usize, 32usize, 10usize, 60usize, 3usize, 20usize);
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(5);
    let gauss = |rng: &mut rand::rngs::ChaCha8Rng, count: usize| -> Vec<f32> {
        (0..count).map(|_| StandardNormal.sample(rng)).collect()
    };
    let bank =
        normalize_rows(&Tensor::from_slice(&gauss(&mut rng, n * d)).view([n as i64, d as i64]));
    // Boundary points: any 10 rows (the filter's behaviour does not depend on how they were chosen).
    let anchors: Vec<i64> = (0..p).map(|_| rng.random_range(0..n as i64)).collect();
    let anchor_rows = bank.index_select(0, &Tensor::from_slice(&anchors)); // [P, D]
    let noise = Tensor::from_slice(&gauss(&mut rng, l * d)).view([l as i64, d as i64]); // shared draws
    let cand =
        normalize_rows(&(anchor_rows.unsqueeze(1) + noise.unsqueeze(0) * 0.3).view([-1, d as i64]));
    let kth = kth_distance(&cand, &bank, k, DEFAULT_CHUNK_BYTES).unwrap(); // [P·L]
    let dist: Vec<f32> = Vec::try_from(&kth).unwrap();
    let mean_rank = |mode: SampleMode| -> f64 {
        let kept: Vec<i64> =
            Vec::try_from(&kept_indices(&kth, p, l, m, mode, false).unwrap()).unwrap();
        assert_eq!(kept.len(), p * m);
        let ranks: Vec<f64> = kept
            .iter()
            .map(|&j| {
                let block = j as usize / l;
                let own = &dist[block * l..(block + 1) * l];
                own.iter().filter(|&&x| x <= dist[j as usize]).count() as f64 / l as f64
            })
            .collect();
        ranks.iter().sum::<f64>() / ranks.len() as f64
    };
    let intended = mean_rank(SampleMode::Intended);
    let official = mean_rank(SampleMode::Official);
    assert!(intended >= 0.95, "intended mean percentile rank {intended}");
    assert!(
        (0.3..0.75).contains(&official),
        "official mean percentile rank {official}"
    );
}
