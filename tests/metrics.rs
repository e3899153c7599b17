//! `dream_ood::eval::metrics` against scikit-learn and the Python ports of each FPR@95 rule
//! (`tests/fixtures/metrics/`, made by `tools/make_metric_fixtures.py`), and the `dream-ood metrics` CLI.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use dream_ood::eval::fpr::Convention;
use dream_ood::eval::metrics::{Metrics, compute};
use dream_ood::eval::score_file::read_scores;

use crate::common::{run_clean, stderr, stdout};

#[derive(Debug, Deserialize)]
struct Fixtures {
    tolerance: f64,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    id: String,
    ood: String,
    n_id: usize,
    n_ood: usize,
    expected: Expected,
}

#[derive(Debug, Deserialize)]
struct Expected {
    auroc: f64,
    aupr_in: f64,
    aupr_out: f64,
    aupr_in_trapezoid: f64,
    aupr_out_trapezoid: f64,
    fpr95: std::collections::BTreeMap<String, Point>,
}

#[derive(Debug, Deserialize)]
struct Point {
    fpr: f64,
    threshold: f64,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics")
}

fn fixtures() -> Fixtures {
    let text =
        fs::read_to_string(fixture_dir().join("cases.json")).expect("cases.json is readable");
    serde_json::from_str(&text).expect("cases.json parses")
}

impl Case {
    fn scores(&self) -> (Vec<f64>, Vec<f64>) {
        let id = read_scores(&fixture_dir().join(&self.id)).unwrap();
        let ood = read_scores(&fixture_dir().join(&self.ood)).unwrap();
        assert_eq!(
            (id.len(), ood.len()),
            (self.n_id, self.n_ood),
            "case {}",
            self.name
        );
        (id, ood)
    }

    fn point(&self, c: Convention) -> &Point {
        &self.expected.fpr95[c.name()]
    }
}

fn assert_close(what: &str, found: f64, expected: f64, tol: f64) {
    assert!(
        (found - expected).abs() <= tol,
        "{what}: expected {expected}, found {found}, |diff| {:e} > {tol:e}",
        (found - expected).abs()
    );
}

/// Checks every threshold-free metric and the FPR of `m.convention` against the fixture.
fn check_against(case: &Case, m: &Metrics, tol: f64, label: &str) {
    let e = &case.expected;
    let what = |metric: &str| format!("case {} ({label}) {metric}", case.name);
    assert_eq!(
        (m.n_id, m.n_ood),
        (case.n_id, case.n_ood),
        "{}",
        what("sizes")
    );
    assert_close(&what("auroc"), m.auroc, e.auroc, tol);
    assert_close(&what("aupr_in"), m.aupr_in, e.aupr_in, tol);
    assert_close(&what("aupr_out"), m.aupr_out, e.aupr_out, tol);
    assert_close(
        &what("aupr_in_trapezoid"),
        m.aupr_in_trapezoid,
        e.aupr_in_trapezoid,
        tol,
    );
    assert_close(
        &what("aupr_out_trapezoid"),
        m.aupr_out_trapezoid,
        e.aupr_out_trapezoid,
        tol,
    );
    let p = case.point(m.convention);
    assert_close(
        &what(&format!("fpr95 {}", m.convention)),
        m.fpr95,
        p.fpr,
        tol,
    );
}

#[test]
fn fixtures_cover_the_golden_and_random_cases() {
    let names: Vec<String> = fixtures().cases.into_iter().map(|c| c.name).collect();
    for want in [
        "A",
        "E",
        "F",
        "G",
        "normal",
        "ties_0p1",
        "all_equal",
        "tiny_1v2",
        "large",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "no case {want} in {names:?}"
        );
    }
}

#[test]
fn library_matches_sklearn_and_each_reference_rule() {
    let fx = fixtures();
    assert!(fx.tolerance <= 1e-12);
    for case in &fx.cases {
        let (id, ood) = case.scores();
        for c in Convention::ALL {
            let m = compute(&id, &ood, c).unwrap();
            check_against(case, &m, fx.tolerance, "raw");
            let want = case.point(c).threshold;
            assert_close(
                &format!("case {} threshold {c}", case.name),
                m.fpr95_threshold,
                want,
                fx.tolerance * want.abs().max(1.0),
            );
        }
    }
}

/// A tiny deterministic generator (SplitMix64), so the transforms need no RNG crate.
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn distinct(v: &[f64]) -> usize {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.dedup();
    s.len()
}

