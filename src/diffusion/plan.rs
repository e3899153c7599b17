//! The deterministic plan of a generation run: image k ↦ (class, embedding row, seed), from the global seed
//! alone.
//!
//! Every image has its own ChaCha8 stream, seeded from `(global seed, k)`, which draws its class (for
//! `--total`), its embedding row and its initial latents. So a resumed run, a sharded run (`--shard I/N` takes
//! the images with `k mod N = I`) and one uninterrupted run write the same files under the same names
//! (`<class_index>/<k:07>.png`), whatever the batch size.
//!
//! Deviation: the official script draws one class and one embedding row per batch, shared by all its images
//! (SPEC §3.1 steps 1 and 3, §7 item 17). Per-image draws keep outputs independent of the batch size and
//! make `--per-class` balanced.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::{Error, Result};

/// How many images a run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageCount {
    /// `n` per class; image k is class `k mod C` (classes interleave, so any prefix of the run is balanced).
    PerClass(usize),
    /// `n` in all; each image's class is drawn uniformly (as the official script draws it per batch).
    Total(usize),
}

/// One planned image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedImage {
    /// Global index k (the file name).
    pub index: u64,
    pub class_index: usize,
    pub embedding_row: usize,
    /// The image's own seed: its initial latents are [`initial_latents`]`(seed, …)`.
    pub seed: u64,
}

/// A shard `I/N` of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if count > 0 && index < count => Ok(Shard { index, count }),
            _ => Err(format!(
                "malformed shard \"{s}\"; expected I/N with 0 <= I < N, e.g. 0/4"
            )),
        }
    }
}

/// SplitMix64: decorrelates the per-image seeds derived from (seed, k).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The seed of image `index` of a run with `seed`.
pub fn image_seed(seed: u64, index: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ index)
}

/// The images of a run (or of one shard), in index order.
pub fn plan(
    num_classes: usize,
    rows_per_class: usize,
    count: ImageCount,
    seed: u64,
    shard: Option<Shard>,
) -> Result<Vec<PlannedImage>> {
    if num_classes == 0 || rows_per_class == 0 {
        return Err(Error::InvalidValue {
            key: "embeddings".to_owned(),
            msg: format!("{num_classes} classes × {rows_per_class} rows: nothing to draw from"),
        });
    }
    let total = match count {
        ImageCount::PerClass(n) => n * num_classes,
        ImageCount::Total(n) => n,
    } as u64;
    let shard = shard.unwrap_or(Shard { index: 0, count: 1 });
    let images = (shard.index..total)
        .step_by(shard.count as usize)
        .map(|index| {
            let seed = image_seed(seed, index);
            let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(seed));
            let class_index = match count {
                ImageCount::PerClass(_) => (index % num_classes as u64) as usize,
                ImageCount::Total(_) => rng.random_range(0..num_classes),
            };
            let embedding_row = rng.random_range(0..rows_per_class);
            PlannedImage {
                index,
                class_index,
                embedding_row,
                seed,
            }
        })
        .collect();
    Ok(images)
}

/// The initial latents of an image: `len` draws of `N(0, I)` from `ChaCha8Rng::seed_from_u64(seed)` (the seed
/// in the manifest regenerates them; the plan's own draws use a separate stream).
pub fn initial_latents(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.sample(StandardNormal)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_plan() {
        let full = plan(10, 50, ImageCount::PerClass(7), 42, None).unwrap();
        assert_eq!(full.len(), 70);
        let mut merged: Vec<PlannedImage> = (0..3)
            .flat_map(|i| {
                plan(
                    10,
                    50,
                    ImageCount::PerClass(7),
                    42,
                    Some(Shard { index: i, count: 3 }),
                )
                .unwrap()
            })
            .collect();
        merged.sort_by_key(|p| p.index);
        assert_eq!(merged, full);
    }

    #[test]
    fn per_class_is_balanced_and_seeds_differ() {
        let full = plan(4, 9, ImageCount::PerClass(5), 1, None).unwrap();
        for c in 0..4 {
            assert_eq!(full.iter().filter(|p| p.class_index == c).count(), 5);
        }
        assert!(full.iter().all(|p| p.embedding_row < 9));
        let seeds: std::collections::HashSet<u64> = full.iter().map(|p| p.seed).collect();
        assert_eq!(seeds.len(), full.len());
        assert_ne!(plan(4, 9, ImageCount::PerClass(5), 2, None).unwrap(), full);
    }

    #[test]
    fn total_draws_classes_uniformly() {
        let full = plan(5, 3, ImageCount::Total(5000), 7, None).unwrap();
        for c in 0..5 {
            let n = full.iter().filter(|p| p.class_index == c).count();
            assert!((850..1150).contains(&n), "class {c}: {n} of 5000");
        }
    }

    #[test]
    fn latents_are_standard_normal_and_reproducible() {
        let img = plan(3, 4, ImageCount::PerClass(1), 9, None).unwrap()[0];
        let a = initial_latents(img.seed, 20_000);
        assert_eq!(a, initial_latents(img.seed, 20_000));
        assert_ne!(a, initial_latents(img.seed + 1, 20_000));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean}, var {var}"
        );
    }

    #[test]
    fn shard_parsing() {
        assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "3", ""] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.starts_with("malformed shard"), "{err}");
        }
    }
}
