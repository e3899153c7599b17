//! Threshold calibration: the decision threshold for a target in-distribution TPR, from ID scores of a
//! held-out validation split.
//!
//! The rule ([`RULE`]): with n ID scores (confidences, higher = more ID), the threshold is the **largest
//! t such that the fraction of ID scores ≥ t is at least the target TPR**. Sorting the scores ascending,
//! c₍₀₎ ≤ … ≤ c₍ₙ₋₁₎, that is t = c₍ₖ₎ with k the largest index such that (n − k)/n ≥ TPR (computed in
//! f64 exactly as written), i.e. k = ⌊(1 − TPR)·n⌋ up to floating-point rounding. Ties: a score equal to
//! t is accepted (`is_ood = score < t`), so ties at the threshold can only raise the achieved TPR above
//! the target, never lower it. This is `reference/ood-detection.md` §4's recommended rule, and sklearn's
//! `roc_curve` + `thresholds[argmax(tpr ≥ TPR)]` gives the same t.
//!
//! Scores are handled as f32, the type the exported graph computes and compares in, so the achieved TPR
//! reported is exactly what the deployed `is_ood` does on the calibration set.
//!
//! Which data: a held-out ID **validation** split, disjoint from training (where scores are optimistic)
//! and from the test split (calibrating there and then reporting FPR@95 on it would leak the operating
//! point into the evaluation, as knn-ood does).

use crate::error::{Error, Result};

/// The rule in words, as written into the model's `threshold.rule`.
pub const RULE: &str = "largest t such that the fraction of calibration ID scores >= t is >= target_tpr; \
     is_ood = score < t (a score equal to t is in-distribution)";

/// A threshold and how it does on the scores it was computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibrated {
    pub threshold: f32,
    /// Fraction of the scores ≥ `threshold`.
    pub achieved_tpr: f64,
    pub count: usize,
}

/// Checks a target TPR: it must lie in (0, 1].
pub fn check_tpr(tpr: f64) -> Result<()> {
    if tpr > 0.0 && tpr <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidValue {
            key: "tpr".to_owned(),
            msg: format!("{tpr}; expected a fraction in (0, 1], e.g. 0.95"),
        })
    }
}

/// The threshold for `tpr` by [`RULE`]. Fails on an empty set, a non-finite score (naming its index) or
/// a TPR outside (0, 1].
pub fn threshold_at_tpr(scores: &[f32], tpr: f64) -> Result<Calibrated> {
    check_tpr(tpr)?;
    if scores.is_empty() {
        return Err(Error::InvalidValue {
            key: "calibration".to_owned(),
            msg: "no ID scores to calibrate on".to_owned(),
        });
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::InvalidValue {
            key: "calibration".to_owned(),
            msg: format!("score {i} is {}; scores must be finite", scores[i]),
        });
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    // Largest k with (n − k)/n ≥ tpr; k = 0 always qualifies since tpr ≤ 1.
    let k = (0..n)
        .rev()
        .find(|&k| (n - k) as f64 / n as f64 >= tpr)
        .unwrap_or(0);
    let threshold = sorted[k];
    let accepted = scores.iter().filter(|&&s| s >= threshold).count();
    Ok(Calibrated {
        threshold,
        achieved_tpr: accepted as f64 / n as f64,
        count: n,
    })
}