#[test]
fn every_metric_is_invariant_to_increasing_transforms() {
    let fx = fixtures();
    let mut rng = SplitMix(7);
    for case in &fx.cases {
        let (id, ood) = case.scores();
        // conf ↦ exp(a·conf + b): a ∈ [0.5, 2.5], b ∈ [-3, 3]; case E's 99 maps to at most e^250.
        let (a, b) = (0.5 + 2.0 * rng.next_f64(), -3.0 + 6.0 * rng.next_f64());
        let f = |x: f64| (a * x + b).exp();
        let (tid, tood): (Vec<f64>, Vec<f64>) = (
            id.iter().copied().map(f).collect(),
            ood.iter().copied().map(f).collect(),
        );
        // The transform must keep the order and the ties for the check to mean anything.
        let pooled = |x: &[f64], y: &[f64]| distinct(&[x, y].concat());
        assert_eq!(pooled(&tid, &tood), pooled(&id, &ood), "case {}", case.name);
        for c in Convention::ALL {
            let raw = compute(&id, &ood, c).unwrap();
            let moved = compute(&tid, &tood, c).unwrap();
            check_against(
                case,
                &moved,
                fx.tolerance,
                &format!("exp({a:.3}·x + {b:.3})"),
            );
            // Ranks alone decide, so even the bits agree, and the threshold moves with the scores.
            assert_eq!(
                (moved.auroc, moved.fpr95),
                (raw.auroc, raw.fpr95),
                "case {}",
                case.name
            );
            assert_eq!(
                moved.fpr95_threshold,
                f(raw.fpr95_threshold),
                "case {} {c}",
                case.name
            );
        }
    }
}

#[test]
fn swapping_the_classes_and_negating_swaps_in_and_out() {
    // OOD-positive on −conf is ID-positive on the negated, swapped problem.
    for case in &fixtures().cases {
        let (id, ood) = case.scores();
        let neg = |v: &[f64]| v.iter().map(|x| -x).collect::<Vec<_>>();
        let m = compute(&id, &ood, Convention::Hendrycks).unwrap();
        let s = compute(&neg(&ood), &neg(&id), Convention::Hendrycks).unwrap();
        let what = format!("case {}", case.name);
        assert_close(&what, s.auroc, m.auroc, 1e-12);
        assert_close(&what, s.aupr_in, m.aupr_out, 1e-12);
        assert_close(&what, s.aupr_out, m.aupr_in, 1e-12);
        assert_close(&what, s.aupr_in_trapezoid, m.aupr_out_trapezoid, 1e-12);
        assert_close(&what, s.aupr_out_trapezoid, m.aupr_in_trapezoid, 1e-12);
    }
}

fn case(name: &str) -> Case {
    fixtures()
        .cases
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn json_metrics(out: &std::process::Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
    serde_json::from_str(&stdout(out)).expect("stdout is JSON")
}

fn check_json(case: &Case, v: &serde_json::Value, convention: Convention) {
    let e = &case.expected;
    let get = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("no number {k} in {v}"))
    };
    let tol = 1e-12;
    assert_close("auroc", get("auroc"), e.auroc, tol);
    assert_close("aupr_in", get("aupr_in"), e.aupr_in, tol);
    assert_close("aupr_out", get("aupr_out"), e.aupr_out, tol);
    assert_close(
        "aupr_in_trapezoid",
        get("aupr_in_trapezoid"),
        e.aupr_in_trapezoid,
        tol,
    );
    assert_close(
        "aupr_out_trapezoid",
        get("aupr_out_trapezoid"),
        e.aupr_out_trapezoid,
        tol,
    );
    assert_close("fpr95", get("fpr95"), case.point(convention).fpr, tol);
    assert_close(
        "threshold",
        get("fpr95_threshold"),
        case.point(convention).threshold,
        tol,
    );
    assert_eq!(v["convention"], convention.name());
    assert_eq!(v["n_id"], case.n_id);
    assert_eq!(v["n_ood"], case.n_ood);
}

#[test]
fn cli_reads_npy_and_prints_json_for_every_convention() {
    let g = case("G");
    let dir = tempfile::tempdir().unwrap();
    let (id, ood) = (fixture_dir().join(&g.id), fixture_dir().join(&g.ood));
    let (id, ood) = (id.to_str().unwrap(), ood.to_str().unwrap());
    for c in Convention::ALL {
        let out = run_clean(
            dir.path(),
            &[
                "metrics",
                "--id",
                id,
                "--ood",
                ood,
                "--convention",
                c.name(),
                "--json",
            ],
            &[],
        );
        check_json(&g, &json_metrics(&out), c);
    }
    // No --convention: the Dream-OOD (Hendrycks) rule, 0.40 on case G.
    let out = run_clean(
        dir.path(),
        &["metrics", "--id", id, "--ood", ood, "--json"],
        &[],
    );
    let v = json_metrics(&out);
    check_json(&g, &v, Convention::Hendrycks);
    assert_eq!(v["fpr95"], 0.4);
}

