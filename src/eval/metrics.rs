//! AUROC, AUPR-In and AUPR-Out, exact with ties, and the [`Metrics`] that `dream-ood metrics` prints.
//!
//! Inputs are confidences: **higher means more in-distribution** (for an energy detector, `−E(x)` =
//! `logsumexp(logits)`). Notation, as in scikit-learn's `_ranking.py`:
//!
//! | name | meaning |
//! |---|---|
//! | positive class | ID for AUROC and AUPR-In (score = conf); OOD for AUPR-Out (score = −conf) |
//! | `tps`, `fps` | positives and negatives whose score is ≥ a threshold (one point per distinct score) |
//! | recall `R` | `tps / #positives`; precision `P` = `tps / (tps + fps)` |
//!
//! * **AUROC** = `roc_auc_score`: the Mann–Whitney statistic, P(conf_ID > conf_OOD) + ½·P(tie), which equals
//!   the trapezoid under the full ROC curve. It is the same whichever class is positive.
//! * **AUPR-In / AUPR-Out** = `average_precision_score` with ID / OOD positive: AP = Σₙ (Rₙ − Rₙ₋₁)·Pₙ, the
//!   step sum the Dream-OOD code reports (`utils/display_results.py` `get_measures`, SPEC §5.2).
//! * **AUPR-In / AUPR-Out (trapezoid)** = `auc(recall, precision)` of `precision_recall_curve`, the curve
//!   with the point (R = 0, P = 1) appended: what OpenOOD v1.5 (`openood/evaluators/metrics.py`) and
//!   pytorch-ood call AUPR. It is not the same number (sklearn docs: AP "is different from computing the
//!   area under the precision-recall curve with the trapezoidal rule").
//!
//! Every metric depends only on the order of the scores and on which are tied, so any strictly increasing
//! transform of the scores leaves it unchanged. [`RankedScores`] sorts the pooled scores once
//! (O(n log n)) and groups ties; every metric, FPR@95 included, is then one pass over the groups.

use std::fmt::Write as _;

use serde::Serialize;

use super::fpr::{self, Convention, OperatingPoint};
use crate::{Error, Result};

/// Which class a curve treats as positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positive {
    /// In-distribution positive, score = conf (AUROC, AUPR-In, the Dream-OOD FPR95).
    Id,
    /// Out-of-distribution positive, score = −conf (AUPR-Out, OpenOOD's FPR95).
    Ood,
}

/// One distinct score and how many ID and OOD samples hold it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TieGroup {
    pub score: f64,
    pub n_id: usize,
    pub n_ood: usize,
}

/// One point of a ROC or PR curve: calling positive every sample at least as positive as `score` (a conf
/// value) gives `tps` true and `fps` false positives. One point per distinct score, as sklearn's
/// `confusion_matrix_at_thresholds` makes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CurvePoint {
    pub score: f64,
    pub tps: usize,
    pub fps: usize,
}

/// ID and OOD scores pooled, sorted once by decreasing conf, with tied scores grouped.
#[derive(Debug, Clone)]
pub struct RankedScores {
    /// Distinct scores, in decreasing order.
    groups: Vec<TieGroup>,
    n_id: usize,
    n_ood: usize,
}

impl RankedScores {
    /// Sorts and groups the scores. Fails when either side is empty (no metric is defined, and sklearn
    /// raises too) or holds a NaN or an infinity (sklearn's `check_array` refuses both; a NaN also has no
    /// place in an order).
    pub fn new(id: &[f64], ood: &[f64]) -> Result<Self> {
        check_scores(id, "ID scores")?;
        check_scores(ood, "OOD scores")?;
        let mut pooled: Vec<(f64, bool)> = id
            .iter()
            .map(|&s| (s, true))
            .chain(ood.iter().map(|&s| (s, false)))
            .collect();
        // total_cmp puts -0.0 right after 0.0, so the `==` grouping below still merges them, as numpy does.
        pooled.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut groups: Vec<TieGroup> = Vec::new();
        for (score, is_id) in pooled {
            let group = match groups.last_mut() {
                Some(last) if last.score == score => last,
                _ => {
                    groups.push(TieGroup {
                        score,
                        n_id: 0,
                        n_ood: 0,
                    });
                    groups.last_mut().expect("invariant: just pushed")
                }
            };
            if is_id {
                group.n_id += 1;
            } else {
                group.n_ood += 1;
            }
        }
        Ok(Self {
            groups,
            n_id: id.len(),
            n_ood: ood.len(),
        })
    }

