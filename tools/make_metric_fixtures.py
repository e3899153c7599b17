#!/usr/bin/env python3
"""Make the reference values that `dream_ood::eval::metrics` must reproduce (tests/metrics.rs).

Why: "FPR95", "AUPR" and even AUROC with ties are computed differently across OOD codebases, so the Rust
metrics are checked number for number against scikit-learn and against faithful Python ports of each FPR@95
rule the library names. The rules, as written in the codebases they come from (see
/work/shared/reference/ood-detection.md §5.2 and SPEC-dream-ood.md §5.2):

  hendrycks       Dream-OOD utils/display_results.py L26-80 (Hendrycks' OE code, also energy_ood, VOS, NPOS):
                  fpr_and_fdr_at_recall(labels, examples, 0.95) inside get_measures(-in_score, -out_score),
                  i.e. ID positive on conf. Reimplemented below from that function.
  knn-ood         deeplearning-wisc/knn-ood util/metrics.py L69, L101:
                  threshold = sorted(known)[round(0.05 * num_k)]; fpr = sum(novel > threshold) / num_n.
  id-first-tpr95  roc_curve(is_id, conf, drop_intermediate=False); fpr[argmax(tpr >= 0.95)].
  openood         OpenOOD v1.5 openood/evaluators/metrics.py L40-61 auc_and_fpr_recall:
                  roc_curve(is_ood, -conf) (drop_intermediate=True, sklearn's default);
                  fpr[argmax(tpr >= 0.95)].

and the threshold-free metrics (conf = higher is ID):
  auroc               roc_auc_score(is_id, conf)
  aupr_in / aupr_out  average_precision_score(is_id, conf) / average_precision_score(is_ood, -conf)
  aupr_*_trapezoid    auc(recall, precision) of precision_recall_curve (as OpenOOD v1.5 computes AUPR)

Cases: the golden vectors A, E, F, G of ood-detection.md §5.3 (the script asserts the table values there, to
1e-6, so a wrong port fails here first), and random or degenerate ones drawn from numpy's PCG64
(`default_rng(SEED)`): continuous normal, tie-heavy (rounded to 0.1, and small integers), all scores equal,
perfectly separated, n = 1 vs n = 2 both ways, and 5000 vs 5000.

Source: scikit-learn 1.9.1, numpy 2.4.6 (tools/requirements-fixtures.txt), seed 20261126.
Writes:  tests/fixtures/metrics/cases.json          every case: sizes, score files, expected values
         tests/fixtures/metrics/<case>_{id,ood}.npy scores as float64 (.npy keeps every bit; JSON parsing
                                                    in Rust need not be correctly rounded)
Run:     make fixtures-venv && .deps/venv/bin/python tools/make_metric_fixtures.py
Tolerance: 1e-12 absolute on every value (both sides are f64; only summation order differs).
"""

import json
from pathlib import Path

import numpy as np
import sklearn
from sklearn import metrics

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "metrics"
SEED = 20261126
RECALL_LEVEL = 0.95
TOLERANCE = 1e-12


# --- Hendrycks display_results (Dream-OOD utils/display_results.py) ------------------------------------------


def stable_cumsum(arr, rtol=1e-05, atol=1e-08):
    """Cumulative sum in float64, checked against the plain sum (as in display_results.py)."""
    out = np.cumsum(arr, dtype=np.float64)
    expected = np.sum(arr, dtype=np.float64)
    if not np.allclose(out[-1], expected, rtol=rtol, atol=atol):
        raise RuntimeError("cumsum was found to be unstable: its last element does not correspond to sum")
    return out


def fpr_and_fdr_at_recall(y_true, y_score, recall_level=RECALL_LEVEL, pos_label=1.0):
    """FPR at the recall closest to `recall_level`; returns (fpr, threshold) (the original returns fpr)."""
    y_true = y_true == pos_label
    # Sort scores and corresponding truth values, descending; mergesort as in the original.
    desc_score_indices = np.argsort(y_score, kind="mergesort")[::-1]
    y_score = y_score[desc_score_indices]
    y_true = y_true[desc_score_indices]
    # y_score typically has many tied values: keep the last index of each distinct value.
    distinct_value_indices = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct_value_indices, y_true.size - 1]
    tps = stable_cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    thresholds = y_score[threshold_idxs]
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps, tps, thresholds = np.r_[recall[sl], 1], np.r_[fps[sl], 0], np.r_[tps[sl], 0], thresholds[sl]
    cutoff = np.argmin(np.abs(recall - recall_level))
    assert cutoff < len(thresholds), "the appended (recall 1, fps 0) point never wins"
    return fps[cutoff] / np.sum(np.logical_not(y_true)), thresholds[cutoff]


