//! The random draws of stage 2, behind a trait so that tests can replay recorded draws.
//!
//! Stage 2 draws two things per call of the sampler (SPEC §2.2 steps 3–4): which `anchors` of the `select`
//! boundary points to perturb (without replacement, in draw order), and the Gaussian noise `ε ~ N(0, I_D)`.
//! [`SeededNoise`] makes both from counter-based streams keyed by `(seed, class, call, purpose)`: every value
//! is a pure function of its key and position, so the draws do not depend on the device, on the thread
//! count or on the order in which classes and calls are processed. Parity tests swap in a source that
//! returns the draws a Python port of the official code recorded, which makes the comparison exact even
//! though numpy's and torch's generators are not reproduced.
//!
//! The generator is SplitMix64 (Steele, Lea, Flood, OOPSLA 2014) used as a counter-based hash: value `i` of a
//! stream is `mix(key + (i + 1)·γ)`. Normals come from the Box–Muller transform in `f64`, rounded to `f32`.
//! Neither numpy's nor torch's generator is reproduced; the official code sets no seed at all (SPEC §2).

use std::num::NonZeroUsize;

/// The random draws of one class's sampling. `call` numbers the sampler's calls within the class.
pub trait NoiseSource {
    /// `n` distinct indices from `0..population`, in draw order (`np.random.choice(population, n,
    /// replace=False)` in the official code). Requires `n <= population`.
    fn choose(&mut self, call: usize, population: usize, n: usize) -> Vec<usize>;
    /// `rows × dim` standard normal draws, row-major.
    fn gaussian(&mut self, call: usize, rows: usize, dim: usize) -> Vec<f32>;
}

/// Golden-ratio increment of SplitMix64.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function (a bijective 64-bit mixer).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a stream is for; part of its key so that the choice and the noise of a call are independent.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    Choose = 1,
    Gaussian = 2,
}

/// Draws from counter-based streams derived from the run's seed and the class index.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    seed: u64,
    class: u64,
    threads: NonZeroUsize,
}

impl SeededNoise {
    /// The source for class `class` of a run seeded with `seed`. `threads` only splits the work of
    /// [`NoiseSource::gaussian`]; the values do not depend on it.
    pub fn new(seed: u64, class: usize, threads: NonZeroUsize) -> Self {
        SeededNoise {
            seed,
            class: class as u64,
            threads,
        }
    }

    /// The key of one stream: every input passes through the mixer, so nearby seeds, classes and calls
    /// give unrelated streams.
    fn key(&self, call: usize, purpose: Purpose) -> u64 {
        let mut k = mix(self.seed ^ 0x6472_6561_6d2d_6f6f); // "dream-oo"
        k = mix(k ^ mix(self.class.wrapping_add(1).wrapping_mul(GAMMA)));
        k = mix(k ^ mix((call as u64).wrapping_add(1).wrapping_mul(GAMMA ^ 0xA5A5)));
        mix(k ^ purpose as u64)
    }
}