    /// Number of ID scores.
    pub fn n_id(&self) -> usize {
        self.n_id
    }

    /// Number of OOD scores.
    pub fn n_ood(&self) -> usize {
        self.n_ood
    }

    /// Distinct scores with their ID and OOD counts, by decreasing conf.
    pub(crate) fn groups(&self) -> &[TieGroup] {
        &self.groups
    }

    /// Number of samples of the positive class.
    pub fn num_positive(&self, positive: Positive) -> usize {
        match positive {
            Positive::Id => self.n_id,
            Positive::Ood => self.n_ood,
        }
    }

    /// Number of samples of the negative class.
    pub fn num_negative(&self, positive: Positive) -> usize {
        match positive {
            Positive::Id => self.n_ood,
            Positive::Ood => self.n_id,
        }
    }

    /// The curve points from the highest threshold down (sklearn's order before it reverses PR curves). With
    /// OOD positive the score is −conf, so the groups are walked from the lowest conf up.
    pub(crate) fn curve(&self, positive: Positive) -> impl Iterator<Item = CurvePoint> + '_ {
        let ordered: Box<dyn Iterator<Item = &TieGroup>> = match positive {
            Positive::Id => Box::new(self.groups.iter()),
            Positive::Ood => Box::new(self.groups.iter().rev()),
        };
        ordered.scan((0usize, 0usize), move |(tps, fps), g| {
            let (pos, neg) = match positive {
                Positive::Id => (g.n_id, g.n_ood),
                Positive::Ood => (g.n_ood, g.n_id),
            };
            *tps += pos;
            *fps += neg;
            Some(CurvePoint {
                score: g.score,
                tps: *tps,
                fps: *fps,
            })
        })
    }

    /// Area under the ROC curve, ties counted one half (= `roc_auc_score`, either class positive).
    pub fn auroc(&self) -> f64 {
        // 2U = Σ over OOD samples of (2·#ID strictly above + #ID tied), kept in integers so the only
        // rounding is the final division.
        let mut id_above: u128 = 0;
        let mut twice_u: u128 = 0;
        for g in &self.groups {
            twice_u += g.n_ood as u128 * (2 * id_above + g.n_id as u128);
            id_above += g.n_id as u128;
        }
        twice_u as f64 / (2 * self.n_id as u128 * self.n_ood as u128) as f64
    }

    /// Average precision with the given class positive (= `average_precision_score`): Σ (Rₙ − Rₙ₋₁)·Pₙ over
    /// the points from the highest threshold down, without interpolation.
    pub fn average_precision(&self, positive: Positive) -> f64 {
        let num_pos = self.num_positive(positive) as f64;
        let mut prev_recall = 0.0;
        let mut ap = 0.0;
        for p in self.curve(positive) {
            let recall = p.tps as f64 / num_pos;
            ap += (recall - prev_recall) * precision(p);
            prev_recall = recall;
        }
        // sklearn clips a rounding -0.0 the same way.
        ap.max(0.0)
    }

    /// Trapezoid under the precision–recall curve with the given class positive (= `auc(recall, precision)`
    /// of `precision_recall_curve`, whose curve starts at (R = 0, P = 1)); what OpenOOD calls AUPR.
    pub fn pr_trapezoid(&self, positive: Positive) -> f64 {
        let num_pos = self.num_positive(positive) as f64;
        let (mut prev_recall, mut prev_precision) = (0.0, 1.0);
        let mut area = 0.0;
        for p in self.curve(positive) {
            let (recall, precision) = (p.tps as f64 / num_pos, precision(p));
            area += (recall - prev_recall) * (precision + prev_precision) / 2.0;
            (prev_recall, prev_precision) = (recall, precision);
        }
        area
    }

    /// FPR at 95% TPR and its threshold under `convention` (see [`fpr`]).
    pub fn fpr_at_95_tpr(&self, convention: Convention) -> OperatingPoint {
        fpr::fpr_at_95_tpr(self, convention)
    }
}