def hendrycks_fpr(conf_id, conf_ood):
    """get_measures(-in_score, -out_score): ID positive, examples = [conf_id; conf_ood]."""
    pos = np.array(conf_id[:]).reshape((-1, 1))
    neg = np.array(conf_ood[:]).reshape((-1, 1))
    examples = np.squeeze(np.vstack((pos, neg)), axis=1)
    labels = np.zeros(len(examples), dtype=np.int32)
    labels[: len(pos)] += 1
    return fpr_and_fdr_at_recall(labels, examples, RECALL_LEVEL)


# --- knn-ood util/metrics.py get_curve ---------------------------------------------------------------------


def knn_ood_fpr(known, novel):
    known = np.sort(known)
    num_k, num_n = known.shape[0], novel.shape[0]
    threshold = known[round(0.05 * num_k)]  # Python's round: half to even
    return np.sum(novel > threshold) / float(num_n), threshold


# --- sklearn roc_curve rules -------------------------------------------------------------------------------


def id_first_tpr95_fpr(conf_id, conf_ood):
    conf = np.concatenate([conf_id, conf_ood])
    is_id = np.r_[np.ones(len(conf_id)), np.zeros(len(conf_ood))]
    fpr, tpr, thresholds = metrics.roc_curve(is_id, conf, drop_intermediate=False)
    i = np.argmax(tpr >= RECALL_LEVEL)
    return fpr[i], thresholds[i]


def openood_fpr(conf_id, conf_ood):
    """OpenOOD v1.5 auc_and_fpr_recall: label -1 is OOD, OOD positive on -conf. Also returns its AUROC."""
    conf = np.concatenate([conf_id, conf_ood])
    label = np.r_[np.zeros(len(conf_id)), -np.ones(len(conf_ood))]
    ood_indicator = np.zeros_like(label)
    ood_indicator[label == -1] = 1
    fpr_list, tpr_list, thresholds = metrics.roc_curve(ood_indicator, -conf)
    i = np.argmax(tpr_list >= RECALL_LEVEL)
    # The threshold is on -conf; report it in conf units (ID with conf <= it are the false positives).
    return fpr_list[i], -thresholds[i], metrics.auc(fpr_list, tpr_list)


# --- one case ----------------------------------------------------------------------------------------------


def expected_values(conf_id, conf_ood):
    conf = np.concatenate([conf_id, conf_ood])
    is_id = np.r_[np.ones(len(conf_id)), np.zeros(len(conf_ood))]
    is_ood = 1 - is_id
    p_in, r_in, _ = metrics.precision_recall_curve(is_id, conf)
    p_out, r_out, _ = metrics.precision_recall_curve(is_ood, -conf)
    auroc = metrics.roc_auc_score(is_id, conf)
    h_fpr, h_thr = hendrycks_fpr(conf_id, conf_ood)
    k_fpr, k_thr = knn_ood_fpr(conf_id, conf_ood)
    f_fpr, f_thr = id_first_tpr95_fpr(conf_id, conf_ood)
    o_fpr, o_thr, o_auroc = openood_fpr(conf_id, conf_ood)
    assert abs(auroc - o_auroc) < TOLERANCE, (auroc, o_auroc)
    point = lambda fpr, thr: {"fpr": float(fpr), "threshold": float(thr)}  # noqa: E731
    return {
        "auroc": float(auroc),
        "aupr_in": float(metrics.average_precision_score(is_id, conf)),
        "aupr_out": float(metrics.average_precision_score(is_ood, -conf)),
        "aupr_in_trapezoid": float(metrics.auc(r_in, p_in)),
        "aupr_out_trapezoid": float(metrics.auc(r_out, p_out)),
        "fpr95": {
            "hendrycks": point(h_fpr, h_thr),
            "knn-ood": point(k_fpr, k_thr),
            "id-first-tpr95": point(f_fpr, f_thr),
            "openood": point(o_fpr, o_thr),
        },
    }