/// Per-class thresholds: [`threshold_at_tpr`] on the scores of the images predicted as each class. A
/// class that no calibration image is predicted as gets `None` (the caller falls back to the global
/// threshold and says so).
pub fn per_class_thresholds(
    scores: &[f32],
    predicted: &[usize],
    num_classes: usize,
    tpr: f64,
) -> Result<Vec<Option<Calibrated>>> {
    if scores.len() != predicted.len() {
        return Err(Error::Shape {
            what: "per-class calibration".to_owned(),
            expected: format!("one predicted class per score ({})", scores.len()),
            got: predicted.len().to_string(),
        });
    }
    let mut by_class: Vec<Vec<f32>> = vec![Vec::new(); num_classes];
    for (&s, &c) in scores.iter().zip(predicted) {
        let slot = by_class.get_mut(c).ok_or_else(|| Error::InvalidValue {
            key: "calibration".to_owned(),
            msg: format!("predicted class {c} out of range for {num_classes} classes"),
        })?;
        slot.push(s);
    }
    by_class
        .iter()
        .map(|s| {
            if s.is_empty() {
                Ok(None)
            } else {
                threshold_at_tpr(s, tpr).map(Some)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_distinct_scores_at_95_percent_reject_exactly_the_lowest() {
        // n = 20: (20 − k)/20 ≥ 0.95 ⇔ k ≤ 1, so t = c₍₁₎ = 2 and only 1.0 is rejected.
        let scores: Vec<f32> = (1..=20).rev().map(|v| v as f32).collect();
        let c = threshold_at_tpr(&scores, 0.95).unwrap();
        assert_eq!(c.threshold, 2.0);
        assert_eq!(c.achieved_tpr, 0.95);
        assert_eq!(c.count, 20);
    }

    #[test]
    fn when_the_target_falls_between_ranks_the_threshold_keeps_at_least_the_target() {
        // n = 10 at 95%: k = 0 ((10 − 1)/10 = 0.9 < 0.95), so everything is accepted.
        let scores = [5.0f32, 3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5];
        let c = threshold_at_tpr(&scores, 0.95).unwrap();
        assert_eq!((c.threshold, c.achieved_tpr), (0.5, 1.0));
        // At 80%: k = 2, t = c₍₂₎ = 2.0; 8 of 10 accepted.
        let c = threshold_at_tpr(&scores, 0.8).unwrap();
        assert_eq!((c.threshold, c.achieved_tpr), (2.0, 0.8));
        // At 75%: (10 − 2)/10 = 0.8 ≥ 0.75 but (10 − 3)/10 = 0.7 < 0.75: still k = 2.
        assert_eq!(threshold_at_tpr(&scores, 0.75).unwrap().threshold, 2.0);
    }

    #[test]
    fn ties_at_the_threshold_are_accepted_and_raise_the_achieved_tpr() {
        // Sorted: 1, 2, 2, 2, 3 … n = 5 at 80%: k = 1 → t = 2; all three 2s are accepted: 4/5.
        let scores = [2.0f32, 3.0, 1.0, 2.0, 2.0];
        let c = threshold_at_tpr(&scores, 0.8).unwrap();
        assert_eq!((c.threshold, c.achieved_tpr), (2.0, 0.8));
        // At 60%: k = 2 → t = c₍₂₎ = 2 again (tie), accepting 4/5 = 0.8 ≥ 0.6: the largest t that works,
        // since any t > 2 accepts only 1/5.
        let c = threshold_at_tpr(&scores, 0.6).unwrap();
        assert_eq!((c.threshold, c.achieved_tpr), (2.0, 0.8));
        // Everything tied: one threshold, everything accepted whatever the target.
        let c = threshold_at_tpr(&[4.0; 7], 0.5).unwrap();
        assert_eq!((c.threshold, c.achieved_tpr), (4.0, 1.0));
    }

    #[test]
    fn agrees_with_floor_of_one_minus_tpr_times_n() {
        // The closed form of the reference notes, t = c₍⌊(1−TPR)·n⌋₎, on sizes where it is unambiguous.
        for n in [1usize, 7, 19, 20, 21, 99, 100, 101, 1000, 1001] {
            let scores: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % n) as f32 * 0.25 - 3.0)
                .collect();
            let mut sorted = scores.clone();
            sorted.sort_by(f32::total_cmp);
            for tpr in [0.9, 0.95, 0.99, 1.0] {
                let k = ((1.0 - tpr) * n as f64 + 1e-9).floor() as usize;
                let c = threshold_at_tpr(&scores, tpr).unwrap();
                assert_eq!(c.threshold, sorted[k], "n {n}, tpr {tpr}");
                assert!(c.achieved_tpr >= tpr, "n {n}, tpr {tpr}");
            }
        }
    }

    #[test]
    fn negative_energy_scores_work_like_any_other() {
        let scores = [-3.5f32, -1.25, -8.0, -0.5];
        // n = 4 at 75%: k = 1 → t = −3.5 (−8 rejected).
        let c = threshold_at_tpr(&scores, 0.75).unwrap();
        assert_eq!((c.threshold, c.achieved_tpr), (-3.5, 0.75));
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(
            threshold_at_tpr(&[], 0.95)
                .unwrap_err()
                .to_string()
                .contains("no ID scores")
        );
        let err = threshold_at_tpr(&[1.0, f32::NAN], 0.95)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "calibration: score 1 is NaN; scores must be finite");
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            let err = threshold_at_tpr(&[1.0], bad).unwrap_err().to_string();
            assert!(err.starts_with("tpr: "), "{err}");
        }
    }

    #[test]
    fn per_class_uses_each_class_own_scores_and_marks_empty_classes() {
        let scores = [1.0f32, 2.0, 3.0, 4.0, 10.0, 20.0];
        let predicted = [0usize, 0, 0, 0, 2, 2];
        let per = per_class_thresholds(&scores, &predicted, 3, 0.75).unwrap();
        assert_eq!(per[0].unwrap().threshold, 2.0); // n = 4: k = 1
        assert!(per[1].is_none());
        assert_eq!(per[2].unwrap().threshold, 10.0); // n = 2: (2 − 1)/2 = 0.5 < 0.75 → k = 0
        assert!(per_class_thresholds(&scores, &[0, 0, 0, 0, 3, 0], 3, 0.75).is_err());
    }
}