/// Precision at a curve point; every point holds at least one sample, so `tps + fps > 0`.
fn precision(p: CurvePoint) -> f64 {
    p.tps as f64 / (p.tps + p.fps) as f64
}

fn check_scores(scores: &[f64], what: &str) -> Result<()> {
    if scores.is_empty() {
        return Err(Error::InvalidValue {
            key: what.into(),
            msg: "no scores; the metrics need at least one ID and one OOD score".into(),
        });
    }
    if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(Error::InvalidValue {
            key: what.into(),
            msg: format!("element {i} is {s}; scores must be finite numbers"),
        });
    }
    Ok(())
}

/// The OOD metrics of one ID / OOD pair of score sets. Fractions in [0, 1], not percentages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Number of ID scores.
    pub n_id: usize,
    /// Number of OOD scores.
    pub n_ood: usize,
    /// Area under the ROC curve (`roc_auc_score`).
    pub auroc: f64,
    /// Average precision with ID positive (`average_precision_score(is_id, conf)`), as Dream-OOD reports.
    pub aupr_in: f64,
    /// Average precision with OOD positive (`average_precision_score(is_ood, -conf)`).
    pub aupr_out: f64,
    /// Trapezoid under the PR curve with ID positive, as OpenOOD v1.5 reports AUPR-In.
    pub aupr_in_trapezoid: f64,
    /// Trapezoid under the PR curve with OOD positive, as OpenOOD v1.5 reports AUPR-Out.
    pub aupr_out_trapezoid: f64,
    /// The rule `fpr95` follows.
    pub convention: Convention,
    /// False positive rate at 95% true positive rate under `convention`.
    pub fpr95: f64,
    /// The conf threshold of that operating point; [`Convention`] says which side of it counts.
    pub fpr95_threshold: f64,
}

/// Computes every metric from ID and OOD confidences (higher = more ID), with FPR@95 under `convention`.
/// Sorts once. Fails on empty inputs and on NaN or infinite scores.
pub fn compute(id: &[f64], ood: &[f64], convention: Convention) -> Result<Metrics> {
    let ranked = RankedScores::new(id, ood)?;
    let op = ranked.fpr_at_95_tpr(convention);
    Ok(Metrics {
        n_id: ranked.n_id(),
        n_ood: ranked.n_ood(),
        auroc: ranked.auroc(),
        aupr_in: ranked.average_precision(Positive::Id),
        aupr_out: ranked.average_precision(Positive::Ood),
        aupr_in_trapezoid: ranked.pr_trapezoid(Positive::Id),
        aupr_out_trapezoid: ranked.pr_trapezoid(Positive::Ood),
        convention,
        fpr95: op.fpr,
        fpr95_threshold: op.threshold,
    })
}

impl Metrics {
    /// The human-readable table `dream-ood metrics` prints.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let rows = [
            ("AUROC", self.auroc),
            ("AUPR-In (AP)", self.aupr_in),
            ("AUPR-Out (AP)", self.aupr_out),
            ("AUPR-In (trapezoid)", self.aupr_in_trapezoid),
            ("AUPR-Out (trapezoid)", self.aupr_out_trapezoid),
        ];
        let fpr_label = format!("FPR@95TPR ({})", self.convention);
        let _ = writeln!(
            out,
            "{:<24} {}",
            "ID / OOD scores",
            format_args!("{} / {}", self.n_id, self.n_ood)
        );
        for (label, value) in rows {
            let _ = writeln!(out, "{label:<24} {value:.6}");
        }
        let _ = writeln!(
            out,
            "{fpr_label:<24} {:.6}  (threshold {}; {})",
            self.fpr95,
            self.fpr95_threshold,
            self.convention.rule()
        );
        out
    }
}

