//! FPR at 95% TPR, under the rule of a named codebase.
//!
//! "FPR95" is not one number: codebases differ in which class is positive, which operating point they pick
//! near 95%, and how ties sit on the threshold. On a tie-heavy case (SPEC reference §5.3 case G) the four
//! rules below give 0.40, 0.40, 0.70 and 0.75. Each [`Convention`] reproduces one codebase exactly (the
//! fixtures in `tests/fixtures/metrics/` hold the values of a Python port of each, run by
//! `tools/make_metric_fixtures.py`). Inputs are confidences, higher = more ID; `n_id` and `n_ood` count the
//! two sides.
//!
//! | name | positive | operating point | FPR |
//! |---|---|---|---|
//! | `hendrycks` (default) | ID | threshold whose recall is closest to 0.95, lowest threshold on a tie | #OOD ≥ t / n_ood |
//! | `knn-ood` | ID | t = sorted(ID)[round(0.05·n_id)] | #OOD > t / n_ood |
//! | `id-first-tpr95` | ID | highest threshold with TPR ≥ 0.95, every distinct score a point | #OOD ≥ t / n_ood |
//! | `openood` | OOD | highest −conf threshold with TPR ≥ 0.95 on `roc_curve(drop_intermediate=True)` | #ID ≤ t / n_id |
//!
//! Sources (reference `ood-detection.md` §5.2 and SPEC §5.2, which give the file and lines):
//! * `hendrycks`: `fpr_and_fdr_at_recall` in Dream-OOD's `utils/display_results.py` L26–66, called by
//!   `get_measures(-in_score, -out_score)` (L69–80; `scripts/test_ood_cifar100.py` L213–216). The same file
//!   is in energy_ood, VOS and NPOS. This is how the Dream-OOD paper's numbers were computed.
//! * `knn-ood`: deeplearning-wisc/knn-ood `util/metrics.py` L69 (threshold `known[round(0.05 * num_k)]` of
//!   the sorted ID scores) and L101 (`np.sum(novel > threshold) / float(num_n)`).
//! * `id-first-tpr95`: the plain textbook reading, `fpr[argmax(tpr >= 0.95)]` of
//!   `roc_curve(is_id, conf, drop_intermediate=False)` (the "ID-positive, first TPR ≥ .95" rows of §5.3).
//! * `openood`: OpenOOD v1.5 `openood/evaluators/metrics.py` L40–61 `auc_and_fpr_recall`:
//!   `fpr_list, tpr_list, _ = roc_curve(ood_indicator, -conf)` (sklearn's default `drop_intermediate=True`)
//!   and `fpr = fpr_list[argmax(tpr_list >= 0.95)]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::metrics::{CurvePoint, Positive, RankedScores};
use crate::{Error, Result};

/// The target recall / TPR of "FPR at 95% TPR".
pub const RECALL_LEVEL: f64 = 0.95;

/// A rule for FPR at 95% TPR; see the module docs for each rule's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Convention {
    /// Dream-OOD's official code (Hendrycks' `display_results.fpr_and_fdr_at_recall`): ID positive; among
    /// the distinct thresholds down to the first one at full recall, the one whose recall is closest to 0.95,
    /// the lowest threshold on a tie; it can pick recall < 0.95. FPR = #OOD with conf ≥ t / n_ood.
    #[default]
    #[serde(rename = "hendrycks")]
    Hendrycks,
    /// knn-ood (`util/metrics.py`): t = the ID score at index round(0.05·n_id) of the ascending sort
    /// (Python's round, half to even); FPR = #OOD with conf **strictly** > t / n_ood.
    #[serde(rename = "knn-ood")]
    KnnOod,
    /// ID positive, the highest distinct threshold t with #ID ≥ t / n_id ≥ 0.95 (no point dropped);
    /// FPR = #OOD with conf ≥ t / n_ood.
    #[serde(rename = "id-first-tpr95")]
    IdFirstTpr95,
    /// OpenOOD v1.5: OOD positive on −conf; the first point with TPR_OOD ≥ 0.95 of sklearn's `roc_curve`
    /// with `drop_intermediate=True` (a point whose steps in and out are equal is dropped, so the choice can
    /// move past it); FPR = #ID with conf ≤ t / n_id.
    #[serde(rename = "openood")]
    Openood,
}

impl Convention {
    /// Every convention, default first.
    pub const ALL: [Convention; 4] = [
        Convention::Hendrycks,
        Convention::KnnOod,
        Convention::IdFirstTpr95,
        Convention::Openood,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Convention::Hendrycks => "hendrycks",
            Convention::KnnOod => "knn-ood",
            Convention::IdFirstTpr95 => "id-first-tpr95",
            Convention::Openood => "openood",
        }
    }

    /// One line saying which samples count against the threshold, for the text report.
    pub fn rule(self) -> &'static str {
        match self {
            Convention::Hendrycks => "OOD with conf >= threshold, recall closest to 0.95",
            Convention::KnnOod => "OOD with conf > threshold",
            Convention::IdFirstTpr95 => "OOD with conf >= threshold, first TPR >= 0.95",
            Convention::Openood => "ID with conf <= threshold, OOD positive",
        }
    }
}