def golden_cases():
    a_id = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1,
            0.05, 0.02]  # fmt: skip
    a_ood = [0.88, 0.62, 0.5, 0.33, 0.3, 0.28, 0.2, 0.12, 0.1, 0.04]
    g_id = [1.0] * 5 + [0.8] * 5 + [0.6] * 5 + [0.4] * 3 + [0.2] * 2
    g_ood = [0.8, 0.6, 0.4, 0.4, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0]
    e = [float(i) for i in range(100)]
    return [
        ("A", "§5.3 case A: ID/OOD ties at 0.5, 0.3, 0.2, 0.1; Hendrycks picks 0.04 (FPR 1.0)", a_id, a_ood),
        ("E", "§5.3 case E: ID = OOD = 0..99; drop_intermediate moves OpenOOD to FPR 1.0", e, e),
        ("F", "§5.3 case F: the sklearn docs vector y=[0,0,1,1], s=[0.1,0.4,0.35,0.8]", [0.35, 0.8], [0.1, 0.4]),
        ("G", "§5.3 case G: tie blocks; every FPR convention disagrees", g_id, g_ood),
    ]


# The §5.3 tables, asserted so that a wrong port fails here rather than in the Rust tests.
TABLES = {
    "A": {"auroc": 0.64, "aupr_in": 0.788406, "aupr_out": 0.444781, "aupr_in_trapezoid": 0.782566,
          "aupr_out_trapezoid": 0.402593, "hendrycks": 1.0, "knn-ood": 0.9, "id-first-tpr95": 0.9,
          "openood": 0.9},
    "E": {"auroc": 0.5, "aupr_in_trapezoid": 0.5025, "aupr_out_trapezoid": 0.5025, "hendrycks": 0.95,
          "knn-ood": 0.94, "id-first-tpr95": 0.95, "openood": 1.0},
    "F": {"auroc": 0.75, "aupr_in": 0.833333, "aupr_in_trapezoid": 0.791667},
    "G": {"auroc": 0.85, "aupr_in": 0.894662, "aupr_out": 0.735445, "aupr_in_trapezoid": 0.918053,
          "aupr_out_trapezoid": 0.797176, "hendrycks": 0.4, "knn-ood": 0.4, "id-first-tpr95": 0.7,
          "openood": 0.75},
}  # fmt: skip


def random_cases(rng):
    return [
        ("normal", "continuous: ID ~ N(2, 0.5) x300, OOD ~ N(0, 1.5) x200",
         rng.normal(2.0, 0.5, 300), rng.normal(0.0, 1.5, 200)),
        ("ties_0p1", "tie-heavy: ID ~ N(2, 0.5) x400, OOD ~ N(1, 1) x300, rounded to 0.1",
         [float(f"{x:.1f}") for x in rng.normal(2.0, 0.5, 400)],
         [float(f"{x:.1f}") for x in rng.normal(1.0, 1.0, 300)]),
        ("ties_int", "tie-heavy integers: ID in 0..19 x500, OOD in 0..11 x350",
         rng.integers(0, 20, 500).astype(np.float64), rng.integers(0, 12, 350).astype(np.float64)),
        ("all_equal", "every score 0.5: ID x7, OOD x5", [0.5] * 7, [0.5] * 5),
        ("separated", "ID ~ U(1, 2) x50 above OOD ~ U(-1, 0) x40", rng.uniform(1, 2, 50), rng.uniform(-1, 0, 40)),
        ("tiny_1v2", "n_id = 1, n_ood = 2", [0.3], [0.1, 0.5]),
        ("tiny_2v1", "n_id = 2, n_ood = 1", [0.2, 0.7], [0.4]),
        ("large", "ID ~ N(1, 1) x5000, OOD ~ N(0, 1.2) x5000", rng.normal(1.0, 1.0, 5000),
         rng.normal(0.0, 1.2, 5000)),
    ]  # fmt: skip


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    cases = []
    for name, about, conf_id, conf_ood in golden_cases() + random_cases(rng):
        conf_id, conf_ood = np.asarray(conf_id, dtype=np.float64), np.asarray(conf_ood, dtype=np.float64)
        expected = expected_values(conf_id, conf_ood)
        for key, want in TABLES.get(name, {}).items():
            got = expected["fpr95"][key]["fpr"] if key in expected["fpr95"] else expected[key]
            assert abs(got - want) < 1e-6, f"case {name} {key}: table {want}, computed {got}"
        np.save(OUT / f"{name}_id.npy", conf_id)
        np.save(OUT / f"{name}_ood.npy", conf_ood)
        cases.append({"name": name, "about": about, "id": f"{name}_id.npy", "ood": f"{name}_ood.npy",
                      "n_id": len(conf_id), "n_ood": len(conf_ood), "expected": expected})  # fmt: skip
    doc = {
        "source": f"tools/make_metric_fixtures.py; scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
        f"seed {SEED}",
        "tolerance": TOLERANCE,
        "cases": cases,
    }
    (OUT / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
