//! Stage 2: outlier (or inlier) embeddings sampled at the boundary of each class's feature cloud.
//!
//! Reads the stage-1 feature bank `[C, N, D]` (with its optional `BANK.json` row counts) and the class token
//! embeddings `T` `[C, D]`; writes `OUT.npy` `[C, per_class, D]` float32, the file the official
//! `get_embed_*.py` scripts write and stage 3 reads, plus `OUT.json` (settings, seed, mode, counts,
//! timings). Paper: Du et al. 2023, §3.2 "Outlier imagination in the latent space"; the exact procedure is
//! SPEC §2, from `scripts/KNN.py` and `scripts/get_embed_cifar100.py`.
//!
//! Per class `c` ([`outliers::sample_class`]):
//! 1. `Z_c` = the class's filled bank rows, normalised; `d_K(q)` = the k-th smallest squared L2 distance from
//!    `q/‖q‖` to `Z_c` ([`knn`], exact, libtorch on the CPU or CUDA).
//! 2. Boundary points: the `select` rows with the largest `d_K` (inliers: smallest).
//! 3. Per call, `anchors` of them drawn without replacement; `candidates` Gaussian draws `ε`; candidates
//!    `normalize(z + σ ε)`.
//! 4. kNN filter: `keep` candidates per boundary point with the largest `d_K` (inliers: smallest); the
//!    official code's scrambled version of this step is [`SampleMode::Official`].
//! 5. Calls repeat until `per_class` rows; rows are scaled by `‖T_c‖`.
//!
//! Randomness: every draw comes from [`noise::SeededNoise`], keyed by the seed, the class and the call, so
//! the draws are the same on every device and thread count, and a class's rows do not depend on the other
//! classes. The output is bit-identical for the same inputs, seed and device. Across thread counts and
//! devices (CUDA's matrix products round differently from the CPU's) the kNN distances can differ in
//! their last bits, which changes the output only where two candidates' distances tie to rounding.

pub mod io;
pub mod knn;
pub mod noise;
pub mod outliers;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Tensor};

use crate::config::{NoiseSharing, SampleConfig, SampleMode};
use crate::progress::Progress;
use crate::{Error, Result};

pub use io::CountsSource;
pub use noise::{NoiseSource, SeededNoise};
pub use outliers::{ClassSample, sample_class};

/// One stage-2 run: files, settings and where to compute.
#[derive(Debug, Clone)]
pub struct SampleJob {
    /// Feature bank `[C, N, D]` `.npy`.
    pub bank: PathBuf,
    /// Class token embeddings `[C, D]` `.npy`.
    pub tokens: PathBuf,
    /// Output `.npy`; the sidecar is the same path with `.json`.
    pub out: PathBuf,
    /// The `[sample]` settings (its paths are not used; see `bank`, `tokens`, `out`).
    pub settings: SampleConfig,
    /// The run's seed (`[run] seed`).
    pub seed: u64,
    /// Where the kNN and the candidates are computed (the draws are made on the CPU).
    pub device: Device,
    /// CPU threads for the noise and for libtorch (0: all cores). Does not change the draws.
    pub threads: usize,
    /// Memory budget of one kNN distance block ([`knn::DEFAULT_CHUNK_BYTES`]).
    pub chunk_bytes: usize,
}

/// What a run did, as written to the `.json` sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct SampleReport {
    /// The dream-ood version that wrote the file.
    pub dream_ood_version: &'static str,
    /// `"outliers"` or `"inliers"`.
    pub kind: &'static str,
    /// `intended` or `official`.
    pub mode: SampleMode,
    /// The seed every draw derives from.
    pub seed: u64,
    /// How the draws are made from the seed.
    pub rng: &'static str,
    /// The libtorch device that ran the kNN.
    pub device: String,
    /// The settings that shaped the output.
    pub settings: SampleSettings,
    /// The feature bank read.
    pub bank: BankInfo,
    /// The token embeddings read.
    pub tokens: TokensInfo,
    /// Output shape `[C, per_class, D]`.
    pub shape: [usize; 3],
    /// Per-class counts and times, in class order.
    pub classes: Vec<ClassInfo>,
    /// Wall-clock seconds.
    pub timings: Timings,
}