#[test]
fn cli_reads_text_and_prints_a_table() {
    let a = case("A");
    let (id, ood) = a.scores();
    let dir = tempfile::tempdir().unwrap();
    // Rust's `{}` writes the shortest text that parses back to the same f64.
    let lines = |v: &[f64]| v.iter().map(|x| format!("{x}\n")).collect::<String>();
    fs::write(dir.path().join("id.txt"), format!("# conf\n{}", lines(&id))).unwrap();
    fs::write(dir.path().join("ood.txt"), lines(&ood) + "\n").unwrap();
    let args = ["metrics", "--id", "id.txt", "--ood", "ood.txt"];
    let out = run_clean(
        dir.path(),
        &[&args[..], &["--convention", "openood", "--json"]].concat(),
        &[],
    );
    check_json(&a, &json_metrics(&out), Convention::Openood);

    let out = run_clean(dir.path(), &args, &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let table = stdout(&out);
    for needle in [
        "ID / OOD scores          20 / 10",
        "AUROC                    0.640000",
        "AUPR-In (AP)             0.788406",
        "AUPR-Out (AP)            0.444781",
        "AUPR-In (trapezoid)      0.782566",
        "AUPR-Out (trapezoid)     0.402593",
        "FPR@95TPR (hendrycks)    1.000000  (threshold 0.04;",
    ] {
        assert!(table.contains(needle), "missing {needle:?} in\n{table}");
    }
}

/// Runs `metrics` in a folder holding `files`, expecting the fatal exit; returns stderr.
fn fails(files: &[(&str, &[u8])], args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        fs::write(dir.path().join(name), bytes).unwrap();
    }
    let out = run_clean(dir.path(), &[&["metrics"][..], args].concat(), &[]);
    assert_eq!(out.status.code(), Some(2), "stdout: {}", stdout(&out));
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn cli_errors_name_the_file_and_line() {
    let good: &[u8] = b"0.9\n0.8\n";
    let err = fails(
        &[("id.txt", good)],
        &["--id", "id.txt", "--ood", "missing.npy"],
    );
    assert!(err.starts_with("error: missing.npy: "), "{err}");

    let err = fails(
        &[("id.txt", good), ("ood.txt", b"0.1\n0.2\n0.3x\n")],
        &["--id", "id.txt", "--ood", "ood.txt"],
    );
    assert!(
        err.contains("error: ood.txt:3: \"0.3x\" is not a number; expected one score per line"),
        "{err}"
    );

    let err = fails(
        &[("id.txt", b"0.9\nNaN\n"), ("ood.txt", good)],
        &["--id", "id.txt", "--ood", "ood.txt"],
    );
    assert!(
        err.contains("error: id.txt:2: NaN is not a valid score; scores must be finite numbers"),
        "{err}"
    );

    let err = fails(
        &[("id.txt", good), ("ood.txt", b"")],
        &["--id", "id.txt", "--ood", "ood.txt"],
    );
    assert!(
        err.contains("error: ood.txt: no scores in the file"),
        "{err}"
    );

    let err = fails(
        &[("id.txt", good), ("ood.txt", good)],
        &[
            "--id",
            "id.txt",
            "--ood",
            "ood.txt",
            "--convention",
            "fpr95",
        ],
    );
    assert!(
        err.contains("expected one of hendrycks, knn-ood, id-first-tpr95, openood"),
        "{err}"
    );
}

#[test]
fn cli_rejects_npy_of_the_wrong_kind() {
    use ndarray::{Array1, Array2};
    use ndarray_npy::WriteNpyExt;
    let npy = |write: &dyn Fn(&mut Vec<u8>)| {
        let mut b = Vec::new();
        write(&mut b);
        b
    };
    let ints = npy(&|b| Array1::from(vec![1i32, 2]).write_npy(b).unwrap());
    let matrix = npy(&|b| Array2::<f32>::zeros((4, 2)).write_npy(b).unwrap());
    let nan = npy(&|b| {
        Array1::from(vec![0.5f64, f64::NAN, 0.1])
            .write_npy(b)
            .unwrap()
    });
    let good: &[u8] = b"0.9\n";
    for (file, bytes, msg) in [
        (
            "i.npy",
            &ints,
            "error: i.npy: dtype '<i4' is not supported; expected float32 or float64",
        ),
        (
            "m.npy",
            &matrix,
            "error: m.npy: expected a 1-D array of scores, found shape [4, 2]",
        ),
        (
            "n.npy",
            &nan,
            "error: n.npy: element 1 is NaN; scores must be finite numbers",
        ),
    ] {
        let err = fails(
            &[(file, bytes.as_slice()), ("ood.txt", good)],
            &["--id", file, "--ood", "ood.txt"],
        );
        assert!(err.contains(msg), "want {msg:?} in {err}");
    }
}
