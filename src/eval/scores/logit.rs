//! Scores read straight off the logits `z = g(x)` `[N, C]`: MSP, MaxLogit and Energy. Computed in float64.

use tch::{Kind, Tensor};

use super::{check_2d, to_vec};
use crate::{Error, Result};

fn double(logits: &Tensor, what: &str) -> Result<Tensor> {
    check_2d(logits, &format!("{what}: logits"), None)?;
    logits
        .f_to_kind(Kind::Double)
        .map_err(|e| Error::torch(what.to_owned(), e))
}

/// MSP (maximum softmax probability; Hendrycks & Gimpel, ICLR 2017): `max_c softmax(z)_c`. The official
/// Dream-OOD test script's non-energy score (`scripts/test_ood_cifar100.py:L127-128`, stored negated).
pub fn msp(logits: &Tensor) -> Result<Vec<f64>> {
    let z = double(logits, "msp")?;
    let p = z
        .f_softmax(1, Kind::Double)
        .and_then(|p| p.f_amax(1, false))
        .map_err(|e| Error::torch("msp", e))?;
    to_vec(&p, "msp")
}

/// MaxLogit (Hendrycks et al., ICML 2022, "Scaling Out-of-Distribution Detection for Real-World
/// Settings"; OpenOOD `mls`): `max_c z_c`.
pub fn max_logit(logits: &Tensor) -> Result<Vec<f64>> {
    let z = double(logits, "max_logit")?;
    let m = z
        .f_amax(1, false)
        .map_err(|e| Error::torch("max_logit", e))?;
    to_vec(&m, "max_logit")
}

/// Negative free energy (Liu et al., NeurIPS 2020): `−E(x) = T · logsumexp(z / T)`. With `T = 1` this is
/// the score Dream-OOD reports (`scripts/test_ood_cifar100.py:L122-125` stores `E(x)`) and OpenOOD's `ebo`.
pub fn energy(logits: &Tensor, temperature: f64) -> Result<Vec<f64>> {
    let z = double(logits, "energy")?;
    let e = (z / temperature)
        .f_logsumexp(1, false)
        .map_err(|e| Error::torch("energy", e))?
        * temperature;
    to_vec(&e, "energy")
}

/// Max softmax at temperature `T`: `max_c softmax(z / T)_c`, the confidence ODIN reads off its perturbed
/// logits ([`super::odin`]).
pub fn msp_at_temperature(logits: &Tensor, temperature: f64) -> Result<Vec<f64>> {
    let z = double(logits, "softmax at temperature")? / temperature;
    let p = z
        .f_softmax(1, Kind::Double)
        .and_then(|p| p.f_amax(1, false))
        .map_err(|e| Error::torch("softmax at temperature", e))?;
    to_vec(&p, "softmax at temperature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_values() {
        let z = Tensor::from_slice(&[0.0f32, 0.0, (2.0f32).ln(), 1.0, 1.0, 1.0]).view([2, 3]);
        let m = msp(&z).unwrap();
        assert!((m[0] - 0.5).abs() < 1e-7 && (m[1] - 1.0 / 3.0).abs() < 1e-12);
        let l = max_logit(&z).unwrap();
        assert!((l[0] - f64::from((2.0f32).ln())).abs() < 1e-12 && l[1] == 1.0);
        let e = energy(&z, 1.0).unwrap();
        assert!((e[1] - (1.0 + 3f64.ln())).abs() < 1e-12);
        // T = 2: 2·logsumexp(z/2) for equal logits is 1 + 2·ln 3.
        assert!((energy(&z, 2.0).unwrap()[1] - (1.0 + 2.0 * 3f64.ln())).abs() < 1e-12);
        assert!((msp_at_temperature(&z, 1.0).unwrap()[0] - 0.5).abs() < 1e-7);
    }

    #[test]
    fn wrong_rank_names_the_score() {
        let err = msp(&Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "msp: logits: expected shape [N, D], got [3]");
    }
}