/// The sampling settings that shape the output (paths excluded); see [`SampleConfig`] for each.
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct SampleSettings {
    pub k: usize,
    pub select: usize,
    pub anchors: usize,
    pub keep: usize,
    pub sigma: f64,
    pub candidates: usize,
    pub per_class: usize,
    pub noise: NoiseSharing,
}

/// The feature bank a run read.
#[derive(Debug, Clone, Serialize)]
pub struct BankInfo {
    /// As given.
    pub path: PathBuf,
    /// `[C, N, D]` as stored, padding included.
    pub shape: [usize; 3],
    /// Whether the per-class row counts came from `BANK.json` or from the non-zero rows.
    pub counts_from: CountsSource,
}

/// The token embeddings a run read.
#[derive(Debug, Clone, Serialize)]
pub struct TokensInfo {
    /// As given.
    pub path: PathBuf,
    /// `‖T_c‖` per class, the scale of its output rows.
    pub norms: Vec<f32>,
}

/// Per-class counts.
#[derive(Debug, Clone, Serialize)]
pub struct ClassInfo {
    /// Class index (row of the bank and of the tokens).
    pub class: usize,
    /// Bank rows used (padding excluded).
    pub bank_rows: usize,
    /// Boundary points ranked (`select`, clamped to the rows in intended mode).
    pub select_used: usize,
    /// Sampler calls made.
    pub calls: usize,
    /// Rows written.
    pub rows: usize,
    /// Seconds spent on the class.
    pub secs: f64,
}

/// Where a run's time went, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Reading and checking the inputs.
    pub read_secs: f64,
    /// Sampling and writing every class.
    pub sample_secs: f64,
    /// The whole run.
    pub total_secs: f64,
}

/// The seeding rule, recorded in the sidecar.
const RNG_DESCRIPTION: &str = "SplitMix64 counter streams keyed by (seed, class, call, purpose); \
                               Box-Muller normals in f64 rounded to f32; partial Fisher-Yates choice";

fn shape_error(what: String, expected: String, got: String) -> Error {
    Error::Shape {
        what,
        expected,
        got,
    }
}

/// Runs stage 2 (see the module doc): reads the inputs, samples every class, writes `out` and its sidecar
/// atomically, and reports progress per class.
pub fn run(job: &SampleJob, progress: &dyn Progress) -> Result<SampleReport> {
    let started = Instant::now();
    let cfg = &job.settings;
    cfg.check().map_err(|(key, msg)| Error::InvalidValue {
        key: key.to_owned(),
        msg,
    })?;
    let bank = io::read_bank(&job.bank)?;
    let tokens = io::read_tokens(&job.tokens)?;
    let (c, n, d) = bank.data.dim();
    if tokens.dim() != (c, d) {
        return Err(shape_error(
            format!(
                "token embeddings {} for the bank {} ([{c}, {n}, {d}])",
                job.tokens.display(),
                job.bank.display()
            ),
            format!("[{c}, {d}] (one row per class, the bank's D)"),
            format!("{:?}", tokens.shape()),
        ));
    }
    let norms: Vec<f32> = tokens
        .outer_iter()
        .map(|t| t.iter().map(|v| v * v).sum::<f32>().sqrt())
        .collect();
    if let Some(i) = norms.iter().position(|&v| v == 0.0) {
        return Err(Error::Data {
            path: job.tokens.clone(),
            line: None,
            msg: format!("class {i}'s token embedding is all zeros; its outputs would all be zero"),
        });
    }
    // Fail before any work when a class is too small, naming every such class.
    let small: Vec<String> = bank
        .rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.len() <= cfg.k)
        .map(|(i, r)| format!("{i} ({} rows)", r.len()))
        .collect();
    if !small.is_empty() {
        return Err(Error::Data {
            path: job.bank.clone(),
            line: None,
            msg: format!(
                "k = {} needs at least k + 1 = {} rows per class; too few in class {}",
                cfg.k,
                cfg.k + 1,
                small.join(", ")
            ),
        });
    }
    let read_secs = started.elapsed().as_secs_f64();

    let threads = match job.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        t => t,
    };
    if job.threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let kind = if cfg.inliers { "inliers" } else { "outliers" };
    tracing::info!(
        classes = c, per_class = cfg.per_class, mode = ?cfg.mode, kind, device = ?job.device,
        "sampling {} embeddings into {}", c * cfg.per_class, job.out.display()
    );
    if let Some(parent) = job.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut writer = io::NpyWriter::create(&job.out, &[c, cfg.per_class, d])?;
    progress.start("sample", c as u64, 0);
    let result = sample_all(job, &bank, &norms, threads, &mut writer, progress);
    progress.finish();
    let classes = result?;
    writer.finish()?;

    let report = SampleReport {
        dream_ood_version: env!("CARGO_PKG_VERSION"),
        kind,
        mode: cfg.mode,
        seed: job.seed,
        rng: RNG_DESCRIPTION,
        device: format!("{:?}", job.device),
        settings: SampleSettings {
            k: cfg.k,
            select: cfg.select,
            anchors: cfg.anchors,
            keep: cfg.keep,
            sigma: cfg.sigma,
            candidates: cfg.candidates,
            per_class: cfg.per_class,
            noise: cfg.noise,
        },
        bank: BankInfo {
            path: job.bank.clone(),
            shape: [c, n, d],
            counts_from: bank.counts_source,
        },
        tokens: TokensInfo {
            path: job.tokens.clone(),
            norms,
        },
        shape: [c, cfg.per_class, d],
        classes,
        timings: Timings {
            read_secs,
            sample_secs: started.elapsed().as_secs_f64() - read_secs,
            total_secs: started.elapsed().as_secs_f64(),
        },
    };
    let json = serde_json::to_vec_pretty(&report).expect("invariant: the report serialises");
    crate::files::write_atomic(&io::sidecar_path(&job.out), &json)?;
    tracing::info!(
        secs = format!("{:.1}", report.timings.total_secs),
        "wrote {}",
        job.out.display()
    );
    Ok(report)
}