impl fmt::Display for Convention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Convention {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Convention::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::InvalidValue {
                key: "convention".into(),
                msg: format!(
                    "unknown \"{s}\"; expected one of {}",
                    Convention::ALL.map(Convention::name).join(", ")
                ),
            })
    }
}

/// The operating point a convention picks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OperatingPoint {
    /// False positive rate there, in [0, 1].
    pub fpr: f64,
    /// The conf value of the threshold; which side of it counts depends on the convention.
    pub threshold: f64,
}

/// FPR at 95% TPR of `ranked` under `convention`.
pub fn fpr_at_95_tpr(ranked: &RankedScores, convention: Convention) -> OperatingPoint {
    match convention {
        Convention::Hendrycks => hendrycks(ranked),
        Convention::KnnOod => knn_ood(ranked),
        Convention::IdFirstTpr95 => first_tpr_at_least(ranked, Positive::Id, false),
        Convention::Openood => first_tpr_at_least(ranked, Positive::Ood, true),
    }
}

/// `fpr_and_fdr_at_recall(labels, scores, 0.95)` with ID = 1 (Dream-OOD `utils/display_results.py` L26–66).
fn hendrycks(ranked: &RankedScores) -> OperatingPoint {
    // 1–2. One point per distinct score, descending (`threshold_idxs`); mergesort's order inside a tie is
    //      irrelevant because only the last index of each tie block is read.
    let points: Vec<CurvePoint> = ranked.curve(Positive::Id).collect();
    let n_id = ranked.n_id();
    // 3. `last_ind = tps.searchsorted(tps[-1])`: the first point at full recall.
    let last_ind = points
        .iter()
        .position(|p| p.tps == n_id)
        .expect("invariant: the last point holds every ID sample");
    // 4–5. `recall[last_ind::-1]`, then the sentinel (recall 1, fps 0); `argmin |recall − 0.95|` keeps the
    //      first minimum, so walk from last_ind down and replace only on a strictly smaller gap. The sentinel
    //      ties with points[last_ind] (recall 1), which comes first, so it never wins.
    let gap = |p: &CurvePoint| (p.tps as f64 / n_id as f64 - RECALL_LEVEL).abs();
    let mut best = last_ind;
    for k in (0..last_ind).rev() {
        if gap(&points[k]) < gap(&points[best]) {
            best = k;
        }
    }
    // 6. `fps[cutoff] / #neg`.
    OperatingPoint {
        fpr: points[best].fps as f64 / ranked.n_ood() as f64,
        threshold: points[best].score,
    }
}

/// knn-ood `util/metrics.py` `get_curve`: `threshold = known[round(0.05 * num_k)]` on the sorted ID scores,
/// `fpr = np.sum(novel > threshold) / float(num_n)`.
fn knn_ood(ranked: &RankedScores) -> OperatingPoint {
    // Python 3 rounds half to even, on the f64 product (0.05·10 = 0.5 → 0, 0.05·30 = 1.5 → 2).
    let index = (0.05 * ranked.n_id() as f64).round_ties_even() as usize;
    // The ID score at `index` of the ascending sort: walk the tie groups from the lowest score up.
    let mut below = 0;
    let mut threshold = f64::NAN;
    for g in ranked.groups().iter().rev() {
        below += g.n_id;
        if below > index {
            threshold = g.score;
            break;
        }
    }
    debug_assert!(!threshold.is_nan(), "index {index} < n_id");
    let ood_above: usize = ranked
        .groups()
        .iter()
        .take_while(|g| g.score > threshold)
        .map(|g| g.n_ood)
        .sum();
    OperatingPoint {
        fpr: ood_above as f64 / ranked.n_ood() as f64,
        threshold,
    }
}