/// The golden vectors of the SPEC reference (`ood-detection.md` §5.3), shared by the unit tests here and in
/// `fpr.rs`.
#[cfg(test)]
pub(crate) mod golden {
    /// SPEC reference §5.3 case A (ties between ID and OOD at 0.5, 0.3, 0.2, 0.1).
    pub fn case_a() -> (Vec<f64>, Vec<f64>) {
        let id = vec![
            0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2,
            0.15, 0.1, 0.05, 0.02,
        ];
        let ood = vec![0.88, 0.62, 0.5, 0.33, 0.3, 0.28, 0.2, 0.12, 0.1, 0.04];
        (id, ood)
    }

    /// SPEC reference §5.3 case G (tie blocks; every FPR convention disagrees).
    pub fn case_g() -> (Vec<f64>, Vec<f64>) {
        let mut id = vec![1.0; 5];
        id.extend([0.8; 5]);
        id.extend([0.6; 5]);
        id.extend([0.4; 3]);
        id.extend([0.2; 2]);
        let ood = vec![0.8, 0.6, 0.4, 0.4, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0];
        (id, ood)
    }

    /// SPEC reference §5.3 case E: ID = OOD = 0..99, every score held once by each side.
    pub fn case_e() -> (Vec<f64>, Vec<f64>) {
        let v: Vec<f64> = (0..100).map(f64::from).collect();
        (v.clone(), v)
    }
}

#[cfg(test)]
mod tests {
    use super::golden::{case_a, case_e, case_g};
    use super::*;

    const TOL: f64 = 1e-6;

    fn assert_close(what: &str, found: f64, expected: f64, tol: f64) {
        assert!(
            (found - expected).abs() <= tol,
            "{what}: expected {expected}, found {found} (tolerance {tol})"
        );
    }

    /// The scikit-learn docs vector (SPEC reference §5.3 case F): y = [0, 0, 1, 1], s = [0.1, 0.4, 0.35, 0.8].
    fn case_f() -> RankedScores {
        RankedScores::new(&[0.35, 0.8], &[0.1, 0.4]).unwrap()
    }

    #[test]
    fn case_f_matches_the_hand_worked_values() {
        let r = case_f();
        // Pairs (ID, OOD): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 → 3/4.
        assert_eq!(r.auroc(), 0.75);
        // Points: 0.8 (R .5, P 1), 0.4 (R .5, P .5), 0.35 (R 1, P 2/3), 0.1 (R 1, P .5).
        // AP = .5·1 + .5·2/3 = 5/6; trapezoid = .5·(1+1)/2 + .5·(.5+2/3)/2 = 19/24.
        assert_close("AP", r.average_precision(Positive::Id), 5.0 / 6.0, 1e-15);
        assert_close("trapz", r.pr_trapezoid(Positive::Id), 19.0 / 24.0, 1e-15);
        assert_close("AP", r.average_precision(Positive::Id), 0.833333, TOL);
        assert_close("trapz", r.pr_trapezoid(Positive::Id), 0.791667, TOL);
    }

    #[test]
    fn case_f_curve_is_sklearn_roc_curve_without_the_inf_point() {
        // roc_curve: fpr [0, 0, .5, .5, 1], tpr [0, .5, .5, 1, 1], thresholds [inf, .8, .4, .35, .1].
        let pts: Vec<_> = case_f().curve(Positive::Id).collect();
        let got: Vec<_> = pts.iter().map(|p| (p.score, p.tps, p.fps)).collect();
        assert_eq!(got, [(0.8, 1, 0), (0.4, 1, 1), (0.35, 2, 1), (0.1, 2, 2)]);
    }

    #[test]
    fn ood_positive_curve_runs_from_the_lowest_conf() {
        let got: Vec<_> = case_f()
            .curve(Positive::Ood)
            .map(|p| (p.score, p.tps, p.fps))
            .collect();
        assert_eq!(got, [(0.1, 1, 0), (0.35, 1, 1), (0.4, 2, 1), (0.8, 2, 2)]);
    }

    #[test]
    fn case_a_table() {
        let (id, ood) = case_a();
        let m = compute(&id, &ood, Convention::Hendrycks).unwrap();
        assert_close("AUROC", m.auroc, 0.64, 1e-12);
        assert_close("AP in", m.aupr_in, 0.788406, TOL);
        assert_close("AP out", m.aupr_out, 0.444781, TOL);
        assert_close("trapz in", m.aupr_in_trapezoid, 0.782566, TOL);
        assert_close("trapz out", m.aupr_out_trapezoid, 0.402593, TOL);
        assert_eq!((m.n_id, m.n_ood), (20, 10));
    }