/// Samples every class in order and streams its rows into `writer`.
fn sample_all(
    job: &SampleJob,
    bank: &io::Bank,
    norms: &[f32],
    threads: usize,
    writer: &mut io::NpyWriter,
    progress: &dyn Progress,
) -> Result<Vec<ClassInfo>> {
    let threads = NonZeroUsize::new(threads).unwrap_or(NonZeroUsize::MIN);
    let mut classes = Vec::with_capacity(bank.rows.len());
    for (class, rows) in bank.rows.iter().enumerate() {
        let _span = tracing::info_span!("sample", class).entered();
        let t0 = Instant::now();
        let d = bank.data.dim().2;
        // Deviation: the official code uses every row of `bank[c]`, zero padding included (SPEC §7 item
        // 9: `normalize(0 + σε)` is a random direction); both modes use only the filled rows. The released
        // CIFAR-100 bank has none, so official reproductions are unaffected.
        let mut flat: Vec<f32> = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            flat.extend(bank.data.slice(ndarray::s![class, r, ..]).iter());
        }
        let class_bank = Tensor::from_slice(&flat)
            .view([rows.len() as i64, d as i64])
            .to(job.device); // [N_c, D]
        // Deviation: the official stage 2 seeds nothing (SPEC §2, §7 item 21); every draw here derives
        // from (seed, class, call), so runs repeat and classes do not depend on each other.
        let mut noise = SeededNoise::new(job.seed, class, threads);
        let sample = sample_class(
            &class_bank,
            norms[class],
            &job.settings,
            class,
            job.chunk_bytes,
            &mut noise,
        )?;
        let values: Vec<f32> = Vec::try_from(sample.embeddings.contiguous().view([-1]))
            .map_err(|e| Error::torch("reading sampled embeddings", e))?;
        writer.write(&values)?;
        let secs = t0.elapsed().as_secs_f64();
        tracing::debug!(
            class,
            rows = job.settings.per_class,
            calls = sample.calls,
            secs,
            "class done"
        );
        classes.push(ClassInfo {
            class,
            bank_rows: rows.len(),
            select_used: sample.select_used,
            calls: sample.calls,
            rows: job.settings.per_class,
            secs,
        });
        progress.advance(1);
    }
    Ok(classes)
}