/// Value `i` of the stream with key `key`.
fn stream_u64(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// A uniform draw in `(0, 1]` from 53 random bits (never 0, so its logarithm is finite).
fn open_unit(bits: u64) -> f64 {
    ((bits >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Fills `out` with the normals at positions `start..start + out.len()` of the stream `key`. Position `2j`
/// and `2j + 1` are the pair Box–Muller makes from stream values `2j` and `2j + 1`.
fn fill_normals(key: u64, start: usize, out: &mut [f32]) {
    for (offset, slot) in out.iter_mut().enumerate() {
        let pos = (start + offset) as u64;
        let pair = pos / 2;
        let u1 = open_unit(stream_u64(key, 2 * pair));
        let u2 = open_unit(stream_u64(key, 2 * pair + 1));
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        let z = if pos.is_multiple_of(2) {
            radius * angle.cos()
        } else {
            radius * angle.sin()
        };
        *slot = z as f32;
    }
}

impl NoiseSource for SeededNoise {
    fn choose(&mut self, call: usize, population: usize, n: usize) -> Vec<usize> {
        assert!(n <= population, "invariant: choose {n} of {population}");
        let key = self.key(call, Purpose::Choose);
        // Partial Fisher–Yates: position i takes a uniform pick of the not yet chosen indices.
        let mut pool: Vec<usize> = (0..population).collect();
        for i in 0..n {
            let remaining = (population - i) as u128;
            // Multiply-shift maps 64 random bits onto 0..remaining; the bias is below remaining / 2^64.
            let j = i + ((stream_u64(key, i as u64) as u128 * remaining) >> 64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(n);
        pool
    }

    fn gaussian(&mut self, call: usize, rows: usize, dim: usize) -> Vec<f32> {
        let key = self.key(call, Purpose::Gaussian);
        let mut out = vec![0f32; rows * dim];
        let total = out.len();
        let threads = self.threads.get().min(total.div_ceil(1 << 16)).max(1);
        if threads == 1 {
            fill_normals(key, 0, &mut out);
            return out;
        }
        // Even chunk starts keep each Box–Muller pair inside one chunk; the values are the same as serial.
        let chunk = total.div_ceil(threads).next_multiple_of(2);
        std::thread::scope(|scope| {
            for (i, part) in out.chunks_mut(chunk).enumerate() {
                scope.spawn(move || fill_normals(key, i * chunk, part));
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(seed: u64, class: usize, threads: usize) -> SeededNoise {
        SeededNoise::new(seed, class, NonZeroUsize::new(threads).unwrap())
    }

    #[test]
    fn gaussian_has_standard_moments() {
        let x = source(0, 0, 1).gaussian(0, 1000, 200);
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let kurt = x.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n / var.powi(2);
        let beyond_2 = x.iter().filter(|v| v.abs() > 2.0).count() as f64 / n;
        // 200k draws: standard errors are about 0.0022 (mean), 0.0032 (variance), 0.011 (kurtosis).
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.06, "kurtosis {kurt}");
        // P(|z| > 2) = 0.0455 for a standard normal.
        assert!((beyond_2 - 0.0455).abs() < 0.002, "tail {beyond_2}");
    }

    #[test]
    fn gaussian_does_not_depend_on_threads() {
        let serial = source(3, 7, 1).gaussian(5, 301, 1000);
        for threads in [2, 3, 8] {
            assert_eq!(source(3, 7, threads).gaussian(5, 301, 1000), serial);
        }
    }

    #[test]
    fn streams_differ_by_seed_class_and_call() {
        let base = source(0, 0, 1).gaussian(0, 4, 8);
        assert_eq!(source(0, 0, 1).gaussian(0, 4, 8), base);
        assert_ne!(source(1, 0, 1).gaussian(0, 4, 8), base);
        assert_ne!(source(0, 1, 1).gaussian(0, 4, 8), base);
        assert_ne!(source(0, 0, 1).gaussian(1, 4, 8), base);
        // Neighbouring rows of one stream are not copies of each other either.
        assert_ne!(base[..8], base[8..16]);
    }

    #[test]
    fn choose_is_a_uniform_draw_without_replacement() {
        let mut src = source(11, 2, 1);
        let mut counts = [0usize; 10];
        for call in 0..20_000 {
            let picked = src.choose(call, 10, 4);
            let mut sorted = picked.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 4, "duplicates in {picked:?}");
            assert!(picked.iter().all(|&i| i < 10));
            // The first draw alone must be uniform too, not just the set.
            counts[picked[0]] += 1;
        }
        // Expected 2000 each; the standard deviation is about 42.
        for (i, &c) in counts.iter().enumerate() {
            assert!((1820..2180).contains(&c), "index {i} drawn first {c} times");
        }
        let all = src.choose(0, 6, 6);
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4, 5]);
    }
}