/// `fpr[argmax(tpr >= 0.95)]` of sklearn's `roc_curve` with `positive` as the positive class, with or
/// without `drop_intermediate`. The (0, 0) point sklearn prepends has TPR 0 and is never chosen.
fn first_tpr_at_least(
    ranked: &RankedScores,
    positive: Positive,
    drop_intermediate: bool,
) -> OperatingPoint {
    let points: Vec<CurvePoint> = ranked.curve(positive).collect();
    let (num_pos, num_neg) = (
        ranked.num_positive(positive) as f64,
        ranked.num_negative(positive) as f64,
    );
    let last = points.len() - 1;
    // sklearn keeps a point when `diff(fps, 2)` or `diff(tps, 2)` is non-zero at it, i.e. when its step in
    // differs from its step out, plus the first and last points; only when there are more than 2 points.
    let kept = |k: usize| {
        if !drop_intermediate || points.len() <= 2 || k == 0 || k == last {
            return true;
        }
        let (a, b, c) = (points[k - 1], points[k], points[k + 1]);
        b.fps - a.fps != c.fps - b.fps || b.tps - a.tps != c.tps - b.tps
    };
    let chosen = (0..points.len())
        .find(|&k| kept(k) && points[k].tps as f64 / num_pos >= RECALL_LEVEL)
        // The last point has TPR 1, so the search always ends there at the latest.
        .unwrap_or(last);
    OperatingPoint {
        fpr: points[chosen].fps as f64 / num_neg,
        threshold: points[chosen].score,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics::compute;
    use crate::eval::metrics::golden::{case_a, case_e, case_g};

    fn fpr(id: &[f64], ood: &[f64], c: Convention) -> OperatingPoint {
        RankedScores::new(id, ood).unwrap().fpr_at_95_tpr(c)
    }

    #[test]
    fn case_a_table() {
        let (id, ood) = case_a();
        // Recall 19/20 = 0.95 at both 0.05 and 0.04 (only OOD there); Hendrycks takes the lower one.
        let h = fpr(&id, &ood, Convention::Hendrycks);
        assert_eq!((h.fpr, h.threshold), (1.0, 0.04));
        let k = fpr(&id, &ood, Convention::KnnOod);
        assert_eq!((k.fpr, k.threshold), (0.9, 0.05));
        let f = fpr(&id, &ood, Convention::IdFirstTpr95);
        assert_eq!((f.fpr, f.threshold), (0.9, 0.05));
        assert_eq!(fpr(&id, &ood, Convention::Openood).fpr, 0.9);
    }

    #[test]
    fn case_g_table() {
        let (id, ood) = case_g();
        // Hendrycks: recall 0.90 (t = 0.4) and 1.0 (t = 0.2) are both 0.05 from 0.95 on paper, but in f64
        // |0.9 − 0.95| = 0.04999999999999993 < |1 − 0.95| = 0.05000000000000004, so it picks recall 0.90
        // and 4 of 10 OOD, as numpy does.
        let h = fpr(&id, &ood, Convention::Hendrycks);
        assert_eq!((h.fpr, h.threshold), (0.4, 0.4));
        let k = fpr(&id, &ood, Convention::KnnOod);
        assert_eq!((k.fpr, k.threshold), (0.4, 0.2));
        let f = fpr(&id, &ood, Convention::IdFirstTpr95);
        assert_eq!((f.fpr, f.threshold), (0.7, 0.2));
        let o = fpr(&id, &ood, Convention::Openood);
        assert_eq!(o.fpr, 0.75);
    }

    #[test]
    fn case_e_drop_intermediate_moves_openood_to_one() {
        let (v, _) = case_e();
        // Every step is (1 ID, 1 OOD), so drop_intermediate keeps only the end points.
        let o = fpr(&v, &v, Convention::Openood);
        assert_eq!((o.fpr, o.threshold), (1.0, 99.0));
        assert_eq!(fpr(&v, &v, Convention::Hendrycks).fpr, 0.95);
        assert_eq!(fpr(&v, &v, Convention::IdFirstTpr95).fpr, 0.95);
        let k = fpr(&v, &v, Convention::KnnOod);
        assert_eq!((k.fpr, k.threshold), (0.94, 5.0));
    }

    #[test]
    fn knn_ood_rounds_half_to_even() {
        // n_id = 10: 0.05·10 = 0.5 rounds to 0, so t is the lowest ID score.
        let id: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(fpr(&id, &[0.5], Convention::KnnOod).threshold, 0.0);
        // n_id = 30: 1.5 rounds to 2.
        let id: Vec<f64> = (0..30).map(f64::from).collect();
        assert_eq!(fpr(&id, &[0.5], Convention::KnnOod).threshold, 2.0);
    }

    #[test]
    fn all_tied_scores() {
        let (id, ood) = ([0.5; 4], [0.5; 3]);
        assert_eq!(fpr(&id, &ood, Convention::Hendrycks).fpr, 1.0);
        assert_eq!(fpr(&id, &ood, Convention::IdFirstTpr95).fpr, 1.0);
        assert_eq!(fpr(&id, &ood, Convention::Openood).fpr, 1.0);
        // Strict > counts no OOD at all.
        assert_eq!(fpr(&id, &ood, Convention::KnnOod).fpr, 0.0);
    }

    #[test]
    fn names_round_trip_and_unknown_lists_the_valid_ones() {
        for c in Convention::ALL {
            assert_eq!(c.name().parse::<Convention>().unwrap(), c);
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
        assert_eq!(Convention::default(), Convention::Hendrycks);
        let err = "open-ood".parse::<Convention>().unwrap_err().to_string();
        assert_eq!(
            err,
            "convention: unknown \"open-ood\"; expected one of hendrycks, knn-ood, id-first-tpr95, openood"
        );
    }

    #[test]
    fn compute_reports_the_chosen_convention() {
        let (id, ood) = case_g();
        let m = compute(&id, &ood, Convention::IdFirstTpr95).unwrap();
        assert_eq!(m.convention, Convention::IdFirstTpr95);
        assert_eq!((m.fpr95, m.fpr95_threshold), (0.7, 0.2));
    }
}