    #[test]
    fn case_g_table() {
        let (id, ood) = case_g();
        let m = compute(&id, &ood, Convention::Openood).unwrap();
        assert_close("AUROC", m.auroc, 0.85, 1e-12);
        assert_close("AP in", m.aupr_in, 0.894662, TOL);
        assert_close("AP out", m.aupr_out, 0.735445, TOL);
        assert_close("trapz in", m.aupr_in_trapezoid, 0.918053, TOL);
        assert_close("trapz out", m.aupr_out_trapezoid, 0.797176, TOL);
    }

    #[test]
    fn case_e_table() {
        let (id, ood) = case_e();
        let m = compute(&id, &ood, Convention::Openood).unwrap();
        assert_eq!(m.auroc, 0.5);
        assert_close("trapz in", m.aupr_in_trapezoid, 0.5025, 1e-12);
        assert_close("trapz out", m.aupr_out_trapezoid, 0.5025, 1e-12);
        // Every point has precision 1/2 and recall steps of 1/100: AP = 1/2 exactly.
        assert_close("AP in", m.aupr_in, 0.5, 1e-12);
        assert_close("AP out", m.aupr_out, 0.5, 1e-12);
    }

    #[test]
    fn perfect_and_reversed_separation() {
        let m = compute(&[3.0, 4.0], &[1.0, 2.0], Convention::Hendrycks).unwrap();
        assert_eq!((m.auroc, m.aupr_in, m.aupr_out), (1.0, 1.0, 1.0));
        assert_eq!((m.aupr_in_trapezoid, m.aupr_out_trapezoid), (1.0, 1.0));
        let m = compute(&[1.0, 2.0], &[3.0, 4.0], Convention::Hendrycks).unwrap();
        assert_eq!(m.auroc, 0.0);
        // ID positive: the two OOD come first (P = 0), then R climbs at P = 1/3 and 1/2.
        assert_close("AP in", m.aupr_in, 0.5 * (1.0 / 3.0) + 0.5 * 0.5, 1e-15);
    }

    #[test]
    fn all_tied_scores() {
        let m = compute(&[0.5; 3], &[0.5; 2], Convention::Hendrycks).unwrap();
        assert_eq!(m.auroc, 0.5);
        assert_close("AP in", m.aupr_in, 0.6, 1e-15);
        assert_close("AP out", m.aupr_out, 0.4, 1e-15);
        // One segment from (0, 1) to (1, P).
        assert_close("trapz in", m.aupr_in_trapezoid, 0.8, 1e-15);
        assert_close("trapz out", m.aupr_out_trapezoid, 0.7, 1e-15);
    }

    #[test]
    fn signed_zeros_are_one_tie() {
        let r = RankedScores::new(&[0.0, 1.0], &[-0.0]).unwrap();
        assert_eq!(r.groups().len(), 2);
        assert_eq!(r.auroc(), 0.75);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_side_and_element() {
        let err = compute(&[], &[1.0], Convention::Hendrycks)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("ID scores: no scores"), "{err}");
        let err = compute(&[1.0], &[0.0, f64::NAN], Convention::Hendrycks)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "OOD scores: element 1 is NaN; scores must be finite numbers"
        );
        let err = compute(&[f64::INFINITY], &[0.0], Convention::Hendrycks)
            .unwrap_err()
            .to_string();
        assert!(err.contains("element 0 is inf"), "{err}");
    }

    #[test]
    fn text_table_lists_every_metric() {
        let (id, ood) = case_a();
        let text = compute(&id, &ood, Convention::Hendrycks).unwrap().to_text();
        for needle in [
            "AUROC                    0.640000",
            "AUPR-In (AP)             0.788406",
            "AUPR-Out (trapezoid)     0.402593",
            "FPR@95TPR (hendrycks)    1.000000  (threshold 0.04;",
            "ID / OOD scores          20 / 10",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
